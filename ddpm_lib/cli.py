"""The command line: ``python -m ddpm_lib train|sample|eval`` (also installed as ``ddpm``).

A thin layer over the library (STYLE 14): ``train`` turns a run config (``ddpm_lib.presets``)
plus ``--set`` overrides into the config dataclasses and calls ``train.train`` or
``classifier_training.train_classifier``; ``sample`` calls a sampler of ``ddpm_lib.samplers``,
with ``ddpm_lib.guidance`` wrappers; ``eval`` calls ``ddpm_lib.metrics``. A checkpoint argument
is a ``train --out`` directory, a checkpoint directory, or a pretrained model's name.

Errors print ONE line, ``ddpm: error: ...``, and exit 2 (usage: bad flag, unknown config,
malformed override, an option that would have no effect, e.g. ``--eta`` with ``--sampler ddpm``)
or 1 (at run time: missing or incompatible checkpoint, ...). Set ``DDPM_DEBUG=1`` to see the
traceback instead.

``train`` writes ``run.json`` (the config and the exact command), ``log.jsonl`` (loss and, with
each sample grid, its metrics), ``samples/`` and ``checkpoint/`` into ``--out``; under
``torchrun`` only rank 0 writes or prints. ``eval`` of a ``train --out`` directory also appends
its results to that run's ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ddpm_lib import distributed, pretrained
from ddpm_lib.checkpoint import CheckpointError, latest_checkpoint, load_model, read_config
from ddpm_lib.configs import DiffusionConfig
from ddpm_lib.viz import save_figure
from ddpm_lib.presets import (
    CLASSIFIERS, TOYS, DataConfig, RunConfig, apply_overrides, dry_run, load_data, load_run_config, load_tensors,
    preset_names, toy_sampler,
)

__all__ = ["main", "build_parser", "Loaded", "load_source", "generate", "evaluate", "save_figure", "FEATURE_CLASSIFIERS"]

# dataset -> the pretrained FeatureClassifier whose features the image metrics use
FEATURE_CLASSIFIERS = {"digits": "digits_features", "shapes": "shapes_features"}
NUM_LEVELS = {"digits": 17}  # pixel levels of the discretised likelihood (bits/dim); 8-bit images: 256
SAMPLERS = {"ddpm": 100, "ddim": 50, "dpm++": 20}  # name -> default steps (ddpm: respaced; --steps 1000 = all)
IMAGE_METRICS, POINT_METRICS = ("fd", "kid", "acc", "mem", "bpd"), ("sw", "energy")
NOISY_TS = (0, 100, 250, 500, 750)  # timesteps at which eval scores a noisy classifier


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- loading a model: checkpoint directory or pretrained name --------------------------------


@dataclass
class Loaded:
    """A model with what sampling and evaluation need to know about it."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    data: DataConfig | None  # None when the run's run.json is missing
    source: str

    @property
    def kind(self) -> str:
        return self.model.config.kind

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model.config, "num_classes", None)


def _run_json(path: Path) -> dict[str, Any] | None:
    for folder in (path, path.parent):
        if (folder / "run.json").is_file():
            return json.loads((folder / "run.json").read_text())
    return None


def load_source(spec: str, device: str | torch.device = "cpu") -> Loaded:
    """A ``train --out`` directory, a checkpoint directory or a pretrained name -> :class:`Loaded` (EMA weights)."""
    if not Path(spec).exists():
        if spec in pretrained.available():
            run = pretrained.run_config(spec)
            out = pretrained.load(spec, device)
            return Loaded(out if run.kind in CLASSIFIERS else out[0], run.diffusion, run.data, spec)
        raise FileNotFoundError(f"no checkpoint at {spec!r}, and no pretrained model of that name "
                                f"(pretrained: {', '.join(pretrained.available())})")
    model, _ = load_model(spec, device=device)
    config = read_config(spec)
    run = _run_json(latest_checkpoint(spec) or Path(spec))
    data = DataConfig.from_dict(run["config"]["data"]) if run else None
    return Loaded(model, DiffusionConfig.from_dict(config["diffusion"]), data, str(spec))


# --- sampling --------------------------------------------------------------------------------


