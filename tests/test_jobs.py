"""The job state machine, specified event by event (no cluster, no database)."""

from __future__ import annotations

import itertools

import pytest

from sitiancal.service.jobs import (
    Action,
    Event,
    EventKind,
    InvalidTransition,
    JobState,
    JobStatus,
    transition,
)

E = EventKind
A = Action


def run(status: JobStatus, *events: Event, max_attempts: int = 3):
    actions = []
    for event in events:
        status, acts = transition(status, event, max_attempts=max_attempts)
        actions.append(acts)
    return status, actions


def ev(kind: EventKind, **kw) -> Event:
    return Event(kind, **kw)


def test_submitted_job_is_persisted_then_enqueued():
    status, [acts] = run(JobStatus(), ev(E.SUBMITTED))
    assert status.state is JobState.QUEUED
    assert acts == [A.PERSIST, A.ENQUEUE]


def test_start_persists_running_before_starting_the_thread():
    status, [acts] = run(JobStatus(), ev(E.STARTED))
    assert status.state is JobState.RUNNING
    assert status.attempts == 1
    assert status.stage == "starting"
    assert acts == [A.PERSIST, A.START]


def test_progress_is_clipped_and_keeps_the_stage_when_none_given():
    status, _ = run(JobStatus(), ev(E.STARTED), ev(E.PROGRESS, progress=0.4, stage="tiles"))
    assert (status.progress, status.stage) == (0.4, "tiles")
    status, [acts] = run(status, ev(E.PROGRESS, progress=1.7))
    assert (status.progress, status.stage) == (1.0, "tiles")
    assert acts == [A.PERSIST]
    status, _ = run(status, ev(E.PROGRESS, progress=-3.0, stage="products"))
    assert (status.progress, status.stage) == (0.0, "products")


def test_success_publishes_products_and_records_duration():
    status, acts = run(JobStatus(), ev(E.STARTED),
                       ev(E.SUCCEEDED, products=("p1", "p2")))
    assert status.state is JobState.SUCCEEDED
    assert status.products == ("p1", "p2")
    assert status.progress == 1.0
    assert acts[-1] == [A.PUBLISH, A.PERSIST, A.RECORD_DURATION]


def test_failure_keeps_the_error_message():
    status, acts = run(JobStatus(), ev(E.STARTED), ev(E.FAILED, error="no flat frames"))
    assert status.state is JobState.FAILED
    assert status.error == "no flat frames"
    assert A.PUBLISH not in acts[-1]
    assert acts[-1][0] == A.WITHDRAW  # whatever it published before failing goes first
    status, _ = run(JobStatus(), ev(E.STARTED), ev(E.FAILED))
    assert status.error == "the job failed without a message"


def test_cancelling_a_queued_job_cancels_it_and_it_never_starts():
    status, [acts] = run(JobStatus(), ev(E.CANCEL_REQUESTED))
    assert status.state is JobState.CANCELLED
    assert acts == [A.PERSIST]
    status2, [acts] = run(status, ev(E.STARTED))  # dequeued later by the runner
    assert status2 == status and acts == []


def test_cancelling_a_running_job_stops_its_work_and_publishes_nothing():
    status, acts = run(JobStatus(), ev(E.STARTED), ev(E.CANCEL_REQUESTED))
    assert status.state is JobState.RUNNING  # until the work has really stopped
    assert status.cancel_requested
    assert acts[-1] == [A.PERSIST, A.SIGNAL_CANCEL, A.CANCEL_FUTURES]
    # a second request changes nothing
    again, [acts2] = run(status, ev(E.CANCEL_REQUESTED))
    assert again == status and acts2 == []
    # the job function then stops with an exception (JobCancelled, CancelledError...)
    done, [acts3] = run(status, ev(E.FAILED, error="CancelledError"))
    assert done.state is JobState.CANCELLED
    assert done.error is None
    assert acts3 == [A.WITHDRAW, A.PERSIST, A.RECORD_DURATION]


def test_success_racing_a_cancel_is_reported_as_success():
    status, _ = run(JobStatus(), ev(E.STARTED), ev(E.CANCEL_REQUESTED),
                    ev(E.SUCCEEDED, products=("p",)))
    assert status.state is JobState.SUCCEEDED
    assert "before the cancellation" in status.message


@pytest.mark.parametrize("events", [(E.STARTED, E.SUCCEEDED), (E.STARTED, E.FAILED),
                                    (E.CANCEL_REQUESTED,)])
