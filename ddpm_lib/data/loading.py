"""The data boundary: the [-1, 1] range check, seeded generators, and an endless shuffled loader.

Diffusion assumes data in [-1, 1]: the forward process mixes ``sqrt(alpha_bar) x_0`` with unit
Gaussian noise, so data on a [0, 255] or [0, 1] scale silently changes the effective noise
schedule (DESIGN.md pitfall 9). Every image dataset of ``ddpm_lib.data`` returns values that
pass :func:`check_range`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = ["check_range", "as_generator", "LabelledImages", "Latents", "infinite_loader"]


def check_range(x: Tensor, *, low: float = -1.0, high: float = 1.0, name: str = "data", atol: float = 1e-6) -> Tensor:
    """Raise ``ValueError`` unless every value of ``x`` is finite and in [low, high] (default [-1, 1]).

    Returns ``x`` so it can wrap an expression. A [0, 1] or [0, 255] tensor is named as such.
    """
    x_t = torch.as_tensor(x)
    if x_t.numel() == 0:
        return x
    if not torch.isfinite(x_t).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = float(x_t.min()), float(x_t.max())
    if lo < low - atol or hi > high + atol:
        hint = " (it looks like [0, 255] pixels: use x / 127.5 - 1)" if hi > 2 else \
            " (map [0, 1] pixels with 2 x - 1)" if lo >= 0 else ""
        raise ValueError(f"{name} must lie in [{low}, {high}] (DESIGN.md pitfall 9), got range [{lo:.4g}, {hi:.4g}]{hint}")
    return x


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A ``torch.Generator`` from a generator or an int seed; ``None`` stays ``None`` (global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


class Latents(TensorDataset):
    """Latent codes [N, c, h, w] (scaled to unit standard deviation, ``ddpm_lib.latent``) with
    labels [N]: not images, so not held to [-1, 1], only to finite values. The training loop
    accepts them where it accepts images (latent diffusion, Rombach et al. 2022)."""

    def __init__(self, latents: Tensor, labels: Tensor):
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        if latents.shape[0] != labels.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {labels.shape[0]} labels")
        super().__init__(latents, labels)


class LabelledImages(TensorDataset):
    """Images [N, C, H, W] in [-1, 1] with labels [N]; items are ``(image, label)``.

    A ``TensorDataset`` with names: ``images``, ``labels``, ``classes``, ``num_classes``.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str]):
        check_range(images, name=type(self).__name__)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        super().__init__(images, labels)
        self.classes = list(classes)

    @property
    def images(self) -> Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> Tensor:
        return self.tensors[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def infinite_loader(data: Dataset | Tensor | Sequence[Tensor], batch_size: int, *,
                    generator: torch.Generator | int, drop_last: bool = True) -> Iterator:
    """Endless mini-batches, reshuffled every epoch with ``generator`` (same seed, same batches).

    ``data`` is a tensor (batches are tensors), a tuple/list of equal-length tensors or a
    ``TensorDataset`` (batches are tuples, indexed without a per-item loop), or any map-style
    dataset (items collated by ``default_collate``). With ``drop_last`` every batch has exactly
    ``batch_size`` items; the last partial batch of an epoch is dropped.
    """
    if isinstance(data, TensorDataset):
        data = data.tensors
    n = len(data[0]) if isinstance(data, (tuple, list)) else len(data)
    if batch_size < 1 or (drop_last and n < batch_size):
        raise ValueError(f"batch_size must be in [1, {n}] (the dataset size), got {batch_size}")
    gen = as_generator(generator)
    if gen is None:
        raise ValueError("infinite_loader needs a generator (torch.Generator or int seed) for reproducible shuffling")
    stop = n - n % batch_size if drop_last else n
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, stop, batch_size):
            idx = perm[start:start + batch_size]
            if isinstance(data, Tensor):
                yield data[idx]
            elif isinstance(data, (tuple, list)):
                yield tuple(d[idx] for d in data)
            else:
                yield default_collate([data[int(i)] for i in idx])
