"""Jobs over HTTP with the real runner and injected job functions (no cluster)."""

from __future__ import annotations

import threading
import time
import types

import pytest
from distributed import KilledWorker
from test_api_support import (
    OP,
    BlockingJob,
    TestClient,
    instant_job,
    make_settings,
    publish_product,
    wait_for,
    write_frame,
)

from sitiancal.api.app import create_app


def _dataset(tmp, client, camera="MST3", name="set"):
    folder = tmp / "roots" / f"{camera}-{name}"
    for i in range(3):
        write_frame(folder / f"bias{i}.fits", "bias", 0.0, seed=i)
    for i, t in enumerate((1.0, 2.0, 4.0)):
        write_frame(folder / f"flat{i}.fits", "flat", t, seed=10 + i, level=5000.0 * t)
    r = client.post("/v1/datasets", json={"camera": camera, "source": str(folder)}, headers=OP)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _submit(client, camera, dataset, headers=None, **body):
    return client.post("/v1/jobs", json={"camera": camera, "dataset": dataset, **body},
                       headers={**OP, **(headers or {})})


def _job(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def _state_is(client, job_id, *states):
    job = _job(client, job_id)
    return job if job["state"] in states else None


@pytest.fixture
def app_with(tmp_path):
    """Start an app with a given job function; yields a factory."""
    stack = []

    def start(job_function, max_attempts=None, **settings):
        app = create_app(make_settings(tmp_path, **settings), job_function=job_function,
                         use_dask=False, max_attempts=max_attempts)
        client = TestClient(app)
        client.__enter__()
        stack.append(client)
        return client

    yield start
    for client in reversed(stack):
        client.__exit__(None, None, None)


def test_submit_poll_and_defaults(tmp_path, app_with):
    job_fn = BlockingJob(result=[])
    client = app_with(job_fn)
    ds = _dataset(tmp_path, client)
    r = _submit(client, "MST3", ds)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    # products default to what the dataset supports: bias + 3 flat levels, no darks
    assert job["requested"] == ["bias", "read_noise", "ptc", "gain", "linearity", "flat",
                                "mask"]
    assert job_fn.started.wait(10)
    running = wait_for(lambda: (j := _job(client, job["id"]))["stage"] == "tiles" and j)
    assert running["state"] == "running"
    assert running["progress"] == 0.5  # persisted while the job runs
    assert running["started"] is not None and running["finished"] is None
    job_fn.release.set()
    done = wait_for(lambda: _state_is(client, job["id"], "succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["progress"] == 1.0 and done["finished"] >= done["started"]
    assert job_fn.threads[0].startswith("sitiancal-job")  # never on the event loop thread
    listed = client.get("/v1/jobs", params={"camera": "MST3", "state": "succeeded"}).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    metrics = client.get("/metrics").text
    assert 'sitiancal_jobs{state="succeeded"} 1' in metrics
    assert 'sitiancal_job_duration_seconds_count{state="succeeded"} 1' in metrics


def test_failure_keeps_the_message(tmp_path, app_with):
    job_fn = BlockingJob(error=ValueError("no flat frames above 70% of saturation"))
    client = app_with(job_fn)
    ds = _dataset(tmp_path, client)
    job = _submit(client, "MST3", ds, products=["gain"]).json()
    job_fn.release.set()
    done = wait_for(lambda: _state_is(client, job["id"], "failed", "succeeded"))
    assert done["state"] == "failed"
    assert done["error"] == "no flat frames above 70% of saturation"
    assert done["products"] == []


def test_cancel_running_and_queued_jobs(tmp_path, app_with):
    job_fn = BlockingJob(result=["never"])
    client = app_with(job_fn, max_concurrent_jobs=1)
    ds = _dataset(tmp_path, client)
    first = _submit(client, "MST3", ds).json()
    assert job_fn.started.wait(10)
    second = _submit(client, "MST3", ds, force=True).json()
    assert _job(client, second["id"])["state"] == "queued"  # one job at a time
    r = client.delete(f"/v1/jobs/{second['id']}", headers=OP)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.delete(f"/v1/jobs/{first['id']}", headers=OP)
    assert r.status_code == 202
    # the job polls every 10 ms: it may already have stopped when the reply is
    # built (the 202 follows the state the request found, the body the state now)
    body = r.json()
    if body["state"] == "running":
        assert body["message"] == "cancellation requested"
    else:
        assert body["state"] == "cancelled", body
    done = wait_for(lambda: _state_is(client, first["id"], "cancelled", "succeeded", "failed"))
    assert done["state"] == "cancelled"
    assert done["products"] == [] and done["error"] is None
    assert job_fn.saw_cancel == [first["id"]]
    time.sleep(0.2)
    assert job_fn.calls == [first["id"]]  # the cancelled queued job never started
    r = client.delete(f"/v1/jobs/{first['id']}", headers=OP)
    assert r.status_code == 409
    assert "nothing to cancel" in r.json()["detail"]
    assert client.delete("/v1/jobs/unknown", headers=OP).status_code == 404
    audit = client.app.state.sitiancal.catalog.audit_log(entity="job", entity_id=second["id"])
    assert audit[-1].actor.startswith("operator token:")


def test_idempotency_key(tmp_path, app_with):
    client = app_with(instant_job)
    ds = _dataset(tmp_path, client)
    key = {"Idempotency-Key": "mst3-2026-03-14"}
    a = _submit(client, "MST3", ds, headers=key, products=["bias"])
    b = _submit(client, "MST3", ds, headers=key, products=["bias"])
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    wait_for(lambda: _state_is(client, a.json()["id"], "succeeded"))
    c = _submit(client, "MST3", ds, headers=key, products=["bias"])
    assert c.json()["id"] == a.json()["id"] and c.json()["state"] == "succeeded"
    d = _submit(client, "MST3", ds, headers=key, products=["flat"])
    assert d.status_code == 409
    assert "different request" in d.json()["detail"]
    e = _submit(client, "MST3", ds, products=["bias"])
    assert e.json()["id"] != a.json()["id"]
    assert len(client.get("/v1/jobs").json()["jobs"]) == 2


def test_jobs_of_several_cameras_run_at_once_within_the_limit(tmp_path, app_with):
    job_fn = BlockingJob()
    client = app_with(job_fn, max_concurrent_jobs=2)
    jobs = [_submit(client, cam, _dataset(tmp_path, client, cam)).json()
            for cam in ("MST1", "MST2", "MST3")]
    wait_for(lambda: len(job_fn.calls) == 2)
    time.sleep(0.2)
    states = sorted(_job(client, j["id"])["state"] for j in jobs)
    assert states == ["queued", "running", "running"]
    assert job_fn.max_active == 2
    job_fn.release.set()
    for j in jobs:
        wait_for(lambda j=j: _state_is(client, j["id"], "succeeded"))
    assert job_fn.max_active == 2
    assert sorted(job_fn.calls) == sorted(j["id"] for j in jobs)


def test_lost_worker_requeues_the_job(tmp_path, app_with):
    attempts = []

    def flaky(**kw):
        attempts.append(kw["job_id"])
        if len(attempts) == 1:
            worker = types.SimpleNamespace(address="tcp://127.0.0.1:1234")
            raise KilledWorker("tile-3", worker, 3)
        return []

    client = app_with(flaky)
    job = _submit(client, "MST3", _dataset(tmp_path, client), products=["bias"]).json()
    done = wait_for(lambda: _state_is(client, job["id"], "succeeded", "failed"))
    assert done["state"] == "succeeded"
    assert len(attempts) == 2
    assert done["message"] == "attempt 2 of 3"


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"products": ["bias", "sky"]}, 422, "body.products.1"),
    ({"products": []}, 422, "body.products"),
    ({"params": {"clip_sigma": "lots"}}, 422, "clip_sigma"),
    ({"params": {"nope": 1}}, 422, "unknown job parameter(s): nope"),
    ({"force": "maybe"}, 422, "body.force"),
    ({"extra": 1}, 422, "body.extra: Extra inputs are not permitted"),
])
def test_bad_job_requests(tmp_path, app_with, body, status, words):
    client = app_with(instant_job)
    ds = _dataset(tmp_path, client)
    r = _submit(client, "MST3", ds, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_job_references_are_checked(tmp_path, app_with):
    client = app_with(instant_job)
    ds = _dataset(tmp_path, client)
    r = _submit(client, "OTHER", ds)
    assert r.status_code == 422 and "belongs to camera MST3" in r.json()["detail"]
    r = _submit(client, "MST3", "f" * 32)
    assert r.status_code == 404 and "unknown dataset" in r.json()["detail"]
    empty = client.post("/v1/datasets", json={"camera": "MST3", "source": None},
                        headers=OP).json()["id"]
    r = _submit(client, "MST3", empty)
    assert r.status_code == 422 and "supports no product" in r.json()["detail"]
    r = client.get("/v1/jobs", params={"state": "sleeping"})
    assert r.status_code == 422 and "query.state" in r.json()["detail"]
    r = client.get("/v1/jobs", params={"limit": "-1"})
    assert r.status_code == 422


def test_restart_requeues_the_running_job(tmp_path):
    blocked = BlockingJob()
    settings = make_settings(tmp_path, max_concurrent_jobs=1)
    with TestClient(create_app(settings, job_function=blocked, use_dask=False)) as client:
        ds = _dataset(tmp_path, client)
        job = _submit(client, "MST3", ds, products=["bias"]).json()
        queued = _submit(client, "MST3", ds, products=["flat"]).json()
        assert blocked.started.wait(10)
        wait_for(lambda: _state_is(client, job["id"], "running"))
    # the service stopped under a running job: its record still says so
    assert blocked.saw_cancel == [job["id"]]
    ran = []
    release = threading.Event()

    def second_life(**kw):
        ran.append(kw["job_id"])
        release.wait(10)
        return []

    with TestClient(create_app(settings, job_function=second_life, use_dask=False)) as client:
        runner = client.app.state.sitiancal.runner
        assert runner.recovered == {job["id"]: "queued", queued["id"]: "queued"}
        first = wait_for(lambda: _state_is(client, job["id"], "running"))
        assert first["message"] == "attempt 2 of 3"
        release.set()
        for j in (job, queued):
            wait_for(lambda j=j: _state_is(client, j["id"], "succeeded"))
        assert sorted(ran) == sorted([job["id"], queued["id"]])
        audit = runner.catalog.audit_log(entity="job", entity_id=job["id"], action="job.state")
        assert [e.details["to"] for e in audit] == ["running", "queued", "running",
                                                    "succeeded"]
        assert "service restarted" in audit[1].reason


def test_restart_fails_a_job_after_its_last_attempt(tmp_path):
    settings = make_settings(tmp_path)
    blocked = BlockingJob()
    with TestClient(create_app(settings, job_function=blocked, use_dask=False,
                               max_attempts=1)) as client:
        ds = _dataset(tmp_path, client)
        job = _submit(client, "MST3", ds, products=["bias"]).json()
        assert blocked.started.wait(10)
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False,
                               max_attempts=1)) as client:
        done = _job(client, job["id"])
        assert done["state"] == "failed"
        assert done["error"] == ("the service restarted while the job was running; "
                                 "gave up after 1 attempt(s)")


