"""Tests for ddpm_lib.schedules: hand-computed values, measured constants, properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_lib.schedules import (
    check_betas,
    cosine_betas,
    get_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    respace_betas,
    snr,
    space_timesteps,
)

FAST = settings(max_examples=40, deadline=None)


def alpha_bar(betas) -> np.ndarray:
    """Independent reference: numpy cumulative product of 1 - beta."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


# --- the two schedules -------------------------------------------------------------------


def test_linear_endpoints_not_rescaled():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    # No 1000/T rescaling: a short schedule keeps the same endpoints (pitfall 10).
    assert linear_betas(10)[-1].item() == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(linear_betas(5, 0.1, 0.5).numpy(), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-12)


def test_snr_by_hand():
    # alpha_bar = 0.5, 0.25: SNR = 0.5 / 0.5, 0.25 / 0.75.
    np.testing.assert_allclose(snr(torch.tensor([0.5, 0.5])).numpy(), [1.0, 1 / 3], rtol=1e-12)


def test_linear_terminal_snr_measured():
    # Pitfall 2: the DDPM schedule never reaches pure noise. Measured: SNR_T = 4.0360e-5.
    assert snr(linear_betas(1000))[-1].item() == pytest.approx(4.03599e-5, rel=1e-4)


def test_cosine_matches_eq17_by_hand():
    T, s = 4, 0.008
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    np.testing.assert_allclose(cosine_betas(T).numpy(), expected, rtol=1e-12)
    # Without the clip alpha_bar would follow f(t) / f(0) exactly.
    np.testing.assert_allclose(alpha_bar(cosine_betas(T, max_beta=1.0))[:-1], np.array(f[1:-1]) / f[0], rtol=1e-12)


def test_cosine_clip_leaves_tiny_terminal_alpha_bar():
    # Pitfall 4: only the last beta is clipped at 0.999, so alpha_bar_T = 1e-3 * alpha_bar_{T-1}.
    # Measured at T = 1000: alpha_bar_T = 2.42877e-9 (not 0, and not f(T)/f(0) ~ 3.7e-33).
    b = cosine_betas(1000)
    assert int((b == 0.999).sum()) == 1 and b[-1].item() == 0.999
    assert alpha_bar(b)[-1] == pytest.approx(2.42877e-9, rel=1e-4)


