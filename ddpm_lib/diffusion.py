"""The Gaussian diffusion process: forward marginals, reverse posterior, model outputs.

Chapters 2-4 and 7 derive every formula here. ``GaussianDiffusion`` holds the schedule in
float64 and the formulas that read it; the losses and the likelihood bound live in
``ddpm_lib.losses`` and are reachable as thin methods here. Samplers live in
``ddpm_lib.samplers`` and only call the methods below.

Conventions
-----------
* ``t`` is always a LongTensor [B] of 0-based indices into THIS chain: index t is the
  papers' step t + 1 (t = 0 is the first noising step, x_0 is the data).
* A model is called as ``model(x_t, model_t, **model_kwargs)`` where ``model_t`` holds
  ORIGINAL-schedule timesteps (``self.timesteps[t]``), so a respaced chain feeds the model
  the timesteps it was trained on (pitfall 10).
* Data live in [-1, 1].
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lib import losses
from ddpm_lib.checks import check_timesteps
from ddpm_lib.gaussian import standard_normal
from ddpm_lib.predictions import (
    PREDICTIONS, VARIANCES, check_choice, compute_dtype, eps_from_x0, eps_x0_from_prediction, resolve_prediction,
    resolve_variance, split_output, v_from_eps_x0, x0_from_eps,
)
from ddpm_lib.schedules import check_betas, get_betas, respace_betas

__all__ = ["extract", "alpha_bar_at", "GaussianDiffusion", "VARIANCES", "PREDICTIONS"]


def extract(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """``a[t]`` on x's device, shaped [B, 1, ..., 1] to broadcast against x: reads the per-timestep
    coefficients (sqrt(alpha_bar_t), beta-tilde_t, ...) of Ho et al. 2020, Eqs. (4)-(7), at a batch
    of timesteps.

    The one indexing helper (STYLE 5): schedules stay float64 until the moment of use, and are
    cast to float32 or better (``predictions.compute_dtype``), never to a half type: in bfloat16
    sqrt(alpha_bar) = 0.99995 is 1.0. It checks nothing (it runs inside loops, where a check of
    values would wait for the GPU); the public entry points check ``t`` once
    (``checks.check_timesteps``).
    """
    out = a.to(x.device)[t.to(x.device)].to(compute_dtype(x))
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def alpha_bar_at(diffusion, t: Tensor) -> Tensor:
    r""":math:`\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)` (Ho et al. 2020, Eq. (4)) at ORIGINAL
    timesteps ``t`` (LongTensor [B]), float64 [B] on the schedule's device.

    ``diffusion`` is a ``GaussianDiffusion`` or a 1-D tensor of :math:`\bar\alpha_t`. A respaced
    chain knows only its kept timesteps (``diffusion.timesteps``): asking for one it skipped
    is an error where the check is free (on the host), not a silent look-up of the wrong index
    (pitfall 10). Guidance wrappers and the analytic oracle read :math:`\bar\alpha` through this.
    """
    if isinstance(diffusion, Tensor):
        alphas_cumprod, timesteps = diffusion, None
    else:
        alphas_cumprod, timesteps = diffusion.alphas_cumprod, diffusion.timesteps
    t = torch.as_tensor(t).to(device=alphas_cumprod.device, dtype=torch.long).reshape(-1)
    index = t
    if timesteps is None:
        check_timesteps(t, len(alphas_cumprod))
    else:
        timesteps = timesteps.to(alphas_cumprod.device)
        index = torch.searchsorted(timesteps, t).clamp(max=len(timesteps) - 1)
        if t.device.type == "cpu" and not torch.equal(timesteps[index], t):
            raise ValueError(f"timesteps {t.tolist()} are not all kept timesteps of this chain")
    return alphas_cumprod[index].to(torch.float64)


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)}")


class GaussianDiffusion:
    """A discrete Gaussian diffusion chain (DDPM, Ho et al. 2020, arXiv 2006.11239, Eqs. (1)-(7)),
    float64 schedule.

    Args:
        betas: 1-D schedule [T] in (0, 1) (the last may be 1: zero terminal SNR).
        timesteps: LongTensor [T], the ORIGINAL-schedule timestep each index of this chain
            stands for; ``arange(T)`` by default, ``kept`` for a chain made by ``respace``.

    All tensors are float64 on betas' device; ``.to(device)`` returns a moved copy.
    """

    def __init__(self, betas: Tensor, *, timesteps: Tensor | Sequence[int] | None = None):
        betas = check_betas(betas)
        self.T = betas.shape[0]
        device = betas.device
        if timesteps is None:
            timesteps = torch.arange(self.T, device=device)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long, device=device).reshape(-1)
        if self.timesteps.shape[0] != self.T:
            raise ValueError(f"timesteps must have length T = {self.T}, got {self.timesteps.shape[0]}")
        if self.T > 1 and not bool((self.timesteps[1:] > self.timesteps[:-1]).all()):
            # alpha_bar_at and the samplers find a timestep by binary search: order is required
            raise ValueError(f"timesteps must be strictly increasing, got {self.timesteps.tolist()}")

        # The forward chain q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)  (DDPM eq. 2).
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_{t-1}: 1 before the first step; alpha_bar_{t+1}: 0 after the last.
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], betas.new_zeros(1)])

        # The marginal q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (DDPM eq. 4).
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

        # The posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I)  (DDPM eq. 6-7).
        one_minus_ab = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ab
        # beta_tilde at index 0 is exactly 0 (x_0 is known), so log would be -inf: use
        # beta_tilde at index 1 in its place, as the reference code does (pitfall 5). A 1-step
        # chain has no index 1; there the step's own beta stands in.
        first = self.posterior_variance[1:2] if self.T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = self.alphas_cumprod_prev.sqrt() * betas / one_minus_ab
        self.posterior_mean_coef2 = self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / one_minus_ab

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, T: int = 1000, **kwargs) -> "GaussianDiffusion":
        """Chain with a named schedule: ``"linear"`` (Ho et al. 2020, §4) or ``"cosine"`` (Nichol &
        Dhariwal 2021, Eq. (17)); see ``schedules.get_betas``."""
        return cls(get_betas(name, T, **kwargs))

    @property
    def num_timesteps(self) -> int:
        """Number of steps T of this chain (alias of ``T``; the T of Ho et al. 2020, Eq. (2))."""
        return self.T

    def respace(self, kept: Sequence[int] | Tensor) -> "GaussianDiffusion":
        """The shorter chain through the steps ``kept`` (indices into THIS chain, strictly
        increasing, e.g. from ``schedules.space_timesteps``), with betas recomputed by
        ``respace_betas`` so its marginals at the kept steps are unchanged: Nichol & Dhariwal
        2021, arXiv 2102.09672, §4, beta_{S_t} = 1 - alpha_bar_{S_t} / alpha_bar_{S_{t-1}} (an
        in-text formula, no equation number). Its ``timesteps`` are the ORIGINAL timesteps of
        the kept steps, which the model receives (pitfall 10).
        """
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.betas.device).reshape(-1)
        return GaussianDiffusion(respace_betas(self.betas, kept), timesteps=self.timesteps[kept])

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        """A copy with every tensor on ``device`` (self is not modified); the schedule of Ho et al.
        2020, Eqs. (2)-(7), unchanged, in float64."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device))
        return moved

    def __repr__(self) -> str:
        return f"GaussianDiffusion(T={self.T}, device={self.betas.device})"

    # --- forward process: q(x_t | x_0) and q(x_{t-1} | x_t, x_0) -----------------------

    def check_t(self, t: object, x: Tensor) -> Tensor:
        """``t`` checked against this chain and the batch of ``x`` (``checks.check_timesteps``):
        what every public method below does once, and no loop does."""
        return check_timesteps(t, self.T, x.shape[0])

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020, Eq. (4)); each broadcastable to x0."""
        self.check_t(t, x0)
        mean = self.sqrt_ab(t, x0)[0] * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0)
        log_variance = extract((1.0 - self.alphas_cumprod).log(), t, x0)
        return mean, variance, log_variance

    def q_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, Eq. (4)),
        computed in float32 or better and returned in x0's dtype.

        Pass the noise eps (same shape as x0) or a ``generator`` to draw it from; the draw is
        made on the generator's device and moved to x0's, so a CPU generator works with CUDA data.
        """
        self.check_t(t, x0)
        if noise is None:
            if generator is None:
                raise ValueError("q_sample needs noise= or generator= (no hidden global RNG)")
            noise = standard_normal(x0.shape, generator, dtype=x0.dtype, device=x0.device)
        _check_same_shape("x0", x0, "noise", noise)
        sqrt_ab, sqrt_1m_ab = self.sqrt_ab(t, x0)
        return (sqrt_ab * x0 + sqrt_1m_ab * noise).to(x0.dtype)

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0): coef1 x_0 + coef2 x_t (Ho et al. 2020, Eq. (7)).
        ValueError if x0 and x_t differ in shape."""
        _check_same_shape("x0", x0, "x_t", x_t)
        self.check_t(t, x_t)
        return extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance beta_tilde_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020,
        Eqs. (6)-(7)). ValueError ("shape mismatch") if x0 and x_t differ in shape.

        At t = 0 the variance is 0 and the log-variance is log beta_tilde of index 1 (pitfall 5).
        """
        mean = self.q_posterior_mean(x0, x_t, t)
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    # --- conversions between eps, x0 and v (ddpm_lib.predictions, at this chain's t) ---

    def sqrt_ab(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each [B, 1, ..., 1] in float32 or better: the
        signal and noise scales of q(x_t | x_0) (Ho et al. 2020, Eq. (4)) that every conversion reads."""
        return extract(self.sqrt_alphas_cumprod, t, x), extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Ho et al. 2020, Eq. (15))."""
        return x0_from_eps(x_t, eps, *self.sqrt_ab(t, x_t))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps_hat = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t): Ho et al. 2020, Eq. (4) solved
        for eps (the eps of an x0-predicting model); finite even at alpha_bar = 0."""
        return eps_from_x0(x_t, x0, *self.sqrt_ab(t, x_t))

    def predict_v(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0: the v-prediction target
        v = alpha_t eps - sigma_t x of Salimans & Ho 2022 (arXiv 2202.00512, §4), with
        alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)."""
        return v_from_eps_x0(eps, x0, *self.sqrt_ab(t, x0))

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0_hat = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v  (Salimans & Ho 2022, Appendix D)."""
        return self.pred_x0_eps(v, x_t, t, "v")[0]

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps_hat = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v (Salimans & Ho 2022, §4 and
        Appendix D); finite at alpha_bar = 0 (zero terminal SNR)."""
        return self.pred_x0_eps(v, x_t, t, "v")[1]

    def pred_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from a model's prediction of eps, x0 or v at this chain's ``t``, through
        ``predictions.eps_x0_from_prediction`` (the package's one conversion)."""
        eps, x0 = eps_x0_from_prediction(pred, x_t, *self.sqrt_ab(t, x_t), prediction)
        return x0, eps

    # --- the reverse model p(x_{t-1} | x_t) ---------------------------------------------

    def split_model_output(self, model_output: Tensor, x_t: Tensor, variance: str) -> tuple[Tensor, Tensor | None]:
        """(prediction, variance values or None): ``predictions.split_output`` with this variance
        (a ``learned_range`` model outputs 2C channels, Nichol & Dhariwal 2021, Eq. (15))."""
        check_choice("variance", variance, VARIANCES)
        if variance != "learned_range":
            _check_same_shape("model output", model_output, "x_t", x_t)
        return split_output(model_output, x_t, variance)

    def model_variance(
        self, t: Tensor, x_t: Tensor, variance: str, var_values: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Variance and log-variance of p(x_{t-1} | x_t) (Ho et al. 2020, Eq. (1), Sigma_theta = sigma_t^2 I,
        §3.2; Nichol & Dhariwal 2021, Eq. (15)), broadcastable to x_t.

        * ``fixed_small``: beta_tilde_t, log clipped at index 0 (DDPM sec. 3.2, lower bound).
        * ``fixed_large``: beta_t, except beta_tilde of index 1 at index 0, as the reference
          code does, so the decoder term is not dominated by the tiny beta_1 (DDPM upper bound).
        * ``learned_range``: exp(frac log beta_t + (1 - frac) log beta_tilde_t), frac = (v + 1) / 2
          (improved DDPM eq. 15). v is not clamped, as in the reference code.
        """
        check_choice("variance", variance, VARIANCES)
        if variance == "fixed_small":
            log_var = extract(self.posterior_log_variance_clipped, t, x_t)
            return extract(self.posterior_variance, t, x_t), log_var
        if variance == "fixed_large":
            large = torch.cat([self.posterior_variance[1:2] if self.T > 1 else self.betas[:1], self.betas[1:]])
            return extract(large, t, x_t), extract(large.log(), t, x_t)
        if var_values is None:
            raise ValueError("learned_range needs the model's variance values")
        frac = (var_values.to(compute_dtype(x_t)) + 1) / 2
        log_beta = extract(self.betas.log(), t, x_t)
        log_beta_tilde = extract(self.posterior_log_variance_clipped, t, x_t)
        log_var = frac * log_beta + (1 - frac) * log_beta_tilde
        return log_var.exp(), log_var

    def p_mean_variance_from_output(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        *,
        variance: str = "fixed_small",
        prediction: str = "eps",
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """``p_mean_variance`` for a model output already computed (Ho et al. 2020, Eq. (11) in its
        x0 form, the mean of Eq. (7) with x0_hat; see there). Computed in float32 or better."""
        x_t = x_t.to(compute_dtype(x_t))
        pred, var_values = self.split_model_output(model_output.to(x_t.dtype), x_t, variance)
        var, log_var = self.model_variance(t, x_t, variance, var_values)
        # 1. eps and x0 from the model's prediction; optionally x0 clipped and eps re-derived (pitfall 3)
        eps_hat, x0_hat = eps_x0_from_prediction(pred, x_t, *self.sqrt_ab(t, x_t), prediction, clip_denoised)
        # 2. the mean of p is the posterior mean with x0 replaced by its prediction (DDPM eq. 11)
        mean = self.q_posterior_mean(x0_hat, x_t, t)
        return {
            "mean": mean,
            "variance": var.expand_as(x_t) if var.shape != x_t.shape else var,
            "log_variance": log_var.expand_as(x_t) if log_var.shape != x_t.shape else log_var,
            "pred_x0": x0_hat,
            "pred_eps": eps_hat,
            "model_output": model_output,
        }

    def p_mean_variance(
        self,
        model: Callable[..., Tensor],
        x_t: Tensor,
        t: Tensor,
        *,
        model_t: Tensor | None = None,
        variance: str | None = None,
        prediction: str | None = None,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Mean and variance of the reverse step p(x_{t-1} | x_t) (Ho et al. 2020, Eqs. (1), (11);
        Nichol & Dhariwal 2021, Eq. (15)).

        Calls ``model(x_t, model_t, **model_kwargs)``. ``model_t`` defaults to
        ``self.timesteps[t]``: the ORIGINAL timesteps, so on a respaced chain the model
        still sees the timesteps it was trained with, not the indices ``t`` of this chain.

        Args:
            x_t: [B, C, ...]; t: LongTensor [B] of indices into this chain.
            variance: ``"fixed_small"`` | ``"fixed_large"`` | ``"learned_range"``; None reads
                ``model.variance`` (``predictions.resolve_variance``), else fixed_small.
            prediction: what the model predicts, ``"eps"`` | ``"x0"`` | ``"v"``; None reads
                ``model.prediction``, else eps.
            clip_denoised: clamp x0_hat to [-1, 1] and re-derive eps_hat from it (pitfall 3).

        Returns a dict with ``mean``, ``variance``, ``log_variance`` (all shaped like x_t, float32
        or better), ``pred_x0``, ``pred_eps`` and the raw ``model_output``.
        """
        variance, prediction = resolve_variance(model, variance), resolve_prediction(model, prediction)
        self.check_t(t, x_t)
        if model_t is None:
            model_t = self.timesteps.to(x_t.device)[t.to(x_t.device)]
        model_output = model(x_t, model_t, **(model_kwargs or {}))
        return self.p_mean_variance_from_output(
            model_output, x_t, t, variance=variance, prediction=prediction, clip_denoised=clip_denoised
        )

    # --- losses and likelihood (ddpm_lib.losses) ---------------------------------------

    def training_losses(self, model, x0, t, noise=None, **kwargs) -> dict[str, Tensor]:
        """Per-example training losses (Ho et al. 2020, Algorithm 1 and Eq. (14); Nichol & Dhariwal
        2021, Eq. (16)); see ``ddpm_lib.losses.training_losses``."""
        return losses.training_losses(self, model, x0, t, noise, **kwargs)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) (Ho et al. 2020, Eq. (5)) in bits per dimension [B]; see
        ``ddpm_lib.losses.prior_bpd``."""
        return losses.prior_bpd(self, x0)

    def nll_bits_per_dim(self, model, x0, **kwargs) -> dict[str, Tensor]:
        """Variational bound on -log p(x_0) (Ho et al. 2020, Eqs. (3), (5)) in bits/dim; see
        ``ddpm_lib.losses.nll_bits_per_dim``."""
        return losses.nll_bits_per_dim(self, model, x0, **kwargs)
