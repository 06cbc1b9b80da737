"""The versioned product catalog (SQLAlchemy 2, Alembic; SQLite or PostgreSQL).

``Catalog.open(url)`` connects and upgrades the schema to the newest Alembic
revision (``sitiancal db upgrade`` does the same without serving). SQLite is
the embedded default (a file in the data dir); PostgreSQL
(``postgresql://`` or ``postgresql+psycopg://``) is the production option.
Models and tables: :mod:`sitiancal.storage.models`.

Versions and validity
---------------------
Versions are numbered per camera and product type from a counter row
(``products.last_version``). :meth:`Catalog.reserve_version` increments it in
its own short transaction *before* the version is staged, because the number
is written into the staged files (FITS ``VERSION``, store key): a publish that
fails afterwards burns its number, which is never handed out again.
:meth:`Catalog.publish_product` then inserts the version in one transaction
under the series lock; if that transaction fails, the store files are removed.

States: ``candidate`` (on publish), ``certified``, ``retracted``. Certifying
gives a half-open validity range ``[valid_from, valid_to)`` (``valid_to=None``:
open ended). Certified ranges of one camera and type never overlap:

- a certified range containing the new start is trimmed to end there (to an
  empty range if it started at the same instant: it is then valid nowhere);
- a new open-ended range ends at the start of the next later certified range;
- an explicit ``valid_to`` that overlaps a later certified range is refused
  with :class:`ValidityConflict`.

The check runs under a lock on the series row (``SELECT ... FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), and the database enforces it too
(an exclusion constraint over ``tstzrange`` with btree_gist on PostgreSQL,
triggers on SQLite). Retracting keeps the range for the record.

Every state or validity a version has had is kept in ``validity_history``
with the catalog-time interval during which it was current, so
``best(camera, type, at, as_of=t)`` answers exactly as ``best`` would have at
``t``. Every change is also written to the audit log (who, when, what, why).

Public API
----------
``Catalog.open(url, migrate=True)``, ``close``; cameras: ``upsert_camera``,
``get_camera``, ``list_cameras``; datasets: ``add_dataset``, ``add_frames``,
``set_frame_checksums``, ``leave_out_frames``, ``get_dataset``, ``list_datasets``; jobs:
``create_job``, ``update_job``, ``get_job``, ``list_jobs``, ``link_product``;
products: ``reserve_version``, ``publish_product``, ``publish_payload``,
``get_product``, ``product_inputs``, ``list_products``, ``certify``,
``retract``, ``best``, ``history``, ``audit_log``, ``find_by_content_key``,
``verify``, ``sweep_orphans``; schema: ``upgrade``, ``current_revision``, ``head_revision``.
Errors: :class:`CatalogError` and its subclasses :class:`NotFound` (404),
:class:`NoProduct` (404, a ``LookupError``), :class:`ValidityConflict` (409),
:class:`StateConflict` (409), :class:`DuplicateContent` (409),
:class:`InvalidInput` (422). Records come back as frozen dataclasses with a
``to_dict()`` in the shape of API.md.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, create_engine, event, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from sitiancal.storage.models import (
    JOB_STATES,
    TERMINAL_JOB_STATES,
    AuditRow,
    CameraRow,
    DatasetRow,
    FrameRow,
    JobProductRow,
    JobRow,
    ProductInputRow,
    ProductRow,
    ProductVersionRow,
    ValidityHistoryRow,
)
from sitiancal.storage.store import (
    ProductPayload,
    ProductStore,
    StagedProduct,
    VerifyReport,
    check_name,
    check_type,
    to_jsonable,
)

log = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK = 0x5174_616E  # "Qtan"
_REF_RE = re.compile(r"^(?P<camera>[^/]+)/(?P<type>[^/]+)/v?(?P<version>\d+)$")
_ONE_US = timedelta(microseconds=1)


# -- errors ---------------------------------------------------------------------
class CatalogError(Exception):
    """Base class of catalog errors."""


class NotFound(CatalogError, KeyError):
    """A record does not exist (HTTP 404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NoProduct(NotFound):
    """``best`` found no product; the message says why (HTTP 404)."""

    def __init__(self, message: str, *, camera: str, type: str, at: datetime,
                 reason: str) -> None:
        super().__init__(message)
        self.camera = camera
        self.type = type
        self.at = at
        #: one of ``no_product``, ``none_certified``, ``no_candidate``, ``gap``, ``retracted``
        self.reason = reason


class ValidityConflict(CatalogError):
    """A certification would overlap another certified range (HTTP 409)."""


class StateConflict(CatalogError):
    """A transition that the current state does not allow (HTTP 409)."""


class DuplicateContent(CatalogError):
    """A version with the same content key exists and ``force`` was not given (HTTP 409)."""

    def __init__(self, existing: ProductVersion) -> None:
        super().__init__(existing.id)
        self.existing = existing

    def __str__(self) -> str:
        e = self.existing
        return (f"{e.camera}/{e.type} v{e.version} ({e.id}) has the same inputs, parameters "
                "and code version; reuse it or force a new version")


class InvalidInput(CatalogError, ValueError):
    """Bad input that no state change could fix (HTTP 422)."""


# -- records ----------------------------------------------------------------------
def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z") if when else None


def _range_text(start: datetime | None, end: datetime | None) -> str:
    return f"[{_iso(start)}, {_iso(end) if end else 'open'})"


@dataclass(frozen=True)
class Camera:
    """A known camera."""

    name: str
    model: str | None
    description: str | None
    attrs: dict[str, Any]
    created: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"camera": self.name, "model": self.model, "description": self.description,
                "attrs": self.attrs, "created": _iso(self.created)}


