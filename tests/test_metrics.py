"""Tests of ddpm_lib.metrics against closed forms and independent references (scipy, brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from ddpm_lib import metrics
from ddpm_lib.metrics import samples as sample_metrics


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small tensor ops: on a shared 2-core runner (make test uses pytest -n 2)
    a second intra-op thread only adds contention (measured: 200 small energy distances 3.2 s
    with 2 threads vs 0.2 s with 1 under load). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_sampler(dim: int, shift: float = 0.0):
    def sample(n, *, generator=None):
        return torch.randn(n, dim, generator=generator, dtype=torch.float64) + shift

    return sample


# --- sliced Wasserstein -------------------------------------------------------------------


def test_sliced_wasserstein_is_zero_for_identical_sets():
    x = torch.randn(500, 3, generator=gen(0))
    assert metrics.sliced_wasserstein(x, x.clone(), generator=gen(1)) == 0.0
    # and for the same points in another order (the estimator sorts)
    assert metrics.sliced_wasserstein(x, x[torch.randperm(500, generator=gen(2))], generator=gen(1)) < 1e-12


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_sliced_wasserstein_in_1d_is_the_exact_wasserstein_distance(p):
    # In 1-D every direction is +-1 and W_p is sign-invariant: SW_p = W_p of the sorted samples.
    x, y = torch.randn(300, generator=gen(0)), 0.5 + 2 * torch.rand(300, generator=gen(1))
    exact = (x.double().sort().values - y.double().sort().values).abs().pow(p).mean() ** (1 / p)
    assert metrics.sliced_wasserstein(x, y, num_projections=7, p=p, generator=gen(2)) == pytest.approx(float(exact), rel=1e-12)


def test_sliced_wasserstein_unequal_sizes_matches_exact_1d_references():
    x, y = torch.randn(6 * 35, generator=gen(0)), 1 + torch.randn(4 * 35, generator=gen(1))
    # p = 1: scipy's exact 1-D W_1 (CDF integral)
    w1 = metrics.sliced_wasserstein(x, y, num_projections=3, p=1, generator=gen(2))
    assert w1 == pytest.approx(scipy.stats.wasserstein_distance(x.numpy(), y.numpy()), rel=1e-10)
    # p = 2: replicate each point so both sets have lcm(N, M) equal-mass atoms; then sorted pairing is exact
    xs, ys = x.double().sort().values.repeat_interleave(2), y.double().sort().values.repeat_interleave(3)
    w2 = float((xs - ys).square().mean().sqrt())
    assert metrics.sliced_wasserstein(x, y, num_projections=3, p=2, generator=gen(2)) == pytest.approx(w2, rel=1e-10)


def test_sliced_wasserstein_exact_for_a_translated_copy():
    # y = x + m: along theta every sorted pair differs by theta.m, so SW_2^2 = mean_theta (theta.m)^2 exactly
    x, m = torch.randn(1000, 2, generator=gen(0), dtype=torch.float64), torch.tensor([1.2, -1.6], dtype=torch.float64)
    theta = metrics.random_directions(2, 256, generator=gen(5))
    expected = float((m @ theta).square().mean().sqrt())
    assert metrics.sliced_wasserstein(x, x + m, num_projections=256, generator=gen(5)) == pytest.approx(expected, rel=1e-12)


def test_sliced_wasserstein_of_shifted_gaussians_approaches_closed_form():
    # N(0, I) vs N(m, I) in D = 2: W_2 along theta is |theta.m|, so SW_2^2 = E (theta.m)^2 = |m|^2 / D = 2.
    # Error budget on SW_2^2 (n = 10000, L = 1000 directions):
    #   directions: Var (theta.m)^2 = |m|^4 Var(cos^2) = 16 / 8, so std = sqrt(2 / L) = 0.045;
    #   samples: SW_2^2 ~ |m + delta|^2 / 2, delta = mean difference ~ N(0, 2/n I): std ~ |m| sqrt(2/n) / sqrt(2) = 0.02;
    #   plug-in bias: 1-D W_2^2 between two n-samples, ~1e-3.  Total std ~ 0.053 (measured over 30
    #   seeds: mean 2.022, std 0.052), so allow 4 std = 0.2 on SW_2^2.
    m = torch.tensor([1.2, -1.6])
    x, y = torch.randn(10_000, 2, generator=gen(0)), torch.randn(10_000, 2, generator=gen(1)) + m
    sw2 = metrics.sliced_wasserstein(x, y, num_projections=1000, generator=gen(2)) ** 2
    assert abs(sw2 - 2.0) < 0.2


def test_sliced_wasserstein_is_monotone_in_the_shift_and_reproducible():
    x, noise = torch.randn(2000, 2, generator=gen(0)), torch.randn(2000, 2, generator=gen(1))
    direction = torch.tensor([0.6, 0.8])
    values = [metrics.sliced_wasserstein(x, noise + s * direction, generator=gen(3)) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert metrics.sliced_wasserstein(x, noise, generator=gen(3)) == values[0]  # same seed, same number
    assert metrics.sliced_wasserstein(x, noise, generator=gen(4)) != values[0]  # other directions


def test_sliced_wasserstein_rejects_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        metrics.sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.sliced_wasserstein(torch.full((3, 2), float("nan")), torch.zeros(3, 2))


# --- energy distance and MMD --------------------------------------------------------------


def test_energy_distance_v_statistic_matches_scipy_in_1d():
    # scipy.stats.energy_distance returns sqrt(2 * int (F_n - G_m)^2) = sqrt(V-statistic D^2).
    x, y = torch.randn(400, 1, generator=gen(0)), 0.3 + 1.5 * torch.randn(300, 1, generator=gen(1))
    ours = metrics.energy_distance(x, y, unbiased=False)
    assert ours == pytest.approx(scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()) ** 2, rel=1e-9)
    # U-statistic within terms: E_V|X-X'| = (n-1)/n E_U|X-X'|, so D_U = D_V - E_V|X-X'|/(n-1) - E_V|Y-Y'|/(m-1)
    exx = torch.cdist(x.double(), x.double()).mean().item()
    eyy = torch.cdist(y.double(), y.double()).mean().item()
    assert metrics.energy_distance(x, y) == pytest.approx(ours - exx / 399 - eyy / 299, rel=1e-9)


def test_energy_distance_closed_form_for_shifted_1d_gaussians():
    # X ~ N(0,1), Y ~ N(mu,1): X - Y ~ N(-mu, 2), X - X' ~ N(0, 2); E|N(a, s^2)| = s sqrt(2/pi) e^{-a^2/2s^2} + a (1 - 2 Phi(-a/s))
    mu, s = 1.0, math.sqrt(2)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * s * s)) + mu * (1 - 2 * scipy.stats.norm.cdf(-mu / s))
    exact = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    x, y = torch.randn(4000, 1, generator=gen(0)), mu + torch.randn(4000, 1, generator=gen(1))
    # exact = 0.5418; over 30 seeds at n = 4000 the estimate had mean 0.548 and std 0.024: allow 4 std
    assert exact == pytest.approx(0.5418, abs=1e-4)
    assert metrics.energy_distance(x, y) == pytest.approx(exact, abs=0.1)


def test_energy_distance_and_mmd_separate_laws():
    same = gaussian_sampler(2)
    x, y = same(1000, generator=gen(0)), same(1000, generator=gen(1))
    z = gaussian_sampler(2, shift=0.5)(1000, generator=gen(2))
    for fn in (metrics.energy_distance, metrics.mmd_rbf):
        assert fn(x, x) <= 1e-12  # a set against itself: U-statistic within terms make it <= 0
        near, far = fn(x, y), fn(x, z)
        assert abs(near) < 0.1 * far, (fn.__name__, near, far)


def test_energy_distance_is_unbiased_and_the_v_statistic_is_not():
    # Average over independent pairs of one law: U-statistic ~ 0 within 4 standard errors; V-statistic clearly > 0.
    u, v = [], []
    g = gen(0)
    for _ in range(100):
        a, b = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
        u.append(metrics.energy_distance(a, b))
        v.append(metrics.energy_distance(a, b, unbiased=False))
    u, v = torch.tensor(u), torch.tensor(v)
    assert abs(u.mean()) < 4 * u.std() / 10
    assert v.mean() > 10 * v.std() / 10


def test_blocked_pairwise_sums_equal_one_block_and_bound_memory(monkeypatch):
    x, y = torch.randn(300, 2, generator=gen(0)), torch.randn(170, 2, generator=gen(1))
    whole = metrics.energy_distance(x, y), metrics.mmd_rbf(x, y)
    shapes, cdist = [], torch.cdist

    def spy(a, b):
        shapes.append((a.shape[0], b.shape[0]))
        return cdist(a, b)

    monkeypatch.setattr(sample_metrics, "_BLOCK_ENTRIES", 1000)  # 3 to 6 rows per block
    monkeypatch.setattr(sample_metrics.torch, "cdist", spy)
    assert (metrics.energy_distance(x, y), metrics.mmd_rbf(x, y)) == pytest.approx(whole, rel=1e-12)
    assert max(r * c for r, c in shapes) <= 1000 and len(shapes) > 100
    # the default block: 10k x 10k runs in blocks of 2^22 entries (32 MiB of float64)
    assert sample_metrics._BLOCK_ENTRIES // 10_000 * 10_000 * 8 <= 32 * 2**20


# --- the real-vs-real floor ---------------------------------------------------------------


def test_compare_to_data_reports_metric_beside_its_floor():
    data = gaussian_sampler(2)
    good = metrics.compare_to_data(data(1000, generator=gen(0)), data, repeats=4, generator=gen(1))
    bad = metrics.compare_to_data(gaussian_sampler(2, 0.5)(1000, generator=gen(0)), data, repeats=4, generator=gen(1))
    assert good["floor"] > 0 and good["n"] == 1000
    assert 0.5 < good["ratio"] < 2.0
    assert bad["ratio"] > 5.0
    again = metrics.compare_to_data(data(1000, generator=gen(0)), data, repeats=4, generator=gen(1))
    assert again == good  # seeded -> reproducible


def test_real_floor_shrinks_with_sample_size():
    data = gaussian_sampler(2)
    small = metrics.real_floor(data, "sliced_wasserstein", 100, repeats=5, generator=gen(0))
    large = metrics.real_floor(data, "sliced_wasserstein", 3000, repeats=5, generator=gen(0))
    assert large["mean"] < 0.5 * small["mean"]
    energy = metrics.real_floor(data, "energy", 500, repeats=5, generator=gen(0))
    assert abs(energy["mean"]) < 3 * energy["std"]  # unbiased: floor ~ 0
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.real_floor(data, "fid", 10)


# --- Frechet distance ---------------------------------------------------------------------


def random_spd(dim: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(dim, rank or dim, generator=g, dtype=torch.float64)
    return a @ a.T / dim + (0 if rank else 1e-3) * torch.eye(dim, dtype=torch.float64)


def scipy_frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """The reference implementation's recipe (pytorch-fid): scipy sqrtm of the product, real part."""
    covmean = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a.numpy()) + np.trace(cov_b.numpy()) - 2 * np.trace(covmean))


