"""1-D Gaussian mixtures of noisy measurements (extreme deconvolution).

Per-pixel dark rates and gains are estimates with known, pixel-dependent
1-sigma errors ``e_i``. Their population is modelled as a mixture whose
component ``k`` has an *intrinsic* width ``sigma_k``; a measurement is drawn
from ``N(x_i | mu_k, sigma_k**2 + e_i**2)``. The parameters are fitted by the
EM algorithm of extreme deconvolution (Bovy, Hogg & Roweis 2011, AnnApSt 5,
1657, section 2, restricted to one dimension), initialised from
:class:`sklearn.mixture.GaussianMixture` with several seeded restarts, and
the number of components is chosen by the Bayesian information criterion.

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
score vectors (the empirical Fisher information) at the optimum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

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
                 block: int = 1 << 20) -> np.ndarray:
        """Most probable component of each (flattened) point, shape (N,).

        Points are classified in blocks of ``block`` so that a 61 MP map needs
        O(block x K) temporaries, not O(N x K).
        """
        x_arr = np.asarray(x, dtype=np.float64).ravel()
        e_arr = np.broadcast_to(np.asarray(err, float), np.shape(x)).ravel()
        out = np.empty(x_arr.size, dtype=np.intp)
        for lo in range(0, x_arr.size, block):
            sl = slice(lo, lo + block)
            out[sl] = np.argmax(self._log_joint(x_arr[sl], e_arr[sl]), axis=1)
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
    """Responsibilities, residuals ``z - mu``, inverse total variances (all (K, N))
    and the mean log-likelihood per point.

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


def _m_step(r: np.ndarray, dev: np.ndarray, inv: np.ndarray, s: _State) -> _State:
    """XD M-step (Bovy+2011 eqs. 17-19 in 1-D).

    With ``g = v_k / T_ik`` the posterior mean of the true value of point i
    under component k is ``b_ik = mu_k + g (z_i - mu_k)`` and its posterior
    variance is ``v_k (1 - g)``.
    """
    nk = r.sum(axis=1)
    nk_safe = np.maximum(nk, 1e-300)
    v = s.v[:, None]
    gdev = v * inv * dev  # b_ik - mu_k
    rg = r * gdev
    shift = rg.sum(axis=1) / nk_safe  # mu_new - mu_k
    mu = s.mu + shift
    # sum_i r [(b - mu_new)^2 + B] / nk with b - mu_new = gdev - shift
    second = (np.einsum("kn,kn->k", rg, gdev) + np.einsum("kn,kn->k", r, v * (1.0 - v * inv))) / nk_safe
    var = second - shift * shift
    w = np.maximum(nk / r.shape[1], 1e-300)
    # Dead components keep their previous location (they carry no weight).
    dead = nk < 1e-12
    mu = np.where(dead, s.mu, mu)
    var = np.where(dead, s.v, np.maximum(var, 0.0))
    return _State(w / w.sum(), mu, var)


def _run_em(z: np.ndarray, e2: np.ndarray, s: _State, *, max_iter: int, tol: float) -> _State:
    """Iterate XD-EM from ``s`` until the mean log-likelihood changes by < ``tol``."""
    ll_old = -np.inf
    n_done = s.n_iter
    for _ in range(max_iter):
        r, dev, inv, ll = _e_step(z, e2, s)
        n_done += 1
        if abs(ll - ll_old) < tol:
            return _State(s.w, s.mu, s.v, ll, n_done, True)
        ll_old = ll
        s = _m_step(r, dev, inv, s)
    ll = _e_step(z, e2, s)[3]
    return _State(s.w, s.mu, s.v, ll, n_done, False)


def _polish(z: np.ndarray, e2: np.ndarray, s: _State, *, max_iter: int, tol: float) -> _State:
    """Quasi-Newton (L-BFGS-B) refinement of an EM solution.

    EM converges linearly and slowly when the errors dominate the intrinsic
    widths; the hybrid EM then quasi-Newton scheme (Jamshidian & Jennrich
    1997, JRSS B 59, 569) finishes the climb. Parameters: softmax logits of
    the weights, and means and widths in units of each component's initial
    total width ``c_k`` (a diagonal preconditioner); ``v_k = (c_k q_k)^2``.
    """
    k = s.w.size
    c = np.sqrt(s.v + np.median(e2) + _REG_VAR)

    def unpack(p: np.ndarray) -> _State:
        a = p[:k] - p[:k].max()
        w = np.exp(a)
        return _State(w / w.sum(), c * p[k : 2 * k], (c * p[2 * k :]) ** 2)

    def fun(p: np.ndarray) -> tuple[float, np.ndarray]:
        st = unpack(p)
        r, dev, inv, ll = _e_step(z, e2, st)
        n = z.size
        rdi = r * dev * inv
        g_a = r.sum(axis=1) / n - st.w
        g_mu = rdi.sum(axis=1) / n
        g_v = 0.5 * (np.einsum("kn,kn->k", rdi, dev * inv) - np.einsum("kn,kn->k", r, inv)) / n
        g_q = g_v * 2.0 * c * p[2 * k :] * c
        return -ll, -np.concatenate([g_a, g_mu * c, g_q])

    p0 = np.concatenate([np.log(s.w), s.mu / c, np.sqrt(s.v) / c])
    res = minimize(fun, p0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "ftol": tol * 1e-3, "gtol": 1e-9})
    out = unpack(res.x)
    ll = _e_step(z, e2, out)[3]
    if ll < s.ll:  # never accept a worse point than EM's
        return s
    return _State(out.w, out.mu, out.v, ll, s.n_iter + int(res.nit), False)


