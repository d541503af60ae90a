"""The exact Gaussian-mixture oracle (``ddpm_lib.analytic``) against independent references:
grid integration, SciPy densities, autograd, Monte-Carlo sampling and importance weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from ddpm_lib.analytic import GaussianMixture
from ddpm_lib.samplers import alpha_bar_at

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scipy_log_prob(mix: GaussianMixture, x: torch.Tensor) -> np.ndarray:
    """log p(x) from SciPy's multivariate normal: an implementation independent of ours."""
    dens = sum(
        w * stats.multivariate_normal(m, c).pdf(x.numpy())
        for w, m, c in zip(mix.weights.numpy(), mix.means.numpy(), mix.covs.numpy())
    )
    return np.log(dens)


def test_stds_forms_agree():
    means = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    iso = GaussianMixture(means, torch.tensor([0.3, 0.5]), torch.tensor([1.0, 3.0]))
    diag = GaussianMixture(means, torch.tensor([[0.3, 0.3], [0.5, 0.5]]), torch.tensor([0.25, 0.75]))
    full = GaussianMixture(means, torch.diag_embed(torch.tensor([[0.09, 0.09], [0.25, 0.25]])), torch.tensor([0.25, 0.75]))
    x = torch.randn(7, 2, generator=gen(0), dtype=torch.float64)
    assert torch.allclose(iso.log_prob(x), diag.log_prob(x), atol=1e-12)
    assert torch.allclose(iso.log_prob(x), full.log_prob(x), atol=1e-12)
    assert torch.allclose(iso.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))


@pytest.mark.parametrize(
    "stds, weights",
    [(torch.ones(2, 3), torch.ones(2)), (torch.ones(2), torch.tensor([1.0, -1.0])), (torch.ones(3), torch.ones(3))],
)
def test_invalid_arguments_raise(stds, weights):
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(2, 2), stds, weights)


def test_log_prob_matches_scipy_and_normalises(mixture):
    x = mixture.sample(50, generator=gen(1))
    np.testing.assert_allclose(mixture.log_prob(x).numpy(), scipy_log_prob(mixture, x), rtol=0, atol=1e-10)
    for k in range(3):
        ref = stats.multivariate_normal(mixture.means[k].numpy(), mixture.covs[k].numpy()).logpdf(x.numpy())
        np.testing.assert_allclose(mixture.component_log_prob(x)[:, k].numpy(), ref, rtol=0, atol=1e-10)
    # Midpoint rule with 13+ points per smallest standard deviation (0.08 for the data, 0.33 once
    # noised), so the quadrature error is far below 1e-6; the boxes reach > 6 standard
    # deviations past every mean, leaving out < 1e-9 of the mass.
    for mix, half_width, h in ((mixture, 3.0, 0.006), (mixture.noised(0.7), 4.5, 0.02)):
        grid = torch.arange(-half_width + h / 2, half_width, h, dtype=torch.float64)
        xx, yy = torch.meshgrid(grid, grid, indexing="ij")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        total = mix.log_prob(pts).exp().sum().item() * h * h
        assert abs(total - 1) < 1e-6, total


def test_sample_moments_and_labels(mixture):
    n = 200_000
    x, labels = mixture.sample(n, generator=gen(2), return_labels=True)
    props = torch.bincount(labels, minlength=3).double() / n
    # binomial standard error sqrt(p(1-p)/n) <= 0.0012; allow 5 of them
    assert (props - mixture.weights).abs().max() < 5 * 0.0012
    for k in range(3):
        xk = x[labels == k]
        se = (mixture.covs[k].diagonal().sqrt() / math.sqrt(len(xk))).max()
        assert (xk.mean(0) - mixture.means[k]).abs().max() < 5 * se
        assert torch.allclose(torch.cov(xk.T), mixture.covs[k], atol=5 * 0.14**2 * math.sqrt(2 / len(xk)))
    assert torch.equal(mixture.sample(10, generator=gen(3)), mixture.sample(10, generator=gen(3)))


