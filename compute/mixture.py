"""1-D Gaussian mixtures of noisy measurements (extreme deconvolution).

Per-pixel dark rates and gains are estimates with known, pixel-dependent
1-sigma errors ``e_i``. Their population is modelled as a mixture whose
component ``k`` has an *intrinsic* width ``sigma_k``; a measurement is drawn
from ``N(x_i | mu_k, sigma_k**2 + e_i**2)``. The parameters are fitted by the
EM algorithm of extreme deconvolution (Bovy, Hogg & Roweis 2011, AnnApSt 5,
1657, section 2, restricted to one dimension), initialised from
:class:`sklearn.mixture.GaussianMixture` fits with several seeded restarts
(compiled here, :func:`_sklearn_gmm_em`: the same EM, tested against
sklearn's), and the number of components is chosen by the Bayesian
information criterion.

EM converges linearly, and very slowly when the errors dominate the
intrinsic widths (hundreds of iterations for the bimodal-gain case). Each
candidate therefore runs a short EM burn-in from every initialisation, the
best start is refined by L-BFGS-B on the exact log-likelihood (the hybrid
scheme of Jamshidian & Jennrich 1997), and EM is then resumed from that
point until the log-likelihood changes by less than ``tol`` per point:
``converged`` is EM's own criterion, met at the optimum.

Numerics
--------
The fit runs on a robust-standardised scale ``z = (x - median) / s`` with
``s = 1.4826 * MAD``, so hot pixels orders of magnitude above the median do
not spoil the conditioning (a broad component catches them). A variance of
``1e-6`` (standardised units, sklearn's ``reg_covar``) is added to every
component's total variance during the fit only, so that points without
errors cannot collapse a component onto themselves; the reported widths are
the intrinsic ones, floored at 0.

Uncertainties of the parameters come from the outer product of the per-point
score vectors (the empirical Fisher information) at the optimum, inverted
after scaling to unit diagonal (see :func:`_fisher_errors`).

Speed (``method="auto"``)
-------------------------
Chosen by measurement on 1e6-point samples shaped like the real uses
(scratch benchmark, 2-core VM shared with other jobs, load average 2.5-9):

- *Compiled E-step.* One numba pass (:func:`_xd_sums_serial`) gives the
  log-likelihood and the five per-component sums from which both the M-step
  and the L-BFGS gradient follow, with one exponential per component and one
  logarithm per point and no (K, N) temporaries: 25-50 ms per 1e6 points
  against 90-150 ms for the numpy E+M step. Alone that is only 2-4x: the
  cost is the number of passes (the L-BFGS line searches and EM tail add up
  to hundreds per candidate).
- *Exact data reduction* (:func:`_reduce`). The points are binned on a 2-D
  grid: rows of ``ln e`` 0.01 wide, and in each row value bins 0.05 times
  the row's smallest error wide (so at most 1/20 of any point's total
  width). A cell enters EM as one entry with a multiplicity, the mean value,
  and the mean squared error *less* the within-cell variance of the values
  (Sheppard's correction: the collapse removes that spread, so taking it
  off the errors keeps ``sum (z^2 - e^2)``, the moment estimate of the
  intrinsic variance, exact; adding it instead biased the narrow gain
  widths by 0.4 Fisher sigma, see :func:`_reduce`). 1e6 gain- or dark-like
  points become 10 000-30 000 cells (reduction 35-100x, 0.2-0.7 s), and an
  EM pass over them takes ~2 ms, so EM runs there to a 10x tighter
  tolerance (:data:`_BINNED_TOL_FACTOR`). BIC still counts ``N`` points.
- *BHHH step on the full data* (:func:`_score_step`). From the binned
  optimum, one Fisher-scoring step with the full-data gradient and the
  empirical information (computed anyway for the errors) lands on the
  optimum of the unreduced likelihood to second order; the reported
  log-likelihood and BIC are those of every point. Measured differences from
  the full-likelihood optimum: below 0.003 Fisher sigma for well-specified
  candidates, ~0.006 sigma for a misspecified one (one component fitted to a
  bimodal sample, where the outer-product information is not the Hessian,
  hence the step halving); the tests require < 0.02 sigma on six simulated
  populations and the same number of components as the reference.
- The numba kernels use fixed 16 384-point chunks (results do not depend on
  the thread count); the EM sums run serially below :data:`_PARALLEL_MIN`
  points, since a parallel region on the busy 2-core VM cost up to 10 ms,
  five times a pass over the cells.
- Evaluated and not adopted: SQUAREM / more quasi-Newton (with ~2 ms passes
  the pass count no longer matters); warm starts across the number of
  components (they would change the starting points, hence possibly the
  local optimum found, i.e. the answers). The sklearn initialisations on
  20 000 points are kept unchanged for that reason and are now the largest
  single cost (1.5-4 s).

Timings at 1e6 points (before: the numpy implementation, ``"reference"``;
after: ``"auto"``), same data, same answers (see the tests):

=============================  ========  ===========  ======  ===================
1e6 points (max components)    before    after        cells   max |diff| / sigma
=============================  ========  ===========  ======  ===================
gain-like, ln g, 94/6 %, (3)   21.1 s    1.6-2.2 s    26 085  0.001 (0.0003)
dark-like, e-/s, (4)           48.5 s    2.4-2.5 s    23 973  0.012 (0.012)
overlapping 60/40 %, (3)       19.1 s    3.2-3.6 s    24 639  0.0008
bench set 61 MP, ln g (3)      29.5 s    1.4-1.6 s     9 805  0.0001
bench set 61 MP, dark (4)      99.7 s    4.3-5.0 s    27 419  0.06 (0.007)
=============================  ========  ===========  ======  ===================

The last column: largest difference of the chosen model's weights, means
and widths from the numpy reference in units of their Fisher errors, and
in brackets from the optimum of the full likelihood (the compiled exact
path run to ``tol=1e-10``); the reference itself is 0.02 and 0.055 sigma
from that optimum in the two dark cases, where EM's stopping rule ends
early. Same number of components by BIC everywhere; BIC of every
candidate within 0.01 of the reference's except slowly converging,
degenerate candidates (up to 1.0, always in favour of the fast path).
The dark widths' errors are those of the corrected inversion (the
reference's hot-component width errors were ~1e-6 of the width, see
:func:`_fisher_errors`). A compiled pass over 1e6 points takes 25-125 ms
(depending on the load), the information matrix 80-200 ms; the compiled
path without reduction (``"exact"``) takes 15-48 s at ``tol=1e-10``.
"Before" was timed at load average ~3.5, "after" at 2.5-3.5.

``method="exact"`` runs the compiled kernels on every point and
``method="reference"`` the original numpy code; both are kept for the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numba import njit, prange
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.cluster import kmeans_plusplus

__all__ = ["MixtureFit", "MixtureModel", "fit_mixture"]

_LOG_2PI = float(np.log(2.0 * np.pi))
#: Variance added to every component during the fit (standardised units).
_REG_VAR = 1e-6
#: Independent sklearn initialisations per number of components.
_N_RESTARTS = 4
#: XD-EM iterations run from every initialisation before the best one is
#: continued to convergence.
_BURN_IN = 25
#: Points used by the sklearn initialisations.
_INIT_SAMPLES = 20_000
#: Width of the error rows of the data reduction, in ln(error).
_BIN_LOG_ERR = 0.01
#: Width of the value bins of the data reduction, as a fraction of the
#: smallest error of their row.
_BIN_REL_WIDTH = 0.05
#: ``method="auto"`` runs EM on the cells when they are at least this many
#: times fewer than the points.
_MIN_REDUCTION = 4.0
#: EM on the cells runs to ``tol`` times this: EM's stopping rule (a change
#: of the mean log-likelihood below ``tol`` per EM step) can stop short of the
#: optimum by 0.05-0.1 Fisher sigma where EM crawls (two overlapping dark
#: populations on the 61 MP bench set: 0.055 sigma for the numpy reference),
#: and the extra passes cost ~2 ms each on the cells (~0.4 s for 4 components).
_BINNED_TOL_FACTOR = 0.1
#: Points per block of :meth:`MixtureModel.classify`.
_CLASSIFY_BLOCK = 1 << 20

Method = Literal["auto", "binned", "exact", "reference"]


def _log_normal(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``log N(x | mu, var)`` with broadcasting."""
    return -0.5 * (_LOG_2PI + np.log(var) + (x - mu) ** 2 / var)


