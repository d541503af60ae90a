"""Tests for ddpm_lib.diffusion: schedule buffers, q, the posterior, conversions, p_mean_variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_lib.checks import check_timesteps
from ddpm_lib.diffusion import GaussianDiffusion, extract
from ddpm_lib.schedules import linear_betas, rescale_zero_terminal_snr, space_timesteps

FAST = settings(max_examples=40, deadline=None)
f64 = torch.float64


def full_t(value: int, B: int) -> torch.Tensor:
    return torch.full((B,), value, dtype=torch.long)


def exact_eps_model(x0: torch.Tensor, betas: torch.Tensor):
    """A model returning the TRUE eps of x_t for a known x0, indexing an independently computed
    alpha_bar by the ORIGINAL timesteps it is called with."""
    ab = torch.cumprod(1 - betas, 0)

    def model(x_t, t):
        a = ab[t].reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return model


# --- buffers -----------------------------------------------------------------------------


def test_buffers_by_hand_T3():
    d = GaussianDiffusion(torch.tensor([0.1, 0.2, 0.3], dtype=f64))
    assert d.T == d.num_timesteps == 3 and d.timesteps.tolist() == [0, 1, 2]
    # alpha_bar = 0.9, 0.9 * 0.8, 0.72 * 0.7
    expect = {
        "alphas_cumprod": [0.9, 0.72, 0.504],
        "alphas_cumprod_prev": [1.0, 0.9, 0.72],
        "alphas_cumprod_next": [0.72, 0.504, 0.0],
        # beta_tilde = beta (1 - ab_prev) / (1 - ab): 0, 0.2 * 0.1 / 0.28, 0.3 * 0.28 / 0.496
        "posterior_variance": [0.0, 1 / 14, 21 / 124],
        # coef1 = sqrt(ab_prev) beta / (1 - ab)
        "posterior_mean_coef1": [1.0, math.sqrt(0.9) * 0.2 / 0.28, math.sqrt(0.72) * 0.3 / 0.496],
        # coef2 = sqrt(alpha) (1 - ab_prev) / (1 - ab)
        "posterior_mean_coef2": [0.0, math.sqrt(0.8) * 0.1 / 0.28, math.sqrt(0.7) * 0.28 / 0.496],
        # index 0 is log beta_tilde_1, not log 0 (pitfall 5)
        "posterior_log_variance_clipped": [math.log(1 / 14), math.log(1 / 14), math.log(21 / 124)],
        "sqrt_alphas_cumprod": [math.sqrt(0.9), math.sqrt(0.72), math.sqrt(0.504)],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(0.1), math.sqrt(0.28), math.sqrt(0.496)],
    }
    for name, values in expect.items():
        buf = getattr(d, name)
        assert buf.dtype == f64, name
        np.testing.assert_allclose(buf.numpy(), values, rtol=1e-12, atol=1e-15, err_msg=name)


@FAST
@given(st.lists(st.floats(1e-6, 0.999), min_size=1, max_size=60))
def test_posterior_variance_between_zero_and_beta(betas):
    d = GaussianDiffusion(torch.tensor(betas, dtype=f64))
    assert bool((d.posterior_variance >= 0).all())
    assert bool((d.posterior_variance <= d.betas * (1 + 1e-12)).all())
    assert bool((d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all())
    assert torch.isfinite(d.posterior_log_variance_clipped).all()


def test_to_returns_a_copy_and_from_name():
    d = GaussianDiffusion.from_name("cosine", T=50)
    e = d.to("cpu")
    assert e is not d and e.T == 50 and e.alphas_cumprod.dtype == f64
    torch.testing.assert_close(e.posterior_variance, d.posterior_variance)
    with pytest.raises(ValueError, match="unknown schedule"):
        GaussianDiffusion.from_name("sigmoid")


# --- extract -----------------------------------------------------------------------------


def test_extract_shape_and_dtype():
    a = torch.arange(5, dtype=f64)
    x = torch.zeros(3, 2, 4, 4)
    out = extract(a, torch.tensor([4, 0, 2]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [4.0, 0.0, 2.0]
    # coefficients are never applied in a half type: bf16 would round 0.99995 to 1.0 (pitfall 6)
    near_one = torch.tensor([0.99995], dtype=f64)
    assert extract(near_one, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bfloat16)).dtype == torch.float32
    assert extract(near_one, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bfloat16)).item() < 1.0
    assert extract(a, torch.tensor([1]), torch.zeros(1, 2, dtype=f64)).dtype == f64


def test_check_timesteps_at_entry_points():
    x = torch.zeros(3, 2, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        check_timesteps(torch.tensor([0, 5, 1]), 5, 3)
    with pytest.raises(ValueError, match="out of range"):
        check_timesteps(torch.tensor([0, -1, 1]), 5, 3)
    with pytest.raises(ValueError, match="integer tensor"):
        check_timesteps(torch.tensor([0.0, 1.0, 2.0]), 5, 3)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        check_timesteps(torch.tensor([0, 1]), 5, 3)
    d = GaussianDiffusion(linear_betas(5))
    with pytest.raises(ValueError, match="out of range"):
        d.q_sample(x, torch.tensor([0, 5, 1]), torch.zeros_like(x))


# --- q(x_t | x_0) -----------------------------------------------------------------------


def test_q_sample_monte_carlo_marginal():
    d = GaussianDiffusion(linear_betas(1000))
    n, ts = 200_000, [0, 499, 999]
    x0 = torch.tensor([-0.8, 0.3, 1.0], dtype=f64).repeat(n * len(ts), 1)  # [3n, 3]
    t = torch.tensor(ts).repeat_interleave(n)
    x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(0)).reshape(len(ts), n, 3)
    for i, step in enumerate(ts):
        ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[step])
        var = 1 - ab
        # Standard error of the sample mean is sqrt(var / n) and, for Gaussian draws, that of
        # the sample variance var * sqrt(2 / (n - 1)); 5 standard errors makes a false
        # failure a ~1e-6 event while a wrong coefficient (even 1% off) is caught.
        np.testing.assert_allclose(x_t[i].mean(0).numpy(), math.sqrt(ab) * x0[0].numpy(), atol=5 * math.sqrt(var / n))
        np.testing.assert_allclose(x_t[i].var(0).numpy(), var, atol=5 * var * math.sqrt(2 / (n - 1)))


def test_q_mean_variance_and_noise_argument():
    d = GaussianDiffusion(linear_betas(100))
    x0, eps, t = torch.randn(4, 3, dtype=f64), torch.randn(4, 3, dtype=f64), torch.tensor([0, 10, 50, 99])
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(d.q_sample(x0, t, eps), mean + var.sqrt() * eps)
    torch.testing.assert_close(log_var.exp(), var)


# --- q(x_{t-1} | x_t, x_0) --------------------------------------------------------------


def test_posterior_equals_gaussian_conditioning_for_all_t():
    T = 1000
    d = GaussianDiffusion(linear_betas(T))
    beta = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - beta)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    # Joint of (x_{t-1}, x_t) given x0: x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) e1 and
    # x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) e2; condition the first on the second.
    var11 = 1 - ab_prev
    cov12 = np.sqrt(1 - beta) * (1 - ab_prev)
    var22 = (1 - beta) * (1 - ab_prev) + beta
    rng = np.random.default_rng(0)
    x0, x_t = rng.normal(size=(T, 4)), rng.normal(size=(T, 4))
    mean_ref = np.sqrt(ab_prev)[:, None] * x0 + (cov12 / var22)[:, None] * (x_t - np.sqrt(ab)[:, None] * x0)
    var_ref = var11 - cov12**2 / var22
    mean, var, log_var = d.q_posterior_mean_variance(torch.from_numpy(x0), torch.from_numpy(x_t), torch.arange(T))
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var.flatten().numpy(), var_ref, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(log_var.flatten()[1:].numpy(), np.log(var_ref[1:]), rtol=1e-9)


# --- eps / x0 / v -----------------------------------------------------------------------


def test_conversions_round_trip():
    """x_t and v are built here in numpy from an INDEPENDENT alpha-bar (cumprod of 1 - beta of the
    cosine schedule), so a wrong alpha-bar in GaussianDiffusion fails, not just an inconsistent one."""
    d = GaussianDiffusion.from_name("cosine", T=1000)
    B = 1000
    rng = np.random.default_rng(0)
    x0_np, eps_np = rng.normal(size=(B, 3)), rng.normal(size=(B, 3))
    ab = np.cumprod(1.0 - d.betas.numpy())[:, None]
    x_t = torch.from_numpy(np.sqrt(ab) * x0_np + np.sqrt(1 - ab) * eps_np)
    v_np = np.sqrt(ab) * eps_np - np.sqrt(1 - ab) * x0_np  # v by its definition (Salimans & Ho 2022, sec. 4)
    x0, eps, v, t = torch.from_numpy(x0_np), torch.from_numpy(eps_np), torch.from_numpy(v_np), torch.arange(B)
    close = dict(rtol=1e-6, atol=1e-6)  # x0 from eps divides by sqrt(alpha_bar) ~ 5e-5 at t = T-1
    torch.testing.assert_close(d.q_sample(x0, t, eps), x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.predict_v(x0, t, eps), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0, **close)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, **close)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), x0, **close)
    torch.testing.assert_close(d.predict_eps_from_v(x_t, t, v), eps, **close)


def test_v_prediction_is_finite_at_zero_terminal_snr():
    # Pitfall 2: at alpha_bar_T = 0 x0 = -v, eps = x_t: both finite, unlike eps-prediction.
    d = GaussianDiffusion(rescale_zero_terminal_snr(linear_betas(100)))
    x_t, v, t = torch.randn(2, 3, dtype=f64), torch.randn(2, 3, dtype=f64), full_t(99, 2)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), -v)
    torch.testing.assert_close(d.predict_eps_from_v(x_t, t, v), x_t)
    out = d.p_mean_variance(lambda x, s: v, x_t, t, prediction="v")
    assert torch.isfinite(out["mean"]).all() and torch.isfinite(out["log_variance"]).all()


# --- p(x_{t-1} | x_t) -------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_p_mean_with_true_prediction_is_true_posterior_mean(prediction):
    betas = linear_betas(200)
    d = GaussianDiffusion(betas)
    B = 200
    x0, eps, t = torch.rand(B, 2, 4, 4, dtype=f64) * 2 - 1, torch.randn(B, 2, 4, 4, dtype=f64), torch.arange(B)
    x_t = d.q_sample(x0, t, eps)
    eps_model = exact_eps_model(x0, betas)
    ab = torch.cumprod(1 - betas, 0)[t].reshape(B, 1, 1, 1)
    to_pred = {"eps": lambda e: e, "x0": lambda e: x0, "v": lambda e: ab.sqrt() * e - (1 - ab).sqrt() * x0}
    out = d.p_mean_variance(lambda x, s: to_pred[prediction](eps_model(x, s)), x_t, t, prediction=prediction)
    true_mean, true_var, true_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(out["mean"], true_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out["pred_x0"], x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out["pred_eps"], eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out["variance"], true_var.expand_as(x_t))
    torch.testing.assert_close(out["log_variance"], true_log_var.expand_as(x_t))


def test_clip_denoised_rederives_eps():
    d = GaussianDiffusion(linear_betas(100))
    B = 4
    x_t, t = torch.randn(B, 3, dtype=f64), torch.tensor([0, 5, 50, 99])
    x0_pred = torch.tensor([[3.0, -2.0, 0.5]], dtype=f64).expand(B, 3)
    out = d.p_mean_variance(lambda x, s: x0_pred, x_t, t, prediction="x0", clip_denoised=True)
    clipped = torch.tensor([[1.0, -1.0, 0.5]], dtype=f64).expand(B, 3)
    ab = d.alphas_cumprod[t][:, None]
    torch.testing.assert_close(out["pred_x0"], clipped)
    torch.testing.assert_close(out["pred_eps"], (x_t - ab.sqrt() * clipped) / (1 - ab).sqrt())
    torch.testing.assert_close(out["mean"], d.q_posterior_mean(clipped, x_t, t))
    # The same with an eps model: eps is recomputed from the clipped x0, not passed through.
    big_eps = -10 * torch.ones(B, 3, dtype=f64)
    out = d.p_mean_variance(lambda x, s: big_eps, x_t, t, clip_denoised=True)
    assert out["pred_x0"].abs().max() <= 1
    torch.testing.assert_close(out["pred_eps"], d.predict_eps_from_x0(x_t, t, out["pred_x0"]))
    assert not torch.allclose(out["pred_eps"], big_eps)


def test_learned_range_endpoints():
    d = GaussianDiffusion(linear_betas(50))
    B = 50
    x_t, t = torch.randn(B, 2, 3, dtype=f64), torch.arange(B)
    for v, expected in [(1.0, d.betas.log()), (-1.0, d.posterior_log_variance_clipped)]:
        model = lambda x, s, v=v: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        out = d.p_mean_variance(model, x_t, t, variance="learned_range")
        assert out["model_output"].shape == (B, 4, 3)
        torch.testing.assert_close(out["log_variance"], expected.reshape(B, 1, 1).expand(B, 2, 3))
        torch.testing.assert_close(out["variance"], out["log_variance"].exp())
    # Midpoint: the geometric mean of beta and beta_tilde (improved DDPM eq. 15 at frac = 1/2).
    model = lambda x, s: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)
    out = d.p_mean_variance(model, x_t, t, variance="learned_range")
    half = 0.5 * (d.betas.log() + d.posterior_log_variance_clipped)
    torch.testing.assert_close(out["log_variance"][:, 0, 0], half)


def test_fixed_large_uses_beta_tilde_1_at_index_0():
    d = GaussianDiffusion(linear_betas(10))
    x_t, t = torch.randn(10, 1, dtype=f64), torch.arange(10)
    out = d.p_mean_variance(lambda x, s: torch.zeros_like(x), x_t, t, variance="fixed_large")
    var = out["variance"].flatten()
    assert var[0] == d.posterior_variance[1]
    torch.testing.assert_close(var[1:], d.betas[1:])
    torch.testing.assert_close(out["log_variance"].flatten(), var.log())
    small = d.p_mean_variance(lambda x, s: torch.zeros_like(x), x_t, t)
    torch.testing.assert_close(small["variance"].flatten(), d.posterior_variance)


# --- respacing --------------------------------------------------------------------------


def test_respaced_chain_calls_model_with_original_timesteps():
    d = GaussianDiffusion(linear_betas(1000))
    kept = space_timesteps(1000, "ddim10")
    r = d.respace(kept)
    assert r.T == 10 and r.timesteps.tolist() == kept
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[kept])
    seen = []

    def recording_model(x, s):
        seen.append(s.clone())
        return torch.zeros_like(x)

    x = torch.randn(3, 2)
    for i in range(10):
        r.p_mean_variance(recording_model, x, full_t(i, 3))
    assert [s.tolist() for s in seen] == [[k] * 3 for k in kept]
    # Respacing a respaced chain composes: indices into the short chain map to original steps.
    rr = r.respace([1, 4, 9])
    assert rr.timesteps.tolist() == [kept[1], kept[4], kept[9]]
    torch.testing.assert_close(rr.alphas_cumprod, d.alphas_cumprod[[kept[1], kept[4], kept[9]]])


# --- errors ------------------------------------------------------------------------------


def test_clear_errors():
    d = GaussianDiffusion(linear_betas(10))
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    zero = lambda x, s: torch.zeros_like(x)
    with pytest.raises(ValueError, match="shape mismatch"):
        d.q_sample(x, t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="noise= or generator="):
        d.q_sample(x, t)
    with pytest.raises(ValueError, match=r"shape mismatch: x0 \(2, 3\) vs x_t \(2, 4\)"):
        d.q_posterior_mean_variance(x, torch.zeros(2, 4), t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        d.q_posterior_mean_variance(x, x, torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        d.q_sample(x, torch.tensor([0, 10]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown variance 'fixed'.*fixed_small"):
        d.p_mean_variance(zero, x, t, variance="fixed")
    with pytest.raises(ValueError, match="unknown prediction 'score'.*'eps', 'x0', 'v'"):
        d.p_mean_variance(zero, x, t, prediction="score")
    with pytest.raises(ValueError, match="2C channels"):
        d.p_mean_variance(zero, x, t, variance="learned_range")
    with pytest.raises(ValueError, match="shape mismatch"):
        d.p_mean_variance(lambda x, s: torch.zeros(2, 6), x, t)
    with pytest.raises(ValueError, match="out of range"):
        d.p_mean_variance(zero, x, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="timesteps must have length"):
        GaussianDiffusion(linear_betas(10), timesteps=[0, 1])
    with pytest.raises(ValueError, match="betas must"):
        GaussianDiffusion(torch.tensor([0.1, 1.0, 0.2]))
