"""The command line: help, a dry-run train -> sample -> eval round trip, pretrained names, an
image folder, the shipped GPU configs, the console script, and error paths (one line on stderr,
exit 2 for usage and 1 at run time, never a traceback), including options that would be ignored."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_lib
from ddpm_lib import samplers
from ddpm_lib.cli import build_parser, main
from ddpm_lib.models import ddpm_cifar10
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
        grids = ["--set", "train.sample_every=2", "train.num_samples=100", "train.sample_steps=5"]
        assert main(["train", "--config", name, "--dry-run", "--out", str(root / name), *grids]) == 0
    return root


def test_dry_run_writes_a_resumable_checkpoint(dry_runs, capsys):
    for name in ("swissroll", "digits"):
        assert (dry_runs / name / "checkpoint" / "config.json").is_file()
        info = json.loads((dry_runs / name / "run.json").read_text())
        assert info["config"]["train"]["steps"] == 3 and "ddpm train --config" in info["command"]
    code, out, _ = run_main(capsys, "train", "--config", "swissroll", "--dry-run", "--out", str(dry_runs / "swissroll"))
    assert code == 0 and "resuming from" in out and "step 3" in out


def test_training_logs_sample_grids_and_their_metrics(dry_runs):
    for name, metrics in (("swissroll", {"sliced_wasserstein", "sliced_wasserstein_floor"}),
                          ("digits", {"frechet_distance", "frechet_distance_floor", "kid", "kid_floor"})):
        records = [json.loads(line) for line in (dry_runs / name / "log.jsonl").read_text().splitlines()]
        grids = [r for r in records if "samples" in r]
        assert [r["step"] for r in grids] == [2, 3], name  # sample_every=2, and the last step
        for r in grids:
            assert (dry_runs / name / r["samples"]).stat().st_size > 1000
            assert metrics <= r.keys() and all(r[m] is not None and r[m] > -1 for m in metrics), r
    # a barely trained model is far from the data: the metric sits well above its real-vs-real floor
    last = [json.loads(line) for line in (dry_runs / "swissroll" / "log.jsonl").read_text().splitlines()][-1]
    assert last["sliced_wasserstein"] > 2 * last["sliced_wasserstein_floor"], last


def test_shipped_denoiser_configs_sample_and_the_gpu_ones_use_bf16():
    for name in preset_names():
        run = load_run_config(name)
        if run.kind in ("unet", "mlp"):
            assert 0 < run.train.sample_every <= run.train.steps // 3, f"{name}: grids during training"
        gpu = name in ("shapes", "cifar10")
        assert run.train.bf16 == run.train.channels_last == gpu, name
    cifar = load_run_config("cifar10")
    assert cifar.model == ddpm_cifar10() and cifar.data.name == "cifar10"  # the 35.7M network (test_models)
    assert cifar.data.download is False  # offline by default: --set data.download=true fetches it


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
    # eval of a run directory appends its results, at the checkpoint's step, to the run's log.jsonl
    assert f"appended to {dry_runs / 'digits' / 'log.jsonl'}" in out
    last = json.loads((dry_runs / "digits" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["eval"]["frechet_distance"] == metrics["frechet_distance"]["value"]
    assert last["eval_reference"]["kid"] == metrics["kid"]["reference"] and last["n"] == 40
    swiss = [json.loads(s) for s in (dry_runs / "swissroll" / "log.jsonl").read_text().splitlines()]
    assert any("sliced_wasserstein" in r.get("eval", {}) for r in swiss)


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


# options that would have no effect are refused: (argv, text of the one error line)
IGNORED_OPTIONS = {
    "w without cfg": (["sample", "--checkpoint", "digits_cond", "--w", "2"], "add --guidance cfg"),
    "cfg without w": (["sample", "--checkpoint", "digits_cond", "--guidance", "cfg"], "needs --w"),
    "scale without classifier": (["sample", "--checkpoint", "digits", "--scale", "2"], "add --classifier"),
    "eta with ddpm": (["sample", "--checkpoint", "swissroll", "--eta", "0.5"], "--eta only applies to --sampler ddim"),
    "eta with dpm++": (["sample", "--checkpoint", "swissroll", "--sampler", "dpm++", "--eta", "1"], "--sampler dpm++"),
    "eval eta with ddpm": (["eval", "--checkpoint", "swissroll", "--eta", "1"], "--eta only applies"),
    "eval 2-D metric fd": (["eval", "--checkpoint", "swissroll", "--metrics", "sw,fd"], "['fd'] do not apply"),
    "eval acc unconditional": (["eval", "--checkpoint", "digits", "--metrics", "acc"], "['acc'] do not apply"),
    "eval nll-batches 2-D": (["eval", "--checkpoint", "swissroll", "--nll-batches", "2"], "--nll-batches"),
    "eval nll-batches no bpd": (["eval", "--checkpoint", "digits", "--metrics", "fd", "--nll-batches", "2"],
                                "--nll-batches"),
    "eval classifier n": (["eval", "--checkpoint", "digits_features", "--n", "10"], "--n do(es) not apply"),
    "eval classifier sampler": (["eval", "--checkpoint", "digits_noisy_classifier", "--sampler", "ddim", "--steps", "5"],
                                "--sampler, --steps do(es) not apply to a noisy_classifier"),
    "eval classifier w": (["eval", "--checkpoint", "digits_features", "--w", "1"], "--w do(es) not apply"),
    "eval feature classifier seed": (["eval", "--checkpoint", "digits_features", "--seed", "3"], "--seed"),
    "eval classifier spacing": (["eval", "--checkpoint", "digits_features", "--spacing", "leading"],
                                "--spacing do(es) not apply"),
}


@pytest.mark.parametrize("case", sorted(IGNORED_OPTIONS))
def test_options_that_would_be_ignored_are_errors(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were a check to fail, sample would write samples.png here
    argv, text = IGNORED_OPTIONS[case]
    code, out, err = run_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddpm: error: "), (code, err)
    assert text in lines[0], lines[0]
    assert out == ""  # refused before any work


@pytest.mark.parametrize("cuda", [True, False])
def test_sample_and_eval_default_to_cuda_when_available(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for command in ("sample", "eval"):
        args = build_parser().parse_args([command, "--checkpoint", "swissroll"])
        assert args.device == ("cuda" if cuda else "cpu"), command
        assert build_parser().parse_args([command, "--checkpoint", "swissroll", "--device", "cpu"]).device == "cpu"


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_checkpoints_sample_with_every_sampler(prediction, tmp_path, capsys, monkeypatch):
    run = tmp_path / prediction
    code, _, err = run_main(capsys, "train", "--config", "swissroll", "--dry-run", "--out", str(run),
                            "--set", f"diffusion.prediction={prediction}", "train.sample_every=0")
    assert code == 0, err
    spacings = []
    original = samplers.ddim_sample

    def ddim_spy(*args, **kw):  # the real sampler, its options recorded
        spacings.append((kw["spacing"], kw["prediction"]))
        return original(*args, **kw)

    monkeypatch.setattr(samplers, "ddim_sample", ddim_spy)
    for sampler in ("ddim", "dpm++", "ddpm"):
        png = tmp_path / f"{sampler}.png"
        code, _, err = run_main(capsys, "sample", "--checkpoint", str(run), "--n", "16", "--sampler", sampler,
                                "--steps", "4", "--spacing", "leading", "--device", "cpu", "--out", str(png))
        assert code == 0, f"{sampler}: {err}"
        x = np.load(png.with_suffix(".npz"))["samples"]
        assert x.shape == (16, 2) and np.isfinite(x).all(), sampler
    assert spacings == [("leading", prediction)]
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(run), "--n", "50", "--sampler", "dpm++",
                              "--steps", "4", "--metrics", "sw", "--device", "cpu")
    assert code == 0 and "sliced_wasserstein" in out and "4 trailing steps" in out, err


def _image_folder(root: Path, n: int = 12) -> Path:
    """n small RGB PNGs in two class folders (red-ish "a", blue-ish "b") of varied sizes."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)
        pixels[..., 0 if i % 2 else 2] = 230
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_train_on_an_image_folder_through_the_cli(tmp_path, capsys):
    root, out = _image_folder(tmp_path / "photos"), tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "--config", "shapes", "--dry-run", "--out", str(out), "--set",
                                 "data.name=image_folder", f"data.root={root}", "data.image_size=8", "model.image_size=8",
                                 "train.sample_every=3", "train.num_samples=6", "train.sample_steps=3")
    assert code == 0, err
    assert "trained unet to step 3" in stdout
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"]["name"] == "image_folder" and run["config"]["data"]["root"] == str(root)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["samples"] == "samples/step_0000003.png"
    assert (out / "samples" / "step_0000003.png").stat().st_size > 500
    code, stdout, err = run_main(capsys, "sample", "--checkpoint", str(out), "--n", "4", "--steps", "3", "--label", "1",
                                 "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (4, 3, 8, 8)
    # the data and the model must agree on the image size; an image folder has no test split to evaluate on
    code, _, err = run_main(capsys, "train", "--config", "shapes", "--dry-run", "--out", str(tmp_path / "bad"), "--set",
                            "data.name=image_folder", f"data.root={root}", "data.image_size=8")
    assert code == 2 and "expects [C, H, W] = [3, 32, 32] but data 'image_folder' gives [3, 8, 8]" in err
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(out), "--n", "4")
    assert code == 1 and "none of the metrics" in err
    code, _, err = run_main(capsys, "train", "--config", "shapes", "--set", "data.name=image_folder")
    assert code == 2 and "DataConfig.root must name the folder" in err


