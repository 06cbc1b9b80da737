"""The job runner: a thin async layer that executes the state machine's actions.

:class:`JobRunner` owns the dask client (a ``LocalCluster`` started by the
service, or an existing scheduler when ``scheduler_address`` is set), a queue
of job ids and ``max_concurrent_jobs`` consumers. Every change of a job goes
through :func:`sitiancal.service.jobs.transition`; the runner only carries out
the returned actions: write the job record, put the job in the queue, run the
job function in a worker thread (job functions block; they never run on the
event loop), stop its dask work.

Durability: the catalog's job records are the truth. At start-up every job
left ``queued`` is enqueued again and every job left ``running`` (the service
stopped or crashed under it) gets a ``service_restarted`` event: it is
re-queued, or failed with the reason once it has been started
``max_attempts`` times (starts are counted from the catalog's audit log), or
cancelled if a cancellation was pending. So no job stays ``running`` forever.

Cancellation sets the job's ``cancelled()`` flag, which the job function
checks between tasks, and cancels the dask futures the job submitted (the
client handed to the job records them), so running tasks stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sitiancal.service.jobs import (
    CANCEL_MESSAGE,
    MAX_ATTEMPTS,
    Action,
    Event,
    EventKind,
    InvalidTransition,
    JobState,
    JobStatus,
    transition,
)
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog, Job

log = logging.getLogger(__name__)

#: ``job_function(*, catalog, store, settings, job_id, client, progress, cancelled) -> ids``
JobFunction = Callable[..., list[str]]
#: ``on_finished(state, seconds)``: a job left ``running`` after that many seconds.
FinishedHook = Callable[[str, float], None]

_ACTOR = "runner"


class QueueFull(RuntimeError):
    """Too many jobs waiting; try again later (HTTP 503)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"the job queue is full ({self.limit} jobs waiting); try again later"


class RunnerNotStarted(RuntimeError):
    """The runner is not running (it was not started, or it is shutting down)."""

    def __str__(self) -> str:
        return "the job runner is not running"


def _default_job_function() -> JobFunction:
    from sitiancal.service.pipeline import run_calibration_job

    return run_calibration_job


