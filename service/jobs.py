"""The job state machine: events in, a new job status and a list of actions out.

This module does no I/O. :func:`transition` is a pure function over a small
frozen :class:`JobStatus`; the async runner (:mod:`sitiancal.service.runner`)
feeds it events (a job was submitted, started, made progress, finished,
failed, was asked to stop, lost its dask worker, or was found running when the
service started) and executes the :class:`Action` list it returns (persist the
record, enqueue the job, start it in a thread, cancel its dask futures, record
its products). Its tests read like a specification and need no cluster.

States are those of the HTTP contract: ``queued -> running -> succeeded |
failed | cancelled``; a running job that loses its worker or is interrupted
by a restart goes back to ``queued`` until it has been started
``max_attempts`` times, then fails with the reason. A running job asked to
stop stays ``running`` (with ``cancel_requested``) until its work has
actually stopped, so that a job reported ``cancelled`` never publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class JobState(StrEnum):
    """Public job states (API.md)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for states after which nothing changes any more."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class EventKind(StrEnum):
    """What can happen to a job."""

    SUBMITTED = "submitted"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    WORKER_LOST = "worker_lost"
    SERVICE_RESTARTED = "service_restarted"


class Action(StrEnum):
    """What the runner must do after a transition, in list order."""

    PERSIST = "persist"
    """Write the new status to the job record."""
    ENQUEUE = "enqueue"
    """Put the job in the runner's queue."""
    START = "start"
    """Run the job function in a worker thread."""
    SIGNAL_CANCEL = "signal_cancel"
    """Make the job function's ``cancelled()`` check return True."""
    CANCEL_FUTURES = "cancel_futures"
    """Cancel the dask futures the job submitted."""
    PUBLISH = "publish"
    """Record the job's product versions on the job (they were published by the job)."""
    RECORD_DURATION = "record_duration"
    """Observe the run time in the metrics."""
    WITHDRAW = "withdraw"
    """Retract any candidate version the job published before it failed or stopped."""


@dataclass(frozen=True)
class Event:
    """One event of a job's life.

    Attributes
    ----------
    kind : EventKind
    progress : float or None
        Fraction of the job done, 0..1 (``progress`` events).
    stage : str or None
        Name of the current stage (``progress`` events).
    error : str or None
        Why the job failed or lost its worker.
    products : tuple of str
        Product version ids (``succeeded`` events).
    """

    kind: EventKind
    progress: float | None = None
    stage: str | None = None
    error: str | None = None
    products: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobStatus:
    """The part of a job record the state machine reads and writes.

    Attributes
    ----------
    state : JobState
    progress : float
        Fraction done, 0..1.
    stage, message, error : str or None
        Current stage, a human-readable note, and the failure reason.
    cancel_requested : bool
        A running job was asked to stop and has not stopped yet.
    attempts : int
        How many times the job has been started.
    products : tuple of str
        Product version ids the job published or reused.
    """

    state: JobState = JobState.QUEUED
    progress: float = 0.0
    stage: str | None = None
    message: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    products: tuple[str, ...] = field(default_factory=tuple)


class InvalidTransition(ValueError):
    """An event that cannot happen in the job's current state.

    Attributes
    ----------
    state : JobState
    event : EventKind
    """

    def __init__(self, state: JobState, event: EventKind) -> None:
        super().__init__(state, event)
        self.state = state
        self.event = event

    def __str__(self) -> str:
        if self.event is EventKind.CANCEL_REQUESTED:
            return f"the job has already {self.state.value}; there is nothing to cancel"
        return f"a {self.state.value} job cannot receive a {self.event.value!r} event"


#: Message of a running job asked to stop (also how a restart recognises one).
CANCEL_MESSAGE = "cancellation requested"

#: Default number of starts before a job that keeps losing its worker (or keeps
#: being interrupted by restarts) is failed instead of re-queued.
MAX_ATTEMPTS = 3


