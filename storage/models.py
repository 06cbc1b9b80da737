"""SQLAlchemy 2 ORM models of the product catalog.

The schema itself is owned by the Alembic migrations in
``sitiancal.storage.migrations.versions``; these classes mirror it (a test
compares the two with Alembic's autogenerate). Tables:

``cameras``
    one row per camera name (``MST3``); created on first use.
``datasets`` / ``frames``
    a registered set of raw frames: the scan inventory as JSON, and one row per
    frame with its path and sha256.
``jobs`` / ``job_products``
    calibration jobs (state, progress, timestamps, idempotency key, params) and
    the product versions each job produced or reused.
``products``
    one *series* per (camera, product type), holding the version counter
    ``last_version``: version numbers are handed out from it and never reused.
``product_versions`` / ``product_inputs``
    one row per published version: state (candidate, certified, retracted),
    validity range ``[valid_from, valid_to)`` (``valid_to`` NULL = open ended),
    store key, checksums, content key, stats and provenance; and its input
    frames (path, sha256).
``validity_history``
    a temporal table: every state/validity a version ever had, with the
    interval ``[recorded_at, superseded_at)`` of catalog time during which it
    was current. ``best(..., as_of=t)`` reads it.
``audit_log``
    who changed what, when and why, for every state change.

Certified ranges of one series never overlap. On PostgreSQL an exclusion
constraint over ``tstzrange(valid_from, valid_to, '[)')`` (btree_gist) enforces
it; on SQLite triggers do. Both are backstops behind the locked check in
:meth:`sitiancal.storage.catalog.Catalog.certify`.

Times are stored in UTC (``timestamptz`` on PostgreSQL, naive UTC text on
SQLite) and always come back timezone-aware (:class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Product states (API.md: candidate|certified|retracted).
PRODUCT_STATES = ("candidate", "certified", "retracted")
#: Job states (API.md: queued|running|succeeded|failed|cancelled).
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
#: Job states after which nothing changes any more.
TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC ``datetime`` column on every backend.

    Naive datetimes are refused on the way in (the catalog never guesses a
    time zone); values come back aware, in UTC. On SQLite they are stored as
    naive UTC text, whose lexical order is the time order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: catalog times must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")


#: Deterministic constraint names, shared with the migrations.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the catalog models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CameraRow(Base):
    """A camera, identified by its name."""

    __tablename__ = "cameras"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created: Mapped[datetime] = mapped_column(UTCDateTime())


class DatasetRow(Base):
    """A registered dataset: the scan inventory and its frames."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    camera: Mapped[str] = mapped_column(ForeignKey("cameras.name"), index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class FrameRow(Base):
    """One raw frame of a dataset (path and sha256 of the file)."""

    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("dataset_id", "position", name="uq_frames_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    frame_type: Mapped[str | None] = mapped_column(String(16))
    exptime: Mapped[float | None] = mapped_column(Float)
    obs_time: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobRow(Base):
    """A calibration job and its progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                        name="state"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index("ix_jobs_camera_created", "camera", "created"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    camera: Mapped[str] = mapped_column(ForeignKey("cameras.name"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    started: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    requested: Mapped[list[str]] = mapped_column(JSONType, default=list)
    force: Mapped[bool] = mapped_column(Boolean, default=False)


class JobProductRow(Base):
    """Link between a job and a product version it published (or reused)."""

    __tablename__ = "job_products"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("product_versions.id"), primary_key=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)


class ProductRow(Base):
    """A product series (camera, type) and its version counter."""

    __tablename__ = "products"
    __table_args__ = (UniqueConstraint("camera", "type", name="uq_products_camera_type"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    camera: Mapped[str] = mapped_column(ForeignKey("cameras.name"))
    type: Mapped[str] = mapped_column(String(32))
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime())


class ProductVersionRow(Base):
    """One published (immutable) version of a product."""

    __tablename__ = "product_versions"
    __table_args__ = (
        UniqueConstraint("series_id", "version", name="uq_product_versions_version"),
        UniqueConstraint("store_key", name="uq_product_versions_store_key"),
        CheckConstraint("state IN ('candidate', 'certified', 'retracted')",
                        name="state"),
        CheckConstraint("state != 'certified' OR valid_from IS NOT NULL",
                        name="certified_from"),
        CheckConstraint("valid_to IS NULL OR valid_from IS NULL OR valid_to >= valid_from",
                        name="range"),
        Index("ix_product_versions_lookup", "camera", "type", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    camera: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime())
    valid_to: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    store_key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    content_key: Mapped[str] = mapped_column(String(64), index=True)
    array_checksums: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    units: Mapped[str] = mapped_column(String(32))
    shape: Mapped[list[int]] = mapped_column(JSONType, default=list)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    date_beg: Mapped[datetime | None] = mapped_column(UTCDateTime())
    date_end: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ProductInputRow(Base):
    """One input frame of a product version (path and sha256)."""

    __tablename__ = "product_inputs"

    product_id: Mapped[str] = mapped_column(
        ForeignKey("product_versions.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class ValidityHistoryRow(Base):
    """State and validity of a version during ``[recorded_at, superseded_at)``."""

    __tablename__ = "validity_history"
    __table_args__ = (Index("ix_validity_history_series_time", "series_id", "recorded_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("product_versions.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime())
    valid_to: Mapped[datetime | None] = mapped_column(UTCDateTime())
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)


class AuditRow(Base):
    """One entry of the audit log: who changed what, when and why."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_entity", "entity", "entity_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
