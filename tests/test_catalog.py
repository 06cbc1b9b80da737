"""Catalog tests, run on SQLite and on PostgreSQL (``catalog_url`` fixture).

Products are published through a real local product store with tiny arrays,
so versioning, validity, history and dedupe are exercised end to end.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.exc import IntegrityError
from test_api_support import write_frame

from sitiancal.storage.catalog import (
    Catalog,
    CatalogError,
    DuplicateContent,
    InvalidInput,
    NoProduct,
    NotFound,
    ProductVersion,
    StateConflict,
    ValidityConflict,
    current_revision,
    head_revision,
)
from sitiancal.storage.models import UTCDateTime
from sitiancal.storage.store import ProductArray, ProductPayload, ProductStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


@pytest.fixture
def catalog(catalog_url: str):
    cat = Catalog.open(catalog_url)
    yield cat
    cat.close()


@pytest.fixture
def store(tmp_path) -> ProductStore:
    return ProductStore(tmp_path / "store")


def make_payload(camera: str = "MST3", kind: str = "bias", seed: int = 0,
                 params: dict | None = None, inputs: list[str] | None = None) -> ProductPayload:
    rng = np.random.default_rng(seed)
    shas = inputs if inputs is not None else [f"{seed:02d}" + "0" * 62, f"{seed:02d}" + "1" * 62]
    return ProductPayload(
        camera=camera, type=kind,
        arrays=[ProductArray(kind, rng.normal(500.0, 2.0, (6, 8)).astype(np.float32), "ADU",
                             "test map")],
        stats={"median": 500.0}, inputs=[{"path": f"/d/f{i}.fits", "sha256": s}
                                         for i, s in enumerate(shas)],
        date_beg=day(-2), date_end=day(-1), params=params if params is not None else {"n": seed},
        code_version="0.1.0-test")


def publish(catalog: Catalog, store: ProductStore, camera: str = "MST3", kind: str = "bias",
            seed: int = 0, **kw):
    return catalog.publish_payload(store, make_payload(camera, kind, seed, **kw)).product


def ranges(catalog: Catalog, camera: str = "MST3", kind: str = "bias") -> dict[int, tuple]:
    return {p.version: (p.valid_from, p.valid_to)
            for p in catalog.list_products(camera, kind, state="certified")}


# -- schema ------------------------------------------------------------------------
def test_open_migrates_to_head_and_models_match_migrations(empty_database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from sitiancal.storage.models import Base

    catalog_url = empty_database_url
    assert current_revision(catalog_url) is None
    with pytest.raises(CatalogError, match="db upgrade"):
        Catalog.open(catalog_url, migrate=False)
    with Catalog.open(catalog_url) as cat:
        assert current_revision(cat.engine) == head_revision()
        with cat.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
    with Catalog.open(catalog_url) as again:  # a second start is a no-op
        assert current_revision(again.engine) == head_revision()
    with Catalog.open(catalog_url, migrate=False) as plain:
        assert plain.list_products() == []


# -- versions ----------------------------------------------------------------------
def test_versions_are_numbered_per_camera_and_type(catalog: Catalog, store) -> None:
    a1 = publish(catalog, store, "MST3", "bias", 1)
    a2 = publish(catalog, store, "MST3", "bias", 2)
    b1 = publish(catalog, store, "MST4", "bias", 3)
    c1 = publish(catalog, store, "MST3", "dark", 4)
    assert [a1.version, a2.version, b1.version, c1.version] == [1, 2, 1, 1]
    assert a2.store_key == "products/MST3/bias/v0002"
    assert a1.state == "candidate" and a1.valid_from is None
    assert catalog.get_product("MST3/bias/v2").id == a2.id
    assert catalog.get_product(a1.id).provenance["inputs"][0]["path"] == "/d/f0.fits"
    assert catalog.product_inputs(a1.id)[1]["sha256"] == "01" + "1" * 62
    with pytest.raises(NotFound, match="unknown product"):
        catalog.get_product("MST3/bias/v9")


def test_failed_publish_leaves_nothing_and_burns_its_number(catalog: Catalog, store) -> None:
    publish(catalog, store, seed=1)
    payload = make_payload(seed=2)
    with pytest.raises(IntegrityError):  # the job does not exist: the transaction fails
        catalog.publish_payload(store, payload, job_id="no-such-job")
    assert [p.version for p in catalog.list_products("MST3", "bias")] == [1]
    assert store.list_staging() == []
    assert not store.exists("products/MST3/bias/v0002")
    assert catalog.find_by_content_key("MST3", "bias", payload.content_key) is None
    again = catalog.publish_payload(store, payload).product
    assert again.version == 3  # v2 was handed to the failed attempt and is never reused
    assert store.verify(again.store_key, again.checksums).ok


# -- certification and validity ---------------------------------------------------------
def test_certifying_a_new_version_trims_the_previous_range(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(0), actor="alice", reason="first")
    catalog.certify(v2.id, day(10), actor="bob")
    assert ranges(catalog) == {1: (day(0), day(10)), 2: (day(10), None)}
    # start inclusive, end exclusive
    assert catalog.best("MST3", "bias", day(0)).version == 1
    assert catalog.best("MST3", "bias", day(10) - timedelta(microseconds=1)).version == 1
    assert catalog.best("MST3", "bias", day(10)).version == 2
    assert catalog.best("MST3", "bias", day(400)).version == 2
    with pytest.raises(NoProduct, match="before the first certified range v1") as err:
        catalog.best("MST3", "bias", day(0) - timedelta(microseconds=1))
    assert err.value.reason == "gap"


def test_open_range_ends_at_the_next_certified_start(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(10), actor="alice")
    certified = catalog.certify(v2.id, day(0), actor="alice")
    assert (certified.valid_from, certified.valid_to) == (day(0), day(10))
    assert ranges(catalog) == {1: (day(10), None), 2: (day(0), day(10))}


def test_explicit_end_overlapping_a_later_range_is_refused(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(10), actor="alice")
    with pytest.raises(ValidityConflict, match="overlap certified MST3/bias v1"):
        catalog.certify(v2.id, day(0), day(15), actor="alice")
    assert catalog.get_product(v2.id).state == "candidate"
    assert len(catalog.history("MST3", "bias")) == 3  # 2 publishes + 1 certify, nothing more
    touching = catalog.certify(v2.id, day(0), day(10), actor="alice")  # [0,10) + [10,...)
    assert touching.valid_to == day(10)


def test_range_inside_an_open_range_trims_it_and_leaves_a_gap(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(0), actor="alice")
    catalog.certify(v2.id, day(5), day(8), actor="alice")
    assert ranges(catalog) == {1: (day(0), day(5)), 2: (day(5), day(8))}
    with pytest.raises(NoProduct, match=r"after the last certified range v2 \[2026-01-06"):
        catalog.best("MST3", "bias", day(9))


def test_same_start_supersedes_and_recertify_moves_a_range(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(0), actor="alice")
    catalog.certify(v2.id, day(0), actor="alice")
    assert catalog.get_product(v1.id).valid_to == day(0)  # empty range: valid nowhere
    assert catalog.best("MST3", "bias", day(0)).version == 2
    moved = catalog.certify(v2.id, day(3), day(4), actor="alice", reason="narrower")
    assert (moved.valid_from, moved.valid_to) == (day(3), day(4))
    catalog.certify(v1.id, day(1), actor="alice")  # open end stops at v2's start
    assert ranges(catalog) == {1: (day(1), day(3)), 2: (day(3), day(4))}


def test_gap_message_names_the_nearest_ranges(catalog: Catalog, store) -> None:
    v1, v2, v3 = (publish(catalog, store, seed=s) for s in (1, 2, 3))
    catalog.certify(v1.id, day(0), day(5), actor="alice")
    catalog.certify(v2.id, day(10), day(20), actor="alice")
    catalog.certify(v3.id, day(30), actor="alice")
    with pytest.raises(NoProduct) as err:
        catalog.best("MST3", "bias", day(7))
    message = str(err.value)
    assert err.value.reason == "gap"
    assert "gap between v1 [2026-01-01T00:00:00Z, 2026-01-06T00:00:00Z)" in message
    assert "and v2 [2026-01-11T00:00:00Z, 2026-01-21T00:00:00Z)" in message
    assert isinstance(err.value, LookupError)


def test_no_product_reasons(catalog: Catalog, store) -> None:
    with pytest.raises(NoProduct, match="no bias product for camera MST9") as err:
        catalog.best("MST9", "bias", day(0))
    assert err.value.reason == "no_product"
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    with pytest.raises(NoProduct, match="none is certified") as err:
        catalog.best("MST3", "bias", day(0))
    assert err.value.reason == "none_certified"
    assert catalog.best("MST3", "bias", state="candidate").id == v2.id  # newest candidate
    catalog.certify(v1.id, day(0), actor="alice")
    catalog.retract(v1.id, actor="carol", reason="hot column missed")
    with pytest.raises(NoProduct) as err:
        catalog.best("MST3", "bias", day(3))
    assert err.value.reason == "retracted"
    assert "v1, certified for [2026-01-01T00:00:00Z, open), was retracted by carol" in str(
        err.value)
    assert "hot column missed" in str(err.value)
    catalog.retract(v2.id, actor="carol", reason="superseded")
    with pytest.raises(NoProduct, match="no candidate") as err:
        catalog.best("MST3", "bias", state="candidate")


def test_state_rules_and_input_checks(catalog: Catalog, store) -> None:
    v1 = publish(catalog, store, seed=1)
    with pytest.raises(InvalidInput, match="no time zone"):
        catalog.certify(v1.id, datetime(2026, 1, 1), actor="alice")
    with pytest.raises(InvalidInput, match="must be after"):
        catalog.certify(v1.id, day(2), day(1), actor="alice")
    with pytest.raises(InvalidInput, match="needs a reason"):
        catalog.retract(v1.id, actor="alice", reason=" ")
    catalog.retract(v1.id, actor="alice", reason="bad")
    with pytest.raises(StateConflict, match="retracted; it cannot be certified"):
        catalog.certify(v1.id, day(0), actor="alice")
    with pytest.raises(StateConflict, match="already retracted"):
        catalog.retract(v1.id, actor="alice", reason="again")


def test_database_itself_refuses_overlapping_certified_ranges(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(0), day(10), actor="alice")
    with pytest.raises(IntegrityError), catalog.engine.begin() as conn:
        conn.execute(text("UPDATE product_versions SET state = 'certified', valid_from = "
                          "valid_to WHERE id = :id"), {"id": v2.id})  # NULL start: check
    stmt = text("UPDATE product_versions SET state = 'certified', valid_from = :a, "
                "valid_to = :b WHERE id = :id").bindparams(
        bindparam("a", type_=UTCDateTime()), bindparam("b", type_=UTCDateTime()))
    with pytest.raises(IntegrityError), catalog.engine.begin() as conn:
        conn.execute(stmt, {"a": day(5), "b": day(15), "id": v2.id})
    with catalog.engine.begin() as conn:  # adjacent is fine
        conn.execute(stmt, {"a": day(10), "b": day(15), "id": v2.id})
    assert ranges(catalog) == {1: (day(0), day(10)), 2: (day(10), day(15))}


@pytest.mark.parametrize("first", ["A", "B"])
def test_concurrent_certifications_never_overlap(catalog: Catalog, store, monkeypatch,
                                                 first: str) -> None:
    """Two threads certify overlapping ranges at the same time.

    Each certification is slowed down between reading the certified ranges
    and writing its own, and the second starts while the first is in that
    window (``first`` starts 0.3 s ahead, well inside the other's 0.8 s, so
    each serial order is run, and asserted as that order's outcome).
    Serial outcomes are: A then B (A trimmed to B's start, B certified) or B
    then A (A refused: its explicit end overlaps B). Without the series lock
    the second would read "nothing certified", then fail on the database
    constraint (or on a locked SQLite file): an outcome no serial order gives.
    """
    a, b = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    original = Catalog._now_for

    def slow_now_for(self, session, series_id):
        time.sleep(0.8)
        return original(self, session, series_id)

    monkeypatch.setattr(Catalog, "_now_for", slow_now_for)
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def run(name: str, ref: str, start: datetime, end: datetime, delay: float) -> None:
        barrier.wait()
        time.sleep(delay)
        try:
            outcome[name] = catalog.certify(ref, start, end, actor=name)
        except Exception as exc:  # recorded and checked below
            outcome[name] = exc

    delay = {"A": 0.0, "B": 0.3} if first == "A" else {"A": 0.3, "B": 0.0}
    threads = [threading.Thread(target=run, args=("A", a.id, day(0), day(20), delay["A"])),
               threading.Thread(target=run, args=("B", b.id, day(10), day(30), delay["B"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not isinstance(outcome["B"], Exception), outcome["B"]
    # B first: B holds the series lock while A waits, and A's explicit end
    # overlaps B (refused). A first: A certified, then trimmed to B's start by B.
    serial = {"B": ({2: (day(10), day(30))}, ValidityConflict),
              "A": ({1: (day(0), day(10)), 2: (day(10), day(30))}, ProductVersion)}
    expected_ranges, expected_a = serial[first]
    assert type(outcome["A"]) is expected_a, outcome["A"]
    final = ranges(catalog)
    assert final == expected_ranges
    spans = sorted(final.values())
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert e1 is not None and e1 <= s2


# -- history -----------------------------------------------------------------------
def _answer(catalog: Catalog, at: datetime, as_of: datetime | None = None) -> str:
    try:
        return catalog.best("MST3", "bias", at, as_of=as_of).id
    except NoProduct as exc:
        return f"none:{exc.reason}"


def test_history_reproduces_every_past_answer(catalog: Catalog, store) -> None:
    probes = [day(-1), day(0), day(4), day(5), day(9), day(12), day(40)]
    snapshots: list[tuple[datetime, list[str]]] = []

    def snap() -> None:
        time.sleep(0.002)
        now = datetime.now(UTC)
        snapshots.append((now, [_answer(catalog, at) for at in probes]))
        time.sleep(0.002)

    snap()
    v1 = publish(catalog, store, seed=1)
    snap()
    catalog.certify(v1.id, day(0), actor="alice")
    snap()
    v2 = publish(catalog, store, seed=2)
    catalog.certify(v2.id, day(5), day(12), actor="alice")
    snap()
    v3 = publish(catalog, store, seed=3)
    catalog.certify(v3.id, day(9), actor="bob")
    snap()
    catalog.retract(v2.id, actor="carol", reason="bad flat")
    snap()
    catalog.certify(v1.id, day(0), day(4), actor="alice")
    snap()
    distinct = {tuple(answers) for _, answers in snapshots}
    assert len(distinct) >= 5  # the answers really changed along the way
    for when, answers in snapshots:
        assert [_answer(catalog, at, as_of=when) for at in probes] == answers
    # the record returned for a past answer carries the range it had then
    past = catalog.best("MST3", "bias", day(6), as_of=snapshots[3][0])
    assert (past.version, past.state, past.valid_to) == (2, "certified", day(12))
    assert catalog.get_product(past.id).state == "retracted"
    actions = [(r.version, r.action) for r in catalog.history("MST3", "bias")]
    assert actions[:3] == [(1, "publish"), (1, "certify"), (2, "publish")]
    assert (2, "trim") in actions and (2, "retract") in actions


# -- dedupe ------------------------------------------------------------------------------
def test_content_key_dedupe(catalog: Catalog, store) -> None:
    first = make_payload(seed=1)
    shuffled = make_payload(seed=1, inputs=list(reversed([i["sha256"] for i in first.inputs])))
    assert shuffled.content_key == first.content_key  # input order does not matter
    assert make_payload(seed=1, params={"n": 2}).content_key != first.content_key
    job = catalog.create_job("MST3", products=["bias"])
    made = catalog.publish_payload(store, first, job_id=job.id)
    assert not made.reused
    job2 = catalog.create_job("MST3", products=["bias"])
    again = catalog.publish_payload(store, shuffled, job_id=job2.id)
    assert again.reused and again.product.id == made.product.id
    assert catalog.get_job(job2.id).products == (made.product.id,)
    assert catalog.find_by_content_key("MST3", "bias", first.content_key).id == made.product.id
    forced = catalog.publish_payload(store, first, force=True)
    assert not forced.reused and forced.product.version == 2
    assert forced.product.content_key == first.content_key
    staged = store.stage(first, catalog.reserve_version("MST3", "bias"))
    with pytest.raises(DuplicateContent, match="same inputs, parameters"):
        catalog.publish_product(staged, first, store=store)
    assert store.list_staging() == []
    catalog.retract(forced.product.id, actor="alice", reason="dup")
    catalog.retract(made.product.id, actor="alice", reason="dup")
    assert catalog.find_by_content_key("MST3", "bias", first.content_key) is None
    assert catalog.publish_payload(store, first).product.version == 4


# -- jobs, datasets, cameras, audit --------------------------------------------------------
def test_jobs_lifecycle_and_idempotency(catalog: Catalog) -> None:
    ds = catalog.add_dataset("MST3", {"source": "/data/mst3", "counts": {"bias": 2}},
                             [{"path": "/data/mst3/b1.fits", "sha256": None, "type": "bias"},
                              {"path": "/data/mst3/b2.fits", "sha256": "f" * 64}])
    job = catalog.create_job("MST3", ds, products=["bias", "dark"], params={"sigma": 3.0},
                             idempotency_key="key-1", actor="op")
    assert catalog.create_job("MST3", ds, idempotency_key="key-1").id == job.id
    assert job.state == "queued" and job.started is None
    running = catalog.update_job(job.id, state="running", progress=0.25, stage="cube")
    assert running.started is not None and running.progress == 0.25
    done = catalog.update_job(job.id, state="succeeded", progress=1.0)
    assert done.finished is not None and done.finished >= running.started
    with pytest.raises(StateConflict, match="succeeded; it cannot become running"):
        catalog.update_job(job.id, state="running")
    with pytest.raises(InvalidInput):
        catalog.update_job(job.id, progress=1.5)
    assert [j.id for j in catalog.list_jobs(camera="MST3", state="succeeded")] == [job.id]
    with pytest.raises(InvalidInput, match="belongs to camera MST3"):
        catalog.create_job("MST4", ds)
    states = [(e.details["from"], e.details["to"])
              for e in catalog.audit_log(entity="job", entity_id=job.id, action="job.state")]
    assert states == [("queued", "running"), ("running", "succeeded")]


def test_datasets_and_frames(catalog: Catalog) -> None:
    inventory = {"source": "/data/mst3", "shape": [6, 8], "counts": {"bias": 2},
                 "frames": [{"path": "/data/mst3/b1.fits", "type": "bias", "exptime": 0.0,
                             "time": "2026-03-14T01:00:00Z"},
                            {"path": "/data/mst3/b2.fits", "type": "bias", "exptime": 0.0,
                             "time": None}]}
    ds_id = catalog.add_dataset("MST3", inventory, label="night 1")
    ds = catalog.get_dataset(ds_id)
    assert ds.source == "/data/mst3" and ds.to_dict()["counts"] == {"bias": 2}
    assert [f.path for f in ds.frames] == ["/data/mst3/b1.fits", "/data/mst3/b2.fits"]
    assert ds.frames[0].obs_time == datetime(2026, 3, 14, 1, tzinfo=UTC)
    catalog.set_frame_checksums(ds_id, {"/data/mst3/b1.fits": "a" * 64})
    assert catalog.get_dataset(ds_id).frames[0].sha256 == "a" * 64
    with pytest.raises(StateConflict):
        catalog.set_frame_checksums(ds_id, {"/data/mst3/b1.fits": "b" * 64})
    assert catalog.add_frames(ds_id, [{"path": "/up/b3.fits", "sha256": "c" * 64}]) == 3
    assert [d.id for d in catalog.list_datasets("MST3")] == [ds_id]
    assert catalog.list_datasets("MST4") == []
    assert catalog.get_camera("MST3").name == "MST3"
    with pytest.raises(InvalidInput, match="invalid camera name"):
        catalog.add_dataset("../etc", {})


def test_frames_left_out_after_reading_move_to_the_rejected_files(catalog: Catalog,
                                                                   tmp_path) -> None:
    """``leave_out_frames``: the inventory's tallies are those of the frames left, each file
    is listed as rejected with its reason, its frame row goes; again, nothing changes."""
    from sitiancal.storage.scan import scan

    for i, (kind, t) in enumerate([("bias", 0.0), ("bias", 0.0), ("dark", 30.0), ("dark", 60.0)]):
        write_frame(tmp_path / f"f{i}.fits", kind, t, seed=i)
    inventory = scan(tmp_path)
    ds_id = catalog.add_dataset("MST3", inventory)
    gone = str(tmp_path / "f3.fits")
    why = "refused when read: non-finite value nan at pixel (1, 2)"
    assert catalog.leave_out_frames(ds_id, [{"file": gone, "reason": why},
                                            {"file": "/elsewhere.fits", "reason": "x"}]) == [gone]
    ds = catalog.get_dataset(ds_id)
    assert ds.inventory["rejected"] == [{"file": gone, "reason": why}]
    assert ds.inventory["counts"] == {"bias": 2, "dark": 1, "flat": 0}
    assert ds.inventory["exposure_times"]["dark"] == [30.0]
    assert gone not in {f["path"] for f in ds.inventory["frames"]}
    assert [f.path for f in ds.frames] == [str(tmp_path / f"f{i}.fits") for i in range(3)]
    assert catalog.leave_out_frames(ds_id, [{"file": gone, "reason": why}]) == []
    assert catalog.get_dataset(ds_id).inventory == ds.inventory
    entry = catalog.audit_log(entity="dataset", entity_id=ds_id, action="dataset.leave_out")
    assert [e.details["left_out"] for e in entry] == [[{"file": gone, "reason": why}]]
    # a frame added later goes after the last position, gaps and all
    assert catalog.add_frames(ds_id, [{"path": "/up/b9.fits"}]) == 4
    assert catalog.get_dataset(ds_id).frames[-1].path == "/up/b9.fits"
    with pytest.raises(NotFound):
        catalog.leave_out_frames("nope", [])
    bare = catalog.add_dataset("MST3", {"counts": {}})
    with pytest.raises(InvalidInput, match="no scan inventory"):
        catalog.leave_out_frames(bare, [{"file": gone, "reason": why}])


def test_audit_log_records_who_what_when_why(catalog: Catalog, store) -> None:
    v1, v2 = publish(catalog, store, seed=1), publish(catalog, store, seed=2)
    catalog.certify(v1.id, day(0), actor="alice", reason="QC passed")
    catalog.certify(v2.id, day(3), actor="bob", reason="new flats")
    catalog.retract(v2.id, actor="carol", reason="dust")
    entries = catalog.audit_log(entity="product")
    got = [(e.action, e.entity_id, e.actor, e.reason) for e in entries]
    assert got == [
        ("product.publish", v1.id, "system", None),
        ("product.publish", v2.id, "system", None),
        ("product.certify", v1.id, "alice", "QC passed"),
        ("product.trim", v1.id, "bob", "new flats"),
        ("product.certify", v2.id, "bob", "new flats"),
        ("product.retract", v2.id, "carol", "dust"),
    ]
    trim = entries[3]
    assert trim.details["after"] == "[2026-01-01T00:00:00Z, 2026-01-04T00:00:00Z)"
    assert all(e.at.tzinfo is not None for e in entries)
    assert [e.at for e in entries] == sorted(e.at for e in entries)
