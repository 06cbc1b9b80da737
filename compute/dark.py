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
    finite_values,
    mean_std,
    median,
    quantiles,
)

__all__ = ["DarkRateFit", "dark_populations", "dark_summary", "fit_dark_rate"]

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
def _wls_point(t, y, w):  # pragma: no cover - compiled
    """Scalar :func:`_wls_line` of one pixel: ``(c0, c1, var_c0, var_c1, sum_w)``."""
    k = t.shape[0]
    sw = 0.0
    swt = 0.0
    swy = 0.0
    for j in range(k):
        sw += w[j]
        swt += w[j] * t[j]
        swy += w[j] * y[j]
    tm = swt / sw
    stt = 0.0
    sty = 0.0
    for j in range(k):
        dt = t[j] - tm
        stt += w[j] * dt * dt
        sty += w[j] * dt * y[j]
    ym = swy / sw
    c1 = sty / stt
    c0 = ym - c1 * tm
    var_c1 = 1.0 / stt
    var_c0 = 1.0 / sw + tm * tm / stt
    if not (stt > 0) or not (sw > 0):
        return np.nan, np.nan, np.nan, np.nan, sw
    return c0, c1, var_c0, var_c1, sw


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _dark_fit_kernel(t, y, s2, n, floor, n_iter):  # pragma: no cover - compiled
    """:func:`_fit_dark_rate_numpy` for every row of ``y``/``s2`` (P, K), one pixel at a time."""
    n_pix, k = y.shape
    rate = np.empty(n_pix)
    rate_err = np.empty(n_pix)
    offset = np.empty(n_pix)
    offset_err = np.empty(n_pix)
    chi2_red = np.empty(n_pix)
    read_var = np.empty(n_pix)
    shot = np.empty(n_pix)
    n_pts = np.empty(n_pix, np.int32)
    block = 4096
    n_blocks = (n_pix + block - 1) // block
    big = np.finfo(np.float64).max
    for bi in prange(n_blocks):
        yy = np.empty(k)
        ss = np.empty(k)
        dof = np.empty(k)
        nn = np.empty(k)
        w = np.empty(k)
        use = np.empty(k, np.bool_)
        for p in range(bi * block, min(n_pix, (bi + 1) * block)):
            row = p if n.shape[0] > 1 else 0
            npt = 0
            for j in range(k):
                nn[j] = n[row, j]
                yv = np.float64(y[p, j])
                use[j] = np.isfinite(yv) and nn[j] >= 1
                yy[j] = yv if use[j] else 0.0
                sv = np.float64(s2[p, j])
                ok = use[j] and np.isfinite(sv) and nn[j] - 1.0 > 0
                ss[j] = sv if ok else 0.0
                dof[j] = nn[j] - 1.0 if ok else 0.0
                if use[j]:
                    npt += 1
            # variance model a + b t, b >= 0, by IRLS (see _variance_model)
            a = 0.0
            b = 0.0
            for j in range(k):
                w[j] = dof[j]  # model = 1 on the first pass
            for it in range(n_iter):
                if it > 0:
                    for j in range(k):
                        mdl = a + b * t[j]
                        w[j] = dof[j] / (mdl * mdl)
                a, b, _, _, sw = _wls_point(t, ss, w)
                swy = 0.0
                for j in range(k):
                    swy += w[j] * ss[j]
                if not (b >= 0):
                    a = swy / sw
                    b = 0.0
                if np.isnan(a):
                    a = floor
                elif a > big:
                    a = big
                if a < floor:
                    a = floor
            for j in range(k):
                w[j] = nn[j] / (a + b * t[j]) if use[j] else 0.0
            c0, c1, v0, v1, _ = _wls_point(t, yy, w)
            chi2 = 0.0
            for j in range(k):
                r = yy[j] - (c0 + c1 * t[j])
                chi2 += w[j] * r * r
            rate[p] = c1
            rate_err[p] = np.sqrt(v1)
            offset[p] = c0
            offset_err[p] = np.sqrt(v0)
            chi2_red[p] = chi2 / (npt - 2) if npt > 2 else np.nan
            read_var[p] = a
            shot[p] = b
            n_pts[p] = npt
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


#: Default dark-rate thresholds of :func:`dark_summary` (e-/s).
SUMMARY_THRESHOLDS_E = (0.01, 0.1, 1.0)
_PERCENTILES = (0.1, 1.0, 5.0, 16.0, 50.0, 84.0, 95.0, 99.0, 99.9)


def dark_summary(rate_e: np.ndarray, rate_err_e: np.ndarray, *, temperature: float | None,
                 thresholds: tuple[float, ...] = SUMMARY_THRESHOLDS_E) -> dict:
    """Scalar figures of a dark-rate map (e-/s) at the sensor temperature.

    Parameters
    ----------
    rate_e, rate_err_e : ndarray
        Per-pixel dark rate and its 1-sigma error (e-/s).
    temperature : float or None
        Sensor temperature of the dark frames (deg C).
    thresholds : tuple of float
        Rates (e-/s) for the fractions of pixels above them.

    Returns
    -------
    dict
        ``median`` with ``median_err`` from the distribution-free order
        statistic interval (the ranks ``N/2 -+ sqrt(N)/2`` bracket the
        median with 68 % binomial probability; half their distance is the
        1-sigma error), ``mean`` and ``mean_err`` (``std / sqrt(N)``),
        ``robust_sigma`` (1.4826 MAD), ``median_pixel_err``, percentiles,
        ``frac_above`` per threshold, ``n_pixels``, ``temperature_c``.
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
    frac_above = {f"{thr:g}": float(np.count_nonzero(r > thr)) / n for thr in thresholds}
    mean, std = mean_std(r)
    half = 0.5 / np.sqrt(n)
    qs = [max(0.5 - half, 0.0), 0.5, min(0.5 + half, 1.0)] + [p / 100.0 for p in _PERCENTILES]
    lo, med, hi, *pct = quantiles(r, qs)
    robust_sigma = MAD_TO_SIGMA * median(
        np.abs(np.subtract(r, r.dtype.type(med), out=r), out=r))
    del r
    e = finite_values(rate_err_e)
    median_pixel_err = median(e) if e.size else None
    del e
    median_err = float(0.5 * (hi - lo))
    if median_err <= 0.0:
        # Rates from means of a few integer frames are discrete: with millions of
        # pixels the 68% rank interval can fall inside one tie. Use the asymptotic
        # error of a median instead (sqrt(pi/2) sigma / sqrt(N)).
        median_err = 1.2533 * robust_sigma / np.sqrt(n)
        out["median_err_method"] = "asymptotic 1.2533 * robust sigma / sqrt(N) (tied ranks)"
    out |= {
        "median": float(med),
        "median_err": median_err,
        "mean": mean,
        "mean_err": std / np.sqrt(n) if n > 1 else None,
        "robust_sigma": robust_sigma,
        "median_pixel_err": median_pixel_err,
        "percentiles": {f"p{p:g}": float(v) for p, v in zip(_PERCENTILES, pct, strict=True)},
        "frac_above": frac_above,
    }
    return out
