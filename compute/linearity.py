"""Linearity of the signal with exposure time, the linearizer and per-pixel residuals.

The flat ladder is taken at constant illumination, so the ideal signal is
proportional to exposure time. A weighted straight line is fitted over the
levels between ``lo`` and ``hi`` of saturation; the residuals in percent of the
line are the nonlinearity (the reference study quotes the maximum above
3000 ADU). The linearizer is a polynomial ``P(S) = S + c2 S^2 + c3 S^3 ...``
(identity at low signal, as in LSST cp_pipe's polynomial linearizer) whose
coefficients are fitted so that ``P(S_obs)`` is exactly linear in exposure
time; its order is chosen by BIC.

Units: exposure time in s, signals in ADU (bias-subtracted), slope in ADU/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numba import njit, prange
from scipy.stats import f as f_dist

from sitiancal.compute.stats import weighted_line, weighted_line_block

__all__ = ["LinearityFit", "fit_linearity", "linearize", "pixel_linearity_residuals"]

#: Signal above which the reference study quotes its maximum nonlinearity (ADU).
_REF_NONLIN_FLOOR_ADU = 3000.0
#: Highest linearizer order tried (cp_pipe's polynomial linearizers use 2-3 for CMOS).
_MAX_LINEARIZER_ORDER = 3
#: False-alarm probability of the F-test that keeps a higher linearizer order
#: (a 3-sigma one-sided test).
_LINEARIZER_P = 0.0027


@dataclass(frozen=True)
class LinearityFit:
    """Linearity of the central-region signal.

    Attributes
    ----------
    slope, slope_err : float
        Signal rate and its 1-sigma error (ADU/s).
    intercept : float
        Signal at zero exposure (ADU).
    residual_pct : numpy.ndarray
        ``100 (S - fit) / fit`` per level (%), NaN where undefined.
    used : numpy.ndarray
        Boolean per level: used in the line fit.
    r2 : float
        Coefficient of determination of the line over the used levels.
    max_nonlinearity_pct : float
        Largest ``|residual_pct|`` over the used levels (%).
    max_nonlinearity_above_3000_pct : float
        Same over the used levels above 3000 ADU (%), NaN if there is none.
    linearizer : numpy.ndarray
        Polynomial coefficients, highest order first (``numpy.polyval``),
        mapping observed ADU to linearised ADU; ``[1, 0]`` when no correction
        is warranted.
    saturation_adu : float
        Saturation level the fit range refers to (ADU).
    """

    slope: float
    slope_err: float
    intercept: float
    residual_pct: np.ndarray
    used: np.ndarray
    r2: float
    max_nonlinearity_pct: float
    max_nonlinearity_above_3000_pct: float
    linearizer: np.ndarray
    saturation_adu: float

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "slope": num(self.slope),
            "slope_err": num(self.slope_err),
            "intercept": num(self.intercept),
            "residual_pct": [num(r) for r in self.residual_pct],
            "used": [bool(u) for u in self.used],
            "r2": num(self.r2),
            "max_nonlinearity_pct": num(self.max_nonlinearity_pct),
            "max_nonlinearity_above_3000_pct": num(self.max_nonlinearity_above_3000_pct),
            "linearizer": [float(c) for c in self.linearizer],
            "saturation_adu": num(self.saturation_adu),
        }


def _fit_linearizer(t: np.ndarray, s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Coefficients (highest first) of ``P(S) = S + sum_k c_k S^k`` making ``P(S_obs)`` linear in t.

    ``P(S_obs) = a t + b`` is linear in the unknowns ``(a, b, c_2..c_K)``:
    ``S_obs = a t + b - sum_k c_k S_obs^k`` is solved by weighted least squares
    (weights ``1/err``; signals scaled by their maximum for conditioning) for
    ``K = 1..3``. Each higher order is kept only while its term is
    significant: an F-test of the chi-square drop against the residual
    scatter (unknown scale, so errors that are under- or overestimated do not
    decide) at ``_LINEARIZER_P``. The BIC, ``n ln(chi2/n) + p ln n``, chose a
    term on noise one time in four with 11 levels (tested), and with a 2 %
    flickering lamp such a term biased the per-pixel gain by 1 %.
    """
    n = s.size
    scale = float(np.max(np.abs(s)))
    x = s / scale
    poly = np.array([1.0, 0.0])
    kept: tuple[float, int] | None = None  # chi-square and parameters of the kept order
    for order in range(1, _MAX_LINEARIZER_ORDER + 1):
        n_par = order + 1
        if n - n_par < 1:
            break
        cols = [t, np.ones_like(t)] + [-(x**k) for k in range(2, order + 1)]
        design = np.stack(cols, axis=1) / err[:, None]
        coef, *_ = np.linalg.lstsq(design, x / err, rcond=None)
        chi2 = float(np.sum((design @ coef - x / err) ** 2))
        if kept is not None:
            # the terms added since the kept order, together (a quartic-like
            # deficit may need the cubic term where the quadratic alone is weak)
            extra, dof = n_par - kept[1], n - n_par
            f_stat = ((kept[0] - chi2) / extra) / max(chi2 / dof, np.finfo(float).tiny)
            if not f_stat > float(f_dist.isf(_LINEARIZER_P, extra, dof)):
                continue
        # Back to ADU: P(S) = S + sum_k c_k' S^k / scale^(k-1).
        poly = np.zeros(order + 1)
        poly[-2] = 1.0
        for k in range(2, order + 1):
            poly[order - k] = coef[k] / scale ** (k - 1)
        kept = (chi2, n_par)
    return poly


