"""Datasets: registration from the input roots, frame uploads, inventories."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request

from sitiancal.api.content import FiniteJSONResponse as JSONResponse
from sitiancal.api.deps import DatasetsDep, Operator, Reader, SettingsDep
from sitiancal.api.errors import BadRequest
from sitiancal.api.schemas import CAMERA_PATTERN, DatasetCreate, DatasetList, DatasetOut, ErrorOut
from sitiancal.api.uploads import MULTIPART_OVERHEAD, MultipartFile, limited, upload_kind
from sitiancal.service.datasets import UploadTooLarge, supported_products
from sitiancal.storage.catalog import Dataset

router = APIRouter(prefix="/v1", tags=["datasets"])

DatasetId = Annotated[str, Path(min_length=1, max_length=64, description="Dataset id.")]
_ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
           422: {"model": ErrorOut}}


def dataset_out(dataset: Dataset) -> DatasetOut:
    """API form of a dataset: its inventory, identity and supported products."""
    return DatasetOut.model_validate({**dataset.to_dict(),
                                      "supported_products": supported_products(
                                          dataset.inventory)})


@router.post("/datasets", status_code=201, response_model=DatasetOut,
             responses={**_ERRORS, 201: {"description": "Registered; the inventory."}})
def register_dataset(body: DatasetCreate, datasets: DatasetsDep, who: Operator) -> JSONResponse:
    """Register the FITS frames under ``source`` (headers only), or an empty upload dataset.

    ``source`` must resolve (``..`` and symbolic links included) inside the
    input roots (403 otherwise). A source with no usable frame is a 422 that
    lists every rejected file and its reason.
    """
    dataset = datasets.register(body.camera, body.source, body.label, actor=who.name,
                                allow_mixed_states=body.allow_mixed_states,
                                types_from_paths=body.types_from_paths)
    out = dataset_out(dataset)
    return JSONResponse(out.model_dump(mode="json"), status_code=201,
                        headers={"Location": f"/v1/datasets/{dataset.id}"})


@router.post(
    "/datasets/{dataset_id}/frames", status_code=201, response_model=DatasetOut,
    responses={**_ERRORS, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
               415: {"model": ErrorOut}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/fits": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
async def upload_frame(dataset_id: DatasetId, request: Request, datasets: DatasetsDep,
                       settings: SettingsDep, who: Operator,
                       filename: Annotated[str | None, Query(
                           max_length=255, description="File name of a raw-body upload.")] = None,
                       content_length: Annotated[int | None, Header()] = None) -> JSONResponse:
    """Upload one FITS frame into a dataset created with ``"source": null``.

    Send the bytes as the body (``application/fits``) or as the ``file`` part
    of a multipart form. Uploads beyond the size limit are refused with 413
    as soon as the limit is passed (or at once, from ``Content-Length``). The
    frame goes through the same checks as a scanned folder (422 with the
    reason if rejected).
    """
    limit = settings.max_upload_bytes
    await asyncio.to_thread(datasets.upload_target, dataset_id)
    content_type = request.headers.get("content-type")
    kind = upload_kind(content_type)
    allowance = limit + (MULTIPART_OVERHEAD if kind == "multipart" else 0)
    if content_length is not None and content_length > allowance:
        raise UploadTooLarge(limit)
    body = limited(request.stream(), allowance)
    if kind == "multipart":
        part = MultipartFile(body, content_type or "")
        name = await part.open()
        chunks = part.content()
    else:
        name, chunks = filename, body
    received = await datasets.receive(dataset_id, name, chunks, limit=limit)
    if received.size == 0:
        received.path.unlink(missing_ok=True)
        raise BadRequest("the upload is empty")
    dataset = await asyncio.to_thread(datasets.add_uploaded, dataset_id, received,
                                      display_name=name, actor=who.name)
    out = dataset_out(dataset)
    return JSONResponse(out.model_dump(mode="json"), status_code=201,
                        headers={"Location": f"/v1/datasets/{dataset.id}"})


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=_ERRORS)
def get_dataset(dataset_id: DatasetId, datasets: DatasetsDep, _: Reader) -> DatasetOut:
    """A dataset's inventory and rejection report."""
    return dataset_out(datasets.catalog.get_dataset(dataset_id))


@router.get("/datasets", response_model=DatasetList, responses=_ERRORS)
def list_datasets(datasets: DatasetsDep, _: Reader,
                  camera: Annotated[str | None, Query(pattern=CAMERA_PATTERN)] = None,
                  ) -> DatasetList:
    """Registered datasets, newest first."""
    return DatasetList(datasets=[dataset_out(d) for d in
                                 datasets.catalog.list_datasets(camera)])
