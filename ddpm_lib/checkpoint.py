"""Checkpoints: safetensors weights plus JSON, written atomically, read with clear errors.

A checkpoint is a directory (``out_dir/checkpoint/``) holding

=====================  ===================================================================
``config.json``        format and version, step, the model / diffusion / train configs
``model.safetensors``  the trained weights
``ema.safetensors``    the EMA weights (what to sample from)
``state.safetensors``  the optimiser's tensors and every RNG state (uint8 tensors)
``state.json``         the step again, the optimiser's other entries (param groups) and the
                       loop's state (``TrainLoop.loop_state``)
``manifest.json``      the size and SHA-256 of each of the five files above, config.json
                       included (written last)
=====================  ===================================================================

Nothing is pickled (DESIGN.md): no ``torch.save``/``torch.load`` anywhere. Format version 2
(this one) moved the manifest out of ``config.json`` so that it covers ``config.json`` too;
version 1 checkpoints are refused with a message saying so.

**Atomic writes.** :func:`save_checkpoint` writes a new checkpoint into
``checkpoint.tmp-<random>``, fsyncs it, renames the current ``checkpoint`` to
``checkpoint.prev``, renames the new one to ``checkpoint`` and only then deletes
``checkpoint.prev``. A crash (even SIGKILL) at any point leaves a complete checkpoint under
one of the two names; :func:`latest_checkpoint` finds it. :func:`write_atomic` replaces a
single file the same way (the training log's rewrite on resume). Folders and files are
created with the permissions the umask asks for (0o777 / 0o666 & ~umask), not the 0o700 /
0o600 of ``tempfile`` or of safetensors' own ``save_file``.

**Clear errors.** :func:`load_checkpoint` checks every file (present, the size and hash
``manifest.json`` records, parseable) and the step (an int in [0, train.steps], the same in
``config.json`` and ``state.json``), and raises a single :class:`CheckpointError` naming the
file and the problem, never a deep traceback from safetensors or json.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ddpm_lib.configs import DiffusionConfig, TrainConfig

__all__ = [
    "FORMAT", "FORMAT_VERSION", "CheckpointError", "Checkpoint", "save_checkpoint",
    "load_checkpoint", "latest_checkpoint", "read_config", "load_model", "load_state_dict", "build_model",
    "sha256_file", "ready_to_sample", "write_atomic",
]

FORMAT = "ddpm_lib.checkpoint"
FORMAT_VERSION = 2
NAME = "checkpoint"
CONFIG = "config.json"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILES = ("state.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, foreign or incompatible; says which file and why."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns. ``optimizer`` is a ``torch.optim`` state dict;
    ``rng`` maps a generator's name to its state; ``state`` is the loop's own JSON state."""

    path: Path
    step: int
    model_config: dict[str, Any]
    diffusion_config: DiffusionConfig
    train_config: TrainConfig
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def build_model(model_config: dict[str, Any]) -> torch.nn.Module:
    """The model a config dict (with its ``"kind"``) describes, from ``ddpm_lib.models``."""
    from ddpm_lib.models import model_from_config

    return model_from_config(model_config)


# --- writing ----------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk; directories cannot be opened on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks (the manifests of checkpoints and
    of ``ddpm_lib.pretrained`` record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to disk. ``open`` creates it
    with mode 0o666 & ~umask, as the user expects of any file."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # Copies on the CPU, contiguous and unshared (safetensors refuses shared storage). Serialised
    # to bytes and written here: safetensors' save_file creates its files 0o600 whatever the umask.
    _write_new(path, safetensors_bytes({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}))


