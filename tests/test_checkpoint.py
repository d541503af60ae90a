"""Checkpoints: atomic writes (a crash mid-save keeps the last good one), clear errors for
missing, truncated, corrupt (config.json included), foreign and mismatched checkpoints, the
step validated, permissions from the umask, no pickle, load_model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ddpm_lib.checkpoint as ckpt_mod
from ddpm_lib.checkpoint import (
    CheckpointError, latest_checkpoint, load_checkpoint, load_model, read_config, save_checkpoint,
)
from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.train import train

MODEL = {"kind": "mlp", "hidden_dim": 16, "num_layers": 1, "time_embed_dim": 8}


def fake_save(out_dir: Path, step: int) -> Path:
    """A checkpoint of a small optimiser run whose tensors all equal ``step``."""
    w = torch.nn.Parameter(torch.full((3,), float(step)))
    opt = torch.optim.AdamW([w])
    w.grad = torch.ones(3)
    opt.step()
    return save_checkpoint(out_dir, step=step, model_config=MODEL, diffusion_config=DiffusionConfig(T=10),
                           train_config=TrainConfig(), model={"w": w.detach()}, ema={"w": w.detach() * 2},
                           optimizer=opt.state_dict(), rng={"data": torch.Generator().get_state()},
                           state={"data_pos": step})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    x = torch.rand(64, 2) * 2 - 1
    train(MODEL, DiffusionConfig(T=20), TrainConfig(steps=3, batch_size=8, checkpoint_every=0), x, out_dir=out,
          progress=False)
    return out


def copy_of(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained / "checkpoint", tmp_path / "checkpoint"))


def resign(path: Path) -> None:
    """Record the files' current sizes and hashes in manifest.json: a consistent edit, to reach
    the checks behind the integrity check."""
    files = {f: {"bytes": (path / f).stat().st_size, "sha256": ckpt_mod.sha256_file(path / f)}
             for f in json.loads((path / "manifest.json").read_text())["files"]}
    (path / "manifest.json").write_text(json.dumps({"format": ckpt_mod.FORMAT, "files": files}))


def edit_config(path: Path, sign: bool = True, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    if sign:
        resign(path)


def raised(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    err = info.value
    err.problem = str(err).replace(str(Path(path)), "<ckpt>")  # the message minus the (test-named) path
    chained = err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__)
    assert not chained, "the error should not chain a library traceback"
    return err


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_and_no_pickle(tmp_path):
    path = fake_save(tmp_path, 7)
    ck = load_checkpoint(tmp_path)  # an out_dir means its latest checkpoint
    assert ck.path == path and ck.step == 7 and ck.model_config == MODEL
    assert ck.diffusion_config == DiffusionConfig(T=10) and ck.train_config == TrainConfig()
    assert torch.equal(ck.model["w"], torch.full((3,), 7.0) - 1e-3 * (1 + 0.01 * 7))  # one AdamW step
    assert ck.state == {"data_pos": 7} and set(ck.rng) == {"data"}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt.load_state_dict(ck.optimizer)
    assert ck.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    # every file is JSON or safetensors: nothing a pickle loader would accept
    for f in path.iterdir():
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            with safe_open(str(f), "pt"):
                pass


def test_load_model_rebuilds_the_ema_for_sampling(trained):
    model, diffusion = load_model(trained)
    ck = load_checkpoint(trained)
    assert type(model).__name__ == "MLPDenoiser" and not model.training and diffusion.T == 20
    assert all(torch.equal(v, ck.ema[k]) for k, v in model.state_dict().items())
    raw, _ = load_model(trained / "checkpoint", ema=False)
    assert all(torch.equal(v, ck.model[k]) for k, v in raw.state_dict().items())
    assert not torch.equal(ck.model["input.weight"], ck.ema["input.weight"])


# --- atomic writes ----------------------------------------------------------------------------


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fake_save(tmp_path, 1)
    real = ckpt_mod._write_json

    def crash(path, obj):
        if path.name == "state.json":
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        fake_save(tmp_path, 2)
    assert any(p.name.startswith("checkpoint.tmp-") for p in tmp_path.iterdir())  # the half-written one
    assert load_checkpoint(tmp_path).step == 1
    monkeypatch.setattr(ckpt_mod, "_write_json", real)
    fake_save(tmp_path, 3)
    assert load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # stale temporaries removed


def test_crash_between_the_renames_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    fake_save(tmp_path, 1)
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # checkpoint -> checkpoint.prev done, tmp -> checkpoint not yet
            raise KeyboardInterrupt("killed (simulated)")
        real(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fake_save(tmp_path, 2)
    monkeypatch.setattr(ckpt_mod.os, "replace", real)
    assert not (tmp_path / "checkpoint").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint.prev"
    assert load_checkpoint(tmp_path).step == 1
    fake_save(tmp_path, 3)  # recovers: the new one in place, the old one gone
    assert load_checkpoint(tmp_path).step == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# --- clear errors -----------------------------------------------------------------------------


def test_missing_file(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    (path / "ema.safetensors").unlink()
    err = raised(path)
    assert "ema.safetensors" in err.problem and "missing" in err.problem


def test_truncated_weights(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = raised(path)
    assert "model.safetensors" in err.problem and "truncated" in err.problem


def test_garbage_safetensors_with_a_matching_manifest(trained, tmp_path):
    """Even when manifest.json vouches for the file, a non-safetensors file is named as such."""
    path = copy_of(trained, tmp_path)
    (path / "state.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    resign(path)
    err = raised(path)
    assert "state.safetensors" in err.problem and "not a valid safetensors file" in err.problem


@pytest.mark.parametrize("content, needle", [
    ('{"_class_name": "UNet2DModel", "sample_size": 32}', "not a ddpm_lib checkpoint"),
    ("{not json", "not readable as JSON"),
    ("[1, 2]", "not a ddpm_lib checkpoint"),
])
def test_foreign_config(trained, tmp_path, content, needle):
    path = copy_of(trained, tmp_path)
    (path / "manifest.json").unlink()  # a foreign folder has no manifest: judged by config.json's content
    (path / "config.json").write_text(content)
    err = raised(path)
    assert "config.json" in err.problem and needle in err.problem


def test_wrong_format_version_and_invalid_configs(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    good = json.loads((path / "config.json").read_text())
    edit_config(path, format_version=99)
    assert "format_version 99" in raised(path).problem
    edit_config(path, format_version=1)  # the format before manifest.json covered config.json
    assert "format_version 1 is not supported (written by an older ddpm_lib" in raised(path).problem
    edit_config(path, format_version=2, train={**good["train"], "stepz": 1})
    assert "stepz" in raised(path).problem
    (path / "manifest.json").unlink()
    assert "manifest.json: missing" in raised(path).problem


@pytest.mark.parametrize("how", ["tampered", "truncated", "replaced by valid JSON"])
def test_a_changed_config_json_is_caught_by_the_manifest(trained, tmp_path, how):
    """manifest.json records config.json's size and SHA-256 like the weights': a changed step or
    config (that would otherwise load) is named, by read_config too."""
    path = copy_of(trained, tmp_path)
    text = (path / "config.json").read_text()
    if how == "tampered":  # same size, another step: only the hash can tell
        changed = text.replace('"step": 3', '"step": 2')
        assert changed != text and len(changed) == len(text)
    elif how == "truncated":
        changed = text[: len(text) // 2]
    else:
        changed = json.dumps({**json.loads(text), "step": 1})
    (path / "config.json").write_text(changed)
    err = raised(path)
    needle = "SHA-256 differs" if how == "tampered" else "truncated or replaced"
    assert err.problem.startswith("<ckpt>/config.json: ") and needle in err.problem, err.problem
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(path)


@pytest.mark.parametrize("step", [3.5, 1e9, 3.0, True, -1, "3", None, 4])
def test_the_step_is_an_int_within_the_runs_steps(trained, tmp_path, step):
    """A step that is no int (3.5 would run fractional steps; JSON's 1e9 is a float), negative, or
    past train.steps (here 3) is refused, even in a consistently edited checkpoint."""
    path = copy_of(trained, tmp_path)
    edit_config(path, step=step)
    assert f"step {step!r} is not an int in [0, train.steps = 3]" in raised(path).problem
    with pytest.raises(CheckpointError, match="is not an int"):
        read_config(path)


def test_config_and_state_must_agree_on_the_step(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    edit_config(path, step=2)
    err = raised(path)
    assert err.problem == "<ckpt>/state.json: records step 3, config.json step 2", err.problem
    assert load_checkpoint(path, training_state=False).step == 2  # sampling reads no state.json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_permissions_the_umask_asks_for(tmp_path, umask):
    """0o777 & ~umask for folders, 0o666 & ~umask for files: not the 0o700 of tempfile.mkdtemp
    nor the 0o600 of safetensors' save_file; the log's atomic rewrite too."""
    from ddpm_lib.checkpoint import write_atomic

    old = os.umask(umask)
    try:
        fake_save(tmp_path / "out", 1)
        fake_save(tmp_path / "out", 2)  # the second save swaps the folders
        write_atomic(tmp_path / "out" / "log.jsonl", "{}\n")
    finally:
        os.umask(old)
    ckpt = tmp_path / "out" / "checkpoint"
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "ema.safetensors", "manifest.json", "model.safetensors", "state.json",
                     "state.safetensors"]
    for f in [*ckpt.iterdir(), tmp_path / "out" / "log.jsonl"]:
        assert oct(f.stat().st_mode & 0o777) == oct(0o666 & ~umask), f.name


def test_not_a_checkpoint_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json" in raised(tmp_path / "empty").problem
    assert "no checkpoint" in raised(tmp_path / "nowhere").problem
    with pytest.raises(CheckpointError):
        read_config(tmp_path / "empty")


def test_resuming_with_another_model_config_is_refused(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    x = torch.rand(64, 2) * 2 - 1
    with pytest.raises(CheckpointError, match=r"config\.json.*model config differs.*hidden_dim"):
        train({**MODEL, "hidden_dim": 32}, DiffusionConfig(T=20), TrainConfig(steps=5, batch_size=8), x, out_dir=out,
              progress=False)
    with pytest.raises(CheckpointError, match=r"diffusion config differs.*'T': \(20, 30\)"):
        train(MODEL, DiffusionConfig(T=30), TrainConfig(steps=5, batch_size=8), x, out_dir=out, progress=False)
    # resume=False starts afresh in the same directory
    result = train({**MODEL, "hidden_dim": 32}, DiffusionConfig(T=20), TrainConfig(steps=1, batch_size=8), x,
                   out_dir=out, resume=False, progress=False)
    assert result.step == 1 and load_checkpoint(out).model_config["hidden_dim"] == 32


def test_load_model_returns_a_model_ready_to_sample(tmp_path):
    """A v-prediction denoiser comes back knowing its prediction and variance, and its chain is
    on the requested device (the meta device: no data, only the placement)."""
    train(MODEL, DiffusionConfig(T=20, prediction="v"), TrainConfig(steps=1, batch_size=8, checkpoint_every=0),
          torch.linspace(-1, 1, 32).reshape(16, 2), out_dir=tmp_path, progress=False)
    model, diffusion = load_model(tmp_path)
    assert (model.prediction, model.variance) == ("v", "fixed_small") and not model.training
    model, diffusion = load_model(tmp_path, device="meta")
    assert next(model.parameters()).device.type == "meta" and diffusion.betas.device.type == "meta"


def test_one_sha256_helper():
    from ddpm_lib import pretrained

    assert pretrained.sha256_file is ckpt_mod.sha256_file and not hasattr(pretrained, "_sha256")
