r"""Guidance as eps-model wrappers: classifier-free, classifier and loss guidance (chapters 10-12).

Each function returns a new eps-model ``guided(x_t, t, y=None) -> eps`` with the package's
calling convention (``t`` a LongTensor [B] of ORIGINAL timesteps), so every sampler in
``ddpm_lib.samplers`` works with every guidance. All three are the same move in the score
view (book chapter 10, "Bayes on scores"): since
:math:`\varepsilon = -\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p_t(x_t)`, adding a term
:math:`\nabla_{x_t}\log r(x_t)` to the score subtracts :math:`\sqrt{1-\bar\alpha_t}\nabla_{x_t}\log r(x_t)`
from eps. :math:`\bar\alpha_t` is looked up by ORIGINAL timestep in the diffusion the wrapper
was given (``diffusion.alpha_bar_at``), so a wrapper built on the full T-step chain works
unchanged inside respaced and DDIM samplers.

A learned-variance model (output with 2C channels) keeps its variance channels: the
guidance acts on the prediction half (``predictions.split_output``), as in GLIDE. A model that
predicts x0 or v (``model.prediction``) is read through ``ddpm_lib.predictions``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm_lib.diffusion import alpha_bar_at
from ddpm_lib.predictions import eps_x0_from_prediction, resolve_prediction, split_output

__all__ = ["classifier_free", "classifier_guidance", "loss_guidance", "scale_from_w", "w_from_scale"]


def scale_from_w(w: float) -> float:
    r"""The "guidance scale" :math:`s` of GLIDE, Imagen and diffusers for Ho and Salimans' weight
    :math:`w`: :math:`\varepsilon(\varnothing) + s(\varepsilon(y) - \varepsilon(\varnothing)) = (1 + w)\varepsilon(y) - w\varepsilon(\varnothing)`
    exactly when :math:`s = 1 + w` (pitfall 10; book chapter 11). ``w = 0`` (plain conditional) is ``s = 1``."""
    return 1.0 + float(w)


def w_from_scale(scale: float) -> float:
    r"""Ho and Salimans' weight :math:`w = s - 1` for a "guidance scale" :math:`s` (inverse of
    :func:`scale_from_w`): Stable Diffusion's default s = 7.5 is w = 6.5 in :func:`classifier_free`."""
    return float(scale) - 1.0


def _labels(y, x_t: Tensor) -> Tensor:
    if y is None:
        raise ValueError("guidance needs labels: call the guided model with y=LongTensor [B] (or an int)")
    return torch.as_tensor(y, dtype=torch.long, device=x_t.device).reshape(-1).expand(x_t.shape[0])


