"""Tests of the master flat, the large-scale component and EMVA 1288 PRNU.

Synthetic averaged flats: signal S times a vignetting profile times (1 + PRNU
pattern), plus the temporal noise of an average of n frames (shot + read
noise), on top of a bias with DSNU that the dark map removes.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from sitiancal.compute.flat import (
    PRNU,
    block_medians,
    large_scale,
    master_flat,
    prnu_emva,
)

GAIN = 0.254  # e-/ADU
RN_ADU = 1.03 / GAIN
SHAPE = (384, 512)
SIGNAL = 20000.0  # ADU
N_FRAMES = 16


def _vignetting(depth: float = 0.10) -> np.ndarray:
    ny, nx = SHAPE
    y, x = np.mgrid[0:ny, 0:nx]
    r2 = ((y - 0.45 * ny) / ny) ** 2 + ((x - 0.55 * nx) / nx) ** 2
    v = 1.0 - depth * r2 / r2.max()
    return v / v.mean()


def _averaged_flat(rng: np.random.Generator, prnu: float, vig: np.ndarray):
    """(flat_mean, dark_mean, per-frame temporal variance at the mean level, true pattern)."""
    pattern = vig * (1.0 + prnu * rng.standard_normal(SHAPE))
    dark = 500.0 + 3.0 * rng.standard_normal(SHAPE)  # bias + DSNU, noise-free map
    signal = SIGNAL * pattern
    temporal = signal / GAIN + RN_ADU**2  # per pixel, per frame
    flat = dark + signal + np.sqrt(temporal / N_FRAMES) * rng.standard_normal(SHAPE)
    return flat, dark, SIGNAL / GAIN + RN_ADU**2, pattern


@pytest.mark.parametrize("prnu", [0.005, 0.01])
def test_prnu_recovered_after_highpass(prnu: float) -> None:
    rng = np.random.default_rng(int(prnu * 1e4))
    vig = _vignetting()
    flat, dark, tvar, pattern = _averaged_flat(rng, prnu, vig)
    res = prnu_emva(flat, temporal_var=tvar, n_frames=N_FRAMES, dark_mean=dark)
    assert isinstance(res, PRNU)
    # Within 5 % relative after removing the large-scale component (sampling error ~0.3 %).
    assert res.prnu_highpass_pct == pytest.approx(100 * prnu, rel=0.05)
    assert abs(res.prnu_highpass_pct - 100 * prnu) < 0.05 * 100 * prnu
    assert res.prnu_highpass_pct_err < 0.01 * 100 * prnu
    # Without high-pass the PRNU includes the vignetting: sqrt(var(pattern)).
    assert res.prnu_pct == pytest.approx(100 * np.std(pattern), rel=0.05)
    assert res.prnu_pct > 1.5 * res.prnu_highpass_pct
    assert res.mean_signal == pytest.approx(SIGNAL, rel=1e-3)
    assert res.spatial_std_highpass_adu == pytest.approx(
        res.prnu_highpass_pct / 100 * res.mean_signal
    )
    assert res.n_frames == N_FRAMES and res.n_pixels == flat.size


def test_temporal_correction_matters() -> None:
    # For 0.5 % PRNU at 20000 ADU and 16 frames, residual temporal noise is ~1/3 of the
    # spatial variance: ignoring it overestimates PRNU by ~20 %.
    rng = np.random.default_rng(5)
    flat, dark, tvar, _ = _averaged_flat(rng, 0.005, _vignetting(0.0))
    right = prnu_emva(flat, temporal_var=tvar, n_frames=N_FRAMES, dark_mean=dark)
    wrong = prnu_emva(flat, temporal_var=0.0, n_frames=N_FRAMES, dark_mean=dark)
    assert right.prnu_highpass_pct == pytest.approx(0.5, rel=0.05)
    assert wrong.prnu_highpass_pct > 1.15 * right.prnu_highpass_pct
    # A scalar dark leaves the DSNU (3 ADU vs 100 ADU PRNU) in: +0.05 % relative only,
    # but a map removes it exactly.
    scalar = prnu_emva(flat, temporal_var=tvar, n_frames=N_FRAMES, dark_mean=500.0)
    assert scalar.spatial_std_adu > right.spatial_std_adu


def test_prnu_mask_excludes_defects() -> None:
    rng = np.random.default_rng(6)
    flat, dark, tvar, _ = _averaged_flat(rng, 0.01, _vignetting())
    dead = rng.choice(flat.size, 200, replace=False)
    flat.flat[dead] = dark.flat[dead]  # no response
    mask = np.zeros(SHAPE, dtype=np.uint16)
    mask.flat[dead] = 4  # DEAD bit
    clean = prnu_emva(flat, temporal_var=tvar, n_frames=N_FRAMES, dark_mean=dark, mask=mask)
    dirty = prnu_emva(flat, temporal_var=tvar, n_frames=N_FRAMES, dark_mean=dark)
    assert clean.n_pixels == flat.size - 200
    assert clean.prnu_highpass_pct == pytest.approx(1.0, rel=0.05)
    assert dirty.prnu_highpass_pct > 2 * clean.prnu_highpass_pct
    assert clean.to_dict()["n_pixels"] == clean.n_pixels


def test_large_scale_follows_vignetting_not_prnu() -> None:
    rng = np.random.default_rng(7)
    vig = _vignetting(0.2)
    noisy = vig * (1 + 0.01 * rng.standard_normal(SHAPE))
    noisy[100:110, 200:210] = np.nan  # masked patch
    noisy[0:32, 32:64] = np.nan  # a whole empty cell, filled from its neighbours
    smooth = large_scale(noisy.astype(np.float32), block=32)
    assert smooth.dtype == np.float32 and smooth.shape == SHAPE
    # Errors: block-median noise 1.25 * 1 % / 32 = 0.04 %, and the median of a curved
    # profile differs from its centre value by f'' block^2 / 24 per axis (<= 0.04 % here,
    # where the 20 % vignetting spans only 12 x 16 cells; ~1e-5 on a full 61 MP frame).
    inner = np.s_[96:-32, 32:-32]  # away from the edges and from the filled cell
    assert np.max(np.abs(smooth[inner] / vig[inner] - 1)) < 1.5e-3
    assert np.max(np.abs(smooth / vig - 1)) < 3e-3
    # It does not follow the 1 % PRNU: the ratio keeps it all.
    ok = np.isfinite(noisy)
    assert np.std(noisy[ok] / smooth[ok]) == pytest.approx(0.01, rel=0.03)
    # Uneven sizes (partial edge cells) and a single cell along an axis.
    odd = large_scale(np.ones((70, 100)), block=64)
    assert odd.shape == (70, 100) and np.allclose(odd, 1.0)
    tiny = large_scale(np.full((10, 300), 2.0), block=64)
    assert np.allclose(tiny, 2.0)


@pytest.mark.parametrize(("degrees", "shape"), [((3, 3), (517, 1203)), ((1, 3), (70, 300)),
                                                 ((3, 1), (300, 70))])
def test_spline_on_pixels_equals_fitpack(degrees: tuple[int, int], shape: tuple[int, int]) -> None:
    """The design-matrix evaluation gives FITPACK's values (float64 rounding; float32 output to its own)."""
    from scipy.interpolate import RectBivariateSpline

    from sitiancal.compute.flat import evaluate_on_pixels

    ny, nx = shape
    rng = np.random.default_rng(5)
    yc = np.linspace(3.0, ny - 4.0, 9 if degrees[0] == 3 else 2)
    xc = np.linspace(5.0, nx - 2.0, 12 if degrees[1] == 3 else 2)
    grid = np.add.outer(np.sin(yc / 90.0), np.cos(xc / 140.0)) + 3 + rng.normal(0, 1e-3, (yc.size, xc.size))
    spline = RectBivariateSpline(yc, xc, grid, s=grid.size * 1e-7, bbox=[0, ny - 1, 0, nx - 1],
                                 kx=degrees[0], ky=degrees[1])
    ref = spline(np.arange(ny, dtype=float), np.arange(nx, dtype=float))
    got = evaluate_on_pixels(spline, ny, nx, np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    got32 = evaluate_on_pixels(spline, ny, nx, np.float32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, ref, rtol=1e-6, atol=0)


def test_float32_flat_stays_float32_with_a_scalar_dark() -> None:
    """A float32 flat minus the default scalar dark (0.0) is not widened to float64.

    np.asarray(0.0) is float64: it used to make the working copy and the
    large-scale map float64 (0.5 GB more for a 61 MP flat). The figures are
    those of the float64 computation to float32 precision.
    """
    rng = np.random.default_rng(12)
    flat, dark, tvar, _ = _averaged_flat(rng, 0.01, _vignetting())
    signal = (flat - dark).astype(np.float32)
    res32 = prnu_emva(signal, temporal_var=tvar, n_frames=N_FRAMES)  # compiled first
    # the memory of a map large enough that fixed costs (cell grids, splines) are small
    big = np.tile(signal, (4, 4))
    tracemalloc.start()
    try:
        prnu_emva(big, temporal_var=tvar, n_frames=N_FRAMES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # float32 working copy and large-scale map, masks and one float64 band of the
    # sums (here the whole map: bands are 4 Mpx): 17 bytes per pixel; the float64
    # working maps took 25
    assert peak < 20 * big.size
    res64 = prnu_emva(signal.astype(np.float64), temporal_var=tvar, n_frames=N_FRAMES)
    assert res32.prnu_pct == pytest.approx(res64.prnu_pct, rel=1e-5)
    assert res32.prnu_highpass_pct == pytest.approx(res64.prnu_highpass_pct, rel=1e-5)
    # a float64 dark map still gives float64 arithmetic
    res_map = prnu_emva(signal, temporal_var=tvar, n_frames=N_FRAMES,
                        dark_mean=np.zeros(SHAPE))
    assert res_map.prnu_pct == pytest.approx(res64.prnu_pct, rel=1e-12)


def test_master_flat() -> None:
    rng = np.random.default_rng(8)
    signal = SIGNAL * _vignetting() * (1 + 0.01 * rng.standard_normal(SHAPE))
    signal[3, 4] = np.nan
    flat = master_flat(signal)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, (signal / np.nanmedian(signal)).astype(np.float32))
    assert np.nanmedian(flat) == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(flat[3, 4])
    with pytest.raises(ValueError):
        master_flat(np.full((4, 4), np.nan))
    with pytest.raises(ValueError):
        master_flat(-np.ones((4, 4)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("block", [1, 4, 7, 16])
def test_block_medians_equal_numpy(seed: int, dtype: type, block: int) -> None:
    """The compiled cell medians equal ``np.nanmedian`` of each cell (as float64) exactly.

    Odd and even counts, partial edge cells, cells with no, one and two finite
    values, infinities (values for numpy too) and integer maps.
    """
    rng = np.random.default_rng(seed)
    grid = rng.normal(100.0, 5.0, (70, 90))
    if dtype is np.int32:
        grid = np.round(grid).astype(np.int32)
    else:
        grid = grid.astype(dtype)
        grid[rng.random(grid.shape) < rng.uniform(0.0, 0.6)] = np.nan
        grid[:block, :block] = np.nan                     # no finite value
        grid[block:2 * block, :block] = np.nan
        grid[block, 0] = 3.0                              # one
        grid[2 * block:3 * block, :block] = np.nan
        grid[2 * block, :2] = (1.0, np.inf)               # two (even count), one infinite
    cells = block_medians(grid, block)
    assert cells.shape == (-(-70 // block), -(-90 // block))
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            cell = grid[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float64)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = np.nanmedian(cell)
            np.testing.assert_equal(cells[i, j], expected)


def test_block_medians_of_a_lazy_map_read_in_bands() -> None:
    """A map that is not an ndarray (read by slicing) gives the same medians, band by band."""

    class Lazy:
        def __init__(self, a: np.ndarray) -> None:
            self.a, self.shape, self.reads = a, a.shape, 0

        def __getitem__(self, key):
            self.reads += 1
            return self.a[key]

    a = np.random.default_rng(5).normal(0.0, 1.0, (300, 20000)).astype(np.float32)
    lazy = Lazy(a)
    np.testing.assert_array_equal(block_medians(lazy, 32), block_medians(a, 32))
    assert lazy.reads > 1
