"""The command line: ``python -m ddpm_lib train|sample|eval`` (also installed as ``ddpm``).

A thin layer that parses and calls the library (STYLE 14): ``train`` turns a run config
(``ddpm_lib.presets``) plus ``--set`` overrides into the config dataclasses and calls
``train.train`` or ``classifier_training.train_classifier``; ``sample`` and ``eval`` call
``ddpm_lib.evaluation`` (:func:`~ddpm_lib.evaluation.generate` over the samplers and guidance
wrappers, :func:`~ddpm_lib.evaluation.evaluate` over ``ddpm_lib.metrics``). A checkpoint
argument is a ``train --out`` directory, a checkpoint directory, or a pretrained model's name.
``--device`` defaults, for every command, to CUDA when available, else the CPU.

Errors print ONE line, ``ddpm: error: ...``, and exit 2 (usage: bad flag, unknown config,
malformed override, an option that would have no effect, e.g. ``--eta`` with ``--sampler ddpm``)
or 1 (at run time: missing or incompatible checkpoint, ...). Set ``DDPM_DEBUG=1`` to see the
traceback instead.

``train`` writes ``run.json`` (the config, the exact command and the wall time summed over
resumed segments; atomically, ``ddpm_lib.runs``), ``log.jsonl`` (loss and, with each sample grid,
its metrics), ``samples/`` and ``checkpoint/`` into ``--out``, a new or empty folder or an earlier
run's; under ``torchrun`` only rank 0 writes or prints. The device is checked before anything is
written; NaN and inf options are refused. ``eval`` of a ``train --out`` directory also appends
its results to that run's ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_lib import distributed, pretrained
from ddpm_lib.book import default_device
from ddpm_lib.checkpoint import CheckpointError, latest_checkpoint, read_config
# evaluate, generate, load_source, Loaded, FEATURE_CLASSIFIERS and training_metrics lived here
# before ddpm_lib.evaluation: importing them from ddpm_lib.cli keeps working
from ddpm_lib.evaluation import (
    FEATURE_CLASSIFIERS, IMAGE_METRICS, POINT_METRICS, SAMPLERS, Loaded, applicable_metrics, evaluate, generate,
    load_source, training_metrics,
)
from ddpm_lib.presets import (
    AUTOENCODERS, CLASSIFIERS, NOT_DENOISERS, apply_overrides, dry_run, load_data, load_run_config, preset_names,
)
from ddpm_lib.runs import RUN_FILE, check_out_dir, read_run, run_data, write_json_atomic
from ddpm_lib.schedules import SPACINGS
from ddpm_lib.viz import save_figure

__all__ = ["main", "build_parser", "Loaded", "load_source", "generate", "evaluate", "training_metrics",
           "save_figure", "FEATURE_CLASSIFIERS"]


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _print_table(results: dict) -> None:
    print(f"{'metric':<28}{'value':>12}{'real/ref':>12}  note")
    for name, r in results.items():
        ref = "" if r["reference"] is None else f"{r['reference']:.4g}"
        print(f"{name:<28}{r['value']:>12.4g}{ref:>12}  {r['note']}")


# --- the three commands ----------------------------------------------------------------------------


def _command_line(argv) -> str:
    """The command as typed (with OMP_NUM_THREADS when set: it changes speed and float round-off)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return threads + "ddpm " + " ".join(shlex.quote(a) for a in argv)


