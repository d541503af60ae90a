"""Tests for ddpm_lib.losses: training losses, the hybrid stop-gradient, the variational bound."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lib import diffusion as diffusion_module
from ddpm_lib import gaussian, losses
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.gaussian import discretized_gaussian_log_likelihood, normal_kl, standard_normal
from ddpm_lib.schedules import cosine_betas, linear_betas, space_timesteps

f64 = torch.float64


def exact_eps_model(x0: torch.Tensor, betas: torch.Tensor):
    """The TRUE eps of x_t for a Dirac data distribution at x0 (E[eps | x_t] is then exact),
    using alpha_bar of the ORIGINAL schedule indexed by the timesteps the model receives."""
    ab = torch.cumprod(1 - betas, 0)

    def model(x_t, t):
        a = ab[t].reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x_t - a.sqrt() * x0.repeat(x_t.shape[0] // x0.shape[0], *([1] * (x0.ndim - 1)))) / (1 - a).sqrt()

    return model


def affine_model(x, t):
    return 0.5 * x + 0.01 * t.reshape(-1, *([1] * (x.ndim - 1)))


# --- training_losses --------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_is_mse_to_the_right_target(prediction):
    d = GaussianDiffusion(linear_betas(100))
    x0, noise = torch.rand(5, 2, 3, dtype=f64) * 2 - 1, torch.randn(5, 2, 3, dtype=f64)
    t = torch.tensor([0, 3, 50, 98, 99])
    out = d.training_losses(affine_model, x0, t, noise, prediction=prediction, return_vb=True)
    ab = torch.cumprod(1 - linear_betas(100), 0)[t].reshape(5, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    mse = ((target - affine_model(x_t, t)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["loss"], mse)
    assert out["vb"].shape == (5,) and not out["vb"].requires_grad


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vb_is_decoder_nll_at_t0_and_kl_after(variance):
    # fixed_large makes the two variances differ, so the KL's direction matters.
    d = GaussianDiffusion(linear_betas(100))
    x0 = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], dtype=f64).repeat(3, 1)
    noise, t = torch.randn(3, 4, dtype=f64), torch.tensor([0, 1, 60])
    out = d.training_losses(affine_model, x0, t, noise, num_levels=5, variance=variance, return_vb=True)
    x_t = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(affine_model, x_t, t, variance=variance)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"], num_levels=5).mean(1)
    q_mean, _, q_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    kl = normal_kl(q_mean, q_log_var, p["mean"], p["log_variance"]).mean(1)
    torch.testing.assert_close(out["vb"][0], nll[0])
    torch.testing.assert_close(out["vb"][1:], kl[1:])
    assert (out["vb"] > 0).all()


def test_vb_vanishes_for_the_exact_model():
    betas = linear_betas(100)
    d = GaussianDiffusion(betas)
    x0 = torch.rand(1, 3, dtype=f64).repeat(99, 1) * 2 - 1
    t = torch.arange(1, 100)
    out = d.training_losses(exact_eps_model(x0, betas), x0, t, torch.randn(99, 3, dtype=f64), loss="vlb")
    assert out["vb"].abs().max() < 1e-10 and out["mse"].max() < 1e-20
    torch.testing.assert_close(out["loss"], out["vb"])


class TwoHeads(torch.nn.Module):
    """A tiny linear model whose prediction and variance channels have separate weights."""

    def __init__(self, C: int):
        super().__init__()
        self.pred, self.var = torch.nn.Linear(C, C), torch.nn.Linear(C, C)

    def forward(self, x, t):
        return torch.cat([self.pred(x), torch.tanh(self.var(x))], dim=1)


def test_hybrid_vb_trains_only_the_variance():
    torch.manual_seed(0)
    d = GaussianDiffusion(linear_betas(50))
    model = TwoHeads(3)
    x0, noise, t = torch.rand(8, 3) * 2 - 1, torch.randn(8, 3), torch.arange(1, 50, 6)[:8]
    out = d.training_losses(model, x0, t, noise, loss="hybrid", variance="learned_range")
    g_pred, g_var = torch.autograd.grad(out["vb"].sum(), [model.pred.weight, model.var.weight], allow_unused=True)
    assert g_pred is None or g_pred.abs().max() == 0  # stop-gradient on the mean (improved DDPM 3.1)
    assert g_var.abs().max() > 0
    torch.testing.assert_close(out["loss"], out["mse"] + 1e-3 * 50 * out["vb"])
    # With a fixed variance the detached bound has nothing left to train.
    out = d.training_losses(lambda x, s: model(x, s)[:, :3], x0, t, noise, loss="hybrid")
    assert not out["vb"].requires_grad and out["loss"].requires_grad
    # Without the stop-gradient ("vlb") the bound does reach the prediction weights.
    out = d.training_losses(model, x0, t, noise, loss="vlb", variance="learned_range")
    g_pred = torch.autograd.grad(out["loss"].sum(), model.pred.weight)[0]
    assert g_pred.abs().max() > 0


def test_training_losses_errors():
    d = GaussianDiffusion(linear_betas(10))
    x0, t = torch.zeros(2, 3), torch.tensor([0, 1])
    zero = lambda x, s: torch.zeros_like(x)
    with pytest.raises(ValueError, match="learned_range variance needs loss='hybrid' or 'vlb'"):
        d.training_losses(zero, x0, t, variance="learned_range")
    with pytest.raises(ValueError, match=r"unknown loss 'l1'.*\['simple', 'hybrid', 'vlb', 'huber'\]"):
        d.training_losses(zero, x0, t, loss="l1")
    with pytest.raises(ValueError, match="unknown prediction"):
        d.training_losses(zero, x0, t, prediction="score")
    with pytest.raises(ValueError, match="shape mismatch"):
        d.training_losses(zero, x0, t, torch.zeros(2, 2))
    noise = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        d.training_losses(zero, torch.full((2, 3), math.nan), t, noise)
    with pytest.raises(ValueError, match="out of range"):
        d.training_losses(zero, x0, torch.tensor([0, 10]), noise)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        d.training_losses(zero, x0, torch.tensor([[0, 1]]), noise)
    # no hidden global RNG: noise or a generator is required, and torch's global state is untouched
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="noise= or generator="):
        d.training_losses(zero, x0, t)
    assert torch.equal(torch.get_rng_state(), state)


def test_simple_loss_computes_the_bound_only_when_asked():
    d = GaussianDiffusion(linear_betas(10))
    x0, t, noise = torch.zeros(2, 3), torch.tensor([0, 1]), torch.randn(2, 3, generator=gen(0))
    calls = []
    import ddpm_lib.losses as losses_module

    original = losses_module.vb_terms

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    losses_module.vb_terms = spy
    try:
        out = d.training_losses(affine_model, x0, t, noise)
        assert set(out) == {"loss", "mse"} and not calls
        out = d.training_losses(affine_model, x0, t, noise, return_vb=True)
        assert "vb" in out and len(calls) == 1
        d.training_losses(affine_model, x0, t, noise, loss="hybrid")
        assert len(calls) == 2
    finally:
        losses_module.vb_terms = original


# --- the variational bound --------------------------------------------------------------


def test_prior_bpd_linear_1000_is_tiny():
    d = GaussianDiffusion(linear_betas(1000))
    x0 = torch.tensor([[-1.0, 0.0, 1.0, 0.5]], dtype=f64)
    # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dim, with ab = alpha_bar_T ~ 4.04e-5.
    ab = float(torch.cumprod(1 - linear_betas(1000), 0)[-1])
    kl = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x0**2 - 1)
    torch.testing.assert_close(d.prior_bpd(x0), kl.mean(1) / math.log(2))
    # Measured: 1.638e-5 bits/dim for this x0; at most ~2.9e-5 (x0 = +-1) for data in [-1, 1].
    assert d.prior_bpd(x0).item() == pytest.approx(1.638e-5, rel=1e-3)
    assert d.prior_bpd(torch.ones(1, 4, dtype=f64)).item() < 3e-5


def test_nll_of_a_dirac_under_the_exact_model():
    # Data = one point x0; the exact model makes every KL term 0, so the bound is
    # prior + decoder, and the decoder is a Gaussian of mean x0 and variance beta_tilde_1
    # integrated over x0's bin of half-width 1 / (L - 1): closed form with erf.
    betas, L = cosine_betas(20), 17
    d = GaussianDiffusion(betas)
    x0 = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], dtype=f64)
    out = d.nll_bits_per_dim(exact_eps_model(x0, betas), x0, num_levels=L, generator=torch.Generator().manual_seed(0))
    assert out["vb_bpd"].shape == (1, 20) and all(torch.isfinite(v).all() for v in out.values())
    assert out["vb_bpd"][:, 1:].abs().max() < 1e-10
    z = (1 / (L - 1)) / math.sqrt(float(d.posterior_variance[1]) * 2)
    p_inner, p_edge = math.erf(z), 0.5 * (1 + math.erf(z))
    decoder = -(2 * math.log(p_edge) + 2 * math.log(p_inner)) / 4 / math.log(2)
    assert out["decoder_bpd"].item() == pytest.approx(decoder, rel=1e-8)
    torch.testing.assert_close(out["decoder_bpd"], out["vb_bpd"][:, 0])
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"].sum(1))
    torch.testing.assert_close(out["prior_bpd"], d.prior_bpd(x0))


def test_nll_exact_model_on_a_respaced_chain():
    # The model is exact only if it receives ORIGINAL timesteps: then the KL terms vanish.
    betas = linear_betas(100)
    r = GaussianDiffusion(betas).respace(space_timesteps(100, [10]))
    x0 = torch.tensor([[0.25, -0.5]], dtype=f64)
    out = r.nll_bits_per_dim(exact_eps_model(x0, betas), x0, generator=torch.Generator().manual_seed(1))
    assert out["vb_bpd"].shape == (1, 10) and out["vb_bpd"][:, 1:].abs().max() < 1e-10


def test_nll_terms_sum_and_batch_t_invariance():
    d = GaussianDiffusion(linear_betas(20))
    x0 = torch.rand(3, 2, 2, 2, dtype=f64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    model = lambda x, t, y: 0.1 * x + 0.01 * y.reshape(-1, 1, 1, 1)  # exercises model_kwargs repetition
    def run(**kw):
        gen = torch.Generator().manual_seed(3)
        return d.nll_bits_per_dim(model, x0, model_kwargs={"y": y}, generator=gen, **kw)

    out, out4 = run(), run(batch_t=7)
    assert out["vb_bpd"].shape == (3, 20) and torch.isfinite(out["total_bpd"]).all()
    assert (out["vb_bpd"] > 0).all()
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"].sum(1))
    for key in out:
        torch.testing.assert_close(out4[key], out[key])


def test_nll_checks_the_data_range():
    d = GaussianDiffusion(linear_betas(5))
    with pytest.raises(ValueError, match=r"data must lie in \[-1, 1\]"):
        d.nll_bits_per_dim(lambda x, t: x, torch.tensor([[0.0, 1.5]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        d.nll_bits_per_dim(lambda x, t: x, torch.tensor([[0.0, math.inf]]))


# --- devices: one noise helper, draws on the generator's device -------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_standard_normal_draws_on_the_generators_device_then_moves():
    """A CPU generator fills a tensor on another device ('meta' stands in for CUDA here): drawn on
    the CPU, then moved; on the CPU the numbers are exactly the generator's own draws."""
    g = gen(0)
    out = standard_normal((3, 4), g, dtype=f64, device="meta")
    assert out.device.type == "meta" and out.shape == (3, 4) and out.dtype == f64
    # the 12 numbers came from the CPU generator (a draw made on 'meta' would not advance it)
    reference = gen(0)
    torch.randn(3, 4, generator=reference, dtype=f64)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=reference))
    assert torch.equal(standard_normal((3, 4), gen(0), dtype=f64, device="cpu"),
                       torch.randn(3, 4, generator=gen(0), dtype=f64))
    assert standard_normal((2,), gen(0)).device.type == "cpu"  # default: the generator's device


