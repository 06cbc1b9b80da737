"""Tests of the per-pixel gain fit, the frame budget and the gain populations.

Per-pixel data are drawn the way a sensor works: every pixel has its own true
gain and read noise; either whole frames are drawn (Poisson electrons +
Gaussian read noise, converted to ADU) or, for large populations, the sample
mean and the sample variance are drawn from their exact distributions
(normal, and scaled chi-square with n - 1 degrees of freedom).
"""

from __future__ import annotations

import numpy as np
import pytest
from codegen import masked_stores, x86_only

from sitiancal.compute import gain as gain_module
from sitiancal.compute.gain import (
    PixelGainFit,
    fit_pixel_gain,
    frames_for_precision,
    gain_populations,
    gain_rel_err,
)

GAIN = 0.254  # e-/ADU (reference study)
RN_E = 1.03  # e-
MAX_MEAN = 45000.0  # ADU, ~70 % of the 16-bit range: the brightest level
FIT_LIMIT = 1.05 * MAX_MEAN  # max_mean of the fits: keeps the brightest level despite its noise


def _levels(n_levels: int) -> np.ndarray:
    """Evenly spaced mean levels up to MAX_MEAN (ADU)."""
    return np.arange(1, n_levels + 1) / n_levels * MAX_MEAN


def _draw_moments(
    rng: np.random.Generator, gain: np.ndarray, read_var: np.ndarray, levels: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and sample variance (ddof=1) of n frames per level, exact distributions."""
    mt = np.broadcast_to(levels, gain.shape + levels.shape)
    vt = np.abs(mt) / gain[..., None] + read_var[..., None]
    var = vt * rng.chisquare(n - 1, size=vt.shape) / (n - 1)
    mean = mt + np.sqrt(vt / n) * rng.standard_normal(vt.shape)
    return mean, var


def _draw_frames(
    rng: np.random.Generator, gain: np.ndarray, rn_e: np.ndarray, levels: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Temporal mean and variance from n simulated frames per level (Poisson + Gaussian)."""
    mean = np.empty(gain.shape + levels.shape)
    var = np.empty_like(mean)
    for i, level in enumerate(levels):
        electrons = rng.poisson(np.repeat((level * gain)[:, None], n, axis=1))
        adu = (electrons + rn_e[:, None] * rng.standard_normal((gain.size, n))) / gain[:, None]
        mean[:, i] = adu.mean(axis=1)
        var[:, i] = adu.var(axis=1, ddof=1)
    return mean, var


@pytest.fixture(scope="module")
def population() -> dict[str, np.ndarray]:
    """50k pixels, 1 % gain spread, 10 % read-noise spread, 40 frames x 14 levels."""
    rng = np.random.default_rng(7)
    n_pix, n, levels = 50_000, 40, _levels(14)
    gain = GAIN * (1 + 0.01 * rng.standard_normal(n_pix))
    rn_e = RN_E * (1 + 0.1 * rng.standard_normal(n_pix))
    mean, var = _draw_moments(rng, gain, (rn_e / gain) ** 2, levels, n)
    fit = fit_pixel_gain(mean, var, np.full(levels.size, n), max_mean=FIT_LIMIT)
    return {"gain": gain, "rn_e": rn_e, "fit": fit, "levels": levels, "n": n}


def test_median_gain_and_pulls(population) -> None:
    fit: PixelGainFit = population["fit"]
    gain = population["gain"]
    assert np.isfinite(fit.gain).all() and (fit.n_used == 14).all()
    # Median within 0.2 %. Per-pixel precision is 8.7 %; the slope a = 1/g is unbiased
    # (next test) but its sampling distribution has skewness ~0.08, which moves the
    # median of g = 1/a by +skew * sigma / 6 = +0.11 %; the median's statistical error
    # is 1.25 * 8.7 % / sqrt(5e4) = 0.05 % (0.11 +- 0.05 % over seeds, measured).
    assert np.median(fit.gain) / np.median(gain) == pytest.approx(1.0, abs=2e-3)
    pull = (fit.gain - gain) / fit.gain_err
    assert abs(np.mean(pull)) < 0.1
    assert np.std(pull) == pytest.approx(1.0, rel=0.1)
    # The intercept (read variance) is poorly determined per pixel from flat levels
    # >= 3750 ADU, but it is unbiased: its mean matches the truth within its error.
    d_read = fit.read_var - (population["rn_e"] / gain) ** 2
    assert abs(np.mean(d_read)) < 4 * np.std(d_read) / np.sqrt(d_read.size)
    # chi2_red ~ 1 (E = 1, sd ~ 0.45 per pixel).
    assert np.mean(fit.chi2_red) == pytest.approx(1.0, abs=0.02)


def test_slope_is_unbiased(population) -> None:
    # a = 1/g is the fitted parameter: its mean must match the truth within the
    # statistical error of the mean. Weighting with the observed variance would
    # bias it by ~ -10 % here (2 / (n - 1) per effective degree of freedom).
    ratio = population["gain"] / population["fit"].gain  # a_hat / a_true
    assert abs(np.mean(ratio) - 1) < 4 * np.std(ratio) / np.sqrt(ratio.size)


def test_frames_drawn_as_poisson_plus_gaussian() -> None:
    rng = np.random.default_rng(8)
    n_pix, n, levels = 10_000, 40, _levels(14)
    gain = GAIN * (1 + 0.01 * rng.standard_normal(n_pix))
    rn_e = RN_E * (1 + 0.1 * rng.standard_normal(n_pix))
    mean, var = _draw_frames(rng, gain, rn_e, levels, n)
    fit = fit_pixel_gain(mean, var, np.full(levels.size, n), max_mean=FIT_LIMIT)
    # Statistical error of the median: 1.25 * 8.7 % / sqrt(1e4) = 0.11 %; allow 3 sigma + bias.
    assert np.median(fit.gain) / np.median(gain) == pytest.approx(1.0, abs=4.5e-3)
    pull = (fit.gain - gain) / fit.gain_err
    assert abs(np.mean(pull)) < 0.1
    assert np.std(pull) == pytest.approx(1.0, rel=0.1)


def test_masked_levels_dead_pixels_and_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    levels = np.concatenate([[-5.0], _levels(10), [60000.0]])  # below 0 and above max_mean
    shape = (20, 30)
    gain = np.full(shape, GAIN)
    mean, var = _draw_moments(rng, gain, np.full(shape, 16.0), levels, 40)
    n = np.full(shape + levels.shape, 40)
    mean[0, 0, :] = np.nan  # dead pixel
    mean[0, 1, 3:] = np.nan  # only 2 usable levels (1 and 2)
    var[0, 2, 2:] = np.nan  # only 1 usable level
    n[1, 1, 5] = 1  # a level with one frame has no variance
    fit = fit_pixel_gain(mean, var, n, max_mean=FIT_LIMIT, min_levels=3)
    assert fit.gain.shape == shape and fit.n_used.dtype.kind == "i"
    assert fit.n_used[0, 0] == 0 and np.isnan(fit.gain[0, 0])
    assert fit.n_used[0, 1] == 2  # levels 1 and 2 (level 0 is below 0 ADU)
    assert np.isnan(fit.gain[0, 1]) and np.isnan(fit.gain_err[0, 1])
    assert fit.n_used[0, 2] == 1 and np.isnan(fit.gain[0, 2])
    assert fit.n_used[1, 1] == 9 and np.isfinite(fit.gain[1, 1])
    # The -5 ADU and 60000 ADU levels are never used.
    assert fit.n_used[5, 5] == 10
    good = np.isfinite(fit.gain)
    assert good.sum() == np.prod(shape) - 3
    assert np.median(fit.gain[good]) == pytest.approx(GAIN, rel=0.02)
    # A 1-D n per level gives the same answer as the same n given per pixel.
    one_d = fit_pixel_gain(mean, var, np.full(levels.size, 40), max_mean=FIT_LIMIT)
    full = fit_pixel_gain(mean, var, np.full(shape + levels.shape, 40), max_mean=FIT_LIMIT)
    assert np.array_equal(one_d.gain, full.gain, equal_nan=True)
    # Processing in blocks of pixels does not change the answer.
    monkeypatch.setattr(gain_module, "_CHUNK_PIXELS", 7)
    chunked = fit_pixel_gain(mean, var, n, max_mean=FIT_LIMIT, min_levels=3)
    assert np.array_equal(chunked.gain, fit.gain, equal_nan=True)
    assert np.array_equal(chunked.n_used, fit.n_used)
    # The default three reweighting iterations are within 5 % of a sigma of convergence.
    more = fit_pixel_gain(mean, var, n, max_mean=FIT_LIMIT, n_iter=15)
    assert np.nanmax(np.abs(more.gain - fit.gain) / fit.gain_err) < 0.05
    summary = fit.to_dict()
    assert summary["n_fitted"] == int(good.sum())


def test_frames_for_precision_matches_empirical_scatter() -> None:
    target, n_levels = 0.06, 12
    n = frames_for_precision(target, n_levels, max_mean=MAX_MEAN, gain=GAIN, read_var=16.4)
    assert gain_rel_err(n, _levels(n_levels) / MAX_MEAN, max_mean=MAX_MEAN) <= target
    assert gain_rel_err(n - 1, _levels(n_levels) / MAX_MEAN, max_mean=MAX_MEAN) > target
    rng = np.random.default_rng(11)
    n_pix = 20_000
    gain = np.full(n_pix, GAIN)
    mean, var = _draw_moments(rng, gain, np.full(n_pix, 16.4), _levels(n_levels), n)
    fit = fit_pixel_gain(mean, var, np.full(n_levels, n), max_mean=FIT_LIMIT)
    q16, q84 = np.percentile(fit.gain / GAIN, [15.865, 84.135])
    scatter = 0.5 * (q84 - q16)
    # The error of the robust scatter of 2e4 points is ~0.7 %; the budget rounds n up.
    assert 0.93 * target < scatter < 1.03 * target
    # Precision scales as 1/sqrt(n - 1): four times the frames, about half the error.
    assert frames_for_precision(
        target / 2, n_levels, max_mean=MAX_MEAN, gain=GAIN, read_var=16.4
    ) in (4 * (n - 1) - 3 + np.arange(8))
    with pytest.raises(ValueError):
        frames_for_precision(0.0, n_levels)


def test_gain_populations_recovers_bimodal_fraction() -> None:
    rng = np.random.default_rng(12)
    n_pix, n, levels = 20_000, 200, _levels(12)
    high = rng.random(n_pix) < 0.3
    gain = np.where(high, 0.32, GAIN) * (1 + 0.005 * rng.standard_normal(n_pix))
    mean, var = _draw_moments(rng, gain, (RN_E / gain) ** 2, levels, n)
    fit = fit_pixel_gain(mean, var, np.full(levels.size, n), max_mean=FIT_LIMIT)
    pops = gain_populations(fit.gain, fit.gain_err, max_components=3, seed=0)
    best = pops.best
    assert best.weights.size == 2
    frac = high.mean()
    # Fraction of the upper population within a few tenths of a percent of the sample's.
    assert abs(best.weights[1] - frac) < 0.005
    assert best.means == pytest.approx([GAIN, 0.32], rel=0.01)
    with pytest.raises(ValueError):
        gain_populations(np.full(3, np.nan), np.ones(3))


@pytest.mark.parametrize("linearizer", [None, np.array([1.0, 0.0]), np.array([2e-7, 1.0, 0.0])])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_pixel_gain_numba_matches_numpy(linearizer, dtype) -> None:
    rng = np.random.default_rng(17)
    levels = np.array([300.0, 3000.0, 8000.0, 15000.0, 25000.0, 40000.0])
    mean = levels * rng.normal(1.0, 0.01, (2000, 6))
    var = (mean / GAIN + 16.0) * rng.chisquare(5, (2000, 6)) / 5
    mean[rng.random(mean.shape) < 0.03] = np.nan
    var[rng.random(var.shape) < 0.03] = np.nan
    mean[:10] = -1.0  # no usable level
    var[10:20] = 0.0  # zero variances: degenerate line
    mean[20:30, :4] = 1e6  # above max_mean: too few levels
    mean[30:35, 2] = np.inf  # infinite levels are not used
    var[35:40, 3] = -np.inf
    m, v = mean.astype(dtype).reshape(40, 50, 6), var.astype(dtype).reshape(40, 50, 6)
    n = np.full(6, 6)
    fast = fit_pixel_gain(m, v, n, max_mean=30000.0, linearizer=linearizer)
    with np.errstate(invalid="ignore"):  # numpy's polynomial of an infinite level
        ref = fit_pixel_gain(m, v, n, max_mean=30000.0, linearizer=linearizer, backend="numpy")
    for name in ("gain", "gain_err", "read_var", "chi2_red"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.shape == (40, 50)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=name)
    np.testing.assert_array_equal(fast.n_used, ref.n_used)
    assert np.isfinite(fast.gain).mean() > 0.9
    assert np.isnan(fast.gain.reshape(-1)[:30]).all()
    # per-pixel frame counts take the same path
    per_pixel = np.broadcast_to(n, m.shape)
    again = fit_pixel_gain(m, v, per_pixel, max_mean=30000.0, linearizer=linearizer)
    np.testing.assert_array_equal(again.gain, fast.gain)
    if linearizer is not None and linearizer.size == 2:
        plain = fit_pixel_gain(m, v, n, max_mean=30000.0)
        np.testing.assert_array_equal(plain.gain, fast.gain)  # identity linearizer is exact


#: The per-pixel fit's signature as the tile pass calls it: level-major float32
#: statistics, per-level frame counts, no linearizer.
_FIT_SIGNATURE = ('[(a2(t.float32), a2(t.float32), t.Array(t.float64, 2, "C", readonly=True), '
                  't.float64, t.int64, t.int64, a1(t.float64), a1(t.float64), t.boolean)]')


@x86_only
def test_gain_fit_kernel_compiles_without_masked_stores_for_zen3(tmp_path):
    """The fit's validity checks and running maximum compile to plain stores.

    Checked in place (``m = m if ok else 0``, ``mmax = mm if mm > mmax else
    mmax``) they compiled to two ``vmaskmovpd`` stores, microcode on AMD Zen
    2/3 (the kernel took ~1.1x as long on a Zen 3 VM; the same floats).
    """
    assert masked_stores("sitiancal.compute.gain", "_gain_fit_kernel", _FIT_SIGNATURE,
                         tmp_path) == 0


def _frames_with_hits(rng: np.random.Generator, n_pix: int, levels: np.ndarray, n: int,
                      hit_fraction: float) -> dict[str, np.ndarray]:
    """Level moments of whole frames (Poisson + Gaussian), a cosmic ray in one frame of one
    level of ``hit_fraction`` of the pixels (300-5000 e-, at a random level)."""
    gain = GAIN * (1 + 0.01 * rng.standard_normal(n_pix))
    rn_e = RN_E * (1 + 0.1 * rng.standard_normal(n_pix))
    hit = rng.random(n_pix) < hit_fraction
    hit_level = np.where(hit, rng.integers(0, levels.size, n_pix), -1)
    mean = np.empty((n_pix, levels.size))
    var = np.empty_like(mean)
    for i, level in enumerate(levels):
        electrons = rng.poisson(np.repeat((level * gain)[:, None], n, axis=1)).astype(float)
        electrons[hit_level == i, 0] += rng.uniform(300, 5000, np.count_nonzero(hit_level == i))
        adu = (electrons + rn_e[:, None] * rng.standard_normal((n_pix, n))) / gain[:, None]
        mean[:, i] = adu.mean(axis=1)
        var[:, i] = adu.var(axis=1, ddof=1)
    return {"gain": gain, "rn_e": rn_e, "mean": mean, "var": var, "hit_level": hit_level}


@pytest.mark.parametrize("known_read_var", [False, True])
def test_a_cosmic_ray_in_one_flat_frame_leaves_its_level_out_of_the_pixels_fit(
        known_read_var: bool) -> None:
    """A hit of 300-5000 e- in one frame of one of 8 levels (12 frames each): without the
    level test the hit pixels' gains are far off (pulls of tens of sigma); with it the
    hit level is left out where it shows, and the pixels' pulls are those of clean ones.
    With the read variance of 20 bias frames the faintest level's hits are found too."""
    rng = np.random.default_rng(31)
    levels = np.geomspace(200.0, MAX_MEAN, 8)
    d = _frames_with_hits(rng, 20_000, levels, 12, hit_fraction=0.02)
    n = np.full(levels.size, 12)
    plain = fit_pixel_gain(d["mean"], d["var"], n, max_mean=FIT_LIMIT)
    read = None
    if known_read_var:  # the sample variance of 20 bias frames
        true_read = (d["rn_e"] / d["gain"]) ** 2
        read = (true_read * rng.chisquare(19, true_read.size) / 19, 20)
    fit = fit_pixel_gain(d["mean"], d["var"], n, max_mean=FIT_LIMIT,
                         reject_alpha=gain_module.LEVEL_OUTLIER_ALPHA, read_var=read)
    hit = d["hit_level"] >= 0
    assert plain.left_out is None and fit.left_out.dtype == np.int16
    # clean pixels: nothing left out at 1e-6 per level (~160 000 levels; only those of
    # the ~1e-3 of pixels with a poor fit are tested)
    assert np.count_nonzero(fit.left_out[~hit] >= 0) <= 1
    np.testing.assert_array_equal(fit.gain[~hit & (fit.left_out < 0)],
                                  plain.gain[~hit & (fit.left_out < 0)])
    # hit pixels: the level left out is the hit one, wherever one is
    found = fit.left_out[hit] >= 0
    assert np.all(fit.left_out[hit][found] == d["hit_level"][hit][found])
    assert found.mean() > 0.9
    assert np.all(fit.n_used[hit][found] == levels.size - 1)
    pull_plain = (plain.gain - d["gain"]) / plain.gain_err
    pull = (fit.gain - d["gain"]) / fit.gain_err
    assert np.mean(np.abs(pull_plain[hit]) > 5) > 0.3  # the damage the test repairs
    # a few remain: a hit at the faintest level, whose prediction from the other levels
    # rests on a poorly known intercept (1 of 388 here)
    assert np.mean(np.abs(pull[hit]) > 5) < 0.01
    assert np.median(np.abs(pull[hit])) == pytest.approx(0.674, rel=0.2)  # as N(0, 1)'s
    assert np.std(pull[~hit]) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("linearizer", [None, np.array([2e-7, 1.0, 0.0])])
def test_level_test_numba_matches_numpy(linearizer) -> None:
    rng = np.random.default_rng(32)
    levels = np.geomspace(200.0, MAX_MEAN, 6)
    d = _frames_with_hits(rng, 3000, levels, 8, hit_fraction=0.1)
    # level-major float32 planes, as the tile pass hands them over (strided views)
    mean = np.ascontiguousarray(np.moveaxis(d["mean"], -1, 0), dtype=np.float32)
    var = np.ascontiguousarray(np.moveaxis(d["var"], -1, 0), dtype=np.float32)
    mean[2, :50] = np.nan  # a missing level
    kw = {"max_mean": FIT_LIMIT, "linearizer": linearizer,
          "reject_alpha": gain_module.LEVEL_OUTLIER_ALPHA}
    a = fit_pixel_gain(np.moveaxis(mean, 0, -1), np.moveaxis(var, 0, -1), np.full(6, 8),
                       backend="numba", **kw)
    b = fit_pixel_gain(np.moveaxis(mean, 0, -1), np.moveaxis(var, 0, -1), np.full(6, 8),
                       backend="numpy", **kw)
    assert np.count_nonzero(a.left_out >= 0) > 100
    np.testing.assert_array_equal(a.left_out, b.left_out)
    for key in ("gain", "gain_err", "read_var", "chi2_red", "n_used"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-9, err_msg=key)


def test_the_level_test_needs_one_frame_count_per_level() -> None:
    with pytest.raises(ValueError, match="one frame count per level"):
        fit_pixel_gain(np.ones((4, 3)), np.ones((4, 3)), np.full((4, 3), 5), max_mean=10.0,
                       reject_alpha=1e-6)