def _initial_states(z: np.ndarray, e2: np.ndarray, k: int, seed: int) -> list[_State]:
    """Seeded sklearn GaussianMixture fits converted to intrinsic variances.

    The initialisations are fitted to a seeded subsample of at most
    :data:`_INIT_SAMPLES` points; XD-EM on the full sample follows.
    """
    states = []
    if z.size > _INIT_SAMPLES:
        pick = np.random.default_rng(seed + 7919 * k).choice(z.size, _INIT_SAMPLES, replace=False)
        z, e2 = z[pick], e2[pick]
    data = z.reshape(-1, 1)
    for r in range(_N_RESTARTS if k > 1 else 1):
        gm = GaussianMixture(n_components=k, covariance_type="spherical", tol=1e-4,
                             max_iter=200, init_params="k-means++" if r % 2 == 0 else "random_from_data",
                             random_state=np.random.RandomState(seed * 1009 + 17 * k + r),
                             reg_covar=_REG_VAR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(data)
        resp = gm.predict_proba(data)
        mean_e2 = (resp * e2[:, None]).sum(axis=0) / np.maximum(resp.sum(axis=0), 1e-300)
        var = np.asarray(gm.covariances_, dtype=np.float64).reshape(k)
        v = np.maximum(var - mean_e2, 0.05 * var)
        order = np.argsort(gm.means_.ravel())
        states.append(_State(np.asarray(gm.weights_, float)[order],
                             gm.means_.ravel().astype(float)[order], v[order]))
    return states


def _fisher_errors(z: np.ndarray, e2: np.ndarray, s: _State) -> tuple[np.ndarray, ...]:
    """1-sigma errors of (w, mu, v) from the outer product of per-point scores."""
    k = s.w.size
    r, dev, inv, _ = _e_step(z, e2, s)
    g_mu = r * dev * inv
    g_v = 0.5 * r * (dev * dev * inv * inv - inv)
    rows = [g_mu, g_v]
    if k > 1:
        # free weights w_1..w_{K-1}; w_K = 1 - sum
        rows.insert(0, r[:-1] / s.w[:-1, None] - r[-1] / s.w[-1])
    g = np.concatenate(rows, axis=0)
    info = g @ g.T
    cov = np.linalg.pinv(info, rcond=1e-12, hermitian=True)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if k > 1:
        w_err_free = sd[: k - 1]
        cov_w = cov[: k - 1, : k - 1]
        w_err = np.append(w_err_free, np.sqrt(max(float(cov_w.sum()), 0.0)))
        sd = sd[k - 1 :]
    else:
        w_err = np.zeros(1)
    return w_err, sd[:k], sd[k:]


def _to_model(s: _State, z: np.ndarray, e2: np.ndarray, center: float, scale: float,
              log_scale_n: float) -> MixtureModel:
    """Back to data units, with BIC and errors."""
    k = s.w.size
    n = z.size
    ll = s.ll * n - log_scale_n  # Jacobian of the standardisation
    w_err, mu_err, v_err = _fisher_errors(z, e2, s)
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


def fit_mixture(x: np.ndarray, err: np.ndarray | float, *, max_components: int = 4,
                max_samples: int = 200_000, seed: int = 0, tol: float = 1e-7,
                max_iter: int = 1000) -> MixtureFit:
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

    Returns
    -------
    MixtureFit
        The BIC-best model and every candidate, components sorted by mean.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    e = np.broadcast_to(np.asarray(err, dtype=np.float64), np.shape(x)).ravel()
    ok = np.isfinite(x) & np.isfinite(e)
    if np.any(e[ok] < 0):
        raise ValueError("measurement errors must be >= 0")
    x, e = x[ok], e[ok]
    n_input = x.size
    if n_input < 3:
        raise ValueError(f"need at least 3 finite points, got {n_input}")
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    if n_input > max_samples:
        idx = np.sort(rng.choice(n_input, size=max_samples, replace=False))
        x, e = x[idx], e[idx]
        notes.append(f"fitted a seeded random subsample of {max_samples} of {n_input} points")

    center = float(np.median(x))
    scale = float(1.4826 * np.median(np.abs(x - center)))
    if not scale > 0:
        scale = float(np.std(x))
    if not scale > 0:
        scale = float(np.median(e)) if np.median(e) > 0 else 1.0
    z = (x - center) / scale
    e2 = (e / scale) ** 2
    log_scale_n = x.size * np.log(scale)

    # at most one component per 3 points, never more than the distinct values
    k_max = max(1, min(max_components, x.size // 3, np.unique(x).size))
    candidates = []
    for k in range(1, k_max + 1):
        starts = [_run_em(z, e2, s0, max_iter=min(_BURN_IN, max_iter), tol=tol)
                  for s0 in _initial_states(z, e2, k, seed)]
        best = max(starts, key=lambda s: s.ll if np.isfinite(s.ll) else -np.inf)
        if not best.converged:
            best = _polish(z, e2, best, max_iter=max_iter, tol=tol)
            # EM from the polished point confirms convergence (or continues)
            best = _run_em(z, e2, best, max_iter=max(max_iter - best.n_iter, 1), tol=tol)
        candidates.append(_to_model(best, z, e2, center, scale, log_scale_n))
    chosen = min(candidates, key=lambda m: m.bic)
    if not chosen.converged:
        notes.append(f"EM did not converge within {max_iter} iterations for the chosen model")
    return MixtureFit(best=chosen, candidates=tuple(candidates), n_input=int(n_input),
                      notes=tuple(notes))
