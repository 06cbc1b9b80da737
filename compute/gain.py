"""Per-pixel gain from each pixel's temporal mean and variance over the flat levels.

For one pixel at flat level ``i`` with ``n_i`` frames, the temporal mean ``m_i``
(ADU, bias-subtracted, illumination-corrected) and the sample variance ``v_i``
(ADU^2, ddof=1) follow

    E[v_i] = m_i / g + s^2,    Var(v_i) = 2 E[v_i]^2 / (n_i - 1),

``(n_i - 1) v_i / E[v_i]`` being chi-square with ``n_i - 1`` degrees of freedom.
Fitting ``v = a m + s^2`` with ``a = 1/g`` is therefore a gamma GLM with an
identity link; its maximum-likelihood estimate is found by iteratively
reweighted least squares with weights from the *model* variance
``w_i = (n_i - 1) / (2 (a m_i + s^2)^2)``. Weighting with the observed ``v_i``
instead would bias the slope low, because low fluctuations of ``v_i`` get
larger weights.

Units: ADU, ADU^2, gain ``g`` in e-/ADU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numba import njit, prange
from scipy.stats import chi2 as chi2_dist
from scipy.stats import f as f_dist

from sitiancal.compute.mixture import MixtureFit, fit_mixture
from sitiancal.compute.stats import weighted_line, weighted_line_block

__all__ = [
    "LEVEL_OUTLIER_ALPHA",
    "PixelGainFit",
    "fit_pixel_gain",
    "frames_for_precision",
    "gain_populations",
    "gain_rel_err",
]

# Defaults of the frame budget, from the reference study (Mini-SiTian IMX455):
# gain 0.252-0.255 e-/ADU, read noise 1.028 e- -> (1.028 / 0.254)^2 ~ 16.4 ADU^2,
# and the per-pixel fit stops at ~70 % of the 65535 ADU range.
_REF_GAIN = 0.254
_REF_READ_VAR = (1.028 / _REF_GAIN) ** 2
_REF_MAX_MEAN = 0.7 * 65535.0

#: One-sided test level of a flat level's variance against the prediction of the
#: pixel's other levels (``fit_pixel_gain(reject_alpha=)``): a false rejection per
#: ~1e6 levels tested.
LEVEL_OUTLIER_ALPHA = 1e-6
#: Chi-square tail beyond which a pixel's fit is poor enough for its levels to be
#: tested one by one (``fit_pixel_gain(reject_alpha=)``).
_CANDIDATE_P = 1e-3

#: Pixels fitted per vectorised block: bounds the float64 temporaries at
#: ~1 MB per level and array whatever the size of the input.
_CHUNK_PIXELS = 131_072


@dataclass(frozen=True)
class PixelGainFit:
    """Per-pixel gain maps.

    Attributes
    ----------
    gain : numpy.ndarray
        Gain ``1/a`` (e-/ADU), NaN where the fit is undefined.
    gain_err : numpy.ndarray
        1-sigma error of the gain (e-/ADU), propagated from the slope error.
    read_var : numpy.ndarray
        Fitted intercept ``s^2`` (ADU^2): read-noise (and quantisation) variance.
    chi2_red : numpy.ndarray
        Reduced chi-square of each pixel's fit (expected ~1), a fit-quality map;
        NaN with fewer than 3 levels.
    n_used : numpy.ndarray
        Number of levels used per pixel (int).
    left_out : numpy.ndarray or None
        Index (along the level axis of the input) of the level left out of
        each pixel's fit as an outlier, -1 where none (int16); None where no
        level was tested (``reject_alpha=None``).
    """

    gain: np.ndarray
    gain_err: np.ndarray
    read_var: np.ndarray
    chi2_red: np.ndarray
    n_used: np.ndarray
    left_out: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary of the maps (medians and counts)."""
        ok = np.isfinite(self.gain)
        if not ok.any():
            return {"n_pixels": int(self.gain.size), "n_fitted": 0}
        g = self.gain[ok]
        q16, q50, q84 = np.percentile(g, [15.865, 50.0, 84.135])
        return {
            "n_pixels": int(self.gain.size),
            "n_fitted": int(ok.sum()),
            "gain_median": float(q50),
            "gain_spread": float(0.5 * (q84 - q16)),
            "gain_err_median": float(np.median(self.gain_err[ok])),
            "read_var_median": float(np.median(self.read_var[ok])),
            "chi2_red_median": float(np.nanmedian(self.chi2_red[ok]))
            if np.isfinite(self.chi2_red[ok]).any()
            else None,
        }


