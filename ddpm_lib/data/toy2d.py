r"""Two-dimensional toy distributions (chapters 4, 5, 9), all at unit scale.

Scaling convention: each noiseless shape is mapped by a fixed affine map into
:math:`[-1, 1]^2` (stated per function), so the diffusion's unit-variance noise dominates it at
large t exactly as for images in [-1, 1]. The optional Gaussian ``noise`` (standard deviation in
these output units) can push a few points slightly outside the square. Samples are float32
[n, 2]; the same ``generator`` (or int seed) gives the same points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpm_lib.data.loading import as_generator

__all__ = ["swiss_roll", "two_moons", "checkerboard", "eight_gaussians"]


def _jitter(x: Tensor, noise: float, gen) -> Tensor:
    return x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype) if noise > 0 else x


def swiss_roll(n: int, *, noise: float = 0.02, generator: torch.Generator | int | None = None) -> Tensor:
    r"""The 2-D Swiss roll :math:`(\theta\cos\theta, \theta\sin\theta)/(5\pi)`, :math:`\theta = 1.5\pi(1 + 2u)`,
    :math:`u \sim U(0, 1)` (the curve of scikit-learn's ``make_swiss_roll``).

    The curve reaches radius 0.9, which leaves room for the Gaussian jitter; the rare point
    the jitter still pushes outside [-1, 1] is clamped, so every sample passes the data-range
    check of training (pitfall 9)."""
    gen = as_generator(generator)
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / (5 * math.pi)
    return _jitter(x, noise, gen).clamp(-1.0, 1.0).float()


def two_moons(n: int, *, noise: float = 0.03, generator: torch.Generator | int | None = None,
              return_labels: bool = False):
    r"""Two interleaved half circles (scikit-learn's ``make_moons``), mapped by
    :math:`(x - (0.5, 0.25)) / 1.5` into :math:`[-1, 1] \times [-0.5, 0.5]`.

    Each point is on either moon with probability 1/2; ``return_labels`` also returns the moon
    index [n] (long).
    """
    gen = as_generator(generator)
    label = torch.randint(0, 2, (n,), generator=gen)
    angle = math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(label[:, None] == 0, upper, lower)
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.5
    x = _jitter(x, noise, gen).float()
    return (x, label) if return_labels else x


def checkerboard(n: int, *, num_squares: int = 4, noise: float = 0.0,
                 generator: torch.Generator | int | None = None) -> Tensor:
    r"""Uniform on the "black" cells of a ``num_squares`` x ``num_squares`` checkerboard covering
    :math:`[-1, 1]^2` (cells with even row + column), a density with sharp edges."""
    if num_squares < 2:
        raise ValueError(f"num_squares must be >= 2, got {num_squares}")
    gen = as_generator(generator)
    # pick a black cell uniformly, then a point uniformly inside it
    cells = torch.tensor([(i, j) for i in range(num_squares) for j in range(num_squares) if (i + j) % 2 == 0])
    cell = cells[torch.randint(0, len(cells), (n,), generator=gen)]
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    x = (cell + u) * (2.0 / num_squares) - 1.0
    return _jitter(x, noise, gen).float()


def eight_gaussians(radius: float = 0.8, std: float = 0.05):
    r"""Eight equal-weight isotropic Gaussians with means on a circle of ``radius`` at angles
    :math:`2\pi k / 8`, as an exact :class:`ddpm_lib.analytic.GaussianMixture` (so its diffused
    score and optimal denoiser are known in closed form). Sample with ``.sample(n, generator)``."""
    from ddpm_lib.analytic import GaussianMixture  # lazy: analytic is a heavier module

    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, torch.full((8,), std, dtype=torch.float64), torch.full((8,), 1 / 8))
