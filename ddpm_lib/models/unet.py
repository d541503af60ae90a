r"""The noise-prediction U-Net :math:`\varepsilon_\theta(x_t, t[, y])` (book chapter 6).

DDPM's network (Ho et al. 2020, App. B): a PixelCNN++-style U-Net whose residual blocks all
receive the sinusoidal time embedding, with self-attention at 16x16 and in the middle. The
config also switches on ADM's changes (Dhariwal & Nichol 2021, sec. 3): attention at several
resolutions with more heads (``num_head_channels``), adaptive group norm
(``use_scale_shift_norm``), BigGAN residual up/down blocks (``resblock_updown``), residual sums
rescaled by :math:`1/\sqrt 2` (``rescale_skip``), class conditioning, and a learned variance
(``learn_sigma``: twice the output channels, as in Nichol & Dhariwal 2021).

Call convention: ``model(x_t, t)`` or ``model(x_t, t, y=y)`` with ``x_t`` [B, C, H, W] in the
[-1, 1] data scale and ``t`` a LongTensor [B] of ORIGINAL-schedule timesteps, 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ddpm_lib.models.blocks import build_down_path, build_middle, build_up_path, normalization, zero_module
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.models.embeddings import TimestepEmbedding

__all__ = [
    "UNetConfig", "UNet", "PRESETS", "ddpm_cifar10", "adm_like_cifar10", "digits8", "digits8_cond",
    "adm_like_digits8", "shapes32", "shapes32_cond", "check_labels",
]


def validate_unet_geometry(cfg) -> None:
    """Checks shared by the U-Net and the noisy classifier: resolutions, widths, heads."""
    if not cfg.channel_mult or any(m < 1 for m in cfg.channel_mult):
        cfg._fail("channel_mult", "must be a non-empty tuple of positive ints")
    for field in ("in_channels", "image_size", "model_channels", "num_res_blocks", "num_heads", "norm_groups"):
        if getattr(cfg, field) < 1:
            cfg._fail(field, "must be >= 1")
    levels = len(cfg.channel_mult)
    if cfg.image_size % 2 ** (levels - 1):
        cfg._fail("image_size", f"must be divisible by 2**(len(channel_mult) - 1) = {2 ** (levels - 1)}")
    reachable = [cfg.image_size // 2**i for i in range(levels)]
    unreachable = [r for r in cfg.attention_resolutions if r not in reachable]
    if unreachable:
        cfg._fail("attention_resolutions", f"{unreachable} not among the U-Net's resolutions {reachable}")
    if not 0.0 <= cfg.dropout < 1.0:
        cfg._fail("dropout", "must be in [0, 1)")
    # every attention layer (and the middle one) must split its width into whole heads
    attn_widths = {cfg.model_channels * cfg.channel_mult[reachable.index(r)] for r in cfg.attention_resolutions}
    attn_widths.add(cfg.model_channels * cfg.channel_mult[-1])
    if cfg.num_head_channels != -1:
        if cfg.num_head_channels < 1 or any(w % cfg.num_head_channels for w in attn_widths):
            cfg._fail("num_head_channels", f"must be -1 or divide every attention width {sorted(attn_widths)}")
    elif any(w % cfg.num_heads for w in attn_widths):
        cfg._fail("num_heads", f"must divide every attention width {sorted(attn_widths)}")
    if getattr(cfg, "num_classes", None) is not None and cfg.num_classes < 1:
        cfg._fail("num_classes", "must be None (unconditional) or >= 1")


@dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """Architecture of :class:`UNet`; JSON round trip via ``to_dict``/``from_dict``.

    ``attention_resolutions`` are feature-map sizes (e.g. ``(16,)`` for 16x16), each one that
    the down path reaches. ``out_channels=None`` means ``in_channels``; the network outputs
    ``out_channels * 2`` channels when ``learn_sigma`` (eps, then the variance interpolation
    ``v`` of Nichol & Dhariwal 2021, eq. 15). ``num_classes`` adds a label embedding with
    ``num_classes + 1`` rows: row ``num_classes`` is the NULL label of classifier-free guidance
    (Ho & Salimans 2022). ``rescale_skip`` divides every residual sum by sqrt(2).
    ``norm_groups`` is the maximum GroupNorm group count (fewer where the width needs it).

    ``cond_channels > 0`` makes a super-resolution model (Saharia et al. 2021, SR3; Ho et al.
    2022, cascaded diffusion, sec. 3): it takes ``low_res=`` [B, cond_channels, h, w], which is
    upsampled to ``image_size`` and concatenated to x_t. ``cond_augment`` adds an embedding of
    ``aug_level=`` [B], the timestep at which that low-resolution image was noised (noise
    conditioning augmentation, Ho et al. 2022, sec. 4.3); see ``ddpm_lib.superres``.
    """

    kind: ClassVar[str] = "unet"
    in_channels: int = 3
    image_size: int = 32
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    out_channels: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1  # -1: use num_heads; else heads = width // num_head_channels (ADM: 64)
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True  # strided conv / nearest + conv; False: avg-pool / nearest only
    rescale_skip: bool = False
    num_classes: int | None = None
    learn_sigma: bool = False
    norm_groups: int = 32
    cond_channels: int = 0
    cond_augment: bool = False

    def validate(self) -> None:
        validate_unet_geometry(self)
        if self.out_channels is not None and self.out_channels < 1:
            self._fail("out_channels", "must be None or >= 1")
        if self.cond_channels < 0:
            self._fail("cond_channels", "must be >= 0 (0: no low-resolution conditioning image)")
        if self.cond_augment and not self.cond_channels:
            self._fail("cond_augment", "needs cond_channels > 0 (it embeds the noise level of the low-resolution input)")

    @property
    def output_channels(self) -> int:
        """Channels of the network's output: (out_channels or in_channels), doubled if learn_sigma."""
        return (self.out_channels or self.in_channels) * (2 if self.learn_sigma else 1)


