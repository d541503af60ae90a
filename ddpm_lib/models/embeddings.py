r"""Sinusoidal timestep embeddings (book chapter 6).

The network sees the timestep through the Transformer position encoding (Vaswani et al. 2017,
sec. 3.5), as in DDPM (Ho et al. 2020, App. B) and ADM (Dhariwal & Nichol 2021):

.. math::
    \mathrm{emb}(t)_k = \sin(t\,\omega_k),\qquad \mathrm{emb}(t)_{h+k} = \cos(t\,\omega_k),\qquad
    \omega_k = \mathrm{max\_period}^{-k/h},\quad k = 0,\dots,h-1,\; h = \lfloor\mathrm{dim}/2\rfloor.

The frequencies run geometrically from 1 (a period of :math:`2\pi` steps) down to
``1/max_period``, so nearby timesteps differ in the fast channels and distant ones in the slow
channels. At :math:`t = 0` the sine half is 0 and the cosine half is 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["timestep_embedding", "TimestepEmbedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5): [sin | cos], float32.

    Args:
        t: [B] timesteps (ORIGINAL schedule, 0-based; integer or float).
        dim: embedding width; an odd ``dim`` gets a final zero column.
        max_period: the slowest period, in timesteps.
    Returns:
        [B, dim] float32 on ``t``'s device.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape [B], got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear: the time-embedding MLP of DDPM/ADM (``emb_dim`` wide)."""

    def __init__(self, sinusoid_dim: int, emb_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.sinusoid_dim, self.max_period = sinusoid_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(sinusoid_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.sinusoid_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # the model may run in float64 or bf16
