r"""Samplers: DDPM ancestral sampling, respaced DDPM, DDIM (and its inversion), DPM-Solver++.

Chapters 5 (DDPM), 7 (respacing), 8 (DDIM) and 9 (DPM-Solver++). Each sampler is one
function whose loop body is the chapter's update equation; the small helpers below are
named after the quantity they return and are shared by every sampler.

Conventions (``ddpm_lib`` design):

* A model is an eps-model called as ``model(x_t, t)`` or ``model(x_t, t, y=y)`` with ``t`` a
  LongTensor [B] of ORIGINAL timesteps, 0-based. A sampler walks indices of the chain
  ``diffusion`` and passes ``diffusion.timesteps[index]`` to the model, in plain sight.
* A model whose output has twice the channels of x (learned variance, improved DDPM) is
  read through :func:`split_eps`: DDIM and DPM-Solver++ use the first half; DDPM hands the
  whole output to ``GaussianDiffusion.p_mean_variance``, which knows ``learned_range``.
* ``x_T`` fixes the starting noise (so two samplers can share it); ``generator`` is the
  only source of randomness; ``return_trajectory=True`` returns ``(x0, [x_T, ..., x0])``.
* Clipping x0_hat to [-1, 1] (``clip_denoised``) is off by default: it is not in the papers'
  algorithms, only in their reference code (pitfall 3); when on, eps is re-derived from
  the clipped x0_hat.
* The book's default variance for DDPM is ``fixed_small`` (beta-tilde); the reference code
  defaults to ``fixed_large`` (beta) (pitfall 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lib.gaussian import standard_normal
from ddpm_lib.schedules import space_timesteps

__all__ = [
    "ddpm_sample",
    "ddim_sample",
    "ddim_invert",
    "dpm_solver_pp_sample",
    "alpha_bar_at",
    "split_eps",
    "model_eps",
    "initial_noise",
    "predict_x0",
    "predict_eps",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "log_snr",
    "dpm_solver_timesteps",
]

# --- shared helpers -----------------------------------------------------------------------


def alpha_bar_at(diffusion, t: Tensor) -> Tensor:
    r""":math:`\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)` (Ho et al. 2020, Eq. (4)) at ORIGINAL
    timesteps ``t`` (LongTensor [B]), float64 [B].

    ``diffusion`` is a ``GaussianDiffusion`` or a 1-D tensor of :math:`\bar\alpha_t`. A respaced
    chain knows only its kept timesteps (``diffusion.timesteps``): asking for one it skipped
    is an error, not a silent look-up of the wrong index (pitfall 10). Guidance wrappers and
    the analytic oracle read :math:`\bar\alpha` through this.
    """
    if isinstance(diffusion, Tensor):
        alphas_cumprod, timesteps = diffusion, None
    else:
        alphas_cumprod, timesteps = diffusion.alphas_cumprod, diffusion.timesteps
    t = torch.as_tensor(t).to(device=alphas_cumprod.device, dtype=torch.long).reshape(-1)
    index = t
    if timesteps is not None:
        timesteps = timesteps.to(alphas_cumprod.device)
        index = torch.searchsorted(timesteps, t).clamp(max=len(timesteps) - 1)
        if not torch.equal(timesteps[index], t):
            raise ValueError(f"timesteps {t.tolist()} are not all kept timesteps of this chain")
    elif t.numel() and (t.min() < 0 or t.max() >= len(alphas_cumprod)):
        raise ValueError(f"timesteps must lie in [0, {len(alphas_cumprod) - 1}], got {t.tolist()}")
    return alphas_cumprod[index].to(torch.float64)


def split_eps(output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(eps, extra channels or None) of a model output: the one place where a learned-variance
    output [B, 2C, ...] is split into its eps half and its variance half v (the interpolation
    weight of Nichol & Dhariwal 2021, Eq. (15)); DDIM and DPM-Solver++ use only the eps half."""
    if output.shape == x.shape:
        return output, None
    if output.shape[0] == x.shape[0] and output.shape[1] == 2 * x.shape[1] and output.shape[2:] == x.shape[2:]:
        eps, rest = output.chunk(2, dim=1)
        return eps, rest
    raise ValueError(f"model output shape {tuple(output.shape)} is neither x's {tuple(x.shape)} nor 2x its channels")


