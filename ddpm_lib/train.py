r"""The training loop: DDPM's Algorithm 1 at scale (chapter 4; improved DDPM; ADM).

One function, :func:`train`, reads top to bottom: set-up, resume, the loop (draw a batch,
uniform t, the loss, AdamW step, EMA), and the periodic log, sample grid and atomic
checkpoint. For example, on the swiss roll::

    from ddpm_lib.train import DiffusionConfig, TrainConfig, train
    result = train({"kind": "mlp"}, DiffusionConfig(T=100), TrainConfig(steps=3000, batch_size=256),
                   x, out_dir="runs/swiss")          # x: [N, 2] in [-1, 1]
    model, diffusion = ddpm_lib.checkpoint.load_model("runs/swiss")   # the EMA, for sampling

On several GPUs, put the call in a script and launch ``torchrun --standalone
--nproc_per_node 4 script.py``: DDP switches on from torchrun's environment
(``ddpm_lib.distributed``); ``batch_size`` stays the global batch.

Guarantees (each tested in ``tests/test_train.py`` or ``tests/test_distributed.py``):

* **Exact resume.** Every source of randomness is a ``torch.Generator`` whose state is in the
  checkpoint (batches, timesteps, noise, label dropout; torch's global RNG for dropout
  layers), and the data order is a checkpointed stream. On the CPU, N steps in one go and
  k steps + (crash or stop) + resume to N give bit-identical weights, EMA and optimiser.
  Sample grids and their metrics use generators of their own: they change no number.
* **The data order replaces DataLoader + DistributedSampler.** Batches are index lists from
  :class:`BatchStream` (seeded ``randperm`` passes over the N examples, drawn on the CPU), and
  every rank draws the same GLOBAL batch of indices and reads only its slice
  (``distributed.shard``). A ``DistributedSampler`` pads the data to a multiple of the number
  of ranks and cuts batches at epoch ends (so the batches depend on it), and its position
  inside an epoch is in no checkpoint (a resumed run restarts the epoch). The stream's state
  is a generator state and a position, so resume is exact and W ranks equal one process. Tensors
  are indexed on the device; a map-style ``Dataset`` (image files, torchvision sets) is read
  item by item, by ``data_workers`` threads if asked.
* **Divergence stops the run.** A NaN/inf loss raises :class:`TrainingDivergedError` naming
  the step, before any later checkpoint is written: the one on disk is the last good one.
  Losses are checked (one device sync) only when logging, sampling or checkpointing. The
  loop adds no other wait for the GPU: batch indices and Dataset items are copied from pinned
  memory without blocking, labels are checked on the CPU, and the gradient norm stays a device
  tensor until it is logged (the loss's own input checks live in ``ddpm_lib.losses``).
* **Rank 0 writes.** Under DDP only rank 0 writes the log, the sample grids and checkpoints,
  and shows the progress bar.
* **CUDA only**: ``bf16`` autocast (where the GPU supports bf16), ``channels_last`` and
  ``torch.compile``. On the CPU bf16 and channels_last do nothing, by design; ``compile``
  warns that it is ignored.

The log ``out_dir/log.jsonl`` has one JSON object per line: every ``log_every`` steps
``step, loss, lr, steps_per_sec, ema_decay`` (and ``grad_norm``, before clipping); at each
sample grid ``samples`` (its path) and the metrics of ``sample_metrics``: by default, for 2-D
data, the sliced Wasserstein distance of the samples to the training data and its
real-vs-real floor at the same n (``sliced_wasserstein``, ``sliced_wasserstein_floor``).

Step numbers count optimiser steps taken: "step 5" is the fifth update; a checkpoint at
step k holds the state after k updates; the learning rate of the update k + 1 is ``lr_at(k)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ddpm_lib import checkpoint, distributed
from ddpm_lib.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_state_dict, save_checkpoint
from ddpm_lib.configs import LR_SCHEDULES, DiffusionConfig, TrainConfig, config_from_dict
from ddpm_lib.data import check_range
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.ema import ema_decay, ema_update, make_ema

__all__ = ["train", "TrainResult", "TrainingDivergedError", "DiffusionConfig", "TrainConfig", "lr_at", "optimizer_step", "BatchStream",
           "draw_samples", "points_metrics"]

GENERATORS = ("data", "timestep", "noise", "label_dropout")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the value."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw model, its EMA (sample from this), the chain, the step."""

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
    ``cfg.grad_clip`` is None. Shared by :func:`train` and the chapters' explicit loops.
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


