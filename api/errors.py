"""One table from domain exceptions to HTTP status codes, installed once.

Routes raise the domain's own exceptions (catalog, datasets, runner, auth);
:func:`install_error_handlers` turns each into ``{"detail": "<str(exc)>"}``
with the status of :data:`ERROR_STATUS`. Request validation errors become a
``422`` whose detail names every offending field, so no bad input can reach
a route as a 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from sitiancal.api.auth import Forbidden, Unauthorized
from sitiancal.api.integrity import CorruptProduct
from sitiancal.api.uploads import MalformedUpload
from sitiancal.service.datasets import (
    FrameRejected,
    InvalidSource,
    NoUsableFrames,
    PathNotAllowed,
    UnsupportedUpload,
    UploadNotAllowed,
    UploadTooLarge,
)
from sitiancal.service.jobs import InvalidTransition
from sitiancal.service.runner import QueueFull, RunnerNotStarted
from sitiancal.storage.catalog import (
    DuplicateContent,
    InvalidInput,
    NotFound,
    StateConflict,
    ValidityConflict,
)
from sitiancal.storage.scan import ScanError
from sitiancal.storage.store import ProductMissing


class BadRequest(ValueError):
    """A request that is malformed in a way no field validation catches (HTTP 400)."""


class Conflict(RuntimeError):
    """A request that conflicts with the current state (HTTP 409)."""


class Unprocessable(ValueError):
    """A well-formed request with values the service cannot accept (HTTP 422)."""


class RangeNotSatisfiable(ValueError):
    """A byte range outside the content (HTTP 416)."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(header, size)
        self.header = header
        self.size = size

    def __str__(self) -> str:
        return f"range {self.header!r} is outside the content of {self.size} bytes"


#: Exception class -> HTTP status. A raised exception gets the status of the
#: most specific class it derives from (Starlette looks handlers up by MRO).
ERROR_STATUS: Sequence[tuple[type[BaseException], int]] = (
    (BadRequest, 400),
    (MalformedUpload, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (PathNotAllowed, 403),
    (NotFound, 404),  # includes NoProduct
    (ProductMissing, 404),
    (Conflict, 409),
    (ValidityConflict, 409),
    (StateConflict, 409),
    (DuplicateContent, 409),
    (InvalidTransition, 409),
    (CorruptProduct, 409),
    (UploadNotAllowed, 409),
    (UploadTooLarge, 413),
    (UnsupportedUpload, 415),
    (RangeNotSatisfiable, 416),
    (Unprocessable, 422),
    (InvalidInput, 422),
    (InvalidSource, 422),
    (NoUsableFrames, 422),
    (FrameRejected, 422),
    (ScanError, 422),
    (QueueFull, 503),
    (RunnerNotStarted, 503),
)

#: Extra response headers by status.
_HEADERS: dict[int, dict[str, str]] = {
    401: {"WWW-Authenticate": "Bearer"},
    503: {"Retry-After": "30"},
}

#: Seconds a client should wait before retrying while the catalog database is unreachable.
DATABASE_RETRY_AFTER = 5
#: Errors of the catalog database that mean "unreachable now" (connection refused,
#: dropped, pool exhausted): a 503 with Retry-After, whose detail never repeats the
#: driver's message (it can hold the database URL).
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (OperationalError, InterfaceError,
                                                         PoolTimeout)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_detail(errors: Sequence[dict[str, Any]]) -> str:
    """One line naming every invalid field and why, e.g. ``body.camera: Field required``."""
    parts = []
    for err in errors:
        where = _location(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"{where}: the body is not valid JSON ({reason})")
            continue
        msg = str(err.get("msg", "invalid value"))
        value = err.get("input")
        if err.get("type") not in ("missing",) and isinstance(value, (str, int, float)):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            msg += f" (got {shown})"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Install the exception -> status table and the validation handler on ``app``."""

    def make_handler(status: int):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            headers = dict(_HEADERS.get(status, {}))
            if isinstance(exc, RangeNotSatisfiable):
                headers["Content-Range"] = f"bytes */{exc.size}"
            return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=status,
                                headers=headers)
        return handler

    for exc_class, status in ERROR_STATUS:
        app.add_exception_handler(exc_class, make_handler(status))

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.url.path!r}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path!r}"
        return JSONResponse({"detail": detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "the catalog database is unreachable; retry in "
                             f"{DATABASE_RETRY_AFTER} s"}, status_code=503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER)})

    for exc_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, on_database)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