def test_restart_finishes_a_pending_cancellation(tmp_path):
    settings = make_settings(tmp_path)
    stubborn = threading.Event()

    def ignores_cancel(**kw):  # never checks cancelled(): keeps running until shutdown
        stubborn.set()
        time.sleep(0.5)
        return []

    with TestClient(create_app(settings, job_function=ignores_cancel,
                               use_dask=False)) as client:
        ds = _dataset(tmp_path, client)
        job = _submit(client, "MST3", ds, products=["bias"]).json()
        assert stubborn.wait(10)
        wait_for(lambda: _state_is(client, job["id"], "running"))
        runner = client.app.state.sitiancal.runner
        runner._stopping = True  # simulate a crash right after the cancel request
        client.delete(f"/v1/jobs/{job['id']}", headers=OP)
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        done = _job(client, job["id"])
        assert done["state"] == "cancelled"
        assert done["products"] == []


_TASK_STARTS: list[int] = []


def _slow_task(i: int) -> int:
    _TASK_STARTS.append(i)
    time.sleep(0.5)
    return i


def test_cancel_of_a_running_job_that_stops_before_the_reply_is_202(tmp_path, app_with,
                                                                    monkeypatch):
    """A running job that ends ``cancelled`` before the reply is built is still a 202."""
    job_fn = BlockingJob(result=["never"])
    client = app_with(job_fn)
    runner = client.app.state.sitiancal.runner
    job = _submit(client, "MST3", _dataset(tmp_path, client)).json()
    assert job_fn.started.wait(10)
    wait_for(lambda: _state_is(client, job["id"], "running"))
    cancel = runner.cancel

    def cancel_and_wait_until_stopped(job_id, actor):
        cancel(job_id, actor=actor)
        return wait_for(lambda: _state_is_final(runner.catalog.get_job(job_id)))

    monkeypatch.setattr(runner, "cancel", cancel_and_wait_until_stopped)
    r = client.delete(f"/v1/jobs/{job['id']}", headers=OP)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "cancelled" and r.json()["products"] == []
    assert job_fn.saw_cancel == [job["id"]]


