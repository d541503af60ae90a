"""Samplers against two oracles, plus their conventions.

1. The Gaussian-mixture oracle (book chapter 5): driven by the EXACT eps of a 2-D, 3-component
   mixture, every sampler must reproduce the mixture's weights, means and covariances, within a
   statistical tolerance for the sample size plus a stated, measured allowance for the
   sampler's own discretisation error.
2. The linear-Gaussian oracle: for Gaussian data N(mu, s^2) the exact eps is affine in x_t, so
   each sampler is an affine Gaussian recursion whose output mean and variance can be computed
   EXACTLY, discretisation error included (``predicted_law`` below, written from the papers'
   update equations with the textbook Gaussian conditional, independently of
   ``ddpm_lib.analytic``). Here there is no allowance at all, which makes it sharp enough to
   catch a timestep that is off by one.

Both checks are themselves tested: broken variants (shifted timesteps, wrong grid) must FAIL them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ddpm_lib import samplers
from ddpm_lib.analytic import GaussianMixture
from ddpm_lib.samplers import (
    alpha_bar_at,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    initial_noise,
)
from ddpm_lib.predictions import x0_from_eps
from ddpm_lib.schedules import sampling_timesteps, space_timesteps


def predict_x0(x, eps, alpha_bar):
    return x0_from_eps(x, eps, math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar))


def leading(steps):
    return sampling_timesteps(1000, steps, spacing="leading")


def respaced_100():
    return space_timesteps(1000, [100])


def dpm_20(d):
    return dpm_solver_timesteps(d.alphas_cumprod, 20)

pytestmark = pytest.mark.usefixtures("single_thread")

K_SIGMA = 4.5  # statistical tolerance in standard errors (two-sided p ~ 7e-6 per statistic)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(model, shift: int):
    """A broken model wrapper: the exact eps queried at t + shift (an off-by-one timestep)."""
    return lambda x, t, y=None: model(x, (t + shift).clamp(0, 999), y)


# ---------------------------------------------------------------------------------------------
# 1. The Gaussian-mixture oracle
# ---------------------------------------------------------------------------------------------


def mixture_errors(x: torch.Tensor, mixture: GaussianMixture) -> dict[str, float]:
    """How far samples x [n, 2] are from the mixture, each error divided by its tolerance unit.

    Samples are labelled by their most likely component (the components are > 4.5 combined
    standard deviations apart, see conftest). For each statistic, the returned value is
    ``(|error| - K_SIGMA * standard_error)``, in the units the allowances use:

    * ``prop``: |p_hat_k - w_k| minus K_SIGMA binomial standard errors sqrt(w(1 - w)/n), absolute;
    * ``mean``: |mean_hat_k - mu_k| per coordinate in units of that coordinate's std, minus
      K_SIGMA / sqrt(n_k) (the standard error of a mean is std / sqrt(n_k));
    * ``cov``: eigenvalues of the WHITENED sample covariance S_k^{-1/2} C_hat_k S_k^{-1/2}, i.e. the
      relative error of the variance along every direction, |lambda - 1|, minus K_SIGMA *
      sqrt(2 / n_k) (the relative standard error of a Gaussian sample variance).
    """
    n = len(x)
    labels = (mixture.component_log_prob(x) + mixture.weights.log()).argmax(1)
    p_hat = torch.bincount(labels, minlength=mixture.num_components).double() / n
    w = mixture.weights
    errors = {"prop": ((p_hat - w).abs() - K_SIGMA * (w * (1 - w) / n).sqrt()).max().item(), "mean": -1.0, "cov": -1.0}
    for k in range(mixture.num_components):
        xk = x[labels == k].double()
        nk = len(xk)
        std = mixture.covs[k].diagonal().sqrt()
        mean_err = ((xk.mean(0) - mixture.means[k]).abs() / std).max().item() - K_SIGMA / math.sqrt(nk)
        whiten = torch.linalg.inv(torch.linalg.cholesky(mixture.covs[k]))
        eig = torch.linalg.eigvalsh(whiten @ torch.cov(xk.T) @ whiten.T)
        cov_err = (eig - 1).abs().max().item() - K_SIGMA * math.sqrt(2 / nk)
        errors["mean"], errors["cov"] = max(errors["mean"], mean_err), max(errors["cov"], cov_err)
    return errors


def assert_reproduces_mixture(x, mixture, allowance: dict[str, float]):
    errors = mixture_errors(x, mixture)
    bad = {k: round(v, 4) for k, v in errors.items() if v > allowance[k]}
    assert not bad, f"beyond statistics + allowance {allowance}: {bad} (all: {errors})"


N_MIX = 20_000  # CPU cost ~13 s per 1000-step sampler on one core

# Systematic allowances: the sampler's own discretisation error, MEASURED with the exact model
# at n = 100k (1000-step samplers) or 200k (few-step), seed 0, and rounded up by ~25%.
# Measured max errors (mean in stds / relative variance along the worst direction):
#   DDPM 1000 fixed_small 0.007 / 0.086 (beta-tilde is too small where the first steps are coarse)
#   DDPM 1000 fixed_large 0.008 / 0.027   DDIM 1000 (eta 0) 0.017 / 0.038
#   DDPM 100 respaced     0.039 / 0.41    DDIM 100, eta 1     0.039 / 0.41
#   DDIM 50 (eta 0)       0.13  / 0.34    DPM-Solver++(2M) 20 0.050 / 0.19
# Few-step samplers lose variance in the thin directions (std 0.08-0.1): their last step
# jumps from t = 10-20 (noise std 0.05-0.08) straight to x0_hat, a data-prediction that is
# shrunk towards the component means. The exact 1-D recursion of ``predicted_law`` shows losses
# of the same size (DDIM-50 keeps 55-61% of the variance of an N(0, 0.08^2..0.1^2) direction), and
# section 2 checks every sampler against that recursion with NO allowance: the allowances here
# are the samplers' discretisation, not room for errors in them.
SAMPLERS = {
    "ddpm_fixed_small": (lambda m, d, n, g, x: ddpm_sample(m, d, (n, 2), generator=g, x_T=x),
                         {"prop": 0.0, "mean": 0.015, "cov": 0.11}),
    "ddpm_fixed_large": (lambda m, d, n, g, x: ddpm_sample(m, d, (n, 2), variance="fixed_large", generator=g, x_T=x),
                         {"prop": 0.0, "mean": 0.015, "cov": 0.04}),
    "ddpm_respaced_100": (lambda m, d, n, g, x: ddpm_sample(m, d, (n, 2), timesteps=respaced_100(), generator=g,
                                                            x_T=x),
                          {"prop": 0.005, "mean": 0.05, "cov": 0.5}),
    "ddim_50": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=50, spacing="leading", generator=g, x_T=x),
                {"prop": 0.005, "mean": 0.16, "cov": 0.42}),
    "ddim_1000": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=1000, generator=g, x_T=x),
                  {"prop": 0.0, "mean": 0.025, "cov": 0.05}),
    "ddim_100_eta1": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=100, spacing="leading", eta=1.0,
                                                        generator=g, x_T=x),
                      {"prop": 0.005, "mean": 0.05, "cov": 0.5}),
    "dpm_solver_pp_20": (lambda m, d, n, g, x: dpm_solver_pp_sample(m, d, (n, 2), timesteps=dpm_20(d), generator=g,
                                                                    x_T=x),
                         {"prop": 0.005, "mean": 0.065, "cov": 0.24}),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_mixture(name, mixture, diffusion):
    sample, allowance = SAMPLERS[name]
    x_T = torch.randn(N_MIX, 2, generator=gen(0), dtype=torch.float64)
    x = sample(mixture.eps_model(diffusion), diffusion, N_MIX, gen(1), x_T)
    assert x.shape == (N_MIX, 2) and x.dtype == torch.float64
    assert_reproduces_mixture(x, mixture, allowance)


def test_mixture_check_rejects_broken_timesteps(mixture, diffusion):
    """The mixture check is not vacuous: the same check, with the same allowances, FAILS on
    samplers whose timesteps are wrong. (Off-by-one timesteps in EVERY sampler are caught by the
    sharper exact-law check of section 2, ``test_gaussian_law_rejects_off_by_one_timesteps``.)"""
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(N_MIX, 2, generator=gen(0), dtype=torch.float64)
    kept = torch.tensor(space_timesteps(1000, [100]))
    # (a) pitfall 10: the respaced chain's INDEX passed to the model instead of the original step
    index_bug = lambda x, t, y=None: model(x, torch.searchsorted(kept, t))  # noqa: E731
    # (b) pitfall 1: a DDIM step that goes to t - 1 of the original chain, not the previous kept step
    for name, x in [
        ("ddpm_respaced_100", ddpm_sample(index_bug, diffusion, (N_MIX, 2), timesteps=kept, generator=gen(1),
                                          x_T=x_T)),
        ("ddim_50", ddim_to_t_minus_1(model, diffusion, x_T, steps=50)),
    ]:
        with pytest.raises(AssertionError):
            assert_reproduces_mixture(x, mixture, SAMPLERS[name][1])


def test_mixture_check_detects_a_small_mean_offset(mixture, diffusion):
    """The power of the mixture check itself (not a timestep bug): DPM-Solver++ 20 output shifted
    by 0.03 (0.12-0.4 of a component's std) fails, the unshifted output passes."""
    x_T = torch.randn(N_MIX, 2, generator=gen(0), dtype=torch.float64)
    x = dpm_solver_pp_sample(mixture.eps_model(diffusion), diffusion, (N_MIX, 2), timesteps=dpm_20(diffusion), x_T=x_T)
    assert_reproduces_mixture(x, mixture, SAMPLERS["dpm_solver_pp_20"][1])
    with pytest.raises(AssertionError):
        assert_reproduces_mixture(x + 0.03, mixture, SAMPLERS["dpm_solver_pp_20"][1])


def ddim_to_t_minus_1(model, diffusion, x, *, steps):
    """A BROKEN DDIM: from each kept t it steps to alpha_bar of t - 1 (the original chain's
    previous step) instead of the previous KEPT timestep (pitfall 1)."""
    for t in reversed(leading(steps)):
        alpha_bar = float(diffusion.alphas_cumprod[t])
        alpha_bar_prev = float(diffusion.alphas_cumprod[t - 1]) if t > 0 else 1.0
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x = ddim_step(predict_x0(x, eps, alpha_bar), eps, alpha_bar_prev, 0.0, None)
    return x


# ---------------------------------------------------------------------------------------------
# 2. The linear-Gaussian oracle: exact output law of each discretised sampler
# ---------------------------------------------------------------------------------------------

MU, S = 0.3, 0.05  # 1-D data N(MU, S^2); thin, so the first (coarse) steps matter
N_GAUSS = 50_000  # stochastic samplers: the residual's mean and variance are tested statistically
N_DETERMINISTIC = 2_000  # deterministic samplers: every sample is checked exactly, no statistics
DETERMINISTIC_ATOL = 1e-10  # float64 rounding over <= 1000 steps: measured max error <= 9e-15


def x0_affine(a: float, mu: float = MU, s: float = S) -> tuple[float, float]:
    """E[x0 | x_t] = p x_t + q for x0 ~ N(mu, s^2), x_t = sqrt(a) x0 + sqrt(1 - a) eps (textbook
    Gaussian conditioning: mu + Cov(x0, x_t) Var(x_t)^-1 (x_t - E x_t))."""
    p = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)
    return p, mu - p * math.sqrt(a) * mu


