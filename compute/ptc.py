"""Conventional photon transfer curve (PTC) from scaled frame-pair differences.

For each flat level two frames are taken; the temporal variance is measured
from their (scaled) difference so that the fixed-pattern part of the signal
(PRNU, vignetting, dust) cancels, and the PTC ``var(mean)`` is then fitted
either with the linear shot-noise model

    var = mean / g + (rn / g)^2

or with the Astier et al. (2019, A&A 629, A36, eq. 16) form that accounts for
the brighter-fatter effect through the pixel-area coefficient ``a00``:

    var = 1 / (2 a00 g^2) (exp(2 a00 g mean) - 1) + n00 / g^2 .

Units: means in ADU (bias-subtracted), variances in ADU^2, the gain ``g`` in
e-/ADU, ``a00`` in 1/e-, ``n00`` in e-^2 (the read-noise variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import curve_fit

from sitiancal.compute.summary import clipped_survivors

__all__ = ["PTCFit", "PairStats", "find_turnoff", "fit_ptc", "pair_stats",
           "turnoff_is_lower_bound"]

_MODELS = ("linear", "astier")


@dataclass(frozen=True)
class PairStats:
    """Statistics of one flat pair.

    Attributes
    ----------
    mean : float
        Average of the two bias-subtracted, sigma-clipped frame means (ADU).
    var : float
        Per-frame temporal variance from the scaled difference (ADU^2).
    var_err : float
        1-sigma error of ``var`` from the sampling distribution of a
        variance, ``var * sqrt(2 / (n - 1))`` (ADU^2).
    n_pixels : int
        Number of difference pixels that survived the clipping.
    """

    mean: float
    var: float
    var_err: float
    n_pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": float(self.mean),
            "var": float(self.var),
            "var_err": float(self.var_err),
            "n_pixels": int(self.n_pixels),
        }


@dataclass(frozen=True)
class PTCFit:
    """Result of a PTC fit.

    Attributes
    ----------
    model : str
        ``"linear"`` or ``"astier"``.
    gain, gain_err : float
        Gain and its 1-sigma error (e-/ADU).
    read_noise_e, read_noise_e_err : float
        Read noise and its error (e-); NaN when the fitted intercept is negative.
    read_noise_adu : float
        Read noise (ADU).
    a00, a00_err : float
        Astier brighter-fatter coefficient (1/e-) and its error; NaN for the
        linear model.
    turnoff_adu : float
        Mean signal where the variance stops rising (ADU).
    full_well_e : float
        ``turnoff_adu * gain`` (e-).
    used : numpy.ndarray
        Boolean per input point: used in the final fit.
    chi2_red : float
        Reduced chi-square of the final fit over the used points.
    residuals : numpy.ndarray
        Normalised residuals ``(var - model) / var_err`` for every input point
        (used or not; NaN where undefined).
    """

    model: str
    gain: float
    gain_err: float
    read_noise_e: float
    read_noise_e_err: float
    read_noise_adu: float
    a00: float
    a00_err: float
    turnoff_adu: float
    full_well_e: float
    used: np.ndarray
    chi2_red: float
    residuals: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        for name in (
            "gain",
            "gain_err",
            "read_noise_e",
            "read_noise_e_err",
            "read_noise_adu",
            "a00",
            "a00_err",
            "turnoff_adu",
            "full_well_e",
            "chi2_red",
        ):
            value = float(getattr(self, name))
            out[name] = value if np.isfinite(value) else None
        out["used"] = [bool(u) for u in self.used]
        out["residuals"] = [float(r) if np.isfinite(r) else None for r in self.residuals]
        return out


def _clipped(values: np.ndarray, sigma: float) -> np.ndarray:
    """Survivors (1-D, sorted) of iterative median/std sigma clipping to convergence.

    Non-finite values are dropped first. The same values as astropy's
    ``sigma_clip(maxiters=None)`` (:func:`compute.summary.clipped_survivors`).
    """
    return clipped_survivors(values, sigma)


def pair_stats(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    offset: np.ndarray | float = 0.0,
    sigma: float = 5.0,
) -> PairStats:
    """Mean and temporal variance of one flat pair (conventional PTC point).

    Parameters
    ----------
    f1, f2 : numpy.ndarray
        The same region (any shape, usually the central region) of the two
        frames of one flat level (ADU). Non-finite pixels are ignored.
    offset : numpy.ndarray or float
        Bias to subtract (ADU): a master-bias map broadcastable to the region,
        or a scalar.
    sigma : float
        Clipping threshold (standard deviations) of astropy's iterative
        sigma clipping, applied to each frame for its mean and to the
        difference for its variance.

    Returns
    -------
    PairStats
        Mean (ADU), per-frame temporal variance (ADU^2) with its error, and the
        number of difference pixels used.

    Notes
    -----
    With ``a = f1 - offset``, ``b = f2 - offset`` and clipped means ``mu1``,
    ``mu2``, the difference ``d = a - r b`` with ``r = mu1 / mu2`` removes the
    fixed pattern exactly when it is multiplicative (PRNU, vignetting) even if
    the illumination changed between the two exposures:
    ``mu1 P - r mu2 P = 0``. For independent frames
    ``Var(d) = V(mu1) + r^2 V(mu2)``, so ``Var(d) / (1 + r^2)`` is a weighted
    average of the per-frame variances at ``mu1`` and ``mu2``; for a smooth
    ``V`` it equals, to first order in ``mu1 - mu2``, the variance at
    ``(mu1 + mu2) / 2``, which is the reported mean. The identity holds for any
    fixed ``r``; ``r = 1`` is used when the means are not both positive or
    differ by more than a factor 2 (bias-level pairs), where scaling would only
    lose precision. The truncation bias of 5-sigma clipping on a Gaussian is
    1.5e-5 relative and is not corrected.
    """
    a = np.asarray(f1, dtype=np.float64) - np.asarray(offset, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64) - np.asarray(offset, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
    a_kept = _clipped(a, sigma)
    b_kept = _clipped(b, sigma)
    if a_kept.size < 2 or b_kept.size < 2:
        raise ValueError("fewer than two valid pixels in a frame of the pair")
    mu1 = float(np.mean(a_kept))
    mu2 = float(np.mean(b_kept))
    ratio = mu1 / mu2 if (mu1 > 0 and mu2 > 0) else 1.0
    if not 0.5 < ratio < 2.0:
        ratio = 1.0
    d_kept = _clipped(a - ratio * b, sigma)
    n = int(d_kept.size)
    if n < 2:
        raise ValueError("fewer than two valid pixels in the pair difference")
    var = float(np.var(d_kept, ddof=1)) / (1.0 + ratio * ratio)
    var_err = var * np.sqrt(2.0 / (n - 1))
    return PairStats(mean=0.5 * (mu1 + mu2), var=var, var_err=float(var_err), n_pixels=n)


def find_turnoff(mean: np.ndarray, var: np.ndarray) -> float:
    """Mean signal where the PTC variance stops rising (ADU).

    Parameters
    ----------
    mean, var : numpy.ndarray
        PTC points: mean (ADU) and variance (ADU^2), any order. Non-finite
        points are ignored.

    Returns
    -------
    float
        The turnoff (ADU): the mean of the point of maximum variance, refined by
        the vertex of the parabola through it and its two neighbours (the
        vertex may move at most half-way towards a neighbour). If the maximum
        is the brightest point, no turnoff was reached and that point's mean
        is returned. So is it where the next point's variance has collapsed
        to below half the maximum (a level clipped at the ADC limit, whose
        variance is ~0): a parabola through a collapse is no turnover, and it
        had put the turnoff 9 % below the brightest unclipped level of a
        ladder that steps from 88 % of the ADC range to full (measured); the
        brightest unclipped level is then a lower bound. NaN if there is no
        finite point.
    """
    m = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    ok = np.isfinite(m) & np.isfinite(v)
    if not ok.any():
        return float("nan")
    order = np.argsort(m[ok])
    m, v = m[ok][order], v[ok][order]
    k = int(np.argmax(v))
    if k == 0 or turnoff_is_lower_bound(m, v):
        return float(m[k])
    x = m[k - 1 : k + 2]
    y = v[k - 1 : k + 2]
    # Vertex of the interpolating parabola through three points.
    num = (x[1] - x[0]) ** 2 * (y[1] - y[2]) - (x[1] - x[2]) ** 2 * (y[1] - y[0])
    den = (x[1] - x[0]) * (y[1] - y[2]) - (x[1] - x[2]) * (y[1] - y[0])
    if den == 0 or not np.isfinite(num / den):
        return float(m[k])
    vertex = x[1] - 0.5 * num / den
    lo = x[1] - 0.5 * (x[1] - x[0])
    hi = x[1] + 0.5 * (x[2] - x[1])
    return float(np.clip(vertex, lo, hi))


def turnoff_is_lower_bound(mean: np.ndarray, var: np.ndarray) -> bool:
    """Whether :func:`find_turnoff` could only bound the turnoff from below.

    True when the point of maximum variance is the brightest one (no turnover
    reached) or the next one's variance has collapsed (a clipped level): the
    turnoff lies at or above that point's mean, up to the next level's.

    Parameters
    ----------
    mean, var : numpy.ndarray
        PTC points: mean (ADU) and variance (ADU^2), any order.
    """
    m = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    ok = np.isfinite(m) & np.isfinite(v)
    if not ok.any():
        return False
    v = v[ok][np.argsort(m[ok])]
    k = int(np.argmax(v))
    return k == v.size - 1 or bool(v[k + 1] < 0.5 * v[k])


def _astier(mu: np.ndarray, a00: float, gain: float, n00: float) -> np.ndarray:
    """Astier+19 eq. 16 variance (ADU^2), written with expm1(x)/x so a00 -> 0 is exact."""
    x = 2.0 * a00 * gain * mu
    small = np.abs(x) < 1e-8
    safe_x = np.where(small, 1.0, x)
    ratio = np.where(small, 1.0 + 0.5 * x, np.expm1(safe_x) / safe_x)
    return mu / gain * ratio + n00 / gain**2


def _fit_linear(mu: np.ndarray, v: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted straight line v = p0 mu + p1; returns params and their covariance."""
    w = 1.0 / err**2
    design = np.stack([mu, np.ones_like(mu)], axis=1)
    normal = design.T @ (design * w[:, None])
    cov = np.linalg.inv(normal)
    params = cov @ (design.T @ (w * v))
    return params, cov


