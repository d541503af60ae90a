"""Config fields that would poison a run are refused when the config is built (one ValueError)."""

from __future__ import annotations

import math

import pytest

from ddpm_lib.configs import DiffusionConfig, TrainConfig


@pytest.mark.parametrize("field, value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("weight_decay", math.nan), ("weight_decay", math.inf),
    ("grad_clip", math.inf), ("grad_clip", math.nan),
])
def test_non_finite_train_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_losses_without_a_variance_term_cannot_train_a_learned_variance():
    for loss in ("simple", "huber"):
        with pytest.raises(ValueError, match="learned_range"):
            DiffusionConfig(loss=loss, variance="learned_range")
    assert DiffusionConfig(loss="huber").loss_kwargs()["loss"] == "huber"