@pytest.mark.parametrize("t", [5, 100, 400, 999])
def test_noised_matches_q_sample(mixture, linear_alphas_cumprod, t):
    """noised(abar) is the law of sqrt(abar) x0 + sqrt(1 - abar) eps: Kolmogorov-Smirnov along
    three directions (exact mixture CDF) and the first two moments (standard errors)."""
    a = linear_alphas_cumprod[t].item()
    n = 50_000
    x0 = mixture.sample(n, generator=gen(4))
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(n, 2, generator=gen(5), dtype=torch.float64)
    nm = mixture.noised(a)
    for angle in (0.0, 1.0, 2.2):
        u = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        loc, scale = nm.means @ u, torch.einsum("i,kij,j->k", u, nm.covs, u).sqrt()

        def cdf(z, loc=loc.numpy(), scale=scale.numpy(), w=nm.weights.numpy()):
            return (w * stats.norm.cdf((np.asarray(z)[:, None] - loc) / scale)).sum(1)

        assert stats.kstest((xt @ u).numpy(), cdf).pvalue > 1e-4
    mean = nm.weights @ nm.means
    second = torch.einsum("k,kij->ij", nm.weights, nm.covs + nm.means[:, :, None] * nm.means[:, None, :])
    cov = second - mean[:, None] * mean[None, :]
    assert (xt.mean(0) - mean).abs().max() < 5 * cov.diagonal().sqrt().max() / math.sqrt(n)
    assert torch.allclose(torch.cov(xt.T), cov, atol=5 * cov.diagonal().max() * math.sqrt(2 / n))


def test_class_posterior_is_bayes(mixture, linear_alphas_cumprod):
    t = torch.tensor([0, 50, 200, 600, 999])
    x = torch.randn(5, 2, generator=gen(6), dtype=torch.float64)
    logpost = mixture.class_posterior(x, t, linear_alphas_cumprod)
    assert torch.allclose(logpost.exp().sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    for i in range(5):
        nm = mixture.noised(linear_alphas_cumprod[t[i]].item())
        log_joint = np.array([math.log(w) + stats.multivariate_normal(m, c).logpdf(x[i].numpy())
                              for w, m, c in zip(nm.weights.numpy(), nm.means.numpy(), nm.covs.numpy())])
        bayes = log_joint - special.logsumexp(log_joint)
        np.testing.assert_allclose(logpost[i].numpy(), bayes, rtol=1e-12, atol=1e-9)
    logits = mixture.classifier(linear_alphas_cumprod)(x, t)
    assert torch.allclose(logits.log_softmax(-1), logpost, atol=1e-12)


def test_score_is_gradient_of_noised_log_prob_and_eps_is_scaled_score(mixture, linear_alphas_cumprod):
    t = torch.tensor([0, 3, 80, 500, 999])
    x = 0.8 * torch.randn(5, 2, generator=gen(7), dtype=torch.float64)
    score = mixture.score(x, t, linear_alphas_cumprod)
    eps = mixture.eps_model(linear_alphas_cumprod)(x, t)
    for i in range(5):
        a = linear_alphas_cumprod[t[i]].item()
        xi = x[i : i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mixture.noised(a).log_prob(xi).sum(), xi)
        assert torch.allclose(score[i], grad[0], rtol=1e-10, atol=1e-10)
        assert torch.allclose(eps[i], -math.sqrt(1 - a) * grad[0], rtol=1e-10, atol=1e-10)


def test_conditional_eps_is_single_component_eps(mixture, linear_alphas_cumprod):
    x = torch.randn(6, 2, generator=gen(8), dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 300, 700, 999])
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    eps_y = mixture.eps_model(linear_alphas_cumprod)(x, t, y=y)
    for k in range(3):
        single = GaussianMixture(mixture.means[k : k + 1], mixture.covs[k : k + 1], torch.ones(1))
        eps_k = single.eps_model(linear_alphas_cumprod)(x, t)
        assert torch.allclose(eps_y[y == k], eps_k[y == k], atol=1e-12)


