"""Defect classes, random-telegraph-noise detection and the defect bitmask.

Bits follow DESIGN.md section 5 (:class:`MaskBit`); every threshold lives in
:class:`DefectConfig` with its source. The rules work on whole maps or, with
``center``/``scale`` given by the caller, tile by tile with global figures.

RTN (random telegraph, "salt and pepper") detection
---------------------------------------------------
A telegraph pixel jumps between two or more discrete levels, so its temporal
distribution in a bias stack is a mixture of narrow Gaussians. Detection runs
in two stages:

1. :func:`rtn_statistic`: the integer counts are dithered with seeded
   ``U(-0.5, 0.5)`` noise (so quantisation cannot mimic levels), the
   per-frame level is removed, and the Anderson-Darling statistic against a
   normal with estimated mean and variance (Stephens 1974, JASA 69, 730,
   "case 3") is computed per pixel, with the small-sample modification
   ``A*^2 = A^2 (1 + 0.75/F + 2.25/F^2)`` (D'Agostino & Stephens 1986,
   table 4.7). The statistic is scale free: a pixel that is merely noisy has
   the same null distribution as a normal one.
2. :func:`rtn_confirm`: each candidate's values are fitted by 1-D Gaussian
   mixtures with a tied (common) within-level variance (the read noise is
   common to the levels) with 2 and 3 components; the pixel is RTN when a
   multi-level model beats the better unimodal model (one Gaussian, or a
   Student t for heavy tails) by ``rtn_min_delta_bic`` *and* its adjacent
   levels are separated by more than ``rtn_min_separation`` within-level
   sigmas *and* every level holds at least ``rtn_min_level_frames`` frames.

Detection power is limited by the information in F frames. Measured on
synthetic stacks (F = 50, two levels, occupancy 0.2-0.8): recall ~30 % at
3-4 read-noise sigmas, ~80 % at 4-5, ~100 % above 5; at F = 20 a 2-level
telegraph needs ~7-8 sigma for 80 %. Gaussian pixels, whatever their
sigma, are flagged at ~1-2e-4 (the test is scale free).

The statistic has a compiled kernel (numba) because ``log Phi`` dominates
the cost; it evaluates ``log Phi`` by linear interpolation of a fine table
(within :func:`_ad_table_error` of the exact ``A*^2``, 1.2e-5 at F = 50) and is
tested against the numpy/scipy reference (``backend="numpy"``). In
:func:`detect_rtn` stage 1 is one compiled pass per chunk (dither and level
removal, a sorting network over blocks of 256 pixels, ``A*^2`` and the
three-level statistic), bit-identical to the separate steps; stage 2 runs
only on the candidates (~0.2 % of the pixels), batched over all chunks.
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from numba import njit, prange
from scipy.interpolate import CubicSpline
from scipy.ndimage import distance_transform_edt
from scipy.optimize import brentq
from scipy.special import gammaln, log_ndtr, logsumexp, ndtr
from scipy.stats import chi2

from sitiancal.compute.flat import block_centres, block_medians
from sitiancal.compute.mixture import MixtureFit
from sitiancal.compute.readnoise import median_std_factor
from sitiancal.compute.stats import buffer_median
from sitiancal.compute.stats import sorting_network as _sorting_network
from sitiancal.compute.summary import (
    MAD_TO_SIGMA,
    finite_median_mad,
    finite_values,
    mean_std,
    quantiles,
    threshold_sample,
)

__all__ = [
    "DefectConfig",
    "MaskBit",
    "build_mask",
    "count_quantum",
    "dead_low",
    "detect_rtn",
    "gain_outlier",
    "hot_warm",
    "local_median",
    "log_tail_scale",
    "mask_counts",
    "neighbour_median",
    "noisy",
    "nonlinear",
    "robust_center_scale",
    "rtn_confirm",
    "rtn_statistic",
    "unstable_bias",
    "upper_tail_scale",
]


class MaskBit(enum.IntFlag):
    """Defect bits of the ``mask`` product (DESIGN.md section 5)."""

    HOT = 1
    WARM = 2
    DEAD = 4
    LOW_RESPONSE = 8
    NOISY = 16
    RTN = 32
    NONLINEAR = 64
    GAIN_OUTLIER = 128
    UNSTABLE_BIAS = 256


@dataclass(frozen=True)
class DefectConfig:
    """Thresholds of the defect rules; each default names its source."""

    #: HOT: dark rate > median + hot_nsigma robust sigma of the dark population
    #: (DESIGN.md section 5, "far above the dark population"; 5 sigma as in the
    #: reference study's anomalous-pixel criterion) ...
    hot_nsigma: float = 5.0
    #: ... and above this absolute floor (e-/s): 50x the reference study's
    #: 0.002 e-/pix/s at 0 C (DESIGN.md section 5, "above an absolute floor").
    hot_floor_e_s: float = 0.1
    #: WARM without a population model: > median + warm_nsigma robust sigma
    #: and below the hot rule (DESIGN.md section 5, "elevated, not hot").
    warm_nsigma: float = 5.0
    #: WARM with a population model: the pixel's most probable component has
    #: its mean above median + warm_component_nsigma robust sigma, and the
    #: pixel itself is > median + warm_min_nsigma robust sigma and that many
    #: of its own errors (the 3-sigma detection convention).
    warm_component_nsigma: float = 5.0
    warm_min_nsigma: float = 3.0
    #: DEAD: flat response < 50 % of the local median (DESIGN.md section 5).
    dead_fraction: float = 0.5
    #: LOW_RESPONSE: 50-80 % of the local median (LSST cp_pipe
    #: ``FindDefectsTask`` fracThresholdFlat = 0.8; DESIGN.md section 5).
    low_fraction: float = 0.8
    #: Block size of the local median of the flat (pixels); 32 px is well
    #: below the vignetting scale of a full-frame sensor.
    local_block: int = 32
    #: NOISY: bias temporal std > median + 5 robust sigma (the reference
    #: study's 5-sigma criterion; DESIGN.md section 5).
    noisy_nsigma: float = 5.0
    #: ... and, where the number of bias frames is known, that limit on the
    #: pixels' noise is exceeded with a one-sided chi-square test of this
    #: false-alarm probability per pixel (600 on a 61 MP sensor): a std from
    #: 16 frames scatters by 18 %, from 2 frames by 60 %, and a 5-sigma limit
    #: set on the measured stds flagged their scatter (0.35 % of the pixels
    #: with 2 bias frames, 0.02 % with 16; measured).
    noisy_alpha: float = 1e-5
    #: RTN stage 1: Anderson-Darling A*^2 threshold. 1.45 is a false-alarm
    #: probability of ~1e-3 for a normal pixel (D'Agostino & Stephens 1986,
    #: case 3: p = exp(1.2937 - 5.709 A + 0.0186 A^2)).
    rtn_ad_threshold: float = 1.45
    #: RTN stage 1b: false-alarm probability of the three-level separation
    #: statistic (threshold from a Monte Carlo of Gaussian series per frame
    #: count); catches balanced 3-level telegraphs that AD misses at small F.
    rtn_level_pvalue: float = 1e-3
    #: RTN stage 2: the multi-level model must beat the best unimodal model
    #: (Gaussian or Student t) by Delta BIC > 20 (a Bayes factor ~e^10). Kass &
    #: Raftery (1995, JASA 90, 773) call > 10 "very strong" for one test, but a
    #: 61 MP sensor is 6e7 tests: at 10 the measured false-alarm rate is
    #: 2-8e-4 per Gaussian pixel (12-50 frames), i.e. 10-50k false RTN pixels
    #: against ~43k truly anomalous ones (0.07%); at 20 it is < 2e-5 (F = 20)
    #: and < 5e-6 (F = 40) while 92% of 6-sigma telegraphs are still found at F = 40.
    rtn_min_delta_bic: float = 20.0
    #: RTN stage 2: adjacent levels separated by > 3 within-level sigmas
    #: (levels resolved at 3 sigma; DESIGN.md section 5, "multi-level").
    rtn_min_separation: float = 3.0
    #: RTN stage 2: frames (hard assignments) per level, at least 2 so that a
    #: single outlying frame cannot be a level.
    rtn_min_level_frames: int = 2
    #: RTN stage 2: smallest level step (ADU). Steps of one or two codes of
    #: heavily quantised pixels (sigma < ~0.7 ADU) are indistinguishable from
    #: the dithered quantisation; the IMX455 read noise is ~4 ADU.
    rtn_min_step_adu: float = 2.0
    #: RTN stage 2: largest number of levels tried (2-3 level telegraphs).
    rtn_max_levels: int = 3
    #: RTN: fewest bias frames for a test (the AD case-3 tables start at 8).
    rtn_min_frames: int = 8
    #: NONLINEAR: |residual - median| > 5 robust sigma of the population
    #: (DESIGN.md section 5, "far from the population") ...
    nonlinear_nsigma: float = 5.0
    #: ... and |residual| above 1 % (twice the reference study's < 0.5 %
    #: nonlinearity, so that a compliant pixel is never flagged).
    nonlinear_floor_pct: float = 1.0
    #: GAIN_OUTLIER: more than 5 sigma (intrinsic width and pixel error in
    #: quadrature) from every gain population (DESIGN.md section 5).
    gain_outlier_nsigma: float = 5.0
    #: Components lighter than this are outlier catchers, not populations.
    gain_population_min_weight: float = 0.01
    #: UNSTABLE_BIAS: |z| of the per-pixel bias trend > 5 (DESIGN.md section 5).
    unstable_bias_z: float = 5.0


# --------------------------------------------------------------------------- robust figures


def robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and robust sigma (1.4826 MAD) of the finite values.

    Parameters
    ----------
    values : array_like
        Any shape, any units; NaN and inf are ignored.

    Returns
    -------
    (float, float)
        Median and 1.4826 * median absolute deviation (units of the input).
        When the MAD is 0 (heavily quantised data) the scale falls back to
        ``sqrt(pi/2)`` times the mean absolute deviation; NaN for no data.
    """
    # np.median's values; float32 maps by the parallel radix select, without a copy
    med, mad = finite_median_mad(values)
    if not np.isfinite(med):
        return float("nan"), float("nan")
    scale = 1.4826 * mad
    if scale == 0.0:
        v = finite_values(values)
        dev = np.abs(np.subtract(v, v.dtype.type(med), out=v), out=v)
        scale = float(np.sqrt(np.pi / 2.0) * mean_std(dev)[0])
    return med, scale


def _center_scale(values: np.ndarray, center: float | None,
                  scale: float | None) -> tuple[float, float]:
    if center is None or scale is None:
        c, s = robust_center_scale(values)
        center = c if center is None else center
        scale = s if scale is None else scale
    return float(center), float(scale)


def upper_tail_scale(values: np.ndarray, center: float, *, nsigma: float = 2.0) -> float:
    """Width of a population's upper side: its ``Phi(nsigma)`` quantile's distance, in sigmas.

    ``(quantile(Phi(nsigma)) - center) / nsigma``: the robust sigma of a
    Gaussian population, and more for a right-skewed one. Dark rates that
    are measured well show their population's log-normal spread (a 0.02 e-/s
    median of log-sigma 0.3 at 20 C): 1.4826 MAD puts 5 sigma at 2.5x the
    median, where 1e-3 of the population lies, and the 2-sigma quantile puts
    it at 3x (1e-4). Where the errors dominate (0.002 e-/s at 0 C) the two
    agree. The 2-sigma quantile (2.3 % of the pixels above it) is the
    population's, not the defects', while fewer than ~1 % are elevated.

    Parameters
    ----------
    values : ndarray
        Any shape and units (e.g. e-/s); NaN and inf are ignored.
    center : float
        The population's centre (its median), in the values' units.
    nsigma : float
        Quantile in Gaussian sigmas (> 0).

    Returns
    -------
    float
        The width (units of the input); NaN without finite values.
    """
    if nsigma <= 0:
        raise ValueError("nsigma must be > 0")
    v = finite_values(values)
    if v.size == 0:
        return float("nan")
    q = float(quantiles(v, [float(ndtr(nsigma))])[0])
    return (q - float(center)) / nsigma


#: :func:`log_tail_scale` applies where at most this fraction of the rates is <= 0
#: (the population is measured well enough to be seen in ln(rate)).
LOG_MAX_NONPOSITIVE = 1e-3


