"""Property-based tests (hypothesis) of the catalog's validity logic and of kernels.

Catalog: any sequence of certify/retract operations on a few versions of one
camera and type is replayed against a small reference model of the rules in
``storage/catalog.py`` (trim the range containing the new start; end an open
range at the next certified start; refuse an explicit end overlapping a later
range; retraction keeps the range). After every step: certified ranges never
overlap, ``best(at)`` equals the model at every probe time, and at the end
``best(at, as_of=t_k)`` reproduces the answer the catalog gave after step k,
so the history is consistent with what was served.

Kernels: per-pixel moments and sigma-clipped statistics do not depend on how
the image is split into tiles (a tile map is the same whatever the chunking).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_support import publish_product

from sitiancal.compute.stats import group_moments, sigma_clipped_stats
from sitiancal.storage.catalog import (
    Catalog,
    InvalidInput,
    NoProduct,
    StateConflict,
    ValidityConflict,
)
from sitiancal.storage.store import ProductStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
N_VERSIONS = 4
PROBES = [T0 + timedelta(hours=h) for h in range(-1, 26)]
_COUNTER = itertools.count()


def hours(h: int | None) -> datetime | None:
    return None if h is None else T0 + timedelta(hours=h)


@dataclass
class ModelVersion:
    version: int
    state: str = "candidate"
    start: int | None = None
    end: int | None = None  # None: open ended

    def covers(self, t: int) -> bool:
        return (self.state == "certified" and self.start is not None and self.start <= t
                and (self.end is None or t < self.end))

    def empty(self) -> bool:
        return self.end is not None and self.start is not None and self.end <= self.start


class Model:
    """The documented validity rules, on integer hours."""

    def __init__(self) -> None:
        self.versions = {v: ModelVersion(v) for v in range(1, N_VERSIONS + 1)}

    def certify(self, v: int, start: int, end: int | None) -> str | None:
        target = self.versions[v]
        if end is not None and end <= start:
            return "invalid"
        if target.state == "retracted":
            return "state"
        others = [o for o in self.versions.values() if o.state == "certified"
                  and o.version != v and not o.empty()]
        trims = [o for o in others if o.start <= start and (o.end is None or start < o.end)]
        later = [o for o in others if o.start > start]
        if later:
            first = min(later, key=lambda o: o.start)
            if end is None:
                end = first.start
            elif end > first.start:
                return "conflict"
        for o in trims:
            o.end = start
        target.state, target.start, target.end = "certified", start, end
        return None

    def retract(self, v: int) -> str | None:
        if self.versions[v].state == "retracted":
            return "state"
        self.versions[v].state = "retracted"
        return None

    def best(self, t: int) -> int | None:
        hits = [o.version for o in self.versions.values() if o.covers(t)]
        return max(hits) if hits else None


operation = st.one_of(
    st.tuples(st.just("certify"), st.integers(1, N_VERSIONS), st.integers(0, 24),
              st.one_of(st.none(), st.integers(0, 25))),
    st.tuples(st.just("retract"), st.integers(1, N_VERSIONS), st.just(0), st.none()),
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("props")
    catalog = Catalog.open(f"sqlite:///{tmp / 'catalog.sqlite'}")
    store = ProductStore(tmp / "store")
    yield catalog, store
    catalog.close()


def _served(catalog: Catalog, camera: str, t: datetime, as_of: datetime | None = None
            ) -> int | None:
    try:
        return catalog.best(camera, "gain", t, as_of=as_of).version
    except NoProduct:
        return None


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(operation, min_size=1, max_size=12))
def test_validity_rules_hold_for_any_sequence(shared, ops):
    catalog, store = shared
    camera = f"P{next(_COUNTER)}"
    ids = {p.version: p.id for p in (publish_product(catalog, store, camera=camera, seed=s,
                                                     shape=(2, 3))
                                     for s in range(N_VERSIONS))}
    model = Model()
    snapshots: list[tuple[datetime, dict[datetime, int | None]]] = []
    for kind, v, start, end in ops:
        if kind == "certify":
            expected = model.certify(v, start, end)
            try:
                catalog.certify(ids[v], hours(start), hours(end), actor="prop")
                got = None
            except InvalidInput:
                got = "invalid"
            except StateConflict:
                got = "state"
            except ValidityConflict:
                got = "conflict"
        else:
            expected = model.retract(v)
            try:
                catalog.retract(ids[v], actor="prop", reason="property test")
                got = None
            except StateConflict:
                got = "state"
        assert got == expected, (kind, v, start, end, ops)
        products = [p for p in catalog.list_products(camera=camera, type="gain")
                    if p.state == "certified" and (p.valid_to is None
                                                   or p.valid_to > p.valid_from)]
        for a, b in itertools.combinations(products, 2):
            a_end = a.valid_to or datetime.max.replace(tzinfo=UTC)
            b_end = b.valid_to or datetime.max.replace(tzinfo=UTC)
            assert a_end <= b.valid_from or b_end <= a.valid_from, (a, b, ops)
        served = {t: _served(catalog, camera, t) for t in PROBES}
        assert served == {t: model.best(int((t - T0).total_seconds() // 3600))
                          for t in PROBES}, ops
        snapshots.append((max(r.recorded_at for r in catalog.history(camera, "gain")),
                          served))
    for as_of, served in snapshots:
        assert {t: _served(catalog, camera, t, as_of) for t in PROBES} == served, ops


# -- kernels: the result does not depend on the tiling -------------------------------------
def _tiles(shape: tuple[int, int], ty: int, tx: int):
    for y in range(0, shape[0], ty):
        for x in range(0, shape[1], tx):
            yield slice(y, y + ty), slice(x, x + tx)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 12), ny=st.integers(1, 9),
       nx=st.integers(1, 11), ty=st.integers(1, 9), tx=st.integers(1, 11),
       integer=st.booleans())
def test_moments_and_clipped_stats_are_tiling_invariant(seed, n, ny, nx, ty, tx, integer):
    rng = np.random.default_rng(seed)
    stack = rng.normal(1000.0, 20.0, (n, ny, nx))
    stack[rng.random(stack.shape) < 0.05] = 60000.0  # outliers for the clipping
    stack = stack.astype(np.uint16) if integer else stack.astype(np.float32)
    whole = group_moments(stack)
    whole_clip = sigma_clipped_stats(stack)
    for ys, xs in _tiles((ny, nx), ty, tx):
        part = group_moments(stack[:, ys, xs])
        np.testing.assert_array_equal(part.mean, whole.mean[ys, xs])
        np.testing.assert_array_equal(part.var, whole.var[ys, xs])
        clip = sigma_clipped_stats(np.ascontiguousarray(stack[:, ys, xs]))
        for name in ("mean", "median", "std", "n_used"):
            np.testing.assert_array_equal(getattr(clip, name),
                                          getattr(whole_clip, name)[ys, xs], err_msg=name)
