r"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, arXiv 2112.10752, sec. 3
and App. G; book chapter 13).

An encoder maps an image x [C, H, W] to a diagonal Gaussian
:math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \operatorname{diag}\sigma^2_\phi(x))` over a latent
z [c, H/f, W/f] (f = 2^(levels - 1)); a decoder maps z back to an image. Trained with a
reconstruction error plus a small weight times :math:`\mathrm{KL}(q_\phi(z \mid x)\,\|\,\mathcal N(0, I))`
(``ddpm_lib.latent.autoencoder_losses``), it is chapter 1's VAE with a nearly deterministic
encoder: the KL term only keeps the latent space from drifting to arbitrary scales. A diffusion
model is then trained on the latents (``ddpm_lib.latent``), which are f^2 C / c times fewer
numbers than the pixels.

The blocks are the U-Net's residual blocks without a time embedding (GroupNorm, SiLU, 3x3 conv,
twice, plus a skip), stride-2 convolutions down and nearest-neighbour + conv up, as in the
LDM autoencoder without its attention and GAN loss (too small an image to need them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ddpm_lib.models.blocks import Downsample, Upsample, normalization
from ddpm_lib.models.config import ModelConfig

__all__ = ["AutoencoderConfig", "Autoencoder", "LOGVAR_RANGE"]

# LDM clamps the encoder's log-variance to this range: exp(-30) and exp(20) bound sigma^2
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    """Architecture of :class:`Autoencoder` (and its KL weight). ``channels`` are the widths of
    the levels, each but the last followed by a halving, so the latent side is
    ``image_size / 2**(len(channels) - 1)``; ``latent_channels`` is c. ``kl_weight`` multiplies
    the KL term of the training loss (Rombach et al. use 1e-6 on 256x256 images; it is recorded
    here because it defines what the latent space is)."""

    kind: ClassVar[str] = "autoencoder"
    in_channels: int = 3
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    num_res_blocks: int = 1
    norm_groups: int = 8
    kl_weight: float = 1e-4

    def validate(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            self._fail("channels", "must be a non-empty tuple of positive ints")
        for field in ("in_channels", "image_size", "latent_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, field) < 1:
                self._fail(field, "must be >= 1")
        if self.image_size % self.factor:
            self._fail("image_size", f"must be divisible by 2**(len(channels) - 1) = {self.factor}")
        if not 0 <= self.kl_weight < float("inf"):
            self._fail("kl_weight", "must be a finite number >= 0")

    @property
    def factor(self) -> int:
        """The downsampling factor f between the image and the latent."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H/f, W/f)."""
        side = self.image_size // self.factor
        return (self.latent_channels, side, side)


class _Res(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 if the width changes) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(normalization(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  normalization(cout, groups), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Autoencoder(nn.Module):
    r""":math:`x \mapsto q_\phi(z \mid x)`, :math:`z \mapsto \hat x`: :meth:`encode` returns the mean and
    log-variance of the latent Gaussian, :meth:`decode` the image; ``forward(x, noise)`` is the
    reparameterised pass :math:`z = \mu + \sigma\,\varepsilon` (chapter 1) of training."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        g = c.norm_groups
        enc: list[nn.Module] = [nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1)]
        width = c.channels[0]
        for level, ch in enumerate(c.channels):
            for _ in range(c.num_res_blocks):
                enc.append(_Res(width, ch, g))
                width = ch
            if level != len(c.channels) - 1:
                enc.append(Downsample(width))
        enc += [normalization(width, g), nn.SiLU(), nn.Conv2d(width, 2 * c.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, width, 3, padding=1)]
        for level, ch in reversed(list(enumerate(c.channels))):
            for _ in range(c.num_res_blocks):
                dec.append(_Res(width, ch, g))
                width = ch
            if level != 0:
                dec.append(Upsample(width))
        dec += [normalization(width, g), nn.SiLU(), nn.Conv2d(width, c.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: Tensor, shape: tuple[int, ...], what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"Autoencoder expects {what} of shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of :math:`q_\\phi(z \\mid x)`, each [B, c, H/f, W/f]."""
        c = self.config
        self._check(x, (c.in_channels, c.image_size, c.image_size), "images")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """The reconstruction :math:`\\hat x` [B, C, H, W] of latents ``z`` [B, c, H/f, W/f]."""
        self._check(z, self.config.latent_shape, "latents")
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, mean, log-variance); with ``noise`` (same shape as the latent) the
        decoder sees a draw :math:`z = \\mu + e^{\\log\\sigma^2/2}\\,\\varepsilon`, else the mean."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.decode(z), mean, logvar
