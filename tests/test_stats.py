"""Tests of the per-pixel frame-stack statistics (numba kernels vs references)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.stats import SigmaClip
from astropy.stats import sigma_clipped_stats as astropy_scs
from astropy.utils.exceptions import AstropyUserWarning
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from sitiancal.compute import stats as stats_module
from sitiancal.compute.stats import (
    LinearOffset,
    Moments,
    clipped_stats_and_moments,
    combine_moments,
    group_moments,
    pixel_median,
    pixel_time_trend,
    sigma_clipped_mean,
    sigma_clipped_stats,
    sorting_network,
)

DTYPES = [np.uint8, np.uint16, np.float32, np.float64]
HYP = settings(max_examples=40, deadline=None, derandomize=True)


def _random_stack(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Stack with a per-pixel level and noise; full-range values for integers."""
    if np.dtype(dtype).kind == "u":
        hi = np.iinfo(dtype).max
        return rng.integers(0, hi, size=shape, endpoint=True).astype(dtype)
    return (rng.normal(1000.0, 30.0, size=shape) * rng.uniform(0.5, 2.0)).astype(dtype)


def _truth(stack: np.ndarray, offset, scale) -> tuple[np.ndarray, np.ndarray]:
    """Direct float64 mean and ddof=1 variance of (stack - offset) * scale."""
    x = stack.astype(np.float64)
    if offset is not None:
        x = x - np.asarray(offset, dtype=np.float64)
    if scale is not None:
        x = x * np.asarray(scale, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    return x.mean(axis=0), x.var(axis=0, ddof=1)


# ---------------------------------------------------------------------------
# group_moments
# ---------------------------------------------------------------------------


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n_frames=st.integers(2, 13),
    ny=st.integers(1, 6),
    nx=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    offset_kind=st.sampled_from(["none", "scalar", "map"]),
    use_scale=st.booleans(),
)
def test_group_moments_numba_matches_numpy_and_truth(
    seed, n_frames, ny, nx, dtype, offset_kind, use_scale
):
    rng = np.random.default_rng(seed)
    stack = _random_stack(rng, (n_frames, ny, nx), dtype)
    offset = {"none": None, "scalar": 17.25, "map": rng.normal(100.0, 5.0, (ny, nx))}[offset_kind]
    scale = rng.uniform(0.5, 2.0, n_frames) if use_scale else None
    fast = group_moments(stack, offset=offset, scale=scale, backend="numba")
    ref = group_moments(stack, offset=offset, scale=scale, backend="numpy")
    mean, var = _truth(stack, offset, scale)
    amp = float(np.max(np.abs(stack.astype(np.float64)))) + 200.0
    assert fast.n == ref.n == n_frames
    assert fast.mean.shape == fast.var.shape == (ny, nx)
    assert fast.mean.dtype == fast.var.dtype == np.float64
    # same algorithm, different summation grouping: agreement to rounding
    np.testing.assert_allclose(fast.mean, ref.mean, rtol=1e-13, atol=1e-12 * amp)
    np.testing.assert_allclose(fast.var, ref.var, rtol=1e-11, atol=1e-11 * amp**2)
    # and both equal the direct two-pass float64 computation
    np.testing.assert_allclose(fast.mean, mean, rtol=1e-12, atol=1e-12 * amp)
    np.testing.assert_allclose(fast.var, var, rtol=1e-9, atol=1e-11 * amp**2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_group_moments_integer_path_is_exact(dtype):
    hi = int(np.iinfo(dtype).max)
    n = 300
    # alternate 0 and max: mean = hi/2, var = hi^2/4 * n/(n-1) exactly
    stack = np.zeros((n, 3, 4), dtype)
    stack[1::2] = hi
    stack[:, 0, 0] = hi  # constant pixel: var exactly 0
    for backend in ("numba", "numpy"):
        m = group_moments(stack, backend=backend)
        assert m.mean[0, 0] == hi and m.var[0, 0] == 0.0
        assert m.mean[1, 1] == hi / 2
        assert m.var[1, 1] == (hi * hi * n) / (4.0 * (n - 1))
    # and a random stack: numba == numpy bit for bit (both exact integer sums)
    rng = np.random.default_rng(7)
    stack = rng.integers(0, hi, size=(61, 5, 7), endpoint=True).astype(dtype)
    a = group_moments(stack, backend="numba")
    b = group_moments(stack, backend="numpy")
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)
    # exact numerator from Python integers for one pixel
    col = [int(v) for v in stack[:, 2, 3]]
    f = len(col)
    exact = (f * sum(v * v for v in col) - sum(col) ** 2) / (f * (f - 1))
    assert a.var[2, 3] == exact


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("shape", [(5, 7), (96, 200)])  # one block; several blocks
def test_linear_offset_equals_its_map_bit_for_bit(backend, shape):
    """master + rate * t evaluated in the kernel gives the floats of the map passed in."""
    rng = np.random.default_rng(11)
    stack = rng.integers(900, 40_000, size=(9, *shape)).astype(np.uint16)
    master = rng.normal(1000.0, 3.0, shape)
    rate = rng.lognormal(-2.0, 1.5, shape)  # ADU/s, with hot pixels
    scale = rng.uniform(0.97, 1.03, 9)
    linear = LinearOffset(master, rate, 37.5)
    assert np.array_equal(linear.evaluate(), master + rate * 37.5)
    got = group_moments(stack, offset=linear, scale=scale, backend=backend)
    want = group_moments(stack, offset=master + rate * 37.5, scale=scale, backend=backend)
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.var, want.var)
    # the offset is really applied: the mean moves by the scaled dark signal
    plain = group_moments(stack, offset=master, scale=scale, backend=backend)
    np.testing.assert_allclose(plain.mean - got.mean, rate * 37.5 * scale.mean(), rtol=1e-9,
                               atol=1e-9)  # differences of means ~2e4 ADU
    # float32 output planes receive the float64 results rounded once
    planes = (np.empty(shape, np.float32), np.empty(shape, np.float32))
    group_moments(stack, offset=linear, scale=scale, backend=backend, out=planes)
    np.testing.assert_array_equal(planes[0], want.mean.astype(np.float32))
    np.testing.assert_array_equal(planes[1], want.var.astype(np.float32))


