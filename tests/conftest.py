"""Shared fixtures: the book's 3-component 2-D Gaussian mixture and the T = 1000 linear diffusion."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lib import book, checks
from ddpm_lib.analytic import GaussianMixture


def rotated_cov(std_major: float, std_minor: float, angle_deg: float) -> torch.Tensor:
    """A 2x2 covariance with the given principal standard deviations, rotated by ``angle_deg``."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=torch.float64)) @ rot.T


def make_mixture() -> GaussianMixture:
    """Three well-separated, anisotropic components with unequal weights (0.5, 0.3, 0.2).

    Principal standard deviations 0.1-0.25; centres 1.6-1.8 apart, so along every line
    joining two centres the components are >= 4.5 combined standard deviations apart and
    labelling a sample by its most likely component agrees with the component that drew it
    except with probability ~1e-5. The data lie in about [-1.7, 1.7]^2, so samplers run with
    clip_denoised=False.
    """
    means = torch.tensor([[-0.9, -0.6], [0.9, -0.5], [0.0, 0.8]], dtype=torch.float64)
    covs = torch.stack([
        rotated_cov(0.25, 0.10, 0.0),  # wide along x
        rotated_cov(0.20, 0.08, 45.0),  # correlated
        rotated_cov(0.15, 0.10, -60.0),
    ])
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]))


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    return make_mixture()


@pytest.fixture(scope="session")
def linear_alphas_cumprod() -> torch.Tensor:
    """alpha-bar of the DDPM linear schedule (1e-4 to 0.02, T = 1000), computed here independently."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.fixture(scope="session")
def diffusion():
    from ddpm_lib.diffusion import GaussianDiffusion
    from ddpm_lib.schedules import linear_betas

    return GaussianDiffusion(linear_betas(1000))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's many small-tensor loops on one intra-op thread, then restore the setting.

    The oracle tests make ~10^4 calls on tensors of ~10^5 elements, where a second thread gains
    little; on a shared 2-core runner the OpenMP barriers of 2 threads made a 1000-step sampler
    ~25x slower (386 s instead of 15 s, measured), so these modules opt into 1 thread.
    """
    with book.single_thread():
        yield


READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a tensor's value by the host, with the value checks switched to the
    device path (``checks.on_host`` False), as on CUDA, where each read is a sync."""
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(checks, "on_host", lambda x: False)
    return count
