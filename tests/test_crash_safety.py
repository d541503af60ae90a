"""Crash safety of a training run: the log's rewrite on resume is atomic (crashes simulated
mid-write, at the rename, and by SIGKILL), a crashed-and-resumed run logs what an uninterrupted
one does, the log is strict JSON, and divergence (an exploded loss, a non-finite gradient,
non-finite weights) stops the run before a bad checkpoint is written."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_train import DIFF, SRC, TINY, TINY_COND, WORKER, moons, one_thread  # noqa: F401 (an autouse fixture)
from test_train import cfg as train_cfg
from torch import nn

from ddpm_lib import models
from ddpm_lib.checkpoint import load_checkpoint
from ddpm_lib.loop import TIMING_KEYS, TrainLoop
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.train import DenoiserLoop, TrainConfig, TrainingDivergedError, train


def cfg(**kw) -> TrainConfig:
    """test_train's small run, logging every step."""
    return train_cfg(**{"log_every": 1, **kw})


def strict(line: str):
    """``json.loads`` that refuses the NaN / Infinity tokens Python's json writes by default."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def log_of(out: Path, drop=TIMING_KEYS) -> list[dict]:
    return [{k: v for k, v in strict(s).items() if k not in drop} for s in (out / "log.jsonl").read_text().splitlines()]


# --- the log's rewrite on resume ---------------------------------------------------------------


def run_that_died_after_its_checkpoint(tmp_path: Path) -> tuple[Path, Path, TrainConfig]:
    """``run``: a checkpoint at step 3 and log lines to step 6 (as if it died after step 6,
    before its next checkpoint); ``ref``: the uninterrupted run to 6."""
    x, y = moons()
    c = cfg()
    train(TINY_COND, DIFF, c, (x, y), out_dir=tmp_path / "ref", progress=False)
    train(TINY_COND, DIFF, c.replace(steps=3), (x, y), out_dir=tmp_path / "run", progress=False)
    shutil.copy(tmp_path / "ref" / "log.jsonl", tmp_path / "run" / "log.jsonl")
    return tmp_path / "run", tmp_path / "ref", c


class DiesMidWrite:
    """A file whose first write puts half its data on disk, then dies: raises OSError, or with
    ``kill`` SIGKILLs the process (a real crash: no except or finally runs)."""

    def __init__(self, f, kill: bool = False):
        self.f, self.kill = f, kill

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError("killed mid-write (simulated)")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def die_writing(monkeypatch, prefix: str, kill: bool = False) -> None:
    """Any open for writing ('w' or 'x', not an append) of a file named ``prefix...`` dies
    mid-write (:class:`DiesMidWrite`), whichever way the code opens it (``open``, ``Path.write_text``)."""
    real = io.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and Path(file).name.startswith(prefix) and set(mode) & set("wx"):
            return DiesMidWrite(f, kill)
        return f

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_crash_during_the_logs_rewrite_keeps_the_old_log(tmp_path, monkeypatch):
    """Crash points: mid-write of the new log, and at its rename over the old one. Each time the
    old log is byte for byte intact and no temporary is left; the next resume then trims it to
    the checkpoint and the final log equals the uninterrupted run's."""
    run, ref, c = run_that_died_after_its_checkpoint(tmp_path)
    before = (run / "log.jsonl").read_bytes()
    assert [r["step"] for r in log_of(run)] == [1, 2, 3, 4, 5, 6]
    x, y = moons()
    with monkeypatch.context() as m:
        die_writing(m, "log.jsonl")
        with pytest.raises(OSError, match="simulated"):
            train(TINY_COND, DIFF, c, (x, y), out_dir=run, progress=False)
    assert (run / "log.jsonl").read_bytes() == before
    real_replace = os.replace

    def dies_at_the_rename(src, dst, **kwargs):
        if Path(dst).name == "log.jsonl":
            raise KeyboardInterrupt("killed at the rename (simulated)")
        real_replace(src, dst, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies_at_the_rename)
        with pytest.raises(KeyboardInterrupt):
            train(TINY_COND, DIFF, c, (x, y), out_dir=run, progress=False)
    assert (run / "log.jsonl").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "log.jsonl"]
    train(TINY_COND, DIFF, c, (x, y), out_dir=run, progress=False)
    assert log_of(run) == log_of(ref)


