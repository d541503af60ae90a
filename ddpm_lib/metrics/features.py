r"""Image metrics: distances in a classifier's feature space, class accuracy, memorisation.

The features are those of the project's OWN small classifier (its ``features(x)`` method,
[N, F]), trained on the same data; they are not Inception features, so the Frechet distance
here is "a Frechet distance in our classifier's feature space", comparable only with
numbers computed with the same classifier weights, never with published FID values.

Feature statistics are computed in float64. Randomness (KID subsets) comes only from
``generator=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

__all__ = [
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "trace_sqrt_product",
    "polynomial_mmd2",
    "kid",
    "classifier_accuracy",
    "memorization_ratio",
    "diversity",
    "MEMORIZATION_THRESHOLD",
]

# Yoon et al. (2023) and Gu et al. (2023): a sample is memorised when d1 / d2 < 1/3.
MEMORIZATION_THRESHOLD = 1.0 / 3.0


def _as_features(name: str, f: Tensor) -> Tensor:
    f = torch.as_tensor(f)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be [N, F] with N >= 2, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} has non-finite entries")
    return f.to(torch.float64)


@contextlib.contextmanager
def _eval_mode(module) -> Iterator[None]:
    """Run an ``nn.Module`` in eval mode and restore its previous mode afterwards (no side effect)."""
    was_training = getattr(module, "training", None)
    if was_training:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def _batches(images: Tensor | Iterable, batch_size: int) -> Iterator[Tensor]:
    """Batches of a tensor [N, ...], or the items of an iterable (a tuple item gives its first entry)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def extract_features(feature_fn: Callable[[Tensor], Tensor], images: Tensor | Iterable, *, batch_size: int = 256,
                     device: torch.device | str | None = None) -> Tensor:
    """``feature_fn`` applied batch by batch, features flattened to [N, F] and gathered on the CPU.

    ``images`` is a tensor [N, C, H, W] (split into ``batch_size`` batches) or an iterable of
    batches, e.g. a DataLoader (a ``(x, y)`` item uses x). Each batch is moved to ``device``
    (default: left where it is). If ``feature_fn`` is a bound method of an ``nn.Module`` (e.g.
    ``classifier.features``), the module runs in eval mode and its mode is then restored.
    """
    owner = getattr(feature_fn, "__self__", feature_fn)
    chunks = []
    with _eval_mode(owner):
        for batch in _batches(images, batch_size):
            if device is not None:
                batch = batch.to(device)
            chunks.append(feature_fn(batch).reshape(batch.shape[0], -1).cpu())
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)