def test_group_moments_single_frame_and_shapes():
    stack = np.arange(12, dtype=np.uint16).reshape(1, 3, 4)
    m = group_moments(stack)
    np.testing.assert_array_equal(m.mean, stack[0])
    assert np.isnan(m.var).all()
    flat = group_moments(np.arange(10.0)[:, None] * np.ones((1, 5)))  # (F, P) 2-D stack
    np.testing.assert_allclose(flat.mean, 4.5)
    np.testing.assert_allclose(flat.var, np.var(np.arange(10.0), ddof=1))
    with pytest.raises(ValueError, match="no frames"):
        group_moments(np.zeros((0, 2, 2), np.uint16))
    with pytest.raises(ValueError, match="scale"):
        group_moments(np.zeros((3, 2, 2)), scale=np.ones(4))
    with pytest.raises(ValueError, match="backend"):
        group_moments(np.zeros((3, 2, 2)), backend="gpu")  # type: ignore[arg-type]


def test_group_moments_non_contiguous_stack():
    rng = np.random.default_rng(11)
    base = rng.integers(0, 4000, size=(9, 8, 10)).astype(np.uint16)
    view = base[:, ::2, 1::3]
    m = group_moments(view)
    mean, var = _truth(view, None, None)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(m.var, var, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("use_offset", [False, True])
def test_group_moments_into_caller_planes(backend, use_offset):
    """``out``: the kernels store into the caller's planes what the float64 maps hold, rounded once."""
    rng = np.random.default_rng(21)
    stack = rng.integers(400, 60000, size=(7, 9, 11)).astype(np.uint16)
    kw = {"offset": rng.normal(500.0, 3.0, (9, 11)), "scale": 1 + rng.normal(0, 1e-3, 7)} \
        if use_offset else {}
    ref = group_moments(stack, backend=backend, **kw)
    for dtype in (np.float64, np.float32):
        level_major = np.full((2, 2, 9, 11), np.nan, dtype)  # (map, level, y, x): planes of it
        planes = (level_major[0, 1], level_major[1, 1])
        got = group_moments(stack, backend=backend, out=planes, **kw)
        assert got.mean is planes[0] and got.var is planes[1]
        np.testing.assert_array_equal(level_major[0, 1], ref.mean.astype(dtype))
        np.testing.assert_array_equal(level_major[1, 1], ref.var.astype(dtype))
        assert np.isnan(level_major[:, 0]).all()  # the other plane untouched
    for bad, why in (((np.zeros((9, 11)), np.zeros((9, 10))), "shape"),
                     ((np.zeros((9, 11), np.int32), np.zeros((9, 11))), "float32 or float64"),
                     ((np.zeros((11, 9)).T, np.zeros((9, 11))), "C-contiguous")):
        with pytest.raises(ValueError, match=why):
            group_moments(stack, backend=backend, out=bad, **kw)


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n_frames=st.integers(2, 30),
    n_cuts=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    use_offset=st.booleans(),
)
def test_combine_moments_is_batch_invariant(seed, n_frames, n_cuts, dtype, use_offset):
    rng = np.random.default_rng(seed)
    stack = _random_stack(rng, (n_frames, 4, 5), dtype)
    offset = rng.normal(50.0, 3.0, (4, 5)) if use_offset else None
    whole = group_moments(stack, offset=offset)
    cuts = np.sort(
        rng.choice(np.arange(1, n_frames), size=min(n_cuts, n_frames - 1), replace=False)
    )
    parts = [group_moments(p, offset=offset) for p in np.split(stack, cuts)]
    acc = parts[0]
    for p in parts[1:]:
        acc = combine_moments(acc, p)
    amp = float(np.max(np.abs(stack.astype(np.float64)))) + 100.0
    assert acc.n == n_frames
    np.testing.assert_allclose(acc.mean, whole.mean, rtol=1e-12, atol=1e-12 * amp)
    np.testing.assert_allclose(acc.var, whole.var, rtol=1e-9, atol=1e-10 * amp**2)


