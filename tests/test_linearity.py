"""Tests of the linearity fit, the linearizer and the per-pixel residuals.

The synthetic ladder has a known nonlinearity S_obs = S (1 - b (S / S_sat)^2)
with b set so the deficit is 0.3 % at 90 % of saturation; S = k t is the
ideal signal.
"""

from __future__ import annotations

import numpy as np
import pytest

from sitiancal.compute.linearity import (
    LinearityFit,
    fit_linearity,
    linearize,
    pixel_linearity_residuals,
)

GAIN = 0.254  # e-/ADU
SAT = 65000.0  # ADU, bias-subtracted saturation
B = 0.003 / 0.9**2  # 0.3 % deficit at 90 % of saturation
RATE = 2000.0  # ADU/s
EXPTIME = np.array([0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                    31, 32, 34, 36])  # fmt: skip


def _observed(ideal: np.ndarray, b: float | np.ndarray = B) -> np.ndarray:
    return ideal * (1.0 - b * (ideal / SAT) ** 2)


def _ladder(rng: np.random.Generator, n_pix: int = 1_000_000, n_frames: int = 2):
    """Central-region means of a ladder: error of a mean of n_pix pixels x n_frames frames.

    Also adds a 0.02 % frame-to-frame lamp fluctuation, which dominates the
    statistical error and is the usual reason for chi2_red > 1.
    """
    ideal = RATE * EXPTIME
    obs = np.minimum(_observed(ideal), SAT)
    err_stat = np.sqrt(obs / GAIN / (n_pix * n_frames))
    err = np.hypot(err_stat, 2e-4 * obs)
    return ideal, obs + err * rng.standard_normal(obs.size), err


