"""Benchmark the training loop on the DDPM CIFAR-10 U-Net (35.7M parameters), synthetic data.

Runs the real loop, :func:`ddpm_lib.train.train` (the loss, AdamW, gradient clipping, EMA,
the log's device syncs), on random 32x32 RGB images in [-1, 1], and prints the training
throughput in images/s after the warm-up steps, the peak memory and the settings::

    python -m ddpm_lib.bench                             # CUDA: batch 128, bf16, channels_last
    python -m ddpm_lib.bench --compile                   # + torch.compile (its warm-up is slow)
    python -m ddpm_lib.bench --device cpu --batch 4 --steps 3
    python -m ddpm_lib.bench --compare diffusers         # against diffusers, and the overheads

Timing: ``train`` logs ``steps_per_sec`` every ``log_every`` steps and each log reads the loss
back, so every window ends with the GPU's queue drained. With ``log_every = warmup`` the first
window holds the warm-up (CUDA kernels, cuDNN autotuning, compilation) and the later windows
are timed. The final checkpoint (~0.6 GB for this network) is written to a temporary folder
after the last timed window. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the
process's peak resident set size (all of it: Python, torch, data) on the CPU.

``--compare diffusers`` (needs ``pip install ddpm_lib[interop]``) times, instead, three pairs of
the same work, each pair INTERLEAVED (A, B, B, A, A, B, ...: slow drifts of a shared machine hit
both alike): times are medians over ``--repeats`` timed blocks of ``--steps`` steps, and ratios
the median of the per-repetition ratios of back-to-back blocks (:func:`paired_ratio`). With two
threads on two shared cores, another busy process stalls every parallel region (OpenMP waits for
its slowest thread) and can slow a block 10-20x: run it on a quiet machine (the load average is
printed before and after).

1. one training step (forward, eps-MSE backward, AdamW step; Ho et al. 2020, Algorithm 1) of the
   ``digits`` U-Net (``ddpm_lib/presets/digits.json``, 1x8x8) and of a diffusers ``UNet2DModel``
   of equal parameter count (:func:`matching_diffusers_unet`), same batch, float32: images/s of
   both and their ratio. Target: ddpm_lib >= 1.0x diffusers.
2. ``GaussianDiffusion.training_losses`` (loss "simple") against a bare eps-MSE step on the same
   model (both forward, backward and AdamW): the loss function's overhead. Target: <= 5%.
3. each sampler (``ddpm_sample``, ``ddim_sample``, ``dpm_solver_pp_sample``; ``--sample-steps``
   steps) against a bare loop of the same network calls (counted, same batch, same timesteps): the
   sampler's own overhead. Target: <= 3%. As that difference of two noisy times resolves a few
   percent at best, each sampler is also run with a network that costs nothing (x / 2): its own
   time per step, and that as a share of one network call.

The targets are printed beside the measurements, never asserted (timing is noisy); the functions
:func:`compare_training`, :func:`training_losses_overhead` and :func:`sampler_overhead` return the
figures as dicts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.models import PRESETS, UNet, count_parameters, model_from_config
from ddpm_lib.train import train

# The targets of --compare diffusers (printed, never asserted: timing is noisy).
TARGET_TRAIN_RATIO = 1.0       # ddpm_lib images/s over diffusers' at equal size: at least this
TARGET_LOSS_OVERHEAD = 0.05    # training_losses over a bare eps-MSE step: at most this
TARGET_SAMPLER_OVERHEAD = 0.03  # a sampler over its bare network calls: at most this
DIGITS_PRESET = Path(__file__).resolve().parent / "presets" / "digits.json"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    p.add_argument("--model", choices=sorted(PRESETS), default="ddpm_cifar10", help="a U-Net preset of ddpm_lib.models")
    p.add_argument("--batch", type=int, help="global batch (default: 128 on CUDA, 4 on the CPU)")
    p.add_argument("--steps", type=int, help="optimiser steps in all, warm-up included (default: 60 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default: 10 CUDA, 1 CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", choices=["diffusers"],
                   help="time the digits U-Net against an equal-size diffusers UNet2DModel, and the overheads of "
                        "training_losses and the samplers (see above); --steps is then per timed block")
    p.add_argument("--repeats", type=int, default=11, help="--compare: timed blocks of each kind (median)")
    p.add_argument("--sample-steps", type=int, default=50, help="--compare: steps of each sampler")
    args = p.parse_args(argv)
    on_cuda = args.device == "cuda"
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available")
    if args.compare:
        args.batch = args.batch or 64
        args.steps = args.steps or 5
        args.warmup = args.warmup if args.warmup is not None else 1
        if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.sample_steps < 1:
            p.error("--compare needs --repeats >= 1, --steps >= 1, --warmup >= 0 and --sample-steps >= 1")
        return args
    args.batch = args.batch or (128 if on_cuda else 4)
    args.steps = args.steps or (60 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    if not 1 <= args.warmup < args.steps:
        p.error(f"need 1 <= --warmup < --steps, got warm-up {args.warmup}, steps {args.steps}")
    return args


def timed_throughput(log_path: Path, warmup: int, batch: int) -> tuple[float, int, float]:
    """(images/s, timed steps, timed seconds) from the log windows after the first (warm-up) one."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    records = [r for r in records if "steps_per_sec" in r]
    steps = seconds = 0.0
    previous = records[0]["step"]
    assert previous == warmup, f"the first log window should end at the warm-up, step {warmup}"
    for r in records[1:]:
        n = r["step"] - previous
        steps, seconds, previous = steps + n, seconds + n / r["steps_per_sec"], r["step"]
    return steps * batch / seconds, int(steps), seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        return compare_main(args)
    cuda = args.device == "cuda"
    model = PRESETS[args.model]()
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(args.seed)
    n_data = max(4 * args.batch, 256)
    shape = (n_data, model.in_channels, model.image_size, model.image_size)
    data = torch.rand(shape, generator=g) * 2 - 1  # the loop moves it to the device once
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=2e-4, grad_clip=1.0, ema_decay=0.9999,
                      log_every=args.warmup, checkpoint_every=0, seed=args.seed, device=args.device,
                      bf16=args.bf16, channels_last=args.channels_last, compile=args.compile)
    n_params = count_parameters(UNet(model))
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as out:
        start = time.perf_counter()
        train(model, DiffusionConfig(), cfg, data, out_dir=out, progress=False)
        wall = time.perf_counter() - start
        images_per_s, timed_steps, timed_s = timed_throughput(Path(out) / "log.jsonl", args.warmup, args.batch)
    if cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
        where = torch.cuda.get_device_name()
        on = {"bf16": args.bf16 and torch.cuda.is_bf16_supported(), "channels_last": args.channels_last,
              "compile": args.compile}
        switches = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in on.items())
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS of the process)"
        where = f"{torch.get_num_threads()} torch threads"
        switches = "bf16, channels_last and compile off (CUDA only)"
    print(f"ddpm_lib training benchmark: {args.model} U-Net, {n_params:,} parameters, synthetic "
          f"{model.image_size}x{model.image_size}x{model.in_channels} data in [-1, 1]")
    print(f"device {args.device} ({where}), torch {torch.__version__}")
    print(f"batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), {switches}; "
          f"loss simple, AdamW, grad clip 1, EMA")
    print(f"images/s: {images_per_s:.1f} ({timed_steps} timed steps in {timed_s:.2f} s; "
          f"{images_per_s / args.batch:.2f} steps/s)")
    print(f"peak memory: {peak}")
    print(f"wall time: {wall:.1f} s (warm-up and the final checkpoint included)")


