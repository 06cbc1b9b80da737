"""A real uvicorn server: zarr regions over HTTP, streamed upload limits, the pipeline journey."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
import requests
import xarray as xr
from astropy.io import fits
from simdata import small_dataset
from test_api_support import (
    OP,
    READER,
    READER_TOKEN,
    instant_job,
    live_server,
    make_settings,
    publish_product,
    wait_for,
)

from sitiancal.api.app import create_app


def _zarr_requests(app) -> float:
    counter = app.state.metrics.product_requests
    return counter.value(kind="zarr", status="200")


def test_zarr_region_over_http_reads_only_the_chunks_it_needs(tmp_path, monkeypatch):
    settings = make_settings(tmp_path, reader_tokens=[READER_TOKEN])
    app = create_app(settings, job_function=instant_job, use_dask=False)
    with live_server(app) as url:
        state = app.state.sitiancal
        monkeypatch.setattr("sitiancal.storage.store.MAP_CHUNKS", (16, 16))
        product = publish_product(state.catalog, state.store, shape=(64, 96), seed=5)
        monkeypatch.undo()
        truth = state.store.read_region(product.store_key, "gain")
        n_chunks = (64 // 16) * (96 // 16)
        store_url = f"{url}/v1/products/{product.id}/zarr"
        before = _zarr_requests(app)
        ds = xr.open_zarr(store_url, consolidated=True, zarr_format=3,
                          storage_options={"headers": READER})
        assert ds["gain"].shape == (64, 96)
        assert ds["gain"].attrs["units"] == "e-/ADU"
        opened = _zarr_requests(app) - before
        region = ds["gain"][20:30, 34:46].values  # inside the chunk (1, 2)
        read = _zarr_requests(app) - before - opened
        np.testing.assert_array_equal(region, truth[20:30, 34:46])
        assert opened <= 2  # the consolidated root (and nothing per array)
        assert read == 1, f"{read} chunk requests for a one-chunk region ({n_chunks} chunks)"
        whole = ds["gain_err"].values
        np.testing.assert_allclose(whole, 0.003, rtol=1e-6)
        # without a token the reader-protected store refuses
        assert requests.get(f"{store_url}/zarr.json", timeout=10).status_code == 401


def test_streamed_upload_is_refused_before_it_ends(tmp_path):
    limit = 256 * 1024
    settings = make_settings(tmp_path, max_upload_bytes=limit)
    app = create_app(settings, job_function=instant_job, use_dask=False)
    with live_server(app) as url:
        ds = requests.post(f"{url}/v1/datasets", json={"camera": "MST3", "source": None},
                           headers=OP, timeout=10).json()["id"]
        host, port = url.removeprefix("http://").split(":")
        total = 512 * 1024 * 1024  # what the client would send: 2000x the limit
        sent = 0
        block = b"\0" * 65536
        response = b""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall((f"POST /v1/datasets/{ds}/frames HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: {OP['Authorization']}\r\n"
                          "Content-Type: application/fits\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n").encode())
            sock.setblocking(False)
            deadline = time.monotonic() + 30
            while sent < total and time.monotonic() < deadline:
                try:
                    response += sock.recv(65536)
                    if b"\r\n\r\n" in response:
                        break
                except BlockingIOError:
                    pass
                try:
                    sock.send(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                    sent += len(block)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
            sock.setblocking(True)
            if b"\r\n\r\n" not in response:
                response += sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b"limit of 262144 bytes" in response
        assert sent < total / 10  # refused while streaming, not after reading everything
        folder = settings.data_dir / "uploads" / ds
        assert not folder.exists() or list(folder.iterdir()) == []


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    source, truth = small_dataset(tmp_path_factory.mktemp("journey"))
    return source.parent, source, truth  # cached per session: it may live elsewhere


def test_pipeline_journey(tmp_path, sim):
    """Operator registers, runs, reviews, certifies; a pipeline then fetches the product."""
    roots, source, truth = sim
    settings = make_settings(tmp_path, input_roots=[str(roots)])
    app = create_app(settings)  # the real pipeline on the embedded LocalCluster
    with live_server(app) as url:
        http = requests.Session()
        http.headers.update(OP)
        health = http.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["dask"]["workers"] >= 1
        r = http.post(f"{url}/v1/datasets", json={"camera": "MST3", "source": str(source)},
                      timeout=60)
        assert r.status_code == 201, r.text
        ds = r.json()
        r = http.post(f"{url}/v1/jobs", json={"camera": "MST3", "dataset": ds["id"]},
                      timeout=30)
        assert r.status_code == 202
        job_url = url + r.headers["location"]
        stages = set()

        def finished():
            job = http.get(job_url, timeout=30).json()
            stages.add(job["stage"])
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = wait_for(finished, timeout=240, interval=0.2)
        assert job["state"] == "succeeded", job
        assert len(job["products"]) == 8
        assert {"cube", "tiles"} & stages  # progress was visible while it ran
        report = http.get(f"{url}/v1/cameras/MST3/report", timeout=30).json()
        gain = report["figures"]["gain_conventional"]
        assert gain["value"] == pytest.approx(truth.scalars["GAINMED"], abs=4 * gain["error"])
        assert report["missing"] == {}
        camera = http.get(f"{url}/v1/cameras/MST3", timeout=30).json()
        assert camera["latest_job"]["id"] == job["id"]
        gain_id = camera["latest_products"]["gain"]["id"]
        r = http.post(f"{url}/v1/products/{gain_id}/certify",
                      json={"valid_from": "2026-03-01T00:00:00Z"}, timeout=30)
        assert r.status_code == 200, r.text

        # the pipeline side: best at an observation time, FITS, cached repeat, zarr region
        pipeline = requests.Session()
        best = pipeline.get(f"{url}/v1/cameras/MST3/best/gain",
                            params={"at": "2026-03-20T03:04:05Z"}, timeout=30)
        assert best.status_code == 200 and best.json()["id"] == gain_id
        product = best.json()
        fits_url = url + product["links"]["fits"]
        first = pipeline.get(fits_url, timeout=60)
        assert first.status_code == 200
        assert first.headers["etag"] == f'"{product["sha256"]}"'
        repeat = pipeline.get(fits_url, headers={"If-None-Match": first.headers["etag"]},
                              timeout=30)
        assert repeat.status_code == 304 and repeat.content == b""
        with fits.open(io.BytesIO(first.content)) as hdul:
            gain_map = np.asarray(hdul[0].data, dtype=np.float64)
        ds_zarr = xr.open_zarr(url + product["links"]["zarr"], consolidated=True,
                               zarr_format=3)
        main = ds_zarr.attrs["sitiancal"]["arrays"][0]  # the FITS primary HDU's map
        region = ds_zarr[main][10:20, 30:45].values
        np.testing.assert_array_equal(region, gain_map[10:20, 30:45])
        good = np.isfinite(gain_map)
        assert np.nanmedian(gain_map) == pytest.approx(truth.scalars["GAINMED"], rel=0.05)
        assert good.mean() > 0.9
        metrics = pipeline.get(f"{url}/metrics", timeout=30).text
        assert 'sitiancal_product_cache_hits_total{kind="fits"} 1' in metrics

        # the same job again reuses every version; with force it publishes new ones
        def rerun(**extra):
            r = http.post(f"{url}/v1/jobs", json={"camera": "MST3", "dataset": ds["id"],
                                                  "products": ["bias", "gain"], **extra},
                          timeout=30)
            nonlocal job_url
            job_url = url + r.headers["location"]
            done = wait_for(finished, timeout=240, interval=0.2)
            assert done["state"] == "succeeded", done
            return {http.get(f"{url}/v1/products/{p}", timeout=30).json()["type"]: p
                    for p in done["products"]}

        first_ids = {t: camera["latest_products"][t]["id"] for t in ("bias", "gain")}
        assert rerun() == first_ids
        forced = rerun(force=True)
        assert set(forced) == {"bias", "gain"} and not set(forced.values()) & set(
            first_ids.values())
        versions = [http.get(f"{url}/v1/products/{p}", timeout=30).json()["version"]
                    for p in forced.values()]
        assert versions == [2, 2]
