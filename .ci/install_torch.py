"""Install PyTorch into the running interpreter's environment, picking the right build.

Called by the Makefile before ``pip install -e .``, so that pip does not pull the default
(CUDA, several GB) wheel onto a machine that has no GPU.

* torch already importable        -> nothing to do.
* ``TORCH_SPEC`` set              -> ``pip install $TORCH_SPEC`` (full control, e.g. "torch==2.5.1").
* an NVIDIA driver is present     -> ``pip install torch`` (PyPI's default build is the CUDA one).
* otherwise (CPU only)            -> a CPU build: a ``+cpu`` wheel from pip's configured
  ``find-links`` wheelhouse when one exists, else the official CPU wheel index.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MIN_VERSION = "2.2"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def find_links_dirs() -> list[Path]:
    """Directories pip is configured to search for wheels (env var and pip config)."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            found += value.strip().strip("'\"").split()
    return [Path(p.removeprefix("file://")) for p in found if Path(p.removeprefix("file://")).is_dir()]


def local_cpu_wheel() -> str | None:
    """Newest ``torch-X+cpu`` wheel for this Python in a find-links directory, as ``torch==X``."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pattern = re.compile(rf"torch-(\d+\.\d+\.\d+)\+cpu-{tag}-{tag}-.*\.whl$")
    versions = []
    for d in find_links_dirs():
        for f in d.iterdir():
            m = pattern.match(f.name)
            if m:
                versions.append(tuple(int(p) for p in m.group(1).split(".")))
    if not versions:
        return None
    return "torch==" + ".".join(map(str, max(versions)))


def main() -> int:
    try:
        import torch  # noqa: F401

        print(f"torch {torch.__version__} already installed", flush=True)
        return 0
    except ImportError:
        pass
    if os.environ.get("TORCH_SPEC"):
        pip(*os.environ["TORCH_SPEC"].split())
    elif has_nvidia_gpu():
        pip(f"torch>={MIN_VERSION}")
    elif (spec := local_cpu_wheel()) is not None:
        pip(spec)
    else:
        pip(f"torch>={MIN_VERSION}", "--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple")
    return 0


if __name__ == "__main__":
    sys.exit(main())
