"""Tests of the read-noise products on synthetic bias frames with known noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sitiancal.compute.readnoise import (
    conventional_read_noise,
    read_noise_map,
    read_noise_summary,
)


def _bias_pair(rng, shape, sigma, level=1000.0):
    """Two integer bias frames sharing a fixed pattern, with outliers in one."""
    pattern = level + rng.normal(0.0, 3.0, shape) + np.linspace(0.0, 5.0, shape[1])[None, :]
    b1 = pattern + rng.normal(0.0, sigma, shape)
    b2 = pattern + rng.normal(0.0, sigma, shape) + 0.7  # a small level change
    hits = rng.random(shape) < 1e-3
    b1[hits] += rng.uniform(100.0, 3000.0, hits.sum())  # cosmic rays / hot pixels
    return np.rint(b1).astype(np.uint16), np.rint(b2).astype(np.uint16)


@pytest.mark.parametrize("sigma", [4.0, 8.0])
def test_conventional_read_noise_recovers_sigma(sigma):
    rng = np.random.default_rng(int(sigma))
    b1, b2 = _bias_pair(rng, (800, 1000), sigma)
    res = conventional_read_noise(b1, b2, gain=0.25)
    # rounding both frames to integers adds 1/12 ADU^2 of variance to each frame
    expected = np.sqrt(sigma**2 + 1.0 / 12.0)
    assert res.read_noise_adu == pytest.approx(expected, rel=0.01)
    assert abs(res.read_noise_adu - expected) < 5 * res.read_noise_adu_err
    assert res.read_noise_adu_err == pytest.approx(expected / np.sqrt(2 * res.n_pixels), rel=0.01)
    assert res.read_noise_e == pytest.approx(0.25 * res.read_noise_adu)
    # the outliers (0.1%) are clipped, few good pixels are (5 sigma: 6e-7)
    assert 0.0008 < res.n_clipped / b1.size < 0.0012
    assert res.mean_difference == pytest.approx(-0.7, abs=0.05)
    json.dumps(res.to_dict())


def test_conventional_read_noise_region_and_errors():
    rng = np.random.default_rng(1)
    b1, b2 = _bias_pair(rng, (200, 300), 4.0)
    b1[:, :100] = b2[:, :100]  # left third: identical frames (zero difference)
    res = conventional_read_noise(b1, b2, region=(slice(None), slice(100, None)))
    assert res.n_pixels + res.n_clipped == 200 * 200
    assert res.read_noise_adu == pytest.approx(np.sqrt(16 + 1 / 12), rel=0.03)
    assert np.isnan(res.read_noise_e)
    assert res.to_dict()["read_noise_e"] is None
    with pytest.raises(ValueError, match="shape"):
        conventional_read_noise(b1, b2[:10])


def test_read_noise_map_in_electrons():
    rng = np.random.default_rng(2)
    std = rng.uniform(3.0, 5.0, (20, 30))
    gain = rng.normal(0.253, 0.002, (20, 30))
    got = read_noise_map(std, gain)
    assert got.dtype == np.float32 and got.shape == (20, 30)
    np.testing.assert_allclose(got, std * gain, rtol=1e-7)
    np.testing.assert_allclose(read_noise_map(std, 0.25), 0.25 * std, rtol=1e-7)
    gain[3, 4] = np.nan
    assert np.isnan(read_noise_map(std, gain)[3, 4])
    with pytest.raises(ValueError, match="gain"):
        read_noise_map(std, gain[:5])


def test_read_noise_summary_statistics():
    rng = np.random.default_rng(3)
    # per-pixel noise ~ lognormal around the reference study's 1.028 e-, plus NaNs
    rn = 1.028 * np.exp(rng.normal(0.0, 0.15, 200_000))
    rn[rng.random(rn.size) < 0.01] = np.nan
    out = read_noise_summary(rn.reshape(400, 500))
    good = rn[np.isfinite(rn)]
    assert out["n_pixels"] == good.size
    # the lognormal's median is 1.028 exactly; the sample median within its error
    assert abs(out["median"] - 1.028) < 4 * out["median_err"]
    assert out["median_err"] == pytest.approx(1.2533 * 1.028 * 0.15 / np.sqrt(good.size), rel=0.05)
    assert out["mean"] == pytest.approx(good.mean())
    assert out["rms"] == pytest.approx(np.sqrt(np.mean(good**2)))
    assert out["p84.135"] == pytest.approx(np.percentile(good, 84.135))
    assert out["p50"] == out["median"]
    assert out["min"] <= out["p1"] < out["median"] < out["p99.9"] <= out["max"]
    json.dumps(out)
    empty = read_noise_summary(np.full((3, 3), np.nan))
    assert empty["n_pixels"] == 0 and empty["median"] is None and empty["p50"] is None


@pytest.mark.parametrize("n", [2, 5, 20, 101])
def test_median_std_factor_is_the_median_of_sample_stds(n: int):
    from sitiancal.compute.readnoise import median_std_factor

    rng = np.random.default_rng(n)
    s = np.std(rng.normal(0.0, 3.0, (400_000, n)), axis=1, ddof=1)
    # the median of 400k draws: within ~0.3 % / sqrt(n - 1) of the true one
    assert np.median(s) / 3.0 == pytest.approx(median_std_factor(n), rel=0.004)


def test_median_std_factor_needs_two_frames():
    from sitiancal.compute.readnoise import median_std_factor

    with pytest.raises(ValueError, match="at least 2 frames"):
        median_std_factor(1)
