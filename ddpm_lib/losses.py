"""Training losses and the variational bound of a Gaussian diffusion (chapters 4 and 7).

Each function takes a ``GaussianDiffusion`` as its first argument and reads the schedule
only through its methods; ``GaussianDiffusion.training_losses``, ``.prior_bpd`` and
``.nll_bits_per_dim`` delegate here.

Units: ``training_losses`` reports the variational term ``vb`` in NATS, averaged over the
data dimensions (improved-diffusion reports bits: divide by log 2 to compare). The
likelihood functions report bits per dimension, i.e. nats / (D log 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ddpm_lib.checks import check_finite
from ddpm_lib.gaussian import discretized_gaussian_log_likelihood, normal_kl, standard_normal
from ddpm_lib.predictions import PREDICTIONS, VARIANCES, check_choice

if TYPE_CHECKING:
    from ddpm_lib.diffusion import GaussianDiffusion

__all__ = ["LOSSES", "mean_flat", "vb_terms", "training_losses", "prior_bpd", "nll_bits_per_dim", "eps_vlb_weight"]

LOSSES = ("simple", "hybrid", "vlb", "huber")


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]. The squared norm of L_simple
    (Ho et al. 2020, Eq. (14)) and the bound's terms are reported per data dimension, as in the
    reference code (its ``mean_flat``) and as bits/dim are (Ho et al. 2020, §4)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _check_data_range(x0: Tensor, tol: float = 1e-6) -> None:
    # Pitfall 9: the discretised decoder assumes data on a grid in [-1, 1]. One host read per
    # evaluation (not per step), so it runs on every device.
    lo, hi = x0.min().item(), x0.max().item()
    if lo < -1 - tol or hi > 1 + tol:
        raise ValueError(f"data must lie in [-1, 1] (scale images by x / 127.5 - 1); got min {lo:.4g}, max {hi:.4g}")


def _repeat_batch(value: object, k: int, B: int) -> object:
    # [B, ...] -> [k B, ...] (k copies of the batch, one per timestep); anything else as is.
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == B:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value


def vb_terms(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    num_levels: int = 256,
) -> Tensor:
    """One term of the variational bound per example, in nats averaged over dimensions [B]
    (Ho et al. 2020, arXiv 2006.11239, Eq. (5)).

    For t > 0 (0-based), L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Ho et al. 2020,
    Eqs. (5) and (8)); for t = 0, the decoder term L_0 = -log p(x_0 | x_1) under the Gaussian
    discretised to ``num_levels`` values in [-1, 1] (Eq. (13)). ``model_output`` is the raw output of the
    model at (x_t, t), so a caller can detach parts of it first (the hybrid loss does).
    """
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    out = diffusion.p_mean_variance_from_output(
        model_output, x_t, t, variance=variance, prediction=prediction, clip_denoised=clip_denoised
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"], num_levels)
    )
    # At t = 0 the "KL" compares against a posterior of variance 0 and is meaningless.
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def training_losses(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    *,
    loss: str = "simple",
    prediction: str = "eps",
    variance: str = "fixed_small",
    vlb_weight: float = 1e-3,
    huber_delta: float = 1.0,
    num_levels: int = 256,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    return_vb: bool = False,
) -> dict[str, Tensor]:
    r"""Per-example training losses at timesteps ``t`` (Ho et al. 2020, Algorithm 1 and Eq. (14);
    Nichol & Dhariwal 2021, arXiv 2102.09672, §3.1 and Eq. (16)).

    Draws x_t ~ q(x_t | x_0) with ``noise`` (or from ``generator``, on the generator's device and
    moved to x0's; one of the two is required: no hidden global RNG), calls
    ``model(x_t, diffusion.timesteps[t], **model_kwargs)`` and returns tensors [B]:

    * ``"mse"``: mean over dimensions of (target - prediction)^2, the target being the eps,
      x0 or v of the draw (DDPM eq. 14, L_simple, for eps).
    * ``"vb"``: the bound's term L_t in nats per dimension (see :func:`vb_terms`); computed for
      the ``"hybrid"`` and ``"vlb"`` losses, and for ``"simple"`` only if ``return_vb`` (without
      gradient: a diagnostic that would otherwise cost a second pass of arithmetic every step).
    * ``"loss"``: ``"simple"`` -> mse; ``"vlb"`` -> vb alone, unscaled (its expectation over
      uniform t is L_vlb / T, so it is proportional to the bound);
      ``"hybrid"`` -> mse + vlb_weight * T * vb (improved DDPM eq. 16, L_simple + lambda L_vlb
      with T * vb the one-sample estimate of L_vlb, so ``vlb_weight`` is the paper's lambda =
      0.001). In the hybrid loss vb sees the model's prediction channels DETACHED (stop-gradient,
      improved DDPM sec. 3.1): it trains only the variance; with a fixed variance it then
      carries no gradient at all and is only a diagnostic. ``"huber"`` -> the Huber loss of the
      same error, mean over dimensions: e^2 / 2 where |e| <= ``huber_delta``, else
      delta (|e| - delta / 2) (Huber 1964, "Robust estimation of a location parameter"). Its
      minimiser over a posterior is between the mean (small errors) and the median (large
      ones), while L_simple's is the posterior mean (book chapter 7). Also returned as ``"huber"``.

    A ``learned_range`` variance must be trained with ``"hybrid"`` or ``"vlb"``: L_simple
    never sees the variance channels.

    No value of a tensor is read on the host here (``ddpm_lib.checks``): on CUDA a training
    step never waits for the GPU; on the CPU the inputs are checked for NaN/inf.
    """
    check_choice("loss", loss, LOSSES)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("variance", variance, VARIANCES)
    if variance == "learned_range" and loss in ("simple", "huber"):
        raise ValueError(
            "learned_range variance needs loss='hybrid' or 'vlb': the simple and huber losses never train the variance"
        )
    if noise is None:
        if generator is None:
            raise ValueError("training_losses needs noise= or generator= (no hidden global RNG)")
        noise = standard_normal(x0.shape, generator, dtype=x0.dtype, device=x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"shape mismatch: x0 {tuple(x0.shape)} vs noise {tuple(noise.shape)}")
    # On CUDA a non-finite x0 or noise makes the loss non-finite, which the training loop checks,
    # batched, whenever it logs; on the CPU the check is free and gives the clearer error here.
    check_finite("x0", x0)
    check_finite("noise", noise)

    x_t = diffusion.q_sample(x0, t, noise)
    model_t = diffusion.timesteps.to(x0.device)[t.to(x0.device)]
    model_output = model(x_t, model_t, **(model_kwargs or {}))
    pred, var_values = diffusion.split_model_output(model_output, x_t, variance)

    target = {"eps": noise, "x0": x0, "v": diffusion.predict_v(x0, t, noise) if prediction == "v" else None}[prediction]
    mse = mean_flat((target - pred) ** 2)

    def vb_of(output: Tensor) -> Tensor:
        return vb_terms(diffusion, output, x0, x_t, t, prediction=prediction, variance=variance, num_levels=num_levels)

    if loss == "vlb":
        vb = vb_of(model_output)
        total = vb
    elif loss == "hybrid":
        # Stop-gradient on the prediction: the bound trains the variance, L_simple the mean.
        frozen = pred.detach() if var_values is None else torch.cat([pred.detach(), var_values], dim=1)
        vb = vb_of(frozen)
        total = mse + vlb_weight * diffusion.T * vb
    else:
        total = mse
        if loss == "huber":
            if not huber_delta > 0:
                raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
            total = mean_flat(torch.nn.functional.huber_loss(pred, target, reduction="none", delta=huber_delta))
        extra = {"huber": total} if loss == "huber" else {}
        if not return_vb:
            return {"loss": total, "mse": mse, **extra}
        with torch.no_grad():
            vb = vb_of(model_output.detach())
        return {"loss": total, "mse": mse, "vb": vb, **extra}
    return {"loss": total, "mse": mse, "vb": vb}


def prior_bpd(diffusion: GaussianDiffusion, x0: Tensor) -> Tensor:
    """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension [B] (Ho et al. 2020, Eq. (5)).

    It has no parameters; a good schedule makes it ~0 (linear T = 1000: about 3e-5 bits/dim
    for data in [-1, 1]).
    """
    t = torch.full((x0.shape[0],), diffusion.T - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0).expand_as(x0)) / math.log(2.0)


@torch.no_grad()
def nll_bits_per_dim(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    x0: Tensor,
    *,
    num_levels: int = 256,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    batch_t: int | None = None,
) -> dict[str, Tensor]:
    """Variational upper bound on -log p(x_0) in bits per dimension (Ho et al. 2020, Eqs. (3) and (5);
    Nichol & Dhariwal 2021, §3, which report it for every term evaluated).

    total = L_T + sum_{t>=1} L_{t-1} + L_0, every term evaluated (no sampling of t): for each
    step of this chain one x_t ~ q(x_t | x_0) is drawn (noise from ``generator``, step by step
    in increasing t, so the result does not depend on ``batch_t``) and its term computed.

    Args:
        x0: data [B, ...] in [-1, 1] on the ``num_levels`` grid (256 for 8-bit images, 17 for
            the scikit-learn digits).
        batch_t: how many steps to evaluate per model call (the batch becomes batch_t * B);
            tensors in ``model_kwargs`` with leading dimension B are repeated to match.
            Default 1.

    Returns a dict of bits/dim: ``total_bpd`` [B], ``prior_bpd`` [B], ``vb_bpd`` [B, T] whose
    column t is the term L_t of the papers (column 0 the decoder term) and ``decoder_bpd``
    [B] (= column 0). ``total_bpd = prior_bpd + vb_bpd.sum(1)``.
    """
    # One host sync per evaluation (not per training step) is cheap next to T model calls, so the
    # inputs are always checked here.
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or inf")
    _check_data_range(x0)
    B, T = x0.shape[0], diffusion.T
    step = batch_t or 1
    if step < 1:
        raise ValueError(f"batch_t must be >= 1, got {batch_t}")
    to_bits = 1.0 / math.log(2.0)
    vb = torch.zeros(B, T, dtype=x0.dtype, device=x0.device)
    for start in range(0, T, step):
        ts = list(range(start, min(start + step, T)))
        k = len(ts)
        noise = torch.cat([standard_normal(x0.shape, generator, dtype=x0.dtype, device=x0.device) for _ in ts])
        t = torch.tensor(ts, dtype=torch.long, device=x0.device).repeat_interleave(B)
        x0_k = _repeat_batch(x0, k, B)
        kwargs = {key: _repeat_batch(value, k, B) for key, value in (model_kwargs or {}).items()}
        x_t = diffusion.q_sample(x0_k, t, noise)
        out = diffusion.p_mean_variance(
            model, x_t, t, variance=variance, prediction=prediction, clip_denoised=clip_denoised, model_kwargs=kwargs
        )
        terms = vb_terms(
            diffusion, out["model_output"], x0_k, x_t, t,
            prediction=prediction, variance=variance, clip_denoised=clip_denoised, num_levels=num_levels,
        )
        vb[:, start : start + k] = terms.reshape(k, B).T * to_bits
    prior = prior_bpd(diffusion, x0)
    return {"total_bpd": prior + vb.sum(dim=1), "prior_bpd": prior, "vb_bpd": vb, "decoder_bpd": vb[:, 0]}


def eps_vlb_weight(diffusion: GaussianDiffusion, variance: str = "fixed_small") -> Tensor:
    r"""Weight of the eps-error in each KL term of the bound, float64 [T] (Ho et al. 2020, Eq. (12); book chapter 4).

    With a fixed reverse variance sigma_t^2 and an eps-prediction, the KL term of the bound is
    L_{t-1} = lambda_t * ||eps - eps_theta(x_t, t)||^2 + C_t, with

        lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)).

    ``variance`` is ``"fixed_small"`` (sigma_t^2 = beta_tilde_t, the posterior's own variance, so
    C_t = 0 and ``vb_terms`` at index t equals ``lambda[t] * mse`` of ``training_losses``; here
    lambda_t also equals (SNR(t-1) / SNR(t) - 1) / 2) or ``"fixed_large"`` (sigma_t^2 = beta_t,
    C_t = (log(beta_t / beta_tilde_t) + beta_tilde_t / beta_t - 1) / 2, independent of the model).
    sigma_t^2 is read from ``GaussianDiffusion.model_variance``. Index 0 (the papers' t = 1) uses that method's
    stand-in variance (beta_tilde of index 1): the bound's term there is the decoder L_0, not a
    KL, so the value at index 0 is not a term of the bound. L_simple drops lambda_t.
    """
    check_choice("variance", variance, ("fixed_small", "fixed_large"))
    t = torch.arange(diffusion.T, device=diffusion.betas.device)
    # the betas serve as a float64 [T] tensor of the right shape for the coefficients read at t
    sigma2, _ = diffusion.model_variance(t, diffusion.betas, variance)
    return diffusion.betas**2 / (2 * sigma2 * diffusion.alphas * (1.0 - diffusion.alphas_cumprod))
