r"""Inpainting with an unconditional diffusion model: replacement and RePaint (chapter 12).

Given an image ``known`` and a ``mask`` that is **1 where the pixels are KNOWN** and 0 where
they are to be filled in (the convention of RePaint, Lugmayr et al. 2022, Algorithm 1, where
the known region is :math:`m \odot x`), sample the unknown region from the model's prior
conditioned on the known one, with no retraining.

**Replacement** (Song et al. 2021, arXiv 2011.13456, Appendix I.2, "imputation"; the
"replacement method" of Ho et al. 2022, "Video Diffusion Models", arXiv 2204.03458, §3.1).
Each reverse step from a grid point t to the previous one t' draws the unknown region from
the model's ancestral step p(x_t' | x_t) (Ho et al. 2020, Algorithm 2) and the known region
from the forward marginal of the known pixels, q(x_t' | known) (Ho et al. 2020, Eq. (4),
with fresh noise), and combines

.. math::
    x_{t'} = m \odot \bigl(\sqrt{\bar\alpha_{t'}}\,x^{\rm known} + \sqrt{1-\bar\alpha_{t'}}\,\varepsilon\bigr)
             + (1 - m) \odot x^{\rm unknown}_{t'},

with :math:`\bar\alpha = 1` after the last step, so the output equals ``known`` on the mask
exactly (a bug of this kind, a last step without the known pixels, was fixed in lucidrains'
denoising-diffusion-pytorch, PR 322).

Replacement is biased: the known region's noise is drawn independently of the unknown
region, so the two halves of x_t' are not a sample of the joint q(x_t' | known), and the
model never corrects an unknown region that disagrees with the known one ("harmonisation"
fails). **RePaint** (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
Probabilistic Models", CVPR, arXiv 2201.09865, Algorithm 1 and §4.2 with its jump schedule)
gives the model more chances: after a reverse step it diffuses the combined state back up,

.. math::
    x_t \sim q(x_t \mid x_{t'}) = \mathcal N\bigl(\sqrt{\bar\alpha_t/\bar\alpha_{t'}}\,x_{t'},\;
    (1 - \bar\alpha_t/\bar\alpha_{t'})\,I\bigr),

and redoes the step, ``resample`` (U in the paper) times in all. With ``jump = j > 1`` the
back-and-forth spans j steps instead of one (the paper's "jump length", §4.2: go down j
steps, back up j, ``resample - 1`` times per block of j); :func:`repaint_schedule` writes the
order of the levels. ``jump = 1`` is Algorithm 1 as printed.

The function follows the samplers' conventions (``ddpm_lib.samplers``): the same grid
(``steps``, ``spacing``, ``timesteps``; respaced chains recompute their betas, Nichol &
Dhariwal 2021, §4), model outputs eps/x0/v read through ``ddpm_lib.predictions``, labels
``y=`` or ``model_kwargs``, a seeded ``generator``, no host read inside the loop, ``callback``
and ``return_trajectory``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ddpm_lib import checks
from ddpm_lib.gaussian import standard_normal
from ddpm_lib.predictions import compute_dtype, resolve_variance
from ddpm_lib.samplers import StepInfo, _maybe_tqdm, _start, _Steps

__all__ = ["inpaint", "repaint_schedule"]


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def repaint_schedule(steps: int, resample: int = 1, jump: int = 1) -> list[int]:
    r"""The levels RePaint visits on a chain of ``steps`` steps (Lugmayr et al. 2022, arXiv
    2201.09865, §4.2, the jump schedule of their code's ``get_schedule_jump``), as indices
    into the chain: it starts at ``steps - 1`` (x_T), ends at -1 (the data, :math:`\bar\alpha = 1`);
    a decrease by one is a reverse (denoising) step, an increase by ``jump`` is a jump back up
    by the forward process q(x_{i + jump} | x_i).

    Every level j = 0, jump, 2 jump, ... below ``steps - jump`` is a jump point: on reaching it
    the first ``resample - 1`` times, the state jumps back up to j + jump and the block of
    ``jump`` reverse steps is redone. ``resample = 1`` (no jumps) is plain replacement;
    ``jump = 1`` is RePaint's Algorithm 1 (every reverse step that does not land on the data
    is redone ``resample - 1`` times).

    Example: ``repaint_schedule(3, resample=2)`` -> ``[2, 1, 2, 1, 0, 1, 0, -1]``.
    """
    steps = _check_count("steps", steps)
    resample = _check_count("resample", resample)
    jump = _check_count("jump", jump)
    if resample > 1 and jump > 1 and jump >= steps:
        raise ValueError(f"jump={jump} must be smaller than the number of steps ({steps}): a jump of "
                         f"{jump} levels from level 0 would leave the chain")
    jumps_left = {j: resample - 1 for j in range(0, steps - jump, jump)}
    level, path = steps - 1, [steps - 1]
    while level >= 0:
        level -= 1
        path.append(level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            level += jump
            path.append(level)
    return path


def _check_inputs(known, mask, shape, x_T) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """known and mask as tensors, and the shape of the samples; all checks at entry."""
    if not isinstance(known, Tensor) or not known.is_floating_point():
        raise ValueError(f"known must be a floating-point tensor, got {getattr(known, 'dtype', type(known).__name__)}")
    if not isinstance(mask, Tensor) or mask.is_complex():
        raise ValueError(f"mask must be a tensor (bool, or float with values in [0, 1]; 1 = known), "
                         f"got {type(mask).__name__}")
    if shape is None:
        shape = tuple(x_T.shape) if x_T is not None else torch.broadcast_shapes(known.shape, mask.shape)
    shape = tuple(int(s) for s in shape)
    for name, value in (("known", known), ("mask", mask)):
        try:
            broadcast = torch.broadcast_shapes(value.shape, shape)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, which does not broadcast to the samples' "
                             f"shape {shape}")
    if checks.on_host(mask) and mask.numel():
        m = mask.to(torch.float64)
        if not bool(((m >= 0) & (m <= 1)).all()):  # also refuses NaN
            raise ValueError("mask values must lie in [0, 1] (1 = known pixel, 0 = pixel to fill in)")
    if checks.on_host(known) and checks.on_host(mask):
        # only the known pixels are read: the unknown ones may hold anything, NaN included
        if not bool((torch.isfinite(known) | (mask == 0)).all()):
            raise ValueError("known contains NaN or inf where mask > 0")
    return known, mask, shape


@torch.no_grad()
def inpaint(model, diffusion, known, mask, *, shape=None, steps=None, spacing="trailing", timesteps=None,
            resample=1, jump=1, variance=None, prediction=None, clip_denoised=False, generator=None, dtype=None,
            model_kwargs=None, y=None, callback=None, x_T=None, progress=False, return_trajectory=False):
    r"""Fill in the pixels where ``mask == 0`` so that the result is a sample of the model's prior
    given the pixels where ``mask == 1``: replacement (``resample=1``; Song et al. 2021, arXiv
    2011.13456, Appendix I.2) or RePaint (``resample > 1``; Lugmayr et al. 2022, arXiv
    2201.09865, Algorithm 1 and the jump schedule of §4.2). See the module docstring.

    Args:
        model: an unconditional (or label-conditional, with ``y``) model, called as
            ``model(x_t, t, **model_kwargs)``; predicts eps, x0 or v (``prediction`` or
            ``model.prediction``), 2C channels for ``variance="learned_range"``.
        diffusion: the T-step ``GaussianDiffusion`` the model was trained with.
        known: the image whose known pixels are kept, broadcastable to the samples' shape
            (e.g. one image [1, C, H, W] for a batch); values where ``mask == 0`` are ignored
            (they may be anything, NaN included).
        mask: **1 where the pixel is known**, 0 where it is filled in; bool or float, values in
            [0, 1] (a soft mask blends the two regions with weight m), broadcastable to the
            samples' shape (e.g. [1, 1, H, W]).
        shape: of the samples; default ``x_T.shape``, else the broadcast of known and mask.
        steps, spacing, timesteps: the grid, as in every sampler (all T steps by default); the
            chain is respaced to it and the model sees ORIGINAL timesteps.
        resample: U of RePaint, the number of times each reverse step (or each block of
            ``jump`` steps) is taken; 1 is plain replacement. The cost is about
            ``resample`` times that of replacement.
        jump: the jump length j of RePaint's schedule (:func:`repaint_schedule`); 1 is
            Algorithm 1. Needs j < the number of steps when j > 1 and ``resample > 1``.
        variance: the reverse variance (``"fixed_small"``, ``"fixed_large"``,
            ``"learned_range"``; None reads ``model.variance``), as in ``ddpm_sample``.
        dtype: of the state; default ``x_T``'s, else ``known``'s. The model sees the state in
            its parameters' dtype; update arithmetic is float32 or better.
        x_T: the start noise z; the start state is :math:`m\odot(\sqrt{\bar\alpha_T}\,\text{known}
            + \sqrt{1-\bar\alpha_T}\,z) + (1-m)\odot z`, i.e. the known region starts from
            q(x_T | known) with the same z (no extra draw).
        callback, return_trajectory: after each REVERSE step (a jump back up is not a step:
            the next step's ``t`` is then higher than the last one's), as in the samplers.

    Returns the samples [shape] (and the trajectory [x_T, x after each reverse step, ...] if
    asked): equal to ``known`` where ``mask == 1``, exactly when the state has known's dtype.
    """
    known, mask, shape = _check_inputs(known, mask, shape, x_T)
    resample, jump = _check_count("resample", resample), _check_count("jump", jump)
    variance = resolve_variance(model, variance)
    if dtype is None and x_T is None:
        dtype = known.dtype
    x, plan = _start(model, diffusion, shape, x_T, generator, dtype, steps, spacing, timesteps, prediction,
                     model_kwargs, y, None)
    n_steps = len(plan.grid)
    path = repaint_schedule(n_steps, resample, jump)  # validates jump against the grid
    if n_steps < diffusion.T:
        diffusion = diffusion.respace(plan.grid)
    ab = plan.alpha_bar  # alpha_bar at each grid point, host floats read once (no sync in the loop)

    # The known image and the mask in the update dtype, on the state's device, once. Unknown
    # pixels of `known` are zeroed so that a NaN there cannot leak through 0 * NaN.
    cdt = compute_dtype(x)
    m = mask.to(device=x.device, dtype=cdt).expand(shape)
    x0_known = torch.where(m > 0, known.to(device=x.device, dtype=cdt), torch.zeros((), dtype=cdt, device=x.device))
    x0_known = x0_known.expand(shape)

    # x_T: the known region from q(x_T | known) with the drawn z itself as its noise
    z = x.to(cdt)
    x = (m * (math.sqrt(ab[-1]) * x0_known + math.sqrt(1 - ab[-1]) * z) + (1 - m) * z).to(x.dtype)
    record = _Steps(callback, return_trajectory, x)

    def net(x_in: Tensor, t: Tensor, **kwargs) -> Tensor:  # the state keeps its dtype; the net gets its own
        return model(x_in.to(plan.in_dtype), t, **kwargs)

    n = 0
    for level, nxt in _maybe_tqdm(zip(path[:-1], path[1:]), progress, len(path) - 1):
        if nxt > level:
            # RePaint's jump back up (Algorithm 1, line 10, over `jump` levels at once):
            # x_nxt ~ q(x_nxt | x_level), the forward process between two noise levels
            ratio = ab[nxt] / ab[level]
            noise = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device)
            x = (math.sqrt(ratio) * x.to(cdt) + math.sqrt(1 - ratio) * noise.to(cdt)).to(x.dtype)
            continue
        # 1. the unknown region: one ancestral step of the model, level -> level - 1 (DDPM eq. 11)
        t = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance(net, x, t, variance=variance, prediction=plan.prediction,
                                        clip_denoised=clip_denoised, model_kwargs=plan.kwargs)
        x_unknown = out["mean"]
        if level > 0:
            z = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device)
            x_unknown = x_unknown + (0.5 * out["log_variance"]).exp() * z
            # 2. the known region: q(x_{level-1} | known) with FRESH noise (Ho et al. 2020, eq. 4),
            # at the level the step LANDS on (Algorithm 1 as printed writes alpha_bar_t for
            # x_{t-1}^known; the sum of the two halves must share one noise level)
            a = ab[level - 1]
            eps = standard_normal(x.shape, generator, dtype=x.dtype, device=x.device)
            x_known = math.sqrt(a) * x0_known + math.sqrt(1 - a) * eps.to(cdt)
        else:
            # the last step lands on the data (alpha_bar = 1): the known pixels themselves
            x_known = x0_known
        # 3. combine: m * known + (1 - m) * unknown; m = 1 gives known exactly (1 * k + 0 * u = k)
        x = (m * x_known + (1 - m) * x_unknown).to(x.dtype)
        record.after(StepInfo(n, plan.model_t[level], x, out["pred_x0"]))
        n += 1
    return record.result("inpaint", x)