def test_ddpm_console_script_runs():
    try:
        importlib.metadata.distribution("ddpm_lib")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ddpm_lib is not installed (pip install -e .), so there is no console script")
    folders = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    script = next((found for d in folders if (found := shutil.which("ddpm", path=str(d)))), None)
    assert script is not None, f"no 'ddpm' script next to {sys.executable} or in {folders[1]}"
    res = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ddpm train --config swissroll --out runs/swissroll" in res.stdout


# --- the run record, the out folder, the device, non-finite numbers, sample's files and weights ----


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished swissroll dry run (no sample grids), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--config", "swissroll", "--dry-run", "--out", str(out), "--set", "train.sample_every=0"]) == 0
    return out


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), err
    return lines[0]


def _train_sample_eval(run: Path, tmp_path: Path) -> dict[str, list[str]]:
    """The three commands on the run folder ``run`` (train resumes it: its steps are reached)."""
    return {"train": ["train", "--config", "swissroll", "--dry-run", "--out", str(run), "--set", "train.sample_every=0"],
            "sample": ["sample", "--checkpoint", str(run), "--n", "8", "--steps", "2", "--out", str(tmp_path / "s.png")],
            "eval": ["eval", "--checkpoint", str(run), "--n", "50", "--steps", "2", "--metrics", "sw"]}