# --- --compare diffusers ---------------------------------------------------------------------


def digits_unet() -> nn.Module:
    """The ``digits`` preset's U-Net (``ddpm_lib/presets/digits.json``: 1x8x8, 32 channels x (1, 2),
    two residual blocks per level, two-head attention at 4x4; 1,001,729 parameters)."""
    return model_from_config(json.loads(DIGITS_PRESET.read_text())["model"])


def _diffusers_unet_config(cfg, base: int, layers: int) -> dict:
    """A diffusers ``UNet2DModel`` config shaped like the ddpm_lib UNetConfig ``cfg`` (the same DDPM
    architecture, Ho et al. 2020, App. B) with base width ``base`` and ``layers`` blocks per level."""
    from ddpm_lib.models.blocks import group_count

    widths = tuple(base * m for m in cfg.channel_mult)
    res = [cfg.image_size // 2**i for i in range(len(widths))]
    attn = [r in cfg.attention_resolutions for r in res]
    first_attn = next((w for w, a in zip(widths, attn) if a), widths[-1])
    heads = first_attn // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.output_channels,
        "block_out_channels": widths, "layers_per_block": layers,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        # one group count for every layer: ddpm_lib's rule (<= 32 groups of >= 4 channels) on the
        # narrowest width, which then divides every wider one
        "norm_num_groups": group_count(math.gcd(*widths), cfg.norm_groups),
        "attention_head_dim": max(first_attn // max(heads, 1), 1),
        "dropout": cfg.dropout,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
    }


def matching_diffusers_unet(model: nn.Module, tolerance: float = 0.05) -> tuple[nn.Module, dict]:
    """(diffusers ``UNet2DModel``, its config) with a parameter count within ``tolerance`` of the
    ddpm_lib U-Net ``model``'s. The mirror image (same base width and blocks per level) is tried
    first; failing that, every blocks-per-level 1..3 and base width (multiples of 4) are searched
    and the closest count wins. ValueError if none is within ``tolerance``."""
    import diffusers

    cfg, target = model.config, count_parameters(model)

    def build(base, layers):
        conf = _diffusers_unet_config(cfg, base, layers)
        return diffusers.UNet2DModel(**conf), conf

    net, conf = build(cfg.model_channels, cfg.num_res_blocks)
    best = (abs(count_parameters(net) / target - 1), net, conf)
    if best[0] > tolerance:
        for layers in (1, 2, 3):
            for base in range(4, 8 * cfg.model_channels + 1, 4):
                net, conf = build(base, layers)
                n = count_parameters(net)
                if abs(n / target - 1) < best[0]:
                    best = (abs(n / target - 1), net, conf)
                if n > target:  # the count grows with the width: wider ones only get further away
                    break
    if best[0] > tolerance:
        raise ValueError(f"no diffusers UNet2DModel within {tolerance:.0%} of {target:,} parameters "
                         f"(closest {best[0]:+.1%})")
    return best[1], best[2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(blocks: dict[str, Callable[[], tuple[int, int]]], repeats: int, warmup: int,
                        device="cpu") -> dict[str, dict]:
    """Time each block ``repeats`` times, interleaved: A, B, then B, A, then A, B ... (alternating
    the order too, so neither always runs first after the other), after ``warmup`` untimed runs
    of each. A block returns (steps, images) it did; they are summed over the timed runs.
    Returns per block the median seconds, all the times, and the summed steps and images."""
    names = list(blocks)
    for _ in range(warmup):
        for name in names:
            blocks[name]()
    out = {name: {"times_s": [], "steps": 0, "images": 0} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            steps, images = blocks[name]()
            _sync(device)
            out[name]["times_s"].append(time.perf_counter() - start)
            out[name]["steps"] += steps
            out[name]["images"] += images
    for rec in out.values():
        rec["median_s"] = statistics.median(rec["times_s"])
    return out


def paired_ratio(timed: dict[str, dict], a: str, b: str) -> float:
    """The median over repetitions of time(a) / time(b), each ratio taken within ONE repetition,
    where the two blocks ran back to back: a load burst from another process that hits one
    repetition then moves that repetition's ratio little, where it would move a median of times
    taken minutes apart."""
    return statistics.median(_ratios(timed, a, b))


def _ratios(timed: dict[str, dict], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(timed[a]["times_s"], timed[b]["times_s"])]


def quartiles(values: list[float]) -> tuple[float, float]:
    """The 25% and 75% quantiles of ``values`` (both the value itself for one value): the spread of
    the per-repetition ratios, printed so a reader sees how far the median can be trusted."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _train_block(forward: Callable[[Tensor, Tensor], Tensor], opt: torch.optim.Optimizer, x0: Tensor, steps: int,
                 chain, generator: torch.Generator, use_training_losses: bool = False,
                 model=None) -> Callable[[], tuple[int, int]]:
    """``steps`` training steps (Ho et al. 2020, Algorithm 1: t ~ U, eps ~ N(0, I), gradient step on
    ||eps - eps_theta(x_t, t)||^2) with AdamW on the chain ``chain`` (a GaussianDiffusion). Bare:
    x_t by Eq. (4) from the chain's alpha_bar cast once to x0's dtype, and F.mse_loss on
    ``forward(x_t, t)``; with ``use_training_losses``, ``chain.training_losses(model, ...)`` (loss
    simple) with the same t and noise draws."""
    T = chain.T
    ab = chain.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    sqrt_ab, sqrt_1m_ab = ab.sqrt(), (1 - ab).sqrt()
    shape = (x0.shape[0],) + (1,) * (x0.ndim - 1)

    def block() -> tuple[int, int]:
        images = 0
        for _ in range(steps):
            t = torch.randint(0, T, (x0.shape[0],), generator=generator, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            if use_training_losses:
                loss = chain.training_losses(model, x0, t, noise, loss="simple")["loss"].mean()
            else:
                x_t = sqrt_ab[t].view(shape) * x0 + sqrt_1m_ab[t].view(shape) * noise
                loss = F.mse_loss(forward(x_t, t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += x0.shape[0]
        return steps, images

    return block


def _batch(model_cfg, batch: int, device, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    return (torch.rand(shape, generator=g) * 2 - 1).to(device)


def compare_training(*, batch: int = 64, steps: int = 5, repeats: int = 7, warmup: int = 1, device="cpu",
                     seed: int = 0, T: int = 1000) -> dict:
    """Training images/s of the digits U-Net against an equal-size diffusers ``UNet2DModel``: the
    same bare training step (eps-MSE, AdamW lr 1e-4, float32, same batch and draws), interleaved
    blocks of ``steps`` steps, medians over ``repeats``. Returns the parameter counts, the diffusers
    config, per model the images/s (from the median time), timed steps and images counted, and the
    ratio ddpm_lib / diffusers of images/s (:func:`paired_ratio`: per repetition, then the median)."""
    torch.manual_seed(seed)
    ours = digits_unet().to(device).train()
    torch.manual_seed(seed)
    theirs, conf = matching_diffusers_unet(ours)
    theirs = theirs.to(device).train()
    from ddpm_lib.diffusion import GaussianDiffusion

    chain = GaussianDiffusion.from_name("linear", T)
    x0 = _batch(ours.config, batch, device, seed)
    blocks = {}
    for name, net, forward in (("ddpm_lib", ours, ours),
                               ("diffusers", theirs, lambda x, t: theirs(x, t, return_dict=False)[0])):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        blocks[name] = _train_block(forward, opt, x0, steps, chain, torch.Generator(device=device).manual_seed(seed))
    timed = interleaved_medians(blocks, repeats, warmup, device)
    ips = {name: batch * steps / rec["median_s"] for name, rec in timed.items()}
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    return {
        "batch": batch, "steps": steps, "repeats": repeats,
        "params": {"ddpm_lib": n_ours, "diffusers": n_theirs}, "param_ratio": n_theirs / n_ours,
        "diffusers_config": conf,
        # images/s ratio = time ratio the other way round, per repetition
        "images_per_s": ips, "ratio": paired_ratio(timed, "diffusers", "ddpm_lib"),
        "ratio_iqr": quartiles(_ratios(timed, "diffusers", "ddpm_lib")),
        "timed_steps": {name: rec["steps"] for name, rec in timed.items()},
        "images": {name: rec["images"] for name, rec in timed.items()},
        "times_s": {name: rec["times_s"] for name, rec in timed.items()},
    }


def training_losses_overhead(model: nn.Module | None = None, diffusion=None, *, batch: int = 64, steps: int = 5,
                             repeats: int = 7, warmup: int = 1, device="cpu", seed: int = 0) -> dict:
    """Time of a training step through ``GaussianDiffusion.training_losses`` (loss "simple") over a
    bare eps-MSE step (x_t from float32 tables, F.mse_loss), same model, one AdamW, same batch and
    draws (Ho et al. 2020, Algorithm 1, both). Default: the digits U-Net on the linear T = 1000
    chain. Returns the median seconds per block of ``steps`` of each, the overhead (the
    :func:`paired_ratio` - 1), and the timed steps, images and times of each."""
    from ddpm_lib.diffusion import GaussianDiffusion

    model = (model if model is not None else digits_unet()).to(device).train()
    diffusion = (diffusion if diffusion is not None else GaussianDiffusion.from_name("linear", 1000)).to(device)
    x0 = _batch(model.config, batch, device, seed) if hasattr(model, "config") else None
    if x0 is None:
        raise ValueError("pass a ddpm_lib model (its config gives the image shape)")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    blocks = {
        "bare": _train_block(model, opt, x0, steps, diffusion, torch.Generator(device=device).manual_seed(seed)),
        "training_losses": _train_block(model, opt, x0, steps, diffusion,
                                        torch.Generator(device=device).manual_seed(seed), True, model),
    }
    timed = interleaved_medians(blocks, repeats, warmup, device)
    return {
        "batch": batch, "steps": steps, "repeats": repeats,
        "bare_s": timed["bare"]["median_s"], "training_losses_s": timed["training_losses"]["median_s"],
        "overhead": paired_ratio(timed, "training_losses", "bare") - 1,
        "overhead_iqr": tuple(q - 1 for q in quartiles(_ratios(timed, "training_losses", "bare"))),
        "timed_steps": {name: rec["steps"] for name, rec in timed.items()},
        "images": {name: rec["images"] for name, rec in timed.items()},
        "times_s": {name: rec["times_s"] for name, rec in timed.items()},
    }


class _Recorder(nn.Module):
    """The model, recording the timesteps of every call (as tensors: no host read in the loop)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[Tensor] = []
        for attr in ("prediction", "variance"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x, t, **kwargs):
        self.calls.append(t)
        return self.model(x, t, **kwargs)


class _Free(nn.Module):
    """A network that costs (almost) nothing: x / 2, carrying the parameterisation of ``like``. A
    sampler run with it times the sampler's own work alone."""

    def __init__(self, like: nn.Module):
        super().__init__()
        for attr in ("prediction", "variance"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, x, t, **kwargs):
        return x * 0.5


SAMPLERS = ("ddpm_sample", "ddim_sample", "dpm_solver_pp_sample")


def sampler_overhead(model: nn.Module | None = None, diffusion=None, *, batch: int = 64, steps: int = 50,
                     repeats: int = 7, warmup: int = 1, device="cpu", seed: int = 0,
                     samplers: tuple[str, ...] = SAMPLERS) -> dict[str, dict]:
    """Each sampler's time over the bare network calls it makes: one recorded (untimed) run counts
    the calls and their timesteps; then, interleaved, the sampler (``steps`` steps, the same x_T)
    and a plain loop of the same calls (same batch, same timesteps, no_grad) are timed. Default: the
    digits U-Net on the linear T = 1000 chain. Returns per sampler the model calls, the median
    seconds of both, the overhead (the :func:`paired_ratio` - 1) and all the times.

    A difference of two noisy times resolves a few percent at best; so the sampler's own work is
    also timed directly, with a network that costs nothing (:class:`_Free`, x / 2): ``own_s_per_step``
    (median of ``repeats`` runs over the steps) and ``own_fraction``, that over the bare time of
    one network call."""
    from ddpm_lib import samplers as sampling
    from ddpm_lib.diffusion import GaussianDiffusion

    model = (model if model is not None else digits_unet()).to(device).eval()
    diffusion = (diffusion if diffusion is not None else GaussianDiffusion.from_name("linear", 1000)).to(device)
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    out = {}
    for name in samplers:
        fn = getattr(sampling, name)

        def run(net=model, fn=fn):
            fn(net, diffusion, shape, steps=steps, x_T=x_T, generator=torch.Generator(device=device).manual_seed(seed))
            return steps, batch

        recorder = _Recorder(model)
        run(recorder)
        ts = recorder.calls

        @torch.no_grad()
        def bare(ts=ts):
            for t in ts:
                model(x_T, t)
            return len(ts), batch

        timed = interleaved_medians({"sampler": run, "bare": bare}, repeats, warmup, device)
        free = _Free(model)
        own = interleaved_medians({"own": lambda: run(free)}, repeats, warmup, device)["own"]["median_s"] / len(ts)
        out[name] = {
            "model_calls": len(ts), "steps": steps, "batch": batch,
            "timesteps": torch.stack(ts)[:, 0].tolist(),
            "sampler_s": timed["sampler"]["median_s"], "bare_s": timed["bare"]["median_s"],
            "overhead": paired_ratio(timed, "sampler", "bare") - 1,
            "overhead_iqr": tuple(q - 1 for q in quartiles(_ratios(timed, "sampler", "bare"))),
            "times_s": {name: rec["times_s"] for name, rec in timed.items()},
            "own_s_per_step": own, "own_fraction": own / (timed["bare"]["median_s"] / len(ts)),
        }
    return out


def compare_main(args) -> dict:
    """``--compare diffusers``: the three comparisons, printed with their targets."""
    try:
        import diffusers
    except ImportError as e:
        raise SystemExit("--compare diffusers needs diffusers: pip install ddpm_lib[interop]") from e
    device, kw = args.device, {"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                               "seed": args.seed}
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(f"ddpm_lib vs diffusers: device {device} ({where}), torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, float32")
    print(f"interleaved timing (A B, B A, ...), {args.warmup} untimed warm-up block(s), medians of "
          f"{args.repeats} blocks; ratios: median [interquartile range] of the per-repetition ratios")
    print(f"load average (1, 5, 15 min) before: {_load()}\n")

    train = compare_training(steps=args.steps, device=device, **kw)
    conf = train["diffusers_config"]
    print(f"1. training step (forward, eps-MSE backward, AdamW), batch {args.batch}, blocks of {args.steps} steps")
    print(f"   ddpm_lib digits U-Net (presets/digits.json): {train['params']['ddpm_lib']:,} parameters")
    print(f"   diffusers UNet2DModel block_out_channels {conf['block_out_channels']}, layers_per_block "
          f"{conf['layers_per_block']}, {'/'.join(conf['down_block_types'])}, norm_num_groups "
          f"{conf['norm_num_groups']}, attention_head_dim {conf['attention_head_dim']}: "
          f"{train['params']['diffusers']:,} parameters ({train['param_ratio'] - 1:+.1%})")
    for name in ("ddpm_lib", "diffusers"):
        print(f"   {name:<10} {train['images_per_s'][name]:9.1f} images/s  ({train['timed_steps'][name]} timed "
              f"steps, {train['images'][name]} images)")
    ok = "met" if train["ratio"] >= TARGET_TRAIN_RATIO else "NOT met"
    lo, hi = train["ratio_iqr"]
    print(f"   ratio ddpm_lib / diffusers: {train['ratio']:.3f}x [IQR {lo:.3f}..{hi:.3f}]  "
          f"(target >= {TARGET_TRAIN_RATIO:.1f}x: {ok})\n")

    loss = training_losses_overhead(steps=args.steps, device=device, **kw)
    ok = "met" if loss["overhead"] <= TARGET_LOSS_OVERHEAD else "NOT met"
    print("2. GaussianDiffusion.training_losses (loss simple) vs a bare eps-MSE step, digits U-Net, "
          f"forward+backward+AdamW both, batch {args.batch}")
    print(f"   bare {loss['bare_s'] / args.steps * 1e3:.2f} ms/step, training_losses "
          f"{loss['training_losses_s'] / args.steps * 1e3:.2f} ms/step: overhead {loss['overhead']:+.1%} "
          f"[IQR {loss['overhead_iqr'][0]:+.1%}..{loss['overhead_iqr'][1]:+.1%}]  "
          f"(target <= {TARGET_LOSS_OVERHEAD:.0%}: {ok})\n")

    samp = sampler_overhead(steps=args.sample_steps, device=device, **kw)
    print(f"3. samplers vs the bare network calls they make, digits U-Net, linear T = 1000, batch {args.batch}, "
          f"{args.sample_steps} steps")
    for name, rec in samp.items():
        ok = "met" if rec["overhead"] <= TARGET_SAMPLER_OVERHEAD else "NOT met"
        print(f"   {name:<22} {rec['model_calls']:4d} calls  sampler {rec['sampler_s']:.3f} s  bare "
              f"{rec['bare_s']:.3f} s  overhead {rec['overhead']:+.1%} [IQR {rec['overhead_iqr'][0]:+.1%}.."
              f"{rec['overhead_iqr'][1]:+.1%}]  (target <= {TARGET_SAMPLER_OVERHEAD:.0%}: {ok})")
    print("   the samplers' own work, timed with a network that costs nothing (x / 2), per step and as a share "
          "of one network call:")
    for name, rec in samp.items():
        ok = "met" if rec["own_fraction"] <= TARGET_SAMPLER_OVERHEAD else "NOT met"
        print(f"   {name:<22} {rec['own_s_per_step'] * 1e6:7.0f} us/step = {rec['own_fraction']:.2%} of a call  "
              f"(target <= {TARGET_SAMPLER_OVERHEAD:.0%}: {ok})")
    print(f"\nload average (1, 5, 15 min) after: {_load()}")
    return {"training": train, "training_losses": loss, "samplers": samp}


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):  # not on Windows
        return "n/a"


if __name__ == "__main__":
    main()
