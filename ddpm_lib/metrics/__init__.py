"""Offline quality metrics: quality is measured, not eyeballed.

=================  ============================================================================
``samples``        2-D / low-dim sample sets: sliced Wasserstein, energy distance, RBF MMD, and
                   the real-vs-real floor (``real_floor``, ``compare_to_data``)
``features``       images, in the feature space of the project's own classifier: Frechet
                   distance (not FID), KID's estimator, class accuracy of conditional samples,
                   nearest-training-image memorisation ratio, ``diversity``, ``extract_features``
=================  ============================================================================

Negative log-likelihood in bits per dimension (the variational bound) is not re-implemented
here: it is ``ddpm_lib.losses.nll_bits_per_dim`` (also ``GaussianDiffusion.nll_bits_per_dim``),
re-exported below.

Every stochastic function takes ``generator=`` (a ``torch.Generator``) and nothing else
random. Every estimator is finite-sample: read it beside its floor, the same metric between
two fresh real sample sets of the same size.
"""

from ddpm_lib.losses import nll_bits_per_dim
from ddpm_lib.metrics.features import (
    MEMORIZATION_THRESHOLD,
    classifier_accuracy,
    diversity,
    extract_features,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    memorization_ratio,
    polynomial_mmd2,
    trace_sqrt_product,
)
from ddpm_lib.metrics.samples import (
    SAMPLE_METRICS,
    compare_to_data,
    energy_distance,
    mmd_rbf,
    random_directions,
    real_floor,
    sliced_wasserstein,
    wasserstein_1d,
)

__all__ = [
    "sliced_wasserstein",
    "wasserstein_1d",
    "random_directions",
    "energy_distance",
    "mmd_rbf",
    "real_floor",
    "compare_to_data",
    "SAMPLE_METRICS",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "trace_sqrt_product",
    "kid",
    "polynomial_mmd2",
    "classifier_accuracy",
    "memorization_ratio",
    "diversity",
    "MEMORIZATION_THRESHOLD",
    "nll_bits_per_dim",
]
