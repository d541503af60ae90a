# The two commands of the book: `make book` and `make test`.
# Both create .venv on first use and install only when pyproject.toml changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# helper scripts of the Makefile and CI
CI_DIR := .ci
# Per-cell timeout of the book build: real training cells must fit (seconds).
JB_FLAGS := -W -n --keep-going
QUICK_BUILD := _build/quick

.PHONY: help install test test-lib test-nbs test-book test-vision check-notebooks book clean strip

help:
	@echo "make book   - create .venv, install, execute every chapter, write _build/html"
	@echo "make test   - create .venv, install, run pytest, nbval (quick mode) and a quick -W book build"
	@echo "make test-vision - torchvision dataset tests in their own venv (.venv-vision; CI runs it)"
	@echo "make strip  - clear outputs and execution counts of every notebook in nbs/"
	@echo "make clean  - remove build outputs (keeps .venv)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(CI_DIR)/install_torch.py | $(PY)
	$(PY) $(CI_DIR)/install_torch.py
	$(PY) -m pip install --quiet -e ".[book,test]"
	@touch $@

install: $(STAMP)

# ---- make test -------------------------------------------------------------
# The quick book build executes every notebook once (a failing cell, e.g. an assertion, fails
# the build: nb_execution_raise_on_error), so nbval (test-nbs) is not run again here; use it
# for a per-cell report of one chapter.
test: install check-notebooks test-lib test-book
	@echo "make test: all checks passed"

check-notebooks: install
	$(PY) $(CI_DIR)/check_notebooks.py nbs

# Two xdist workers on two cores: one torch thread each, or they oversubscribe the CPU and
# small-tensor loops run many times slower.
test-lib: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 -q

# Notebooks read DDPM_BOOK_QUICK and DDPM_BOOK_STATIC (headless: no ipywidgets, which can hang
# nbclient) through ddpm_lib.book; stripped notebooks are executed,
# so the assertions inside their cells are the checks.
test-nbs: install
	DDPM_BOOK_QUICK=1 DDPM_BOOK_STATIC=1 OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax nbs -q -p no:randomly -n 2 --dist loadfile

# Quick-mode build into its own folder so its cached (quick) outputs never reach `make book`.
test-book: install
	rm -rf $(QUICK_BUILD)
	DDPM_BOOK_QUICK=1 DDPM_BOOK_STATIC=1 $(VENV)/bin/jupyter-book build . $(JB_FLAGS) --path-output $(QUICK_BUILD)
	test -f $(QUICK_BUILD)/_build/html/index.html

# ---- make test-vision --------------------------------------------------------
# torchvision's PyPI wheels are built against PyPI's (CUDA) torch and do not import beside a
# CPU build, so the torchvision loaders get their own venv with whatever torch pip pairs with
# torchvision. Large (a CUDA torch); kept out of `make test`, run by .ci/run.
VISION_VENV  ?= .venv-vision
VISION_STAMP := $(VISION_VENV)/.installed

$(VISION_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VISION_VENV)/bin/python -m pip install --quiet -e ".[test,vision]"
	@touch $@

test-vision: $(VISION_STAMP)
	OMP_NUM_THREADS=1 $(VISION_VENV)/bin/python -m pytest tests -m vision -q -p no:cacheprovider

# ---- make book -------------------------------------------------------------
book: install
	DDPM_BOOK_STATIC=1 $(VENV)/bin/jupyter-book build . $(JB_FLAGS)
	test -f _build/html/index.html
	@echo "open _build/html/index.html"

strip: install
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace nbs/*.ipynb

clean:
	rm -rf _build
