"""Extreme-deconvolution mixtures: recovery of known populations.

Tolerances are multiples of the fit's own Fisher errors (themselves checked
against the scatter of repeated fits in ``test_fisher_errors_calibrated``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sitiancal.compute.mixture import MixtureFit, MixtureModel, fit_mixture

# The bimodal camera of the reference study: 85 % / 15 % at 0.254 / 0.272 e-/ADU,
# intrinsic widths 0.002 e-/ADU.
W2, MU1, MU2, SIG = 0.15, 0.254, 0.272, 0.002


def _errors(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-pixel errors log-uniform in 0.002-0.02 e-/ADU (median 0.0063, mean 0.0078):
    above the intrinsic widths everywhere, and up to the separation of the populations."""
    return np.exp(rng.uniform(np.log(0.002), np.log(0.02), n))


def _bimodal(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    second = rng.random(n) < W2
    true = np.where(second, rng.normal(MU2, SIG, n), rng.normal(MU1, SIG, n))
    err = _errors(rng, n)
    return true + rng.normal(0.0, err), err


def _unimodal(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    err = _errors(rng, n)
    return rng.normal(MU1, SIG, n) + rng.normal(0.0, err), err


@pytest.fixture(scope="module")
def bimodal_fit() -> MixtureFit:
    x, e = _bimodal(1, 80_000)
    return fit_mixture(x, e, max_components=3, seed=0)


@pytest.fixture(scope="module")
def unimodal_fit() -> tuple[MixtureFit, np.ndarray]:
    x, e = _unimodal(2, 60_000)
    return fit_mixture(x, e, max_components=3, seed=0), x


def test_bimodal_population_found(bimodal_fit: MixtureFit) -> None:
    best = bimodal_fit.best
    assert best.n_components == 2
    assert best.converged
    # fraction: within 3 Fisher sigma, and the sigma itself is ~0.17 %, so the
    # fraction is known to ~0.5 % (3 sigma)
    assert best.weights_err[1] < 0.002
    assert abs(best.weights[1] - W2) < 3 * best.weights_err[1]
    assert abs(best.weights[1] - W2) < 0.006
    assert np.all(np.abs(best.means - [MU1, MU2]) < 3 * best.means_err), best.means
    assert np.all(np.abs(best.sigmas - SIG) < 3 * best.sigmas_err), best.sigmas
    # BIC prefers 2 over 1 and over 3 components
    bic = {m.n_components: m.bic for m in bimodal_fit.candidates}
    assert bic[2] < bic[1] and bic[2] < bic[3]


def test_unimodal_population_is_one_component(unimodal_fit: tuple[MixtureFit, np.ndarray]) -> None:
    fit, _ = unimodal_fit
    assert fit.best.n_components == 1
    assert [m.n_components for m in fit.candidates] == [1, 2, 3]
    assert fit.candidates[1].bic > fit.candidates[0].bic


def test_widths_are_deconvolved(unimodal_fit: tuple[MixtureFit, np.ndarray]) -> None:
    fit, x = unimodal_fit
    best = fit.best
    # the observed scatter is dominated by the errors ...
    assert np.std(x) > 3 * SIG
    # ... but the fitted width is the intrinsic one
    assert abs(best.sigmas[0] - SIG) < 3 * best.sigmas_err[0]
    assert best.sigmas_err[0] < 0.2 * SIG
    assert abs(best.means[0] - MU1) < 3 * best.means_err[0]


def test_fisher_errors_calibrated() -> None:
    """Pulls of 150 one-component fits (n = 600) have unit scatter."""
    pm, ps = [], []
    for rep in range(150):
        rng = np.random.default_rng(1000 + rep)
        err = rng.uniform(0.5, 2.0, 600)
        x = rng.normal(3.0, 1.5, 600) + rng.normal(0.0, err)
        m = fit_mixture(x, err, max_components=1, seed=rep).best
        pm.append((m.means[0] - 3.0) / m.means_err[0])
        ps.append((m.sigmas[0] - 1.5) / m.sigmas_err[0])
    # std of 150 unit normals: 1 +- 0.06; mean: 0 +- 0.08
    for pulls in (np.array(pm), np.array(ps)):
        assert abs(pulls.mean()) < 0.3
        assert 0.8 < pulls.std() < 1.2


def test_parameters_are_seed_stable() -> None:
    x, e = _bimodal(5, 20_000)
    fits = [fit_mixture(x, e, max_components=2, seed=s).best for s in (0, 1, 2)]
    for f in fits[1:]:
        assert f.n_components == fits[0].n_components == 2
        # same data, different initialisations: same optimum, far below the errors
        for attr in ("weights", "means", "sigmas"):
            a, b = getattr(f, attr), getattr(fits[0], attr)
            err = getattr(fits[0], attr + "_err")
            assert np.all(np.abs(a - b) < 0.01 * err), (attr, a, b, err)
    # a different seeded subsample agrees within the statistical errors
    sub = [fit_mixture(x, e, max_components=2, max_samples=10_000, seed=s).best for s in (0, 1)]
    for m in sub:
        assert m.n_samples == 10_000
    diff = np.abs(sub[0].means - sub[1].means)
    assert np.all(diff < 4 * np.hypot(sub[0].means_err, sub[1].means_err))


def test_subsample_is_reported() -> None:
    x, e = _unimodal(3, 5000)
    fit = fit_mixture(x, e, max_components=1, max_samples=1000, seed=4)
    assert fit.n_input == 5000
    assert fit.best.n_samples == 1000
    assert any("1000 of 5000" in n for n in fit.notes)
    again = fit_mixture(x, e, max_components=1, max_samples=1000, seed=4)
    assert again.best.means[0] == fit.best.means[0]


def test_hot_tail_is_caught_by_a_broad_component() -> None:
    """Dark-like rates: a narrow population and 0.3 % hot pixels 100-5000x above it."""
    rng = np.random.default_rng(7)
    n = 40_000
    err = rng.uniform(0.0008, 0.0012, n)
    true = rng.normal(0.002, 0.0004, n)
    hot = rng.random(n) < 0.003
    true[hot] = np.exp(rng.uniform(np.log(0.2), np.log(10.0), hot.sum()))
    x = true + rng.normal(0.0, err)
    fit = fit_mixture(x, err, max_components=3, seed=0)
    best = fit.best
    assert best.n_components >= 2
    main = int(np.argmax(best.weights))
    assert abs(best.means[main] - 0.002) < 3 * best.means_err[main]
    assert abs(best.sigmas[main] - 0.0004) < 3 * best.sigmas_err[main]
    assert abs(best.weights[main] - (1 - hot.mean())) < 0.002
    cls = best.classify(x, err)
    assert np.all(cls[hot] != main)
    assert np.mean(cls[~hot] == main) > 0.999


def test_model_methods() -> None:
    x, e = _bimodal(9, 5000)
    best = fit_mixture(x, e, max_components=2, seed=0).best
    grid = np.linspace(0.15, 0.37, 4001)
    for err in (0.0, 0.01):
        pdf = best.pdf(grid, err)
        assert pdf.shape == grid.shape
        assert abs(np.trapezoid(pdf, grid) - 1.0) < 1e-3
    r = best.responsibilities(x[:100], e[:100])
    assert r.shape == (100, best.n_components)
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    np.testing.assert_array_equal(best.classify(x[:100], e[:100]), np.argmax(r, axis=1))
    assert np.all(np.diff(best.means) > 0)
    d = json.loads(json.dumps(fit_mixture(x, e, max_components=2).to_dict()))
    assert d["n_components"] == best.n_components and len(d["candidates"]) == 2


def test_zero_errors_and_bad_input() -> None:
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(0, 1, 3000), rng.normal(8, 1, 1000), [np.nan, np.inf]])
    fit = fit_mixture(x, 0.0, max_components=3)
    assert fit.best.n_components == 2
    assert fit.n_input == 4000
    np.testing.assert_allclose(fit.best.means, [0.0, 8.0], atol=0.1)
    with pytest.raises(ValueError):
        fit_mixture(x, -1.0)
    with pytest.raises(ValueError):
        fit_mixture([1.0, 2.0], 0.1)


