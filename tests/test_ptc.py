"""Tests of the conventional PTC: scaled pair differences and the linear / Astier fits.

Synthetic flat pairs are drawn the way the sensor works: Poisson electrons on a
pattern of PRNU and vignetting, Gaussian read noise, conversion to ADU with a
known gain, a bias map with DSNU, integer quantisation and ADC saturation.
"""

from __future__ import annotations

import numpy as np
import pytest

from sitiancal.compute.ptc import (
    PairStats,
    find_turnoff,
    fit_ptc,
    pair_stats,
    turnoff_is_lower_bound,
)

GAIN = 0.254  # e-/ADU (reference study)
RN_E = 1.03  # e- (reference study)
RN_ADU = RN_E / GAIN
SHAPE = (192, 192)
BIAS = 500.0  # ADU
ADC_MAX = 65535


class Sensor:
    """Fixed patterns of one synthetic sensor and a flat-pair generator."""

    def __init__(self, seed: int, *, prnu: float = 0.01, vignetting: float = 0.10) -> None:
        self.rng = np.random.default_rng(seed)
        ny, nx = SHAPE
        y, x = np.mgrid[0:ny, 0:nx]
        r2 = ((y - ny / 2) / ny) ** 2 + ((x - nx / 2) / nx) ** 2
        vig = 1.0 - vignetting * r2 / r2.max()
        self.pattern = vig / vig.mean() * (1.0 + prnu * self.rng.standard_normal(SHAPE))
        self.bias = BIAS + 2.0 * self.rng.standard_normal(SHAPE)  # DSNU 2 ADU

    def frame(self, signal_adu: float) -> np.ndarray:
        electrons = self.rng.poisson(signal_adu * GAIN * self.pattern)
        adu = self.bias + (electrons + RN_E * self.rng.standard_normal(SHAPE)) / GAIN
        return np.clip(np.round(adu), 0, ADC_MAX)

    def pair(self, signal_adu: float, change: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
        """Two frames of one level; the second is exposed ``change`` brighter."""
        return self.frame(signal_adu), self.frame(signal_adu * (1.0 + change))


def _ptc_points(sensor: Sensor, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    stats = [pair_stats(*sensor.pair(s), offset=sensor.bias) for s in levels]
    return tuple(np.array([getattr(p, k) for p in stats]) for k in ("mean", "var", "var_err"))


# Bias-subtracted levels (ADU) from near zero to beyond the ADC saturation (~65000).
LEVELS = np.array(
    [2, 8, 20, 50, 120, 300, 700, 1500, 3000, 6000, 10000, 15000, 20000, 26000, 32000,
     38000, 44000, 50000, 56000, 61000, 64000, 66000, 68000, 72000],
    dtype=float,
)  # fmt: skip


def _true_var(mean: np.ndarray) -> np.ndarray:
    # Shot noise + read noise + rounding (1/12 ADU^2).
    return mean / GAIN + RN_ADU**2 + 1.0 / 12.0


def test_pair_stats_recovers_temporal_variance_and_cancels_prnu() -> None:
    sensor = Sensor(1, prnu=0.01, vignetting=0.10)
    level = 30000.0
    f1, f2 = sensor.pair(level, change=0.005)
    ps = pair_stats(f1, f2, offset=sensor.bias)
    assert isinstance(ps, PairStats)
    truth = _true_var(np.array(ps.mean))
    # Statistical precision of one pair: sqrt(2/n) ~ 0.74 %; allow 4 sigma.
    assert ps.var_err == pytest.approx(ps.var * np.sqrt(2 / (ps.n_pixels - 1)))
    assert abs(ps.var - truth) < 4 * ps.var_err
    assert ps.mean == pytest.approx(level * 1.0025, rel=2e-3)
    # The spatial variance of one frame is dominated by PRNU + vignetting: >> temporal.
    assert np.var(f1 - sensor.bias) > 4 * ps.var
    # A scalar bias leaves DSNU in each frame; it cancels in the difference too.
    ps_scalar = pair_stats(f1, f2, offset=BIAS)
    assert abs(ps_scalar.var - truth) < 4 * ps_scalar.var_err


def test_pair_scaling_removes_illumination_change() -> None:
    # A strong 5 % change and 5 % PRNU: without the scaled difference, the pattern
    # (mu1 - mu2) * P adds ~ (0.05 * 0.05 * mu)^2 / 2 ~ 5 % to the variance.
    sensor = Sensor(2, prnu=0.05, vignetting=0.0)
    f1, f2 = sensor.pair(40000.0, change=0.05)
    ps = pair_stats(f1, f2, offset=sensor.bias)
    truth = _true_var(np.array(ps.mean))
    assert abs(ps.var - truth) < 4 * ps.var_err
    naive = np.var((f1 - sensor.bias) - (f2 - sensor.bias), ddof=1) / 2
    assert naive - truth > 5 * ps.var_err


def test_pair_stats_sigma_clips_outliers() -> None:
    sensor = Sensor(3)
    f1, f2 = sensor.pair(5000.0)
    clean = pair_stats(f1, f2, offset=sensor.bias)
    rng = np.random.default_rng(33)
    hits = rng.choice(f1.size, 40, replace=False)
    f1 = f1.copy()
    f1.flat[hits] = ADC_MAX  # cosmic rays / hot pixels in one frame
    f2 = f2.copy()
    f2[5, 7] = np.nan  # a masked pixel
    dirty = pair_stats(f1, f2, offset=sensor.bias)
    assert dirty.n_pixels <= clean.n_pixels - 40
    assert dirty.var == pytest.approx(clean.var, rel=5e-3)
    assert dirty.mean == pytest.approx(clean.mean, rel=1e-4)


@pytest.fixture(scope="module")
def ptc_points() -> tuple[np.ndarray, ...]:
    return _ptc_points(Sensor(10), LEVELS)


def test_linear_fit_recovers_gain_read_noise_and_excludes_saturation(ptc_points) -> None:
    mean, var, var_err = ptc_points
    fit = fit_ptc(mean, var, var_err, model="linear")
    # Gain within 1 % (the fit's own error is ~0.1 %).
    assert fit.gain == pytest.approx(GAIN, rel=0.01)
    assert abs(fit.gain - GAIN) < 4 * fit.gain_err
    # Read noise: truth in the intercept includes rounding, sqrt(RN^2 + g^2/12).
    rn_expected = np.sqrt(RN_E**2 + GAIN**2 / 12)
    assert fit.read_noise_e == pytest.approx(rn_expected, rel=0.03)
    assert abs(fit.read_noise_e - rn_expected) < 4 * fit.read_noise_e_err
    assert fit.read_noise_adu == pytest.approx(fit.read_noise_e / fit.gain)
    # Saturated / clipped points (>= ~64000 ADU) are excluded automatically,
    # while the healthy points up to 56000 ADU are kept.
    assert not fit.used[mean > 62000].any()
    assert fit.used[(mean > 0) & (mean < 56500)].all()
    # The turnoff lies near the ADC limit minus bias, and full well = turnoff * g.
    assert 58000 < fit.turnoff_adu < ADC_MAX - BIAS
    assert fit.full_well_e == pytest.approx(fit.turnoff_adu * fit.gain)
    assert 0.3 < fit.chi2_red < 3.0
    assert np.isnan(fit.a00)
    d = fit.to_dict()
    assert d["model"] == "linear" and len(d["used"]) == mean.size


def test_max_mean_limits_fitted_points(ptc_points) -> None:
    mean, var, var_err = ptc_points
    fit = fit_ptc(mean, var, var_err, max_mean=20000.0)
    assert not fit.used[mean > 20000.0].any()
    assert fit.gain == pytest.approx(GAIN, rel=0.01)


def test_outlier_point_is_rejected(ptc_points) -> None:
    mean, var, var_err = (a.copy() for a in ptc_points)
    var[9] *= 1.2  # a bad pair (e.g. lamp flicker)
    fit = fit_ptc(mean, var, var_err)
    assert not fit.used[9]
    assert fit.residuals[9] > 5
    assert fit.gain == pytest.approx(GAIN, rel=0.01)


def test_find_turnoff_refines_between_points() -> None:
    mean = np.array([10000.0, 20000.0, 30000.0, 40000.0, 50000.0])
    var = -((mean - 33000.0) ** 2) + 1e9  # symmetric peak at 33000
    assert find_turnoff(mean[::-1], var[::-1]) == pytest.approx(33000.0)
    # Monotonic curve: no turnoff reached, the brightest point is returned.
    assert find_turnoff(mean, mean / GAIN) == 50000.0
    assert np.isnan(find_turnoff(np.array([np.nan]), np.array([1.0])))
    # A ladder that steps from below the ADC limit to clipped levels (variance
    # ~0): the brightest unclipped level, not a parabola through the collapse
    # (which fell to 52 418 ADU here).
    mean = np.array([40000.0, 44867.0, 57692.0, 65035.0, 65035.0])
    var = mean / GAIN
    var[3:] = 0.0
    assert find_turnoff(mean, var) == 57692.0
    assert turnoff_is_lower_bound(mean[::-1], var[::-1])
    peak = np.array([10000.0, 20000.0, 30000.0, 40000.0, 50000.0])
    assert turnoff_is_lower_bound(peak, peak / GAIN)  # no turnover reached
    assert not turnoff_is_lower_bound(peak, -((peak - 33000.0) ** 2) + 1e9)


def _astier_var(mu: np.ndarray, a00: float, gain: float, n00: float) -> np.ndarray:
    return np.expm1(2 * a00 * gain * mu) / (2 * a00 * gain**2) + n00 / gain**2


def test_astier_fit_recovers_a00() -> None:
    rng = np.random.default_rng(20)
    a00, n00 = -2e-6, RN_E**2
    mean = np.geomspace(20, 50000, 30)
    truth = _astier_var(mean, a00, GAIN, n00)
    n_pix = 1_000_000  # a 1000 x 1000 central region
    err = truth * np.sqrt(2 / (n_pix - 1))
    var = truth + err * rng.standard_normal(mean.size)
    fit = fit_ptc(mean, var, err, model="astier")
    assert fit.used.all()
    assert abs(fit.a00 - a00) < 4 * fit.a00_err
    assert fit.a00_err < 0.1 * abs(a00)
    assert abs(fit.gain - GAIN) < 4 * fit.gain_err
    assert abs(fit.read_noise_e - RN_E) < 4 * fit.read_noise_e_err
    # The linear model cannot describe the brighter-fatter curvature.
    lin = fit_ptc(mean, var, err, model="linear", reject_sigma=np.inf)
    assert lin.chi2_red > 10 * fit.chi2_red


def test_astier_reduces_to_linear_without_brighter_fatter(ptc_points) -> None:
    mean, var, var_err = ptc_points
    fit = fit_ptc(mean, var, var_err, model="astier")
    assert abs(fit.a00) < 4 * fit.a00_err
    assert fit.gain == pytest.approx(GAIN, rel=0.01)


def test_fit_ptc_input_errors() -> None:
    with pytest.raises(ValueError, match="model"):
        fit_ptc(np.arange(5.0), np.arange(5.0), np.ones(5), model="cubic")
    with pytest.raises(ValueError, match="usable"):
        fit_ptc(np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.ones(2))


def test_level_pair_stats_equal_the_serial_computation() -> None:
    # the plan stage runs the pair statistics on threads: the same numbers, in level order
    from sitiancal.compute.plan import _level_pair_stats
    from sitiancal.compute.tile import FrameGroup

    rng = np.random.default_rng(11)
    frames = rng.normal(1000.0, 30.0, (40, 64, 64)) * np.linspace(1, 20, 40)[:, None, None] ** 0.5
    groups = [FrameGroup("flat", float(i), tuple(range(4 * i, 4 * i + 4))) for i in range(10)]
    groups[3] = FrameGroup("flat", 3.0, (12,))  # one frame: no pair, the level is skipped
    offsets = {li: rng.normal(100.0, 1.0, (64, 64)) for li in range(10)}
    reads: list[list[int]] = []

    def read_region(indices):
        reads.append(list(indices))
        return frames[list(indices)]

    got = list(_level_pair_stats(groups, read_region, 2, offsets.__getitem__))
    assert [li for li, _ in got] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    for li, stats in got:
        idx = groups[li].indices
        expected = [pair_stats(frames[idx[0]], frames[idx[1]], offset=offsets[li]),
                    pair_stats(frames[idx[2]], frames[idx[3]], offset=offsets[li])]
        assert stats == expected
    assert len(reads) == 18  # each pair's region read once


def test_pair_stats_equal_the_astropy_clipping_reference() -> None:
    """pair_stats on sorted-slice clipping gives astropy sigma_clip's numbers.

    The reference recomputes the statistic the way it was first written: each
    frame and the scaled difference clipped by ``astropy.stats.sigma_clip``
    (median/std, 5 sigma, to convergence), means and ddof-1 variance of the
    survivors.
    """
    from astropy.stats import sigma_clip

    rng = np.random.default_rng(11)
    offset = BIAS + rng.normal(0.0, 3.0, SHAPE)
    e = rng.poisson(20000.0 * (1 + rng.normal(0, 0.01, SHAPE)), (2, *SHAPE))
    frames = e * (1 / GAIN) + rng.normal(0.0, RN_ADU, (2, *SHAPE)) + offset
    frames.reshape(2, -1)[:, rng.choice(frames[0].size, 40, replace=False)] += 5000.0  # cosmics
    got = pair_stats(frames[0], frames[1], offset=offset)

    def kept(x: np.ndarray) -> np.ndarray:
        return np.asarray(sigma_clip(x.ravel(), sigma=5.0, maxiters=None, masked=False, axis=None))

    a, b = frames[0] - offset, frames[1] - offset
    mu1, mu2 = float(np.mean(kept(a))), float(np.mean(kept(b)))
    r = mu1 / mu2
    d = kept(a - r * b)
    assert got.n_pixels == d.size
    assert got.mean == pytest.approx(0.5 * (mu1 + mu2), rel=1e-13)
    assert got.var == pytest.approx(float(np.var(d, ddof=1)) / (1 + r * r), rel=1e-12)
