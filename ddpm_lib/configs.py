"""The diffusion and training configs: frozen dataclasses that round-trip through JSON.

A checkpoint stores them (with the model's config dict) in its ``config.json``, so a run can
be resumed, and a model rebuilt for sampling, from the directory alone (DESIGN.md, STYLE 12).
``from_dict`` refuses unknown keys and ill-typed values with a ``ValueError`` that names them.

``DiffusionConfig`` describes the chain and the loss (chapters 2, 4, 7); ``TrainConfig`` the
optimisation (chapter 4's Algorithm 1 at scale). Both are read by ``ddpm_lib.train.train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ddpm_lib.diffusion import PREDICTIONS, VARIANCES, GaussianDiffusion
from ddpm_lib.losses import LOSSES
from ddpm_lib.models.config import check_keys
from ddpm_lib.schedules import SCHEDULES, get_betas, rescale_zero_terminal_snr

__all__ = ["DiffusionConfig", "TrainConfig", "LR_SCHEDULES", "config_from_dict"]

# Learning-rate shapes after the linear warm-up: a factor of lr as a function of progress in [0, 1].
LR_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}

_TYPES = {
    "int": (int,), "float": (float, int), "bool": (bool,), "str": (str,),
    "float | None": (float, int, type(None)), "str | None": (str, type(None)), "int | None": (int, type(None)),
}


class _JSONConfig:
    """Type checks from the field annotations, then ``validate``; ``to_dict``/``from_dict``/JSON."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _TYPES[str(f.type)]
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                raise ValueError(f"{type(self).__name__}.{f.name} must be {f.type}, got {value!r}")
            if isinstance(value, int) and not isinstance(value, bool) and float in allowed:
                object.__setattr__(self, f.name, float(value))  # JSON writes 1e-3 but may give 1
        self.validate()

    def validate(self) -> None:
        pass

    def _require(self, ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field} {what}, got {getattr(self, field)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Rebuild from ``to_dict()``; unknown keys and wrong types raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} needs a dict, got {type(d).__name__}")
        check_keys(cls, d)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def config_from_dict(cls, value):
    """``value`` if it already is a ``cls``, else ``cls.from_dict(value)``."""
    return value if isinstance(value, cls) else cls.from_dict(value)


@dataclass(frozen=True)
class DiffusionConfig(_JSONConfig):
    """The diffusion chain and what the model predicts and is trained on.

    ``loss`` is passed to ``losses.training_losses``: ``"simple"`` (DDPM eq. 14), ``"hybrid"``
    (improved DDPM eq. 16, needed by ``variance="learned_range"``) or ``"vlb"``.
    ``zero_terminal_snr`` rescales the betas so alpha-bar_T = 0 (pitfall 2; use v-prediction).
    """

    schedule: str = "linear"
    T: int = 1000
    loss: str = "simple"
    prediction: str = "eps"
    variance: str = "fixed_small"
    zero_terminal_snr: bool = False

    def validate(self) -> None:
        self._require(self.schedule in SCHEDULES, "schedule", f"must be one of {sorted(SCHEDULES)}")
        self._require(self.T >= 1, "T", "must be >= 1")
        self._require(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}")
        self._require(self.prediction in PREDICTIONS, "prediction", f"must be one of {list(PREDICTIONS)}")
        self._require(self.variance in VARIANCES, "variance", f"must be one of {list(VARIANCES)}")
        self._require(not (self.variance == "learned_range" and self.loss == "simple"), "loss",
                      "must be 'hybrid' or 'vlb' with variance='learned_range'")

    def build(self) -> GaussianDiffusion:
        """The ``GaussianDiffusion`` this config describes (float64 schedule, on the CPU)."""
        betas = get_betas(self.schedule, self.T)
        return GaussianDiffusion(rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas)

    def loss_kwargs(self) -> dict[str, str]:
        """The keyword arguments of ``training_losses`` (and of the samplers) this config fixes."""
        return {"loss": self.loss, "prediction": self.prediction, "variance": self.variance}


@dataclass(frozen=True)
class TrainConfig(_JSONConfig):
    """How to train: AdamW, warm-up, clipping, EMA, label dropout, logging, samples and checkpoints.

    ``batch_size`` is the GLOBAL batch: under DDP each of the W ranks gets batch_size / W
    examples, so a run gives the same result whatever W (to float tolerance).
    ``grad_clip``: the gradients' global L2 norm is clipped to this value before the AdamW step
    (``torch.nn.utils.clip_grad_norm_``); the log's ``grad_norm`` is the norm BEFORE clipping.
    ``ema_warmup``: the EMA decay at optimiser step n is min(ema_decay, (1 + n) / (10 + n))
    (``ddpm_lib.ema.ema_decay``; pitfall 7). ``label_dropout``: probability of replacing a
    label by the null label (= the model's num_classes) for classifier-free guidance
    (chapter 11; pitfall 8).

    Every ``sample_every`` steps (and at the last step; 0 never) the EMA draws ``num_samples``
    samples with ``sample_steps`` deterministic DDIM steps (eta = 0; Song et al. 2021) from ONE
    fixed x_T (seeded by ``seed``), so successive grids differ only by training; models that
    predict x0 or v use ancestral DDPM from the same seed. The grid (images) or scatter plot
    (2-D) goes to ``out_dir/samples/step_NNNNNNN.png`` and its metrics to ``log.jsonl``.
    ``checkpoint_every = 0`` checkpoints only at the end.

    ``bf16``, ``channels_last`` and ``compile`` act on CUDA only; on the CPU bf16 and
    channels_last are ignored by design (one config serves a Colab GPU and a laptop), and
    ``compile`` is ignored with a warning. ``device = None`` picks CUDA when available.
    ``data_workers`` threads read the items of a map-style Dataset (e.g. image files) in
    parallel; the batches are the same whatever the count.
    """

    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    label_dropout: float = 0.0
    seed: int = 0
    log_every: int = 100
    sample_every: int = 0
    num_samples: int = 64
    sample_steps: int = 50  # deterministic DDIM steps (eta = 0) of the sample grids, from a fixed x_T
    checkpoint_every: int = 1000
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str | None = None
    data_workers: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "num_samples", "sample_steps"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "seed", "weight_decay", "data_workers"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {sorted(LR_SCHEDULES)}")
        self._require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be None or > 0")
        self._require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        self._require(0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