def test_run_json_survives_a_crash_during_its_final_write(tiny_run, tmp_path, capsys, monkeypatch):
    """The crash: the end-of-run rewrite of run.json stops half-way (disk full, SIGKILL). The old
    record must still be whole, so that train, sample and eval go on working."""
    from test_crash_safety import die_writing  # the simulated crash of the training log's tests

    run = _copy_run(tiny_run, tmp_path)
    before = json.loads((run / "run.json").read_text())
    die_writing(monkeypatch, "run.json")
    code, _, err = run_main(capsys, *_train_sample_eval(run, tmp_path)["train"])  # resumes, then rewrites run.json
    assert code == 1 and "(simulated)" in _one_error_line(err)
    monkeypatch.undo()
    assert json.loads((run / "run.json").read_text()) == before  # the old record, whole
    assert [p.name for p in run.iterdir() if p.name.startswith("run.json")] == ["run.json"]  # no temporary left
    for name, argv in _train_sample_eval(run, tmp_path).items():
        code, _, err = run_main(capsys, *argv)
        assert code == 0, f"{name}: {err}"


@pytest.mark.parametrize("content", ["", '{"preset": "swissroll", "comm', "not json", '{"name": "other tool"}',
                                     "[1, 2]", '{"config": {"train": {}}}', '{"config": {"data": {"name": 3}}}'])