def _finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or inf (those would fail deep inside a sampler)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _check_device(name: str | None) -> None:
    """Refuse, before anything is written or loaded, a device this machine lacks: one line instead
    of torch's AssertionError (and a stray run.json) at the first tensor moved there."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a torch device ({e})") from None
    if device.type == "cuda":  # counted, not touched: a CUDA context now would land on GPU 0 for every rank
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # torch raises several types here (RuntimeError, AssertionError)
            raise ValueError(f"--device {name}: not available on this machine ({str(e).splitlines()[0]})") from None


def cmd_train(args, argv) -> int:
    from ddpm_lib.classifier_training import train_classifier
    from ddpm_lib.train import train

    try:
        run = load_run_config(args.config)
        run = apply_overrides(dry_run(run) if args.dry_run else run, args.set)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.device:
        run = dataclasses.replace(run, train=run.train.replace(device=args.device))
    _check_device(run.train.device)  # --device or --set train.device=...
    main_rank = distributed.is_main_process()  # under torchrun, rank 0 alone writes and prints
    name = Path(args.config).stem
    out = Path(args.out or f"runs/{name}{'-dry-run' if args.dry_run else ''}")
    check_out_dir(out)
    previous = read_run(out) or {}  # only --out's own: a run.json in its parent is another run's
    if previous and run_data(out, previous) != run.data:  # older files lack newer, defaulted fields
        raise ValueError(f"{out} holds a run on other data ({previous['config']['data']}); choose another --out")
    found = latest_checkpoint(out)
    if found is not None and main_rank:
        print(f"resuming from {found} (step {read_config(found)['step']})")
    before = previous.get("wall_time_s", 0.0)  # the total of the earlier segments of this run
    info = {"preset": name, "command": _command_line(argv), "config": run.to_dict(), "wall_time_s": before,
            "torch": torch.__version__, "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    if found is None and main_rank:  # a resumed run keeps its run.json until the checkpoint has accepted this config
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, info)
    start, progress = time.perf_counter(), sys.stderr.isatty()
    try:
        data = load_data(run.data, "train")
        if run.kind in AUTOENCODERS:
            from ddpm_lib.latent import train_autoencoder

            result = train_autoencoder(run.model, run.train, data, out_dir=out, progress=progress)
        elif run.kind in CLASSIFIERS:
            result = train_classifier(run.model, run.train, data, diffusion_config=run.diffusion, out_dir=out,
                                      progress=progress)
        else:
            metrics = training_metrics(run.data) if run.train.sample_every and main_rank else None
            transform = None
            if run.data.encoder is not None:  # a latent model's grids are decoded to images
                from ddpm_lib.latent import decode_samples

                transform = functools.partial(decode_samples, run.data)
            result = train(run.model, run.diffusion, run.train, data, out_dir=out, progress=progress,
                           sample_metrics=metrics, sample_transform=transform)
    except BaseException:
        # An interrupted or failed segment (Ctrl-C, divergence) still took its time: add it to the
        # record on disk (the earlier one if resumed: this config was not accepted), so that the
        # next segment's total includes it.
        if main_rank and (out / RUN_FILE).is_file():
            kept = info if found is None else previous
            with contextlib.suppress(OSError):  # the error the user sees is the one that stopped training
                write_json_atomic(out / RUN_FILE, {**kept, "wall_time_s": before + time.perf_counter() - start})
        raise
    if not main_rank:
        return 0
    segment = time.perf_counter() - start
    info["wall_time_s"] = before + segment
    write_json_atomic(out / RUN_FILE, info)
    total = f" ({info['wall_time_s']:.1f} s in all)" if before else ""
    print(f"trained {run.kind} to step {result.step} in {segment:.1f} s{total}; checkpoint: {out / 'checkpoint'}")
    return 0


def _given(args, *names: str) -> list[str]:
    """The options among ``names`` (dest names) that were given on the command line (not None)."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def _sampling_options(args) -> dict[str, Any]:
    """The sampler options of ``sample`` and ``eval`` as keyword arguments of ``generate`` and
    ``evaluate``, defaults filled in; refuses those the chosen sampler would ignore (one clear
    line instead of a silent no-op)."""
    sampler = args.sampler or "ddpm"
    if args.eta is not None and sampler != "ddim":
        raise UsageError(f"--eta only applies to --sampler ddim (--sampler {sampler} has no eta)")
    return dict(sampler=sampler, steps=args.steps, eta=args.eta or 0.0, spacing=args.spacing or "trailing")


def _guidance_args(args) -> dict[str, Any]:
    if args.guidance == "cfg" and args.w is None:
        raise UsageError("--guidance cfg needs --w")
    if args.w is not None and args.guidance != "cfg":
        raise UsageError("--w is the weight of classifier-free guidance: add --guidance cfg")
    if args.scale is not None and not args.classifier:
        raise UsageError("--scale is the classifier-guidance scale: add --classifier NOISY_CLASSIFIER")
    classifier = None
    if args.classifier:
        c = load_source(args.classifier, args.device)
        if c.kind != "noisy_classifier":
            raise ValueError(f"--classifier {args.classifier} is a {c.kind}; classifier guidance needs a noisy_classifier")
        classifier = c.model
    return dict(w=args.w, classifier=classifier, scale=1.0 if args.scale is None else args.scale)


def _output_paths(args) -> tuple[Path, Path]:
    """The PNG and .npz that ``sample`` writes, exactly as named: matplotlib would add ``.png`` to a
    name without a suffix (``--out DIR`` wrote ``DIR.png``) and numpy ``.npz`` to one without it, so
    other names are refused up front, before sampling, rather than written under another name."""
    png = Path(args.out or "samples.png")
    npz = Path(args.npz) if args.npz else png.with_suffix(".npz")
    for option, path, suffix in (("--out", png, ".png"), ("--npz", npz, ".npz")):
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name, e.g. {path / ('samples' + suffix)}")
        if path.suffix.lower() != suffix:
            raise UsageError(f"{option} {path}: the file name must end in {suffix}")
    return png, npz