@dataclass(frozen=True)
class MixtureModel:
    """A fitted 1-D mixture; components sorted by mean.

    Attributes
    ----------
    weights : ndarray (K,)
        Mixing fractions (sum to 1).
    means : ndarray (K,)
        Component centres, in the units of the data.
    sigmas : ndarray (K,)
        Intrinsic (deconvolved) widths, >= 0, units of the data.
    loglike : float
        Log-likelihood of the fitted sample (natural log, data units).
    bic : float
        ``-2 loglike + (3K - 1) ln n_samples``.
    n_samples : int
        Number of points the fit used (after subsampling).
    converged : bool
        Whether EM met its tolerance within ``max_iter`` iterations.
    weights_err, means_err, sigmas_err : ndarray (K,) or None
        1-sigma errors from the empirical Fisher information. ``sigmas_err``
        comes from the variance error by the delta method; for a width
        consistent with 0 it is the width at which the variance is 1 sigma
        from 0.
    n_iter : int
        EM iterations run on the retained initialisation.
    """

    weights: np.ndarray
    means: np.ndarray
    sigmas: np.ndarray
    loglike: float
    bic: float
    n_samples: int
    converged: bool
    weights_err: np.ndarray | None = None
    means_err: np.ndarray | None = None
    sigmas_err: np.ndarray | None = None
    n_iter: int = 0

    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return int(np.asarray(self.weights).size)

    def _log_joint(self, x: np.ndarray, err: np.ndarray | float) -> np.ndarray:
        """``log w_k + log N(x | mu_k, sigma_k^2 + err^2)``, shape (N, K)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
        e = np.asarray(err, dtype=np.float64)
        e = np.broadcast_to(e.reshape(-1, 1) if e.ndim else e, x.shape)
        var = np.maximum(self.sigmas[None, :] ** 2 + e**2, np.finfo(np.float64).tiny)
        with np.errstate(divide="ignore"):
            logw = np.log(self.weights)
        return logw[None, :] + _log_normal(x, self.means[None, :], var)

    def pdf(self, x: np.ndarray | float, err: np.ndarray | float = 0.0) -> np.ndarray:
        """Density of a measurement ``x`` with error ``err`` (1 / data units).

        Parameters
        ----------
        x : array_like
            Measured values (data units).
        err : array_like or float
            1-sigma measurement errors, broadcast against ``x``; 0 gives the
            intrinsic population density.
        """
        x_arr = np.asarray(x, dtype=np.float64)
        lj = self._log_joint(x_arr, np.broadcast_to(np.asarray(err, float), x_arr.shape))
        return np.exp(logsumexp(lj, axis=1)).reshape(x_arr.shape)

    def responsibilities(self, x: np.ndarray, err: np.ndarray | float) -> np.ndarray:
        """Posterior membership probabilities, shape (N, K), of flattened ``x``."""
        x_arr = np.asarray(x, dtype=np.float64).ravel()
        lj = self._log_joint(x_arr, np.broadcast_to(np.asarray(err, float), np.shape(x)).ravel())
        return np.exp(lj - logsumexp(lj, axis=1, keepdims=True))

    def classify(self, x: np.ndarray, err: np.ndarray | float, *,
                 block: int = _CLASSIFY_BLOCK) -> np.ndarray:
        """Most probable component of each (flattened) point, shape (N,), intp.

        Parameters
        ----------
        x : array_like
            Measured values (data units); float32 is read as it is.
        err : array_like or float
            1-sigma errors (data units), broadcast against ``x``.
        block : int
            Points converted and classified at a time: float32/float64 input
            is read in place by a compiled kernel (parallel, no temporaries);
            other dtypes are converted to float64 one block at a time, so a
            61 MP map needs O(block) temporaries besides the output.
        """
        x_arr = np.ravel(np.asarray(x))
        e_arr = np.asarray(err)
        if e_arr.size == 1 and x_arr.size != 1:
            e_arr = e_arr.reshape(1)
        else:
            e_arr = np.ravel(np.broadcast_to(e_arr, np.shape(x)))
        w = np.asarray(self.weights, dtype=np.float64)
        with np.errstate(divide="ignore"):
            logw = np.log(w)
        mu = np.ascontiguousarray(self.means, dtype=np.float64)
        s2 = np.asarray(self.sigmas, dtype=np.float64) ** 2
        out = np.empty(x_arr.size, dtype=np.intp)
        floats = (np.float32, np.float64)

        def as_float(a: np.ndarray) -> np.ndarray:
            # read-only views: numba compiles a kernel per array type, read-only
            # included, and whether a caller's array is writeable (a broadcast is
            # not) should not make another compilation
            view = (a if a.dtype in floats else a.astype(np.float64)).view()
            view.flags.writeable = False
            return view

        shared = e_arr.size == 1 and x_arr.size != 1
        e_shared = as_float(e_arr) if shared else None
        for lo in range(0, x_arr.size, block):
            sl = slice(lo, lo + block)
            eb = e_shared if e_shared is not None else as_float(e_arr[sl])
            _classify_kernel(as_float(x_arr[sl]), eb, logw, mu, s2, out[sl])
        return out

    def to_dict(self) -> dict:
        """JSON-able summary."""

        def _lst(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(v) for v in np.asarray(a)]

        return {
            "n_components": self.n_components,
            "weights": _lst(self.weights),
            "weights_err": _lst(self.weights_err),
            "means": _lst(self.means),
            "means_err": _lst(self.means_err),
            "sigmas": _lst(self.sigmas),
            "sigmas_err": _lst(self.sigmas_err),
            "loglike": float(self.loglike),
            "bic": float(self.bic),
            "n_samples": int(self.n_samples),
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
        }


@dataclass(frozen=True)
class MixtureFit:
    """Result of :func:`fit_mixture`.

    Attributes
    ----------
    best : MixtureModel
        The candidate with the lowest BIC.
    candidates : tuple of MixtureModel
        One model per number of components tried (1, 2, ...).
    n_input : int
        Number of finite input points before subsampling.
    """

    best: MixtureModel
    candidates: tuple[MixtureModel, ...]
    n_input: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-able summary (best model, BIC of every candidate)."""
        return {
            "best": self.best.to_dict(),
            "n_components": self.best.n_components,
            "bic": {str(m.n_components): float(m.bic) for m in self.candidates},
            "candidates": [m.to_dict() for m in self.candidates],
            "n_input": int(self.n_input),
            "n_samples": int(self.best.n_samples),
            "method": "extreme deconvolution EM (Bovy+2011), BIC selection",
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Sample:
    """Standardised data the EM runs on.

    ``cnt`` holds the multiplicity of each entry (``None``: one point each);
    ``n`` is the number of points represented; ``e2_med`` the median squared
    error of the original points (the polish preconditioner, so that every
    representation of the same data starts L-BFGS identically).
    """

    z: np.ndarray
    e2: np.ndarray
    cnt: np.ndarray | None
    n: int
    e2_med: float
    compiled: bool = True


def _reduce(z: np.ndarray, e2: np.ndarray, *, rel_width: float = _BIN_REL_WIDTH,
            log_err_step: float = _BIN_LOG_ERR) -> _Sample:
    """Reduction of ``(z_i, e_i)`` onto a 2-D grid of cells, exact to second order.

    Rows are bins of ``ln e`` of width ``log_err_step``; in row ``j`` (errors
    in ``[E_j, E_j exp(step))``) the values are binned with width
    ``h_j = rel_width E_j``, so a cell is at most ``rel_width`` of the
    smallest total width ``sqrt(sigma_k^2 + e_i^2)`` of any of its points.
    A cell becomes one entry with multiplicity ``n_c``, value ``mean z``,
    and squared error ``mean e^2 - var_c(z)`` (Sheppard's correction): the
    collapse removes the within-cell spread of the values (about
    ``h_j^2 / 12``), so that spread is taken off the errors, which keeps
    ``sum (z^2 - e^2)`` (the moment estimate of the intrinsic variance)
    exact. Without it the intrinsic variances come out ``h^2 / 12`` low
    (2e-4 of ``e^2`` at ``rel_width = 0.05``). Measured on 2e5 gain-like
    points (10 % errors, 1 % widths), width of the single-component fit:
    with the correction added instead of subtracted 0.42 Fisher sigma low
    at ``rel_width = 0.1``, with it subtracted 0.08 sigma (0.1) and 0.026
    sigma (0.05, ``log_err_step = 0.01``, the defaults). What remains (terms
    of order ``h^4`` and ``(step e^2)^2``, and a zero-mean term of relative
    size ``rel_width``) is removed by :func:`_score_step`. Points with a zero error cannot be binned
    this way and are kept as they are (``var_c <= h^2 / 4 < e^2``, so the
    reduced errors stay positive).
    """
    n = z.size
    e = np.sqrt(e2)
    pos = e > 0
    zp, e2p = z[pos], e2[pos]
    row = np.floor(np.log(e[pos]) / log_err_step)
    h = rel_width * np.exp(row * log_err_step)
    col = np.floor(zp / h)
    # keys must fit 63 bits: |col| < 2^40 (others kept single); rows span < 2^22
    # (positive float64 errors span ln e in [-745, 710]: < 150 000 rows of 0.01)
    fits = np.abs(col) < 2.0**40
    if not fits.all():
        keep = ~fits
        extra_z, extra_e2 = zp[keep], e2p[keep]
        zp, e2p, row, h, col = zp[fits], e2p[fits], row[fits], h[fits], col[fits]
    else:
        extra_z = extra_e2 = np.empty(0)
    irow = row.astype(np.int64)
    key = ((irow - irow.min(initial=0)) << 41) + (col.astype(np.int64) + (1 << 40))
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    cnt = np.bincount(inv).astype(np.float64)
    u = zp - col * h  # offset from the cell's lower edge, in [0, h)
    su = np.bincount(inv, u) / cnt
    var_c = np.maximum(np.bincount(inv, u * u) / cnt - su * su, 0.0)
    zc = col[first] * h[first] + su
    e2c = np.bincount(inv, e2p) / cnt - var_c
    zero_z, zero_e2 = z[~pos], e2[~pos]
    n_single = zero_z.size + extra_z.size
    return _Sample(
        z=np.ascontiguousarray(np.concatenate([zc, zero_z, extra_z])),
        e2=np.ascontiguousarray(np.concatenate([e2c, zero_e2, extra_e2])),
        cnt=np.concatenate([cnt, np.ones(n_single)]),
        n=int(n), e2_med=float(np.median(e2)))


# --------------------------------------------------------------------------- kernels


#: Points per chunk of the compiled kernels. Fixed (not per thread), so that
#: the partial sums, and hence the results, do not depend on the thread count.
_CHUNK = 1 << 14
#: Smallest sample for which the EM sums run on several threads: a parallel
#: region costs ~0.1 ms on an idle machine but up to ~10 ms when the cores
#: are busy, more than a serial pass over the ~30 000 cells of a reduction.
_PARALLEL_MIN = 1 << 18


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _point_resp(zi: float, e2i: float, w: np.ndarray, mu: np.ndarray, v: np.ndarray,
                reg: float, p: np.ndarray, dev: np.ndarray, inv: np.ndarray) -> float:
    """Responsibilities ``p``, residuals ``dev`` and inverse total variances
    ``inv`` of one point; returns its log-likelihood plus ``ln(2 pi) / 2``.

    ``w_k N_k = w_k T_k^{-1/2} exp(q_k) / sqrt(2 pi)``, scaled by ``exp(-max q)``:
    one exponential per component and one logarithm per point. When the
    scaled sum underflows (a point only explained by a component of
    negligible weight) the point is redone in log space.
    """
    k = mu.size
    m = -np.inf
    for j in range(k):
        t = 1.0 / (v[j] + e2i + reg)
        d = zi - mu[j]
        inv[j] = t
        dev[j] = d
        q = -0.5 * d * d * t
        p[j] = q
        if q > m:
            m = q
    s = 0.0
    for j in range(k):
        pj = w[j] * math.sqrt(inv[j]) * math.exp(p[j] - m)
        p[j] = pj
        s += pj
    if s > 1e-280:
        rs = 1.0 / s
        for j in range(k):
            p[j] *= rs
        return m + math.log(s)
    top = -np.inf
    for j in range(k):
        lj = math.log(w[j]) + 0.5 * math.log(inv[j]) - 0.5 * dev[j] * dev[j] * inv[j]
        p[j] = lj
        if lj > top:
            top = lj
    s = 0.0
    for j in range(k):
        p[j] = math.exp(p[j] - top)
        s += p[j]
    for j in range(k):
        p[j] /= s
    return top + math.log(s)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _xd_sums_chunk(z: np.ndarray, e2: np.ndarray, cnt: np.ndarray, w: np.ndarray,
                   mu: np.ndarray, v: np.ndarray, reg: float, lo: int, hi: int,
                   acc: np.ndarray) -> None:
    """Add the sums of points ``lo:hi`` to ``acc`` (see :func:`_xd_sums_serial`)."""
    k = mu.size
    weighted = cnt.size == z.size
    p = np.empty(k)
    dev = np.empty(k)
    inv = np.empty(k)
    for i in range(lo, hi):
        ci = cnt[i] if weighted else 1.0
        acc[0] += ci * _point_resp(z[i], e2[i], w, mu, v, reg, p, dev, inv)
        er = e2[i] + reg
        for j in range(k):
            r = ci * p[j]
            ri = r * inv[j]
            rdi = ri * dev[j]
            acc[1 + j] += r
            acc[1 + k + j] += rdi
            acc[1 + 2 * k + j] += rdi * dev[j] * inv[j]
            acc[1 + 3 * k + j] += ri
            acc[1 + 4 * k + j] += ri * er


@njit(cache=True, nogil=True, error_model="numpy")
def _xd_sums_serial(z: np.ndarray, e2: np.ndarray, cnt: np.ndarray, w: np.ndarray,
                    mu: np.ndarray, v: np.ndarray, reg: float) -> np.ndarray:
    """Per-chunk sums ``(n_chunks, 1 + 5K)``: ``sum c_i ll_i`` and, per component,
    ``sum c r``, ``sum c r d/T``, ``sum c r d^2/T^2``, ``sum c r/T`` and
    ``sum c r (e^2 + reg)/T`` (``c``: multiplicity; ``cnt.size == 0``: 1)."""
    nch = (z.size + _CHUNK - 1) // _CHUNK
    out = np.zeros((nch, 1 + 5 * mu.size))
    for c in range(nch):
        _xd_sums_chunk(z, e2, cnt, w, mu, v, reg, c * _CHUNK, min(z.size, (c + 1) * _CHUNK), out[c])
    return out


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _xd_sums_parallel(z: np.ndarray, e2: np.ndarray, cnt: np.ndarray, w: np.ndarray,
                      mu: np.ndarray, v: np.ndarray, reg: float) -> np.ndarray:
    """:func:`_xd_sums_serial` with the chunks spread over numba's threads."""
    nch = (z.size + _CHUNK - 1) // _CHUNK
    out = np.zeros((nch, 1 + 5 * mu.size))
    for c in prange(nch):
        _xd_sums_chunk(z, e2, cnt, w, mu, v, reg, c * _CHUNK, min(z.size, (c + 1) * _CHUNK), out[c])
    return out


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _xd_info_kernel(z: np.ndarray, e2: np.ndarray, w: np.ndarray, mu: np.ndarray,
                    v: np.ndarray, reg: float) -> np.ndarray:
    """Per-chunk outer products of the per-point scores of (free w, mu, v),
    ``(n_chunks, P, P)`` with ``P = 3K - 1`` (upper triangles filled)."""
    n = z.size
    k = mu.size
    npar = 3 * k - 1
    nch = (n + _CHUNK - 1) // _CHUNK
    out = np.zeros((nch, npar, npar))
    for c in prange(nch):
        p = np.empty(k)
        dev = np.empty(k)
        inv = np.empty(k)
        g = np.empty(npar)
        acc = np.zeros((npar, npar))
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            _point_resp(z[i], e2[i], w, mu, v, reg, p, dev, inv)
            o = k - 1
            last = p[k - 1] / w[k - 1]
            for j in range(k - 1):
                g[j] = p[j] / w[j] - last
            for j in range(k):
                di = dev[j] * inv[j]
                g[o + j] = p[j] * di
                g[o + k + j] = 0.5 * p[j] * (di * di - inv[j])
            for a in range(npar):
                ga = g[a]
                for b in range(a, npar):
                    acc[a, b] += ga * g[b]
        out[c] = acc
    return out


@njit(cache=True, nogil=True, parallel=True)
def _classify_kernel(x: np.ndarray, e: np.ndarray, logw: np.ndarray, mu: np.ndarray,
                     s2: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = argmax_k log w_k + log N(x_i | mu_k, s2_k + e_i^2)`` (first
    maximum, as :func:`numpy.argmax`); ``e`` of size 1 is shared by all points."""
    n = x.size
    k = mu.size
    shared = e.size == 1
    tiny = np.finfo(np.float64).tiny
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            xi = np.float64(x[i])
            ei = np.float64(e[0]) if shared else np.float64(e[i])
            best = -np.inf
            arg = 0
            for j in range(k):
                var = max(s2[j] + ei * ei, tiny)
                d = xi - mu[j]
                lj = logw[j] + -0.5 * (_LOG_2PI + math.log(var) + d * d / var)
                if lj > best:
                    best = lj
                    arg = j
            out[i] = arg


# --------------------------------------------------------------------------- EM


@dataclass
class _State:
    w: np.ndarray
    mu: np.ndarray
    v: np.ndarray  # intrinsic variances (standardised units)
    ll: float = -np.inf
    n_iter: int = 0
    converged: bool = False


def _e_step(z: np.ndarray, e2: np.ndarray, s: _State) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Reference (numpy) E-step: responsibilities, residuals ``z - mu``,
    inverse total variances (all (K, N)) and the mean log-likelihood per point.

    Arrays are laid out (K, N) so that the reductions over components are
    element-wise operations on contiguous rows.
    """
    inv = 1.0 / (s.v[:, None] + e2[None, :] + _REG_VAR)
    dev = z[None, :] - s.mu[:, None]
    with np.errstate(divide="ignore"):
        lj = np.log(inv)
        lj -= dev * dev * inv
        lj *= 0.5
        lj += (np.log(s.w) - 0.5 * _LOG_2PI)[:, None]
    top = np.max(lj, axis=0)
    lj -= top
    r = np.exp(lj, out=lj)
    tot = np.sum(r, axis=0)
    r /= tot
    ll = float(np.mean(top + np.log(tot)))
    return r, dev, inv, ll


def _moments(d: _Sample, s: _State) -> tuple[float, np.ndarray]:
    """Mean log-likelihood per point and the sums ``(5, K)`` of
    ``r``, ``r dev/T``, ``r dev^2/T^2``, ``r/T``, ``r (e^2 + reg)/T``
    (weighted by the multiplicities), compiled or numpy reference."""
    k = s.w.size
    if d.compiled:
        cnt = d.cnt if d.cnt is not None else np.empty(0)
        kernel = _xd_sums_parallel if d.z.size >= _PARALLEL_MIN else _xd_sums_serial
        tot = kernel(d.z, d.e2, cnt, s.w, s.mu, s.v, _REG_VAR).sum(axis=0)
        return float(tot[0] / d.n - 0.5 * _LOG_2PI), tot[1:].reshape(5, k)
    if d.cnt is not None:
        raise ValueError("the numpy reference runs on unreduced points only")
    r, dev, inv, ll = _e_step(d.z, d.e2, s)
    ri = r * inv
    rdi = ri * dev
    sums = np.stack([r.sum(axis=1), rdi.sum(axis=1), np.einsum("kn,kn->k", rdi, dev * inv),
                     ri.sum(axis=1), ri @ (d.e2 + _REG_VAR)])
    return ll, sums


def _m_step(sums: np.ndarray, s: _State, n: int) -> _State:
    """XD M-step (Bovy+2011 eqs. 17-19 in 1-D) from the sums of :func:`_moments`.

    With ``g = v_k / T_ik`` the posterior mean of the true value of point i
    under component k is ``b_ik = mu_k + g (z_i - mu_k)`` and its posterior
    variance is ``v_k (1 - g) = v_k (e_i^2 + reg) / T_ik``, so
    ``mu_new - mu = v sum(r dev/T) / n_k`` and
    ``v_new = (v^2 sum(r dev^2/T^2) + v sum(r (e^2+reg)/T)) / n_k - (mu_new - mu)^2``.
    """
    nk, a, b, _, c = sums
    nk_safe = np.maximum(nk, 1e-300)
    shift = s.v * a / nk_safe
    mu = s.mu + shift
    var = (s.v * s.v * b + s.v * c) / nk_safe - shift * shift
    w = np.maximum(nk / n, 1e-300)
    # Dead components keep their previous location (they carry no weight).
    dead = nk < 1e-12
    mu = np.where(dead, s.mu, mu)
    var = np.where(dead, s.v, np.maximum(var, 0.0))
    return _State(w / w.sum(), mu, var)


def _run_em(d: _Sample, s: _State, *, max_iter: int, tol: float) -> _State:
    """Iterate XD-EM from ``s`` until the mean log-likelihood changes by < ``tol``."""
    ll_old = -np.inf
    n_done = s.n_iter
    for _ in range(max_iter):
        ll, sums = _moments(d, s)
        n_done += 1
        if abs(ll - ll_old) < tol:
            return _State(s.w, s.mu, s.v, ll, n_done, True)
        ll_old = ll
        s = _m_step(sums, s, d.n)
    ll = _moments(d, s)[0]
    return _State(s.w, s.mu, s.v, ll, n_done, False)


def _polish(d: _Sample, s: _State, *, max_iter: int, tol: float) -> _State:
    """Quasi-Newton (L-BFGS-B) refinement of an EM solution.

    EM converges linearly and slowly when the errors dominate the intrinsic
    widths; the hybrid EM then quasi-Newton scheme (Jamshidian & Jennrich
    1997, JRSS B 59, 569) finishes the climb. Parameters: softmax logits of
    the weights, and means and widths in units of each component's initial
    total width ``c_k`` (a diagonal preconditioner); ``v_k = (c_k q_k)^2``.
    """
    k = s.w.size
    c = np.sqrt(s.v + d.e2_med + _REG_VAR)

    def unpack(p: np.ndarray) -> _State:
        a = p[:k] - p[:k].max()
        w = np.exp(a)
        return _State(w / w.sum(), c * p[k : 2 * k], (c * p[2 * k :]) ** 2)

    def fun(p: np.ndarray) -> tuple[float, np.ndarray]:
        st = unpack(p)
        ll, (nk, a, b, ci, _) = _moments(d, st)
        g_a = nk / d.n - st.w
        g_mu = a / d.n
        g_v = 0.5 * (b - ci) / d.n
        g_q = g_v * 2.0 * c * p[2 * k :] * c
        return -ll, -np.concatenate([g_a, g_mu * c, g_q])

    p0 = np.concatenate([np.log(s.w), s.mu / c, np.sqrt(s.v) / c])
    res = minimize(fun, p0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "ftol": tol * 1e-3, "gtol": 1e-9})
    out = unpack(res.x)
    ll = _moments(d, out)[0]
    if ll < s.ll:  # never accept a worse point than EM's
        return s
    return _State(out.w, out.mu, out.v, ll, s.n_iter + int(res.nit), False)


@njit(cache=True, nogil=True)
def _sklearn_gmm_em(x: np.ndarray, w0: np.ndarray, mu0: np.ndarray, var0: np.ndarray, reg: float,
                    tol: float, max_iter: int, e2: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool, np.ndarray]:  # pragma: no cover - numba
    """:meth:`sklearn.mixture.GaussianMixture.fit` of 1-D spherical components, from given parameters.

    The EM loop of sklearn (1.4-1.9: ``BaseMixture.fit_predict``), its E-step
    (``_estimate_log_gaussian_prob`` with precisions ``1 / var``, a max-shifted
    log-sum-exp, the mean ``log_prob_norm`` as the lower bound) and M-step
    (``_estimate_gaussian_parameters``: ``nk + 10 eps``, ``var = E[x^2] - mu^2 +
    reg``, weights normalised), stopping when the lower bound changes by less
    than ``tol``. sklearn spends ~4.3 ms per iteration on 20 000 points (its
    array-API log-sum-exp along the short axis); this ~0.3 ms.

    Returns the weights, means and variances (sklearn's ``weights_``,
    ``means_``, ``covariances_``), the iterations run, whether the lower bound
    converged, and each component's responsibility-weighted mean of ``e2``
    (from :meth:`~sklearn.mixture.GaussianMixture.predict_proba`).
    """
    n = x.size
    k = w0.size
    eps10 = 10.0 * np.finfo(np.float64).eps
    w, mu, var = w0.copy(), mu0.copy(), var0.copy()
    lr = np.empty((n, k))  # log-probabilities, then responsibilities
    nk = np.empty(k)
    sx = np.empty(k)
    sxx = np.empty(k)
    lower = -np.inf
    n_iter = 0
    converged = False
    for it in range(max_iter + 1):  # the last pass is the final E-step (predict_proba)
        chol = 1.0 / np.sqrt(var)  # sklearn's precisions_cholesky_
        prec = chol**2
        logdet = np.log(chol)
        mu2p = mu**2 * prec
        logw = np.log(w)
        total = 0.0
        for i in range(n):
            xi = x[i]
            top = -np.inf
            for j in range(k):
                lp = mu2p[j] - 2.0 * (xi * mu[j] * prec[j]) + xi * xi * prec[j]
                v = -0.5 * (_LOG_2PI + lp) + logdet[j] + logw[j]
                lr[i, j] = v
                top = max(top, v)
            acc = 0.0
            for j in range(k):
                lr[i, j] = np.exp(lr[i, j] - top)
                acc += lr[i, j]
            total += top + np.log(acc)
            inv = 1.0 / acc
            for j in range(k):  # responsibilities (sklearn: exp(log_resp), equal within rounding)
                lr[i, j] *= inv
        if converged or it == max_iter:
            break
        prev = lower
        lower = total / n
        nk[:] = 0.0
        sx[:] = 0.0
        sxx[:] = 0.0
        for i in range(n):
            xi = x[i]
            for j in range(k):
                r = lr[i, j]
                nk[j] += r
                sx[j] += r * xi
                sxx[j] += r * (xi * xi)
        for j in range(k):
            nk[j] += eps10
            mu[j] = sx[j] / nk[j]
            # (sklearn refuses a variance <= 0; the floor can only act on rounding)
            var[j] = max(sxx[j] / nk[j] - mu[j] * mu[j] + reg, reg)
        w = nk / nk.sum()
        n_iter = it + 1
        if abs(lower - prev) < tol:
            converged = True
    re = np.zeros(k)
    rs = np.zeros(k)
    for i in range(n):
        for j in range(k):
            r = lr[i, j]
            rs[j] += r
            re[j] += r * e2[i]
    mean_e2 = re / np.maximum(rs, 1e-300)
    return w, mu, var, n_iter, converged, mean_e2


def _sklearn_start(data: np.ndarray, k: int, restart: int, seed: int, reg: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parameters :class:`sklearn.mixture.GaussianMixture` starts from.

    Even restarts: ``init_params="k-means++"`` (:func:`sklearn.cluster.kmeans_plusplus`),
    odd ones ``"random_from_data"``, each with ``RandomState(seed * 1009 + 17 k + restart)``;
    one point per component, as sklearn's ``_initialize`` turns it into weights
    (``nk / n``), means and variances (``reg`` plus rounding).
    """
    rs = np.random.RandomState(seed * 1009 + 17 * k + restart)
    n = data.shape[0]
    if restart % 2 == 0:
        _, idx = kmeans_plusplus(data, k, random_state=rs)
    else:
        idx = rs.choice(n, size=k, replace=False)
    x = data[np.asarray(idx), 0]
    nk = np.ones(k) + 10 * np.finfo(np.float64).eps
    mu = x / nk
    var = (x * x) / nk - mu**2 + reg
    return nk / n, mu, var


def _initial_states(z: np.ndarray, e2: np.ndarray, k: int, seed: int) -> list[_State]:
    """Seeded sklearn GaussianMixture fits converted to intrinsic variances.

    The initialisations are fitted to a seeded subsample of at most
    :data:`_INIT_SAMPLES` points; XD-EM on the full sample follows. Each is
    sklearn's fit (``covariance_type="spherical"``, ``tol=1e-4``,
    ``max_iter=200``, ``reg_covar=_REG_VAR``) run by :func:`_sklearn_gmm_em`.
    """
    states = []
    if z.size > _INIT_SAMPLES:
        pick = np.random.default_rng(seed + 7919 * k).choice(z.size, _INIT_SAMPLES, replace=False)
        z, e2 = z[pick], e2[pick]
    data = np.ascontiguousarray(z, dtype=np.float64).reshape(-1, 1)
    e2 = np.ascontiguousarray(e2, dtype=np.float64)
    for r in range(_N_RESTARTS if k > 1 else 1):
        w0, mu0, var0 = _sklearn_start(data, k, r, seed, _REG_VAR)
        w, mu, var, _, _, mean_e2 = _sklearn_gmm_em(data[:, 0], w0, mu0, var0, _REG_VAR, 1e-4,
                                                    200, e2)
        v = np.maximum(var - mean_e2, 0.05 * var)
        order = np.argsort(mu)
        states.append(_State(w[order], mu[order], v[order]))
    return states


def _information(d: _Sample, s: _State) -> np.ndarray:
    """Empirical Fisher information ``sum_i g_i g_i^T`` of the per-point scores
    ``g_i`` of (w_1..w_{K-1}, mu, v) (``w_K = 1 - sum``), on unreduced points."""
    k = s.w.size
    if d.compiled:
        info = _xd_info_kernel(d.z, d.e2, s.w, s.mu, s.v, _REG_VAR).sum(axis=0)
        return np.triu(info) + np.triu(info, 1).T
    r, dev, inv, _ = _e_step(d.z, d.e2, s)
    rows = [r * dev * inv, 0.5 * r * (dev * dev * inv * inv - inv)]
    if k > 1:
        rows.insert(0, r[:-1] / s.w[:-1, None] - r[-1] / s.w[-1])
    g = np.concatenate(rows, axis=0)
    return g @ g.T


def _scaled_pinv(info: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric information matrix scaled to unit diagonal."""
    d = np.sqrt(np.diag(info))
    d = np.where(d > 0, d, 1.0)
    return np.linalg.pinv(info / np.outer(d, d), rcond=1e-12, hermitian=True) / np.outer(d, d)


def _fisher_errors(info: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """1-sigma errors of (w, mu, v) from the information of :func:`_information`.

    The information is scaled to unit diagonal before the pseudo-inverse:
    in standardised units a broad hot-pixel component has a variance ~1e4
    and an information ~1e-13 of the main component's, below any sensible
    ``rcond``, which then reported its width as known to ~1e-6 instead of
    to a few per cent.
    """
    cov = _scaled_pinv(info)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if k > 1:
        w_err_free = sd[: k - 1]
        cov_w = cov[: k - 1, : k - 1]
        w_err = np.append(w_err_free, np.sqrt(max(float(cov_w.sum()), 0.0)))
        sd = sd[k - 1 :]
    else:
        w_err = np.zeros(1)
    return w_err, sd[:k], sd[k:]


def _score_step(full: _Sample, s: _State) -> tuple[_State, np.ndarray]:
    """One BHHH (Berndt, Hall, Hall & Hausman 1974) step on the unreduced points.

    From the optimum of the binned likelihood, ``delta = I^-1 G`` with ``G``
    the gradient of the full log-likelihood and ``I`` its empirical Fisher
    information moves to the optimum of the full likelihood: the binned
    optimum is a few hundredths of a Fisher sigma away, where the likelihood
    is quadratic to high accuracy. For a well-specified candidate ``I`` is
    the Hessian and one step removes what is left of the binning to second
    order; for a misspecified one (real dark rates are not exactly Gaussian
    populations) the outer product can overshoot, so the step is halved
    (at most twice) until the full log-likelihood increases. The step is
    taken only if ``G^T I^-1 G`` (the score statistic) is below 1 and the
    weights stay positive; widths that would go negative are held. Returns
    the state (with its full-data log-likelihood) and the information at the
    binned optimum, from which the errors are quoted: a step of a few
    hundredths of a sigma changes them by a relative O(1e-4), and that saves
    a pass over the points.
    """
    k = s.w.size
    ll0, (nk, a, b, c, _) = _moments(full, s)
    info = _information(full, s)
    grad = np.concatenate([nk[:-1] / s.w[:-1] - nk[-1] / s.w[-1], a, 0.5 * (b - c)])
    keep = _State(s.w, s.mu, s.v, ll0, s.n_iter, s.converged)
    free = np.ones(grad.size, dtype=bool)
    for _ in range(2):
        step = np.zeros(grad.size)
        step[free] = _scaled_pinv(info[np.ix_(free, free)]) @ grad[free]
        if np.all(s.v + step[2 * k - 1 :] >= 0):
            break
        free[2 * k - 1 :] &= s.v + step[2 * k - 1 :] >= 0
    else:
        return keep, info
    if not float(grad @ step) < 1.0:
        return keep, info
    for frac in (1.0, 0.5, 0.25):
        dp = frac * step
        w_free = s.w[:-1] + dp[: k - 1]
        w_new = np.append(w_free, 1.0 - w_free.sum())
        if not np.all(w_new > 0):
            continue
        new = _State(w_new, s.mu + dp[k - 1 : 2 * k - 1], np.maximum(s.v + dp[2 * k - 1 :], 0.0))
        ll1 = _moments(full, new)[0]
        if ll1 > ll0:
            return _State(new.w, new.mu, new.v, ll1, s.n_iter, s.converged), info
    return keep, info


def _to_model(s: _State, info: np.ndarray, n: int, center: float, scale: float) -> MixtureModel:
    """Back to data units, with BIC and errors (``info``: :func:`_information`)."""
    k = s.w.size
    ll = s.ll * n - n * np.log(scale)  # Jacobian of the standardisation
    w_err, mu_err, v_err = _fisher_errors(info, k)
    sig = np.sqrt(np.maximum(s.v, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        sig_err = np.where(sig**2 > v_err, v_err / (2.0 * sig), np.sqrt(v_err))
    order = np.argsort(s.mu, kind="stable")
    return MixtureModel(
        weights=s.w[order].copy(),
        means=center + scale * s.mu[order],
        sigmas=scale * sig[order],
        loglike=float(ll),
        bic=float(-2.0 * ll + (3 * k - 1) * np.log(n)),
        n_samples=int(n),
        converged=bool(s.converged),
        weights_err=w_err[order],
        means_err=scale * mu_err[order],
        sigmas_err=scale * sig_err[order],
        n_iter=int(s.n_iter),
    )


def _finite_sample(x: np.ndarray | float, err: np.ndarray | float, max_samples: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Finite ``(x, err)`` pairs as float64, subsampled (seeded) to ``max_samples``.

    Indices are chosen before any float64 copy is made, so a float32 61 MP
    map costs one boolean mask and one index array, not float64 copies.
    """
    xa = np.ravel(np.asarray(x))
    ea = np.asarray(err)
    if ea.size == 1 and xa.size != 1:
        ea = ea.reshape(1)
        ok = np.isfinite(xa) & bool(np.isfinite(ea[0]))
        if np.isfinite(ea[0]) and ea[0] < 0 and ok.any():
            raise ValueError("measurement errors must be >= 0")
    else:
        ea = np.ravel(np.broadcast_to(ea, np.shape(x)))
        ok = np.isfinite(xa) & np.isfinite(ea)
        if np.any((ea < 0) & ok):
            raise ValueError("measurement errors must be >= 0")
    idx = np.flatnonzero(ok)
    del ok
    n_input = idx.size
    if n_input > max_samples:
        rng = np.random.default_rng(seed)
        idx = idx[np.sort(rng.choice(n_input, size=max_samples, replace=False))]
    xs = xa[idx].astype(np.float64)
    es = (np.full(idx.size, ea[0], dtype=np.float64) if ea.size == 1 and xa.size != 1
          else ea[idx].astype(np.float64))
    return xs, es, n_input


def fit_mixture(x: np.ndarray, err: np.ndarray | float, *, max_components: int = 4,
                max_samples: int = 200_000, seed: int = 0, tol: float = 1e-7,
                max_iter: int = 1000, method: Method = "auto") -> MixtureFit:
    """Fit 1..``max_components`` deconvolved Gaussian mixtures; pick one by BIC.

    Parameters
    ----------
    x : array_like
        Measurements (any units, e.g. e-/s for dark rates, e-/ADU for gains);
        non-finite values are dropped.
    err : array_like or float
        1-sigma measurement error of each point (same units), >= 0; points
        with a non-finite error are dropped.
    max_components : int
        Largest number of components tried.
    max_samples : int
        At most this many points (a seeded random subsample) enter the fit.
    seed : int
        Seed of the subsample and of the sklearn initialisations.
    tol : float
        Convergence tolerance on the change of the mean log-likelihood per
        point (standardised units) between EM iterations.
    max_iter : int
        Maximum number of EM iterations per candidate.
    method : {"auto", "binned", "exact", "reference"}
        ``"exact"``: compiled kernels on every point; ``"binned"``: compiled
        kernels on the 2-D cells of :func:`_reduce` (the reported
        log-likelihood, BIC and errors are still evaluated on every point);
        ``"auto"`` (default): binned when that shrinks the sample at least
        :data:`_MIN_REDUCTION` times, else exact; ``"reference"``: the
        original numpy implementation, (K, N) arrays, for tests.

    Returns
    -------
    MixtureFit
        The BIC-best model and every candidate, components sorted by mean.
    """
    if method not in ("auto", "binned", "exact", "reference"):
        raise ValueError(f"unknown method {method!r}")
    x, e, n_input = _finite_sample(x, err, max_samples, seed)
    if n_input < 3:
        raise ValueError(f"need at least 3 finite points, got {n_input}")
    notes: list[str] = []
    if n_input > max_samples:
        notes.append(f"fitted a seeded random subsample of {max_samples} of {n_input} points")

    center = float(np.median(x))
    scale = float(1.4826 * np.median(np.abs(x - center)))
    if not scale > 0:
        scale = float(np.std(x))
    if not scale > 0:
        scale = float(np.median(e)) if np.median(e) > 0 else 1.0
    z = (x - center) / scale
    e2 = (e / scale) ** 2
    full = _Sample(z, e2, None, z.size, float(np.median(e2)), compiled=method != "reference")
    data = full
    if method in ("auto", "binned"):
        cells = _reduce(z, e2, rel_width=_BIN_REL_WIDTH, log_err_step=_BIN_LOG_ERR)
        if method == "binned" or cells.z.size * _MIN_REDUCTION <= z.size:
            data = cells
            notes.append(f"EM ran on {cells.z.size} cells of the (value, error) plane "
                         f"holding the {z.size} points")

    # at most one component per 3 points, never more than the distinct values
    k_max = max(1, min(max_components, x.size // 3, np.unique(x).size))
    # On the cells a pass costs ~2 ms: EM runs to a tolerance 10x tighter,
    # which its own criterion at ``tol`` implies (see _BINNED_TOL_FACTOR).
    fit_tol = tol if data is full else tol * _BINNED_TOL_FACTOR
    candidates = []
    for k in range(1, k_max + 1):
        starts = [_run_em(data, s0, max_iter=min(_BURN_IN, max_iter), tol=fit_tol)
                  for s0 in _initial_states(z, e2, k, seed)]
        best = max(starts, key=lambda s: s.ll if np.isfinite(s.ll) else -np.inf)
        if not best.converged:
            best = _polish(data, best, max_iter=max_iter, tol=fit_tol)
            # EM from the polished point confirms convergence (or continues)
            best = _run_em(data, best, max_iter=max(max_iter - best.n_iter, 1), tol=fit_tol)
        if data is not full:
            best, info = _score_step(full, best)
        else:
            info = _information(full, best)
        candidates.append(_to_model(best, info, full.n, center, scale))
    chosen = min(candidates, key=lambda m: m.bic)
    if not chosen.converged:
        notes.append(f"EM did not converge within {max_iter} iterations for the chosen model")
    return MixtureFit(best=chosen, candidates=tuple(candidates), n_input=int(n_input),
                      notes=tuple(notes))
