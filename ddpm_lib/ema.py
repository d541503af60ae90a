r"""Exponential moving average (EMA) of a model's weights (chapter 4; pitfall 7).

Diffusion models are sampled from an EMA of their weights (DDPM sec. 4 uses decay 0.9999).
Two details matter:

* **Warm-up.** With decay 0.9999 the average forgets its random initialisation only after
  ~10^4 updates, so an early EMA is noise. The effective decay of the n-th update
  (n = 1, 2, ...: the optimiser step just taken) is

  .. math:: d_n = \min\left(d, \frac{1 + n}{10 + n}\right),

  the rule of TensorFlow's ``ExponentialMovingAverage(num_updates=n)``, used by score_sde's
  ``ema.py`` (Song et al. 2021): d_1 = 2/11, d_90 = 0.91, and d_n reaches 0.9999 only
  near n = 90 000.
* **Buffers are copied, never averaged.** Parameters are averaged; buffers (running
  statistics, fixed embeddings) are copied from the model, because an average of, e.g.,
  batch-norm counters is meaningless.

The EMA is updated once per OPTIMISER step (not per micro-batch or per rank): the training
loop calls :func:`ema_update` right after ``optimizer.step()``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_decay", "ema_update", "make_ema"]


def ema_decay(decay: float, n: int, warmup: bool = True) -> float:
    """Effective decay of the n-th EMA update (n >= 1): min(decay, (1 + n) / (10 + n)) with warm-up."""
    if n < 1:
        raise ValueError(f"the EMA update count n starts at 1, got {n}")
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (same weights, no gradients, eval mode) to hold the average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta for parameters; buffers copied from ``model``."""
    ema_params, params = dict(ema.named_parameters()), dict(model.named_parameters())
    if ema_params.keys() != params.keys():
        raise ValueError("the EMA and the model have different parameters")
    for name, p in params.items():
        ema_params[name].lerp_(p.detach(), 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
