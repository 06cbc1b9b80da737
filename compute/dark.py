"""Per-pixel dark current: rate fit, pixel populations and summary figures.

The dark rate of a pixel is the slope of its group-mean signal (raw ADU,
bias included) against exposure time; bias frames enter as the ``t = 0``
group. The fit is a per-pixel weighted least-squares line, vectorised over
pixels, whose weights come from a *variance model* rather than from each
group's own sample variance: with 5 frames per group a sample variance has
4 degrees of freedom (63 % relative scatter), and ``1 / s^2`` weights both
mis-weight the points and make the error of the slope far too small
(``E[1/s^2] = 2 / sigma^2`` for 4 degrees of freedom).

Variance model
--------------
For a pixel with read variance ``a`` (ADU^2) and dark signal ``r t`` (ADU)
the temporal variance of one frame is ``a + b t`` with ``b = r / g >= 0``
(dark shot noise, ``g`` in e-/ADU). ``(a, b)`` are fitted per pixel to the
group sample variances by iteratively reweighted least squares with
``Var(s_k^2) = 2 (a + b t_k)^2 / (n_k - 1)`` (the quasi-likelihood fit of a
scaled chi-square variable), subject to ``b >= 0``. The variance of the
group mean ``k`` is then ``(a + b t_k) / n_k``. The slope error follows
from this model; pulls ``(rate - truth) / rate_err`` are Student-t like
with about ``sum(n_k - 1) - 2`` degrees of freedom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit, prange

from sitiancal.compute.mixture import MixtureFit, fit_mixture
from sitiancal.compute.summary import (
    MAD_TO_SIGMA,
    count_above,
    finite_median,
    finite_values,
    grouped_median,
    mean_std,
    median,
    quantiles,
)

__all__ = ["DarkRateFit", "common_mode_rate_err", "dark_populations", "dark_summary",
           "fit_dark_rate"]

#: Smallest per-frame variance of the model (ADU^2): the variance of the
#: rounding of a continuous signal to integer ADU (uniform, 1/12).
VAR_FLOOR_ADU2 = 1.0 / 12.0
#: IRLS passes of the variance model.
_VAR_ITERATIONS = 4


@dataclass(frozen=True)
class DarkRateFit:
    """Per-pixel dark-rate fit (arrays have the input's pixel shape).

    Attributes
    ----------
    rate, rate_err : ndarray
        Dark rate and its 1-sigma error (ADU/s).
    offset, offset_err : ndarray
        Intercept at ``t = 0`` (bias level, ADU) and its error.
    chi2_red : ndarray
        Reduced chi-square of the line against the variance model
        (NaN with fewer than 3 groups).
    n_points : ndarray of int
        Number of groups used per pixel.
    read_var, shot_slope : ndarray
        Fitted variance model ``a`` (ADU^2) and ``b`` (ADU^2/s).
    """

    rate: np.ndarray
    rate_err: np.ndarray
    offset: np.ndarray
    offset_err: np.ndarray
    chi2_red: np.ndarray
    n_points: np.ndarray
    read_var: np.ndarray | None = None
    shot_slope: np.ndarray | None = None

    def to_dict(self) -> dict:
        """Scalar summary (medians over finite pixels)."""

        def _med(a: np.ndarray | None) -> float | None:
            if a is None:
                return None
            a = np.asarray(a, dtype=np.float64)
            a = a[np.isfinite(a)]
            return float(np.median(a)) if a.size else None

        return {"median_rate_adu_s": _med(self.rate), "median_rate_err_adu_s": _med(self.rate_err),
                "median_offset_adu": _med(self.offset), "median_chi2_red": _med(self.chi2_red),
                "max_n_points": int(np.max(self.n_points)) if np.size(self.n_points) else 0}


def _wls_line(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted straight line ``y = c0 + c1 t`` along the last axis.

    Returns ``(c0, c1, var_c0, var_c1, sum_w)``; weights are inverse
    variances (0 removes a point). Degenerate pixels give NaN.
    """
    sw = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tm = (w * t).sum(axis=-1) / sw
        dt = t - tm[..., None]
        stt = (w * dt * dt).sum(axis=-1)
        ym = (w * y).sum(axis=-1) / sw
        c1 = (w * dt * y).sum(axis=-1) / stt
        c0 = ym - c1 * tm
        var_c1 = 1.0 / stt
        var_c0 = 1.0 / sw + tm * tm / stt
    bad = ~(stt > 0) | ~(sw > 0)
    for a in (c0, c1, var_c0, var_c1):
        a[bad] = np.nan
    return c0, c1, var_c0, var_c1, sw


def _variance_model(t: np.ndarray, s2: np.ndarray, dof: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel ``var = a + b t`` (``b >= 0``) fitted to sample variances by IRLS.

    Parameters
    ----------
    t : ndarray (..., K)
        Exposure times (s).
    s2 : ndarray (..., K)
        Unbiased sample variances (ADU^2); NaN where unusable.
    dof : ndarray (..., K)
        Degrees of freedom ``n_k - 1`` (0 where unusable).
    """
    ok = np.isfinite(s2) & (dof > 0)
    s2 = np.where(ok, s2, 0.0)
    dof = np.where(ok, dof, 0.0)
    model = np.ones_like(s2)
    a = b = np.zeros(s2.shape[:-1])
    for _ in range(_VAR_ITERATIONS):
        # Var(s^2) = 2 model^2 / dof  ->  weight dof / model^2 (constant 1/2 drops out)
        w = dof / model**2
        a, b, _, _, sw = _wls_line(t, s2, w)
        # constrained solution when b < 0 (or undetermined): b = 0, a = weighted mean
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_w = (w * s2).sum(axis=-1) / sw
        flat = ~(b >= 0)
        a = np.where(flat, mean_w, a)
        b = np.where(flat, 0.0, b)
        a = np.maximum(np.nan_to_num(a, nan=VAR_FLOOR_ADU2), VAR_FLOOR_ADU2)
        model = a[..., None] + b[..., None] * t
    return a, b


def fit_dark_rate(exptime: np.ndarray, mean: np.ndarray, var: np.ndarray,
                  n: np.ndarray, *,
                  backend: Literal["auto", "numba", "numpy"] = "auto") -> DarkRateFit:
    """Per-pixel dark rate by weighted least squares of group means on exposure time.

    Parameters
    ----------
    exptime : ndarray (K,)
        Exposure time of each group (s); bias frames are the ``t = 0`` group.
    mean : ndarray (..., K)
        Per-pixel temporal mean of each group (raw ADU, bias included).
    var : ndarray (..., K)
        Per-pixel unbiased temporal sample variance of each group (ADU^2).
    n : ndarray (K,) or (..., K)
        Number of frames in each group.
    backend : {"auto", "numba", "numpy"}
        ``"numba"`` (and ``"auto"``): one compiled pass per pixel, parallel
        over pixels, no temporaries beyond the outputs; ``"numpy"``: the
        vectorised reference. Both compute the same formulas and agree to
        float64 rounding.

    Returns
    -------
    DarkRateFit
        Rate (ADU/s), offset (ADU), their 1-sigma errors from the variance
        model, reduced chi-square and the number of groups used.

    Notes
    -----
    Groups with a non-finite mean or ``n < 1`` are left out per pixel;
    groups with ``n < 2`` or a non-finite variance do not enter the
    variance model. At least two distinct exposure times are needed.
    float32 inputs are widened per value inside the kernel (no float64 copy).
    """
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    t = np.asarray(exptime, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError("exptime must be 1-D (one time per group)")
    y_in = np.asarray(mean)
    s2_in = np.asarray(var)
    if y_in.shape[-1] != t.size or s2_in.shape != y_in.shape:
        raise ValueError(f"mean {y_in.shape} and var {s2_in.shape} must end with the {t.size} groups")
    if np.unique(t).size < 2:
        raise ValueError("the dark rate needs at least two distinct exposure times")
    if backend == "numpy":
        return _fit_dark_rate_numpy(t, y_in.astype(np.float64), s2_in.astype(np.float64), n)
    lead = y_in.shape[:-1]
    k = t.size
    y2 = _float_rows(y_in, k)
    s22 = _float_rows(s2_in, k)
    n_arr = np.asarray(n, dtype=np.float64)
    if n_arr.ndim <= 1:
        n2 = np.ascontiguousarray(np.broadcast_to(n_arr, (k,))).reshape(1, k)
    else:
        n2 = np.ascontiguousarray(np.broadcast_to(n_arr, y_in.shape)).reshape(-1, k)
    out = _dark_fit_kernel(t, y2, s22, n2, float(VAR_FLOOR_ADU2), _VAR_ITERATIONS)
    rate, rate_err, offset, offset_err, chi2_red, read_var, shot_slope, n_pts = out
    return DarkRateFit(rate=rate.reshape(lead), rate_err=rate_err.reshape(lead),
                       offset=offset.reshape(lead), offset_err=offset_err.reshape(lead),
                       chi2_red=chi2_red.reshape(lead), n_points=n_pts.reshape(lead),
                       read_var=read_var.reshape(lead), shot_slope=shot_slope.reshape(lead))


def _float_rows(a: np.ndarray, k: int) -> np.ndarray:
    """``(..., K)`` as a ``(P, K)`` float32/float64 array (a view when the layout allows; the kernels take strided input)."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a.reshape(-1, k)


def _fit_dark_rate_numpy(t: np.ndarray, y: np.ndarray, s2: np.ndarray, n: np.ndarray) -> DarkRateFit:
    """Reference: the fit vectorised over pixels with numpy (float64 temporaries)."""
    nk = np.broadcast_to(np.asarray(n, dtype=np.float64), y.shape)
    use = np.isfinite(y) & (nk >= 1)
    a, b = _variance_model(t, np.where(use, s2, np.nan), np.where(use, nk - 1.0, 0.0))
    model = a[..., None] + b[..., None] * t  # per-frame variance (ADU^2)
    w = np.where(use, nk / model, 0.0)  # inverse variance of the group mean
    y0 = np.where(use, y, 0.0)
    offset, rate, var_off, var_rate, _ = _wls_line(t, y0, w)
    n_pts = use.sum(axis=-1)
    with np.errstate(invalid="ignore"):
        resid = y0 - (offset[..., None] + rate[..., None] * t)
        chi2 = (w * resid * resid).sum(axis=-1)
        dof = n_pts - 2
        chi2_red = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)
    return DarkRateFit(rate=rate, rate_err=np.sqrt(var_rate), offset=offset,
                       offset_err=np.sqrt(var_off), chi2_red=chi2_red,
                       n_points=n_pts.astype(np.int32), read_var=a, shot_slope=b)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _wls_block(t, y, w, nb, sw, tm, stt, c0, c1, v0, v1):  # pragma: no cover - compiled
    """:func:`_wls_line` of ``nb`` pixels at once: ``y``, ``w`` are (K, block) rows.

    Every step is a loop over the block's pixels inside a loop over the K
    points (SIMD over pixels); each pixel's sums run over the points in the
    same order as the scalar formula, so the results do not depend on the
    blocking. Fills ``sw`` (sum of weights), ``tm`` (weighted mean time), ``stt``,
    and the line ``c0 + c1 t`` with variances ``v0``, ``v1`` (NaN when degenerate).
    """
    k = t.shape[0]
    for i in range(nb):
        sw[i] = 0.0
        tm[i] = 0.0  # sum w t, then the mean
        c0[i] = 0.0  # sum w y, then the intercept
        stt[i] = 0.0
        c1[i] = 0.0  # sum w (t - tm) y, then the slope
    for j in range(k):
        tj = t[j]
        for i in range(nb):
            sw[i] += w[j, i]
            tm[i] += w[j, i] * tj
            c0[i] += w[j, i] * y[j, i]
    for i in range(nb):
        tm[i] = tm[i] / sw[i]
    for j in range(k):
        tj = t[j]
        for i in range(nb):
            dt = tj - tm[i]
            stt[i] += w[j, i] * dt * dt
            c1[i] += w[j, i] * dt * y[j, i]
    for i in range(nb):
        ym = c0[i] / sw[i]
        slope = c1[i] / stt[i]
        ok = (stt[i] > 0) & (sw[i] > 0)
        c1[i] = slope if ok else np.nan
        c0[i] = ym - slope * tm[i] if ok else np.nan
        v1[i] = 1.0 / stt[i] if ok else np.nan
        v0[i] = 1.0 / sw[i] + tm[i] * tm[i] / stt[i] if ok else np.nan


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _dark_fit_kernel(t, y, s2, n, floor, n_iter):  # pragma: no cover - compiled
    """:func:`_fit_dark_rate_numpy` for every row of ``y``/``s2`` (P, K).

    Vectorised over blocks of pixels (loops over a block's pixels inside
    loops over the K groups, see :func:`_wls_block`, the loads and the sums
    over groups included: 1.5x faster than per pixel); each pixel's numbers
    are those of the scalar formulas in the same order. ``y`` and ``s2`` may
    be strided views of (K, P) arrays: the inner loops then read contiguous rows.
    """
    n_pix, k = y.shape
    rate = np.empty(n_pix)
    rate_err = np.empty(n_pix)
    offset = np.empty(n_pix)
    offset_err = np.empty(n_pix)
    chi2_red = np.empty(n_pix)
    read_var = np.empty(n_pix)
    shot = np.empty(n_pix)
    n_pts = np.empty(n_pix, np.int32)
    block = 512
    n_blocks = (n_pix + block - 1) // block
    big = np.finfo(np.float64).max
    per_pixel_n = n.shape[0] > 1
    for bi in prange(n_blocks):
        p0 = bi * block
        nb = min(n_pix, p0 + block) - p0
        yy = np.empty((k, block))
        ss = np.empty((k, block))
        dof = np.empty((k, block))
        nn = np.empty((k, block))
        w = np.empty((k, block))
        use = np.empty((k, block), np.bool_)
        npt = np.zeros(block, np.int32)
        a = np.zeros(block)
        b = np.zeros(block)
        sw = np.empty(block)
        tm = np.empty(block)
        stt = np.empty(block)
        c0 = np.empty(block)
        c1 = np.empty(block)
        v0 = np.empty(block)
        v1 = np.empty(block)
        swy = np.empty(block)
        for j in range(k):
            if per_pixel_n:
                for i in range(nb):
                    nn[j, i] = n[p0 + i, j]
            else:
                for i in range(nb):
                    nn[j, i] = n[0, j]
            src_y = y[p0:p0 + nb, j]
            src_s = s2[p0:p0 + nb, j]
            for i in range(nb):
                nv = nn[j, i]
                yv = np.float64(src_y[i])
                sv = np.float64(src_s[i])
                # finite mean, n >= 1; finite variance and n > 1 (comparisons false for NaN)
                u = (np.abs(yv) < np.inf) & (nv >= 1.0)
                ok = u & (np.abs(sv) < np.inf) & (nv - 1.0 > 0)
                use[j, i] = u
                yy[j, i] = yv if u else 0.0
                ss[j, i] = sv if ok else 0.0
                dof[j, i] = nv - 1.0 if ok else 0.0
                npt[i] += 1 if u else 0
        # variance model a + b t, b >= 0, by IRLS (see _variance_model)
        for it in range(n_iter):
            for j in range(k):
                tj = t[j]
                for i in range(nb):
                    mdl = a[i] + b[i] * tj
                    w[j, i] = dof[j, i] / (mdl * mdl) if it > 0 else dof[j, i]  # model 1 first
            _wls_block(t, ss, w, nb, sw, tm, stt, c0, c1, v0, v1)
            for i in range(nb):
                swy[i] = 0.0
            for j in range(k):
                for i in range(nb):
                    swy[i] += w[j, i] * ss[j, i]
            for i in range(nb):
                # c0 = a, c1 = b; the constrained solution b = 0, a = weighted mean when b < 0
                ai = c0[i]
                bi_ = c1[i]
                if not (bi_ >= 0):
                    ai = swy[i] / sw[i]
                    bi_ = 0.0
                if np.isnan(ai):
                    ai = floor
                elif ai > big:
                    ai = big
                if ai < floor:
                    ai = floor
                a[i] = ai
                b[i] = bi_
        for j in range(k):
            tj = t[j]
            for i in range(nb):
                w[j, i] = nn[j, i] / (a[i] + b[i] * tj) if use[j, i] else 0.0
        _wls_block(t, yy, w, nb, sw, tm, stt, c0, c1, v0, v1)
        chi = swy
        for i in range(nb):
            chi[i] = 0.0
        for j in range(k):
            tj = t[j]
            for i in range(nb):
                r = yy[j, i] - (c0[i] + c1[i] * tj)
                chi[i] += w[j, i] * r * r
        for i in range(nb):
            chi2 = chi[i]
            p = p0 + i
            rate[p] = c1[i]
            rate_err[p] = np.sqrt(v1[i])
            offset[p] = c0[i]
            offset_err[p] = np.sqrt(v0[i])
            chi2_red[p] = chi2 / (npt[i] - 2) if npt[i] > 2 else np.nan
            read_var[p] = a[i]
            shot[p] = b[i]
            n_pts[p] = npt[i]
    return rate, rate_err, offset, offset_err, chi2_red, read_var, shot, n_pts


def dark_populations(rate_e: np.ndarray, rate_err_e: np.ndarray, *, max_components: int = 4,
                     seed: int = 0) -> MixtureFit:
    """Deconvolved mixture of the dark-rate populations (e-/s).

    Parameters
    ----------
    rate_e, rate_err_e : ndarray
        Per-pixel dark rate and 1-sigma error (e-/s); pixels with a
        non-finite value or a non-positive error are left out.
    max_components : int
        Largest number of components tried (BIC chooses).
    seed : int
        Seed of the subsample and initialisations.
    """
    r = np.asarray(rate_e, dtype=np.float64).ravel()
    e = np.asarray(rate_err_e, dtype=np.float64).ravel()
    ok = np.isfinite(r) & np.isfinite(e) & (e > 0)
    return fit_mixture(r[ok], e[ok], max_components=max_components, seed=seed)


def common_mode_rate_err(exptime: np.ndarray, n_frames: np.ndarray,
                         frame_std: float | np.ndarray) -> float:
    """Error of a map-wide dark rate from noise common to all pixels of a frame (ADU/s).

    A frame's level moves as a whole (white bias drift, the average of its
    temporal row noise, the sensor temperature's jitter scaling a dark's
    whole signal): the map's median rate moves with the levels of the few
    frames it comes from, whatever the number of pixels. With a level
    scatter ``s_k`` per frame of group ``k`` (``n_k`` frames at exposure time
    ``t_k``), the rate (the slope through the group means, weighted by frame
    count) has the error ``sqrt(sum_k n_k (t_k - tbar)^2 s_k^2) / L``, with
    ``L = sum_k n_k (t_k - tbar)^2`` and ``tbar`` the frame-weighted mean
    time; ``s / sqrt(L)`` for one scatter ``s``.

    Parameters
    ----------
    exptime : ndarray
        Exposure time of each group (s); the bias frames are the 0 s group.
    n_frames : ndarray
        Frames per group.
    frame_std : float or ndarray
        Scatter of a frame's level (ADU): one for all groups, or one per group.

    Returns
    -------
    float
        1-sigma error (ADU/s); NaN without two distinct times or with a
        non-finite scatter where it counts.
    """
    t = np.asarray(exptime, dtype=np.float64)
    n = np.asarray(n_frames, dtype=np.float64)
    s = np.broadcast_to(np.asarray(frame_std, dtype=np.float64), t.shape)
    if t.size < 2 or n.sum() <= 0:
        return float("nan")
    tbar = float(np.dot(n, t) / n.sum())
    arm = n * (t - tbar) ** 2
    lever = float(arm.sum())
    if lever <= 0:
        return float("nan")
    return float(np.sqrt(np.dot(arm, s**2))) / lever


#: Default dark-rate thresholds of :func:`dark_summary` (e-/s).
SUMMARY_THRESHOLDS_E = (0.01, 0.1, 1.0)
_PERCENTILES = (0.1, 1.0, 5.0, 16.0, 50.0, 84.0, 95.0, 99.0, 99.9)


def dark_summary(rate_e: np.ndarray, rate_err_e: np.ndarray, *, temperature: float | None,
                 thresholds: tuple[float, ...] = SUMMARY_THRESHOLDS_E,
                 common_err: float | None = None) -> dict:
    """Scalar figures of a dark-rate map (e-/s) at the sensor temperature.

    Parameters
    ----------
    rate_e, rate_err_e : ndarray
        Per-pixel dark rate and its 1-sigma error (e-/s).
    temperature : float or None
        Sensor temperature of the dark frames (deg C).
    thresholds : tuple of float
        Rates (e-/s) for the fractions of pixels above them.
    common_err : float, optional
        Error of the map-wide rate from noise common to whole frames (e-/s,
        :func:`common_mode_rate_err`), added in quadrature to ``median_err``
        and ``mean_err`` (the order statistics and ``std / sqrt(N)`` count
        only the pixels' own noise, which a million pixels average away; the
        frames' common noise they do not).

    Returns
    -------
    dict
        ``median`` (interpolated within its grid cell where the rates take
        few distinct values, :func:`~sitiancal.compute.summary.grouped_median`;
        ``median_tied`` rates equal to the plain median, 0 where no tie
        reaches the ranks ``N/2 -+ sqrt(N)/2``) with ``median_err`` from the
        distribution-free order statistic interval (those ranks bracket the
        median with 68 % binomial probability; half their distance is the
        1-sigma error; the asymptotic error of a median where rates are
        tied), ``mean`` and ``mean_err`` (``std / sqrt(N)``, with
        ``common_err`` in quadrature), ``robust_sigma`` (1.4826 MAD),
        ``median_pixel_err``, percentiles, ``frac_above`` per threshold,
        ``n_pixels``, ``temperature_c``.

    Notes
    -----
    The median is that of the measured rates. Where a pixel's error is not
    small against the width of the population (0 C darks of a few minutes:
    ``median_pixel_err`` ~2x the population's width), the noise moves the
    median of a skewed (log-normal) population towards its mean, beyond
    ``median_err``: +3.0 % on a simulated 300-frame set whose truth is
    known (0.0020839 against 0.0020227 e-/s; measured). Neither a
    deconvolved mixture nor extrapolating the median to zero noise
    (SIMEX) recovers it reliably there (the mixture's own prediction of the
    measured median missed it by 2 %; SIMEX recovered at most a fifth of
    the shift): the population's median is not determined by such data
    without a model of its shape. The mean is not moved by noise of zero
    mean: ``mean`` (hot pixels included, as EMVA 1288's dark current, the
    slope of the mean dark signal over exposure time) is the figure to
    compare across cameras and with a simulator's truth (-0.8 sigma there).
    """
    # One float32 copy of the finite rates (for a float32 map), partitioned in
    # place: a 61 MP map needs no float64 copy (compute.summary).
    r = finite_values(rate_e)
    n = int(r.size)
    out: dict = {"units": "e-/s", "n_pixels": n,
                 "temperature_c": None if temperature is None else float(temperature),
                 "median_err_method": "order-statistic (binomial) 68% interval, half width"}
    if n == 0:
        return out | {"median": None, "median_err": None, "mean": None, "mean_err": None,
                      "robust_sigma": None, "median_pixel_err": None, "percentiles": {},
                      "frac_above": {}}
    above = count_above(r, [r.dtype.type(thr) for thr in thresholds])
    frac_above = {f"{thr:g}": float(c) / n for thr, c in zip(thresholds, above, strict=True)}
    mean, std = mean_std(r)
    half = 0.5 / np.sqrt(n)
    qs = [max(0.5 - half, 0.0), 0.5, min(0.5 + half, 1.0)] + [p / 100.0 for p in _PERCENTILES]
    lo, med, hi, *pct = quantiles(r, qs)
    # rates from a few integer frames come on a grid: the median within its cell
    # (ties large enough to matter reach the ranks N/2 -+ sqrt(N)/2; a scan of
    # the map for them is skipped otherwise)
    n_tied = 0
    if lo == med or hi == med:
        med, n_tied = grouped_median(r, med)
    robust_sigma = MAD_TO_SIGMA * median(
        np.abs(np.subtract(r, r.dtype.type(med), out=r), out=r))
    del r
    # the median of the finite errors, selected over the map itself (no copy)
    median_pixel_err = finite_median(rate_err_e)
    if not np.isfinite(median_pixel_err):
        median_pixel_err = None
    median_err = float(0.5 * (hi - lo))
    if median_err <= 0.0 or n_tied > 2:
        # Rates from means of a few integer frames are discrete: with millions of
        # pixels the 68% rank interval can fall inside one tie (or span one grid
        # step). Use the asymptotic error of a median instead (sqrt(pi/2) sigma
        # / sqrt(N)).
        median_err = 1.2533 * robust_sigma / np.sqrt(n)
        out["median_err_method"] = "asymptotic 1.2533 * robust sigma / sqrt(N) (tied ranks)"
    mean_err = float(std / np.sqrt(n)) if n > 1 else None
    if common_err is not None and np.isfinite(common_err):
        out["median_err_pixels"] = median_err
        out["median_err_common"] = float(common_err)
        median_err = float(np.hypot(median_err, common_err))
        out["median_err_method"] += " + frame-common noise in quadrature"
        if mean_err is not None:
            out["mean_err_pixels"] = mean_err
            mean_err = float(np.hypot(mean_err, common_err))
    out |= {
        "median": float(med),
        "median_err": median_err,
        "median_tied": n_tied,
        "mean": mean,
        "mean_err": mean_err,
        "robust_sigma": robust_sigma,
        "median_pixel_err": median_pixel_err,
        "percentiles": {f"p{p:g}": float(v) for p, v in zip(_PERCENTILES, pct, strict=True)},
        "frac_above": frac_above,
    }
    return out
