"""``make demo``: one camera, end to end, on the embedded default.

Simulates a small ZWO ASI6200MM Pro calibration set (a 256 x 320 window of
the sensor with the reference study's properties), starts ``sitiancal serve``
on the embedded default (SQLite, local zarr store, a dask LocalCluster),
registers the dataset, runs the calibration job through the HTTP API, prints
the QC table, certifies the gain map, asks for the best gain at a time and
prints where every result is (the dashboard, the dask dashboard, the report).

Run with ``python -m sitiancal.service.demo [DIR]`` (default ``./demo``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sitiancal.compute.simulate import SimulationConfig, simulate_dataset

#: The demo camera: a 256 x 320 window, 16 bias, 5 dark exposure times, 10 flat
#: levels of 24 frames (enough for per-pixel gain), a 15% second gain population.
DEMO_CAMERA = {
    "shape": (256, 320), "seed": 2026, "n_bias": 16, "dark_exptimes": [0.0, 60.0, 300.0, 600.0],
    "dark_frames": 4, "flat_levels": 10, "flat_frames": 24, "gain2_fraction": 0.15,
    "gain2_mean": 0.30, "hot_fraction": 5e-4, "rtn_fraction": 5e-4,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"sitiancal serve exited with status {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"sitiancal serve did not answer on {base} within {timeout:.0f} s")


def _dask_dashboard(http: httpx.Client) -> str:
    """The dask dashboard link the service shows on ``/ui``, or why there is none."""
    info = http.get("/ui/info.json").json()
    if info.get("dask_dashboard"):
        return str(info["dask_dashboard"])
    return f"none ({info.get('dask_dashboard_state', 'unavailable')}; SITIANCAL_DASK_DASHBOARD)"


def _print_table(report: dict) -> None:
    table = report["table"]
    width = max(len(row[0]) for row in table)
    print(f"\nQC report, camera {report['camera']}")
    print("-" * (width + 30))
    for label, value in table:
        print(f"{label:<{width}}  {value}")
    for name, reason in report.get("missing", {}).items():
        print(f"{name} not computed: {reason}")


def run(root: Path) -> int:
    """Run the demo under ``root``; return a process exit status."""
    raw = root / "raw" / "MST3"
    data = root / "data"
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    print(f"[1/4] simulating camera MST3 ({DEMO_CAMERA['shape'][0]} x {DEMO_CAMERA['shape'][1]} px) "
          f"into {raw}")
    summary = simulate_dataset(raw, SimulationConfig(**DEMO_CAMERA))
    # The truth file is for tests; keep it beside, not inside, the dataset folder.
    truth = root / "truth.fits"
    summary.truth_path.rename(truth)
    print(f"      {summary.n_frames} FITS frames; simulator truth in {truth}")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "SITIANCAL_INPUT_ROOTS": str((root / "raw").resolve()),
           "SITIANCAL_OPERATOR_TOKENS": token}
    print(f"[2/4] starting the service on the embedded default: {base} (data in {data})")
    server = subprocess.Popen(
        [sys.executable, "-m", "sitiancal.service.cli", "serve", "--port", str(port),
         "--data-dir", str(data)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until_up(base, server)
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, timeout=60.0) as http:
            dask_link = _dask_dashboard(http)
            print(f"      dask dashboard: {dask_link}")
            reply = http.post("/v1/datasets", headers=auth,
                              json={"camera": "MST3", "source": str(raw.resolve()), "label": "demo"})
            reply.raise_for_status()
            dataset = reply.json()
            print(f"      dataset {dataset['id']}: {dataset['counts']} frames, "
                  f"{len(dataset['rejected'])} rejected")
            reply = http.post("/v1/jobs", headers=auth, json={"camera": "MST3", "dataset": dataset["id"]})
            reply.raise_for_status()
            job = reply.json()
            print(f"[3/4] job {job['id']} submitted; polling {base}/v1/jobs/{job['id']}")
            last = ""
            while job["state"] in ("queued", "running"):
                time.sleep(0.5)
                job = http.get(f"/v1/jobs/{job['id']}").json()
                line = f"      {job['state']:<9} {job['progress']:5.0%}  {job.get('stage') or ''}"
                if line != last:
                    print(line)
                    last = line
            if job["state"] != "succeeded":
                print(f"job {job['state']}: {job.get('error')}", file=sys.stderr)
                return 1
            _print_table(http.get("/v1/cameras/MST3/report").json())

            print("\n[4/4] products (candidates), certified gain, best-at-time lookup")
            products = http.get("/v1/products", params={"camera": "MST3"}).json()["products"]
            export = root / "export"
            export.mkdir(parents=True, exist_ok=True)
            for p in sorted(products, key=lambda p: p["type"]):
                url = f"/v1/products/{p['id']}/fits"
                (export / f"{p['type']}.fits").write_bytes(http.get(url).content)
                print(f"  MST3/{p['type']:<10} v{p['version']}  {base}{url}")
            (export / "report.json").write_text(http.get("/v1/cameras/MST3/report").text)
            (export / "report.html").write_text(http.get("/v1/cameras/MST3/report.html").text)
            gain = next(p for p in products if p["type"] == "gain")
            http.post(f"/v1/products/{gain['id']}/certify", headers=auth,
                      json={"valid_from": "2024-03-01T00:00:00Z"}).raise_for_status()
            best = http.get("/v1/cameras/MST3/best/gain", params={"at": "2024-06-01T00:00:00Z"}).json()
            print(f"  best gain for MST3 at 2024-06-01: v{best['version']} ({best['state']}, "
                  f"valid from {best['valid_from']}), median {best['stats']['median']:.4f} e-/ADU")
        print(f"\ndashboard: {base}/ui (while the service runs)"
              f"\ndask:      {dask_link}"
              f"\nreport:    {root / 'export' / 'report.html'} (plots), "
              f"{root / 'export' / 'report.json'}\nFITS:      {root / 'export'}/<type>.fits"
              f"\ncatalog:   {data / 'catalog.sqlite'}\nstore:     {data / 'store'}"
              f"\ndone in {time.perf_counter() - t0:.0f} s")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run(Path(args[0]) if args else Path("demo"))


if __name__ == "__main__":
    sys.exit(main())