def x0_hat_affine(a: float, model_a: float, mu: float, s: float) -> tuple[float, float]:
    """x0_hat = p x_t + q that a sampler forms at noise level ``a`` from the exact eps of level
    ``model_a`` (the model queried at the wrong timestep when they differ): eps_hat is that
    level's E[eps | x_t], turned into x0_hat with DDPM eq. 15 at the RIGHT level."""
    p, q = x0_affine(model_a, mu, s)
    if model_a == a:
        return p, q
    eps_p = (1 - math.sqrt(model_a) * p) / math.sqrt(1 - model_a)
    eps_q = -math.sqrt(model_a) * q / math.sqrt(1 - model_a)
    return (1 - math.sqrt(1 - a) * eps_p) / math.sqrt(a), -math.sqrt(1 - a) * eps_q / math.sqrt(a)


def predicted_law(alphas_cumprod, kind: str, grid: list[int], *, eta=0.0, variance="fixed_small", shift=0,
                  mu=MU, s=S) -> tuple[float, float, float]:
    """Exact law of the sampler's output GIVEN its start x_T: ``x_out = A x_T + B + N(0, V)``.

    ``grid`` lists the original timesteps (ascending; for "dpm" in the order visited, T - 1
    first); ``shift`` models a model queried at t + shift (clamped to [0, T - 1], as
    ``shifted``). Each sampler step is affine in x with Gaussian noise, so (A, B, V) compose
    exactly. DDPM on a (respaced) chain: mean = coef1 x0_hat + coef2 x_t (DDPM eq. 7) with
    variance beta-tilde or beta; DDIM: eq. 12/16; DPM-Solver++(2M): the 2-step recursion of
    Lu et al. 2022, Algorithm 2, on the pair (x_i, x_{i-1}) = G x_T + h (deterministic, V = 0).
    For x_T ~ N(0, 1) the output is N(B, A^2 + V).
    """
    T = len(alphas_cumprod)
    ab = [float(alphas_cumprod[t]) for t in grid]
    model_ab = [float(alphas_cumprod[min(max(t + shift, 0), T - 1)]) for t in grid]
    if kind in ("ddpm", "ddim"):
        A, B, V = 1.0, 0.0, 0.0
        for i in reversed(range(len(grid))):
            a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
            p, q = x0_hat_affine(a, model_ab[i], mu, s)
            beta = 1 - a / a_prev
            if kind == "ddpm":
                c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
                P, Q = c1 * p + c2, c1 * q
                sigma2 = 0.0 if i == 0 else (beta * (1 - a_prev) / (1 - a) if variance == "fixed_small" else beta)
            else:
                sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * beta)
                c = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) / math.sqrt(1 - a)
                P, Q, sigma2 = math.sqrt(a_prev) * p + c * (1 - math.sqrt(a) * p), math.sqrt(a_prev) * q - c * math.sqrt(a) * q, sigma**2
            A, B, V = P * A, P * B + Q, P * P * V + sigma2
        return A, B, V
    if kind == "heun":  # Karras et al. 2022, Algorithm 1 (no churn) in x~ = x / sqrt(a), sigma = sqrt((1 - a) / a)
        A, B = 1.0, 0.0
        for i in reversed(range(len(grid))):
            a = ab[i]
            p, q = x0_hat_affine(a, model_ab[i], mu, s)
            if i == 0:  # the last step lands on x0_hat
                return p * A, p * B + q, 0.0
            a2 = ab[i - 1]
            p2, q2 = x0_hat_affine(a2, model_ab[i - 1], mu, s)
            ds = math.sqrt((1 - a2) / a2) - math.sqrt((1 - a) / a)

            def eps_coef(level, pp, qq):  # eps = e1 x + e0 at noise level `level`, from x0_hat = pp x + qq
                return (1 - math.sqrt(level) * pp) / math.sqrt(1 - level), -math.sqrt(level) * qq / math.sqrt(1 - level)

            e1, e0 = eps_coef(a, p, q)
            # Euler point in x: (x / sqrt(a) + ds eps) sqrt(a2) = m1 x + m0
            m1, m0 = (1 / math.sqrt(a) + ds * e1) * math.sqrt(a2), ds * e0 * math.sqrt(a2)
            f1, f0 = eps_coef(a2, p2, q2)
            g1, g0 = f1 * m1, f1 * m0 + f0  # eps at the Euler point, as a function of x
            P = (1 / math.sqrt(a) + ds * 0.5 * (e1 + g1)) * math.sqrt(a2)
            Q = ds * 0.5 * (e0 + g0) * math.sqrt(a2)
            A, B = P * A, P * B + Q
        raise AssertionError("unreachable")
    # DPM-Solver++(2M) on the grid, visited in DEcreasing order; state (x_i, x_{i-1}) = G x_T + h
    lam = [0.5 * math.log(a / (1 - a)) for a in ab]
    G, h = [1.0, 0.0], [0.0, 0.0]
    prev_pq, h_prev = None, None
    for i in range(len(grid)):
        p, q = x0_hat_affine(ab[i], model_ab[i], mu, s)
        if i == len(grid) - 1:  # the last step returns x0_hat
            return p * G[0], p * h[0] + q, 0.0
        step = lam[i + 1] - lam[i]
        ratio, e = math.sqrt((1 - ab[i + 1]) / (1 - ab[i])), -math.sqrt(ab[i + 1]) * math.expm1(-step)
        if prev_pq is None:  # first order: D = x0_hat
            row, off = (ratio + e * p, 0.0), e * q
        else:  # D = (1 + c) x0_hat_i - c x0_hat_{i-1}, c = h_i / (2 h_{i-1})
            c = step / (2 * h_prev)
            row, off = (ratio + e * (1 + c) * p, -e * c * prev_pq[0]), e * ((1 + c) * q - c * prev_pq[1])
        G = [row[0] * G[0] + row[1] * G[1], G[0]]
        h = [row[0] * h[0] + row[1] * h[1] + off, h[0]]
        prev_pq, h_prev = (p, q), step
    raise AssertionError("unreachable")