def fit_pixel_gain(
    mean: np.ndarray,
    var: np.ndarray,
    n: np.ndarray,
    *,
    max_mean: float,
    min_levels: int = 3,
    n_iter: int = 3,
    linearizer: np.ndarray | None = None,
    backend: Literal["auto", "numba", "numpy"] = "auto",
    reject_alpha: float | None = None,
    read_var: tuple[np.ndarray, int] | None = None,
) -> PixelGainFit:
    """Weighted least-squares fit of ``v = m/g + s^2`` for every pixel at once.

    Parameters
    ----------
    mean : numpy.ndarray
        ``(..., L)`` bias-subtracted, illumination-corrected temporal mean per
        level (ADU). NaN marks a missing level.
    var : numpy.ndarray
        ``(..., L)`` temporal variance per level with ddof=1 (ADU^2).
    n : numpy.ndarray
        Frames per level, ``(L,)`` or ``(..., L)``.
    max_mean : float
        Levels with ``mean > max_mean`` (ADU) are not used (about 70 % of
        saturation, chosen by the caller); levels with ``mean <= 0`` neither.
    min_levels : int
        Pixels with fewer usable levels get NaN (minimum 2).
    n_iter : int
        Reweighting iterations with the model variance after the start from
        variances proportional to each pixel's own mean levels.
    linearizer : numpy.ndarray, optional
        Polynomial (highest power first) mapping observed to linearised signal
        (ADU). When given, the fit uses the temporal statistics of linearised
        counts, ``m' = P(m)`` and ``v' = v P'(m)^2``, and ``max_mean`` applies
        to ``m'``.
    backend : {"auto", "numba", "numpy"}
        ``"numba"`` (and ``"auto"``): one compiled pass per pixel, parallel over
        pixels, float32 inputs widened per value (no float64 copies);
        ``"numpy"``: the vectorised reference (blocks of 131072 pixels). They
        agree to float64 rounding.
    reject_alpha : float, optional
        Test the levels of a pixel whose fit is suspect against the prediction
        of its other levels: the level whose variance lies furthest above it,
        beyond a one-sided F test at ``reject_alpha`` (``n_i - 1`` degrees of
        freedom against the prediction's own), is left out and the pixel
        fitted again, where more than ``min_levels`` levels remain (one level
        per pixel; :data:`LEVEL_OUTLIER_ALPHA` is the tile pass's; see
        :func:`_leave_out_worst_level`). A cosmic ray in one frame of a level
        adds its charge squared over ``n_i`` to that level's variance: at the
        faint levels many times the shot noise's, which had pulled the
        pixel's gain far off its population and flagged it. Needs one frame
        count per level (``n`` of shape ``(L,)``).
    read_var : tuple of (numpy.ndarray, int), optional
        Each pixel's read variance measured apart (ADU^2, ``mean.shape[:-1]``:
        the bias frames' temporal variance) and the frames it comes from. The
        level test then predicts a level from the others through this
        intercept (one parameter): a prediction for the faintest level from
        the others' own intercept is too uncertain to find a hit there. The
        fit itself keeps its own intercept.

    Returns
    -------
    PixelGainFit
        Maps of shape ``mean.shape[:-1]``: gain and error (e-/ADU), read
        variance (ADU^2), reduced chi-square and number of levels used.

    Notes
    -----
    Each iteration uses ``w_i = (n_i - 1) / (2 p_i^2)`` with ``p_i`` the model
    variance of the previous iteration (floored at 1e-3 of the pixel's largest
    used mean level to keep a pathological pixel finite). Everything is per
    pixel, so a map does not depend on how the frame is tiled. The slope and intercept
    errors are the inverse-Fisher errors from these weights; ``chi2_red`` uses
    the same weights. Sums are in float64; pixels are processed in blocks of
    131072 so memory does not grow with the input beyond the outputs. After
    the default 3 iterations a pixel's gain is within ~0.03 sigma of the
    converged value. The error of ``m`` itself (``v/n``) is neglected: it
    enters ``Var(v - a m)`` at a relative level ``~1 / (2 g m)``, below 1 %
    above 200 ADU.

    ``a`` is unbiased; ``g = 1/a`` is its maximum-likelihood transform, whose
    mean over pixels is biased by ~``(sigma_g/g)^2`` (+0.9 % for 40 frames x
    12 levels, sigma_g/g = 9.4 %) while the median over pixels stays within
    ~0.1 %. Summaries should use medians (or average ``1/g``).
    """
    if reject_alpha is not None:
        fit = fit_pixel_gain(mean, var, n, max_mean=max_mean, min_levels=min_levels,
                             n_iter=n_iter, linearizer=linearizer, backend=backend)
        return _leave_out_worst_level(fit, mean, var, n, max_mean=max_mean,
                                      min_levels=min_levels, n_iter=n_iter,
                                      linearizer=linearizer, backend=backend,
                                      alpha=float(reject_alpha), read_var=read_var)
    if min_levels < 2:
        raise ValueError("min_levels must be >= 2")
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    m_in = np.asarray(mean)
    v_in = np.asarray(var)
    if m_in.shape != v_in.shape:
        raise ValueError(f"mean and var differ in shape: {m_in.shape} vs {v_in.shape}")
    n_levels = m_in.shape[-1]
    lead_shape = m_in.shape[:-1]
    n_arr = np.asarray(n, dtype=np.float64)
    poly = None if linearizer is None else np.asarray(linearizer, dtype=np.float64).ravel()
    if poly is not None and poly.size == 0:
        poly = None
    if backend != "numpy":
        m2 = _float_rows(m_in, n_levels)
        v2 = _float_rows(v_in, n_levels)
        if n_arr.ndim <= 1:
            n2 = np.ascontiguousarray(np.broadcast_to(n_arr, (n_levels,))).reshape(1, n_levels)
        else:
            n2 = np.ascontiguousarray(np.broadcast_to(n_arr, m_in.shape)).reshape(-1, n_levels)
        if poly is None:
            coef, dcoef = np.zeros(0), np.zeros(0)
        else:
            coef, dcoef = poly, np.polyder(poly) if poly.size > 1 else np.zeros(1)
        g, ge, rv, c2, nu = _gain_fit_kernel(m2.T, v2.T, n2, float(max_mean), int(min_levels),
                                             int(n_iter), coef, np.asarray(dcoef, np.float64),
                                             poly is not None)
        return PixelGainFit(gain=g.reshape(lead_shape), gain_err=ge.reshape(lead_shape),
                            read_var=rv.reshape(lead_shape), chi2_red=c2.reshape(lead_shape),
                            n_used=nu.reshape(lead_shape))
    m2 = m_in.reshape(-1, n_levels)
    v2 = v_in.reshape(-1, n_levels)
    if poly is not None:
        # m' = P(m), v' = v P'(m)^2: the temporal statistics of linearised counts.
        m64 = m2.astype(np.float64)
        slope_p = np.polyval(np.polyder(poly), m64)
        m2 = np.polyval(poly, m64)
        v2 = v2.astype(np.float64) * slope_p * slope_p
    n2 = (
        n_arr[None, :]
        if n_arr.ndim == 1
        else np.broadcast_to(n_arr, m_in.shape).reshape(-1, n_levels)
    )
    n_pix = m2.shape[0]

    # Start from a predicted variance proportional to the pixel's own mean level
    # (v = m/g + s^2 with s^2 small at all but the lowest level): it is known
    # precisely, independent of the pixel's noisy variances (so the first pass is
    # unbiased), and purely per pixel (so a map does not depend on how it is tiled).
    out = {k: np.full(n_pix, np.nan) for k in ("gain", "gain_err", "read_var", "chi2_red")}
    n_used = np.zeros(n_pix, dtype=np.int64)
    for lo in range(0, n_pix, _CHUNK_PIXELS):
        sl = slice(lo, lo + _CHUNK_PIXELS)
        chunk_n = n2 if n2.shape[0] == 1 else n2[sl]
        res = _fit_chunk(m2[sl], v2[sl], chunk_n, max_mean, min_levels, n_iter)
        for k, arr in zip(("gain", "gain_err", "read_var", "chi2_red"), res[:4], strict=True):
            out[k][sl] = arr
        n_used[sl] = res[4]
    return PixelGainFit(
        gain=out["gain"].reshape(lead_shape),
        gain_err=out["gain_err"].reshape(lead_shape),
        read_var=out["read_var"].reshape(lead_shape),
        chi2_red=out["chi2_red"].reshape(lead_shape),
        n_used=n_used.reshape(lead_shape),
    )