def cmd_sample(args, argv) -> int:
    sampling = _sampling_options(args)
    png, npz = _output_paths(args)
    _check_device(args.device)
    guidance = _guidance_args(args)
    loaded = load_source(args.checkpoint, args.device)
    x, y = generate(loaded, args.n, seed=args.seed, label=args.label, **sampling, **guidance,
                    **_cascade_args(args))
    save_figure(x, png, y)
    arrays = {"samples": x.numpy()} if y is None else {"samples": x.numpy(), "labels": y.numpy()}
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    print(f"wrote {png} and {npz} ({args.n} samples of shape {tuple(x.shape[1:])})")
    return 0


def _cascade_args(args) -> dict[str, Any]:
    """``cascade`` (loaded) and ``aug_level`` of ``--cascade`` / ``--aug-level``."""
    if args.cascade is None:
        if args.aug_level is not None:
            raise UsageError("--aug-level applies to a cascade: give --cascade BASE too")
        return {}
    return {"cascade": load_source(args.cascade, args.device), "aug_level": args.aug_level or 0}


def _check_eval_options(args, loaded: Loaded, metrics: set[str] | None) -> None:
    """Refuse eval options that would have no effect on this model."""
    if loaded.kind in NOT_DENOISERS:
        ignored = _given(args, "n", "sampler", "steps", "eta", "spacing", "w", "metrics", "nll_batches", "cascade",
                         "aug_level")
        if loaded.kind in ("feature_classifier", "autoencoder"):
            ignored += _given(args, "seed")  # its test accuracy involves no randomness
        if ignored:
            raise UsageError(f"{', '.join(ignored)} do(es) not apply to a {loaded.kind}: it is scored on the "
                             f"test set, without sampling")
        return
    applicable = applicable_metrics(loaded)
    if metrics is not None and metrics - set(applicable):
        raise UsageError(f"metric(s) {sorted(metrics - set(applicable))} do not apply to {loaded.source} "
                         f"({loaded.kind} on {loaded.data.name if loaded.data else 'unknown'} data); "
                         f"applicable: {', '.join(applicable) or 'none'}")
    if args.nll_batches is not None and "bpd" not in (metrics or set(applicable)):
        raise UsageError("--nll-batches sets the bits/dim (bpd) metric, which is not measured here")