def test_combine_moments_per_pixel_counts_and_empty_side():
    rng = np.random.default_rng(5)
    x = rng.normal(10.0, 2.0, size=(12, 6))
    # pixel-wise different splits: combine arrays of counts
    na = np.array([0, 1, 2, 5, 11, 12])
    a_mean = np.array([x[:k, j].mean() if k else np.nan for j, k in enumerate(na)])
    a_var = np.array([x[:k, j].var(ddof=1) if k > 1 else np.nan for j, k in enumerate(na)])
    b_mean = np.array([x[k:, j].mean() if k < 12 else np.nan for j, k in enumerate(na)])
    b_var = np.array([x[k:, j].var(ddof=1) if k < 11 else np.nan for j, k in enumerate(na)])
    out = combine_moments(Moments(na, a_mean, a_var), Moments(12 - na, b_mean, b_var))
    np.testing.assert_array_equal(out.n, 12)
    np.testing.assert_allclose(out.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(out.var, x.var(axis=0, ddof=1), rtol=1e-12)


# ---------------------------------------------------------------------------
# sigma_clipped_stats
# ---------------------------------------------------------------------------


def _astropy_reference(data: np.ndarray, sigma: float, maxiters):
    """astropy's clipped mean/median/std and the number of kept values."""
    mean, med, std = astropy_scs(
        data, axis=0, sigma=sigma, maxiters=maxiters, cenfunc="median", stdfunc="std"
    )
    clipped = SigmaClip(sigma=sigma, maxiters=maxiters, cenfunc="median", stdfunc="std")(
        data, axis=0, masked=False
    )
    return np.asarray(mean), np.asarray(med), np.asarray(std), np.isfinite(clipped).sum(axis=0)


def _spiky_stack(rng, n_frames, shape, dtype, level=1000.0, noise=4.0, wide=False):
    """Bias-like stack with cosmic-ray spikes, hot pixels and low outliers."""
    x = rng.normal(level, noise, size=(n_frames, *shape))
    hits = rng.random(x.shape) < 0.03
    x[hits] += rng.uniform(30.0, 3000.0 if wide else 200.0, size=hits.sum())
    low = rng.random(x.shape) < 0.01
    x[low] -= rng.uniform(20.0, 60.0, size=low.sum())
    if np.dtype(dtype).kind == "u":
        x = np.clip(np.rint(x), 0, np.iinfo(dtype).max)
    return x.astype(dtype)


@pytest.mark.parametrize(
    ("dtype", "n_frames", "sigma", "maxiters", "wide"),
    [
        (np.uint16, 25, 3.0, 5, False),  # counting-sort path
        (np.uint16, 40, 3.0, 5, True),  # spikes wider than the counting buffer: comparison sort
        (np.uint16, 24, 2.5, None, False),  # to convergence, even F
        (np.uint16, 31, 3.0, 1, False),  # one iteration
        (np.uint8, 20, 3.0, 5, False),
        (np.float32, 33, 3.0, 5, True),
        (np.float64, 16, 2.0, 10, False),
    ],
)
def test_sigma_clipped_stats_equals_astropy(dtype, n_frames, sigma, maxiters, wide):
    rng = np.random.default_rng(n_frames)
    level = 100.0 if dtype == np.uint8 else 1000.0
    stack = _spiky_stack(rng, n_frames, (23, 17), dtype, level=level, wide=wide)
    res = sigma_clipped_stats(stack, sigma=sigma, maxiters=maxiters)
    mean, med, std, n_kept = _astropy_reference(stack.astype(np.float64), sigma, maxiters)
    np.testing.assert_array_equal(res.n_used, n_kept)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(res.median, med, rtol=1e-12)
    np.testing.assert_allclose(res.std, std, rtol=1e-9, atol=1e-12)
    # astropy called on the raw stack works in float32 for integer input: 1e-6
    a_mean, a_med, a_std = astropy_scs(
        stack, axis=0, sigma=sigma, maxiters=maxiters, cenfunc="median", stdfunc="std"
    )
    np.testing.assert_allclose(res.mean, a_mean, rtol=1e-6)
    np.testing.assert_allclose(res.median, a_med, rtol=1e-6)
    np.testing.assert_allclose(res.std, a_std, rtol=1e-6)
    # the numpy backend (astropy) gives the same answer
    ref = sigma_clipped_stats(stack, sigma=sigma, maxiters=maxiters, backend="numpy")
    np.testing.assert_array_equal(ref.n_used, res.n_used)
    np.testing.assert_allclose(ref.mean, res.mean, rtol=1e-12)
    np.testing.assert_allclose(ref.std, res.std, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(
        sigma_clipped_mean(stack, sigma=sigma, maxiters=maxiters), res.mean
    )


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
def test_sigma_clipped_stats_offset_and_nan():
    rng = np.random.default_rng(3)
    stack = _spiky_stack(rng, 21, (9, 13), np.float64)
    stack[rng.random(stack.shape) < 0.05] = np.nan
    stack[:, 0, 0] = np.nan  # a pixel with no finite value
    offset = rng.normal(990.0, 2.0, (9, 13))
    res = sigma_clipped_stats(stack, offset=offset)
    shifted = stack - offset
    with pytest.warns(AstropyUserWarning):
        mean, med, std, n_kept = _astropy_reference(shifted[:, 1:, :], 3.0, 5)
    np.testing.assert_array_equal(res.n_used[1:], n_kept)
    np.testing.assert_allclose(res.mean[1:], mean, rtol=1e-11)
    np.testing.assert_allclose(res.median[1:], med, rtol=1e-11)
    np.testing.assert_allclose(res.std[1:], std, rtol=1e-9)
    assert res.n_used[0, 0] == 0 and np.isnan(res.mean[0, 0]) and np.isnan(res.std[0, 0])
    # integer stack with an offset map: same as clipping the float difference
    ints = _spiky_stack(rng, 19, (9, 13), np.uint16)
    res_i = sigma_clipped_stats(ints, offset=offset)
    res_f = sigma_clipped_stats(ints.astype(np.float64), offset=offset)
    np.testing.assert_array_equal(res_i.n_used, res_f.n_used)
    np.testing.assert_allclose(res_i.mean, res_f.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res_i.std, res_f.std, rtol=1e-12)


def test_sigma_clipped_stats_recovers_level_under_spikes():
    """Clipped mean is unbiased for the Gaussian core; the plain mean is not."""
    rng = np.random.default_rng(21)
    n_frames, shape, sd = 60, (40, 50), 4.0
    stack = _spiky_stack(rng, n_frames, shape, np.uint16, level=1000.0, noise=sd)
    res = sigma_clipped_stats(stack)
    # per pixel the clipped mean scatters by ~ sd / sqrt(n_used); average over pixels
    err = sd / np.sqrt(res.n_used.mean() * res.n_used.size)
    assert abs(res.mean.mean() - 1000.0) < 5 * err + 0.02  # 0.02: rounding to integers
    # 3% spikes of mean ~115 ADU and 1% dips of ~40 ADU bias the plain mean by ~3 ADU
    assert stack.mean(axis=0).mean() - 1000.0 > 2.0
    # 3-sigma clipping of a Gaussian truncates its std by ~1.3% (and keeps ~99.5%)
    assert 0.95 * sd < np.median(res.std) < 1.01 * sd


def test_sigma_clipped_stats_rejects_bad_arguments():
    with pytest.raises(ValueError, match="maxiters"):
        sigma_clipped_stats(np.zeros((3, 2)), maxiters=0)
    with pytest.raises(ValueError, match="sigma"):
        sigma_clipped_stats(np.zeros((3, 2)), sigma=0.0)
    with pytest.raises(TypeError):
        sigma_clipped_stats(np.zeros((3, 2), dtype=complex))


# ---------------------------------------------------------------------------
# pixel_median
# ---------------------------------------------------------------------------


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n_frames=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    narrow=st.booleans(),
)
def test_pixel_median_equals_numpy(seed, n_frames, dtype, narrow):
    rng = np.random.default_rng(seed)
    if narrow:  # bias-like: the counting-sort path for integers
        stack = _spiky_stack(rng, n_frames, (5, 7), dtype, level=100.0, noise=3.0)
    else:  # full range: the comparison-sort path
        stack = _random_stack(rng, (n_frames, 5, 7), dtype)
    got = pixel_median(stack)
    np.testing.assert_array_equal(got, np.median(stack.astype(np.float64), axis=0))
    np.testing.assert_array_equal(pixel_median(stack, backend="numpy"), got)


def test_pixel_median_nan_propagates_like_numpy():
    x = np.arange(30.0).reshape(5, 2, 3)
    x[2, 1, 1] = np.nan
    got = pixel_median(x)
    assert np.isnan(got[1, 1])
    mask = np.ones((2, 3), bool)
    mask[1, 1] = False
    np.testing.assert_array_equal(got[mask], np.median(x, axis=0)[mask])


# ---------------------------------------------------------------------------
# pixel_time_trend
# ---------------------------------------------------------------------------


def test_pixel_time_trend_matches_linregress_and_numpy():
    rng = np.random.default_rng(8)
    t = np.sort(rng.uniform(0.0, 3600.0, 17))
    stack = rng.normal(1000.0, 4.0, (17, 6, 5)) + 1e-3 * t[:, None, None]
    stack = np.rint(stack).astype(np.uint16)
    level = rng.normal(0.0, 0.5, 17)
    fast = pixel_time_trend(stack, t, frame_level=level)
    ref = pixel_time_trend(stack, t, frame_level=level, backend="numpy")
    np.testing.assert_allclose(fast.slope, ref.slope, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(fast.slope_err, ref.slope_err, rtol=1e-9)
    for iy, ix in [(0, 0), (3, 2), (5, 4)]:
        fit = sps.linregress(t, stack[:, iy, ix] - level)
        assert fast.slope[iy, ix] == pytest.approx(fit.slope, rel=1e-10)
        assert fast.slope_err[iy, ix] == pytest.approx(fit.stderr, rel=1e-9)
    np.testing.assert_allclose(fast.z, fast.slope / fast.slope_err)


def test_pixel_time_trend_recovers_drift_with_calibrated_errors():
    rng = np.random.default_rng(9)
    n_frames, shape, sd = 30, (40, 50), 3.0
    t = np.linspace(0.0, 7200.0, n_frames)
    true_slope = np.zeros(shape)
    true_slope[:4, :] = 2e-3  # drifting pixels, ADU/s: 14 ADU over the run
    common = 5e-4 * t  # a drift of the whole frame, removed via frame_level
    stack = 1000.0 + true_slope * t[:, None, None] + common[:, None, None]
    stack = stack + rng.normal(0.0, sd, (n_frames, *shape))
    res = pixel_time_trend(stack.astype(np.float32), t, frame_level=common)
    pull = (res.slope - true_slope) / res.slope_err
    # pulls follow Student's t with F-2 dof: std sqrt(dof/(dof-2)) = 1.038
    expected = np.sqrt((n_frames - 2) / (n_frames - 4))
    n = pull.size
    assert abs(pull.mean()) < 5 / np.sqrt(n)
    assert abs(pull.std() - expected) < 5 * expected / np.sqrt(2 * n)
    # the analytic error sd / sqrt(Stt) is what the fit reports on average
    stt = np.sum((t - t.mean()) ** 2)
    assert np.median(res.slope_err) == pytest.approx(sd / np.sqrt(stt), rel=0.05)
    # drifting pixels: z = 2e-3 / 2.5e-4 ~ 8
    assert (res.z[:4] > 3).all()
    assert res.n == n_frames
    with pytest.raises(ValueError, match="equal"):
        pixel_time_trend(stack, np.zeros(n_frames))
    with pytest.raises(ValueError, match="3 frames"):
        pixel_time_trend(stack[:2], t[:2])


# ---------------------------------------------------------------------------
# comparator-network clip (small integer stacks) and the fused bias statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 13, 16])
def test_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    """0-1 principle: a comparator network that sorts all 2^n 0/1 inputs sorts everything."""
    net = sorting_network(n)
    assert net.ndim == 2 and net.shape[1] == 2 and (net[:, 0] < net[:, 1]).all()
    assert net.size == 0 or net.max() < n
    x = ((np.arange(2**n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.int8)
    for a, b in net:
        lo, hi = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
        x[a], x[b] = lo, hi
    assert (np.diff(x, axis=0) >= 0).all()


def test_scratch_median_equals_numpy_and_the_in_place_median() -> None:
    """Partition selection with a scratch buffer: np.median exactly, on every kind of input."""
    rng = np.random.default_rng(12)
    # up to 16 values (and where the pivot rounds run out) the rest is sorted
    cases = [rng.normal(0.0, 1.0, n) for n in (1, 2, 3, 16, 17, 18, 1023, 1024, 4096)]
    cases += [np.round(rng.normal(100.0, 2.0, n)) for n in (64, 1024, 4095)]  # many ties
    cases += [np.full(500, 3.25), np.arange(2000.0), np.arange(2000.0)[::-1],
              np.r_[np.zeros(700), np.ones(300)], np.r_[np.ones(501), np.zeros(500)],
              np.r_[rng.normal(0, 1, 200), np.inf, np.inf, -np.inf],  # infinities count
              np.r_[np.full(100, np.inf), np.full(100, -np.inf)],  # (-inf + inf) / 2 = nan
              np.tile([0.0, 1.0, 2.0], 400)]  # the median is the pivot's own value
    organ = np.r_[np.arange(0, 2048, 2), np.arange(2047, 0, -2)].astype(float)
    cases.append(organ)  # organ-pipe order, a classic median-of-three adversary
    for values in cases:
        n = values.size
        a = values.copy()
        got = stats_module.scratch_median(a, np.empty(n), n)
        with np.errstate(invalid="ignore"):
            want = np.median(values)
        assert (got == want) or (np.isnan(got) and np.isnan(want)), (n, got, want)
        b = values.copy()
        assert stats_module.buffer_median(b, n) == got or np.isnan(got)
    # a prefix of longer buffers
    a = rng.normal(0.0, 1.0, 300)
    want = np.median(a[:101])
    assert stats_module.scratch_median(a.copy(), np.empty(300), 101) == want


@pytest.mark.parametrize("n", [20, 33, 50, 64])
def test_sorting_network_sorts_random_columns(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.integers(0, 6, (n, 500))  # many ties
    ref = np.sort(x, axis=0)
    for a, b in sorting_network(n):
        lo, hi = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
        x[a], x[b] = lo, hi
    np.testing.assert_array_equal(x, ref)


def _counting_clip(stack: np.ndarray, offset, sigma: float, maxiters):
    """The counting-sort kernel (the path for F > 64) on the same input."""
    flat = stack.reshape(stack.shape[0], -1)
    if flat.dtype == np.uint8:
        flat = flat.astype(np.uint16)
    off = stats_module._pixel_offset(offset, stack.shape[1:])
    return stats_module._clip_int_kernel(
        flat, off, float(sigma), float(sigma), -1 if maxiters is None else maxiters,
        stats_module._count_buffer_size(flat.shape[0]), 64)


@pytest.mark.parametrize(
    ("dtype", "n_frames", "sigma", "maxiters", "wide"),
    [
        (np.uint16, 12, 3.0, 5, False),
        (np.uint16, 12, 3.0, 5, True),
        (np.uint16, 2, 3.0, 5, False),
        (np.uint16, 24, 2.0, None, False),
        (np.uint16, 64, 3.0, 1, True),
        (np.uint8, 9, 2.5, 3, False),
        (np.int16, 17, 3.0, 5, False),
    ],
)
def test_network_clip_matches_counting_kernel_and_astropy(dtype, n_frames, sigma, maxiters, wide):
    rng = np.random.default_rng(100 + n_frames)
    level = 100.0 if dtype == np.uint8 else 1000.0
    if dtype == np.int16:
        stack = np.round(rng.normal(-20.0, 4.0, (n_frames, 19, 21))).astype(np.int16)
        stack[rng.random(stack.shape) < 0.03] += 300
    else:
        stack = _spiky_stack(rng, n_frames, (19, 21), dtype, level=level, wide=wide)
    stack[:, 0, :3] = stack[0, 0, :3]  # constant pixels: std 0, every value kept
    stack[:, 1, 1] = (np.arange(n_frames) % 2).astype(dtype) + stack[0, 1, 1]  # two tied values
    assert stats_module._network_applies(stack.reshape(n_frames, -1))
    for offset in (None, rng.normal(level - 5.0, 2.0, (19, 21))):
        res = sigma_clipped_stats(stack, sigma=sigma, maxiters=maxiters, offset=offset)
        mean, med, std, n_used = _counting_clip(stack, offset, sigma, maxiters)
        np.testing.assert_array_equal(res.n_used.ravel(), n_used)
        np.testing.assert_allclose(res.mean.ravel(), mean, rtol=1e-13, atol=1e-11)
        np.testing.assert_array_equal(res.median.ravel(), med)
        np.testing.assert_allclose(res.std.ravel(), std, rtol=1e-12, atol=1e-12)
    ref_mean, ref_med, ref_std, ref_n = _astropy_reference(stack.astype(np.float64), sigma, maxiters)
    res = sigma_clipped_stats(stack, sigma=sigma, maxiters=maxiters)
    np.testing.assert_array_equal(res.n_used, ref_n)
    np.testing.assert_allclose(res.mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(res.median, ref_med, rtol=1e-12)
    np.testing.assert_allclose(res.std, ref_std, rtol=1e-9, atol=1e-12)
    assert (res.std[0, :3] == 0).all() and (res.n_used[0, :3] == n_frames).all()


def test_network_clip_nan_offset_gives_empty_pixel():
    rng = np.random.default_rng(4)
    stack = _spiky_stack(rng, 10, (5, 6), np.uint16)
    offset = np.full((5, 6), 990.0)
    offset[2, 3] = np.nan
    res = sigma_clipped_stats(stack, offset=offset)
    assert res.n_used[2, 3] == 0 and np.isnan(res.mean[2, 3]) and np.isnan(res.median[2, 3])
    assert (res.n_used[np.isfinite(offset)] > 0).all()


@pytest.mark.parametrize(("dtype", "n_frames"), [(np.uint16, 12), (np.uint16, 70), (np.uint8, 5),
                                                 (np.float32, 12), (np.float64, 9)])
def test_clipped_stats_and_moments_equals_separate_calls(dtype, n_frames):
    """The fused kernel (uint, F <= 64) and the fallback give both functions' results."""
    rng = np.random.default_rng(n_frames)
    stack = _spiky_stack(rng, n_frames, (17, 23), dtype, wide=True)
    clipped, mom = clipped_stats_and_moments(stack, sigma=3.0, maxiters=5)
    ref_c = sigma_clipped_stats(stack, sigma=3.0, maxiters=5)
    ref_m = group_moments(stack)
    assert mom.n == n_frames
    np.testing.assert_array_equal(mom.mean, ref_m.mean)  # exact integer sums on both paths
    np.testing.assert_array_equal(mom.var, ref_m.var)
    np.testing.assert_array_equal(clipped.n_used, ref_c.n_used)
    np.testing.assert_array_equal(clipped.mean, ref_c.mean)
    np.testing.assert_array_equal(clipped.std, ref_c.std)
    np.testing.assert_array_equal(clipped.median, ref_c.median)
    num_c, num_m = clipped_stats_and_moments(stack, backend="numpy")
    np.testing.assert_allclose(num_c.mean, clipped.mean, rtol=1e-12)
    np.testing.assert_allclose(num_m.var, mom.var, rtol=1e-12)
    with pytest.raises(ValueError, match="maxiters"):
        clipped_stats_and_moments(stack, maxiters=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigma_clip_of_a_fortran_ordered_stack_is_read_in_place_with_the_same_result(dtype) -> None:
    """Columns of a map (a Fortran-ordered (F, P) stack) give what a C-ordered copy gives."""
    rng = np.random.default_rng(5)
    m = rng.normal(100.0, 2.0, (300, 41)).astype(dtype)
    m[rng.random(m.shape) < 0.02] = np.nan
    m[7, :] = 500.0  # an outlier row, clipped from every column
    fortran = np.asfortranarray(m)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
    got = sigma_clipped_stats(fortran, sigma=3.0, maxiters=5)
    ref = sigma_clipped_stats(np.ascontiguousarray(m), sigma=3.0, maxiters=5)
    for name in ("mean", "median", "std", "n_used"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert (got.n_used < 300).all()
    # and a row pass through the transpose view
    rows = sigma_clipped_stats(m.T, sigma=3.0, maxiters=5)
    rows_ref = sigma_clipped_stats(np.ascontiguousarray(m.T), sigma=3.0, maxiters=5)
    np.testing.assert_array_equal(rows.mean, rows_ref.mean)


@pytest.mark.parametrize("backend", ["radix", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("sigma", "maxiters"), [(3.0, 5), (2.5, None), (3.0, 1)])
def test_clipped_row_means_equal_the_clip_kernel_and_astropy(dtype, sigma, maxiters, backend,
                                                             monkeypatch) -> None:
    """Row means by sort-then-clip equal the per-pixel clip of the transpose, bit for bit.

    NaN and infinite values (ignored), a row without a finite value, rows of
    one and two values, outliers; the input is left untouched unless
    ``overwrite``; astropy agrees to rounding. With either row sort (the
    process measures which is faster and keeps it).
    """
    from sitiancal.compute import summary

    monkeypatch.setattr(summary, "_ROW_SORT_CHOICE", [backend])
    rng = np.random.default_rng(11)
    m = rng.normal(100.0, 2.0, (37, 501)).astype(dtype)
    m[rng.random(m.shape) < 0.03] = np.nan
    m[:, 7] = 500.0                      # an outlier column, clipped from every row
    m[3, 10:20] = np.inf
    m[4, 30:40] = -np.inf
    m[5] = np.nan                        # no finite value
    m[6, 1:] = np.nan                    # one
    m[8, 2:] = np.nan                    # two
    before = m.copy()
    got = stats_module.clipped_row_means(m, sigma=sigma, maxiters=maxiters)
    np.testing.assert_array_equal(m, before)
    ref = sigma_clipped_stats(np.ascontiguousarray(m.T), sigma=sigma, maxiters=maxiters).mean
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[5]) and np.isfinite(np.delete(got, 5)).all()
    finite = np.delete(np.where(np.isfinite(m), m, np.nan).astype(np.float64), 5, axis=0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns about the NaN it masks
        want = astropy_scs(finite, axis=1, sigma=sigma, maxiters=maxiters)[0]
    np.testing.assert_allclose(np.delete(got, 5), want, rtol=1e-12)
    # in place: the same means, and the rows come back sorted
    work = np.array(m)
    np.testing.assert_array_equal(
        stats_module.clipped_row_means(work, sigma=sigma, maxiters=maxiters, overwrite=True), got)
    k = int(np.isfinite(work[0]).sum())
    assert (np.diff(work[0, :k]) >= 0).all() and np.isnan(work[0, k:]).all()
    with pytest.raises(ValueError, match="2-D"):
        stats_module.clipped_row_means(np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="maxiters"):
        stats_module.clipped_row_means(m, maxiters=0)
