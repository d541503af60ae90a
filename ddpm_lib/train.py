r"""Training a diffusion model: DDPM's Algorithm 1 at scale (chapter 4; improved DDPM; ADM).

:func:`train` runs ``ddpm_lib.loop.TrainLoop``, the package's one training loop (set-up,
resume, the loop, the periodic log and atomic checkpoint), with the denoiser's loss: a batch,
uniform t, the ``DiffusionConfig``'s loss (``GaussianDiffusion.training_losses``), label
dropout for classifier-free guidance, and periodic sample grids. For example, on the swiss roll::

    from ddpm_lib.train import DiffusionConfig, TrainConfig, train
    result = train({"kind": "mlp"}, DiffusionConfig(T=100), TrainConfig(steps=3000, batch_size=256),
                   x, out_dir="runs/swiss")          # x: [N, 2] in [-1, 1]
    model, diffusion = ddpm_lib.checkpoint.load_model("runs/swiss")   # the EMA, for sampling

On several GPUs, put the call in a script and launch ``torchrun --standalone
--nproc_per_node 4 script.py``: DDP switches on from torchrun's environment
(``ddpm_lib.distributed``); ``batch_size`` stays the global batch.

Guarantees (``ddpm_lib.loop`` details them; each tested in ``tests/test_train.py`` or
``tests/test_distributed.py``): **exact resume** (on the CPU, N steps in one go and k steps +
crash or stop + resume to N give bit-identical weights, EMA and optimiser; sample grids change
no number); **the caller's RNG is untouched** (initialisation and dropout use a forked global
RNG seeded by ``seed``, everything else seeded generators); **the data order replaces
DataLoader + DistributedSampler** (a checkpointed index stream; W ranks equal one process);
**divergence stops the run** (:class:`TrainingDivergedError` before any later checkpoint, on
a non-finite or exploded loss, a non-finite gradient norm or non-finite weights); **a resume
continues the same run** (a changed train config is refused but for ``loop.RESUMABLE_FIELDS``);
**the log survives crashes** (append-only, rewritten atomically on resume); **rank 0 writes**;
**CUDA only**: ``bf16``, ``channels_last`` and ``torch.compile`` (on the CPU bf16 and
channels_last do nothing, ``compile`` warns that it is ignored).

The log ``out_dir/log.jsonl`` has one strict-JSON object per line (no ``NaN``/``Infinity``
tokens: a non-finite value is written as ``null``): every ``log_every`` steps
``step, loss, lr, steps_per_sec, ema_decay`` (and ``grad_norm``, before clipping, when
``grad_clip`` is set); at each sample grid ``samples`` (its path) and the metrics of
``sample_metrics``: by default, for 2-D data, the sliced Wasserstein distance of the samples to
the training data and its real-vs-real floor at the same n (``sliced_wasserstein``,
``sliced_wasserstein_floor``). ``loss`` is the mean over the steps since the previous line.
``steps_per_sec`` is the one timing entry (``loop.TIMING_KEYS``); every other value of a
stopped-and-resumed run equals the uninterrupted run's (on the CPU).

Step numbers count optimiser steps taken: "step 5" is the fifth update; a checkpoint at
step k holds the state after k updates; the learning rate of the update k + 1 is ``lr_at(k)``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ddpm_lib import distributed
from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.loop import BatchStream, TrainingDivergedError, TrainLoop, TrainResult, lr_at, optimizer_step
from ddpm_lib.predictions import set_parameterization

__all__ = ["train", "TrainResult", "TrainingDivergedError", "DiffusionConfig", "TrainConfig", "lr_at", "optimizer_step",
           "BatchStream", "draw_samples", "points_metrics", "DenoiserLoop"]


SampleMetrics = Callable[[Tensor, "Tensor | None"], dict[str, float]]


@torch.no_grad()
def draw_samples(ema: nn.Module, diffusion, dcfg: DiffusionConfig, cfg: TrainConfig, shape, null_label,
                 model_kwargs: dict | None = None):
    """The sample grid's samples (CPU) and labels: ``cfg.num_samples`` from ONE fixed x_T.

    Deterministic DDIM (eta = 0, ``cfg.sample_steps`` steps; Song et al. 2020, arXiv 2010.02502,
    Eq. (12)) maps the same x_T (drawn from a generator seeded by ``cfg.seed``) to the samples,
    so the grids of successive steps differ only through training. DDIM converts the model's
    prediction (``dcfg.prediction``: eps, x0 or v) to eps and x0; a learned-variance output
    gives its prediction half. A class-conditional model gets the labels 0, 1, 2, ... cycled.
    Only these generators are used: no training RNG is touched.
    """
    from ddpm_lib.samplers import ddim_sample

    device = next(ema.parameters()).device
    n, steps = cfg.num_samples, min(cfg.sample_steps, diffusion.T)
    y = None if null_label is None else torch.arange(n, device=device) % null_label
    x = ddim_sample(ema, diffusion, (n, *shape), steps=steps, eta=0.0, prediction=dcfg.prediction,
                    generator=torch.Generator(device).manual_seed(cfg.seed), y=y, model_kwargs=model_kwargs)
    return x.float().cpu(), None if y is None else y.cpu()


def points_metrics(data: "Tensor | Callable[..., Tensor]", *, repeats: int = 5) -> SampleMetrics:
    """The ``sample_metrics`` of 2-D data: the sliced Wasserstein distance of the samples to
    reference data of the same size n, beside the real-vs-real floor at that n, each averaged
    over ``repeats`` reference sets (``ddpm_lib.metrics.compare_to_data``; Bonneel et al. 2015).

    ``data`` is a sampler ``(n, generator=...) -> [n, 2]`` of fresh data (the CLI passes the toy's
    own), or a tensor of training points [N, 2], from which random subsets are drawn (the default
    of :func:`train` for 2-D tensor data). Samples from the data law score about the floor; a
    fixed seed makes the numbers comparable across steps.
    """
    from ddpm_lib.metrics import compare_to_data

    if isinstance(data, Tensor):
        points = data

        def sampler(n: int, generator: torch.Generator | None = None) -> Tensor:
            return points[torch.randperm(len(points), generator=generator)[:n]]

        max_n = len(points)
    else:
        sampler, max_n = data, None

    def metrics(x: Tensor, y: Tensor | None) -> dict[str, float]:
        x = x[:max_n]
        if len(x) < 2:
            return {}
        if not torch.isfinite(x).all():
            return {"sliced_wasserstein": None, "sliced_wasserstein_floor": None}
        r = compare_to_data(x, sampler, repeats=repeats, generator=torch.Generator().manual_seed(0))
        return {"sliced_wasserstein": r["metric"], "sliced_wasserstein_floor": r["floor"]}

    return metrics


def _sample_record(ema, diffusion, dcfg, cfg, shape, null_label, path: Path, sample_metrics,
                   model_kwargs: dict | None = None, transform=None) -> dict[str, Any]:
    """Draw the grid (mapped by ``transform``, e.g. decoded latents), write its picture, and
    return its log entries (path and metrics)."""
    from ddpm_lib.viz import save_figure

    x, y = draw_samples(ema, diffusion, dcfg, cfg, shape, null_label, model_kwargs)
    if transform is not None:
        x = transform(x).float().cpu()
    save_figure(x, path)
    record: dict[str, Any] = {"samples": f"{path.parent.name}/{path.name}"}
    for name, value in (sample_metrics(x, y) if sample_metrics is not None else {}).items():
        # JSON has no inf or NaN: a non-finite metric is logged as null
        record[name] = float(value) if value is not None and math.isfinite(value) else None
    return record


def _drawable(shape) -> bool:
    """Whether a sample of this shape can be pictured: a 2-D point or a 1- or 3-channel image."""
    return tuple(shape) == (2,) or (len(shape) == 3 and shape[0] in (1, 3))


class DenoiserLoop(TrainLoop):
    """:class:`~ddpm_lib.loop.TrainLoop` with the loss of a diffusion model (DDPM Algorithm 1: x0,
    uniform t, eps; the ``DiffusionConfig``'s loss), label dropout to the null label for
    classifier-free guidance (Ho & Salimans 2022), and the sample grids as its evaluation."""

    def __init__(self, *args, sample_metrics: SampleMetrics | None = None, sample_transform=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_metrics, self.shape, self.warned_shape = sample_metrics, None, False
        self.sample_transform = sample_transform

    def setup(self) -> None:
        super().setup()
        self.null_label = self.model_config.get("num_classes")  # the null label of CFG is num_classes
        if self.null_label is not None and not self.source.has_labels:
            raise ValueError("the model is class-conditional (num_classes is set) but the data has no labels")
        if self.cfg.label_dropout and self.null_label is None:
            raise ValueError("label_dropout needs a class-conditional model (num_classes set in its config)")
        if self.sample_metrics is None and (points := self.source.points()) is not None:
            self.sample_metrics = points_metrics(points)
        self._setup_superres()
        for net in (self.model, self.ema):  # the result samples without being told its prediction
            set_parameterization(net, prediction=self.dcfg.prediction, variance=self.dcfg.variance)

    def _setup_superres(self) -> None:
        """Check a super-resolution run's configs; keep the grid's low-resolution inputs."""
        cfg, mc = self.cfg, self.model_config
        self.superres, self.grid_kwargs = bool(mc.get("cond_channels")), None
        if not self.superres:
            if cfg.superres_factor or cfg.max_aug_level:
                raise ValueError("train.superres_factor / train.max_aug_level need a super-resolution model "
                                 "(model.cond_channels > 0)")
            return
        if not cfg.superres_factor:
            raise ValueError("the model is a super-resolution model (model.cond_channels > 0): set "
                             "train.superres_factor, the factor between its input and the conditioning image")
        if cfg.max_aug_level and not mc.get("cond_augment"):
            raise ValueError("train.max_aug_level > 0 needs model.cond_augment = true (the network must be told the level)")
        if cfg.max_aug_level > self.diffusion.T:
            raise ValueError(f"train.max_aug_level must be <= T = {self.diffusion.T}, got {cfg.max_aug_level}")
        from ddpm_lib.superres import training_conditioning

        x0, _ = self.source.get(torch.arange(min(cfg.num_samples, len(self.source))))
        x0 = x0.repeat(-(-cfg.num_samples // x0.shape[0]), 1, 1, 1)[: cfg.num_samples]
        # the grid refines clean low-resolution versions of training images (also checks the size)
        self.grid_kwargs = training_conditioning(x0, cfg.superres_factor, self.diffusion,
                                                 cond_augment=bool(mc.get("cond_augment")))

    def _superres_kwargs(self, x0: Tensor) -> dict[str, Tensor]:
        """low_res (and aug_level) of this rank's slice, drawn for the GLOBAL batch like t and eps."""
        from ddpm_lib.superres import training_conditioning

        cfg, factor = self.cfg, self.cfg.superres_factor
        level = noise = None
        if cfg.max_aug_level:
            n, (c, h, w) = cfg.batch_size, x0.shape[1:]
            level = torch.randint(cfg.max_aug_level, (n,), generator=self.gens["noise"], device=self.device)
            noise = torch.randn((n, c, h // factor, w // factor), generator=self.gens["noise"], device=self.device)
            level, noise = distributed.shard(level, self.info), distributed.shard(noise, self.info).to(x0.dtype)
        return training_conditioning(x0, factor, self.diffusion, cond_augment=bool(self.model_config.get("cond_augment")),
                                     aug_level=level, aug_noise=noise)

    def compute_loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        cfg, self.shape = self.cfg, x0.shape[1:]
        t, noise = self.timesteps_and_noise(x0)
        kwargs = self._superres_kwargs(x0) if self.superres else {}
        if self.null_label is not None:
            if cfg.label_dropout:  # one mask for the global batch, like t and the noise
                u = torch.rand(cfg.batch_size, generator=self.gens["label_dropout"], device=self.device)
                y = torch.where(distributed.shard(u < cfg.label_dropout, self.info), self.null_label, y)
            kwargs["y"] = y
        losses = self.diffusion.training_losses(self.net, x0, t, noise=noise, model_kwargs=kwargs,
                                                **self.dcfg.loss_kwargs())
        return losses["loss"].mean()

    def evaluation_due(self, last: bool) -> bool:
        return bool(self.cfg.sample_every) and (self.step % self.cfg.sample_every == 0 or last)

    def evaluate(self) -> dict[str, Any]:
        """The sample grid of this step: its picture, path and ``sample_metrics``."""
        if _drawable(self.shape) or self.sample_transform is not None:
            path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
            return _sample_record(self.ema, self.diffusion, self.dcfg, self.cfg, self.shape, self.null_label, path,
                                  self.sample_metrics, self.grid_kwargs, self.sample_transform)
        if not self.warned_shape:
            self.warned_shape = True
            warnings.warn(f"sample_every is ignored: samples of shape {list(self.shape)} cannot be drawn (2-D points "
                          f"or 1/3-channel images)", stacklevel=2)
        return {}


def train(model_config, diffusion_config, train_config, data, *, out_dir, resume: bool = True,
          progress: bool = True, sample_metrics: SampleMetrics | None = None,
          sample_transform: Callable[[Tensor], Tensor] | None = None) -> TrainResult:
    """Train a diffusion model; checkpoint to ``out_dir/checkpoint``, log to ``out_dir/log.jsonl``.

    Args:
        model_config: dict with a ``"kind"`` (or a models config object), built by ``ddpm_lib.models``.
        diffusion_config, train_config: ``DiffusionConfig`` / ``TrainConfig`` or their dicts.
        data: tensor [N, ...] in [-1, 1], a pair (x, labels [N]) or a Dataset of x or (x, label).
        resume: continue from ``out_dir``'s checkpoint if there is one (it must match the
            model and diffusion configs, and the train config but for the fields of
            ``loop.RESUMABLE_FIELDS``: ``steps``, the log / checkpoint / sample cadence, the
            device and the like; a ``CheckpointError`` names what differs).
        sample_metrics: ``f(samples, labels or None) -> {name: float}``, called on each sample
            grid (every ``sample_every`` steps) and logged with it; default :func:`points_metrics`
            for 2-D tensor data, none otherwise (the CLI passes feature-space metrics for images).
        sample_transform: maps each grid's samples to images before they are drawn and measured:
            the CLI passes the decoder of a latent model (``ddpm_lib.latent.decode_samples``).
    Returns a :class:`TrainResult` (its model and EMA carry the config's ``prediction`` and
    ``variance``). Raises :class:`TrainingDivergedError` when training diverges (``ddpm_lib.loop``).
    """
    return DenoiserLoop(model_config, diffusion_config, train_config, data, out_dir=out_dir, resume=resume,
                        progress=progress, sample_metrics=sample_metrics, sample_transform=sample_transform).run()