def _write_json(path: Path, obj: Any) -> None:
    _write_new(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace (or create) ``path`` with ``data`` so that a crash at any moment leaves either the
    old file or the new one, whole: write ``<name>.tmp-<random>`` beside it, flush and fsync it,
    ``os.replace`` it over ``path`` (atomic on POSIX and Windows), then fsync the folder so the
    rename itself is on disk. A temporary left by a crash is the caller's to remove."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        _write_new(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _manifest_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors ("optimizer.<param id>.<name>") and JSON."""
    tensors, other = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                other.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(entries) for pid, entries in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    # JSON has no tuples: give back e.g. Adam's betas as the tuple torch wrote.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    step: int,
    model_config: dict[str, Any],
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    model: dict[str, Tensor],
    ema: dict[str, Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Tensor],
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/checkpoint`` atomically (see the module docstring) and return its path.

    ``model``/``ema`` are state dicts, ``optimizer`` an optimizer state dict, ``rng`` maps
    names to generator states (uint8 tensors) and ``state`` is extra JSON for the loop.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{NAME}.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f"{NAME}.tmp-{secrets.token_hex(8)}"
    tmp.mkdir()  # mode 0o777 & ~umask (tempfile.mkdtemp would make it 0o700)
    # 1. every file into the temporary directory (each fsynced as written); the manifest last
    _write_tensors(tmp / "model.safetensors", model)
    _write_tensors(tmp / "ema.safetensors", ema)
    opt_tensors, opt_json = _flatten_optimizer(optimizer)
    _write_tensors(tmp / "state.safetensors", {**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}})
    _write_json(tmp / "state.json", {"step": step, "optimizer": opt_json, "loop": state or {}})
    from ddpm_lib import __version__

    _write_json(tmp / CONFIG, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ddpm_lib_version": __version__, "step": step,
        "model": model_config, "diffusion": diffusion_config.to_dict(), "train": train_config.to_dict(),
    })
    files = {name: _manifest_entry(tmp / name) for name in (CONFIG, *WEIGHT_FILES, *STATE_FILES)}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
    _fsync(tmp)
    # 2. swap: checkpoint -> checkpoint.prev, tmp -> checkpoint, then drop checkpoint.prev
    final, prev = out_dir / NAME, out_dir / f"{NAME}.prev"
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync(out_dir)
    if prev.exists():
        shutil.rmtree(prev)
    return final


# --- reading ----------------------------------------------------------------------------------


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/checkpoint``, or ``checkpoint.prev`` if a crash hit between the two renames; else None."""
    for name in (NAME, f"{NAME}.prev"):
        if (Path(out_dir) / name / "config.json").exists():
            return Path(out_dir) / name
    return None


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not readable as JSON ({e})") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own (rust) error type
        raise _fail(path, f"not a valid safetensors file ({e})") from None


def _manifest(ckpt: Path) -> dict[str, Any]:
    """The ``files`` table of ``manifest.json``: {name: {"bytes": ..., "sha256": ...}}."""
    where = ckpt / MANIFEST
    if not where.is_file():
        raise _fail(where, "missing: the checkpoint is incomplete (its manifest is written last)")
    manifest = _read_json(where)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise _fail(where, 'has no "files" table')
    return files


def _check_files(ckpt: Path, files: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each named file is present, of the size and SHA-256 that ``manifest.json`` records."""
    for name in names:
        path, expected = ckpt / name, files.get(name)
        if not path.is_file():
            raise _fail(path, "missing: the checkpoint is incomplete")
        if not isinstance(expected, dict):
            raise _fail(ckpt / MANIFEST, f"records no size and hash for {name}")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise _fail(path, f"is {size} bytes, {MANIFEST} records {expected.get('bytes')} (truncated or replaced)")
        if sha256_file(path) != expected.get("sha256"):
            raise _fail(path, f"SHA-256 differs from the one {MANIFEST} records (corrupt or replaced)")