def _scales(diffusion, t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    # (sqrt(abar_t), sqrt(1 - abar_t)) at ORIGINAL timesteps, shaped [B, 1, ...], float32 or better
    a = alpha_bar_at(diffusion, t).to(x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    return a.sqrt().to(dtype), (1 - a).sqrt().to(dtype)


def _eps_x0(model, out: Tensor, x_t: Tensor, diffusion, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(eps, x0, variance channels or None) of a raw model output, whatever the model predicts."""
    pred, rest = split_output(out, x_t)
    sqrt_ab, sqrt_1m_ab = _scales(diffusion, t, x_t)
    eps, x0 = eps_x0_from_prediction(pred.to(sqrt_ab.dtype), x_t.to(sqrt_ab.dtype), sqrt_ab, sqrt_1m_ab,
                                     resolve_prediction(model))
    return eps, x0, rest


def _with_rest(pred: Tensor, rest: Tensor | None) -> Tensor:
    return pred if rest is None else torch.cat([pred, rest.to(pred.dtype)], dim=1)


def _as_eps_model(guided, model):
    """Mark a wrapper's output as eps (keeping a learned variance) for the samplers."""
    guided.prediction = "eps"
    guided.variance = getattr(model, "variance", "fixed_small")
    return guided

def classifier_free(model: Callable[..., Tensor], w: float, null_label: int | None = None) -> Callable[..., Tensor]:
    r"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, Eq. (6); book chapter 11):

    .. math:: \tilde\varepsilon(x_t, t, y) = (1 + w)\,\varepsilon(x_t, t, y) - w\,\varepsilon(x_t, t, \varnothing).

    Convention (Ho and Salimans'): ``w = 0`` is the plain conditional model, ``w > 0`` sharpens
    towards the implicit classifier :math:`p(y \mid x_t) \propto p(x_t \mid y)/p(x_t)`, and
    ``w = -1`` would be the unconditional model. The "guidance scale" ``s`` of other codebases
    (GLIDE, Stable Diffusion: :math:`\varepsilon(\varnothing) + s(\varepsilon(y) - \varepsilon(\varnothing))`) is
    ``s = 1 + w``, so their s = 7.5 is w = 6.5 here (pitfall 10).

    ``null_label`` is the label reserved for "no condition", fed during training by label
    dropout (pitfall 8). By default it is the model's own ``null_label`` (``ddpm_lib`` models
    reserve ``num_classes``, the last row of their label embedding); a plain function or an
    unconditional model has none, and then it must be given. Both evaluations run as ONE
    forward pass on the concatenated batch [x; x].

    The combination is made on the model's own prediction (eps, x0 or v): each is an affine
    function of eps at the same x_t and t, so combining them is combining the eps
    (``ddpm_lib.predictions``), and the wrapper predicts what the model predicts.
    """
    if null_label is None:
        null_label = getattr(model, "null_label", None)
        if null_label is None:
            raise ValueError(
                "classifier_free cannot determine the null label: the model has no null_label (it is "
                "unconditional, or not a ddpm_lib model); pass null_label= (the label reserved for "
                "'no condition' in training, num_classes for ddpm_lib models)"
            )
    if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral) or null_label < 0:
        raise ValueError(f"null_label must be a non-negative integer label, got {null_label!r}")
    null_label = int(null_label)

    def guided(x_t: Tensor, t: Tensor, y=None, **model_kwargs) -> Tensor:
        y = _labels(y, x_t)
        null = torch.full_like(y, null_label)
        doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.shape[:1] == x_t.shape[:1] else v
                   for k, v in model_kwargs.items()}
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **doubled)
        cond, uncond = out.chunk(2)
        pred_cond, rest = split_output(cond, x_t)
        pred_uncond, _ = split_output(uncond, x_t)
        return _with_rest(pred_cond + w * (pred_cond - pred_uncond), rest)

    guided.prediction = resolve_prediction(model)
    guided.variance = getattr(model, "variance", "fixed_small")
    guided.null_label = null_label
    return guided


def _grad_log_prob(classifier: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    r""":math:`\nabla_{x_t}\log p_\phi(y \mid x_t, t)` (log-softmax of the logits), even under ``no_grad``."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_probs = classifier(x, t).log_softmax(dim=-1)
        selected = log_probs.gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad.to(x_t.dtype)


def classifier_guidance(
    model: Callable[..., Tensor],
    classifier: Callable[[Tensor, Tensor], Tensor],
    diffusion,
    scale: float,
    *,
    pass_y_to_model: bool = False,
) -> Callable[..., Tensor]:
    r"""Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233, §4, Eq. (14), used in their
    Algorithm 2; book chapter 10):

    .. math:: \hat\varepsilon(x_t) - \sqrt{1-\bar\alpha_t}\; s\;\nabla_{x_t}\log p_\phi(y \mid x_t, t).

    With s = 1 this is Bayes' rule on scores, :math:`\nabla\log p(x_t \mid y) = \nabla\log p(x_t) + \nabla\log p(y\mid x_t)`:
    the exact classifier turns the exact unconditional eps into the exact conditional one.
    ``classifier(x_t, t) -> logits [B, K]`` is trained on noisy inputs; ``diffusion`` is the
    ORIGINAL chain (its :math:`\bar\alpha` is read at the original ``t``). The model is called
    without ``y`` unless ``pass_y_to_model`` (guiding a class-conditional model, as ADM also does).
    The model may predict eps, x0 or v (``model.prediction``); the wrapper returns eps.
    """

    def guided(x_t: Tensor, t: Tensor, y=None, **model_kwargs) -> Tensor:
        y = _labels(y, x_t)
        out = model(x_t, t, y=y, **model_kwargs) if pass_y_to_model else model(x_t, t, **model_kwargs)
        eps, _, rest = _eps_x0(model, out, x_t, diffusion, t)
        grad = _grad_log_prob(classifier, x_t, t, y)
        _, sqrt_one_minus = _scales(diffusion, t, x_t)
        return _with_rest(eps - sqrt_one_minus * scale * grad.to(eps.dtype), rest)

    return _as_eps_model(guided, model)


def loss_guidance(
    model: Callable[..., Tensor], diffusion, loss_fn: Callable[[Tensor], Tensor], scale: float
) -> Callable[..., Tensor]:
    r"""Guidance by any differentiable loss on the predicted x0 (book chapter 12): semantic
    diffusion guidance (Liu et al. 2021, arXiv 2112.05744, "More control for free!": the gradient
    of a differentiable image or text matching score steers every reverse step; the idea, not a
    single equation of theirs) written in the eps form of classifier guidance, Dhariwal & Nichol
    2021, Eq. (14), with :math:`\log p(y \mid x_t)` replaced by :math:`-\mathcal L(\hat x_0(x_t))`
    and :math:`\hat x_0` from Ho et al. 2020, Eq. (15) (the "forward guidance" of universal
    guidance, Bansal et al. 2023, arXiv 2302.07121):

    .. math::
        \hat\varepsilon(x_t) + \sqrt{1-\bar\alpha_t}\; s\;\nabla_{x_t} \mathcal L\bigl(\hat x_0(x_t)\bigr),\qquad
        \hat x_0(x_t) = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon(x_t)}{\sqrt{\bar\alpha_t}}.

    Sign convention: the guided score is :math:`\nabla\log p_t - s\nabla\mathcal L`, i.e. sampling
    from :math:`p(x)\,e^{-s\mathcal L}`: guidance LOWERS the loss (it is classifier guidance with
    :math:`\log p(y \mid x_t)` replaced by :math:`-\mathcal L(\hat x_0(x_t))`). The gradient flows
    through the model's prediction. ``loss_fn(x0_hat) -> [B]`` (or a scalar; it is summed, so
    each sample gets the gradient of its own loss). ``y``, if given, is passed to the model.
    The model may predict eps, x0 or v (``model.prediction``); the wrapper returns eps.
    """

    def guided(x_t: Tensor, t: Tensor, y=None, **model_kwargs) -> Tensor:
        _, sqrt_one_minus = _scales(diffusion, t, x_t)
        if y is not None:
            model_kwargs = {**model_kwargs, "y": y}
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            eps, x0_hat, rest = _eps_x0(model, model(x, t, **model_kwargs), x, diffusion, t)
            (grad,) = torch.autograd.grad(loss_fn(x0_hat).sum(), x)
        eps = eps.detach() + sqrt_one_minus * scale * grad.to(eps.dtype)
        return _with_rest(eps, None if rest is None else rest.detach())

    return _as_eps_model(guided, model)
