"""The dashboard in headless Chromium against a live ``sitiancal serve`` on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from simdata import small_dataset

from sitiancal.api.routers.ui import MIN_FLEET, robust_outliers
from sitiancal.service.pipeline import calibrate
from sitiancal.service.settings import Settings

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


def _chromium(binary: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}",
         "--virtual-time-budget=5000", "--window-size=1400,1300", *extra, url],
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

    shot = tmp_path / "dashboard.png"
    _chromium(chromium, tmp_path, f"{service}/ui", f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 1300)


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
    assert set(info) == {"version", "dask_dashboard"}
    page = requests.get(f"{service}/ui", timeout=10).text
    assert "http://" not in page and "https://" not in page  # no CDN
    js = requests.get(f"{service}/ui/static/dashboard.js", timeout=10).text
    assert "/v1/jobs" in js and "Bearer " in js


def test_robust_outliers_against_the_fleet():
    gains = {f"MST{i}": 0.25 + 0.002 * ((i * 7) % 5 - 2) for i in range(1, 21)}
    gains["MST7"] = 0.40
    median, sigma, outliers = robust_outliers(gains)
    assert outliers == ["MST7"] and abs(median - 0.25) < 0.003 and 0 < sigma < 0.01
    assert robust_outliers({"A": 1.0, "B": 9.0})[2] == []  # too few cameras to judge
    assert MIN_FLEET == 3
