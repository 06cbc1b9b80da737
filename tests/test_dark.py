"""Per-pixel dark-rate fit, populations and summary against synthetic truth.

Frames are simulated per pixel: Poisson dark electrons, Gaussian read noise,
gain 0.25 e-/ADU, rounding to integer ADU; groups of 5 dark frames and a
bias group of 20 frames (t = 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sitiancal.compute.dark import dark_populations, dark_summary, fit_dark_rate

GAIN = 0.25  # e-/ADU
TIMES = np.array([0.0, 10.0, 30.0, 60.0, 120.0, 300.0])  # s
COUNTS = np.array([20, 5, 5, 5, 5, 5])


def _groups(rate_e: np.ndarray, rng: np.random.Generator, *, times: np.ndarray = TIMES,
            counts: np.ndarray = COUNTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group means and unbiased variances (ADU, ADU^2), shape (P, K), and the
    true per-frame read variance (ADU^2, rounding included)."""
    p = rate_e.size
    read_adu = 1.03 / GAIN * rng.lognormal(0.0, 0.15, p)
    bias = 500.0 + rng.normal(0.0, 3.0, p)
    means, variances = [], []
    for t, n in zip(times, counts, strict=True):
        electrons = rng.poisson(rate_e * t, size=(n, p))
        adu = np.round(bias + electrons / GAIN + rng.normal(0.0, 1.0, (n, p)) * read_adu)
        means.append(adu.mean(axis=0))
        variances.append(adu.var(axis=0, ddof=1))
    return np.stack(means, axis=-1), np.stack(variances, axis=-1), read_adu**2 + 1.0 / 12.0


@pytest.fixture(scope="module")
def population() -> dict:
    rng = np.random.default_rng(3)
    p = 20_000
    rate_e = rng.lognormal(np.log(0.002), 0.4, p)  # the reference 0.002 e-/s
    hot = rng.random(p) < 0.05
    rate_e[hot] = np.exp(rng.uniform(np.log(0.05), np.log(5.0), hot.sum()))
    mean, var, read_var = _groups(rate_e, rng)
    fit = fit_dark_rate(TIMES, mean, var, COUNTS)
    return {"rate_e": rate_e, "hot": hot, "mean": mean, "var": var, "fit": fit,
            "read_var": read_var}


def test_rate_errors_are_calibrated(population: dict) -> None:
    fit, rate_e, hot = population["fit"], population["rate_e"], population["hot"]
    truth = rate_e / GAIN
    pull = (fit.rate - truth) / fit.rate_err
    assert np.all(np.isfinite(pull))
    # tiny true rates: many estimates are negative, and that is fine
    assert np.mean(fit.rate[~hot] < 0) > 0.05
    # Student-t like pulls with ~37 degrees of freedom: std sqrt(37/35) = 1.03;
    # the standard error of a std over 19000 pixels is 0.005
    assert abs(pull[~hot].mean()) < 0.05
    assert 0.98 < pull[~hot].std() < 1.09
    # hot pixels (shot-noise dominated, ~1000 of them: standard errors ~0.03)
    assert abs(pull[hot].mean()) < 0.15
    assert 0.93 < pull[hot].std() < 1.15
    # reduced chi-square ~ F(4, 37): mean 37/35 = 1.06
    assert 0.98 < np.mean(fit.chi2_red) < 1.15
    assert np.all(fit.n_points == TIMES.size)


def test_variance_model_beats_sample_variance_weights(population: dict) -> None:
    """Weights from each group's own 4-dof sample variance mis-state the errors."""
    fit, rate_e = population["fit"], population["rate_e"]
    truth = rate_e / GAIN
    mean, var = population["mean"], np.maximum(population["var"], 1.0 / 12.0)
    w = COUNTS / var
    sw = w.sum(axis=-1)
    tm = (w * TIMES).sum(axis=-1) / sw
    stt = (w * (TIMES - tm[:, None]) ** 2).sum(axis=-1)
    naive = (w * (TIMES - tm[:, None]) * mean).sum(axis=-1) / stt
    naive_pull = (naive - truth) * np.sqrt(stt)
    assert naive_pull.std() > 1.25  # errors ~30 % too small
    assert np.std(naive - truth) > 1.1 * np.std(fit.rate - truth)  # and less efficient