def log_tail_scale(values: np.ndarray, center: float, *, nsigma: float = 5.0,
                   max_nonpositive: float = LOG_MAX_NONPOSITIVE) -> float:
    """Width that puts ``center + nsigma * width`` at the population's nsigma point in ln(values).

    A population whose spread is multiplicative (dark rates: log-normal-like)
    and measured well (nearly every rate positive) has a tail that a linear
    extrapolation from its core underestimates: at 20 C (log-sigma 0.3,
    rates 10x their errors) the linear 5-sigma limit from the upper side's
    2-sigma quantile lies at 3.2x the median, where ~1e-4 of the population
    lies (~10 false WARM per 120 000 pixels, measured); in ln(rate), 5 sigma
    is at 4.9x (3e-7 of a log-normal). The width of ln(values) is the larger
    of 1.4826 MAD and its upper side's (2-sigma quantile, as
    :func:`upper_tail_scale`), and the result is in the values' units.

    Parameters
    ----------
    values : ndarray
        Any shape, e.g. dark rates over the local level (e-/s); NaN ignored.
    center : float
        The population's centre (its median), values' units, > 0.
    nsigma : float
        The rules' threshold in sigmas (``DefectConfig.warm_nsigma``).
    max_nonpositive : float
        Largest fraction of values <= 0 (noise-dominated rates) for which
        ln(values) describes the population.

    Returns
    -------
    float
        The width (values' units); NaN where it does not apply (too many
        values <= 0, a centre <= 0, no finite values).
    """
    if nsigma <= 0:
        raise ValueError("nsigma must be > 0")
    v = finite_values(values)  # a copy of our own, transformed in place
    if v.size == 0 or not center > 0:
        return float("nan")
    positive = v > 0
    if v.size - np.count_nonzero(positive) > max_nonpositive * v.size:
        return float("nan")
    # the few values <= 0 are kept as the lowest (they move the median, not its tail)
    np.log(np.where(positive, v, v[positive].min()), out=v)
    del positive
    med, mad = finite_median_mad(v)
    width = max(MAD_TO_SIGMA * mad, upper_tail_scale(v, med))
    return (math.exp(med + nsigma * width) - float(center)) / nsigma


def _float_map(a: np.ndarray) -> np.ndarray:
    """A float view of a map: float arrays as they are (float32 stays float32), others float64."""
    a = np.asarray(a)
    return a if a.dtype.kind == "f" else a.astype(np.float64)


def _finite_gt(a: np.ndarray, thr: np.ndarray | float) -> np.ndarray:
    """``a > thr`` with NaN giving False and no warning."""
    with np.errstate(invalid="ignore"):
        return np.asarray(a > thr, dtype=bool)


# --------------------------------------------------------------------------- local median