def model_eps(model: Callable[..., Tensor], diffusion, x: Tensor, index: int, y: Tensor | None = None) -> Tensor:
    r""":math:`\varepsilon_\theta(x_t, t)` (Ho et al. 2020, Eq. (11)) at step ``index`` of the chain
    ``diffusion``; the model is called with the ORIGINAL timestep ``diffusion.timesteps[index]``
    (and ``y=`` if given), as a respaced chain must (Nichol & Dhariwal 2021, §4; pitfall 10)."""
    t = torch.full((x.shape[0],), int(diffusion.timesteps[index]), dtype=torch.long, device=x.device)
    output = model(x, t) if y is None else model(x, t, y=y)
    return split_eps(output, x)[0]


def initial_noise(model, shape: Sequence[int], x_T: Tensor | None, generator: torch.Generator | None,
                  diffusion=None) -> Tensor:
    r""":math:`x_T \sim \mathcal N(0, I)` (Ho et al. 2020, Algorithm 2, line 1): the given start
    noise (checked against ``shape``) or a draw in the default dtype.

    The draw is made on the generator's device (``gaussian.standard_normal``) and moved to where
    the sampling runs: the device of the model's parameters; for a model that is not an
    ``nn.Module`` (a guidance wrapper, the analytic oracle) or has no parameters, the device
    of ``diffusion.betas``; the generator's device (else the CPU) if neither is known.
    """
    shape = tuple(shape)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={shape} was asked for")
        return x_T
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if param is not None:
        device = param.device
    elif diffusion is not None:
        # guidance wrappers are plain functions: the schedule's device is where the caller sampling
        # with it put everything (cli.generate moves the diffusion to the model's device)
        device = diffusion.betas.device
    else:
        device = generator.device if generator is not None else torch.device("cpu")
    return standard_normal(shape, generator, dtype=torch.get_default_dtype(), device=device)


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar: float) -> Tensor:
    r""":math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}` (Ho et al. 2020, Eq. (15), i.e.
    Eq. (4) inverted; the "predicted x0" of DDIM, Song et al. 2020, Eq. (12))."""
    return (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


def predict_eps(x_t: Tensor, x0: Tensor, alpha_bar: float) -> Tensor:
    r""":math:`\hat\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}`: Ho et al. 2020,
    Eq. (4) (:math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon`) solved for eps; used
    after clipping x0_hat, so that DDIM's Eq. (12) sees an eps consistent with it (pitfall 3)."""
    return (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)


def _denoised(x: Tensor, eps: Tensor, alpha_bar: float, clip: bool) -> tuple[Tensor, Tensor]:
    # (x0_hat, eps_hat), with the optional clip of x0_hat and eps re-derived from it (pitfall 3)
    x0 = predict_x0(x, eps, alpha_bar)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = predict_eps(x, x0, alpha_bar)
    return x0, eps


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    r""":math:`\sigma_t(\eta) = \eta\sqrt{(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_{t-1}}`
    (DDIM, Song et al. 2020, arXiv 2010.02502, Eq. (16)); eta = 1 is DDPM's beta-tilde, eta = 0 deterministic."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))


def ddim_step(x0: Tensor, eps: Tensor, alpha_bar_prev: float, sigma: float, noise: Tensor | None) -> Tensor:
    r""":math:`x_{t-1} = \sqrt{\bar\alpha_{t-1}}\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\hat\varepsilon + \sigma_t z`
    (DDIM, Song et al. 2020, Eq. (12)); ``noise`` z may be None when sigma = 0."""
    x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
    return x if sigma == 0 else x + sigma * noise


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The DDIM sub-sequence tau (Song et al. 2020, arXiv 2010.02502, §4.2; Appendix D.2 "linear"),
    ascending: ``space_timesteps(T, f"ddim{steps}")`` = ``[0, s, ..., (steps - 1) s]`` with
    ``s = T // steps``, exactly ``steps`` steps for every 1 <= steps <= T.

    Example: T = 1000, steps = 3 -> ``[0, 333, 666]``; steps = 50 -> ``[0, 20, ..., 980]``.
    "Leading" spacing: it starts at 0 and does not reach T - 1 unless steps = T (pitfall 1).
    """
    return space_timesteps(T, f"ddim{_check_steps(steps, T)}")


def log_snr(alpha_bar: float) -> float:
    r"""Half the log-SNR, :math:`\lambda_t = \log(\alpha_t/\sigma_t) = \tfrac12\log(\bar\alpha_t/(1-\bar\alpha_t))`
    with :math:`\alpha_t = \sqrt{\bar\alpha_t}`, :math:`\sigma_t = \sqrt{1-\bar\alpha_t}`: the time variable of
    DPM-Solver (Lu et al. 2022a, arXiv 2206.00927, §3.1) in which DPM-Solver++ (Lu et al. 2022b,
    arXiv 2211.01095, Algorithm 2) takes its steps h_i = lambda_{t_i} - lambda_{t_{i-1}}."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpm_solver_timesteps(alphas_cumprod: Tensor, steps: int) -> list[int]:
    r"""The time grid of DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095, Algorithm 2 takes it as
    input): integer steps, decreasing from T - 1 to 0, whose :math:`\lambda` (:func:`log_snr`) is
    nearest to ``steps`` values spaced uniformly in :math:`\lambda` (the "logSNR" step-size
    schedule of DPM-Solver, Lu et al. 2022a, arXiv 2206.00927, §3.3). Repeats are dropped, so
    there may be fewer than ``steps``.

    Example: linear schedule, T = 1000, 5 steps -> ``[999, 722, 302, 30, 0]``.
    """
    T = len(alphas_cumprod)
    if float(alphas_cumprod[-1]) <= 0:
        raise ValueError("alpha_bar of the last step is 0 (zero terminal SNR): its log-SNR is -inf and eps "
                         "cannot give x0 there (pitfall 2); sample with DDPM and v-prediction instead")
    lam = 0.5 * (alphas_cumprod.log() - torch.log1p(-alphas_cumprod)).to(torch.float64).cpu()
    targets = torch.linspace(float(lam[-1]), float(lam[0]), _check_steps(steps, T), dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
    return list(dict.fromkeys(nearest))


def _check_steps(steps, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and T = {T}, got {steps!r}")
    return steps


def _maybe_tqdm(iterable, progress: bool, total: int):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total)


# --- samplers -------------------------------------------------------------------------------


@torch.no_grad()
def ddpm_sample(model, diffusion, shape, *, steps=None, variance="fixed_small", clip_denoised=False, prediction="eps",
                generator=None, progress=False, return_trajectory=False, y=None, x_T=None):
    r"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020, arXiv 2006.11239; mean of Eq. (11); book chapter 5):
    :math:`x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z`, with no noise at the last step.

    Args:
        model: eps-model (or x0/v-model with ``prediction``; 2C channels with ``learned_range``).
        diffusion: the T-step ``GaussianDiffusion`` the model was trained with.
        shape: of the samples, e.g. ``(n, 2)`` or ``(n, C, H, W)``.
        steps: None for all T steps, or fewer: the chain is respaced to
            ``space_timesteps(T, [steps])`` (improved DDPM, sec. 4) and the model is still
            called with ORIGINAL timesteps.
        variance: ``"fixed_small"`` (beta-tilde, the book's default), ``"fixed_large"`` (beta)
            or ``"learned_range"``.
    Returns x0 [shape] (and the trajectory [x_T, ..., x0] if asked).
    """
    if steps is not None:
        diffusion = diffusion.respace(space_timesteps(diffusion.T, [_check_steps(steps, diffusion.T)]))
    x = initial_noise(model, shape, x_T, generator, diffusion)
    kwargs = {} if y is None else {"y": y}
    trajectory = [x]
    for index in _maybe_tqdm(reversed(range(diffusion.T)), progress, diffusion.T):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        # 1. the mean and variance of p(x_{t-1} | x_t) (DDPM eq. 11); the chain maps t to the original step
        out = diffusion.p_mean_variance(model, x, t, variance=variance, prediction=prediction,
                                        clip_denoised=clip_denoised, model_kwargs=kwargs)
        # 2. x_{t-1} = mean + sigma z; the last step returns the mean (Algorithm 2, line 4)
        x = out["mean"]
        if index > 0:
            x = x + (0.5 * out["log_variance"]).exp() * standard_normal(x.shape, generator, dtype=x.dtype, device=x.device)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def ddim_sample(model, diffusion, shape, *, steps=50, eta=0.0, clip_denoised=False, generator=None, progress=False,
                return_trajectory=False, y=None, x_T=None):
    r"""DDIM sampling (Song et al. 2020, arXiv 2010.02502, Eq. (12), with :math:`\sigma_t` of Eq. (16)
    times ``eta``; chapter 8).

    The grid is ``ddim_timesteps(T, steps)`` = ``[0, s, ..., (steps - 1) s]``, ``s = T // steps``,
    for any 1 <= steps <= T; each step goes from a kept timestep to the PREVIOUS KEPT one, and
    from the first kept step to :math:`\bar\alpha = 1`, i.e. to x0_hat (pitfall 1). ``eta = 0``
    is deterministic given ``x_T``; ``eta = 1`` has DDPM's marginals. Returns x0 (and the
    trajectory if asked).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    kept = ddim_timesteps(diffusion.T, steps)
    x = initial_noise(model, shape, x_T, generator, diffusion)
    trajectory = [x]
    for i in _maybe_tqdm(reversed(range(len(kept))), progress, len(kept)):
        alpha_bar = float(diffusion.alphas_cumprod[kept[i]])
        alpha_bar_prev = float(diffusion.alphas_cumprod[kept[i - 1]]) if i > 0 else 1.0
        # 1. predict eps and x0 at the kept timestep
        x0, eps = _denoised(x, model_eps(model, diffusion, x, kept[i], y), alpha_bar, clip_denoised)
        # 2. jump to the previous kept timestep (eq. 12)
        sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
        noise = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device) if sigma > 0 else None
        x = ddim_step(x0, eps, alpha_bar_prev, sigma, noise)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def ddim_invert(model, diffusion, x0, *, steps=50, y=None, progress=False, return_trajectory=False):
    r"""DDIM inversion (Song et al. 2020, arXiv 2010.02502, §5.4 "encoding" by the ODE of Eq. (14),
    discretised as Eq. (12) with eta = 0 / Eq. (13)): run the deterministic DDIM update forward,
    from x0 at :math:`\bar\alpha = 1` up the grid ``ddim_timesteps(T, steps)`` (any 1 <= steps <= T)
    to x_T.

    The eps of each step is evaluated at the CURRENT point with the TARGET timestep (the
    ODE's Euler step taken with the slope of the end it moves to), as in null-text inversion
    (Mokady et al. 2023). ``ddim_sample(..., steps, x_T=ddim_invert(..., steps))`` then
    reconstructs x0 up to the discretisation error. Returns x_T (and the trajectory).
    """
    kept = ddim_timesteps(diffusion.T, steps)
    x = x0
    trajectory = [x]
    for i in _maybe_tqdm(range(len(kept)), progress, len(kept)):
        alpha_bar_prev = float(diffusion.alphas_cumprod[kept[i - 1]]) if i > 0 else 1.0
        alpha_bar = float(diffusion.alphas_cumprod[kept[i]])
        eps = model_eps(model, diffusion, x, kept[i], y)
        x = ddim_step(predict_x0(x, eps, alpha_bar_prev), eps, alpha_bar, 0.0, None)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def dpm_solver_pp_sample(model, diffusion, shape, *, steps=20, order=2, clip_denoised=False, generator=None,
                         progress=False, return_trajectory=False, y=None, x_T=None):
    r"""DPM-Solver++(2M), multistep in data-prediction form (Lu et al. 2022, arXiv 2211.01095,
    Algorithm 2; book chapter 9). With :math:`\lambda = \log(\alpha/\sigma)`, :math:`h_i = \lambda_{t_i} - \lambda_{t_{i-1}}`:

    .. math::
        x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}} x_{t_{i-1}} - \alpha_{t_i}(e^{-h_i} - 1) D_i,\quad
        D_i = \bigl(1 + \tfrac{1}{2r_i}\bigr)\hat x_0^{(i-1)} - \tfrac{1}{2r_i}\hat x_0^{(i-2)},\ r_i = h_{i-1}/h_i,

    with :math:`D_1 = \hat x_0^{(0)}` (first order). The grid is ``dpm_solver_timesteps``: integer
    steps nearest to a uniform log-SNR grid from T - 1 to 0, with h from their ACTUAL
    :math:`\lambda`, so each update is exact for its grid. ``order=1`` is DDIM (eta = 0) on that
    grid. The last evaluation, at t = 0, returns its x0_hat (the "denoise to zero" step), so
    the number of model evaluations is ``len(grid)`` <= ``steps``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ 1 = DDIM, 2 = 2M), got {order!r}")
    grid = dpm_solver_timesteps(diffusion.alphas_cumprod, steps)
    x = initial_noise(model, shape, x_T, generator, diffusion)
    trajectory, x0_prev, h_prev = [x], None, None
    for i in _maybe_tqdm(range(len(grid)), progress, len(grid)):
        alpha_bar = float(diffusion.alphas_cumprod[grid[i]])
        # 1. data prediction x0_hat at t_{i}
        x0, _ = _denoised(x, model_eps(model, diffusion, x, grid[i], y), alpha_bar, clip_denoised)
        if i == len(grid) - 1:
            x = x0  # the step to sigma = 0 (h = inf) returns x0_hat
        else:
            alpha_bar_next = float(diffusion.alphas_cumprod[grid[i + 1]])
            h = log_snr(alpha_bar_next) - log_snr(alpha_bar)
            # 2. second-order multistep correction from the previous x0_hat (Algorithm 2, line 6)
            d = x0 if order == 1 or x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            ratio = math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar))
            x = ratio * x - math.sqrt(alpha_bar_next) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