def test_q_sample_losses_and_nll_draw_noise_through_the_one_helper(monkeypatch):
    """q_sample, training_losses and nll_bits_per_dim all draw through ``standard_normal`` with the
    caller's generator and the data's device (so a CPU generator works with CUDA data)."""
    calls = []

    def spy(shape, generator=None, *, dtype=None, device=None):
        calls.append((generator, torch.device(device)))
        return gaussian.standard_normal(shape, generator, dtype=dtype, device=device)

    monkeypatch.setattr(diffusion_module, "standard_normal", spy)
    monkeypatch.setattr(losses, "standard_normal", spy)
    d = GaussianDiffusion(linear_betas(10))
    x0, t, g = torch.rand(4, 3, dtype=f64) * 2 - 1, torch.tensor([0, 3, 6, 9]), gen(0)
    x_t = d.q_sample(x0, t, generator=g)
    d.training_losses(affine_model, x0, t, generator=g)
    d.nll_bits_per_dim(lambda x, s: 0.5 * x, x0, generator=g)
    assert len(calls) == 1 + 1 + 10 and all(c == (g, x0.device) for c in calls)
    noise = torch.randn(x0.shape, generator=gen(0), dtype=f64)  # the generator's own stream
    torch.testing.assert_close(x_t, d.q_sample(x0, t, noise), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_data():
    """q_sample, training_losses and nll_bits_per_dim on CUDA data with a CPU generator give the
    CPU results (same draws, moved); on CUDA a NaN input is not checked on the host (no per-step
    sync): it shows up as a NaN loss, which the training loop checks."""
    d_cpu = GaussianDiffusion(linear_betas(50))
    d = d_cpu.to("cuda")
    x0, t = torch.rand(4, 3, dtype=f64) * 2 - 1, torch.tensor([0, 10, 20, 49])
    out = d.q_sample(x0.cuda(), t.cuda(), generator=gen(0))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), d_cpu.q_sample(x0, t, generator=gen(0)))
    ref, got = d_cpu.training_losses(affine_model, x0, t, generator=gen(1)), d.training_losses(affine_model, x0.cuda(), t.cuda(), generator=gen(1))
    for key in ref:
        torch.testing.assert_close(got[key].cpu(), ref[key])
    model = lambda x, s: 0.5 * x  # noqa: E731
    ref, got = d_cpu.nll_bits_per_dim(model, x0, generator=gen(2)), d.nll_bits_per_dim(model, x0.cuda(), generator=gen(2))
    torch.testing.assert_close(got["total_bpd"].cpu(), ref["total_bpd"])
    bad = d.training_losses(affine_model, torch.full((4, 3), math.nan, dtype=f64, device="cuda"), t.cuda(), generator=gen(1))
    assert torch.isnan(bad["loss"]).all()


