"""HTTP load generator for the read-path load test, run as its own process.

``python loadgen.py SPEC.json`` reads a load specification, drives the
service over loopback with ``n_clients`` keep-alive connections (one per
simulated pipeline process, aiohttp on uvloop when installed) and prints one
JSON object of figures on stdout. Running it in a process of its own keeps
its CPU out of the measured service process and out of the pytest process.

Load models (``model`` in the specification):

``open``
    Open loop: each client has its own Poisson schedule of requests (mean
    rate ``rate_per_s / n_clients``) and sends each one at its scheduled
    time, or as soon as its previous answer is in if that came late (one
    request at a time per pipeline). Latency is counted from the scheduled
    time, so a slow answer also counts against the requests queued behind
    it (no coordinated omission). The offered load is ``rate_per_s`` whatever
    the service does.
``saturation``
    Closed loop without pauses: every client has a request outstanding at
    all times, so the service runs flat out; the latency is then the queue
    (mean latency = ``n_clients`` / throughput, Little's law).

Specification keys: ``url``, ``model``, ``n_clients``, ``duration_s`` (time
the clients keep sending; requests in flight are completed), ``rate_per_s``
(open loop), ``headers`` and ``targets``: a list of ``{"path", "check",
"expect"}``, one picked at random per request; ``check`` is ``"json"`` (the
JSON body's ``expect`` keys must have these values) or ``"sha256"`` (the
body's sha256 and the ETag must both equal ``expect``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from typing import Any

import aiohttp

#: Latency (s) after which a request counts as an error (the client gives up).
REQUEST_TIMEOUT_S = 30.0


def _check(target: dict[str, Any], status: int, headers: Any, body: bytes) -> str | None:
    """Why a response is wrong, or None when it is the expected one."""
    if status != 200:
        return f"{target['path']}: HTTP {status} {body[:120]!r}"
    expect = target["expect"]
    if target["check"] == "json":
        got = json.loads(body)
        wrong = {k: got.get(k) for k, v in expect.items() if got.get(k) != v}
        return f"{target['path']}: got {wrong}, expected {expect}" if wrong else None
    digest = hashlib.sha256(body).hexdigest()
    etag = headers.get("etag", "").strip('"')
    if digest != expect or etag != expect:
        return f"{target['path']}: sha256 {digest} etag {etag}, expected {expect}"
    return None


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Drive the service as ``spec`` says; the figures (latencies in ms, rates per s).

    Returns
    -------
    dict
        ``requests``, ``errors`` (count), ``error_samples`` (up to 10 reasons),
        ``wall_s``, ``rps``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``,
        ``mb_per_s`` (response bodies, 10**6 bytes per second),
        ``client_cpu_s`` (CPU time of this generator process), and for the open
        loop ``lag_p99_ms``/``lag_max_ms``: how late the generator itself woke
        up to send (its own share of the latencies, when the machine is busy).
    """
    n_clients = int(spec["n_clients"])
    if spec["model"] not in ("open", "saturation"):
        raise ValueError(f"unknown load model {spec['model']!r}")
    rate = float(spec["rate_per_s"]) / n_clients if spec["model"] == "open" else 0.0
    targets = spec["targets"]
    latencies: list[float] = []
    lags: list[float] = []  # open loop: how late the generator woke up for a request (s)
    errors: list[str] = []
    received = 0
    connector = aiohttp.TCPConnector(limit=n_clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(spec["url"], connector=connector, timeout=timeout,
                                     headers=spec.get("headers") or {}) as session:
        # open every connection first, so connection set-up is not measured as latency
        # (a failure there is an error like any other)
        await asyncio.gather(*(_one(session, targets[0], [], errors)
                               for _ in range(n_clients)))
        start = time.perf_counter()
        stop = start + float(spec["duration_s"])

        async def client(i: int) -> None:
            nonlocal received
            rng = random.Random(i)
            due = start
            while True:
                if rate:
                    due += rng.expovariate(rate)
                    if due >= stop:
                        break
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        lags.append(max(0.0, time.perf_counter() - due))
                elif time.perf_counter() >= stop:
                    break
                n_bytes = await _one(session, rng.choice(targets), latencies, errors,
                                     due if rate else None)
                received += n_bytes

        await asyncio.gather(*(client(i) for i in range(n_clients)))
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    lags.sort()

    def pct(q: float, values: list[float] = lat) -> float:
        return 1e3 * values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    return {"model": spec["model"], "n_clients": n_clients, "offered_per_s": rate * n_clients,
            "requests": len(lat), "errors": len(errors), "error_samples": errors[:10],
            "wall_s": wall, "rps": len(lat) / wall, "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "max_ms": 1e3 * lat[-1] if lat else float("nan"),
            "mb_per_s": received / wall / 1e6, "client_cpu_s": time.process_time(),
            "lag_p99_ms": pct(0.99, lags), "lag_max_ms": 1e3 * lags[-1] if lags else 0.0}


async def _one(session: aiohttp.ClientSession, target: dict[str, Any], latencies: list[float],
               errors: list[str], due: float | None = None) -> int:
    """Send one request, record its latency (s, from ``due`` if given) or error; body bytes."""
    t0 = time.perf_counter() if due is None else min(due, time.perf_counter())
    try:
        async with session.get(target["path"]) as r:
            body = await r.read()
        latencies.append(time.perf_counter() - t0)
        wrong = _check(target, r.status, r.headers, body)
    except (aiohttp.ClientError, TimeoutError) as exc:
        latencies.append(time.perf_counter() - t0)
        wrong = f"{target['path']}: {exc!r}"
        body = b""
    if wrong is not None:
        errors.append(wrong)
    return len(body)


def main() -> None:
    """Entry point: ``python loadgen.py SPEC.json`` prints the figures as JSON."""
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        import uvloop
    except ImportError:
        figures = asyncio.run(run(spec))
    else:
        figures = uvloop.run(run(spec))
    json.dump(figures, sys.stdout)


if __name__ == "__main__":
    main()
