"""Bounded load test of the pipeline read path on loopback, against a real ``sitiancal serve``.

Processes: a dask scheduler (``dask scheduler``, the production layout), the
service (``sitiancal serve``: uvicorn, one worker, connected to that
scheduler) over a catalog of certified products, and the load generator
(``tests/loadgen.py``, aiohttp on uvloop) in a third process, so neither the
generator nor pytest takes CPU from the service process. All share the
machine's cores: the figures are those of the service and its clients on
one 2-core machine.

Load models (each simulated client is one pipeline process with its own
keep-alive connection, sending one request at a time):

- ``pipelines`` (open loop): 200 clients, each with its own Poisson schedule,
  800 lookups/s in all; a request whose time has come while the client still
  waits for its previous answer is sent late and its latency counts from its
  scheduled time, so queueing is measured, not hidden. 60 telescopes taking
  an exposure every 10 s or more and looking up at most 8 products per
  exposure make at most 48 lookups/s: this model is that fleet about 16
  times over. Enforced: no error, every answer the right version, p99
  latency under 50 ms.
- ``saturation`` (closed loop): the same 200 clients back to back (no
  pause). The service runs flat out; latency is then queueing (mean = 200 /
  throughput, Little's law), so the figure that matters is the throughput,
  with no error.
- FITS downloads: 50 clients back to back, body sha256 and ETag checked.

During the lookups the dask scheduler must see no task at all: product
lookups never touch the cluster. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request
from test_api_support import (
    OP,
    OP_TOKEN,
    READER,
    READER_TOKEN,
    TestClient,
    instant_job,
    make_settings,
    publish_product,
    wait_for,
)

from sitiancal.api import deps
from sitiancal.api.app import create_app
from sitiancal.api.bestcache import BestCache
from sitiancal.api.routers.products import render_product
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductStore

CLIENTS = 200
#: Lookups per second offered by the 200 pipelines (open loop).
PIPELINE_RATE = 800.0
LOOKUP_P99_TARGET_MS = 50.0
#: A wake-up of the open-loop generator this late (ms) means it was starved of CPU.
GENERATOR_STALL_MS = 20.0
TYPES = ("gain", "bias", "dark", "flat")
LOADGEN = Path(__file__).with_name("loadgen.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the fast path of cached lookups answers exactly as the route ---------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fastpath")
    settings = make_settings(tmp, reader_tokens=[READER_TOKEN])
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        state = client.app.state.sitiancal
        versions = []
        for month in (1, 2):
            p = publish_product(state.catalog, state.store, seed=month)
            state.catalog.certify(p.id, datetime(2026, month, 1, tzinfo=UTC), actor="test")
            versions.append(p)
        routed: list[str] = []

        async def spy(request: Request) -> Catalog:  # the route's catalog dependency, recording each use
            routed.append(str(request.url))
            return request.app.state.sitiancal.catalog

        client.app.dependency_overrides[deps._catalog] = spy
        # the first lookup of a series loads it into the cache, through the route
        assert client.get("/v1/cameras/MST3/best/gain", headers=READER).status_code == 200
        assert len(routed) == 1
        yield {"client": client, "catalog": state.catalog, "versions": versions,
               "routed": routed}


@pytest.mark.parametrize(("query", "version"), [
    ("at=2026-01-15T00:00:00Z", 1), ("at=2026-01-15T00%3A00%3A00Z", 1),
    ("at=2026-01-31T23:59:59.999999", 1), ("at=2026-02-01T00:00:00.000001Z", 2),
    ("at=2026-02-01T01:29:59%2B01:30", 1), ("at=2026-01-31T23:00:00-01:00", 2),
    ("at=2026-03-01T12:00:00.5%2B00:00", 2), ("", 2)])
def test_cached_lookup_answers_as_the_route(api, query, version):
    client, catalog = api["client"], api["catalog"]
    url = f"/v1/cameras/MST3/best/gain?{query}"
    api["routed"].clear()
    fast = client.get(url, headers=READER)
    assert fast.status_code == 200
    assert api["routed"] == []  # answered before routing: no dependency, no catalog
    routed = client.get(f"{url}&state=certified" if query else f"{url}?state=certified",
                        headers=READER)
    assert len(api["routed"]) == 1
    assert routed.status_code == 200
    assert fast.content == routed.content
    assert fast.headers["content-type"] == routed.headers["content-type"]
    expected = api["versions"][version - 1]
    assert fast.json()["id"] == expected.id
    assert fast.content == render_product(catalog.get_product(expected.id))


@pytest.mark.parametrize(("query", "headers", "status"), [
    ("at=2026-01-15T00:00:00Z", {}, 401),  # reader tokens are configured
    ("at=2026-01-15T00:00:00Z", {"Authorization": "Bearer wrong"}, 401),
    ("at=2026-01-15T00:00:00Z", {"Authorization": "Basic abc"}, 401),
    ("at=yesterday", READER, 422),
    ("at=2026-02-30T00:00:00Z", READER, 422),
    ("at=2026-01-15T00:00:00+01:00", READER, 422),  # '+' decodes to a space
    ("at=2025-06-01T00:00:00Z", READER, 404),  # before the first certified range
    ("at=2026-01-15T00:00:00Z&as_of=2025-01-01T00:00:00Z", READER, 404),
])
def test_lookups_the_cache_cannot_answer_go_to_the_route(api, query, headers, status):
    api["routed"].clear()
    r = api["client"].get(f"/v1/cameras/MST3/best/gain?{query}", headers=headers)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert len(api["routed"]) == 1  # the route answered


def test_cached_lookups_follow_certify_and_retract(api):
    client, catalog, (_, v2) = api["client"], api["catalog"], api["versions"]
    state = client.app.state.sitiancal
    url = "/v1/cameras/MST3/best/gain?at=2026-03-15T00:00:00Z"
    assert client.get(url, headers=READER).json()["id"] == v2.id
    v3 = publish_product(state.catalog, state.store, seed=3)
    r = client.post(f"/v1/products/{v3.id}/certify",
                    json={"valid_from": "2026-03-01T00:00:00Z"}, headers=OP)
    assert r.status_code == 200, r.text
    assert client.get(url, headers=READER).json()["id"] == v3.id  # no stale v2
    r = client.post(f"/v1/products/{v3.id}/retract", json={"reason": "bad"}, headers=OP)
    assert r.status_code == 200, r.text
    r = client.get(url, headers=READER)  # v2 ends where v3 began: nothing, never v3
    assert r.status_code == 404 and "retracted" in r.json()["detail"]
    assert client.get("/v1/cameras/MST3/best/gain?at=2026-02-15T00:00:00Z",
                      headers=READER).json()["id"] == v2.id
    assert catalog.best("MST3", "gain", datetime(2026, 2, 15, tzinfo=UTC)).id == v2.id


def test_an_expired_series_is_reloaded_once_whatever_the_lookups(tmp_path):
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    store = ProductStore(tmp_path / "store")
    p = catalog.certify(publish_product(catalog, store, seed=1).id,
                        datetime(2026, 1, 1, tzinfo=UTC), actor="test")
    cache = BestCache(catalog, render_product, ttl=0.0)  # every entry expired at once
    at = datetime(2026, 2, 1, tzinfo=UTC)

    async def burst() -> list[bytes | None]:
        assert await cache.lookup("MST3", "gain", at) == render_product(p)
        assert cache.loads == 1
        # a burst of lookups in one turn of the event loop: all answered from the expired
        # entry, one reload started for them all
        bodies = [cache.peek("MST3", "gain", at) for _ in range(200)]
        assert cache.peek("MST3", "gain", datetime(2025, 1, 1, tzinfo=UTC)) is None  # no range
        assert cache.peek("MST3", "dark", at) is None  # a series not held: not loaded here
        await asyncio.to_thread(wait_for, lambda: cache.loads >= 2, 10.0)
        await asyncio.sleep(0.2)
        return bodies

    try:
        bodies = asyncio.run(burst())
    finally:
        catalog.close()
    assert bodies == [render_product(p)] * 200
    assert cache.loads == 2


# -- the real service under load ------------------------------------------------------------

def _dask_activity(client: Any) -> dict[str, int]:
    """Task transitions the scheduler has made, tasks it holds, clients and workers."""
    return client.run_on_scheduler(lambda dask_scheduler: {
        "transitions": dask_scheduler.transition_counter, "tasks": len(dask_scheduler.tasks),
        "clients": len(dask_scheduler.clients), "workers": len(dask_scheduler.workers)})


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A dask scheduler and worker, and ``sitiancal serve`` on them, each a process.

    The processes start side by side (the service's dask client waits for
    the scheduler); the catalog is filled while they import.
    """
    from distributed import Client

    root = tmp_path_factory.mktemp("load")
    data = root / "data"
    data.mkdir()
    logs = {name: open(root / f"{name}.log", "wb")  # a pipe nobody reads would block
            for name in ("scheduler", "worker", "serve")}
    dask_port, port = _free_port(), _free_port()
    address, url = f"tcp://127.0.0.1:{dask_port}", f"http://127.0.0.1:{port}"
    procs = {"scheduler": subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(dask_port), "--no-dashboard"], stdout=logs["scheduler"],
        stderr=subprocess.STDOUT)}
    try:
        procs["worker"] = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--no-nanny", "--no-dashboard", "--memory-limit", "1GB"],
            stdout=logs["worker"], stderr=subprocess.STDOUT)
        catalog = Catalog.open(f"sqlite:///{data / 'catalog.sqlite'}")
        store = ProductStore(data / "store")
        products = []
        for i, kind in enumerate(TYPES):
            for v in range(2):
                p = publish_product(catalog, store, type=kind, seed=10 * i + v,
                                    shape=(256, 256))
                catalog.certify(p.id, datetime(2026, 1 + v, 1, tzinfo=UTC), actor="load-test")
                products.append(p)
        catalog.close()
        env = {**os.environ, "SITIANCAL_OPERATOR_TOKENS": OP_TOKEN,
               "SITIANCAL_READER_TOKENS": READER_TOKEN, "SITIANCAL_SCHEDULER_ADDRESS": address}
        procs["serve"] = subprocess.Popen(
            [sys.executable, "-m", "sitiancal.service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(data), "--log-level", "warning"],
            env=env, stdout=logs["serve"], stderr=subprocess.STDOUT)

        def up() -> bool:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited: {(root / f'{name}.log').read_text()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=90, interval=0.2)
        with Client(address, timeout="30s") as dask_client:
            yield {"url": url, "products": products, "dir": root, "dask": dask_client}
    finally:
        for proc in reversed(procs.values()):
            _stop(proc)
        for log in logs.values():
            log.close()


def _lookup_targets(products: list[Any]) -> list[dict[str, Any]]:
    """Lookups over both versions of each type (v1 from January, v2 from February on)."""
    targets = []
    for p in products:
        months = (1,) if p.version == 1 else (2, 3)
        for month in months:
            for hour in (0, 7, 23):
                targets.append({"path": f"/v1/cameras/MST3/best/{p.type}"
                                        f"?at=2026-{month:02d}-15T{hour:02d}:00:00Z",
                                "check": "json",
                                "expect": {"id": p.id, "version": p.version}})
    return targets


def _load(service: dict[str, Any], name: str, **spec: Any) -> dict[str, Any]:
    """Run the load generator process with ``spec``; its figures (printed)."""
    path = service["dir"] / f"{name}.json"
    path.write_text(json.dumps({"url": service["url"], "headers": READER, **spec}))
    done = subprocess.run([sys.executable, str(LOADGEN), str(path)], capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    fig = json.loads(done.stdout)
    offered = f" ({fig['offered_per_s']:.0f}/s offered)" if fig["offered_per_s"] else ""
    lag = (f", its wake-up lag p99 {fig['lag_p99_ms']:.1f} ms, max {fig['lag_max_ms']:.1f} ms"
           if fig["offered_per_s"] else "")
    print(f"\nload {name}: {fig['n_clients']} clients, {fig['model']}{offered}: "
          f"{fig['requests']} requests in {fig['wall_s']:.1f} s, {fig['rps']:.0f} req/s, "
          f"p50 {fig['p50_ms']:.1f} ms, p90 {fig['p90_ms']:.1f} ms, p99 {fig['p99_ms']:.1f} ms, "
          f"max {fig['max_ms']:.1f} ms, {fig['mb_per_s']:.1f} MB/s, errors {fig['errors']} "
          f"(generator CPU {fig['client_cpu_s']:.1f} s{lag})")
    return fig


def test_lookups_from_200_pipelines(service):
    targets = _lookup_targets(service["products"])
    warm = _load(service, "warm-up", model="saturation", n_clients=20, duration_s=0.5,
                 targets=targets)
    assert warm["errors"] == 0, warm["error_samples"]
    before = _dask_activity(service["dask"])
    # the service's client is connected (besides ours) and the cluster has its worker
    assert before["clients"] >= 3 and before["workers"] == 1
    fig = _load(service, "lookups-pipelines", model="open", rate_per_s=PIPELINE_RATE,
                n_clients=CLIENTS, duration_s=6.0, targets=targets)
    if fig["p99_ms"] >= LOOKUP_P99_TARGET_MS and fig["lag_max_ms"] > GENERATOR_STALL_MS:
        # the generator itself was kept off the CPU (by other work on the shared machine):
        # that window measured the machine, not the service; one more window decides
        fig = _load(service, "lookups-pipelines-again", model="open",
                    rate_per_s=PIPELINE_RATE, n_clients=CLIENTS, duration_s=6.0,
                    targets=targets)
    assert fig["errors"] == 0, fig["error_samples"]
    assert fig["requests"] > 0.8 * PIPELINE_RATE * 6.0  # the offered load was served
    assert fig["p99_ms"] < LOOKUP_P99_TARGET_MS
    fig = _load(service, "lookups-saturation", model="saturation", n_clients=CLIENTS,
                duration_s=4.0, targets=targets)
    assert fig["errors"] == 0, fig["error_samples"]
    # 5 000 to 14 000/s measured on the shared 2-core machine (generator included)
    assert fig["rps"] > 1000
    after = _dask_activity(service["dask"])
    assert after["transitions"] == before["transitions"]  # not one task
    assert after["tasks"] == 0


def test_fits_downloads_from_50_clients(service):
    targets = [{"path": f"/v1/products/{p.id}/fits", "check": "sha256", "expect": p.sha256}
               for p in service["products"]]
    fig = _load(service, "fits-downloads", model="saturation", n_clients=50, duration_s=3.0,
                targets=targets)
    assert fig["errors"] == 0, fig["error_samples"]
    assert fig["requests"] > 100
