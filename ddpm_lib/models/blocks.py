r"""The U-Net's building blocks (book chapter 6): residual blocks, self-attention, resampling.

They follow DDPM (Ho et al. 2020, App. B; the PixelCNN++ / Wide-ResNet residual block with
group normalisation) and the ADM changes (Dhariwal & Nichol 2021, sec. 3): adaptive group
normalisation, BigGAN-style up/down residual blocks, more attention heads, and the optional
:math:`1/\sqrt 2` rescaling of residual sums (Song et al. 2021, NCSN++ ``skip_rescale``; the
"rescale resblocks" row of ADM's Table 1). The encoder path is built once, by
:func:`build_down_path`, and shared by the U-Net and the noisy classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "group_count", "normalization", "zero_module", "ResBlock", "AttentionBlock", "Downsample",
    "Upsample", "EmbedSequential", "build_down_path", "build_middle",
]


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The number of GroupNorm groups for a layer: the largest divisor of ``channels`` that is at
    most ``max_groups`` and leaves at least ``min_group_size`` channels per group (else 1).

    Wide layers get DDPM's 32 groups (Wu & He 2018): 128 channels -> 32 groups of 4. Narrow ones
    get fewer, never one channel per group: GroupNorm then subtracts each channel's own spatial
    mean, which deletes the time embedding the residual block has just added to that channel.
    """
    fits = [g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0 and channels // g >= min_group_size]
    return max(fits, default=1)


def normalization(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, max_groups), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so the residual branch it ends starts as the identity (ADM)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Downsample(nn.Module):
    """Halve H and W: a 3x3 stride-2 convolution (DDPM) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then (optionally) a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    r"""Residual block with the time embedding injected (DDPM App. B; ADM sec. 3).

    ``h = conv(SiLU(GN(x)))``; then either ``h + Linear(SiLU(emb))`` (DDPM: added to every
    channel) or AdaGN, ``GN(h) * (1 + s) + b`` with ``(s, b) = Linear(SiLU(emb))`` (ADM); then
    ``conv(dropout(SiLU(GN(h))))`` with the conv zero-initialised, plus a 1x1-conv skip when the
    width changes. With ``up``/``down`` the block also resamples both branches (BigGAN, Brock et
    al. 2019, as in ADM). With ``rescale_skip`` the sum is divided by :math:`\sqrt 2`.
    """

    def __init__(self, in_channels: int, emb_dim: int, out_channels: int | None = None, *,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False, up: bool = False,
                 down: bool = False, rescale_skip: bool = False, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.use_scale_shift_norm, self.rescale_skip = use_scale_shift_norm, rescale_skip
        self.in_norm = normalization(in_channels, norm_groups)
        # BigGAN: resample between the first non-linearity and the first conv, skip resampled too
        self.resample = (Upsample(in_channels, use_conv=False) if up
                         else Downsample(in_channels, use_conv=False) if down else nn.Identity())
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = normalization(out_channels, norm_groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb_proj(emb)[:, :, None, None]  # [B, C(or 2C), 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        out = self.skip(x) + self.out_layers(h)
        return out / math.sqrt(2) if self.rescale_skip else out


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, as a residual block (DDPM; ADM).

    ``x + proj(softmax(q k^T / sqrt(d)) v)`` with q, k, v from a 1x1 conv of ``GN(x)`` and the
    output projection zero-initialised; ``scaled_dot_product_attention`` picks a fused kernel.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, *,
                 rescale_skip: bool = False, norm_groups: int = 32):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} attention heads")
        self.rescale_skip = rescale_skip
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # [B, 3C, L]
        q, k, v = qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).permute(1, 0, 2, 4, 3)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, C/heads]
        h = self.proj_out(h.transpose(2, 3).reshape(B, C, H * W)).reshape(B, C, H, W)
        return (x + h) / math.sqrt(2) if self.rescale_skip else x + h


class EmbedSequential(nn.Sequential):
    """A sequence of layers where residual blocks also receive the time(+label) embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _res(cfg, in_ch: int, emb_dim: int, out_ch: int | None = None, **kw) -> ResBlock:
    return ResBlock(in_ch, emb_dim, out_ch, dropout=cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm,
                    rescale_skip=cfg.rescale_skip, norm_groups=cfg.norm_groups, **kw)


def _attn(cfg, ch: int) -> AttentionBlock:
    return AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels, rescale_skip=cfg.rescale_skip,
                          norm_groups=cfg.norm_groups)


def build_down_path(cfg, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
    """The encoder of the U-Net: input conv, then per resolution ``num_res_blocks`` residual
    blocks (+ attention where the resolution is in ``attention_resolutions``) and a downsampler
    (all but the last level).

    ``cfg`` is a UNetConfig-like object. Returns the blocks and the channel count after each
    block, i.e. of every skip connection the decoder will consume.
    """
    ch = cfg.model_channels
    # a U-Net conditioned on a low-resolution image sees it as extra input channels (SR3, cascaded diffusion)
    in_ch = cfg.in_channels + getattr(cfg, "cond_channels", 0)
    blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_ch, ch, 3, padding=1))])
    skip_channels, res = [ch], cfg.image_size
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_res(cfg, ch, emb_dim, mult * cfg.model_channels)]
            ch = mult * cfg.model_channels
            if res in cfg.attention_resolutions:
                layers.append(_attn(cfg, ch))
            blocks.append(EmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = _res(cfg, ch, emb_dim, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
            blocks.append(EmbedSequential(down))
            skip_channels.append(ch)
            res //= 2
    return blocks, skip_channels


def build_middle(cfg, ch: int, emb_dim: int) -> EmbedSequential:
    """The bottleneck: residual block, self-attention, residual block (DDPM App. B)."""
    return EmbedSequential(_res(cfg, ch, emb_dim), _attn(cfg, ch), _res(cfg, ch, emb_dim))


def build_up_path(cfg, skip_channels: list[int], emb_dim: int) -> tuple[nn.ModuleList, int]:
    """The decoder: per resolution (coarse to fine) ``num_res_blocks + 1`` residual blocks, each
    fed the concatenation of the running features and one skip, then an upsampler (all but the
    finest level). Returns the blocks and the output width."""
    skips = list(skip_channels)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    res = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [_res(cfg, ch + skips.pop(), emb_dim, cfg.model_channels * mult)]
            ch = cfg.model_channels * mult
            if res in cfg.attention_resolutions:
                layers.append(_attn(cfg, ch))
            if level and i == cfg.num_res_blocks:
                layers.append(_res(cfg, ch, emb_dim, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                res *= 2
            blocks.append(EmbedSequential(*layers))
    assert not skips, "every skip connection must be consumed"
    return blocks, ch
