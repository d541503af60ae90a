"""The book's MathJax macros are defined once, everywhere they are needed, and nothing else is used.

Two renderers show the book's equations, and each has its own list of macros:

* the HTML book: MathJax reads ``sphinx.config.mathjax3_config.tex.macros`` in ``_config.yml``;
* a notebook opened on its own (Colab, Jupyter): there is no ``_config.yml``, so every notebook
  carries a hidden markdown cell (tagged ``remove-cell``, so the HTML build drops it) whose
  ``$\\newcommand...$`` defines the same macros for the notebook's own MathJax.

The tests check that the two lists agree, that every notebook has the hidden cell before its
first use of a macro, and that every control word used in the book's math is either one of the
macros or a standard TeX/AMS command (a misspelt or undefined macro renders as a red error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
PAGES = sorted((ROOT / "book").glob("*.md"))
HIDDEN_TAGS = {"remove-cell", "remove_cell"}

# Standard TeX, LaTeX and amsmath commands the book uses (MathJax knows them all). A new standard
# command is added here; a custom one goes into _config.yml and the notebooks' macro cells.
STANDARD_COMMANDS = frozenset(
    # Greek letters
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi "
    "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega "
    # accents, fonts, text
    "bar tilde hat widehat widetilde dot ddot vec overline mathbf mathbb mathcal mathrm mathit boldsymbol "
    "text textrm operatorname "
    # operators and functions
    "frac dfrac tfrac sqrt sum prod int partial nabla log ln exp sin cos cot arccos tanh det max min lim arg "
    "argmin argmax infty cdot times pm approx sim propto le ge leq geq ll gg ne neq in to mapsto leftarrow "
    "rightarrow Longrightarrow Rightarrow mid top dots ldots cdots varnothing "
    # delimiters and spacing
    "left right big Big bigl bigr Bigl Bigr lVert rVert Vert lvert rvert langle rangle lfloor rfloor quad qquad "
    "underbrace overbrace "
    # environments (amsmath)
    "begin end".split()
)
DEFINERS = ("newcommand", "renewcommand", "def")


def config_macros() -> dict[str, tuple[str, int]]:
    """name -> (expansion, number of arguments) from _config.yml's MathJax configuration."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    macros = cfg["sphinx"]["config"]["mathjax3_config"]["tex"]["macros"]
    return {name: (value, 0) if isinstance(value, str) else (value[0], int(value[1])) for name, value in macros.items()}


def _braced(text: str, start: int) -> tuple[str, int]:
    """The content of the balanced {...} group opening at text[start], and the index after it."""
    assert text[start] == "{", text[start:start + 40]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    raise ValueError(f"unbalanced braces in {text[start:start + 60]!r}")


def parse_definitions(text: str) -> dict[str, tuple[str, int]]:
    r"""Macros defined in ``text`` by ``\newcommand``, ``\renewcommand`` or ``\def``: name -> (body, nargs)."""
    found = {}
    for match in re.finditer(r"\\(newcommand|renewcommand|def)\b\s*", text):
        pos = match.end()
        if match.group(1) == "def":  # \def\name#1#2{body}
            name_match = re.compile(r"\\([A-Za-z]+)((?:#\d)*)\s*").match(text, pos)
            nargs = len(name_match.group(2)) // 2
        else:  # \newcommand{\name}[n]{body} or \newcommand\name[n]{body}
            name_match = re.compile(r"\{?\s*\\([A-Za-z]+)\s*\}?\s*(?:\[(\d)\])?\s*").match(text, pos)
            nargs = int(name_match.group(2) or 0)
        assert name_match, f"cannot parse the macro definition at {text[match.start():match.start() + 60]!r}"
        body, _ = _braced(text, name_match.end())
        found[name_match.group(1)] = (body, nargs)
    return found


def _strip_definitions(text: str) -> str:
    """``text`` with every macro definition removed (its body uses standard commands only)."""
    while True:
        match = re.search(r"\\(newcommand|renewcommand|def)\b\s*", text)
        if not match:
            return text
        if match.group(1) == "def":
            name_match = re.compile(r"\\[A-Za-z]+(?:#\d)*\s*").match(text, match.end())
        else:
            name_match = re.compile(r"\{?\s*\\[A-Za-z]+\s*\}?\s*(?:\[\d\])?\s*").match(text, match.end())
        _, end = _braced(text, name_match.end())
        text = text[:match.start()] + text[end:]


def markdown_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _is_hidden(cell: dict) -> bool:
    return bool(HIDDEN_TAGS & set(cell["metadata"].get("tags", [])))


def math_segments(markdown: str) -> list[str]:
    """The ``$$...$$`` and ``$...$`` math of a MyST page, outside code blocks and code spans."""
    text = re.sub(r"^(```+)(?!\{)[^\n]*\n.*?^\1[ \t]*$", "", markdown, flags=re.S | re.M)  # code fences, not directives
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    display = re.findall(r"\$\$(.+?)\$\$", text, flags=re.S)
    text = re.sub(r"\$\$(.+?)\$\$", " ", text, flags=re.S)
    return display + re.findall(r"(?<!\\)\$([^$]+?)(?<!\\)\$", text)


def code_latex(path: Path) -> list[str]:
    """The LaTeX literals that code cells pass to ``show(...)`` or ``Math(...)``: MathJax renders them too."""
    found = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            for m in re.finditer(r"\b(?:show|Math)\(\s*r?([\"'])(.*?)(?<!\\)\1", _source(cell)):
                found.append(m.group(2).replace("\\\\", "\\"))
    return found


def control_words(latex: str) -> set[str]:
    return set(re.findall(r"\\([A-Za-z]+)", latex))


