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
``shapes``                  32x32 shapes, class-conditional U-Net (GPU-sized; bf16; nothing shipped)
``cifar10``                 CIFAR-10, the DDPM CIFAR-10 U-Net (35.7M; GPU; torchvision, downloads)
``digits_noisy_classifier`` digits classifier on noisy x_t, for classifier guidance
``digits_features``         digits FeatureClassifier: the feature space of the digits metrics
``shapes_features``         shapes FeatureClassifier: the feature space of the shapes metrics
=========================== ===================================================================

Any denoiser config trains on other data by override, e.g. a folder of images::

    ddpm train --config cifar10 --set data.name=image_folder data.root=my_photos data.download=false
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ddpm_lib.configs import DiffusionConfig, TrainConfig, _JSONConfig
from ddpm_lib.data import (
    TORCHVISION_SETS, ImageFolderDataset, ShapesDataset, checkerboard, eight_gaussians, load_digits_dataset,
    load_torchvision, swiss_roll, two_moons,
)
from ddpm_lib.models import MODEL_KINDS, ModelConfig

__all__ = ["DataConfig", "RunConfig", "preset_names", "load_run_config", "apply_overrides", "dry_run",
           "load_data", "load_tensors", "toy_sampler", "DATASETS", "TOYS", "VISION_SETS", "DENOISERS", "CLASSIFIERS",
           "AUTOENCODERS", "NOT_DENOISERS"]

DENOISERS = ("unet", "mlp")
CLASSIFIERS = ("feature_classifier", "noisy_classifier")
AUTOENCODERS = ("autoencoder",)
# models that are not sampled: loaded alone (no chain), trained and evaluated by their own loops
NOT_DENOISERS = CLASSIFIERS + AUTOENCODERS


# Image sets read from files through torchvision / Pillow (the ``vision`` extra): name -> native channels
VISION_SETS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "image_folder": 3}


@dataclass(frozen=True)
class DataConfig(_JSONConfig):
    """Which data: ``name`` is a key of :data:`DATASETS`.

    * 2-D toys and shapes are generated: ``n`` points or images from ``seed``; ``image_size`` is
      the shapes' side. The digits ignore ``n``, ``seed`` and ``image_size`` (scikit-learn's
      fixed 1,438 / 359 train / test split).
    * ``mnist``, ``fashion_mnist``, ``cifar10`` and ``image_folder`` are read from ``root``
      (torchvision's layout, e.g. ``root/cifar-10-batches-py``, or any folder of images) by
      ``ddpm_lib.data.vision``; ``download`` lets torchvision fetch a missing set (network).
      Images are centre-cropped and resized to ``image_size`` (MNIST's 28 becomes 32, the size
      a U-Net with three halvings needs) and converted to ``channels`` (default: the set's
      own, 1 for the MNISTs, 3 otherwise). ``n`` and ``seed`` are unused: every file is used.
    * ``downsample`` (digits and shapes) shrinks the images by block means
      (``ddpm_lib.superres.downsample``): ``downsample = 2`` turns the 8x8 digits into the 4x4
      images of a cascade's first stage (chapter 12). The file-based sets resize with
      ``image_size`` instead.
    * ``encoder`` (an autoencoder: a pretrained name or a checkpoint path) turns the images into
      latents for latent diffusion (chapter 13): the encoder's means times the scale that gives
      the training split's latents unit standard deviation (``ddpm_lib.latent``). The metrics
      decode samples and compare them with the images, :meth:`pixels`.
    """

    name: str = "swiss_roll"
    n: int = 20000
    seed: int = 0
    image_size: int = 32
    root: str | None = None
    download: bool = False
    channels: int | None = None
    downsample: int = 1
    encoder: str | None = None

    def validate(self) -> None:
        self._require(self.name in DATASETS, "name", f"must be one of {sorted(DATASETS)}")
        self._require(self.n >= 1, "n", "must be >= 1")
        self._require(self.image_size >= 1, "image_size", "must be >= 1")
        self._require(self.channels in (None, 1, 3), "channels", "must be null (the data's own), 1 or 3")
        self._require(self.downsample >= 1, "downsample", "must be >= 1")
        if self.downsample > 1:
            self._require(self.name in ("digits", "shapes"), "downsample",
                          "applies to the digits and shapes only (the file-based sets resize with image_size)")
            side = 8 if self.name == "digits" else self.image_size
            self._require(side % self.downsample == 0, "downsample", f"must divide the image side {side}")
        self._require(self.encoder is None or self.name not in TOYS, "encoder", "applies to images, not 2-D points")
        if self.name in VISION_SETS:
            self._require(self.root is not None, "root", f"must name the folder {self.name!r} is read from")
        self._require(not (self.download and self.name not in TORCHVISION_SETS), "download",
                      f"only applies to {sorted(TORCHVISION_SETS)}")

    def pixels(self) -> "DataConfig":
        """The same data as images (without the ``encoder``): what the metrics compare with."""
        return self.replace(encoder=None) if self.encoder is not None else self

    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images (or, with an ``encoder``, of the latents) this data gives; None
        for 2-D points."""
        if self.encoder is not None:
            from ddpm_lib.latent import encoder_config

            return encoder_config(self.encoder).latent_shape
        if self.name in TOYS:
            return None
        if self.name == "digits":
            return (1, 8 // self.downsample, 8 // self.downsample)
        native = VISION_SETS.get(self.name, 3)  # shapes: RGB
        side = self.image_size // self.downsample
        return (self.channels or native, side, side)


def _digits(cfg: DataConfig, split: str):
    from ddpm_lib.superres import downsample

    ds = load_digits_dataset(split)
    return downsample(ds.images, cfg.downsample), ds.labels


def _shapes(cfg: DataConfig, split: str):
    from ddpm_lib.superres import downsample

    n, seed = (cfg.n, cfg.seed) if split == "train" else (max(cfg.n // 5, 500), cfg.seed + 10_000)
    ds = ShapesDataset(n, image_size=cfg.image_size, seed=seed).to_tensors()
    return downsample(ds.images, cfg.downsample), ds.labels


def _torchvision(cfg: DataConfig, split: str):
    # A map-style Dataset, read item by item by the training loop (no full copy in memory).
    return load_torchvision(cfg.name, cfg.root, train=split == "train", download=cfg.download,
                            image_size=cfg.image_size, channels=cfg.channels)


def _image_folder(cfg: DataConfig, split: str):
    if split != "train":
        raise ValueError(f"an image folder ({cfg.root}) has no test split; the metrics that need one "
                         f"(fd, kid, acc, mem) do not apply")
    return ImageFolderDataset(cfg.root, cfg.image_size, channels=cfg.channels or 3)


def _eight_gaussians(n: int, generator=None):
    return eight_gaussians().sample(n, generator=generator).float()


# 2-D toys: name -> sampler(n, generator) [n, 2], clamped to [-1, 1] (the jitter can leave it)
TOYS = {"swiss_roll": swiss_roll, "two_moons": two_moons, "checkerboard": checkerboard,
        "eight_gaussians": _eight_gaussians}


def toy_sampler(cfg: DataConfig):
    """``sampler(n, generator=...) -> [n, 2]`` of a 2-D toy: fresh data for the metrics' floor."""
    return lambda n, generator=None: TOYS[cfg.name](n, generator=generator).clamp(-1.0, 1.0)


