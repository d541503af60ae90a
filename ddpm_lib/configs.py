"""The diffusion and training configs: frozen dataclasses that round-trip through JSON.

A checkpoint stores them (with the model's config dict) in its ``config.json``, so a run can
be resumed, and a model rebuilt for sampling, from the directory alone (DESIGN.md, STYLE 12).
``from_dict`` refuses unknown keys and ill-typed values with a ``ValueError`` that names them.

``DiffusionConfig`` describes the chain and the loss (chapters 2, 4, 7); ``TrainConfig`` the
optimisation (chapter 4's Algorithm 1 at scale). Both are read by ``ddpm_lib.train.train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddpm_lib.diffusion import PREDICTIONS, VARIANCES, GaussianDiffusion
from ddpm_lib.losses import LOSSES
from ddpm_lib.models.config import JSONConfig
from ddpm_lib.schedules import SCHEDULES, get_betas, rescale_zero_terminal_snr

__all__ = ["DiffusionConfig", "TrainConfig", "LR_SCHEDULES", "config_from_dict"]

# Learning-rate shapes after the linear warm-up: a factor of lr as a function of progress in [0, 1].
LR_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}

# The one config base (shared with the model configs); presets' DataConfig imports it by this name.
_JSONConfig = JSONConfig


def config_from_dict(cls, value):
    """``value`` if it already is a ``cls``, else ``cls.from_dict(value)``."""
    return value if isinstance(value, cls) else cls.from_dict(value)


@dataclass(frozen=True)
class DiffusionConfig(JSONConfig):
    """The diffusion chain and what the model predicts and is trained on.

    ``loss`` is passed to ``losses.training_losses``: ``"simple"`` (DDPM eq. 14), ``"hybrid"``
    (improved DDPM eq. 16, needed by ``variance="learned_range"``) or ``"vlb"``.
    ``zero_terminal_snr`` rescales the betas so alpha-bar_T = 0 (pitfall 2; use v-prediction).
    ``beta_start`` and ``beta_end``: the end points of the linear schedule (Ho et al. 2020, §4;
    ``schedules.linear_betas``), None for its defaults 1e-4 and 0.02; the cosine schedule has
    no such end points and refuses them.
    """

    schedule: str = "linear"
    T: int = 1000
    loss: str = "simple"
    prediction: str = "eps"
    variance: str = "fixed_small"
    zero_terminal_snr: bool = False
    beta_start: float | None = None
    beta_end: float | None = None

    def validate(self) -> None:
        self._require(self.schedule in SCHEDULES, "schedule", f"must be one of {sorted(SCHEDULES)}")
        self._require(self.T >= 1, "T", "must be >= 1")
        self._require(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}")
        self._require(self.prediction in PREDICTIONS, "prediction", f"must be one of {list(PREDICTIONS)}")
        self._require(self.variance in VARIANCES, "variance", f"must be one of {list(VARIANCES)}")
        self._require(not (self.variance == "learned_range" and self.loss in ("simple", "huber")), "loss",
                      "must be 'hybrid' or 'vlb' with variance='learned_range'")
        for name, value in self._schedule_kwargs().items():
            self._require(self.schedule == "linear", name,
                          f"applies to the linear schedule only, not {self.schedule!r}")
            self._require(0 < value < 1, name, "must be in (0, 1)")
        if self.beta_start is not None and self.beta_end is not None:
            self._require(self.beta_start <= self.beta_end, "beta_end", f"must be >= beta_start = {self.beta_start}")

    def _schedule_kwargs(self) -> dict[str, float]:
        """The end points that were set, as keyword arguments of ``schedules.linear_betas``."""
        return {k: v for k, v in (("beta_start", self.beta_start), ("beta_end", self.beta_end)) if v is not None}

    def build(self) -> GaussianDiffusion:
        """The ``GaussianDiffusion`` this config describes (float64 schedule, on the CPU)."""
        betas = get_betas(self.schedule, self.T, **self._schedule_kwargs())
        return GaussianDiffusion(rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas)

    def loss_kwargs(self) -> dict[str, str]:
        """The keyword arguments of ``training_losses`` (and of the samplers) this config fixes."""
        return {"loss": self.loss, "prediction": self.prediction, "variance": self.variance}


@dataclass(frozen=True)
class TrainConfig(JSONConfig):
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
    fixed x_T (seeded by ``seed``), so successive grids differ only by training; DDIM reads the
    model's prediction (eps, x0 or v) from the ``DiffusionConfig``. The grid (images) or scatter plot
    (2-D) goes to ``out_dir/samples/step_NNNNNNN.png`` and its metrics to ``log.jsonl``.
    ``checkpoint_every = 0`` checkpoints only at the end.

    ``bf16``, ``channels_last`` and ``compile`` act on CUDA only; on the CPU bf16 and
    channels_last are ignored by design (one config serves a Colab GPU and a laptop), and
    ``compile`` is ignored with a warning. ``device = None`` picks CUDA when available.
    ``data_workers`` threads read the items of a map-style Dataset (e.g. image files) in
    parallel; the batches are the same whatever the count.

    A super-resolution model (``UNetConfig.cond_channels > 0``, chapter 12) trains on the data's
    images with their ``superres_factor``-times downsampled versions as conditioning
    (``ddpm_lib.superres.superres_losses``), noised to a level drawn uniformly below
    ``max_aug_level`` when the model has ``cond_augment`` (noise conditioning augmentation,
    Ho et al. 2022, sec. 4.3; 0: clean conditioning). Its sample grids refine the first
    ``num_samples`` training images' low-resolution versions.
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
    superres_factor: int = 0
    max_aug_level: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "num_samples", "sample_steps"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.superres_factor != 1, "superres_factor", "must be 0 (not super-resolution) or >= 2")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "seed", "weight_decay", "data_workers",
                     "superres_factor", "max_aug_level"):
            self._require(0 <= getattr(self, name) < math.inf, name, "must be a finite number >= 0")
        self._require(0 < self.lr < math.inf, "lr", "must be a finite number > 0")
        self._require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {sorted(LR_SCHEDULES)}")
        self._require(self.grad_clip is None or 0 < self.grad_clip < math.inf, "grad_clip", "must be None or a finite number > 0")
        self._require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        self._require(0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