def _state_is_final(job):
    return job if job.state in ("cancelled", "failed", "succeeded") else None


def test_cancel_stops_the_jobs_dask_work(tmp_path):
    """Cancelling cancels the futures the job submitted: pending tasks never run."""
    import dask

    outcome: dict[str, object] = {}
    submitted = threading.Event()

    def dask_job(*, client, cancelled, progress, **kw):
        tasks = [dask.delayed(_slow_task, pure=False)(i) for i in range(12)]
        futures = client.compute(tasks)
        submitted.set()
        t0 = time.monotonic()
        try:
            client.gather(futures)
        except BaseException as exc:
            outcome["error"], outcome["after"] = type(exc).__name__, time.monotonic() - t0
            raise
        return []

    _TASK_STARTS.clear()
    settings = make_settings(tmp_path, n_workers=1, threads_per_worker=2)
    with TestClient(create_app(settings, job_function=dask_job)) as client:
        job = _submit(client, "MST3", _dataset(tmp_path, client), products=["bias"]).json()
        assert submitted.wait(30)
        wait_for(lambda: _TASK_STARTS)
        t0 = time.monotonic()
        r = client.delete(f"/v1/jobs/{job['id']}", headers=OP)
        # the job was running when asked: 202, even when it stopped before the reply
        assert r.status_code == 202, r.text
        assert r.json()["state"] in ("running", "cancelled")
        done = wait_for(lambda: _state_is(client, job["id"], "cancelled", "failed",
                                          "succeeded"))
        stopped_in = time.monotonic() - t0
        assert done["state"] == "cancelled"
        assert outcome["error"] == "FutureCancelledError"
        assert stopped_in < 1.0  # without the cancellation gather would wait ~3 s
        time.sleep(1.0)  # the tasks that were running finish; the rest never start
        assert len(_TASK_STARTS) <= 4, _TASK_STARTS