def _log_eval(spec: str, record: dict[str, Any]) -> Path | None:
    """Append an eval record to the log.jsonl of a ``train --out`` directory (None if not one)."""
    run_dir = Path(spec)
    if not (run_dir / "run.json").is_file() and (run_dir.parent / "run.json").is_file():
        run_dir = run_dir.parent  # given the checkpoint directory itself
    if not (run_dir / "run.json").is_file() or not distributed.is_main_process():
        return None
    with (run_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return run_dir / "log.jsonl"


def cmd_eval(args, argv) -> int:
    metrics = set(args.metrics.split(",")) if args.metrics else None
    unknown = (metrics or set()) - set(POINT_METRICS + IMAGE_METRICS)
    if unknown:
        raise UsageError(f"unknown metric(s) {sorted(unknown)}; choose from sw, energy, fd, kid, acc, mem, bpd")
    sampling = _sampling_options(args)
    _check_device(args.device)
    loaded = load_source(args.checkpoint, args.device)
    if loaded.data is None:
        raise ValueError(f"{loaded.source}: no run.json beside the checkpoint, so its data is unknown "
                         f"('ddpm train' with the run's --config and --out rewrites it)")
    _check_eval_options(args, loaded, metrics)
    n, seed, sampler = args.n or 1000, args.seed or 0, sampling["sampler"]
    nll_batches = 1 if args.nll_batches is None else args.nll_batches
    results = evaluate(loaded, n=n, seed=seed, metrics=metrics, nll_batches=nll_batches, w=args.w, **sampling,
                       **_cascade_args(args))
    how = "" if loaded.kind in NOT_DENOISERS else (f", n = {n}, sampler {sampler} ({args.steps or SAMPLERS[sampler]} "
                                                 f"{sampling['spacing']} steps)")
    print(f"{loaded.source}: {loaded.kind}{how}, seed {seed}")
    _print_table(results)
    record = {"command": _command_line(argv), "n": n, "sampler": sampler, "steps": args.steps,
              "spacing": sampling["spacing"], "seed": seed, "w": args.w, "cascade": args.cascade,
              "aug_level": args.aug_level, "metrics": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    if Path(args.checkpoint).exists():
        step = read_config(args.checkpoint)["step"]
        log = _log_eval(args.checkpoint, {"step": step, "eval": {k: r["value"] for k, r in results.items()},
                                          "eval_reference": {k: r["reference"] for k, r in results.items()},
                                          **{k: v for k, v in record.items() if k != "metrics"}})
        if log is not None:
            print(f"appended to {log}")
    return 0


# --- the parser ------------------------------------------------------------------------------------


def _epilog() -> str:
    lines = ["shipped configs (ddpm_lib/presets/*.json), exact commands:"]
    for name in preset_names():
        lines.append(f"  ddpm train --config {name} --out runs/{name}")
    lines += ["", f"pretrained models (use as --checkpoint NAME): {', '.join(pretrained.available())}",
              "examples:", "  ddpm sample --checkpoint digits_cond --n 100 --guidance cfg --w 2 --out cfg.png",
              "  ddpm sample --checkpoint digits --n 64 --classifier digits_noisy_classifier --scale 2 --label 3",
              "  ddpm eval --checkpoint swissroll --n 2000"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    kw = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    parser = _Parser(prog="ddpm", description="Train, sample and evaluate the diffusion models of the book.", **kw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,eval}")

    p = sub.add_parser("train", help="train a denoiser or a classifier from a run config", **kw)
    p.add_argument("--config", required=True, help=f"a shipped config ({', '.join(preset_names())}) or a .json path")
    p.add_argument("--out", help="run directory (default runs/NAME); training resumes from its checkpoint")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override config fields, type-checked, e.g. train.steps=100 model.model_channels=16")
    p.add_argument("--dry-run", action="store_true", help="smoke test: 3 steps, tiny model, small data")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")
    p.set_defaults(func=cmd_train)

    # Options whose default is None are recognised as given, so that one that would have no
    # effect (e.g. --eta with --sampler ddpm) is refused instead of ignored.
    def model_args(p, default_n, eval_: bool = False):
        p.add_argument("--checkpoint", required=True, help="a run directory, a checkpoint directory or a pretrained name")
        p.add_argument("--n", type=int, default=None if eval_ else default_n,
                       help=f"number of samples (default {default_n})")
        p.add_argument("--sampler", choices=list(SAMPLERS), help="default ddpm (ancestral)")
        p.add_argument("--steps", type=int, help="sampling steps (default: ddpm 100 = respaced, ddim 50, dpm++ 20)")
        p.add_argument("--eta", type=_finite_float, help="DDIM eta, --sampler ddim only (default 0: deterministic)")
        p.add_argument("--spacing", choices=list(SPACINGS),
                       help="which timesteps the --steps visit, for every sampler (default trailing: from T - 1 down)")
        p.add_argument("--seed", type=int, default=None if eval_ else 0, help="default 0")
        p.add_argument("--cascade", help="super-resolution models: the model (checkpoint or pretrained name) whose "
                                         "low-resolution samples this one refines")
        p.add_argument("--aug-level", type=int, help="with --cascade: the timestep the low-resolution samples are "
                                                     "noised to first (noise conditioning augmentation; default 0)")
        # as train's: decided when the parser is built, so a machine without CUDA gets "cpu"
        p.add_argument("--device", default=str(default_device()),
                       help="a torch device: cpu, cuda, cuda:1, ... (default: CUDA when available)")

    p = sub.add_parser("sample", help="draw samples: a PNG (grid or scatter) and an .npz", **kw)
    model_args(p, 64)
    p.add_argument("--guidance", choices=["cfg"], help="classifier-free guidance (class-conditional models)")
    p.add_argument("--w", type=_finite_float, help="CFG weight w, with --guidance cfg: eps = (1 + w) eps(x, y) - w eps(x)")
    p.add_argument("--label", type=int, help="one label for all samples (default: 0, 1, 2, ... cycled)")
    p.add_argument("--classifier", help="a noisy classifier (checkpoint or pretrained name) for classifier guidance")
    p.add_argument("--scale", type=_finite_float, help="classifier-guidance scale s, with --classifier (default 1)")
    p.add_argument("--out", help="a .png file, written as named (default samples.png)")
    p.add_argument("--npz", help="a .npz file (default: the PNG's name with .npz)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="measure a model: 2-D distances, feature-space metrics, bits/dim", **kw)
    model_args(p, 1000, eval_=True)
    p.add_argument("--metrics", help="comma list of sw,energy (2-D), fd,kid,acc,mem,bpd (images); default all that apply")
    p.add_argument("--nll-batches", type=int, help="test batches of 64 for bits/dim (0 skips; default 1)")
    p.add_argument("--w", type=_finite_float, help="evaluate with classifier-free guidance of weight w")
    p.add_argument("--json", help="also write the results to this JSON file (a run directory's log.jsonl gets them too)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ddpm`` and ``python -m ddpm_lib``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        for name in ("n", "steps", "nll_batches"):
            if getattr(args, name, None) is not None and getattr(args, name) < (0 if name == "nll_batches" else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'nll_batches' else 1}")
        return args.func(args, argv)
    except UsageError as e:
        print(f"ddpm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; DDPM_DEBUG=1 shows the traceback
        if os.environ.get("DDPM_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, CheckpointError, FileNotFoundError)) else f"{type(e).__name__}: "
        print(f"ddpm: error: {kind}{' '.join(str(e).split())}", file=sys.stderr)
        return 1