KILLED_MID_REWRITE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import pytest, test_crash_safety, _ddp_worker
test_crash_safety.die_writing(pytest.MonkeyPatch(), "log.jsonl", kill=True)
_ddp_worker.main(json.loads(sys.argv[1]))
"""


def test_sigkill_during_the_logs_rewrite_keeps_the_old_log(tmp_path):
    """A real crash: the process kills itself (SIGKILL, no cleanup runs) half-way through writing
    the new log. The old log is intact; the temporary it left is removed by the next resume."""
    run, ref, c = run_that_died_after_its_checkpoint(tmp_path)
    before = (run / "log.jsonl").read_bytes()
    spec = {"out_dir": str(run), "model": TINY_COND, "diffusion": DIFF.to_dict(), "n": 100, "train": c.to_dict()}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_REWRITE, json.dumps(spec), str(WORKER.parent)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "log.jsonl").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith("log.jsonl.tmp-")], "the kill left no temporary?"
    train(TINY_COND, DIFF, c, moons(), out_dir=run, progress=False)
    assert log_of(run) == log_of(ref)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "log.jsonl"]


def test_the_log_is_not_rewritten_when_nothing_is_dropped(tmp_path):
    """Append-only: a resume whose log ends at the checkpoint keeps the very same file (inode)."""
    x, y = moons()
    train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path, progress=False)
    inode = (tmp_path / "log.jsonl").stat().st_ino
    train(TINY_COND, DIFF, cfg(steps=6), (x, y), out_dir=tmp_path, progress=False)
    assert (tmp_path / "log.jsonl").stat().st_ino == inode
    assert [r["step"] for r in log_of(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    """A crash mid-append leaves half a line: the resume drops it (atomically) instead of
    appending the next record onto it."""
    x, y = moons()
    train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path, progress=False)
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.9')
    train(TINY_COND, DIFF, cfg(steps=6), (x, y), out_dir=tmp_path, progress=False)
    assert [r["step"] for r in log_of(tmp_path)] == [1, 2, 3, 4, 5, 6]


# --- the log of a resumed run ------------------------------------------------------------------


def crash_during_step(monkeypatch, loop_class, step: int) -> None:
    """``loop_class`` dies (KeyboardInterrupt, like a kill) while computing the loss of ``step``."""
    real = loop_class.compute_loss

    def compute_loss(self, x0, y):
        if self.step == step - 1:
            raise KeyboardInterrupt(f"killed during step {step} (simulated)")
        return real(self, x0, y)

    monkeypatch.setattr(loop_class, "compute_loss", compute_loss)


@pytest.mark.parametrize("crash_step", [8, 9])
def test_a_resumed_runs_log_equals_the_uninterrupted_one(tmp_path, monkeypatch, crash_step):
    """checkpoint_every=3, log_every=5: the checkpoint at 6 lies inside the window of the line at
    10 (steps 6 to 10). The resumed run's log equals the uninterrupted one's value for value
    (loss, lr, grad_norm, ema_decay, the sample grids' metrics), all but the timing entries."""
    x, y = moons()
    c = cfg(steps=12, checkpoint_every=3, log_every=5, sample_every=4, num_samples=20, sample_steps=3)
    train(TINY_COND, DIFF, c, (x, y), out_dir=tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        crash_during_step(m, DenoiserLoop, crash_step)
        with pytest.raises(KeyboardInterrupt):
            train(TINY_COND, DIFF, c, (x, y), out_dir=tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run").step == 6
    train(TINY_COND, DIFF, c, (x, y), out_dir=tmp_path / "run", progress=False)
    ref = log_of(tmp_path / "ref")
    assert [r["step"] for r in ref] == [4, 5, 8, 10, 12] and "grad_norm" in ref[-1] and "samples" in ref[-1]
    assert log_of(tmp_path / "run") == ref
    assert set(TIMING_KEYS) <= strict((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1]).keys()


# --- strict JSON -------------------------------------------------------------------------------


def test_the_log_is_strict_json_with_null_for_non_finite_values(tmp_path):
    """json.dumps writes NaN and Infinity by default, which strict parsers (and jq) refuse: the
    log writes them as null, nested ones too."""

    class OddMetrics(DenoiserLoop):
        def log_entries(self, window):
            return {**super().log_entries(window), "nan": float("nan"), "inf": float("inf"),
                    "nested": {"a": [float("-inf"), 1.5]}}

    OddMetrics(TINY, DIFF, cfg(steps=2, label_dropout=0.0), moons()[0], out_dir=tmp_path, progress=False).run()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [strict(line) for line in lines]
    assert len(records) == 2
    for r in records:
        assert r["nan"] is None and r["inf"] is None and r["nested"] == {"a": [None, 1.5]} and r["loss"] > 0


# --- divergence --------------------------------------------------------------------------------


def assert_finite_checkpoint(out: Path, step: int) -> None:
    ck = load_checkpoint(out)
    assert ck.step == step
    for name, weights in (("model", ck.model), ("ema", ck.ema)):
        assert all(torch.isfinite(v).all() for v in weights.values()), f"the checkpoint's {name} weights"


@pytest.mark.parametrize("log_every", [1, 5])
def test_an_exploding_loss_stops_the_run_before_its_checkpoint(tmp_path, log_every):
    """lr = 1e12 without clipping: step 1's update throws the weights to ~1e12 and step 2's loss
    is ~5e24, still finite (step 3's is inf). The run stops at step 2, over EXPLOSION_FACTOR x
    max(1, loss of step 1): the checkpoint on disk is step 1's, finite, and the log strict JSON."""
    c = cfg(steps=20, lr=1e12, warmup_steps=0, grad_clip=None, checkpoint_every=1, log_every=log_every,
            label_dropout=0.0)
    with pytest.raises(TrainingDivergedError, match=r"the loss at step 2 is \S+e\+\d\d, over loop.EXPLOSION_FACTOR = "
                                                    r"1e\+04 x max\(1, the loss of step 1 = 0\.\d+\)"):
        train(TINY, DIFF, c, moons()[0], out_dir=tmp_path, progress=False)
    assert_finite_checkpoint(tmp_path, 1)
    logged = log_of(tmp_path) if (tmp_path / "log.jsonl").exists() else []
    assert [r["step"] for r in logged] == ([1] if log_every == 1 else [])


@dataclass(frozen=True)
class BombConfig(ModelConfig):
    kind: ClassVar[str] = "grad_bomb"
    from_call: int = 10**9


class _InfGrad(torch.autograd.Function):
    """The identity forward, an infinite (or NaN) gradient backward: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class GradBomb(nn.Module):
    """A linear eps-model whose gradient is non-finite from its ``from_call``-th forward call on."""

    def __init__(self, config: BombConfig):
        super().__init__()
        self.config, self.calls, self.lin = config, 0, nn.Linear(2, 2)

    def forward(self, x, t, y=None):
        self.calls += 1
        out = self.lin(x)
        return _InfGrad.apply(out) if self.calls >= self.config.from_call else out


@pytest.fixture
def grad_bomb(monkeypatch):
    monkeypatch.setitem(models.MODEL_KINDS, "grad_bomb", (BombConfig, GradBomb))


@pytest.mark.parametrize("grad_clip, needle", [
    (None, r"the model weights after step 4 are not finite \(a non-finite gradient since step 4\)"),
    (1.0, r"the gradient norm at step 4 is (inf|nan)"),
])
def test_a_non_finite_gradient_stops_the_run_before_its_checkpoint(tmp_path, grad_bomb, grad_clip, needle):
    """Step 4's loss is finite but its gradient is not. With grad_clip the per-step norm names
    the step; without, AdamW turns the gradient into NaN weights, caught before the checkpoint
    of step 4 is written. Either way the checkpoint on disk is step 3's, finite."""
    c = cfg(steps=10, checkpoint_every=1, log_every=100, label_dropout=0.0, grad_clip=grad_clip)
    with pytest.raises(TrainingDivergedError, match=needle):
        train({"kind": "grad_bomb", "from_call": 4}, DIFF, c, moons()[0], out_dir=tmp_path, progress=False)
    assert_finite_checkpoint(tmp_path, 3)


def test_divergence_is_checked_only_at_log_checkpoint_and_sample_points(tmp_path, monkeypatch):
    """The check syncs the device: it runs at the steps that log, checkpoint or sample, never in between."""
    checked = []
    real = TrainLoop.check_divergence

    def counting(self):
        checked.append(self.step)
        return real(self)

    monkeypatch.setattr(TrainLoop, "check_divergence", counting)
    c = cfg(steps=14, checkpoint_every=4, log_every=5, sample_every=6, num_samples=8, sample_steps=2,
            label_dropout=0.0)
    train(TINY, DIFF, c, moons()[0], out_dir=tmp_path, progress=False)
    assert checked == [4, 5, 6, 8, 10, 12, 14]