def fit_ptc(
    mean: np.ndarray,
    var: np.ndarray,
    var_err: np.ndarray,
    *,
    model: str = "linear",
    max_mean: float | None = None,
    reject_sigma: float = 5.0,
) -> PTCFit:
    """Fit the photon transfer curve.

    Parameters
    ----------
    mean, var, var_err : numpy.ndarray
        PTC points (L,): mean (ADU), variance (ADU^2) and its 1-sigma error
        (ADU^2), e.g. from :func:`pair_stats`.
    model : {"linear", "astier"}
        ``var = mean/g + (rn/g)^2``, or the Astier+19 exponential form.
    max_mean : float, optional
        Additional upper limit on the mean of fitted points (ADU).
    reject_sigma : float
        Points are fitted below the turnoff only; then the point with the
        largest normalised residual is rejected while it exceeds this many
        sigma, and the fit is repeated.

    Returns
    -------
    PTCFit
        Gain (e-/ADU), read noise (e-, ADU), ``a00`` (1/e-, Astier only),
        turnoff (ADU), full well (e-), used points, reduced chi-square and
        normalised residuals. Parameter errors come from the covariance of the
        weighted fit, scaled by ``sqrt(chi2_red)`` when ``chi2_red > 1``.

    Notes
    -----
    The weights use the input ``var_err``. For pair statistics these come from
    the observed variance of >= 1e4 pixels, so the correlation between a point
    and its weight biases the fit by O(1/n_pixels), negligible here (unlike
    the per-pixel fit of :mod:`sitiancal.compute.gain`).
    """
    if model not in _MODELS:
        raise ValueError(f"model must be one of {_MODELS}, got {model!r}")
    mu = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    e = np.asarray(var_err, dtype=np.float64).ravel()
    if not mu.shape == v.shape == e.shape:
        raise ValueError("mean, var and var_err must have the same length")
    n_par = 2 if model == "linear" else 3

    turnoff = find_turnoff(mu, v)
    finite = np.isfinite(mu) & np.isfinite(v) & np.isfinite(e) & (e > 0)
    used = finite.copy()
    curve = np.isfinite(mu) & np.isfinite(v)
    if curve.any():
        peak_mean = mu[curve][np.argmax(v[curve])]
        if peak_mean < np.max(mu[curve]):
            # A turnover was seen: keep the points strictly below the maximum-variance point.
            used &= mu < peak_mean
    if max_mean is not None:
        used &= mu <= max_mean
    if used.sum() < n_par + 1:
        raise ValueError(f"need at least {n_par + 1} usable PTC points, got {int(used.sum())}")

    def fit(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if model == "linear":
            params, cov = _fit_linear(mu[mask], v[mask], e[mask])
            pred = params[0] * mu + params[1]
        else:
            lin, _ = _fit_linear(mu[mask], v[mask], e[mask])
            g0 = 1.0 / lin[0]
            p0 = (0.0, g0, max(lin[1], 0.0) * g0**2)
            params, cov = curve_fit(
                _astier, mu[mask], v[mask], p0=p0, sigma=e[mask], absolute_sigma=True, maxfev=20000
            )
            pred = _astier(mu, *params)
        return params, cov, pred

    while True:
        params, cov, pred = fit(used)
        resid = np.full_like(mu, np.nan)
        resid[finite] = (v[finite] - pred[finite]) / e[finite]
        worst = np.where(used, np.abs(resid), -np.inf)
        k = int(np.argmax(worst))
        if worst[k] <= reject_sigma or used.sum() <= n_par + 1:
            break
        used[k] = False

    dof = int(used.sum()) - n_par
    chi2_red = float(np.sum(resid[used] ** 2) / dof) if dof > 0 else float("nan")
    scale = max(chi2_red, 1.0) if np.isfinite(chi2_red) else 1.0
    cov = cov * scale

    if model == "linear":
        slope, icpt = params
        gain = 1.0 / slope
        gain_err = np.sqrt(cov[0, 0]) / slope**2
        a00 = a00_err = float("nan")
        if icpt > 0:
            rn_adu = np.sqrt(icpt)
            rn_e = gain * rn_adu
            # rn_e = sqrt(b) / a: gradient with respect to (a, b).
            grad = np.array([-rn_adu / slope**2, 0.5 / (slope * rn_adu)])
            rn_e_err = float(np.sqrt(grad @ cov @ grad))
        else:
            rn_adu = rn_e = rn_e_err = float("nan")
    else:
        a00, gain, n00 = params
        gain_err = np.sqrt(cov[1, 1])
        a00_err = float(np.sqrt(cov[0, 0]))
        if n00 > 0:
            rn_e = np.sqrt(n00)
            rn_e_err = float(np.sqrt(cov[2, 2]) / (2.0 * rn_e))
            rn_adu = rn_e / gain
        else:
            rn_adu = rn_e = rn_e_err = float("nan")

    return PTCFit(
        model=model,
        gain=float(gain),
        gain_err=float(gain_err),
        read_noise_e=float(rn_e),
        read_noise_e_err=float(rn_e_err),
        read_noise_adu=float(rn_adu),
        a00=float(a00),
        a00_err=float(a00_err),
        turnoff_adu=float(turnoff),
        full_well_e=float(turnoff * gain),
        used=used,
        chi2_red=chi2_red,
        residuals=resid,
    )
