"""Request and response models of the HTTP API (API.md), with OpenAPI examples.

Request models forbid unknown fields, so a typo in a field name is a 422 that
names it instead of being silently ignored. Times without a time zone are
read as UTC (API.md: times are ISO 8601 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

#: Product types (API.md; part of the contract).
ProductType = Literal["bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask"]
#: Camera names: letters, digits, ``_.-``; the catalog's rule.
CAMERA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ProductState = Literal["candidate", "certified", "retracted"]


def as_utc(value: datetime) -> datetime:
    """Read a naive time as UTC and convert an aware one to UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


UTCTime = Annotated[datetime, AfterValidator(as_utc)]
CameraName = Annotated[str, Field(pattern=CAMERA_PATTERN, examples=["MST3"],
                                  description="Camera name (letters, digits, '_', '.', '-').")]

_EXAMPLE_TIME = "2026-03-14T02:00:00Z"
_ID = "3f1c2a9be0d74d5f9a1c0b7e2d4f6a81"


class Request(BaseModel):
    """Base of request bodies: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


# -- datasets ---------------------------------------------------------------------
class DatasetCreate(Request):
    """Register the FITS frames under ``source``, or an empty dataset for uploads."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"camera": "MST3", "source": "/data/mst3/2026-03-14", "label": "March bias/dark/flat set"},
        {"camera": "MST3", "source": None, "label": "uploaded frames"}]})

    camera: CameraName
    source: str | None = Field(description="Folder or URL prefix inside the input roots; "
                               "null for a dataset filled by uploads.", max_length=4096)
    label: str | None = Field(None, max_length=500, description="Free text.")
    allow_mixed_states: bool = Field(
        False, description="Accept frames taken with different GAIN/OFFSET/binning.")
    types_from_paths: bool = Field(
        False, description="Files without a frame-type keyword (IMAGETYP...) take their type "
        "from a word of their name or folders (bias, zero, dark, flat), with a warning.")


class RejectionOut(BaseModel):
    file: str
    reason: str


class DatasetOut(BaseModel):
    """A dataset: the scan inventory with its identity."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": _ID, "camera": "MST3", "created": _EXAMPLE_TIME,
        "source": "/data/mst3/2026-03-14", "label": None, "shape": [6388, 9576],
        "counts": {"bias": 50, "dark": 28, "flat": 120},
        "exposure_times": {"bias": [0.0], "dark": [10.0, 30.0, 60.0], "flat": [0.5, 1.0, 2.0]},
        "temperature": {"min": -0.2, "max": 0.3},
        "operating_state": {"gain": 100, "offset": 50, "xbinning": 1, "ybinning": 1,
                            "readout_mode": None, "instrument": "ZWO ASI6200MM Pro"},
        "rejected": [{"file": "/data/mst3/2026-03-14/light_001.fits",
                      "reason": "IMAGETYP 'LIGHT' is not a calibration frame"}],
        "warnings": [], "n_files": 199,
        "supported_products": ["bias", "read_noise", "dark", "ptc", "gain", "linearity",
                               "flat", "mask"]}]})

    id: str
    camera: str
    created: datetime
    source: str | None
    label: str | None = None
    shape: list[int] | None = Field(description="[ny, nx] pixels")
    counts: dict[str, int]
    exposure_times: dict[str, list[float]] = Field(description="Distinct exposure times (s).")
    temperature: dict[str, float | None] = Field(description="Sensor temperature range (deg C).")
    operating_state: dict[str, Any]
    rejected: list[RejectionOut]
    warnings: list[str]
    n_files: int = 0
    supported_products: list[str] = Field(
        default_factory=list, description="Product types a job on this dataset can build.")


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


# -- jobs ---------------------------------------------------------------------------
def normalize_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Check job parameters against ``CalibrationParams``; return them JSON-normalized.

    Unknown names and values of the wrong type are errors (``ValueError``);
    only the given names are kept (the others take the pipeline's defaults).
    """
    import typing

    from pydantic import TypeAdapter, ValidationError

    from sitiancal.compute.tile import CalibrationParams
    from sitiancal.service.pipeline import params_from_job

    params_from_job(dict(raw))  # unknown names, with the list of known ones
    hints = typing.get_type_hints(CalibrationParams)
    out: dict[str, Any] = {}
    for name, value in raw.items():
        adapter: TypeAdapter[Any] = TypeAdapter(hints[name])
        try:
            checked = adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in (name, *first.get("loc", ())))
            raise ValueError(f"{where}: {first.get('msg', 'invalid value')} "
                             f"(got {value!r})") from None
        out[name] = adapter.dump_python(checked, mode="json")
    return out