def law_errors(x: torch.Tensor, x_T: torch.Tensor, law: tuple[float, float, float]) -> dict[str, float]:
    """How far the samples are from the law of the output given x_T (see ``assert_matches_law``)."""
    A, B, V = law
    residual = (x - A * x_T - B).flatten()
    if V == 0:
        return {"max_abs_error": residual.abs().max().item()}
    n = residual.numel()
    return {"z_mean": residual.mean().item() / math.sqrt(V / n),
            "z_var": (residual.var().item() - V) / (V * math.sqrt(2 / (n - 1)))}


def assert_matches_law(x: torch.Tensor, x_T: torch.Tensor, law: tuple[float, float, float]):
    """The samples follow the law of the output CONDITIONED on the x_T actually used.

    Given x_T the output is exactly x = A x_T + B + N(0, V) (``predicted_law``). So:

    * V = 0 (DDIM eta = 0, DPM-Solver++): the law is a point mass; EVERY sample must equal
      A x_T + B up to float64 rounding (``DETERMINISTIC_ATOL``). No statistics are involved,
      which makes the check sharp at any sample size: an off-by-one timestep moves some
      outputs by >= 4.9e-4, millions of times the tolerance (measured in the next test).
    * V > 0: the residual r = x - A x_T - B is i.i.d. N(0, V): its sample mean and variance
      must lie within K_SIGMA standard errors, SE(mean) = sqrt(V / n), SE(var) = V sqrt(2 / (n - 1)).
      Conditioning removes x_T's share A^2 of the output variance from the noise of the test.
    """
    errors = law_errors(x, x_T, law)
    if "max_abs_error" in errors:
        assert errors["max_abs_error"] < DETERMINISTIC_ATOL, f"{errors}; law (A, B, V) = {law}"
    else:
        assert abs(errors["z_mean"]) < K_SIGMA and abs(errors["z_var"]) < K_SIGMA, f"{errors}; law (A, B, V) = {law}"


