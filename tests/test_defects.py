"""Defect rules, RTN detection and the mask against synthetic truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from codegen import masked_stores, x86_only
from sklearn.mixture import GaussianMixture

from sitiancal.compute import defects as D
from sitiancal.compute.dark import dark_populations
from sitiancal.compute.defects import (
    DefectConfig,
    MaskBit,
    build_mask,
    dead_low,
    detect_rtn,
    gain_outlier,
    hot_warm,
    local_median,
    mask_counts,
    noisy,
    nonlinear,
    robust_center_scale,
    rtn_confirm,
    rtn_statistic,
    unstable_bias,
)
from sitiancal.compute.mixture import fit_mixture

READ_ADU = 4.1  # 1.03 e- at 0.25 e-/ADU
CFG = DefectConfig()


def _q(values: np.ndarray) -> np.ndarray:
    """Raw uint16 counts around a bias level of 1000 ADU."""
    return np.round(1000.0 + values).astype(np.uint16)


# --------------------------------------------------------------------------- robust figures


def test_robust_center_scale() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(5.0, 2.0, 100_000)
    v[:500] = 1e6  # 0.5 % outliers barely move it
    v[500:600] = np.nan
    c, s = robust_center_scale(v)
    assert abs(c - 5.0) < 0.03 and abs(s / 2.0 - 1.0) < 0.02
    c0, s0 = robust_center_scale(np.array([3, 3, 3, 3, 4.0]))  # MAD 0: mean absolute deviation
    assert c0 == 3.0 and s0 == pytest.approx(np.sqrt(np.pi / 2) * 0.2)
    assert all(np.isnan(robust_center_scale(np.array([np.nan]))))


# --------------------------------------------------------------------------- flat: dead / low


def _vignetted_flat(seed: int, ny: int = 600, nx: int = 900):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((yy - ny / 2) ** 2 + (xx - nx / 2) ** 2) / ((ny / 2) ** 2 + (nx / 2) ** 2)
    vignetting = 1.0 - 0.35 * r2  # 35 % fall-off in the corners
    dead = rng.random((ny, nx)) < 0.002
    low = (rng.random((ny, nx)) < 0.003) & ~dead
    factor = np.ones((ny, nx))
    factor[dead] = rng.uniform(0.0, 0.45, dead.sum())
    factor[low] = rng.uniform(0.55, 0.75, low.sum())
    flat = vignetting * factor * (1.0 + rng.normal(0.0, 0.01, (ny, nx)))  # 1 % PRNU
    return flat, vignetting, dead, low


def test_local_median_follows_vignetting() -> None:
    flat, vignetting, _, _ = _vignetted_flat(1)
    flat[10:50, 10:50] = np.nan  # a hole larger than a block
    med = local_median(flat, block=32)
    assert med.shape == flat.shape and med.dtype == np.float32
    rel = np.abs(med / vignetting - 1.0)
    # block medians carry 1 % / sqrt(1024) noise; the spline error is largest
    # at the corners (extrapolation over half a block)
    assert np.percentile(rel, 99) < 0.003
    away = np.ones(flat.shape, bool)
    away[:64, :64] = False  # the blocks around the hole: their medians sit off-centre
    assert rel[away].max() < 0.02
    assert rel.max() < 0.05
    # a uniform map is returned unchanged, whatever the block size
    flat1 = np.full((70, 45), 2.5)
    for block in (1, 16, 64, 100):
        np.testing.assert_allclose(local_median(flat1, block=block), 2.5, rtol=1e-6)
    assert np.isnan(local_median(np.full((8, 8), np.nan))).all()


@pytest.mark.parametrize(("shape", "block"), [((100, 130), 16), ((70, 45), 7), ((64, 40), 32),
                                              ((33, 200), 16)])
def test_local_median_equals_scipy_splines(shape: tuple[int, int], block: int) -> None:
    """The compiled row evaluation gives scipy's ``CubicSpline`` values (as float32) exactly.

    Reference: the cell medians (numpy), the same separable not-a-knot splines
    through the cell centres evaluated by scipy at every row, cast to float32.
    Odd blocks put cell centres on pixel rows (the interval rule at a break),
    and the ends extrapolate.
    """
    from scipy.interpolate import CubicSpline

    rng = np.random.default_rng(block)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    a = (1.0 + 0.1 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
         + rng.normal(0.0, 0.01, shape)).astype(np.float32)
    got = local_median(a, block=block)
    nby, nbx = -(-ny // block), -(-nx // block)
    grid = np.array([[np.median(a[i * block:(i + 1) * block, j * block:(j + 1) * block]
                                .astype(np.float64)) for j in range(nbx)] for i in range(nby)])
    yc = np.array([0.5 * (s + min(s + block, ny) - 1) for s in range(0, ny, block)])
    xc = np.array([0.5 * (s + min(s + block, nx) - 1) for s in range(0, nx, block)])
    rows = CubicSpline(xc, grid, axis=1, bc_type="not-a-knot")(np.arange(nx, dtype=np.float64))
    want = CubicSpline(yc, rows, axis=0, bc_type="not-a-knot")(np.arange(ny, dtype=np.float64))
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_dead_and_low_response_under_vignetting() -> None:
    flat, _, dead, low = _vignetted_flat(2)
    d, lo = dead_low(flat, local_median(flat), config=CFG)
    # ratios are >= 5 % (10 sigma of the PRNU) from the thresholds: exact recovery
    np.testing.assert_array_equal(d, dead)
    np.testing.assert_array_equal(lo, low)
    # without the local median the vignetted corners would be flagged
    _, lo_glob = dead_low(flat, np.full(flat.shape, np.median(flat)), config=CFG)
    assert lo_glob.sum() > 2 * low.sum()
    nan_d, nan_l = dead_low(np.array([np.nan, 0.2]), np.array([1.0, np.nan]), config=CFG)
    assert not nan_d.any() and not nan_l.any()


# --------------------------------------------------------------------------- dark: hot / warm


@pytest.fixture(scope="module")
def rate_map() -> dict:
    """Dark rates (e-/s) with a main, a warm (1 %) and a hot (0.2 %) population."""
    rng = np.random.default_rng(4)
    shape = (200, 300)
    n = shape[0] * shape[1]
    true = rng.lognormal(np.log(0.002), 0.25, n)  # the reference 0.002 e-/s
    err = rng.uniform(0.0008, 0.0012, n)
    warm = rng.random(n) < 0.01
    hot = (rng.random(n) < 0.002) & ~warm
    true[warm] = rng.uniform(0.02, 0.06, warm.sum())
    true[hot] = np.exp(rng.uniform(np.log(0.3), np.log(20.0), hot.sum()))
    err = err + 0.02 * true * hot  # shot-noise dominated errors of hot pixels
    rate = true + rng.normal(0.0, err)
    pops = dark_populations(rate, err, max_components=4, seed=0)
    return {"rate": rate.reshape(shape), "err": err.reshape(shape), "warm": warm.reshape(shape),
            "hot": hot.reshape(shape), "pops": pops}


def _recall_precision(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return float(found[truth].mean()), float(truth[found].mean())


@pytest.mark.parametrize("use_populations", [True, False])
def test_hot_warm_recall_precision(rate_map: dict, use_populations: bool) -> None:
    pops = rate_map["pops"] if use_populations else None
    hot, warm = hot_warm(rate_map["rate"], rate_map["err"], populations=pops, config=CFG)
    assert not np.any(hot & warm)
    r, p = _recall_precision(hot, rate_map["hot"])
    assert r >= 0.95 and p >= 0.90, (r, p)
    r, p = _recall_precision(warm, rate_map["warm"])
    assert r >= 0.95 and p >= 0.90, (r, p)


def test_hot_warm_tile_by_tile_matches_whole_map(rate_map: dict) -> None:
    rate, err, pops = rate_map["rate"], rate_map["err"], rate_map["pops"]
    c, s = robust_center_scale(rate)
    whole = hot_warm(rate, err, populations=pops, config=CFG)
    for sl in (np.s_[:100, :150], np.s_[100:, 150:]):
        tile = hot_warm(rate[sl], err[sl], populations=pops, config=CFG, center=c, scale=s)
        np.testing.assert_array_equal(tile[0], whole[0][sl])
        np.testing.assert_array_equal(tile[1], whole[1][sl])


def test_hot_floor_applies() -> None:
    """A narrow population makes 5 sigma tiny; the absolute floor keeps 0.05 e-/s warm."""
    rate = np.full(1000, 0.002)
    rate[0], rate[1] = 0.05, 0.5
    hot, warm = hot_warm(rate, np.full(1000, 1e-4), populations=None, config=CFG)
    assert hot.tolist()[:3] == [False, True, False] and warm[0]


# --------------------------------------------------------------------------- other rules


def test_noisy_unstable_nonlinear() -> None:
    rng = np.random.default_rng(5)
    n = 200_000
    std = rng.normal(READ_ADU, 0.3, n)
    bad = rng.random(n) < 0.001
    std[bad] *= rng.uniform(3.0, 5.0, bad.sum())
    std[:3] = np.nan
    flags = noisy(std, config=CFG)
    np.testing.assert_array_equal(flags, bad & np.isfinite(std))
    # with a global center/scale given, the rule is the same on a sub-map
    c, s = robust_center_scale(std)
    np.testing.assert_array_equal(noisy(std[:1000], config=CFG, center=c, scale=s), flags[:1000])

    z = rng.normal(0.0, 1.0, n)
    z[:50] = 8.0
    z[50:60] = -7.0
    np.testing.assert_array_equal(np.flatnonzero(unstable_bias(z, config=CFG)), np.arange(60))

    resid = rng.normal(0.0, 0.1, n)  # % per pixel
    resid[:20] = rng.uniform(2.0, 5.0, 20)
    resid[20:40] = 0.8  # > 5 sigma, but under the 1 % floor
    np.testing.assert_array_equal(np.flatnonzero(nonlinear(resid, config=CFG)), np.arange(20))


def test_gain_outlier() -> None:
    rng = np.random.default_rng(6)
    n = 50_000
    err = rng.uniform(0.002, 0.006, n)
    second = rng.random(n) < 0.15
    true = np.where(second, rng.normal(0.272, 0.002, n), rng.normal(0.254, 0.002, n))
    out = rng.random(n) < 0.002
    true[out] = rng.choice([0.18, 0.35], out.sum())
    g = true + rng.normal(0.0, err)
    pops = fit_mixture(g, err, max_components=3, seed=0)
    flags = gain_outlier(g, err, populations=pops, config=CFG)
    r, p = _recall_precision(flags, out)
    assert r == 1.0 and p >= 0.95, (r, p)
    assert not gain_outlier(np.array([np.nan]), np.array([0.01]), populations=pops, config=CFG)[0]


# --------------------------------------------------------------------------- mask


def test_build_mask_and_counts() -> None:
    shape = (10, 20)
    hot = np.zeros(shape, bool)
    hot[0, :5] = True
    rtn = np.zeros(shape, np.float32)
    rtn[0, 3:8] = 1.0
    rtn[1, 0] = np.nan  # not set
    dead = np.zeros(shape, bool)
    dead[9, 19] = True
    mask = build_mask(hot=hot, rtn=rtn, dead=dead)
    assert mask.dtype == np.uint16 and mask.shape == shape
    assert mask[0, 3] == MaskBit.HOT | MaskBit.RTN
    assert mask[0, 0] == MaskBit.HOT and mask[0, 7] == MaskBit.RTN and mask[9, 19] == MaskBit.DEAD
    assert mask[1, 0] == 0
    counts = mask_counts(mask)
    assert counts["HOT"] == {"count": 5, "fraction": 5 / 200}
    assert counts["RTN"]["count"] == 5 and counts["DEAD"]["count"] == 1
    assert counts["WARM"]["count"] == 0
    assert counts["any"] == {"count": 9, "fraction": 9 / 200}
    assert set(counts) == {b.name for b in MaskBit} | {"any"}
    json.dumps(counts)
    assert int(MaskBit.UNSTABLE_BIAS) == 256
    with pytest.raises(ValueError, match="unknown mask bit"):
        build_mask(hott=hot)
    with pytest.raises(ValueError, match="shape"):
        build_mask(hot=hot, dead=dead[:5])


# --------------------------------------------------------------------------- RTN


def _rtn2(rng: np.random.Generator, n_f: int, n_p: int, amp: tuple[float, float],
          occ: tuple[float, float]) -> np.ndarray:
    a = rng.uniform(*amp, n_p) * READ_ADU
    p = rng.uniform(*occ, n_p)
    state = rng.random((n_f, n_p)) < p
    return _q(rng.normal(0.0, READ_ADU, (n_f, n_p)) + a * state)


def _rtn3(rng: np.random.Generator, n_f: int, n_p: int, amp: tuple[float, float]) -> np.ndarray:
    a1, a2 = (rng.uniform(*amp, n_p) * READ_ADU for _ in range(2))
    occ = rng.dirichlet([3.0, 3.0, 3.0], n_p)
    u = rng.random((n_f, n_p))
    level = (u > occ[:, 0]).astype(int) + (u > occ[:, 0] + occ[:, 1])
    offset = np.where(level == 0, 0.0, np.where(level == 1, a1, a1 + a2))
    return _q(rng.normal(0.0, READ_ADU, (n_f, n_p)) + offset)


def test_ad_kernel_matches_scipy_reference() -> None:
    rng = np.random.default_rng(7)
    stack = np.concatenate([_q(rng.normal(0, READ_ADU, (30, 3000))), _rtn2(rng, 30, 1000, (3, 8), (0.2, 0.8))],
                           axis=1).reshape(30, 40, 100)
    fast = rtn_statistic(stack, seed=3)
    ref = rtn_statistic(stack, seed=3, backend="numpy")
    assert fast.shape == (40, 100)
    # the table's linear interpolation: within its stated bound (1e-5 at 30 frames)
    assert np.nanmax(np.abs(fast - ref)) <= D._ad_table_error(30)
    # a constant pixel has no statistic
    const = np.full((20, 4), 7.5)
    assert np.isnan(rtn_statistic(const)).all()


def test_ad_false_alarm_rate_matches_stephens() -> None:
    """P(A*^2 > 1.45) ~ 1e-3 under normality (D'Agostino & Stephens 1986)."""
    rng = np.random.default_rng(8)
    a2 = rtn_statistic(_q(rng.normal(0.0, READ_ADU, (50, 200_000))), seed=1)
    rate = np.mean(a2 > CFG.rtn_ad_threshold)
    assert 0.0006 < rate < 0.0015  # 200 +- 14 expected


def test_level_kernel_matches_brute_force() -> None:
    rng = np.random.default_rng(9)
    x = np.sort(np.concatenate([rng.normal(0, 1, (15, 60)), _rtn3(rng, 15, 40, (3, 8)).astype(float)],
                               axis=1), axis=0)
    out = np.empty(x.shape[1])
    D._level_kernel(x, 2, out)

    def sse(v: np.ndarray) -> float:
        return float(((v - v.mean()) ** 2).sum())

    def best(v: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
        cands = [(c, sse(v[lo:c]) + sse(v[c:hi])) for c in range(lo + 2, hi - 1)]
        return min(cands, key=lambda t: t[1]) if cands else (-1, np.inf)

    for p in range(x.shape[1]):
        v = x[:, p]
        b, _ = best(v, 0, 15)
        a, wl = best(v, 0, b)
        c, wr = best(v, b, 15)
        gl = sse(v[:b]) - wl if a >= 0 else -1.0
        gr = sse(v[b:]) - wr if c >= 0 else -1.0
        e0, e1 = (a, b) if gl >= gr else (b, c)
        parts = [v[:e0], v[e0:e1], v[e1:]]
        sd = np.sqrt(sum(sse(q) for q in parts) / 12)
        m = [q.mean() for q in parts]
        assert out[p] == pytest.approx(min(m[1] - m[0], m[2] - m[1]) / sd, rel=1e-9)


def test_tied_mixture_matches_sklearn() -> None:
    rng = np.random.default_rng(10)
    y = _rtn3(rng, 40, 12, (2, 6)).astype(float).T
    y = (y - y.mean(axis=1, keepdims=True)) / y.std(axis=1, keepdims=True)
    for k in (2, 3):
        _, _, _, ll = D._tied_gmm(y, k)
        for row in range(y.shape[0]):
            gm = GaussianMixture(k, covariance_type="tied", reg_covar=1e-9, n_init=5,
                                 random_state=0, tol=1e-8, max_iter=1000).fit(y[row, :, None])
            ll_sk = gm.score(y[row, :, None]) * y.shape[1]
            # EM from the exact k-means split reaches at least sklearn's optimum
            assert ll[row] > ll_sk - 1e-3


@pytest.mark.parametrize("n_f", [20, 50])
def test_rtn_recall(n_f: int) -> None:
    """Recall >= 80 % where the frames carry the information (see the module notes)."""
    rng = np.random.default_rng(11 + n_f)
    # At F = 20 the multiple-testing threshold (Delta BIC > 20) needs larger steps.
    amp2, amp3 = ((4.5, 8.0), (5.5, 8.0)) if n_f == 50 else ((9.0, 12.0), (9.5, 12.0))
    two = detect_rtn(_rtn2(rng, n_f, 1500, amp2, (0.2, 0.8)), config=CFG)
    three = detect_rtn(_rtn3(rng, n_f, 1500, amp3), config=CFG)
    assert two.mean() >= 0.8, two.mean()
    assert three.mean() >= 0.8, three.mean()


@pytest.mark.parametrize("n_f", [20, 50])
def test_rtn_false_alarms(n_f: int) -> None:
    """Gaussian pixels (normal or 3-5x noisier) and heavy tails are almost never RTN."""
    rng = np.random.default_rng(21 + n_f)
    n_p = 100_000
    normal = detect_rtn(_q(rng.normal(0.0, READ_ADU, (n_f, n_p))), config=CFG)
    sig = READ_ADU * rng.uniform(3.0, 5.0, n_p)
    noisy_px = detect_rtn(_q(rng.normal(0.0, 1.0, (n_f, n_p)) * sig), config=CFG)
    heavy = detect_rtn(_q(rng.standard_t(5, (n_f, 20_000)) * READ_ADU), config=CFG)
    # measured < 2e-5 for Gaussian pixels; a 61 MP sensor needs << 1e-3 (0.07% anomalous)
    assert normal.mean() < 1e-4 and noisy_px.mean() < 1e-4, (normal.mean(), noisy_px.mean())
    assert heavy.mean() < 2e-3, heavy.mean()


def test_rtn_quantisation_and_frame_level() -> None:
    rng = np.random.default_rng(30)
    # heavily quantised pixels (sigma 0.5 ADU): integer codes are not levels
    assert detect_rtn(_q(rng.normal(0.0, 0.5, (50, 20_000)))).mean() < 1e-3
    # a common bias jump between frames looks like two levels unless removed
    jump = rng.choice([0.0, 20.0], 50)
    stack = _q(jump[:, None] + rng.normal(0.0, READ_ADU, (50, 20_000)))
    assert detect_rtn(stack).mean() > 0.01
    assert detect_rtn(stack, frame_level=1000.0 + jump).mean() < 1e-3
    # too few frames: nothing is tested
    assert not detect_rtn(_rtn2(rng, 6, 100, (8, 9), (0.5, 0.5))).any()


def test_rtn_confirm_rejects_broad_and_accepts_levels() -> None:
    rng = np.random.default_rng(31)
    levels = rng.normal(0.0, 1.0, (50, 200)) + 8.0 * (rng.random((50, 200)) < 0.4)
    broad = rng.normal(0.0, 1.0, (50, 200)) * 15.0
    assert rtn_confirm(levels * READ_ADU).mean() > 0.95
    assert rtn_confirm(broad).mean() < 0.02
    assert rtn_confirm(np.zeros((50, 0))).shape == (0,)


def _detect_rtn_reference(stack: np.ndarray, frame_level, seed: int) -> np.ndarray:
    """detect_rtn in separate steps: the prepared chunks, numpy's sort, the per-column kernels."""
    n_f = stack.shape[0]
    tab, z0 = D._log_phi_table((n_f - 1) / np.sqrt(n_f))
    thr = D._level_threshold(n_f, CFG.rtn_min_level_frames, CFG.rtn_level_pvalue)
    out = np.zeros(int(np.prod(stack.shape[1:])), dtype=bool)
    for p0, vals in D._chunks(stack, frame_level, seed):
        vals.sort(axis=0)
        a2 = np.empty(vals.shape[1])
        D._ad_kernel(vals, tab, z0, D._TABLE_STEP, a2)
        s3 = np.empty(vals.shape[1])
        D._level_kernel(vals, CFG.rtn_min_level_frames, s3)
        cand = np.flatnonzero((a2 > CFG.rtn_ad_threshold) | (s3 > thr))
        out[p0 + cand] = rtn_confirm(vals[:, cand], config=CFG)
    return out.reshape(stack.shape[1:])


@pytest.mark.parametrize("n_f", [6, 12, 25, 50])
def test_rtn_stage1_network_is_bit_identical(n_f: int, monkeypatch) -> None:
    """The vectorised stage 1 (sorting network) equals the per-pixel kernel and the steps."""
    monkeypatch.setattr(D, "_CHUNK_PIXELS", 1500)  # several chunks, each with its own stream
    rng = np.random.default_rng(40 + n_f)
    stack = np.concatenate([_q(rng.normal(0.0, READ_ADU, (n_f, 3000))),
                            _rtn2(rng, n_f, 600, (10, 14), (0.3, 0.7)),
                            _rtn3(rng, n_f, 400, (10, 14))], axis=1)
    stack[:, :10] = stack[0, :10]  # constant counts (dithered, so still a statistic)
    level = 1000.0 + rng.normal(0.0, 0.3, n_f)
    tab, z0 = D._log_phi_table((n_f - 1) / np.sqrt(n_f))
    flat = stack.reshape(n_f, -1)
    lvl = (level - level.mean()).astype(np.float32)
    ids = np.arange(flat.shape[1], dtype=np.int64) * 7 + 11  # sensor indices of the pixels
    outs = []
    for kernel in ("net", "pixel"):
        a2, s3 = np.empty(flat.shape[1]), np.empty(flat.shape[1])
        if kernel == "net":  # computes the dither itself; its sorted values stay in the kernel
            D._rtn_stage1_network(flat, lvl, True, ids, D._seed_mix(3),
                                  D._sorting_network(n_f), tab, z0, D._TABLE_STEP, 2, a2, s3)
            # the values stage 2 gets, recomputed for the columns asked for
            cols = np.arange(flat.shape[1])
            buf = D._sorted_values(flat, cols, frame_level=level, pixels=ids, seed=3,
                                   integral=True)
            odd = D._sorted_values(flat, cols[1::2], frame_level=level, pixels=ids, seed=3,
                                   integral=True)
            np.testing.assert_array_equal(odd, buf[:, 1::2])
        else:  # the dither array of :func:`dither`, then the per-pixel kernel
            buf = D.dither(ids, n_f, 3)
            D._rtn_stage1_kernel(flat, buf, lvl, True, tab, z0, D._TABLE_STEP, 2, a2, s3)
        outs.append((buf, a2, s3))
    for x, y in zip(outs[0], outs[1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.isfinite(outs[0][1]).all()
    flags = detect_rtn(stack, frame_level=level, config=CFG, seed=3)
    np.testing.assert_array_equal(flags, _detect_rtn_reference(stack, level, 3))
    assert flags[10:3000].mean() < 2e-3
    if n_f >= 12:  # (at F = 6 no three-level split exists: the statistic is 0)
        # detection power at F = 12 is limited (module notes): a loose check that it works
        assert flags[3000:].mean() > 0.3


#: The stage-1 kernel's signature as the tile pass calls it (a uint16 chunk of a C stack).
_STAGE1_SIGNATURE = (
    't.none(t.Array(t.uint16, 2, "A"), a1(t.float32), t.boolean, a1(t.int64), t.uint64, '
    'a2(t.int64), a1(t.float64), t.float64, t.float64, t.int64, a1(t.float64), a1(t.float64))')


@x86_only
def test_rtn_stage1_kernel_compiles_without_masked_stores_for_zen3(tmp_path) -> None:
    """The stage-1 kernel's running maxima and sorting network compile to selects.

    Compiled for Zen 3 (AVX2) on any x86 host: written as conditional updates
    they became ``vmaskmov`` stores (11 of them), which Zen 2/3 run as
    microcode (the kernel took ~1.4-1.6x as long there; see ``defects._flag``).
    """
    assert masked_stores("sitiancal.compute.defects", "_rtn_stage1_network",
                         _STAGE1_SIGNATURE, tmp_path) == 0


def test_rtn_float_input_with_nan_takes_the_per_pixel_path() -> None:
    rng = np.random.default_rng(44)
    stack = np.concatenate([rng.normal(0.0, READ_ADU, (20, 2000)),
                            _rtn2(rng, 20, 300, (6, 9), (0.3, 0.7)).astype(np.float64) - 1000.0],
                           axis=1) + 0.123  # not integral: no dither
    stack[3, :50] = np.nan
    flags = detect_rtn(stack, config=CFG)
    np.testing.assert_array_equal(flags, _detect_rtn_reference(stack, None, 0))
    clean = np.nan_to_num(stack[:, 50:], nan=0.0)
    np.testing.assert_array_equal(detect_rtn(clean, config=CFG),
                                  _detect_rtn_reference(clean, None, 0))
    assert flags[2000:].mean() > 0.5


def test_dither_is_a_function_of_seed_pixel_and_frame() -> None:
    ids = np.array([0, 1, 7, 123_456_789, 61_170_000], dtype=np.int64)
    d = D.dither(ids, 40, seed=5)
    np.testing.assert_array_equal(d, D._dither_numpy(ids, 40, 5))  # compiled == numpy
    np.testing.assert_array_equal(D.dither(ids[2:4], 40, 5), d[:, 2:4])  # no dependence on
    assert not np.array_equal(D.dither(ids, 40, 6), d)  # the company a pixel keeps
    big = D.dither(np.arange(200_000), 12, seed=0)
    assert big.min() >= 0.0 and big.max() < 1.0
    assert big.mean() == pytest.approx(0.5, abs=0.002)
    assert big.var() == pytest.approx(1 / 12, rel=0.01)
    # neighbouring frames and pixels are uncorrelated
    assert abs(np.corrcoef(big[0], big[1])[0, 1]) < 0.01
    assert abs(np.corrcoef(big[0, :-1], big[0, 1:])[0, 1]) < 0.01


def test_rtn_flags_do_not_depend_on_the_tiling() -> None:
    rng = np.random.default_rng(8)
    ny, nx, n_f = 60, 90, 30
    stack = rng.normal(0.0, READ_ADU, (n_f, ny, nx))
    states = rng.integers(0, 2, (n_f, 40))
    ys, xs = rng.integers(0, ny, 40), rng.integers(0, nx, 40)
    stack[:, ys, xs] += 6.0 * READ_ADU * states  # telegraph pixels
    raw = _q(stack)
    whole = detect_rtn(raw, config=CFG, seed=2)
    assert whole[ys, xs].mean() > 0.5  # (recall is tested above; here: the tiling)
    tiled = np.zeros_like(whole)
    for y0 in range(0, ny, 25):
        for x0 in range(0, nx, 40):
            sub = raw[:, y0:y0 + 25, x0:x0 + 40]
            yy, xx = np.mgrid[y0:y0 + sub.shape[1], x0:x0 + sub.shape[2]]
            tiled[y0:y0 + 25, x0:x0 + 40] = detect_rtn(sub, config=CFG, seed=2,
                                                       pixel_index=(yy * nx + xx).ravel())
    np.testing.assert_array_equal(tiled, whole)


def test_nonlinear_kernel_equals_the_numpy_expression() -> None:
    """Large float32 maps go through the fused kernel: the same flags as the float32 expression."""
    from sitiancal.compute import defects

    rng = np.random.default_rng(17)
    shape = (1100, 1000)
    assert shape[0] * shape[1] >= defects._FUSED_MIN
    v = rng.normal(0.0, 0.2, shape).astype(np.float32)
    v[rng.random(shape) < 0.01] = np.nan
    v[rng.random(shape) < 0.001] = np.inf
    cfg = defects.DefectConfig()
    c, s = 0.01, 0.1
    # values exactly on both thresholds (float32), where a float64 comparison would differ
    v[0, :3] = np.float32(c) + np.float32(cfg.nonlinear_nsigma * s)
    v[1, :3] = np.float32(cfg.nonlinear_floor_pct)
    v[2, :3] = -v[0, :3]
    got = defects.nonlinear(v, config=cfg, center=c, scale=s)
    with np.errstate(invalid="ignore"):
        ref = (np.abs(v - c) > cfg.nonlinear_nsigma * s) & (np.abs(v) > cfg.nonlinear_floor_pct)
    np.testing.assert_array_equal(got, ref)
    assert 0 < got.sum() < got.size
    small = v[:100, :100].copy()  # below the kernel's size: the numpy path
    np.testing.assert_array_equal(defects.nonlinear(small, config=cfg, center=c, scale=s), ref[:100, :100])


def _flags_compiled_and_numpy(values: np.ndarray, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """``rtn_confirm`` flags with the stage-2 fit ``fit`` compiled, then on its numpy backend."""
    flags = rtn_confirm(values, config=CFG)
    orig = getattr(D, fit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, fit, lambda *args, **kw: orig(*args, backend="numpy", **kw))
        ref_flags = rtn_confirm(values, config=CFG)
    return flags, ref_flags


def test_kmeans_init_kernel_equals_numpy_reference() -> None:
    """The compiled exact 1-D k-means start gives the reference's means, ties included."""
    rng = np.random.default_rng(48)
    rows = np.concatenate([rng.normal(0.0, 1.0, (300, 30)),
                           _rtn3(rng, 30, 100, (2, 6)).astype(float).T,
                           np.round(rng.normal(0.0, 1.0, (100, 30))),  # many tied values
                           np.zeros((2, 30))], axis=0)
    rows = np.sort(rows, axis=1)
    for k in (2, 3):
        got = np.empty((rows.shape[0], k))
        D._kmeans_1d_kernel(rows, got)
        np.testing.assert_array_equal(got, D._kmeans_1d_init(rows, k))


def test_tied_mixture_kernel_against_numpy_reference() -> None:
    """The compiled tied-variance EM (SQUAREM-accelerated) against the reference's plain EM.

    The same EM steps (two steps: the same parameters), the same optimum when
    both run to convergence, and at the default limits closer to it than
    plain EM. Parameters along the likelihood's flat directions (a weight of
    a nearly empty level) are not determined by the data, so the optimum is
    compared by its log-likelihood.
    """
    rng = np.random.default_rng(47)
    n_f = 30
    rows = np.concatenate([rng.normal(0.0, 1.0, (400, n_f)),
                           _rtn2(rng, n_f, 200, (10, 14), (0.3, 0.7)).astype(float).T,
                           _rtn3(rng, n_f, 100, (2, 6)).astype(float).T,
                           rng.standard_t(2.0, (200, n_f)),
                           np.zeros((3, n_f))], axis=0)        # constant rows: the variance floor
    rows = (rows - rows.mean(axis=1, keepdims=True)) / np.maximum(rows.std(axis=1), 1e-300)[:, None]
    for k in (2, 3):
        # two steps are plain EM's; a row that hits the limit reports the
        # likelihood of its last parameters
        two = D._tied_gmm(rows, k, max_iter=2)
        two_ref = D._tied_gmm(rows, k, max_iter=2, backend="numpy")
        for got, want in zip(two, two_ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        best = D._tied_gmm(rows, k, tol=1e-13, max_iter=100_000)[3]
        best_ref = D._tied_gmm(rows, k, tol=1e-13, max_iter=100_000, backend="numpy")[3]
        np.testing.assert_allclose(best, best_ref, rtol=0, atol=1e-6)
        short = best_ref - D._tied_gmm(rows, k)[3]
        short_ref = best_ref - D._tied_gmm(rows, k, backend="numpy")[3]
        assert short.min() > -1e-6 and short_ref.min() > -1e-6  # neither beats the optimum
        assert short.max() < short_ref.max()
        assert (short > 1e-3).sum() < 0.5 * (short_ref > 1e-3).sum()
        assert short.sum() < 0.5 * short_ref.sum()
    # and the whole confirmation gives the same flags either way
    values = np.concatenate([_q(rng.normal(0.0, READ_ADU, (30, 2000))),
                             _rtn2(rng, 30, 300, (10, 14), (0.3, 0.7)),
                             _rtn3(rng, 30, 200, (10, 14))], axis=1)
    flags, ref_flags = _flags_compiled_and_numpy(values, "_tied_gmm")
    np.testing.assert_array_equal(flags, ref_flags)
    assert flags[2000:].mean() > 0.9 and flags[:2000].mean() < 0.01
    with pytest.raises(ValueError, match="backend"):
        D._tied_gmm(rows, 2, backend="gpu")


def _confirm_by_definition(values: np.ndarray, cfg: DefectConfig) -> np.ndarray:
    """``rtn_confirm``'s rule written out: every fit on every pixel, no short cut."""
    y = values.T.astype(np.float64)
    sd = np.maximum(y.std(axis=1), 1e-300)
    y = (y - y.mean(axis=1, keepdims=True)) / sd[:, None]
    n_f = y.shape[1]
    log_n = np.log(n_f)
    bic_null = np.minimum(-2.0 * D._tied_gmm(y, 1)[3] + 2 * log_n,
                          -2.0 * D._student_t_loglike(y) + 3 * log_n)
    ok = np.zeros(y.shape[0], dtype=bool)
    for k in range(2, cfg.rtn_max_levels + 1):
        w, mu, var, ll = D._tied_gmm(y, k)
        step = np.diff(np.sort(mu, axis=1), axis=1).min(axis=1)
        d = y[:, None, :] - mu[:, :, None]
        with np.errstate(divide="ignore"):
            hard = np.argmax(np.log(w)[:, :, None] - 0.5 * d * d / var[:, None, None], axis=1)
        counts = np.stack([(hard == c).sum(axis=1) for c in range(k)], axis=1)
        ok |= ((bic_null - (-2.0 * ll + 2 * k * log_n) > cfg.rtn_min_delta_bic)
               & (step / np.sqrt(var) > cfg.rtn_min_separation)
               & (step * sd > cfg.rtn_min_step_adu)
               & (counts.min(axis=1) >= cfg.rtn_min_level_frames))
    return ok


def test_rtn_confirm_fits_the_t_null_only_where_it_can_decide() -> None:
    """The heavy-tailed null is fitted only on pixels whose levels beat the Gaussian; same flags."""
    rng = np.random.default_rng(49)
    n_f = 40
    values = np.concatenate([_q(rng.normal(0.0, READ_ADU, (n_f, 3000))),
                             _rtn2(rng, n_f, 300, (10, 14), (0.3, 0.7)),
                             _rtn3(rng, n_f, 200, (10, 14)),
                             _rtn2(rng, n_f, 200, (3, 5), (0.1, 0.9)),   # near the thresholds
                             _q(rng.standard_t(1.5, (n_f, 500)) * READ_ADU),  # heavy tails
                             np.zeros((n_f, 4)), np.round(rng.normal(0.0, 0.3, (n_f, 300)))],
                            axis=1)
    rows_fitted: list[int] = []
    orig = D._student_t_loglike
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "_student_t_loglike",
                   lambda y, **kw: rows_fitted.append(len(y)) or orig(y, **kw))
        flags = rtn_confirm(values, config=CFG)
    np.testing.assert_array_equal(flags, _confirm_by_definition(values, CFG))
    assert 0 < flags.sum() < values.shape[1]
    assert sum(rows_fitted) < 0.3 * values.shape[1]  # the Gaussian pixels skip the t fits
    # the t null matters: heavy-tailed pixels that beat the Gaussian are not RTN
    assert flags[3700:4200].mean() < 0.05


def test_student_t_kernel_equals_numpy_reference() -> None:
    """The compiled t fits give the reference's log-likelihoods (sums in another order)."""
    rng = np.random.default_rng(46)
    rows = np.concatenate([rng.normal(0.0, 1.0, (300, 12)),
                           rng.standard_t(2.0, (300, 12)),
                           np.repeat([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]],
                                     50, axis=0) + rng.normal(0.0, 0.05, (50, 12)),
                           np.zeros((3, 12))], axis=0)        # constant rows: the variance floor
    rows = (rows - rows.mean(axis=1, keepdims=True)) / np.maximum(rows.std(axis=1), 1e-300)[:, None]
    fast = D._student_t_loglike(rows)
    ref = D._student_t_loglike(rows, backend="numpy")
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=1e-9)
    # and the whole confirmation gives the same flags either way
    values = np.concatenate([_q(rng.normal(0.0, READ_ADU, (30, 2000))),
                             _rtn2(rng, 30, 300, (10, 14), (0.3, 0.7))], axis=1)
    flags, ref_flags = _flags_compiled_and_numpy(values, "_student_t_loglike")
    np.testing.assert_array_equal(flags, ref_flags)
    assert flags[2000:].mean() > 0.9 and flags[:2000].mean() < 0.01
    with pytest.raises(ValueError, match="backend"):
        D._student_t_loglike(rows, backend="gpu")


def test_count_quantum_is_the_step_of_the_counts():
    rng = np.random.default_rng(3)
    counts = rng.normal(2000, 20, size=(2, 64, 64)).astype(np.int64)
    assert D.count_quantum(counts.astype(np.uint16)) == 1
    assert D.count_quantum((counts // 4 * 4).astype(np.uint16)) == 4  # 14-bit ADC, x4
    assert D.count_quantum((counts // 16 * 16 + 3).astype(np.uint16)) == 16  # x16, plus an offset
    assert D.count_quantum(np.full(10, 512, np.uint16)) == 1  # one value: no step seen
    assert D.count_quantum(np.array([4.0, 8.5])) == 1
    assert D.count_quantum(np.array([4.0, 12.0, np.nan])) == 1
    assert D.count_quantum(np.array([4.0, 12.0, 20.0])) == 8


def test_rtn_test_in_the_steps_of_a_coarser_adc():
    # Gaussian bias series with 4 ADU of noise, counted by a 14-bit ADC scaled to
    # 16 bits (steps of 4 ADU): dithered by one ADU, the steps are discrete levels
    # to the test; counted in steps, it flags no more than the same noise in 1 ADU
    # counts, and still finds telegraph pixels (steps of 32 ADU, 8 sigma).
    rng = np.random.default_rng(11)
    n_f, ny, nx = 24, 120, 150
    noise = rng.normal(0.0, 4.0, size=(n_f, ny, nx))
    rtn = rng.choice(ny * nx, size=30, replace=False)
    states = rng.integers(0, 2, size=(n_f, rtn.size))
    flat = noise.reshape(n_f, -1)
    flat[:, rtn] += 32.0 * states
    fine = np.round(1000.0 + noise).astype(np.uint16)
    coarse = (np.floor(1000.0 + noise) // 4 * 4).astype(np.uint16)
    assert D.count_quantum(coarse) == 4
    ref = detect_rtn(fine, seed=1)
    stepped = detect_rtn(coarse, seed=1, quantum=4)
    unaware = detect_rtn(coarse, seed=1)
    others = np.ones(ny * nx, bool)
    others[rtn] = False
    assert unaware.ravel()[others].mean() > 0.01  # the failure the quantum removes
    assert stepped.ravel()[others].sum() <= ref.ravel()[others].sum() + 3
    assert stepped.ravel()[rtn].mean() > 0.8
    with pytest.raises(ValueError, match="quantum"):
        detect_rtn(coarse, quantum=0)


@pytest.mark.parametrize("half", [1, 2, 4])
def test_neighbour_median_is_scipy_median_filter_without_the_pixel(half: int) -> None:
    """Each pixel's value is scipy's filter over the mirrored window, the pixel left out."""
    from scipy.ndimage import generic_filter

    rng = np.random.default_rng(5)
    a = rng.normal(0.002, 0.0005, (37, 53)).astype(np.float32)
    footprint = np.ones((2 * half + 1,) * 2, dtype=bool)
    footprint[half, half] = False
    # scipy's "mirror" reflects about the edge pixel (d c b | a b c d), as ours;
    # np.median (its median_filter takes one rank of an even count, not the mean of two)
    expected = generic_filter(a.astype(np.float64), np.median, footprint=footprint, mode="mirror")
    yy, xx = np.mgrid[0:37, 0:53]
    got = D.neighbour_median(a, yy.ravel(), xx.ravel(), half=half).reshape(a.shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # NaN neighbours are left out; a pixel without any neighbour value gets NaN
    b = np.full((5, 5), np.nan)
    b[2, 2] = 1.0
    b[0, 0] = 3.0
    assert np.isnan(D.neighbour_median(b, [2], [2], half=1)[0])
    assert D.neighbour_median(b, [2], [2], half=2)[0] == 3.0
    with pytest.raises(ValueError, match="same length"):
        D.neighbour_median(a, [1, 2], [1])
    with pytest.raises(ValueError, match="half"):
        D.neighbour_median(a, [1], [1], half=0)


def test_neighbour_median_follows_a_steep_glow_but_not_a_warm_cluster() -> None:
    """A glow falling by e in 6 px is the level of its pixels; a 3 x 3 warm cluster is not."""
    ny, nx = 64, 80
    y, x = np.mgrid[0:ny, 0:nx]
    glow = 0.002 + 0.02 * np.exp(-np.hypot(y, x - (nx - 1)) / 6.0)
    near = D.neighbour_median(glow, y.ravel(), x.ravel()).reshape(glow.shape)
    away = np.hypot(y, x - (nx - 1)) > 2  # the cusp at the corner falls on every side
    # The glow is convex, so its pixels stand above their neighbours' median
    # (10 % of the level at 2 px from the corner, 2.5 % at 10 px), but by less
    # than the lowest WARM excess, 3 robust sigma of a 0.0006 e-/s main
    # population.
    excess = glow - near
    assert np.max(excess[away]) < DefectConfig().warm_min_nsigma * 0.0006
    warm = np.full((ny, nx), 0.002)
    warm[30:33, 40:43] = 0.02
    med = D.neighbour_median(warm, np.array([31, 30, 32]), np.array([41, 40, 42]))
    np.testing.assert_array_equal(med, 0.002)


def test_upper_tail_scale_is_sigma_for_a_gaussian_and_wider_for_a_log_normal() -> None:
    rng = np.random.default_rng(8)
    g = rng.normal(0.002, 0.0016, 1_000_000).astype(np.float32)  # errors dominate: Gaussian
    c = float(np.median(g))
    assert D.upper_tail_scale(g, c) == pytest.approx(0.0016, rel=0.01)
    assert D.upper_tail_scale(g, c) == pytest.approx(D.robust_center_scale(g)[1], rel=0.01)
    ln = (0.02 * np.exp(rng.normal(0.0, 0.3, 1_000_000))).astype(np.float32)
    c, mad_scale = D.robust_center_scale(ln)
    tail = D.upper_tail_scale(ln, c)
    # (exp(0.6) - 1) / 2 = 0.411 of the median, against 1.4826 MAD = 0.30
    assert tail == pytest.approx(0.02 * (np.exp(0.6) - 1.0) / 2.0, rel=0.01)
    assert tail > 1.3 * mad_scale
    # 5 of these sigmas: 3.05x the median, 1e-4 of a log-normal 0.3 beyond it
    assert np.mean(ln > c + 5 * tail) < 2e-4 < np.mean(ln > c + 5 * mad_scale) / 5
    with_nan = np.where(rng.random(ln.size) < 0.1, np.nan, ln).astype(np.float32)
    assert D.upper_tail_scale(with_nan, c) == pytest.approx(tail, rel=0.02)
    assert np.isnan(D.upper_tail_scale(np.full(5, np.nan), 0.0))
    with pytest.raises(ValueError, match="nsigma"):
        D.upper_tail_scale(ln, c, nsigma=0.0)


@pytest.mark.parametrize("n_frames", [2, 5, 16, 100])
def test_noisy_with_the_frame_count_tests_the_pixels_noise(n_frames: int) -> None:
    """The 5-sigma limit is set on the pixels' noise and exceeded at 1e-5 false alarms."""
    rng = np.random.default_rng(n_frames)
    n = 400_000
    sigma = 4.0 * np.exp(rng.normal(0.0, 0.15, n))  # ADU: a log-normal core, as the sensor's
    bad = rng.random(n) < 2e-4
    sigma[bad] *= rng.uniform(3.0, 10.0, bad.sum())  # the noisy tail, 3-10x
    k = n_frames - 1
    std = (sigma * np.sqrt(rng.chisquare(k, n) / k)).astype(np.float32)
    flags = noisy(std, config=CFG, n_frames=n_frames)
    core_limit = 4.0 * (1.0 + 5.0 * 0.15 * 1.01)  # median + 5 sigma of the core, ~ e^(5 x 0.15)
    clean = ~bad & (sigma < core_limit)
    assert flags[clean].sum() <= 3  # 1e-5 of 400k is 4 at the limit, fewer below it
    old = noisy(std, config=CFG)  # the limit on the measured stds
    if n_frames <= 16:
        assert old[clean].sum() > 10 * max(flags[clean].sum(), 1)
    # the noisy tail: found where the frames can tell it from the limit
    found = flags[bad].mean()
    assert found >= {2: 0.15, 5: 0.5, 16: 0.85, 100: 0.95}[n_frames]
    with pytest.raises(ValueError, match="at least 2 frames"):
        noisy(std, config=CFG, n_frames=1)


def test_nonlinear_weighted_by_signal_evens_out_a_vignetted_field() -> None:
    # residual noise ~ 1/sqrt(signal): a dim half (30 % of the light) scatters
    # 1.8x as much; one map-wide width flags its tail, the weighted test does not
    from sitiancal.compute.defects import nonlinear, robust_center_scale

    rng = np.random.default_rng(46)
    ny, nx = 400, 500
    signal = np.ones((ny, nx), dtype=np.float32)
    signal[:, : nx // 2] = 0.3
    noise = 0.35 / np.sqrt(signal)  # %, per pixel
    resid = (rng.standard_normal((ny, nx)) * noise).astype(np.float32)
    resid[100, 100] = resid[300, 400] = 8.0  # truly nonlinear, dim and bright side
    cfg = DefectConfig()
    plain = nonlinear(resid, config=cfg)
    weight = np.sqrt(signal)
    weighted = nonlinear(resid, config=cfg, weight=weight)
    assert weighted[100, 100] and weighted[300, 400]
    assert plain.sum() - 2 > 20  # the dim half's tail beyond the map-wide 5 sigma
    assert weighted.sum() - 2 <= 1
    # the width passed in is that of the weighted deviations
    c = float(np.median(resid))
    _, s = robust_center_scale((resid - c) * weight)
    assert np.array_equal(nonlinear(resid, config=cfg, center=c, scale=s, weight=weight),
                          weighted)
