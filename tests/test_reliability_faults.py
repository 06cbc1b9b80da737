"""Faults with real processes: the database going away, the service killed mid-job.

- The catalog database (PostgreSQL) becomes unreachable while ``sitiancal
  serve`` runs: a TCP proxy on loopback between them is stopped (every
  connection dropped, new ones refused) and restarted. Requests meanwhile get
  ``503`` with ``Retry-After`` and no traceback; afterwards the service
  answers again by itself, without a restart.
- The service process is killed with SIGKILL while a job runs, then started
  again on the same data: the job is requeued and finishes (or fails with a
  reason), and nothing stays ``running``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from test_api_support import OP, OP_TOKEN, wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpProxy:
    """A loopback TCP proxy that can be stopped (dropping every connection) and restarted."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone would not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _serve(data: Path, port: int, **env: str) -> tuple[subprocess.Popen, str]:
    log = open(data.parent / f"serve-{port}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sitiancal.service.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(data), "--log-level", "warning"],
        env={**os.environ, "SITIANCAL_OPERATOR_TOKENS": OP_TOKEN, **env},
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError((data.parent / f"serve-{port}.log").read_text())
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=120, interval=0.2)
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.postgres
def test_database_unreachable_gives_503_and_the_service_recovers(tmp_path, postgres_schema_url):
    url = make_url(postgres_schema_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    db_url = url.set(port=proxy.port).render_as_string(hide_password=False)
    data = tmp_path / "data"
    data.mkdir()
    proc, base = _serve(data, _free_port(), SITIANCAL_DATABASE_URL=db_url)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            r = client.post("/v1/datasets", json={"camera": "DBT", "source": None}, headers=OP)
            assert r.status_code == 201, r.text
            did = r.json()["id"]
            assert client.get(f"/v1/datasets/{did}").status_code == 200
            proxy.stop()
            outage = time.monotonic()
            seen = []
            for _ in range(3):
                for method, path, kw in (
                        ("GET", f"/v1/datasets/{did}", {}), ("GET", "/v1/products", {}),
                        ("GET", "/v1/cameras/DBT/best/gain", {}),
                        ("POST", "/v1/datasets", {"json": {"camera": "DBT", "source": None},
                                                  "headers": OP})):
                    r = client.request(method, path, **kw)
                    seen.append((path, r.status_code))
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    assert int(r.headers["retry-after"]) >= 1
                    assert "unreachable" in r.json()["detail"]
                    assert "Traceback" not in r.text and "psycopg" not in r.text
                    assert str(proxy.port) not in r.text  # no database URL in the answer
            health = client.get("/healthz")
            assert health.status_code == 503, health.text
            assert time.monotonic() - outage < 60, "requests hung while the database was down"
            proxy.start()  # the database is back: no restart of the service
            wait_for(lambda: client.get(f"/v1/datasets/{did}").status_code == 200, timeout=30,
                     interval=0.2)
            r = client.post("/v1/datasets", json={"camera": "DBT", "source": None}, headers=OP)
            assert r.status_code == 201, r.text
            assert client.get("/healthz").status_code == 200
            ids = [d["id"] for d in client.get("/v1/datasets").json()["datasets"]]
            assert did in ids and len(ids) == 2  # the refused write left nothing
        assert proc.poll() is None
    finally:
        _stop(proc)
        proxy.stop()


def test_service_killed_mid_job_recovers_the_job(tmp_path):
    from simdata import small_dataset

    sim, _truth = small_dataset(tmp_path / "roots")
    data = tmp_path / "data"
    data.mkdir()
    env = {"SITIANCAL_INPUT_ROOTS": str(Path(sim).parent.resolve())}
    proc, base = _serve(data, _free_port(), **env)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            r = client.post("/v1/datasets", json={"camera": "KILL", "source": str(sim)},
                            headers=OP)
            assert r.status_code == 201, r.text
            r = client.post("/v1/jobs", json={"camera": "KILL", "dataset": r.json()["id"]},
                            headers=OP)
            assert r.status_code == 202, r.text
            job = r.json()["id"]
            wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["state"] != "queued",
                     timeout=60, interval=0.05)
            state = client.get(f"/v1/jobs/{job}").json()["state"]
        proc.send_signal(signal.SIGKILL)  # no shutdown code runs
        proc.wait(30)
        if state != "running":
            pytest.fail(f"the job was {state} before the kill: the test needs a longer job")
        proc, base = _serve(data, _free_port(), **env)
        with httpx.Client(base_url=base, timeout=60) as client:
            done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job}").json())["state"] in (
                "succeeded", "failed") and j, timeout=300, interval=0.5)
            assert done["state"] == "succeeded" or done["error"], done
            running = client.get("/v1/jobs", params={"state": "running"}).json()["jobs"]
            assert running == []
            if done["state"] == "succeeded":
                products = done["products"]
                assert products
                listed = client.get("/v1/products", params={"camera": "KILL"}).json()
                # one version per type: the killed attempt left no duplicate or partial one
                types = [p["type"] for p in listed["products"]]
                assert len(types) == len(set(types)), types
                for pid in products:
                    r = client.get(f"/v1/products/{pid}/fits")
                    assert r.status_code == 200
    finally:
        _stop(proc)
    staging = list((data / "store").glob("staging/*")) if (data / "store").exists() else []
    assert staging == [], staging