def gaussian_data(s: float) -> GaussianMixture:
    """N(MU, s^2) as a one-component mixture, its parameters in float64 (a float32 0.05 is off by
    1.5e-8, which the deterministic check would see)."""
    f64 = torch.float64
    return GaussianMixture(torch.tensor([[MU]], dtype=f64), torch.tensor([s], dtype=f64), torch.ones(1, dtype=f64))


@pytest.fixture(scope="module")
def gaussian_model(diffusion):
    return gaussian_data(S).eps_model(diffusion)


IRREGULAR = space_timesteps(1000, [4, 8, 16])  # a respaced chain whose steps are far from uniform in log-SNR


def dpm_grid(chain, steps):
    """Original timesteps DPM-Solver++ visits on ``chain`` with its log-SNR grid (T - 1 first)."""
    return [int(chain.timesteps[i]) for i in dpm_solver_timesteps(chain.alphas_cumprod, steps)][::-1]


GAUSS_CASES = {
    # name: (run(model, diffusion, x_T, generator), kind, grid(diffusion) of original timesteps, law kwargs)
    "ddpm_fixed_small": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, x_T=x, generator=g),
                         "ddpm", lambda d: range(1000), {}),
    "ddpm_fixed_large": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, variance="fixed_large", x_T=x, generator=g),
                         "ddpm", lambda d: range(1000), {"variance": "fixed_large"}),
    "ddpm_respaced_100": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, timesteps=respaced_100(), x_T=x, generator=g),
                          "ddpm", lambda d: respaced_100(), {}),
    "ddpm_trailing_100": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, steps=100, x_T=x, generator=g),
                          "ddpm", lambda d: range(9, 1000, 10), {}),
    "ddim_50": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=50, spacing="leading", x_T=x), "ddim",
                lambda d: range(0, 1000, 20), {}),
    "ddim_50_trailing": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=50, x_T=x), "ddim",
                         lambda d: range(19, 1000, 20), {}),
    "ddim_7_linspace": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=7, spacing="linspace", x_T=x), "ddim",
                        lambda d: [0, 166, 333, 500, 666, 832, 999], {}),
    "ddim_1000": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=1000, x_T=x), "ddim", lambda d: range(1000), {}),
    "ddim_100_eta1": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=100, eta=1.0, x_T=x, generator=g),
                      "ddim", lambda d: range(9, 1000, 10), {"eta": 1.0}),
    "dpm_solver_pp_20": (lambda m, d, x, g: dpm_solver_pp_sample(m, d, x.shape, timesteps=dpm_20(d), x_T=x),
                         "dpm", lambda d: dpm_grid(d, 20), {}),
    "dpm_solver_pp_20_trailing": (lambda m, d, x, g: dpm_solver_pp_sample(m, d, x.shape, steps=20, x_T=x),
                                  "dpm", lambda d: range(999, 0, -50), {}),
    "heun_10": (lambda m, d, x, g: samplers.heun_sample(m, d, x.shape, steps=10, x_T=x), "heun",
                lambda d: range(99, 1000, 100), {}),
    "heun_12_logsnr": (lambda m, d, x, g: samplers.heun_sample(m, d, x.shape, timesteps=dpm_solver_timesteps(
        d.alphas_cumprod, 12), x_T=x), "heun", lambda d: dpm_solver_timesteps(d.alphas_cumprod, 12), {}),
    # grid 999, 910, 800, 689, 571, 381, 222, 111, 0: ratios h_{i-1} / h_i from 0.2 to 1.3 exercise the 2M coefficients
    "dpm_solver_pp_irregular": (lambda m, d, x, g: dpm_solver_pp_sample(
        m, d.respace(IRREGULAR), x.shape, timesteps=dpm_solver_timesteps(d.respace(IRREGULAR).alphas_cumprod, 12),
        x_T=x), "dpm", lambda d: dpm_grid(d.respace(IRREGULAR), 12), {}),
}