def generate(loaded: Loaded, n: int, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
             seed: int = 0, label: int | None = None, w: float | None = None, classifier: nn.Module | None = None,
             scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``n`` samples (CPU) and their labels (None if unconditional and unguided).

    Class-conditional models get ``label`` or the labels 0, 1, ..., cycled; ``w`` wraps the model
    in classifier-free guidance, ``classifier`` (a noisy classifier) in classifier guidance.
    """
    from ddpm_lib.guidance import classifier_free, classifier_guidance
    from ddpm_lib.samplers import ddim_sample, ddpm_sample, dpm_solver_pp_sample

    model, dcfg, device = loaded.model, loaded.diffusion_config, next(loaded.model.parameters()).device
    if loaded.kind in CLASSIFIERS:
        raise ValueError(f"{loaded.source} is a {loaded.kind}, not a denoiser: nothing to sample")
    classes = loaded.num_classes or (classifier.config.num_classes if classifier is not None else None)
    if w is not None and loaded.num_classes is None:
        raise ValueError(f"classifier-free guidance needs a class-conditional model; {loaded.source} is unconditional")
    if label is not None and not (classes and 0 <= label < classes):
        raise ValueError(f"--label {label} needs a class-conditional model or a classifier, with 0 <= label < classes")
    cfg = model.config
    shape = (n, cfg.data_dim) if loaded.kind == "mlp" else (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    y = None if classes is None else (torch.full((n,), label) if label is not None else torch.arange(n) % classes)
    eps_model, diffusion = model, dcfg.build().to(device)
    if w is not None:
        eps_model = classifier_free(eps_model, w, null_label=loaded.num_classes)
    if classifier is not None:
        eps_model = classifier_guidance(eps_model, classifier, diffusion, scale,
                                        pass_y_to_model=loaded.num_classes is not None)
    steps = steps or SAMPLERS[sampler]
    if sampler != "ddpm" and dcfg.prediction != "eps":
        raise ValueError(f"--sampler {sampler} needs an eps-prediction model; this one predicts {dcfg.prediction} "
                         f"(use --sampler ddpm)")
    kw = dict(generator=torch.Generator(device).manual_seed(seed), y=None if y is None else y.to(device))
    if sampler == "ddpm":
        x = ddpm_sample(eps_model, diffusion, shape, steps=steps, variance=dcfg.variance, prediction=dcfg.prediction, **kw)
    elif sampler == "ddim":
        x = ddim_sample(eps_model, diffusion, shape, steps=steps, eta=eta, **kw)
    else:
        x = dpm_solver_pp_sample(eps_model, diffusion, shape, steps=steps, **kw)
    return x.cpu(), y


# --- evaluation --------------------------------------------------------------------------------


def _row(value: float, reference: float | None = None, note: str = "") -> dict[str, Any]:
    return {"value": value, "reference": reference, "note": note}


def _feature_classifier_name(data: DataConfig) -> str | None:
    """The pretrained FeatureClassifier for this data, if there is one and it takes its images."""
    name = FEATURE_CLASSIFIERS.get(data.name)
    if name is None:
        return None
    c = pretrained.run_config(name).model
    return name if (c.in_channels, c.image_size, c.image_size) == data.image_shape() else None


def applicable_metrics(loaded: Loaded) -> tuple[str, ...]:
    """The ``eval`` metrics that apply to a denoiser: sw, energy for 2-D; for images fd and kid
    (a feature classifier exists for the data), acc (also a class-conditional model), mem and
    bpd (the data has a test split)."""
    if loaded.kind == "mlp":
        return POINT_METRICS
    has_fc = loaded.data is not None and _feature_classifier_name(loaded.data) is not None
    has_test = loaded.data is not None and loaded.data.name != "image_folder"
    ok = {"fd": has_fc, "kid": has_fc, "acc": has_fc and loaded.num_classes is not None, "mem": has_test,
          "bpd": has_test}
    return tuple(m for m in IMAGE_METRICS if ok[m])


def _feature_scores(fc, x: Tensor, train_x: Tensor, f_test: Tensor, wanted, g: torch.Generator) -> dict:
    """Frechet distance and KID (those in ``wanted``) of samples ``x`` in the feature space of the
    classifier ``fc``, against the test features ``f_test``, each as ``(value, reference)``: the
    reference is the same metric for ``len(x)`` random training images (real-vs-real)."""
    from ddpm_lib.metrics import extract_features, frechet_distance, kid

    real = train_x[torch.randperm(len(train_x), generator=g)[: len(x)]]
    f_x, f_real = extract_features(fc.features, x), extract_features(fc.features, real)
    out = {}
    if "fd" in wanted:
        out["frechet_distance"] = (frechet_distance(f_x, f_test), frechet_distance(f_real, f_test))
    if "kid" in wanted:
        out["kid"] = (kid(f_x, f_test, generator=g)[0], kid(f_real, f_test, generator=g)[0])
    return out


def _image_metrics(loaded: Loaded, x: Tensor, y: Tensor | None, wanted, *, seed: int, nll_batches: int) -> dict:
    from ddpm_lib.metrics import classifier_accuracy, extract_features, memorization_ratio

    data = loaded.data
    fc_name = _feature_classifier_name(data)
    if fc_name is None and {"fd", "kid", "acc"} & wanted:
        raise ValueError(f"no feature classifier for the data {data.name!r} at {list(data.image_shape())} "
                         f"(they exist for {sorted(FEATURE_CLASSIFIERS)}), so no fd, kid or acc")
    train_x, _ = load_tensors(data, "train")
    test_x, test_y = load_tensors(data, "test")
    g = torch.Generator().manual_seed(seed)
    x = x.clamp(-1, 1)
    out: dict[str, Any] = {}
    if {"fd", "kid"} & wanted:
        fc = pretrained.load(fc_name)
        scores = _feature_scores(fc, x, train_x, extract_features(fc.features, test_x), wanted, g)
        notes = {"frechet_distance": f"{fc_name} features, vs test set; ref: n train images",
                 "kid": "vs test set; ref: n train images"}
        out.update({k: _row(*v, notes[k]) for k, v in scores.items()})
    if "acc" in wanted and y is not None:
        fc = pretrained.load(fc_name)
        out["class_accuracy"] = _row(classifier_accuracy(fc, x, y), classifier_accuracy(fc, test_x, test_y),
                                     "of the asked-for labels; ref: test set")
    if "mem" in wanted:
        ratio = memorization_ratio(x, train_x)
        ref = memorization_ratio(test_x, train_x)
        out["memorization_median_ratio"] = _row(ratio["median"], ref["median"], "NN d1/d2 vs train; ref: test set")
        out["memorized_fraction"] = _row(ratio["fraction_memorized"], ref["fraction_memorized"], "d1/d2 < 1/3")
    if "bpd" in wanted and nll_batches > 0:
        diffusion, B, levels = loaded.diffusion_config.build(), 64, NUM_LEVELS.get(data.name, 256)
        values = []
        for i in range(min(nll_batches, math.ceil(len(test_x) / B))):
            x0, y0 = test_x[i * B:(i + 1) * B], test_y[i * B:(i + 1) * B]
            kwargs = {"y": y0} if loaded.num_classes else {}
            with torch.no_grad():
                nll = diffusion.nll_bits_per_dim(loaded.model, x0, num_levels=levels,
                                                 variance=loaded.diffusion_config.variance,
                                                 prediction=loaded.diffusion_config.prediction, model_kwargs=kwargs,
                                                 generator=g, batch_t=max(1, 1024 // len(x0)))
            values.append(nll["total_bpd"])
        vals = torch.cat(values)
        out["bits_per_dim"] = _row(float(vals.mean()), None, f"test set, {len(vals)} images, {levels} levels")
    return out


def evaluate(loaded: Loaded, *, n: int = 1000, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
             seed: int = 0, metrics: set[str] | None = None, nll_batches: int = 1, w: float | None = None) -> dict:
    """Measure a model: ``{metric: {"value", "reference", "note"}}``.

    ``reference`` is the real-vs-real value at the same n (2-D metrics, Frechet distance, KID) or
    the value on real test data (accuracy, memorisation). ``metrics`` picks among sw, energy
    (2-D), fd, kid, acc, mem, bpd (images; :func:`applicable_metrics`) and acc (classifiers);
    default all that apply; those that do not apply are skipped (``ddpm eval`` refuses them).
    """
    from ddpm_lib.metrics import classifier_accuracy, compare_to_data

    if loaded.data is None:
        raise ValueError(f"{loaded.source}: no run.json beside the checkpoint, so its data is unknown")
    g = torch.Generator().manual_seed(seed)
    if loaded.kind in CLASSIFIERS:
        from ddpm_lib.classifier_training import noisy_accuracy

        test_x, test_y = load_tensors(loaded.data, "test")
        if loaded.kind == "feature_classifier":
            return {"test_accuracy": _row(classifier_accuracy(loaded.model, test_x, test_y), None, f"{len(test_y)} test images")}
        diffusion = loaded.diffusion_config.build()
        return {f"test_accuracy_t{t}": _row(noisy_accuracy(loaded.model, diffusion, test_x, test_y, t, generator=g),
                                            None, "on x_t ~ q(x_t | x_0)") for t in NOISY_TS}
    wanted = set(metrics or applicable_metrics(loaded)) & set(applicable_metrics(loaded))
    if not wanted:
        raise ValueError(f"{loaded.source}: none of the metrics {sorted(metrics or IMAGE_METRICS)} applies to a "
                         f"{loaded.kind} on {loaded.data.name!r} data")
    x, y = generate(loaded, n, sampler=sampler, steps=steps, eta=eta, seed=seed, w=w)
    if loaded.kind != "mlp":
        return _image_metrics(loaded, x, y, wanted, seed=seed, nll_batches=nll_batches)
    out = {}
    for key, metric, name in (("sw", "sliced_wasserstein", "sliced_wasserstein"), ("energy", "energy", "energy_distance")):
        if key in wanted:
            r = compare_to_data(x, toy_sampler(loaded.data), metric=metric, generator=g)
            out[name] = _row(r["metric"], r["floor"], f"vs fresh data; ref: real-vs-real floor (std {r['floor_std']:.2g})")
    return out


def training_metrics(data: DataConfig):
    """The ``sample_metrics`` ``ddpm train`` logs with each sample grid (``ddpm_lib.train``), or None.

    2-D toys: the sliced Wasserstein distance to FRESH data and its real-vs-real floor at the
    same n (3 fresh sets each). Digits and shapes: the Frechet distance and KID in the pretrained
    feature classifier's space against the test set, each beside its reference (n training
    images against the test set), and the class accuracy of conditional samples. Cheap: the
    grid's samples (``num_samples``) and one pass of a small classifier.
    """
    from ddpm_lib.metrics import classifier_accuracy, extract_features
    from ddpm_lib.train import points_metrics

    if data.name in TOYS:
        return points_metrics(toy_sampler(data), repeats=3)
    fc_name = _feature_classifier_name(data)
    if fc_name is None:
        return None
    fc = pretrained.load(fc_name)
    train_x, _ = load_tensors(data, "train")
    test_x, _ = load_tensors(data, "test")
    f_test = extract_features(fc.features, test_x)

    def images(x: Tensor, y: Tensor | None) -> dict[str, float]:
        x = x.clamp(-1, 1)  # also maps NaN to NaN: then the feature statistics refuse it
        if not torch.isfinite(x).all():
            return {"frechet_distance": None}
        scores = _feature_scores(fc, x, train_x, f_test, {"fd", "kid"}, torch.Generator().manual_seed(0))
        out = {}
        for name, (value, reference) in scores.items():
            out[name], out[f"{name}_floor"] = value, reference
        if y is not None:
            out["class_accuracy"] = classifier_accuracy(fc, x, y)
        return out

    return images


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


def _same_data(previous: dict[str, Any], run: RunConfig) -> bool:
    """Whether an earlier run.json's data is this run's (older files lack newer, defaulted fields)."""
    try:
        return DataConfig.from_dict(previous["config"]["data"]) == run.data
    except (KeyError, TypeError, ValueError):
        return False


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
    main_rank = distributed.is_main_process()  # under torchrun, rank 0 alone writes and prints
    name = Path(args.config).stem
    out = Path(args.out or f"runs/{name}{'-dry-run' if args.dry_run else ''}")
    previous = _run_json(out) or {}
    if previous and not _same_data(previous, run):
        raise ValueError(f"{out} holds a run on other data ({previous['config']['data']}); choose another --out")
    found = latest_checkpoint(out)
    if found is not None and main_rank:
        print(f"resuming from {found} (step {read_config(found)['step']})")
    info = {"preset": name, "command": _command_line(argv), "config": run.to_dict(),
            "wall_time_s": previous.get("wall_time_s", 0.0), "torch": torch.__version__,
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    if found is None and main_rank:  # a resumed run keeps its run.json until the checkpoint has accepted this config
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    data = load_data(run.data, "train")
    start, progress = time.perf_counter(), sys.stderr.isatty()
    if run.kind in CLASSIFIERS:
        result = train_classifier(run.model, run.train, data, diffusion_config=run.diffusion, out_dir=out, progress=progress)
    else:
        metrics = training_metrics(run.data) if run.train.sample_every and main_rank else None
        result = train(run.model, run.diffusion, run.train, data, out_dir=out, progress=progress,
                       sample_metrics=metrics)
    if not main_rank:
        return 0
    info["wall_time_s"] += time.perf_counter() - start
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"trained {run.kind} to step {result.step} in {info['wall_time_s']:.1f} s; checkpoint: {out / 'checkpoint'}")
    return 0


def _given(args, *names: str) -> list[str]:
    """The options among ``names`` (dest names) that were given on the command line (not None)."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def _check_sampling_options(args) -> None:
    """Refuse options the chosen sampler would ignore (one clear line instead of a silent no-op)."""
    sampler = args.sampler or "ddpm"
    if args.eta is not None and sampler != "ddim":
        raise UsageError(f"--eta only applies to --sampler ddim (--sampler {sampler} has no eta)")


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


