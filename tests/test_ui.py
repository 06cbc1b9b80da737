"""The dashboard in headless Chromium against a live ``sitiancal serve`` on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import requests
from simdata import small_dataset

from sitiancal.api.routers.ui import MIN_FLEET, camera_products, robust_outliers
from sitiancal.service.pipeline import calibrate
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductArray, ProductPayload, ProductStore

CHROMIUM = "/usr/bin/chromium"
TOKEN = "ui-test-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    if not Path(CHROMIUM).exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env,
                           capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                           env=env, capture_output=True, timeout=1200)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {exc}")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed and apt-get did not provide /usr/bin/chromium")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A live service with one calibrated camera and a second one calibrated by a job
    submitted over HTTP."""
    out, _ = small_dataset(tmp_path_factory.mktemp("ui"))
    roots = tmp_path_factory.mktemp("ui_roots")
    frames = roots / "frames"
    shutil.copytree(out, frames, ignore=shutil.ignore_patterns("truth.fits"))
    data = tmp_path_factory.mktemp("ui_data")
    calibrate(frames, "MST1", Settings(data_dir=data))
    port = _free_port()
    env = {**os.environ, "SITIANCAL_OPERATOR_TOKENS": TOKEN,
           "SITIANCAL_INPUT_ROOTS": str(roots), "SITIANCAL_N_WORKERS": "1",
           "SITIANCAL_THREADS_PER_WORKER": "1"}
    log = open(data / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sitiancal.service.cli", "serve",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("service did not start: "
                                   + (data / "serve.log").read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        ds = requests.post(f"{url}/v1/datasets", headers=AUTH, timeout=30,
                           json={"camera": "MST2", "source": str(frames)})
        assert ds.status_code == 201, ds.text
        job = requests.post(f"{url}/v1/jobs", headers=AUTH, timeout=30,
                            json={"camera": "MST2", "dataset": ds.json()["id"]})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, "job did not finish"
            time.sleep(0.3)
        assert requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"] == "succeeded"
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class _Tables(HTMLParser):
    """Rows (lists of cell texts) of each table body, by the table's id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.cells_class: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._classes: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"anon{len(self.tables)}"
            self.tables.setdefault(self._table, [])
            self.cells_class.setdefault(self._table, [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row, self._classes = [], []
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._classes.append(a.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self.cells_class[self._table].append(self._classes or [])
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _chromium(binary: str, tmp: Path, url: str, *extra: str,
              budget_ms: int = 5000) -> subprocess.CompletedProcess:
    """Load ``url`` in headless Chromium; ``budget_ms``: virtual time the page runs for."""
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}",
         f"--virtual-time-budget={budget_ms}", "--window-size=1400,1300", *extra, url],
        capture_output=True, timeout=120, check=True)


def test_dashboard_fills_jobs_and_fleet_tables(service, chromium, tmp_path):
    # certify with the operator token, as the page's button does (bearer header)
    cams = requests.get(f"{service}/ui/cameras.json", timeout=10).json()["cameras"]
    gain_id = next(c for c in cams if c["camera"] == "MST1")["products"]["gain"]["latest"]["id"]
    assert requests.post(f"{service}/v1/products/{gain_id}/certify", timeout=10,
                         json={"valid_from": "2026-01-01T00:00:00Z"}).status_code == 401
    ok = requests.post(f"{service}/v1/products/{gain_id}/certify", headers=AUTH, timeout=10,
                       json={"valid_from": "2026-01-01T00:00:00Z"})
    assert ok.status_code == 200, ok.text

    dom = _chromium(chromium, tmp_path, f"{service}/", "--dump-dom").stdout.decode()
    (tmp_path / "dashboard.html").write_text(dom)
    parsed = _Tables()
    parsed.feed(dom)
    jobs = parsed.tables["jobs"]
    assert len(jobs) == 2 and {r[1] for r in jobs} == {"MST1", "MST2"}
    assert all(r[2] == "succeeded" and r[4].endswith("100%") for r in jobs)
    fleet = {r[0]: r[1:] for r in parsed.tables["fleet"]}
    assert set(fleet) == {"MST1", "MST2"}
    for values in fleet.values():
        gain, read_noise, _dark, anomalous = (float(v) for v in values)
        assert 0.1 < gain < 1 and 0.3 < read_noise < 5 and 0 < anomalous < 10
    # the camera view shows the certified version with its validity, and the report link
    text = re.sub(r"<[^>]+>", "", dom)
    assert "v1 certified [2026-01-01 00:00:00Z, open)" in text
    assert "/v1/cameras/MST1/report.html" in dom
    assert dom.count('class="trend"') >= 8  # 4 figures x 2 cameras
    assert "updated " in dom and "error:" not in dom
    # the header links to the embedded cluster's dask dashboard
    link = re.search(r'<a id="dask-link"[^>]*>', dom)
    assert link is not None and " hidden" not in link.group(0)
    dask_url = requests.get(f"{service}/ui/info.json", timeout=10).json()["dask_dashboard"]
    assert f'href="{dask_url}"' in link.group(0)
    assert re.search(r'<span id="dask-note"[^>]* hidden', dom)

    shot = tmp_path / "dashboard.png"
    _chromium(chromium, tmp_path, f"{service}/ui", f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 1300)


def test_dashboard_draws_a_view_again_only_when_its_data_changed(service, chromium, tmp_path):
    """The page polls the jobs every 3 s and the other views every fifth poll, but
    draws a view again only when its JSON changed (nothing changes here): a button
    or link under the pointer, or a selection, is not replaced under the operator."""
    dom = _chromium(chromium, tmp_path, f"{service}/", "--dump-dom", budget_ms=40_000).stdout.decode()
    polls = re.search(r'<span id="status"[^>]* data-polls="(\d+)"', dom)
    assert polls is not None and int(polls.group(1)) >= 11  # three polls of every view
    assert "error:" not in dom
    for view in ("jobs", "fleet", "cameras", "trends"):
        tag = re.search(rf'<(?:table|div) id="{view}"[^>]*>', dom)
        assert tag is not None and 'data-draws="1"' in tag.group(0), (view, tag)
    assert "/v1/cameras/MST1/report.html" in dom  # drawn once, and still there


def test_fleet_and_trends_json(service):
    fleet = requests.get(f"{service}/ui/fleet.json", timeout=10).json()
    assert [c["camera"] for c in fleet["cameras"]] == ["MST1", "MST2"]
    assert fleet["figures"]["gain"]["units"] == "e-/ADU"
    trends = requests.get(f"{service}/ui/trends.json", params={"camera": "MST1"},
                          timeout=10).json()
    assert trends["cameras"]["MST1"]["gain"][0]["version"] == 1
    assert requests.get(f"{service}/ui/trends.json", params={"camera": "NOPE"},
                        timeout=10).status_code == 404
    info = requests.get(f"{service}/ui/info.json", timeout=10).json()
    assert set(info) == {"version", "dask_dashboard", "dask_dashboard_state"}
    page = requests.get(f"{service}/ui", timeout=10).text
    assert "http://" not in page and "https://" not in page  # no CDN
    js = requests.get(f"{service}/ui/static/dashboard.js", timeout=10).text
    assert "/v1/jobs" in js and "Bearer " in js


def _assert_bokeh_dashboard(url: str) -> None:
    """``url`` is a dask dashboard page served by bokeh."""
    reply = requests.get(url, timeout=10)
    assert reply.status_code == 200, url
    assert "text/html" in reply.headers["Content-Type"]
    assert "bokeh" in reply.text.lower() and "dask" in reply.text.lower()


def test_embedded_service_links_a_working_dask_dashboard(service):
    """``sitiancal serve`` on the embedded default runs the dask dashboard on loopback
    (``SITIANCAL_DASK_DASHBOARD`` = 127.0.0.1:0, a free port) and links to it."""
    info = requests.get(f"{service}/ui/info.json", timeout=10).json()
    assert info["dask_dashboard_state"] == "running"
    url = info["dask_dashboard"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", url), url
    assert url != f"{service}/status"  # its own port, not the service's
    _assert_bokeh_dashboard(url)


@pytest.fixture(scope="module")
def dashboard_off(tmp_path_factory):
    """A live service on the embedded LocalCluster with ``SITIANCAL_DASK_DASHBOARD=off``."""
    from test_api_support import live_server, make_settings

    from sitiancal.api.app import create_app

    settings = make_settings(tmp_path_factory.mktemp("ui_off"), dask_dashboard="off",
                             n_workers=1, threads_per_worker=1)
    with live_server(create_app(settings)) as url:
        yield url


def test_dask_dashboard_off_is_reported(dashboard_off):
    health = requests.get(f"{dashboard_off}/healthz", timeout=10)
    assert health.status_code == 200, health.text  # the cluster runs, without a dashboard
    assert health.json()["dask"]["workers"] == 1
    info = requests.get(f"{dashboard_off}/ui/info.json", timeout=10).json()
    assert info["dask_dashboard"] is None and info["dask_dashboard_state"] == "disabled"


def test_dask_dashboard_off_page_says_so(dashboard_off, chromium, tmp_path):
    dom = _chromium(chromium, tmp_path, f"{dashboard_off}/ui", "--dump-dom").stdout.decode()
    note = re.search(r'<span id="dask-note"[^>]*>([^<]*)</span>', dom)
    assert note is not None and " hidden" not in note.group(0)
    assert note.group(1) == "dask dashboard: off (SITIANCAL_DASK_DASHBOARD)"
    assert re.search(r'<a id="dask-link"[^>]* hidden', dom)
    assert "updated " in dom and "error:" not in dom


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:0", "127.0.0.1:0"), (" :8787 ", ":8787"), ("8787", ":8787"),
    ("[::1]:0", "[::1]:0"), ("off", None), ("OFF", None), ("", None), ("none", None)])
def test_dask_dashboard_setting(monkeypatch, value, expected):
    monkeypatch.setenv("SITIANCAL_DASK_DASHBOARD", value)
    assert Settings().dask_dashboard == expected


@pytest.mark.parametrize("value", ["http://host:8787", "host", "host:port", "h:70000"])
def test_dask_dashboard_setting_rejects(value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="dask_dashboard"):
        Settings(dask_dashboard=value)


@pytest.fixture(scope="module")
def external_scheduler():
    """A dask scheduler on tcp loopback with its dashboard, standing in for a deployment's."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


def test_external_scheduler_dashboard_link(external_scheduler, tmp_path):
    from test_api_support import TestClient, make_settings

    from sitiancal.api.app import create_app
    from sitiancal.service.runner import dashboard_location

    address = external_scheduler.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    settings = make_settings(tmp_path / "a", scheduler_address=address)
    with TestClient(create_app(settings)) as client:
        info = client.get("/ui/info.json").json()
        runner = client.app.state.sitiancal.runner
        assert info["dask_dashboard_state"] == "running"
        assert info["dask_dashboard"] == external_scheduler.dashboard_link
        _assert_bokeh_dashboard(info["dask_dashboard"])
        # an embedded dashboard bound to every interface is probed on loopback
        port = int(info["dask_dashboard"].rsplit(":", 1)[1].split("/")[0])
        anywhere = dashboard_location(runner.client, bind="0.0.0.0:0")
        assert anywhere is not None
        assert anywhere.probe == f"http://127.0.0.1:{port}/individual-plots.json"
    # off also hides an external scheduler's dashboard
    settings = make_settings(tmp_path / "b", scheduler_address=address, dask_dashboard="off")
    with TestClient(create_app(settings)) as client:
        assert client.get("/ui/info.json").json() == {
            "version": info["version"], "dask_dashboard": None,
            "dask_dashboard_state": "disabled"}


@pytest.mark.parametrize("missing", ["dashboard", "bokeh"])
def test_external_scheduler_without_dashboard(missing, tmp_path, monkeypatch):
    """A scheduler that serves no dashboard: the page says unavailable, links nothing.
    Started without bokeh it still runs its HTTP server (``/status`` answers 200 with a
    page asking to install bokeh)."""
    import sys

    from distributed import LocalCluster
    from test_api_support import TestClient, make_settings

    from sitiancal.api.app import create_app

    address = None
    if missing == "bokeh":
        monkeypatch.setitem(sys.modules, "distributed.dashboard.scheduler", None)
        address = "127.0.0.1:0"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=address) as cluster:
        if missing == "bokeh":
            status = requests.get(cluster.dashboard_link, timeout=10)
            assert status.status_code == 200 and "bokeh" in status.text.lower()
        settings = make_settings(tmp_path, scheduler_address=cluster.scheduler_address)
        with TestClient(create_app(settings)) as client:
            info = client.get("/ui/info.json").json()
    assert info["dask_dashboard"] is None and info["dask_dashboard_state"] == "unavailable"