def is_stochastic(name: str) -> bool:
    _, kind, _, kwargs = GAUSS_CASES[name]
    return kind == "ddpm" or kwargs.get("eta", 0.0) > 0


def start_noise(name: str, n_stochastic: int) -> torch.Tensor:
    return torch.randn(n_stochastic if is_stochastic(name) else N_DETERMINISTIC, 1, generator=gen(2), dtype=torch.float64)


@pytest.mark.parametrize("name", list(GAUSS_CASES))
def test_sampler_matches_exact_gaussian_law(name, gaussian_model, diffusion):
    run, kind, grid, kwargs = GAUSS_CASES[name]
    x_T = start_noise(name, N_GAUSS)
    law = predicted_law(diffusion.alphas_cumprod, kind, list(grid(diffusion)), **kwargs)
    assert_matches_law(run(gaussian_model, diffusion, x_T, gen(3)), x_T, law)


# The off-by-one check uses THINNER data, N(MU, 0.01^2): its std equals the noise std of the
# first step (sqrt(beta_1) = 0.01), so the last steps, where a timestep error matters most,
# decide the output variance. Predicted |z(var)| of t +- 1 at n = 10k from the exact laws:
# >= 9.6 for every stochastic sampler; measured (seed 2/3): t + 1 28.8-33.9, t - 1 8.5
# (DDPM fixed_large) to 11.2 (fixed_small), 10.1 (respaced 100 and DDIM-100 eta = 1), while
# the correct samplers give |z| <= 1.4. With S = 0.05 at n = 50k respaced DDPM and DDIM
# eta = 1 gave |z| <= 1.1 (t + 1) and 2.8 (t - 1): not caught.
S_SHARP = 0.01
N_SHARP = 10_000


@pytest.fixture(scope="module")
def sharp_model(diffusion):
    return gaussian_data(S_SHARP).eps_model(diffusion)


@pytest.mark.parametrize("name", list(GAUSS_CASES))
def test_gaussian_law_rejects_off_by_one_timesteps(name, sharp_model, diffusion):
    """The exact-law check FAILS when the model is queried at t + 1 or at t - 1, for every sampler
    configuration, and passes for the correct sampler on the same x_T. The shifted runs DO match
    the law predicted for their shift, so the oracle models what they compute and the failure is
    the shift, not noise. Deterministic samplers are checked sample by sample (measured max
    errors 4.0e-3 to 8.2e-3 for a shift, <= 7e-15 without it); stochastic ones by the residual's
    moments (measured z-scores in the comment above)."""
    run, kind, grid, kwargs = GAUSS_CASES[name]
    x_T = start_noise(name, N_SHARP)

    def law(shift=0):
        return predicted_law(diffusion.alphas_cumprod, kind, list(grid(diffusion)), shift=shift, s=S_SHARP, **kwargs)

    assert_matches_law(run(sharp_model, diffusion, x_T, gen(3)), x_T, law())
    for shift in (1, -1):
        x = run(shifted(sharp_model, shift), diffusion, x_T, gen(3))
        with pytest.raises(AssertionError):
            assert_matches_law(x, x_T, law())
        assert_matches_law(x, x_T, law(shift))


