"""Tests of the bias products on synthetic data with known truth."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sitiancal.compute.bias import (
    bias_stability,
    dsnu_emva,
    row_column_profiles,
    temporal_column_noise,
    temporal_row_noise,
)

# ---------------------------------------------------------------------------
# bias stability
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bias_stability_recovers_drift_and_scatter(seed):
    rng = np.random.default_rng(seed)
    n, duration, sd = 300, 3 * 3600.0, 0.03  # 0.03 ADU scatter, the reference study's
    drift = 0.02  # ADU/hour
    t = np.sort(rng.uniform(0.0, duration, n))
    level = 1000.0 + drift * t / 3600.0 + rng.normal(0.0, sd, n)
    res = bias_stability(t, level)
    assert res.n_frames == n
    # analytic OLS error of the slope: sd / sqrt(sum (t - tbar)^2), in ADU/hour
    expected_err = sd / np.sqrt(np.sum((t - t.mean()) ** 2)) * 3600.0
    assert res.drift_err == pytest.approx(expected_err, rel=4 * np.sqrt(1 / (2 * n)))
    assert abs(res.drift - drift) < 4 * res.drift_err
    assert abs(res.residual_std - sd) < 4 * sd / np.sqrt(2 * (n - 2))
    # the raw std includes the drift: sd^2 + drift^2 * var(t)
    std_true = np.sqrt(sd**2 + (drift / 3600.0) ** 2 * np.var(t))
    assert abs(res.std - std_true) < 4 * res.std_err
    assert abs(res.mean - (1000.0 + drift * t.mean() / 3600.0)) < 4 * res.mean_err
    assert res.peak_to_peak == pytest.approx(level.max() - level.min())
    assert res.duration == pytest.approx(t.max() - t.min())
    json.dumps(res.to_dict())


def test_bias_stability_ignores_nan_and_handles_short_series():
    t = np.array([0.0, 60.0, 120.0, np.nan, 240.0])
    y = np.array([10.0, 10.1, np.nan, 10.3, 10.2])
    res = bias_stability(t, y)
    assert res.n_frames == 3
    assert res.drift == pytest.approx(np.polyfit([0, 60, 240], [10.0, 10.1, 10.2], 1)[0] * 3600)
    short = bias_stability(np.array([0.0, 1.0]), np.array([5.0, 5.5]))
    assert np.isnan(short.drift) and np.isnan(short.drift_err)
    assert short.to_dict()["drift"] is None
    with pytest.raises(ValueError):
        bias_stability(np.array([np.nan]), np.array([1.0]))


# ---------------------------------------------------------------------------
# row / column profiles
# ---------------------------------------------------------------------------


def test_row_column_profiles_recover_offsets_robustly():
    rng = np.random.default_rng(4)
    ny, nx, sd = 120, 160, 2.0
    r = rng.normal(0.0, 0.5, ny)
    c = rng.normal(0.0, 0.8, nx)
    master = 1000.0 + r[:, None] + c[None, :] + rng.normal(0.0, sd, (ny, nx))
    hot = rng.random(master.shape) < 0.005
    master[hot] += 500.0  # hot pixels must not pull the profiles
    master[rng.random(master.shape) < 0.01] = np.nan
    master[7, :] = np.nan  # a fully masked row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, cols = row_column_profiles(master.astype(np.float32))
    assert rows.shape == (ny,) and cols.shape == (nx,)
    assert np.isnan(rows[7]) and np.isfinite(np.delete(rows, 7)).all()
    # offsets are defined up to the global level: compare after removing the
    # mean difference; each row mean scatters by ~ sd / sqrt(nx) (x ~1.03 for clipping)
    d_rows = np.delete(rows - r, 7)
    d_cols = cols - c
    assert np.std(d_rows) < 1.3 * sd / np.sqrt(nx)
    assert np.std(d_cols) < 1.3 * sd / np.sqrt(ny)
    # the level is the median of the row means: the offsets are centred to a
    # fraction of the row-pattern scatter
    assert abs(np.mean(d_rows)) < 0.2 and abs(np.mean(d_cols)) < 0.2
    assert abs(np.nanmedian(rows)) < 1e-12


def test_row_column_profiles_all_nan():
    rows, cols = row_column_profiles(np.full((4, 5), np.nan))
    assert np.isnan(rows).all() and np.isnan(cols).all()


# ---------------------------------------------------------------------------
# DSNU
# ---------------------------------------------------------------------------


def _dark_map(rng, ny, nx, row_sd, col_sd, pix_sd, temporal_sd, n_frames):
    """Averaged map of n_frames frames with row, column and pixel structure."""
    pattern = (
        rng.normal(0.0, row_sd, ny)[:, None]
        + rng.normal(0.0, col_sd, nx)[None, :]
        + rng.normal(0.0, pix_sd, (ny, nx))
    )
    # mean of n_frames Gaussian frames = pattern + N(0, temporal_sd^2 / L)
    return 500.0 + pattern + rng.normal(0.0, temporal_sd / np.sqrt(n_frames), (ny, nx))


@pytest.mark.parametrize("seed", [10, 11])
def test_dsnu_split_recovers_components(seed):
    rng = np.random.default_rng(seed)
    truth = {"row": 0.5, "column": 0.8, "pixel": 2.0}
    m = _dark_map(rng, 300, 400, truth["row"], truth["column"], truth["pixel"], 4.0, 20)
    res = dsnu_emva(m.astype(np.float32), temporal_var=16.0, n_frames=20, gain=0.25)
    for name, value in truth.items():
        est, err = getattr(res, name), getattr(res, f"{name}_err")
        assert abs(est - value) < 4 * err, (name, est, err)
    total = np.sqrt(sum(v * v for v in truth.values()))
    assert abs(res.total - total) < 4 * res.total_err
    assert res.total**2 == pytest.approx(res.row**2 + res.column**2 + res.pixel**2)
    assert res.pixel_e == pytest.approx(0.25 * res.pixel)
    assert (res.ny, res.nx, res.n_frames) == (300, 400, 20)
    # without the temporal correction the pixel part would be sqrt(4 + 0.8) = 2.19
    assert res.pixel < 2.1
    json.dumps(res.to_dict())


def test_dsnu_errors_match_monte_carlo_scatter():
    """The quoted 1-sigma errors describe the scatter over realisations."""
    rng = np.random.default_rng(12)
    fits = [
        dsnu_emva(_dark_map(rng, 60, 80, 0.5, 0.8, 2.0, 4.0, 20), temporal_var=16.0, n_frames=20)
        for _ in range(150)
    ]
    for name in ("row", "column", "pixel", "total"):
        values = np.array([getattr(f, name) for f in fits])
        quoted = np.median([getattr(f, f"{name}_err") for f in fits])
        # the std of 150 draws is known to ~ 1/sqrt(2*149) = 6%: allow 25%
        assert np.std(values, ddof=1) == pytest.approx(quoted, rel=0.25), name
        # unbiased within the error of the mean over realisations
        target = {"row": 0.5, "column": 0.8, "pixel": 2.0, "total": np.sqrt(4.89)}[name]
        assert abs(values.mean() - target) < 4 * quoted / np.sqrt(len(fits)) + 0.02 * target


def test_dsnu_from_frames_end_to_end():
    """Average real frames (temporal noise 4 ADU, L = 20) and recover the pattern."""
    rng = np.random.default_rng(13)
    ny, nx, n_frames = 150, 200, 20
    r = rng.normal(0.0, 0.5, ny)
    c = rng.normal(0.0, 0.8, nx)
    p = rng.normal(0.0, 2.0, (ny, nx))
    pattern = r[:, None] + c[None, :] + p
    master = np.zeros((ny, nx))
    for _ in range(n_frames):
        master += 500.0 + pattern + rng.normal(0.0, 4.0, (ny, nx))
    master /= n_frames
    res = dsnu_emva(master, temporal_var=16.0, n_frames=n_frames)
    # compare with the realised pattern's ANOVA components (no temporal noise)
    realised = dsnu_emva(500.0 + pattern, temporal_var=0.0, n_frames=1)
    for name in ("row", "column", "pixel"):
        assert abs(getattr(res, name) - getattr(realised, name)) < 4 * getattr(res, f"{name}_err")
    assert np.isnan(res.total_e)


def test_dsnu_rejects_bad_input():
    m = np.ones((5, 5))
    m[2, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dsnu_emva(m, temporal_var=1.0, n_frames=2)
    with pytest.raises(ValueError):
        dsnu_emva(np.ones(5), temporal_var=1.0, n_frames=2)
    with pytest.raises(ValueError):
        dsnu_emva(np.ones((5, 5)), temporal_var=1.0, n_frames=0)


# ---------------------------------------------------------------------------
# temporal row / column noise
# ---------------------------------------------------------------------------


def _frames(rng, n_frames, ny, nx, pix_sd, row_sd, col_sd):
    fixed_rows = rng.normal(0.0, 1.0, ny)[None, :, None]  # fixed pattern: removed
    level = rng.normal(0.0, 0.2, n_frames)[:, None, None]  # frame jitter: removed
    return (
        1000.0
        + fixed_rows
        + level
        + rng.normal(0.0, row_sd, (n_frames, ny, 1))
        + rng.normal(0.0, col_sd, (n_frames, 1, nx))
        + rng.normal(0.0, pix_sd, (n_frames, ny, nx))
    )


def test_temporal_row_and_column_noise_recover_truth():
    rng = np.random.default_rng(20)
    n_frames, ny, nx, pix_sd = 40, 150, 200, 4.0
    frames = _frames(rng, n_frames, ny, nx, pix_sd, row_sd=0.3, col_sd=0.15)
    rows = temporal_row_noise(frames.mean(axis=2), pixel_var=pix_sd**2, nx=nx)
    cols = temporal_column_noise(frames.mean(axis=1), pixel_var=pix_sd**2, ny=ny)
    # row means also carry the column noise averaged over nx columns: its
    # variance per row-mean is col_sd^2 / nx but it is common to all rows of a
    # frame, so the frame-level removal takes it out (and vice versa)
    assert abs(rows.temporal_row_noise - 0.3) < 4 * rows.temporal_row_noise_err
    assert abs(cols.temporal_column_noise - 0.15) < 4 * cols.temporal_column_noise_err
    assert rows.expected_from_pixels == pytest.approx(pix_sd / np.sqrt(nx))
    assert rows.ratio_to_pixel_noise == pytest.approx(rows.temporal_row_noise / pix_sd)
    assert (rows.n_frames, rows.n_rows, cols.n_columns) == (n_frames, ny, nx)
    json.dumps(rows.to_dict())
    json.dumps(cols.to_dict())


def test_temporal_row_noise_absent_is_consistent_with_zero():
    rng = np.random.default_rng(21)
    n_frames, ny, nx, pix_sd = 30, 120, 160, 4.0
    frames = _frames(rng, n_frames, ny, nx, pix_sd, row_sd=0.0, col_sd=0.0)
    res = temporal_row_noise(frames.mean(axis=2), pixel_var=pix_sd**2, nx=nx)
    # the measured scatter is the pixel-noise expectation within its error
    dof = (n_frames - 1) * (ny - 1)
    rel = np.sqrt(2.0 / dof) / 2.0  # relative error of a std
    assert res.measured_std == pytest.approx(
        res.expected_from_pixels, abs=4 * rel * res.measured_std
    )
    # 4-sigma upper limit: noise^2 = measured - expected <= 4 err(measured var)
    limit = np.sqrt(4 * res.measured_std**2 * np.sqrt(2.0 / dof))
    assert res.temporal_row_noise < limit
    with pytest.raises(ValueError):
        temporal_row_noise(np.ones((1, 5)), pixel_var=1.0, nx=10)
