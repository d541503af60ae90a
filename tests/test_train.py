"""The training loop: configs, LR warm-up, EMA, exact resume (in-process and after kill -9),
what a resume may change, divergence, data handling, CUDA-only switches on the CPU, and a short
real training. (Crash safety of the log and the divergence checks: ``test_crash_safety.py``.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ddpm_lib
from ddpm_lib import models
from ddpm_lib.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_config
from ddpm_lib.ema import ema_decay, ema_update, make_ema
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.train import (
    DiffusionConfig, TrainConfig, TrainingDivergedError, draw_samples, lr_at, optimizer_step, points_metrics,
    train,
)

WORKER = Path(__file__).with_name("_ddp_worker.py")
SRC = str(Path(ddpm_lib.__file__).parents[1])  # the worker imports the ddpm_lib under test
TINY = {"kind": "mlp", "hidden_dim": 16, "num_layers": 1, "time_embed_dim": 8}
TINY_COND = {**TINY, "num_classes": 2, "dropout": 0.1}  # labels, null label and global-RNG dropout
DIFF = DiffusionConfig(T=50)


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons want one fixed thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def moons(n: int = 100):
    from ddpm_lib.data import two_moons

    x, y = two_moons(n, generator=0, return_labels=True)
    return x.clamp(-1, 1), y


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=24, lr=3e-3, warmup_steps=4, ema_decay=0.99, log_every=2,
                checkpoint_every=3, label_dropout=0.25, seed=3)
    return TrainConfig(**{**base, **kw})


def tensors_of(ckpt_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    names = ("model.safetensors", "ema.safetensors", "state.safetensors")
    return {name: load_file(str(ckpt_dir / name)) for name in names}


def assert_checkpoints_equal(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), f"{name}:{key} differs"
    ja, jb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert ja == jb


# --- configs ---------------------------------------------------------------------------------


def test_config_json_round_trip():
    t = cfg(grad_clip=None, device="cpu", lr_schedule="cosine")
    d = DiffusionConfig(schedule="cosine", T=10, loss="hybrid", variance="learned_range", prediction="eps")
    assert TrainConfig.from_json(t.to_json()) == t
    assert DiffusionConfig.from_json(d.to_json()) == d
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


@pytest.mark.parametrize("cls, bad, needle", [
    (TrainConfig, {"stepz": 3}, "stepz"),
    (TrainConfig, {"steps": "10"}, "steps"),
    (TrainConfig, {"steps": 2.5}, "steps"),
    (TrainConfig, {"bf16": 1}, "bf16"),
    (TrainConfig, {"steps": True}, "steps"),
    (TrainConfig, {"lr": "1e-3"}, "lr"),
    (TrainConfig, {"label_dropout": 1.0}, "label_dropout"),
    (TrainConfig, {"lr_schedule": "step"}, "lr_schedule"),
    (DiffusionConfig, {"loss": "l2"}, "loss"),
    (DiffusionConfig, {"T": 0}, "T"),
    (DiffusionConfig, {"variance": "learned_range"}, "loss"),  # learned variance needs hybrid/vlb
    (DiffusionConfig, {"schedule": None}, "schedule"),
])
def test_config_errors_name_the_field(cls, bad, needle):
    with pytest.raises(ValueError, match=needle):
        cls.from_dict(bad)


def test_linear_schedule_end_points_are_configurable():
    """beta_start / beta_end reach ``schedules.linear_betas``; other schedules refuse them; a
    config dict written before they existed still loads (to the defaults 1e-4, 0.02)."""
    from ddpm_lib.schedules import linear_betas

    d = DiffusionConfig(T=10, beta_start=1e-3, beta_end=0.05)
    assert torch.equal(d.build().betas, linear_betas(10, 1e-3, 0.05))
    assert DiffusionConfig.from_json(d.to_json()) == d
    assert torch.equal(DiffusionConfig(T=10, beta_end=0.05).build().betas, linear_betas(10, 1e-4, 0.05))
    old = {k: v for k, v in DiffusionConfig(T=10).to_dict().items() if not k.startswith("beta_")}
    assert torch.equal(DiffusionConfig.from_dict(old).build().betas, linear_betas(10))
    with pytest.raises(ValueError, match=r"DiffusionConfig\.beta_end applies to the linear schedule only"):
        DiffusionConfig(schedule="cosine", beta_end=0.02)
    for bad, field in (({"beta_start": 0.0}, "beta_start"), ({"beta_end": "0.02"}, "beta_end"),
                       ({"beta_start": 0.1, "beta_end": 0.01}, "beta_end")):
        with pytest.raises(ValueError, match=rf"DiffusionConfig\.{field}"):
            DiffusionConfig.from_dict(bad)


def test_one_config_base_for_run_and_model_configs():
    """DiffusionConfig, TrainConfig and the model configs share one base: the same type checks,
    the same messages, the same JSON round trip."""
    from ddpm_lib.models import MLPConfig, UNetConfig
    from ddpm_lib.models.config import JSONConfig

    assert all(issubclass(c, JSONConfig) for c in (DiffusionConfig, TrainConfig, MLPConfig, UNetConfig, ProbeConfig))
    with pytest.raises(ValueError, match=r"^TrainConfig\.steps must be int, got '10'$"):
        TrainConfig(steps="10")
    with pytest.raises(ValueError, match=r"^MLPConfig\.hidden_dim must be int, got '10'$"):
        MLPConfig(hidden_dim="10")
    with pytest.raises(ValueError, match=r"^MLPConfig\.dropout must be in \[0, 1\), got 1\.5$"):
        MLPConfig(dropout=1.5)
    assert MLPConfig.from_json(MLPConfig(dropout=0).to_json()) == MLPConfig()


# --- learning rate and EMA -------------------------------------------------------------------


def test_lr_warmup_values():
    c = TrainConfig(lr=1.0, warmup_steps=4, steps=10)
    assert [lr_at(s, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = TrainConfig(lr=1.0, warmup_steps=2, steps=10, lr_schedule="cosine")
    assert lr_at(1, cos) == 1.0 and lr_at(2, cos) == 1.0 and lr_at(6, cos) == pytest.approx(0.5)
    assert lr_at(10, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, TrainConfig(lr=2.0, warmup_steps=0)) == 2.0


def test_loop_uses_the_warmup_lr(tmp_path):
    c = TrainConfig(steps=6, batch_size=8, lr=0.4, warmup_steps=4, log_every=1, checkpoint_every=0)
    train(TINY, DIFF, c, moons()[0], out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert {"loss", "lr", "steps_per_sec", "ema_decay"} <= records[0].keys()


def test_warmup_lr_reaches_the_optimiser(tmp_path):
    """Adam's first update moves every weight with a gradient by about lr: here lr_at(0) = 0.1."""
    c = TrainConfig(steps=1, batch_size=8, lr=0.4, warmup_steps=4, checkpoint_every=0, grad_clip=None)
    torch.manual_seed(c.seed)
    init = models.model_from_config(TINY).state_dict()
    after = train(TINY, DIFF, c, moons()[0], out_dir=tmp_path, progress=False).model.state_dict()
    step = max((after[k] - init[k]).abs().max().item() for k in init)
    assert step == pytest.approx(0.1, rel=1e-3)
    assert load_checkpoint(tmp_path).optimizer["param_groups"][0]["lr"] == pytest.approx(0.1)