class JobCreate(Request):
    """Submit a calibration job on a registered dataset."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"camera": "MST3", "dataset": _ID, "products": ["bias", "read_noise", "dark", "gain"],
         "params": {"clip_sigma": 3.0}, "force": False},
        {"camera": "MST3", "dataset": _ID}]})

    camera: CameraName
    dataset: str = Field(min_length=1, max_length=64, description="Dataset id.")
    products: list[ProductType] | None = Field(
        None, min_length=1,
        description="Product types to build; default: all that the dataset supports.")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="CalibrationParams fields (defaults otherwise).")
    force: bool = Field(False, description="Publish new versions even when identical "
                        "inputs, parameters and code version exist.")

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        return normalize_params(value)

    @field_validator("products")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return list(dict.fromkeys(value))


class JobOut(BaseModel):
    """A job and its progress."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": _ID, "camera": "MST3", "dataset": _ID, "state": "running", "progress": 0.42,
        "stage": "tiles", "message": None, "created": _EXAMPLE_TIME,
        "started": _EXAMPLE_TIME, "finished": None, "error": None, "products": [],
        "requested": ["bias", "read_noise"], "params": {}, "force": False}]})

    id: str
    camera: str
    dataset: str | None
    state: JobStateName
    progress: float = Field(ge=0.0, le=1.0)
    stage: str | None
    message: str | None
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None
    products: list[str]
    requested: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    force: bool = False


class JobList(BaseModel):
    jobs: list[JobOut]


# -- products -------------------------------------------------------------------------
class ProductLinks(BaseModel):
    self: str
    fits: str
    zarr: str


class ProductOut(BaseModel):
    """One version of a product."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": _ID, "camera": "MST3", "type": "gain", "version": 3, "state": "certified",
        "valid_from": "2026-03-14T00:00:00Z", "valid_to": None, "created": _EXAMPLE_TIME,
        "job": _ID, "dataset": _ID, "sha256": "9c56cc51b374c3ba189210d5b6d4bf57"
        "790d351c96c47c02190ecf1e430635ab", "units": "e-/ADU", "shape": [6388, 9576],
        "stats": {"median": 0.2535}, "provenance": {"code_version": "0.1.0"},
        "links": {"self": f"/v1/products/{_ID}", "fits": f"/v1/products/{_ID}/fits",
                  "zarr": f"/v1/products/{_ID}/zarr"}}]})

    id: str
    camera: str
    type: str
    version: int
    state: ProductState
    valid_from: datetime | None
    valid_to: datetime | None
    created: datetime
    job: str | None
    dataset: str | None
    sha256: str = Field(description="sha256 of the FITS export (its ETag).")
    content_key: str | None = None
    units: str
    shape: list[int]
    stats: dict[str, Any]
    provenance: dict[str, Any]
    date_beg: datetime | None = None
    date_end: datetime | None = None
    links: ProductLinks


class ProductList(BaseModel):
    products: list[ProductOut]


class CertifyRequest(Request):
    """Certify a version for ``[valid_from, valid_to)`` (``valid_to`` null: open ended)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"valid_from": "2026-03-14T00:00:00Z", "valid_to": None,
         "reason": "QC report reviewed"}]})

    valid_from: UTCTime
    valid_to: UTCTime | None = None
    reason: str | None = Field(None, max_length=2000)


class RetractRequest(Request):
    """Retract a version; the reason is kept in its history."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reason": "flat lamp flickered during the series"}]})

    reason: str = Field(min_length=1, max_length=2000)


class HistoryEntry(BaseModel):
    product: str
    version: int
    state: str
    valid_from: datetime | None
    valid_to: datetime | None
    recorded_at: datetime
    superseded_at: datetime | None
    action: str
    actor: str
    reason: str | None


class HistoryOut(BaseModel):
    camera: str
    type: str
    history: list[HistoryEntry]


# -- cameras --------------------------------------------------------------------------
class ProductSummary(BaseModel):
    id: str
    version: int
    state: ProductState
    created: datetime
    valid_from: datetime | None
    valid_to: datetime | None
    sha256: str


class CameraOut(BaseModel):
    """A camera with its newest product of each type and its newest job."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "camera": "MST3", "model": None, "description": None, "created": _EXAMPLE_TIME,
        "latest_products": {"gain": {"id": _ID, "version": 3, "state": "certified",
                                     "created": _EXAMPLE_TIME,
                                     "valid_from": "2026-03-14T00:00:00Z", "valid_to": None,
                                     "sha256": "9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47"
                                     "c02190ecf1e430635ab"}},
        "latest_job": None}]})

    camera: str
    model: str | None
    description: str | None
    created: datetime
    latest_products: dict[str, ProductSummary]
    latest_job: JobOut | None


class CameraList(BaseModel):
    cameras: list[CameraOut]


# -- health ---------------------------------------------------------------------------------
class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ok", "version": "0.1.0", "database": {"status": "ok"},
        "dask": {"status": "ok", "scheduler": "inproc://10.0.0.1/1/1", "workers": 1},
        "jobs": {"queued": 0, "running": ["..."]}}]})

    status: Literal["ok", "error"]
    version: str
    database: dict[str, Any]
    dask: dict[str, Any]
    jobs: dict[str, Any]


class ErrorOut(BaseModel):
    """Every error: a precise message."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "unknown job '0123'"}]})

    detail: str
