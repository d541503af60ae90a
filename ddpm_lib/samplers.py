r"""Samplers: DDPM ancestral sampling (respaced or not), DDIM (and its inversion), DPM-Solver++.

Chapters 5 (DDPM), 7 (respacing), 8 (DDIM) and 9 (DPM-Solver++). Each sampler is one
function whose loop body is the chapter's update equation; what they share is below.

The interface (DESIGN.md, "Samplers"):

* ``model(x_t, t, **model_kwargs)`` with ``t`` a LongTensor [B] of ORIGINAL timesteps, 0-based.
  ``y=labels`` is short for ``model_kwargs={"y": labels}``.
* What the model predicts (eps, x0 or v; 2C output channels with a learned variance) is read
  from ``prediction=`` or ``model.prediction`` (``ddpm_lib.predictions``, the one conversion);
  the loaders set it, so a loaded model samples correctly without being told.
* The grid: ``steps=N`` with a named ``spacing`` ("trailing", the default, "linspace",
  "leading"), or an explicit ``timesteps=`` list: ``schedules.sampling_timesteps``, the same
  grid in every sampler. The default starts at t = T - 1. Without either, DDPM takes all T
  steps, DDIM 50 and DPM-Solver++ 20 (at most T).
* ``dtype`` of the state: given, else ``x_T``'s, else the model's parameters', else torch's
  default. Update coefficients are applied in float32 or better and the result is cast back
  once per step; the model sees the state in its parameters' dtype.
* ``callback(info)`` is called after each step with a :class:`StepInfo` (step index, t, x,
  x0_hat), as k-diffusion does; ``return_trajectory=True`` is sugar over it.
* No host read (``.item()``, ``bool(tensor)``, ``.tolist()``, ...) inside a loop: the grid's
  coefficients are read once, before it (one ``.tolist()``), so on CUDA no step waits for
  the GPU. A chain whose last alpha_bar is far from 0 gets one warning.
* Clipping x0_hat to [-1, 1] (``clip_denoised``) is off by default: it is in the reference
  code, not in the papers' algorithms (pitfall 3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm_lib.diffusion import alpha_bar_at  # noqa: F401  (re-exported: guidance and the oracle read it)
from ddpm_lib.gaussian import standard_normal
from ddpm_lib.predictions import (
    compute_dtype, eps_x0_from_prediction, resolve_prediction, resolve_variance, split_output, x0_from_eps,
)
from ddpm_lib.schedules import sampling_timesteps

__all__ = [
    "ddpm_sample",
    "ddim_sample",
    "ddim_invert",
    "dpm_solver_pp_sample",
    "heun_sample",
    "StepInfo",
    "alpha_bar_at",
    "initial_noise",
    "ddim_sigma",
    "ddim_step",
    "log_snr",
    "dpm_solver_timesteps",
    "TERMINAL_SNR_WARNING",
]

# Above this SNR at the last step, x_T ~ N(0, I) is visibly not the chain's marginal (pitfall 2).
TERMINAL_SNR_WARNING = 1e-3
_warned_terminal: set[float] = set()


@dataclass
class StepInfo:
    """What a sampler's ``callback`` sees after each step: the step's number ``index`` (0 for the
    first step taken), the ORIGINAL timestep ``t`` the step started from, the new state ``x``
    and the denoised prediction ``x0_hat`` made at ``t``."""

    index: int
    t: int
    x: Tensor
    x0_hat: Tensor


# --- shared set-up --------------------------------------------------------------------------


def _param_dtype(model) -> torch.dtype | None:
    """The floating dtype of an nn.Module's parameters, else None (a function, the oracle)."""
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return param.dtype if param is not None and param.is_floating_point() else None


