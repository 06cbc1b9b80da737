"""The FastAPI application factory.

``create_app(settings)`` builds the app; its lifespan opens the catalog
(migrating it), the product store, and starts the job runner, which owns the
dask client (a LocalCluster, or the scheduler at ``scheduler_address``). The
exception table of :mod:`sitiancal.api.errors` is installed once; routes
raise domain exceptions and never build error responses themselves.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from sitiancal import __version__
from sitiancal.api.auth import OperatorGuard, TokenAuth, WriteRateLimit
from sitiancal.api.bestcache import BestCache
from sitiancal.api.content import FiniteJSONResponse
from sitiancal.api.deps import ServiceState
from sitiancal.api.errors import install_error_handlers
from sitiancal.api.integrity import IntegrityChecker
from sitiancal.api.metrics import Metrics
from sitiancal.api.routers import cameras, datasets, health, jobs, products, ui
from sitiancal.api.zarrhttp import ZarrServer
from sitiancal.service.datasets import DatasetRegistry
from sitiancal.service.runner import JobFunction, JobRunner
from sitiancal.service.settings import Settings

DESCRIPTION = """\
Per-pixel calibration of the SiTian CMOS cameras: register a dataset of bias,
dark and flat frames, run a calibration job, review the QC report, certify
products, and let pipelines fetch the product valid at an observation time as
FITS or read regions of it as zarr.

Authentication: `Authorization: Bearer <token>`. Write endpoints need an
operator token; read endpoints need a reader or operator token when reader
tokens are configured. Errors are `{"detail": "..."}`.
"""

TAGS = [
    {"name": "datasets", "description": "Register frames from the input roots or by upload."},
    {"name": "jobs", "description": "Calibration jobs: submit, poll, cancel."},
    {"name": "products", "description": "Product versions, downloads, validity."},
    {"name": "cameras", "description": "Cameras, their latest products and QC reports."},
    {"name": "operations", "description": "Health and metrics."},
]

_KINDS = (
    (re.compile(r"^/v1/products/[^/]+/fits$"), "fits"),
    (re.compile(r"^/v1/products/[^/]+/zarr(/.*)?$"), "zarr"),
    (re.compile(r"^/v1/cameras/[^/]+/best/[^/]+$"), "best"),
    (re.compile(r"^/v1/products(/[^/]+)?$"), "metadata"),
)


class ProductRequestMetrics:
    """ASGI middleware counting product requests by kind and final status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = None
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            kind = next((k for rx, k in _KINDS if rx.match(scope["path"])), None)
        if kind is None:
            await self.app(scope, receive, send)
            return
        counted = False

        async def capture(message: Any) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True  # before the client can see the response
                self.metrics.product_requests.inc(kind=kind, status=str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if not counted:
                self.metrics.product_requests.inc(kind=kind, status="500")


def create_app(settings: Settings | None = None, *, job_function: JobFunction | None = None,
               use_dask: bool = True, dask_client: Any = None,
               max_attempts: int | None = None,
               write_limit: WriteRateLimit | None = None) -> FastAPI:
    """Build the sitiancal HTTP service.

    Parameters
    ----------
    settings : Settings, optional
        Deployment settings; default from ``SITIANCAL_*`` environment variables.
    job_function : callable, optional
        The job body (default: the calibration pipeline's ``run_calibration_job``).
    use_dask : bool
        False runs jobs without a dask client (tests of the HTTP layer).
    dask_client : distributed.Client, optional
        An existing client to use (not closed by the app).
    max_attempts : int, optional
        Starts before a job that keeps losing its workers or being interrupted fails.
    write_limit : WriteRateLimit, optional
        Write requests allowed per operator token (default 10/s, burst 60); beyond
        it a ``429`` with ``Retry-After``.
    """
    settings = settings or Settings()
    metrics = Metrics()
    auth = TokenAuth(settings.operator_tokens, settings.reader_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import logging
        from datetime import timedelta

        from sitiancal.compute.allocator import keep_freed_memory
        from sitiancal.storage.catalog import Catalog
        from sitiancal.storage.store import ProductStore

        # before the service starts its threads: a thread that has allocated keeps
        # its own malloc arena, where a job's large arrays would be mapped afresh
        keep_freed_memory()
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        catalog = await asyncio.to_thread(Catalog.open, settings.catalog_url)
        store = ProductStore(settings.product_store_url)
        # reliability (issue 7): remove what a crashed publication left (staging of dead
        # writers at once, other leftovers after an hour) before jobs are recovered
        try:
            await asyncio.to_thread(catalog.sweep_orphans, store, timedelta(hours=1))
        except Exception:  # a failing store must not keep the service down; swept next time
            logging.getLogger(__name__).warning("start-up sweep of the product store failed",
                                                exc_info=True)
        extra = {} if max_attempts is None else {"max_attempts": max_attempts}
        runner = JobRunner(catalog, store, settings, job_function=job_function,
                           use_dask=use_dask, client=dask_client,
                           on_finished=lambda state, seconds: metrics.job_duration.observe(
                               seconds, state=state), **extra)
        try:
            await runner.start()
        except BaseException:
            catalog.close()
            raise
        app.state.sitiancal = ServiceState(settings=settings, catalog=catalog, store=store,
                                           runner=runner,
                                           datasets=DatasetRegistry(catalog, settings),
                                           metrics=metrics, auth=auth)
        app.state.zarr = ZarrServer(store)
        app.state.integrity = IntegrityChecker(store)
        app.state.best_cache = BestCache(catalog, products.render_product)
        try:
            yield
        finally:
            await runner.stop()
            catalog.close()

    app = FastAPI(title="sitiancal", version=__version__, description=DESCRIPTION,
                  openapi_tags=TAGS, lifespan=lifespan,
                  default_response_class=FiniteJSONResponse)
    app.state.metrics = metrics
    app.state.auth = auth
    install_error_handlers(app)
    for module in (datasets, jobs, products, cameras, health):
        app.include_router(module.router)
    app.include_router(ui.router)
    app.mount("/ui/static", StaticFiles(directory=ui.STATIC_DIR), name="ui-static")
    # innermost: answers cached best-at-time lookups before routing (counted by the metrics)
    app.add_middleware(products.BestLookupFastPath)
    app.add_middleware(OperatorGuard, auth=auth, limit=write_limit or WriteRateLimit())
    app.add_middleware(ProductRequestMetrics, metrics=metrics)
    return app
