"""Products: metadata, FITS download, zarr store, best-at-time lookup, certify, retract."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import unquote

from fastapi import APIRouter, Header, Path, Query, Request, Response

from sitiancal.api.auth import Forbidden, Unauthorized
from sitiancal.api.content import (
    IMMUTABLE,
    FiniteJSONResponse,
    bytes_response,
    etag_matches,
    file_response,
    not_modified,
)
from sitiancal.api.deps import CatalogDep, MetricsDep, Operator, Reader, StoreDep
from sitiancal.api.errors import Unprocessable
from sitiancal.api.schemas import (
    CAMERA_PATTERN,
    CertifyRequest,
    ErrorOut,
    HistoryOut,
    ProductList,
    ProductOut,
    ProductState,
    ProductType,
    RetractRequest,
    as_utc,
)
from sitiancal.storage.catalog import ProductVersion

router = APIRouter(prefix="/v1", tags=["products"])

ProductId = Annotated[str, Path(min_length=1, max_length=200, description="Product version id.")]
CameraPath = Annotated[str, Path(pattern=CAMERA_PATTERN, description="Camera name.")]
_ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}


def product_out(product: ProductVersion) -> ProductOut:
    """API form of a product version, with links to its content."""
    base = f"/v1/products/{product.id}"
    return ProductOut.model_validate({**product.to_dict(), "links": {
        "self": base, "fits": f"{base}/fits", "zarr": f"{base}/zarr"}})


def _etag(product: ProductVersion) -> str:
    return f'"{product.sha256}"'


@router.get("/products", response_model=ProductList, responses=_ERRORS)
def list_products(catalog: CatalogDep, _: Reader,
                  camera: Annotated[str | None, Query(pattern=CAMERA_PATTERN)] = None,
                  type: ProductType | None = None, state: ProductState | None = None,
                  limit: Annotated[int | None, Query(ge=1, le=10000)] = None) -> ProductList:
    """Product versions, by camera, type and version (newest version first)."""
    products = catalog.list_products(camera=camera, type=type, state=state, limit=limit)
    return ProductList(products=[product_out(p) for p in products])


@router.get("/products/{product_id}", response_model=ProductOut, responses=_ERRORS)
def get_product(product_id: ProductId, catalog: CatalogDep, _: Reader) -> ProductOut:
    """One product version: metadata, statistics and provenance."""
    return product_out(catalog.get_product(product_id))


@router.get(
    "/products/{product_id}/fits", responses={
        **_ERRORS, 200: {"content": {"application/fits": {}},
                         "description": "The FITS file (ETag = its sha256)."},
        206: {"description": "The requested byte range."},
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        416: {"model": ErrorOut}}, response_class=Response)
def product_fits(product_id: ProductId, request: Request, catalog: CatalogDep,
                 store: StoreDep, metrics: MetricsDep, _: Reader,
                 if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The product's FITS export (DESIGN.md section 6), cacheable forever by its sha256.

    Supports ``If-None-Match`` (304) and single ``Range: bytes=a-b`` requests (206).
    """
    product = catalog.get_product(product_id)
    etag = _etag(product)
    if etag_matches(if_none_match, etag):
        metrics.cache_hits.inc(kind="fits")
        return not_modified(etag)
    request.app.state.integrity.check_fits(product)
    name = f"{product.camera}_{product.type}_v{product.version:04d}.fits"
    return file_response(request, lambda: store.open_fits(product.store_key), etag=etag,
                         media_type="application/fits", filename=name,
                         on_sent=lambda n: metrics.bytes_served.inc(n, kind="fits"))


@router.get(
    "/products/{product_id}/zarr/{key:path}", responses={
        **_ERRORS, 200: {"content": {"application/octet-stream": {}, "application/json": {}},
                         "description": "A key of the product's zarr v3 store."},
        304: {"description": "Not modified."}}, response_class=Response)
