"""Bias products: stability over time, row/column profiles, DSNU split, line noise.

All inputs are plain arrays (ADU, seconds); nothing here reads frames. The
per-frame levels and per-frame row/column means come from the cube
(``frame_clipped_mean``, ``row_mean``, ``col_mean``), the master bias from the
tile kernels (``sitiancal.compute.stats``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from sitiancal.compute.stats import clipped_row_means

__all__ = [
    "DSNU",
    "BiasStability",
    "ColumnNoise",
    "RowNoise",
    "bias_stability",
    "dsnu_emva",
    "row_column_profiles",
    "temporal_column_noise",
    "temporal_row_noise",
]

#: Clipping used for the row/column profiles: 3 sigma, 5 iterations, median
#: centre (astropy's ``sigma_clipped_stats`` defaults), which removes hot and
#: cold pixels from a row or column mean without biasing a Gaussian one.
_PROFILE_SIGMA = 3.0
_PROFILE_MAXITERS = 5


def _float(x: float) -> float | None:
    """JSON-able float: None for NaN/inf."""
    x = float(x)
    return x if math.isfinite(x) else None


def _json(obj: Any) -> dict[str, Any]:
    return {k: (_float(v) if isinstance(v, float) else v) for k, v in asdict(obj).items()}


# ---------------------------------------------------------------------------
# bias stability
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BiasStability:
    """Stability of the bias level over a series of bias frames.

    Attributes
    ----------
    mean, mean_err : float
        Mean of the per-frame levels and its standard error ``std / sqrt(n)``, ADU.
    std, std_err : float
        Sample standard deviation (ddof=1) of the per-frame levels, and its
        Gaussian standard error ``std / sqrt(2 (n - 1))``, ADU.
    peak_to_peak : float
        ``max - min`` of the per-frame levels, ADU.
    drift, drift_err : float
        Least-squares slope of level against time and its standard error,
        ADU/hour (NaN with fewer than 3 frames or no time span).
    residual_std : float
        Standard deviation of the levels about the fitted line (ddof=2), ADU.
    n_frames : int
        Number of frames with a finite level and time.
    duration : float
        Time span of the series, s.
    """

    mean: float
    mean_err: float
    std: float
    std_err: float
    peak_to_peak: float
    drift: float
    drift_err: float
    residual_std: float
    n_frames: int
    duration: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as None)."""
        return _json(self)


def bias_stability(time_s: np.ndarray, frame_level: np.ndarray) -> BiasStability:
    """Bias level statistics and linear drift over a series of frames.

    Parameters
    ----------
    time_s : numpy.ndarray
        Frame times ``(F,)``, s (e.g. from the first frame).
    frame_level : numpy.ndarray
        Per-frame level ``(F,)`` (the clipped mean of each bias frame), ADU.

    Returns
    -------
    BiasStability
        Frames with a non-finite time or level are ignored.

    Notes
    -----
    The drift is the ordinary-least-squares slope (``scipy.stats.linregress``)
    converted to ADU/hour; its error is the usual OLS standard error from the
    residual scatter, which assumes independent residuals.
    """
    t = np.asarray(time_s, dtype=np.float64).ravel()
    y = np.asarray(frame_level, dtype=np.float64).ravel()
    if t.shape != y.shape:
        raise ValueError(f"time_s and frame_level differ in shape: {t.shape} vs {y.shape}")
    good = np.isfinite(t) & np.isfinite(y)
    t = t[good]
    y = y[good]
    n = int(y.size)
    if n == 0:
        raise ValueError("no frame with a finite time and level")
    nan = float("nan")
    mean = float(y.mean())
    std = float(y.std(ddof=1)) if n > 1 else nan
    duration = float(t.max() - t.min())
    drift = drift_err = residual_std = nan
    if n >= 3 and duration > 0:
        fit = sps.linregress(t, y)
        drift = float(fit.slope) * 3600.0
        drift_err = float(fit.stderr) * 3600.0
        resid = y - (fit.intercept + fit.slope * t)
        residual_std = float(np.sqrt(np.sum(resid**2) / (n - 2)))
    return BiasStability(
        mean=mean,
        mean_err=std / math.sqrt(n) if n > 1 else nan,
        std=std,
        std_err=std / math.sqrt(2.0 * (n - 1)) if n > 1 else nan,
        peak_to_peak=float(y.max() - y.min()),
        drift=drift,
        drift_err=drift_err,
        residual_std=residual_std,
        n_frames=n,
        duration=duration,
    )