@dataclass(frozen=True)
class FrameRef:
    """A raw frame of a dataset."""

    path: str
    sha256: str | None
    frame_type: str | None = None
    exptime: float | None = None
    obs_time: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"path": self.path, "sha256": self.sha256, "type": self.frame_type,
                "exptime": self.exptime, "time": _iso(self.obs_time)}


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its scan inventory and frames."""

    id: str
    camera: str
    created: datetime
    source: str | None
    label: str | None
    inventory: dict[str, Any]
    frames: tuple[FrameRef, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """API.md shape: the inventory plus id, camera, created, source, label."""
        out = {k: v for k, v in self.inventory.items() if k != "frames"}
        out.update({"id": self.id, "camera": self.camera, "created": _iso(self.created),
                    "source": self.source, "label": self.label})
        return out


@dataclass(frozen=True)
class Job:
    """A calibration job."""

    id: str
    camera: str
    dataset: str | None
    state: str
    progress: float
    stage: str | None
    message: str | None
    error: str | None
    created: datetime
    started: datetime | None
    finished: datetime | None
    products: tuple[str, ...]
    requested: tuple[str, ...]
    params: dict[str, Any]
    idempotency_key: str | None
    force: bool

    def to_dict(self) -> dict[str, Any]:
        """API.md shape."""
        return {"id": self.id, "camera": self.camera, "dataset": self.dataset,
                "state": self.state, "progress": self.progress, "stage": self.stage,
                "message": self.message, "created": _iso(self.created),
                "started": _iso(self.started), "finished": _iso(self.finished),
                "error": self.error, "products": list(self.products),
                "requested": list(self.requested), "params": self.params,
                "force": self.force}


@dataclass(frozen=True)
class ProductVersion:
    """One published version of a product."""

    id: str
    camera: str
    type: str
    version: int
    state: str
    valid_from: datetime | None
    valid_to: datetime | None
    created: datetime
    job: str | None
    dataset: str | None
    sha256: str
    content_key: str
    units: str
    shape: tuple[int, ...]
    stats: dict[str, Any]
    provenance: dict[str, Any]
    store_key: str
    array_checksums: dict[str, str]
    date_beg: datetime | None
    date_end: datetime | None

    @property
    def checksums(self) -> dict[str, Any]:
        """Checksums in the form :meth:`ProductStore.verify` takes."""
        return {"fits": self.sha256, "arrays": dict(self.array_checksums)}

    def covers(self, at: datetime) -> bool:
        """Whether ``at`` lies in the validity range ``[valid_from, valid_to)``."""
        return (self.valid_from is not None and self.valid_from <= at
                and (self.valid_to is None or at < self.valid_to))

    def to_dict(self) -> dict[str, Any]:
        """API.md shape."""
        return {"id": self.id, "camera": self.camera, "type": self.type,
                "version": self.version, "state": self.state,
                "valid_from": _iso(self.valid_from), "valid_to": _iso(self.valid_to),
                "created": _iso(self.created), "job": self.job, "dataset": self.dataset,
                "sha256": self.sha256, "content_key": self.content_key, "units": self.units,
                "shape": list(self.shape), "stats": self.stats, "provenance": self.provenance,
                "date_beg": _iso(self.date_beg), "date_end": _iso(self.date_end)}


@dataclass(frozen=True)
class ValidityRecord:
    """State and validity of a version during ``[recorded_at, superseded_at)`` of catalog time."""

    product_id: str
    version: int
    state: str
    valid_from: datetime | None
    valid_to: datetime | None
    recorded_at: datetime
    superseded_at: datetime | None
    action: str
    actor: str
    reason: str | None

    def covers(self, at: datetime) -> bool:
        """Whether ``at`` lies in the recorded validity range."""
        return (self.valid_from is not None and self.valid_from <= at
                and (self.valid_to is None or at < self.valid_to))

    @property
    def empty(self) -> bool:
        """Whether the validity range is empty (or absent)."""
        return self.valid_from is None or (self.valid_to is not None
                                           and self.valid_to <= self.valid_from)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"product": self.product_id, "version": self.version, "state": self.state,
                "valid_from": _iso(self.valid_from), "valid_to": _iso(self.valid_to),
                "recorded_at": _iso(self.recorded_at),
                "superseded_at": _iso(self.superseded_at), "action": self.action,
                "actor": self.actor, "reason": self.reason}


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the audit log."""

    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    reason: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"id": self.id, "at": _iso(self.at), "actor": self.actor, "action": self.action,
                "entity": self.entity, "entity_id": self.entity_id, "reason": self.reason,
                "details": self.details}


class Published(NamedTuple):
    """Outcome of :meth:`Catalog.publish_payload`."""

    product: ProductVersion
    reused: bool


# -- engine and migrations ------------------------------------------------------------
def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    """Create the engine of a catalog URL.

    SQLite gets WAL journaling, foreign keys, a 30 s busy timeout and real
    transactions (``BEGIN``, or ``BEGIN IMMEDIATE`` for connections with the
    ``sqlite_immediate`` execution option, which :class:`Catalog` uses for
    every write).
    """
    sa_url = make_url(normalize_url(url))
    if sa_url.get_backend_name() != "sqlite":
        return create_engine(sa_url, pool_pre_ping=True)
    memory = sa_url.database in (None, "", ":memory:")
    if not memory:
        Path(sa_url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        sa_url, connect_args={"timeout": 30, "check_same_thread": False},
        **({"poolclass": StaticPool} if memory else {}))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "sitiancal.storage:migrations")
    return cfg


