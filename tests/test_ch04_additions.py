"""Tests for the chapter-4 addition to ddpm_lib.losses: ``eps_vlb_weight``."""

from __future__ import annotations

import pytest
import torch

from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.losses import eps_vlb_weight
from ddpm_lib.schedules import cosine_betas, linear_betas, snr

f64 = torch.float64


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(1000), linear_betas(50)])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vb_term_is_weight_times_eps_mse(betas, variance):
    """The library's own KL term (vb of training_losses) equals lambda_t * mse for t >= 1."""
    d = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(0)
    T = d.T
    t = torch.tensor([1, 2, T // 10, T // 2, T - 2, T - 1])
    x0 = torch.rand(len(t), 3, 4, generator=g, dtype=f64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=f64)
    output = torch.randn(x0.shape, generator=g, dtype=f64)
    out = d.training_losses(lambda x, s: output, x0, t, noise, variance=variance, return_vb=True)
    weight = eps_vlb_weight(d, variance)
    assert weight.dtype == f64 and weight.shape == (T,)
    # fixed_small: the two variances are equal and the KL is the weighted squared error alone;
    # fixed_large: plus the model-free KL between two zero-mean Gaussians of variances beta_tilde, beta
    ratio = (d.posterior_variance / d.betas)[t]
    const = 0.0 if variance == "fixed_small" else 0.5 * (-ratio.log() + ratio - 1)
    torch.testing.assert_close(out["vb"], weight[t] * out["mse"] + const, rtol=1e-9, atol=1e-15)


def test_closed_forms_on_the_linear_schedule():
    d = GaussianDiffusion(linear_betas(1000))
    b, a, ab = d.betas, d.alphas, d.alphas_cumprod
    large = eps_vlb_weight(d, "fixed_large")
    small = eps_vlb_weight(d, "fixed_small")
    # sigma^2 = beta: lambda = beta / (2 alpha (1 - abar))
    torch.testing.assert_close(large[1:], (b / (2 * a * (1 - ab)))[1:], rtol=1e-12, atol=0.0)
    # sigma^2 = beta_tilde: lambda = (SNR(t-1) / SNR(t) - 1) / 2 (an independent route through the SNR)
    s = snr(b)
    torch.testing.assert_close(small[1:], 0.5 * (s[:-1] / s[1:] - 1), rtol=1e-9, atol=0.0)
    assert abs(large[-1].item() - 0.02 / (2 * 0.98 * (1 - ab[-1].item()))) < 1e-12
    assert (small[1:] >= large[1:]).all()  # beta_tilde <= beta


def test_learned_variance_is_refused():
    with pytest.raises(ValueError, match="variance"):
        eps_vlb_weight(GaussianDiffusion(linear_betas(10)), "learned_range")
