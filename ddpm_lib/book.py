"""Switches shared by every notebook of the book.

The chapters read their size from here instead of each parsing the environment:
``DDPM_BOOK_QUICK=1`` (set by ``make test``) switches every chapter to a small, fast
configuration that still executes every cell and every assertion.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TypeVar

import torch

__all__ = ["QUICK_ENV", "STATIC_ENV", "quick_mode", "static_build", "pick", "default_device", "generator",
           "single_thread"]

QUICK_ENV = "DDPM_BOOK_QUICK"
# Set by `make book` / `make test-book` / `make test-nbs`: the chapters are executed headless for static pages.
STATIC_ENV = "DDPM_BOOK_STATIC"
_T = TypeVar("_T")


def quick_mode() -> bool:
    """True when the environment variable ``DDPM_BOOK_QUICK`` is set to 1/true/yes/on."""
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{QUICK_ENV} must be one of 1/0/true/false/yes/no/on/off, got {value!r}")


def static_build() -> bool:
    """True when ``DDPM_BOOK_STATIC`` is set to 1/true/yes/on: the chapter runs headless (book build,
    nbval), where an ipywidgets slider has no reader to move it. There the chapters draw their
    static panel instead: a widget's comm messages can leave the executing client (nbclient,
    jupyter/nbclient#312) waiting forever after the cell, which hung the book build here."""
    return os.environ.get(STATIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pick(quick: _T, full: _T) -> _T:
    """Return ``quick`` in quick mode, ``full`` otherwise (e.g. ``steps = pick(200, 20_000)``)."""
    return quick if quick_mode() else full


def default_device() -> torch.device:
    """CUDA when available (Colab with a GPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: the book's only source of randomness."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed code with one PyTorch CPU thread, then restore the previous count.

    Loops over small tensors (a 2-D toy model, an 8x8 digits network) run fastest on one thread,
    above all on a small CPU shared with other work, where extra threads only contend. The count
    is restored even if the block raises.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
