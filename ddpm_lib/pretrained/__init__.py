"""Pretrained models of the book, trained on a CPU with ``ddpm train`` and measured with ``ddpm eval``.

Each model is a folder ``<name>/`` with ``config.json`` (the whole run config: data, model,
diffusion, train, and the step) and ``model.safetensors`` (the EMA weights, fp32 or fp16, as the
manifest's ``dtype`` says). Beside them,
``manifest.json`` records for every model the exact training command, seed, steps, measured wall
time, the metrics ``ddpm eval`` measured, and the size and SHA-256 of each file::

    from ddpm_lib import pretrained
    pretrained.available()                     # ['digits', 'digits_cond', ...]
    model, diffusion = pretrained.load("digits_cond")
    classifier = pretrained.load("digits_features")

:func:`load` checks every file against the manifest's SHA-256 first and raises
:class:`PretrainedError` naming the file that differs. ``ddpm sample --checkpoint digits_cond``
takes these names wherever it takes a checkpoint directory.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ddpm_lib.checkpoint import CheckpointError, load_checkpoint, load_state_dict, ready_to_sample, sha256_file
from ddpm_lib.models import model_from_config
from ddpm_lib.presets import NOT_DENOISERS, RunConfig

__all__ = ["available", "load", "run_config", "manifest", "PretrainedError", "export", "FILES"]

FILES = ("config.json", "model.safetensors")


class PretrainedError(CheckpointError):
    """A pretrained model is unknown, missing a file, or a file's SHA-256 differs from the manifest's."""


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else Path(str(resources.files(__name__)))


def manifest(*, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed ``manifest.json``: ``{"models": {name: entry}}``."""
    path = _root(root) / "manifest.json"
    if not path.is_file():
        return {"models": {}}
    return json.loads(path.read_text())


def available(*, root: str | os.PathLike | None = None) -> list[str]:
    """Names of the shipped models."""
    return sorted(manifest(root=root)["models"])


def _verified(name: str, root) -> Path:
    """The model's folder, after checking each file's SHA-256 against the manifest."""
    entries = manifest(root=root)["models"]
    if name not in entries:
        raise PretrainedError(f"no pretrained model {name!r}; available: {', '.join(sorted(entries)) or 'none'}")
    folder = _root(root) / name
    for file, expected in entries[name]["files"].items():
        path = folder / file
        if not path.is_file():
            raise PretrainedError(f"{path}: missing (the package data is incomplete)")
        if sha256_file(path) != expected["sha256"]:
            raise PretrainedError(f"{path}: SHA-256 differs from manifest.json's (corrupt or modified file)")
    return folder


def run_config(name: str, *, root: str | os.PathLike | None = None) -> RunConfig:
    """The run config (data, model, diffusion, train) the model was trained with."""
    config = json.loads((_verified(name, root) / "config.json").read_text())
    return RunConfig.from_dict({k: v for k, v in config.items() if k not in ("name", "step")})


def load(name: str, device: str | torch.device = "cpu", *, root: str | os.PathLike | None = None):
    """A pretrained model in eval mode on ``device``, after verifying its files' SHA-256.

    Returns ``(model, diffusion)`` for a denoiser, ready to sample: the chain on ``device`` and
    the model carrying its ``prediction`` and ``variance`` (``checkpoint.ready_to_sample``); the
    classifier alone for the classifiers (``digits_features``, ``shapes_features``,
    ``digits_noisy_classifier``; guide with the denoiser's chain), the autoencoder alone for an
    autoencoder. ``root`` is a folder laid out
    like this package (for tests).
    """
    run = run_config(name, root=root)
    folder = _root(root) / name
    model = model_from_config(run.model)
    load_state_dict(model, load_file(str(folder / "model.safetensors")), folder / "model.safetensors")
    model, diffusion = ready_to_sample(model, run.kind, run.diffusion, device)
    return model if run.kind in NOT_DENOISERS else (model, diffusion)


_STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export(run_dir: str | os.PathLike, name: str, *, eval_json: str | os.PathLike | None = None,
           root: str | os.PathLike | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Maintainers: copy a ``ddpm train`` run's EMA weights and config into ``<root>/<name>/`` and
    record it in the manifest, with the run's command and wall time (``run.json``) and the
    metrics of ``ddpm eval --json`` (``eval_json``). Returns the manifest entry.

    ``dtype="float16"`` halves the file (the shipped weights have a size budget); :func:`load`
    casts back to the model's float32 parameters. Measure the stored model (``eval_json`` of
    the exported copy) before shipping it: fp16 keeps 11 significant bits."""
    if dtype not in _STORED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_STORED_DTYPES)}, got {dtype!r}")
    run_dir, folder = Path(run_dir), _root(root) / name
    info = json.loads((run_dir / "run.json").read_text())
    ck = load_checkpoint(run_dir, training_state=False)
    folder.mkdir(parents=True, exist_ok=True)
    stored = _STORED_DTYPES[dtype]
    # integer buffers (none today) would keep their dtype; only floating weights are cast
    save_file({k: (v.to(stored) if v.is_floating_point() else v).contiguous() for k, v in ck.ema.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"name": name, "step": ck.step, **info["config"]}, indent=2) + "\n")
    entry = {
        "name": name, "kind": info["config"]["model"]["kind"], "config": info["preset"], "command": info["command"],
        "seed": info["config"]["train"]["seed"], "steps": ck.step, "wall_time_s": round(info["wall_time_s"], 1),
        "trained_on": info.get("machine", ""), "dtype": dtype, "metrics": {}, "eval_command": None,
        "files": {f: {"bytes": (folder / f).stat().st_size, "sha256": sha256_file(folder / f)} for f in FILES},
    }
    if eval_json is not None:
        ev = json.loads(Path(eval_json).read_text())
        entry.update(metrics=ev["metrics"], eval_command=ev["command"])
    full = manifest(root=root)
    full["models"][name] = entry
    full["models"] = dict(sorted(full["models"].items()))
    (_root(root) / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
    return entry