def test_ema_decay_warmup_formula():
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.9, 10**6) == 0.9
    assert ema_decay(0.9999, 1, warmup=False) == 0.9999
    with pytest.raises(ValueError):
        ema_decay(0.9, 0)


def test_ema_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.train()(torch.randn(8, 3))  # moves the running statistics away from the EMA's
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.75)
    for name, p in model.named_parameters():
        assert torch.allclose(dict(ema.named_parameters())[name], 0.75 * before[name] + 0.25 * p)
    for name, b in model.named_buffers():
        assert torch.equal(dict(ema.named_buffers())[name], b), f"buffer {name} was averaged, not copied"


def test_ema_is_updated_once_per_optimiser_step(tmp_path):
    c = TrainConfig(steps=1, batch_size=8, lr=1e-2, ema_decay=0.999, log_every=10, checkpoint_every=0, grad_clip=None)
    x = moons()[0]
    torch.manual_seed(c.seed)
    init = models.model_from_config(TINY).state_dict()
    w1 = train(TINY, DIFF, c, x, out_dir=tmp_path / "a", progress=False).model.state_dict()
    two = train(TINY, DIFF, c.replace(steps=2), x, out_dir=tmp_path / "b", progress=False)
    d1, d2 = 2 / 11, 3 / 12  # min(0.999, (1 + n) / (10 + n)) for n = 1, 2
    for key, w2 in two.model.state_dict().items():
        expected = (d1 * init[key] + (1 - d1) * w1[key]) * d2 + (1 - d2) * w2
        assert torch.allclose(two.ema.state_dict()[key], expected, atol=1e-7), key


