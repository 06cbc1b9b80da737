"""Jobs: submit, poll, list, cancel; the QC report of a job's products."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import HTMLResponse

from sitiancal.api.content import FiniteJSONResponse as JSONResponse
from sitiancal.api.deps import CatalogDep, Operator, Reader, RunnerDep, StoreDep
from sitiancal.api.errors import Conflict, Unprocessable
from sitiancal.api.schemas import CAMERA_PATTERN, ErrorOut, JobCreate, JobList, JobOut, JobStateName
from sitiancal.service.datasets import supported_products
from sitiancal.service.report_html import build_job_html_report, job_report
from sitiancal.storage.catalog import Job

router = APIRouter(prefix="/v1", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="Job id.")]
_ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}


def job_out(job: Job) -> JobOut:
    """API form of a job."""
    doc = job.to_dict()
    doc["stage"] = doc.get("stage") or None
    return JobOut.model_validate(doc)


def _reply(job: Job, status: int) -> JSONResponse:
    return JSONResponse(job_out(job).model_dump(mode="json"), status_code=status,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.post("/jobs", status_code=202, response_model=JobOut,
             responses={**_ERRORS, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
                        503: {"model": ErrorOut}, 202: {"description": "Queued (or the job "
                                                        "of the same Idempotency-Key)."}})
def submit_job(body: JobCreate, catalog: CatalogDep, runner: RunnerDep, who: Operator,
               idempotency_key: Annotated[str | None, Header(
                   alias="Idempotency-Key", min_length=1, max_length=200,
                   description="The same key returns the same job.")] = None,
               ) -> JSONResponse:
    """Queue a calibration job; poll ``Location`` for its progress.

    ``products`` defaults to every type the dataset supports. A product whose
    inputs, parameters and code version match an existing version reuses it,
    unless ``force``.
    """
    dataset = catalog.get_dataset(body.dataset)
    if dataset.camera != body.camera:
        raise Unprocessable(f"dataset {dataset.id} belongs to camera {dataset.camera}, "
                            f"not {body.camera}")
    products = body.products or supported_products(dataset.inventory)
    if not products:
        counts = dataset.inventory.get("counts", {})
        raise Unprocessable(f"dataset {dataset.id} supports no product (frames: {counts})")
    job, created = runner.submit(body.camera, dataset.id, products=products,
                                 params=body.params, force=body.force,
                                 idempotency_key=idempotency_key, actor=who.name)
    if not created:
        asked = (body.camera, dataset.id, list(products), body.params, body.force)
        had = (job.camera, job.dataset, list(job.requested), job.params, job.force)
        if asked != had:
            raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for job {job.id} "
                           "with a different request")
    return _reply(job, 202)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=_ERRORS)
def get_job(job_id: JobId, catalog: CatalogDep, _: Reader) -> JobOut:
    """A job: state, progress (0..1), current stage, timestamps, error, products."""
    return job_out(catalog.get_job(job_id))


_REPORT_ERRORS = {**_ERRORS, 409: {"model": ErrorOut, "description": "The job has no "
                                   "products yet (queued, running) or publishes none (failed, "
                                   "cancelled); the detail says which."}}


@router.get("/jobs/{job_id}/report", responses=_REPORT_ERRORS)
def report(job_id: JobId, catalog: CatalogDep, _: Reader) -> dict[str, Any]:
    """The QC figures of the product versions a job produced or reused (as the camera
    report, with ``basis`` ``"job"`` and ``reused`` per product)."""
    qc, _products = job_report(catalog, job_id)
    return qc.to_dict()


@router.get("/jobs/{job_id}/report.html", response_class=HTMLResponse,
            responses=_REPORT_ERRORS)
def report_html(job_id: JobId, catalog: CatalogDep, store: StoreDep, _: Reader) -> HTMLResponse:
    """The operators' QC report of a job: the figures table and every QC plot (PNG
    embedded), drawn from the product versions the job produced or reused."""
    return HTMLResponse(build_job_html_report(catalog, store, job_id).html())


@router.get("/jobs", response_model=JobList, responses=_ERRORS)
def list_jobs(catalog: CatalogDep, _: Reader,
              camera: Annotated[str | None, Query(pattern=CAMERA_PATTERN)] = None,
              state: JobStateName | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    """Jobs, newest first."""
    return JobList(jobs=[job_out(j) for j in catalog.list_jobs(camera, state, limit)])


@router.delete("/jobs/{job_id}", response_model=JobOut,
               responses={**_ERRORS, 409: {"model": ErrorOut},
                          202: {"description": "Cancellation requested; the job stops at "
                                "its next check and publishes nothing."}})
def cancel_job(job_id: JobId, catalog: CatalogDep, runner: RunnerDep,
               who: Operator) -> JSONResponse:
    """Cancel a job: a queued job is cancelled at once (200); a running one stops its
    dask work and ends ``cancelled`` shortly (202). A finished job is a 409.

    The status follows the state the request found, not the state the reply
    shows: a running job can stop before the reply is built, and is still a
    202 (its body then already says ``cancelled``).
    """
    before = catalog.get_job(job_id)
    job = runner.cancel(job_id, actor=who.name)
    at_once = before.state == "queued" and job.state == "cancelled"
    return _reply(job, 200 if at_once else 202)