def test_frechet_closed_form_for_diagonal_gaussians():
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.0])
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu_a - mu_b) ** 2).sum())  # 4 + 1 + 0 + 1 + 4 = 10
    assert expected == pytest.approx(10.0)
    got = metrics.frechet_distance_from_stats(mu_a, torch.diag(a), mu_b, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_frechet_agrees_with_scipy_sqrtm_reference(seed):
    g = gen(seed)
    mu_a, mu_b = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    cov_a, cov_b = random_spd(16, g), random_spd(16, g)
    ours = metrics.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)
    assert ours == pytest.approx(scipy_frechet(mu_a, cov_a, mu_b, cov_b), rel=1e-8)
    assert ours == pytest.approx(metrics.frechet_distance_from_stats(mu_b, cov_b, mu_a, cov_a), rel=1e-10)  # symmetric


def test_frechet_with_singular_covariances_is_finite_and_nonnegative():
    # fewer samples than features (N < F): rank-deficient covariances, where sqrtm of the product is fragile
    g = gen(0)
    fa, fb = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g)
    d = metrics.frechet_distance(fa, fb)
    assert math.isfinite(d) and d > 0
    cov_a, cov_b = random_spd(32, g, rank=5), random_spd(32, g, rank=7)
    zero = torch.zeros(32, dtype=torch.float64)
    assert metrics.frechet_distance_from_stats(zero, cov_a, zero, cov_b) == pytest.approx(scipy_frechet(zero, cov_a, zero, cov_b), rel=1e-5, abs=1e-8)


