"""Benchmark the training loop on the DDPM CIFAR-10 U-Net (35.7M parameters), synthetic data.

Runs the real loop, :func:`ddpm_lib.train.train` (the loss, AdamW, gradient clipping, EMA,
the log's device syncs), on random 32x32 RGB images in [-1, 1], and prints the training
throughput in images/s after the warm-up steps, the peak memory and the settings::

    python -m ddpm_lib.bench                             # CUDA: batch 128, bf16, channels_last
    python -m ddpm_lib.bench --compile                   # + torch.compile (its warm-up is slow)
    python -m ddpm_lib.bench --device cpu --batch 4 --steps 3

Timing: ``train`` logs ``steps_per_sec`` every ``log_every`` steps and each log reads the loss
back, so every window ends with the GPU's queue drained. With ``log_every = warmup`` the first
window holds the warm-up (CUDA kernels, cuDNN autotuning, compilation) and the later windows
are timed. The final checkpoint (~0.6 GB for this network) is written to a temporary folder
after the last timed window. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the
process's peak resident set size (all of it: Python, torch, data) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.models import PRESETS, UNet, count_parameters
from ddpm_lib.train import train


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
    args = p.parse_args(argv)
    on_cuda = args.device == "cuda"
    args.batch = args.batch or (128 if on_cuda else 4)
    args.steps = args.steps or (60 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available")
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


if __name__ == "__main__":
    main()