def test_gaussian_law_rejects_a_step_to_the_wrong_kept_timestep(gaussian_model, diffusion):
    """A DDIM-50 whose model is queried one KEPT step too early (t - 20) also fails."""
    x_T = start_noise("ddim_50", N_GAUSS)
    x = ddim_sample(shifted(gaussian_model, -20), diffusion, x_T.shape, steps=50, spacing="leading", x_T=x_T)
    with pytest.raises(AssertionError):
        assert_matches_law(x, x_T, predicted_law(diffusion.alphas_cumprod, "ddim", list(range(0, 1000, 20))))


# ---------------------------------------------------------------------------------------------
# 3. Consistency between samplers, determinism, inversion
# ---------------------------------------------------------------------------------------------


def test_ddim_eta1_is_ddpm_on_the_same_grid(mixture, diffusion):
    """DDIM with eta = 1 IS ancestral DDPM on the respaced chain (sigma(eta=1)^2 = beta-tilde of
    that chain, DDIM eq. 16): same x_T and generator give the same samples, to rounding."""
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(1000, 2, generator=gen(4), dtype=torch.float64)
    a = ddim_sample(model, diffusion, x_T.shape, steps=100, eta=1.0, x_T=x_T, generator=gen(5))
    b = ddpm_sample(model, diffusion.respace(sampling_timesteps(1000, 100)), x_T.shape, x_T=x_T, generator=gen(5))
    assert (a - b).abs().max() < 1e-10  # measured 2.4e-14


def test_ddim_eta0_step_counts_converge(mixture, diffusion):
    """Deterministic DDIM from one x_T at 50, 100, 200, 500 steps approaches the 1000-step output
    at first order (measured mean distances 0.025, 0.012, 0.0054, 0.0013)."""
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(2000, 2, generator=gen(6), dtype=torch.float64)
    ref = ddim_sample(model, diffusion, x_T.shape, steps=1000, x_T=x_T)
    dist = [(ddim_sample(model, diffusion, x_T.shape, steps=s, x_T=x_T) - ref).norm(dim=1) for s in (50, 100, 200, 500)]
    means = [d.mean().item() for d in dist]
    assert means == sorted(means, reverse=True) and means[-1] < 0.003 and means[0] < 0.05, means
    assert (dist[-1] < 0.01).double().mean() > 0.98  # a few paths near a mode boundary may switch