def defined_in_pages() -> dict[str, dict[str, tuple[str, int]]]:
    """Every page's macro definitions (any markdown cell of a notebook, or a book/*.md page)."""
    pages = {}
    for nb in NOTEBOOKS:
        pages[nb.name] = {}
        for cell in markdown_cells(nb):
            pages[nb.name].update(parse_definitions(_source(cell)))
    for page in PAGES:
        pages[page.name] = parse_definitions(page.read_text())
    return pages


def definition_problems(macros: dict[str, tuple[str, int]], pages: dict[str, dict[str, tuple[str, int]]]) -> list[str]:
    """Definitions on the pages that _config.yml lacks or expands differently (check (a))."""
    problems = []
    for page, definitions in pages.items():
        for name, (body, nargs) in definitions.items():
            if name not in macros:
                problems.append(f"{page}: \\{name} is defined there but not in _config.yml (the HTML shows an error)")
            elif (re.sub(r"\s+", "", body), nargs) != (re.sub(r"\s+", "", macros[name][0]), macros[name][1]):
                problems.append(f"{page}: \\{name} expands to {body!r} there but to {macros[name][0]!r} in _config.yml")
    return problems


# ---- (a) every macro a page defines is in _config.yml, with the same expansion ---------------

def test_config_macros_are_parsed():
    macros = config_macros()
    assert {"abar", "btilde", "eps", "epstheta", "KL", "emb"} <= set(macros)
    assert macros["abar"] == (r"\bar{\alpha}", 0) and macros["emb"] == (r"\mathbf{e}", 0)
    assert not set(macros) & STANDARD_COMMANDS, "a macro must not shadow a standard command"


def test_every_page_macro_is_in_the_config_with_the_same_expansion():
    problems = definition_problems(config_macros(), defined_in_pages())
    assert not problems, "\n".join(problems)


def test_the_definition_check_catches_a_macro_missing_from_the_config():
    """The check is not vacuous: without \\emb in _config.yml it reports chapter 6."""
    macros = config_macros()
    macros.pop("emb", None)
    problems = definition_problems(macros, defined_in_pages())
    assert any("\\emb" in p and "06_unet" in p for p in problems), problems
    wrong = dict(config_macros(), abar=(r"\overline{\alpha}", 0))
    assert any("\\abar expands to" in p for p in definition_problems(wrong, defined_in_pages()))


def test_parse_definitions_reads_every_form():
    text = (r"$\newcommand{\abar}{\bar{\alpha}}\newcommand\x{\mathbf{x}}"
            r"\renewcommand{\f}[2]{\frac{#1}{#2}}\def\g#1{\hat{#1}}$")
    assert parse_definitions(text) == {"abar": (r"\bar{\alpha}", 0), "x": (r"\mathbf{x}", 0),
                                       "f": (r"\frac{#1}{#2}", 2), "g": (r"\hat{#1}", 1)}
    assert control_words(_strip_definitions(text)) == set()


# ---- (b) every notebook defines every config macro in a hidden cell, before it is used -------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_hidden_macro_cell_with_every_config_macro(path):
    macros = config_macros()
    cells = markdown_cells(path)
    macro_cells = [i for i, c in enumerate(cells) if _is_hidden(c) and parse_definitions(_source(c))]
    assert len(macro_cells) == 1, f"{path.name}: expected one hidden markdown cell of macro definitions, found {len(macro_cells)}"
    (index,) = macro_cells
    cell = cells[index]
    assert control_words(_strip_definitions(_source(cell))) == set() and _source(cell).strip().startswith("$"), \
        f"{path.name}: the macro cell should hold only the $...$ of definitions"
    defined = parse_definitions(_source(cell))
    missing = sorted(set(macros) - set(defined))
    assert not missing, f"{path.name}: its hidden macro cell lacks {missing}, so they fail to render on Colab"
    assert {n: (re.sub(r"\s+", "", b), k) for n, (b, k) in defined.items()} == \
           {n: (re.sub(r"\s+", "", b), k) for n, (b, k) in macros.items()}
    # MathJax in a notebook only knows a macro once the defining cell has been typeset.
    first_use = next((i for i, c in enumerate(cells) if i != index
                      and any(control_words(m) & set(macros) for m in math_segments(_source(c)))), None)
    assert first_use is None or index < first_use, \
        f"{path.name}: markdown cell {first_use} uses a macro before the hidden macro cell ({index}) defines it"


# ---- (c) every control word in the book's math is a config macro or a standard command -------

def _used_words() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    sources = [(nb.name, _source(c)) for nb in NOTEBOOKS for c in markdown_cells(nb)]
    sources += [(page.name, page.read_text()) for page in PAGES]
    for name, text in sources:
        for segment in math_segments(_strip_definitions(text)):
            for word in control_words(segment):
                used.setdefault(word, set()).add(name)
    for nb in NOTEBOOKS:
        for latex in code_latex(nb):
            for word in control_words(latex):
                used.setdefault(word, set()).add(nb.name)
    return used


def test_math_is_found():
    used = _used_words()
    assert {"abar", "frac", "sqrt", "mid", "emb"} <= set(used), "the math extraction no longer finds the book's math"
    assert "06_unet.ipynb" in used["emb"]


def test_every_control_word_is_a_macro_or_a_standard_command():
    macros = config_macros()
    unknown = {word: sorted(pages) for word, pages in _used_words().items()
               if word not in macros and word not in STANDARD_COMMANDS}
    assert not unknown, (f"control words that are neither standard nor in _config.yml's macros: {unknown}; "
                         "add a custom macro to _config.yml and to every notebook's hidden macro cell, "
                         "or a standard command to STANDARD_COMMANDS")
