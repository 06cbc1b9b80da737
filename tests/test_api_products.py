"""Products over HTTP: metadata, FITS with ETag/304/ranges, zarr keys, best, certify, retract."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from astropy.io import fits
from test_api_support import OP, TestClient, instant_job, make_settings, publish_product

from sitiancal.api.app import create_app


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("products")
    with TestClient(create_app(make_settings(tmp), job_function=instant_job,
                               use_dask=False)) as client:
        state = client.app.state.sitiancal
        v1 = publish_product(state.catalog, state.store, seed=1,
                             stats={"median": 0.251, "populations": {}})
        v2 = publish_product(state.catalog, state.store, seed=2, stats={"median": 0.253})
        bias = publish_product(state.catalog, state.store, type="bias", seed=3,
                               stats={"level_median_adu": 500.1,
                                      "stability": {"std": 0.03, "peak_to_peak": 0.1,
                                                    "drift": float("nan")}})
        yield {"client": client, "v1": v1, "v2": v2, "bias": bias, "state": state}


def test_metadata_and_listing(env):
    client, v1 = env["client"], env["v1"]
    r = client.get(f"/v1/products/{v1.id}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == v1.id and body["type"] == "gain" and body["version"] == 1
    assert body["state"] == "candidate" and body["units"] == "e-/ADU"
    assert body["shape"] == [40, 56] and body["sha256"] == v1.sha256
    assert body["links"]["fits"] == f"/v1/products/{v1.id}/fits"
    assert body["provenance"]["inputs"][0]["path"] == "/data/MST3/f1.fits"
    listed = client.get("/v1/products", params={"camera": "MST3", "type": "gain"}).json()
    assert [p["version"] for p in listed["products"]] == [2, 1]
    assert client.get("/v1/products", params={"state": "retracted"}).json()["products"] == []
    assert client.get("/v1/products", params={"type": "sky"}).status_code == 422
    bias = client.get(f"/v1/products/{env['bias'].id}")  # NaN in stats: JSON null
    assert bias.status_code == 200
    assert bias.json()["stats"]["stability"]["drift"] is None
    r = client.get("/v1/products/nope")
    assert r.status_code == 404 and "unknown product" in r.json()["detail"]


def test_fits_download_etag_304_and_ranges(env):
    client, v1 = env["client"], env["v1"]
    url = f"/v1/products/{v1.id}/fits"
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/fits"
    assert r.headers["etag"] == f'"{v1.sha256}"'
    assert hashlib.sha256(r.content).hexdigest() == v1.sha256
    assert "immutable" in r.headers["cache-control"]
    assert r.headers["accept-ranges"] == "bytes"
    with fits.open(io.BytesIO(r.content)) as hdul:
        assert hdul[0].header["PRODTYPE"] == "gain"
        assert hdul[0].data.shape == (40, 56)
        assert hdul["GAIN_ERR"].data[0, 0] == pytest.approx(0.003)
    whole = r.content
    again = client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == r.headers["etag"]
    assert client.get(url, headers={"If-None-Match": '"other", W/' + r.headers["etag"]}
                      ).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    part = client.get(url, headers={"Range": "bytes=2880-5759"})
    assert part.status_code == 206
    assert part.content == whole[2880:5760]
    assert part.headers["content-range"] == f"bytes 2880-5759/{len(whole)}"
    tail = client.get(url, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == whole[-100:]
    beyond = client.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(whole)}"
    assert client.get(url, headers={"Range": "bytes=0-1,5-6"}).content == whole  # ignored
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == whole
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(whole))


def test_zarr_keys_and_consolidated_root(env):
    client, v1 = env["client"], env["v1"]
    base = f"/v1/products/{v1.id}/zarr"
    root = client.get(f"{base}/zarr.json")
    assert root.status_code == 200
    doc = root.json()
    members = doc["consolidated_metadata"]["metadata"]
    assert set(members) >= {"gain", "gain_err"}
    assert members["gain"]["shape"] == [40, 56]
    assert members["gain"]["attributes"]["units"] == "e-/ADU"
    raw = client.get(f"{base}/gain/zarr.json")
    assert raw.status_code == 200 and json.loads(raw.content)["shape"] == [40, 56]
    chunk = client.get(f"{base}/gain/c/0/0")
    assert chunk.status_code == 200 and len(chunk.content) > 0
    assert client.get(f"{base}/gain/c/0/0", headers={"If-None-Match": chunk.headers["etag"]}
                      ).status_code == 304
    part = client.get(f"{base}/gain/c/0/0", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == chunk.content[:10]
    for missing in ("gain/c/9/9", ".zgroup", "nope/zarr.json", "gain/../../../etc/passwd",
                    "gain/%2e%2e/x", "gain//c", "caf%C3%A9"):
        r = client.get(f"{base}/{missing}")
        assert r.status_code == 404, missing
    assert client.get("/v1/products/unknown/zarr/zarr.json").status_code == 404


def test_best_at_time_certify_and_retract(env):
    client, v1, v2 = env["client"], env["v1"], env["v2"]
    best = "/v1/cameras/MST3/best/gain"
    r = client.get(best, params={"at": "2026-03-14T00:00:00Z"})
    assert r.status_code == 404 and "none is certified" in r.json()["detail"]
    assert client.get(best, params={"state": "candidate"}).json()["id"] == v2.id
    r = client.post(f"/v1/products/{v1.id}/certify",
                    json={"valid_from": "2026-03-01T00:00:00Z", "reason": "QC ok"}, headers=OP)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "certified" and r.json()["valid_to"] is None
    r = client.post(f"/v1/products/{v2.id}/certify",
                    json={"valid_from": "2026-03-14T12:00:00+02:00"}, headers=OP)
    assert r.status_code == 200
    assert r.json()["valid_from"] == "2026-03-14T10:00:00Z"
    assert client.get(f"/v1/products/{v1.id}").json()["valid_to"] == "2026-03-14T10:00:00Z"
    assert client.get(best, params={"at": "2026-03-10T00:00:00Z"}).json()["id"] == v1.id
    assert client.get(best, params={"at": "2026-03-14T09:59:59"}).json()["id"] == v1.id
    assert client.get(best, params={"at": "2026-03-14T10:00:00Z"}).json()["id"] == v2.id
    assert client.get(best).json()["id"] == v2.id  # default: now
    r = client.get(best, params={"at": "2026-02-01T00:00:00Z"})
    assert r.status_code == 404 and "before the first certified range" in r.json()["detail"]
    # an explicit end that overlaps the later certified range is a conflict
    r = client.post(f"/v1/products/{v1.id}/certify",
                    json={"valid_from": "2026-03-01T00:00:00Z",
                          "valid_to": "2026-03-20T00:00:00Z"}, headers=OP)
    assert r.status_code == 409 and "would overlap" in r.json()["detail"]
    r = client.post(f"/v1/products/{v2.id}/retract", json={"reason": "lamp flicker"},
                    headers=OP)
    assert r.status_code == 200 and r.json()["state"] == "retracted"
    r = client.get(best, params={"at": "2026-03-15T00:00:00Z"})
    assert r.status_code == 404
    assert "retracted" in r.json()["detail"] and "lamp flicker" in r.json()["detail"]
    r = client.post(f"/v1/products/{v2.id}/certify",
                    json={"valid_from": "2026-03-14T00:00:00Z"}, headers=OP)
    assert r.status_code == 409 and "retracted" in r.json()["detail"]
    assert client.post(f"/v1/products/{v2.id}/retract", json={"reason": "again"},
                       headers=OP).status_code == 409
    history = client.get("/v1/cameras/MST3/history/gain").json()["history"]
    assert [h["action"] for h in history] == ["publish", "publish", "certify", "trim",
                                              "certify", "retract"]
    assert history[-1]["actor"].startswith("operator token:")


@pytest.mark.parametrize(("params", "words"), [
    ({"at": "yesterday"}, "query.at"),
    ({"at": "2026-13-01T00:00:00Z"}, "query.at"),
    ({"state": "retracted"}, "query.state"),
])
def test_bad_lookups_are_422(env, params, words):
    r = env["client"].get("/v1/cameras/MST3/best/gain", params=params)
    assert r.status_code == 422
    assert words in r.json()["detail"]


def test_bad_paths_and_bodies(env):
    client, v1 = env["client"], env["v1"]
    assert client.get("/v1/cameras/MST3/best/sky").status_code == 422
    r = client.get("/v1/cameras/M%C3%A9/best/gain")
    assert r.status_code == 422 and "path.camera" in r.json()["detail"]
    r = client.get("/v1/cameras/NEW/best/gain")
    assert r.status_code == 404 and "unknown" in r.json()["detail"]
    for body in ({"valid_from": "soon"}, {}, {"valid_from": "2026-03-01T00:00:00Z", "x": 1},
                 {"valid_from": "2026-03-02T00:00:00Z", "valid_to": "2026-03-01T00:00:00Z"}):
        r = client.post(f"/v1/products/{v1.id}/certify", json=body, headers=OP)
        assert r.status_code == 422, body
    assert client.post(f"/v1/products/{v1.id}/retract", json={"reason": ""},
                       headers=OP).status_code == 422
    r = client.post(f"/v1/products/{v1.id}/retract", content=b"\xff\xfe",
                    headers={**OP, "Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.put(f"/v1/products/{v1.id}", headers=OP)
    assert r.status_code == 405 and "not allowed" in r.json()["detail"]


def test_cameras_and_report(env):
    client, state = env["client"], env["state"]
    cams = client.get("/v1/cameras").json()["cameras"]
    assert [c["camera"] for c in cams] == ["MST3"]
    latest = cams[0]["latest_products"]
    assert set(latest) == {"gain", "bias"}
    r = client.get("/v1/cameras/MST3/report")
    assert r.status_code == 200
    report = r.json()
    assert report["camera"] == "MST3"
    assert report["figures"]["bias_level"]["value"] == pytest.approx(500.1)
    assert report["figures"]["bias_level"]["units"] == "ADU"
    gain = report["figures"]["gain_per_pixel"]["value"]
    newest_gain = state.catalog.get_product(latest["gain"]["id"])
    assert gain == pytest.approx(newest_gain.stats["median"])
    assert report["missing"]["dark"] == "no product of this type yet"
    assert report["products"]["bias"]["id"] == env["bias"].id
    html = client.get("/v1/cameras/MST3/report.html")
    assert html.status_code == 200 and "<table" in html.text and "Bias level" in html.text
    assert client.get("/v1/cameras/NOPE/report").status_code == 404
    certified = client.get("/v1/cameras/MST3/report", params={"basis": "certified"}).json()
    assert certified["missing"]["bias"] == "no certified version valid now"


def test_metrics_count_requests_bytes_304s_and_lookups(env):
    client, v1 = env["client"], env["v1"]
    before = client.get("/metrics").text
    m = client.app.state.metrics
    hits = m.cache_hits.value(kind="fits")
    sent = m.bytes_served.value(kind="fits")
    lookups = m.lookup_latency.count()
    r = client.get(f"/v1/products/{v1.id}/fits")
    client.get(f"/v1/products/{v1.id}/fits", headers={"If-None-Match": r.headers["etag"]})
    client.get("/v1/cameras/MST3/best/gain", params={"state": "candidate"})
    assert m.cache_hits.value(kind="fits") == hits + 1
    assert m.bytes_served.value(kind="fits") == sent + len(r.content)
    assert m.lookup_latency.count() == lookups + 1
    text = client.get("/metrics").text
    assert text != before
    assert 'sitiancal_product_requests_total{kind="fits",status="304"}' in text
    assert "sitiancal_best_lookup_seconds_bucket{le=\"+Inf\"}" in text
    for line in text.splitlines():  # every sample line is 'name{labels} number'
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_openapi_is_complete(env):
    spec = env["client"].get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/datasets", "/v1/datasets/{dataset_id}/frames", "/v1/jobs",
                 "/v1/jobs/{job_id}", "/v1/products/{product_id}/fits",
                 "/v1/cameras/{camera}/best/{type}", "/v1/products/{product_id}/certify",
                 "/healthz", "/metrics"):
        assert path in paths, path
    schemas = spec["components"]["schemas"]
    for name in ("DatasetCreate", "JobCreate", "CertifyRequest", "ProductOut", "JobOut"):
        assert schemas[name].get("examples"), name
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