@pytest.mark.parametrize(
    "run",
    [
        lambda m, d, g: ddpm_sample(m, d, (64, 2), generator=g),
        lambda m, d, g: ddpm_sample(m, d, (64, 2), steps=25, variance="fixed_large", generator=g),
        lambda m, d, g: ddim_sample(m, d, (64, 2), steps=20, eta=0.5, generator=g),
        lambda m, d, g: dpm_solver_pp_sample(m, d, (64, 2), steps=10, generator=g),
    ],
)
def test_same_seed_same_samples(run, mixture, diffusion):
    model = mixture.eps_model(diffusion)
    a, b, c = run(model, diffusion, gen(7)), run(model, diffusion, gen(7)), run(model, diffusion, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32  # drawn noise defaults to float32; the oracle follows the input dtype


def test_deterministic_samplers_ignore_the_generator_given_x_T(mixture, diffusion):
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(64, 2, generator=gen(9), dtype=torch.float64)
    for run in (lambda g: ddim_sample(model, diffusion, x_T.shape, steps=20, x_T=x_T, generator=g),
                lambda g: dpm_solver_pp_sample(model, diffusion, x_T.shape, steps=10, x_T=x_T, generator=g)):
        assert torch.equal(run(gen(1)), run(gen(2)))


def test_ddim_inversion_round_trip(mixture, diffusion):
    """ddim_invert then ddim_sample reconstructs x0 with the exact model: measured Euclidean error
    median 0.036 / mean 0.042 at 50 steps, 0.019 / 0.022 at 100 (first order: halves with twice
    the steps; data stds are 0.08-0.25). Thresholds are ~2-3x those. It also maps data to ~N(0, I)."""
    model = mixture.eps_model(diffusion)
    x0 = mixture.sample(2000, generator=gen(10))
    errors = {}
    for steps in (50, 100):
        x_T = ddim_invert(model, diffusion, x0, steps=steps)
        err = (ddim_sample(model, diffusion, x0.shape, steps=steps, x_T=x_T) - x0).norm(dim=1)
        errors[steps] = (err.median().item(), err.mean().item())
    assert errors[50][0] < 0.08 and errors[100][0] < 0.04 and errors[100][1] < 0.06, errors
    assert errors[100][0] < 0.7 * errors[50][0], errors
    assert x_T.mean(0).abs().max() < 0.1 and (torch.cov(x_T.T) - torch.eye(2, dtype=x_T.dtype)).abs().max() < 0.15
    x_T, traj = ddim_invert(model, diffusion, x0[:5], steps=10, return_trajectory=True)
    assert len(traj) == 11 and torch.equal(traj[0], x0[:5]) and torch.equal(traj[-1], x_T)


# ---------------------------------------------------------------------------------------------
# 4. Conventions: original timesteps, grids, trajectories, learned variance, clipping, errors
# ---------------------------------------------------------------------------------------------


def recording(model, seen):
    def wrapped(x, t, y=None):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return model(x, t, y)

    return wrapped


def test_models_receive_original_timesteps(mixture, diffusion):
    model = mixture.eps_model(diffusion)
    for run, expected in [  # samplers walk their grid downwards, inversion upwards
        (lambda m: ddpm_sample(m, diffusion, (4, 2), steps=10, generator=gen(0)), list(range(999, 0, -100))),
        (lambda m: ddim_sample(m, diffusion, (4, 2), steps=10, generator=gen(0)), list(range(999, 0, -100))),
        (lambda m: ddim_sample(m, diffusion, (4, 2), steps=10, spacing="leading"), list(range(900, -1, -100))),
        (lambda m: dpm_solver_pp_sample(m, diffusion, (4, 2), steps=5, generator=gen(0)), [999, 799, 599, 399, 199]),
        (lambda m: dpm_solver_pp_sample(m, diffusion, (4, 2), timesteps=dpm_solver_timesteps(
            diffusion.alphas_cumprod, 5), generator=gen(0)), [999, 722, 302, 30, 0]),
        (lambda m: ddim_invert(m, diffusion, torch.zeros(4, 2), steps=10), list(range(99, 1000, 100))),
    ]:
        seen = []
        run(recording(model, seen))
        assert seen == expected, seen


def test_ddim_accepts_every_step_count(mixture, diffusion):
    """Every 1 <= steps <= T works, divisor of T or not: the model sees exactly ``steps`` timesteps
    of the trailing grid round(T - i T / steps) - 1, downwards when sampling, upwards when inverting."""
    model = mixture.eps_model(diffusion)
    for steps in (1, 3, 7, 333, 999):
        grid = sorted(round(1000 - i * 1000 / steps) - 1 for i in range(steps))
        seen = []
        ddim_sample(recording(model, seen), diffusion, (2, 2), steps=steps, generator=gen(0))
        assert seen == grid[::-1], (steps, seen[:5])
        seen = []
        ddim_invert(recording(model, seen), diffusion, torch.zeros(2, 2), steps=steps)
        assert seen == grid, (steps, seen[:5])


class _Stop(Exception):
    pass


def test_initial_noise_follows_the_model_then_the_diffusion():
    """x_T is drawn with the (CPU) generator and moved to: the model's parameters' device; for a
    plain function (guidance wrappers, the oracle) the diffusion's device; else the generator's.
    A 'meta' diffusion / model stands in for an accelerator on a CPU-only machine."""
    on_meta = SimpleNamespace(betas=torch.empty(10, dtype=torch.float64, device="meta"))
    plain = lambda x, t, y=None: x  # noqa: E731
    g = gen(0)
    x = initial_noise(plain, (4, 2), None, g, on_meta)
    assert x.device.type == "meta" and x.shape == (4, 2) and x.dtype == torch.get_default_dtype()
    reference = gen(0)
    torch.randn(4, 2, generator=reference)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=reference))  # drawn on the CPU
    cpu_model, meta_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to("meta")
    assert initial_noise(cpu_model, (4, 2), None, gen(0), on_meta).device.type == "cpu"  # parameters decide
    assert initial_noise(meta_model, (4, 2), None, gen(0), None).device.type == "meta"
    assert initial_noise(plain, (4, 2), None, gen(0), None).device.type == "cpu"
    # the numbers are the generator's own CPU draws, wherever they end up
    assert torch.equal(initial_noise(plain, (4, 2), None, gen(0), None), torch.randn(4, 2, generator=gen(0)))


def test_samplers_hand_their_diffusion_to_initial_noise(monkeypatch, mixture, diffusion):
    """Every sampler passes its diffusion to ``initial_noise`` (so a guidance wrapper, a plain
    function, gets x_T on the diffusion's device)."""
    seen = []

    def spy(model, shape, x_T, generator, diffusion=None, dtype=None):
        seen.append(diffusion)
        raise _Stop

    monkeypatch.setattr(samplers, "initial_noise", spy)
    model = mixture.eps_model(diffusion)
    for run in (lambda: ddpm_sample(model, diffusion, (2, 2), generator=gen(0)),
                lambda: ddim_sample(model, diffusion, (2, 2), steps=10, generator=gen(0)),
                lambda: dpm_solver_pp_sample(model, diffusion, (2, 2), steps=10, generator=gen(0))):
        with pytest.raises(_Stop):
            run()
        assert seen[-1] is diffusion