# --- exact resume ----------------------------------------------------------------------------


def test_resume_is_bit_exact_in_process(tmp_path):
    x, y = moons()
    k = 5  # resumes inside the warm-up and in the middle of the second pass over the data
    train(TINY_COND, DIFF, cfg(steps=2 * k, checkpoint_every=k), (x, y), out_dir=tmp_path / "once", progress=False)
    train(TINY_COND, DIFF, cfg(steps=k, checkpoint_every=k), (x, y), out_dir=tmp_path / "twice", progress=False)
    assert load_checkpoint(tmp_path / "twice").step == k
    resumed = train(TINY_COND, DIFF, cfg(steps=2 * k, checkpoint_every=k), (x, y), out_dir=tmp_path / "twice",
                    progress=False)
    assert resumed.step == 2 * k
    assert_checkpoints_equal(tmp_path / "once" / "checkpoint", tmp_path / "twice" / "checkpoint")
    # and not vacuously: a fresh run with another seed differs
    train(TINY_COND, DIFF, cfg(steps=2 * k, seed=4), (x, y), out_dir=tmp_path / "other", progress=False)
    with pytest.raises(AssertionError):
        assert_checkpoints_equal(tmp_path / "once" / "checkpoint", tmp_path / "other" / "checkpoint")


@pytest.mark.parametrize("change", [{"seed": 4}, {"batch_size": 12}, {"ema_decay": 0.9}, {"lr": 1e-3},
                                    {"label_dropout": 0.5}, {"bf16": True}, {"grad_clip": None},
                                    {"seed": 4, "weight_decay": 0.1}])
def test_resume_refuses_a_changed_train_config(tmp_path, change):
    """A changed seed, batch size, EMA decay, ... would continue the old run's random streams
    under new numbers and record the new values: refused, naming the fields, with the way out;
    the checkpoint is left as it was."""
    x, y = moons()
    train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path, progress=False)
    before = tensors_of(tmp_path / "checkpoint")
    with pytest.raises(CheckpointError) as info:
        train(TINY_COND, DIFF, cfg(steps=6, **change), (x, y), out_dir=tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'checkpoint' / 'config.json'}: the checkpoint's train config differs")
    theirs = cfg().to_dict()
    for key, value in change.items():
        assert f"{key!r}: ({theirs[key]!r}, {value!r})" in message, message
    assert "'steps'" not in message, "the total steps may change"
    assert "resume=False (or a new out_dir) starts afresh" in message and "\n" not in message
    assert load_checkpoint(tmp_path).step == 3 and all(
        torch.equal(before[f][k], v) for f, t in tensors_of(tmp_path / "checkpoint").items() for k, v in t.items())
    fresh = train(TINY_COND, DIFF, cfg(steps=6, **change), (x, y), out_dir=tmp_path, resume=False, progress=False)
    assert fresh.step == 6 and read_config(tmp_path)["train"] == cfg(steps=6, **change).to_dict()