def _state_dtype(model, x_T: Tensor | None, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if x_T is not None:
        return x_T.dtype
    return _param_dtype(model) or torch.get_default_dtype()


def initial_noise(model, shape: Sequence[int], x_T: Tensor | None, generator: torch.Generator | None,
                  diffusion=None, dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`x_T \sim \mathcal N(0, I)` (Ho et al. 2020, Algorithm 2, line 1): the given start
    noise (checked against ``shape``, cast to ``dtype`` if given) or a draw.

    The draw is made on the generator's device (``gaussian.standard_normal``) in the state dtype
    (see the module's conventions) and moved to where the sampling runs: the device of the
    model's parameters; for a model that is not an ``nn.Module`` (a guidance wrapper, the
    analytic oracle) or has no parameters, the device of ``diffusion.betas``; else the
    generator's device (else the CPU).
    """
    shape = tuple(shape)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={shape} was asked for")
        return x_T if dtype is None else x_T.to(dtype)
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if param is not None:
        device = param.device
    elif diffusion is not None:
        device = diffusion.betas.device
    else:
        device = generator.device if generator is not None else torch.device("cpu")
    return standard_normal(shape, generator, dtype=_state_dtype(model, None, dtype), device=device)


def _warn_terminal_snr(alpha_bar_last: float) -> None:
    snr = alpha_bar_last / (1 - alpha_bar_last) if alpha_bar_last < 1 else math.inf
    if snr > TERMINAL_SNR_WARNING and alpha_bar_last not in _warned_terminal:
        _warned_terminal.add(alpha_bar_last)
        warnings.warn(
            f"the chain ends at alpha_bar_T = {alpha_bar_last:.3g} (SNR {snr:.3g} > {TERMINAL_SNR_WARNING:g}): x_T "
            f"~ N(0, I) is not the chain's last marginal, so sampling starts from the wrong distribution; use more "
            f"steps T, a larger beta_end, the cosine schedule or schedules.rescale_zero_terminal_snr",
            stacklevel=3,
        )


@dataclass
class _Plan:
    """A sampler's loop, fixed before it starts: grid, coefficients, model call, state."""

    grid: list[int]          # indices into the chain, ascending
    model_t: list[int]       # the ORIGINAL timestep of each
    alpha_bar: list[float]   # alpha_bar of each, read once
    prediction: str
    kwargs: dict
    in_dtype: torch.dtype


def _plan(model, diffusion, steps, spacing, timesteps, prediction, model_kwargs, y, x_like_dtype,
          default_steps: int | None = None) -> _Plan:
    if steps is None and timesteps is None:
        steps = default_steps and min(default_steps, diffusion.T)
    grid = sampling_timesteps(diffusion.T, steps, spacing=spacing, timesteps=timesteps)
    index = torch.tensor(grid, dtype=torch.long, device=diffusion.alphas_cumprod.device)
    alpha_bar = diffusion.alphas_cumprod[index].tolist()
    model_t = diffusion.timesteps.to(index.device)[index].tolist()
    _warn_terminal_snr(float(diffusion.alphas_cumprod[-1]))
    kwargs = dict(model_kwargs or {})
    if y is not None:
        if "y" in kwargs:
            raise ValueError("pass the labels once: y= or model_kwargs={'y': ...}, not both")
        kwargs["y"] = y
    # A bfloat16 network refuses float32 input ("mat1 and mat2 must have the same dtype").
    in_dtype = _param_dtype(model) or x_like_dtype
    return _Plan(grid, model_t, alpha_bar, resolve_prediction(model, prediction), kwargs, in_dtype)


def _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction, model_kwargs, y,
           default_steps: int | None, *, ode_solver: str | None = None) -> tuple[Tensor, _Plan]:
    """x_T and the plan of a sampler. An ODE solver (``ode_solver`` names it) needs a finite
    log-SNR at the grid's first point, which zero terminal SNR (alpha_bar = 0) does not have."""
    x = initial_noise(model, shape, x_T, generator, diffusion, _state_dtype(model, x_T, dtype))
    plan = _plan(model, diffusion, steps, spacing, timesteps, prediction, model_kwargs, y, x.dtype, default_steps)
    if ode_solver is not None and plan.alpha_bar[-1] <= 0:
        raise ValueError(f"{ode_solver}: alpha_bar at the grid's first point is 0 (zero terminal SNR), so its "
                         f"log-SNR is -inf; start the grid below T - 1 or sample with DDIM")
    return x, plan


def _denoise(model, plan: _Plan, x: Tensor, i: int, clip: bool) -> tuple[Tensor, Tensor]:
    r"""(eps_hat, x0_hat) at grid point ``i``, in float32 or better: the model called with the
    ORIGINAL timestep (pitfall 10), its output read through ``predictions`` (one conversion)."""
    t = torch.full((x.shape[0],), plan.model_t[i], dtype=torch.long, device=x.device)
    out = model(x.to(plan.in_dtype), t, **plan.kwargs)
    xc = x.to(compute_dtype(x))
    pred, _ = split_output(out.to(xc.dtype), xc)
    ab = plan.alpha_bar[i]
    return eps_x0_from_prediction(pred, xc, math.sqrt(ab), math.sqrt(1 - ab), plan.prediction, clip)


class _FiniteWatch:
    """Remembers, on the device, the first step whose output was not finite; read once at the end
    (one host read per sampling call, none per step)."""

    def __init__(self, x: Tensor):
        self.first_bad = torch.where(torch.isfinite(x).all(), -1, 0).to(device=x.device)
        self.step = 0

    def update(self, x: Tensor) -> None:
        self.step += 1
        ok = torch.isfinite(x).all()
        self.first_bad = torch.where((self.first_bad < 0) & ~ok, self.step, self.first_bad)

    def check(self, name: str) -> None:
        first = int(self.first_bad)
        if first == 0:
            raise ValueError(f"{name}: the starting point (x_T; x0 for ddim_invert) is not finite (NaN or inf)")
        if first > 0:
            raise ValueError(f"{name}: the samples became non-finite (NaN or inf) at step {first} of {self.step}: "
                             f"the model returned NaN/inf, or its output exploded")


class _Steps:
    """What every sampler does after a step: watch for non-finite values, call the callback, keep
    the trajectory if asked (``return_trajectory`` is sugar over the callback); and at the end
    check once and return ``x`` or ``(x, trajectory)``."""

    def __init__(self, callback, return_trajectory: bool, x: Tensor):
        self.callback, self.watch = callback, _FiniteWatch(x)
        self.trajectory = [x] if return_trajectory else None

    def after(self, info: StepInfo) -> None:
        self.watch.update(info.x)
        if self.trajectory is not None:
            self.trajectory.append(info.x)
        if self.callback is not None:
            self.callback(info)

    def result(self, name: str, x: Tensor):
        self.watch.check(name)
        return x if self.trajectory is None else (x, self.trajectory)


def _maybe_tqdm(iterable, progress: bool, total: int):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total)


