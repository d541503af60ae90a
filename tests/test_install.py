"""`pip install .` gives a working `import ddpm_lib` without notebook or book tooling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tooling that belongs to the book and test extras, never to the library.
EXTRAS_ONLY = ["IPython", "ipywidgets", "ipykernel", "jupyter_book", "myst_nb", "nbval", "pytest",
               "hypothesis", "sphinx", "torchvision", "diffusers"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources: setuptools writes build/ and *.egg-info next to them, and
    # two xdist workers building in the checkout at once break each other's build.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ddpm_lib", src / "ddpm_lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("ddpm_lib-*.whl")
    return path


def test_wheel_contains_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for py in (ROOT / "ddpm_lib").rglob("*.py"):
        rel = py.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel"
    assert not any(n.startswith(("tests/", "nbs/", "book/", "tools/")) for n in names)


def test_wheel_contains_the_configs_and_pretrained_weights(wheel):
    """Package data: ``ddpm train --config NAME`` and ``pretrained.load(NAME)`` need these files."""
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "ddpm_lib" / "presets").glob("*.json"))
    assert "cifar10.json" in presets and "swissroll.json" in presets
    for name in presets:
        assert f"ddpm_lib/presets/{name}" in names, f"presets/{name} missing from the wheel"
    manifest = json.loads((ROOT / "ddpm_lib" / "pretrained" / "manifest.json").read_text())
    assert "ddpm_lib/pretrained/manifest.json" in names and manifest["models"]
    for model, entry in manifest["models"].items():
        for file in entry["files"]:  # config.json and model.safetensors of every shipped model
            assert f"ddpm_lib/pretrained/{model}/{file}" in names, f"pretrained/{model}/{file} missing from the wheel"


def test_installed_wheel_imports_without_book_tooling(wheel, tmp_path):
    # The wheel installed into a folder put first on sys.path (so it shadows the editable
    # checkout), its dependencies from this interpreter, and every book/test tool unimportable.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        sys.path.insert(0, {str(target)!r})
        blocked = {EXTRAS_ONLY!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ImportError(f"{{name}} is book/test tooling")
        sys.meta_path.insert(0, Block())
        import ddpm_lib
        assert ddpm_lib.__file__.startswith({str(target)!r}), ddpm_lib.__file__
        for mod in pkgutil.walk_packages(ddpm_lib.__path__, "ddpm_lib."):
            if mod.name.endswith("__main__"):
                continue
            importlib.import_module(mod.name)
        print("ok", ddpm_lib.__version__)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")
