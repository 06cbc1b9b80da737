"""The service pointed at an existing dask scheduler with two worker processes (loopback).

Slow: starts a ``dask scheduler`` and two ``dask worker`` processes, then runs
the real pipeline through the HTTP API; the second test kills a worker in the
middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from simdata import small_dataset
from test_api_support import OP, TestClient, make_settings, wait_for

from sitiancal.api.app import create_app
from sitiancal.service.settings import Settings

pytestmark = pytest.mark.slow

DASK = str(Path(sys.executable).with_name("dask"))


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen([DASK, *args], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = out  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def warm_kernels(sim, tmp_path_factory):
    """The compiled kernels in numba's on-disk cache before any worker starts.

    A fresh checkout has none: each worker process would compile every kernel
    it meets during the job (minutes on a slow 2-core machine, inside the
    job's time limit, and with compiler memory against the workers' 1 GB).
    One local job on the same frames compiles them once; the workers load them.
    """
    from sitiancal.service.pipeline import calibrate

    _, source, _ = sim
    calibrate(source, "WARM", Settings(data_dir=tmp_path_factory.mktemp("warm") / "data"))


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, warm_kernels):
    """A scheduler and two single-threaded worker processes (no nanny) on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("cluster")
    sched_file = tmp / "scheduler.json"
    procs = [_spawn(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)], tmp / "scheduler.log")]
    try:
        wait_for(lambda: sched_file.exists() and sched_file.stat().st_size > 0, timeout=60,
                 interval=0.1)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(_spawn(["worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                                 "--memory-limit", "1GB"], tmp / f"worker{i}.log"))
        from distributed import Client

        with Client(address, timeout="30s", set_as_default=False) as probe:
            probe.wait_for_workers(2, timeout=60)
        yield {"address": address, "procs": procs, "tmp": tmp}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            proc.log.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    source, truth = small_dataset(tmp_path_factory.mktemp("dist"))
    return source.parent, source, truth  # cached per session: it may live elsewhere


def _run_job(client, source):
    r = client.post("/v1/datasets", json={"camera": "MST3", "source": str(source)},
                    headers=OP)
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={"camera": "MST3", "dataset": r.json()["id"]},
                    headers=OP)
    assert r.status_code == 202
    return r.json()["id"]


def _finished(client, job_id):
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in ("succeeded", "failed", "cancelled") else None


def test_service_submits_to_an_existing_scheduler(tmp_path, sim, dask_cluster, monkeypatch):
    roots, source, truth = sim
    monkeypatch.setenv("SITIANCAL_SCHEDULER_ADDRESS", dask_cluster["address"])
    settings = make_settings(tmp_path, input_roots=[str(roots)])
    assert Settings().scheduler_address == dask_cluster["address"]
    settings = settings.model_copy(update={"scheduler_address": dask_cluster["address"]})
    with TestClient(create_app(settings)) as client:
        health = client.get("/healthz").json()
        assert health["dask"] == {"status": "ok", "scheduler": dask_cluster["address"],
                                  "workers": 2}
        dask_client = client.app.state.sitiancal.runner.client
        before = dask_client.run(lambda dask_worker: dask_worker.state.transition_counter)
        job_id = _run_job(client, source)
        job = wait_for(lambda: _finished(client, job_id), timeout=300, interval=0.2)
        assert job["state"] == "succeeded", job
        assert len(job["products"]) == 8
        after = dask_client.run(lambda dask_worker: dask_worker.state.transition_counter)
        worked = [a for a in after if after[a] > before.get(a, 0) + 10]
        assert len(worked) == 2, (before, after)  # both worker processes took tasks
        gain = client.get("/v1/cameras/MST3/report").json()["figures"]["gain_conventional"]
        assert gain["value"] == pytest.approx(truth.scalars["GAINMED"], abs=4 * gain["error"])


def test_a_worker_killed_mid_job_does_not_lose_the_job(tmp_path, sim, dask_cluster):
    roots, source, _ = sim
    settings = make_settings(tmp_path, input_roots=[str(roots)],
                             scheduler_address=dask_cluster["address"])
    with TestClient(create_app(settings)) as client:
        dask_client = client.app.state.sitiancal.runner.client
        pids = dask_client.run(os.getpid)
        job_id = _run_job(client, source)

        def busy_worker():
            processing = dask_client.processing()
            return next((w for w, keys in processing.items() if keys), None)

        victim = wait_for(busy_worker, timeout=120, interval=0.01)
        os.kill(pids[victim], signal.SIGKILL)
        at_kill = client.get(f"/v1/jobs/{job_id}").json()
        assert at_kill["state"] == "running", at_kill  # killed while the job was running
        job = wait_for(lambda: _finished(client, job_id), timeout=300, interval=0.2)
        assert job["state"] == "succeeded", job
        print(f"worker killed during stage {at_kill['stage']!r} at {at_kill['progress']:.2f}; "
              f"job message: {job['message']!r}")
        assert len(job["products"]) == 8
        versions = client.get("/v1/products", params={"camera": "MST3"}).json()["products"]
        assert sorted(p["type"] for p in versions) == sorted(
            ["bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask"])
        assert {p["version"] for p in versions} == {1}  # published once each
        victim_proc = next(p for p in dask_cluster["procs"] if p.pid == pids[victim])
        assert victim_proc.wait(10) == -signal.SIGKILL
        assert len(dask_client.scheduler_info()["workers"]) == 1