def test_ddim_last_step_goes_to_alpha_bar_one(mixture, diffusion):
    """From the first kept timestep DDIM jumps to alpha_bar_prev = 1, so its output is x0_hat
    there (pitfall 1), and a trajectory lists x_T, then each step's output."""
    model = mixture.eps_model(diffusion)
    x, traj = ddim_sample(model, diffusion, (8, 2), steps=10, generator=gen(0), return_trajectory=True)
    assert len(traj) == 11 and torch.equal(traj[-1], x)
    eps = model(traj[-2], torch.full((8,), 99, dtype=torch.long))  # the trailing grid's first kept step
    assert torch.allclose(x, predict_x0(traj[-2], eps, float(diffusion.alphas_cumprod[99])))
    x, traj = ddpm_sample(model, diffusion, (8, 2), steps=7, generator=gen(0), return_trajectory=True)
    assert len(traj) == 8 and torch.equal(traj[-1], x)


def test_learned_variance_output_uses_first_half(mixture, diffusion):
    model = mixture.eps_model(diffusion)
    doubled = lambda x, t, y=None: torch.cat([model(x, t, y), torch.full_like(x, 0.3)], 1)  # noqa: E731
    x_T = torch.randn(16, 2, generator=gen(0), dtype=torch.float64)
    for run in (lambda m: ddim_sample(m, diffusion, x_T.shape, steps=10, x_T=x_T),
                lambda m: dpm_solver_pp_sample(m, diffusion, x_T.shape, steps=10, x_T=x_T)):
        assert torch.equal(run(doubled), run(model))
    out = ddpm_sample(doubled, diffusion, x_T.shape, steps=10, variance="learned_range", x_T=x_T, generator=gen(1))
    assert out.shape == x_T.shape and torch.isfinite(out).all()


def test_clip_denoised_keeps_samples_in_range(mixture, diffusion):
    model = mixture.eps_model(diffusion)  # the mixture reaches outside [-1, 1]
    x_T = torch.randn(500, 2, generator=gen(0), dtype=torch.float64)
    assert ddim_sample(model, diffusion, x_T.shape, steps=20, x_T=x_T).abs().max() > 1
    for run in (lambda: ddpm_sample(model, diffusion, x_T.shape, steps=20, clip_denoised=True, x_T=x_T, generator=gen(1)),
                lambda: ddim_sample(model, diffusion, x_T.shape, steps=20, clip_denoised=True, x_T=x_T),
                lambda: dpm_solver_pp_sample(model, diffusion, x_T.shape, steps=20, clip_denoised=True, x_T=x_T)):
        assert run().abs().max() <= 1


def test_dpm_solver_refuses_zero_terminal_snr():
    from ddpm_lib.diffusion import GaussianDiffusion
    from ddpm_lib.schedules import linear_betas, rescale_zero_terminal_snr

    zero_snr = GaussianDiffusion(rescale_zero_terminal_snr(linear_betas(100)))
    with pytest.raises(ValueError, match="terminal SNR"):
        dpm_solver_pp_sample(lambda x, t: torch.zeros_like(x), zero_snr, (2, 2))


def test_alpha_bar_at_reads_original_timesteps(diffusion):
    short = diffusion.respace(space_timesteps(1000, [10]))
    t = torch.tensor([0, 999, 555])
    assert torch.equal(alpha_bar_at(short, t), diffusion.alphas_cumprod[t])
    with pytest.raises(ValueError, match="kept"):
        alpha_bar_at(short, torch.tensor([1]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, d: ddpm_sample(m, d, (4, 2), steps=1001), "steps"),
        (lambda m, d: ddpm_sample(m, d, (4, 2), steps=0), "steps"),
        (lambda m, d: ddim_sample(m, d, (4, 2), steps=2000), "steps"),
        (lambda m, d: ddim_sample(m, d, (4, 2), steps=0), "steps"),
        (lambda m, d: ddim_sample(m, d, (4, 2), eta=-0.1), "eta"),
        (lambda m, d: dpm_solver_pp_sample(m, d, (4, 2), steps=1001), "steps"),
        (lambda m, d: dpm_solver_pp_sample(m, d, (4, 2), order=3), "order"),
        (lambda m, d: ddim_invert(m, d, torch.zeros(4, 2), steps=0), "steps"),
        (lambda m, d: ddim_invert(m, d, torch.zeros(4, 2), steps=1001), r"steps must be an integer between 1 and T = 1000, got 1001"),
        (lambda m, d: ddim_sample(m, d, (4, 2), x_T=torch.zeros(4, 3)), "shape"),
        (lambda m, d: ddpm_sample(m, d, (4, 2), x_T=torch.zeros(5, 2)), "shape"),
        (lambda m, d: dpm_solver_pp_sample(m, d, (4, 2), x_T=torch.zeros(4)), "shape"),
    ],
)
def test_clear_errors(call, match, mixture, diffusion):
    with pytest.raises(ValueError, match=match):
        call(mixture.eps_model(diffusion), diffusion)


def test_progress_bar_does_not_change_results(mixture, diffusion):
    model = mixture.eps_model(diffusion)
    for run in (lambda p: ddpm_sample(model, diffusion, (4, 2), steps=5, generator=gen(0), progress=p),
                lambda p: ddim_sample(model, diffusion, (4, 2), steps=5, generator=gen(0), progress=p),
                lambda p: dpm_solver_pp_sample(model, diffusion, (4, 2), steps=5, generator=gen(0), progress=p)):
        assert torch.equal(run(True), run(False))