def _float_rows(a: np.ndarray, k: int) -> np.ndarray:
    """``(..., L)`` as a ``(P, L)`` float32/float64 array (a view when the layout allows; the kernels take strided input)."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a.reshape(-1, k)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _gain_fit_kernel(mean_t, var_t, n, max_mean, min_levels, n_iter, coef, dcoef,
                     linearize):  # pragma: no cover - compiled
    """:func:`_fit_chunk` for every column of ``mean_t``/``var_t`` (L, P).

    Passed as the transposes of the (P, L) statistics: a level-major array
    (the tile pass's) is then C-contiguous and each level row is read in
    order; a (P, L) C array arrives F-ordered and is read as before.

    Vectorised over blocks of pixels: the levels of a block are loaded into
    (L, block) rows (the linearizer's polynomials evaluated a coefficient at a
    time, the choices of frame counts and linearizer outside the pixel loops:
    1.45x faster than per value, the same floats), then every step is a loop
    over the block's pixels inside a loop over levels (SIMD over pixels); the line is
    :func:`compute.stats.weighted_line_block`, whose sums run over each pixel's
    levels in the order of the per-pixel ``weighted_line_point``.
    """
    n_lev, n_pix = mean_t.shape
    gain = np.empty(n_pix)
    gain_err = np.empty(n_pix)
    read_var = np.empty(n_pix)
    chi2_red = np.empty(n_pix)
    n_used = np.empty(n_pix, np.int64)
    block = 512
    n_blocks = (n_pix + block - 1) // block
    per_pixel_n = n.shape[0] > 1
    for bi in prange(n_blocks):
        p0 = bi * block
        nb = min(n_pix, p0 + block) - p0
        m = np.empty((n_lev, block))
        v = np.empty((n_lev, block))
        dof = np.empty((n_lev, block))
        w = np.empty((n_lev, block))
        pred = np.empty((n_lev, block))
        nu = np.zeros(block, np.int64)
        # running maximum of the valid means over the levels, kept in two rows that
        # alternate (read one, write the other): a maximum kept in one row compiles
        # to masked stores (see defects._flag)
        mmax = np.full((2, block), -np.inf)
        floor = np.empty(block)
        sums = np.empty((5, block))
        acc = np.empty(block)
        cm = np.empty(block)
        cv = np.empty(block)
        nrow = np.empty(block)
        slope = np.full(block, np.nan)  # NaN if no iteration runs (n_iter < 0)
        icpt = np.full(block, np.nan)
        var_slope = np.full(block, np.nan)
        det = np.full(block, np.nan)
        for j in range(n_lev):
            mj = m[j]
            vj = v[j]
            src_m = mean_t[j, p0:p0 + nb]
            src_v = var_t[j, p0:p0 + nb]
            # the level's values go to the scratch rows ``cm``, ``cv`` first and are
            # checked into ``m``, ``v`` below: checked in place (``mj[i] = mj[i] if ok
            # else 0``), LLVM compiles the update to masked stores (see defects._flag),
            # microcode on AMD Zen 2/3
            for i in range(nb):
                cm[i] = np.float64(src_m[i])
                cv[i] = np.float64(src_v[i])
            if linearize:  # v' = v P'(m)^2, m' = P(m), Horner's rule a coefficient at a time
                for i in range(nb):
                    acc[i] = 0.0
                for c in range(dcoef.shape[0]):
                    for i in range(nb):
                        acc[i] = acc[i] * cm[i] + dcoef[c]
                for i in range(nb):
                    cv[i] = cv[i] * acc[i] * acc[i]
                    acc[i] = 0.0
                for c in range(coef.shape[0]):
                    for i in range(nb):
                        acc[i] = acc[i] * cm[i] + coef[c]
                for i in range(nb):
                    cm[i] = acc[i]
            if per_pixel_n:
                for i in range(nb):
                    nrow[i] = n[p0 + i, j]
            else:
                for i in range(nb):
                    nrow[i] = n[0, j]
            dj = dof[j]
            mx_in = mmax[j & 1]
            mx_out = mmax[(j + 1) & 1]
            for i in range(nb):
                mm = cm[i]
                vv = cv[i]
                nj = nrow[i]
                # finite, positive, below max_mean, n > 1 (comparisons false for NaN)
                ok = ((mm > 0.0) & (mm <= max_mean) & (mm < np.inf) & (np.abs(vv) < np.inf)
                      & (nj > 1.0) & (nj < np.inf))
                mm = mm if ok else 0.0
                mj[i] = mm
                vj[i] = vv if ok else 0.0
                dj[i] = nj - 1.0 if ok else 0.0
                nu[i] += 1 if ok else 0
                mx_out[i] = max(mx_in[i], mm)
        for i in range(nb):
            floor[i] = max(1e-3 * mmax[n_lev & 1, i], 1e-12)
        for j in range(n_lev):
            for i in range(nb):
                pred[j, i] = max(m[j, i], floor[i])
        for _ in range(n_iter + 1):
            for j in range(n_lev):
                for i in range(nb):
                    w[j, i] = dof[j, i] / (2.0 * pred[j, i] * pred[j, i])
            weighted_line_block(m, v, w, nb, sums, slope, icpt, var_slope, det)
            for j in range(n_lev):
                for i in range(nb):
                    q = slope[i] * m[j, i] + icpt[i]
                    # np.maximum propagates NaN
                    pred[j, i] = q if (np.isnan(q) or q > floor[i]) else floor[i]
        # chi-square level by level (SIMD over pixels; each pixel's sum in level order),
        # in the line fit's scratch row, free after the last fit
        chi = sums[0]
        for i in range(nb):
            chi[i] = 0.0
        for j in range(n_lev):
            for i in range(nb):
                r = v[j, i] - (slope[i] * m[j, i] + icpt[i])
                chi[i] += w[j, i] * r * r
        for i in range(nb):
            p = p0 + i
            sl = slope[i]
            ok_fit = nu[i] >= min_levels and det[i] > 0 and np.isfinite(sl) and sl > 0
            n_used[p] = nu[i]
            if ok_fit:
                chi2 = chi[i]
                gain[p] = 1.0 / sl
                gain_err[p] = np.sqrt(var_slope[i]) / (sl * sl)
                read_var[p] = icpt[i]
                chi2_red[p] = chi2 / (nu[i] - 2) if nu[i] > 2 else np.nan
            else:
                gain[p] = np.nan
                gain_err[p] = np.nan
                read_var[p] = np.nan
                chi2_red[p] = np.nan
    return gain, gain_err, read_var, chi2_red, n_used


def _leave_out_worst_level(fit: PixelGainFit, mean: np.ndarray, var: np.ndarray,
                           n: np.ndarray, *, max_mean: float, min_levels: int, n_iter: int,
                           linearizer: np.ndarray | None, backend: str,
                           alpha: float,
                           read_var: tuple[np.ndarray, int] | None) -> PixelGainFit:
    """``fit`` with each pixel's worst outlying level left out and the pixel fitted again.

    A hit level pulls the pixel's whole fit towards it (a 12x variance at one
    of 8 levels had tripled the slope, and the level then lay within the
    pulled fit's limits), so each level ``j`` is tested against the
    prediction of the others: ``v_j / pred_j`` is F distributed with
    ``n_j - 1`` and the prediction's degrees of freedom
    (:func:`_predictions_through`, the others' line through a known read
    variance; :func:`_prediction` of the others' own fit without one). The
    level furthest beyond its limit goes. That takes a prediction per level:
    it is made only for the candidates of :func:`_candidate_kernel` (~0.2 %
    of clean pixels): a fit poor beyond a chi-square test at
    :data:`_CANDIDATE_P`, failed, claiming a gain error below what its
    levels allow, or with an intercept far from the known read variance
    (which takes up a hit at the faintest level while the fit stays good).
    """
    m_in, v_in = np.asarray(mean), np.asarray(var)
    n_levels = m_in.shape[-1]
    n_arr = np.asarray(n, dtype=np.float64)
    if n_arr.ndim > 1:
        raise ValueError("reject_alpha needs one frame count per level (n of shape (L,))")
    n_arr = np.broadcast_to(n_arr, (n_levels,))
    # the fit's own maps (fresh arrays), changed in place where a level goes
    maps = {k: getattr(fit, k).reshape(-1)
            for k in ("gain", "gain_err", "read_var", "chi2_red", "n_used")}
    # no fit of these levels knows a gain better than every level's variance at its
    # best, sqrt(2 / sum(n_k - 1)) (shot noise alone, a known intercept); a fit that
    # claims 2x better lost its footing: a hit at the faintest level can make the
    # reweighting swing between a line through it and one through the others, with
    # the weights of the one and the line of the other (gain 0.19 +- 0.0001 for 0.25)
    best_rel = np.sqrt(2.0 / max(float(np.sum(np.maximum(n_arr - 1.0, 0.0))), 1.0))
    # the chi-square limits of the few distinct degrees of freedom
    limits = chi2_dist.isf(_CANDIDATE_P, np.arange(1, n_levels + 1, dtype=np.float64))
    if read_var is not None:
        s2_map = np.asarray(read_var[0]).reshape(-1)
        first = np.asarray(m_in)[..., 0].reshape(-1)
    else:
        s2_map = first = np.zeros(0)
    candidates = np.flatnonzero(_candidate_kernel(
        maps["gain"], maps["gain_err"], maps["read_var"], maps["chi2_red"], maps["n_used"],
        limits, 0.5 * best_rel, int(min_levels), first, s2_map,
        float(np.sqrt(2.0 / max(float(n_arr[0]) - 1.0, 1.0)))))
    left_out = np.full(maps["gain"].size, -1, dtype=np.int16)
    if candidates.size:
        m2, v2 = _float_rows(m_in, n_levels), _float_rows(v_in, n_levels)
        m_c = np.asarray(m2[candidates], dtype=np.float64)
        v_c = np.asarray(v2[candidates], dtype=np.float64)
        poly = None if linearizer is None else np.asarray(linearizer, dtype=np.float64).ravel()
        if poly is not None and poly.size:  # the fit's linearised statistics
            slope_p = np.polyval(np.polyder(poly), m_c)
            m_lin, v_lin = np.polyval(poly, m_c), v_c * slope_p * slope_p
        else:
            m_lin, v_lin = m_c, v_c
        valid = _valid_levels(m_lin, v_lin, n_arr[None, :], max_mean)
        if read_var is not None:  # in linearised units at the faint end
            s2 = s2_map[candidates].astype(np.float64)
            if poly is not None and poly.size > 1:
                s2 = s2 * np.polyder(poly)[-1] ** 2
        score = np.zeros(m_c.shape)
        fits: list[PixelGainFit | None] = []
        if read_var is not None:  # every level's prediction from the others at once
            preds = _predictions_through(m_lin, v_lin, valid, n_arr, s2, read_var[1])
        for j in range(n_levels):
            test = valid[:, j] & (n_arr[j] >= 2)
            fits.append(None)
            if not test.any():
                continue
            if read_var is not None:
                pred, pred_dof = preds[0][:, j], preds[1][:, j]
            else:
                others = valid.copy()
                others[:, j] = False
                without = m_c.copy()
                without[:, j] = np.nan  # an invalid level: left out of the fit
                fits[j] = fit_pixel_gain(without, v_c, n_arr, max_mean=max_mean,
                                         min_levels=min_levels, n_iter=n_iter,
                                         linearizer=linearizer,
                                         backend=backend)  # type: ignore[arg-type]
                pred, pred_dof = _prediction(m_lin, others, n_arr, fits[j], m_lin[:, j])
            with np.errstate(divide="ignore", invalid="ignore"):
                ok = test & (pred > 0) & (pred_dof > 0)
                # F quantiles fall with the prediction's degrees of freedom towards the
                # chi-square's: only levels beyond that need their own
                ratio = v_lin[:, j] / pred
                ok &= ratio > chi2_dist.isf(alpha, n_arr[j] - 1.0) / (n_arr[j] - 1.0)
                limit = np.full(pred.shape, np.inf)
                limit[ok] = f_dist.isf(alpha, n_arr[j] - 1.0, pred_dof[ok])
                ratio = ratio / limit
            score[:, j] = np.where(ok & np.isfinite(ratio), ratio, 0.0)
        worst = np.argmax(score, axis=1)
        out = score[np.arange(worst.size), worst] > 1.0
        for j in np.unique(worst[out]):
            rows = out & (worst == j)
            other = fits[j]
            if other is None:  # tested through the read variance: fit them without j now
                without = m_c[rows]
                without[:, j] = np.nan
                other = fit_pixel_gain(without, v_c[rows], n_arr, max_mean=max_mean,
                                       min_levels=min_levels, n_iter=n_iter,
                                       linearizer=linearizer,
                                       backend=backend)  # type: ignore[arg-type]
            else:
                other = PixelGainFit(**{k: getattr(other, k)[rows] for k in maps})
            for key, values in maps.items():
                values[candidates[rows]] = getattr(other, key)
            left_out[candidates[rows]] = j
    shape = fit.gain.shape
    return PixelGainFit(**{k: v.reshape(shape) for k, v in maps.items()},
                        left_out=left_out.reshape(shape))


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _candidate_kernel(gain, gain_err, read_var, chi2_red, n_used, limits, min_rel, min_levels,
                      first, s2, rel0):  # pragma: no cover - compiled
    """Pixels whose levels :func:`_leave_out_worst_level` tests one by one (one pass).

    More than ``min_levels`` (and at least 4) levels used, and: a failed fit;
    a fit poorer than ``limits[dof - 1]`` (chi-square at ``_CANDIDATE_P``,
    ``dof = n_used - 2``); a relative gain error below ``min_rel`` (half of
    what the levels allow); or, with a read variance ``s2`` per pixel, an
    intercept more than five errors off it, the error taken as the faintest
    level's ``E_0 rel0`` with ``E_0 = first / g + s2`` (the slope's error adds
    to it: ~1 % of clean pixels lie beyond three). The intercept takes up a
    hit at the faintest level and the fit stays good; where the hit drives
    the fit to a degenerate solution it takes the intercept far below.
    """
    n_pix = gain.shape[0]
    out = np.zeros(n_pix, np.bool_)
    with_s2 = s2.shape[0] == n_pix
    n_lim = limits.shape[0]
    for p in prange(n_pix):
        nu = n_used[p]
        if nu <= min_levels or nu < 4:
            continue
        g = gain[p]
        flag = not np.isfinite(g)
        dof = min(max(nu - 2, 1), n_lim)
        flag |= chi2_red[p] * dof > limits[dof - 1]
        flag |= gain_err[p] < min_rel * g
        if with_s2:
            e0 = np.float64(first[p]) / g + np.float64(s2[p])
            flag |= abs(read_var[p] - np.float64(s2[p])) > 5.0 * rel0 * e0
        out[p] = flag
    return out


def _predictions_through(m: np.ndarray, v: np.ndarray, valid: np.ndarray, n: np.ndarray,
                         s2: np.ndarray, s2_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Each level's variance predicted by the others' line through the read variance ``s2``.

    ``m``, ``v``: ``(P, L)`` linearised means and variances, ``valid``: the
    usable levels, ``n``: frames per level, ``s2``: ``(P,)`` read variances
    (ADU^2) from ``s2_frames`` frames. For level ``j`` the slope of
    ``v - s2 = a m`` over the other levels by weighted least squares,
    ``a_j = (Sxy - w_j m_j (v_j - s2)) / (S2 - w_j m_j^2)`` (sums over all
    levels less level ``j``'s terms: no fit per level). The weights
    ``(n_k - 1) / (2 E_k^2)`` take ``E_k`` from the median over levels of
    ``(v_k - s2) / m_k`` (one hit level does not move it). The prediction
    ``a_j m_j + s2`` has the variance ``m_j^2 / S2_j + (1 - m_j S1_j /
    S2_j)^2 Var(s2)`` (``S1 = sum w m``, ``Var(s2) = 2 s2^2 / (s2_frames -
    1)``) and, as a scaled chi-square, ``2 pred^2 / Var(pred)`` degrees of
    freedom (0: no prediction). Returns ``(pred, dof)``, both ``(P, L)``.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mu = np.where(valid, m, 0.0)
        excess = np.where(valid, v - s2[:, None], 0.0)
        a0 = np.nanmedian(np.where(valid, excess / m, np.nan), axis=1)
        model = np.maximum(a0[:, None] * m + s2[:, None], 1e-12)
        w = np.where(valid, (n[None, :] - 1.0) / (2.0 * model * model), 0.0)
        wm = w * mu
        s1 = wm.sum(axis=1)[:, None] - wm
        s2w = (wm * mu).sum(axis=1)[:, None] - wm * mu
        sxy = (wm * excess).sum(axis=1)[:, None] - wm * excess
        a = sxy / s2w
        var_s2 = (2.0 * s2 * s2 / max(s2_frames - 1, 1))[:, None]
        pred = a * m + s2[:, None]
        var_pred = m * m / s2w + (1.0 - m * s1 / s2w) ** 2 * var_s2
        dof = np.where((a > 0) & (s2w > 0), 2.0 * pred * pred / var_pred, 0.0)
    return pred, np.nan_to_num(dof, nan=0.0, posinf=1e12)


def _prediction(m: np.ndarray, used: np.ndarray, n: np.ndarray, fit: PixelGainFit,
                at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fit's variance at mean level ``at`` (ADU^2) and that prediction's degrees of freedom.

    ``m``: ``(P, L)`` linearised means, ``used``: the levels of each pixel's
    fit, ``n``: frames per level. The prediction ``a at + b`` (its read
    variance not below 0: a fit pulled by a hit can make it so, and a
    level's prediction then nearly vanishes) has the variance ``(at, 1) C
    (at, 1)^T`` from the fit's inverse Fisher matrix ``C`` (weights
    ``(n_k - 1) / (2 E[v_k]^2)``, as the fit's); as a scaled chi-square its
    degrees of freedom are ``2 pred^2 / Var(pred)``: an extrapolation to the
    faintest or brightest level is less certain than the pooled levels'
    ``sum (n_k - 1)`` would say (which had left clean brightest levels out).
    """
    a, b = 1.0 / fit.gain, np.maximum(fit.read_var, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        model = a[:, None] * m + b[:, None]
        w = np.where(used, (n[None, :] - 1.0) / (2.0 * model * model), 0.0)
        mu = np.where(used, m, 0.0)
        s0, s1, s2 = w.sum(axis=1), (w * mu).sum(axis=1), (w * mu * mu).sum(axis=1)
        det = s0 * s2 - s1 * s1
        var_pred = (at * at * s0 - 2.0 * at * s1 + s2) / det
        pred = a * at + b
        dof = np.where(det > 0, 2.0 * pred * pred / var_pred, 0.0)
    return pred, np.nan_to_num(dof, nan=0.0, posinf=1e12)


def _valid_levels(m: np.ndarray, v: np.ndarray, n: np.ndarray, max_mean: float) -> np.ndarray:
    """Levels usable in a pixel's fit: finite, n > 1, 0 < m <= max_mean."""
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(m) & np.isfinite(v) & np.isfinite(n) & (n > 1) & (m > 0) & (m <= max_mean)
        )


def _fit_chunk(
    mean: np.ndarray,
    var: np.ndarray,
    n: np.ndarray,
    max_mean: float,
    min_levels: int,
    n_iter: int,
) -> tuple[np.ndarray, ...]:
    """IRLS fit of one block of pixels, (P, L) in; gain, gain_err, read_var, chi2_red, n_used out."""
    m = np.asarray(mean, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    valid = _valid_levels(m, v, nn, max_mean)
    m = np.where(valid, m, 0.0)
    v = np.where(valid, v, 0.0)
    dof = np.where(valid, nn - 1.0, 0.0)
    n_used = valid.sum(axis=-1)

    # Predicted variances are floored at 1e-3 of the pixel's largest used level.
    floor = np.maximum(1e-3 * m.max(axis=-1, keepdims=True), 1e-12)
    pred = np.maximum(m, floor)
    with np.errstate(invalid="ignore"):
        for _ in range(n_iter + 1):
            w = dof / (2.0 * pred * pred)
            slope, icpt, var_slope, _, det = weighted_line(m, v, w)
            pred = np.maximum(slope[:, None] * m + icpt[:, None], floor)

    ok = (n_used >= min_levels) & (det > 0) & np.isfinite(slope) & (slope > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(ok, 1.0 / slope, np.nan)
        gain_err = np.where(ok, np.sqrt(var_slope) / slope**2, np.nan)
        resid = v - (slope[:, None] * m + icpt[:, None])
        chi2 = (w * resid * resid).sum(axis=-1)
        chi2_red = np.where(ok & (n_used > 2), chi2 / (n_used - 2), np.nan)
    read_var = np.where(ok, icpt, np.nan)
    return gain, gain_err, read_var, chi2_red, n_used


def gain_populations(
    gain: np.ndarray, gain_err: np.ndarray, *, max_components: int = 3, seed: int = 0,
    max_samples: int = 1_000_000,
) -> MixtureFit:
    """Gaussian-mixture populations of the per-pixel gain, aware of each pixel's error.

    Parameters
    ----------
    gain, gain_err : numpy.ndarray
        Gain map and its 1-sigma error (e-/ADU), any shape; non-finite values and
        non-positive errors are ignored.
    max_components : int
        Largest number of components tried; the best is chosen by BIC.
    seed : int
        Seed of the mixture fit's subsampling and initialisation.
    max_samples : int
        At most this many pixels (a seeded random subset) enter the fit.

    Returns
    -------
    MixtureFit
        From :func:`sitiancal.compute.mixture.fit_mixture`; ``best.sigmas`` are
        intrinsic (deconvolved) population widths (e-/ADU).
    """
    g = np.asarray(gain, dtype=np.float64).ravel()
    e = np.asarray(gain_err, dtype=np.float64).ravel()
    ok = np.isfinite(g) & np.isfinite(e) & (e > 0)
    if not ok.any():
        raise ValueError("no pixel with a finite gain and a positive error")
    return fit_mixture(g[ok], e[ok], max_components=max_components, seed=seed,
                       max_samples=max_samples)


def gain_rel_err(
    n_frames: int,
    signal_fraction: np.ndarray,
    *,
    max_mean: float = _REF_MAX_MEAN,
    gain: float = _REF_GAIN,
    read_var: float = _REF_READ_VAR,
) -> float:
    """Expected relative 1-sigma error of one pixel's gain (inverse Fisher information).

    Parameters
    ----------
    n_frames : int
        Frames per level (>= 2).
    signal_fraction : numpy.ndarray
        Mean signal of each level as a fraction of ``max_mean``.
    max_mean : float
        Highest fitted mean (ADU).
    gain : float
        Gain (e-/ADU).
    read_var : float
        Read-noise variance (ADU^2).

    Returns
    -------
    float
        ``sigma_g / g`` (= ``sigma_a / a`` for ``a = 1/g``).
    """
    if n_frames < 2:
        raise ValueError("n_frames must be >= 2")
    m = np.asarray(signal_fraction, dtype=np.float64) * max_mean
    v = m / gain + read_var
    w = (n_frames - 1) / (2.0 * v * v)
    fisher = np.array([[np.sum(w * m * m), np.sum(w * m)], [np.sum(w * m), np.sum(w)]])
    var_slope = np.linalg.inv(fisher)[0, 0]
    return float(np.sqrt(var_slope) * gain)


def frames_for_precision(
    target_rel_err: float,
    n_levels: int,
    *,
    signal_fraction: np.ndarray | None = None,
    max_mean: float = _REF_MAX_MEAN,
    gain: float = _REF_GAIN,
    read_var: float = _REF_READ_VAR,
) -> int:
    """Frames per flat level needed for a target per-pixel gain precision.

    Parameters
    ----------
    target_rel_err : float
        Wanted relative 1-sigma error of one pixel's gain (e.g. 0.05).
    n_levels : int
        Number of flat levels (>= 2).
    signal_fraction : numpy.ndarray, optional
        Level signals as fractions of ``max_mean``; default evenly spaced,
        ``(1..n_levels) / n_levels``.
    max_mean : float
        Highest fitted mean (ADU); default 70 % of the 16-bit range.
    gain : float
        Expected gain (e-/ADU); default from the reference study.
    read_var : float
        Expected read-noise variance (ADU^2); default from the reference study.

    Returns
    -------
    int
        Smallest number of frames per level ``n`` whose expected relative gain
        error is <= ``target_rel_err``.

    Notes
    -----
    The Fisher information of the per-pixel fit is proportional to ``n - 1``
    (``Var(v) = 2 v^2 / (n - 1)``), so ``sigma(n) = sigma(2) / sqrt(n - 1)``
    and ``n = 1 + ceil((sigma(2) / target)^2)``.
    """
    if not target_rel_err > 0:
        raise ValueError("target_rel_err must be positive")
    if signal_fraction is None:
        if n_levels < 2:
            raise ValueError("n_levels must be >= 2")
        signal_fraction = np.arange(1, n_levels + 1) / n_levels
    elif len(signal_fraction) != n_levels:
        raise ValueError("signal_fraction must have n_levels entries")
    unit = gain_rel_err(2, signal_fraction, max_mean=max_mean, gain=gain, read_var=read_var)
    # Guard against the ceil landing one frame high through rounding of an exact ratio.
    need = (unit / target_rel_err) ** 2
    return int(1 + np.ceil(need - 1e-9))
