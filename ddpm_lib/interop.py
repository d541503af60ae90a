r"""Interoperability with Hugging Face ``diffusers``: its schedulers' chains and its U-Nets.

A diffusers pipeline describes its diffusion chain and its sampler in one scheduler config
(``DDPMScheduler``, ``DDIMScheduler``); ``ddpm_lib`` keeps them apart, as the book does: the chain
is a :class:`~ddpm_lib.diffusion.GaussianDiffusion` (Ho et al. 2020, arXiv 2006.11239, Eqs. (2)-(4)),
the sampler's choices are keyword arguments of :mod:`ddpm_lib.samplers`. This module translates:

* :func:`diffusion_from_scheduler`: the chain of a scheduler (or its config dict);
* :func:`sampler_options_from_scheduler`: the sampler keywords its config implies (prediction,
  timestep spacing, clipping, DDPM variance);
* :func:`scheduler_config_from_diffusion`: the other way, a config that ``DDIMScheduler.from_config``
  (or ``DDPMScheduler``) turns back into the same chain;
* :class:`DiffusersUNet`: any diffusers ``UNet2DModel`` called as a ``ddpm_lib`` model.

diffusers is imported only inside the functions that need it (``pip install ddpm_lib[interop]``);
the config translators work on plain dicts without it.

Conventions that differ (all checked by ``tests/test_interop.py``):

* diffusers stores betas and alpha_bar in float32; the chains here are float64 and agree with
  diffusers' to float32 rounding (relative 1e-7), not bit for bit.
* diffusers' ``DDIMScheduler.step`` jumps from t to t - T // N, not to the next timestep of its
  own grid. The two agree for ``"leading"`` spacing, and for ``"trailing"`` when N divides T;
  with ``"linspace"`` spacing (or ``"trailing"`` and N not dividing T) diffusers' DDIM evaluates the
  model on one grid and steps along another. ``ddpm_lib`` samplers always step from one visited
  timestep to the next (Song et al. 2020, arXiv 2010.02502, Eq. (12) on the sub-sequence tau).
* diffusers' ``set_alpha_to_one=False`` ends DDIM at alpha_bar_0 instead of 1 (a last, partial
  step); ``ddpm_lib`` always ends at x0.
* Clipping in DDIM: ``clip_denoised=True`` clamps x0_hat AND re-derives eps from it (pitfall 3, the
  reference code's choice). diffusers' ``DDIMScheduler.step`` re-derives eps only with
  ``use_clipped_model_output=True``; its default (and ``DDIMPipeline``'s) keeps the unclipped eps
  for the "direction pointing to x_t" of Song et al. Eq. (12). DDPM sampling agrees either way (its
  mean uses x0_hat alone).
* diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` default to ``clip_sample=True`` and
  ``timestep_spacing="leading"``; ``ddpm_lib`` samplers to no clipping and ``"trailing"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.predictions import PREDICTIONS, VARIANCES, check_choice, set_parameterization
from ddpm_lib.schedules import SPACINGS, check_betas, rescale_zero_terminal_snr

__all__ = [
    "diffusion_from_scheduler",
    "sampler_options_from_scheduler",
    "scheduler_config_from_diffusion",
    "scheduler_from_diffusion",
    "diffusers_betas",
    "DiffusersUNet",
    "PREDICTION_FROM_DIFFUSERS",
    "PREDICTION_TO_DIFFUSERS",
    "BETA_SCHEDULES",
]

_INSTALL_HINT = "diffusers is needed for this (pip install ddpm_lib[interop])"

# diffusers' prediction_type -> ddpm_lib's prediction (and back)
PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
PREDICTION_TO_DIFFUSERS = {v: k for k, v in PREDICTION_FROM_DIFFUSERS.items()}

# diffusers' variance_type (DDPMScheduler) -> ddpm_lib's variance. "fixed_small_log" draws with
# exp(0.5 log beta_tilde) = sqrt(beta_tilde), the same std as "fixed_small" (only the rounding of the
# log/exp round trip differs). "fixed_large_log" and "learned" are left out: see _variance_option.
_VARIANCE_FROM_DIFFUSERS = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                            "fixed_large": "fixed_large", "learned_range": "learned_range"}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

# The defaults of DDPMScheduler.__init__ and DDIMScheduler.__init__ (diffusers 0.30-0.42; they agree
# on every key both have). A config dict written by diffusers carries all its keys; a hand-written
# one may leave some out, and diffusers itself would then use these.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "rescale_betas_zero_snr": False, "prediction_type": "epsilon",
    "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading",
    "steps_offset": 0, "set_alpha_to_one": True, "variance_type": None,
}


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError(_INSTALL_HINT) from e
    return diffusers


def _config(scheduler_or_config: object) -> dict[str, Any]:
    """The scheduler config as a plain dict with diffusers' defaults filled in."""
    if isinstance(scheduler_or_config, Mapping):
        given = dict(scheduler_or_config)
    elif hasattr(scheduler_or_config, "config") and isinstance(scheduler_or_config.config, Mapping):
        given = dict(scheduler_or_config.config)
    else:
        raise TypeError("expected a diffusers scheduler or its config dict, got "
                        f"{type(scheduler_or_config).__name__}")
    return {**_DEFAULTS, **given}


