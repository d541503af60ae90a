"""The project's own files agree with each other: pyproject.toml, environment.yml, the book config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, f"cannot parse requirement {req!r}"
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    out = {}
    for req in reqs:
        name, spec = _split(req)
        out[CONDA_NAMES.get(name, name)] = spec
    return out


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, spec = _split(dep)
            if name not in ("python", "pip"):
                out[name] = spec
    return out


def test_environment_yml_mirrors_pyproject():
    py, conda = pyproject_requirements(), conda_requirements()
    missing = sorted(set(py) - set(conda))
    extra = sorted(set(conda) - set(py))
    differ = sorted(n for n in set(py) & set(conda) if py[n] != conda[n])
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert not extra, f"in environment.yml but not pyproject.toml: {extra}"
    assert not differ, "version bounds differ: " + ", ".join(f"{n}: {py[n]} vs {conda[n]}" for n in differ)


def test_core_dependencies_are_lower_bounds_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        name, spec = _split(req)
        assert spec.startswith(">=") and "," not in spec and "<" not in spec.lstrip(">="), (
            f"core dependency {req!r} must carry a lower bound only (the book runs on Colab's versions)"
        )


def test_jupyter_book_pinned_to_1x():
    _, spec = _split(next(r for r in pyproject_requirements_raw() if r.startswith("jupyter-book")))
    assert ">=1.0.4" in spec and "<2" in spec


def pyproject_requirements_raw() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for extra in project["optional-dependencies"].values() for r in extra]


def test_toc_lists_only_existing_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f"_toc.yml lists missing page {f}"
    for part in toc["parts"]:
        assert part.get("numbered") is True, f"part {part['caption']!r} is not numbered"


def test_every_notebook_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        assert f"nbs/{nb.stem}" in listed, f"{nb.name} is not listed in _toc.yml"


def test_book_config_essentials():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["only_build_toc_files"] is True
    assert cfg["repository"]["branch"] == "main", "Colab and repository links need branch: main"
    assert {".venv", "_build", "tests"} <= set(cfg["exclude_patterns"])
    assert {"amsmath", "dollarmath"} <= set(cfg["parse"]["myst_enable_extensions"])
    assert cfg["execute"]["execute_notebooks"] == "cache"
    assert cfg["execute"]["timeout"] >= 300
    assert cfg["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    assert "sphinx_proof" in cfg["sphinx"]["extra_extensions"]
    assert cfg["bibtex_bibfiles"] == ["references.bib"]


def test_bibliography_has_the_seed_papers():
    bib = (ROOT / "references.bib").read_text()
    for arxiv_id in ["2006.11239", "2010.02502", "2102.09672", "2105.05233", "2207.12598", "2112.10741",
                     "2112.05744", "2208.11970", "1503.03585", "1312.6114", "1505.04597"]:
        assert arxiv_id in bib, f"references.bib lacks arXiv:{arxiv_id}"


def _page_text(path: Path) -> str:
    if path.suffix == ".ipynb":
        import json

        cells = json.loads(path.read_text())["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text()


def test_equation_labels_are_unique_across_the_book():
    """Sphinx keeps one namespace for equation labels; a repeat is a -W build failure."""
    seen: dict[str, str] = {}
    pages = sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md"))
    for page in pages:
        for label in re.findall(r"^\$\$\s*\(([\w-]+)\)\s*$", _page_text(page), flags=re.M):
            assert label not in seen, f"equation label {label!r} in {page.name} is already used in {seen[label]}"
            seen[label] = page.name
    assert seen, "no labelled equations found: the pattern no longer matches the pages"
