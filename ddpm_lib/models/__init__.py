"""Networks of the book: the U-Net (chapter 6), a 2-D MLP (chapters 4-5), classifiers (chapter 10),
the autoencoder of latent diffusion (chapter 13).

Every model is built from a frozen config dataclass whose JSON (``config.to_dict()``, with a
``"kind"`` field) rebuilds it exactly::

    from ddpm_lib.models import UNet, digits8, model_from_config
    model = UNet(digits8())
    same = model_from_config(model.config.to_dict())   # e.g. read back from config.json

Noise predictors are called ``model(x_t, t)`` or ``model(x_t, t, y=y)``, ``t`` a LongTensor [B]
of ORIGINAL-schedule timesteps, 0-based; images are NCHW in [-1, 1].
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ddpm_lib.models.autoencoder import Autoencoder, AutoencoderConfig
from ddpm_lib.models.classifier import FeatureClassifier, FeatureClassifierConfig, NoisyClassifier, NoisyClassifierConfig
from ddpm_lib.models.config import ModelConfig
from ddpm_lib.models.embeddings import TimestepEmbedding, timestep_embedding
from ddpm_lib.models.mlp import MLPConfig, MLPDenoiser
from ddpm_lib.models.unet import (
    PRESETS, UNet, UNetConfig, adm_like_cifar10, adm_like_digits8, ddpm_cifar10, digits8, digits8_cond,
    shapes32, shapes32_cond,
)

__all__ = [
    "timestep_embedding", "TimestepEmbedding", "ModelConfig",
    "UNetConfig", "UNet", "MLPConfig", "MLPDenoiser",
    "NoisyClassifierConfig", "NoisyClassifier", "FeatureClassifierConfig", "FeatureClassifier",
    "AutoencoderConfig", "Autoencoder",
    "PRESETS", "ddpm_cifar10", "adm_like_cifar10", "digits8", "digits8_cond", "adm_like_digits8",
    "shapes32", "shapes32_cond",
    "MODEL_KINDS", "build_model", "model_from_config", "count_parameters",
]

# kind -> (config class, model class): the "kind" field of a config JSON picks the row
MODEL_KINDS: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "mlp": (MLPConfig, MLPDenoiser),
    "noisy_classifier": (NoisyClassifierConfig, NoisyClassifier),
    "feature_classifier": (FeatureClassifierConfig, FeatureClassifier),
    "autoencoder": (AutoencoderConfig, Autoencoder),
}


def build_model(kind: str, config: dict[str, Any] | ModelConfig | None = None) -> nn.Module:
    """Build a model of ``kind`` ("unet", "mlp", "noisy_classifier", "feature_classifier",
    "autoencoder") from a
    config dict (missing keys take defaults) or config instance."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {sorted(MODEL_KINDS)}")
    config_cls, model_cls = MODEL_KINDS[kind]
    if isinstance(config, ModelConfig):
        if not isinstance(config, config_cls):
            raise ValueError(f"kind {kind!r} needs a {config_cls.__name__}, got {type(config).__name__}")
        return model_cls(config)
    return model_cls(config_cls.from_dict(config or {}))


def model_from_config(config: dict[str, Any] | ModelConfig) -> nn.Module:
    """Rebuild a model from its config: a dict with a ``"kind"`` field (as in a checkpoint's JSON)
    or a config instance."""
    if isinstance(config, ModelConfig):
        return build_model(config.kind, config)
    if "kind" not in config:
        raise ValueError(f"a model config dict needs a 'kind' field, one of {sorted(MODEL_KINDS)}")
    return build_model(config["kind"], config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