def test_frechet_distance_of_features():
    f = torch.randn(500, 8, generator=gen(0))
    assert metrics.frechet_distance(f, f.clone()) == pytest.approx(0.0, abs=1e-10)
    mu, cov = metrics.feature_stats(f)
    assert torch.allclose(cov, torch.from_numpy(np.cov(f.double().numpy(), rowvar=False)))
    g = f[torch.randperm(500, generator=gen(1))] * 2.0 + 1.0  # cov x4, mean +1
    expected = metrics.frechet_distance_from_stats(mu, cov, 2 * mu + 1, 4 * cov)
    assert metrics.frechet_distance(f, g) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(f, g) == pytest.approx(metrics.frechet_distance(g, f), rel=1e-10)


# --- KID ----------------------------------------------------------------------------------


def test_polynomial_mmd2_matches_an_explicit_double_sum():
    a, b = torch.randn(5, 3, generator=gen(0), dtype=torch.float64), torch.randn(4, 3, generator=gen(1), dtype=torch.float64)

    def k(u, v):
        return (float(u @ v) / 3 + 1) ** 3

    kaa = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / 20
    kbb = sum(k(b[i], b[j]) for i in range(4) for j in range(4) if i != j) / 12
    kab = sum(k(a[i], b[j]) for i in range(5) for j in range(4)) / 20
    assert metrics.polynomial_mmd2(a, b) == pytest.approx(kaa + kbb - 2 * kab, rel=1e-12)


