"""ddpm_lib.book (the notebooks' quick-mode switch) and the stripped-notebook check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lib import book

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)])
def test_quick_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(book.QUICK_ENV, value)
    assert book.quick_mode() is expected
    assert book.pick("small", "large") == ("small" if expected else "large")


def test_quick_mode_rejects_garbage(monkeypatch):
    monkeypatch.setenv(book.QUICK_ENV, "maybe")
    with pytest.raises(ValueError, match="DDPM_BOOK_QUICK"):
        book.quick_mode()


def test_generator_reproduces():
    a = torch.randn(5, generator=book.generator(3))
    b = torch.randn(5, generator=book.generator(3))
    c = torch.randn(5, generator=book.generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _notebook(tmp_path: Path, outputs: list, count) -> Path:
    nb = {"cells": [{"cell_type": "code", "source": "1+1", "metadata": {}, "outputs": outputs,
                     "execution_count": count}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "nbs" / "x.ipynb"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def _check(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_notebooks.py"), str(folder)],
                          capture_output=True, text=True)


def test_check_notebooks_flags_outputs_and_counts(tmp_path):
    _notebook(tmp_path, [], None)
    assert _check(tmp_path / "nbs").returncode == 0
    _notebook(tmp_path, [], 3)
    assert _check(tmp_path / "nbs").returncode == 1
    _notebook(tmp_path, [{"output_type": "stream", "name": "stdout", "text": "2"}], None)
    res = _check(tmp_path / "nbs")
    assert res.returncode == 1 and "make strip" in res.stdout


def test_committed_notebooks_are_stripped():
    res = _check(ROOT / "nbs")
    assert res.returncode == 0, res.stdout


def test_every_notebook_has_a_colab_cell_skipped_by_nbval_and_the_build():
    notebooks = sorted((ROOT / "nbs").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        first = nb["cells"][0]
        tags = set(first["metadata"].get("tags", []))
        source = "".join(first["source"])
        assert first["cell_type"] == "code" and "google.colab" in source and "pip install" in source, path.name
        assert {"nbval-skip", "skip-execution"} <= tags, f"{path.name}: Colab cell must be skipped by nbval and the build"
        assert nb["metadata"].get("accelerator") == "GPU", f"{path.name}: ask Colab for a GPU"
