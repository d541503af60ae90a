"""DDP: two CPU ranks (gloo, launched by torchrun) give the single-process result on the same
global batch, to float tolerance; and the batch split itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddpm_lib
from ddpm_lib.distributed import DistInfo, mean_across_ranks, shard
from ddpm_lib.train import DiffusionConfig, TrainConfig, train

WORKER = Path(__file__).with_name("_ddp_worker.py")
# The two runs differ only in floating-point summation order (a mean over 8 examples versus
# the mean of two means over 4, and gloo's all-reduce): ~1e-7 relative per step. Observed
# after 6 AdamW steps: 6e-8 at most (weights ~0.3, lr 3e-3); a rank that used other
# examples, timesteps or noise than its slice of the global batch is off by ~1e-3.
ATOL = 1e-6


def test_shard_splits_a_global_batch_into_contiguous_slices():
    x = torch.arange(8)
    assert [shard(x, DistInfo(rank=r, world_size=2)).tolist() for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(shard(x, DistInfo()), x)
    with pytest.raises(ValueError, match="does not split"):
        shard(torch.arange(7), DistInfo(rank=0, world_size=2))
    assert torch.equal(mean_across_ranks(x.float(), DistInfo()), x.float())


@pytest.mark.parametrize("dataset", [False, True], ids=["tensors", "dataset"])
def test_two_gloo_ranks_match_one_process(tmp_path, dataset):
    """Also for a map-style Dataset read item by item: each rank fetches its slice of the same
    global index batch (no DistributedSampler), so the result is still the single-process one."""
    model = {"kind": "mlp", "hidden_dim": 16, "num_layers": 1, "time_embed_dim": 8, "num_classes": 2}
    diffusion = DiffusionConfig(T=50)
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9, label_dropout=0.25, log_every=1,
                      checkpoint_every=0, seed=5, device="cpu")
    spec = {"out_dir": str(tmp_path / "ddp"), "model": model, "diffusion": diffusion.to_dict(), "train": cfg.to_dict(),
            "n": 100, "dataset": dataset}
    src = str(Path(ddpm_lib.__file__).parents[1])  # the workers import the ddpm_lib under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sys.path.insert(0, str(WORKER.parent))
    from _ddp_worker import make_data

    train(model, diffusion, cfg, make_data(100), out_dir=tmp_path / "single", progress=False)
    worst = 0.0
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        ddp, single = (load_file(str(tmp_path / d / "checkpoint" / name)) for d in ("ddp", "single"))
        assert ddp.keys() == single.keys()
        for key in single:
            if single[key].is_floating_point():
                worst = max(worst, (ddp[key] - single[key]).abs().max().item())
            else:  # the generators' states: every rank drew exactly what the single process drew
                assert torch.equal(ddp[key], single[key]), key
    print(f"largest |DDP - single| over weights, EMA and optimiser state: {worst:.3g}")
    assert worst < ATOL
    # the logged loss is the mean over both ranks, i.e. over the global batch
    logs = [[json.loads(s)["loss"] for s in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("ddp", "single")]
    assert len(logs[0]) == 6 and logs[0] == pytest.approx(logs[1], rel=1e-5)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    src = str(Path(ddpm_lib.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=cwd)


def test_cli_under_torchrun_writes_and_prints_on_rank_0_only(tmp_path):
    out = tmp_path / "run"
    grids = ["--set", "train.sample_every=3", "train.num_samples=50", "train.sample_steps=3"]
    proc = _torchrun(["-m", "ddpm_lib", "train", "--config", "swissroll", "--dry-run", "--device", "cpu", "--out",
                      str(out), *grids], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained mlp to step 3") == 1, proc.stdout  # one rank prints
    records = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # one line per step: one rank writes the log
    assert records[-1]["samples"] == "samples/step_0000003.png" and (out / records[-1]["samples"]).is_file()
    assert json.loads((out / "run.json").read_text())["config"]["train"]["batch_size"] == 16
    # a resumed run says so once; classifier training is single-process and refuses torchrun
    proc = _torchrun(["-m", "ddpm_lib", "train", "--config", "swissroll", "--dry-run", "--device", "cpu", "--out",
                      str(out)], tmp_path)
    assert proc.returncode == 0 and proc.stdout.count("resuming from") == 1, proc.stdout + proc.stderr[-2000:]
    proc = _torchrun(["-m", "ddpm_lib", "train", "--config", "digits_features", "--dry-run", "--device", "cpu",
                      "--out", str(tmp_path / "fc")], tmp_path)
    assert proc.returncode != 0 and "classifier training runs in one process" in proc.stderr