# --------------------------------------------------------------------------- fast paths
#
# The compiled kernels ("exact") and the (value, error) cell reduction with its
# full-data BHHH step ("binned", what "auto" picks at 1e6 points) against the
# numpy reference on simulated populations shaped like the real uses.


def _gain_like(rng: np.random.Generator, n: int, means: tuple[float, ...], weights: tuple[float, ...],
               sig: float = 0.01, rel: float = 0.10, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """ln g populations with ~10 % relative errors (lognormal spread)."""
    comp = rng.choice(len(means), size=n, p=weights)
    true = rng.normal(np.asarray(means)[comp], sig)
    err = rel * np.exp(rng.normal(0.0, spread, n))
    return true + rng.normal(0.0, err), err


def _case(name: str, n: int = 40_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    lg1, lg2 = np.log(0.254), np.log(0.30)
    if name == "unimodal":
        return _gain_like(rng, n, (lg1,), (1.0,))
    if name == "bimodal5":
        return _gain_like(rng, n, (lg1, lg2), (0.95, 0.05))
    if name == "bimodal30":
        return _gain_like(rng, n, (lg1, lg2), (0.7, 0.3))
    if name == "overlapping":  # separation half the typical error
        return _gain_like(rng, n, (lg1, lg1 + 0.05), (0.6, 0.4), sig=0.02)
    if name == "heteroscedastic":  # errors spanning a factor 100
        x, _ = _gain_like(rng, n, (lg1, lg2), (0.8, 0.2), rel=0.0)
        err = np.exp(rng.uniform(np.log(0.002), np.log(0.2), n))
        return x + rng.normal(0.0, err), err
    if name == "dark":  # e-/s: narrow population, 5 % warm, 0.2 % hot; negative estimates
        u = rng.random(n)
        true = rng.normal(0.01, 0.002, n)
        true[u < 0.05] = rng.normal(0.05, 0.005, int((u < 0.05).sum()))
        hot = u > 0.998
        true[hot] = np.exp(rng.uniform(0.0, np.log(10.0), int(hot.sum())))
        err = 0.01 * np.exp(rng.normal(0.0, 0.2, n))
        return true + rng.normal(0.0, err), err
    raise ValueError(name)


CASES = ("unimodal", "bimodal5", "bimodal30", "overlapping", "heteroscedastic", "dark")


def _assert_same_fit(a: MixtureFit, b: MixtureFit, tol: float, what: str) -> None:
    """Same number of components, BIC within 1 for every candidate, and the chosen
    model's parameters within ``tol`` of ``b``'s Fisher errors (errors within 2 %)."""
    assert a.best.n_components == b.best.n_components, what
    for ca, cb in zip(a.candidates, b.candidates, strict=True):
        # the BIC gaps that decide the number of components are tens to thousands
        assert abs(ca.bic - cb.bic) < 1.0, (what, ca.n_components, ca.bic, cb.bic)
    ma, mb = a.best, b.best
    assert ma.converged and mb.converged
    for attr in ("weights", "means", "sigmas"):
        err = getattr(mb, attr + "_err")
        diff = np.abs(getattr(ma, attr) - getattr(mb, attr))
        scale = np.where(err > 0, err, 1.0)
        assert np.all(diff < tol * scale), (what, attr, diff / scale)
        np.testing.assert_allclose(getattr(ma, attr + "_err"), err, rtol=0.02, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_fast_paths_match_reference(name: str) -> None:
    """"exact" is the reference algorithm compiled: same iterates, same answer.
    "binned" lands on the optimum of the full likelihood: compared with the
    exact path run to ``tol=1e-10``, since EM's default stopping rule
    (1e-7 per point) can itself stop some 0.1 sigma short of it when the
    errors dominate (e.g. "heteroscedastic"), a shortfall the BHHH step of
    the binned path also removes."""
    x, e = _case(name)
    if name == "dark":
        assert np.mean(x < 0) > 0.05  # the estimates do go negative
    kw = {"max_components": 3, "seed": 0}
    ref = fit_mixture(x, e, method="reference", **kw)
    exact = fit_mixture(x, e, method="exact", **kw)
    _assert_same_fit(exact, ref, 1e-4, f"exact {name}")
    optimum = fit_mixture(x, e, method="exact", tol=1e-10, **kw)
    binned = fit_mixture(x, e, method="binned", **kw)
    assert any("cells" in n for n in binned.notes)
    assert not any("cells" in n for n in exact.notes)
    _assert_same_fit(binned, optimum, 0.02, f"binned {name}")
    _assert_same_fit(ref, optimum, 0.2, f"reference {name}")


def test_auto_bins_large_samples() -> None:
    """At 2e5 gain-like points "auto" runs on cells; one component, same answer as "exact"."""
    rng = np.random.default_rng(21)
    x, e = _gain_like(rng, 200_000, (np.log(0.254),), (1.0,))
    auto = fit_mixture(x, e, max_components=1, max_samples=200_000, seed=0)
    assert any("cells" in n for n in auto.notes)
    exact = fit_mixture(x, e, max_components=1, max_samples=200_000, seed=0, method="exact")
    assert not any("cells" in n for n in exact.notes)
    a, b = auto.best, exact.best
    assert abs(a.means[0] - b.means[0]) < 0.02 * b.means_err[0]
    assert abs(a.sigmas[0] - b.sigmas[0]) < 0.02 * b.sigmas_err[0]
    assert abs(a.loglike - b.loglike) < 0.01


def test_reduction_preserves_moments() -> None:
    """Counts, the sum of the values and the deconvolved second moment
    ``sum (z^2 - e^2)`` are kept exactly; zero-error points stay single."""
    from sitiancal.compute.mixture import _reduce

    rng = np.random.default_rng(3)
    n = 100_000
    e2 = np.exp(rng.normal(0.0, 0.5, n))
    e2[:10] = 0.0
    z = rng.normal(0.0, 1.0, n) * np.sqrt(0.01 + e2)
    d = _reduce(z, e2, rel_width=0.05, log_err_step=0.01)
    assert d.n == n and d.cnt.sum() == n
    assert 10 <= d.z.size < n / 2
    assert np.all(d.e2[d.cnt > 1] > 0) and np.sum(d.e2 == 0) == 10
    np.testing.assert_allclose(np.sum(d.cnt * d.z), z.sum(), rtol=1e-12, atol=1e-9)
    # sum n (zbar^2 - e2c) = sum (z^2 - e2): the spread lost by the collapse is taken
    # off the errors, so the moment estimate of the intrinsic variance is unchanged
    np.testing.assert_allclose(np.sum(d.cnt * (d.z**2 - d.e2)), np.sum(z**2 - e2), rtol=1e-10)


def test_compiled_sums_match_numpy() -> None:
    """The compiled E-step sums (serial and parallel) equal the numpy reference,
    including points only explained by a component of negligible weight."""
    from sitiancal.compute.mixture import _moments, _Sample, _State

    rng = np.random.default_rng(4)
    z = np.concatenate([rng.normal(0, 1, 300_000), [40.0, -60.0]])
    e2 = rng.uniform(0.0, 0.5, z.size)
    st = _State(np.array([0.7, 0.3 - 1e-300, 1e-300]), np.array([-0.5, 0.8, 40.0]),
                np.array([0.3, 0.0, 1.0]))
    ref = _moments(_Sample(z, e2, None, z.size, 0.1, compiled=False), st)
    for m in (z.size, 1000):  # parallel (>= _PARALLEL_MIN) and serial kernels
        fast = _moments(_Sample(z[:m], e2[:m], None, m, 0.1), st)
        want = ref if m == z.size else _moments(_Sample(z[:m], e2[:m], None, m, 0.1, compiled=False), st)
        assert abs(fast[0] - want[0]) < 1e-12 * abs(want[0])
        np.testing.assert_allclose(fast[1], want[1], rtol=1e-10, atol=1e-10)
    # multiplicities: a repeated point counts as many points
    rep = _Sample(np.repeat(z[:100], 3), np.repeat(e2[:100], 3), None, 300, 0.1)
    cnt = _Sample(z[:100], e2[:100], np.full(100, 3.0), 300, 0.1)
    np.testing.assert_allclose(_moments(cnt, st)[1], _moments(rep, st)[1], rtol=1e-12)
    assert abs(_moments(cnt, st)[0] - _moments(rep, st)[0]) < 1e-12


def test_classify_blockwise_float32() -> None:
    x, e = _bimodal(12, 20_000)
    best = fit_mixture(x, e, max_components=2, seed=0).best
    want = np.argmax(best.responsibilities(x, e), axis=1)
    np.testing.assert_array_equal(best.classify(x, e), want)
    np.testing.assert_array_equal(best.classify(x, e, block=777), want)
    x32, e32 = x.astype(np.float32), e.astype(np.float32)
    got32 = best.classify(x32, e32)
    want32 = np.argmax(best.responsibilities(x32.astype(float), e32.astype(float)), axis=1)
    np.testing.assert_array_equal(got32, want32)
    # a scalar error and 2-D input
    np.testing.assert_array_equal(best.classify(x[:1000].reshape(40, 25), 0.005),
                                  np.argmax(best.responsibilities(x[:1000], 0.005), axis=1))
    # integer input (ADU-like) is converted per block
    model = MixtureModel(weights=np.array([0.6, 0.4]), means=np.array([250.0, 270.0]),
                         sigmas=np.array([2.0, 4.0]), loglike=0.0, bic=0.0, n_samples=1,
                         converged=True)
    xi = np.random.default_rng(5).integers(230, 300, 5000).astype(np.int32)
    np.testing.assert_array_equal(model.classify(xi, 3.0, block=1000),
                                  np.argmax(model.responsibilities(xi.astype(float), 3.0), axis=1))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_compiled_initialisations_are_sklearns_fits(k: int) -> None:
    """The compiled EM of the initialisations against sklearn's GaussianMixture, restart by restart.

    Same starting points (k-means++ and random_from_data with the same seeds),
    the same iterations, the same parameters to rounding, and the same
    responsibility-weighted mean squared error per component (predict_proba).
    """
    import warnings

    from sklearn.mixture import GaussianMixture

    from sitiancal.compute.mixture import _REG_VAR, _sklearn_gmm_em, _sklearn_start

    rng = np.random.default_rng(k)
    z = np.concatenate([rng.normal(0, 1, 4000), rng.normal(4, 2, 400), rng.standard_cauchy(100)])
    e2 = rng.uniform(0.01, 0.5, z.size)
    data = z.reshape(-1, 1)
    for restart in range(4):
        gm = GaussianMixture(n_components=k, covariance_type="spherical", tol=1e-4, max_iter=200,
                             init_params="k-means++" if restart % 2 == 0 else "random_from_data",
                             random_state=np.random.RandomState(5 * 1009 + 17 * k + restart),
                             reg_covar=_REG_VAR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(data)
        resp = gm.predict_proba(data)
        want_e2 = (resp * e2[:, None]).sum(axis=0) / resp.sum(axis=0)
        w, mu, var, n_iter, converged, mean_e2 = _sklearn_gmm_em(
            z, *_sklearn_start(data, k, restart, 5, _REG_VAR), _REG_VAR, 1e-4, 200, e2)
        assert (n_iter, converged) == (gm.n_iter_, gm.converged_)
        np.testing.assert_allclose(w, gm.weights_, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(mu, gm.means_.ravel(), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(var, gm.covariances_, rtol=1e-11)
        np.testing.assert_allclose(mean_e2, want_e2, rtol=1e-11)
    # the iteration limit: stopped there, not converged, as sklearn
    gm = GaussianMixture(n_components=max(k, 2), covariance_type="spherical", tol=1e-12,
                         max_iter=3, init_params="random_from_data",
                         random_state=np.random.RandomState(5 * 1009 + 17 * max(k, 2) + 1),
                         reg_covar=_REG_VAR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data)
    w, mu, var, n_iter, converged, _ = _sklearn_gmm_em(
        z, *_sklearn_start(data, max(k, 2), 1, 5, _REG_VAR), _REG_VAR, 1e-12, 3, e2)
    assert (n_iter, converged) == (3, False) == (gm.n_iter_, gm.converged_)
    np.testing.assert_allclose(mu, gm.means_.ravel(), rtol=1e-11, atol=1e-12)
