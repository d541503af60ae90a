r"""Classifiers: a noisy one for classifier guidance, a clean one for feature-space metrics.

* :class:`NoisyClassifier` models :math:`p_\phi(y \mid x_t, t)` on noisy inputs, whose gradient
  :math:`\nabla_{x_t}\log p_\phi(y\mid x_t)` steers sampling (Dhariwal & Nichol 2021, sec. 4,
  Algorithm 1; book chapter 10). As in ADM it is the downsampling half of the U-Net (with the
  time embedding in every residual block), then the middle block, pooling and a linear head.
* :class:`FeatureClassifier` is a plain small conv net on clean images; its penultimate
  features replace Inception features for a Frechet distance / KID on digits and shapes
  (Heusel et al. 2017; Binkowski et al. 2018), and its accuracy scores conditional samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lib.models.blocks import build_down_path, build_middle, normalization
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.models.embeddings import TimestepEmbedding
from ddpm_lib.models.unet import check_timesteps, validate_unet_geometry

__all__ = ["NoisyClassifierConfig", "NoisyClassifier", "FeatureClassifierConfig", "FeatureClassifier"]


def _check_image(x: Tensor, channels: int, size: int, owner: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"{owner} expects x of shape [B, {channels}, {size}, {size}], got {tuple(x.shape)}")


@dataclass(frozen=True)
class NoisyClassifierConfig(ModelConfig):
    """Architecture of :class:`NoisyClassifier`: the U-Net encoder fields of ``UNetConfig``,
    plus ``num_classes``. Defaults suit the 8x8 digits."""

    kind: ClassVar[str] = "noisy_classifier"
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    rescale_skip: bool = False
    norm_groups: int = 32

    def validate(self) -> None:
        validate_unet_geometry(self)


class NoisyClassifier(nn.Module):
    """Time-conditioned classifier ``forward(x_t, t) -> logits [B, num_classes]`` (ADM's encoder
    classifier with average pooling). ``t`` holds ORIGINAL-schedule timesteps, 0-based."""

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__()
        self.config = config
        emb_dim = 4 * config.model_channels
        self.time_embed = TimestepEmbedding(config.model_channels, emb_dim)
        self.input_blocks, skip_channels = build_down_path(config, emb_dim)
        ch = skip_channels[-1]
        self.middle_block = build_middle(config, ch, emb_dim)
        self.out_norm = normalization(ch, config.norm_groups)
        self.head = nn.Linear(ch, config.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _check_image(x, self.config.in_channels, self.config.image_size, "NoisyClassifier")
        t = check_timesteps(t, x.shape[0], "NoisyClassifier")
        emb = self.time_embed(t.to(x.device))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))  # global average pool -> [B, C]
        return self.head(h)


@dataclass(frozen=True)
class FeatureClassifierConfig(ModelConfig):
    """Architecture of :class:`FeatureClassifier`: one conv stage per entry of ``channels``
    (two 3x3 convs with GroupNorm and SiLU), 2x2 average pooling between stages, global
    average pooling, a ``feature_dim`` layer (the features) and a linear head."""

    kind: ClassVar[str] = "feature_classifier"
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.0
    norm_groups: int = 32

    def validate(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            self._fail("channels", "must be a non-empty tuple of positive ints")
        for field in ("in_channels", "image_size", "num_classes", "feature_dim", "norm_groups"):
            if getattr(self, field) < 1:
                self._fail(field, "must be >= 1")
        if self.image_size % 2 ** (len(self.channels) - 1):
            self._fail("image_size", f"must be divisible by 2**(len(channels) - 1) = {2 ** (len(self.channels) - 1)}")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "must be in [0, 1)")


class FeatureClassifier(nn.Module):
    """Clean-image classifier: ``forward(x) -> logits``, ``features(x) -> [B, feature_dim]``."""

    def __init__(self, config: FeatureClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        ch = config.in_channels
        for i, width in enumerate(config.channels):
            if i:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(ch, width, 3, padding=1), normalization(width, config.norm_groups), nn.SiLU()]
                ch = width
        self.body = nn.Sequential(*layers)
        self.feature_layer = nn.Sequential(nn.Linear(ch, config.feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] (for Frechet distance / KID)."""
        _check_image(x, self.config.in_channels, self.config.image_size, "FeatureClassifier")
        return self.feature_layer(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels [B]."""
        return self.forward(x).argmax(dim=1)