# --- DDIM and DPM-Solver coefficients ----------------------------------------------------------


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    r""":math:`\sigma_t(\eta) = \eta\sqrt{(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_{t-1}}`
    (DDIM, Song et al. 2020, arXiv 2010.02502, Eq. (16)); eta = 1 is DDPM's beta-tilde, eta = 0 deterministic."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))


def ddim_step(x0: Tensor, eps: Tensor, alpha_bar_prev: float, sigma: float, noise: Tensor | None) -> Tensor:
    r""":math:`x_{t-1} = \sqrt{\bar\alpha_{t-1}}\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\hat\varepsilon + \sigma_t z`
    (DDIM, Song et al. 2020, Eq. (12)); ``noise`` z may be None when sigma = 0."""
    x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
    return x if sigma == 0 else x + sigma * noise


def log_snr(alpha_bar: float) -> float:
    r"""Half the log-SNR, :math:`\lambda_t = \log(\alpha_t/\sigma_t) = \tfrac12\log(\bar\alpha_t/(1-\bar\alpha_t))`
    with :math:`\alpha_t = \sqrt{\bar\alpha_t}`, :math:`\sigma_t = \sqrt{1-\bar\alpha_t}`: the time variable of
    DPM-Solver (Lu et al. 2022a, arXiv 2206.00927, §3.1) in which DPM-Solver++ (Lu et al. 2022b,
    arXiv 2211.01095, Algorithm 2) takes its steps h_i = lambda_{t_i} - lambda_{t_{i-1}}."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpm_solver_timesteps(alphas_cumprod: Tensor, steps: int) -> list[int]:
    r"""A grid uniform in log-SNR, for ``timesteps=`` of any sampler (the "logSNR" step-size
    schedule of DPM-Solver, Lu et al. 2022a, arXiv 2206.00927, §3.3): the integer steps, ascending,
    whose :math:`\lambda` (:func:`log_snr`) is nearest to ``steps`` values spaced uniformly in
    :math:`\lambda` from t = T - 1 to t = 0. Repeats are dropped, so there may be fewer than ``steps``.

    Example: linear schedule, T = 1000, 5 steps -> ``[0, 30, 302, 722, 999]``.
    """
    T = len(alphas_cumprod)
    if float(alphas_cumprod[-1]) <= 0:
        raise ValueError("alpha_bar of the last step is 0 (zero terminal SNR): its log-SNR is -inf; "
                         "use a named spacing instead")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and T = {T}, got {steps!r}")
    lam = 0.5 * (alphas_cumprod.log() - torch.log1p(-alphas_cumprod)).to(torch.float64).cpu()
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
    return sorted(set(nearest))