def fit_linearity(
    exptime: np.ndarray,
    signal: np.ndarray,
    signal_err: np.ndarray,
    *,
    saturation: float,
    lo: float = 0.05,
    hi: float = 0.95,
) -> LinearityFit:
    """Weighted linear fit of signal vs exposure time, residuals and linearizer.

    Parameters
    ----------
    exptime : numpy.ndarray
        Exposure time per level (L,) (s).
    signal : numpy.ndarray
        Bias-subtracted mean signal of the central region per level (L,) (ADU).
    signal_err : numpy.ndarray
        1-sigma error of ``signal`` (L,) (ADU). Levels with a non-finite or
        non-positive error are not used, unless no level has one: then the fit
        is unweighted and the slope error comes from the residual scatter.
    saturation : float
        Saturation level (ADU), e.g. the PTC turnoff.
    lo, hi : float
        Fraction of ``saturation`` bounding the fitted levels (5-95 %).

    Returns
    -------
    LinearityFit
        Slope (ADU/s) with error, intercept (ADU), residuals (%), R^2, maximum
        nonlinearity (%) overall and above 3000 ADU, and the linearizer.

    Notes
    -----
    The slope error comes from the weights, scaled by ``sqrt(chi2_red)`` when
    the line does not describe the points within their errors (the usual case
    for a sensor with measurable nonlinearity). R^2 is the unweighted
    coefficient of determination over the used levels.
    """
    t = np.asarray(exptime, dtype=np.float64).ravel()
    s = np.asarray(signal, dtype=np.float64).ravel()
    e = np.asarray(signal_err, dtype=np.float64).ravel()
    if not t.shape == s.shape == e.shape:
        raise ValueError("exptime, signal and signal_err must have the same length")
    if not saturation > 0:
        raise ValueError("saturation must be positive")
    in_range = (s >= lo * saturation) & (s <= hi * saturation)
    has_err = np.isfinite(e) & (e > 0)
    known_err = bool((has_err & in_range & np.isfinite(t) & np.isfinite(s)).any())
    if not known_err:
        # No level has an error (e.g. one frame per level): unweighted fit, with the
        # error scale taken from the residual scatter below.
        e = np.ones_like(s)
        has_err = np.ones(s.shape, dtype=bool)
    finite = np.isfinite(t) & np.isfinite(s) & has_err
    used = finite & in_range
    if used.sum() < 3:
        raise ValueError(
            f"need at least 3 levels within {lo}-{hi} of saturation, got {int(used.sum())}"
        )

    (slope, icpt), cov = np.polyfit(t[used], s[used], 1, w=1.0 / e[used], cov="unscaled")
    model = slope * t + icpt
    chi2_red = float(np.sum(((s[used] - model[used]) / e[used]) ** 2) / (used.sum() - 2))
    scale = max(chi2_red, 1.0) if known_err else chi2_red
    slope_err = float(np.sqrt(cov[0, 0] * scale))

    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.where(finite & (model > 0), 100.0 * (s - model) / model, np.nan)
    ss_res = float(np.sum((s[used] - model[used]) ** 2))
    ss_tot = float(np.sum((s[used] - s[used].mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    abs_res = np.abs(residual)
    max_nl = float(np.nanmax(np.where(used, abs_res, np.nan)))
    above = used & (s > _REF_NONLIN_FLOOR_ADU) & np.isfinite(abs_res)
    max_nl_3000 = float(np.max(abs_res[above])) if above.any() else float("nan")

    lin_pts = finite & (s > 0) & (s <= hi * saturation)
    linearizer = _fit_linearizer(t[lin_pts], s[lin_pts], e[lin_pts])

    return LinearityFit(
        slope=float(slope),
        slope_err=slope_err,
        intercept=float(icpt),
        residual_pct=residual,
        used=used,
        r2=r2,
        max_nonlinearity_pct=max_nl,
        max_nonlinearity_above_3000_pct=max_nl_3000,
        linearizer=linearizer,
        saturation_adu=float(saturation),
    )


def linearize(signal: np.ndarray, linearizer: np.ndarray) -> np.ndarray:
    """Apply a linearizer to observed signals.

    Parameters
    ----------
    signal : numpy.ndarray
        Observed, bias-subtracted signal (ADU), any shape.
    linearizer : numpy.ndarray
        Polynomial coefficients, highest first (``LinearityFit.linearizer``).

    Returns
    -------
    numpy.ndarray
        Linearised signal (ADU), float64, same shape.
    """
    return np.polyval(
        np.asarray(linearizer, dtype=np.float64), np.asarray(signal, dtype=np.float64)
    )


def pixel_linearity_residuals(
    exptime: np.ndarray,
    mean: np.ndarray,
    *,
    used: np.ndarray,
    at: np.ndarray,
    backend: Literal["auto", "numba", "numpy"] = "auto",
) -> np.ndarray:
    """Per-pixel residuals from each pixel's own straight line, at a few levels.

    Parameters
    ----------
    exptime : numpy.ndarray
        Exposure time per level (L,) (s).
    mean : numpy.ndarray
        ``(..., L)`` bias-subtracted temporal mean per pixel and level (ADU);
        NaN marks a missing value.
    used : numpy.ndarray
        Boolean (L,): levels that enter each pixel's line fit.
    at : numpy.ndarray
        Integer indices (K,) of the levels where residuals are reported (they
        need not be used in the fit).
    backend : {"auto", "numba", "numpy"}
        ``"numba"`` (and ``"auto"``): compiled, SIMD over blocks of pixels and
        parallel over blocks, float32 means widened per value (no float64 copy);
        ``"numpy"``: the vectorised reference. They agree to float64 rounding.

    Returns
    -------
    numpy.ndarray
        ``(..., K)`` residuals ``100 (m - fit) / fit`` (%), float64; NaN for a
        pixel with fewer than 3 usable levels or a non-positive fitted value.

    Notes
    -----
    Each pixel's line is a closed-form weighted least-squares fit with the
    same weights for every pixel, ``1 / t``: at constant illumination the
    shot-noise variance of a temporal mean is proportional to the exposure
    time. The weights do not correlate with a pixel's own fluctuations and do
    not depend on which other pixels are fitted (tiling-invariant).
    """
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    t = np.asarray(exptime, dtype=np.float64).ravel()
    m = np.asarray(mean)
    use = np.asarray(used, dtype=bool).ravel()
    idx = np.asarray(at, dtype=np.intp).ravel()
    if m.shape[-1] != t.size or use.size != t.size:
        raise ValueError("mean's last axis, exptime and used must have the same length")
    if idx.size and (idx.min() < -t.size or idx.max() >= t.size):
        raise IndexError(f"level index out of range for {t.size} levels")
    if backend != "numpy":
        if m.dtype not in (np.float32, np.float64):
            m = m.astype(np.float64)
        rows = m.reshape(-1, t.size)  # a view where the layout allows: the kernel takes strided rows
        res = _residual_kernel(t, rows, use, np.where(idx < 0, idx + t.size, idx))
        return res.T.reshape((*m.shape[:-1], idx.size))  # a view of the (K, P) result
    m = m.astype(np.float64)
    flat = m.reshape(-1, t.size)
    valid = use[None, :] & np.isfinite(flat)
    # At constant illumination the signal, hence the shot-noise variance of a
    # temporal mean, is proportional to the exposure time.
    w_level = np.where(t > 0, 1.0 / np.where(t > 0, t, 1.0), 0.0)
    w = np.where(valid, w_level[None, :], 0.0)
    y = np.where(valid, flat, 0.0)
    x = np.broadcast_to(t, flat.shape)

    slope, icpt, _, _, det = weighted_line(x, y, w)
    n_valid = (w > 0).sum(axis=1)
    ok = (n_valid >= 3) & (det > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = slope[:, None] * t[idx][None, :] + icpt[:, None]
        res = 100.0 * (flat[:, idx] - fit) / fit
    res = np.where(ok[:, None] & (fit > 0), res, np.nan)
    return res.reshape((*m.shape[:-1], idx.size))


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _residual_kernel(t, mean, use, idx):  # pragma: no cover - compiled
    """The numpy path of :func:`pixel_linearity_residuals` for every row of ``mean`` (P, L).

    Returns the residuals as (K, P). Vectorised over blocks of pixels: each
    level's values of a block are loaded into (L, block) rows (a contiguous
    read from the tile pass's level-major maps), the lines are
    :func:`compute.stats.weighted_line_block` (each pixel's sums over its
    levels in the order of ``weighted_line_point``: the same floats as one
    pixel at a time) and each reported level is one loop over the block.
    The scratch rows are allocated per chunk of blocks.
    """
    n_pix, n_lev = mean.shape
    n_at = idx.shape[0]
    out = np.empty((n_at, n_pix))
    block = 256
    n_blocks = (n_pix + block - 1) // block
    per_chunk = 16
    n_chunks = (n_blocks + per_chunk - 1) // per_chunk
    w_level = np.empty(n_lev)
    for j in range(n_lev):
        w_level[j] = 1.0 / t[j] if t[j] > 0 else 0.0
    for ci in prange(n_chunks):
        x = np.empty((n_lev, block))
        y = np.empty((n_lev, block))
        w = np.empty((n_lev, block))
        sums = np.empty((5, block))
        slope = np.empty(block)
        icpt = np.empty(block)
        var_slope = np.empty(block)
        det = np.empty(block)
        n_valid = np.empty(block, np.int64)
        for j in range(n_lev):  # the same exposure times for every pixel
            for i in range(block):
                x[j, i] = t[j]
        for bi in range(ci * per_chunk, min(n_blocks, (ci + 1) * per_chunk)):
            p0 = bi * block
            nb = min(n_pix, p0 + block) - p0
            for i in range(nb):
                n_valid[i] = 0
            for j in range(n_lev):
                uj = use[j]
                wl = w_level[j]
                counts = wl > 0
                src = mean[p0:p0 + nb, j]
                for i in range(nb):
                    v = np.float64(src[i])
                    ok = uj & np.isfinite(v)
                    w[j, i] = wl if ok else 0.0
                    y[j, i] = v if ok else 0.0
                    n_valid[i] += 1 if ok & counts else 0
            weighted_line_block(x, y, w, nb, sums, slope, icpt, var_slope, det)
            for k in range(n_at):
                tk = t[idx[k]]
                src = mean[p0:p0 + nb, idx[k]]
                dst = out[k, p0:p0 + nb]
                for i in range(nb):
                    fit = slope[i] * tk + icpt[i]
                    good = (n_valid[i] >= 3) & (det[i] > 0) & (fit > 0)
                    dst[i] = 100.0 * (np.float64(src[i]) - fit) / fit if good else np.nan
    return out