def test_kid_near_zero_for_one_law_and_positive_for_another():
    g = gen(0)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    c = torch.randn(2000, 16, generator=g) * 1.3 + 0.2
    same_mean, same_std = metrics.kid(a, b, subsets=30, subset_size=500, generator=gen(1))
    diff_mean, diff_std = metrics.kid(a, c, subsets=30, subset_size=500, generator=gen(1))
    assert abs(same_mean) < 3 * same_std
    assert diff_mean > 10 * diff_std and diff_mean > 20 * abs(same_mean)
    assert metrics.kid(a, b, subsets=30, subset_size=500, generator=gen(1)) == (same_mean, same_std)


def test_kid_estimator_is_unbiased():
    # Over many independent pairs of one law the unbiased MMD^2 averages to 0 (within 4 standard
    # errors); the V-statistic (diagonal included) is biased upwards by many standard errors.
    g = gen(0)
    u, v = [], []
    for _ in range(200):
        a, b = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
        u.append(metrics.polynomial_mmd2(a, b))
        v.append(metrics.polynomial_mmd2(a, b, unbiased=False))
    u, v = torch.tensor(u), torch.tensor(v)
    se = math.sqrt(200)
    assert abs(u.mean()) < 4 * u.std() / se
    assert v.mean() > 10 * v.std() / se


# --- class accuracy, features, memorisation -----------------------------------------------


