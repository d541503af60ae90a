r"""Super-resolution as conditioning: the second stage of a cascade (book chapter 12).

A super-resolution model is an ordinary denoiser of the HIGH-resolution image x_0 that also
sees a low-resolution version of it (Saharia et al. 2021, SR3, arXiv 2104.07636; Ho et al.
2022, "Cascaded diffusion models for high fidelity image generation", JMLR, arXiv 2106.15282):
:math:`\varepsilon_\theta(x_t, t, z)` with :math:`z = D(x_0)` upsampled and concatenated to
:math:`x_t` (``UNetConfig.cond_channels``). A cascade samples z from a low-resolution model and
then x_0 from the super-resolution model.

At sampling time z comes from the first stage, not from the data, and its small errors are
out of the distribution the second stage was trained on. Noise conditioning augmentation
(Ho et al. 2022, sec. 4.3) trains the second stage on NOISED low-resolution images
:math:`z_s \sim q(z_s \mid D(x_0))` at a random level s, and tells the network s
(``UNetConfig.cond_augment``); at sampling time the first stage's output is noised to a chosen
level, which washes out its artefacts. The noising is the forward process of the model's own
chain (:meth:`GaussianDiffusion.q_sample`), and s is an index of that chain, like t.

Conventions: :func:`downsample` is the mean over factor x factor blocks (so a constant image
stays constant); the U-Net upsamples z bilinearly itself. Images live in [-1, 1], NCHW.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["downsample", "upsample", "augment", "conditioning", "training_conditioning", "superres_losses",
           "superres_sample"]


def _factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    return factor


def downsample(x: Tensor, factor: int) -> Tensor:
    """The mean of each ``factor`` x ``factor`` block of ``x`` [B, C, H, W] (H, W divisible by it)."""
    factor = _factor(factor)
    if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"downsample needs [B, C, H, W] images with H and W divisible by {factor}, got {tuple(x.shape)}")
    return F.avg_pool2d(x, factor) if factor > 1 else x


def upsample(z: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``z`` [B, C, h, w] resized to ``size`` bilinearly: what the U-Net concatenates to x_t."""
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def augment(z: Tensor, aug_level: Tensor, diffusion, *, noise: Tensor | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    r"""Noise conditioning augmentation: :math:`z_s = \sqrt{\bar\alpha_s}\,z + \sqrt{1-\bar\alpha_s}\,\varepsilon`
    at the chain's timesteps ``aug_level`` [B] (Ho et al. 2022, sec. 4.3, Gaussian augmentation
    through the model's own forward process). A negative level means no augmentation: z is
    returned unchanged for that row (the clean conditioning of SR3)."""
    aug_level = torch.as_tensor(aug_level, device=z.device).long().reshape(-1).expand(z.shape[0])
    noised = diffusion.q_sample(z, aug_level.clamp(min=0), noise, generator=generator)
    clean = (aug_level < 0).reshape(-1, *([1] * (z.ndim - 1)))
    return torch.where(clean, z, noised.to(z.dtype))


def conditioning(model, z: Tensor, aug_level, diffusion, *, generator: torch.Generator | None = None) -> dict:
    """The ``model_kwargs`` that condition a super-resolution ``model`` on the low-resolution ``z``:
    ``low_res`` (noised to ``aug_level`` when the model was trained with augmentation) and, for
    such a model, ``aug_level`` itself (a clean z is passed as level 0's embedding: the nearest
    level the network has seen). ``aug_level`` is an int or a LongTensor [B]."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "cond_channels", 0):
        raise ValueError("the model is not a super-resolution model (its UNetConfig has cond_channels=0)")
    if z.ndim != 4 or z.shape[1] != cfg.cond_channels:
        raise ValueError(f"z must be [B, {cfg.cond_channels}, h, w] low-resolution images, got {tuple(z.shape)}")
    level = torch.as_tensor(aug_level, device=z.device).long().reshape(-1).expand(z.shape[0])
    if not cfg.cond_augment:
        return {"low_res": z}
    if level.numel() and int(level.max()) >= diffusion.T:
        raise ValueError(f"aug_level must be < T = {diffusion.T}, got {int(level.max())}")
    return {"low_res": augment(z, level, diffusion, generator=generator), "aug_level": level.clamp(min=0)}


def training_conditioning(x0: Tensor, factor: int, diffusion, *, cond_augment: bool, aug_level: Tensor | None = None,
                          aug_noise: Tensor | None = None) -> dict[str, Tensor]:
    r"""The ``model_kwargs`` of a super-resolution model trained on high-resolution ``x0``:
    ``low_res`` :math:`= D(x_0)` (:func:`downsample`), noised to the levels ``aug_level`` [B] with
    ``aug_noise`` when given (noise conditioning augmentation), and, for a ``cond_augment`` model,
    ``aug_level`` itself (zeros for clean conditioning). Used by :func:`superres_losses` and by the
    training loop (``ddpm_lib.train``), which draws the levels and noise for the global batch."""
    z = downsample(x0, factor)
    if not cond_augment:
        return {"low_res": z}
    if aug_level is None:
        return {"low_res": z, "aug_level": torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)}
    return {"low_res": augment(z, aug_level, diffusion, noise=aug_noise), "aug_level": aug_level}


def superres_losses(diffusion, model, x0: Tensor, t: Tensor, *, factor: int, max_aug_level: int = 0,
                    noise: Tensor | None = None, aug_level: Tensor | None = None, aug_noise: Tensor | None = None,
                    generator: torch.Generator | None = None, model_kwargs: dict | None = None,
                    **loss_kwargs) -> dict[str, Tensor]:
    r"""The diffusion loss of a super-resolution model on high-resolution ``x0`` (Ho et al. 2022,
    Algorithm 3 without the first stage): :math:`z = D(x_0)` by :func:`downsample`, noised to a
    level :math:`s \sim U\{0, \dots, \texttt{max\_aug\_level} - 1\}` (``max_aug_level = 0``: no
    augmentation), then :meth:`GaussianDiffusion.training_losses` of x0 at ``t`` with
    ``low_res = z_s`` (and ``aug_level = s``). Random draws come from ``noise``/``aug_level``/
    ``aug_noise`` or ``generator``."""
    cond_augment = getattr(getattr(model, "config", None), "cond_augment", False)
    if max_aug_level and not cond_augment:
        raise ValueError("max_aug_level > 0 needs a model with cond_augment (it must be told the level)")
    if not 0 <= max_aug_level <= diffusion.T:
        raise ValueError(f"max_aug_level must lie in [0, T = {diffusion.T}], got {max_aug_level}")
    if max_aug_level:
        if (aug_level is None or aug_noise is None) and generator is None:
            raise ValueError("superres_losses needs aug_level= and aug_noise=, or generator=, to draw the "
                             "augmentation level and noise the low-resolution input")
        if aug_level is None:
            aug_level = torch.randint(max_aug_level, (x0.shape[0],), generator=generator,
                                      device=generator.device).to(x0.device)
        if aug_noise is None:
            c, h, w = x0.shape[1], x0.shape[2] // factor, x0.shape[3] // factor
            aug_noise = torch.randn((x0.shape[0], c, h, w), generator=generator, device=generator.device,
                                    dtype=x0.dtype).to(x0.device)
    kwargs = {**(model_kwargs or {}),
              **training_conditioning(x0, factor, diffusion, cond_augment=cond_augment,
                                      aug_level=aug_level if max_aug_level else None, aug_noise=aug_noise)}
    return diffusion.training_losses(model, x0, t, noise, model_kwargs=kwargs, generator=generator, **loss_kwargs)


def superres_sample(model, diffusion, z: Tensor, *, aug_level: int = 0, sampler=None,
                    generator: torch.Generator | None = None, **sampler_kwargs) -> Tensor:
    """High-resolution samples given low-resolution images ``z`` [B, C, h, w]: the second stage of
    a cascade. ``sampler`` is any ``ddpm_lib.samplers`` function (default ``ddim_sample``);
    ``aug_level`` noises z first when the model was trained with augmentation (Ho et al. 2022
    pick it by a sweep; chapter 12 measures it). The same ``generator`` draws that noise, then
    the chain's."""
    from ddpm_lib.samplers import ddim_sample

    sampler = ddim_sample if sampler is None else sampler
    cfg = model.config
    kwargs = dict(sampler_kwargs.pop("model_kwargs", None) or {})
    kwargs.update(conditioning(model, z, aug_level, diffusion, generator=generator))
    shape = (z.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
    return sampler(model, diffusion, shape, generator=generator, model_kwargs=kwargs, **sampler_kwargs)
