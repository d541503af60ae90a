r"""A small MLP noise predictor :math:`\varepsilon_\theta(x_t, t[, y])` for 2-D (vector) data (chapters 4-5).

The U-Net's recipe in miniature: the same sinusoidal time embedding and MLP, injected into
every hidden layer, residual hidden layers, and a zero-initialised output layer so that the
untrained model predicts zero noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lib.models.blocks import zero_module
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.models.embeddings import TimestepEmbedding
from ddpm_lib.models.unet import check_labels, check_timesteps

__all__ = ["MLPConfig", "MLPDenoiser"]


@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    """Architecture of :class:`MLPDenoiser`.

    ``num_layers`` residual hidden layers of width ``hidden_dim``; ``num_classes`` adds a label
    embedding with a null row at index ``num_classes`` (classifier-free guidance);
    ``learn_sigma`` doubles the output width as in the U-Net.
    """

    kind: ClassVar[str] = "mlp"
    data_dim: int = 2
    hidden_dim: int = 128
    num_layers: int = 4
    time_embed_dim: int = 128  # width of the sinusoid
    num_classes: int | None = None
    dropout: float = 0.0
    learn_sigma: bool = False

    def validate(self) -> None:
        for field in ("data_dim", "hidden_dim", "num_layers", "time_embed_dim"):
            if getattr(self, field) < 1:
                self._fail(field, "must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            self._fail("num_classes", "must be None (unconditional) or >= 1")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "must be in [0, 1)")

    @property
    def output_dim(self) -> int:
        return self.data_dim * (2 if self.learn_sigma else 1)


class MLPDenoiser(nn.Module):
    """``h = Linear(x)``; per layer ``h = h + Dropout(SiLU(Linear(h) + Linear(SiLU(emb))))``; output ``Linear(SiLU(h))``.

    ``forward(x [B, D], t [B], y=None) -> [B, D]`` (``[B, 2D]`` with ``learn_sigma``).
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        H = config.hidden_dim
        self.time_embed = TimestepEmbedding(config.time_embed_dim, H)
        self.label_embed = nn.Embedding(config.num_classes + 1, H) if config.num_classes else None
        self.input = nn.Linear(config.data_dim, H)
        self.layers = nn.ModuleList(nn.Linear(H, H) for _ in range(config.num_layers))
        # time enters every hidden layer, like every residual block of the U-Net
        self.emb_projs = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(H, H)) for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.output = zero_module(nn.Linear(H, config.output_dim))

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.data_dim:
            raise ValueError(f"MLPDenoiser expects x of shape [B, {self.config.data_dim}], got {tuple(x.shape)}")
        t = check_timesteps(t, x.shape[0], "MLPDenoiser")
        check_labels(y, self.config.num_classes, x.shape[0], "MLPDenoiser")
        emb = self.time_embed(t.to(x.device))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        h = self.input(x)
        for layer, emb_proj in zip(self.layers, self.emb_projs):
            h = h + self.dropout(F.silu(layer(h) + emb_proj(emb)))
        return self.output(F.silu(h))
