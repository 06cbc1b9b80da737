"""Service configuration from flags and ``SITIANCAL_*`` environment variables.

The embedded default needs no configuration at all: a data directory holding
a SQLite catalog, a local zarr product store and dataset cubes, and a dask
LocalCluster started in-process. Every component can be pointed elsewhere
(PostgreSQL, ``s3://`` object storage, an existing dask scheduler) with the
same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Values of ``dask_dashboard`` that turn the dashboard off.
_OFF = frozenset({"", "off", "none", "false", "no", "disabled"})


def _split(value: object, sep: str) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


class Settings(BaseSettings):
    """All settings of a sitiancal deployment.

    Every field can be set with an environment variable named
    ``SITIANCAL_<FIELD>`` (e.g. ``SITIANCAL_DATABASE_URL``).
    """

    model_config = SettingsConfigDict(env_prefix="SITIANCAL_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./data"),
        description="Root of the embedded deployment: catalog, store, cubes, tokens.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the catalog; default sqlite:///<data_dir>/catalog.sqlite.",
    )
    store_url: str | None = Field(
        default=None,
        description="Product store root: a path or s3://bucket/prefix; default <data_dir>/store.",
    )
    cube_url: str | None = Field(
        default=None,
        description="Where dataset frame cubes are written; default <data_dir>/cubes.",
    )
    scheduler_address: str | None = Field(
        default=None,
        description="Address of an existing dask scheduler (tcp://host:8786); "
        "default: a LocalCluster started by the process.",
    )
    dask_dashboard: str | None = Field(
        default="127.0.0.1:0",
        description="Address ([host]:port) the embedded LocalCluster serves the dask "
        "dashboard on; port 0 picks a free port. Empty or 'off' starts none and the "
        "service links to none (also with an external scheduler).",
    )
    input_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Colon-separated folders or URL prefixes datasets may be registered from.",
    )
    operator_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer tokens with write access."
    )
    reader_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer tokens with read access."
    )
    memory_limit: str = Field(
        default="4GB", description="Memory budget of a calibration run (dask worker limit)."
    )
    direct_reads: bool | Literal["auto"] = Field(
        default="auto", description="Read raw frames past the page cache (O_DIRECT): the "
        "cube build and a virtual cube's tile pass; 'auto': when a dataset's pixels exceed "
        "the machine's physical memory (see deploy/settings.md).",
    )
    n_workers: int = Field(default=1, ge=1, description="LocalCluster worker processes.")
    threads_per_worker: int = Field(default=2, ge=1, description="Threads per dask worker.")
    max_concurrent_jobs: int = Field(default=2, ge=1, description="Jobs running at once.")
    max_upload_bytes: int = Field(
        default=512 * 1024**2, ge=1, description="Largest accepted frame upload (bytes)."
    )

    @field_validator("dask_dashboard", mode="before")
    @classmethod
    def _dashboard_address(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.lower() in _OFF:
            return None
        if text.isdigit():
            text = f":{text}"
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535 or "://" in host:
            raise ValueError(f"dask_dashboard must be [host]:port or 'off', not {value!r}")
        return text

    @field_validator("input_roots", mode="before")
    @classmethod
    def _colon_list(cls, value: object) -> object:
        return _split(value, ":") if not _is_url_list(value) else _split(value, ",")

    @field_validator("operator_tokens", "reader_tokens", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value, ",")

    # -- derived locations -------------------------------------------------
    @property
    def catalog_url(self) -> str:
        """SQLAlchemy URL of the catalog (SQLite file in the data dir by default)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite').resolve()}"

    @property
    def product_store_url(self) -> str:
        """Root URL of the product store."""
        return self.store_url or str((self.data_dir / "store").resolve())

    @property
    def cube_store_url(self) -> str:
        """Root URL under which dataset cubes are written."""
        return self.cube_url or str((self.data_dir / "cubes").resolve())


def _is_url_list(value: object) -> bool:
    """Input roots that contain URLs (``s3://...``) are comma separated, not colon separated."""
    return isinstance(value, str) and "://" in value