# --- Frechet distance in feature space ----------------------------------------------------


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [F] and covariance [F, F] (ddof = 1, as ``numpy.cov``) of features [N, F], float64."""
    f = _as_features("features", features)
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sym_sqrt(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative round-off eigenvalues -> 0)."""
    eigvals, eigvecs = torch.linalg.eigh((a + a.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def trace_sqrt_product(cov_a: Tensor, cov_b: Tensor) -> Tensor:
    r""":math:`\mathrm{Tr}\,(\Sigma_a \Sigma_b)^{1/2}` for symmetric PSD matrices, stably, float64.

    :math:`\Sigma_a \Sigma_b` is not symmetric, but it is similar to the symmetric PSD matrix
    :math:`M = \Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}` (conjugate by :math:`\Sigma_a^{1/2}`), so
    both have the same non-negative eigenvalues and :math:`\mathrm{Tr}(\Sigma_a\Sigma_b)^{1/2} =
    \sum_i \sqrt{\lambda_i(M)}`. Two symmetric eigendecompositions replace ``scipy.linalg.sqrtm``
    of a non-symmetric product, and no imaginary part can appear.
    """
    sqrt_a = _sym_sqrt(cov_a.to(torch.float64))
    m = sqrt_a @ cov_b.to(torch.float64) @ sqrt_a
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    r"""Frechet (2-Wasserstein) distance squared between N(mu_a, cov_a) and N(mu_b, cov_b).

    :math:`d^2 = |\mu_a - \mu_b|^2 + \mathrm{Tr}(\Sigma_a + \Sigma_b - 2(\Sigma_a\Sigma_b)^{1/2})`
    (Dowson & Landau 1982; the formula of FID, Heusel et al. 2017), in float64.
    """
    mu_a, mu_b = torch.as_tensor(mu_a, dtype=torch.float64), torch.as_tensor(mu_b, dtype=torch.float64)
    cov_a, cov_b = torch.as_tensor(cov_a, dtype=torch.float64), torch.as_tensor(cov_b, dtype=torch.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.shape[0], mu_a.shape[0]):
        raise ValueError(f"inconsistent shapes: mu {tuple(mu_a.shape)}, {tuple(mu_b.shape)}; "
                         f"cov {tuple(cov_a.shape)}, {tuple(cov_b.shape)}")
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_product(cov_a, cov_b)
    return float(d2.clamp(min=0))  # clamp: round-off only


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Frechet distance in the project classifier's feature space (NOT FID: no Inception network).

    Fits a Gaussian (mean, covariance with ddof = 1) to each feature set [N, F] and returns
    :func:`frechet_distance_from_stats`. It is biased upwards at small N, like FID: compare
    numbers at the same N, beside the real-vs-real value (two real sets of that size).
    """
    return frechet_distance_from_stats(*feature_stats(feat_a), *feature_stats(feat_b))


# --- kernel inception distance (in our feature space) ------------------------------------


def polynomial_mmd2(feat_a: Tensor, feat_b: Tensor, *, unbiased: bool = True) -> float:
    r"""MMD^2 with the cubic polynomial kernel :math:`k(x, y) = (x \cdot y / d + 1)^3`, d = F.

    Unbiased (the within-set terms average over i != j; Binkowski et al. 2018, eq. 3) or,
    with ``unbiased=False``, the biased V-statistic (all pairs), kept for tests.
    """
    a, b = _as_features("feat_a", feat_a), _as_features("feat_b", feat_b)
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    m, n = a.shape[0], b.shape[0]
    if unbiased:
        within = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1)) + (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    else:
        within = k_aa.mean() + k_bb.mean()
    return float(within - 2 * k_ab.mean())


def kid(feat_a: Tensor, feat_b: Tensor, *, subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel distance (KID's estimator, Binkowski et al. 2018) in our feature space: (mean, std).

    For each of ``subsets`` rounds, draw ``subset_size`` rows of each set without
    replacement (capped at the smaller set's size; from ``generator``) and compute the
    unbiased :func:`polynomial_mmd2`. Returns the mean and the standard deviation (ddof = 0,
    as torch-fidelity) over rounds. The mean is unbiased: about 0 for two samples of one law
    and possibly slightly negative. Subsets overlap, so std is a spread, not a standard error.
    """
    a, b = _as_features("feat_a", feat_a), _as_features("feat_b", feat_b)
    m = min(subset_size, a.shape[0], b.shape[0])
    values = torch.tensor([
        polynomial_mmd2(a[torch.randperm(a.shape[0], generator=generator)[:m].to(a.device)],
                        b[torch.randperm(b.shape[0], generator=generator)[:m].to(b.device)])
        for _ in range(subsets)
    ], dtype=torch.float64)
    return float(values.mean()), float(values.std(correction=0))


# --- class accuracy and memorisation ------------------------------------------------------


@torch.no_grad()
def classifier_accuracy(classifier: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, *,
                        batch_size: int = 256, device: torch.device | str | None = None) -> float:
    """Fraction of ``images`` [N, ...] whose argmax class under ``classifier`` equals ``labels`` [N].

    For class-conditional samples: ``labels`` are the classes the samples were asked for.
    ``classifier(x)`` returns logits [B, K]; an ``nn.Module`` runs in eval mode and its mode is
    restored afterwards.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if images.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"need one label per image, got {images.shape[0]} images and {labels.shape[0]} labels")
    correct = 0
    with _eval_mode(classifier):
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            if device is not None:
                x = x.to(device)
            correct += int((classifier(x).argmax(dim=1).cpu() == y.cpu()).sum())
    return correct / labels.shape[0]


@torch.no_grad()
def diversity(features: Tensor, labels: Tensor | None = None) -> float:
    r"""Mean pairwise Euclidean distance between distinct samples, within each class if ``labels``.

    .. math:: D = \frac{1}{|C|}\sum_{c \in C} \frac{1}{n_c(n_c - 1)} \sum_{i \ne j,\ y_i = y_j = c} \lVert f_i - f_j \rVert

    ``features`` [N, F] (e.g. ``extract_features`` of samples), ``labels`` [N] or None (one class).
    A generator that collapses each class onto a few images scores near 0; read the value beside
    the same statistic of real images (guidance trades it for fidelity, chapters 10 and 11). The
    mean is over classes with at least two samples; computed in float64.
    """
    f = torch.as_tensor(features).reshape(features.shape[0], -1).to(torch.float64)
    y = torch.zeros(f.shape[0], dtype=torch.long) if labels is None else torch.as_tensor(labels).reshape(-1).cpu()
    if y.shape[0] != f.shape[0]:
        raise ValueError(f"need one label per feature row, got {f.shape[0]} rows and {y.shape[0]} labels")
    per_class = []
    for c in y.unique():
        fc = f[(y == c).to(f.device)]
        n = fc.shape[0]
        if n >= 2:
            per_class.append(float(torch.cdist(fc, fc).sum()) / (n * (n - 1)))
    if not per_class:
        raise ValueError("diversity needs at least two samples of one class")
    return sum(per_class) / len(per_class)


@torch.no_grad()
def memorization_ratio(samples: Tensor, train_set: Tensor, *, batch_size: int = 256,
                       threshold: float = MEMORIZATION_THRESHOLD) -> dict[str, Tensor | float]:
    r"""Nearest-neighbour memorisation test: d1 / d2 for each sample, against the training set.

    d1 and d2 are the L2 distances (images flattened) from a sample to its nearest and
    second-nearest training images. A copy of a training image has ratio 0; a sample that is
    no closer to one training image than to the next has ratio near 1. A sample counts as
    memorised when d1 / d2 < ``threshold`` = 1/3, the criterion of Yoon et al. (2023, "Diffusion
    probabilistic models generalize when they fail to memorize") and Gu et al. (2023, "On
    memorization in diffusion models"); it simplifies Carlini et al. (2023), who divide d1 by
    the mean distance to the 50 nearest training images and use the same 1/3.

    Candidates are found block by block (``batch_size`` samples x ``batch_size * 16`` training
    images, squared distances by matrix product in float64), then d1 and d2 are recomputed
    directly, so a copy gives exactly 0.

    Returns ``ratio`` [N], ``d1`` [N], ``d2`` [N], ``nearest`` [N] (index into ``train_set``),
    ``median`` (of the ratios), ``fraction_memorized`` (ratio < threshold) and ``threshold``.
    """
    x = torch.as_tensor(samples).reshape(samples.shape[0], -1).to(torch.float64)
    ref = torch.as_tensor(train_set).reshape(train_set.shape[0], -1).to(torch.float64).to(x.device)
    if x.shape[1] != ref.shape[1] or ref.shape[0] < 2:
        raise ValueError(f"need samples and >= 2 training images of one size, got {tuple(samples.shape)} and {tuple(train_set.shape)}")
    ref_sq = ref.square().sum(dim=1)
    nearest, dists = [], []
    for xb in x.split(batch_size):
        # 1. running top-2 candidates over blocks of the training set
        best_d = xb.new_full((xb.shape[0], 2), float("inf"))
        best_i = torch.zeros(xb.shape[0], 2, dtype=torch.long, device=x.device)
        for start in range(0, ref.shape[0], batch_size * 16):
            block = ref[start : start + batch_size * 16]
            d2 = xb.square().sum(dim=1, keepdim=True) + ref_sq[start : start + block.shape[0]] - 2 * xb @ block.T
            d, i = torch.cat([best_d, d2], dim=1).topk(2, dim=1, largest=False)
            best_i = torch.cat([best_i, torch.arange(start, start + block.shape[0], device=x.device).expand_as(d2)], dim=1).gather(1, i)
            best_d = d
        # 2. exact distances to the two candidates, ordered
        dist, order = (xb[:, None, :] - ref[best_i]).norm(dim=2).sort(dim=1)
        nearest.append(best_i.gather(1, order))
        dists.append(dist)
    idx, dist = torch.cat(nearest), torch.cat(dists)
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2, torch.zeros_like(d1))  # two identical training images: a copy
    return {
        "ratio": ratio.cpu(), "d1": d1.cpu(), "d2": d2.cpu(), "nearest": idx[:, 0].cpu(),
        "median": float(ratio.median()), "fraction_memorized": float((ratio < threshold).double().mean()),
        "threshold": threshold,
    }