def test_a_damaged_run_json_is_one_line_naming_it_and_the_way_out(content, tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    (run / "run.json").write_text(content)
    for name, argv in _train_sample_eval(run, tmp_path).items():
        code, _, err = run_main(capsys, *argv)
        line = _one_error_line(err)
        assert code == 1, f"{name}: {line}"
        assert f"{run / 'run.json'} is damaged" in line and "delete or fix it" in line, f"{name}: {line}"
        assert f"{run / 'checkpoint'}" in line, f"{name}: {line}"  # where the intact checkpoint is
    assert (run / "run.json").read_text() == content  # left for the user to inspect


def test_wall_time_adds_up_over_segments_even_an_interrupted_one(tmp_path, capsys, monkeypatch):
    import itertools
    import types

    from ddpm_lib import cli
    from ddpm_lib import train as train_module

    clock = itertools.count(0.0, 50.0)  # each reading 50 s after the last: a segment takes 50 s
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    real_train, out = train_module.train, tmp_path / "run"

    def interrupted(*args, **kwargs):  # trains (and checkpoints), then Ctrl-C
        real_train(*args, **kwargs)
        raise KeyboardInterrupt

    argv = ["train", "--config", "swissroll", "--dry-run", "--out", str(out), "--set", "train.sample_every=0"]
    monkeypatch.setattr(train_module, "train", interrupted)
    assert run_main(capsys, *argv)[0] == 130
    assert json.loads((out / "run.json").read_text())["wall_time_s"] == 50.0
    monkeypatch.setattr(train_module, "train", real_train)
    for steps, total in ((5, 100.0), (7, 150.0)):
        code, stdout, err = run_main(capsys, *argv, f"train.steps={steps}")
        assert code == 0, err
        assert json.loads((out / "run.json").read_text())["wall_time_s"] == total
        assert f"in 50.0 s ({total:.1f} s in all)" in stdout


def test_train_refuses_an_out_folder_that_is_not_a_run(tiny_run, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "log.jsonl").write_text('{"their": "log"}\n')
    (theirs / "notes.txt").write_text("keep me")
    argv = ["train", "--config", "swissroll", "--dry-run", "--set", "train.sample_every=0", "--out"]
    code, _, err = run_main(capsys, *argv, str(theirs))
    assert code == 1 and "holds files (log.jsonl, notes.txt) but no ddpm run" in _one_error_line(err)
    assert sorted(p.name for p in theirs.iterdir()) == ["log.jsonl", "notes.txt"]
    assert (theirs / "log.jsonl").read_text() == '{"their": "log"}\n'
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = run_main(capsys, *argv, str(a_file))
    assert code == 1 and "is a file" in _one_error_line(err)
    # fine: an empty folder (a temporary of a crashed run.json write aside), and an earlier run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json.tmp-0123abcd").write_text('{"pre')
    assert run_main(capsys, *argv, str(empty))[0] == 0
    assert not list(empty.glob("run.json.tmp-*"))
    assert run_main(capsys, *argv, str(_copy_run(tiny_run, tmp_path)))[0] == 0


def test_an_unavailable_device_is_refused_before_anything_is_written(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, also on a GPU one
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new"
    cases = {"train --device": ["train", "--config", "swissroll", "--dry-run", "--out", str(out), "--device", "cuda"],
             "train --set": ["train", "--config", "swissroll", "--dry-run", "--out", str(out), "--set",
                             "train.device=cuda"],
             "sample": ["sample", "--checkpoint", str(tiny_run), "--device", "cuda"],
             "eval": ["eval", "--checkpoint", str(tiny_run), "--device", "cuda:0"]}
    for name, argv in cases.items():
        code, stdout, err = run_main(capsys, *argv)
        line = _one_error_line(err)
        assert code == 1 and "CUDA is not available on this machine; use --device cpu" in line, f"{name}: {line}"
        assert stdout == "" and not out.exists() and list(tmp_path.iterdir()) == [], name
    code, _, err = run_main(capsys, "sample", "--checkpoint", str(tiny_run), "--device", "gpu")
    assert code == 2 and "--device gpu: not a torch device" in _one_error_line(err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: cuda:3 is not there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(tiny_run), "--device", "cuda:3")
    assert code == 1 and "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


NON_FINITE = {
    "eta nan": ["sample", "--checkpoint", "swissroll", "--sampler", "ddim", "--eta", "nan"],
    "w inf": ["sample", "--checkpoint", "digits_cond", "--guidance", "cfg", "--w", "inf"],
    "scale -inf": ["sample", "--checkpoint", "digits", "--classifier", "digits_noisy_classifier", "--scale=-inf"],
    "eval w nan": ["eval", "--checkpoint", "digits_cond", "--w", "NaN"],
    "lr nan": ["train", "--config", "swissroll", "--dry-run", "--set", "train.lr=NaN"],
    "lr inf": ["train", "--config", "swissroll", "--dry-run", "--set", "train.lr=Infinity"],
    "lr overflow": ["train", "--config", "swissroll", "--dry-run", "--set", "train.lr=1e999"],
    "weight decay inf": ["train", "--config", "swissroll", "--dry-run", "--set", "train.weight_decay=Infinity"],
    "grad clip inf": ["train", "--config", "swissroll", "--dry-run", "--set", "train.grad_clip=Infinity"],
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_nan_and_inf_options_are_refused_up_front(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = NON_FINITE[case] + (["--out", str(tmp_path / "run")] if NON_FINITE[case][0] == "train" else [])
    code, stdout, err = run_main(capsys, *argv)
    line = _one_error_line(err)
    assert code == 2 and "finite" in line and "TypeError" not in line, line
    assert stdout == "" and list(tmp_path.iterdir()) == []  # refused before any work


def test_sample_writes_exactly_the_files_it_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    sample = ["sample", "--checkpoint", "swissroll", "--n", "8", "--steps", "2"]
    for options, text in (((["--out", str(folder)]), f"--out {folder} is a folder"),
                          ((["--out", "plot"]), "--out plot: the file name must end in .png"),
                          ((["--npz", "x.png"]), "--npz x.png: the file name must end in .npz"),
                          ((["--out", "a.png", "--npz", str(folder)]), f"--npz {folder} is a folder")):
        code, stdout, err = run_main(capsys, *sample, *options)
        assert code == 2 and text in _one_error_line(err) and stdout == "", options
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not list(folder.iterdir())
    code, stdout, err = run_main(capsys, *sample, "--out", "a/b.png", "--npz", "c/d.npz")
    assert code == 0, err
    assert stdout.startswith(f"wrote {Path('a/b.png')} and {Path('c/d.npz')} (8 samples")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")) == ["a/b.png", "c/d.npz"]
    code, stdout, err = run_main(capsys, *sample, "--out", "e.PNG")
    assert code == 0 and stdout.startswith("wrote e.PNG and e.npz"), err


def _rewrite_ema(run: Path, change) -> None:
    """Give the checkpoint of ``run`` new EMA weights (``change(name, tensor)``), through
    save_checkpoint, so that the checkpoint's manifest stays valid: only the weights are wrong."""
    from ddpm_lib.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run)
    save_checkpoint(run, step=ck.step, model_config=ck.model_config, diffusion_config=ck.diffusion_config,
                    train_config=ck.train_config, model=ck.model, ema={k: change(k, v) for k, v in ck.ema.items()},
                    optimizer=ck.optimizer, rng=ck.rng, state=ck.state)


def test_sample_and_eval_refuse_non_finite_weights_and_samples(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nan_run = _copy_run(tiny_run, tmp_path / "nan")
    _rewrite_ema(nan_run, lambda name, v: torch.full_like(v, float("nan")) if name == "layers.0.weight" else v)
    commands = _train_sample_eval(nan_run, tmp_path)
    for name in ("sample", "eval"):
        code, stdout, err = run_main(capsys, *commands[name])
        line = _one_error_line(err)
        assert code == 1 and f"{nan_run / 'checkpoint' / 'ema.safetensors'}: 1 weight tensor(s) hold NaN or inf " \
                              "(e.g. layers.0.weight)" in line, f"{name}: {line}"
        assert stdout == "" and not (tmp_path / "s.png").exists(), name
    # finite weights whose output overflows: the sampler's own check, one line naming the model
    huge_run = _copy_run(tiny_run, tmp_path / "huge")
    _rewrite_ema(huge_run, lambda name, v: torch.full_like(v, 3e38) if name == "output.bias" else v)
    for name in ("sample", "eval"):
        code, stdout, err = run_main(capsys, *_train_sample_eval(huge_run, tmp_path)[name])
        line = _one_error_line(err)
        assert code == 1 and line.startswith(f"ddpm: error: {huge_run}: ") and "non-finite" in line, f"{name}: {line}"
        assert not (tmp_path / "s.png").exists(), name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_ships_a_run_that_loads_back(dry_runs, tmp_path, dtype):
    from safetensors.torch import load_file

    from ddpm_lib import pretrained
    from ddpm_lib.checkpoint import load_model

    entry = pretrained.export(dry_runs / "digits", "tiny", root=tmp_path, dtype=dtype)
    assert entry["dtype"] == dtype and pretrained.available(root=tmp_path) == ["tiny"]
    stored = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {getattr(torch, dtype)}
    model, diffusion = pretrained.load("tiny", root=tmp_path)
    reference, _ = load_model(dry_runs / "digits" / "checkpoint")
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    with torch.no_grad():
        diff = (model(x, t) - reference(x, t)).abs().max().item()
    # fp32 is a copy; fp16 rounds each weight to 11 significant bits
    assert diff == 0.0 if dtype == "float32" else 0.0 < diff < 1e-2
    with pytest.raises(ValueError, match="dtype"):
        pretrained.export(dry_runs / "digits", "tiny", root=tmp_path, dtype="int8")
