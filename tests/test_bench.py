"""The benchmarks (``python -m ddpm_lib.bench``) time what they say they time.

Speed is printed, never asserted (timing is noisy on a shared machine). What is asserted: the
figures are computed from the work actually done (steps, images, network calls counted as they
happen), the diffusers twin has the digits U-Net's size, and the printed numbers agree with
each other.
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from ddpm_lib import bench
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.models import count_parameters, model_from_config
from ddpm_lib.schedules import sampling_timesteps

TINY_UNET = {"kind": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1, 2],
             "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread, restored after


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_lib.bench", *args], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", **os.environ})


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_bench_prints_consistent_throughput_and_memory():
    out = run_bench("--device", "cpu", "--model", "digits8", "--batch", "2", "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert "digits8 U-Net, 1,001,729 parameters" in out.stdout
    m = re.search(r"images/s: ([0-9.]+) \((\d+) timed steps in ([0-9.]+) s; ([0-9.]+) steps/s\)", out.stdout)
    assert m, out.stdout
    images_per_s, timed, seconds, steps_per_s = float(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert timed == 2  # 3 steps, 1 of them warm-up
    # images/s is timed steps x batch over the timed seconds, and batch x steps/s, to the rounding of
    # the print (images/s to 0.1, seconds and steps/s to 0.01)
    assert images_per_s == pytest.approx(timed * 2 / seconds, rel=0.005 / seconds + 0.05 / images_per_s + 1e-6)
    assert images_per_s == pytest.approx(2 * steps_per_s, abs=0.05 + 2 * 0.005 + 1e-9)
    assert float(re.search(r"peak memory: ([0-9.]+) GiB", out.stdout)[1]) > 0.01


def test_bench_rejects_bad_warmup():
    out = run_bench("--device", "cpu", "--model", "digits8", "--steps", "3", "--warmup", "3")
    assert out.returncode == 2
    assert "need 1 <= --warmup < --steps" in out.stderr


def test_interleaved_medians_alternates_and_sums():
    order: list[str] = []

    def block(name, steps, images):
        def run():
            order.append(name)
            return steps, images
        return run

    out = bench.interleaved_medians({"A": block("A", 2, 8), "B": block("B", 3, 9)}, repeats=4, warmup=1)
    assert order == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert (out["A"]["steps"], out["A"]["images"], out["B"]["steps"], out["B"]["images"]) == (8, 32, 12, 36)
    assert len(out["A"]["times_s"]) == len(out["B"]["times_s"]) == 4
    assert out["A"]["median_s"] == pytest.approx(sum(sorted(out["A"]["times_s"])[1:3]) / 2)


needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (pip install ddpm_lib[interop])")


@needs_diffusers
def test_compare_training_counts_the_work_and_matches_sizes():
    res = bench.compare_training(batch=3, steps=2, repeats=3, warmup=0)
    assert res["params"]["ddpm_lib"] == 1_001_729
    assert abs(res["params"]["diffusers"] / res["params"]["ddpm_lib"] - 1) <= 0.05
    assert res["diffusers_config"]["block_out_channels"] == (32, 64)
    assert res["timed_steps"] == {"ddpm_lib": 6, "diffusers": 6}
    assert res["images"] == {"ddpm_lib": 18, "diffusers": 18}
    for name in ("ddpm_lib", "diffusers"):
        median = sorted(res["times_s"][name])[1]
        assert res["images_per_s"][name] == pytest.approx(3 * 2 / median)
    # the ratio pairs the blocks that ran back to back
    pairs = sorted(d / o for o, d in zip(res["times_s"]["ddpm_lib"], res["times_s"]["diffusers"]))
    assert res["ratio"] == pytest.approx(pairs[1])
    lo, hi = res["ratio_iqr"]
    assert pairs[0] <= lo <= res["ratio"] <= hi <= pairs[2]


@needs_diffusers
def test_matching_diffusers_unet_searches_when_the_mirror_is_off():
    # AdaGN (use_scale_shift_norm) doubles every block's embedding projection: the mirror-image
    # diffusers config (which has no AdaGN) is then ~25% smaller, so the width search must run
    ours = model_from_config({**TINY_UNET, "model_channels": 32, "use_scale_shift_norm": True})
    target = count_parameters(ours)
    mirror = bench._diffusers_unet_config(ours.config, 32, 1)
    import diffusers

    assert abs(count_parameters(diffusers.UNet2DModel(**mirror)) / target - 1) > 0.05
    net, conf = bench.matching_diffusers_unet(ours)
    assert abs(count_parameters(net) / target - 1) <= 0.05
    assert conf != mirror
    with pytest.raises(ValueError, match="no diffusers UNet2DModel within"):
        bench.matching_diffusers_unet(ours, tolerance=1e-9)


def test_training_losses_overhead_runs_both_steps_equally():
    model = model_from_config(TINY_UNET)
    calls = count_forwards(model)
    res = bench.training_losses_overhead(model, GaussianDiffusion.from_name("linear", 100), batch=5, steps=2,
                                         repeats=3, warmup=1)
    # (1 warm-up + 3 timed) blocks x 2 steps, for each of the two kinds, each step one forward of 5 images
    assert calls == [5] * (4 * 2 * 2)
    assert res["timed_steps"] == {"bare": 6, "training_losses": 6}
    assert res["images"] == {"bare": 30, "training_losses": 30}
    pairs = sorted(a / b for a, b in zip(res["times_s"]["training_losses"], res["times_s"]["bare"]))
    assert res["overhead"] == pytest.approx(pairs[1] - 1)


def test_sampler_overhead_replays_exactly_the_samplers_network_calls():
    model = model_from_config(TINY_UNET)
    calls = count_forwards(model)
    diffusion = GaussianDiffusion.from_name("cosine", 100)
    res = bench.sampler_overhead(model, diffusion, batch=2, steps=4, repeats=2, warmup=1)
    assert set(res) == set(bench.SAMPLERS)
    grid = sampling_timesteps(100, 4, spacing="trailing")[::-1]
    for name, rec in res.items():
        assert rec["model_calls"] == 4, name
        assert rec["timesteps"] == grid, name  # the bare loop replays the sampler's own timesteps
        pairs = sorted(a / b for a, b in zip(rec["times_s"]["sampler"], rec["times_s"]["bare"]))
        assert rec["overhead"] == pytest.approx(statistics.median(pairs) - 1)
        per_call = statistics.median(rec["times_s"]["bare"]) / 4
        assert rec["own_fraction"] == pytest.approx(rec["own_s_per_step"] / per_call)
    # per sampler: 1 recorded run, then (1 warm-up + 2 timed) sampler runs and as many bare loops;
    # the runs with the free network never touch the model
    assert len(calls) == 3 * 4 * (1 + 3 + 3) and set(calls) == {2}


@needs_diffusers
def test_compare_cli_prints_the_three_tables_with_targets():
    out = run_bench("--device", "cpu", "--compare", "diffusers", "--batch", "2", "--steps", "1", "--repeats", "1",
                    "--warmup", "0", "--sample-steps", "2")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "digits U-Net (presets/digits.json): 1,001,729 parameters" in text
    assert re.search(r"block_out_channels \(32, 64\), layers_per_block 2.*: 1,001,729 parameters \(\+0\.0%\)", text)
    rates = {n: float(re.search(rf"{n}\s+([0-9.]+) images/s\s+\(1 timed steps, 2 images\)", text)[1])
             for n in ("ddpm_lib", "diffusers")}
    m = re.search(r"ratio ddpm_lib / diffusers: ([0-9.]+)x \[IQR ([0-9.]+)\.\.([0-9.]+)\]\s+\(target >= 1.0x", text)
    ratio = float(m[1])
    assert float(m[2]) == float(m[3]) == ratio  # one repetition: no spread
    # the rates are printed to 0.1 images/s and the ratio to 0.001: allow those roundings
    rounding = 0.05 / rates["ddpm_lib"] + 0.05 / rates["diffusers"] + 0.0005 / ratio
    assert ratio == pytest.approx(rates["ddpm_lib"] / rates["diffusers"], rel=rounding + 1e-9)
    iqr = r"\[IQR [+-][0-9.]+%\.\.[+-][0-9.]+%\]"
    assert re.search(rf"overhead [+-][0-9.]+% {iqr}\s+\(target <= 5%", text)
    for name in bench.SAMPLERS:
        assert re.search(rf"{name}\s+2 calls .* overhead [+-][0-9.]+% {iqr}\s+\(target <= 3%", text), name
        assert re.search(rf"{name}\s+[0-9]+ us/step = [0-9.]+% of a call\s+\(target <= 3%", text), name
