"""Inpainting (replacement and RePaint) against exact oracles.

1. The linear-Gaussian oracle: for Gaussian data N(mu, S) the exact eps is affine in x_t, so
   every reverse step, every re-noising of the known pixels and every RePaint jump is an affine
   Gaussian map, and the law of ``inpaint``'s output can be computed EXACTLY by propagating a
   mean vector and a covariance matrix (``predicted_law``, written from the papers' equations
   and the textbook Gaussian conditional, independently of ``ddpm_lib.inpainting`` and of
   ``ddpm_lib.analytic``). The samples must match it with no allowance.
2. The exact conditional: for a Gaussian-mixture prior, p(x2 | x1) is a mixture with weights
   proportional to w_k N(x1; mu_k1, S_k11) and Gaussian-conditional components. Replacement is
   measurably biased away from it; RePaint lands close.
3. Conventions: known pixels exact (the last step uses them), seeding, labels, errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lib.analytic import GaussianMixture
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.inpainting import inpaint, repaint_schedule
from ddpm_lib.metrics.samples import wasserstein_1d
from ddpm_lib.models import MLPConfig, MLPDenoiser
from ddpm_lib.samplers import ddpm_sample
from ddpm_lib.schedules import linear_betas

pytestmark = pytest.mark.usefixtures("single_thread")

K_SIGMA = 4.5  # statistical tolerance in standard errors


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the RePaint schedule -------------------------------------------------------------------


def test_repaint_schedule_examples():
    # hand-traced from get_schedule_jump of the RePaint code (Lugmayr et al. 2022)
    assert repaint_schedule(4) == [3, 2, 1, 0, -1]  # no resampling: plain reverse chain
    assert repaint_schedule(3, resample=2) == [2, 1, 2, 1, 0, 1, 0, -1]
    assert repaint_schedule(10, resample=3, jump=3) == (
        [9, 8, 7, 6] + [9, 8, 7, 6] + [9, 8, 7, 6] + [5, 4, 3] + [6, 5, 4, 3] * 2 + [2, 1, 0] + [3, 2, 1, 0] * 2 + [-1])
    assert repaint_schedule(1, resample=5) == [0, -1]  # the only step lands on the data: nothing to redo


@pytest.mark.parametrize("steps, resample, jump", [(20, 1, 1), (20, 4, 1), (20, 3, 5), (17, 2, 4), (50, 10, 10)])
def test_repaint_schedule_structure(steps, resample, jump):
    path = repaint_schedule(steps, resample, jump)
    moves = [b - a for a, b in zip(path[:-1], path[1:])]
    assert path[0] == steps - 1 and path[-1] == -1
    assert set(moves) <= {-1, jump}  # reverse steps of one level, jumps up of `jump` levels
    jump_points = len(range(0, steps - jump, jump))
    assert moves.count(jump) == (resample - 1) * jump_points
    assert moves.count(-1) == steps + (resample - 1) * jump_points * jump
    if jump == 1:  # Algorithm 1: every level but the data is landed on `resample` times
        landed = [b for a, b in zip(path[:-1], path[1:]) if b < a]
        assert all(landed.count(level) == resample for level in range(steps - 1))
        assert landed.count(steps - 1) == 0 and landed.count(-1) == 1


# --- 1. the linear-Gaussian oracle ------------------------------------------------------------

RHO = 0.9
GAUSS_MU = torch.tensor([0.2, -0.1], dtype=torch.float64)
GAUSS_COV = 0.25 * torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64)
X1 = 0.5  # the known first coordinate


def predicted_law(alphas_cumprod, grid, path, mu, cov, x1):
    """Exact mean [2] and covariance [2, 2] of inpaint's output for Gaussian data N(mu, cov) with
    coordinate 0 known (= x1), on the respaced chain through ``grid``, walking ``path``.

    Per reverse step from chain level i to i - 1 (alpha_bar a -> a_prev; a_prev = 1 after the
    first grid point), written from DDPM (Ho et al. 2020) eqs. 4, 6-7, 11 and the Gaussian
    conditional E[x0 | x_t] = mu + sqrt(a) S C^{-1} (x_t - sqrt(a) mu), C = a S + (1 - a) I:
    unknown coordinate <- row 1 of the posterior mean map plus beta-tilde noise; known
    coordinate <- sqrt(a_prev) x1 + sqrt(1 - a_prev) * fresh noise. A jump from level i up to
    level k multiplies by sqrt(a_k / a_i) and adds (1 - a_k / a_i) I (RePaint, Algorithm 1).
    """
    ab = [float(alphas_cumprod[t]) for t in grid]
    eye = torch.eye(2, dtype=torch.float64)
    # x_T: unknown ~ N(0, 1); known from q(x_T | x1)
    m = torch.tensor([math.sqrt(ab[-1]) * x1, 0.0], dtype=torch.float64)
    P = torch.diag(torch.tensor([1 - ab[-1], 1.0], dtype=torch.float64))
    for level, nxt in zip(path[:-1], path[1:]):
        if nxt > level:
            r = ab[nxt] / ab[level]
            m, P = math.sqrt(r) * m, r * P + (1 - r) * eye
            continue
        a, a_prev = ab[level], (ab[level - 1] if level > 0 else 1.0)
        beta = 1 - a / a_prev
        coef1 = math.sqrt(a_prev) * beta / (1 - a)
        coef2 = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        var = beta * (1 - a_prev) / (1 - a)
        # E[x0 | x_t] = mu + gain (x_t - sqrt(a) mu), the Gaussian conditional
        gain = math.sqrt(a) * cov @ torch.linalg.inv(a * cov + (1 - a) * eye)
        L = coef1 * gain + coef2 * eye
        b = coef1 * (mu - gain @ (math.sqrt(a) * mu))
        u_mean, u_var = (L[1] @ m + b[1]).item(), (L[1] @ P @ L[1]).item() + var
        m = torch.tensor([math.sqrt(a_prev) * x1, u_mean], dtype=torch.float64)
        P = torch.diag(torch.tensor([1 - a_prev, u_var], dtype=torch.float64))
    return m, P


def exact_gaussian_conditional(mu, cov, x1):
    mean = mu[1] + cov[1, 0] / cov[0, 0] * (x1 - mu[0])
    var = cov[1, 1] - cov[1, 0] ** 2 / cov[0, 0]
    return float(mean), float(var)


@pytest.fixture(scope="module")
def gaussian():
    return GaussianMixture(GAUSS_MU[None], GAUSS_COV[None], torch.ones(1))


def sample_x2(model, diffusion, n, seed, **kwargs):
    known = torch.tensor([[X1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x = inpaint(model, diffusion, known, mask, shape=(n, 2), generator=gen(seed), **kwargs)
    assert torch.equal(x[:, 0], torch.full((n,), X1, dtype=torch.float64))
    return x[:, 1]


def law_error(x2, mean, var):
    """max(|mean error| / SE, |var error| / SE) for a Gaussian sample (SE of the variance:
    var sqrt(2 / n))."""
    n = len(x2)
    return max(abs(x2.mean().item() - mean) / math.sqrt(var / n),
               abs(x2.var().item() - var) / (var * math.sqrt(2 / n)))


GAUSS_CASES = {  # name: (inpaint kwargs, grid)
    "replacement_20": (dict(steps=20), None),
    "repaint_20_r4": (dict(steps=20, resample=4), None),
    "repaint_20_r3_jump5": (dict(steps=20, resample=3, jump=5), None),
    "repaint_leading_r2_jump3": (dict(steps=12, spacing="leading", resample=2, jump=3), None),
}


@pytest.mark.parametrize("name", list(GAUSS_CASES))
def test_matches_exact_gaussian_law(name, gaussian, diffusion):
    """The output law is the exact affine-Gaussian recursion, with NO allowance. It catches a
    wrong re-noising level for the known pixels, a wrong jump variance, a wrong grid."""
    from ddpm_lib.schedules import sampling_timesteps

    kwargs, _ = GAUSS_CASES[name]
    grid = sampling_timesteps(1000, kwargs["steps"], spacing=kwargs.get("spacing", "trailing"))
    path = repaint_schedule(len(grid), kwargs.get("resample", 1), kwargs.get("jump", 1))
    m, P = predicted_law(diffusion.alphas_cumprod, grid, path, GAUSS_MU, GAUSS_COV, X1)
    x2 = sample_x2(gaussian.eps_model(diffusion), diffusion, 20_000, 3, **kwargs)
    err = law_error(x2, m[1].item(), P[1, 1].item())
    assert err < K_SIGMA, (name, err, x2.mean().item(), x2.var().item(), m[1].item(), P[1, 1].item())


def test_replacement_is_biased_and_repaint_reduces_the_bias_exactly(diffusion):
    """In the exact law (no sampling): for a correlated Gaussian, replacement's x2 | x1 is
    shrunk towards the prior mean and too wide; RePaint moves it towards the true conditional.

    Measured (T = 1000 linear, 50 trailing steps, rho = 0.9, x1 = 0.5; exact conditional
    N(0.170, 0.218^2)); W2 is the 2-Wasserstein distance between the Gaussians:

    ======================  ======  =====  =====
    method                  mean    sd     W2
    ======================  ======  =====  =====
    replacement             0.076   0.255  0.101
    RePaint r = 2           0.113   0.221  0.057
    RePaint r = 10          0.149   0.193  0.033
    RePaint r = 10, jump 10 0.097   0.251  0.080
    ======================  ======  =====  =====

    RePaint is not exact: with more resampling its sd undershoots (r = 20 at 1000 steps:
    mean 0.167, sd 0.207), but its distance to the conditional is a third of replacement's.
    """
    from ddpm_lib.schedules import sampling_timesteps

    mean, var = exact_gaussian_conditional(GAUSS_MU, GAUSS_COV, X1)
    grid = sampling_timesteps(1000, 50)

    def w2(resample, jump=1):
        m, P = predicted_law(diffusion.alphas_cumprod, grid, repaint_schedule(50, resample, jump), GAUSS_MU,
                             GAUSS_COV, X1)
        return math.hypot(m[1].item() - mean, P[1, 1].sqrt().item() - math.sqrt(var))

    replacement, r2, r10, r10_jump10 = w2(1), w2(2), w2(10), w2(10, 10)
    assert replacement > 0.09  # clearly biased (0.45 conditional sd)
    assert r10 < 0.04 and r10 < replacement / 2.5
    assert r10 < r2 < replacement and r10_jump10 < replacement


# --- 2. the exact conditional of a mixture ----------------------------------------------------

# Two components, separated along the KNOWN coordinate x1 (and along x2); given x1 = 0.5 the
# exact p(x2 | x1) puts weight 0.9999 on the component at (0.8, 0.8).
MIX_MEANS = torch.tensor([[-0.8, -0.8], [0.8, 0.8]], dtype=torch.float64)
MIX_STD = 0.3
MIX_X1 = 0.5


def mixture_conditional(mixture, x1):
    """(weights, means, variances) of p(x2 | x1) for a Gaussian-mixture prior: weights
    proportional to w_k N(x1; mu_k1, S_k11), components the Gaussian conditionals."""
    mu, S = mixture.means, mixture.covs
    log_w = mixture.weights.log() - 0.5 * (x1 - mu[:, 0]) ** 2 / S[:, 0, 0] - 0.5 * S[:, 0, 0].log()
    return ((log_w - log_w.logsumexp(0)).exp(), mu[:, 1] + S[:, 1, 0] / S[:, 0, 0] * (x1 - mu[:, 0]),
            S[:, 1, 1] - S[:, 1, 0] ** 2 / S[:, 0, 0])


def test_repaint_reaches_the_exact_mixture_conditional_replacement_does_not(diffusion):
    """Measured (n = 4000, 50 trailing steps, seed 1; exact: mean 0.800, sd 0.300, P(x2 > 0) 0.996;
    seeds 0-3 give W1 0.33-0.35 for replacement and 0.052-0.053 for RePaint):

    ==================  ======  =====  =========  ===========================
    method              mean    sd     P(x2 > 0)  W1 to the exact conditional
    ==================  ======  =====  =========  ===========================
    replacement         0.45    0.62   0.82       0.35
    RePaint r = 10      0.79    0.25   0.997      0.053
    ==================  ======  =====  =========  ===========================

    (At 250 steps, r = 10, jump 10, n = 2000: W1 0.021, sd 0.30.) Replacement draws x2 from the
    wrong component 17% of the time: x2 commits to a mode at high noise, where the known
    coordinate, re-noised with noise independent of x2, says little about x1; RePaint's
    re-noising gives the model the chance to revise it. The MC floor of W1 here is about 0.01.
    """
    mixture = GaussianMixture(MIX_MEANS, torch.full((2,), MIX_STD), torch.tensor([0.5, 0.5]))
    weights, means, variances = mixture_conditional(mixture, torch.tensor(MIX_X1, dtype=torch.float64))
    g = gen(5)
    k = torch.multinomial(weights, 100_000, replacement=True, generator=g)
    exact = (means[k] + variances[k].sqrt() * torch.randn(100_000, generator=g, dtype=torch.float64)).sort().values
    known = torch.tensor([[MIX_X1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    model = mixture.eps_model(diffusion)

    def w1(resample):
        x = inpaint(model, diffusion, known, mask, shape=(4000, 2), steps=50, resample=resample, generator=gen(1))
        return wasserstein_1d(x[:, 1].sort().values, exact[::25], p=1).item(), (x[:, 1] > 0).double().mean().item()

    (w_replace, pos_replace), (w_repaint, pos_repaint) = w1(1), w1(10)
    assert w_replace > 0.25 and pos_replace < 0.9, (w_replace, pos_replace)
    assert w_repaint < 0.1 and pos_repaint > 0.98, (w_repaint, pos_repaint)
    assert w_repaint < w_replace / 3


# --- 3. conventions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_mixture():
    """A 4-D mixture read as 1x2x2 'images', for image-shaped inputs with broadcast masks."""
    means = torch.tensor([[-0.5, 0.5, 0.5, -0.5], [0.5, -0.5, -0.5, 0.5], [0.0, 0.8, -0.8, 0.0]],
                         dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.2, 0.15, 0.1]), torch.tensor([0.4, 0.4, 0.2]))


IMAGE_MASK = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # [1, 1, 2, 2]: diagonal known
IMAGE_KNOWN = torch.tensor([[[[-0.5, 9.0], [9.0, -0.5]]]], dtype=torch.float64)  # 9.0: ignored placeholders


@pytest.mark.parametrize("kwargs", [dict(steps=10), dict(steps=10, resample=3), dict(steps=12, resample=2, jump=4),
                                    dict(timesteps=[0, 10, 500, 999])])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_known_pixels_exact_and_unknown_filled(kwargs, prediction, image_mixture, diffusion):
    model = image_mixture.denoiser(diffusion, prediction)
    x = inpaint(model, diffusion, IMAGE_KNOWN, IMAGE_MASK, shape=(64, 1, 2, 2), generator=gen(0), **kwargs)
    known = IMAGE_MASK.expand_as(x) == 1
    assert torch.equal(x[known], IMAGE_KNOWN.expand_as(x)[known])  # the last step puts them back exactly
    unknown = x[~known]
    assert torch.isfinite(unknown).all() and (unknown - 9.0).abs().min() > 1 and unknown.std() > 0.05
    if prediction == "eps":  # the three parameterisations are the same denoiser: the same samples
        for other in ("x0", "v"):
            y = inpaint(image_mixture.denoiser(diffusion, other), diffusion, IMAGE_KNOWN, IMAGE_MASK,
                        shape=(64, 1, 2, 2), generator=gen(0), **kwargs)
            assert torch.allclose(x, y, atol=1e-8)


def test_float32_state_keeps_float32_known_pixels(image_mixture, diffusion):
    known = IMAGE_KNOWN.float()
    x = inpaint(image_mixture.eps_model(diffusion), diffusion, known, IMAGE_MASK.bool(), shape=(8, 1, 2, 2),
                steps=5, generator=gen(0))
    assert x.dtype == torch.float32
    keep = IMAGE_MASK.bool().expand_as(x)
    assert torch.equal(x[keep], known.expand_as(x)[keep])


def test_seeded_and_x_T(image_mixture, diffusion):
    model = image_mixture.eps_model(diffusion)

    def run(seed, **kw):
        return inpaint(model, diffusion, IMAGE_KNOWN, IMAGE_MASK, shape=(16, 1, 2, 2), steps=8, resample=2,
                       generator=gen(seed), **kw)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    x_T = torch.randn(16, 1, 2, 2, generator=gen(3), dtype=torch.float64)
    _, traj = inpaint(model, diffusion, IMAGE_KNOWN, IMAGE_MASK, timesteps=[0, 100, 300], x_T=x_T,
                      generator=gen(1), return_trajectory=True)
    # the start: known pixels from q(x_T | known) with x_T itself as the noise, unknown = x_T
    ab = diffusion.alphas_cumprod[300].item()
    expected = IMAGE_MASK * (math.sqrt(ab) * IMAGE_KNOWN + math.sqrt(1 - ab) * x_T) + (1 - IMAGE_MASK) * x_T
    assert torch.allclose(traj[0], expected, atol=1e-12) and len(traj) == 4


def test_mask_all_ones_returns_known(image_mixture, diffusion):
    known = torch.randn(8, 1, 2, 2, generator=gen(2), dtype=torch.float64)
    x = inpaint(image_mixture.eps_model(diffusion), diffusion, known, torch.ones(1, 1, 1, 1, dtype=torch.float64),
                steps=6, resample=2, generator=gen(0))
    assert torch.equal(x, known)


def test_mask_all_zeros_has_ddpm_samplers_law(mixture, diffusion):
    """With nothing known, inpainting is ancestral sampling. The random draws do not line up with
    ddpm_sample's (the known region's noise is drawn too), so the laws are compared: means and
    covariances of two independent 6000-sample sets agree within K_SIGMA standard errors."""
    model = mixture.eps_model(diffusion)
    n = 6000
    x = inpaint(model, diffusion, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2), shape=(n, 2),
                steps=25, generator=gen(11))
    ref = ddpm_sample(model, diffusion, (n, 2), steps=25, generator=gen(12), dtype=torch.float64)
    sd = ref.std(0)
    assert ((x.mean(0) - ref.mean(0)).abs() / (sd * math.sqrt(2 / n))).max() < K_SIGMA
    # relative error of each variance: SE ~ sqrt(2/n) per set (inflated x2 for the non-Gaussian mixture)
    assert ((x.var(0) / ref.var(0) - 1).abs()).max() < K_SIGMA * 2 * math.sqrt(2 / n) * 2
    # the mixture's weights, by the nearest mean
    lab_x = torch.cdist(x, mixture.means).argmin(1)
    lab_r = torch.cdist(ref, mixture.means).argmin(1)
    p_x, p_r = (torch.bincount(lab, minlength=3).double() / n for lab in (lab_x, lab_r))
    assert ((p_x - p_r).abs() / (p_r * (1 - p_r) * 2 / n).sqrt()).max() < K_SIGMA


def test_labels_reach_the_model_and_original_timesteps(mixture, diffusion):
    """y= goes to the model at every call; the model sees ORIGINAL timesteps, including the
    revisits of RePaint; with the exact conditional model of component k, the unknown
    coordinate lands on component k's conditional."""
    exact = mixture.eps_model(diffusion)
    seen = []

    def model(x, t, y=None):
        seen.append((int(t[0]), None if y is None else y.tolist()))
        return exact(x, t, y=y)

    n = 2000
    y = torch.full((n,), 1)
    known = torch.tensor([[0.9, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x = inpaint(model, diffusion, known, mask, shape=(n, 2), steps=4, resample=2, y=y, generator=gen(0))
    # each step t -> t' is redone from x_t re-noised (Algorithm 1): the model sees t twice
    assert [s[0] for s in seen] == [999, 999, 749, 749, 499, 499, 249]
    assert all(s[1] == y.tolist() for s in seen)
    # component 1: mean (0.9, -0.5), cov rotated 45 deg; E[x2 | x1 = mu1] = mu2
    assert abs(x[:, 1].mean().item() - (-0.5)) < 0.05
    seen.clear()
    inpaint(model, diffusion, known, mask, shape=(4, 2), steps=2, model_kwargs={"y": y[:4]}, generator=gen(0))
    assert [s[1] for s in seen] == [[1] * 4] * 2


def test_callback_sees_every_reverse_step(image_mixture, diffusion):
    infos = []
    x, traj = inpaint(image_mixture.eps_model(diffusion), diffusion, IMAGE_KNOWN, IMAGE_MASK, shape=(4, 1, 2, 2),
                      steps=5, resample=3, generator=gen(0), callback=infos.append, return_trajectory=True)
    reverse_steps = sum(1 for a, b in zip(repaint_schedule(5, 3)[:-1], repaint_schedule(5, 3)[1:]) if b < a)
    assert [i.index for i in infos] == list(range(reverse_steps)) and len(traj) == reverse_steps + 1
    assert torch.equal(traj[-1], x) and torch.equal(infos[-1].x, x)


def test_non_finite_model_output_is_reported(image_mixture, diffusion):
    def broken(x, t, y=None):
        return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        inpaint(broken, diffusion, IMAGE_KNOWN, IMAGE_MASK, shape=(2, 1, 2, 2), steps=3, generator=gen(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask=torch.full((1, 2), 2.0)), r"mask values must lie in \[0, 1\]"),
        (dict(mask=torch.tensor([[float("nan"), 1.0]])), r"mask values must lie in \[0, 1\]"),
        (dict(mask=torch.ones(3)), "mask has shape"),
        (dict(known=torch.zeros(3, 2)), "known has shape"),
        (dict(known=torch.zeros(4, 2, dtype=torch.long)), "known must be a floating-point tensor"),
        (dict(mask=[1, 0]), "mask must be a tensor"),
        (dict(known=torch.tensor([[float("inf"), 0.0]])), "known contains NaN or inf where mask > 0"),
        (dict(resample=0), "resample must be an integer >= 1"),
        (dict(resample=2.5), "resample must be an integer >= 1"),
        (dict(resample=True), "resample must be an integer >= 1"),
        (dict(jump=0), "jump must be an integer >= 1"),
        (dict(resample=2, jump=5), "jump=5 must be smaller than the number of steps"),
        (dict(steps=0), "steps"),
        (dict(x_T=torch.zeros(5, 2)), "known has shape"),
        (dict(variance="big"), "variance"),
        (dict(y=torch.zeros(4, dtype=torch.long), model_kwargs={"y": torch.zeros(4, dtype=torch.long)}), "once"),
    ],
)
def test_clear_errors(kwargs, match, mixture, diffusion):
    args = dict(known=torch.zeros(4, 2), mask=torch.tensor([[1.0, 0.0]]), shape=(4, 2), steps=5)
    args.update(kwargs)
    if "x_T" in kwargs:
        args.pop("shape")
    known, mask = args.pop("known"), args.pop("mask")
    with pytest.raises(ValueError, match=match):
        inpaint(mixture.eps_model(diffusion), diffusion, known, mask, **args)


def test_nan_in_unknown_region_is_ignored(mixture, diffusion):
    known = torch.tensor([[0.9, float("nan")]], dtype=torch.float64)
    x = inpaint(mixture.eps_model(diffusion), diffusion, known, torch.tensor([[1.0, 0.0]]), shape=(8, 2), steps=5,
                generator=gen(0))
    assert torch.isfinite(x).all() and (x[:, 0] == 0.9).all()


def test_loop_reads_nothing_on_the_host(host_reads):
    """On the device path (``checks.on_host`` False, as on CUDA) the reads of tensor values by
    the host (each a sync on CUDA) happen at entry only: as many at 3 steps as at 12, with
    RePaint's jumps."""
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig()).eval()
    d = GaussianDiffusion(linear_betas(1000))
    counts = []
    for steps in (3, 12):
        host_reads[0] = 0
        inpaint(net, d, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), shape=(4, 2), steps=steps, resample=3,
                jump=2, generator=gen(0))
        counts.append(host_reads[0])
    assert counts[0] == counts[1] and counts[0] <= 25, counts