class FutureTracker:
    """A dask client wrapper that remembers the futures a job submits.

    Everything else is delegated to the wrapped client, so the job function
    uses it like a ``distributed.Client``. :meth:`cancel_all` cancels what the
    job submitted, and submissions after cancellation are refused.
    """

    def __init__(self, client: Any, cancelled: threading.Event) -> None:
        self._client = client
        self._cancelled = cancelled
        self._futures: list[Any] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _check(self) -> None:
        if self._cancelled.is_set():
            from sitiancal.service.pipeline import JobCancelled

            raise JobCancelled("the job was cancelled")

    def _track(self, result: Any) -> Any:
        from distributed import Future

        def walk(obj: Any) -> Iterable[Any]:
            if isinstance(obj, Future):
                yield obj
            elif isinstance(obj, (list, tuple, set)):
                for item in obj:
                    yield from walk(item)
            elif isinstance(obj, dict):
                for item in obj.values():
                    yield from walk(item)

        with self._lock:
            self._futures.extend(walk(result))
        return result

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._track(self._client.compute(*args, **kwargs))

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._track(self._client.submit(*args, **kwargs))

    def map(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._track(self._client.map(*args, **kwargs))

    def persist(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._client.persist(*args, **kwargs)

    @property
    def n_futures(self) -> int:
        """How many futures the job has submitted."""
        return len(self._futures)

    def cancel_all(self) -> None:
        """Cancel every future the job submitted that has not finished."""
        with self._lock:
            pending = [f for f in self._futures if not f.done()]
            self._futures = []
        if pending:
            self._client.cancel(pending, force=True)


@dataclass
class _Running:
    """A job whose function runs in a worker thread."""

    cancel: threading.Event
    tracker: FutureTracker | None
    started: float = field(default_factory=time.monotonic)
    stage: str | None = None
    last_persist: float = 0.0


def _error_text(exc: BaseException) -> str:
    try:
        text = str(exc).strip()
    except Exception:  # a broken __str__ must not hide the failure
        text = ""
    if isinstance(exc, (ValueError, LookupError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def start_dask(settings: Settings) -> tuple[Any, Any]:
    """Connect to the configured scheduler, or start the embedded ``LocalCluster``.

    The embedded cluster runs its workers as threads of the service process
    (``processes=False``): on a small machine this avoids a second copy of
    every imported library and of the job's data, and the tile tasks release
    the GIL in their compiled kernels.

    The embedded cluster serves the dask dashboard on ``settings.dask_dashboard``
    (none when that is off); see :func:`dashboard_location` for its link.

    Returns
    -------
    (client, cluster)
        ``cluster`` is None when connected to an existing scheduler.
    """
    from distributed import Client, LocalCluster

    # The client is the process's default: ``distributed.as_completed(futures)``
    # (used by the pipeline and the cube builder) finds its loop through it.
    if settings.scheduler_address:
        return Client(settings.scheduler_address, timeout="20s"), None
    cluster = LocalCluster(n_workers=settings.n_workers,
                           threads_per_worker=settings.threads_per_worker, processes=False,
                           memory_limit=settings.memory_limit,
                           dashboard_address=settings.dask_dashboard)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


@dataclass(frozen=True)
class DaskDashboard:
    """Where the dask dashboard of the service's scheduler is.

    Attributes
    ----------
    url : str
        The link for an operator's browser (the scheduler's ``dashboard_link``,
        shaped by dask's ``distributed.dashboard.link`` template).
    probe : str
        Where the service itself asks whether the dashboard's pages are served
        (loopback for an embedded one bound to every interface): the scheduler's
        ``individual-plots.json``, which lists the bokeh plots (an empty object
        when bokeh is missing and ``/status`` is only a page asking to install it)
        and answers at once, where rendering ``/status`` takes seconds on a busy
        machine.
    """

    url: str
    probe: str


#: The scheduler's route that lists its bokeh plots (what dask's JupyterLab extension reads).
PLOTS_ROUTE = "individual-plots.json"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def dashboard_location(client: Any, bind: str | None = None) -> DaskDashboard | None:
    """The dask dashboard of ``client``'s scheduler, or None when it serves none.

    Parameters
    ----------
    client : distributed.Client
        The service's client; its scheduler is asked which services it runs
        (a blocking call).
    bind : str, optional
        The ``[host]:port`` the embedded cluster's dashboard was started on;
        None for an external scheduler (or a client handed to the runner),
        whose own ``dashboard_link`` is used.

    Returns
    -------
    DaskDashboard or None
        None when the scheduler runs no dashboard.
    """
    import dask
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    info = client.scheduler_info()
    port = (info.get("services") or {}).get("dashboard") if isinstance(info, dict) else None
    if port is None:
        return None
    scheme = "https" if dask.config.get("distributed.scheduler.dashboard.tls.cert", None) \
        else "http"
    url = str(client.dashboard_link)
    if bind is None:
        host = get_address_host(str(client.scheduler.address))
    else:
        host = bind.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::", "*"):  # every interface: the machine's address
            host = "127.0.0.1"
        else:
            url = format_dashboard_link(_url_host(host), port)
    return DaskDashboard(url=url, probe=f"{scheme}://{_url_host(host)}:{port}/{PLOTS_ROUTE}")


class JobRunner:
    """Runs calibration jobs from the catalog, ``settings.max_concurrent_jobs`` at a time.

    Parameters
    ----------
    catalog : Catalog
        Job records (the durable state).
    store : ProductStore
        Product store handed to the job function.
    settings : Settings
        ``max_concurrent_jobs`` and the dask settings.
    job_function : callable, optional
        The job body; default :func:`sitiancal.service.pipeline.run_calibration_job`.
    client : distributed.Client, optional
        Use this client instead of connecting; the runner does not close it.
    use_dask : bool
        False runs jobs without a dask client (``client=None``: the job
        function computes on local threads).
    max_attempts : int
        Starts after which a job that loses its workers or is interrupted by
        restarts fails.
    max_queued : int
        Jobs that may wait in the queue before submissions are refused.
    progress_interval : float
        Least time (s) between two progress writes of one job within a stage.
    on_finished : callable, optional
        ``on_finished(state, seconds)`` when a job that ran finishes (metrics).
    """

    def __init__(self, catalog: Catalog, store: Any, settings: Settings, *,
                 job_function: JobFunction | None = None, client: Any = None,
                 use_dask: bool = True, max_attempts: int = MAX_ATTEMPTS,
                 max_queued: int = 1000, progress_interval: float = 0.5,
                 on_finished: FinishedHook | None = None) -> None:
        self.catalog = catalog
        self.store = store
        self.settings = settings
        self.job_function = job_function or _default_job_function()
        self.max_attempts = max_attempts
        self.max_queued = max_queued
        self.progress_interval = progress_interval
        self.on_finished = on_finished
        self._use_dask = use_dask
        self._client = client
        self._own_client = client is None
        self._cluster: Any = None
        self._lock = threading.RLock()
        self._attempts: dict[str, int] = {}
        self._cancel_pending: set[str] = set()
        self._known: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._threads: dict[str, asyncio.Future[None]] = {}
        self._pending = 0
        self._count_lock = threading.Lock()
        self._queue: asyncio.Queue[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.recovered: dict[str, str] = {}

    # -- life cycle ----------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The dask client (None without dask or before :meth:`start`)."""
        return self._client

    @property
    def uses_dask(self) -> bool:
        """Whether jobs run on a dask client (False: local threads, no dashboard)."""
        return self._use_dask

    def dask_dashboard(self) -> DaskDashboard | None:
        """The dask dashboard the service links to, or None (off, no dask, none served).

        Asks the scheduler (blocking); its errors propagate.
        """
        if self.settings.dask_dashboard is None or self._client is None:
            return None
        bind = self.settings.dask_dashboard if self._cluster is not None else None
        return dashboard_location(self._client, bind)

    @property
    def started(self) -> bool:
        return self._loop is not None and not self._stopping

    async def start(self) -> None:
        """Connect dask, recover the jobs left queued or running, start the consumers."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        if self._use_dask and self._client is None:
            self._client, self._cluster = await asyncio.to_thread(start_dask, self.settings)
        n = self.settings.max_concurrent_jobs
        self._executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sitiancal-job")
        await asyncio.to_thread(self._recover)
        self._consumers = [asyncio.create_task(self._consume(), name=f"job-consumer-{i}")
                           for i in range(n)]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking jobs, stop running ones (they are recovered at the next start).

        Running jobs keep their ``running`` record: the next start-up re-queues
        them (``service_restarted``).
        """
        self._stopping = True
        with self._lock:
            running = list(self._running.values())
        for job in running:
            job.cancel.set()
            if job.tracker is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(job.tracker.cancel_all)
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        threads = [f for f in self._threads.values() if not f.done()]
        if threads:
            await asyncio.wait(threads, timeout=grace)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_client and self._client is not None:
            client, cluster = self._client, self._cluster
            self._client = self._cluster = None
            await asyncio.to_thread(_close_dask, client, cluster)

    def _recover(self) -> None:
        jobs = [*self.catalog.list_jobs(state=JobState.RUNNING.value),
                *self.catalog.list_jobs(state=JobState.QUEUED.value)]
        for job in sorted(jobs, key=lambda j: (j.created, j.id)):
            if job.state == JobState.RUNNING.value:
                self._attempts[job.id] = self._starts(job.id)
                if job.message == CANCEL_MESSAGE:
                    self._cancel_pending.add(job.id)
            with self._lock:
                self._known.add(job.id)
            new, _ = self._apply(job.id, Event(EventKind.SERVICE_RESTARTED))
            self.recovered[job.id] = new.state.value
            log.info("job %s recovered at start-up: %s -> %s", job.id, job.state,
                     new.state.value)

    def _starts(self, job_id: str) -> int:
        """How many times a job has been started, from the catalog's audit log."""
        entries = self.catalog.audit_log(entity="job", entity_id=job_id, action="job.state")
        return sum(1 for e in entries if e.details.get("to") == JobState.RUNNING.value)

    # -- applying events ---------------------------------------------------------------
    def _status(self, job: Job) -> JobStatus:
        return JobStatus(
            state=JobState(job.state), progress=job.progress, stage=job.stage or None,
            message=job.message, error=job.error,
            cancel_requested=job.id in self._cancel_pending,
            attempts=self._attempts.get(job.id, 0), products=tuple(job.products))

    def _apply(self, job_id: str, event: Event, actor: str = _ACTOR,
               ) -> tuple[JobStatus, list[Action]]:
        """Load the job, run the transition, execute the synchronous actions."""
        with self._lock:
            job = self.catalog.get_job(job_id)
            old = self._status(job)
            new, actions = transition(old, event, max_attempts=self.max_attempts)
            self._attempts[job_id] = new.attempts
            if new.cancel_requested:
                self._cancel_pending.add(job_id)
            else:
                self._cancel_pending.discard(job_id)
            running = self._running.get(job_id)
            for action in actions:
                if action is Action.PUBLISH:
                    for product_id in new.products:
                        if product_id not in job.products:
                            self.catalog.link_product(job_id, product_id, actor=_ACTOR)
                elif action is Action.PERSIST:
                    self._persist(job_id, old, new, actor)
                elif action is Action.WITHDRAW:
                    self._withdraw(job_id, job, new)
                elif action is Action.SIGNAL_CANCEL and running is not None:
                    running.cancel.set()
                elif action is Action.CANCEL_FUTURES and running is not None:
                    if running.tracker is not None:
                        try:
                            running.tracker.cancel_all()
                        except Exception:  # the flag still stops the job at its next check
                            log.exception("could not cancel the dask futures of job %s", job_id)
                elif action is Action.RECORD_DURATION and running is not None:
                    if self.on_finished is not None:
                        self.on_finished(new.state.value, time.monotonic() - running.started)
                elif action is Action.ENQUEUE:
                    self._enqueue(job_id)
                elif action is Action.START:
                    cancel = threading.Event()
                    tracker = (FutureTracker(self._client, cancel)
                               if self._client is not None else None)
                    self._running[job_id] = _Running(cancel, tracker)
            return new, actions

    def _withdraw(self, job_id: str, job: Job, new: JobStatus) -> None:
        """Retract the candidate versions a failed or cancelled job had published."""
        why = new.error or new.message or new.state.value
        for product_id in job.products:
            product = self.catalog.get_product(product_id)
            if product.job == job_id and product.state == "candidate":
                self.catalog.retract(product_id, actor=_ACTOR,
                                     reason=f"job {job_id} ended {new.state.value}: {why}")
                log.warning("retracted %s/%s v%d published by job %s before it ended %s",
                            product.camera, product.type, product.version, job_id,
                            new.state.value)

    def _persist(self, job_id: str, old: JobStatus, new: JobStatus, actor: str) -> None:
        fields: dict[str, Any] = {}
        if new.state != old.state:
            fields["state"] = new.state.value
        if new.progress != old.progress:
            fields["progress"] = new.progress
        if new.stage != old.stage:
            fields["stage"] = new.stage or ""  # the catalog cannot clear a field
        if new.message != old.message and new.message is not None:
            fields["message"] = new.message
        if new.error != old.error and new.error is not None:
            fields["error"] = new.error
        if fields:
            self.catalog.update_job(job_id, actor=actor, **fields)

    def _enqueue(self, job_id: str) -> None:
        if self._loop is None or self._queue is None:
            raise RunnerNotStarted()
        with self._count_lock:
            self._pending += 1
        self._loop.call_soon_threadsafe(self._queue.put_nowait, job_id)

    # -- public, thread-safe -------------------------------------------------------------
    def submit(self, camera: str, dataset_id: str, *, products: Iterable[str] = (),
               params: dict[str, Any] | None = None, force: bool = False,
               idempotency_key: str | None = None, actor: str = "system") -> tuple[Job, bool]:
        """Create (or find, by idempotency key) a job and queue it.

        Returns
        -------
        (Job, bool)
            The job and whether it was created by this call.

        Raises
        ------
        QueueFull
            ``max_queued`` jobs are already waiting.
        """
        if not self.started:
            raise RunnerNotStarted()
        if self._pending >= self.max_queued:
            raise QueueFull(self.max_queued)
        job = self.catalog.create_job(camera, dataset_id, products=tuple(products),
                                      params=params or {}, idempotency_key=idempotency_key,
                                      force=force, actor=actor)
        with self._lock:
            if job.id in self._known or job.state != JobState.QUEUED.value:
                return job, False
            self._known.add(job.id)
            self._apply(job.id, Event(EventKind.SUBMITTED))
        return self.catalog.get_job(job.id), True

    def cancel(self, job_id: str, actor: str = _ACTOR) -> Job:
        """Cancel a job: at once if queued; a running job stops at its next check.

        Raises
        ------
        InvalidTransition
            The job has already finished.
        """
        before = self.catalog.get_job(job_id)
        self._apply(job_id, Event(EventKind.CANCEL_REQUESTED), actor)
        # the request itself is audited: a running job only changes state when it stops
        self.catalog.record_audit(actor=actor, action="job.cancel", entity="job",
                                  entity_id=job_id, details={"state": before.state})
        return self.catalog.get_job(job_id)

    def queue_depth(self) -> int:
        """Jobs waiting in the queue."""
        return self._pending

    def running_jobs(self) -> list[str]:
        """Ids of the jobs whose function is running now."""
        with self._lock:
            return list(self._running)

    async def check_dask(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask the scheduler for its workers (``status`` ok, error, or disabled)."""
        if not self._use_dask:
            return {"status": "disabled"}
        client = self._client
        if client is None:
            return {"status": "error", "detail": "no dask client"}
        try:
            info = await asyncio.wait_for(asyncio.to_thread(client.scheduler_info), timeout)
        except Exception as exc:  # any failure to reach the scheduler is the answer
            return {"status": "error", "detail": _error_text(exc)}
        workers = info.get("workers", {}) if isinstance(info, dict) else {}
        n_workers = int(info.get("n_workers", len(workers))) if isinstance(info, dict) else 0
        return {"status": "ok" if n_workers else "error", "scheduler": info.get("address"),
                "workers": n_workers,
                **({} if n_workers else {"detail": "the scheduler has no workers"})}

    # -- the consumers and the job thread ----------------------------------------------------
    async def _consume(self) -> None:
        assert self._queue is not None and self._loop is not None
        while True:
            job_id = await self._queue.get()
            with self._count_lock:
                self._pending -= 1
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s could not be run", job_id)
            finally:
                self._queue.task_done()

    async def _run(self, job_id: str) -> None:
        if self._stopping:
            return
        _, actions = await asyncio.to_thread(self._apply, job_id, Event(EventKind.STARTED))
        if Action.START not in actions:
            return
        assert self._loop is not None and self._executor is not None
        with self._lock:
            running = self._running[job_id]
        future = self._loop.run_in_executor(self._executor, self._execute, job_id, running)
        self._threads[job_id] = future
        try:
            await asyncio.shield(future)
        finally:
            if future.done() and self._threads.get(job_id) is future:
                del self._threads[job_id]

    def _execute(self, job_id: str, running: _Running) -> None:
        """Body of the job thread: run the job function, then apply its outcome."""
        try:
            ids = self.job_function(
                catalog=self.catalog, store=self.store, settings=self.settings, job_id=job_id,
                client=running.tracker, cancelled=running.cancel.is_set,
                progress=lambda stage, fraction: self._progress(job_id, running, stage,
                                                                fraction))
            event = Event(EventKind.SUCCEEDED, products=tuple(str(i) for i in ids or ()))
        except BaseException as exc:
            event = self._failure(job_id, running, exc)
        try:
            if not self._stopping:
                try:
                    self._apply(job_id, event)
                except Exception as exc:
                    if event.kind is not EventKind.SUCCEEDED:
                        raise
                    self._apply(job_id, Event(EventKind.FAILED, error=(
                        f"the job finished but its products could not be recorded: "
                        f"{_error_text(exc)}")))
        except Exception:
            log.exception("could not record the outcome of job %s", job_id)
        finally:
            with self._lock:
                if self._running.get(job_id) is running:
                    del self._running[job_id]

    @staticmethod
    def _failure(job_id: str, running: _Running, exc: BaseException) -> Event:
        """The event for a job function that raised ``exc``."""
        from distributed import KilledWorker

        if isinstance(exc, KilledWorker):
            return Event(EventKind.WORKER_LOST, error=_error_text(exc))
        if not running.cancel.is_set() and not isinstance(exc, (ValueError, LookupError)):
            log.error("job %s failed", job_id, exc_info=exc)
        return Event(EventKind.FAILED, error=_error_text(exc))

    def _progress(self, job_id: str, running: _Running, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage == running.stage and now - running.last_persist < self.progress_interval:
            return
        running.stage, running.last_persist = stage, now
        try:
            self._apply(job_id, Event(EventKind.PROGRESS, progress=fraction, stage=stage))
        except InvalidTransition:
            pass  # the job finished in the meantime


def _close_dask(client: Any, cluster: Any) -> None:
    with contextlib.suppress(Exception):
        client.close(timeout=10)
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)