def test_robust_outliers_against_the_fleet():
    gains = {f"MST{i}": 0.25 + 0.002 * ((i * 7) % 5 - 2) for i in range(1, 21)}
    gains["MST7"] = 0.40
    median, sigma, outliers = robust_outliers(gains)
    assert outliers == ["MST7"] and abs(median - 0.25) < 0.003 and 0 < sigma < 0.01
    assert robust_outliers({"A": 1.0, "B": 9.0})[2] == []  # too few cameras to judge
    assert MIN_FLEET == 3


def test_camera_products_reads_both_columns_at_once(catalog_url, tmp_path):
    """A certification committed while the camera view is built shows in both columns
    or in neither: never "candidate" as the newest version and "certified" beside it."""
    catalog = Catalog.open(catalog_url)
    try:
        payload = ProductPayload(
            camera="MST9", type="bias",
            arrays=[ProductArray("bias", np.full((4, 6), 500.0, np.float32), "ADU", "map")],
            stats={"median": 500.0}, inputs=[{"path": "/d/b.fits", "sha256": "0" * 64}],
            date_beg=datetime(2026, 1, 1, tzinfo=UTC), date_end=datetime(2026, 1, 2, tzinfo=UTC),
            params={}, code_version="test")
        product = catalog.publish_payload(ProductStore(tmp_path / "store"), payload).product
        read_versions = catalog.list_products

        def certify_after_reading(*args: Any, **kwargs: Any) -> Any:
            versions = read_versions(*args, **kwargs)
            if catalog.get_product(product.id).state == "candidate":  # an operator, meanwhile
                catalog.certify(product.id, datetime(2026, 1, 1, tzinfo=UTC), actor="ui test")
            return versions

        catalog.list_products = certify_after_reading  # type: ignore[method-assign]
        before = camera_products(catalog)["cameras"][0]["products"]["bias"]
        assert before["latest"]["state"] == "candidate" and before["certified"] is None
        after = camera_products(catalog)["cameras"][0]["products"]["bias"]
        assert after["latest"]["state"] == "certified" and after["certified"] == after["latest"]
        assert after["certified"]["valid_from"].startswith("2026-01-01T00:00:00")
    finally:
        catalog.close()


