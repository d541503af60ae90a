"""The run record ``run.json`` of a ``ddpm train --out`` folder: written atomically, read with one clear error.

``ddpm train`` writes ``run.json`` (the run config, the exact command, the total wall time) beside
``checkpoint/``; ``ddpm sample`` and ``ddpm eval`` read the data config from it.

* :func:`write_json_atomic` writes through ``checkpoint.write_atomic`` (a temporary file in the
  same folder, flushed and fsynced, renamed over the target): a crash at any moment leaves the
  old record or the new one, never a truncated one.
* :func:`read_run` refuses a damaged record (empty, truncated, not JSON, or another tool's file
  without our keys) with a :class:`RunRecordError` that names the file and how to recover,
  instead of a ``JSONDecodeError`` or ``KeyError`` that names neither.
* :func:`check_out_dir` refuses to train into a folder that holds files but no run of ours.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ddpm_lib.checkpoint import latest_checkpoint, write_atomic

__all__ = ["RUN_FILE", "RunRecordError", "write_json_atomic", "read_run", "find_run", "run_data", "check_out_dir"]

RUN_FILE = "run.json"
_TMP = ".tmp-"  # infix of write_atomic's temporary files: ``run.json.tmp-<hex>``


class RunRecordError(ValueError):
    """A ``run.json`` that cannot be used; the message names the file and how to recover."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see the module docstring).

    ``allow_nan=False``: NaN and inf are not JSON, and a record other tools cannot parse is no
    record. A temporary file left by an earlier crash (SIGKILL mid-write) is removed.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"  # before any file is touched
    for stale in path.parent.glob(f"{path.name}{_TMP}*"):
        stale.unlink(missing_ok=True)
    write_atomic(path, text)


def _recovery(folder: Path) -> str:
    ckpt = latest_checkpoint(folder)
    if ckpt is not None:
        return (f"delete or fix it: the checkpoint in {ckpt} does not depend on it, and "
                f"'ddpm train --out {folder}' with the run's config rewrites it")
    return f"fix it, or delete {folder} and train again (it holds no checkpoint)"


def _problem(record: Any) -> str | None:
    """What makes a parsed record not one of ours, or None: it needs ``config.data`` (what sample and
    eval read) and, if present, a finite ``wall_time_s`` >= 0 (what a resumed train adds to)."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return "not a ddpm train run record (no \"config\")"
    if not isinstance(record["config"].get("data"), dict):
        return "its \"config\" has no \"data\" section"
    wall = record.get("wall_time_s", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        return f"\"wall_time_s\" is {wall!r}, not a number of seconds"
    return None


def read_run(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``folder/run.json`` parsed and checked; None if there is none. A damaged or foreign one
    raises :class:`RunRecordError` naming the file and how to recover."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    record, problem = None, "empty"
    try:
        text = path.read_text()
        if text.strip():
            record = json.loads(text)
            problem = _problem(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not readable as JSON: {e}"
    if problem:
        raise RunRecordError(f"{path} is damaged ({problem}); {_recovery(folder)}")
    return record


def find_run(path: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(folder, record)`` of the run record in ``path`` or its parent (a checkpoint folder sits
    inside its run folder); None if neither has one."""
    path = Path(path)
    for folder in (path, path.parent):
        record = read_run(folder)
        if record is not None:
            return folder, record
    return None


def run_data(folder: Path, record: dict[str, Any]):
    """The ``DataConfig`` of a record that :func:`read_run` returned; one that does not parse
    raises :class:`RunRecordError` naming the file."""
    from ddpm_lib.presets import DataConfig

    try:
        return DataConfig.from_dict(record["config"]["data"])
    except (ValueError, TypeError) as e:
        raise RunRecordError(f"{folder / RUN_FILE} is damaged (its data config: {e}); {_recovery(folder)}") from None


def check_out_dir(out: Path) -> None:
    """Refuse a ``train --out`` that is a file, or a folder that holds files but no run of ours
    (no ``run.json``, no checkpoint): training there would mix its log and samples with the
    folder's and rewrite its ``log.jsonl``. A new or empty folder is fine."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or (out / RUN_FILE).is_file() or latest_checkpoint(out) is not None:
        return
    others = sorted(p.name for p in out.iterdir() if f"{RUN_FILE}{_TMP}" not in p.name)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"--out {out} holds files ({shown}) but no ddpm run (no {RUN_FILE}, no checkpoint); "
                         f"choose a new or empty folder")