# --- samplers -------------------------------------------------------------------------------


@torch.no_grad()
def ddpm_sample(model, diffusion, shape, *, steps=None, spacing="trailing", timesteps=None, variance=None,
                prediction=None, clip_denoised=False, generator=None, dtype=None, model_kwargs=None, y=None,
                callback=None, x_T=None, progress=False, return_trajectory=False):
    r"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020, arXiv 2006.11239; mean of Eq. (11); book
    chapter 5): :math:`x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z`, with no noise at the last step.

    Args:
        model: called as ``model(x_t, t, **model_kwargs)``; predicts eps, x0 or v
            (``prediction`` or ``model.prediction``), with 2C channels for ``learned_range``.
        diffusion: the T-step ``GaussianDiffusion`` the model was trained with.
        shape: of the samples, e.g. ``(n, 2)`` or ``(n, C, H, W)``.
        steps, spacing, timesteps: all T steps by default; else the chain is respaced to the
            grid ``schedules.sampling_timesteps`` (improved DDPM, §4: the betas are recomputed so
            the kept marginals are unchanged) and the model still sees ORIGINAL timesteps.
        variance: ``"fixed_small"`` (beta-tilde, the book's default), ``"fixed_large"`` (beta)
            or ``"learned_range"``; None reads ``model.variance``.
    Returns x0 [shape] (and the trajectory [x_T, ..., x0] if asked). See the module for the rest.
    """
    variance = resolve_variance(model, variance)
    x, plan = _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction,
                     model_kwargs, y, None)
    if len(plan.grid) < diffusion.T:
        diffusion = diffusion.respace(plan.grid)
    record = _Steps(callback, return_trajectory, x)

    def net(x_in: Tensor, t: Tensor, **kwargs) -> Tensor:  # the state stays in its dtype; the net gets its own
        return model(x_in.to(plan.in_dtype), t, **kwargs)

    for n, index in enumerate(_maybe_tqdm(reversed(range(diffusion.T)), progress, diffusion.T)):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        # 1. the mean and variance of p(x_{t-1} | x_t) (DDPM eq. 11); the chain maps t to the original step
        out = diffusion.p_mean_variance(net, x, t, variance=variance,
                                        prediction=plan.prediction, clip_denoised=clip_denoised,
                                        model_kwargs=plan.kwargs)
        # 2. x_{t-1} = mean + sigma z; the last step returns the mean (Algorithm 2, line 4)
        x_next = out["mean"]
        if index > 0:
            z = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device)
            x_next = x_next + (0.5 * out["log_variance"]).exp() * z
        x = x_next.to(x.dtype)
        record.after(StepInfo(n, plan.model_t[index], x, out["pred_x0"]))
    return record.result("ddpm_sample", x)


@torch.no_grad()
def ddim_sample(model, diffusion, shape, *, steps=None, spacing="trailing", timesteps=None, eta=0.0, prediction=None,
                clip_denoised=False, generator=None, dtype=None, model_kwargs=None, y=None, callback=None, x_T=None,
                progress=False, return_trajectory=False):
    r"""DDIM sampling (Song et al. 2020, arXiv 2010.02502, Eq. (12), with :math:`\sigma_t` of Eq. (16)
    times ``eta``; chapter 8).

    Walks the grid (``steps``, ``spacing`` or ``timesteps``; see the module) from its last
    point down: each step goes from a kept timestep to the PREVIOUS KEPT one, and from the
    first kept step to :math:`\bar\alpha = 1`, i.e. to x0_hat (pitfall 1). ``eta = 0`` is
    deterministic given ``x_T``; ``eta = 1`` has DDPM's marginals. The model's prediction
    (eps, x0, v) is converted to eps and x0 (``ddpm_lib.predictions``); a learned-variance
    model's variance channels are unused. Returns x0 (and the trajectory if asked).
    """
    if not 0 <= eta <= 1:  # also refuses NaN
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}; above 1 "
                         f"sigma_t^2 can exceed 1 - alpha_bar_(t-1), where DDIM's eq. 12 has no real solution")
    x, plan = _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction,
                     model_kwargs, y, 50)
    ab = plan.alpha_bar
    ab_prev = [1.0] + ab[:-1]
    sigmas = [ddim_sigma(a, p, eta) for a, p in zip(ab, ab_prev)]
    record = _Steps(callback, return_trajectory, x)
    for n, i in enumerate(_maybe_tqdm(reversed(range(len(ab))), progress, len(ab))):
        # 1. predict eps and x0 at the kept timestep
        eps, x0 = _denoise(model, plan, x, i, clip_denoised)
        # 2. jump to the previous kept timestep (eq. 12)
        noise = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device) if sigmas[i] > 0 else None
        x = ddim_step(x0, eps, ab_prev[i], sigmas[i], noise).to(x.dtype)
        record.after(StepInfo(n, plan.model_t[i], x, x0))
    return record.result("ddim_sample", x)


@torch.no_grad()
def ddim_invert(model, diffusion, x0, *, steps=None, spacing="trailing", timesteps=None, prediction=None,
                model_kwargs=None, y=None, callback=None, progress=False, return_trajectory=False):
    r"""DDIM inversion (Song et al. 2020, arXiv 2010.02502, §5.4 "encoding" by the ODE of Eq. (14),
    discretised as Eq. (12) with eta = 0 / Eq. (13)): run the deterministic DDIM update forward,
    from x0 at :math:`\bar\alpha = 1` up the grid (``steps``, ``spacing`` or ``timesteps``) to x_T.

    The eps of each step is evaluated at the CURRENT point with the TARGET timestep (the
    ODE's Euler step taken with the slope of the end it moves to), as in null-text inversion
    (Mokady et al. 2023). ``ddim_sample(..., x_T=ddim_invert(...))`` on the same grid then
    reconstructs x0 up to the discretisation error. Returns x_T (and the trajectory).
    """
    x = x0
    plan = _plan(model, diffusion, steps, spacing, timesteps, prediction, model_kwargs, y, x.dtype, 50)
    ab = plan.alpha_bar
    record = _Steps(callback, return_trajectory, x)
    xc_prev_ab = 1.0
    for i in _maybe_tqdm(range(len(ab)), progress, len(ab)):
        # eps at the current point, TARGET timestep; x0 recovered with the CURRENT alpha_bar
        eps, _ = _denoise(model, plan, x, i, False)
        x0_hat = x0_from_eps(x.to(eps.dtype), eps, math.sqrt(xc_prev_ab), math.sqrt(1 - xc_prev_ab))
        x = ddim_step(x0_hat, eps, ab[i], 0.0, None).to(x.dtype)
        xc_prev_ab = ab[i]
        record.after(StepInfo(i, plan.model_t[i], x, x0_hat))
    return record.result("ddim_invert", x)


@torch.no_grad()
def dpm_solver_pp_sample(model, diffusion, shape, *, steps=None, order=2, spacing="trailing", timesteps=None,
                         prediction=None, clip_denoised=False, generator=None, dtype=None, model_kwargs=None, y=None,
                         callback=None, x_T=None, progress=False, return_trajectory=False):
    r"""DPM-Solver++(2M), multistep in data-prediction form (Lu et al. 2022, arXiv 2211.01095,
    Algorithm 2; book chapter 9). With :math:`\lambda = \log(\alpha/\sigma)`, :math:`h_i = \lambda_{t_i} - \lambda_{t_{i-1}}`:

    .. math::
        x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}} x_{t_{i-1}} - \alpha_{t_i}(e^{-h_i} - 1) D_i,\quad
        D_i = \bigl(1 + \tfrac{1}{2r_i}\bigr)\hat x_0^{(i-1)} - \tfrac{1}{2r_i}\hat x_0^{(i-2)},\ r_i = h_{i-1}/h_i,

    with :math:`D_1 = \hat x_0^{(0)}` (first order). The grid is the samplers' common one (for a
    grid uniform in log-SNR pass ``timesteps=dpm_solver_timesteps(...)``); h comes from the
    grid's ACTUAL :math:`\lambda`, so each update is exact for its grid. ``order=1`` is DDIM
    (eta = 0). The last evaluation returns its x0_hat (the step to sigma = 0), so the number of
    model evaluations is the number of grid points.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ 1 = DDIM, 2 = 2M), got {order!r}")
    x, plan = _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction,
                     model_kwargs, y, 20, ode_solver="dpm_solver_pp_sample")
    ab = plan.alpha_bar
    record = _Steps(callback, return_trajectory, x)
    x0_prev, h_prev = None, None
    for n, i in enumerate(_maybe_tqdm(reversed(range(len(ab))), progress, len(ab))):
        # 1. data prediction x0_hat at t_i
        _, x0 = _denoise(model, plan, x, i, clip_denoised)
        if i == 0:
            x = x0.to(x.dtype)  # the step to sigma = 0 (h = inf) returns x0_hat
        else:
            h = log_snr(ab[i - 1]) - log_snr(ab[i])
            # 2. second-order multistep correction from the previous x0_hat (Algorithm 2, line 6)
            d = x0 if order == 1 or x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            ratio = math.sqrt((1 - ab[i - 1]) / (1 - ab[i]))
            x = (ratio * x.to(x0.dtype) - math.sqrt(ab[i - 1]) * math.expm1(-h) * d).to(x.dtype)
            x0_prev, h_prev = x0, h
        record.after(StepInfo(n, plan.model_t[i], x, x0))
    return record.result("dpm_solver_pp_sample", x)