class _DeadScheduler:
    """A dask client whose scheduler does not answer."""

    def scheduler_info(self):
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:8786")


def test_healthz_reports_unreachable_dependencies(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, job_function=instant_job,
                               dask_client=_DeadScheduler())) as client:
        r = client.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "error" and body["database"]["status"] == "ok"
        assert body["dask"] == {"status": "error", "detail": "OSError: Timed out trying to "
                                "connect to tcp://127.0.0.1:8786"}

        def broken(catalog):
            raise ConnectionError("database is down")

        monkeypatch.setattr("sitiancal.api.routers.health._ping", broken)
        body = client.get("/healthz").json()
        assert body["database"] == {"status": "error",
                                    "detail": "ConnectionError: database is down"}


def test_a_full_queue_refuses_submissions_with_503(tmp_path, app_with):
    job_fn = BlockingJob()
    client = app_with(job_fn, max_concurrent_jobs=1)
    client.app.state.sitiancal.runner.max_queued = 1
    ds = _dataset(tmp_path, client)
    first = _submit(client, "MST3", ds, products=["bias"]).json()
    assert job_fn.started.wait(10)
    assert _submit(client, "MST3", ds, products=["flat"]).status_code == 202
    r = _submit(client, "MST3", ds, products=["mask"])
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert "queue is full" in r.json()["detail"]
    job_fn.release.set()
    wait_for(lambda: _state_is(client, first["id"], "succeeded"))
    assert len(client.get("/v1/jobs").json()["jobs"]) == 2  # the refused one left no record


def test_a_failed_job_leaves_no_candidate_published(tmp_path, app_with):
    """A job that publishes some products and then fails has them retracted."""

    def half_done(*, catalog, store, job_id, **kw):
        publish_product(catalog, store, type="bias", seed=7, job_id=job_id)
        raise RuntimeError("the store went away while publishing gain")

    client = app_with(half_done)
    job = _submit(client, "MST3", _dataset(tmp_path, client), products=["bias"]).json()
    done = wait_for(lambda: _state_is(client, job["id"], "failed", "succeeded"))
    assert done["state"] == "failed"
    assert done["error"] == "RuntimeError: the store went away while publishing gain"
    [product] = client.get("/v1/products", params={"camera": "MST3"}).json()["products"]
    assert product["job"] == job["id"] and product["state"] == "retracted"
    r = client.get("/v1/cameras/MST3/best/bias", params={"state": "candidate"})
    assert r.status_code == 404