# ---------------------------------------------------------------------------
# row / column profiles
# ---------------------------------------------------------------------------


def row_column_profiles(master: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of a master bias (or dark) map.

    Parameters
    ----------
    master : numpy.ndarray
        Map ``(ny, nx)``, ADU; NaN marks pixels to ignore.

    Returns
    -------
    rows : numpy.ndarray
        ``(ny,)`` sigma-clipped mean of each row minus the global level, ADU.
    columns : numpy.ndarray
        ``(nx,)`` sigma-clipped mean of each column minus the global level, ADU.

    Notes
    -----
    Clipping: 3 sigma about the median, at most 5 iterations (astropy's
    ``sigma_clipped_stats`` rules, :func:`compute.stats.clipped_row_means`). The global level is
    the median of the clipped row means: it is insensitive to a few bad rows
    and, because each row mean already averages ``nx`` pixels, it has almost
    the precision of a clipped mean of the whole map at a fraction of the
    cost. Rows/columns with no finite pixel give NaN. Each pass sorts a copy
    of the map (the columns' a transposed one), one copy at a time.
    """
    m = np.asarray(master)
    if m.ndim != 2:
        raise ValueError(f"master must be 2-D, got shape {m.shape}")
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float64)
    # Each row (column) is sorted once, in a copy: the columns as the rows of the
    # transposed copy, then the rows (one float copy of the map at a time).
    cols = clipped_row_means(np.array(m.T, order="C"), sigma=_PROFILE_SIGMA,
                             maxiters=_PROFILE_MAXITERS, overwrite=True)
    rows = clipped_row_means(m, sigma=_PROFILE_SIGMA, maxiters=_PROFILE_MAXITERS)
    finite_rows = rows[np.isfinite(rows)]
    if finite_rows.size == 0:
        return np.full(m.shape[0], np.nan), np.full(m.shape[1], np.nan)
    level = float(np.median(finite_rows))
    return rows - level, cols - level


# ---------------------------------------------------------------------------
# DSNU (EMVA 1288 release 4.0 spatial variances)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DSNU:
    """Dark-signal nonuniformity split into row, column and pixel parts (1 sigma).

    Attributes
    ----------
    total, row, column, pixel : float
        Spatial standard deviations, ADU; ``total^2 = row^2 + column^2 + pixel^2``.
    total_err, row_err, column_err, pixel_err : float
        1-sigma errors (Gaussian approximations, see ``dsnu_emva``), ADU.
    total_e, row_e, column_e, pixel_e : float
        The same in e- (times the gain), NaN when no gain is given.
    gain : float
        Gain used, e-/ADU (NaN if none).
    temporal_var : float
        Per-pixel temporal variance of one frame used for the correction, ADU^2.
    n_frames : int
        Number of frames averaged into the map.
    ny, nx : int
        Map shape.
    """

    total: float
    row: float
    column: float
    pixel: float
    total_err: float
    row_err: float
    column_err: float
    pixel_err: float
    total_e: float
    row_e: float
    column_e: float
    pixel_e: float
    gain: float
    temporal_var: float
    n_frames: int
    ny: int
    nx: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as None)."""
        return _json(self)


def _sd_and_err(var: float, var_err: float) -> tuple[float, float]:
    """Standard deviation from a variance estimate (clipped at 0) and its error."""
    sd = math.sqrt(max(var, 0.0))
    err = var_err / (2.0 * sd) if sd > 0 else math.sqrt(max(var_err, 0.0))
    return sd, err


def dsnu_emva(
    master: np.ndarray,
    *,
    temporal_var: float,
    n_frames: int,
    gain: float | None = None,
) -> DSNU:
    """EMVA 1288 (release 4.0) spatial nonuniformity of an averaged dark/bias map.

    Parameters
    ----------
    master : numpy.ndarray
        Averaged map ``(M, N) = (ny, nx)`` of ``n_frames`` frames, ADU. Must be
        finite (EMVA uses every pixel).
    temporal_var : float
        Temporal variance of one frame (mean over pixels), ADU^2; the map still
        carries ``temporal_var / n_frames`` of it.
    n_frames : int
        Number of frames averaged (EMVA's L).
    gain : float, optional
        Gain g, e-/ADU, to express the results in e- (EMVA's DSNU in e- is
        ``s / K`` with ``K = 1 / g`` in DN/e-).

    Returns
    -------
    DSNU

    Notes
    -----
    With row means ``r_m``, column means ``c_n`` and grand mean ``mu`` of the
    map (the two-way analysis of variance used by EMVA 1288 release 4.0)::

        s2_col_stack = sum_n (c_n - mu)^2 / (N - 1)
        s2_row_stack = sum_m (r_m - mu)^2 / (M - 1)
        s2_pix_stack = sum_mn (y_mn - r_m - c_n + mu)^2 / ((M - 1)(N - 1))
        s2_col = s2_col_stack - s2_pix_stack / M
        s2_row = s2_row_stack - s2_pix_stack / N
        s2_pix = s2_pix_stack - temporal_var / L
        s2_total = s2_col + s2_row + s2_pix

    ``s2_pix_stack`` is unbiased for the pixel variance plus the residual
    temporal variance, whatever the row and column patterns; a column mean
    averages M pixels, so it carries ``s2_pix_stack / M``, hence the
    corrections. The sum of squared residuals is computed as
    ``SS_total - N * sum (r - mu)^2 - M * sum (c - mu)^2`` (an identity), in
    blocks of rows so that no float64 copy of the map is made.

    Errors are Gaussian approximations for the population variances:
    ``Var(s2_pix_stack) = 2 s2^2 / ((M-1)(N-1))``,
    ``Var(s2_row_stack) = 2 s2^2 / (M-1)`` (and likewise for columns), the
    corrections' errors propagated, and the total's the quadrature sum
    (covariances neglected); ``err(s) = err(s2) / (2 s)``. A master made by
    sigma-clipped averaging keeps slightly more than ``temporal_var / L``
    (about 3% more for 3-sigma clipping of Gaussian noise); pass an effective
    ``n_frames`` if that matters.
    """
    m = np.asarray(master)
    if m.ndim != 2:
        raise ValueError(f"master must be 2-D, got shape {m.shape}")
    ny, nx = m.shape
    if ny < 2 or nx < 2:
        raise ValueError("master must have at least 2 rows and 2 columns")
    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    if not np.isfinite(m).all():
        raise ValueError("master contains non-finite values; EMVA 1288 uses every pixel")
    row_means = m.mean(axis=1, dtype=np.float64)
    col_means = m.mean(axis=0, dtype=np.float64)
    mu = float(row_means.mean())
    ss_total = 0.0
    step = max(1, (1 << 20) // nx)
    for y0 in range(0, ny, step):
        d = m[y0 : y0 + step].astype(np.float64) - mu
        ss_total += float(np.einsum("ij,ij->", d, d))
    ss_row = float(np.sum((row_means - mu) ** 2))
    ss_col = float(np.sum((col_means - mu) ** 2))
    ss_res = max(ss_total - nx * ss_row - ny * ss_col, 0.0)

    dof_pix = (ny - 1) * (nx - 1)
    s2_pix_stack = ss_res / dof_pix
    s2_row_stack = ss_row / (ny - 1)
    s2_col_stack = ss_col / (nx - 1)
    resid_temporal = float(temporal_var) / n_frames
    s2_pix = s2_pix_stack - resid_temporal
    s2_row = s2_row_stack - s2_pix_stack / nx
    s2_col = s2_col_stack - s2_pix_stack / ny
    s2_tot = s2_pix + s2_row + s2_col

    var_pix_stack = 2.0 * s2_pix_stack**2 / dof_pix
    err2_pix = var_pix_stack
    err2_row = 2.0 * s2_row_stack**2 / (ny - 1) + var_pix_stack / nx**2
    err2_col = 2.0 * s2_col_stack**2 / (nx - 1) + var_pix_stack / ny**2
    err2_tot = err2_pix + err2_row + err2_col

    tot, tot_err = _sd_and_err(s2_tot, math.sqrt(err2_tot))
    row, row_err = _sd_and_err(s2_row, math.sqrt(err2_row))
    col, col_err = _sd_and_err(s2_col, math.sqrt(err2_col))
    pix, pix_err = _sd_and_err(s2_pix, math.sqrt(err2_pix))
    g = float("nan") if gain is None else float(gain)
    return DSNU(
        total=tot,
        row=row,
        column=col,
        pixel=pix,
        total_err=tot_err,
        row_err=row_err,
        column_err=col_err,
        pixel_err=pix_err,
        total_e=tot * g,
        row_e=row * g,
        column_e=col * g,
        pixel_e=pix * g,
        gain=g,
        temporal_var=float(temporal_var),
        n_frames=int(n_frames),
        ny=int(ny),
        nx=int(nx),
    )


# ---------------------------------------------------------------------------
# temporal row / column noise
# ---------------------------------------------------------------------------


def _line_noise(
    line_means: np.ndarray, pixel_var: float, n_pix: int
) -> tuple[float, float, float, float, float, int, int]:
    """Temporal noise of per-frame line means, corrected for pixel noise.

    Returns (noise, noise_err, measured_std, expected_from_pixels, ratio, F, n_lines).
    """
    a = np.asarray(line_means, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"line means must be 2-D (frames, lines), got shape {a.shape}")
    n_frames, n_lines = a.shape
    if n_frames < 2 or n_lines < 2:
        raise ValueError("need at least 2 frames and 2 lines")
    if not np.isfinite(a).all():
        raise ValueError("line means contain non-finite values")
    if n_pix < 1 or not pixel_var >= 0:
        raise ValueError("n_pix must be >= 1 and pixel_var >= 0")
    # remove the fixed line pattern (mean over frames) and each frame's level
    resid = a - a.mean(axis=0) - a.mean(axis=1, keepdims=True) + a.mean()
    dof = (n_frames - 1) * (n_lines - 1)
    measured_var = float(np.sum(resid**2)) / dof
    expected_var = float(pixel_var) / n_pix
    noise_var = measured_var - expected_var
    noise, noise_err = _sd_and_err(noise_var, measured_var * math.sqrt(2.0 / dof))
    ratio = noise / math.sqrt(pixel_var) if pixel_var > 0 else float("nan")
    return (
        noise,
        noise_err,
        math.sqrt(measured_var),
        math.sqrt(expected_var),
        ratio,
        n_frames,
        n_lines,
    )


@dataclass(frozen=True)
class RowNoise:
    """Temporal (frame-to-frame) row noise.

    Attributes
    ----------
    temporal_row_noise, temporal_row_noise_err : float
        Std of the per-frame row means after removing the fixed row pattern
        and each frame's level, with the pixel-noise contribution
        ``pixel_var / nx`` removed in quadrature, and its 1-sigma error, ADU.
    measured_std : float
        The same before the pixel-noise correction, ADU.
    expected_from_pixels : float
        ``sqrt(pixel_var / nx)``: the row-mean scatter that independent pixel
        noise alone would give, ADU.
    ratio_to_pixel_noise : float
        ``temporal_row_noise / sqrt(pixel_var)`` (row noise relative to the
        per-pixel read noise).
    n_frames, n_rows : int
    """

    temporal_row_noise: float
    temporal_row_noise_err: float
    measured_std: float
    expected_from_pixels: float
    ratio_to_pixel_noise: float
    n_frames: int
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as None)."""
        return _json(self)


@dataclass(frozen=True)
class ColumnNoise:
    """Temporal (frame-to-frame) column noise; fields as in `RowNoise`, per column."""

    temporal_column_noise: float
    temporal_column_noise_err: float
    measured_std: float
    expected_from_pixels: float
    ratio_to_pixel_noise: float
    n_frames: int
    n_columns: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as None)."""
        return _json(self)


def temporal_row_noise(row_means: np.ndarray, *, pixel_var: float, nx: int) -> RowNoise:
    """Temporal row noise from per-frame row means.

    Parameters
    ----------
    row_means : numpy.ndarray
        ``(F, ny)`` mean of each row of each frame, ADU.
    pixel_var : float
        Per-pixel temporal variance (mean over pixels, i.e. read noise^2), ADU^2.
    nx : int
        Number of pixels averaged into each row mean.

    Returns
    -------
    RowNoise

    Notes
    -----
    The residuals ``d_fm = R_fm - mean_f R_fm - mean_m R_fm + mean R`` remove
    the fixed row pattern and each frame's overall level (whose stability is
    reported by `bias_stability`); ``s2 = sum d^2 / ((F-1)(ny-1))`` is unbiased
    for ``sigma_row^2 + pixel_var / nx``, so
    ``sigma_row = sqrt(max(s2 - pixel_var / nx, 0))``. Error:
    ``err(s2) = s2 sqrt(2 / dof)`` (Gaussian), ``err(sigma) = err(s2) / (2 sigma)``.
    """
    vals = _line_noise(row_means, pixel_var, nx)
    return RowNoise(*vals)


def temporal_column_noise(col_means: np.ndarray, *, pixel_var: float, ny: int) -> ColumnNoise:
    """Temporal column noise from per-frame column means ``(F, nx)``, ADU.

    Same estimator as `temporal_row_noise` with the roles of rows and columns
    exchanged: ``ny`` is the number of pixels averaged into each column mean.
    """
    vals = _line_noise(col_means, pixel_var, ny)
    return ColumnNoise(*vals)
