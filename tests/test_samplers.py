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

import pytest
import torch

from ddpm_lib.analytic import GaussianMixture
from ddpm_lib.samplers import (
    alpha_bar_at,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    model_eps,
    predict_x0,
)
from ddpm_lib.schedules import space_timesteps

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
    "ddpm_respaced_100": (lambda m, d, n, g, x: ddpm_sample(m, d, (n, 2), steps=100, generator=g, x_T=x),
                          {"prop": 0.005, "mean": 0.05, "cov": 0.5}),
    "ddim_50": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=50, generator=g, x_T=x),
                {"prop": 0.005, "mean": 0.16, "cov": 0.42}),
    "ddim_1000": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=1000, generator=g, x_T=x),
                  {"prop": 0.0, "mean": 0.025, "cov": 0.05}),
    "ddim_100_eta1": (lambda m, d, n, g, x: ddim_sample(m, d, (n, 2), steps=100, eta=1.0, generator=g, x_T=x),
                      {"prop": 0.005, "mean": 0.05, "cov": 0.5}),
    "dpm_solver_pp_20": (lambda m, d, n, g, x: dpm_solver_pp_sample(m, d, (n, 2), steps=20, generator=g, x_T=x),
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
    samplers whose timesteps are wrong."""
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(N_MIX, 2, generator=gen(0), dtype=torch.float64)
    kept = torch.tensor(space_timesteps(1000, [100]))
    # (a) pitfall 10: the respaced chain's INDEX passed to the model instead of the original step
    index_bug = lambda x, t, y=None: model(x, torch.searchsorted(kept, t))  # noqa: E731
    # (b) pitfall 1: a DDIM step that goes to t - 1 of the original chain, not the previous kept step
    for name, x in [
        ("ddpm_respaced_100", ddpm_sample(index_bug, diffusion, (N_MIX, 2), steps=100, generator=gen(1), x_T=x_T)),
        ("ddim_50", ddim_to_t_minus_1(model, diffusion, x_T, steps=50)),
        ("dpm_solver_pp_20", dpm_solver_pp_sample(model, diffusion, (N_MIX, 2), steps=20, x_T=x_T) + 0.03),  # shifted mean
    ]:
        with pytest.raises(AssertionError):
            assert_reproduces_mixture(x, mixture, SAMPLERS[name][1])


def ddim_to_t_minus_1(model, diffusion, x, *, steps):
    """A BROKEN DDIM: from each kept t it steps to alpha_bar of t - 1 (the original chain's
    previous step) instead of the previous KEPT timestep (pitfall 1)."""
    for t in reversed(ddim_timesteps(diffusion.T, steps)):
        alpha_bar = float(diffusion.alphas_cumprod[t])
        alpha_bar_prev = float(diffusion.alphas_cumprod[t - 1]) if t > 0 else 1.0
        eps = model_eps(model, diffusion, x, t)
        x = ddim_step(predict_x0(x, eps, alpha_bar), eps, alpha_bar_prev, 0.0, None)
    return x


# ---------------------------------------------------------------------------------------------
# 2. The linear-Gaussian oracle: exact output law of each discretised sampler
# ---------------------------------------------------------------------------------------------

MU, S = 0.3, 0.05  # 1-D data N(MU, S^2); thin, so the first (coarse) steps matter
N_GAUSS = 50_000


def x0_affine(a: float) -> tuple[float, float]:
    """E[x0 | x_t] = p x_t + q for x0 ~ N(MU, S^2), x_t = sqrt(a) x0 + sqrt(1 - a) eps (textbook
    Gaussian conditioning: mu + Cov(x0, x_t) Var(x_t)^-1 (x_t - E x_t))."""
    p = math.sqrt(a) * S**2 / (a * S**2 + 1 - a)
    return p, MU - p * math.sqrt(a) * MU


def predicted_law(alphas_cumprod, kind: str, grid: list[int], *, eta=0.0, variance="fixed_small", shift=0):
    """Exact (mean, variance) of the sampler's output started from x_T ~ N(0, 1).

    ``grid`` lists the original timesteps (ascending; for "dpm" in the order visited, T - 1 first); ``shift`` models a model queried
    at t + shift. DDPM on a (respaced) chain: mean = coef1 x0_hat + coef2 x_t (DDPM eq. 7) with
    variance beta-tilde or beta; DDIM: eq. 12/16; DPM-Solver++(2M): the 2-step recursion of
    Lu et al. 2022, Algorithm 2, on the joint law of (x_i, x_{i-1}).
    """
    ab = [float(alphas_cumprod[t]) for t in grid]
    model_ab = [float(alphas_cumprod[min(max(t + shift, 0), len(alphas_cumprod) - 1)]) for t in grid]
    if kind in ("ddpm", "ddim"):
        m, v = 0.0, 1.0
        for i in reversed(range(len(grid))):
            a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
            p, q = x0_affine(model_ab[i])  # x0_hat as the (shifted) model sees it
            if shift:  # the model's eps at the wrong noise level, turned into x0_hat at the right one
                eps_p = (1 - math.sqrt(model_ab[i]) * p) / math.sqrt(1 - model_ab[i])
                eps_q = -math.sqrt(model_ab[i]) * q / math.sqrt(1 - model_ab[i])
                p, q = (1 - math.sqrt(1 - a) * eps_p) / math.sqrt(a), -math.sqrt(1 - a) * eps_q / math.sqrt(a)
            beta = 1 - a / a_prev
            if kind == "ddpm":
                c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
                P, Q = c1 * p + c2, c1 * q
                sigma2 = 0.0 if i == 0 else (beta * (1 - a_prev) / (1 - a) if variance == "fixed_small" else beta)
            else:
                sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * beta)
                c = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) / math.sqrt(1 - a)
                P, Q, sigma2 = math.sqrt(a_prev) * p + c * (1 - math.sqrt(a) * p), math.sqrt(a_prev) * q - c * math.sqrt(a) * q, sigma**2
            m, v = P * m + Q, P * P * v + sigma2
        return m, v
    # DPM-Solver++(2M) on the grid, visited in DEcreasing order; state (x_i, x_{i-1})
    lam = [0.5 * math.log(a / (1 - a)) for a in ab]
    mean, cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    prev_pq, h_prev = None, None
    for i in range(len(grid)):
        p, q = x0_affine(ab[i])
        if i == len(grid) - 1:
            return p * mean[0].item() + q, p * p * cov[0, 0].item()
        h = lam[i + 1] - lam[i]
        ratio, e = math.sqrt((1 - ab[i + 1]) / (1 - ab[i])), -math.sqrt(ab[i + 1]) * math.expm1(-h)
        if prev_pq is None:
            row, off = [ratio + e * p, 0.0], e * q
        else:
            c = h / (2 * h_prev)
            row, off = [ratio + e * (1 + c) * p, -e * c * prev_pq[0]], e * ((1 + c) * q - c * prev_pq[1])
        M = torch.tensor([row, [1.0, 0.0]], dtype=torch.float64)
        mean, cov = M @ mean + torch.tensor([off, 0.0], dtype=torch.float64), M @ cov @ M.T
        prev_pq, h_prev = (p, q), h
    raise AssertionError("unreachable")


def assert_matches_law(x: torch.Tensor, law: tuple[float, float]):
    """Sample mean and variance within K_SIGMA standard errors of the exact law (output is
    exactly Gaussian, so SE(mean) = sqrt(v / n), SE(var) = v sqrt(2 / (n - 1)))."""
    m, v = law
    n = x.numel()
    z_mean = (x.mean().item() - m) / math.sqrt(v / n)
    z_var = (x.var().item() - v) / (v * math.sqrt(2 / (n - 1)))
    assert abs(z_mean) < K_SIGMA and abs(z_var) < K_SIGMA, f"z(mean) = {z_mean:.2f}, z(var) = {z_var:.2f}; law {law}"


@pytest.fixture(scope="module")
def gaussian_model(diffusion):
    return GaussianMixture(torch.tensor([[MU]]), torch.tensor([S]), torch.ones(1)).eps_model(diffusion)


IRREGULAR = space_timesteps(1000, [4, 8, 16])  # a respaced chain whose steps are far from uniform in log-SNR


def dpm_grid(chain, steps):
    """Original timesteps DPM-Solver++ visits on ``chain`` (T - 1 first)."""
    return [int(chain.timesteps[i]) for i in dpm_solver_timesteps(chain.alphas_cumprod, steps)]


GAUSS_CASES = {
    # name: (run(model, diffusion, x_T, generator), kind, grid(diffusion) of original timesteps, law kwargs)
    "ddpm_fixed_small": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, x_T=x, generator=g),
                         "ddpm", lambda d: range(1000), {}),
    "ddpm_fixed_large": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, variance="fixed_large", x_T=x, generator=g),
                         "ddpm", lambda d: range(1000), {"variance": "fixed_large"}),
    "ddpm_respaced_100": (lambda m, d, x, g: ddpm_sample(m, d, x.shape, steps=100, x_T=x, generator=g),
                          "ddpm", lambda d: space_timesteps(1000, [100]), {}),
    "ddim_50": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=50, x_T=x), "ddim", lambda d: range(0, 1000, 20), {}),
    "ddim_1000": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=1000, x_T=x), "ddim", lambda d: range(1000), {}),
    "ddim_100_eta1": (lambda m, d, x, g: ddim_sample(m, d, x.shape, steps=100, eta=1.0, x_T=x, generator=g),
                      "ddim", lambda d: range(0, 1000, 10), {"eta": 1.0}),
    "dpm_solver_pp_20": (lambda m, d, x, g: dpm_solver_pp_sample(m, d, x.shape, steps=20, x_T=x),
                         "dpm", lambda d: dpm_grid(d, 20), {}),
    # grid 999, 910, 800, 689, 571, 381, 222, 111, 0: ratios h_{i-1} / h_i from 0.2 to 1.3 exercise the 2M coefficients
    "dpm_solver_pp_irregular": (lambda m, d, x, g: dpm_solver_pp_sample(m, d.respace(IRREGULAR), x.shape, steps=12, x_T=x),
                                "dpm", lambda d: dpm_grid(d.respace(IRREGULAR), 12), {}),
}


@pytest.mark.parametrize("name", list(GAUSS_CASES))
def test_sampler_matches_exact_gaussian_law(name, gaussian_model, diffusion):
    run, kind, grid, kwargs = GAUSS_CASES[name]
    x_T = torch.randn(N_GAUSS, 1, generator=gen(2), dtype=torch.float64)
    law = predicted_law(diffusion.alphas_cumprod, kind, list(grid(diffusion)), **kwargs)
    assert_matches_law(run(gaussian_model, diffusion, x_T, gen(3)), law)


def test_gaussian_law_rejects_off_by_one_timesteps(gaussian_model, diffusion):
    """The exact-law check FAILS on off-by-one timesteps: a model queried at t + 1 or t - 1 in
    1000-step DDPM (the variance moves by ~-8% / +7%, 10+ standard errors), and a DDIM-50 whose
    model is queried one kept step too early (t - 20). The shifted runs DO match the law
    predicted for their shift, so the oracle models what they compute."""
    ac = diffusion.alphas_cumprod
    x_T = torch.randn(N_GAUSS, 1, generator=gen(2), dtype=torch.float64)
    for shift in (1, -1):
        x = ddpm_sample(shifted(gaussian_model, shift), diffusion, x_T.shape, variance="fixed_large", x_T=x_T, generator=gen(3))
        with pytest.raises(AssertionError):
            assert_matches_law(x, predicted_law(ac, "ddpm", list(range(1000)), variance="fixed_large"))
        assert_matches_law(x, predicted_law(ac, "ddpm", list(range(1000)), variance="fixed_large", shift=shift))
    x = ddim_sample(shifted(gaussian_model, -20), diffusion, x_T.shape, steps=50, x_T=x_T)
    with pytest.raises(AssertionError):
        assert_matches_law(x, predicted_law(ac, "ddim", list(range(0, 1000, 20))))


# ---------------------------------------------------------------------------------------------
# 3. Consistency between samplers, determinism, inversion
# ---------------------------------------------------------------------------------------------


def test_ddim_eta1_is_ddpm_on_the_same_grid(mixture, diffusion):
    """DDIM with eta = 1 IS ancestral DDPM on the respaced chain (sigma(eta=1)^2 = beta-tilde of
    that chain, DDIM eq. 16): same x_T and generator give the same samples, to rounding."""
    model = mixture.eps_model(diffusion)
    x_T = torch.randn(1000, 2, generator=gen(4), dtype=torch.float64)
    a = ddim_sample(model, diffusion, x_T.shape, steps=100, eta=1.0, x_T=x_T, generator=gen(5))
    b = ddpm_sample(model, diffusion.respace(ddim_timesteps(1000, 100)), x_T.shape, x_T=x_T, generator=gen(5))
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
        (lambda m: ddpm_sample(m, diffusion, (4, 2), steps=10, generator=gen(0)), space_timesteps(1000, [10])[::-1]),
        (lambda m: ddim_sample(m, diffusion, (4, 2), steps=10, generator=gen(0)), list(range(900, -1, -100))),
        (lambda m: dpm_solver_pp_sample(m, diffusion, (4, 2), steps=5, generator=gen(0)), [999, 722, 302, 30, 0]),
        (lambda m: ddim_invert(m, diffusion, torch.zeros(4, 2), steps=10), list(range(0, 1000, 100))),
    ]:
        seen = []
        run(recording(model, seen))
        assert seen == expected, seen
    assert space_timesteps(1000, [10])[-1] == 999  # respaced DDPM starts at T - 1 ...
    assert ddim_timesteps(1000, 10)[-1] == 900  # ... the "leading" DDIM grid does not (pitfall 1)


def test_ddim_last_step_goes_to_alpha_bar_one(mixture, diffusion):
    """From the first kept timestep DDIM jumps to alpha_bar_prev = 1, so its output is x0_hat
    there (pitfall 1), and a trajectory lists x_T, then each step's output."""
    model = mixture.eps_model(diffusion)
    x, traj = ddim_sample(model, diffusion, (8, 2), steps=10, generator=gen(0), return_trajectory=True)
    assert len(traj) == 11 and torch.equal(traj[-1], x)
    eps = model(traj[-2], torch.zeros(8, dtype=torch.long))
    assert torch.allclose(x, predict_x0(traj[-2], eps, float(diffusion.alphas_cumprod[0])))
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
