"""Run configs: the shipped ``*.json`` presets of ``ddpm train``, ``--set`` overrides, the data they name.

A run config is one JSON file with four sections, each read by a frozen dataclass, so a typo
or an ill-typed value fails at once with a message naming the field (STYLE 12)::

    {"data": {...},        DataConfig: which dataset (below)
     "model": {...},       the model config with its "kind" (ddpm_lib.models.MODEL_KINDS)
     "diffusion": {...},   DiffusionConfig (denoisers and the noisy classifier)
     "train": {...}}       TrainConfig

=========================== ===================================================================
``swissroll``               2-D swiss roll, MLP denoiser
``digits``                  8x8 digits, unconditional U-Net (``models.digits8``)
``digits_cond``             8x8 digits, class-conditional U-Net, label dropout 0.15 (CFG)
``shapes``                  32x32 shapes, class-conditional U-Net (GPU-sized; nothing shipped)
``digits_noisy_classifier`` digits classifier on noisy x_t, for classifier guidance
``digits_features``         digits FeatureClassifier: the feature space of the digits metrics
``shapes_features``         shapes FeatureClassifier: the feature space of the shapes metrics
=========================== ===================================================================
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ddpm_lib.configs import DiffusionConfig, TrainConfig, _JSONConfig
from ddpm_lib.data import ShapesDataset, checkerboard, load_digits_dataset, swiss_roll, two_moons
from ddpm_lib.models import MODEL_KINDS, ModelConfig

__all__ = ["DataConfig", "RunConfig", "preset_names", "load_run_config", "apply_overrides", "dry_run",
           "load_data", "toy_sampler", "DATASETS", "TOYS", "DENOISERS", "CLASSIFIERS"]

DENOISERS = ("unet", "mlp")
CLASSIFIERS = ("feature_classifier", "noisy_classifier")


@dataclass(frozen=True)
class DataConfig(_JSONConfig):
    """Which data: ``name`` is a key of :data:`DATASETS`. ``n`` and ``seed`` size and seed the
    generated sets (2-D toys, shapes); ``image_size`` is the shapes' side. The digits ignore all
    three (scikit-learn's fixed 1,438 / 359 train / test split)."""

    name: str = "swiss_roll"
    n: int = 20000
    seed: int = 0
    image_size: int = 32

    def validate(self) -> None:
        self._require(self.name in DATASETS, "name", f"must be one of {sorted(DATASETS)}")
        self._require(self.n >= 1, "n", "must be >= 1")


def _digits(cfg: DataConfig, split: str):
    ds = load_digits_dataset(split)
    return ds.images, ds.labels


def _shapes(cfg: DataConfig, split: str):
    n, seed = (cfg.n, cfg.seed) if split == "train" else (max(cfg.n // 5, 500), cfg.seed + 10_000)
    ds = ShapesDataset(n, image_size=cfg.image_size, seed=seed).to_tensors()
    return ds.images, ds.labels


# 2-D toys: name -> sampler(n, generator) [n, 2], clamped to [-1, 1] (the jitter can leave it)
TOYS = {"swiss_roll": swiss_roll, "two_moons": two_moons, "checkerboard": checkerboard}


def toy_sampler(cfg: DataConfig):
    """``sampler(n, generator=...) -> [n, 2]`` of a 2-D toy: fresh data for the metrics' floor."""
    return lambda n, generator=None: TOYS[cfg.name](n, generator=generator).clamp(-1.0, 1.0)


def _toy_data(cfg: DataConfig, split: str):
    return (toy_sampler(cfg)(cfg.n, generator=torch.Generator().manual_seed(cfg.seed + (split == "test"))),)


# name -> function(DataConfig, split) -> (x,) or (images, labels); split is "train" or "test"
DATASETS: dict[str, Any] = {**{name: _toy_data for name in TOYS}, "digits": _digits, "shapes": _shapes}


def load_data(cfg: DataConfig, split: str = "train") -> tuple[torch.Tensor, ...]:
    """``(x,)`` for 2-D toys or ``(images, labels)``, in [-1, 1]; ``split`` "train" or "test"
    (held out: the digits' test split, or a fresh draw from another seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return DATASETS[cfg.name](cfg, split)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: data, model (a ``ModelConfig`` with its kind), diffusion, train."""

    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    description: str = ""

    @property
    def kind(self) -> str:
        return self.model.kind

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "data": self.data.to_dict(), "model": self.model.to_dict(),
                "diffusion": self.diffusion.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Parse and validate; ``ValueError`` names the section and the field at fault."""
        if not isinstance(d, dict):
            raise ValueError(f"a run config is a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"description", "data", "model", "diffusion", "train"})
        if unknown:
            raise ValueError(f"unknown section(s) {unknown}; a run config has data, model, diffusion, train")
        model = d.get("model")
        if not isinstance(model, dict) or model.get("kind") not in MODEL_KINDS:
            raise ValueError(f"model: needs a \"kind\", one of {sorted(MODEL_KINDS)}")
        parts = {}
        for section, parse in (("data", DataConfig.from_dict), ("model", MODEL_KINDS[model["kind"]][0].from_dict),
                               ("diffusion", DiffusionConfig.from_dict), ("train", TrainConfig.from_dict)):
            try:
                parts[section] = parse(d.get(section, {}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{section}: {e}") from None
        return cls(**parts, description=str(d.get("description", "")))


def preset_names() -> list[str]:
    """Names of the shipped run configs (the ``*.json`` files of this package)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_run_config(name_or_path: str) -> RunConfig:
    """A shipped preset by name, or a run-config JSON file by path."""
    if name_or_path in preset_names():
        text = resources.files(__name__).joinpath(f"{name_or_path}.json").read_text()
    elif name_or_path.endswith(".json") or Path(name_or_path).exists():
        try:
            text = Path(name_or_path).read_text()
        except OSError as e:
            raise FileNotFoundError(f"cannot read the config file {name_or_path}: {e.strerror}") from None
    else:
        raise ValueError(f"unknown config {name_or_path!r}; shipped configs: {', '.join(preset_names())} "
                         f"(or give a path to a .json file)")
    try:
        return RunConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{name_or_path}: not valid JSON ({e})") from None


def _parse_value(text: str) -> Any:
    """JSON if it parses (1, 1e-3, true, null, [1, 2]), a comma list as a list, else the string."""
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_parse_value(part.strip()) for part in text.split(",")]
        return text


def apply_overrides(run: RunConfig, overrides: list[str]) -> RunConfig:
    """``["train.steps=100", "model.model_channels=16", "model.channel_mult=1,2"]`` applied to ``run``.

    Each value is parsed (:func:`_parse_value`) and then type-checked by the section's dataclass;
    a malformed item, unknown section or field, or ill-typed value raises ``ValueError``.
    """
    d = run.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"malformed override {item!r}: expected SECTION.FIELD=VALUE, e.g. train.steps=100")
        if section not in ("data", "model", "diffusion", "train"):
            raise ValueError(f"override {item!r}: unknown section {section!r} (data, model, diffusion or train)")
        d[section][field] = _parse_value(value.strip())
        try:
            RunConfig.from_dict(d)
        except ValueError as e:
            raise ValueError(f"bad override {item!r}: {e}") from None
    return RunConfig.from_dict(d)


def dry_run(run: RunConfig) -> RunConfig:
    """A smoke-test size of ``run``: 3 steps, batch 16, a tiny model and a small data set."""
    m = run.model
    tiny = {"unet": {"model_channels": 16, "num_res_blocks": 1, "norm_groups": 8},
            "noisy_classifier": {"model_channels": 16, "num_res_blocks": 1, "norm_groups": 8},
            "mlp": {"hidden_dim": 32, "num_layers": 2, "time_embed_dim": 16},
            "feature_classifier": {"channels": [8] * len(getattr(m, "channels", ())), "feature_dim": 16,
                                   "norm_groups": 8}}[m.kind]
    return dataclasses.replace(
        run, data=run.data.replace(n=min(run.data.n, 256)), model=m.replace(**tiny),
        train=run.train.replace(steps=3, batch_size=16, warmup_steps=0, log_every=1, sample_every=0,
                                checkpoint_every=0),
    )