def check_labels(y: Tensor | None, num_classes: int | None, batch: int, owner: str) -> None:
    """Refuse labels for an unconditional model, and missing or (on the CPU) out-of-range ones for a conditional one."""
    if num_classes is None:
        if y is not None:
            raise ValueError(f"{owner} is unconditional (num_classes=None) but was given y")
        return
    if y is None:
        raise ValueError(f"{owner} is class-conditional: pass y (a LongTensor [B]); "
                         f"use y = {num_classes} (the null label) for the unconditional prediction")
    if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{owner} expects y as an integer tensor of shape [{batch}], got {y.dtype} {tuple(y.shape)}")
    # The value check reads y on the host: free for a CPU tensor, but on a GPU it would wait for
    # the device on every forward call. There the embedding's own bounds check still refuses an
    # out-of-range label, and the training loop checks the data's labels once, on the CPU.
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"{owner}: labels must be in [0, {num_classes}] ({num_classes} = null), "
                         f"got range [{int(y.min())}, {int(y.max())}]")


def check_timesteps(t: Tensor, batch: int, owner: str) -> Tensor:
    """``t`` as a [B] tensor (a scalar is broadcast over the batch)."""
    t = torch.as_tensor(t)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{owner} expects t of shape [{batch}] (one ORIGINAL timestep per sample), got {tuple(t.shape)}")
    return t


