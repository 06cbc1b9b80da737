"""Operations: ``/healthz`` (liveness and dependencies) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text

from sitiancal import __version__
from sitiancal.api.content import FiniteJSONResponse as JSONResponse
from sitiancal.api.deps import service
from sitiancal.api.schemas import HealthOut
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.models import JOB_STATES, JobRow

router = APIRouter(tags=["operations"])

#: Seconds a dependency may take to answer a health check.
HEALTH_TIMEOUT = 5.0


def _ping(catalog: Catalog) -> None:
    with catalog.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def jobs_by_state(catalog: Catalog) -> dict[str, int]:
    """Number of jobs in each state (one aggregate query)."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update({str(state): int(n) for state, n in rows})
    return counts


async def _database(catalog: Catalog) -> dict[str, Any]:
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, catalog), HEALTH_TIMEOUT)
    except Exception as exc:  # an unreachable database is the answer, not an error
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "dialect": catalog.dialect}


@router.get("/healthz", response_model=HealthOut,
            responses={503: {"model": HealthOut, "description": "A dependency is down."}})
async def healthz(request: Request) -> JSONResponse:
    """The process is alive and its database and dask scheduler answer (200), or 503."""
    state = service(request)
    database, dask = await asyncio.gather(_database(state.catalog),
                                          state.runner.check_dask(HEALTH_TIMEOUT))
    ok = database["status"] == "ok" and dask["status"] in ("ok", "disabled")
    body = HealthOut(status="ok" if ok else "error", version=__version__, database=database,
                     dask=dask, jobs={"queued": state.runner.queue_depth(),
                                      "running": state.runner.running_jobs()})
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text: jobs by state, job durations, product requests, bytes served,
    cache hits (304s) and best-lookup latency."""
    state = service(request)
    counts = await asyncio.to_thread(jobs_by_state, state.catalog)
    return PlainTextResponse(state.metrics.render(counts),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