# --- the chain --------------------------------------------------------------------------


def _alpha_bar_cosine(u: float) -> float:
    # Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. (17) without the normalisation by f(0), with
    # s = 0.008 written as diffusers' betas_for_alpha_bar writes it: cos^2((u + 0.008) / 1.008 * pi / 2)
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def diffusers_betas(scheduler_or_config: object) -> Tensor:
    r"""The betas (float64 [T]) of a diffusers scheduler config, by diffusers' formula for each
    ``beta_schedule`` but evaluated in float64 (diffusers rounds them to float32):

    * ``"linear"``: linspace(beta_start, beta_end, T) (Ho et al. 2020, §4);
    * ``"scaled_linear"``: linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (the latent-diffusion
      schedule of Rombach et al. 2022, arXiv 2112.10752, released configs; no equation in the paper);
    * ``"squaredcos_cap_v2"``: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) with the cosine
      abar of Nichol & Dhariwal 2021, Eq. (17) (equal to :func:`ddpm_lib.schedules.cosine_betas`
      to rounding: that one divides by f(0) first, which cancels in the ratio);
    * ``"sigmoid"``: sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (the
      GeoDiff schedule, Xu et al. 2022, arXiv 2203.02923, released code);
    * ``trained_betas`` (a list) wins over ``beta_schedule``, as in diffusers;

    then, with ``rescale_betas_zero_snr``, Lin et al. 2023 (arXiv 2305.08891), Algorithm 1.
    """
    cfg = _config(scheduler_or_config)
    T = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = torch.as_tensor(np.asarray(cfg["trained_betas"], dtype=np.float64))
        if betas.numel() != T:
            raise ValueError(f"trained_betas has {betas.numel()} values but num_train_timesteps is {T}")
    else:
        name = cfg["beta_schedule"]
        start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
        if name == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        elif name == "squaredcos_cap_v2":
            # diffusers' betas_for_alpha_bar(T) in Python floats (max_beta = 0.999), before its float32 cast
            betas = torch.tensor([min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999)
                                  for i in range(T)], dtype=torch.float64)
        elif name == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
        else:
            raise ValueError(f"unsupported beta_schedule {name!r}; supported: {list(BETA_SCHEDULES)} "
                             "or trained_betas")
    if cfg["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    return check_betas(betas)


def diffusion_from_scheduler(scheduler_or_config: object) -> GaussianDiffusion:
    """The :class:`GaussianDiffusion` chain (float64) of a diffusers ``DDPMScheduler`` /
    ``DDIMScheduler`` or its config dict: the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t)
    x_{t-1}, beta_t I) of Ho et al. 2020, Eq. (2), with the betas of :func:`diffusers_betas`.

    Only the chain is read here; the sampler's settings (and the ones ``ddpm_lib`` cannot honour)
    are :func:`sampler_options_from_scheduler`'s business. ValueError for a beta schedule that is
    not supported.
    """
    return GaussianDiffusion(diffusers_betas(scheduler_or_config))


# --- the sampler's options ------------------------------------------------------------------


def _leading_grid(T: int, steps: int, offset: int) -> list[int]:
    # diffusers' set_timesteps for "leading" with steps_offset: i * (T // N) + offset (ascending here)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and T = {T}, got {steps!r}")
    grid = [i * (T // steps) + offset for i in range(steps)]
    if grid[-1] >= T:
        raise ValueError(f"steps_offset {offset} pushes the last of {steps} leading timesteps to {grid[-1]} >= T = {T}")
    return grid


def sampler_options_from_scheduler(scheduler_or_config: object, *, steps: int | None = None,
                                   sampler: str | None = None, strict: bool = True) -> dict[str, Any]:
    """Keyword arguments of the ``ddpm_lib.samplers`` functions that sample as the scheduler's
    config says: ``prediction`` (epsilon -> eps, sample -> x0, v_prediction -> v; Salimans & Ho
    2022, arXiv 2202.00512, §4 for v), ``spacing`` (diffusers' ``timestep_spacing``: the grids of
    Lin et al. 2023, arXiv 2305.08891, Table 2), ``clip_denoised`` (``clip_sample``: clamp x0_hat to
    [-1, 1], the reference code's clip; for DDIM this equals diffusers' step with
    ``use_clipped_model_output=True``, not its default, see the module) and, for the DDPM sampler, ``variance`` (``variance_type``:
    beta-tilde or beta of Ho et al. 2020, §3.2, or the learned interpolation of Nichol & Dhariwal
    2021, Eq. (15)).

    ``sampler``: ``"ddpm"`` always includes ``variance`` (``"fixed_small"`` if the config has no
    ``variance_type``, diffusers' default), ``"ddim"`` / ``"dpm_solver_pp"`` never do (those samplers
    take no variance), None includes it when the config has a ``variance_type``.

    ``steps``: when given, the result also holds ``steps``; it is needed for a ``"leading"`` config
    with ``steps_offset != 0`` (Stable Diffusion's), whose grid i (T // N) + offset is then returned
    as an explicit ``timesteps`` list instead of ``spacing``.

    Settings ``ddpm_lib`` does not implement raise ONE ValueError listing all of them:
    ``thresholding`` (Saharia et al. 2022's dynamic thresholding), ``clip_sample_range != 1``,
    ``set_alpha_to_one=False`` (DDIM's last step to alpha_bar_0 instead of 1), ``steps_offset`` with a
    ``"leading"`` grid and no ``steps``, variance types without a ``ddpm_lib`` counterpart
    (``"learned"``: the model outputs the variance itself; ``"fixed_large_log"``: diffusers' DDPM step
    takes the square root of log beta there, which is NaN). ``strict=False`` turns the ones that
    change only details of the sampler (thresholding, the clip range, set_alpha_to_one) into a
    warning and drops them; an unknown prediction type, spacing or variance type always raises.
    """
    cfg = _config(scheduler_or_config)
    if sampler not in (None, "ddpm", "ddim", "dpm_solver_pp"):
        raise ValueError(f"unknown sampler {sampler!r}; allowed: None, 'ddpm', 'ddim', 'dpm_solver_pp'")
    T = int(cfg["num_train_timesteps"])
    fatal, droppable = [], []

    prediction = PREDICTION_FROM_DIFFUSERS.get(cfg["prediction_type"])
    if prediction is None:
        fatal.append(f"prediction_type {cfg['prediction_type']!r} (supported: {list(PREDICTION_FROM_DIFFUSERS)})")
    spacing = cfg["timestep_spacing"]
    if spacing not in SPACINGS:
        fatal.append(f"timestep_spacing {spacing!r} (supported: {list(SPACINGS)})")
    options: dict[str, Any] = {"prediction": prediction, "spacing": spacing}

    # steps_offset shifts only the "leading" grid (diffusers' set_timesteps ignores it otherwise)
    offset = int(cfg["steps_offset"] or 0)
    if offset and spacing == "leading":
        if steps is None:
            fatal.append(f"steps_offset {offset} with 'leading' spacing: pass steps= to get its explicit timesteps")
        else:
            options.pop("spacing")
            options["timesteps"] = _leading_grid(T, steps, offset)
    if steps is not None:
        options["steps"] = steps

    if cfg["thresholding"]:
        droppable.append("thresholding=True (dynamic thresholding is not implemented)")
    clip = bool(cfg["clip_sample"])
    if clip and float(cfg["clip_sample_range"]) != 1.0:
        droppable.append(f"clip_sample_range {cfg['clip_sample_range']} (only 1.0 is supported)")
        clip = False
    options["clip_denoised"] = clip
    if not cfg["set_alpha_to_one"] and sampler != "ddpm":  # a DDIMScheduler key; irrelevant to DDPM
        droppable.append("set_alpha_to_one=False (ddpm_lib's DDIM always ends at alpha_bar = 1, i.e. at x0)")

    variance_type = cfg["variance_type"]
    if sampler == "ddpm" or (sampler is None and variance_type is not None):
        variance = _VARIANCE_FROM_DIFFUSERS.get(variance_type or "fixed_small")
        if variance is None:
            fatal.append(f"variance_type {variance_type!r} (supported: {list(_VARIANCE_FROM_DIFFUSERS)})")
        options["variance"] = variance

    if fatal or (droppable and strict):
        problems = fatal + droppable
        hint = "" if fatal else " (strict=False drops them with a warning)"
        raise ValueError("scheduler settings ddpm_lib cannot reproduce: " + "; ".join(problems) + hint)
    if droppable:
        warnings.warn("ignoring scheduler settings ddpm_lib does not implement: " + "; ".join(droppable),
                      stacklevel=2)
    return options


# --- ddpm_lib -> diffusers ---------------------------------------------------------------------


def _named_schedule(betas: Tensor) -> dict[str, Any] | None:
    """The config keys of a named diffusers schedule whose float64 betas equal ``betas`` (to 1e-12
    relative), or None. A linear schedule's end points are its first and last beta (linspace hits
    them); they are written with 12 significant digits, so 1e-4 reads back as 1e-4, not 1.0000000000000002e-4."""
    T = betas.numel()
    first, last = float(f"{float(betas[0]):.12g}"), float(f"{float(betas[-1]):.12g}")
    candidates = [
        {"beta_schedule": "linear", "beta_start": first, "beta_end": last},
        # scaled_linear squares the end points' square roots: beta_0 = beta_start to rounding
        {"beta_schedule": "scaled_linear", "beta_start": first, "beta_end": last},
        {"beta_schedule": "squaredcos_cap_v2"},
    ]
    if float(betas[-1]) == 1.0:
        # zero terminal SNR (Lin et al. 2023, Algorithm 1) moves both end points of a linear
        # schedule, so only the cosine one is recognised after the rescale
        candidates = [{"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True}]
    for keys in candidates:
        keys = {"rescale_betas_zero_snr": False, **keys}
        cand = diffusers_betas({"num_train_timesteps": T, **keys})
        if torch.allclose(cand, betas, rtol=1e-12, atol=0.0):
            return keys
    return None


def scheduler_config_from_diffusion(diffusion: GaussianDiffusion, *, prediction: str = "eps",
                                    spacing: str = "trailing", schedule: str | None = None,
                                    clip_denoised: bool = False, variance: str | None = None,
                                    scheduler: str = "DDIMScheduler") -> dict[str, Any]:
    """A diffusers scheduler config dict for the chain ``diffusion`` (Ho et al. 2020, Eq. (2)): with
    ``diffusers.DDIMScheduler.from_config(cfg)`` (or ``DDPMScheduler``) diffusers runs the same
    chain (to its float32 storage) and the sampler settings given here.

    ``schedule``: None finds a named diffusers schedule whose betas equal this chain's in float64
    (``"linear"`` with the chain's end points, ``"squaredcos_cap_v2"`` = ``ddpm_lib``'s ``"cosine"``)
    and falls back to ``trained_betas`` (the list of betas) for any other chain; ``"trained_betas"``
    forces that list; a name (``"linear"``, ``"cosine"``, ``"squaredcos_cap_v2"``, ``"scaled_linear"``)
    must match the chain or ValueError. A respaced chain (``diffusion.respace``) is refused: a
    scheduler describes the full training chain, and its sampler picks the steps.

    ``prediction``, ``spacing``, ``clip_denoised`` map back to ``prediction_type``,
    ``timestep_spacing``, ``clip_sample``; ``variance`` (DDPMScheduler only) to ``variance_type``.
    ``scheduler``: ``"DDIMScheduler"`` (with ``set_alpha_to_one=True``, ending at x0 as ``ddpm_lib``
    does) or ``"DDPMScheduler"`` (with ``variance_type``, default ``"fixed_small"``).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("spacing", spacing, SPACINGS)
    check_choice("scheduler", scheduler, ("DDIMScheduler", "DDPMScheduler"))
    T = diffusion.T
    if not torch.equal(diffusion.timesteps.cpu(), torch.arange(T)):
        raise ValueError("a respaced chain has no scheduler config: convert the full chain and let the sampler "
                         "pick its steps (spacing / steps)")
    betas = diffusion.betas.detach().to("cpu", torch.float64)
    keys: dict[str, Any]
    trained = {"beta_schedule": "linear", "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}
    if schedule == "trained_betas":
        keys = trained
    else:
        found = _named_schedule(betas)
        wanted = {"cosine": "squaredcos_cap_v2"}.get(schedule, schedule)
        if wanted is not None:
            if wanted not in BETA_SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; allowed: None, 'trained_betas', 'cosine', "
                                 f"{list(BETA_SCHEDULES)}")
            if found is None or found["beta_schedule"] != wanted:
                raise ValueError(f"the chain's betas are not diffusers' {wanted!r} schedule; use schedule=None "
                                 "or 'trained_betas'")
        keys = found if found is not None else trained
    cfg: dict[str, Any] = {
        "_class_name": scheduler,
        "num_train_timesteps": T,
        "beta_start": 0.0001, "beta_end": 0.02,  # diffusers' defaults; unused unless a linear schedule sets them
        "trained_betas": None,
        **keys,
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction],
        "timestep_spacing": spacing,
        "steps_offset": 0,
        "clip_sample": bool(clip_denoised),
        "clip_sample_range": 1.0,
        "thresholding": False,
    }
    if scheduler == "DDIMScheduler":
        if variance is not None:
            raise ValueError("DDIMScheduler has no variance_type; pass scheduler='DDPMScheduler'")
        cfg["set_alpha_to_one"] = True
    else:
        cfg["variance_type"] = check_choice("variance", variance or "fixed_small", VARIANCES)
    return cfg


# --- the network --------------------------------------------------------------------------


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as a ``ddpm_lib`` model: ``forward(x, t, y=None)`` returns
    ``unet(x, t, class_labels=y).sample``, with ``t`` the ORIGINAL 0-based timesteps [B] that every
    ``ddpm_lib`` sampler passes (diffusers' UNet2DModel takes the same integers).

    Its parameterisation (``model.prediction``, ``model.variance``; see
    :func:`ddpm_lib.predictions.set_parameterization`) comes from ``prediction`` / ``variance``, else
    from ``scheduler`` (a diffusers scheduler or config, read by :func:`sampler_options_from_scheduler`),
    else eps and fixed_small (Ho et al. 2020, Eq. (11) and §3.2). A ``learned_range`` model must output
    2C channels (prediction first, then the variance interpolation v of Nichol & Dhariwal 2021,
    Eq. (15)), as diffusers' DDPMScheduler splits them.

    Class-conditional U-Nets (``num_class_embeds`` rows of a label embedding): ``num_classes`` is the
    number of rows, or one less when ``null_label`` (the row trained as "no condition", for
    classifier-free guidance, Ho & Salimans 2022, arXiv 2207.12598) is given; ``ddpm_lib`` models put
    it last (``null_label = num_classes``), but a diffusers model may have been trained with any row,
    so it is never guessed. ``guidance.classifier_free`` reads ``null_label``.
    """

    def __init__(self, unet: nn.Module, *, prediction: str | None = None, variance: str | None = None,
                 scheduler: object = None, null_label: int | None = None):
        super().__init__()
        self.unet = unet
        if scheduler is not None:
            # only the two keys that describe the network; the sampler's settings are not its business
            cfg = _config(scheduler)
            keys = {k: cfg[k] for k in ("prediction_type", "variance_type")}
            opts = sampler_options_from_scheduler(keys, sampler="ddpm")
            prediction = prediction or opts["prediction"]
            variance = variance or opts["variance"]
        set_parameterization(self, prediction or "eps", variance or "fixed_small")
        config = getattr(unet, "config", {})
        rows = config.get("num_class_embeds") if config.get("class_embed_type") is None else None
        if null_label is not None:
            if rows is None or not 0 <= int(null_label) < rows:
                raise ValueError(f"null_label {null_label} is not a row of the U-Net's label embedding "
                                 f"(num_class_embeds = {rows})")
            null_label = int(null_label)
        self.null_label = null_label
        self.num_classes = None if rows is None else rows - (null_label is not None)
        out_channels = config.get("out_channels")
        in_channels = config.get("in_channels")
        if self.variance == "learned_range" and out_channels is not None and out_channels != 2 * in_channels:
            raise ValueError(f"learned_range needs out_channels = 2 x in_channels, the U-Net has {out_channels} "
                             f"and {in_channels}")
        self.in_channels = in_channels
        sample_size = config.get("sample_size")
        self.image_size = sample_size[0] if isinstance(sample_size, (tuple, list)) else sample_size

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The U-Net's prediction for x_t [B, C, H, W] at ORIGINAL timesteps t [B] (labels y [B] if
        class-conditional)."""
        return self.unet(x, t, class_labels=y, return_dict=False)[0]

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None, scheduler: object = "auto",
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "DiffusersUNet":
        """Load a saved ``UNet2DModel`` (a local folder or a pipeline folder with ``subfolder="unet"``;
        diffusers may also fetch a Hub name) and wrap it. ``scheduler="auto"`` reads the
        parameterisation from the pipeline's ``scheduler/scheduler_config.json`` beside it when there
        is one; ``torch_dtype`` goes to diffusers, ``kwargs`` to the wrapper."""
        diffusers = _require_diffusers()
        unet = diffusers.UNet2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)
        if scheduler == "auto":
            scheduler = None
            if subfolder is not None:
                import json
                from pathlib import Path

                found = Path(path) / "scheduler" / "scheduler_config.json"
                if found.is_file():
                    scheduler = json.loads(found.read_text())
        return cls(unet, scheduler=scheduler, **kwargs)


def scheduler_from_diffusion(diffusion: GaussianDiffusion, **kwargs):
    """The diffusers scheduler object (``DDIMScheduler`` unless ``scheduler="DDPMScheduler"``) of
    :func:`scheduler_config_from_diffusion`'s config; ``kwargs`` go there."""
    diffusers = _require_diffusers()
    cfg = scheduler_config_from_diffusion(diffusion, **kwargs)
    cls = getattr(diffusers, cfg["_class_name"])
    return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
