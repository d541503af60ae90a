"""The command line: help, a dry-run train -> sample -> eval round trip, pretrained names, and
error paths (one line on stderr, exit 2 for usage and 1 at run time, never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ddpm_lib
from ddpm_lib.cli import main
from ddpm_lib.presets import apply_overrides, load_run_config, preset_names

SRC = str(Path(ddpm_lib.__file__).parents[1])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["eval"]])
def test_help_lists_every_shipped_config(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if not command:
        assert all(f"{{train,sample,eval}}" in out for c in ("train", "sample", "eval"))
    for name in preset_names():
        assert f"ddpm train --config {name} --out runs/{name}" in out


def test_shipped_configs_parse_and_overrides_are_typed():
    assert {"swissroll", "digits", "digits_cond", "shapes", "digits_noisy_classifier", "digits_features",
            "shapes_features"} <= set(preset_names())
    for name in preset_names():
        load_run_config(name)
    run = apply_overrides(load_run_config("digits"), ["train.steps=7", "model.channel_mult=1,2", "train.grad_clip=none"])
    assert (run.train.steps, run.model.channel_mult, run.train.grad_clip) == (7, (1, 2), None)
    assert load_run_config("digits_cond").train.label_dropout >= 0.1
    for bad in ("train.steps=1.5", "train.stepz=3", "steps=3", "model.dropout=high"):
        with pytest.raises(ValueError):
            apply_overrides(run, [bad])


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Dry-run trainings of swissroll and digits (a few steps, tiny models) in a tmp dir."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("swissroll", "digits"):
        assert main(["train", "--config", name, "--dry-run", "--out", str(root / name)]) == 0
    return root


def test_dry_run_writes_a_resumable_checkpoint(dry_runs, capsys):
    for name in ("swissroll", "digits"):
        assert (dry_runs / name / "checkpoint" / "config.json").is_file()
        info = json.loads((dry_runs / name / "run.json").read_text())
        assert info["config"]["train"]["steps"] == 3 and "ddpm train --config" in info["command"]
    code, out, _ = run_main(capsys, "train", "--config", "swissroll", "--dry-run", "--out", str(dry_runs / "swissroll"))
    assert code == 0 and "resuming from" in out and "step 3" in out


def test_sample_and_eval_from_a_dry_run(dry_runs, tmp_path, capsys):
    code, out, _ = run_main(capsys, "sample", "--checkpoint", str(dry_runs / "swissroll"), "--n", "50",
                            "--sampler", "ddim", "--steps", "5", "--out", str(tmp_path / "s.png"))
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (50, 2)
    code, out, _ = run_main(capsys, "eval", "--checkpoint", str(dry_runs / "swissroll"), "--n", "100", "--steps", "5")
    assert code == 0 and "sliced_wasserstein" in out and "energy_distance" in out
    code, out, _ = run_main(capsys, "eval", "--checkpoint", str(dry_runs / "digits"), "--n", "40", "--steps", "5",
                            "--metrics", "fd,kid,mem", "--json", str(tmp_path / "e.json"))
    assert code == 0 and "frechet_distance" in out
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert set(metrics) == {"frechet_distance", "kid", "memorization_median_ratio", "memorized_fraction"}


def test_sample_from_pretrained_names(tmp_path, capsys):
    png, npz = tmp_path / "c.png", tmp_path / "c.npz"
    code, out, _ = run_main(capsys, "sample", "--checkpoint", "digits_cond", "--n", "12", "--steps", "10",
                            "--guidance", "cfg", "--w", "1.5", "--label", "3", "--out", str(png), "--npz", str(npz))
    assert code == 0 and png.stat().st_size > 0
    arrays = np.load(npz)
    assert arrays["samples"].shape == (12, 1, 8, 8) and arrays["labels"].tolist() == [3] * 12
    code, _, _ = run_main(capsys, "sample", "--checkpoint", "digits", "--n", "10", "--steps", "10",
                          "--classifier", "digits_noisy_classifier", "--scale", "1", "--out", str(tmp_path / "g.png"))
    arrays = np.load(tmp_path / "g.npz")
    assert code == 0 and arrays["samples"].shape == (10, 1, 8, 8) and arrays["labels"].tolist() == list(range(10))


def test_eval_pretrained_swissroll_prints_sw_and_floor(capsys):
    code, out, _ = run_main(capsys, "eval", "--checkpoint", "swissroll", "--n", "500", "--sampler", "ddim",
                            "--steps", "20", "--metrics", "sw")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("sliced_wasserstein")).split()
    value, floor = float(row[1]), float(row[2])
    assert 0 < floor < value < 10 * floor


def test_errors_are_one_line_without_traceback(dry_runs, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint").mkdir()
    for f in (dry_runs / "swissroll" / "checkpoint").iterdir():
        (corrupt / "checkpoint" / f.name).write_bytes(f.read_bytes())
    ema = corrupt / "checkpoint" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-5] ^= 0xFF
    ema.write_bytes(bytes(data))
    cases = {  # name: (argv, exit status, text expected in the message)
        "unknown config": (["train", "--config", "nope"], 2, "unknown config 'nope'"),
        "bad override": (["train", "--config", "digits", "--dry-run", "--set", "train.steps=many"], 2, "train.steps"),
        "malformed override": (["train", "--config", "digits", "--set", "steps"], 2, "SECTION.FIELD=VALUE"),
        "missing checkpoint": (["sample", "--checkpoint", str(tmp_path / "none"), "--n", "2"], 1, "no checkpoint"),
        "corrupt checkpoint": (["sample", "--checkpoint", str(corrupt), "--n", "2"], 1, "ema.safetensors"),
        "incompatible checkpoint": (["train", "--config", "swissroll", "--dry-run", "--out", str(dry_runs / "swissroll"),
                                     "--set", "model.hidden_dim=48"], 1, "differs"),
        "unknown sampler": (["sample", "--checkpoint", "swissroll", "--sampler", "euler"], 2, "invalid choice"),
        "no command": ([], 2, "required"),
    }
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("DDPM_DEBUG", None)
    procs = {name: subprocess.Popen([sys.executable, "-m", "ddpm_lib", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for name, (argv, _, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        argv, status, text = cases[name]
        lines = err.strip().splitlines()
        assert proc.returncode == status, f"{name}: exit {proc.returncode}, stderr {err!r}"
        assert "Traceback" not in err, f"{name}: traceback on stderr:\n{err}"
        assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), f"{name}: not one error line: {err!r}"
        assert text in lines[0], f"{name}: {text!r} not in {lines[0]!r}"
