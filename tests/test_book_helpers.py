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
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "check_notebooks.py"), str(folder)],
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


def test_single_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with book.single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with book.single_thread():
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored even when the block raises


# ---- ddpm_lib.symbolic: the SymPy helpers of the derivations -------------------------------

sp = pytest.importorskip("sympy")
from ddpm_lib import symbolic  # noqa: E402

_x = sp.Symbol("x", real=True)
_m = sp.Symbol("m", real=True)
_v = sp.Symbol("v", positive=True)


def test_normal_pdf_is_a_normalised_density_with_the_given_moments():
    pdf = symbolic.normal_pdf(_x, _m, _v)
    moments = [sp.simplify(symbolic.gaussian_integral(_x**k * pdf, _x)) for k in range(3)]
    assert moments[0] == 1 and sp.simplify(moments[1] - _m) == 0 and sp.simplify(moments[2] - (_m**2 + _v)) == 0
    assert abs(float(symbolic.normal_pdf(0.3, 0.1, 0.25)) - 0.7365402806066466) < 1e-12  # N(0.3; 0.1, 0.5^2)


def test_log_normal_pdf_is_the_expanded_quadratic():
    log_pdf = symbolic.log_normal_pdf(_x, _m, _v)
    assert sp.Poly(log_pdf, _x).degree() == 2
    assert sp.simplify(sp.exp(log_pdf) - symbolic.normal_pdf(_x, _m, _v)) == 0
    assert sp.simplify(sp.Poly(log_pdf, _x).coeff_monomial(_x**2) + 1 / (2 * _v)) == 0


def test_tidy_makes_equal_expressions_look_equal():
    a, b = sp.symbols("a b", positive=True)
    assert symbolic.tidy(sp.log(a * b) - sp.log(a) - sp.log(b)) == 0
    assert symbolic.tidy((a + b) ** 2 - a**2 - 2 * a * b - b**2) == 0


@pytest.mark.parametrize("split", [False, True])
def test_log_ratio_is_zero_exactly_for_equal_expressions(split):
    a = sp.Symbol("a", positive=True)
    same = symbolic.normal_pdf(_x, _m, _v) * symbolic.normal_pdf(_x, 0, 1)
    also_same = sp.exp(-(_x - _m) ** 2 / (2 * _v) - _x**2 / 2) / (2 * sp.pi * sp.sqrt(_v))
    assert symbolic.log_ratio(same, also_same, split=split) == 0
    assert symbolic.log_ratio(a * sp.exp(_x), sp.exp(_x), split=split) == sp.log(a)
    assert symbolic.log_ratio(symbolic.normal_pdf(_x, _m, _v), symbolic.normal_pdf(_x, _m, 2 * _v), split=split) != 0


def test_equation_latex_labels_the_expression_and_factors_exponents():
    text = symbolic.equation_latex(r"p(x)", symbolic.normal_pdf(_x, 0, _v), r"\quad(\text{a density})")
    assert text.startswith("p(x) = ") and text.endswith(r"\quad(\text{a density})")
    assert r"\frac{x^{2}}{2 v}" in text
    assert symbolic.equation_latex("y", sp.Integer(3)) == "y = 3"
    expanded = symbolic.equation_latex("f", sp.exp(_x**2 + 2 * _x + 1), factor_exponents=False)
    assert "x^{2} + 2 x + 1" in expanded
    assert "\\left(x + 1\\right)^{2}" in symbolic.equation_latex("f", sp.exp(_x**2 + 2 * _x + 1))


def test_show_displays_a_math_object(monkeypatch):
    display_module = pytest.importorskip("IPython.display")
    shown = []
    monkeypatch.setattr(display_module, "display", lambda obj: shown.append(obj))
    assert symbolic.show(r"\E[x]", _m) is None  # returns nothing: a cell ending in show() has no Out[]
    (obj,) = shown
    assert isinstance(obj, display_module.Math) and obj.data == r"\E[x] = m"


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("", False), ("0", False)])
def test_static_build_reads_the_environment(monkeypatch, value, expected):
    from ddpm_lib.book import STATIC_ENV, static_build

    monkeypatch.setenv(STATIC_ENV, value)
    assert static_build() is expected


def test_every_widget_cell_has_a_static_path_for_headless_builds():
    """A widget's comm messages can leave nbclient waiting forever (it hung the book build on
    chapter 4's slider): every cell that imports ipywidgets must fall back under static_build()."""
    import json

    for path in sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and "import ipywidgets" in source:
                assert "if static_build():" in source, path.name