def _locate(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of an ``out_dir``."""
    ckpt = Path(path)
    if not (ckpt / CONFIG).exists():
        ckpt = latest_checkpoint(path) or ckpt
    if not ckpt.is_dir():
        raise _fail(ckpt, "no checkpoint here (expected a directory with config.json)")
    return ckpt


@dataclass
class _Config:
    """A validated ``config.json``: the dict, its parsed configs, and the manifest's files table."""

    raw: dict[str, Any]
    diffusion: DiffusionConfig
    train: TrainConfig
    files: dict[str, Any]


def _read_config(ckpt: Path) -> _Config:
    """``config.json`` checked against the manifest (when there is one: a foreign folder has
    none, and is then named as foreign from its content), then its format, version, entries,
    configs and step."""
    where = ckpt / CONFIG
    if not where.is_file():
        raise _fail(where, "missing: not a ddpm_lib checkpoint, or an incomplete one")
    files = None
    if (ckpt / MANIFEST).is_file():
        files = _manifest(ckpt)
        _check_files(ckpt, files, (CONFIG,))
    config = _read_json(where)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise _fail(where, f"not a ddpm_lib checkpoint (no \"format\": \"{FORMAT}\")")
    if config.get("format_version") != FORMAT_VERSION:
        old = " (written by an older ddpm_lib, whose manifest did not cover config.json)" \
            if config.get("format_version") == 1 else ""
        raise _fail(where, f"format_version {config.get('format_version')!r} is not supported{old} "
                           f"(this ddpm_lib reads version {FORMAT_VERSION})")
    if files is None:
        files = _manifest(ckpt)  # raises: a version-2 checkpoint without its manifest is incomplete
    missing = [k for k in ("step", "model", "diffusion", "train") if k not in config]
    if missing:
        raise _fail(where, f"lacks the entries {missing}")
    if not isinstance(config["model"], dict) or "kind" not in config["model"]:
        raise _fail(where, "the model config has no \"kind\"")
    try:
        diffusion, train = DiffusionConfig.from_dict(config["diffusion"]), TrainConfig.from_dict(config["train"])
    except (ValueError, TypeError) as e:
        raise _fail(where, f"invalid config ({e})") from None
    step = config["step"]
    # bool is an int in Python, and JSON's 3.5 or 1e9 are floats: only a true int is a step count
    if type(step) is not int or not 0 <= step <= train.steps:
        raise _fail(where, f"step {step!r} is not an int in [0, train.steps = {train.steps}]")
    return _Config(config, diffusion, train, files)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``config.json`` of a checkpoint directory (or of ``out_dir``'s latest):
    ``step`` and the ``model``, ``diffusion`` and ``train`` config dicts."""
    return _read_config(_locate(path)).raw


def load_checkpoint(path: str | os.PathLike, *, training_state: bool = True) -> Checkpoint:
    """Read and validate a checkpoint directory (or ``out_dir``, meaning its latest checkpoint).

    With ``training_state=False`` only the configs and weights are read (enough to sample).
    Raises :class:`CheckpointError` naming the file at fault.
    """
    ckpt = _locate(path)
    config = _read_config(ckpt)
    _check_files(ckpt, config.files, WEIGHT_FILES + (STATE_FILES if training_state else ()))
    step = config.raw["step"]
    out = Checkpoint(path=ckpt, step=step, model_config=config.raw["model"], diffusion_config=config.diffusion,
                     train_config=config.train, model=_read_tensors(ckpt / "model.safetensors"),
                     ema=_read_tensors(ckpt / "ema.safetensors"))
    if training_state:
        where = ckpt / "state.json"
        tensors, meta = _read_tensors(ckpt / "state.safetensors"), _read_json(where)
        try:
            out.optimizer = _unflatten_optimizer(tensors, meta["optimizer"])
            out.state, state_step = dict(meta["loop"]), meta["step"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _fail(where, f"malformed optimizer or loop state ({type(e).__name__}: {e})") from None
        if type(state_step) is not int or state_step != step:
            raise _fail(where, f"records step {state_step!r}, config.json step {step}")
        out.rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return out


def load_state_dict(module: torch.nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """``module.load_state_dict(state)`` (strict), with a mismatch reported as a CheckpointError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise _fail(where, f"does not fit the model its config.json describes ({str(e).splitlines()[0]} ...)") from None


def ready_to_sample(model: torch.nn.Module, kind: str, diffusion_config: DiffusionConfig,
                    device: str | torch.device):
    """``(model, diffusion)`` in eval mode on ``device``; a denoiser (any kind but the classifiers)
    carries its prediction and variance (``predictions.set_parameterization``), so that every
    sampler reads them without being told."""
    from ddpm_lib.predictions import set_parameterization
    from ddpm_lib.presets import NOT_DENOISERS

    if kind not in NOT_DENOISERS:
        set_parameterization(model, prediction=diffusion_config.prediction, variance=diffusion_config.variance)
    return model.to(device).eval(), diffusion_config.build().to(device)


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"):
    """``(model, diffusion)`` rebuilt from a checkpoint, ready for sampling.

    The model is built from ``config.json``'s model config through ``ddpm_lib.models``'
    factory, given the EMA weights (``ema=True``, what one samples from) or the raw ones,
    put in eval mode on ``device``, and (a denoiser) told its ``prediction`` and ``variance``
    (:func:`ready_to_sample`); ``diffusion`` is the ``DiffusionConfig``'s chain, on ``device``.
    """
    ck = load_checkpoint(path, training_state=False)
    try:
        model = build_model(ck.model_config)
    except (ValueError, TypeError, KeyError) as e:
        raise _fail(ck.path / "config.json", f"cannot build the model ({e})") from None
    name = "ema.safetensors" if ema else "model.safetensors"
    load_state_dict(model, ck.ema if ema else ck.model, ck.path / name)
    return ready_to_sample(model, ck.model_config["kind"], ck.diffusion_config, device)