def _retry_or_fail(status: JobStatus, cause: str, max_attempts: int,
                   ) -> tuple[JobStatus, list[Action]]:
    if status.cancel_requested:
        return replace(status, state=JobState.CANCELLED, cancel_requested=False,
                       message=f"cancelled ({cause})"), [Action.WITHDRAW, Action.PERSIST]
    if status.attempts >= max_attempts:
        error = f"{cause}; gave up after {status.attempts} attempt(s)"
        return replace(status, state=JobState.FAILED, error=error, message=None), [
            Action.WITHDRAW, Action.PERSIST, Action.RECORD_DURATION]
    message = f"{cause}; re-queued (attempt {status.attempts + 1} of {max_attempts})"
    return replace(status, state=JobState.QUEUED, progress=0.0, stage=None, message=message), [
        Action.PERSIST, Action.ENQUEUE]


def transition(status: JobStatus, event: Event, *, max_attempts: int = MAX_ATTEMPTS,
               ) -> tuple[JobStatus, list[Action]]:
    """Apply ``event`` to a job in ``status``.

    Parameters
    ----------
    status : JobStatus
        The job before the event.
    event : Event
        What happened.
    max_attempts : int
        Starts after which a lost worker or an interrupting restart fails the
        job instead of re-queuing it.

    Returns
    -------
    (JobStatus, list of Action)
        The job after the event and what the runner must do, in order. An
        empty list means the event changes nothing (e.g. a queued job that
        was cancelled is dequeued and must not start).

    Raises
    ------
    InvalidTransition
        The event cannot happen in this state (e.g. cancelling a finished
        job, progress of a job that is not running).
    """
    state, kind = status.state, event.kind
    if state is JobState.QUEUED:
        if kind is EventKind.SUBMITTED:
            return status, [Action.PERSIST, Action.ENQUEUE]
        if kind is EventKind.STARTED:
            attempt = status.attempts + 1
            message = (f"attempt {attempt} of {max_attempts}" if attempt > 1
                       else status.message)
            return replace(status, state=JobState.RUNNING, attempts=attempt, message=message,
                           progress=0.0, stage="starting", error=None), [
                Action.PERSIST, Action.START]
        if kind is EventKind.CANCEL_REQUESTED:
            return replace(status, state=JobState.CANCELLED,
                           message="cancelled before it started"), [Action.PERSIST]
        if kind is EventKind.SERVICE_RESTARTED:
            return status, [Action.ENQUEUE]
    elif state is JobState.RUNNING:
        if kind is EventKind.PROGRESS:
            fraction = status.progress if event.progress is None else event.progress
            return replace(status, progress=min(max(float(fraction), 0.0), 1.0),
                           stage=event.stage or status.stage), [Action.PERSIST]
        if kind is EventKind.SUCCEEDED:
            message = ("finished before the cancellation took effect"
                       if status.cancel_requested else status.message)
            return replace(status, state=JobState.SUCCEEDED, progress=1.0, stage="done",
                           cancel_requested=False, products=tuple(event.products),
                           message=message), [
                Action.PUBLISH, Action.PERSIST, Action.RECORD_DURATION]
        if kind is EventKind.FAILED:
            if status.cancel_requested:
                return replace(status, state=JobState.CANCELLED, cancel_requested=False,
                               message="cancelled while running; nothing it computed stays published"), [
                    Action.WITHDRAW, Action.PERSIST, Action.RECORD_DURATION]
            return replace(status, state=JobState.FAILED,
                           error=event.error or "the job failed without a message"), [
                Action.WITHDRAW, Action.PERSIST, Action.RECORD_DURATION]
        if kind is EventKind.CANCEL_REQUESTED:
            if status.cancel_requested:
                return status, []
            return replace(status, cancel_requested=True, message=CANCEL_MESSAGE), [
                Action.PERSIST, Action.SIGNAL_CANCEL, Action.CANCEL_FUTURES]
        if kind is EventKind.WORKER_LOST:
            cause = "a dask worker was lost" + (f" ({event.error})" if event.error else "")
            return _retry_or_fail(status, cause, max_attempts)
        if kind is EventKind.SERVICE_RESTARTED:
            return _retry_or_fail(status, "the service restarted while the job was running",
                                  max_attempts)
    else:  # terminal
        if kind is EventKind.STARTED:
            return status, []  # cancelled while it waited in the queue
        if kind is EventKind.SERVICE_RESTARTED:
            return status, []
    raise InvalidTransition(state, kind)
