r"""The exact denoiser of a Gaussian mixture: the book's "perfect model" (chapters 5, 9, 10).

For data :math:`x_0 \sim \sum_k w_k\,\mathcal N(\mu_k, \Sigma_k)` the forward process
:math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon` (Ho et al. 2020,
eq. 4) keeps a mixture at every t, with the same weights and

.. math::
    x_t \sim \sum_k w_k\,\mathcal N\bigl(\sqrt{\bar\alpha_t}\,\mu_k,\;
    C_k(t) = \bar\alpha_t \Sigma_k + (1-\bar\alpha_t) I\bigr).

Everything a diffusion model is trained to approximate then has a closed form:

* the score :math:`\nabla\log p_t(x) = -\sum_k r_k(x)\, C_k^{-1}(x - \sqrt{\bar\alpha_t}\mu_k)` with
  responsibilities :math:`r_k(x) = p(y = k \mid x_t = x) \propto w_k \mathcal N(x; \sqrt{\bar\alpha_t}\mu_k, C_k)`
  (Bayes' rule; this is also the exact noisy classifier of chapter 10);
* the optimal noise prediction :math:`\mathbb E[\varepsilon \mid x_t] = -\sqrt{1-\bar\alpha_t}\,\nabla\log p_t(x_t)`
  (book chapter 9; stated in Dhariwal & Nichol 2021, arXiv 2105.05233, §4.2, and the basis of
  score-based modelling, Song et al. 2021, arXiv 2011.13456);
* the posterior mean by Tweedie's formula,
  :math:`\mathbb E[x_0 \mid x_t] = \bigl(x_t + (1-\bar\alpha_t)\nabla\log p_t(x_t)\bigr)/\sqrt{\bar\alpha_t}`,
  which equals :math:`\sum_k r_k\bigl(\mu_k + \sqrt{\bar\alpha_t}\Sigma_k C_k^{-1}(x_t - \sqrt{\bar\alpha_t}\mu_k)\bigr)`,
  the responsibility-weighted Gaussian conditionals. Hence
  :math:`\mathbb E[\varepsilon\mid x_t] = (x_t - \sqrt{\bar\alpha_t}\,\mathbb E[x_0\mid x_t])/\sqrt{1-\bar\alpha_t}`.

Per component the algebra collapses because
:math:`I - \bar\alpha_t \Sigma_k C_k^{-1} = (1-\bar\alpha_t) C_k^{-1}`: the conditional noise is
:math:`\varepsilon_k = \sqrt{1-\bar\alpha_t}\,C_k^{-1}(x_t - \sqrt{\bar\alpha_t}\mu_k)`, which is what
the code evaluates (one Cholesky factor per component, no division by :math:`\sqrt{\bar\alpha_t}`).

Timesteps follow the package convention: ``t`` is a LongTensor [B] of ORIGINAL-schedule
timesteps, 0-based, and ``diffusion`` is a ``GaussianDiffusion`` (or a plain 1-D tensor of
:math:`\bar\alpha_t`). All arithmetic is float64; results come back in the input's dtype and
device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ddpm_lib.diffusion import alpha_bar_at  # abar at ORIGINAL timesteps, shared with guidance
from ddpm_lib.predictions import PREDICTIONS, check_choice, v_from_eps_x0, x0_from_eps

__all__ = ["GaussianMixture"]


class GaussianMixture:
    r"""A Gaussian mixture :math:`\sum_k w_k \mathcal N(\mu_k, \Sigma_k)` in :math:`\mathbb R^D` (Bishop 2006,
    §2.3.9), with its exact diffused densities (through Ho et al. 2020, Eq. (4)), scores, noise
    predictions and noisy classifier.

    Args:
        means: [K, D] component means.
        stds_or_covs: [K] isotropic standard deviations, [K, D] diagonal standard deviations,
            or [K, D, D] full (symmetric positive-definite) covariance matrices.
        weights: [K] positive mixing weights (normalised here).

    Inputs ``x`` of the methods are [N, D] or [N, *dims] with prod(dims) = D (flattened inside).
    """

    def __init__(self, means, stds_or_covs, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64).cpu()
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        K, D = self.means.shape
        s = torch.as_tensor(stds_or_covs, dtype=torch.float64).cpu()
        eye = torch.eye(D, dtype=torch.float64)
        if s.shape == (K,):
            covs = s[:, None, None] ** 2 * eye
        elif s.shape == (K, D):
            covs = torch.diag_embed(s**2)
        elif s.shape == (K, D, D):
            covs = s
        else:
            raise ValueError(f"stds_or_covs must be [K], [K, D] or [K, D, D] with K={K}, D={D}; got {tuple(s.shape)}")
        if not torch.allclose(covs, covs.mT):
            raise ValueError("covariance matrices must be symmetric")
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        if w.shape != (K,) or (w <= 0).any():
            raise ValueError(f"weights must be {K} positive numbers, got {w.tolist()}")
        self.covs = covs
        self.weights = w / w.sum()
        self.scale_tril = torch.linalg.cholesky(covs)  # raises if a covariance is not positive-definite

    @property
    def num_components(self) -> int:
        r"""K, the number of components of :math:`\sum_{k=1}^K w_k\,\mathcal N(\mu_k, \Sigma_k)` (the mixture
        of Gaussians, Bishop 2006, "Pattern Recognition and Machine Learning", §2.3.9)."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        r"""D, the dimension of the data space :math:`\mathbb R^D` of the mixture (Bishop 2006, §2.3.9)."""
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        r"""``n`` samples, float64 [n, D] on the CPU (and their component labels [n] if asked), by
        ancestral sampling of the latent label: :math:`k \sim \mathrm{Cat}(w)`, then
        :math:`x = \mu_k + L_k z` with :math:`L_k L_k^\top = \Sigma_k`, :math:`z \sim \mathcal N(0, I)`
        (ancestral sampling, Bishop 2006, §8.1.2 and §9.2; no single equation)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + (self.scale_tril[labels] @ z[..., None])[..., 0]
        return (x, labels) if return_labels else x

    def noised(self, alpha_bar: float) -> "GaussianMixture":
        r"""The marginal of :math:`x_t` for :math:`\bar\alpha_t` = ``alpha_bar``: each component pushed
        through q(x_t | x_0) of Ho et al. 2020, Eq. (4), giving
        :math:`\sum_k w_k\,\mathcal N(\sqrt{\bar\alpha_t}\mu_k, \bar\alpha_t\Sigma_k + (1-\bar\alpha_t)I)` (book eq. ``q-xt-x0``)."""
        a = float(alpha_bar)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(math.sqrt(a) * self.means, a * self.covs + (1 - a) * eye, self.weights)

    # -- densities --------------------------------------------------------------------------

    def component_log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log \mathcal N(x; \mu_k, \Sigma_k)` for every component, [N, K] (weights not included;
        the multivariate Gaussian density, Bishop 2006, Eq. (2.43))."""
        x64 = self._flat(x)
        logp, _ = _gaussian_terms(x64, self.means.to(x64.device), self.scale_tril.to(x64.device))
        return logp.to(x.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log p(x) = \operatorname{logsumexp}_k (\log w_k + \log\mathcal N(x;\mu_k,\Sigma_k))`, [N]:
        the log of the mixture density :math:`\sum_k w_k\,\mathcal N(x; \mu_k, \Sigma_k)` (Bishop 2006,
        §2.3.9), summed stably in log space."""
        x64 = self._flat(x)
        logp, _ = _gaussian_terms(x64, self.means.to(x64.device), self.scale_tril.to(x64.device))
        return torch.logsumexp(logp + self.weights.to(x64.device).log(), dim=-1).to(x.dtype)

    # -- the diffused mixture at timestep t ---------------------------------------------------

    def score(self, x_t: Tensor, t: Tensor, diffusion) -> Tensor:
        r""":math:`\nabla_{x_t}\log p_t(x_t) = \sum_k r_k(x_t)\,s_k(x_t)`, shaped like ``x_t``: the exact score
        of the diffused mixture (:meth:`noised`), the responsibility-weighted component scores
        :math:`s_k = -C_k^{-1}(x_t - \sqrt{\bar\alpha_t}\mu_k)`. It is what a trained eps-model estimates,
        :math:`\nabla\log p_t = -\varepsilon/\sqrt{1-\bar\alpha_t}` (Dhariwal & Nichol 2021, arXiv
        2105.05233, §4.2; derived in the module docstring)."""
        log_joint, scores, _ = self._noisy_terms(x_t, t, diffusion)
        score = (log_joint.softmax(-1)[..., None] * scores).sum(1)
        return score.reshape(x_t.shape).to(x_t.dtype)

    def class_posterior(self, x_t: Tensor, t: Tensor, diffusion) -> Tensor:
        r"""The exact noisy classifier :math:`\log p(y = k \mid x_t)`, [B, K] (Bayes' rule on
        :math:`w_k\,\mathcal N(x_t; \sqrt{\bar\alpha_t}\mu_k, C_k)`, the responsibilities of Bishop 2006,
        §9.2, of the noised mixture; rows logsumexp to 0). It is the :math:`p_\phi(y \mid x_t)`
        that classifier guidance trains a network for (Dhariwal & Nichol 2021, §4, Eq. (14))."""
        log_joint, _, _ = self._noisy_terms(x_t, t, diffusion)
        return log_joint.log_softmax(-1).to(x_t.dtype)

    def classifier(self, diffusion) -> Callable[[Tensor, Tensor], Tensor]:
        """``classifier(x_t, t) -> logits [B, K]`` for classifier guidance (Dhariwal & Nichol 2021,
        Eq. (14)): the log-posterior itself, so its log-softmax is :meth:`class_posterior`.
        Differentiable in ``x_t``."""

        def classifier(x_t: Tensor, t: Tensor) -> Tensor:
            return self.class_posterior(x_t, t, diffusion)

        return classifier

    def posterior_mean(self, x_t: Tensor, t: Tensor, diffusion) -> Tensor:
        r""":math:`\mathbb E[x_0 \mid x_t] = (x_t - \sqrt{1-\bar\alpha_t}\,\mathbb E[\varepsilon \mid x_t])/\sqrt{\bar\alpha_t}`:
        Tweedie's formula (Efron 2011, "Tweedie's formula and selection bias", JASA; see the
        module docstring), the exact version of Ho et al. 2020, Eq. (15)."""
        a = alpha_bar_at(diffusion, t).to(x_t.device)
        a = a.reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = self.eps_model(diffusion)(x_t.to(torch.float64), t)
        return x0_from_eps(x_t.to(torch.float64), eps, a.sqrt(), (1 - a).sqrt()).to(x_t.dtype)

    def denoiser(self, diffusion, prediction: str = "eps") -> Callable[..., Tensor]:
        r"""The exact model ``model(x_t, t, y=None)`` predicting ``prediction`` (eps, x0 or v, Salimans
        & Ho 2022, §4), with ``model.prediction`` set: :meth:`eps_model` for eps, Tweedie's
        :math:`\mathbb E[x_0 \mid x_t]` for x0, and :math:`\sqrt{\bar\alpha}\,\mathbb E[\varepsilon]
        - \sqrt{1-\bar\alpha}\,\mathbb E[x_0]` for v. The three are the same denoiser: every sampler
        must give the same samples from each (the test of ``ddpm_lib.predictions``)."""
        check_choice("prediction", prediction, PREDICTIONS)
        eps_model = self.eps_model(diffusion)

        def model(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
            eps = eps_model(x_t, t, y).to(torch.float64)
            if prediction == "eps":
                return eps.to(x_t.dtype)
            a = alpha_bar_at(diffusion, t).to(x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
            sqrt_ab, sqrt_1m_ab = a.sqrt(), (1 - a).sqrt()
            x0 = x0_from_eps(x_t.to(torch.float64), eps, sqrt_ab, sqrt_1m_ab)
            out = x0 if prediction == "x0" else v_from_eps_x0(eps, x0, sqrt_ab, sqrt_1m_ab)
            return out.to(x_t.dtype)

        model.prediction = prediction
        return model

    def eps_model(self, diffusion) -> Callable[..., Tensor]:
        r"""The exact noise predictor ``model(x_t, t, y=None)`` :math:`= \mathbb E[\varepsilon \mid x_t]`.

        ``t`` is a LongTensor [B] of ORIGINAL timesteps of ``diffusion``. With ``y`` (LongTensor
        [B] of component labels) it returns the conditional
        :math:`\mathbb E[\varepsilon \mid x_t, y] = \sqrt{1-\bar\alpha_t}\,C_y^{-1}(x_t - \sqrt{\bar\alpha_t}\mu_y)`
        of component ``y`` alone. This is the minimiser of the DDPM loss (Ho et al. 2020, eq. 14),
        the "perfect denoiser" of chapter 5; an eps-model in the sense of Ho et al. 2020, Eq. (11).
        """

        def model(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
            log_joint, scores, sqrt_one_minus_a = self._noisy_terms(x_t, t, diffusion)
            if y is None:
                score = (log_joint.softmax(-1)[..., None] * scores).sum(1)
            else:
                y = torch.as_tensor(y, device=scores.device).reshape(-1).expand(scores.shape[0])
                score = scores[torch.arange(scores.shape[0], device=scores.device), y]
            return (-sqrt_one_minus_a[:, None] * score).reshape(x_t.shape).to(x_t.dtype)

        return model

    # -- internals -----------------------------------------------------------------------------

    def _flat(self, x: Tensor) -> Tensor:
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.dim:
            raise ValueError(f"inputs have {x64.shape[1]} features, the mixture has D={self.dim}")
        return x64

    def _noisy_terms(self, x_t: Tensor, t: Tensor, diffusion) -> tuple[Tensor, Tensor, Tensor]:
        r"""For the mixture at each sample's timestep: log joint :math:`\log w_k + \log\mathcal N_k`
        [B, K], component scores :math:`-C_k^{-1}(x_t - \sqrt{\bar\alpha_t}\mu_k)` [B, K, D], and
        :math:`\sqrt{1-\bar\alpha_t}` [B]. Computed once per distinct timestep in the batch."""
        x64 = self._flat(x_t)
        dev, B = x64.device, x64.shape[0]
        t = torch.as_tensor(t, device=dev).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        if t.shape != (B,):
            raise ValueError(f"t must hold one timestep per sample ({B}), got {t.numel()}")
        # samplers pass one timestep for the whole batch: then there is a single group
        groups = [(None, t[:1])] if bool((t == t[0]).all()) else [(t == v, v.reshape(1)) for v in t.unique()]
        log_joint = x64.new_empty(B, self.num_components)
        scores = x64.new_empty(B, self.num_components, self.dim)
        sqrt_one_minus_a = x64.new_empty(B)
        means, covs, log_w = self.means.to(dev), self.covs.to(dev), self.weights.to(dev).log()
        eye = torch.eye(self.dim, dtype=torch.float64, device=dev)
        for rows, t_value in groups:
            a = alpha_bar_at(diffusion, t_value).to(dev)[0]
            scale_tril = torch.linalg.cholesky(a * covs + (1 - a) * eye)
            if rows is None:
                logp, scores = _gaussian_terms(x64, a.sqrt() * means, scale_tril)
                log_joint, sqrt_one_minus_a = logp + log_w, (1 - a).sqrt().expand(B)
            else:
                logp, scores[rows] = _gaussian_terms(x64[rows], a.sqrt() * means, scale_tril)
                log_joint[rows], sqrt_one_minus_a[rows] = logp + log_w, (1 - a).sqrt()
        return log_joint, scores, sqrt_one_minus_a


def _gaussian_terms(x: Tensor, means: Tensor, scale_tril: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\log\mathcal N(x; m_k, LL^\top)` [N, K] and the scores :math:`-(LL^\top)^{-1}(x - m_k)` [N, K, D]."""
    D = means.shape[1]
    eye = torch.eye(D, dtype=x.dtype, device=x.device).expand_as(scale_tril)
    inv_tril = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L^{-1}, [K, D, D]
    z = torch.einsum("kij,nkj->nki", inv_tril, x[:, None, :] - means)  # whitened residuals
    log_det = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_prob = -0.5 * ((z**2).sum(-1) + log_det + D * math.log(2 * math.pi))
    score = -torch.einsum("kji,nkj->nki", inv_tril, z)  # -L^{-T} L^{-1} (x - m)
    return log_prob, score