def test_cancelling_a_finished_job_is_a_conflict(events):
    status, _ = run(JobStatus(), *(ev(k) for k in events))
    assert status.state.terminal
    with pytest.raises(InvalidTransition) as info:
        transition(status, ev(E.CANCEL_REQUESTED))
    assert "nothing to cancel" in str(info.value)
    assert info.value.state is status.state


def test_lost_worker_requeues_until_max_attempts_then_fails():
    status = JobStatus()
    for attempt in (1, 2):
        status, acts = run(status, ev(E.STARTED), ev(E.WORKER_LOST, error="KilledWorker"))
        assert status.state is JobState.QUEUED
        assert status.attempts == attempt
        assert status.progress == 0.0
        assert acts[-1] == [A.PERSIST, A.ENQUEUE]
        assert f"attempt {attempt + 1} of 3" in status.message
    status, acts = run(status, ev(E.STARTED), ev(E.WORKER_LOST, error="KilledWorker"))
    assert status.state is JobState.FAILED
    assert "gave up after 3 attempt(s)" in status.error
    assert "KilledWorker" in status.error
    assert acts[-1] == [A.WITHDRAW, A.PERSIST, A.RECORD_DURATION]


def test_restart_requeues_running_jobs_and_reenqueues_queued_ones():
    queued, [acts] = run(JobStatus(), ev(E.SERVICE_RESTARTED))
    assert queued.state is JobState.QUEUED and acts == [A.ENQUEUE]
    running, _ = run(JobStatus(), ev(E.STARTED), ev(E.PROGRESS, progress=0.5, stage="tiles"))
    after, [acts] = run(running, ev(E.SERVICE_RESTARTED))
    assert after.state is JobState.QUEUED
    assert (after.progress, after.stage) == (0.0, None)
    assert "service restarted" in after.message
    assert acts == [A.PERSIST, A.ENQUEUE]


def test_restart_fails_a_job_that_keeps_being_interrupted():
    status, _ = run(JobStatus(attempts=1), ev(E.STARTED), max_attempts=2)
    status, [acts] = run(status, ev(E.SERVICE_RESTARTED), max_attempts=2)
    assert status.state is JobState.FAILED
    assert "service restarted while the job was running" in status.error
    assert A.ENQUEUE not in acts


def test_restart_of_a_job_being_cancelled_cancels_it():
    status, _ = run(JobStatus(), ev(E.STARTED), ev(E.CANCEL_REQUESTED))
    status, [acts] = run(status, ev(E.SERVICE_RESTARTED))
    assert status.state is JobState.CANCELLED
    assert acts == [A.WITHDRAW, A.PERSIST]


def test_restart_leaves_finished_jobs_alone():
    for final in (E.SUCCEEDED, E.FAILED):
        status, _ = run(JobStatus(), ev(E.STARTED), ev(final))
        after, [acts] = run(status, ev(E.SERVICE_RESTARTED))
        assert after == status and acts == []


INVALID = [
    (JobState.QUEUED, E.PROGRESS), (JobState.QUEUED, E.SUCCEEDED), (JobState.QUEUED, E.FAILED),
    (JobState.QUEUED, E.WORKER_LOST), (JobState.RUNNING, E.SUBMITTED),
    (JobState.RUNNING, E.STARTED), (JobState.SUCCEEDED, E.PROGRESS),
    (JobState.FAILED, E.SUCCEEDED), (JobState.CANCELLED, E.WORKER_LOST),
]


@pytest.mark.parametrize(("state", "kind"), INVALID)
def test_impossible_events_raise(state, kind):
    with pytest.raises(InvalidTransition) as info:
        transition(JobStatus(state=state), ev(kind))
    assert state.value in str(info.value) and kind.value in str(info.value)


def test_every_state_event_pair_is_either_defined_or_refused():
    """The machine is total: each pair returns a valid status or raises InvalidTransition."""
    for state, kind in itertools.product(JobState, EventKind):
        try:
            new, acts = transition(JobStatus(state=state), ev(kind, progress=0.5))
        except InvalidTransition:
            continue
        assert isinstance(new.state, JobState)
        assert all(isinstance(a, Action) for a in acts)
        if state.terminal:
            assert new == JobStatus(state=state) and acts == []
        assert 0.0 <= new.progress <= 1.0
