"""Bounded-memory product assembly: helpers against their plain numpy/scipy definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from sitiancal.compute.dark import dark_summary
from sitiancal.compute.defects import robust_center_scale
from sitiancal.compute.products import _subsample, _t_threshold
from sitiancal.compute.readnoise import read_noise_summary
from sitiancal.compute.summary import finite_values, mean_std, quantiles, row_bands


def _values(seed: int = 3, n: int = 200_003) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(0.0, 0.5, n).astype(np.float32)
    v[rng.integers(0, n, 500)] = np.nan
    v[rng.integers(0, n, 20)] = np.inf
    return v


def test_summary_helpers_match_numpy() -> None:
    v = _values()
    fin = finite_values(v)
    ref = v[np.isfinite(v)].astype(np.float64)
    assert fin.dtype == np.float32 and fin.size == ref.size
    mean, std = mean_std(fin)
    assert mean == pytest.approx(ref.mean(), rel=1e-12)
    assert std == pytest.approx(ref.std(ddof=1), rel=1e-10)
    q = [0.001, 0.16, 0.5, 0.84, 0.999]
    np.testing.assert_allclose(quantiles(fin.copy(), q), np.quantile(ref, q), rtol=1e-6)
    assert finite_values(np.arange(5)).dtype == np.float64
    rows = list(row_bands(1001, 10, pixels=3000))
    assert rows[0] == slice(0, 300) and rows[-1] == slice(900, 1001)
    assert sum(r.stop - r.start for r in rows) == 1001


def test_robust_center_scale_float32_equals_float64() -> None:
    v = _values(4)
    c32, s32 = robust_center_scale(v)
    ref = v[np.isfinite(v)].astype(np.float64)
    med = np.median(ref)
    assert c32 == pytest.approx(med, rel=1e-6)
    assert s32 == pytest.approx(1.4826 * np.median(np.abs(ref - med)), rel=1e-5)
    before = v.copy()
    robust_center_scale(v)
    np.testing.assert_array_equal(v, before)  # the input is never modified


def test_dark_mean_is_not_moved_by_pixel_noise_where_the_median_is() -> None:
    # A log-normal population (0 C IMX455-like: median 0.002 e-/s, 30 %
    # spread) measured with per-pixel errors twice its width: the median of the
    # measured rates moves towards the mean, far beyond its (statistical)
    # error; the mean stays within its error (dark_summary's notes).
    rng = np.random.default_rng(11)
    true = rng.lognormal(np.log(0.002), 0.3, 2_000_000)
    err = np.full(true.size, 0.0014, dtype=np.float32)
    rate = (true + err * rng.standard_normal(true.size)).astype(np.float32)
    out = dark_summary(rate, err, temperature=0.0)
    assert abs(out["mean"] - true.mean()) < 3 * out["mean_err"]
    shift = out["median"] - np.median(true)
    assert shift > 10 * out["median_err"]
    assert 0.0 < shift < true.mean() - np.median(true)  # towards the mean, not past it


def test_dark_and_read_noise_summaries_match_numpy() -> None:
    rng = np.random.default_rng(5)
    rate = rng.normal(0.002, 0.004, 100_001).astype(np.float32)
    err = np.full_like(rate, 0.004)
    rate[:7] = np.nan
    out = dark_summary(rate, err, temperature=0.0)
    ref = rate[np.isfinite(rate)].astype(np.float64)
    assert out["median"] == pytest.approx(np.median(ref), rel=1e-6)
    assert out["mean"] == pytest.approx(ref.mean(), rel=1e-9)
    assert out["mean_err"] == pytest.approx(ref.std(ddof=1) / np.sqrt(ref.size), rel=1e-9)
    assert out["percentiles"]["p99"] == pytest.approx(np.percentile(ref, 99), rel=1e-6)
    assert out["frac_above"]["0.01"] == pytest.approx(np.mean(ref > 0.01))
    assert out["robust_sigma"] == pytest.approx(
        1.4826 * np.median(np.abs(ref - np.median(ref))), rel=1e-4)
    assert out["n_pixels"] == ref.size
    np.testing.assert_array_equal(np.isnan(rate[:7]), True)  # input untouched
    # noise common to whole frames moves the mean as much as the median
    common = dark_summary(rate, err, temperature=0.0, common_err=1e-4)
    assert common["mean_err_pixels"] == pytest.approx(out["mean_err"], rel=1e-12)
    assert common["mean_err"] == pytest.approx(np.hypot(out["mean_err"], 1e-4), rel=1e-12)
    assert common["median_err"] == pytest.approx(np.hypot(out["median_err"], 1e-4), rel=1e-12)

    rn = rng.gamma(20.0, 0.05, 50_000).astype(np.float32)
    s = read_noise_summary(rn)
    ref = rn.astype(np.float64)
    assert s["median"] == pytest.approx(np.median(ref), rel=1e-6)
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(ref**2)), rel=1e-9)
    assert s["std"] == pytest.approx(ref.std(ddof=1), rel=1e-9)
    assert s["p84.135"] == pytest.approx(np.percentile(ref, 84.135), rel=1e-6)
    assert (s["min"], s["max"]) == (pytest.approx(ref.min()), pytest.approx(ref.max()))


@pytest.mark.parametrize("dof", [1, 3, 10, 98])
def test_t_threshold_is_the_t_to_z_map(dof: int) -> None:
    """|t| > threshold exactly where the normal z of equal tail probability exceeds 5."""
    t = np.linspace(-200.0, 200.0, 400_001)
    z = -special.ndtri(np.clip(special.stdtr(dof, -np.abs(t)), 1e-300, 0.5))
    thr = _t_threshold(5.0, dof)
    # the two rules agree everywhere except within rounding of the boundary itself
    differ = (np.abs(t) > thr) != (z > 5.0)
    assert not differ[np.abs(np.abs(t) - thr) > 1e-6 * thr].any()
    assert special.stdtr(dof, -thr) == pytest.approx(special.ndtr(-5.0), rel=1e-8)


def test_subsample_is_uniform_and_bounded() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((400, 500)) < 0.3
    n_ok = int(mask.sum())
    idx = _subsample(mask, 10_000, seed=1)
    assert idx.size == 10_000 and np.all(np.diff(idx) > 0)  # sorted, distinct
    assert mask.ravel()[idx].all()
    np.testing.assert_array_equal(idx, _subsample(mask, 10_000, seed=1))  # seeded
    assert not np.array_equal(idx, _subsample(mask, 10_000, seed=2))
    # uniform over the selectable pixels: each half of the frame gets its share
    first_half = mask.ravel()[: mask.size // 2].sum() / n_ok
    assert np.mean(idx < mask.size // 2) == pytest.approx(first_half, abs=0.02)
    # fewer selectable pixels than the limit: all of them
    np.testing.assert_array_equal(_subsample(mask, n_ok + 5, seed=1), np.flatnonzero(mask))


def test_glow_is_a_background_not_warm_pixels() -> None:
    """A smooth amplifier-glow corner is not WARM; an isolated warm pixel inside it is."""
    from sitiancal.compute.defects import hot_warm, local_median

    rng = np.random.default_rng(11)
    ny, nx = 256, 384
    y, x = np.mgrid[0:ny, 0:nx]
    glow = 0.04 * np.exp(-np.hypot(y, x - nx) / 40.0)  # e-/s, a corner 20x the median
    err = np.full((ny, nx), 0.0005, np.float32)
    rate = (0.002 + glow + rng.normal(0, 0.0005, (ny, nx))).astype(np.float32)
    rate[10, nx - 20] += 0.03  # a warm pixel in the glow
    rate[200, 50] += 0.03  # and one far from it
    global_only = hot_warm(rate, err, populations=None)[1]
    assert global_only[:60, nx - 60:].sum() > 100  # the glow corner, without a background
    bg = local_median(rate, block=16)
    hot, warm = hot_warm(rate, err, populations=None, background=bg)
    assert warm[10, nx - 20] and warm[200, 50] and not hot.any()
    assert warm.sum() <= 4


@pytest.mark.parametrize("factor", ["map", "scalar"])
def test_scaled_map_reads_like_the_product_it_replaces(factor: str) -> None:
    """``ScaledMap`` gives, region by region, what multiplying the whole map gives."""
    import zarr

    from sitiancal.compute.content import ScaledMap
    from sitiancal.compute.readnoise import read_noise_map

    rng = np.random.default_rng(5)
    std = rng.gamma(4.0, 1.0, (37, 53)).astype(np.float32)
    std[3, 4] = np.nan
    g = (rng.normal(0.25, 0.01, std.shape).astype(np.float32) if factor == "map" else 0.2531)
    source = zarr.create_array(zarr.storage.MemoryStore(), shape=std.shape, dtype=np.float32,
                               chunks=(10, 16))
    source[...] = std
    lazy = ScaledMap(source, g)
    whole = read_noise_map(std, g)
    assert lazy.shape == std.shape and lazy.dtype == np.float32 and lazy.ndim == 2
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    for region in [(slice(0, 10), slice(16, 32)), (slice(30, 37), slice(48, 53)),
                   (slice(5, 6), slice(None))]:
        np.testing.assert_array_equal(lazy[region], whole[region])
    with pytest.raises(ValueError, match="does not match"):
        ScaledMap(source, np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(lazy, copy=False)


@pytest.mark.parametrize("n", [1, 2, 3, 64, 1001, 200_000, 200_001])
@pytest.mark.parametrize("dist", ["normal", "quantised", "two-sided heavy tail"])
def test_radix_order_statistics_equal_sorting(n: int, dist: str) -> None:
    """The parallel radix select gives ``np.sort(v)[ranks]`` and ``np.median(v)`` exactly."""
    from sitiancal.compute.summary import median, order_statistics

    rng = np.random.default_rng(n)
    if dist == "normal":
        v = rng.normal(3.0, 2.0, n).astype(np.float32)
    elif dist == "quantised":  # many ties, zeros of both signs
        v = (rng.integers(-3, 4, n) * 0.25).astype(np.float32)
        v[: n // 10] = -0.0
    else:
        v = (rng.lognormal(0.0, 4.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    before = v.copy()
    ranks = sorted({0, n - 1, n // 2, (n - 1) // 2, n // 3})
    np.testing.assert_array_equal(order_statistics(v, ranks), np.sort(v)[ranks])
    assert median(v) == np.median(v)
    np.testing.assert_array_equal(v, before)  # read, never reordered
    assert median(v.astype(np.float64)) == np.median(v.astype(np.float64))
    with pytest.raises(IndexError):
        order_statistics(v, [n])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1000, 1_300_001])  # numpy's count; the parallel kernel
def test_count_above_equals_numpys_count(dtype: type, size: int) -> None:
    from sitiancal.compute import summary

    rng = np.random.default_rng(21)
    v = rng.lognormal(-5.0, 2.0, size).astype(dtype)
    v[::97] = np.nan
    v[5], v[6] = np.inf, -np.inf
    t = [dtype(x) for x in (0.0, 0.01, 0.1, 1.0, np.inf)]
    got = summary.count_above(v, t)
    assert got.dtype == np.int64
    assert got.tolist() == [int(np.count_nonzero(v > x)) for x in t]
    assert summary.count_above(v.reshape(-1, 1), t[:2]).tolist() == got[:2].tolist()


def test_dark_summary_of_a_full_size_map_equals_numpy() -> None:
    """Above the parallel size: the counts and the errors' median without copies, exactly."""
    rng = np.random.default_rng(22)
    rate = rng.normal(0.002, 0.004, (1031, 1297)).astype(np.float32)
    err = rng.uniform(0.003, 0.005, rate.shape).astype(np.float32)
    rate[rng.random(rate.shape) < 0.01] = np.nan
    err[np.isnan(rate)] = np.nan
    out = dark_summary(rate, err, temperature=0.0)
    fin = rate[np.isfinite(rate)]
    assert out["n_pixels"] == fin.size
    for key, frac in out["frac_above"].items():
        assert frac == np.count_nonzero(fin > np.float32(float(key))) / fin.size
    assert out["median_pixel_err"] == float(np.median(err[np.isfinite(err)]))
    assert dark_summary(rate, np.full_like(err, np.nan),
                        temperature=None)["median_pixel_err"] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_finite_values_quantiles_and_median_equal_numpy(dtype: type) -> None:
    """Above the parallel threshold the compiled compaction and the radix quantiles give numpy's answers exactly."""
    from sitiancal.compute import summary

    rng = np.random.default_rng(11)
    shape = (1031, 1297)  # > _PARALLEL_MIN pixels, sizes not multiples of the parts
    assert shape[0] * shape[1] >= summary._PARALLEL_MIN
    m = rng.normal(5.0, 3.0, shape).astype(dtype)
    m[rng.random(shape) < 0.02] = np.nan
    m[0, :7] = np.inf
    m[-1, -3:] = -np.inf
    m[:, 100:140] = np.nan  # a fully masked column band
    before = m.copy()
    fin = summary.finite_values(m)
    ref = m[np.isfinite(m)]
    assert fin.dtype == dtype
    np.testing.assert_array_equal(fin, ref)  # same values, same order
    np.testing.assert_array_equal(summary.finite_values(m[:, ::2]), m[:, ::2][np.isfinite(m[:, ::2])])
    np.testing.assert_array_equal(m, before)
    q = [0.0, 1e-6, 0.00135, 0.02275, 0.15865, 0.5, 0.84135, 0.999, 1.0]
    got = summary.quantiles(fin, q)
    np.testing.assert_array_equal(got, np.quantile(ref, q))
    assert summary.finite_median(m) == np.median(ref)
    no_inf = np.where(np.isinf(m), np.nan, m)
    assert summary.finite_median(no_inf) == np.nanmedian(no_inf)
    assert np.isnan(summary.finite_median(np.full(shape, np.nan, dtype)))
    assert summary.finite_values(np.full(shape, np.nan, dtype)).size == 0
    with pytest.raises(ValueError):
        summary.quantiles(fin.astype(np.float32), [1.5])


