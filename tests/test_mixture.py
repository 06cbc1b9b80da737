"""Extreme-deconvolution mixtures: recovery of known populations.

Tolerances are multiples of the fit's own Fisher errors (themselves checked
against the scatter of repeated fits in ``test_fisher_errors_calibrated``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sitiancal.compute.mixture import MixtureFit, fit_mixture

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