def test_read_variance_and_offset_recovered(population: dict) -> None:
    fit = population["fit"]
    # the bias level of the simulation is 500 +- 3 ADU
    assert abs(np.median(fit.offset) - 500.0) < 0.2
    pull = (fit.offset - population["mean"][:, 0]) / fit.offset_err
    assert np.abs(pull).max() < 10
    # read variance: each pixel's estimate has ~37 degrees of freedom (23 % scatter);
    # over the population the IRLS fit is biased low by ~3 % (few points per pixel)
    # (away from hot pixels, whose variance is dominated by shot noise)
    cold = ~population["hot"]
    ratio = fit.read_var[cold] / population["read_var"][cold]
    assert 0.95 < np.mean(ratio) < 1.01
    assert 0.15 < np.std(ratio) < 0.35
    # shot slope b = rate / g (ADU^2/s) for hot pixels
    hot = population["hot"] & (population["rate_e"] > 1.0)
    ratio = fit.shot_slope[hot] / (population["rate_e"][hot] / GAIN**2)
    assert 0.9 < np.median(ratio) < 1.1


def test_noise_free_line_is_exact() -> None:
    t = np.array([0.0, 5.0, 20.0, 60.0])
    rate = np.array([[0.5, 2.0], [0.0, 10.0]])  # ADU/s, pixel shape (2, 2)
    offset = np.array([[100.0, 200.0], [300.0, 400.0]])
    mean = offset[..., None] + rate[..., None] * t
    var = np.full(mean.shape, 16.0)
    fit = fit_dark_rate(t, mean, var, np.full((2, 2, 4), 8))
    assert fit.rate.shape == (2, 2)
    np.testing.assert_allclose(fit.rate, rate, atol=1e-10)
    np.testing.assert_allclose(fit.offset, offset, atol=1e-8)
    np.testing.assert_allclose(fit.chi2_red, 0.0, atol=1e-12)
    # error of a slope with constant variance 16/8 per point
    expected = np.sqrt(2.0 / np.sum((t - t.mean()) ** 2))
    np.testing.assert_allclose(fit.rate_err, expected, rtol=1e-12)


def test_missing_groups_and_validation() -> None:
    t = np.array([0.0, 10.0, 30.0])
    mean = np.array([[100.0, 110.0, 130.0], [100.0, np.nan, 130.0], [np.nan, np.nan, 5.0]])
    var = np.full(mean.shape, 4.0)
    fit = fit_dark_rate(t, mean, var, np.array([5, 5, 5]))
    np.testing.assert_array_equal(fit.n_points, [3, 2, 1])
    np.testing.assert_allclose(fit.rate[:2], [1.0, 1.0])
    assert np.isnan(fit.chi2_red[1]) and np.isnan(fit.rate[2])
    with pytest.raises(ValueError):
        fit_dark_rate(np.array([10.0, 10.0]), mean[:, :2], var[:, :2], np.array([5, 5]))
    with pytest.raises(ValueError):
        fit_dark_rate(t, mean, var[:, :2], np.array([5, 5, 5]))


def test_summary_median_and_error() -> None:
    rng = np.random.default_rng(8)
    n = 40_000
    rate = rng.normal(0.002, 0.0005, n)
    s = dark_summary(rate, np.full(n, 0.0003), temperature=-10.0)
    assert s["temperature_c"] == -10.0 and s["n_pixels"] == n
    # asymptotic error of a normal sample's median: sqrt(pi/2) sigma / sqrt(N);
    # the order-statistic interval from +-100 ranks is itself ~7 % uncertain
    expected = 1.2533 * 0.0005 / np.sqrt(n)
    assert abs(s["median_err"] / expected - 1.0) < 0.25
    assert abs(s["median"] - 0.002) < 4 * expected
    assert s["percentiles"]["p50"] == pytest.approx(s["median"], rel=1e-9)
    assert s["frac_above"]["0.01"] == 0.0
    hot = np.concatenate([rate, np.full(400, 2.0)])
    s2 = dark_summary(hot, np.full(hot.size, 0.001), temperature=None)
    assert s2["frac_above"]["1"] == pytest.approx(400 / hot.size)
    assert s2["temperature_c"] is None
    json.dumps(s2)
    empty = dark_summary(np.array([np.nan]), np.array([np.nan]), temperature=0.0)
    assert empty["n_pixels"] == 0 and empty["median"] is None


