"""`pip install .` gives a working `import ddpm_lib` without notebook or book tooling."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tooling that belongs to the book and test extras, never to the library.
EXTRAS_ONLY = ["IPython", "ipywidgets", "ipykernel", "jupyter_book", "myst_nb", "nbval", "pytest",
               "hypothesis", "sphinx", "torchvision"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("ddpm_lib-*.whl")
    return path


def test_wheel_contains_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for py in (ROOT / "ddpm_lib").rglob("*.py"):
        rel = py.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel"
    assert not any(n.startswith(("tests/", "nbs/", "book/", "tools/")) for n in names)


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
