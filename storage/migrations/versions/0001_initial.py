"""Initial catalog: cameras, datasets, frames, jobs, products, versions, history, audit.

Certified validity ranges of one series never overlap: an exclusion constraint
over ``tstzrange(valid_from, valid_to, '[)')`` (btree_gist) on PostgreSQL,
triggers on SQLite.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sitiancal.storage.models import JSONType, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Certified, non-empty ranges overlap (NULL valid_to = open ended). julianday() makes
#: the comparison independent of how the time text was formatted.
_SQLITE_OVERLAP = """
SELECT RAISE(ABORT, 'certified validity ranges overlap')
WHERE NEW.state = 'certified'
  AND (NEW.valid_to IS NULL OR julianday(NEW.valid_to) > julianday(NEW.valid_from))
  AND EXISTS (
    SELECT 1 FROM product_versions AS o
    WHERE o.series_id = NEW.series_id AND o.id != NEW.id AND o.state = 'certified'
      AND (o.valid_to IS NULL OR julianday(o.valid_to) > julianday(o.valid_from))
      AND (o.valid_to IS NULL OR julianday(o.valid_to) > julianday(NEW.valid_from))
      AND (NEW.valid_to IS NULL OR julianday(NEW.valid_to) > julianday(o.valid_from))
  );
"""


def _utc() -> UTCDateTime:
    return UTCDateTime()


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "cameras",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("attrs", JSONType, nullable=False),
        sa.Column("created", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_cameras"),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("created", _utc(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("inventory", JSONType, nullable=False),
        sa.ForeignKeyConstraint(["camera"], ["cameras.name"],
                                name="fk_datasets_camera_cameras"),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
    )
    op.create_index("ix_datasets_camera", "datasets", ["camera"])
    op.create_table(
        "frames",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("frame_type", sa.String(16), nullable=True),
        sa.Column("exptime", sa.Float(), nullable=True),
        sa.Column("obs_time", _utc(), nullable=True),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE",
                                name="fk_frames_dataset_id_datasets"),
        sa.PrimaryKeyConstraint("id", name="pk_frames"),
        sa.UniqueConstraint("dataset_id", "position", name="uq_frames_position"),
    )
    op.create_index("ix_frames_dataset_id", "frames", ["dataset_id"])
    op.create_index("ix_frames_sha256", "frames", ["sha256"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created", _utc(), nullable=False),
        sa.Column("started", _utc(), nullable=True),
        sa.Column("finished", _utc(), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("params", JSONType, nullable=False),
        sa.Column("requested", JSONType, nullable=False),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                           name="ck_jobs_state"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        sa.ForeignKeyConstraint(["camera"], ["cameras.name"], name="fk_jobs_camera_cameras"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"],
                                name="fk_jobs_dataset_id_datasets"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_camera_created", "jobs", ["camera", "created"])
    op.create_table(
        "products",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("created", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["camera"], ["cameras.name"],
                                name="fk_products_camera_cameras"),
        sa.PrimaryKeyConstraint("id", name="pk_products"),
        sa.UniqueConstraint("camera", "type", name="uq_products_camera_type"),
    )
    op.create_table(
        "product_versions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("valid_from", _utc(), nullable=True),
        sa.Column("valid_to", _utc(), nullable=True),
        sa.Column("created", _utc(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("dataset_id", sa.String(32), nullable=True),
        sa.Column("store_key", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_key", sa.String(64), nullable=False),
        sa.Column("array_checksums", JSONType, nullable=False),
        sa.Column("units", sa.String(32), nullable=False),
        sa.Column("shape", JSONType, nullable=False),
        sa.Column("stats", JSONType, nullable=False),
        sa.Column("provenance", JSONType, nullable=False),
        sa.Column("date_beg", _utc(), nullable=True),
        sa.Column("date_end", _utc(), nullable=True),
        sa.CheckConstraint("state IN ('candidate', 'certified', 'retracted')",
                           name="ck_product_versions_state"),
        sa.CheckConstraint("state != 'certified' OR valid_from IS NOT NULL",
                           name="ck_product_versions_certified_from"),
        sa.CheckConstraint("valid_to IS NULL OR valid_from IS NULL OR valid_to >= valid_from",
                           name="ck_product_versions_range"),
        sa.ForeignKeyConstraint(["series_id"], ["products.id"],
                                name="fk_product_versions_series_id_products"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_product_versions_job_id_jobs"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"],
                                name="fk_product_versions_dataset_id_datasets"),
        sa.PrimaryKeyConstraint("id", name="pk_product_versions"),
        sa.UniqueConstraint("series_id", "version", name="uq_product_versions_version"),
        sa.UniqueConstraint("store_key", name="uq_product_versions_store_key"),
    )
    op.create_index("ix_product_versions_series_id", "product_versions", ["series_id"])
    op.create_index("ix_product_versions_content_key", "product_versions", ["content_key"])
    op.create_index("ix_product_versions_lookup", "product_versions",
                    ["camera", "type", "state"])
    op.create_table(
        "product_inputs",
        sa.Column("product_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["product_versions.id"], ondelete="CASCADE",
                                name="fk_product_inputs_product_id_product_versions"),
        sa.PrimaryKeyConstraint("product_id", "position", name="pk_product_inputs"),
    )
    op.create_index("ix_product_inputs_sha256", "product_inputs", ["sha256"])
    op.create_table(
        "job_products",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("product_id", sa.String(32), nullable=False),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name="fk_job_products_job_id_jobs"),
        sa.ForeignKeyConstraint(["product_id"], ["product_versions.id"],
                                name="fk_job_products_product_id_product_versions"),
        sa.PrimaryKeyConstraint("job_id", "product_id", name="pk_job_products"),
    )
    op.create_table(
        "validity_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.String(32), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("valid_from", _utc(), nullable=True),
        sa.Column("valid_to", _utc(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.Column("superseded_at", _utc(), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["product_id"], ["product_versions.id"],
                                name="fk_validity_history_product_id_product_versions"),
        sa.ForeignKeyConstraint(["series_id"], ["products.id"],
                                name="fk_validity_history_series_id_products"),
        sa.PrimaryKeyConstraint("id", name="pk_validity_history"),
    )
    op.create_index("ix_validity_history_product_id", "validity_history", ["product_id"])
    op.create_index("ix_validity_history_series_time", "validity_history",
                    ["series_id", "recorded_at"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", JSONType, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_entity", "audit_log", ["entity", "entity_id"])

    if dialect == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        op.execute(
            "ALTER TABLE product_versions ADD CONSTRAINT ex_product_versions_certified_ranges "
            "EXCLUDE USING gist (series_id WITH =, "
            "tstzrange(valid_from, valid_to, '[)') WITH &&) WHERE (state = 'certified')"
        )
    elif dialect == "sqlite":
        op.execute(
            "CREATE TRIGGER tr_product_versions_overlap_insert BEFORE INSERT ON product_versions "
            f"BEGIN {_SQLITE_OVERLAP} END"
        )
        op.execute(
            "CREATE TRIGGER tr_product_versions_overlap_update "
            "BEFORE UPDATE OF state, valid_from, valid_to ON product_versions "
            f"BEGIN {_SQLITE_OVERLAP} END"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS tr_product_versions_overlap_update")
        op.execute("DROP TRIGGER IF EXISTS tr_product_versions_overlap_insert")
    for table in ("audit_log", "validity_history", "job_products", "product_inputs",
                  "product_versions", "products", "jobs", "frames", "datasets", "cameras"):
        op.drop_table(table)