def test_resume_accepts_the_fields_that_change_no_number(tmp_path):
    """steps and every other field of loop.RESUMABLE_FIELDS may change on resume; the result is
    the uninterrupted run's, bit for bit, and the checkpoint records the new values."""
    from ddpm_lib.loop import RESUMABLE_FIELDS

    x, y = moons()
    LabelledPoints = worker().LabelledPoints
    train(TINY_COND, DIFF, cfg(steps=8), LabelledPoints(x, y, 0.0), out_dir=tmp_path / "once", progress=False)
    train(TINY_COND, DIFF, cfg(steps=3), LabelledPoints(x, y, 0.0), out_dir=tmp_path / "twice", progress=False)
    changed = cfg(steps=8, log_every=3, checkpoint_every=5, sample_every=7, num_samples=9, sample_steps=2,
                  data_workers=2, device="cpu", compile=True, channels_last=True)
    assert {k for k, v in changed.to_dict().items() if v != cfg(steps=3).to_dict()[k]} == set(RESUMABLE_FIELDS)
    with pytest.warns(UserWarning, match="compile=True is ignored on cpu"):
        train(TINY_COND, DIFF, changed, LabelledPoints(x, y, 0.0), out_dir=tmp_path / "twice", progress=False)
    assert_checkpoints_equal(tmp_path / "once" / "checkpoint", tmp_path / "twice" / "checkpoint")
    assert read_config(tmp_path / "twice")["train"] == changed.to_dict()