def cmd_sample(args, argv) -> int:
    _check_sampling_options(args)
    guidance = _guidance_args(args)
    loaded = load_source(args.checkpoint, args.device)
    x, y = generate(loaded, args.n, sampler=args.sampler or "ddpm", steps=args.steps,
                    eta=args.eta or 0.0, seed=args.seed, label=args.label, **guidance)
    out = args.out or "samples.png"
    save_figure(x, out, y)
    npz = args.npz or str(Path(out).with_suffix(".npz"))
    arrays = {"samples": x.numpy()} if y is None else {"samples": x.numpy(), "labels": y.numpy()}
    Path(npz).parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    print(f"wrote {out} and {npz} ({args.n} samples of shape {tuple(x.shape[1:])})")
    return 0


def _check_eval_options(args, loaded: Loaded, metrics: set[str] | None) -> None:
    """Refuse eval options that would have no effect on this model."""
    if loaded.kind in CLASSIFIERS:
        ignored = _given(args, "n", "sampler", "steps", "eta", "w", "metrics", "nll_batches")
        if loaded.kind == "feature_classifier":
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
    _check_sampling_options(args)
    loaded = load_source(args.checkpoint, args.device)
    if loaded.data is None:
        raise ValueError(f"{loaded.source}: no run.json beside the checkpoint, so its data is unknown")
    _check_eval_options(args, loaded, metrics)
    n, sampler, seed = args.n or 1000, args.sampler or "ddpm", args.seed or 0
    nll_batches = 1 if args.nll_batches is None else args.nll_batches
    results = evaluate(loaded, n=n, sampler=sampler, steps=args.steps, eta=args.eta or 0.0, seed=seed,
                       metrics=metrics, nll_batches=nll_batches, w=args.w)
    how = "" if loaded.kind in CLASSIFIERS else f", n = {n}, sampler {sampler} ({args.steps or SAMPLERS[sampler]} steps)"
    print(f"{loaded.source}: {loaded.kind}{how}, seed {seed}")
    _print_table(results)
    record = {"command": _command_line(argv), "n": n, "sampler": sampler, "steps": args.steps, "seed": seed,
              "w": args.w, "metrics": results}
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
        p.add_argument("--eta", type=float, help="DDIM eta, --sampler ddim only (default 0: deterministic)")
        p.add_argument("--seed", type=int, default=None if eval_ else 0, help="default 0")
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("sample", help="draw samples: a PNG (grid or scatter) and an .npz", **kw)
    model_args(p, 64)
    p.add_argument("--guidance", choices=["cfg"], help="classifier-free guidance (class-conditional models)")
    p.add_argument("--w", type=float, help="CFG weight w, with --guidance cfg: eps = (1 + w) eps(x, y) - w eps(x)")
    p.add_argument("--label", type=int, help="one label for all samples (default: 0, 1, 2, ... cycled)")
    p.add_argument("--classifier", help="a noisy classifier (checkpoint or pretrained name) for classifier guidance")
    p.add_argument("--scale", type=float, help="classifier-guidance scale s, with --classifier (default 1)")
    p.add_argument("--out", help="PNG path (default samples.png)")
    p.add_argument("--npz", help="npz path (default: the PNG path with .npz)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="measure a model: 2-D distances, feature-space metrics, bits/dim", **kw)
    model_args(p, 1000, eval_=True)
    p.add_argument("--metrics", help="comma list of sw,energy (2-D), fd,kid,acc,mem,bpd (images); default all that apply")
    p.add_argument("--nll-batches", type=int, help="test batches of 64 for bits/dim (0 skips; default 1)")
    p.add_argument("--w", type=float, help="evaluate with classifier-free guidance of weight w")
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