def test_tweedie_structure_at_small_and_large_t(mixture, linear_alphas_cumprod):
    """Small t: the denoiser is nearly the identity, E[x0|x_t] = x_t + O(1 - abar); the eps it
    implies is exactly (x_t - sqrt(abar) E[x0|x_t]) / sqrt(1 - abar). Large t: x_t is nearly
    pure noise, so E[eps | x_t] ~ x_t."""
    x0 = mixture.sample(1000, generator=gen(9))
    model = mixture.eps_model(linear_alphas_cumprod)
    for step in (0, 1, 2):
        t = torch.full((1000,), step)
        a = linear_alphas_cumprod[step].item()
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(1000, 2, generator=gen(10), dtype=torch.float64)
        x0_hat = mixture.posterior_mean(xt, t, linear_alphas_cumprod)
        eps_hat = model(xt, t)
        assert torch.allclose(eps_hat, (xt - math.sqrt(a) * x0_hat) / math.sqrt(1 - a), atol=1e-9)
        # |E[x0|x_t] - x_t| <= (1 - abar) * (|x_t| + |Sigma^-1 (x_t - mu)| terms): a few (1 - abar)/sigma_min
        assert (x0_hat - xt).abs().max() < 10 * (1 - a) / 0.04
        # ... and it denoises: closer to x0 than x_t is, on average
        assert (x0_hat - x0).pow(2).mean() < (xt - x0).pow(2).mean()
    t = torch.full((1000,), 999)
    xt = torch.randn(1000, 2, generator=gen(11), dtype=torch.float64)
    assert (model(xt, t) - xt).abs().max() < 0.02


def test_exact_eps_is_orthogonal_regression(mixture, linear_alphas_cumprod):
    """E[eps | x_t] is the L2 projection: E[(eps - eps_hat(x_t)) g(x_t)] = 0 for any g. Checked
    for g = 1, x, x^2 with a Monte-Carlo standard error (5 sigma)."""
    n = 100_000
    model = mixture.eps_model(linear_alphas_cumprod)
    for step in (20, 150, 500):
        a = linear_alphas_cumprod[step].item()
        x0 = mixture.sample(n, generator=gen(12))
        eps = torch.randn(n, 2, generator=gen(13), dtype=torch.float64)
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        resid = eps - model(xt, torch.full((n,), step))
        for g in (torch.ones_like(xt), xt, xt**2):
            prod = resid * g
            assert (prod.mean(0).abs() < 5 * prod.std(0) / math.sqrt(n)).all()
        # the residual of the true noise is genuinely smaller than that of the naive guess eps = x_t
        assert resid.pow(2).mean() < (eps - xt).pow(2).mean()


@pytest.mark.parametrize("step", [60, 250, 700])
def test_exact_eps_matches_importance_sampling(mixture, linear_alphas_cumprod, step):
    """E[eps | x_t] = sum_i w_i eps_i / sum_i w_i with x0_i ~ p_data, w_i = N(x_t; sqrt(abar) x0_i,
    (1 - abar) I) and eps_i = (x_t - sqrt(abar) x0_i) / sqrt(1 - abar). Self-normalised
    importance sampling; its standard error by the delta method; 5 standard errors allowed."""
    a = linear_alphas_cumprod[step].item()
    n = 400_000
    x0 = mixture.sample(n, generator=gen(14))
    points = torch.tensor([[-0.5, -0.4], [0.3, 0.0], [0.1, 0.6], [1.0, 1.0]], dtype=torch.float64) * math.sqrt(a)
    exact = mixture.eps_model(linear_alphas_cumprod)(points, torch.full((4,), step))
    for p, e in zip(points, exact):
        eps_i = (p - math.sqrt(a) * x0) / math.sqrt(1 - a)
        logw = -0.5 * (eps_i**2).sum(1)
        w = (logw - logw.max()).exp()
        w = w / w.sum()
        est = (w[:, None] * eps_i).sum(0)
        se = ((w[:, None] ** 2) * (eps_i - est) ** 2).sum(0).sqrt()
        assert ((est - e).abs() < 5 * se + 1e-12).all(), (step, p, est, e, se)
        assert (se < 0.05).all()  # the check has teeth: the estimate is precise


def test_dtype_device_and_timestep_lookup(mixture, linear_alphas_cumprod):
    x = torch.randn(3, 2, generator=gen(15))
    t = torch.tensor([0, 1, 2])
    for out in (mixture.eps_model(linear_alphas_cumprod)(x, t), mixture.score(x, t, linear_alphas_cumprod),
                mixture.class_posterior(x, t, linear_alphas_cumprod), mixture.log_prob(x)):
        assert out.dtype == torch.float32 and out.device == x.device
    # [B, 1, 2] inputs are flattened to D = 2 and come back in their own shape
    assert mixture.eps_model(linear_alphas_cumprod)(x[:, None], t).shape == (3, 1, 2)
    assert torch.equal(alpha_bar_at(linear_alphas_cumprod, t), linear_alphas_cumprod[:3])
    with pytest.raises(ValueError, match="timestep"):
        alpha_bar_at(linear_alphas_cumprod, torch.tensor([1000]))