# -- clicking the page's buttons over the Chrome DevTools protocol ---------------------

class _DevTools:
    """A minimal Chrome DevTools protocol client on one page's websocket (aiohttp).

    Requests are answered by id; JavaScript dialogs (``prompt``, ``alert``) are
    recorded in ``dialogs`` and answered from ``answers`` (prompt text, in
    order) while the page waits on them, as an operator would.
    """

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dialogs: list[tuple[str, str]] = []
        self.answers: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
            elif data.get("method") == "Page.javascriptDialogOpening":
                params = data["params"]
                self.dialogs.append((params["type"], params["message"]))
                text = self.answers.pop(0) if params["type"] == "prompt" else ""
                # answered from a task: the reader must keep reading to get the reply
                task = asyncio.create_task(self.send("Page.handleJavaScriptDialog",
                                                     accept=True, promptText=text))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self._ws.send_json({"id": self._next, "method": method, "params": params})
        return await asyncio.wait_for(future, 30)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                status = await self.evaluate("document.querySelector('#status')?.textContent")
                raise AssertionError(f"not true within {timeout} s (the page's status line: "
                                     f"{status!r}): {expression}")
            await asyncio.sleep(0.1)

    async def click(self, element: str) -> None:
        """A left mouse click in the middle of the element ``element`` evaluates to."""
        box = await self.evaluate(f"(() => {{ const e = {element}; e.scrollIntoView("
                                  "{block: 'center'}); const r = e.getBoundingClientRect(); "
                                  "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)

    async def click_for_dialog(self, element: str, attempts: int = 5) -> None:
        """:meth:`click` the element until the page opens a dialog (at most ``attempts`` clicks).

        The dashboard re-renders its tables when data arrive (the token's
        change event refreshes every section): a click whose press and
        release straddle a re-render, or that lands after a section above
        changed height, can reach no button. Such a click changes nothing,
        so it is repeated on the element found again.
        """
        seen = len(self.dialogs)
        for _ in range(attempts):
            await self.click(element)
            for _ in range(30):
                if len(self.dialogs) > seen:
                    return
                await asyncio.sleep(0.1)
        raise AssertionError(f"no dialog after {attempts} clicks on {element}")

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, *self._tasks, return_exceptions=True)