def test_resume_refuses_a_checkpoint_past_the_runs_steps(tmp_path):
    x, y = moons()
    train(TINY_COND, DIFF, cfg(steps=6), (x, y), out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"the checkpoint is at step 6, past this run's steps=3; raise steps"):
        train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("key, value, needle", [
    ("data_pos", 3.5, "data_pos 3.5 is not an int in [0, 100]"),
    ("data_pos", 101, "data_pos 101 is not an int in [0, 100]"),
    ("loss_window", [0.5, "x"], "loss_window must be a list of numbers"),
    ("loss_reference", None, "loss_reference must be a finite number"),
    ("loss_window", None, "loss_window must be a list of numbers"),
])
def test_a_malformed_loop_state_is_refused(tmp_path, key, value, needle):
    """state.json's loop state (consistently edited, so the manifest passes) is validated, not
    cast: int(3.5) would silently resume at another place in the data."""
    from ddpm_lib.checkpoint import sha256_file

    x, y = moons()
    train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    state["loop"][key] = value
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": (ckpt / "state.json").stat().st_size,
                                       "sha256": sha256_file(ckpt / "state.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"state\.json: the loop state does not fit this run \(\w+: "
                                              rf"{re.escape(needle)}"):
        train(TINY_COND, DIFF, cfg(steps=6), (x, y), out_dir=tmp_path, progress=False)


def test_dataset_and_tensor_inputs_give_the_same_run(tmp_path):
    """A map-style Dataset is read through the same seeded index stream as a tensor (item by
    item, or by reader threads): the same batches, so the same run."""
    LabelledPoints = worker().LabelledPoints
    x, y = moons()
    c = cfg(steps=4, checkpoint_every=0)
    train(TINY_COND, DIFF, c, (x, y), out_dir=tmp_path / "t", progress=False)
    train(TINY_COND, DIFF, c, LabelledPoints(x, y, 0.0), out_dir=tmp_path / "d", progress=False)
    train(TINY_COND, DIFF, c.replace(data_workers=3), LabelledPoints(x, y, 0.0), out_dir=tmp_path / "w", progress=False)
    assert_checkpoints_equal(tmp_path / "t" / "checkpoint", tmp_path / "d" / "checkpoint")
    assert_checkpoints_equal(tmp_path / "t" / "checkpoint", tmp_path / "w" / "checkpoint")


@pytest.mark.parametrize("as_dataset", [False, True])
def test_labels_outside_the_classes_are_refused(tmp_path, as_dataset):
    """Label num_classes is the null label: data carrying it (or more) would silently train the
    unconditional branch, so it is refused, for tensors and for Datasets."""
    x, y = moons()
    y = y.clone()
    y[7] = 2  # TINY_COND has num_classes = 2
    data = worker().LabelledPoints(x, y, 0.0) if as_dataset else (x, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train(TINY_COND, DIFF, cfg(steps=6, batch_size=100), data, out_dir=tmp_path, progress=False)


def worker():
    """The subprocess tests' worker module, importable here too."""
    sys.path.insert(0, str(WORKER.parent))
    import _ddp_worker

    return _ddp_worker


def _spec(out_dir: Path, steps: int, sleep: float) -> dict:
    return {"out_dir": str(out_dir), "model": TINY_COND, "diffusion": DIFF.to_dict(), "n": 100, "dataset": True,
            "train": cfg(steps=steps, checkpoint_every=4, log_every=2).to_dict(), "sleep": sleep}


def _run(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_resume_after_kill_9_is_bit_exact(tmp_path):
    n_steps = 100
    victim = _run(_spec(tmp_path / "victim", n_steps, 0.002))  # ~50 ms per step: ~5 s in all
    try:
        worker().main(_spec(tmp_path / "ref", n_steps, 0.0))  # the uninterrupted run, while the victim starts
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and victim.poll() is None:
            log = tmp_path / "victim" / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= 5:  # step >= 10: two checkpoints written
                break
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    # the checkpoint the kill left loads cleanly, and is a real mid-run one
    ck = load_checkpoint(latest_checkpoint(tmp_path / "victim"))
    assert 0 < ck.step < n_steps, f"the kill came too late (step {ck.step}); slow the victim down"
    resumed = _run(_spec(tmp_path / "victim", n_steps, 0.0))
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    assert read_config(tmp_path / "victim")["step"] == n_steps
    assert_checkpoints_equal(tmp_path / "ref" / "checkpoint", tmp_path / "victim" / "checkpoint")
    # the log is trimmed to the checkpoint on resume: no duplicated steps, same losses as the reference
    strip = lambda p: [{k: v for k, v in json.loads(s).items() if k != "steps_per_sec"}  # noqa: E731
                       for s in (p / "log.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "victim") == strip(tmp_path / "ref")


# --- the caller's RNG ------------------------------------------------------------------------


def test_training_leaves_the_callers_global_rng_untouched(tmp_path, monkeypatch):
    """Initialisation and dropout (TINY_COND has dropout) use a forked global RNG seeded by
    cfg.seed: a fresh and a resumed run leave ``torch.get_rng_state()`` as it was, the run does
    not depend on the caller's state, and the loss always gets its noise explicitly."""
    from ddpm_lib.diffusion import GaussianDiffusion

    explicit, losses = [], GaussianDiffusion.training_losses

    def training_losses(self, model, x0, t, noise=None, **kwargs):
        explicit.append(noise is not None)
        return losses(self, model, x0, t, noise=noise, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    x, y = moons()
    for caller_seed, name in ((1234, "a"), (999, "b")):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        train(TINY_COND, DIFF, cfg(steps=3), (x, y), out_dir=tmp_path / name, progress=False)
        assert torch.equal(torch.get_rng_state(), before), "a fresh run changed the caller's RNG"
    assert_checkpoints_equal(tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint")
    before = torch.get_rng_state()
    assert train(TINY_COND, DIFF, cfg(steps=6), (x, y), out_dir=tmp_path / "a", progress=False).step == 6
    assert torch.equal(torch.get_rng_state(), before), "a resumed run changed the caller's RNG"
    assert explicit and all(explicit)


def test_a_loop_of_ones_own_needs_only_its_loss(tmp_path):
    """``TrainLoop`` subclassed with nothing but ``compute_loss``: steps, log, checkpoint, resume."""
    from ddpm_lib.loop import TrainLoop

    class ZeroOutput(TrainLoop):
        def compute_loss(self, x0, y):
            t, _ = self.timesteps_and_noise(x0)
            return ((self.net(x0, t) - x0) ** 2).mean()  # a denoiser-shaped autoencoder

    c = cfg(steps=4, label_dropout=0.0, checkpoint_every=2)
    ZeroOutput(TINY, DIFF, c.replace(steps=2), moons()[0], out_dir=tmp_path / "r", progress=False).run()
    resumed = ZeroOutput(TINY, DIFF, c, moons()[0], out_dir=tmp_path / "r", progress=False).run()
    ZeroOutput(TINY, DIFF, c, moons()[0], out_dir=tmp_path / "s", progress=False).run()
    log = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    assert resumed.step == 4 and [json.loads(line)["step"] for line in log] == [2, 4]
    assert_checkpoints_equal(tmp_path / "r" / "checkpoint", tmp_path / "s" / "checkpoint")


# --- divergence ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig(ModelConfig):
    kind: ClassVar[str] = "probe"
    nan_from_call: int = 10**9
    num_classes: int | None = None


class Probe(nn.Module):
    """A linear eps-model that records the labels it sees and outputs NaN from its
    ``nan_from_call``-th forward call on."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config, self.calls, self.labels, self.lin = config, 0, [], nn.Linear(2, 2)

    def forward(self, x, t, y=None):
        self.calls += 1
        if y is not None:
            self.labels.append(y.clone())
        out = self.lin(x)
        return out * float("nan") if self.calls >= self.config.nan_from_call else out


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(models.MODEL_KINDS, "probe", (ProbeConfig, Probe))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_label_dropout_feeds_the_null_label(tmp_path, probe, p):
    x, y = moons()
    result = train({"kind": "probe", "num_classes": 2}, DIFF, cfg(steps=20, label_dropout=p), (x, y),
                   out_dir=tmp_path, progress=False)
    seen = torch.cat(result.model.labels)
    null_fraction = (seen == 2).float().mean().item()  # the null label is num_classes = 2
    assert seen.numel() == 20 * 24 and set(seen.tolist()) <= {0, 1, 2}
    assert (null_fraction == 0.0) if p == 0 else (0.15 < null_fraction < 0.35), null_fraction


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, probe):
    c = cfg(steps=20, checkpoint_every=3, log_every=100, label_dropout=0.0)
    x = moons()[0]
    with pytest.raises(TrainingDivergedError, match=r"step 5 is nan"):
        train({"kind": "probe", "nan_from_call": 5}, DIFF, c, x, out_dir=tmp_path / "nan", progress=False)
    ck = load_checkpoint(tmp_path / "nan")
    assert ck.step == 3
    # it is the state after 3 good steps: the same as a run that never diverges, stopped at 3
    train({"kind": "probe"}, DIFF, c.replace(steps=3), x, out_dir=tmp_path / "ok",
          progress=False)
    ok = load_checkpoint(tmp_path / "ok")
    for key in ok.model:
        assert torch.equal(ck.model[key], ok.model[key]) and torch.equal(ck.ema[key], ok.ema[key])
    assert not (tmp_path / "nan" / "log.jsonl").exists() or "NaN" not in (tmp_path / "nan" / "log.jsonl").read_text()


# --- data, CPU fallbacks, a real run ---------------------------------------------------------


def test_data_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[-1"):
        train(TINY, DIFF, cfg(steps=1, label_dropout=0.0), moons()[0] * 3, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="label_dropout"):
        train(TINY, DIFF, cfg(steps=1), moons()[0], out_dir=tmp_path, progress=False)


def test_cuda_only_switches_are_no_ops_on_cpu(tmp_path):
    x, y = moons()
    base = cfg(steps=3, checkpoint_every=0)
    train(TINY_COND, DIFF, base, (x, y), out_dir=tmp_path / "a", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 and channels_last are silent no-ops on the CPU, by design
        train(TINY_COND, DIFF, base.replace(bf16=True, channels_last=True, device="cpu"), (x, y),
              out_dir=tmp_path / "b", progress=False)
    with pytest.warns(UserWarning, match="compile=True is ignored on cpu"):  # compile is not silent
        train(TINY_COND, DIFF, base.replace(bf16=True, channels_last=True, compile=True, device="cpu"), (x, y),
              out_dir=tmp_path / "c", progress=False)
    assert_checkpoints_equal(tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint")
    assert_checkpoints_equal(tmp_path / "a" / "checkpoint", tmp_path / "c" / "checkpoint")


def log_record(c: TrainConfig, x, out_dir: Path) -> dict:
    train(TINY, DIFF, c, x, out_dir=out_dir, progress=False)
    return json.loads((out_dir / "log.jsonl").read_text().splitlines()[-1])


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_clipping_clips_and_logs_the_norm_before_clipping(tmp_path):
    """After the last step the model keeps the gradients the optimiser used: with clipping they
    are the unclipped ones scaled to norm grad_clip, and the log's grad_norm is the norm before."""
    x = moons()[0]
    base = cfg(steps=1, label_dropout=0.0, log_every=1, checkpoint_every=0)
    free = train(TINY, DIFF, base.replace(grad_clip=1e9), x, out_dir=tmp_path / "free", progress=False)
    g = _grads(free.model)  # the first step's gradient: the same in both runs (same seed and batch)
    norm = g.norm().item()
    assert json.loads((tmp_path / "free" / "log.jsonl").read_text())["grad_norm"] == pytest.approx(norm, rel=1e-5)
    max_norm = norm / 4
    clipped = train(TINY, DIFF, base.replace(grad_clip=max_norm), x, out_dir=tmp_path / "clip", progress=False)
    gc = _grads(clipped.model)
    assert gc.norm().item() <= max_norm * (1 + 1e-6)
    torch.testing.assert_close(gc, g * (max_norm / norm), rtol=1e-5, atol=1e-9)  # same direction, shorter
    logged = json.loads((tmp_path / "clip" / "log.jsonl").read_text())["grad_norm"]
    assert logged == pytest.approx(norm, rel=1e-5) and norm > 0  # the norm BEFORE clipping
    assert "grad_norm" not in log_record(base.replace(grad_clip=None), x, tmp_path / "none")


def test_sample_grids_are_ddim_from_one_fixed_noise_and_change_no_training_number(tmp_path):
    from ddpm_lib.samplers import ddim_sample

    x = moons()[0]
    c = cfg(steps=5, sample_every=2, num_samples=40, sample_steps=5, label_dropout=0.0, checkpoint_every=0)
    result = train(TINY, DIFF, c, x, out_dir=tmp_path / "grids", progress=False)
    train(TINY, DIFF, c.replace(sample_every=0), x, out_dir=tmp_path / "none", progress=False)
    assert_checkpoints_equal(tmp_path / "grids" / "checkpoint", tmp_path / "none" / "checkpoint")
    records = [json.loads(s) for s in (tmp_path / "grids" / "log.jsonl").read_text().splitlines()]
    grids = [r for r in records if "samples" in r]
    assert [r["step"] for r in grids] == [2, 4, 5]  # every sample_every steps, and the last one
    for r in grids:
        assert (tmp_path / "grids" / r["samples"]).read_bytes()[:4] == b"\x89PNG"
        # 2-D data: the sliced Wasserstein distance to the training data beside its real-vs-real floor
        assert r["sliced_wasserstein"] > 0 and r["sliced_wasserstein_floor"] > 0
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 5]  # log_every=2, merged with the grids
    # the grid: deterministic DDIM (eta = 0) from the x_T of a generator seeded with the run's seed
    samples, labels = draw_samples(result.ema, result.diffusion, DIFF, c, (2,), None)
    x_T = torch.randn(40, 2, generator=torch.Generator().manual_seed(c.seed))
    torch.testing.assert_close(samples, ddim_sample(result.ema, result.diffusion, (40, 2), steps=5, eta=0.0, x_T=x_T))
    assert labels is None and torch.equal(samples, draw_samples(result.ema, result.diffusion, DIFF, c, (2,), None)[0])


@pytest.mark.parametrize("prediction, variance, loss", [("x0", "fixed_small", "simple"), ("v", "fixed_small", "simple"),
                                                       ("v", "learned_range", "hybrid")])
def test_sample_grids_use_ddim_with_the_models_prediction(tmp_path, prediction, variance, loss):
    """DDIM for every prediction (learned_range models: their prediction half), and the trained
    model and EMA carry the prediction, so a sampler needs not be told."""
    from ddpm_lib.samplers import ddim_sample

    dcfg = DiffusionConfig(T=50, prediction=prediction, variance=variance, loss=loss)
    model = {**TINY, "learn_sigma": variance == "learned_range"}
    c = cfg(steps=2, sample_every=2, num_samples=8, sample_steps=5, label_dropout=0.0, checkpoint_every=0)
    result = train(model, dcfg, c, moons()[0], out_dir=tmp_path, progress=False)
    assert (result.ema.prediction, result.ema.variance) == (result.model.prediction, variance) == (prediction, variance)
    samples, _ = draw_samples(result.ema, result.diffusion, dcfg, c, (2,), None)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(c.seed))
    torch.testing.assert_close(samples, ddim_sample(result.ema, result.diffusion, (8, 2), steps=5, eta=0.0,
                                                    prediction=prediction, x_T=x_T))


def test_points_metrics_separate_data_from_noise():
    from ddpm_lib.data import swiss_roll

    metrics = points_metrics(swiss_roll(4000, generator=0))
    good = metrics(swiss_roll(500, generator=1), None)
    bad = metrics(0.3 * torch.randn(500, 2, generator=torch.Generator().manual_seed(2)), None)
    assert good["sliced_wasserstein"] < 2 * good["sliced_wasserstein_floor"], good
    assert bad["sliced_wasserstein"] > 4 * bad["sliced_wasserstein_floor"], bad
    assert good["sliced_wasserstein_floor"] == bad["sliced_wasserstein_floor"]  # the floor depends on the data only


def test_short_training_on_swiss_roll_lowers_the_loss(tmp_path):
    from ddpm_lib.data import swiss_roll

    x = swiss_roll(2000, generator=0).clamp(-1, 1)
    c = TrainConfig(steps=300, batch_size=128, lr=2e-3, ema_decay=0.99, log_every=50, checkpoint_every=150,
                    sample_every=300, num_samples=256, sample_steps=20)
    model = {"kind": "mlp", "hidden_dim": 64, "num_layers": 2, "time_embed_dim": 32}
    result = train(model, DiffusionConfig(T=100), c, x, out_dir=tmp_path, progress=True)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150, 200, 250, 300]
    assert records[-1]["samples"] == "samples/step_0000300.png" and records[-1]["sliced_wasserstein"] > 0
    losses = [r["loss"] for r in records]
    assert losses[-1] < min(0.6, losses[0]), losses  # an untrained (zero-output) model scores 1.0
    assert result.step == 300 and (tmp_path / "samples" / "step_0000300.png").stat().st_size > 1000


def test_labelled_images_with_learned_variance_and_a_sample_grid(tmp_path):
    from ddpm_lib.checkpoint import load_model
    from ddpm_lib.data import load_digits_dataset
    from ddpm_lib.models import adm_like_digits8

    images = load_digits_dataset("train")  # a TensorDataset of (image [1, 8, 8], label)
    model = adm_like_digits8(model_channels=16, num_classes=10)
    diffusion = DiffusionConfig(T=20, loss="hybrid", variance="learned_range")
    c = TrainConfig(steps=2, batch_size=8, label_dropout=0.1, sample_every=2, num_samples=4, sample_steps=2)
    train(model, diffusion, c, images, out_dir=tmp_path, progress=False)
    assert (tmp_path / "samples" / "step_0000002.png").stat().st_size > 500
    net, chain = load_model(tmp_path)
    assert net.config == model and chain.T == 20


def test_optimizer_step_is_one_update_of_the_loop():
    """``optimizer_step`` against the update written out: the lr of that step, the clipped
    gradient, SGD's w - lr * g (an optimiser whose step is known exactly), then the EMA."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ema = make_ema(model)
    c = cfg(steps=10, warmup_steps=4, lr=0.5, grad_clip=0.1, ema_decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=123.0)  # overwritten by the step's lr
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    w0 = [p.detach().clone() for p in model.parameters()]
    loss = (model(x) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    step = 2
    got_norm = optimizer_step(model, ema, opt, loss, step=step, cfg=c)
    torch.testing.assert_close(got_norm, norm)
    lr = lr_at(step, c)
    assert lr == pytest.approx(0.5 * 3 / 4) and opt.param_groups[0]["lr"] == lr
    scale = min(1.0, c.grad_clip / (norm.item() + 1e-6))  # clip_grad_norm_'s factor
    decay = ema_decay(c.ema_decay, step + 1)
    for p, p_ema, w, g in zip(model.parameters(), ema.parameters(), w0, grads):
        torch.testing.assert_close(p.detach(), w - lr * scale * g)
        torch.testing.assert_close(p_ema.detach(), decay * w + (1 - decay) * p.detach())
