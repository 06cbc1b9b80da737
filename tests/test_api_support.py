"""Helpers shared by the HTTP API tests (this module holds no tests).

Imported by the ``test_api_*`` modules as ``from test_api_support import ...``
(``tests/`` is on ``sys.path``, as for ``simdata``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # starlette announces its move from httpx to httpx2 when httpx2 is not installed;
    # the test client works the same with httpx, which is what the venv has.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from sitiancal.service.pipeline import JobCancelled
from sitiancal.service.settings import Settings

OP_TOKEN = "op-token-0123456789"
READER_TOKEN = "reader-token-0123456789"
OP = {"Authorization": f"Bearer {OP_TOKEN}"}
READER = {"Authorization": f"Bearer {READER_TOKEN}"}

__all__ = ["OP", "OP_TOKEN", "READER", "READER_TOKEN", "BlockingJob", "TestClient",
           "instant_job", "live_server", "make_settings", "publish_product", "wait_for",
           "write_frame"]


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    """Settings of an embedded deployment under ``tmp`` with an operator token."""
    fields: dict[str, Any] = {"data_dir": tmp / "data", "operator_tokens": [OP_TOKEN],
                              "input_roots": [str(tmp / "roots")]}
    fields.update(overrides)
    (tmp / "roots").mkdir(parents=True, exist_ok=True)
    return Settings(**fields)


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        time.sleep(interval)


def instant_job(**kwargs: Any) -> list[str]:
    """A job function that succeeds at once, publishing nothing."""
    kwargs["progress"]("done", 1.0)
    return []


class BlockingJob:
    """A job function that reports progress and then waits until released or cancelled.

    Records the calls, the thread each ran on, and whether it saw the
    cancellation; ``result`` (ids) or ``error`` (an exception) decides how a
    released call ends.
    """

    def __init__(self, *, result: list[str] | None = None,
                 error: BaseException | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[str] = []
        self.threads: list[str] = []
        self.saw_cancel: list[str] = []
        self.result = result or []
        self.error = error
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, *, catalog: Any, store: Any, settings: Any, job_id: str, client: Any,
                 progress: Callable[[str, float], None],
                 cancelled: Callable[[], bool]) -> list[str]:
        with self._lock:
            self.calls.append(job_id)
            self.threads.append(threading.current_thread().name)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            progress("tiles", 0.5)
            self.started.set()
            while not self.release.wait(0.01):
                if cancelled():
                    self.saw_cancel.append(job_id)
                    raise JobCancelled("cancelled during the tile pass")
            if self.error is not None:
                raise self.error
            return list(self.result)
        finally:
            with self._lock:
                self.active -= 1


def write_frame(path: Path, kind: str, exptime: float, *, shape: tuple[int, int] = (16, 24),
                seed: int = 0, level: float = 500.0, header: dict[str, Any] | None = None
                ) -> Path:
    """A small 16-bit FITS calibration frame with the usual headers."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    data = np.clip(rng.normal(level, 3.0, shape), 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["IMAGETYP"] = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT"}[kind]
    hdu.header["EXPTIME"] = exptime
    hdu.header["CCD-TEMP"] = 0.0
    hdu.header["DATE-OBS"] = f"2026-03-14T01:{seed % 60:02d}:00"
    hdu.header["GAIN"] = 100
    hdu.header["OFFSET"] = 50
    for key, value in (header or {}).items():
        hdu.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path, overwrite=True)
    return path


def publish_product(catalog: Any, store: Any, *, camera: str = "MST3", type: str = "gain",
                    shape: tuple[int, int] = (40, 56), seed: int = 0,
                    stats: dict[str, Any] | None = None, job_id: str | None = None) -> Any:
    """Publish a small product version straight through the catalog (no pipeline)."""
    from datetime import UTC, datetime

    from sitiancal.storage.store import ProductArray, ProductPayload

    rng = np.random.default_rng(seed)
    ny, nx = shape
    values = (0.25 + 0.001 * np.arange(ny)[:, None] + 1e-5 * np.arange(nx)[None, :]
              + rng.normal(0, 1e-4, shape)).astype(np.float32)
    payload = ProductPayload(
        camera=camera, type=type,
        arrays=[ProductArray(type, values, "e-/ADU", f"per-pixel {type}"),
                ProductArray(f"{type}_err", np.full(shape, 0.003, np.float32), "e-/ADU",
                             f"uncertainty of {type}")],
        stats=stats or {"median": float(np.median(values))},
        inputs=[{"path": f"/data/{camera}/f{seed}.fits", "sha256": f"{seed:064x}"}],
        date_beg=datetime(2026, 3, 14, 1, tzinfo=UTC),
        date_end=datetime(2026, 3, 14, 2, tzinfo=UTC),
        params={"seed": seed})
    return catalog.publish_payload(store, payload, job_id=job_id).product


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on 127.0.0.1 (free port); yield its URL."""
    import uvicorn

    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=60)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
