"""Cameras: known cameras with their latest products and job; the QC report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse

from sitiancal.api.deps import CatalogDep, Reader, StoreDep
from sitiancal.api.routers.jobs import job_out
from sitiancal.api.schemas import CAMERA_PATTERN, CameraList, CameraOut, ErrorOut
from sitiancal.service.report_html import (
    ReportBasis,
    build_html_report,
    camera_report,
    latest_products,
)
from sitiancal.storage.catalog import Camera, Catalog

router = APIRouter(prefix="/v1", tags=["cameras"])

CameraPath = Annotated[str, Path(pattern=CAMERA_PATTERN, description="Camera name.")]
_ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}


def camera_out(catalog: Catalog, camera: Camera) -> CameraOut:
    """A camera with its newest products and newest job."""
    jobs = catalog.list_jobs(camera=camera.name, limit=1)
    latest = {t: {"id": p.id, "version": p.version, "state": p.state, "created": p.created,
                  "valid_from": p.valid_from, "valid_to": p.valid_to, "sha256": p.sha256}
              for t, p in sorted(latest_products(catalog, camera.name).items())}
    return CameraOut.model_validate({
        "camera": camera.name, "model": camera.model, "description": camera.description,
        "created": camera.created, "latest_products": latest,
        "latest_job": job_out(jobs[0]) if jobs else None})


@router.get("/cameras", response_model=CameraList, responses=_ERRORS)
def list_cameras(catalog: CatalogDep, _: Reader) -> CameraList:
    """Known cameras with their latest products and job."""
    return CameraList(cameras=[camera_out(catalog, c) for c in catalog.list_cameras()])


@router.get("/cameras/{camera}", response_model=CameraOut, responses=_ERRORS)
def get_camera(camera: CameraPath, catalog: CatalogDep, _: Reader) -> CameraOut:
    """One camera with its latest products and job."""
    return camera_out(catalog, catalog.get_camera(camera))


@router.get("/cameras/{camera}/report", responses=_ERRORS)
def report(camera: CameraPath, catalog: CatalogDep, _: Reader,
           basis: Annotated[ReportBasis, Query(
               description="latest: newest version of each type; certified: the "
               "versions certified now.")] = "latest") -> dict[str, Any]:
    """The QC figures of a camera (the reference study's table), with units and errors."""
    return camera_report(catalog, camera, basis).to_dict()


@router.get("/cameras/{camera}/report.html", response_class=HTMLResponse, responses=_ERRORS)
def report_html(camera: CameraPath, catalog: CatalogDep, store: StoreDep, _: Reader,
                basis: ReportBasis = "latest") -> HTMLResponse:
    """The operators' QC report: the figures table and every QC plot (PNG embedded)."""
    qc = camera_report(catalog, camera, basis)
    page = build_html_report(catalog, store, camera, basis, qc=qc)
    return HTMLResponse(page.html())
