r"""THE training loop of the package: :class:`TrainLoop` (step, log, checkpoint, resume).

DDPM's Algorithm 1 at scale (Ho et al. 2020, arXiv 2006.11239; improved DDPM, Nichol & Dhariwal
2021; ADM, Dhariwal & Nichol 2021), split into small named steps as improved-diffusion's
``TrainLoop`` is. Two thin users subclass it, each overriding :meth:`TrainLoop.compute_loss`:
``ddpm_lib.train.train`` (denoisers: the diffusion loss at uniform t, label dropout, sample
grids) and ``ddpm_lib.classifier_training.train_classifier`` (cross-entropy). One run is::

    run      setup -> restore (if out_dir holds a checkpoint) -> start -> until cfg.steps:
                 run_step  (next_batch -> compute_loss -> optimizer_step: lr, clip, AdamW, EMA)
                 after_step (check_divergence -> log_entries, evaluate -> log; save)

Guarantees (each tested in ``tests/test_train.py``, ``test_distributed.py`` or
``test_classifier_training.py``):

* **Exact resume.** Every source of randomness is a ``torch.Generator`` whose state is in the
  checkpoint (batches, timesteps, noise, label dropout; torch's global RNG for dropout
  layers), and the data order is a checkpointed stream. On the CPU, N steps in one go and
  k steps + (crash or stop) + resume to N give bit-identical weights, EMA and optimiser, and
  the same log value for value except the timing entries (:data:`TIMING_KEYS`): the losses
  since the last log line, the reference loss of the divergence check and a subclass's own
  accumulators (the classifier's ``train_acc``) are in the checkpoint (:meth:`TrainLoop.loop_state`).
  Sample grids and their metrics use generators of their own: they change no number.
* **A resume continues the same run.** The checkpoint's model, diffusion and train configs
  must equal the run's, except the train fields of :data:`RESUMABLE_FIELDS` (the total
  ``steps``, which a decaying ``lr_schedule`` then stretches to, and fields that change only
  when or what is written, or where and with which kernels the same arithmetic runs);
  anything else raises :class:`~ddpm_lib.checkpoint.CheckpointError` naming the fields.
* **The caller's RNG is untouched.** The run's global RNG (the initialisation, seeded by
  ``cfg.seed``, and dropout) lives inside ``torch.random.fork_rng`` (CPU, and the training
  device on CUDA): ``torch.get_rng_state()`` after :meth:`TrainLoop.run` is what it was before.
* **The data order replaces DataLoader + DistributedSampler.** Batches are index lists from
  :class:`BatchStream` (seeded ``randperm`` passes over the N examples, drawn on the CPU), and
  every rank draws the same GLOBAL batch of indices and reads only its slice
  (``distributed.shard``). A ``DistributedSampler`` pads the data to a multiple of the number
  of ranks and cuts batches at epoch ends (so the batches depend on it), and its position
  inside an epoch is in no checkpoint (a resumed run restarts the epoch). The stream's state
  is a generator state and a position, so resume is exact and W ranks equal one process. Tensors
  are indexed on the device; a map-style ``Dataset`` (image files, torchvision sets) is read
  item by item, by ``data_workers`` threads if asked.
* **Divergence stops the run.** :class:`TrainingDivergedError` names the step, and is raised
  before any later checkpoint is written (the one on disk is the last good one), on: a NaN/inf
  loss; a loss above :data:`EXPLOSION_FACTOR` x max(1, the loss of step 1) (see there); a
  NaN/inf gradient norm (with ``grad_clip``, which computes it every step); non-finite model or
  EMA weights (without ``grad_clip`` this is how a non-finite gradient shows: AdamW turns an
  inf or NaN gradient into NaN weights). These are checked together, in one device sync, only
  when logging, evaluating or checkpointing. The loop adds no other wait for the GPU: batch
  indices and Dataset items are copied from pinned memory without blocking, labels are checked
  on the CPU, and losses and gradient norms stay device tensors until checked (the loss's own
  input checks live in ``ddpm_lib.losses``).
* **The log survives crashes.** ``out_dir/log.jsonl`` is strict JSON, one object per line
  (``allow_nan=False``: a non-finite value is written as ``null``), and append-only; it is
  fsynced before each checkpoint, so it holds every line up to the checkpoint's step. On
  resume, lines after the checkpoint's step (and a line torn by a crash) are dropped by an
  atomic rewrite (``checkpoint.write_atomic``): a crash during it leaves the old log whole.
* **Rank 0 writes.** Under DDP only rank 0 writes the log, the evaluations (sample grids) and
  checkpoints, and shows the progress bar.
* **CUDA only**: ``bf16`` autocast (where the GPU supports bf16), ``channels_last`` and
  ``torch.compile``. On the CPU bf16 and channels_last do nothing, by design; ``compile``
  warns that it is ignored.

Step numbers count optimiser steps taken: "step 5" is the fifth update; a checkpoint at
step k holds the state after k updates; the learning rate of the update k + 1 is ``lr_at(k)``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ddpm_lib import distributed
from ddpm_lib.checkpoint import (
    CheckpointError, build_model, latest_checkpoint, load_checkpoint, load_state_dict, save_checkpoint,
    write_atomic,
)
from ddpm_lib.configs import LR_SCHEDULES, DiffusionConfig, TrainConfig, config_from_dict
from ddpm_lib.data import Latents, check_range
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.ema import ema_decay, ema_update, make_ema

__all__ = ["TrainLoop", "TrainResult", "TrainingDivergedError", "BatchStream", "TrainingData", "lr_at",
           "optimizer_step", "GENERATORS", "TIMING_KEYS", "RESUMABLE_FIELDS", "EXPLOSION_FACTOR"]

GENERATORS = ("data", "timestep", "noise", "label_dropout")

# Log entries that measure the machine, not the run: they differ between two runs of the same
# numbers (and between a run and its stopped-and-resumed twin); every other entry is equal.
TIMING_KEYS = ("steps_per_sec",)

# The TrainConfig fields a resumed run may change. ``steps``: the total to train to (a decaying
# lr_schedule stretches to it). The others change when or what is written (log, checkpoints,
# sample grids), how many threads read the data (the same batches whatever the count: tested),
# or where and with which kernels the same arithmetic runs (device, compile, channels_last: as
# moving the run to another machine would, they change rounding only). Everything else (data,
# batches, seeds, optimiser, schedule, EMA, label dropout, bf16 precision) would make the
# resumed run a different run on top of the random streams of the old one: refused.
RESUMABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "sample_every", "num_samples", "sample_steps",
                    "data_workers", "device", "compile", "channels_last")

# A checked loss above EXPLOSION_FACTOR * max(1, loss of step 1) is divergence. The package's
# losses are O(1) on data in [-1, 1]: L_simple of the zero predictor is E|eps|^2 / d = 1, the
# hybrid and vlb losses and a classifier's cross-entropy (log K at chance) are of that order, and
# a healthy run stays within a small factor of its first loss (measured on the two-moons MLP, 300
# steps, simple / hybrid / vlb losses, two seeds each: every step's loss below 1.7 x max(1, the
# first)). Four orders of magnitude above that is no spike but a blow-up (lr = 1e12 gives ~1e25 at
# step 2, inf at step 3). The max(1, .) keeps a run that starts near 0 (fine-tuning; the vlb loss
# starts at ~0.01) from stopping on an ordinary rise; the relative part scales the limit for a
# subclass's loss of another scale (e.g. summed over pixels).
EXPLOSION_FACTOR = 1e4


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient norm or the weights became non-finite, or the loss exploded; the
    message names the step and the value."""


