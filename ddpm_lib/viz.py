"""Pictures of samples: image grids and 2-D scatter plots, shared by the chapters and the CLI.

Images are tensors [N, C, H, W] in the model's range [-1, 1] (C = 1 or 3); points are [N, 2].
Matplotlib is imported inside the functions so that ``import ddpm_lib`` stays light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["image_grid", "show_images", "show_points", "save_figure"]


def _check_images(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim == 3:  # one channel dropped: [N, H, W]
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must have shape [N, C, H, W] with C in (1, 3) and N >= 1, got {tuple(x.shape)}")
    return x


def image_grid(x: Tensor, nrow: int | None = None, *, padding: int = 1, pad_value: float = 0.5) -> Tensor:
    """Tile images [N, C, H, W] in [-1, 1] into one picture [rows*(H+p), nrow*(W+p) (+p), C] in [0, 1].

    ``nrow`` images per row (default: a square-ish grid, ceil(sqrt(N))); values outside
    [-1, 1] are clipped; empty cells and frames take ``pad_value`` (grey by default).
    """
    x = _check_images(x).detach().float().cpu()
    n, c, h, w = x.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    rows = math.ceil(n / nrow)
    x = x.clamp(-1, 1).add(1).div(2)
    cells = torch.full((rows * nrow, c, h + padding, w + padding), float(pad_value))
    cells[:n, :, padding:, padding:] = x
    grid = cells.reshape(rows, nrow, c, h + padding, w + padding).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * (h + padding), nrow * (w + padding), c)
    if padding:  # close the frame on the right and at the bottom
        grid = torch.nn.functional.pad(grid.permute(2, 0, 1), (0, padding, 0, padding), value=float(pad_value))
        grid = grid.permute(1, 2, 0)
    return grid


def show_images(x: Tensor, ax=None, *, nrow: int | None = None, title: str | None = None, padding: int = 1):
    """Draw :func:`image_grid` of ``x`` on ``ax`` (a new figure when None); returns the axes."""
    import matplotlib.pyplot as plt

    grid = image_grid(x, nrow, padding=padding)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(8, 0.6 * grid.shape[1] / 10 + 1), min(8, 0.6 * grid.shape[0] / 10 + 1)))
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_points(x: Tensor, ax=None, *, labels: Tensor | None = None, s: float = 2.0, lim: float | None = None,
                title: str | None = None, **kwargs):
    """Scatter 2-D points [N, 2] (coloured by integer ``labels`` if given), equal aspect; returns the axes."""
    import matplotlib.pyplot as plt

    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"points must be a tensor of shape [N, 2], got {getattr(x, 'shape', type(x).__name__)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    x = x.detach().float().cpu()
    if labels is not None:
        kwargs = {"c": labels.detach().cpu().numpy(), "cmap": "tab10", **kwargs}
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=s, **kwargs)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def save_figure(x: Tensor, path: str | os.PathLike, labels: Tensor | None = None) -> None:
    """Write a PNG: a scatter plot of points [N, 2] or an image grid of [N, C, H, W] in [-1, 1]."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if x.ndim == 2:
        show_points(x, ax, labels=labels)
    else:
        show_images(x, ax)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
