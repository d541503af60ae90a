"""Noise schedules: the betas of the forward process and the grids that shorten it.

Chapter 2 (forward process) introduces the linear schedule and the signal-to-noise ratio;
chapter 7 (improved DDPM) the cosine schedule and timestep respacing. Every schedule is
computed in float64 and cast where it is used (``ddpm_lib.diffusion.extract``).

Notation: ``betas[t]`` is beta_{t+1} of the papers (index t = 0 is the first noising step),
``alpha_bar[t] = prod_{s<=t} (1 - betas[s])``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "linear_betas",
    "cosine_betas",
    "space_timesteps",
    "respace_betas",
    "rescale_zero_terminal_snr",
    "snr",
    "sampling_timesteps",
    "SPACINGS",
    "get_betas",
    "check_betas",
    "SCHEDULES",
]


# --- validation -------------------------------------------------------------------------


def _check_T(T: object) -> int:
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1, got {T!r}")
    return int(T)


def check_betas(betas: object) -> Tensor:
    """Validate a beta schedule and return it as a float64 tensor (on its own device).

    The betas are the variances of the forward steps q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1},
    beta_t I) (Ho et al. 2020, Eq. (2)), so each must lie in (0, 1). The LAST beta may also be exactly 1: that is the
    zero-terminal-SNR schedule of :func:`rescale_zero_terminal_snr`, whose final step
    destroys all signal. Anywhere else a beta of 1 would make alpha_bar 0 too early.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError("betas must be finite")
    inner_ok = bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
    last_ok = bool(0 < betas[-1] <= 1)
    if not (inner_ok and last_ok):
        raise ValueError(
            "betas must lie in (0, 1) (the last may be exactly 1, for a zero-terminal-SNR "
            f"schedule); got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )
    return betas


def _alpha_bar(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


# --- schedules --------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear schedule of DDPM (Ho et al. 2020, arXiv 2006.11239, §4: "forward process variances
    ... increasing linearly from beta_1 = 1e-4 to beta_T = 0.02"; no equation number): the betas
    of Eq. (2) evenly spaced from ``beta_start`` to ``beta_end``, float64 [T].

    The endpoints are used as given, NOT rescaled by 1000 / T as improved-diffusion does
    (pitfall 10): with T = 1000 this is exactly the paper's schedule, with small T it keeps
    the same per-step betas and therefore leaves much more signal at the end.
    """
    T = _check_T(T)
    return check_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    r"""Cosine schedule of improved DDPM (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. (17)), float64 [T].

    :math:`\bar\alpha(t) = f(t)/f(0)`, :math:`f(t) = \cos^2\bigl(\frac{t/T + s}{1 + s}\cdot\frac{\pi}{2}\bigr)`,
    and :math:`\beta_t = \min(1 - \bar\alpha(t+1)/\bar\alpha(t),\ \text{max\_beta})` for
    t = 0..T-1. The offset ``s`` keeps the first betas from being vanishingly small; the clip
    at 0.999 stops the last beta from being 1, so at T = 1000 alpha_bar_T is about 2.4e-9
    instead of 0 (pitfall 4).
    """
    T = _check_T(T)
    if not 0 < max_beta <= 1:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T + s) / (1 + s)) * (math.pi / 2)) ** 2
    alpha_bar = f / f[0]
    betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return check_betas(betas)


SCHEDULES: dict[str, Callable[..., Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


def get_betas(name: str, T: int, **kwargs) -> Tensor:
    """Betas of the named schedule: ``"linear"`` (Ho et al. 2020, §4, :func:`linear_betas`) or
    ``"cosine"`` (Nichol & Dhariwal 2021, Eq. (17), :func:`cosine_betas`); ``kwargs`` go to its
    function. ValueError for an unknown name, listing the known ones."""
    try:
        fn = SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}") from None
    return fn(T, **kwargs)


def snr(betas: Tensor) -> Tensor:
    r"""Signal-to-noise ratio :math:`\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)` of q(x_t | x_0), float64 [T].

    The ratio of the squared signal scale to the noise variance of Ho et al. 2020, Eq. (4),
    i.e. :math:`\alpha_t^2/\sigma_t^2` in the notation of Kingma et al. 2021 (Variational
    Diffusion Models, arXiv 2107.00630, §3, where it is defined) and of Lin et al. 2023
    (arXiv 2305.08891, §3.1, zero terminal SNR). Linear T = 1000 ends at SNR ~4.04e-5 (pitfall 2).
    """
    alpha_bar = _alpha_bar(check_betas(betas))
    return alpha_bar / (1.0 - alpha_bar)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    r"""Betas with zero terminal SNR (Lin et al. 2023, "Common diffusion noise schedules and
    sample steps are flawed", arXiv 2305.08891, Algorithm 1), float64 [T].

    Shift and scale :math:`\sqrt{\bar\alpha_t}` so that its last value becomes 0 and its
    first is unchanged, then recover the betas: the last beta becomes exactly 1. Without this
    the linear T = 1000 schedule ends at SNR ~4e-5, so training never sees pure noise while
    sampling starts from it (pitfall 2). With it, eps-prediction is ill-posed at the last
    step (x_T carries no x_0 to subtract): use v-prediction.
    """
    betas = check_betas(betas)
    if betas.numel() < 2:
        raise ValueError("rescale_zero_terminal_snr needs at least 2 steps")
    sqrt_ab = _alpha_bar(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return check_betas(1.0 - alphas)


# --- respacing (chapter 7) --------------------------------------------------------------


def _ddim_steps(T: int, count: int) -> list[int]:
    # "Leading" spacing: stride T // count from 0, exactly `count` steps. Unlike range(0, T, stride)
    # (DDIM's reference code), this never gives count + 1 steps when count does not divide T;
    # where it does, the two grids are identical (pretrained metrics rely on that).
    stride = T // count
    return [i * stride for i in range(count)]


def space_timesteps(T: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Original timesteps to keep when shortening a T-step chain (Nichol & Dhariwal 2021,
    arXiv 2102.09672, §4 "Improving sampling speed": sample along a subsequence S of the steps;
    and the sub-sequence tau of DDIM, Song et al. 2020, arXiv 2010.02502, §4.2). No equation
    number: this chooses the subsequence that :func:`respace_betas` then turns into a chain.

    Returns a sorted list of distinct 0-based timesteps of the original chain.

    * ``"ddimN"`` (1 <= N <= T): the "leading" DDIM grid with stride ``s = T // N`` starting at
      0, exactly N steps ``[0, s, 2s, ..., (N - 1) s]``: DDIM's "linear" selection
      tau_i = floor(c i) (Song et al. 2020, Appendix D.2) with c = T // N and i = 0..N-1, as
      diffusers' ``timestep_spacing="leading"``. When N divides T this is DDIM's reference
      grid ``range(0, T, T // N)``. This grid starts at 0 and, unless N = T, does
      NOT visit T - 1: its last step is (N - 1) s <= T - s, so sampling starts at a noise level
      below that of x_T (pitfall 1 of DESIGN.md).
    * a list of ints, an int, or a comma string ``"10,15,20"``: split [0, T) into
      ``len(counts)`` sections of equal size (the first ``T % len(counts)`` one longer)
      and take ``count`` steps evenly spaced within each, first and last of the section
      included, at the fractional stride ``(size - 1) / (count - 1)`` rounded to the nearest
      integer (as improved-diffusion's ``respace.py``). ValueError if a section has fewer
      steps than requested.

    Worked examples: ``space_timesteps(10, [2, 3])``: sections [0..4] and [5..9] (size 5); the
    first takes stride 4 -> 0, 4; the second stride 2 -> 5, 7, 9; result ``[0, 4, 5, 7, 9]``.
    ``space_timesteps(1000, "ddim4") == [0, 250, 500, 750]`` (stride 250, never 999), and
    ``space_timesteps(1000, "ddim3") == [0, 333, 666]``: stride 1000 // 3 = 333, exactly 3
    steps (``range(0, 1000, 333)`` would have a fourth, 999). ``space_timesteps(10, "ddim7")
    == [0, 1, 2, 3, 4, 5, 6]`` (stride 1).
    """
    T = _check_T(T)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = _parse_count(section_counts[len("ddim") :], section_counts)
            if not 1 <= count <= T:
                raise ValueError(f"{section_counts!r}: need between 1 and T = {T} steps")
            return _ddim_steps(T, count)
        counts = [_parse_count(c, section_counts) for c in section_counts.split(",")]
    elif isinstance(section_counts, numbers.Integral):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be a non-empty list of ints >= 1, got {section_counts!r}")
    if len(counts) > T:
        raise ValueError(f"cannot split T = {T} steps into {len(counts)} sections")

    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"section {i} has {size} steps, cannot take {count}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index exactly as the reference code does, so the grids
        # (round-half-to-even included) are identical to improved-diffusion's.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def _parse_count(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot parse step counts from {whole!r}; use e.g. 'ddim50' or '10,15,20'") from None


def respace_betas(betas: Tensor, timesteps: Sequence[int] | Tensor) -> Tensor:
    r"""Betas of the shorter chain that visits only ``timesteps`` (Nichol & Dhariwal 2021,
    arXiv 2102.09672, §4: :math:`\beta_{S_t} = 1 - \bar\alpha_{S_t}/\bar\alpha_{S_{t-1}}`, an
    in-text formula with no equation number).

    :math:`\beta'_i = 1 - \bar\alpha_{\tau_i} / \bar\alpha_{\tau_{i-1}}`, with
    :math:`\bar\alpha` before the first kept step equal to 1 (so
    :math:`\beta'_0 = 1 - \bar\alpha_{\tau_0}`, pitfall 1). The new chain then has exactly the
    original marginals q(x_{tau_i} | x_0). ``timesteps`` must be strictly increasing
    0-based indices into ``betas``. Returns float64 [len(timesteps)] on betas' device.
    """
    betas = check_betas(betas)
    tau = torch.as_tensor(timesteps, dtype=torch.long, device=betas.device).reshape(-1)
    if tau.numel() == 0:
        raise ValueError("timesteps must not be empty")
    if tau.min() < 0 or tau.max() >= betas.numel():
        raise ValueError(
            f"timesteps must lie in [0, {betas.numel()}), got min {tau.min().item()}, max {tau.max().item()}"
        )
    if (tau[1:] <= tau[:-1]).any():
        raise ValueError("timesteps must be strictly increasing")
    alpha_bar = _alpha_bar(betas)[tau]
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return check_betas(1.0 - alpha_bar / alpha_bar_prev)


# --- the grid of a sampler (chapters 7-9) -----------------------------------------------

SPACINGS = ("leading", "trailing", "linspace")


def sampling_timesteps(T: int, steps: int | None = None, *, spacing: str = "trailing",
                       timesteps: Sequence[int] | Tensor | None = None) -> list[int]:
    """The original timesteps a sampler visits, ascending (0-based; the sampler walks them from
    the last to the first and then to x0). The same for every sampler: ``steps=N`` means this grid.

    Named spacings (Lin et al. 2023, arXiv 2305.08891, §3.3 and Table 2; diffusers'
    ``timestep_spacing``), for N = ``steps`` of T:

    * ``"trailing"`` (default): round(T - i T / N) - 1 for i = 0..N-1. Starts at T - 1, where
      x_T is nearly pure noise, and keeps the uniform stride T / N below it.
    * ``"linspace"``: round(linspace(0, T - 1, N)). Starts at T - 1 and ends at 0.
    * ``"leading"``: i (T // N) for i = 0..N-1, the grid of DDIM's reference code (Song et al.
      2020, Appendix D.2). It never visits T - 1 unless N = T (DESIGN.md pitfall 1): on the
      cosine schedule with N = 5 the first step is t = 800, where sqrt(alpha_bar) = 0.31.

    Rounding is half to even, as NumPy's (and diffusers'). Worked examples, T = 1000, N = 3:
    trailing ``[332, 666, 999]``, linspace ``[0, 500, 999]``, leading ``[0, 333, 666]``;
    T = 10, N = 3: trailing ``[2, 6, 9]``, linspace ``[0, 4, 9]``, leading ``[0, 3, 6]``.

    ``timesteps``: an explicit list instead (distinct integers in [0, T), any order); ``steps``
    and ``spacing`` are then ignored, except that ``steps`` must be None or their count.
    ``steps=None`` without ``timesteps`` is all T steps.
    """
    T = _check_T(T)
    if timesteps is not None:
        values = torch.as_tensor(timesteps).reshape(-1)
        if values.is_floating_point() or values.dtype == torch.bool or values.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty list of integers, got {timesteps!r}")
        kept = sorted(int(v) for v in values.tolist())
        if kept[0] < 0 or kept[-1] >= T or len(set(kept)) != len(kept):
            raise ValueError(f"timesteps must be distinct integers in [0, {T}), got {kept}")
        if steps is not None and steps != len(kept):
            raise ValueError(f"steps={steps} but {len(kept)} timesteps were given; pass one of the two")
        return kept
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {list(SPACINGS)} or an explicit timesteps= list")
    if steps is None:
        return list(range(T))
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and T = {T}, got {steps!r}")
    N = int(steps)
    if spacing == "leading":
        grid = np.arange(N) * (T // N)
    elif spacing == "trailing":
        # diffusers writes np.arange(T, 0, -T / N); float error can lengthen that to N + 1 steps, so
        # take its first N values as NumPy computes them (stride = the first two values' difference)
        stride = (T - T / N) - T
        grid = np.round(T + np.arange(N) * stride).astype(np.int64) - 1
    else:
        grid = np.linspace(0, T - 1, N).round().astype(np.int64)
    return sorted(int(v) for v in grid)