class UNet(nn.Module):
    r"""The DDPM / ADM U-Net :math:`\varepsilon_\theta(x_t, t[, y])`, built from a :class:`UNetConfig`.

    Time embedding: sinusoid (``model_channels`` wide) -> Linear -> SiLU -> Linear to
    ``4 * model_channels``; the label embedding, if any, is added to it; the sum conditions every
    residual block. Down path (skips kept), middle (res-attn-res), up path concatenating the
    skips, then GroupNorm, SiLU and a zero-initialised 3x3 conv, so the untrained net outputs 0.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        emb_dim = 4 * config.model_channels
        self.time_embed = TimestepEmbedding(config.model_channels, emb_dim)
        self.label_embed = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        self.aug_embed = TimestepEmbedding(config.model_channels, emb_dim) if config.cond_augment else None
        self.input_blocks, skip_channels = build_down_path(config, emb_dim)
        self.middle_block = build_middle(config, skip_channels[-1], emb_dim)
        self.output_blocks, ch = build_up_path(config, skip_channels, emb_dim)
        self.out = nn.Sequential(normalization(ch, config.norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, config.output_channels, 3, padding=1)))

    @property
    def null_label(self) -> int | None:
        """The reserved label of the unconditional prediction (classifier-free guidance)."""
        return self.config.num_classes

    def _conditioning_image(self, low_res: Tensor | None, x: Tensor) -> Tensor:
        c = self.config
        if low_res is None:
            raise ValueError(f"UNet has cond_channels={c.cond_channels}: pass low_res= "
                             f"[B, {c.cond_channels}, h, w] (the low-resolution image it refines)")
        if low_res.ndim != 4 or low_res.shape[0] != x.shape[0] or low_res.shape[1] != c.cond_channels:
            raise ValueError(f"UNet expects low_res of shape [{x.shape[0]}, {c.cond_channels}, h, w], "
                             f"got {tuple(low_res.shape)}")
        if low_res.shape[-2:] != x.shape[-2:]:
            from ddpm_lib.superres import upsample  # the one definition of "upsampled to x's size"

            low_res = upsample(low_res, x.shape[-2:])
        return low_res.to(x.dtype)

    def check_input(self, x: Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"UNet expects x of shape [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(in_channels={c.in_channels}, image_size={c.image_size}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, low_res: Tensor | None = None,
                aug_level: Tensor | None = None) -> Tensor:
        """Predict the noise (and variance channels if ``learn_sigma``).

        Args:
            x: [B, C, H, W] noisy images x_t.
            t: [B] ORIGINAL-schedule timesteps, 0-based.
            y: [B] labels in [0, num_classes] (required iff the model is class-conditional).
            low_res: [B, cond_channels, h, w] conditioning image (required iff ``cond_channels``),
                upsampled (bilinear) to H x W.
            aug_level: [B] timesteps at which ``low_res`` was noised (required iff ``cond_augment``;
                0-based like ``t``, ``ddpm_lib.superres.augment``).
        Returns:
            [B, output_channels, H, W].
        """
        self.check_input(x)
        t = check_timesteps(t, x.shape[0], "UNet")
        check_labels(y, self.config.num_classes, x.shape[0], "UNet")
        emb = self.time_embed(t.to(x.device))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        if self.config.cond_channels:
            h = torch.cat([x, self._conditioning_image(low_res, x)], dim=1)
        elif low_res is not None:
            raise ValueError("UNet was given low_res but has cond_channels=0 (not a super-resolution model)")
        else:
            h = x
        if self.aug_embed is not None:
            if aug_level is None:
                raise ValueError("UNet has cond_augment: pass aug_level= (a LongTensor [B], the timestep the "
                                 "low-resolution input was noised to; 0 for a clean one)")
            emb = emb + self.aug_embed(check_timesteps(aug_level, x.shape[0], "UNet (aug_level)").to(x.device))
        elif aug_level is not None:
            raise ValueError("UNet was given aug_level but has no cond_augment")
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# -- presets ------------------------------------------------------------------------------------
# Each returns a UNetConfig; keyword overrides are applied (and validated), e.g. digits8(learn_sigma=True).

def ddpm_cifar10(**overrides) -> UNetConfig:
    """The DDPM CIFAR-10 network (Ho et al. 2020, App. B): 35.7M parameters.

    32x32x3, 128 base channels, multipliers (1, 2, 2, 2), two residual blocks per resolution,
    one-head attention at 16x16 (and in the middle), dropout 0.1, convolutional resampling.
    """
    cfg = UNetConfig(in_channels=3, image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2),
                     num_res_blocks=2, attention_resolutions=(16,), num_heads=1, dropout=0.1)
    return cfg.replace(**overrides)


def adm_like_cifar10(**overrides) -> UNetConfig:
    """DDPM's CIFAR-10 net with ADM's architecture changes (Dhariwal & Nichol 2021, sec. 3):
    attention at 16 and 8, 64 channels per head, AdaGN, BigGAN up/down blocks, learned sigma.
    (ADM kept residual sums unscaled: the 1/sqrt(2) rescale did not help in its Table 1.)"""
    cfg = ddpm_cifar10(attention_resolutions=(16, 8), num_head_channels=64, use_scale_shift_norm=True,
                       resblock_updown=True, learn_sigma=True)
    return cfg.replace(**overrides)


def digits8(**overrides) -> UNetConfig:
    """A small U-Net for the 8x8 greyscale scikit-learn digits: 8x8 -> 4x4, attention at 4x4."""
    cfg = UNetConfig(in_channels=1, image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                     attention_resolutions=(4,), num_heads=2, dropout=0.0)
    return cfg.replace(**overrides)


def digits8_cond(**overrides) -> UNetConfig:
    """:func:`digits8` conditioned on the 10 digit classes (plus the null label, index 10)."""
    return digits8(num_classes=10).replace(**overrides)


def adm_like_digits8(**overrides) -> UNetConfig:
    """:func:`digits8` with ADM's changes: AdaGN, BigGAN up/down, 16-channel heads at 8 and 4, learned sigma."""
    return digits8(attention_resolutions=(8, 4), num_head_channels=16, use_scale_shift_norm=True,
                   resblock_updown=True, learn_sigma=True).replace(**overrides)


def shapes32(**overrides) -> UNetConfig:
    """A U-Net of a few million parameters for the 32x32 RGB procedural shapes: 32 -> 16 -> 8."""
    cfg = UNetConfig(in_channels=3, image_size=32, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=4, dropout=0.0)
    return cfg.replace(**overrides)


def shapes32_cond(**overrides) -> UNetConfig:
    """:func:`shapes32` conditioned on the 15 shape x colour classes of ``ddpm_lib.data.ShapesDataset``."""
    return shapes32(num_classes=15).replace(**overrides)


PRESETS: dict[str, Callable[..., UNetConfig]] = {
    f.__name__: f for f in (ddpm_cifar10, adm_like_cifar10, digits8, digits8_cond, adm_like_digits8,
                            shapes32, shapes32_cond)
}