def _truth_residual_pct(fit_mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Residuals of the noise-free curve from its own weighted best line (numpy.polyfit)."""
    ideal = RATE * EXPTIME
    obs = _observed(ideal)
    line = np.polyval(np.polyfit(EXPTIME[fit_mask], obs[fit_mask], 1, w=weights[fit_mask]), EXPTIME)
    return 100 * (obs - line) / line


def test_fit_linearity_recovers_nonlinearity() -> None:
    rng = np.random.default_rng(1)
    ideal, signal, err = _ladder(rng)
    fit = fit_linearity(EXPTIME, signal, err, saturation=SAT)
    assert isinstance(fit, LinearityFit)
    # Levels within 5-95 % of saturation only; 36 s (> 95 %) and 0.05-1 s (< 5 %) excluded.
    assert np.array_equal(fit.used, (signal >= 0.05 * SAT) & (signal <= 0.95 * SAT))
    truth = _truth_residual_pct(fit.used, 1 / err)
    assert np.nanmax(np.abs(fit.residual_pct[fit.used] - truth[fit.used])) < 0.05
    max_truth = np.max(np.abs(truth[fit.used]))
    assert fit.max_nonlinearity_pct == pytest.approx(max_truth, abs=0.1)
    assert fit.max_nonlinearity_above_3000_pct == pytest.approx(max_truth, abs=0.1)
    # The line's slope is near (a little below) the ideal rate and within its error of the
    # noise-free line's slope.
    u = fit.used
    slope_truth = np.polyfit(EXPTIME[u], _observed(ideal)[u], 1, w=1 / err[u])[0]
    assert abs(fit.slope - slope_truth) < 4 * fit.slope_err
    assert fit.slope == pytest.approx(RATE, rel=0.01)
    assert 0.9999 < fit.r2 < 1.0
    assert fit.saturation_adu == SAT
    d = fit.to_dict()
    assert len(d["residual_pct"]) == EXPTIME.size


def test_linearizer_undoes_nonlinearity() -> None:
    rng = np.random.default_rng(2)
    _, signal, err = _ladder(rng)
    fit = fit_linearity(EXPTIME, signal, err, saturation=SAT)
    assert fit.linearizer.size in (3, 4)  # order 2 or 3 chosen by the data
    # Identity at low signal: P(0) = 0, P'(0) = 1.
    assert fit.linearizer[-1] == 0.0 and fit.linearizer[-2] == 1.0
    # Noise-free check over the whole unsaturated range: linearised = ideal to < 0.05 %.
    s = np.linspace(100, 0.95 * SAT, 200)
    lin = linearize(_observed(s), fit.linearizer)
    assert np.max(np.abs(lin / s - 1)) < 5e-4
    # Without the linearizer the deficit reaches ~0.33 %.
    assert np.max(np.abs(_observed(s) / s - 1)) > 3e-3
    # A re-fit of the linearised ladder is linear within its noise (0.02 %).
    relin = fit_linearity(EXPTIME, linearize(signal, fit.linearizer), err, saturation=SAT)
    assert relin.max_nonlinearity_pct < 0.08


def test_linear_sensor_needs_no_correction() -> None:
    rng = np.random.default_rng(3)
    ideal = RATE * EXPTIME[:-1]
    err = 2e-4 * ideal
    signal = ideal + err * rng.standard_normal(ideal.size)
    fit = fit_linearity(EXPTIME[:-1], signal, err, saturation=SAT)
    assert fit.max_nonlinearity_pct < 0.1
    assert np.max(np.abs(linearize(ideal, fit.linearizer) / ideal - 1)) < 3e-4
    # Without any error estimate (one frame per level) the fit is unweighted and the
    # slope error comes from the scatter: the truth lies within it.
    unweighted = fit_linearity(EXPTIME[:-1], signal, np.full(signal.size, np.nan), saturation=SAT)
    assert unweighted.used.sum() == fit.used.sum()
    assert abs(unweighted.slope - RATE) < 4 * unweighted.slope_err
    assert unweighted.slope_err < 1e-3 * RATE
    with pytest.raises(ValueError, match="at least 3"):
        fit_linearity(EXPTIME[:3], signal[:3], err[:3], saturation=SAT)


def test_pixel_residuals_match_numpy_and_truth() -> None:
    rng = np.random.default_rng(4)
    n_pix, n_frames = 20_000, 20
    b = rng.uniform(0.0, 2 * B, n_pix)  # per-pixel nonlinearity, known
    rate = RATE * (1 + 0.01 * rng.standard_normal(n_pix))  # PRNU
    ideal = rate[:, None] * EXPTIME[None, :-1]
    exact = _observed(ideal, b[:, None])
    used = (RATE * EXPTIME[:-1] >= 0.05 * SAT) & (RATE * EXPTIME[:-1] <= 0.95 * SAT)
    at = np.array([6, 12, 17, 20])  # 4000 to 60000 ADU, all fitted levels

    # Noise-free: identical to a per-pixel numpy.polyfit with weights 1/t (shot noise
    # of a temporal mean at constant illumination).
    res0 = pixel_linearity_residuals(EXPTIME[:-1], exact.reshape(100, 200, -1), used=used, at=at)
    assert res0.shape == (100, 200, at.size)
    w = 1 / EXPTIME[:-1]
    for p in (0, 17, 12345):
        line = np.polyval(
            np.polyfit(EXPTIME[:-1][used], exact[p, used], 1, w=np.sqrt(w[used])), EXPTIME[at]
        )
        assert np.allclose(
            res0.reshape(-1, at.size)[p], 100 * (exact[p, at] - line) / line, atol=1e-9
        )

    # With temporal noise of the mean of n frames: unbiased and as noisy as expected.
    noisy = exact + np.sqrt(exact / GAIN / n_frames) * rng.standard_normal(exact.shape)
    res = pixel_linearity_residuals(EXPTIME[:-1], noisy, used=used, at=at)
    truth = res0.reshape(-1, at.size)
    diff = res - truth
    # Per-pixel noise ~ 100 sqrt(1 / (g S n)) ~ 0.03-0.1 %; mean over 2e4 pixels exact to ~1e-3 %.
    assert np.all(np.abs(diff.mean(axis=0)) < 4 * diff.std(axis=0) / np.sqrt(n_pix))
    # Expected sd: the point noise 100 / sqrt(g S n) times sqrt(1 - h), h the leverage of
    # the level in the weighted line fit (weights 1/t, proportional to the inverse
    # shot-noise variance at constant illumination).
    s_med = np.median(exact, axis=0)
    t = EXPTIME[:-1]
    design = np.stack([t, np.ones(used.size)], axis=1)
    wd = design[used] / t[used, None]
    cov = np.linalg.inv(design[used].T @ wd)
    leverage = np.einsum("ij,jk,ik->i", design[at], cov, design[at]) / t[at]
    expected_sd = 100 / np.sqrt(GAIN * s_med[at] * n_frames) * np.sqrt(1 - leverage)
    assert diff.std(axis=0) == pytest.approx(expected_sd, rel=0.05)
    # The residual at the brightest level tracks each pixel's own b.
    slope = np.polyfit(truth[:, -1], res[:, -1], 1)[0]
    assert slope == pytest.approx(1.0, abs=0.05)


def test_pixel_residuals_masks() -> None:
    t = EXPTIME[:10]
    mean = RATE * np.tile(t, (4, 1))
    mean[1, :] = np.nan  # dead pixel
    mean[2, 2:] = np.nan  # too few levels
    used = np.ones(10, dtype=bool)
    res = pixel_linearity_residuals(t, mean, used=used, at=np.array([0, 9]))
    assert np.isnan(res[1]).all() and np.isnan(res[2]).all()
    assert np.allclose(res[[0, 3]], 0.0, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pixel_residuals_numba_matches_numpy(dtype) -> None:
    rng = np.random.default_rng(5)
    t = np.array([0.0, 0.25, 1.3, 2.4, 3.5, 4.6, 5.7, 7.4])
    mean = 3000.0 * t * rng.normal(1.0, 0.01, (30, 40, 8)) + rng.normal(0.0, 5.0, (30, 40, 8))
    mean[rng.random(mean.shape) < 0.1] = np.nan
    mean[0, :5] = -10.0  # non-positive fitted values
    mean[1, :5, 1:4] = np.nan  # too few usable levels
    mean = mean.astype(dtype)
    used = np.array([0, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    at = np.array([1, 3, 5, -1])
    fast = pixel_linearity_residuals(t, mean, used=used, at=at)
    ref = pixel_linearity_residuals(t, mean, used=used, at=at, backend="numpy")
    assert fast.shape == ref.shape == (30, 40, 4)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-10)
    assert np.isnan(fast[0, :5]).all() and np.isnan(fast[1, :5]).all()
    with pytest.raises(IndexError):
        pixel_linearity_residuals(t, mean, used=used, at=np.array([8]))


def test_pixel_residuals_numba_reads_level_major_maps_across_blocks() -> None:
    """The tile pass's layout: (ty, tx, L) views of level-major float32 maps, more pixels
    than one chunk of blocks, a partial last block."""
    rng = np.random.default_rng(6)
    t = np.linspace(0.5, 12.0, 14)
    planes = (2500.0 * t[:, None, None] * rng.normal(1.0, 0.01, (14, 71, 93))
              + rng.normal(0.0, 5.0, (14, 71, 93))).astype(np.float32)
    planes[3, 10:20, 5] = np.nan
    planes[:, 40, :12] = np.nan  # no usable level
    mean = np.moveaxis(planes, 0, -1)  # strided: each pixel's levels a plane apart
    used = np.ones(14, dtype=bool)
    used[[0, 13]] = False
    at = np.array([2, 7, 13])
    fast = pixel_linearity_residuals(t, mean, used=used, at=at)
    ref = pixel_linearity_residuals(t, mean, used=used, at=at, backend="numpy")
    assert fast.shape == (71, 93, 3)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    assert np.isnan(fast[40, :12]).all() and np.isfinite(fast[41]).all()
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-10)


def test_linearizer_is_the_identity_on_noise() -> None:
    """A linear response with scattered levels (a flickering lamp) gets no linearizer term.

    11 levels, each mean off by 0.3 % at random: the BIC chose a higher
    term 26 % of the time (biasing the per-pixel gain by 1 % at 2 % flicker);
    the F-test keeps a term 3 times in 1000 per order.
    """
    from sitiancal.compute.linearity import _fit_linearizer

    rng = np.random.default_rng(12)
    t = np.linspace(0.8, 5.8, 11)
    truth = 7700.0 * t + 3.0
    err = 0.003 * truth
    orders = [_fit_linearizer(t, truth + rng.normal(0.0, 1.0, t.size) * err, err).size - 1
              for _ in range(400)]
    assert np.mean(np.array(orders) > 1) < 0.02