@pytest.mark.parametrize("extra", [0, 1])  # even and odd numbers of finite values
def test_finite_median_mad_without_a_copy_equals_numpy(extra: int) -> None:
    """The radix select straight over a float32 map (deviations computed inside its
    passes) gives numpy's median and MAD of the finite values, bit for bit."""
    from sitiancal.compute import summary

    rng = np.random.default_rng(71 + extra)
    shape = (1031, 1297)
    m = rng.standard_t(3, shape).astype(np.float32) * np.float32(2.5) + np.float32(100.0)
    m[rng.random(shape) < 0.03] = np.nan
    m[0, :9] = np.inf
    m[1, :4] = -np.inf
    m[2, :6] = -0.0
    m[3, :6] = 0.0
    if np.isfinite(m).sum() % 2 != extra:
        m[4, 0] = np.nan if np.isfinite(m[4, 0]) else np.float32(1.0)
    fin = m[np.isfinite(m)]
    assert fin.size % 2 == extra
    med = np.median(fin)
    mad = np.median(np.abs(fin - med))
    got = summary.finite_median_mad(m)
    assert got == (float(med), float(mad))
    only_median = summary.finite_median_mad(m, mad=False)
    assert only_median[0] == got[0] and np.isnan(only_median[1])
    # the same through the copying route (non-contiguous input) and float64 input
    assert summary.finite_median_mad(m[:, ::1].T) == got
    m64 = m.astype(np.float64)
    fin64 = m64[np.isfinite(m64)]
    assert summary.finite_median_mad(m64) == (np.median(fin64),
                                              np.median(np.abs(fin64 - np.median(fin64))))
    assert all(np.isnan(summary.finite_median_mad(np.full(shape, np.nan, np.float32))))


