"""The training benchmark (``python -m ddpm_lib.bench``) runs and prints its figures.

Only that it works end to end: speed and memory are printed by the script, never asserted.
"""

import re
import subprocess
import sys


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_lib.bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_prints_throughput_and_memory():
    out = run_bench("--device", "cpu", "--model", "digits8", "--batch", "2", "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert "digits8 U-Net, 1,001,729 parameters" in out.stdout
    images_per_s = float(re.search(r"images/s: ([0-9.]+) \(2 timed steps", out.stdout).group(1))
    assert images_per_s > 0
    assert re.search(r"peak memory: [0-9.]+ GiB", out.stdout)


def test_bench_rejects_bad_warmup():
    out = run_bench("--device", "cpu", "--model", "digits8", "--steps", "3", "--warmup", "3")
    assert out.returncode == 2
    assert "need 1 <= --warmup < --steps" in out.stderr