def test_hybrid_training_learns_the_optimal_variance():
    """A real (small) training of the hybrid loss (Nichol & Dhariwal 2021, eq. 16) with a learned
    range (eq. 15). For Gaussian data N(mu, s^2 I) the bound's term L_{t-1} is minimised over the
    variance at beta_tilde_t + c1_t^2 Var(x0 | x_t) (c1: DDPM eq. 7's x0 coefficient), so with the
    exact eps held fixed, the trained interpolation weights v_t must converge to the v that gives
    that variance. Measured (seed 0): max |v - v_opt| over t = 2..T is 0.071 after 400 steps (the
    threshold is 0.15); the same training with the interpolation swapped (beta <-> beta_tilde)
    fails it."""
    from ddpm_lib.analytic import GaussianMixture

    f64 = torch.float64
    mu, s, T = 0.3, 0.2, 20
    d = GaussianDiffusion(cosine_betas(T))
    data = GaussianMixture(torch.tensor([[mu, -mu]], dtype=f64), torch.tensor([s], dtype=f64), torch.ones(1, dtype=f64))
    eps_exact = data.eps_model(d)

    class LearnedRange(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.zeros(T, dtype=f64))

        def forward(self, x, t):
            return torch.cat([eps_exact(x, t), self.v[t, None].expand_as(x)], 1)

    model = LearnedRange()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = gen(0)
    for _ in range(400):
        x0 = data.sample(512, generator=g)
        t = torch.randint(T, (512,), generator=g)
        loss = d.training_losses(model, x0, t, generator=g, loss="hybrid", variance="learned_range")["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = d.alphas_cumprod
    target = d.posterior_variance + d.posterior_mean_coef1**2 * s**2 * (1 - a) / (a * s**2 + 1 - a)
    log_bt, log_b = d.posterior_log_variance_clipped, d.betas.log()
    v_opt = 2 * (target.log() - log_bt) / (log_b - log_bt) - 1
    error = (model.v.detach() - v_opt)[1:].abs().max().item()
    assert error < 0.15, (error, model.v.detach()[1:6], v_opt[1:6])


def test_huber_loss_is_quadratic_then_linear():
    """Huber (1964): e^2 / 2 for |e| <= delta, delta (|e| - delta / 2) beyond, mean over dimensions;
    quadratic errors give half the MSE, and one outlier counts linearly, not quadratically."""
    d = GaussianDiffusion(linear_betas(10))
    x0, t = torch.zeros(2, 4, dtype=torch.float64), torch.tensor([3, 7])
    noise = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 10.0]], dtype=torch.float64)
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731  error e = noise
    out = d.training_losses(zero, x0, t, noise, loss="huber", huber_delta=1.0)
    expected = torch.tensor([(0.01 + 0.04 + 0.09) / 2 / 4, (0.25 / 2 + 1.0 * (10.0 - 0.5)) / 4], dtype=torch.float64)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["mse"], (noise**2).mean(1))
    with pytest.raises(ValueError, match="huber_delta"):
        d.training_losses(zero, x0, t, noise, loss="huber", huber_delta=0.0)
    with pytest.raises(ValueError, match="never train the variance"):
        d.training_losses(zero, x0, t, noise, loss="huber", variance="learned_range")