@torch.no_grad()
def heun_sample(model, diffusion, shape, *, steps=None, spacing="trailing", timesteps=None, prediction=None,
                clip_denoised=False, generator=None, dtype=None, model_kwargs=None, y=None, callback=None, x_T=None,
                progress=False, return_trajectory=False):
    r"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, arXiv 2206.00364,
    Algorithm 1 with S_churn = 0; book chapter 9).

    In the variables :math:`\tilde x = x/\sqrt{\bar\alpha}` and :math:`\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}`
    the ODE of deterministic DDIM (Song et al. 2020, Eq. (14)) is :math:`d\tilde x/d\sigma = \varepsilon(x, t)`.
    Each step from :math:`\sigma_i` to :math:`\sigma_{i+1}` takes an Euler step with the slope
    :math:`d_i = \hat\varepsilon(x_i, t_i)`, evaluates the slope :math:`d'` at its end, and moves with
    the average :math:`(d_i + d')/2` (the trapezoidal correction). From the last grid point the step
    to :math:`\sigma = 0` is Euler, i.e. x0_hat there (as in DDIM). The grid is the samplers' common
    one (default 10 points: 19 network evaluations, 2 per step but the last). ``callback`` sees
    each grid step; its ``x0_hat`` is the one made at the step's start. Deterministic given ``x_T``.
    """
    x, plan = _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction,
                     model_kwargs, y, 10, ode_solver="heun_sample")
    ab = plan.alpha_bar
    sigma = [math.sqrt((1 - a) / a) for a in ab]
    record = _Steps(callback, return_trajectory, x)
    for n, i in enumerate(_maybe_tqdm(reversed(range(len(ab))), progress, len(ab))):
        eps, x0 = _denoise(model, plan, x, i, clip_denoised)
        if i == 0:
            x = x0.to(x.dtype)  # the Euler step to sigma = 0 lands on x0_hat
        else:
            ds = sigma[i - 1] - sigma[i]
            x_tilde = x.to(eps.dtype) / math.sqrt(ab[i])
            # 1. Euler predictor to sigma_{i+1}, back in x's scale for the network
            x_euler = (x_tilde + ds * eps) * math.sqrt(ab[i - 1])
            eps_end, _ = _denoise(model, plan, x_euler.to(x.dtype), i - 1, clip_denoised)
            # 2. trapezoidal corrector with the mean of the two slopes
            x = ((x_tilde + ds * 0.5 * (eps + eps_end)) * math.sqrt(ab[i - 1])).to(x.dtype)
        record.after(StepInfo(n, plan.model_t[i], x, x0))
    return record.result("heun_sample", x)