async def product_zarr(product_id: ProductId, key: str, request: Request,
                       catalog: CatalogDep, metrics: MetricsDep, _: Reader,
                       if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The product's zarr v3 store, read-only: ``xarray.open_zarr(<this URL>)`` reads regions.

    The root ``zarr.json`` carries consolidated metadata (HTTP cannot list
    folders); missing keys are 404, as zarr expects.
    """
    product = await asyncio.to_thread(catalog.get_product, product_id)
    digest = hashlib.sha256(f"{product.sha256}/{key}".encode()).hexdigest()[:40]
    etag = f'"{digest}"'
    if etag_matches(if_none_match, etag):
        metrics.cache_hits.inc(kind="zarr")
        return not_modified(etag)
    await asyncio.to_thread(request.app.state.integrity.check_zarr, product)
    data = await request.app.state.zarr.get(product.id, product.store_key, key)
    media = "application/json" if key.endswith("zarr.json") else "application/octet-stream"
    return bytes_response(request, data, etag=etag, media_type=media,
                          on_sent=lambda n: metrics.bytes_served.inc(n, kind="zarr"))


router.add_api_route("/products/{product_id}/fits", product_fits, methods=["HEAD"],
                     include_in_schema=False)
router.add_api_route("/products/{product_id}/zarr/{key:path}", product_zarr, methods=["HEAD"],
                     include_in_schema=False)


@router.get("/cameras/{camera}/best/{type}", response_model=ProductOut, responses=_ERRORS,
            tags=["products", "cameras"])
async def best_product(camera: CameraPath, type: Annotated[ProductType, Path()],
                 request: Request, catalog: CatalogDep, metrics: MetricsDep, _: Reader,
                 at: Annotated[datetime | None, Query(
                     description="Observation time (ISO 8601; UTC if no zone); default now.",
                     examples=["2026-03-14T02:00:00Z"])] = None,
                 state: Literal["certified", "candidate"] = "certified",
                 as_of: Annotated[datetime | None, Query(
                     description="Answer as the catalog would have at this time.")] = None,
                 ) -> Response:
    """The product of that type to use for ``camera`` at time ``at``.

    ``state=certified`` (default): the certified version whose validity range
    contains ``at``; ``state=candidate``: the newest candidate. ``404`` with
    the reason (no product, none certified, a gap, a retraction) otherwise.
    """
    t0 = time.perf_counter()
    try:
        when = as_utc(at) if at else datetime.now(UTC)
        if state == "certified" and as_of is None:  # the pipeline's path: from memory
            body = await request.app.state.best_cache.lookup(camera, type, when)
            if body is not None:
                return Response(body, media_type="application/json")
        product = await asyncio.to_thread(catalog.best, camera, type, when, state=state,
                                          as_of=as_utc(as_of) if as_of else None)
    finally:
        metrics.lookup_latency.observe(time.perf_counter() - t0)
    return Response(render_product(product), media_type="application/json")


#: ``/v1/cameras/{camera}/best/{type}`` with a valid camera name and product type.
_BEST_PATH = re.compile(
    rf"^/v1/cameras/({CAMERA_PATTERN.strip('^$')})/best/({'|'.join(get_args(ProductType))})$")
#: A query of only ``at`` (after percent-decoding) as an ISO 8601 time with ``Z``, a
#: ``+hh:mm``/``-hh:mm`` offset or no zone; anything else takes the route's path.
_AT_QUERY = re.compile(
    r"^at=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)?)$", re.ASCII)
_JSON_TYPE = b"application/json"


class BestLookupFastPath:
    """ASGI middleware answering the pipelines' best-at-time lookups from the cache.

    ``GET /v1/cameras/{camera}/best/{type}`` with at most an ``at`` query
    parameter, from a caller allowed to read, whose answer the
    :class:`~sitiancal.api.bestcache.BestCache` holds, is answered here with
    the cached body: no routing, dependency solving or validation by
    FastAPI, which cost about two thirds of the service's CPU per lookup.
    Every other request, and any lookup this class is not sure of (other
    query parameters, a time it does not parse, missing or invalid
    credentials, a series the cache does not hold yet, a time no cached
    range covers) goes on to the :func:`best_product` route, which gives the
    same answer or the precise error (a ``503`` when the catalog is
    unreachable): this class never waits for the catalog and never raises
    for it. The answers are the same bytes either way
    (``tests/test_reliability_load.py`` checks it).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _BEST_PATH.match(scope["path"])
            if match is not None:
                body = self._answer(scope, match[1], match[2])
                if body is not None:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-length", str(len(body)).encode()),
                        (b"content-type", _JSON_TYPE)]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _answer(scope: Any, camera: str, product_type: str) -> bytes | None:
        """The cached answer of a lookup, or None to let the route answer."""
        state = scope["app"].state
        cache = getattr(state, "best_cache", None)
        query = scope["query_string"]
        if cache is None:
            return None
        t0 = time.perf_counter()
        if query:
            # a '+' in a query means a space (form encoding): left to the route's parser
            at = None if b"+" in query else _AT_QUERY.match(unquote(query.decode("latin-1")))
            if at is None:
                return None
            try:
                when = as_utc(datetime.fromisoformat(at[1]))
            except ValueError:
                return None
        else:
            when = datetime.now(UTC)
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            principal = state.auth.identify(
                None if authorization is None else authorization.decode("latin-1"))
        except (Unauthorized, Forbidden):
            return None
        if principal.role is None and state.auth.reader_tokens:
            return None
        body = cache.peek(camera, product_type, when)  # memory only: a miss takes the route
        if body is not None:
            state.metrics.lookup_latency.observe(time.perf_counter() - t0)
        return body