def head_revision() -> str:
    """Newest revision of the catalog schema."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine_or_url: Engine | str) -> str | None:
    """Revision the database is at (``None``: not initialised)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the catalog schema; return (revision before, revision after).

    Concurrent callers are serialised (an advisory lock on PostgreSQL,
    ``BEGIN IMMEDIATE`` on SQLite), so several processes may start at once.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    cfg = _alembic_config()
    try:
        with engine.execution_options(sqlite_immediate=True).connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _MIGRATION_LOCK})
            else:
                conn.exec_driver_sql("SELECT 1")  # opens the BEGIN IMMEDIATE transaction
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, revision)
            except CommandError as exc:
                raise CatalogError(f"cannot migrate the catalog from revision {before!r}: "
                                   f"{exc}") from exc
            after = MigrationContext.configure(conn).get_current_revision()
            conn.commit()
        return before, after
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(when: datetime, what: str) -> datetime:
    if not isinstance(when, datetime):
        raise InvalidInput(f"{what} must be a datetime, got {when!r}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInput(f"{what} {when.isoformat()} has no time zone; give UTC times")
    return when.astimezone(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


# -- the catalog -------------------------------------------------------------------------
class Catalog:
    """The product catalog on one database.

    Use :meth:`open`; the instance is thread-safe (one session per call).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(sqlite_immediate=True)
        self.dialect = engine.dialect.name
        self._validity_listeners: list[Callable[[str, str], None]] = []

    def add_validity_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(camera, type)`` after every committed certify or retract.

        For caches of ``best`` answers in this process; changes made by other
        processes are not announced.
        """
        self._validity_listeners.append(listener)

    def _validity_changed(self, camera: str, product_type: str) -> None:
        for listener in list(self._validity_listeners):
            listener(camera, product_type)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Catalog:
        """Connect to the catalog at ``url``, migrating it to the newest schema first.

        With ``migrate=False`` the schema must already be at the newest revision.
        """
        engine = make_engine(url)
        try:
            if migrate:
                upgrade(engine)
            elif current_revision(engine) != head_revision():
                raise CatalogError(f"the catalog at {engine.url.render_as_string()} is not at "
                                   f"revision {head_revision()}: run `sitiancal db upgrade`")
        except OperationalError as exc:
            engine.dispose()
            raise CatalogError(f"cannot open the catalog at "
                               f"{engine.url.render_as_string()}: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalog({self.engine.url.render_as_string()!r})"

    # -- sessions ------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction: ``BEGIN IMMEDIATE`` on SQLite, committed on success."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _insert_ignore(self, session: Session, model: Any, values: Mapping[str, Any],
                       keys: Sequence[str]) -> None:
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        stmt = dialect.insert(model).values(**values).on_conflict_do_nothing(
            index_elements=list(keys))
        session.execute(stmt)

    def _audit(self, session: Session, *, at: datetime, actor: str, action: str, entity: str,
               entity_id: str, reason: str | None = None,
               details: Mapping[str, Any] | None = None) -> None:
        session.add(AuditRow(at=at, actor=actor, action=action, entity=entity,
                             entity_id=entity_id, reason=reason,
                             details=to_jsonable(dict(details or {}))))

    def _ensure_camera(self, session: Session, name: str, actor: str) -> None:
        try:
            check_name(name, "camera")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if session.get(CameraRow, name) is not None:
            return
        now = _utcnow()
        self._insert_ignore(session, CameraRow,
                            {"name": name, "attrs": {}, "created": now}, ["name"])
        self._audit(session, at=now, actor=actor, action="camera.create", entity="camera",
                    entity_id=name)

    # -- cameras ----------------------------------------------------------------------
    def upsert_camera(self, name: str, *, model: str | None = None,
                      description: str | None = None, attrs: Mapping[str, Any] | None = None,
                      actor: str = "system") -> Camera:
        """Create a camera or update its description fields; return it."""
        with self._write() as s:
            self._ensure_camera(s, name, actor)
            row = s.get(CameraRow, name)
            assert row is not None
            changes: dict[str, Any] = {}
            if model is not None and model != row.model:
                changes["model"] = model
            if description is not None and description != row.description:
                changes["description"] = description
            if attrs is not None and dict(attrs) != row.attrs:
                changes["attrs"] = to_jsonable(dict(attrs))
            for key, value in changes.items():
                setattr(row, key, value)
            if changes:
                self._audit(s, at=_utcnow(), actor=actor, action="camera.update",
                            entity="camera", entity_id=name, details=changes)
            return _camera(row)

    def get_camera(self, name: str) -> Camera:
        """A camera by name."""
        with self._read() as s:
            row = s.get(CameraRow, name)
            if row is None:
                raise NotFound(f"unknown camera {name!r}")
            return _camera(row)

    def list_cameras(self) -> list[Camera]:
        """All cameras, by name."""
        with self._read() as s:
            return [_camera(r) for r in s.scalars(select(CameraRow).order_by(CameraRow.name))]

    # -- datasets -------------------------------------------------------------------------
    def add_dataset(self, camera: str, inventory: Mapping[str, Any] | Any,
                    frames: Iterable[Mapping[str, Any]] | None = None, *,
                    source: str | None = None, label: str | None = None,
                    actor: str = "system") -> str:
        """Register a dataset; return its id.

        Parameters
        ----------
        camera
            Camera name (created if new).
        inventory
            The scan inventory (a mapping, or a pydantic model such as
            :class:`sitiancal.storage.scan.Inventory`).
        frames
            ``{"path", "sha256"}`` per frame (optionally ``type``, ``exptime``,
            ``time``); default: the ``frames`` of the inventory (sha256 may be
            ``None`` until the cube is built: :meth:`set_frame_checksums`).
        """
        inv = _inventory_dict(inventory)
        frame_list = list(frames) if frames is not None else list(inv.get("frames", []))
        if source is None and isinstance(inv.get("source"), str):
            source = inv["source"]
        dataset_id = _new_id()
        now = _utcnow()
        with self._write() as s:
            self._ensure_camera(s, camera, actor)
            s.add(DatasetRow(id=dataset_id, camera=camera, created=now, source=source,
                             label=label, inventory=inv))
            s.flush()
            self._add_frame_rows(s, dataset_id, frame_list, start=0)
            self._audit(s, at=now, actor=actor, action="dataset.add", entity="dataset",
                        entity_id=dataset_id, details={"camera": camera, "source": source,
                                                       "frames": len(frame_list)})
        return dataset_id

    def _add_frame_rows(self, session: Session, dataset_id: str,
                        frames: Sequence[Mapping[str, Any]], start: int) -> None:
        for i, frame in enumerate(frames):
            if "path" not in frame:
                raise InvalidInput(f"frame {frame!r} has no path")
            when = frame.get("time")
            if isinstance(when, str):
                when = datetime.fromisoformat(when.replace("Z", "+00:00"))
            if isinstance(when, datetime) and when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            kind = frame.get("type", frame.get("frame_type"))
            session.add(FrameRow(
                dataset_id=dataset_id, position=start + i, path=str(frame["path"]),
                sha256=frame.get("sha256"), frame_type=str(kind) if kind is not None else None,
                exptime=float(frame["exptime"]) if frame.get("exptime") is not None else None,
                obs_time=when))

    def add_frames(self, dataset_id: str, frames: Iterable[Mapping[str, Any]], *,
                   inventory: Mapping[str, Any] | Any | None = None,
                   actor: str = "system") -> int:
        """Append frames to a dataset (uploads), optionally replacing its inventory.

        Returns the number of frames of the dataset afterwards.
        """
        frame_list = list(frames)
        with self._write() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"unknown dataset {dataset_id!r}")
            count = s.scalar(select(func.count()).select_from(FrameRow)
                             .where(FrameRow.dataset_id == dataset_id)) or 0
            # after the position of the last frame (frames left out by
            # :meth:`leave_out_frames` leave gaps)
            last = s.scalar(select(func.max(FrameRow.position))
                            .where(FrameRow.dataset_id == dataset_id))
            self._add_frame_rows(s, dataset_id, frame_list,
                                 start=0 if last is None else last + 1)
            if inventory is not None:
                row.inventory = _inventory_dict(inventory)
            self._audit(s, at=_utcnow(), actor=actor, action="dataset.add_frames",
                        entity="dataset", entity_id=dataset_id,
                        details={"added": [str(f["path"]) for f in frame_list]})
            return count + len(frame_list)

    def leave_out_frames(self, dataset_id: str, rejections: Iterable[Mapping[str, str]], *,
                         actor: str = "system") -> list[str]:
        """Move frames found unusable once their pixels were read to the dataset's rejected files.

        ``rejections``: ``{"file", "reason"}`` per frame (the cube's
        ``left_out``: NaN, fractions or out-of-range counts that the header
        scan could not see). The inventory's counts, exposure times,
        temperature range and shape become those of the frames left
        (:meth:`sitiancal.storage.scan.Inventory.leave_out`), each file is
        listed under ``rejected`` with its reason, and its frame row goes (the
        file itself is untouched). Frames the dataset no longer accepts are
        skipped, so calling it again changes nothing. Returns the files moved.
        """
        from sitiancal.storage.scan import Inventory, Rejection

        wanted = [Rejection.model_validate(dict(r)) for r in rejections]
        with self._write() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"unknown dataset {dataset_id!r}")
            raw = dict(row.inventory or {})
            try:  # an upload dataset's source is null
                inventory = Inventory.model_validate({**raw, "source": raw.get("source") or ""})
            except ValueError as exc:  # pydantic's ValidationError
                raise InvalidInput(f"dataset {dataset_id} has no scan inventory to leave "
                                   f"frames out of: {exc}") from exc
            accepted = {f.path for f in inventory.frames}
            moved = [r for r in wanted if r.file in accepted]
            if not moved:
                return []
            row.inventory = {**inventory.leave_out(moved).model_dump(mode="json"),
                             "source": raw.get("source")}
            gone = [r.file for r in moved]
            for frame in s.scalars(select(FrameRow).where(FrameRow.dataset_id == dataset_id,
                                                          FrameRow.path.in_(gone))):
                s.delete(frame)
            self._audit(s, at=_utcnow(), actor=actor, action="dataset.leave_out",
                        entity="dataset", entity_id=dataset_id,
                        details={"left_out": [r.model_dump() for r in moved]})
            return gone

    def set_frame_checksums(self, dataset_id: str, checksums: Mapping[str, str], *,
                            actor: str = "system") -> None:
        """Record the sha256 of frames (``{path: sha256}``), e.g. once the cube is built."""
        with self._write() as s:
            rows = s.scalars(select(FrameRow).where(FrameRow.dataset_id == dataset_id)).all()
            if not rows and s.get(DatasetRow, dataset_id) is None:
                raise NotFound(f"unknown dataset {dataset_id!r}")
            known = {r.path: r for r in rows}
            missing = sorted(set(checksums) - set(known))
            if missing:
                raise InvalidInput(f"dataset {dataset_id} has no frame {missing[0]!r}")
            changed = {}
            for path, sha in checksums.items():
                if known[path].sha256 not in (None, sha):
                    raise StateConflict(f"frame {path} of dataset {dataset_id} already has "
                                        f"sha256 {known[path].sha256}, not {sha}")
                if known[path].sha256 is None:
                    known[path].sha256 = sha
                    changed[path] = sha
            if changed:
                self._audit(s, at=_utcnow(), actor=actor, action="dataset.checksums",
                            entity="dataset", entity_id=dataset_id,
                            details={"frames": len(changed)})

    def get_dataset(self, dataset_id: str) -> Dataset:
        """A dataset with its frames."""
        with self._read() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"unknown dataset {dataset_id!r}")
            frames = s.scalars(select(FrameRow).where(FrameRow.dataset_id == dataset_id)
                               .order_by(FrameRow.position)).all()
            return _dataset(row, frames)

    def list_datasets(self, camera: str | None = None) -> list[Dataset]:
        """Datasets (newest first), without their frame lists."""
        with self._read() as s:
            stmt = select(DatasetRow).order_by(DatasetRow.created.desc(), DatasetRow.id)
            if camera is not None:
                stmt = stmt.where(DatasetRow.camera == camera)
            return [_dataset(r, ()) for r in s.scalars(stmt)]

    # -- jobs -----------------------------------------------------------------------------
    def create_job(self, camera: str, dataset_id: str | None = None, *,
                   products: Sequence[str] = (), params: Mapping[str, Any] | None = None,
                   idempotency_key: str | None = None, force: bool = False,
                   actor: str = "system") -> Job:
        """Create a queued job; the same ``idempotency_key`` returns the same job."""
        if idempotency_key is not None:
            existing = self._job_by_key(idempotency_key)
            if existing is not None:
                return existing
        for kind in products:
            try:
                check_type(kind)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from exc
        job_id = _new_id()
        now = _utcnow()
        try:
            with self._write() as s:
                self._ensure_camera(s, camera, actor)
                if dataset_id is not None:
                    ds = s.get(DatasetRow, dataset_id)
                    if ds is None:
                        raise NotFound(f"unknown dataset {dataset_id!r}")
                    if ds.camera != camera:
                        raise InvalidInput(f"dataset {dataset_id} belongs to camera "
                                           f"{ds.camera}, not {camera}")
                s.add(JobRow(id=job_id, camera=camera, dataset_id=dataset_id, state="queued",
                             progress=0.0, created=now, idempotency_key=idempotency_key,
                             params=to_jsonable(dict(params or {})), requested=list(products),
                             force=bool(force)))
                self._audit(s, at=now, actor=actor, action="job.create", entity="job",
                            entity_id=job_id, details={"camera": camera, "dataset": dataset_id,
                                                       "products": list(products),
                                                       "force": bool(force)})
        except IntegrityError:
            if idempotency_key is not None:
                existing = self._job_by_key(idempotency_key)
                if existing is not None:
                    return existing
            raise
        return self.get_job(job_id)

    def _job_by_key(self, key: str) -> Job | None:
        with self._read() as s:
            row = s.scalar(select(JobRow).where(JobRow.idempotency_key == key))
            return _job(s, row) if row is not None else None

    def update_job(self, job_id: str, *, state: str | None = None,
                   progress: float | None = None, stage: str | None = None,
                   message: str | None = None, error: str | None = None,
                   actor: str = "system") -> Job:
        """Update a job; ``started``/``finished`` are set on entering running/terminal states.

        A job in a terminal state (succeeded, failed, cancelled) cannot change
        state any more (:class:`StateConflict`).
        """
        if state is not None and state not in JOB_STATES:
            raise InvalidInput(f"unknown job state {state!r}; use one of {JOB_STATES}")
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise InvalidInput(f"progress {progress} outside [0, 1]")
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"unknown job {job_id!r}")
            now = _utcnow()
            if state is not None and state != row.state:
                if row.state in TERMINAL_JOB_STATES:
                    raise StateConflict(f"job {job_id} is {row.state}; it cannot become {state}")
                self._audit(s, at=now, actor=actor, action="job.state", entity="job",
                            entity_id=job_id, reason=error or message,
                            details={"from": row.state, "to": state})
                row.state = state
                if state == "running" and row.started is None:
                    row.started = now
                if state in TERMINAL_JOB_STATES:
                    row.finished = now
            if progress is not None:
                row.progress = float(progress)
            if stage is not None:
                row.stage = stage
            if message is not None:
                row.message = message
            if error is not None:
                row.error = error
            s.flush()
            return _job(s, row)

    def get_job(self, job_id: str) -> Job:
        """A job by id."""
        with self._read() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"unknown job {job_id!r}")
            return _job(s, row)

    def list_jobs(self, camera: str | None = None, state: str | None = None,
                  limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""
        with self._read() as s:
            stmt = select(JobRow).order_by(JobRow.created.desc(), JobRow.id)
            if camera is not None:
                stmt = stmt.where(JobRow.camera == camera)
            if state is not None:
                stmt = stmt.where(JobRow.state == state)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_job(s, r) for r in s.scalars(stmt)]

    def link_product(self, job_id: str, product_id: str, *, reused: bool = True,
                     actor: str = "system") -> None:
        """Record that a job produced (or reused) a product version."""
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFound(f"unknown job {job_id!r}")
            if s.get(ProductVersionRow, product_id) is None:
                raise NotFound(f"unknown product {product_id!r}")
            self._insert_ignore(s, JobProductRow, {"job_id": job_id, "product_id": product_id,
                                                   "reused": reused}, ["job_id", "product_id"])
            self._audit(s, at=_utcnow(), actor=actor, action="job.product", entity="job",
                        entity_id=job_id, details={"product": product_id, "reused": reused})

    # -- products: publishing -------------------------------------------------------------
    def _series(self, session: Session, camera: str, product_type: str, *,
                create: bool, lock: bool, actor: str = "system") -> ProductRow | None:
        if create:
            try:
                check_type(product_type)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from exc
            self._ensure_camera(session, camera, actor)
            self._insert_ignore(session, ProductRow, {"camera": camera, "type": product_type,
                                                      "last_version": 0,
                                                      "created": _utcnow()},
                                ["camera", "type"])
        stmt = select(ProductRow).where(ProductRow.camera == camera,
                                        ProductRow.type == product_type)
        if lock:
            stmt = stmt.with_for_update()
        return session.scalar(stmt)

    def reserve_version(self, camera: str, product_type: str, *,
                        actor: str = "system") -> int:
        """Hand out the next version number of a camera and type (committed; never reused)."""
        with self._write() as s:
            series = self._series(s, camera, product_type, create=True, lock=True, actor=actor)
            assert series is not None
            series.last_version += 1
            number = series.last_version
            self._audit(s, at=_utcnow(), actor=actor, action="product.reserve",
                        entity="series", entity_id=f"{camera}/{product_type}",
                        details={"version": number})
            return number

    def _now_for(self, session: Session, series_id: int) -> datetime:
        """Catalog time of a change: now, but strictly after the series' last change."""
        now = _utcnow()
        last = session.scalar(select(func.max(ValidityHistoryRow.recorded_at))
                              .where(ValidityHistoryRow.series_id == series_id))
        if last is not None and now <= last:
            now = last + _ONE_US
        return now

    def _record(self, session: Session, row: ProductVersionRow, *, now: datetime, action: str,
                actor: str, reason: str | None) -> None:
        session.execute(update(ValidityHistoryRow)
                        .where(ValidityHistoryRow.product_id == row.id,
                               ValidityHistoryRow.superseded_at.is_(None))
                        .values(superseded_at=now))
        session.add(ValidityHistoryRow(
            product_id=row.id, series_id=row.series_id, version=row.version, state=row.state,
            valid_from=row.valid_from, valid_to=row.valid_to, recorded_at=now,
            superseded_at=None, action=action, actor=actor, reason=reason))

    def publish_product(self, staged: StagedProduct, payload: ProductPayload, *,
                        store: ProductStore, job_id: str | None = None,
                        dataset_id: str | None = None, content_key: str | None = None,
                        force: bool = False, actor: str = "system") -> ProductVersion:
        """Publish a staged version: move it to its final key, insert it in one transaction.

        The version number is the one reserved for ``staged``
        (:meth:`reserve_version`). Unless ``force``, a version with the same
        content key (not retracted) makes this a :class:`DuplicateContent`
        error. On any failure the staged or moved files are removed and the
        catalog is unchanged.
        """
        key = content_key or staged.content_key
        moved: str | None = None
        try:
            if (payload.camera, payload.type) != (staged.camera, staged.type):
                raise InvalidInput(f"staged {staged.camera}/{staged.type} does not match the "
                                   f"payload {payload.camera}/{payload.type}")
            if not force:
                existing = self.find_by_content_key(staged.camera, staged.type, key)
                if existing is not None:
                    raise DuplicateContent(existing)
            moved = store.publish(staged)
            with self._write() as s:
                series = self._series(s, staged.camera, staged.type, create=False, lock=True)
                if series is None or staged.version > series.last_version:
                    raise StateConflict(f"version {staged.version} of {staged.camera}/"
                                        f"{staged.type} was not reserved")
                if not force:
                    dup = s.scalar(select(ProductVersionRow).where(
                        ProductVersionRow.series_id == series.id,
                        ProductVersionRow.content_key == key,
                        ProductVersionRow.state != "retracted"))
                    if dup is not None:
                        raise DuplicateContent(_product(dup))
                now = self._now_for(s, series.id)
                provenance = dict(to_jsonable(payload.provenance))
                provenance.update({"inputs": [{"path": str(i["path"]),
                                               "sha256": str(i["sha256"])}
                                              for i in payload.inputs],
                                   "params": to_jsonable(payload.params),
                                   "code_version": payload.code_version,
                                   "content_key": key, "dataset": dataset_id, "job": job_id})
                row = ProductVersionRow(
                    id=_new_id(), series_id=series.id, camera=staged.camera, type=staged.type,
                    version=staged.version, state="candidate", valid_from=None, valid_to=None,
                    created=now, job_id=job_id, dataset_id=dataset_id, store_key=moved,
                    sha256=staged.checksums.fits, content_key=key,
                    array_checksums=dict(staged.checksums.arrays), units=staged.units,
                    shape=list(staged.shape), stats=to_jsonable(payload.stats),
                    provenance=provenance, date_beg=payload.date_beg,
                    date_end=payload.date_end)
                s.add(row)
                s.flush()
                for i, item in enumerate(payload.inputs):
                    s.add(ProductInputRow(product_id=row.id, position=i, path=str(item["path"]),
                                          sha256=str(item["sha256"])))
                if job_id is not None:
                    s.add(JobProductRow(job_id=job_id, product_id=row.id, reused=False))
                self._record(s, row, now=now, action="publish", actor=actor, reason=None)
                self._audit(s, at=now, actor=actor, action="product.publish", entity="product",
                            entity_id=row.id, details={
                                "camera": row.camera, "type": row.type,
                                "version": row.version, "store_key": moved,
                                "sha256": row.sha256, "content_key": key, "job": job_id,
                                "dataset": dataset_id, "force": force})
                result = _product(row)
            return result
        except BaseException:
            try:
                if moved is not None:
                    store.delete_orphan(moved)
                else:
                    store.discard(staged)
            except Exception:  # the original error matters more; sweep_staging cleans up
                log.exception("could not remove the files of a failed publish")
            raise

    def publish_payload(self, store: ProductStore, payload: ProductPayload, *,
                        job_id: str | None = None, dataset_id: str | None = None,
                        force: bool = False, actor: str = "system") -> Published:
        """Reuse, or reserve + stage + publish, a product version.

        Unless ``force``, an existing version with the payload's content key
        is reused (and linked to ``job_id``). Otherwise a version number is
        reserved, the payload staged and published; nothing is left behind on
        failure (the reserved number is burned).
        """
        if not force:
            existing = self.find_by_content_key(payload.camera, payload.type,
                                                payload.content_key)
            if existing is not None:
                if job_id is not None:
                    self.link_product(job_id, existing.id, reused=True, actor=actor)
                return Published(existing, True)
        try:
            payload.validate()
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        version = self.reserve_version(payload.camera, payload.type, actor=actor)
        staged = store.stage(payload, version)
        product = self.publish_product(staged, payload, store=store, job_id=job_id,
                                       dataset_id=dataset_id, force=force, actor=actor)
        return Published(product, False)

    def sweep_orphans(self, store: ProductStore, older_than: timedelta, *,
                      now: datetime | None = None) -> list[str]:
        """Remove what a crash left in ``store``; return the removed keys.

        Staging folders older than ``older_than`` (:meth:`ProductStore.sweep_staging`),
        and published keys that no catalog row references and that were
        created more than ``older_than`` ago (a process that died between
        moving the files and committing the catalog transaction).
        """
        now = now or _utcnow()
        removed = store.sweep_staging(older_than, now=now)
        with self._read() as s:
            known = set(s.scalars(select(ProductVersionRow.store_key)))
        for key in store.list_product_keys():
            if key in known:
                continue
            created = store.product_created(key)
            if created is None or now - created > older_than:
                store.delete_orphan(key)
                removed.append(key)
        return removed

    # -- products: reading ------------------------------------------------------------------
    def _product_row(self, session: Session, ref: str) -> ProductVersionRow:
        row = session.get(ProductVersionRow, ref)
        if row is not None:
            return row
        match = _REF_RE.match(ref)
        if match:
            row = session.scalar(select(ProductVersionRow).where(
                ProductVersionRow.camera == match["camera"],
                ProductVersionRow.type == match["type"],
                ProductVersionRow.version == int(match["version"])))
            if row is not None:
                return row
        raise NotFound(f"unknown product {ref!r} (give an id or CAMERA/TYPE/vN)")

    def get_product(self, ref: str) -> ProductVersion:
        """A version by id, or by ``CAMERA/TYPE/vN``."""
        with self._read() as s:
            return _product(self._product_row(s, ref))

    def product_inputs(self, ref: str) -> list[dict[str, str]]:
        """Input frames of a version (path, sha256), in order."""
        with self._read() as s:
            row = self._product_row(s, ref)
            rows = s.scalars(select(ProductInputRow).where(ProductInputRow.product_id == row.id)
                             .order_by(ProductInputRow.position))
            return [{"path": r.path, "sha256": r.sha256} for r in rows]

    def list_products(self, camera: str | None = None, type: str | None = None,
                      state: str | None = None, limit: int | None = None) -> list[ProductVersion]:
        """Versions, by camera, type and version (newest version first)."""
        with self._read() as s:
            stmt = select(ProductVersionRow).order_by(
                ProductVersionRow.camera, ProductVersionRow.type,
                ProductVersionRow.version.desc())
            if camera is not None:
                stmt = stmt.where(ProductVersionRow.camera == camera)
            if type is not None:
                stmt = stmt.where(ProductVersionRow.type == type)
            if state is not None:
                stmt = stmt.where(ProductVersionRow.state == state)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_product(r) for r in s.scalars(stmt)]

    def find_by_content_key(self, camera: str, product_type: str, content_key: str, *,
                            include_retracted: bool = False) -> ProductVersion | None:
        """Newest version of a camera and type with this content key (``None`` if none)."""
        with self._read() as s:
            stmt = (select(ProductVersionRow)
                    .where(ProductVersionRow.camera == camera,
                           ProductVersionRow.type == product_type,
                           ProductVersionRow.content_key == content_key)
                    .order_by(ProductVersionRow.version.desc()).limit(1))
            if not include_retracted:
                stmt = stmt.where(ProductVersionRow.state != "retracted")
            row = s.scalar(stmt)
            return _product(row) if row is not None else None

    def verify(self, ref: str, store: ProductStore) -> VerifyReport:
        """Recompute a version's checksums in the store and compare with the catalog's."""
        from sitiancal.storage.store import ProductMissing, VerifyReport

        product = self.get_product(ref)
        try:
            return store.verify(product.store_key, product.checksums)
        except ProductMissing as exc:
            # a catalogued version whose stored files are gone (or lost their commit
            # marker) is a verification failure to report, not an error to abort on
            return VerifyReport(product.store_key, False, (), (f"missing from the store: {exc}",))

    # -- products: validity ------------------------------------------------------------------
    def certify(self, ref: str, valid_from: datetime, valid_to: datetime | None = None, *,
                actor: str, reason: str | None = None) -> ProductVersion:
        """Certify a version for ``[valid_from, valid_to)`` (``None``: open ended).

        See the module docstring for how neighbouring ranges are trimmed.

        Raises
        ------
        ValidityConflict
            An explicit ``valid_to`` overlaps a later certified range.
        StateConflict
            The version is retracted.
        InvalidInput
            Naive times, or ``valid_to <= valid_from``.
        """
        start = _aware(valid_from, "valid_from")
        end = _aware(valid_to, "valid_to") if valid_to is not None else None
        if end is not None and end <= start:
            raise InvalidInput(f"valid_to {_iso(end)} must be after valid_from {_iso(start)}")
        if not actor:
            raise InvalidInput("certify needs an actor")
        try:
            with self._write() as s:
                target = self._product_row(s, ref)
                series = self._series(s, target.camera, target.type, create=False, lock=True)
                assert series is not None
                s.refresh(target)
                if target.state == "retracted":
                    raise StateConflict(f"{_label(target)} is retracted; it cannot be certified")
                others = s.scalars(select(ProductVersionRow).where(
                    ProductVersionRow.series_id == series.id,
                    ProductVersionRow.state == "certified",
                    ProductVersionRow.id != target.id)).all()
                trims, later = [], []
                for other in others:
                    assert other.valid_from is not None
                    if other.valid_to is not None and other.valid_to <= other.valid_from:
                        continue  # empty range: valid nowhere
                    if other.valid_from <= start and (other.valid_to is None
                                                      or start < other.valid_to):
                        trims.append(other)
                    elif other.valid_from > start:
                        later.append(other)
                if later:
                    first = min(later, key=lambda r: r.valid_from)
                    if end is None:
                        end = first.valid_from
                    elif end > first.valid_from:
                        raise ValidityConflict(
                            f"{_label(target)} {_range_text(start, end)} would overlap "
                            f"certified {_label(first)} "
                            f"{_range_text(first.valid_from, first.valid_to)}; end it by "
                            f"{_iso(first.valid_from)} or retract {_label(first)}")
                now = self._now_for(s, series.id)
                why = reason or f"certified {_label(target)} from {_iso(start)}"
                for other in trims:
                    before = _range_text(other.valid_from, other.valid_to)
                    other.valid_to = start
                    s.flush()
                    self._record(s, other, now=now, action="trim", actor=actor, reason=why)
                    self._audit(s, at=now, actor=actor, action="product.trim",
                                entity="product", entity_id=other.id, reason=why,
                                details={"version": other.version, "before": before,
                                         "after": _range_text(other.valid_from, start),
                                         "by": target.id})
                before_state = target.state
                before_range = _range_text(target.valid_from, target.valid_to)
                target.state = "certified"
                target.valid_from = start
                target.valid_to = end
                s.flush()
                self._record(s, target, now=now, action="certify", actor=actor, reason=reason)
                self._audit(s, at=now, actor=actor, action="product.certify", entity="product",
                            entity_id=target.id, reason=reason, details={
                                "version": target.version, "from_state": before_state,
                                "before": before_range, "after": _range_text(start, end),
                                "requested_valid_to": _iso(valid_to) if valid_to else None,
                                "trimmed": [o.id for o in trims]})
                result = _product(target)
        except IntegrityError as exc:
            raise ValidityConflict(f"certifying {ref} would overlap another certified range "
                                   f"(refused by the database: {exc.orig})") from exc
        self._validity_changed(result.camera, result.type)
        return result

    def retract(self, ref: str, *, actor: str, reason: str) -> ProductVersion:
        """Retract a version (candidate or certified); its history is kept."""
        if not reason or not reason.strip():
            raise InvalidInput("retracting needs a reason")
        if not actor:
            raise InvalidInput("retract needs an actor")
        with self._write() as s:
            target = self._product_row(s, ref)
            series = self._series(s, target.camera, target.type, create=False, lock=True)
            assert series is not None
            s.refresh(target)
            if target.state == "retracted":
                raise StateConflict(f"{_label(target)} is already retracted")
            now = self._now_for(s, series.id)
            before = target.state
            target.state = "retracted"
            s.flush()
            self._record(s, target, now=now, action="retract", actor=actor, reason=reason)
            self._audit(s, at=now, actor=actor, action="product.retract", entity="product",
                        entity_id=target.id, reason=reason, details={
                            "version": target.version, "from_state": before,
                            "range": _range_text(target.valid_from, target.valid_to)})
            result = _product(target)
        self._validity_changed(result.camera, result.type)
        return result

    def history(self, camera: str, product_type: str) -> list[ValidityRecord]:
        """Every state/validity change of a camera and type, oldest first."""
        with self._read() as s:
            series = self._series(s, camera, product_type, create=False, lock=False)
            if series is None:
                return []
            return self._history_rows(s, series.id, as_of=None, current_only=False)

    def _history_rows(self, session: Session, series_id: int, *, as_of: datetime | None,
                      current_only: bool) -> list[ValidityRecord]:
        stmt = (select(ValidityHistoryRow).where(ValidityHistoryRow.series_id == series_id)
                .order_by(ValidityHistoryRow.recorded_at, ValidityHistoryRow.id))
        if as_of is not None:
            stmt = stmt.where(ValidityHistoryRow.recorded_at <= as_of,
                              or_(ValidityHistoryRow.superseded_at.is_(None),
                                  ValidityHistoryRow.superseded_at > as_of))
        elif current_only:
            stmt = stmt.where(ValidityHistoryRow.superseded_at.is_(None))
        return [_validity(r) for r in session.scalars(stmt)]

    def best(self, camera: str, product_type: str, at: datetime | None = None, *,
             state: str = "certified", as_of: datetime | None = None) -> ProductVersion:
        """The version to use for ``camera``/``type`` at time ``at`` (default now).

        Parameters
        ----------
        state
            ``certified``: the certified version whose range contains ``at``;
            ``candidate``: the newest candidate (``at`` is not used).
        as_of
            Answer as the catalog would have at this time (from the validity
            history); the returned record carries the state and range it had then.

        Raises
        ------
        NoProduct
            With the reason: no product of that type, none certified, a gap in
            coverage (with the nearest ranges), or a retraction.
        """
        at = _aware(at, "at") if at is not None else _utcnow()
        as_of = _aware(as_of, "as_of") if as_of is not None else None
        if state not in ("certified", "candidate"):
            raise InvalidInput(f"state must be 'certified' or 'candidate', not {state!r}")
        with self._read() as s:
            series = self._series(s, camera, product_type, create=False, lock=False)
            if series is None:
                raise self._no_product(s, camera, product_type, at, state, [], as_of)
            if as_of is None:
                stmt = select(ProductVersionRow).where(
                    ProductVersionRow.series_id == series.id,
                    ProductVersionRow.state == state)
                if state == "certified":
                    stmt = stmt.where(ProductVersionRow.valid_from <= at,
                                      or_(ProductVersionRow.valid_to.is_(None),
                                          ProductVersionRow.valid_to > at))
                row = s.scalar(stmt.order_by(ProductVersionRow.version.desc()).limit(1))
                if row is not None:
                    return _product(row)
                snapshot = self._history_rows(s, series.id, as_of=None, current_only=True)
            else:
                snapshot = self._history_rows(s, series.id, as_of=as_of, current_only=False)
                pick = _pick(snapshot, at, state)
                if pick is not None:
                    row = s.get(ProductVersionRow, pick.product_id)
                    assert row is not None
                    return replace(_product(row), state=pick.state, valid_from=pick.valid_from,
                                   valid_to=pick.valid_to)
            raise self._no_product(s, camera, product_type, at, state, snapshot, as_of)

    def _no_product(self, session: Session, camera: str, product_type: str, at: datetime,
                    state: str, snapshot: list[ValidityRecord],
                    as_of: datetime | None) -> NoProduct:
        when = f" as of {_iso(as_of)}" if as_of is not None else ""
        label = f"{camera}/{product_type}"

        def fail(reason: str, message: str) -> NoProduct:
            return NoProduct(message, camera=camera, type=product_type, at=at, reason=reason)

        if not snapshot:
            known = session.get(CameraRow, camera) is not None
            suffix = "" if known else f" (camera {camera!r} is unknown)"
            return fail("no_product", f"no {product_type} product for camera {camera}{when}"
                        f"{suffix}")
        listing = ", ".join(f"v{r.version} {r.state}" for r in
                            sorted(snapshot, key=lambda r: r.version)[-5:])
        if state == "candidate":
            return fail("no_candidate", f"{label} has no candidate version{when} "
                        f"(newest: {listing})")
        certified = [r for r in snapshot if r.state == "certified" and not r.empty]
        retracted = [r for r in snapshot if r.state == "retracted" and r.covers(at)]
        parts = []
        reason = "gap"
        if retracted:
            gone = max(retracted, key=lambda r: r.recorded_at)
            reason = "retracted"
            parts.append(f"v{gone.version}, certified for "
                         f"{_range_text(gone.valid_from, gone.valid_to)}, was retracted by "
                         f"{gone.actor} at {_iso(gone.recorded_at)}: {gone.reason}")
        if not certified:
            if not retracted:
                reason = "none_certified"
            parts.append(f"{len(snapshot)} version(s) exist but none is certified "
                         f"({listing})")
        else:
            before = [r for r in certified if r.valid_to is not None and r.valid_to <= at]
            after = [r for r in certified if r.valid_from is not None and r.valid_from > at]
            prev = max(before, key=lambda r: r.valid_to or at) if before else None
            nxt = min(after, key=lambda r: r.valid_from or at) if after else None
            desc = {r: f"v{r.version} {_range_text(r.valid_from, r.valid_to)}"
                    for r in (prev, nxt) if r is not None}
            if prev is not None and nxt is not None:
                parts.append(f"{_iso(at)} falls in a gap between {desc[prev]} and {desc[nxt]}")
            elif prev is not None:
                parts.append(f"{_iso(at)} is after the last certified range {desc[prev]}")
            elif nxt is not None:
                parts.append(f"{_iso(at)} is before the first certified range {desc[nxt]}")
        return fail(reason, f"no certified {product_type} for camera {camera} at "
                    f"{_iso(at)}{when}: " + "; ".join(parts))

    # -- audit -----------------------------------------------------------------------------
    def record_audit(self, *, actor: str, action: str, entity: str, entity_id: str,
                     reason: str | None = None,
                     details: Mapping[str, Any] | None = None) -> None:
        """Add one entry to the audit log (a write with no row of its own, e.g. a request)."""
        with self._write() as s:
            self._audit(s, at=_utcnow(), actor=actor, action=action, entity=entity,
                        entity_id=entity_id, reason=reason, details=details)

    def audit_log(self, *, entity: str | None = None, entity_id: str | None = None,
                  actor: str | None = None, action: str | None = None,
                  since: datetime | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first, filtered."""
        with self._read() as s:
            stmt = select(AuditRow).order_by(AuditRow.at, AuditRow.id)
            if entity is not None:
                stmt = stmt.where(AuditRow.entity == entity)
            if entity_id is not None:
                stmt = stmt.where(AuditRow.entity_id == entity_id)
            if actor is not None:
                stmt = stmt.where(AuditRow.actor == actor)
            if action is not None:
                stmt = stmt.where(AuditRow.action == action)
            if since is not None:
                stmt = stmt.where(AuditRow.at >= _aware(since, "since"))
            if limit is not None:
                stmt = stmt.limit(limit)
            return [AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action,
                               entity=r.entity, entity_id=r.entity_id, reason=r.reason,
                               details=dict(r.details or {})) for r in s.scalars(stmt)]


# -- row -> record conversions -------------------------------------------------------------
def _label(row: ProductVersionRow) -> str:
    return f"{row.camera}/{row.type} v{row.version}"


def _pick(snapshot: list[ValidityRecord], at: datetime, state: str) -> ValidityRecord | None:
    if state == "candidate":
        candidates = [r for r in snapshot if r.state == "candidate"]
        return max(candidates, key=lambda r: r.version) if candidates else None
    hits = [r for r in snapshot if r.state == "certified" and r.covers(at)]
    return max(hits, key=lambda r: r.version) if hits else None


def _inventory_dict(inventory: Mapping[str, Any] | Any) -> dict[str, Any]:
    if hasattr(inventory, "model_dump"):
        return dict(inventory.model_dump(mode="json"))
    if isinstance(inventory, Mapping):
        return dict(to_jsonable(dict(inventory)))
    raise InvalidInput(f"inventory must be a mapping or a pydantic model, not "
                       f"{type(inventory).__name__}")


def _camera(row: CameraRow) -> Camera:
    return Camera(name=row.name, model=row.model, description=row.description,
                  attrs=dict(row.attrs or {}), created=row.created)


def _dataset(row: DatasetRow, frames: Sequence[FrameRow]) -> Dataset:
    return Dataset(id=row.id, camera=row.camera, created=row.created, source=row.source,
                   label=row.label, inventory=dict(row.inventory or {}),
                   frames=tuple(FrameRef(path=f.path, sha256=f.sha256, frame_type=f.frame_type,
                                         exptime=f.exptime, obs_time=f.obs_time)
                                for f in frames))


def _job(session: Session, row: JobRow) -> Job:
    products = session.scalars(select(JobProductRow.product_id)
                               .where(JobProductRow.job_id == row.id)
                               .order_by(JobProductRow.product_id)).all()
    return Job(id=row.id, camera=row.camera, dataset=row.dataset_id, state=row.state,
               progress=row.progress, stage=row.stage, message=row.message, error=row.error,
               created=row.created, started=row.started, finished=row.finished,
               products=tuple(products), requested=tuple(row.requested or ()),
               params=dict(row.params or {}), idempotency_key=row.idempotency_key,
               force=row.force)


def _product(row: ProductVersionRow) -> ProductVersion:
    return ProductVersion(
        id=row.id, camera=row.camera, type=row.type, version=row.version, state=row.state,
        valid_from=row.valid_from, valid_to=row.valid_to, created=row.created, job=row.job_id,
        dataset=row.dataset_id, sha256=row.sha256, content_key=row.content_key,
        units=row.units, shape=tuple(row.shape or ()), stats=dict(row.stats or {}),
        provenance=dict(row.provenance or {}), store_key=row.store_key,
        array_checksums=dict(row.array_checksums or {}), date_beg=row.date_beg,
        date_end=row.date_end)


def _validity(row: ValidityHistoryRow) -> ValidityRecord:
    return ValidityRecord(product_id=row.product_id, version=row.version, state=row.state,
                          valid_from=row.valid_from, valid_to=row.valid_to,
                          recorded_at=row.recorded_at, superseded_at=row.superseded_at,
                          action=row.action, actor=row.actor, reason=row.reason)