@pytest.mark.parametrize("deviations", [False, True])
def test_radix_histograms_equal_a_numpy_count(deviations: bool) -> None:
    """Both passes of the radix select count exactly the keys numpy gives, blocks and
    parts of any size, non-finite inputs skipped (an infinite deviation of a finite
    value is still counted, as its key)."""
    from sitiancal.compute import summary

    rng = np.random.default_rng(5)
    v = (rng.lognormal(0.0, 3.0, 3 * summary._KEY_BLOCK + 77) * rng.choice([-1, 1], 6221))
    v = v.astype(np.float32)
    v[::97] = np.nan
    v[5::101] = np.inf
    v[7::103] = -np.inf
    v[:40] = np.float32(3.0e38)  # |v - centre| overflows to inf
    centre = np.float32(-3.0e38) if deviations else np.float32(0.0)
    fin = v[np.isfinite(v)]
    with np.errstate(over="ignore"):
        x = np.abs(fin - centre) if deviations else fin
    b = x.view(np.uint32)
    keys = np.where(b >> 31, ~b, b | np.uint32(0x80000000)).astype(np.uint32)
    bits = v.view(np.uint32)
    tops = np.unique(keys >> 16)
    assert tops.size >= 2
    for parts in (1, 2, 3):
        top = summary._top_histogram(bits, np.int64(parts), centre, deviations)
        np.testing.assert_array_equal(top, np.bincount(keys >> 16, minlength=1 << 16))
        # one pass for several top ranges, in any order (one of them: a single range)
        for chosen in (list(dict.fromkeys([tops[-1], tops[0], tops[tops.size // 2]])), [tops[1]]):
            low = summary._low_histograms(bits, chosen, np.int64(parts), centre, deviations)
            assert low.shape == (len(chosen), 1 << 16)
            for row, t in zip(low, chosen, strict=True):
                np.testing.assert_array_equal(
                    row, np.bincount(keys[(keys >> 16) == t] & 0xFFFF, minlength=1 << 16))


def _subsample_with_unique(mask: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The subsample as first written, with ``np.unique`` (the reference)."""
    flat = mask.ravel()
    rng = np.random.default_rng(seed)
    draw = int(limit * flat.size / np.count_nonzero(flat) * 1.05) + 1024
    while True:
        cand = np.unique(rng.integers(0, flat.size, size=min(draw, 4 * flat.size)))
        cand = cand[flat[cand]]
        if cand.size >= limit:
            return np.sort(rng.choice(cand, size=limit, replace=False))
        draw *= 2


@pytest.mark.parametrize(("fraction", "limit", "seed"), [(0.3, 10_000, 1), (0.999, 50_000, 7),
                                                         (0.02, 3_000, 3)])
def test_subsample_is_the_same_as_with_np_unique(fraction: float, limit: int, seed: int) -> None:
    # the distinct draws come from a sort (np.unique of integers is ~13x slower
    # in numpy 2.4): the same pixels, so products do not change
    mask = np.random.default_rng(seed).random((300, 700)) < fraction
    np.testing.assert_array_equal(_subsample(mask, limit, seed),
                                  _subsample_with_unique(mask, limit, seed))


@pytest.mark.parametrize("case", ["gauss-outliers", "heavy-tails", "non-finite", "integers",
                                  "constant", "tiny", "one-sided"])
@pytest.mark.parametrize("sigma", [2.0, 3.0, 5.0])
@pytest.mark.parametrize("backend", ["radix", "numpy"])
def test_clipped_survivors_are_astropys_sigma_clip(case: str, sigma: float, backend: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The sorted-slice clipping keeps exactly the values astropy's sigma_clip keeps.

    With either sort (the process measures which is faster and keeps it).
    """
    import warnings

    from astropy.stats import sigma_clip
    from astropy.utils.exceptions import AstropyUserWarning

    from sitiancal.compute import summary
    from sitiancal.compute.summary import clipped_survivors

    monkeypatch.setattr(summary, "_SORT_CHOICE", [backend])

    rng = np.random.default_rng(7)
    n = 100_001
    if case == "gauss-outliers":
        v = rng.normal(3.0, 2.0, n)
        v[rng.choice(n, 300, replace=False)] += rng.normal(0, 80, 300)
    elif case == "heavy-tails":
        v = rng.standard_t(2.5, n) * 4.0 - 7.0
    elif case == "non-finite":
        v = rng.normal(0.0, 1.0, (301, 333))
        v.flat[rng.choice(v.size, 500, replace=False)] = np.nan
        v.flat[:3] = [np.inf, -np.inf, np.inf]
    elif case == "integers":
        v = rng.poisson(30.0, n).astype(np.int64) - rng.poisson(30.0, n)  # pair differences
    elif case == "constant":
        v = np.full(1000, 4.25)
    elif case == "tiny":
        v = np.array([1.0, 2.0, 100.0, 2.5])
    else:
        v = np.concatenate([rng.exponential(1.0, n), [40.0, 55.0, 90.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        ref = np.asarray(sigma_clip(v, sigma=sigma, maxiters=None, cenfunc="median",
                                    stdfunc="std", masked=False, axis=None))
    got = clipped_survivors(v, sigma)
    assert got.dtype == np.float64
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(got, np.sort(ref.astype(np.float64)))


def _sort_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    n = 70_001
    signed = rng.normal(0.0, 3.0, n)
    signed[rng.choice(n, 400, replace=False)] = np.nan
    signed[:6] = [np.inf, -np.inf, -0.0, 0.0, -np.nan, 5e-324]   # a negative NaN, a denormal
    return {
        "flat-minus-bias": rng.poisson(20000, n) - rng.normal(500.0, 3.0, n),
        "signed-non-finite": signed,
        "integers-with-ties": (rng.poisson(30.0, n) - rng.poisson(30.0, n)).astype(np.float64),
        "wide-range": np.concatenate([-np.logspace(-300, 300, 1000), np.logspace(-300, 300, 1000),
                                      rng.normal(0, 1e-3, 100)]),
        "constant": np.full(1000, -4.25),
        "all-nan": np.full(17, np.nan),
        "one": np.array([3.0]),
        "empty": np.zeros(0),
    }


@pytest.mark.parametrize("case", list(_sort_cases()))
@pytest.mark.parametrize("backend", ["radix", "numpy", None])
def test_sort_float64_equals_numpys_sort(case: str, backend: str | None) -> None:
    """The radix sort gives numpy's sorted values: NaN last, infinities, signed zeros, ties."""
    from sitiancal.compute.summary import sort_float64

    v = _sort_cases()[case]
    keep = v.copy()
    got = sort_float64(v, backend=backend)
    np.testing.assert_array_equal(v, keep)            # the input is not touched
    assert got.dtype == np.float64 and got.shape == v.shape
    np.testing.assert_array_equal(got, np.sort(v))    # NaN compare equal here; -0.0 == 0.0
    assert np.all(np.isnan(got[np.count_nonzero(~np.isnan(v)):]))


@pytest.mark.parametrize("backend", ["radix", "numpy", None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sort_rows_equals_numpys_sort(backend: str | None, dtype: type) -> None:
    """Each row sorted in place as ``a.sort(axis=1)``: NaN last (either sign), infinities,
    signed zeros, denormals, ties, constant rows (every radix pass skipped), short rows."""
    from sitiancal.compute.summary import sort_rows

    rng = np.random.default_rng(5)
    a = rng.normal(500.0, 3.0, (41, 1203)).astype(dtype)
    a[rng.random(a.shape) < 0.02] = np.nan
    a[0, :6] = [np.inf, -np.inf, -0.0, 0.0, -np.nan, np.finfo(dtype).smallest_subnormal]
    a[1] = 7.25                                            # constant
    a[2] = np.round(rng.normal(0.0, 2.0, a.shape[1]))      # ties, both signs
    a[3] = np.concatenate([-np.logspace(-30, 30, 601), np.logspace(-30, 30, 602)]).astype(dtype)
    a[4] = np.nan
    work = np.array(a)
    sort_rows(work, backend=backend)
    np.testing.assert_array_equal(work, np.sort(a, axis=1))  # NaN compare equal; -0.0 == 0.0
    n_nan = np.isnan(a).sum(axis=1)
    for row, k in zip(work, n_nan, strict=True):             # every NaN last, whatever its sign
        assert np.isnan(row[row.size - k:]).all() and not np.isnan(row[:row.size - k]).any()
    for arr in (a[:, :1].copy(), np.zeros((0, 5), dtype)):
        work = np.array(arr)
        sort_rows(work, backend=backend)
        np.testing.assert_array_equal(work, np.sort(arr, axis=1))


def test_sort_rows_refuses_what_it_cannot_sort_in_place() -> None:
    from sitiancal.compute.summary import row_sort_backend, sort_rows

    with pytest.raises(ValueError, match="2-D float32/float64"):
        sort_rows(np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="2-D float32/float64"):
        sort_rows(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        sort_rows(np.zeros((4, 6), np.float32)[:, ::2])
    frozen = np.zeros((2, 3), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        sort_rows(frozen)
    with pytest.raises(ValueError, match="unknown sort backend"):
        sort_rows(np.zeros((2, 3), np.float64), backend="bogus")
    assert row_sort_backend() in ("radix", "numpy")
    assert row_sort_backend() == row_sort_backend()   # measured once per process


def test_sort_float64_converts_and_refuses() -> None:
    """Other dtypes are sorted as float64; a 2-D array and an unknown backend are refused."""
    from sitiancal.compute.summary import sort_backend, sort_float64

    ints = np.random.default_rng(2).integers(-1000, 1000, 80_000).astype(np.int32)
    np.testing.assert_array_equal(sort_float64(ints, backend="radix"), np.sort(ints).astype(float))
    f32 = np.linspace(1, -1, 9, dtype=np.float32)
    np.testing.assert_array_equal(sort_float64(f32[::-1][::2], backend="radix"),
                                  np.sort(f32[::-1][::2]).astype(np.float64))
    with pytest.raises(ValueError, match="1-D"):
        sort_float64(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown sort backend"):
        sort_float64(np.zeros(3), backend="bogus")
    assert sort_backend() in ("radix", "numpy")
    assert sort_backend() == sort_backend()           # measured once per process


@pytest.mark.parametrize("frames", [8, 40])
def test_gain_centre_corrects_the_skew_of_one_over_the_slope(frames: int) -> None:
    """A one-population camera's gain from per-pixel fits: unbiased, where the map's median is not.

    Per-pixel gains ``1/a`` from chi-square sample variances (14 levels of
    ``frames`` frames, 0.8 % intrinsic spread): the median of the map is
    1.1 % (8 frames) or 0.2 % (40 frames) high; the centre is within 0.2 %
    (the third-order term of the skew, +0.16 % at 8 frames, is left).
    """
    from sitiancal.compute.gain import fit_pixel_gain
    from sitiancal.compute.products import _gain_centre, _to_log

    rng = np.random.default_rng(frames)
    g0, read_var, npx = 0.254, (1.03 / 0.254) ** 2, 100_000
    g = g0 * (1.0 + 0.008 * rng.normal(size=npx))
    levels = np.geomspace(0.03 * 65535, 0.7 * 65535, 14)
    expected = levels[None, :] / g[:, None] + read_var
    var = expected * rng.chisquare(frames - 1, (npx, 14)) / (frames - 1)
    mean = levels[None, :] + rng.normal(0.0, 1.0, (npx, 14)) * np.sqrt(expected / frames)
    fit = fit_pixel_gain(mean, var, np.full(14, frames), max_mean=0.75 * 65535)
    ok = np.isfinite(fit.gain) & (fit.gain_err > 0)
    centre, err = _gain_centre(*_to_log(fit.gain[ok], fit.gain_err[ok]))
    true = float(np.exp(np.mean(np.log(g))))
    assert centre == pytest.approx(true, rel=2.5e-3)
    assert 1e-4 * true < err < 1e-3 * true
    if frames == 8:
        assert np.median(fit.gain[ok]) > 1.007 * true  # the skew the centre removes


def test_grouped_median_of_values_on_a_grid() -> None:
    # Rates from one exposure time (5 dark, 20 bias frames, t = 60 s) are
    # multiples of 0.05 / 60 ADU/s: the plain median of millions of them is a
    # multiple, here ~0.3 of a step from the continuous sample's median; the
    # grouped median is within a few % of a step of it.
    from sitiancal.compute.summary import grouped_median

    rng = np.random.default_rng(41)
    step = 0.05 / 60.0
    cont = rng.normal(10.3 * step, 0.037, 2_000_000)
    grid = (np.round(cont / step) * step).astype(np.float32)
    truth = float(np.median(cont))
    plain = float(np.median(grid))
    assert abs(plain - truth) > 0.2 * step
    got, tied = grouped_median(grid)
    assert tied > 1000
    assert abs(got - truth) < 0.05 * step
    # the plain median passed in, a big-endian copy (a map read from FITS)
    assert grouped_median(grid, plain) == (got, tied)
    assert grouped_median(grid.astype(">f4"))[0] == pytest.approx(got, rel=1e-12)
    # continuous values keep their median; no neighbour, no values
    assert grouped_median(cont.astype(np.float32))[0] == float(np.median(cont.astype(np.float32)))
    assert grouped_median(np.full(10, 2.5)) == (2.5, 10)
    assert np.isnan(grouped_median(np.zeros(0))[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tie_scan_counts_as_numpy_does(dtype) -> None:
    from sitiancal.compute.summary import _tie_scan

    rng = np.random.default_rng(46)
    v = (np.round(rng.normal(10.0, 3.0, 200_001)) * 0.25).astype(dtype)
    for lo, hi in ((2.5, 2.5), (2.4, 2.6), (-100.0, -99.0), (99.0, 100.0), (-1e9, 1e9)):
        below, tied, lower, upper = _tie_scan(v, lo, hi)
        under, over = v[v < lo], v[v > hi]
        assert below == under.size and tied == v.size - under.size - over.size
        assert lower == (under.max() if under.size else -np.inf)
        assert upper == (over.min() if over.size else np.inf)


def test_dark_summary_median_of_rates_on_a_grid_and_its_common_error() -> None:

    rng = np.random.default_rng(42)
    step = 0.05 / 60.0
    cont = rng.normal(10.3 * step, 0.037, 1_000_000)
    grid = (np.round(cont / step) * step).astype(np.float32)
    out = dark_summary(grid, np.full_like(grid, 0.037), temperature=0.0)
    assert abs(out["median"] - np.median(cont)) < 0.05 * step
    assert out["median_tied"] > 1000
    pixels = 1.2533 * 0.037 / np.sqrt(grid.size)
    assert out["median_err"] == pytest.approx(pixels, rel=0.05)
    both = dark_summary(grid, np.full_like(grid, 0.037), temperature=0.0, common_err=3 * pixels)
    assert both["median_err"] == pytest.approx(np.hypot(out["median_err"], 3 * pixels))
    assert both["median_err_common"] == 3 * pixels
    assert both["median_err_pixels"] == out["median_err"]


@pytest.mark.parametrize(("times", "counts"), [([0.0, 60.0], [20, 5]),
                                                ([0.0, 30.0, 60.0, 120.0, 300.0], [16, 5, 5, 5, 5])])
def test_common_mode_rate_err_is_the_slope_error_of_frame_offsets(times: list, counts: list) -> None:
    # Every frame's level moves by N(0, s) (white bias drift, averaged row
    # noise): the frame-weighted slope of the group means through them.
    from sitiancal.compute.dark import common_mode_rate_err

    rng = np.random.default_rng(43)
    s, trials = 0.03, 20_000
    t = np.repeat(times, counts)
    off = rng.normal(0.0, s, (trials, t.size))
    slope = np.polyfit(t, off.T, 1)[0]  # each frame a point: the frame-weighted fit
    expected = common_mode_rate_err(np.array(times), np.array(counts), s)
    if len(times) == 2:
        assert expected == pytest.approx(s * np.sqrt(1 / counts[0] + 1 / counts[1]) / times[1])
    assert np.std(slope) == pytest.approx(expected, rel=0.03)
    assert np.isnan(common_mode_rate_err(np.array([60.0]), np.array([5]), s))
    # a scatter of its own per group (a dark's level also follows the sensor
    # temperature, in proportion to its signal): the same slope through them
    per_group = s * (1.0 + np.asarray(times) / 30.0)
    off = rng.normal(0.0, np.repeat(per_group, counts), (trials, t.size))
    slope = np.polyfit(t, off.T, 1)[0]
    expected = common_mode_rate_err(np.array(times), np.array(counts), per_group)
    assert np.std(slope) == pytest.approx(expected, rel=0.03)
    assert expected > common_mode_rate_err(np.array(times), np.array(counts), s)


def test_log_tail_scale_follows_a_multiplicative_population() -> None:
    from sitiancal.compute.defects import log_tail_scale, upper_tail_scale

    rng = np.random.default_rng(44)
    rates = rng.lognormal(np.log(0.02), 0.3, 1_000_000) + rng.normal(0, 0.001, 1_000_000)
    c = float(np.median(rates))
    width = log_tail_scale(rates.astype(np.float32), c, nsigma=5.0)
    # 5 sigma in ln(rate): ~exp(1.5) x the median, ~3e-7 of the population beyond
    assert c + 5 * width == pytest.approx(c * np.exp(5 * 0.3), rel=0.03)
    assert np.mean(rates > c + 5 * width) < 3e-6
    # the linear extrapolation from the upper side leaves ~1e-4 beyond
    linear = upper_tail_scale(rates, c)
    assert 3e-5 < np.mean(rates > c + 5 * linear) < 3e-4
    # noise-dominated rates (many <= 0) and a centre <= 0: not in ln(rate)
    noisy = rng.normal(0.002, 0.001, 100_000)
    assert np.isnan(log_tail_scale(noisy, float(np.median(noisy))))
    assert np.isnan(log_tail_scale(rates, 0.0))
    with pytest.raises(ValueError):
        log_tail_scale(rates, c, nsigma=0.0)


def test_threshold_sample_of_a_large_map() -> None:
    from sitiancal.compute.defects import robust_center_scale
    from sitiancal.compute.summary import THRESHOLD_SAMPLE, threshold_sample

    rng = np.random.default_rng(45)
    small = rng.normal(0.0, 1.0, (100, 120)).astype(np.float32)
    assert threshold_sample(small) is small or np.shares_memory(threshold_sample(small), small)
    assert threshold_sample(small).size == small.size
    # a map with a column pattern of period 8 (a stride of 8 would see one column)
    big = rng.lognormal(np.log(0.002), 0.3, (2048, 2560)).astype(np.float32)
    big += np.tile(np.float32([0, 0, 0, 0, 0, 0, 0, 0.01]), 320)
    sample = threshold_sample(big)
    assert THRESHOLD_SAMPLE // 4 < sample.size <= THRESHOLD_SAMPLE
    step = -(-big.size // sample.size)
    assert np.gcd(step, big.shape[1]) == 1  # every column alike
    assert step == 3  # 2 divides the row length
    c_all, s_all = robust_center_scale(big)
    c_smp, s_smp = robust_center_scale(sample)
    assert abs(c_smp - c_all) < 3e-3 * s_all and abs(s_smp / s_all - 1) < 5e-3


class _LazyMap:
    """A map read when asked (as a zarr array is), counting its reads."""

    def __init__(self, value: np.ndarray, fail: bool = False) -> None:
        self.value, self.fail, self.reads = value, fail, 0

    def __array__(self, dtype=None, copy=None):
        self.reads += 1
        if self.fail:
            raise OSError("disk gone")
        return self.value.copy()


def _read_ahead(monkeypatch, reads: dict, maps: dict, order: tuple, depth: int = 2):
    from sitiancal.compute import products

    monkeypatch.setattr(products, "_BUILDER_READS", reads)
    return products._ReadAhead(maps, order, depth=depth)


def test_read_ahead_hands_each_builder_its_maps_once(monkeypatch) -> None:
    maps = {n: _LazyMap(np.full((3, 4), i, np.float32)) for i, n in enumerate("abcd")}
    maps["numpy"] = np.zeros(2)  # in memory already: never scheduled
    ahead = _read_ahead(monkeypatch, {"x": ("a", "b"), "y": ("c", "numpy"), "z": ("a",)},
                        maps, ("x", "y", "z"))
    try:
        first = ahead.take("x", "a")
        np.testing.assert_array_equal(first, maps["a"].value)
        first[...] = -1.0  # the taker's own array: the next reader of "a" gets the map
        assert ahead.take("x", "a") is None  # taken: the builder reads it itself
        np.testing.assert_array_equal(ahead.take("x", "b"), maps["b"].value)
        ahead.finish("x")
        np.testing.assert_array_equal(ahead.take("y", "c"), maps["c"].value)
        assert ahead.take("y", "numpy") is None
        assert ahead.take("y", "d") is None  # not one of y's reads
        ahead.finish("y")
        np.testing.assert_array_equal(ahead.take("z", "a"), maps["a"].value)
        assert ahead.take(None, "a") is None  # outside a builder
    finally:
        ahead.close()
    assert [maps[n].reads for n in "abcd"] == [2, 1, 1, 0]


def test_read_ahead_drops_what_a_builder_did_not_take(monkeypatch) -> None:
    maps = {n: _LazyMap(np.full(5, i, np.float64)) for i, n in enumerate("abc")}
    ahead = _read_ahead(monkeypatch, {"x": ("a", "b"), "y": ("c",)}, maps, ("x", "y"), depth=1)
    try:
        ahead.finish("x")  # x built nothing (its product was not supported)
        np.testing.assert_array_equal(ahead.take("y", "c"), maps["c"].value)
        assert not ahead._ready
    finally:
        ahead.close()
    assert maps["b"].reads == 0  # skipped once x ended (a may have been read already)


def test_read_ahead_never_waits_behind_a_full_buffer(monkeypatch) -> None:
    # a builder asking for its maps out of order, with one map held at most: the
    # thread holds "a" and cannot read "c"; the builder reads "c" itself, and the
    # thread skips it
    import threading

    maps = {n: _LazyMap(np.full(4, i, np.int64)) for i, n in enumerate("abc")}
    ahead = _read_ahead(monkeypatch, {"x": ("a", "b", "c")}, maps, ("x",), depth=1)
    got: list = []
    try:
        t = threading.Thread(target=lambda: got.append(ahead.take("x", "c")))
        t.start()
        t.join(10.0)
        assert not t.is_alive() and got[0] is None
        np.testing.assert_array_equal(ahead.take("x", "a"), maps["a"].value)
        np.testing.assert_array_equal(ahead.take("x", "b"), maps["b"].value)
        ahead._thread.join(10.0)  # the schedule's end: the thread stops by itself
        assert not ahead._thread.is_alive()
    finally:
        ahead.close()
    # "c", which the builder read itself, was not read again for nothing
    assert [maps[n].reads for n in "abc"] == [1, 1, 0]


def test_read_ahead_hands_a_failed_read_to_its_builder(monkeypatch) -> None:
    maps = {"a": _LazyMap(np.zeros(3), fail=True), "b": _LazyMap(np.ones(3))}
    ahead = _read_ahead(monkeypatch, {"x": ("a", "b")}, maps, ("x",))
    try:
        with pytest.raises(OSError, match="disk gone"):
            ahead.take("x", "a")
        np.testing.assert_array_equal(ahead.take("x", "b"), np.ones(3))
    finally:
        ahead.close()
    ahead.close()  # twice: nothing left to stop
