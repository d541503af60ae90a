"""Gaussian helpers shared by the forward process, the samplers, the losses and the likelihood.

The appendix chapter ("A Gaussian toolkit") derives each formula here with SymPy and
then checks these functions against it numerically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["standard_normal", "normal_kl", "log_normal_diff_cdf", "discretized_gaussian_log_likelihood"]


def standard_normal(
    shape, generator: torch.Generator | None = None, *, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    r"""A draw of :math:`\varepsilon \sim \mathcal N(0, I)` of ``shape``: the noise of the forward process
    (Ho et al. 2020, Eq. (4) and Algorithm 1) and of ancestral sampling (Algorithm 2, line 3).

    The one noise helper of ``q_sample``, the losses and every sampler. The noise is drawn on the GENERATOR's device and
    then moved to ``device``: torch refuses a CPU generator for a CUDA tensor, and drawing where
    the generator lives makes one seed give the same numbers wherever the data are. Without a
    generator the global RNG of ``device`` is used. ``device`` defaults to the generator's (else
    the CPU); ``dtype`` to torch's default.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    draw_on = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=draw_on).to(device)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    r"""KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats: the terms
    L_T and L_{t-1} of the bound (Ho et al. 2020, Eq. (5)) are KLs between Gaussians, computed in
    this closed form (Kingma & Welling 2014, arXiv 1312.6114, Appendix B, derive the case p = N(0, I)).

    The closed form derived in the appendix (eq. ``kl-univariate``):
    :math:`\tfrac12\bigl(\log\tfrac{\sigma_2^2}{\sigma_1^2} + \tfrac{\sigma_1^2 + (\mu_1-\mu_2)^2}{\sigma_2^2} - 1\bigr)`.
    A diagonal multivariate KL is the sum of these terms over dimensions.
    Arguments broadcast against each other; Python floats are accepted for the variances.
    """
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    logvar1, logvar2 = (
        torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def log_normal_diff_cdf(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails: the log-mass of one bin of the
    discretised decoder (Ho et al. 2020, Eq. (13)), with Phi the standard normal CDF.

    Uses the symmetry Phi(b) - Phi(a) = Phi(-a) - Phi(-b) so that the subtraction is always
    done on the side where both CDF values are small.
    """
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    # log(e^{log_hi} - e^{log_lo}) = log_hi + log(1 - e^{log_lo - log_hi})
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi).clamp(max=-1e-300))


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int = 256
) -> Tensor:
    r"""Log-probability of data on a uniform grid under a Gaussian discretised to that grid.

    The decoder :math:`p_\theta(x_0 | x_1)` of DDPM (Ho et al. 2020, Eq. (13)): data takes
    ``num_levels`` values evenly spaced in [-1, 1] (256 for 8-bit images, 17 for the
    scikit-learn digits), each bin has half-width ``delta = 1 / (num_levels - 1)``, and the two
    edge bins extend to -inf and +inf. ``log_scale`` is the log standard deviation.
    Returns the log-probability elementwise, in nats.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    delta = 1.0 / (num_levels - 1)
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + delta) * inv_std
    lower = (x - mean - delta) * inv_std
    # Edge bins are open-ended: the bottom bin gets all mass below its upper edge, etc.
    edge = 1.0 - 0.5 * delta  # x values beyond this are the edge levels (x = +-1)
    bottom = x < -edge
    top = x > edge
    inf = torch.full_like(upper, math.inf)
    lower = torch.where(bottom, -inf, lower)
    upper = torch.where(top, inf, upper)
    return log_normal_diff_cdf(lower, upper)