@FAST
@given(T=st.integers(1, 2000), name=st.sampled_from(["linear", "cosine"]))
def test_betas_in_unit_interval_and_alpha_bar_decreasing(T, name):
    b = get_betas(name, T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert bool(((b > 0) & (b < 1)).all())
    ab = alpha_bar(b)
    assert np.all(np.diff(ab) < 0) and ab[0] < 1 and ab[-1] > 0


def test_zero_terminal_snr():
    b = linear_betas(1000)
    z = rescale_zero_terminal_snr(b)
    ab, abz = alpha_bar(b), alpha_bar(z)
    assert abz[-1] == 0.0 and z[-1].item() == 1.0
    assert abz[0] == pytest.approx(ab[0], rel=1e-12)
    assert snr(z)[-1].item() == 0.0
    # Algorithm 1 is an affine map of sqrt(alpha_bar): check it at an interior step.
    a0, aT = math.sqrt(ab[0]), math.sqrt(ab[-1])
    assert math.sqrt(abz[500]) == pytest.approx((math.sqrt(ab[500]) - aT) * a0 / (a0 - aT), rel=1e-10)
    assert bool(((z[:-1] > 0) & (z[:-1] < 1)).all())


def test_get_betas_dispatch():
    torch.testing.assert_close(get_betas("cosine", 10, s=0.01), cosine_betas(10, s=0.01))
    torch.testing.assert_close(get_betas("linear", 10), linear_betas(10))


# --- spacing -----------------------------------------------------------------------------


def test_space_timesteps_worked_examples():
    # Docstring example: sections [0..4] and [5..9]; strides 4 and 2.
    assert space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    # T % 2 = 1: the first section is one longer ([0..3] and [4..6]).
    assert space_timesteps(7, "1,3") == [0, 4, 5, 6]
    # Fractional stride 1.5 is rounded half to even, as Python's round: 0, round(1.5) = 2, 3.
    assert space_timesteps(4, [3]) == [0, 2, 3]
    assert space_timesteps(1000, "ddim4") == [0, 250, 500, 750]
    # "ddimN" is stride T // N from 0, exactly N steps: 1000 // 3 = 333 (range(0, 1000, 333) would
    # also give 999), and 10 // 7 = 1 (no stride gives exactly 7 points of range(0, 10, stride)).
    assert space_timesteps(1000, "ddim3") == [0, 333, 666]
    assert space_timesteps(10, "ddim7") == [0, 1, 2, 3, 4, 5, 6]
    assert space_timesteps(1000, "ddim999") == list(range(999))
    assert space_timesteps(5, "ddim5") == [0, 1, 2, 3, 4]


def test_space_timesteps_improved_diffusion_docstring_case():
    # improved-diffusion: 300 steps with [10, 15, 20] -> each 100-step section strided separately.
    kept = space_timesteps(300, [10, 15, 20])
    assert len(kept) == 45
    assert kept[:10] == list(range(0, 100, 11))  # stride 99 / 9 = 11 exactly
    for lo, count in [(0, 10), (100, 15), (200, 20)]:
        section = [k for k in kept if lo <= k < lo + 100]
        assert len(section) == count and section[0] == lo and section[-1] == lo + 99


@st.composite
def section_counts(draw):
    T = draw(st.integers(1, 2000))
    n = draw(st.integers(1, min(T, 5)))
    size_per, extra = divmod(T, n)
    counts = [draw(st.integers(1, size_per + (i < extra))) for i in range(n)]
    return T, counts


@FAST
@given(section_counts())
def test_space_timesteps_properties(case):
    T, counts = case
    kept = space_timesteps(T, counts)
    assert len(kept) == sum(counts)
    assert kept == sorted(set(kept)) and kept[0] == 0 and 0 <= kept[-1] < T
    last_size = T // len(counts)  # the last section is never one of the longer ones
    if counts[-1] >= 2 or last_size == 1:
        assert kept[-1] == T - 1


@FAST
@given(T=st.integers(1, 2000), data=st.data())
def test_space_timesteps_ddim_properties(T, data):
    n = data.draw(st.integers(1, T))
    kept = space_timesteps(T, f"ddim{n}")  # every 1 <= N <= T is allowed
    # exactly N steps at stride T // N from 0 (written out independently)
    assert len(kept) == n and kept == [i * (T // n) for i in range(n)] and kept[-1] < T
    # the "leading" grid reaches T - 1 only when it keeps every step (pitfall 1)
    assert (kept[-1] == T - 1) == (n == T)


def test_space_timesteps_ddim_unchanged_for_divisors():
    """For N dividing T the grid is DDIM's range(0, T, T // N), as before exactly-N spacing was
    introduced (the shipped models' metrics were measured on it)."""
    for T in (1, 7, 12, 100, 1000):
        for n in (n for n in range(1, T + 1) if T % n == 0):
            assert space_timesteps(T, f"ddim{n}") == list(range(0, T, T // n)), (T, n)


# --- respacing ---------------------------------------------------------------------------


def test_respace_betas_by_hand():
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # alpha_bar = 0.9, 0.72, 0.504, 0.3024; keep steps 1 and 3.
    expected = [1 - 0.72, 1 - 0.3024 / 0.72]
    np.testing.assert_allclose(respace_betas(betas, [1, 3]).numpy(), expected, rtol=1e-12)
    # Keeping every step gives the original schedule back.
    np.testing.assert_allclose(respace_betas(betas, range(4)).numpy(), betas.numpy(), rtol=1e-12)


@FAST
@given(T=st.integers(1, 2000), data=st.data())
def test_respaced_chain_keeps_alpha_bar(T, data):
    kept = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=50)))
    b = cosine_betas(T)
    # Going through betas costs absolute precision: 1 - (1 - alpha_bar) loses ~1e-16 per
    # step, which is a large relative error once alpha_bar is ~1e-7 (near the cosine's end).
    np.testing.assert_allclose(alpha_bar(respace_betas(b, kept)), alpha_bar(b)[kept], rtol=1e-10, atol=1e-14)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, -3, 2.5, True, "10"])
@pytest.mark.parametrize("make", [linear_betas, cosine_betas, lambda T: get_betas("linear", T),
                                  lambda T: get_betas("cosine", T)], ids=["linear", "cosine", "get_linear", "get_cosine"])
def test_bad_T(T, make):
    with pytest.raises(ValueError, match=r"^T \(the number of diffusion steps\) must be an integer >= 1, got"):
        make(T)


def test_unknown_schedule_lists_known():
    with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'.*\['cosine', 'linear'\]"):
        get_betas("quadratic", 10)


@pytest.mark.parametrize(
    "betas", [[0.1, 0.0, 0.2], [0.1, -0.1], [0.1, 1.0, 0.2], [0.1, 1.5], [0.1, float("nan")]]
)
def test_betas_outside_unit_interval(betas):
    with pytest.raises(ValueError, match="betas must"):
        check_betas(betas)


def test_last_beta_may_be_one_and_betas_must_be_1d():
    assert check_betas([0.1, 1.0])[-1] == 1.0
    with pytest.raises(ValueError, match="1-D"):
        check_betas([[0.1, 0.2]])
    with pytest.raises(ValueError, match="1-D"):
        check_betas([])
    with pytest.raises(ValueError, match="betas must"):
        linear_betas(10, 0.1, 1.2)


def test_respace_betas_bad_timesteps():
    b = linear_betas(10)
    with pytest.raises(ValueError, match="strictly increasing"):
        respace_betas(b, [0, 5, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        respace_betas(b, [3, 1])
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        respace_betas(b, [0, 10])
    with pytest.raises(ValueError, match="empty"):
        respace_betas(b, [])


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="section 0 has 5 steps, cannot take 6"):
        space_timesteps(10, [6, 1])
    with pytest.raises(ValueError, match="cannot parse"):
        space_timesteps(10, "ddimfast")
    with pytest.raises(ValueError, match=">= 1"):
        space_timesteps(10, [3, 0])
    with pytest.raises(ValueError, match="between 1 and T"):
        space_timesteps(10, "ddim11")