def render_product(product: ProductVersion) -> bytes:
    """The JSON body of a product version, as ``GET /v1/products/{id}`` serves it."""
    return FiniteJSONResponse(product_out(product).model_dump(mode="json")).body


@router.get("/cameras/{camera}/history/{type}", response_model=HistoryOut,
            responses=_ERRORS, tags=["products", "cameras"])
def product_history(camera: CameraPath, type: Annotated[ProductType, Path()],
                    catalog: CatalogDep, _: Reader) -> HistoryOut:
    """Every state and validity change of a camera's product type, oldest first."""
    catalog.get_camera(camera)
    return HistoryOut.model_validate({"camera": camera, "type": type, "history": [
        r.to_dict() for r in catalog.history(camera, type)]})


@router.post("/products/{product_id}/certify", response_model=ProductOut,
             responses={**_ERRORS, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}})
def certify(product_id: ProductId, body: CertifyRequest, catalog: CatalogDep,
            who: Operator) -> ProductOut:
    """Certify a version for ``[valid_from, valid_to)``.

    Certifying ends the range of the certified version it overlaps; an
    explicit ``valid_to`` that overlaps a later certified range is a ``409``.
    """
    if body.valid_to is not None and body.valid_to <= body.valid_from:
        raise Unprocessable(f"valid_to {body.valid_to.isoformat()} must be after valid_from "
                            f"{body.valid_from.isoformat()}")
    return product_out(catalog.certify(product_id, body.valid_from, body.valid_to,
                                       actor=who.name, reason=body.reason))


@router.post("/products/{product_id}/retract", response_model=ProductOut,
             responses={**_ERRORS, 409: {"model": ErrorOut}})
def retract(product_id: ProductId, body: RetractRequest, catalog: CatalogDep,
            who: Operator) -> ProductOut:
    """Retract a version; its history is kept and ``best`` no longer returns it."""
    return product_out(catalog.retract(product_id, actor=who.name, reason=body.reason))


__all__ = ["IMMUTABLE", "BestLookupFastPath", "product_out", "router"]
