r"""What a model predicts, and the ONE place where its output becomes eps and x0 (chapters 4, 7, 9).

A diffusion network may predict the noise eps (Ho et al. 2020), the clean image x0, or the
velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, arXiv 2202.00512,
§4); with a learned variance (Nichol & Dhariwal 2021, arXiv 2102.09672, §3.1) it outputs 2C
channels, the prediction first and the variance values v_var in [-1, 1] last. From
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, Eq. (4)) each
prediction gives the other two; this module holds those conversions once, and every sampler,
guidance wrapper, loss and ``GaussianDiffusion.p_mean_variance`` calls them.

A model carries its parameterisation as attributes (as k-diffusion's denoiser wrappers carry
theirs): ``model.prediction`` (``"eps"``, ``"x0"`` or ``"v"``) and ``model.variance``.
:func:`set_parameterization` writes them (the loaders ``checkpoint.load_model`` and
``pretrained.load`` do), :func:`resolve_prediction` reads them (an explicit argument wins, and
a plain function without the attribute is an eps-model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS", "VARIANCES", "check_choice", "split_output", "x0_from_eps", "eps_from_x0", "v_from_eps_x0",
    "eps_x0_from_prediction", "resolve_prediction", "resolve_variance", "set_parameterization", "compute_dtype",
]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(kind: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else one ValueError naming the choices."""
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {list(allowed)}")
    return value  # type: ignore[return-value]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the update arithmetic for a state ``x``: float32 or better (float64 stays
    float64). In bfloat16 sqrt(alpha_bar) = 0.99995 rounds to 1.0 (DESIGN.md pitfall 6), so
    coefficients are never applied in a half type."""
    return torch.promote_types(x.dtype, torch.float32)


def split_output(output: Tensor, x: Tensor, variance: str | None = None) -> tuple[Tensor, Tensor | None]:
    """(prediction, variance values or None) of a model output: the one place where a
    learned-variance output [B, 2C, ...] is split (Nichol & Dhariwal 2021, §3.1: the model
    outputs v_var, the interpolation weight of their Eq. (15), beside its prediction).

    An output shaped like ``x`` has no variance part. ``variance="learned_range"`` requires
    the 2C output; with ``variance=None`` (samplers that use only the prediction: DDIM,
    DPM-Solver++, guidance) either shape is accepted.
    """
    learned = variance == "learned_range"
    if output.shape == x.shape and not learned:
        return output, None
    expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if x.ndim > 1 else None
    if expected is not None and tuple(output.shape) == expected:
        pred, var_values = output.chunk(2, dim=1)
        return pred, var_values
    if learned:
        raise ValueError(f"learned_range needs a model output of shape {expected} (2C channels), "
                         f"got {tuple(output.shape)}")
    raise ValueError(f"model output shape {tuple(output.shape)} is neither x's {tuple(x.shape)} nor 2x its channels")


def x0_from_eps(x_t: Tensor, eps: Tensor, sqrt_ab, sqrt_1m_ab) -> Tensor:
    r""":math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}` (Ho et al. 2020,
    Eq. (15): Eq. (4) solved for x0). ``sqrt_ab``, ``sqrt_1m_ab``: floats or tensors that broadcast."""
    return (x_t - sqrt_1m_ab * eps) / sqrt_ab


def eps_from_x0(x_t: Tensor, x0: Tensor, sqrt_ab, sqrt_1m_ab) -> Tensor:
    r""":math:`\hat\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}` (Ho et al. 2020,
    Eq. (4) solved for eps); used for x0-models and after clipping x0_hat (pitfall 3)."""
    return (x_t - sqrt_ab * x0) / sqrt_1m_ab


def v_from_eps_x0(eps: Tensor, x0: Tensor, sqrt_ab, sqrt_1m_ab) -> Tensor:
    r""":math:`v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0`, the v-prediction target
    (Salimans & Ho 2022, arXiv 2202.00512, §4: v = alpha_t eps - sigma_t x)."""
    return sqrt_ab * eps - sqrt_1m_ab * x0


def eps_x0_from_prediction(pred: Tensor, x_t: Tensor, sqrt_ab, sqrt_1m_ab, prediction: str,
                           clip_denoised: bool = False) -> tuple[Tensor, Tensor]:
    r"""(eps_hat, x0_hat) from a model's prediction of eps, x0 or v: THE conversion of the package.

    * eps: x0 by Ho et al. 2020, Eq. (15);
    * x0: eps by Eq. (4) solved for eps;
    * v: :math:`\hat x_0 = \sqrt{\bar\alpha}\,x_t - \sqrt{1-\bar\alpha}\,v` and
      :math:`\hat\varepsilon = \sqrt{1-\bar\alpha}\,x_t + \sqrt{\bar\alpha}\,v` (Salimans & Ho 2022,
      Appendix D), finite at alpha_bar = 0 (zero terminal SNR).

    ``clip_denoised`` clamps x0_hat to [-1, 1] and re-derives eps from it (pitfall 3: the
    reference code's clip, not the papers' algorithm).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        eps, x0 = pred, x0_from_eps(x_t, pred, sqrt_ab, sqrt_1m_ab)
    elif prediction == "x0":
        eps, x0 = eps_from_x0(x_t, pred, sqrt_ab, sqrt_1m_ab), pred
    else:
        eps, x0 = sqrt_1m_ab * x_t + sqrt_ab * pred, sqrt_ab * x_t - sqrt_1m_ab * pred
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, sqrt_ab, sqrt_1m_ab)
    return eps, x0


def resolve_prediction(model: object, prediction: str | None = None) -> str:
    """The prediction a model makes: ``prediction`` if given, else ``model.prediction``, else
    ``"eps"`` (a plain function, a guidance wrapper of an eps-model)."""
    value = prediction if prediction is not None else getattr(model, "prediction", "eps")
    return check_choice("prediction", value, PREDICTIONS)


def resolve_variance(model: object, variance: str | None = None) -> str:
    """The reverse variance to sample with: ``variance`` if given, else ``model.variance``, else
    ``"fixed_small"`` (beta-tilde, the book's default; the reference code's is beta, pitfall 10)."""
    value = variance if variance is not None else getattr(model, "variance", "fixed_small")
    return check_choice("variance", value, VARIANCES)


def set_parameterization(model, prediction: str = "eps", variance: str = "fixed_small"):
    """Attach ``prediction`` and ``variance`` to ``model`` (an nn.Module or a function) and return
    it, so that every sampler reads it correctly without being told (the loaders call this)."""
    model.prediction = check_choice("prediction", prediction, PREDICTIONS)
    model.variance = check_choice("variance", variance, VARIANCES)
    return model