class LinearClassifier(torch.nn.Module):
    """A fixed linear map: logits = x W, W the identity on the first K coordinates."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.head = torch.nn.Linear(dim, classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(classes, dim))
        self.dropout = torch.nn.Dropout(0.9)  # would scramble predictions if left in train mode

    def features(self, x):
        return self.dropout(x.flatten(1)) * 2

    def forward(self, x):
        return self.head(self.dropout(x.flatten(1)))


def test_classifier_accuracy_on_constructed_data():
    labels = torch.arange(100) % 4
    images = (torch.nn.functional.one_hot(labels, 4).float() * 5 + 0.1 * torch.randn(100, 4, generator=gen(0)))
    images = torch.cat([images, torch.zeros(100, 12)], dim=1).reshape(100, 1, 4, 4)
    clf = LinearClassifier(16, 4)  # left in train mode: the metric must use eval mode and restore
    assert metrics.classifier_accuracy(clf, images, labels, batch_size=7) == 1.0
    assert clf.training
    wrong = labels.clone()
    wrong[:30] = (wrong[:30] + 1) % 4
    assert metrics.classifier_accuracy(clf, images, wrong, batch_size=32) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="one label per image"):
        metrics.classifier_accuracy(clf, images, labels[:5])


def test_extract_features_batches_tensors_and_loaders():
    clf = LinearClassifier(16, 4)
    images = torch.randn(50, 1, 4, 4, generator=gen(0))
    whole = clf.eval().features(images)
    clf.train()
    assert torch.equal(metrics.extract_features(clf.features, images, batch_size=8), whole)
    assert clf.training
    loader = [(images[i : i + 16], torch.zeros(16)) for i in range(0, 50, 16)]
    assert torch.equal(metrics.extract_features(clf.features, loader), whole)


def test_memorization_ratio_copies_are_zero_and_random_samples_near_one():
    g = gen(0)
    train = torch.randn(300, 3, 8, 8, generator=g)  # D = 192
    fresh = torch.randn(40, 3, 8, 8, generator=g)
    copies = train[[5, 17, 299]]
    out = metrics.memorization_ratio(torch.cat([copies, fresh]), train, batch_size=8)  # several blocks
    assert torch.equal(out["ratio"][:3], torch.zeros(3))
    assert out["nearest"][:3].tolist() == [5, 17, 299]
    # in high dimension distances concentrate: nearest and second nearest are almost equally far
    assert out["ratio"][3:].min() > 0.8
    assert out["fraction_memorized"] == pytest.approx(3 / 43)
    assert out["threshold"] == pytest.approx(1 / 3)


def test_memorization_ratio_matches_brute_force():
    g = gen(1)
    train = torch.randn(200, 5, generator=g, dtype=torch.float64)
    samples = torch.cat([train[:10] + 0.05 * torch.randn(10, 5, generator=g, dtype=torch.float64),
                         torch.randn(30, 5, generator=g, dtype=torch.float64)])
    out = metrics.memorization_ratio(samples, train, batch_size=3)
    d, i = torch.cdist(samples, train).topk(2, largest=False)
    assert torch.allclose(out["ratio"], d[:, 0] / d[:, 1], rtol=1e-10)
    assert torch.equal(out["nearest"], i[:, 0])
    assert out["median"] == pytest.approx(float((d[:, 0] / d[:, 1]).median()))
    assert out["fraction_memorized"] == pytest.approx(float((d[:, 0] / d[:, 1] < 1 / 3).double().mean()))


def test_bits_per_dim_is_the_diffusion_bound_not_a_copy():
    from ddpm_lib.losses import nll_bits_per_dim

    assert metrics.nll_bits_per_dim is nll_bits_per_dim


def test_diversity_is_the_mean_pairwise_distance_within_classes():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0], [10.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # class 0: one pair at distance 5; class 1: distances 1, 3, 2 -> mean 2
    assert metrics.diversity(f, y) == pytest.approx((5.0 + 2.0) / 2, abs=1e-12)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    assert metrics.diversity(f) == pytest.approx(sum(float((f[i] - f[j]).norm()) for i, j in pairs) / len(pairs))
    # a collapsed class has none; scaling the features scales the diversity
    assert metrics.diversity(torch.ones(6, 3)) == 0.0
    assert metrics.diversity(2.5 * f, y) == pytest.approx(2.5 * metrics.diversity(f, y))


def test_diversity_rejects_bad_input():
    with pytest.raises(ValueError, match="one label per"):
        metrics.diversity(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two"):
        metrics.diversity(torch.zeros(2, 2), torch.tensor([0, 1]))
