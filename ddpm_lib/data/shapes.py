"""Procedurally drawn labelled shapes: a circle, square or triangle of one colour on a dark
background (chapters 6, 10, 11).

The classes are shape x colour, ``label = shape * num_colours + colour``, so guidance can be
judged by eye and measured by a classifier. Item ``i`` is drawn on the fly from a generator
seeded by ``(seed, i)`` alone: the dataset is as large as you ask, needs no files, and any item
can be redrawn on its own. Shapes are rasterised with numpy by supersampling (``antialias``
x ``antialias`` points per pixel, averaged), then mapped to [-1, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ddpm_lib.data.loading import LabelledImages, check_range

__all__ = ["SHAPES", "COLOURS", "BACKGROUND", "ShapeParams", "draw_shape", "ShapesDataset"]

SHAPES = ("circle", "square", "triangle")
# RGB in [0, 1], far apart from each other and from the background
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.08, 0.08, 0.10)


class ShapeParams(NamedTuple):
    """What item i shows: shape and colour indices, centre (x, y) and half-size, in pixels."""

    shape: int
    colour: int
    cx: float
    cy: float
    half_size: float


def draw_shape(shape: str, rgb, cx: float, cy: float, half_size: float, image_size: int, *,
               background=BACKGROUND, antialias: int = 4) -> np.ndarray:
    """Rasterise one shape; returns [3, image_size, image_size] float32 in [-1, 1].

    Pixel (row i, column j) covers [j, j+1) x [i, i+1). With half-size h: the circle has radius
    h; the square is axis-aligned with side 2h; the triangle is upright, base 2h at y = cy + h,
    apex at (cx, cy - h). Their areas are pi h^2, 4 h^2 and 2 h^2 (bounding-box fill 0.785, 1, 0.5).
    """
    s = max(int(antialias), 1)
    u = (np.arange(image_size * s) + 0.5) / s  # supersample centres
    px, py = u[None, :], u[:, None]
    dx, dy = px - cx, py - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half_size**2
    elif shape == "square":
        inside = (np.abs(dx) <= half_size) & (np.abs(dy) <= half_size)
    elif shape == "triangle":
        inside = (dy <= half_size) & (np.abs(dx) <= (dy + half_size) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    cover = inside.reshape(image_size, s, image_size, s).mean(axis=(1, 3))  # fraction of each pixel
    bg, fg = np.asarray(background, dtype=np.float64), np.asarray(rgb, dtype=np.float64)
    img = bg[:, None, None] * (1 - cover) + fg[:, None, None] * cover
    return (2 * img - 1).astype(np.float32)


class ShapesDataset(Dataset):
    """``n`` items ``(image [3, S, S] float32 in [-1, 1], label)``, drawn per index from ``(seed, index)``.

    ``label = shape * num_colours + colour``; ``classes[label]`` is e.g. "red circle".
    Half-sizes are uniform in ``size_range * image_size`` (default 0.15 to 0.3) and the shape
    lies wholly inside the image. ``to_tensors()`` draws all items into a ``LabelledImages``.
    """

    shapes = SHAPES
    colours = tuple(COLOURS)
    num_colours = len(COLOURS)
    num_classes = len(SHAPES) * len(COLOURS)
    classes = [f"{c} {s}" for s in SHAPES for c in COLOURS]

    def __init__(self, n: int, *, image_size: int = 32, seed: int = 0, antialias: int = 4,
                 size_range: tuple[float, float] = (0.15, 0.3)):
        if n < 0 or image_size < 8:
            raise ValueError(f"need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
        if not 0 < size_range[0] <= size_range[1] < 0.5:
            raise ValueError(f"size_range must satisfy 0 < low <= high < 0.5, got {size_range}")
        self.n, self.image_size, self.seed = n, image_size, seed
        self.antialias, self.size_range = antialias, size_range

    @classmethod
    def shape_label(cls, label):
        """Shape index (0 circle, 1 square, 2 triangle) of a label (int or tensor)."""
        return label // cls.num_colours

    @classmethod
    def colour_label(cls, label):
        """Colour index (into ``colours``) of a label (int or tensor)."""
        return label % cls.num_colours

    def __len__(self) -> int:
        return self.n

    def _index(self, index: int) -> int:
        index = int(index)
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} shapes")
        return index % self.n

    def params(self, index: int) -> ShapeParams:
        """The random draw behind item ``index`` (independent of every other index)."""
        rng = np.random.default_rng([self.seed, self._index(index)])  # SeedSequence: no (seed, index) collisions
        shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(self.num_colours))
        S = self.image_size
        h = rng.uniform(self.size_range[0] * S, self.size_range[1] * S)
        cx, cy = rng.uniform(h + 0.5, S - h - 0.5, size=2)
        return ShapeParams(shape, colour, float(cx), float(cy), float(h))

    def label(self, index: int) -> int:
        p = self.params(index)
        return p.shape * self.num_colours + p.colour

    def __getitem__(self, index: int):
        p = self.params(index)
        img = draw_shape(SHAPES[p.shape], COLOURS[self.colours[p.colour]], p.cx, p.cy, p.half_size,
                         self.image_size, antialias=self.antialias)
        x = check_range(torch.from_numpy(img), name="ShapesDataset item")
        return x, p.shape * self.num_colours + p.colour

    def to_tensors(self) -> LabelledImages:
        """All ``n`` items as tensors (images [n, 3, S, S], labels [n])."""
        items = [self[i] for i in range(self.n)]
        images = torch.stack([x for x, _ in items]) if items else torch.empty(0, 3, self.image_size, self.image_size)
        return LabelledImages(images, torch.tensor([y for _, y in items], dtype=torch.long), self.classes)