@dataclass
class TrainResult:
    """What a run returns: the raw model, its EMA (sample from this), the chain, the step."""

    model: nn.Module
    ema: nn.Module
    diffusion: GaussianDiffusion
    step: int
    out_dir: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the update taken at 0-based ``step``: linear warm-up lr (step + 1) / warmup_steps
    over the first ``warmup_steps`` updates, then ``lr`` times the ``lr_schedule`` shape."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * LR_SCHEDULES[cfg.lr_schedule](min(1.0, progress))


def optimizer_step(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, *,
                   step: int, cfg: TrainConfig) -> Tensor | None:
    """One update of Algorithm 1 (Ho et al. 2020) after the loss: the learning rate of 0-based
    ``step`` (:func:`lr_at`), backward, global-norm clipping to ``cfg.grad_clip``, the optimiser
    step, and the EMA update with its warm-up (DESIGN.md pitfall 7: once per optimiser step).

    Returns the gradient norm BEFORE clipping as a 0-d tensor (no device sync), or None when
    ``cfg.grad_clip`` is None. Shared by :class:`TrainLoop` and the chapters' explicit loops.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if cfg.grad_clip is not None:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    ema_update(ema, model, ema_decay(cfg.ema_decay, step + 1, cfg.ema_warmup))
    return grad_norm


class BatchStream:
    """Indices of shuffled passes over N examples, drawn from ``generator``; checkpointable.

    Each pass is ``randperm(N, generator)``; batches run across pass boundaries. Its state is
    the generator's state from BEFORE the current pass's permutation plus the position in it,
    so :meth:`load_state` redraws the same permutation and continues where it stopped.
    """

    def __init__(self, n: int, generator: torch.Generator):
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.generator = n, generator
        self._new_pass()

    def _new_pass(self) -> None:
        self.pass_state = self.generator.get_state()
        self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0

    def take(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self._new_pass()
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + m])
            self.pos, k = self.pos + m, k - m
        return torch.cat(parts)

    def load_state(self, pass_state: Tensor, pos: int) -> None:
        self.generator.set_state(pass_state)
        self._new_pass()
        self.pos = pos


class TrainingData:
    """Training data as ``get(indices) -> (x0, y or None)`` on the device. Accepts a tensor
    [N, ...], a pair (x [N, ...], labels [N]), a TensorDataset of those (both kept on the
    device), or any map-style Dataset whose items are x or (x, label), read item by item on
    the CPU (by ``workers`` threads if > 0) and copied over. With ``num_classes`` the labels
    must lie in [0, num_classes): a denoiser's label num_classes is the null label of CFG."""

    def __init__(self, data: Any, device: torch.device, *, num_classes: int | None = None, workers: int = 0):
        self.device, self.dataset, self.y, self.num_classes = device, None, None, num_classes
        self.pool = None
        # latent codes (checked finite when made) are not images: no [-1, 1] range
        checked = (lambda x, name: x) if isinstance(data, Latents) else check_range
        if isinstance(data, TensorDataset):
            data = tuple(data.tensors)
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and len(data) in (1, 2) and all(isinstance(d, Tensor) for d in data):
            self.x = checked(data[0].float(), name="training data").to(device)
            if len(data) == 2:
                if len(data[1]) != len(data[0]):
                    raise ValueError(f"{len(data[0])} examples but {len(data[1])} labels")
                self.y = self._checked_labels(data[1].long()).to(device)  # checked once, on the CPU
            self.has_labels = self.y is not None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset, self.has_labels = data, isinstance(data[0], (tuple, list))
            if workers:
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ddpm-data")
        else:
            raise TypeError(f"data must be a tensor, an (x, labels) pair or a Dataset, got {type(data).__name__}")

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.x)

    def _checked_labels(self, y: Tensor) -> Tensor:
        if self.num_classes is not None and y.numel() and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) for a model with num_classes="
                             f"{self.num_classes} (a denoiser's label {self.num_classes} is the null label), got "
                             f"range [{int(y.min())}, {int(y.max())}]")
        return y

    def _to_device(self, x: Tensor) -> Tensor:
        # A plain host-to-device copy waits for the GPU to finish its queue (a host sync every
        # step); from pinned memory with non_blocking it is queued like a kernel.
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.dataset is None:
            idx = self._to_device(idx)
            return self.x[idx], None if self.y is None else self.y[idx]
        fetch = self.dataset.__getitem__
        items = list(self.pool.map(fetch, idx.tolist()) if self.pool is not None else map(fetch, idx.tolist()))
        x = torch.stack([torch.as_tensor(it[0] if self.has_labels else it) for it in items]).float()
        x = self._to_device(check_range(x, name="training data"))
        y = None
        if self.has_labels:
            y = self._to_device(self._checked_labels(torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)))
        return x, y

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def points(self) -> Tensor | None:
        """The training points [N, 2] (on the CPU) when the data is a 2-D tensor, else None."""
        if self.dataset is None and self.x.ndim == 2 and self.x.shape[1] == 2:
            return self.x.cpu()
        return None


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    """One seeded generator per source of randomness, seeds drawn from ``seed`` (same on every rank)."""
    seeds = torch.randint(2**62, (len(GENERATORS),), generator=torch.Generator().manual_seed(seed)).tolist()
    where = {"data": torch.device("cpu")}  # indices are drawn on the CPU, the rest where they are used
    return {name: torch.Generator(where.get(name, device)).manual_seed(s) for name, s in zip(GENERATORS, seeds)}


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global RNG of the CPU and of ``device`` only (``torch.manual_seed`` would reseed
    every GPU, outside the fork of :meth:`TrainLoop.run`)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _config_dict(model_config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The model config as the JSON dict stored in checkpoints (all defaults filled in when known)."""
    if model is not None and hasattr(getattr(model, "config", None), "to_dict"):
        model_config = model.config
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return json.loads(json.dumps(d))


def _logged_step(line: str) -> int | None:
    """The ``step`` of a log line, or None for a line that is not a log record (torn by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines after ``step`` (written by a run that died before its next checkpoint)
    and lines torn by a crash mid-append, by an atomic rewrite: a crash during it leaves the old
    log whole. A log with nothing to drop is not touched (the log is append-only otherwise)."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # a rewrite that a crash interrupted
        stale.unlink(missing_ok=True)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line.rstrip("\n") + "\n" for line in lines if (s := _logged_step(line)) is not None and s <= step]
    if kept != lines:
        write_atomic(path, "".join(kept))


def _finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON's null): strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _all_finite(module: nn.Module, device: torch.device) -> Tensor:
    """Whether every float parameter and buffer of ``module`` is finite: a 0-d bool tensor on
    ``device`` (no sync). Element-wise isfinite, not a norm, which overflows for finite weights."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    flags = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def _diverged(what: str) -> TrainingDivergedError:
    return TrainingDivergedError(f"training diverged: {what} (no checkpoint was written after it); lower lr, "
                                 f"set grad_clip or check the data")


class TrainLoop:
    """One training run of a network of ``ddpm_lib.models``: AdamW with warm-up and clipping,
    EMA, the JSON log ``out_dir/log.jsonl``, atomic checkpoints in ``out_dir/checkpoint`` and
    exact resume from them (see the module docstring). Subclasses override :meth:`compute_loss`
    (and, to add to the log, :meth:`setup`, :meth:`log_entries`, :meth:`evaluation_due` and
    :meth:`evaluate`); :meth:`run` trains to ``train_config.steps``.

    The attributes a hook may read: ``cfg``, ``dcfg``, ``info`` (rank, world size, ``device``),
    ``model`` (the raw module), ``net`` (what to call: DDP / compiled), ``ema``, ``diffusion``,
    ``gens`` (the seeded generators), ``source`` (the data), ``model_config`` (its dict), ``step``.
    A subclass that accumulates something for its log lines across steps extends
    :meth:`loop_state` and :meth:`load_loop_state`, so that a resumed run logs what an
    uninterrupted one does.
    """

    shown: tuple[str, ...] = ("loss",)  # log entries shown beside the progress bar

    def __init__(self, model_config, diffusion_config, train_config, data, *, out_dir, resume: bool = True,
                 progress: bool = True):
        self.dcfg = config_from_dict(DiffusionConfig, diffusion_config)
        self.cfg = config_from_dict(TrainConfig, train_config)
        self.model_config, self.data, self.out_dir = model_config, data, Path(out_dir)
        self.resume, self.progress, self.step, self.source = resume, progress, 0, None

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Set up, resume, train to ``cfg.steps``; the result. Raises :class:`TrainingDivergedError`."""
        self.info = distributed.setup(self.cfg.device)
        self.device, self.cuda = self.info.device, self.info.device.type == "cuda"
        try:
            with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
                self.setup()
                if self.resume and (found := latest_checkpoint(self.out_dir)) is not None:
                    self.step = self.restore(found)
                self.start()
                while self.step < self.cfg.steps:
                    self.run_step()
                    self.after_step()
                self.bar.close()
            return TrainResult(model=self.model, ema=self.ema, diffusion=self.diffusion, step=self.step,
                               out_dir=self.out_dir)
        finally:
            if self.source is not None:
                self.source.close()
            distributed.teardown(self.info)

    def setup(self) -> None:
        """The model (the same initialisation on every rank, from ``cfg.seed``), its EMA, AdamW, the
        generators, the data and its index stream, and the chain on the device."""
        cfg, device = self.cfg, self.device
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {self.info.world_size} ranks")
        _seed_global_rng(cfg.seed, device)
        model = build_model(_config_dict(self.model_config)).to(device)
        self.model_config = _config_dict(self.model_config, model)
        if self.cuda and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.ema = model, make_ema(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gens = _generators(cfg.seed, device)
        self.source = TrainingData(self.data, device, num_classes=self.model_config.get("num_classes"),
                                   workers=cfg.data_workers)
        self.stream = BatchStream(len(self.source), self.gens["data"])
        self.diffusion = self.dcfg.build().to(device)
        # checked, rank-averaged losses since the last log line (CPU), and the loss of step 1
        # that scales the explosion limit: both in the checkpoint (loop_state)
        self.window, self.loss_reference = torch.zeros(0), None

    def restore(self, path: Path) -> int:
        """Load a checkpoint into the run's objects (after checking it belongs to this run: the
        same configs but for :data:`RESUMABLE_FIELDS`, and a step within ``cfg.steps``); its step."""
        ck = load_checkpoint(path)
        afresh = "resume=False (or a new out_dir) starts afresh"
        for what, mine, theirs, free in (
                ("model", self.model_config, ck.model_config, ()),
                ("diffusion", self.dcfg.to_dict(), ck.diffusion_config.to_dict(), ()),
                ("train", self.cfg.to_dict(), ck.train_config.to_dict(), RESUMABLE_FIELDS)):
            keys = sorted((set(mine) | set(theirs)) - set(free))
            diff = {k: (theirs.get(k), mine.get(k)) for k in keys if mine.get(k) != theirs.get(k)}
            if diff:
                may = f" (a resumed run may change only {', '.join(free)})" if free else ""
                raise CheckpointError(f"{ck.path / 'config.json'}: the checkpoint's {what} config differs from this "
                                      f"run's, {{key: (checkpoint, run)}} = {diff}{may}; {afresh}")
        if ck.step > self.cfg.steps:
            raise CheckpointError(f"{ck.path / 'config.json'}: the checkpoint is at step {ck.step}, past this run's "
                                  f"steps={self.cfg.steps}; raise steps to train on, or {afresh}")
        load_state_dict(self.model, ck.model, ck.path / "model.safetensors")
        load_state_dict(self.ema, ck.ema, ck.path / "ema.safetensors")
        try:
            self.load_loop_state(ck.state)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ck.path / 'state.json'}: the loop state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        try:
            self.optimizer.load_state_dict(ck.optimizer)
            for name, g in self.gens.items():
                if name != "data":
                    g.set_state(ck.rng[name])
            self.stream.load_state(ck.rng["data"], ck.state["data_pos"])
            torch.set_rng_state(ck.rng["torch"])  # the forked global RNG of dropout (see run)
            if "cuda" in ck.rng and self.cuda:
                torch.cuda.set_rng_state(ck.rng["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{ck.path / 'state.safetensors'}: optimizer or RNG state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        return ck.step

    def loop_state(self) -> dict[str, Any]:
        """The loop's own JSON state in a checkpoint (``state.json``'s ``"loop"``), written after
        :meth:`check_divergence` (nothing is pending): the data stream's position in its pass,
        the checked losses since the last log line (float32 values, exact as JSON doubles) and
        the loss of step 1. A subclass adds its log accumulators (calling super)."""
        return {"data_pos": self.stream.pos, "loss_window": self.window.tolist(),
                "loss_reference": self.loss_reference}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        """Validate and take back :meth:`loop_state` (the data position is applied with the data
        generator's state by :meth:`restore`); ValueError/TypeError/KeyError on a malformed one."""
        pos, window, reference = state["data_pos"], state["loss_window"], state["loss_reference"]
        if type(pos) is not int or not 0 <= pos <= len(self.source):
            raise ValueError(f"data_pos {pos!r} is not an int in [0, {len(self.source)}] (the examples per pass)")
        real = (int, float)
        if not (isinstance(window, list) and all(isinstance(v, real) and not isinstance(v, bool) for v in window)):
            raise TypeError(f"loss_window must be a list of numbers, got {window!r}")
        if not (isinstance(reference, real) and not isinstance(reference, bool) and math.isfinite(reference)):
            raise TypeError(f"loss_reference must be a finite number, got {reference!r}")
        self.window, self.loss_reference = torch.tensor(window, dtype=torch.float32), float(reference)

    def start(self) -> None:
        """Before the first step: the log trimmed to the resumed step, DDP and the CUDA-only
        speed-ups (``model`` stays the raw module: clean state-dict keys), the progress bar."""
        cfg, info = self.cfg, self.info
        self.log_path = self.out_dir / "log.jsonl"
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _trim_log(self.log_path, self.step)
        self.net = self.model
        if info.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if self.cuda else None)
        if cfg.compile and self.cuda:
            self.net = torch.compile(self.net)
        elif cfg.compile and info.is_main:
            warnings.warn(f"compile=True is ignored on {self.device.type}: ddpm_lib uses torch.compile on CUDA only",
                          stacklevel=4)
        self.use_bf16 = self.cuda and cfg.bf16 and torch.cuda.is_bf16_supported()
        if self.cuda and cfg.bf16 and not self.use_bf16 and info.is_main:
            warnings.warn(f"bf16=True is ignored: {torch.cuda.get_device_name(self.device)} does not support "
                          "bfloat16; training runs in float32", stacklevel=4)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not (self.progress and info.is_main))
        # per-step losses and gradient norms not yet checked (checking syncs the device)
        self.pending: list[Tensor] = []
        self.pending_norms: list[Tensor] = []
        # steps_per_sec counts the steps timed by this process (not those before a resume)
        self.tick, self.timed_steps, self.grad_norm = time.perf_counter(), 0, None
        self.model.train()

    # --- one step ----------------------------------------------------------------------------

    def run_step(self) -> None:
        """One update: this rank's slice of the global batch, :meth:`compute_loss` (bf16 autocast
        where enabled), then :func:`optimizer_step` (gradients averaged over ranks by DDP)."""
        x0, y = self.next_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16):
            loss = self.compute_loss(x0, y)
        self.grad_norm = optimizer_step(self.model, self.ema, self.optimizer, loss, step=self.step, cfg=self.cfg)
        self.step += 1
        self.timed_steps += 1
        self.pending.append(loss.detach().float())
        if self.grad_norm is not None:
            self.pending_norms.append(self.grad_norm.detach().float())
        self.bar.update(1)

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """(x0, labels or None) of this rank's slice of the next global batch, on the device."""
        x0, y = self.source.get(distributed.shard(self.stream.take(self.cfg.batch_size), self.info))
        return self._memory_format(x0), y

    def timesteps_and_noise(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Uniform t in [0, T) and eps ~ N(0, I) for this rank's slice ``x0``, drawn for the whole
        GLOBAL batch from their generators (Algorithm 1, line 3-4), so W ranks draw what one does."""
        n, device = self.cfg.batch_size, self.device
        t = torch.randint(self.diffusion.T, (n,), generator=self.gens["timestep"], device=device)
        noise = torch.randn((n, *x0.shape[1:]), generator=self.gens["noise"], device=device)
        return distributed.shard(t, self.info), self._memory_format(distributed.shard(noise, self.info))

    def _memory_format(self, x: Tensor) -> Tensor:
        if self.cuda and self.cfg.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def compute_loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        """The scalar loss of the batch (x0, labels or None), computed with ``self.net``: the hook."""
        raise NotImplementedError

    # --- the periodic work -------------------------------------------------------------------

    def after_step(self) -> None:
        """Every ``log_every`` steps a log line, when :meth:`evaluation_due` an evaluation, every
        ``checkpoint_every`` steps a checkpoint (all three at the last step); divergence
        (:meth:`check_divergence`) stops the run before anything is written."""
        cfg, step = self.cfg, self.step
        last = step == cfg.steps
        do_log = step % cfg.log_every == 0 or last
        do_eval = self.evaluation_due(last)
        do_ckpt = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
        if not (do_log or do_eval or do_ckpt):
            return
        window = self.check_divergence()
        record: dict[str, Any] = {"step": step}
        if do_log:
            record.update(self.log_entries(window))
            self.bar.set_postfix({k: f"{record[k]:.4g}" for k in self.shown if k in record}, refresh=False)
        if do_eval and self.info.is_main:
            started = time.perf_counter()
            record.update(self.evaluate())
            self.tick += time.perf_counter() - started  # steps_per_sec counts training time only
        if len(record) > 1:
            self.log(record)
        if do_ckpt and self.info.is_main:
            self.save()

    def check_divergence(self) -> Tensor:
        """The checked losses since the last log line (rank-averaged, on the CPU), after checking
        in ONE device sync the steps since the last check: each loss finite and at most
        :data:`EXPLOSION_FACTOR` x max(1, the loss of step 1), each gradient norm (with
        ``grad_clip``) finite, and the model and EMA weights finite now. Raises
        :class:`TrainingDivergedError` on the first failure, naming its step."""
        n, m = len(self.pending), len(self.pending_norms)
        parts = [distributed.mean_across_ranks(torch.stack(self.pending), self.info)]
        if m:
            parts.append(torch.stack(self.pending_norms))
        parts.append(torch.stack([_all_finite(self.model, self.device), _all_finite(self.ema, self.device)]).float())
        host = torch.cat(parts).cpu()  # the one sync
        losses, norms, (model_ok, ema_ok) = host[:n], host[n:n + m], host[n + m:].tolist()
        self.pending, self.pending_norms = [], []
        first = self.step - n + 1  # the step of losses[0] (and of norms[0]: m is 0 or n)
        if self.loss_reference is None and math.isfinite(losses[0].item()):
            self.loss_reference = losses[0].item()
        limit = EXPLOSION_FACTOR * max(1.0, self.loss_reference or 0.0)
        bad_loss = (~torch.isfinite(losses) | (losses > limit)).nonzero().flatten().tolist()
        bad_norm = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad_loss and (not bad_norm or bad_loss[0] <= bad_norm[0]):  # a step's loss comes before its gradient
            i = bad_loss[0]
            value = losses[i].item()
            if not math.isfinite(value):
                raise _diverged(f"the loss at step {first + i} is {value}")
            raise _diverged(f"the loss at step {first + i} is {value:.4g}, over loop.EXPLOSION_FACTOR = "
                            f"{EXPLOSION_FACTOR:.0e} x max(1, the loss of step 1 = {self.loss_reference:.4g})")
        if bad_norm:
            raise _diverged(f"the gradient norm at step {first + bad_norm[0]} is {norms[bad_norm[0]].item()}")
        if not (model_ok and ema_ok):
            raise _diverged(f"the {'model' if not model_ok else 'EMA'} weights after step {self.step} are not finite "
                            f"(a non-finite gradient since step {first})")
        self.window = torch.cat([self.window, losses])
        return self.window

    def log_entries(self, window: Tensor) -> dict[str, Any]:
        """The log line's entries over the ``window`` of steps since the last line: mean ``loss``,
        the ``lr`` and ``ema_decay`` of the last update, ``steps_per_sec`` (over the steps this
        process ran: a timing entry, :data:`TIMING_KEYS`) and ``grad_norm`` (before clipping;
        with ``grad_clip`` only). Starts the next window."""
        cfg, now = self.cfg, time.perf_counter()
        entries = {"loss": window.mean().item(), "lr": lr_at(self.step - 1, cfg),
                   "steps_per_sec": self.timed_steps / (now - self.tick),
                   "ema_decay": ema_decay(cfg.ema_decay, self.step, cfg.ema_warmup)}
        if self.grad_norm is not None:
            entries["grad_norm"] = self.grad_norm.item()
        self.window, self.tick, self.timed_steps = torch.zeros(0), now, 0
        return entries

    def evaluation_due(self, last: bool) -> bool:
        """Whether :meth:`evaluate` runs after this step (the same answer on every rank)."""
        return False

    def evaluate(self) -> dict[str, Any]:
        """Entries for the log line, computed on rank 0 from generators of their own (a denoiser's
        sample grid); they must change no training number."""
        return {}

    def log(self, record: dict[str, Any]) -> None:
        """Append one line of strict JSON to ``out_dir/log.jsonl`` (rank 0); a non-finite value
        (e.g. a metric of a collapsed sample grid) is written as null."""
        if self.info.is_main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")

    def rng_states(self) -> dict[str, Tensor]:
        """Every RNG state of the run, by name: the generators, the data pass, the (forked) global RNG."""
        rng = {name: g.get_state() for name, g in self.gens.items() if name != "data"}
        rng.update(data=self.stream.pass_state, torch=torch.get_rng_state())
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> Path:
        """Write the atomic checkpoint of the state after ``step`` updates (``ddpm_lib.checkpoint``),
        after flushing the log to disk: a checkpoint that survives a power cut finds every log
        line up to its step beside it."""
        if self.log_path.exists():
            with self.log_path.open("a") as f:
                os.fsync(f.fileno())
        return save_checkpoint(self.out_dir, step=self.step, model_config=self.model_config,
                               diffusion_config=self.dcfg, train_config=self.cfg, model=self.model.state_dict(),
                               ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                               rng=self.rng_states(), state=self.loop_state())