class _Data:
    """Training data as ``get(indices) -> (x0, y or None)`` on the device. Accepts a tensor
    [N, ...], a pair (x [N, ...], labels [N]), a TensorDataset of those (both kept on the
    device), or any map-style Dataset whose items are x or (x, label), read item by item on
    the CPU (by ``workers`` threads if > 0) and copied over. Labels of a class-conditional
    model must lie in [0, num_classes): label num_classes is the null label of CFG."""

    def __init__(self, data: Any, device: torch.device, *, num_classes: int | None = None, workers: int = 0):
        self.device, self.dataset, self.y, self.num_classes = device, None, None, num_classes
        self.pool = None
        if isinstance(data, TensorDataset):
            data = tuple(data.tensors)
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and len(data) in (1, 2) and all(isinstance(d, Tensor) for d in data):
            self.x = check_range(data[0].float(), name="training data").to(device)
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
                             f"{self.num_classes} (label {self.num_classes} is the null label), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
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


def _normalize(model_config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The model config as the JSON dict stored in checkpoints (all defaults filled in when known)."""
    if model is not None and hasattr(getattr(model, "config", None), "to_dict"):
        model_config = model.config
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return json.loads(json.dumps(d))


def _rng_states(gens: dict[str, torch.Generator], stream: BatchStream, device: torch.device) -> dict[str, Tensor]:
    rng = {name: g.get_state() for name, g in gens.items() if name != "data"}
    rng.update(data=stream.pass_state, torch=torch.get_rng_state())
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore(path: Path, model, ema, optimizer, gens, stream, model_config, diffusion_config, cfg, device) -> int:
    """Load a checkpoint into the run's objects (after checking it belongs to this run); its step."""
    ck = load_checkpoint(path)
    for what, mine, theirs in (("model", model_config, ck.model_config),
                               ("diffusion", diffusion_config.to_dict(), ck.diffusion_config.to_dict())):
        keys = sorted(set(mine) | set(theirs))
        diff = {k: (theirs.get(k), mine.get(k)) for k in keys if mine.get(k) != theirs.get(k)}
        if diff:
            raise CheckpointError(f"{ck.path / 'config.json'}: the checkpoint's {what} config differs from this "
                                  f"run's, {{key: (checkpoint, run)}} = {diff}; resume=False starts afresh")
    load_state_dict(model, ck.model, ck.path / "model.safetensors")
    load_state_dict(ema, ck.ema, ck.path / "ema.safetensors")
    try:
        optimizer.load_state_dict(ck.optimizer)
        for name, g in gens.items():
            if name != "data":
                g.set_state(ck.rng[name])
        stream.load_state(ck.rng["data"], int(ck.state["data_pos"]))
        torch.set_rng_state(ck.rng["torch"])
        if "cuda" in ck.rng and device.type == "cuda":
            torch.cuda.set_rng_state(ck.rng["cuda"], device)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{ck.path / 'state.safetensors'}: optimizer or RNG state does not fit this run "
                              f"({type(e).__name__}: {e})") from None
    for group in optimizer.param_groups:  # this run's config wins over the checkpoint's
        group["weight_decay"] = cfg.weight_decay
    return ck.step


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (written by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    path.write_text("".join(kept))


def _checked_losses(pending: list[Tensor], step: int, info) -> Tensor:
    """The rank-averaged losses of the last len(pending) steps; raises on the first non-finite one."""
    losses = distributed.mean_across_ranks(torch.stack(pending), info).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise TrainingDivergedError(f"training diverged: the loss at step {step - len(pending) + i + 1} is "
                                    f"{losses[i].item()} (no checkpoint was written after it); lower lr, "
                                    f"set grad_clip or check the data")
    return losses


SampleMetrics = Callable[[Tensor, "Tensor | None"], dict[str, float]]


@torch.no_grad()
def draw_samples(ema: nn.Module, diffusion, dcfg: DiffusionConfig, cfg: TrainConfig, shape, null_label):
    """The sample grid's samples (CPU) and labels: ``cfg.num_samples`` from ONE fixed x_T.

    Deterministic DDIM (eta = 0, ``cfg.sample_steps`` steps; Song et al. 2021, eq. 12) maps the
    same x_T (drawn from a generator seeded by ``cfg.seed``) to the samples, so the grids of
    successive steps differ only through training. DDIM here needs eps; x0- and v-predicting
    models use ancestral DDPM from the same generator. A class-conditional model gets the
    labels 0, 1, 2, ... cycled. Only these generators are used: no training RNG is touched.
    """
    from ddpm_lib.samplers import ddim_sample, ddpm_sample

    device = next(ema.parameters()).device
    n, steps = cfg.num_samples, min(cfg.sample_steps, diffusion.T)
    y = None if null_label is None else torch.arange(n, device=device) % null_label
    kw = dict(generator=torch.Generator(device).manual_seed(cfg.seed), y=y)
    if dcfg.prediction == "eps":
        x = ddim_sample(ema, diffusion, (n, *shape), steps=steps, eta=0.0, **kw)
    else:
        x = ddpm_sample(ema, diffusion, (n, *shape), steps=steps, variance=dcfg.variance, prediction=dcfg.prediction,
                        **kw)
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


def _sample_record(ema, diffusion, dcfg, cfg, shape, null_label, path: Path, sample_metrics) -> dict[str, Any]:
    """Draw the grid, write its picture, and return its log entries (path and metrics)."""
    from ddpm_lib.viz import save_figure

    x, y = draw_samples(ema, diffusion, dcfg, cfg, shape, null_label)
    save_figure(x, path)
    record: dict[str, Any] = {"samples": f"{path.parent.name}/{path.name}"}
    for name, value in (sample_metrics(x, y) if sample_metrics is not None else {}).items():
        # JSON has no inf or NaN: a non-finite metric is logged as null
        record[name] = float(value) if value is not None and math.isfinite(value) else None
    return record


def _drawable(shape) -> bool:
    """Whether a sample of this shape can be pictured: a 2-D point or a 1- or 3-channel image."""
    return tuple(shape) == (2,) or (len(shape) == 3 and shape[0] in (1, 3))


def train(model_config, diffusion_config, train_config, data, *, out_dir, resume: bool = True,
          progress: bool = True, sample_metrics: SampleMetrics | None = None) -> TrainResult:
    """Train a diffusion model; checkpoint to ``out_dir/checkpoint``, log to ``out_dir/log.jsonl``.

    Args:
        model_config: dict with a ``"kind"`` (or a models config object), built by ``ddpm_lib.models``.
        diffusion_config, train_config: ``DiffusionConfig`` / ``TrainConfig`` or their dicts.
        data: tensor [N, ...] in [-1, 1], a pair (x, labels [N]) or a Dataset of x or (x, label).
        resume: continue from ``out_dir``'s checkpoint if there is one (it must match the
            model and diffusion configs; ``train_config.steps`` may grow).
        sample_metrics: ``f(samples, labels or None) -> {name: float}``, called on each sample
            grid (every ``sample_every`` steps) and logged with it; default :func:`points_metrics`
            for 2-D tensor data, none otherwise (the CLI passes feature-space metrics for images).
    Returns a :class:`TrainResult`. Raises :class:`TrainingDivergedError` on a NaN/inf loss.
    """
    dcfg = config_from_dict(DiffusionConfig, diffusion_config)
    cfg = config_from_dict(TrainConfig, train_config)
    out_dir = Path(out_dir)
    info = distributed.setup(cfg.device)
    device, cuda = info.device, info.device.type == "cuda"
    source = None
    try:
        # 1. set-up: the model (same initialisation on every rank), EMA, optimiser, generators, data
        if cfg.batch_size % info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {info.world_size} ranks")
        torch.manual_seed(cfg.seed)
        model = checkpoint.build_model(_normalize(model_config)).to(device)
        model_config = _normalize(model_config, model)
        if cuda and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = make_ema(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gens = _generators(cfg.seed, device)
        null_label = model_config.get("num_classes")  # the null label of CFG is num_classes
        source = _Data(data, device, num_classes=null_label, workers=cfg.data_workers)
        stream = BatchStream(len(source), gens["data"])
        diffusion = dcfg.build().to(device)
        if null_label is not None and not source.has_labels:
            raise ValueError("the model is class-conditional (num_classes is set) but the data has no labels")
        if cfg.label_dropout and null_label is None:
            raise ValueError("label_dropout needs a class-conditional model (num_classes set in its config)")
        if sample_metrics is None and (points := source.points()) is not None:
            sample_metrics = points_metrics(points)

        # 2. resume from the last good checkpoint
        step = 0
        if resume and (found := latest_checkpoint(out_dir)) is not None:
            step = _restore(found, model, ema, optimizer, gens, stream, model_config, dcfg, cfg, device)
        log_path = out_dir / "log.jsonl"
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _trim_log(log_path, step)

        # 3. DDP and the CUDA-only speed-ups (`model` stays the raw module: clean state-dict keys)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) \
            if info.world_size > 1 else model
        if cfg.compile and cuda:
            net = torch.compile(net)
        elif cfg.compile and info.is_main:
            warnings.warn(f"compile=True is ignored on {device.type}: ddpm_lib uses torch.compile on CUDA only",
                          stacklevel=2)
        use_bf16 = cuda and cfg.bf16 and torch.cuda.is_bf16_supported()
        if cuda and cfg.bf16 and not use_bf16 and info.is_main:
            warnings.warn(f"bf16=True is ignored: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          "training runs in float32", stacklevel=2)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not (progress and info.is_main))
        pending: list[Tensor] = []  # per-step losses not yet checked (checking syncs the device)
        tick, grad_norm, warned_shape = time.perf_counter(), None, False

        # 4. the loop: DDPM Algorithm 1 on each rank's slice of one global batch
        model.train()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            # 4a. the global batch's indices, t, noise and label-dropout mask, same on every rank; our slice
            x0, y = source.get(distributed.shard(stream.take(cfg.batch_size), info))
            t = torch.randint(diffusion.T, (cfg.batch_size,), generator=gens["timestep"], device=device)
            noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=gens["noise"], device=device)
            t, noise = distributed.shard(t, info), distributed.shard(noise, info)
            kwargs = {}
            if null_label is not None:
                if cfg.label_dropout:
                    u = torch.rand(cfg.batch_size, generator=gens["label_dropout"], device=device)
                    y = torch.where(distributed.shard(u < cfg.label_dropout, info), null_label, y)
                kwargs["y"] = y
            if cuda and cfg.channels_last and x0.ndim == 4:
                x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
            # 4b. the loss at uniform t, one AdamW step (gradients averaged over ranks), clipping, EMA
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                losses = diffusion.training_losses(net, x0, t, noise, model_kwargs=kwargs, **dcfg.loss_kwargs())
            loss = losses["loss"].mean()
            grad_norm = optimizer_step(model, ema, optimizer, loss, step=step, cfg=cfg)
            step += 1
            decay = ema_decay(cfg.ema_decay, step, cfg.ema_warmup)
            pending.append(loss.detach().float())
            bar.update(1)

            # 5. periodic work; a non-finite loss stops the run before anything is written
            last = step == cfg.steps
            do_log = step % cfg.log_every == 0 or last
            do_sample = bool(cfg.sample_every) and (step % cfg.sample_every == 0 or last)
            do_ckpt = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
            if do_log or do_sample or do_ckpt:
                window = _checked_losses(pending, step, info)
            record: dict[str, Any] = {"step": step}
            if do_log:
                now = time.perf_counter()
                record.update(loss=window.mean().item(), lr=lr, steps_per_sec=len(pending) / (now - tick),
                              ema_decay=decay)
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                pending, tick = [], now
                bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            if do_sample and info.is_main:
                if _drawable(x0.shape[1:]):
                    started = time.perf_counter()
                    path = out_dir / "samples" / f"step_{step:07d}.png"
                    record.update(_sample_record(ema, diffusion, dcfg, cfg, x0.shape[1:], null_label, path,
                                                 sample_metrics))
                    tick += time.perf_counter() - started  # steps_per_sec counts training time only
                elif not warned_shape:
                    warned_shape = True
                    warnings.warn(f"sample_every is ignored: samples of shape {list(x0.shape[1:])} cannot be "
                                  f"drawn (2-D points or 1/3-channel images)", stacklevel=2)
            if len(record) > 1 and info.is_main:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if do_ckpt and info.is_main:
                save_checkpoint(out_dir, step=step, model_config=model_config, diffusion_config=dcfg, train_config=cfg,
                                model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                                rng=_rng_states(gens, stream, device), state={"data_pos": stream.pos})
        bar.close()
        return TrainResult(model=model, ema=ema, diffusion=diffusion, step=step, out_dir=out_dir)
    finally:
        if source is not None:
            source.close()
        distributed.teardown(info)