def _interp_axis(xc: np.ndarray, values: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Cubic spline (linear for 2 nodes, constant for 1) through block values."""
    if xc.size == 1:
        shape = list(values.shape)
        shape[axis] = x.size
        return np.broadcast_to(values, shape).copy()
    return CubicSpline(xc, values, axis=axis, bc_type="not-a-knot")(x)


def local_median(map2d: np.ndarray, *, block: int = 32) -> np.ndarray:
    """Smooth large-scale level of a 2-D map from block medians.

    Parameters
    ----------
    map2d : ndarray (ny, nx)
        A map (e.g. a flat normalised to median 1); NaN pixels are ignored.
    block : int
        Cell size (pixels) of the medians.

    Returns
    -------
    ndarray (ny, nx), float32
        Block medians (cells without data take the nearest cell's value)
        interpolated back to every pixel with separable cubic splines through
        the cell centres. Memory: one float32 copy of the map plus one cell
        grid; the rows are evaluated straight into the float32 output.
    """
    a = np.asarray(map2d)
    if a.ndim != 2:
        raise ValueError("local_median needs a 2-D map")
    if block < 1:
        raise ValueError("block must be >= 1")
    ny, nx = a.shape
    grid = block_medians(a, block)
    empty = ~np.isfinite(grid)
    if empty.all():
        return np.full((ny, nx), np.nan, dtype=np.float32)
    if empty.any():
        idx = distance_transform_edt(empty, return_distances=False, return_indices=True)
        grid = grid[tuple(idx)]
    yc, xc = block_centres(ny, block), block_centres(nx, block)
    rows = _interp_axis(xc, grid, np.arange(nx, dtype=np.float64), axis=1)  # (nby, nx)
    out = np.empty((ny, nx), dtype=np.float32)
    if yc.size == 1:
        out[:] = rows[0]
        return out
    spline = CubicSpline(yc, rows, axis=0, bc_type="not-a-knot")
    _spline_rows(spline.x, spline.c, out)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _spline_rows(breaks: np.ndarray, c: np.ndarray,
                 out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Piecewise cubic ``c`` (4, pieces, nx) over ``breaks`` at rows 0..ny-1 of ``out``, as float32.

    The value scipy's ``PPoly`` gives at ``y`` (extrapolating at both ends),
    with its interval rule (``breaks[i] <= y < breaks[i + 1]``) and its sum
    order ``c3 + c2 s + c1 s^2 + c0 s^3`` (powers by repeated products), so
    the result is bit-identical to ``CubicSpline(...)(y)`` cast to float32
    (tested), without its per-point interval search over every pixel.
    """
    ny, nx = out.shape
    last = breaks.size - 2
    for yi in prange(ny):
        y = np.float64(yi)
        i = np.searchsorted(breaks, y, side="right") - 1
        if i < 0:
            i = 0
        elif i > last:
            i = last
        s = y - breaks[i]
        s2 = s * s
        s3 = s2 * s
        for x in range(nx):
            res = c[3, i, x]
            res = res + c[2, i, x] * s
            res = res + c[1, i, x] * s2
            res = res + c[0, i, x] * s3
            out[yi, x] = np.float32(res)


#: Pixels whose neighbourhoods are gathered at once by :func:`neighbour_median`
#: (81 values each: ~21 MB of float32 per batch).
_NEIGHBOUR_BATCH = 1 << 16


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Indices ``i`` mirrored into ``0 .. n-1`` about the edge pixels (``-1 -> 1``)."""
    i = np.abs(i)
    i = np.where(i >= n, 2 * (n - 1) - i, i)
    return np.clip(i, 0, n - 1)


def neighbour_median(map2d: np.ndarray, rows: np.ndarray, cols: np.ndarray, *,
                     half: int = 2) -> np.ndarray:
    """Median of the neighbours of listed pixels of a 2-D map.

    The pixel-scale level around a pixel: a warm pixel stands out of it,
    while a structure that is smooth over a few pixels (amplifier glow near a
    corner, even where it changes by tens of per cent over a 64-pixel cell
    that :func:`local_median` resolves) does not.

    Parameters
    ----------
    map2d : ndarray (ny, nx)
        The map (any units, e.g. dark rate in e-/s); NaN pixels are ignored.
    rows, cols : ndarray of int
        Pixels whose neighbourhoods are wanted, same length.
    half : int
        Half-width (px) of the square window: ``(2 half + 1)^2 - 1``
        neighbours, the pixel itself left out. At the map's edges the window
        is mirrored about the edge pixel, so that a level rising towards the
        edge (glow at a corner) has neighbours on both sides of the pixel in
        equal number, as inside the map.

    Returns
    -------
    ndarray, float64
        One median per listed pixel (map units); NaN where every neighbour is
        NaN.
    """
    a = np.asarray(map2d)
    if a.ndim != 2:
        raise ValueError("neighbour_median needs a 2-D map")
    if half < 1:
        raise ValueError("half must be >= 1")
    rows = np.asarray(rows, dtype=np.intp).ravel()
    cols = np.asarray(cols, dtype=np.intp).ravel()
    if rows.shape != cols.shape:
        raise ValueError("rows and cols must have the same length")
    ny, nx = a.shape
    d = np.arange(-half, half + 1)
    centre = (d.size * d.size) // 2
    out = np.empty(rows.size, dtype=np.float64)
    for b0 in range(0, rows.size, _NEIGHBOUR_BATCH):
        yy = _mirror(rows[b0 : b0 + _NEIGHBOUR_BATCH, None] + d, ny)
        xx = _mirror(cols[b0 : b0 + _NEIGHBOUR_BATCH, None] + d, nx)
        win = a[yy[:, :, None], xx[:, None, :]].astype(np.float64).reshape(yy.shape[0], -1)
        win = np.delete(win, centre, axis=1)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods
            out[b0 : b0 + yy.shape[0]] = np.nanmedian(win, axis=1)
    return out


# --------------------------------------------------------------------------- RTN statistic

#: Table step of log Phi for the compiled kernel (linear interpolation; see
#: :func:`_log_phi_table` for the error bound).
_TABLE_STEP = 1.0 / 1024.0


def _log_phi_table(zmax: float) -> tuple[np.ndarray, float]:
    """``log Phi(z)`` and ``log Phi(-z)`` interleaved on one grid, for linear interpolation.

    Returns the flat table ``[f_0, g_0, f_1, g_1, ...]`` with ``f = log Phi(z)``,
    ``g = log Phi(-z)`` at ``z = z0 + i h`` (``h`` = :data:`_TABLE_STEP`), and
    ``z0``. The Anderson-Darling sum needs both at every standardised value:
    one interval search serves the two (:func:`_log_phi_pair`), from four
    table entries (four gathers per value in the vectorised kernel; cubic
    Hermite interpolation on a 10x coarser grid needed eight and took twice
    as long). Error: ``|log Phi''| <= 1``, so linear interpolation is within
    ``h**2 / 8 = 1.2e-7`` of each term and ``A*^2`` (weights summing to
    ``2 F**2``, divided by ``F``) within ``F h**2 / 4`` times the small-sample
    factor, 1.2e-5 at F = 50: four orders below the statistic's own scatter.
    The grid spans ``|z| <= zmax + 1`` (rounded up) and extrapolates beyond.
    """
    zmax = float(np.ceil(zmax + 1.0))
    h = _TABLE_STEP
    z = np.arange(-zmax, zmax + 0.5 * h, h)
    tab = np.empty(2 * z.size)
    tab[0::2] = log_ndtr(z)
    tab[1::2] = log_ndtr(-z)
    return tab, -zmax


def _ad_table_error(n_frames: int) -> float:
    """Bound on ``|A*^2 (table) - A*^2 (exact)|`` for ``n_frames`` frames (dimensionless)."""
    n = float(n_frames)
    return n * _TABLE_STEP**2 / 4.0 * (1.0 + 0.75 / n + 2.25 / (n * n))


@njit(cache=True, nogil=True, inline="always")
def _table_position(z: float, z0: float, inv_h: float,
                    top: int) -> tuple[int, float]:  # pragma: no cover - compiled
    """Where ``z`` falls in :func:`_log_phi_table`: the flat index of its interval's
    ``f`` entry and the fraction ``t`` within it (``top``: the last interval)."""
    u = (z - z0) * inv_h
    i = int(u)
    i = max(i, 0)
    i = min(i, top)
    return 2 * i, u - i


@njit(cache=True, nogil=True, inline="always")
def _table_pair(tab: np.ndarray, q: int, t: float) -> tuple[float, float]:  # pragma: no cover
    """``(log Phi(z), log Phi(-z))`` interpolated at the position ``(q, t)`` of ``z``."""
    f = tab[q]
    g = tab[q + 1]
    return f + t * (tab[q + 2] - f), g + t * (tab[q + 3] - g)


@njit(cache=True, nogil=True, inline="always")
def _log_phi_pair(z: float, tab: np.ndarray, z0: float,
                  inv_h: float) -> tuple[float, float]:  # pragma: no cover - compiled
    """``(log Phi(z), log Phi(-z))`` by linear interpolation of :func:`_log_phi_table`."""
    q, t = _table_position(z, z0, inv_h, tab.shape[0] // 2 - 2)
    return _table_pair(tab, q, t)


@njit(cache=True, nogil=True, inline="always")
def _mean_sumsq(x: np.ndarray) -> tuple[float, float]:  # pragma: no cover - compiled
    """Mean and sum of squared deviations of ``x`` (two passes, in index order)."""
    n = x.shape[0]
    s = 0.0
    for k in range(n):
        s += x[k]
    m = s / n
    ss = 0.0
    for k in range(n):
        d = x[k] - m
        ss += d * d
    return m, ss


@njit(cache=True, nogil=True)
def _ad_pixel(x: np.ndarray, tab: np.ndarray, z0: float,
              h: float) -> float:  # pragma: no cover - compiled
    """A*^2 of one pixel's values ``x`` (F,), sorted ascending; NaN if constant."""
    n_f = x.shape[0]
    corr = 1.0 + 0.75 / n_f + 2.25 / (n_f * n_f)
    m, ss = _mean_sumsq(x)
    sd = np.sqrt(ss / (n_f - 1))
    if not (sd > 0.0) or not np.isfinite(sd):
        return np.nan
    inv_sd = 1.0 / sd
    inv_h = 1.0 / h
    acc = 0.0
    for k in range(n_f):
        z = (x[k] - m) * inv_sd
        # (2i-1) log Phi(z_i) + (2n+1-2i) log Phi(-z_i), i = k + 1
        lo, hi = _log_phi_pair(z, tab, z0, inv_h)
        acc += (2 * k + 1) * lo
        acc += (2 * n_f - 1 - 2 * k) * hi
    return (-n_f - acc / n_f) * corr


@njit(cache=True, nogil=True, parallel=True)
def _ad_kernel(x: np.ndarray, tab: np.ndarray, z0: float, h: float,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
    """A*^2 of every column of ``x`` (F, P), each column sorted ascending."""
    n_p = x.shape[1]
    n_blocks = (n_p + 1023) // 1024
    for bi in prange(n_blocks):
        for p in range(bi * 1024, min(n_p, (bi + 1) * 1024)):
            out[p] = _ad_pixel(x[:, p], tab, z0, h)


@njit(cache=True, nogil=True, inline="always")
def _between(c1: np.ndarray, lo: int, c: int, hi: int) -> float:
    """``S(lo, c)**2 / (c - lo) + S(c, hi)**2 / (hi - c)`` from the prefix sums ``c1``.

    The within sum of squares of the split of the sorted range [lo, hi) at
    ``c`` is ``Q(lo, hi)`` (the range's sum of squares, the same for every
    cut) minus this between term, so the best cut maximises it: the scans
    over the cuts need the sums alone, not the sums of squares. Each square
    times the reciprocal of the count (hoisted out of the lanes in the
    vectorised :func:`_level_block`, which must give the same floats).
    """
    s = c1[c] - c1[lo]
    t = c1[hi] - c1[c]
    return s * s * (1.0 / (c - lo)) + t * t * (1.0 / (hi - c))


@njit(cache=True, nogil=True, inline="always")
def _best_cut(c1: np.ndarray, lo: int, hi: int, mf: int) -> tuple[int, float]:
    """Cut of the sorted range [lo, hi) minimising the within sum of squares, and its
    between term (:func:`_between`); ``(-1, -inf)`` when no cut leaves ``mf`` values
    on each side."""
    best_c, best = -1, -np.inf
    for c in range(lo + mf, hi - mf + 1):
        b = _between(c1, lo, c, hi)
        if b > best:
            best, best_c = b, c
    return best_c, best


@njit(cache=True, nogil=True, inline="always")
def _three_levels(c1: np.ndarray, q: float, n_f: int, e0: int, e1: int) -> float:
    """The statistic of the levels [0, e0), [e0, e1), [e1, n_f) of sorted values whose
    prefix sums (from the first value) are ``c1`` and sum of squares ``q``."""
    s0 = c1[e0]
    s1 = c1[e1] - c1[e0]
    s2 = c1[n_f] - c1[e1]
    m1 = s0 / e0
    m2 = s1 / (e1 - e0)
    m3 = s2 / (n_f - e1)
    within = q - (s0 * s0 * (1.0 / e0) + s1 * s1 * (1.0 / (e1 - e0))
                  + s2 * s2 * (1.0 / (n_f - e1)))
    sd = np.sqrt(max(within, 0.0) / (n_f - 3))
    if sd > 0.0:
        return min(m2 - m1, m3 - m2) / sd
    return np.inf


@njit(cache=True, nogil=True)
def _level_pixel(x: np.ndarray, mf: int, c1: np.ndarray) -> float:  # pragma: no cover - compiled
    """Three-level separation of one pixel's sorted values ``x`` (F,) (see ``_level_kernel``).

    ``c1`` is a scratch array of length F + 1 with ``c1[0] = 0``.
    """
    n_f = x.shape[0]
    if n_f < 3 * mf + 1:
        return 0.0
    ref = x[0]
    q = 0.0
    for k in range(n_f):
        d = x[k] - ref
        c1[k + 1] = c1[k] + d
        q += d * d
    b, _ = _best_cut(c1, 0, n_f, mf)
    if b < 0:
        return 0.0
    a, bl = _best_cut(c1, 0, b, mf)
    c, br = _best_cut(c1, b, n_f, mf)
    # what the second split gains: the drop of the side's within sum of squares
    s = c1[b]
    gain_l = bl - s * s * (1.0 / b) if a >= 0 else -1.0
    s = c1[n_f] - c1[b]
    gain_r = br - s * s * (1.0 / (n_f - b)) if c >= 0 else -1.0
    if gain_l < 0 and gain_r < 0:
        return 0.0
    e0, e1 = (a, b) if gain_l >= gain_r else (b, c)
    return _three_levels(c1, q, n_f, e0, e1)


@njit(cache=True, nogil=True, parallel=True)
def _level_kernel(x: np.ndarray, mf: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Three-level separation of each sorted column of ``x`` (F, P).

    The best 2-split of the sorted values (exact 1-D k-means: the cut with
    the largest between-level sum of squares), then the best split of one
    side (the larger reduction of the within sum of squares),
    with at least ``mf`` values per level; the statistic is the smallest gap
    between adjacent level means over the pooled within-level sigma. Tight,
    well separated levels give large values; 0 when no split exists.
    """
    n_f, n_p = x.shape
    n_blocks = (n_p + 1023) // 1024
    for bi in prange(n_blocks):
        c1 = np.zeros(n_f + 1)
        for p in range(bi * 1024, min(n_p, (bi + 1) * 1024)):
            out[p] = _level_pixel(x[:, p], mf, c1)


@njit(cache=True, nogil=True, parallel=True)
def _rtn_stage1_kernel(st: np.ndarray, buf: np.ndarray, lvl: np.ndarray, dither: bool,
                       tab: np.ndarray, z0: float, h: float, mf: int,
                       a2: np.ndarray, s3: np.ndarray) -> None:  # pragma: no cover - compiled
    """Stage 1 of :func:`detect_rtn` in one pass over a chunk ``st`` (F, P) of raw values.

    Per pixel: the prepared float32 values of :func:`_prepared`
    (``float32(x) + buf - 0.5 - lvl`` with the dither ``U[0, 1)`` in ``buf``
    when ``dither``, else ``float32(x) - lvl``; the same float32 operations in
    the same order, so bit-identical), sorted (insertion sort, NaN last as
    ``numpy.sort``) and written back into ``buf``; then ``A*^2`` into ``a2``
    and the three-level statistic into ``s3``. Replaces a float32 copy, two
    in-place passes and a strided ``numpy.sort`` of the chunk.
    """
    n_f, n_p = st.shape
    n_blocks = (n_p + 1023) // 1024
    half = np.float32(0.5)
    for bi in prange(n_blocks):
        v = np.empty(n_f, np.float32)
        c1 = np.zeros(n_f + 1)
        for p in range(bi * 1024, min(n_p, (bi + 1) * 1024)):
            for k in range(n_f):
                x = np.float32(st[k, p])
                if dither:
                    x = x + buf[k, p]
                    x = x - half
                x = x - lvl[k]
                # insertion: values before the slot that are greater (or NaN) move up
                j = k
                while j > 0 and (v[j - 1] > x or (np.isnan(v[j - 1]) and not np.isnan(x))):
                    v[j] = v[j - 1]
                    j -= 1
                v[j] = x
            for k in range(n_f):
                buf[k, p] = v[k]
            a2[p] = _ad_pixel(v, tab, z0, h)
            s3[p] = _level_pixel(v, mf, c1)


#: Monte Carlo series per frame count for the stage-1 level threshold.
_LEVEL_SIMS = 200_000


@functools.lru_cache(maxsize=64)
def _level_threshold(n_f: int, mf: int, p_false: float) -> float:
    """Null quantile ``1 - p_false`` of the three-level statistic for ``n_f`` frames.

    Calibrated once per frame count by a seeded Monte Carlo of Gaussian
    series (the statistic is scale and location free), so the stage-1
    false-alarm rate is the same for every F.
    """
    rng = np.random.default_rng(20_240_517 + n_f)
    vals = []
    for _ in range(0, _LEVEL_SIMS, 50_000):
        sim = rng.standard_normal((n_f, 50_000), dtype=np.float32)
        sim.sort(axis=0)
        out = np.empty(sim.shape[1])
        _level_kernel(sim, mf, out)
        vals.append(out)
    return float(np.quantile(np.concatenate(vals), 1.0 - p_false))


def _ad_numpy(x: np.ndarray) -> np.ndarray:
    """Reference A*^2 along axis 0 of ``x`` (F, P) with scipy's ``log_ndtr``."""
    n_f = x.shape[0]
    y = np.sort(np.asarray(x, dtype=np.float64).T, axis=1)
    m = y.mean(axis=1, keepdims=True)
    sd = y.std(axis=1, ddof=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (y - m) / sd
    i = np.arange(1, n_f + 1, dtype=np.float64)
    a2 = -n_f - (log_ndtr(z) @ (2 * i - 1) + log_ndtr(-z) @ (2 * n_f + 1 - 2 * i)) / n_f
    a2 = a2 * (1.0 + 0.75 / n_f + 2.25 / n_f**2)
    a2[~(sd[:, 0] > 0)] = np.nan
    return a2


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _splitmix64(z):  # pragma: no cover - compiled
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _dither_value(pixel, frame, seed_mix):  # pragma: no cover - compiled
    """The dither of one (pixel, frame): 24 bits of splitmix64 as a float32 in [0, 1)."""
    z = _splitmix64(((np.uint64(pixel) << np.uint64(16)) + np.uint64(frame)) ^ seed_mix)
    return np.float32(z >> np.uint64(40)) * np.float32(2.0**-24)


@njit(parallel=True, cache=True, nogil=True)
def _dither_kernel(pixels, seed_mix, out):  # pragma: no cover - compiled
    n_f = out.shape[0]
    for j in prange(pixels.shape[0]):
        for f in range(n_f):
            out[f, j] = _dither_value(pixels[j], f, seed_mix)


def _mix_numpy(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic, as in the kernel)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _seed_mix(seed: int) -> np.uint64:
    return _mix_numpy(np.asarray([seed], dtype=np.uint64))[0]


def _dither_numpy(pixels: np.ndarray, n_f: int, seed: int) -> np.ndarray:
    """Reference of :func:`dither` in numpy."""
    keys = ((np.asarray(pixels, dtype=np.uint64)[None, :] << np.uint64(16))
            + np.arange(n_f, dtype=np.uint64)[:, None])
    z = _mix_numpy(keys ^ _seed_mix(seed))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def dither(pixels: np.ndarray, n_frames: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) dither of frames x pixels, a function of (seed, pixel, frame) alone.

    Parameters
    ----------
    pixels : ndarray of int
        Global indices of the pixels (``y * width + x`` on the sensor).
    n_frames : int
        Frames (< 65536).
    seed : int
        Seed (>= 0).

    Returns
    -------
    ndarray (n_frames, len(pixels)), float32
        24-bit uniform values from the splitmix64 hash of ``(pixel << 16) + frame``
        mixed with the hashed seed: the dither of a pixel does not depend on the
        tile or chunk it is processed in, so RTN flags are independent of the
        tiling (a seeded stream per chunk is not). splitmix64 passes BigCrush
        as a generator of successive keys (Steele et al. 2014).
    """
    pix = np.ascontiguousarray(pixels, dtype=np.int64).ravel()
    out = np.empty((int(n_frames), pix.size), dtype=np.float32)
    _dither_kernel(pix, _seed_mix(seed), out)
    return out


def _prepared(flat: np.ndarray, frame_level: np.ndarray | None,
              pixels: np.ndarray, seed: int, integral: bool | None = None) -> np.ndarray:
    """Level-subtracted float32 values (F, P), dithered when the counts are integers.

    ``integral``: whether the counts are integers (dithered), when the caller
    decided it for a larger set of columns than ``flat``; None: from ``flat``.
    """
    n_f = flat.shape[0]
    out = flat.astype(np.float32, copy=True)
    if integral is None:
        integral = np.issubdtype(flat.dtype, np.integer) or bool(np.all(out == np.round(out)))
    if integral:
        out += dither(pixels, n_f, seed)
        out -= np.float32(0.5)
    if frame_level is not None:
        lvl = np.asarray(frame_level, dtype=np.float64).reshape(n_f, 1)
        out -= (lvl - lvl.mean()).astype(np.float32)
    return out


#: Pixels per chunk of the stack prepared at once (bounds the float32 copy). Not a
#: power of two: the frame rows of a chunk's (F, P) float32 buffer are then an odd
#: number of cache lines apart. With 2**18 pixels they were 1 MB apart, so the
#: frames of a pixel block fell into the same cache sets and evicted one another:
#: the RTN test of a 50-frame, 2.2 Mpix bias tile took 3.7 s instead of 2.4 s on
#: one core (12 frames: 0.63 s instead of 0.56 s), with the same flags.
_CHUNK_PIXELS = (1 << 18) - 16


def _pixel_ids(n_pixels: int, pixel_index: np.ndarray | None) -> np.ndarray:
    """Global pixel indices of a stack's flattened pixels (default 0 .. n-1)."""
    if pixel_index is None:
        return np.arange(n_pixels, dtype=np.int64)
    ids = np.asarray(pixel_index, dtype=np.int64).ravel()
    if ids.size != n_pixels:
        raise ValueError(f"pixel_index has {ids.size} entries for {n_pixels} pixels")
    return ids


def _chunks(stack: np.ndarray, frame_level: np.ndarray | None, seed: int,
            pixel_index: np.ndarray | None = None):
    """Yield ``(first_pixel, values (F, P_chunk))`` of the prepared stack.

    The dither of a pixel is a function of (seed, global pixel index, frame)
    (:func:`dither`): it does not depend on the chunk or the tile.
    """
    flat = stack.reshape(stack.shape[0], -1)
    ids = _pixel_ids(flat.shape[1], pixel_index)
    for p0 in range(0, flat.shape[1], _CHUNK_PIXELS):
        yield p0, _prepared(flat[:, p0 : p0 + _CHUNK_PIXELS], frame_level,
                            ids[p0 : p0 + _CHUNK_PIXELS], seed)


def rtn_statistic(stack: np.ndarray, *, frame_level: np.ndarray | None = None, seed: int = 0,
                  backend: str = "numba") -> np.ndarray:
    """Anderson-Darling normality statistic ``A*^2`` of each pixel's bias series.

    Parameters
    ----------
    stack : ndarray (F, ...)
        Bias stack, raw counts (ADU), uint16 or float; axis 0 is the frame.
    frame_level : ndarray (F,), optional
        Per-frame level (ADU, e.g. clipped frame means) removed before the
        test, so that common bias jumps do not look like pixel levels.
    seed : int
        Seed of the ``U(-0.5, 0.5)`` dither of integer counts.
    backend : {"numba", "numpy"}
        Compiled kernel (default) or the scipy reference.

    Returns
    -------
    ndarray, shape ``stack.shape[1:]``, float64
        ``A*^2`` (dimensionless); larger is less Gaussian. NaN for constant
        pixels or fewer than 3 frames. Under normality ``P(A*^2 > 1.45)``
        is about 1e-3 (see :attr:`DefectConfig.rtn_ad_threshold`).

    Notes
    -----
    Throughput (F = 50, one core of the 2-core development VM): see the
    module tests; the compiled kernel is O(F log F) per pixel.
    """
    x = np.asarray(stack)
    n_f = x.shape[0]
    shape = x.shape[1:]
    n_p = int(np.prod(shape))
    out = np.full(n_p, np.nan)
    if n_f < 3:
        return out.reshape(shape)
    if backend == "numba":
        tab, z0 = _log_phi_table((n_f - 1) / np.sqrt(n_f))
    elif backend != "numpy":
        raise ValueError(f"unknown backend {backend!r}")
    for p0, vals in _chunks(x, frame_level, seed):
        vals.sort(axis=0)  # numpy's vectorised sort; the statistic needs order statistics
        if backend == "numba":
            _ad_kernel(vals, tab, z0, _TABLE_STEP, out[p0 : p0 + vals.shape[1]])
        else:
            out[p0 : p0 + vals.shape[1]] = _ad_numpy(vals)
    return out.reshape(shape)


# --------------------------------------------------------------------------- RTN confirmation


def _kmeans_1d_init(y: np.ndarray, k: int) -> np.ndarray:
    """Exact 1-D k-means (k = 2, 3) of sorted rows ``y`` (M, F) -> cluster means (M, k).

    An optimal 1-D clustering is a set of contiguous ranges of the sorted
    values; every split is scanned with cumulative sums, maximising
    ``sum_c S_c^2 / n_c`` (equivalent to minimising the within-cluster sum of
    squares).
    """
    m, n = y.shape
    c1 = np.zeros((m, n + 1))
    np.cumsum(y, axis=1, out=c1[:, 1:])
    tot = c1[:, n : n + 1]
    if k == 2:
        cut = np.arange(1, n)
        s1 = c1[:, cut]
        score = s1**2 / cut + (tot - s1) ** 2 / (n - cut)
        b = cut[np.argmax(score, axis=1)]
        bounds = [np.zeros(m, dtype=np.intp), b, np.full(m, n)]
    elif k == 3:
        i1, i2 = np.triu_indices(n - 1, k=1)
        i1, i2 = i1 + 1, i2 + 1  # 1 <= a < b <= n - 1
        s_a, s_b = c1[:, i1], c1[:, i2]
        score = s_a**2 / i1 + (s_b - s_a) ** 2 / (i2 - i1) + (tot - s_b) ** 2 / (n - i2)
        best = np.argmax(score, axis=1)
        bounds = [np.zeros(m, dtype=np.intp), i1[best], i2[best], np.full(m, n)]
    else:
        raise ValueError("k must be 2 or 3")
    rows = np.arange(m)
    means = np.empty((m, k))
    for c in range(k):
        lo, hi = bounds[c], bounds[c + 1]
        means[:, c] = (c1[rows, hi] - c1[rows, lo]) / (hi - lo)
    return means


@njit(cache=True, nogil=True, parallel=True)
def _kmeans_1d_kernel(y: np.ndarray, means: np.ndarray) -> None:  # pragma: no cover - compiled
    """:func:`_kmeans_1d_init` row by row (k = ``means.shape[1]``, 2 or 3) into ``means``.

    The same scores in the same order (cuts ascending, the first a before b;
    the first maximum wins), so the same splits and the same means; O(F^2)
    per row without the reference's (M, F^2 / 2) score array (at k = 3 and
    50 frames 1176 scores, 9.4 kB, a row and a few such temporaries: the
    reference start took as long as the EM).
    """
    m, n = y.shape
    k = means.shape[1]
    for r in prange(m):
        c1 = np.zeros(n + 1)
        for j in range(n):
            c1[j + 1] = c1[j] + y[r, j]
        tot = c1[n]
        best = -np.inf
        ba, bb = 1, n
        if k == 2:
            for cut in range(1, n):
                s1 = c1[cut]
                score = s1**2 / cut + (tot - s1) ** 2 / (n - cut)
                if score > best:
                    best = score
                    ba = cut
            lo = np.array([0, ba])
            hi = np.array([ba, n])
        else:
            for i1 in range(1, n - 1):
                s_a = c1[i1]
                for i2 in range(i1 + 1, n):
                    s_b = c1[i2]
                    score = s_a**2 / i1 + (s_b - s_a) ** 2 / (i2 - i1) + (tot - s_b) ** 2 / (n - i2)
                    if score > best:
                        best = score
                        ba, bb = i1, i2
            lo = np.array([0, ba, bb])
            hi = np.array([ba, bb, n])
        for c in range(k):
            means[r, c] = (c1[hi[c]] - c1[lo[c]]) / (hi[c] - lo[c])


def _tied_gmm(y: np.ndarray, k: int, *, max_iter: int = 300, tol: float = 1e-7,
              backend: str = "numba") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched EM of 1-D mixtures with a common variance, one per row of ``y`` (M, F).

    Initialised from the exact 1-D k-means split; rows stop iterating once
    their log-likelihood changes by less than ``tol``. Returns weights
    (M, k), means (M, k), variance (M,) and total log-likelihood (M,). The
    variance is floored at 1e-6 of the row variance (sklearn's ``reg_covar``
    on standardised data). ``backend="numpy"`` is the reference: plain EM
    in whole-batch (M, k, F) array steps, ``max_iter`` steps at most. The
    compiled kernel takes the same EM steps row by row (sums in another
    order), from the same k-means start (:func:`_kmeans_1d_kernel`), with
    ``k - 1`` exponentials per value and one logarithm per step (the
    reference takes one per value), accelerated by SQUAREM
    (:func:`_tied_gmm_kernel`): rows that plain EM brings to convergence
    within ``max_iter`` steps end at the same optimum (log-likelihoods equal
    to 1e-9 relative) in fewer steps; slow rows that plain EM leaves short of
    it end with a likelihood at least as high; with ``max_iter <= 2`` both
    take the same two steps (all tested).
    """
    if backend not in ("numba", "numpy"):
        raise ValueError(f"unknown backend {backend!r}")
    m, n = y.shape
    floor = 1e-6 * np.maximum(y.var(axis=1), 1e-300)
    if k == 1:
        var = np.maximum(y.var(axis=1), floor)
        ll = -0.5 * n * (np.log(2 * np.pi * var) + 1.0)
        return np.ones((m, 1)), y.mean(axis=1, keepdims=True), var, ll
    if backend == "numba":
        # C rows for both kernels (a transposed stack would compile other signatures)
        yc = np.ascontiguousarray(y, dtype=np.float64)
        mu = np.empty((m, k))
        _kmeans_1d_kernel(np.sort(yc, axis=1), mu)
        w = np.empty((m, k))
        var = np.empty(m)
        ll = np.empty(m)
        _tied_gmm_kernel(yc, mu, floor, int(max_iter), float(tol), w, var, ll)
        return w, mu, var, ll
    mu = _kmeans_1d_init(np.sort(y, axis=1), k)
    near = np.argmin(np.abs(y[:, None, :] - mu[:, :, None]), axis=1)  # (M, F)
    w = np.maximum(np.stack([(near == c).mean(axis=1) for c in range(k)], axis=1), 1e-300)
    var = np.maximum(((y - np.take_along_axis(mu, near, axis=1)) ** 2).mean(axis=1), floor)
    ll = np.full(m, -np.inf)
    act = np.arange(m)
    for _ in range(max_iter):
        ya, mua, wa, va = y[act], mu[act], w[act], var[act]
        d = ya[:, None, :] - mua[:, :, None]  # (A, k, F)
        lj = d * d
        lj *= (-0.5 / va)[:, None, None]
        lj += (np.log(wa) - 0.5 * np.log(2 * np.pi * va)[:, None])[:, :, None]
        top = lj.max(axis=1, keepdims=True)
        lj -= top
        r = np.exp(lj, out=lj)
        tot = r.sum(axis=1, keepdims=True)
        r /= tot
        ll_new = (top[:, 0, :] + np.log(tot[:, 0, :])).sum(axis=1)
        done = np.abs(ll_new - ll[act]) <= tol * np.maximum(np.abs(ll_new), 1.0)
        ll[act] = ll_new
        nk = r.sum(axis=2)
        w[act] = np.maximum(nk / n, 1e-300)
        mu_new = np.where(nk > 1e-12, (r * ya[:, None, :]).sum(axis=2) / np.maximum(nk, 1e-300), mua)
        mu[act] = mu_new
        d = ya[:, None, :] - mu_new[:, :, None]
        var[act] = np.maximum((r * d * d).sum(axis=(1, 2)) / n, floor[act])
        act = act[~done]
        if act.size == 0:
            break
    if act.size:  # log-likelihood of the last parameters of unfinished rows
        ya = y[act]
        d = ya[:, None, :] - mu[act][:, :, None]
        lj = (np.log(w[act]) - 0.5 * np.log(2 * np.pi * var[act])[:, None])[:, :, None] \
            - 0.5 * d * d / var[act][:, None, None]
        ll[act] = logsumexp(lj, axis=1).sum(axis=1)
    return w, mu, var, ll


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _tied_em_map(row: np.ndarray, th: np.ndarray, out: np.ndarray, k: int, floor: float,
                 resp: np.ndarray, nk: np.ndarray, sy: np.ndarray, logw: np.ndarray,
                 lj: np.ndarray) -> float:  # pragma: no cover - compiled
    """One EM step of a tied-variance 1-D mixture: the parameters ``th`` -> ``out``; returns ll(th).

    ``th`` and ``out`` hold ``(w_0 .. w_k-1, mu_0 .. mu_k-1, var)``. The
    reference's E and M steps (:func:`_tied_gmm` ``backend="numpy"``), with
    ``k - 1`` exponentials per value and one logarithm per step. Parameters
    outside the model (a weight or the variance not positive: an
    extrapolation of :func:`_tied_gmm_kernel` can land there) give ``-inf``
    and leave ``out`` unspecified.
    """
    n = row.shape[0]
    vr = th[2 * k]
    if not vr > 0.0:
        return -np.inf
    for c in range(k):
        if not th[c] > 0.0:
            return -np.inf
    half_inv = -0.5 / vr
    log_norm = 0.5 * (np.log(2 * np.pi) + np.log(vr))
    for c in range(k):
        logw[c] = np.log(th[c]) - log_norm
        nk[c] = 0.0
        sy[c] = 0.0
    ll = 0.0
    # sum of log(tot) as the log of a product (tot is in [1, k]): one
    # logarithm per step instead of one per value
    prod = 1.0
    for j in range(n):
        top = -np.inf
        arg = 0
        for c in range(k):
            d = row[j] - th[k + c]
            lj[c] = d * d * half_inv + logw[c]
            if lj[c] > top:
                top = lj[c]
                arg = c
        tot = 0.0
        for c in range(k):
            # exp(0) is 1 exactly: one exponential fewer per value
            lj[c] = 1.0 if c == arg else np.exp(lj[c] - top)
            tot += lj[c]
        for c in range(k):
            q = lj[c] / tot
            resp[c, j] = q
            nk[c] += q
            sy[c] += q * row[j]
        ll += top
        prod *= tot
        if prod > 1e280:
            ll += np.log(prod)
            prod = 1.0
    ll += np.log(prod)
    for c in range(k):
        out[c] = max(nk[c] / n, 1e-300)
        out[k + c] = sy[c] / max(nk[c], 1e-300) if nk[c] > 1e-12 else th[k + c]
    acc = 0.0
    for j in range(n):
        for c in range(k):
            d = row[j] - out[k + c]
            acc += resp[c, j] * d * d
    out[2 * k] = max(acc / n, floor)
    return ll


#: Growth factor of the largest SQUAREM step after an accepted full step
#: (Varadhan & Roland 2008; their ``mstep``).
_SQUAREM_GROWTH = 4.0


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _tied_gmm_kernel(y: np.ndarray, mu: np.ndarray, floor: np.ndarray, max_iter: int,
                     tol: float, w: np.ndarray, var: np.ndarray,
                     ll: np.ndarray) -> None:  # pragma: no cover - compiled
    """Rows of :func:`_tied_gmm` for k >= 2: EM accelerated by SQUAREM, one row at a time.

    ``mu`` (M, k) holds the k-means start and receives the means; ``w``,
    ``var``, ``ll`` receive the weights, variances and log-likelihoods.

    Each cycle takes two EM steps ``th1 = F(th0)``, ``th2 = F(th1)`` and stops
    when their log-likelihoods differ by less than ``tol`` (relative), the
    reference's rule; otherwise it extrapolates along ``r = th1 - th0``,
    ``v = th2 - 2 th1 + th0`` to ``th0 + 2 a r + a^2 v`` with the step
    length ``a = |r| / |v|`` (at least 1, which is ``th2``; at most a limit
    that grows after full steps), takes one EM step from there and keeps it
    when its start is at least as likely as ``th1``, else goes on from
    ``th2`` (the scheme SqS3 of Varadhan & Roland 2008, Scand. J. Stat. 35,
    335, with its monotone safeguard). The log-likelihood never decreases
    from cycle to cycle, and a converged row is at a fixed point of EM, as
    the reference's; on 4784 stage-2 candidates of a 50-frame 61 MP bias
    band the two- and three-level fits took 16 EM steps per row on average
    and 0.05 and 0.09 s on one thread (plain EM: 0.16 and 0.18 s), and slowly
    converging rows (two levels merged while a rare third one separates) end
    far closer to the optimum.
    ``max_iter`` bounds the EM steps; with two or fewer the steps are plain EM's.
    """
    m, n = y.shape
    k = mu.shape[1]
    p = 2 * k + 1
    for r in prange(m):
        row = y[r]
        resp = np.empty((k, n))
        nk = np.zeros(k)
        sy = np.zeros(k)
        logw = np.empty(k)
        lj = np.empty(k)
        th0 = np.empty(p)
        th1 = np.empty(p)
        th2 = np.empty(p)
        ext = np.empty(p)
        th3 = np.empty(p)
        dr = np.empty(p)
        dv = np.empty(p)
        # start: each value to its nearest k-means centre (the first on ties)
        sq = 0.0
        for j in range(n):
            best = 0
            for c in range(1, k):
                if abs(row[j] - mu[r, c]) < abs(row[j] - mu[r, best]):
                    best = c
            nk[best] += 1.0
            d = row[j] - mu[r, best]
            sq += d * d
        for c in range(k):
            th0[c] = max(nk[c] / n, 1e-300)
            th0[k + c] = mu[r, c]
        th0[2 * k] = max(sq / n, floor[r])
        steps = 0
        step_max = 1.0
        llr = -np.inf
        converged = False
        while steps + 2 <= max_iter:
            l0 = _tied_em_map(row, th0, th1, k, floor[r], resp, nk, sy, logw, lj)
            l1 = _tied_em_map(row, th1, th2, k, floor[r], resp, nk, sy, logw, lj)
            steps += 2
            if abs(l1 - l0) <= tol * max(abs(l1), 1.0):
                th0[:] = th2
                llr = l1  # as the reference: the likelihood one step before the result
                converged = True
                break
            if steps + 1 > max_iter:
                th0[:] = th2
                break
            sr = 0.0
            sv = 0.0
            for i in range(p):
                dr[i] = th1[i] - th0[i]
                dv[i] = th2[i] - 2.0 * th1[i] + th0[i]
                sr += dr[i] * dr[i]
                sv += dv[i] * dv[i]
            alpha = np.sqrt(sr / sv) if sv > 0.0 else 1.0
            alpha = min(step_max, alpha) if alpha > 1.0 else 1.0
            for i in range(p):
                ext[i] = th0[i] + 2.0 * alpha * dr[i] + alpha * alpha * dv[i]
            lx = _tied_em_map(row, ext, th3, k, floor[r], resp, nk, sy, logw, lj)
            steps += 1
            if lx >= l1:
                th0[:] = th3
                if alpha == step_max:
                    step_max *= _SQUAREM_GROWTH
            else:
                th0[:] = th2
                if alpha == step_max:
                    step_max = max(1.0, step_max / _SQUAREM_GROWTH)
        if not converged:  # log-likelihood of the last parameters
            llr = _tied_em_map(row, th0, th1, k, floor[r], resp, nk, sy, logw, lj)
        for c in range(k):
            w[r, c] = th0[c]
            mu[r, c] = th0[k + c]
        var[r] = th0[2 * k]
        ll[r] = llr


#: Degrees of freedom tried for the heavy-tailed alternative of stage 2.
_T_DOF = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def _student_t_loglike(y: np.ndarray, *, n_iter: int = 40, backend: str = "numba") -> np.ndarray:
    """Best log-likelihood over :data:`_T_DOF` of a Student-t location-scale fit per row.

    EM for the t distribution with known degrees of freedom (Dempster, Laird
    & Rubin 1977, section 4.6): weights ``u = (nu + 1) / (nu + d^2 / s^2)``,
    from the row's median and variance, ``n_iter`` steps per ``nu``.
    ``backend="numpy"`` is the reference (whole-batch array steps); the
    compiled kernel runs the same steps row by row, 2-4x faster (sums in a
    different order, a product by ``1 / s^2``: equal to ~1e-12 relative, tested).
    """
    y = np.ascontiguousarray(y, dtype=np.float64)
    nu = np.asarray(_T_DOF, dtype=np.float64)
    const = gammaln(0.5 * (nu + 1.0)) - gammaln(0.5 * nu) - 0.5 * np.log(nu * np.pi)
    if backend == "numba":
        return _student_t_kernel(y, nu, const, int(n_iter))
    if backend != "numpy":
        raise ValueError(f"unknown backend {backend!r}")
    m, n = y.shape
    best = np.full(m, -np.inf)
    floor = 1e-6 * np.maximum(y.var(axis=1), 1e-300)
    for dof, c in zip(nu, const, strict=True):
        mu = np.median(y, axis=1)
        s2 = np.maximum(y.var(axis=1), floor)
        for _ in range(n_iter):
            d = y - mu[:, None]
            u = (dof + 1.0) / (dof + d * d / s2[:, None])
            mu = mu + (u * d).sum(axis=1) / u.sum(axis=1)
            d = y - mu[:, None]
            s2 = np.maximum((u * d * d).sum(axis=1) / n, floor)
        d = y - mu[:, None]
        ll = (n * (c - 0.5 * np.log(s2))
              - 0.5 * (dof + 1.0) * np.log1p(d * d / (dof * s2[:, None])).sum(axis=1))
        best = np.maximum(best, ll)
    return best


@njit(cache=True, nogil=True, parallel=True)
def _student_t_kernel(y: np.ndarray, nus: np.ndarray, consts: np.ndarray,
                      n_iter: int) -> np.ndarray:  # pragma: no cover - compiled
    """Rows of :func:`_student_t_loglike` (the numpy reference's steps, one row at a time)."""
    m, n = y.shape
    best = np.full(m, -np.inf)
    for r in prange(m):
        row = y[r]
        work = np.empty(n)
        u = np.empty(n)
        var = _mean_sumsq(row)[1] / n
        floor = 1e-6 * max(var, 1e-300)
        work[:] = row
        med = buffer_median(work, n)
        for q in range(nus.size):
            dof = nus[q]
            mu = med
            s2 = max(var, floor)
            for _ in range(n_iter):
                su = 0.0
                sud = 0.0
                inv_s2 = 1.0 / s2
                for j in range(n):
                    d = row[j] - mu
                    u[j] = (dof + 1.0) / (dof + d * d * inv_s2)
                    su += u[j]
                    sud += u[j] * d
                mu = mu + sud / su
                sudd = 0.0
                for j in range(n):
                    d = row[j] - mu
                    sudd += u[j] * d * d
                s2 = max(sudd / n, floor)
            acc = 0.0
            for j in range(n):
                d = row[j] - mu
                acc += np.log1p(d * d / (dof * s2))
            ll = n * (consts[q] - 0.5 * np.log(s2)) - 0.5 * (dof + 1.0) * acc
            if ll > best[r] or np.isnan(ll):  # np.maximum's rule: NaN wins
                best[r] = ll
    return best


def rtn_confirm(values: np.ndarray, *, config: DefectConfig | None = None) -> np.ndarray:
    """Confirm RTN candidates with tied-variance 1-D mixtures of their values.

    Parameters
    ----------
    values : ndarray (F, M)
        Level-subtracted (and, for integer counts, dithered) values (ADU) of
        M candidate pixels.
    config : DefectConfig, optional
        ``rtn_max_levels``, ``rtn_min_separation``, ``rtn_min_level_frames``.

    Returns
    -------
    ndarray (M,) of bool
        True when a 2..``rtn_max_levels`` level model has a BIC lower by
        more than ``rtn_min_delta_bic`` than the better of one Gaussian and a
        Student t (heavy tails), and has adjacent levels more than ``rtn_min_separation``
        within-level sigmas apart, each holding at least
        ``rtn_min_level_frames`` frames, with steps above ``rtn_min_step_adu``.
    """
    cfg = config if config is not None else DefectConfig()
    v = np.asarray(values, dtype=np.float64)
    n_f, m = v.shape
    if m == 0:
        return np.zeros(0, dtype=bool)
    y = v.T
    # standardise per pixel (scale-free criteria)
    sd = np.maximum(y.std(axis=1), 1e-300)
    y = (y - y.mean(axis=1, keepdims=True)) / sd[:, None]
    log_n = np.log(n_f)
    # The lowest BIC of the multi-level models that meet the level criteria
    # (separation, step, frames per level): the pixel is RTN when the best
    # unimodal model's BIC exceeds it by rtn_min_delta_bic. NaN fits count as
    # failing (np.fmin skips them), as the comparisons below would.
    bic_levels = np.full(m, np.inf)
    for k in range(2, max(cfg.rtn_max_levels, 1) + 1):
        if n_f < 2 * k:
            break
        w, mu, var, ll = _tied_gmm(y, k)
        bic = -2.0 * ll + 2 * k * log_n  # k - 1 weights, k means, 1 variance
        step = np.diff(np.sort(mu, axis=1), axis=1).min(axis=1)
        sep = step / np.sqrt(var)
        d = y[:, None, :] - mu[:, :, None]
        with np.errstate(divide="ignore"):
            lj = np.log(w)[:, :, None] - 0.5 * d * d / var[:, None, None]
        hard = np.argmax(lj, axis=1)
        counts = np.stack([(hard == c).sum(axis=1) for c in range(k)], axis=1)
        levels_ok = ((sep > cfg.rtn_min_separation) & (step * sd > cfg.rtn_min_step_adu)
                     & (counts.min(axis=1) >= cfg.rtn_min_level_frames))
        bic_levels = np.fmin(bic_levels, np.where(levels_ok, bic, np.inf))
    # unimodal alternatives: one Gaussian (2 parameters), Student t (3). The
    # null's BIC is the lower of the two, so a pixel that does not beat the
    # Gaussian cannot beat the null: the t fits (6 dof x 40 EM steps, ~30 % of
    # this function) run only on the pixels that do, with the same flags.
    bic_null = -2.0 * _tied_gmm(y, 1)[3] + 2 * log_n
    beats_gauss = bic_null - bic_levels > cfg.rtn_min_delta_bic
    if beats_gauss.any():
        bic_null[beats_gauss] = np.minimum(
            bic_null[beats_gauss], -2.0 * _student_t_loglike(y[beats_gauss]) + 3 * log_n)
    return bic_null - bic_levels > cfg.rtn_min_delta_bic


@njit(cache=True, nogil=True, inline="always")
def _flag(cond: bool) -> float:  # pragma: no cover - compiled
    """1.0 where ``cond``, else 0.0: a running best kept as ``best += _flag(better) * (new - best)``.

    Vectorised loops that keep a running best per lane store it
    unconditionally. Written as ``if better: best[i] = new`` (or as a store
    of ``new if better else best[i]``), LLVM compiles the update to a masked
    vector store (``vmaskmovps``/``vmaskmovpd``) on AVX2 targets, which AMD
    Zen 2/3 CPUs run as microcode, one every ~10 cycles or more: on a Zen 3
    VM the RTN sorting network took 3.5x and the level scans 1.8x as long
    as written with selects and plain stores (measured; the same floats).
    The blend is exact for the whole-number cuts it carries;
    ``tests/test_defects.py`` checks the compiled stage-1 kernel for
    masked stores (code generated for Zen 3, on any x86 host).
    """
    return 1.0 if cond else 0.0


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _level_block(buf: np.ndarray, p0: int, nb: int, mf: int, c1: np.ndarray, q: np.ndarray,
                 bst: np.ndarray, cutf: np.ndarray, c1b: np.ndarray,
                 fb: np.ndarray, s3: np.ndarray) -> None:  # pragma: no cover
    """:func:`_level_pixel` of the sorted columns ``p0 .. p0 + nb`` of ``buf`` (F, P) into ``s3``.

    Vectorised over the block's pixels: the prefix sums ``c1`` ((F + 1,
    block) scratch) and the sums of squares ``q`` are built frame by frame,
    the best 2-split is a scan over the cuts with a running maximum of the
    between term (:func:`_between`) per pixel, and the best split of either
    side is one more scan (a cut lies left or right of the first one; both
    sides' candidates come from one shared term; ``bst``, ``cutf`` (the cuts,
    as floats for uniform lanes): (3, block), ``c1b``, ``fb``, ``q``: (block,)
    scratch; ``fb`` copies the first cut out of ``cutf``, which the second
    scan writes: read from the same array, the scan is not vectorised, 1.3x
    slower). The scans read the prefix sums alone (with sums of squares as
    well, and the within sums of squares compared, the level statistic took
    ~1.5x as long). The same float operations in the same order as
    :func:`_level_pixel`, with the same first-maximum ties, so the statistic
    is bit-identical; the caller compiles with ``error_model="numpy"`` (cuts
    outside a side divide by zero in lanes that are discarded).
    """
    n_f = buf.shape[0]
    if n_f < 3 * mf + 1:
        for i in range(nb):
            s3[p0 + i] = 0.0
        return
    for i in range(nb):
        c1[0, i] = 0.0
        q[i] = 0.0
    r0 = buf[0, p0:p0 + nb]
    for k in range(n_f):
        row = buf[k, p0:p0 + nb]
        for i in range(nb):
            d = row[i] - r0[i]
            c1[k + 1, i] = c1[k, i] + d
            q[i] += d * d
    # best 2-split of [0, n_f)
    for i in range(nb):
        bst[0, i] = -np.inf
        cutf[0, i] = -1.0
    for c in range(mf, n_f - mf + 1):
        fc = np.float64(c)
        ifc = 1.0 / fc
        irc = 1.0 / np.float64(n_f - c)
        for i in range(nb):
            s = c1[c, i] - c1[0, i]
            t = c1[n_f, i] - c1[c, i]
            bt = s * s * ifc + t * t * irc
            up = bt > bst[0, i]
            bst[0, i] = np.maximum(bst[0, i], bt)      # finite: the same as keeping bt if up
            cutf[0, i] += _flag(up) * (fc - cutf[0, i])  # whole numbers: exact
    # best split of each side: one pass over the cuts, both sides at once (a cut
    # is left of b or right of it). The outer terms of the first scan are
    # recomputed (the same operations), and the term of the segment between the
    # cut and b is one expression for both sides: ``inner`` = S(b, c)**2 / (c - b)
    # for c > b, and -inner = S(c, b)**2 / (b - c) exactly for c < b (IEEE
    # negation is exact, and so are the negated difference and reciprocal), so
    # each candidate is the same float as in :func:`_level_pixel`; one masked
    # maximum per side, no selects of operands (3x faster than selecting the
    # side's bounds per lane).
    for i in range(nb):
        bb = max(int(cutf[0, i]), 0)
        c1b[i] = c1[bb, i]
        fb[i] = cutf[0, i]
        bst[1, i] = -np.inf
        cutf[1, i] = -1.0
        bst[2, i] = -np.inf
        cutf[2, i] = -1.0
    for c in range(mf, n_f - mf + 1):
        fc = np.float64(c)
        ifc = 1.0 / fc
        irc = 1.0 / np.float64(n_f - c)
        for i in range(nb):
            b = fb[i]
            s = c1[c, i] - c1[0, i]
            ba = s * s * ifc                          # S(0, c)**2 / c
            t = c1[n_f, i] - c1[c, i]
            bb2 = t * t * irc                         # S(c, n_f)**2 / (n_f - c)
            d = c1[c, i] - c1b[i]
            inner = d * d * (1.0 / (fc - b))          # S(b, c)**2 / (c - b); negated for c < b
            bl = ba - inner
            br = inner + bb2
            # bl, br are NaN in lanes whose cut is not on that side: masked out
            ul = (fc <= b - mf) & (bl > bst[1, i])
            ur = (fc >= b + mf) & (b >= 0.0) & (br > bst[2, i])
            bst[1, i] = np.maximum(bst[1, i], bl if ul else -np.inf)
            cutf[1, i] += _flag(ul) * (fc - cutf[1, i])
            bst[2, i] = np.maximum(bst[2, i], br if ur else -np.inf)
            cutf[2, i] += _flag(ur) * (fc - cutf[2, i])
    for i in range(nb):
        b = int(cutf[0, i])
        if b < 0:
            s3[p0 + i] = 0.0
            continue
        a = int(cutf[1, i])
        cc = int(cutf[2, i])
        s = c1[b, i]
        gain_l = bst[1, i] - s * s * (1.0 / b) if a >= 0 else -1.0
        s = c1[n_f, i] - c1[b, i]
        gain_r = bst[2, i] - s * s * (1.0 / (n_f - b)) if cc >= 0 else -1.0
        if gain_l < 0 and gain_r < 0:
            s3[p0 + i] = 0.0
            continue
        if gain_l >= gain_r:
            e0, e1 = a, b
        else:
            e0, e1 = b, cc
        s3[p0 + i] = _three_levels(c1[:, i], q[i], n_f, e0, e1)  # the per-pixel formula

@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _rtn_stage1_network(st: np.ndarray, lvl: np.ndarray, dither: bool,
                        ids: np.ndarray, seed_mix: np.uint64,
                        net: np.ndarray, tab: np.ndarray, z0: float, h: float,
                        mf: int, a2: np.ndarray, s3: np.ndarray) -> None:  # pragma: no cover
    """:func:`_rtn_stage1_kernel` for NaN-free values, vectorised over blocks of pixels.

    Per block of 256 pixels, every step is a loop over the block's pixels
    inside a loop over frames (SIMD-friendly): the prepared values are
    computed into the block's own (F, 256) float32 buffer (the same float32
    operations; with ``dither`` the dither of :func:`dither` is computed in
    the same loop from the pixels' sensor indices ``ids`` and the hashed seed
    ``seed_mix``, pixel by pixel within a frame, so the hash vectorises and
    no dither array is written and read back), sorted along the frame axis
    by the comparator network ``net`` (branch-free min/max), and ``A*^2`` is
    accumulated frame by frame in the order of :func:`_ad_pixel`, and the
    three-level statistic by :func:`_level_block`, so the results are
    bit-identical to the per-pixel kernel. The sorted values stay in the
    block's buffer (51 kB at 50 frames, in the core's cache): writing them
    for the whole chunk, of which stage 2 reads ~0.2 %, cost 19 % of the
    kernel; :func:`_sorted_values` recomputes the candidates' values.
    """
    n_f, n_p = st.shape
    block = 256
    half = np.float32(0.5)
    corr = 1.0 + 0.75 / n_f + 2.25 / (n_f * n_f)
    inv_h = 1.0 / h
    top = tab.shape[0] // 2 - 2  # last interval of the table
    n_cmp = net.shape[0]
    n_blocks = (n_p + block - 1) // block
    # scratch per chunk of 16 blocks, not per block (~110 k allocations and 0.9 GB
    # of zeroing per 2.2 Mpx tile: 0.57 s against 0.55 s on one thread); every
    # value is written before it is read
    per_chunk = 16
    n_chunks = (n_blocks + per_chunk - 1) // per_chunk
    for ci in prange(n_chunks):
        m = np.empty(block)
        sd = np.empty(block)
        inv_sd = np.empty(block)
        acc = np.empty(block)
        c1 = np.empty((n_f + 1, block))
        q = np.empty(block)
        bst = np.empty((3, block))
        cutf = np.empty((3, block))
        c1b = np.empty(block)
        fb = np.empty(block)
        q2 = np.empty(block, np.int64)
        frac = np.empty(block)
        buf = np.empty((n_f, block), np.float32)
        for bi in range(ci * per_chunk, min(n_blocks, (ci + 1) * per_chunk)):
            p0 = bi * block
            p1 = min(n_p, p0 + block)
            nb = p1 - p0
            for k in range(n_f):
                src = st[k, p0:p1]
                row = buf[k, :nb]
                lk = lvl[k]
                if dither:
                    idb = ids[p0:p1]  # indexed from 0: no negative-index wraparound in the loop
                    for i in range(nb):
                        x = np.float32(src[i]) + _dither_value(idb[i], k, seed_mix)
                        x = x - half
                        row[i] = x - lk
                else:
                    for i in range(nb):
                        row[i] = np.float32(src[i]) - lk
            for c in range(n_cmp):
                ra = buf[net[c, 0], :nb]
                rb = buf[net[c, 1], :nb]
                for i in range(nb):
                    x = ra[i]
                    y = rb[i]
                    # NaN-free: min(x, y), compiled without a masked store (see _flag)
                    ra[i] = np.minimum(x, y)
                    rb[i] = np.maximum(x, y)
            for i in range(nb):
                m[i] = 0.0
                sd[i] = 0.0
                acc[i] = 0.0
            for k in range(n_f):
                row = buf[k, :nb]
                for i in range(nb):
                    m[i] += row[i]
            for i in range(nb):
                m[i] = m[i] / n_f
            for k in range(n_f):
                row = buf[k, :nb]
                for i in range(nb):
                    d = row[i] - m[i]
                    sd[i] += d * d
            for i in range(nb):
                sd[i] = np.sqrt(sd[i] / (n_f - 1))  # a constant pixel gets NaN below
                inv_sd[i] = 1.0 / sd[i]  # the same reciprocal as per value, once per pixel
            for k in range(n_f):
                row = buf[k, :nb]
                w_lo = 2 * k + 1
                w_hi = 2 * n_f - 1 - 2 * k
                # :func:`_log_phi_pair` in two loops: the table positions (vectorised),
                # then the four table reads and the sums (1.7x faster than one loop,
                # which the table reads kept scalar throughout); the same floats
                for i in range(nb):
                    q2[i], frac[i] = _table_position((row[i] - m[i]) * inv_sd[i], z0, inv_h, top)
                for i in range(nb):
                    lo, hi = _table_pair(tab, q2[i], frac[i])
                    acc[i] += w_lo * lo
                    acc[i] += w_hi * hi
            for i in range(nb):
                if not (sd[i] > 0.0) or not np.isfinite(sd[i]):
                    a2[p0 + i] = np.nan
                else:
                    a2[p0 + i] = (-n_f - acc[i] / n_f) * corr
            _level_block(buf, 0, nb, mf, c1, q, bst, cutf, c1b, fb, s3[p0:p1])


def _sorted_values(part: np.ndarray, cols: np.ndarray, *, frame_level: np.ndarray | None,
                   pixels: np.ndarray, seed: int, integral: bool) -> np.ndarray:
    """:func:`_prepared` values of the columns ``cols`` of ``part``, sorted along the frames.

    The values :func:`_rtn_stage1_network` sorts in its blocks (the same
    float32 operations in the same order and the same dither), recomputed
    for stage 2's candidates only; bit-identical (tested).
    """
    out = _prepared(part[:, cols], frame_level, pixels[cols], seed, integral=integral)
    out.sort(axis=0)
    return out


def _stage1_chunks(stack: np.ndarray, frame_level: np.ndarray | None, seed: int,
                   tab: np.ndarray, z0: float, mf: int,
                   pixel_index: np.ndarray | None = None, quantum: int = 1):
    """Yield ``(first_pixel, A*^2, level statistic, values)`` per chunk.

    ``quantum`` > 1 (integer counts in steps of ``quantum``): each chunk's counts
    are floor-divided by it first, and ``frame_level`` is in ADU (divided here).

    ``values(cols)`` returns the sorted prepared values (F, len(cols)) of the
    chunk's columns ``cols``: those of :func:`_chunks` (the same per-pixel
    dither), sorted along the frame axis. The statistics come from one
    compiled pass per chunk; the values are recomputed for the columns asked
    for (stage 2's candidates), except on the per-pixel path (NaN in float
    input), which keeps the whole chunk's.
    """
    flat = stack.reshape(stack.shape[0], -1)
    if flat.dtype.kind not in "uif" or flat.dtype == np.float16:
        flat = flat.astype(np.float64)
    n_f = flat.shape[0]
    stepped = quantum > 1 and np.issubdtype(flat.dtype, np.integer)
    if frame_level is not None and stepped:
        frame_level = np.asarray(frame_level, dtype=np.float64) / quantum
    lvl = np.zeros(n_f, np.float32)
    if frame_level is not None:
        lv = np.asarray(frame_level, dtype=np.float64).reshape(n_f)
        lvl = (lv - lv.mean()).astype(np.float32)
    ids = _pixel_ids(flat.shape[1], pixel_index)
    mix = _seed_mix(seed)
    for p0 in range(0, flat.shape[1], _CHUNK_PIXELS):
        part = flat[:, p0 : p0 + _CHUNK_PIXELS]
        if stepped:
            part = part // part.dtype.type(quantum)  # the chunk's copy, in steps
        part_ids = ids[p0 : p0 + _CHUNK_PIXELS]
        integral = np.issubdtype(part.dtype, np.integer) or bool(
            np.all(part.astype(np.float32) == np.round(part.astype(np.float32))))
        a2 = np.empty(part.shape[1])
        s3 = np.empty(part.shape[1])
        if integral or not np.isnan(part).any():
            _rtn_stage1_network(part, lvl, integral, part_ids, mix,
                                _sorting_network(n_f), tab, z0, _TABLE_STEP, mf, a2, s3)
            values = functools.partial(_sorted_values, part, frame_level=frame_level,
                                       pixels=part_ids, seed=seed, integral=integral)
        else:
            buf = np.empty(part.shape, np.float32)  # no dither: its input is not read
            _rtn_stage1_kernel(part, buf, lvl, integral, tab, z0, _TABLE_STEP, mf, a2, s3)
            values = functools.partial(np.take, buf, axis=1)
        yield p0, a2, s3, values


def detect_rtn(stack: np.ndarray, *, frame_level: np.ndarray | None = None,
               config: DefectConfig | None = None, seed: int = 0,
               pixel_index: np.ndarray | None = None, quantum: int = 1) -> np.ndarray:
    """Random-telegraph pixels of a bias stack.

    Parameters
    ----------
    stack : ndarray (F, ...)
        Bias stack (ADU), uint16 or float.
    frame_level : ndarray (F,), optional
        Per-frame level (ADU) removed first.
    config : DefectConfig, optional
        ``rtn_*`` thresholds.
    seed : int
        Dither seed (the same dither feeds both stages).
    pixel_index : ndarray of int, optional
        Global sensor index (``y * width + x``) of each pixel of the stack;
        the dither depends on it, so a tile processed alone gives the flags
        of the same pixels processed in the whole frame. Default: the
        stack's own flat indices.
    quantum : int
        Step of the integer counts (ADU): 1 for a 16-bit ADC; 4 or 16 for a
        14- or 12-bit ADC whose counts are scaled to 16 bits
        (:func:`count_quantum`). The test runs on the counts in steps
        (floor-divided, dithered by one step, ``rtn_min_step_adu`` in steps):
        dithered by one ADU, counts four or sixteen ADU apart are discrete
        levels to both stages (4 % of the pixels flagged, for 0.07 % with
        the same noise in one-ADU counts; measured).

    Returns
    -------
    ndarray of bool, shape ``stack.shape[1:]``
        False everywhere with fewer than ``rtn_min_frames`` frames.
    """
    cfg = config if config is not None else DefectConfig()
    x = np.asarray(stack)
    if quantum < 1 or int(quantum) != quantum:
        raise ValueError(f"quantum must be a positive integer, got {quantum}")
    quantum = int(quantum)
    if quantum > 1 and np.issubdtype(x.dtype, np.integer):
        cfg = replace(cfg, rtn_min_step_adu=cfg.rtn_min_step_adu / quantum)
    shape = x.shape[1:]
    n_f = x.shape[0]
    result = np.zeros(int(np.prod(shape)), dtype=bool)
    if n_f < max(cfg.rtn_min_frames, 3):
        return result.reshape(shape)
    tab, z0 = _log_phi_table((n_f - 1) / np.sqrt(n_f))
    mf = max(int(cfg.rtn_min_level_frames), 1)
    lvl_thr = _level_threshold(n_f, mf, float(cfg.rtn_level_pvalue))
    # Stage 2 runs on the candidates of all chunks together (its EM iterates in
    # Python per batch, so few large batches cost less than one per chunk); each
    # pixel's fit depends only on its own values, not on the batch.
    where: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for p0, a2, s3, vals in _stage1_chunks(x, frame_level, seed, tab, z0, mf, pixel_index,
                                           quantum):
        cand = np.flatnonzero(_finite_gt(a2, cfg.rtn_ad_threshold) | _finite_gt(s3, lvl_thr))
        where.append(p0 + cand)
        values.append(vals(cand))
    idx = np.concatenate(where) if where else np.zeros(0, dtype=np.intp)
    cand_values = np.concatenate(values, axis=1) if values else np.zeros((n_f, 0), np.float32)
    for s0 in range(0, idx.size, _CONFIRM_BATCH):
        sel = slice(s0, s0 + _CONFIRM_BATCH)
        result[idx[sel]] = rtn_confirm(cand_values[:, sel], config=cfg)
    return result.reshape(shape)


#: Candidates confirmed per stage-2 batch (bounds the (batch, k, F) EM temporaries).
_CONFIRM_BATCH = 4096


def count_quantum(counts: np.ndarray) -> int:
    """Step (ADU) of integer counts: the greatest common divisor of their differences.

    Parameters
    ----------
    counts : ndarray
        Raw counts of one or more frames (ADU; any shape). Non-integer values
        (floats with a fraction, NaN) make the step 1.

    Returns
    -------
    int
        1 for a 16-bit ADC; 4 for a 14-bit and 16 for a 12-bit ADC whose
        counts are written scaled to 16 bits, whatever offset is added. 1 when
        fewer than two distinct values are given.
    """
    v = np.asarray(counts).ravel()
    if v.size < 2:
        return 1
    if not np.issubdtype(v.dtype, np.integer):
        if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
            return 1
    v = v.astype(np.int64)
    q = int(np.gcd.reduce(v - v.min()))
    return max(q, 1)


# --------------------------------------------------------------------------- map rules


def hot_warm(rate_e: np.ndarray, rate_err_e: np.ndarray, *, populations: MixtureFit | None,
             config: DefectConfig | None = None, center: float | None = None,
             scale: float | None = None,
             background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HOT and WARM pixels of a dark-rate map.

    Parameters
    ----------
    rate_e, rate_err_e : ndarray
        Dark rate and its 1-sigma error (e-/s), same shape.
    populations : MixtureFit or None
        Dark-rate populations (:func:`sitiancal.compute.dark.dark_populations`);
        None uses the threshold rule alone.
    config : DefectConfig
        ``hot_*`` and ``warm_*`` thresholds.
    center, scale : float, optional
        Global median and robust sigma of the rates (e-/s); computed from
        the input when None (pass them when working tile by tile).
    background : ndarray, optional
        Smooth local level of the rates (e-/s, e.g. :func:`local_median`),
        same shape: WARM excesses are then measured from it instead of the
        global median, so a smoothly elevated region (amplifier glow, a warm
        corner) is a background that dark subtraction removes, not a field of
        warm pixels; HOT is measured from it too (a glow of 0.2 e-/s, as a
        0.02 e-/s glow at 0 C becomes at 20 C, is above the hot floor but
        no pixel of it is hot).
        The populations then classify ``center + excess``, the rate the pixel
        would have on the global median, not the elevated rate itself. Pass
        1-D arrays (with their background values) to test listed pixels.

    Returns
    -------
    (hot, warm) : ndarray of bool
        HOT: rate > max(center + hot_nsigma * scale, hot_floor_e_s) and more
        than hot_nsigma of its own errors above the center (with
        ``background``: the rate less the local level's excess over the
        center, and its excess over the local level). WARM (not hot):
        > center + warm_nsigma * scale and warm_nsigma of its errors above;
        with ``populations`` also a pixel > center + warm_min_nsigma * scale
        and warm_min_nsigma of its errors above whose most probable component
        (given its error) has a mean above center + warm_component_nsigma *
        scale.
    """
    cfg = config if config is not None else DefectConfig()
    r = _float_map(rate_e)
    e = _float_map(rate_err_e)
    c, s = _center_scale(r, center, scale)
    if background is not None:
        # measured from the local level where it is above the global median
        # (a glow region), from the global median elsewhere
        excess = r - np.maximum(_float_map(background), r.dtype.type(c))
    else:
        excess = r - c
    thr_hot = max(cfg.hot_nsigma * s, cfg.hot_floor_e_s - c)
    hot = _finite_gt(excess, thr_hot) & _finite_gt(excess, cfg.hot_nsigma * e)
    if populations is None:
        warm = _finite_gt(excess, cfg.warm_nsigma * s) & _finite_gt(excess, cfg.warm_nsigma * e)
        return hot, warm & ~hot
    best = populations.best
    elevated = np.asarray(best.means) > c + cfg.warm_component_nsigma * s
    pre = (_finite_gt(excess, cfg.warm_min_nsigma * s)
           & _finite_gt(excess, cfg.warm_min_nsigma * e) & ~hot)
    # A pixel that passes the threshold rule is warm whatever the mixture found:
    # BIC often merges a warm population of a few thousand pixels (1e-4 of the
    # sensor) with the tail of the main one, whose mean then stays below the
    # elevated-component cut. The populations add the pixels between
    # warm_min_nsigma and warm_nsigma that belong to an elevated component.
    warm = (_finite_gt(excess, cfg.warm_nsigma * s) & _finite_gt(excess, cfg.warm_nsigma * e)
            & ~hot)
    idx = np.flatnonzero((pre & ~warm).ravel())
    if idx.size and elevated.any():
        # Over a background, the rate a pixel would have on the global median
        # is classified: a pixel of a glow region is not of an elevated
        # population because the region is elevated.
        level = r if background is None else excess + r.dtype.type(c)
        cls = best.classify(level.ravel()[idx], e.ravel()[idx])
        warm.ravel()[idx] = elevated[cls]
    return hot, warm


def dead_low(response: np.ndarray, local_med: np.ndarray, *,
             config: DefectConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DEAD and LOW_RESPONSE pixels of a flat.

    Parameters
    ----------
    response : ndarray
        Flat response (any units, e.g. master flat normalised to 1).
    local_med : ndarray
        Local median of the same map (:func:`local_median`), same shape.
    config : DefectConfig
        ``dead_fraction`` (0.5) and ``low_fraction`` (0.8).

    Returns
    -------
    (dead, low) : ndarray of bool
        ``response / local_med < dead_fraction``, and between
        ``dead_fraction`` and ``low_fraction``; NaN ratios flag nothing.
    """
    cfg = config if config is not None else DefectConfig()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.divide(_float_map(response), _float_map(local_med))
        ok = np.isfinite(ratio)
        dead = ok & (ratio < cfg.dead_fraction)
        low = ok & (ratio >= cfg.dead_fraction) & (ratio < cfg.low_fraction)
    return dead, low


def noisy(bias_std: np.ndarray, *, config: DefectConfig | None = None,
          center: float | None = None, scale: float | None = None,
          n_frames: int | None = None) -> np.ndarray:
    """NOISY pixels of a map of temporal stds of the bias stack.

    Parameters
    ----------
    bias_std : ndarray
        Per-pixel temporal std (ddof=1; ADU or e-); NaN flags nothing.
    config : DefectConfig
        ``noisy_nsigma`` and ``noisy_alpha``.
    center, scale : float, optional
        Median and robust sigma of the map (its units); computed when None.
    n_frames : int, optional
        Bias frames behind each std. None: the std itself is compared with
        ``center + noisy_nsigma * scale``. Given: the limit is set on the
        pixels' noise, ``T = c + noisy_nsigma * S`` with the centre and width
        of the map corrected for the scatter of a std from ``n_frames``
        values (``c = center / m_k``, ``S^2 = scale^2 - (c r_k)^2`` with
        ``m_k`` and ``r_k`` the median and robust sigma of
        ``sqrt(chi2_k / k)``, ``k = n_frames - 1``), and a pixel is NOISY when
        ``k std^2 / T^2 > chi2.isf(noisy_alpha, k)``: its noise is above the
        limit at that false-alarm probability.

    Returns
    -------
    ndarray of bool
    """
    cfg = config if config is not None else DefectConfig()
    v = _float_map(bias_std)
    c, s = _center_scale(v, center, scale)
    if n_frames is None:
        return _finite_gt(v, c + cfg.noisy_nsigma * s)
    if n_frames < 2:
        raise ValueError(f"a std needs at least 2 frames, got {n_frames}")
    k = n_frames - 1
    m_k, r_k = _chi_median_robust_sigma(k)
    c_int = c / m_k
    s_int = math.sqrt(max(s * s - (c_int * r_k) ** 2, 0.0))
    limit = c_int + cfg.noisy_nsigma * s_int
    return _finite_gt(v, limit * math.sqrt(float(chi2.isf(cfg.noisy_alpha, k)) / k))


@functools.lru_cache(maxsize=64)
def _chi_median_robust_sigma(k: int) -> tuple[float, float]:
    """Median and 1.4826 MAD of ``sqrt(X / k)``, ``X`` chi-square with ``k`` degrees of freedom."""
    m = median_std_factor(k + 1)

    def inside(half: float) -> float:  # P(|u - m| <= half) - 1/2
        lo = max(m - half, 0.0)
        return float(chi2.cdf(k * (m + half) ** 2, k) - chi2.cdf(k * lo * lo, k)) - 0.5

    mad = brentq(inside, 1e-12, 10.0 * m + 10.0)
    return m, MAD_TO_SIGMA * mad


def unstable_bias(z: np.ndarray, *, config: DefectConfig | None = None) -> np.ndarray:
    """UNSTABLE_BIAS pixels: |z| of the per-pixel bias trend > unstable_bias_z."""
    cfg = config if config is not None else DefectConfig()
    return _finite_gt(np.abs(_float_map(z)), cfg.unstable_bias_z)


def nonlinear(residual_pct: np.ndarray, *, config: DefectConfig | None = None,
              center: float | None = None, scale: float | None = None,
              weight: np.ndarray | None = None) -> np.ndarray:
    """NONLINEAR pixels from a per-pixel linearity residual (%).

    Flags ``|residual - center| > nonlinear_nsigma * scale`` and
    ``|residual| > nonlinear_floor_pct``; center/scale default to the
    median and robust sigma of the input. With ``weight`` (a map, e.g. the
    square root of each pixel's relative signal, where a residual's noise
    goes as 1/sqrt(signal)) the deviations are weighted first:
    ``|(residual - center) * weight| > nonlinear_nsigma * scale``, ``scale``
    (by default) the robust sigma of the weighted deviations (of
    :func:`~sitiancal.compute.summary.threshold_sample` of them, for a large map).
    """
    cfg = config if config is not None else DefectConfig()
    v = _float_map(residual_pct)
    if weight is not None:
        c = float(finite_median_mad(v, mad=False)[0]) if center is None else float(center)
        z = (v - v.dtype.type(c)) * np.asarray(weight, dtype=v.dtype)
        s = robust_center_scale(threshold_sample(z))[1] if scale is None else float(scale)
        return (_finite_gt(np.abs(z), cfg.nonlinear_nsigma * s)
                & _finite_gt(np.abs(v), cfg.nonlinear_floor_pct))
    c, s = _center_scale(v, center, scale)
    if v.dtype == np.float32 and v.flags.c_contiguous and v.size >= _FUSED_MIN:
        # one compiled pass, the same float32 operations as the expression below
        out = np.empty(v.shape, dtype=bool)
        _nonlinear_kernel(v.reshape(-1), np.float32(c), np.float32(cfg.nonlinear_nsigma * s),
                          np.float32(cfg.nonlinear_floor_pct), out.reshape(-1))
        return out
    return (_finite_gt(np.abs(v - c), cfg.nonlinear_nsigma * s)
            & _finite_gt(np.abs(v), cfg.nonlinear_floor_pct))


#: Maps smaller than this are tested with numpy expressions (no kernel start-up).
_FUSED_MIN = 1 << 20


@njit(parallel=True, cache=True, nogil=True)
def _nonlinear_kernel(v: np.ndarray, c: np.float32, thr: np.float32, floor: np.float32,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``(|v - c| > thr) & (|v| > floor)`` in float32, NaN giving False, over flat ``v``."""
    n = v.size
    for i in prange(n):
        x = v[i]
        out[i] = abs(x - c) > thr and abs(x) > floor


def gain_outlier(gain: np.ndarray, gain_err: np.ndarray, *, populations: MixtureFit,
                 config: DefectConfig | None = None) -> np.ndarray:
    """GAIN_OUTLIER pixels: inconsistent with every gain population.

    Parameters
    ----------
    gain, gain_err : ndarray
        Per-pixel gain and 1-sigma error (e-/ADU).
    populations : MixtureFit
        Gain populations; components lighter than
        ``gain_population_min_weight`` are ignored (outlier catchers).
    config : DefectConfig
        ``gain_outlier_nsigma``.

    Returns
    -------
    ndarray of bool
        ``min_k |g - mu_k| / sqrt(sigma_k^2 + err^2) > gain_outlier_nsigma``;
        non-finite gains flag nothing.
    """
    cfg = config if config is not None else DefectConfig()
    best = populations.best
    keep = np.asarray(best.weights) >= cfg.gain_population_min_weight
    if not keep.any():
        keep[:] = True
    mu, sig = np.asarray(best.means)[keep], np.asarray(best.sigmas)[keep]
    g = _float_map(gain)
    e = np.nan_to_num(_float_map(gain_err), nan=0.0)
    zmin = np.full(g.shape, np.inf, dtype=np.result_type(g, e))
    with np.errstate(divide="ignore", invalid="ignore"):
        for m_k, s_k in zip(mu, sig, strict=True):
            zmin = np.fmin(zmin, np.abs(g - m_k) / np.sqrt(s_k**2 + e**2))
    return np.isfinite(g) & _finite_gt(zmin, cfg.gain_outlier_nsigma)


def build_mask(**flags: np.ndarray) -> np.ndarray:
    """Combine boolean maps into the uint16 defect mask.

    Parameters
    ----------
    **flags : ndarray of bool
        One keyword per :class:`MaskBit` name in lower case (``hot``,
        ``warm``, ``dead``, ``low_response``, ``noisy``, ``rtn``,
        ``nonlinear``, ``gain_outlier``, ``unstable_bias``), all the same
        shape. Non-boolean maps count as set where non-zero and finite.

    Returns
    -------
    ndarray of uint16
    """
    if not flags:
        raise ValueError("build_mask needs at least one flag map")
    shape = None
    mask: np.ndarray | None = None
    for name, arr in flags.items():
        try:
            bit = MaskBit[name.upper()]
        except KeyError:
            raise ValueError(f"unknown mask bit {name!r}; expected one of "
                             f"{[b.name.lower() for b in MaskBit]}") from None
        a = np.asarray(arr)
        if a.dtype != bool:
            a = np.nan_to_num(a.astype(np.float64), nan=0.0) != 0
        if shape is None:
            shape = a.shape
            mask = np.zeros(shape, dtype=np.uint16)
        elif a.shape != shape:
            raise ValueError(f"flag {name!r} has shape {a.shape}, expected {shape}")
        mask[a] |= np.uint16(bit.value)  # type: ignore[index]
    assert mask is not None
    return mask


def mask_counts(mask: np.ndarray) -> dict:
    """Counts and fractions of each bit, and of any bit.

    Returns
    -------
    dict
        ``{NAME: {"count": int, "fraction": float}}`` per :class:`MaskBit`
        plus ``"any"``; fractions are of all pixels of ``mask``.
    """
    m = np.asarray(mask)
    total = max(int(m.size), 1)
    out: dict = {}
    for bit in MaskBit:
        n = int(np.count_nonzero(m & np.uint16(bit.value)))
        out[bit.name] = {"count": n, "fraction": n / total}
    n_any = int(np.count_nonzero(m))
    out["any"] = {"count": n_any, "fraction": n_any / total}
    return out