def test_populations_of_rates() -> None:
    rng = np.random.default_rng(12)
    n = 30_000
    err = rng.uniform(0.0008, 0.0015, n)
    true = rng.normal(0.002, 0.0004, n)
    warm = rng.random(n) < 0.02
    true[warm] = rng.normal(0.03, 0.004, warm.sum())
    x = true + rng.normal(0.0, err)
    x[:5] = np.nan
    pops = dark_populations(x, err, max_components=3, seed=1)
    best = pops.best
    assert pops.n_input == n - 5
    assert best.n_components >= 2
    main = int(np.argmax(best.weights))
    assert abs(best.means[main] - 0.002) < 3 * best.means_err[main]
    k_warm = int(np.argmin(np.abs(best.means - 0.03)))
    assert abs(best.weights[k_warm] - warm.mean()) < 0.003


# --------------------------------------------------------------------------- compiled vs reference


def _dark_inputs(seed: int, n_pix: int = 4000):
    rng = np.random.default_rng(seed)
    t = np.array([0.0, 0.0, 60.0, 300.0])
    mean = 500.0 + rng.normal(0.0, 1.0, (n_pix, 4)) + 0.1 * t
    var = 16.0 * rng.chisquare(4, (n_pix, 4)) / 4
    mean[rng.random(mean.shape) < 0.03] = np.nan
    var[rng.random(var.shape) < 0.03] = np.nan
    var[:20] = 0.0  # zero sample variances: the model floor
    mean[20:40, 2:] = np.nan  # one exposure time left: no line
    var[40:60, 2:] = 1e-3  # variance falling with time: constrained b = 0
    mean[60:70] = np.nan  # nothing usable
    mean[70:75, 1] = np.inf  # an infinite mean or variance is not used
    var[75:80, 3] = -np.inf
    return t, mean, var


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_dark_rate_numba_matches_numpy(seed: int) -> None:
    t, mean, var = _dark_inputs(seed)
    counts = np.array([12, 3, 3, 3])
    per_pixel = np.broadcast_to(counts, mean.shape).copy()
    per_pixel[np.random.default_rng(seed).random(mean.shape) < 0.05] = 1  # n = 1: no variance
    for n in (counts, per_pixel):
        for m, v in ((mean, var), (mean.astype(np.float32), var.astype(np.float32))):
            fast = fit_dark_rate(t, m.reshape(40, -1, 4), v.reshape(40, -1, 4), n if n.ndim == 1
                                 else n.reshape(40, -1, 4))
            ref = fit_dark_rate(t, m.reshape(40, -1, 4), v.reshape(40, -1, 4), n if n.ndim == 1
                                else n.reshape(40, -1, 4), backend="numpy")
            for name in ("rate", "rate_err", "offset", "offset_err", "chi2_red", "read_var",
                         "shot_slope"):
                a, b = getattr(fast, name), getattr(ref, name)
                assert a.shape == (40, 100) and a.dtype == np.float64
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=name)
            np.testing.assert_array_equal(fast.n_points, ref.n_points)
            assert fast.n_points.dtype == np.int32
    # the degenerate rows are NaN in both, not just equal
    fit = fit_dark_rate(t, mean, var, counts)
    assert np.isnan(fit.rate[20:40]).all() and np.isnan(fit.rate[60:70]).all()
    assert (fit.read_var[:20] >= 1.0 / 12.0).all()


def test_fit_dark_rate_backend_is_checked() -> None:
    t, mean, var = _dark_inputs(2, 10)
    with pytest.raises(ValueError, match="backend"):
        fit_dark_rate(t, mean, var, np.array([5, 5, 5, 5]), backend="gpu")  # type: ignore[arg-type]