@contextlib.contextmanager
def _chromium_with_devtools(binary: str, profile: Path) -> Iterator[str]:
    """Headless Chromium with a DevTools port; yields its first page's websocket URL."""
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "--window-size=1400,1300", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium opened no DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: Cell texts of camera MST2's ``bias`` row of the page (null when absent).
_BIAS_ROW = ("(() => { const cam = document.querySelector('#cameras .camera[data-camera=\"MST2\"]');"
             " const row = cam && [...cam.querySelectorAll('tbody tr')].find("
             "(r) => r.cells[0].textContent === 'bias');"
             " return row ? [...row.cells].map((c) => c.textContent) : null; })()")


def _bias_button(label: str) -> str:
    return ("[...document.querySelector('#cameras .camera[data-camera=\"MST2\"]')"
            ".querySelectorAll('tbody tr')].find((r) => r.cells[0].textContent === 'bias')"
            f".cells[3].querySelector('button:{'first' if label == 'certify' else 'last'}"
            f"-of-type')")


async def _certify_and_retract_on_the_page(ws_url: str, service: str, product: str,
                                           shot: Path,
                                           ) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Certify then retract MST2's bias with the page's buttons.

    Returns the (text, href) of the jobs table's links and the dialogs the page opened.
    """
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url, max_msg_size=0) as ws:
        page = _DevTools(ws)
        try:
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send("Page.navigate", url=f"{service}/ui")
            row = await page.wait_for(_BIAS_ROW)
            assert row[1].startswith("v1 candidate") and row[2] == "-", row
            assert await page.evaluate(f"{_bias_button('certify')}.textContent") == "certify"
            assert await page.evaluate(f"{_bias_button('retract')}.textContent") == "retract"

            # without a token the page refuses, and nothing changes
            page.answers.append("2026-02-01T00:00:00Z")
            await page.click_for_dialog(_bias_button("certify"))
            for _ in range(300):  # the prompt, then the alert
                if len(page.dialogs) == 2:
                    break
                await asyncio.sleep(0.1)
            assert page.dialogs[-1] == ("alert", "Type an operator token first."), page.dialogs
            product_state = requests.get(f"{service}/v1/products/{product}", timeout=10)
            assert product_state.json()["state"] == "candidate"

            # the operator types the token, then certifies from 2026-02-01
            await page.evaluate("document.querySelector('#token').focus()")
            await page.send("Input.insertText", text=TOKEN)
            assert await page.evaluate("document.querySelector('#token').value") == TOKEN
            await page.evaluate("document.querySelector('#token').blur()")
            page.answers.append("2026-02-01T00:00:00Z")
            await page.click_for_dialog(_bias_button("certify"))
            row = await page.wait_for(f"(() => {{ const r = {_BIAS_ROW}; "
                                      "return r && r[2] !== '-' ? r : null; })()")
            assert row[1].startswith("v1 certified") and row[2] == (
                "v1 certified [2026-02-01 00:00:00Z, open)"), row
            assert page.dialogs[-1][0] == "prompt" and page.dialogs[-1][1].startswith(
                "Valid from")

            # ... and retracts it with a reason: the row goes (nothing left to show)
            page.answers.append("bias frames taken with the shutter open (ui test)")
            await page.click_for_dialog(_bias_button("retract"))
            await page.wait_for(f"{_BIAS_ROW} === null")
            assert page.dialogs[-1] == ("prompt", "Reason for retracting")
            jobs = await page.evaluate("[...document.querySelectorAll('#jobs tbody a')]"
                                       ".map((a) => [a.textContent, a.getAttribute('href')])")
            capture = await page.send("Page.captureScreenshot", format="png")
            shot.write_bytes(base64.b64decode(capture["data"]))
        finally:
            await page.close()
    return jobs, page.dialogs


def test_certify_and_retract_buttons_in_chromium(service, chromium, tmp_path):
    """An operator certifies then retracts a product by clicking the page's buttons."""
    cams = requests.get(f"{service}/ui/cameras.json", timeout=10).json()["cameras"]
    product = next(c for c in cams if c["camera"] == "MST2")["products"]["bias"]["latest"]["id"]
    shot = tmp_path / "certify.png"
    with _chromium_with_devtools(chromium, tmp_path / "profile") as ws_url:
        links, dialogs = asyncio.run(asyncio.wait_for(
            _certify_and_retract_on_the_page(ws_url, service, product, shot), 180))
    assert [kind for kind, _ in dialogs] == ["prompt", "alert", "prompt", "prompt"]

    # the catalog has the certification and the retraction, by the operator token
    body = requests.get(f"{service}/v1/products/{product}", timeout=10).json()
    assert body["state"] == "retracted"
    history = requests.get(f"{service}/v1/cameras/MST2/history/bias", timeout=10).json()
    changes = [h for h in history["history"] if h["product"] == product]
    assert [h["action"] for h in changes][-2:] == ["certify", "retract"], history
    assert changes[-1]["reason"] == "bias frames taken with the shutter open (ui test)"
    assert all(h["actor"].startswith("operator token:") for h in changes[-2:])
    assert changes[-2]["valid_from"].startswith("2026-02-01T00:00:00")
    best = requests.get(f"{service}/v1/cameras/MST2/best/bias", timeout=10)
    assert best.status_code == 404

    # every finished job links its QC report, and the link serves it
    jobs = requests.get(f"{service}/v1/jobs", timeout=10).json()["jobs"]
    assert sorted(href for _, href in links) == sorted(
        f"/v1/jobs/{j['id']}/report.html" for j in jobs if j["state"] == "succeeded")
    assert len(links) == 2 and all(text == "report" for text, _ in links)
    page = requests.get(service + links[0][1], timeout=120)
    assert page.status_code == 200 and "QC report for job " in page.text
    assert page.text.count("data:image/png;base64,") >= 8
    assert shot.stat().st_size > 20_000