def _toy_data(cfg: DataConfig, split: str):
    return (toy_sampler(cfg)(cfg.n, generator=torch.Generator().manual_seed(cfg.seed + (split == "test"))),)


# name -> function(DataConfig, split) -> (x,), (images, labels) or a map-style Dataset of
# (image, label) items; split is "train" or "test"
DATASETS: dict[str, Any] = {**{name: _toy_data for name in TOYS}, "digits": _digits, "shapes": _shapes,
                            **{name: _torchvision for name in TORCHVISION_SETS}, "image_folder": _image_folder}


def load_data(cfg: DataConfig, split: str = "train"):
    """The data of ``cfg`` in [-1, 1]: ``(x,)`` for 2-D toys, ``(images, labels)`` for the digits
    and shapes, a map-style ``Dataset`` of ``(image, label)`` for the file-based image sets
    (``ddpm_lib.train.train`` takes all three). ``split`` is "train" or "test" (held out: the
    digits' or torchvision's test split, or a fresh draw from another seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.encoder is not None:
        from ddpm_lib.latent import encoded_data

        return encoded_data(cfg, split)
    return DATASETS[cfg.name](cfg, split)


def load_tensors(cfg: DataConfig, split: str = "train") -> tuple[torch.Tensor, ...]:
    """:func:`load_data` as tensors: a Dataset's items are read and stacked (for the metrics)."""
    data = load_data(cfg, split)
    if isinstance(data, tuple):
        return data
    if isinstance(data, TensorDataset):  # e.g. latents: already tensors
        return tuple(data.tensors)
    items = [data[i] for i in range(len(data))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)


def _check_model_fits_data(data: DataConfig, model: ModelConfig) -> None:
    """The model's input size must be the data's: [C, S, S] images for the image models, 2-D for the MLP."""
    shape = data.image_shape()
    if model.kind != "mlp" and not hasattr(model, "in_channels"):
        return  # a model kind of the user's own: nothing known to check
    if model.kind == "mlp":
        if shape is not None or model.data_dim != 2:
            raise ValueError(f"model: an mlp (data_dim={model.data_dim}) needs 2-D points, but data "
                             f"{data.name!r} gives {'images ' + str(list(shape)) if shape else '2-D points'}")
        return
    if shape is None:
        raise ValueError(f"model: a {model.kind} takes images, but data {data.name!r} gives 2-D points")
    want = (model.in_channels, model.image_size, model.image_size)
    if want != shape:
        raise ValueError(f"model: expects [C, H, W] = {list(want)} but data {data.name!r} gives {list(shape)}; "
                         f"set model.in_channels / model.image_size or data.channels / data.image_size")


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
        _check_model_fits_data(parts["data"], parts["model"])
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

    Each value is parsed (:func:`_parse_value`); the result is validated once, after ALL the
    overrides, because some only make sense together (``data.name=image_folder data.root=...``).
    A malformed item, an unknown section or field, or an ill-typed value raises ``ValueError``.
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
        return RunConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"bad override{'s' if len(overrides) > 1 else ''} {' '.join(overrides)!r}: {e}") from None


def dry_run(run: RunConfig) -> RunConfig:
    """A smoke-test size of ``run``: 3 steps, batch 16, a tiny model and a small data set."""
    m = run.model
    tiny = {"unet": {"model_channels": 16, "num_res_blocks": 1, "norm_groups": 8},
            "noisy_classifier": {"model_channels": 16, "num_res_blocks": 1, "norm_groups": 8},
            "mlp": {"hidden_dim": 32, "num_layers": 2, "time_embed_dim": 16},
            "feature_classifier": {"channels": [8] * len(getattr(m, "channels", ())), "feature_dim": 16,
                                   "norm_groups": 8},
            "autoencoder": {"channels": [8] * len(getattr(m, "channels", ())), "norm_groups": 8}}[m.kind]
    return dataclasses.replace(
        run, data=run.data.replace(n=min(run.data.n, 256)), model=m.replace(**tiny),
        train=run.train.replace(steps=3, batch_size=16, warmup_steps=0, log_every=1, sample_every=0,
                                checkpoint_every=0),
    )
