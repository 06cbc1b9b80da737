"""Hostile and malformed HTTP: every request gets a 4xx with a reason, never a 500.

Also the security items of issue 7 that live in the HTTP layer: per-token
rate limits of write endpoints (429 + Retry-After), no token in any log
record, an audit entry for every write endpoint, and the integrity check on
every product download path (a corrupted stored product is refused with 409,
never served).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from test_api_support import (
    OP,
    OP_TOKEN,
    READER_TOKEN,
    BlockingJob,
    TestClient,
    instant_job,
    make_settings,
    publish_product,
    write_frame,
)

from sitiancal.api.app import create_app
from sitiancal.api.auth import WriteRateLimit

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel_http")
    for i in range(3):
        write_frame(tmp / "roots" / "good" / f"b{i}.fits", "bias", 0.0, seed=i)
    settings = make_settings(tmp, max_upload_bytes=LIMIT, reader_tokens=[READER_TOKEN])
    app = create_app(settings, job_function=instant_job, use_dask=False,
                     write_limit=WriteRateLimit(rate=1000.0, burst=100000))
    with TestClient(app, raise_server_exceptions=False) as client:
        state = client.app.state.sitiancal
        product = publish_product(state.catalog, state.store, seed=11)
        yield {"client": client, "tmp": tmp, "state": state, "product": product}


def _no_500(r) -> None:
    assert r.status_code < 500, (r.request.method, str(r.request.url), r.status_code, r.text)
    assert 400 <= r.status_code < 500, (str(r.request.url), r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail, r.text


BAD_JSON_BODIES = [
    b"", b"{", b"[]", b"null", b"42", b'"camera"', b"\xff\xfe\x00", b"{'camera': 1}",
    b'{"camera": "MST3", "source": "/x", "camera": 1}', b'{"camera": NaN}',
    b'{"camera": "MST3"' + b" " * 10000, b"[" * 5000 + b"]" * 5000,
    json.dumps({"camera": "A" * 100000}).encode(),
]

WRONG_TYPES = [
    {"camera": 3, "source": None}, {"camera": ["MST3"], "source": None},
    {"camera": "MST3", "source": 5}, {"camera": "MST3", "source": {"a": 1}},
    {"camera": "MST3", "source": None, "label": ["x"]},
    {"camera": "MST3", "source": None, "allow_mixed_states": "perhaps"},
    {"camera": "MST3", "source": None, "unknown_field": 1},
    {"camera": "../../etc", "source": None}, {"camera": "MST3\x00", "source": None},
    {"camera": "M\u00e9\u0301", "source": None}, {"camera": "", "source": None},
    {"camera": "MST3", "source": "/etc/passwd"}, {"camera": "MST3", "source": "../../../etc"},
    {"camera": "MST3", "source": "roots/../../../etc"}, {"camera": "MST3", "source": "\x00"},
    {"camera": "MST3", "source": "file:///etc"}, {"camera": "MST3", "source": "s3://x/y"},
    {"camera": "MST3", "source": "/" + "a/" * 3000},
    {"camera": "MST3", "source": "\u202e/stoor"},
]

JOB_BODIES = [
    {}, {"camera": "MST3"}, {"camera": "MST3", "dataset": 5},
    {"camera": "MST3", "dataset": "nope"}, {"camera": "MST3", "dataset": "x", "products": "bias"},
    {"camera": "MST3", "dataset": "x", "products": ["sky"]},
    {"camera": "MST3", "dataset": "x", "params": []},
    {"camera": "MST3", "dataset": "x", "force": "yes"},
    {"camera": "MST3", "dataset": "x", "extra": True},
    {"camera": "MST3", "dataset": "../../x"},
]

CERTIFY_BODIES = [
    {}, {"valid_from": "yesterday"}, {"valid_from": 1e300}, {"valid_from": "2026-02-30T00:00:00Z"},
    {"valid_from": "2026-03-01T25:00:00Z"}, {"valid_from": "2026-03-01T00:00:00+99:00"},
    {"valid_from": "99999-01-01T00:00:00Z"}, {"valid_from": "0000-01-01T00:00:00Z"},
    {"valid_from": "2026-03-01T00:00:00Z", "valid_to": "2026-02-01T00:00:00Z"},
    {"valid_from": "2026-03-01T00:00:00Z", "unknown": 1},
    {"valid_from": ["2026-03-01T00:00:00Z"]}, {"valid_from": None},
]

LOOKUPS = [
    "/v1/cameras/MST3/best/gain?at=never", "/v1/cameras/MST3/best/gain?at=2026-02-30",
    "/v1/cameras/MST3/best/gain?at=1e400", "/v1/cameras/MST3/best/gain?at=" + "9" * 400,
    "/v1/cameras/MST3/best/gain?as_of=2026-13-01", "/v1/cameras/MST3/best/gain?state=all",
    "/v1/cameras/MST3/best/gain?at=2026-03-01T00:00:00%2B99:00",
    "/v1/cameras/%00/best/gain", "/v1/cameras/..%2F..%2Fetc/best/gain",
    "/v1/cameras/MST3/best/..%2Fgain", "/v1/cameras/MST3/best/%F0%9F%92%A9",
    "/v1/products?limit=-1", "/v1/products?limit=abc", "/v1/products?limit=1e99",
    "/v1/products?camera=%00", "/v1/jobs?limit=0", "/v1/jobs?state=exploded",
    "/v1/products/" + "x" * 5000, "/v1/products/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/products/nope/fits", "/v1/products/nope/zarr/zarr.json",
    "/v1/datasets/%C0%AE%C0%AE", "/v1/jobs/\u202egnp", "/v1/cameras/MST3/history/sky",
]


def test_bad_json_bodies_are_4xx(env):
    client = env["client"]
    for body in BAD_JSON_BODIES:
        for url in ("/v1/datasets", "/v1/jobs", f"/v1/products/{env['product'].id}/certify",
                    f"/v1/products/{env['product'].id}/retract"):
            _no_500(client.post(url, content=body,
                                headers={**OP, "Content-Type": "application/json"}))
    r = client.post("/v1/datasets", content=b'{"camera": 1', headers={
        **OP, "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = client.post("/v1/datasets", content=b"camera=1", headers={
        **OP, "Content-Type": "application/x-www-form-urlencoded"})
    _no_500(r)


def test_wrong_types_unknown_fields_and_path_tricks_are_4xx(env):
    client = env["client"]
    for body in WRONG_TYPES:
        r = client.post("/v1/datasets", json=body, headers=OP)
        _no_500(r)
    r = client.post("/v1/datasets", json={"camera": "MST3", "source": None, "x": 1},
                    headers=OP)
    assert r.status_code == 422 and "body.x" in r.json()["detail"]
    r = client.post("/v1/datasets", json={"camera": "MST3", "source": "/etc"}, headers=OP)
    assert r.status_code == 403
    for body in JOB_BODIES:
        _no_500(client.post("/v1/jobs", json=body, headers=OP))
    pid = env["product"].id
    for body in CERTIFY_BODIES:
        r = client.post(f"/v1/products/{pid}/certify", json=body, headers=OP)
        _no_500(r)
        assert r.status_code == 422, (body, r.text)
    for body in ({}, {"reason": 5}, {"reason": "x" * 100000}, {"reason": "ok", "extra": 1}):
        _no_500(client.post(f"/v1/products/{pid}/retract", json=body, headers=OP))
    # nothing was changed by any of them
    assert env["state"].catalog.get_product(pid).state == "candidate"
    assert env["state"].catalog.list_jobs() == []


def test_bad_queries_and_paths_are_4xx(env):
    client = env["client"]
    for url in LOOKUPS:
        _no_500(client.get(url, headers={"Authorization": f"Bearer {READER_TOKEN}"}))
    for header in ("Bearer", "Basic abc", "Bearer " + "x" * 10000, "Bearer \u00e9\u00e9".encode(),
                   "bearer  ", "Bearer a b c"):
        r = client.get("/v1/products", headers={"Authorization": header})
        _no_500(r)
        assert r.status_code == 401


def test_huge_bodies_are_refused(env):
    client = env["client"]
    r = client.post("/v1/datasets", json={"camera": "MST3", "source": None}, headers=OP)
    did = r.json()["id"]
    big = b"\0" * (LIMIT * 4)
    r = client.post(f"/v1/datasets/{did}/frames", content=big,
                    headers={**OP, "Content-Type": "application/fits"})
    assert r.status_code == 413
    r = client.post(f"/v1/datasets/{did}/frames", content=big,
                    params={"filename": "../../\u202e" + "a" * 300},
                    headers={**OP, "Content-Type": "application/fits"})
    _no_500(r)
    huge_json = json.dumps({"camera": "MST3", "source": None, "label": "x" * (8 << 20)})
    _no_500(client.post("/v1/datasets", content=huge_json.encode(),
                        headers={**OP, "Content-Type": "application/json"}))


# -- security ------------------------------------------------------------------------------
def test_write_rate_limit_per_token(tmp_path):
    settings = make_settings(tmp_path, operator_tokens=[OP_TOKEN, "second-op-token-xyz"])
    app = create_app(settings, job_function=instant_job, use_dask=False,
                     write_limit=WriteRateLimit(rate=0.5, burst=3))
    with TestClient(app) as client:
        codes = [client.post("/v1/datasets", json={"camera": "MST3", "source": None},
                             headers=OP).status_code for _ in range(5)]
        assert codes == [201, 201, 201, 429, 429]
        r = client.post("/v1/datasets", json={"camera": "MST3", "source": None}, headers=OP)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "too many write requests" in r.json()["detail"]
        assert OP_TOKEN not in r.text
        # another token has its own bucket; reads are not limited
        other = {"Authorization": "Bearer second-op-token-xyz"}
        assert client.post("/v1/datasets", json={"camera": "MST3", "source": None},
                           headers=other).status_code == 201
        assert all(client.get("/v1/datasets", headers=OP).status_code == 200
                   for _ in range(20))


def test_rate_limit_refills():
    limit = WriteRateLimit(rate=2.0, burst=2)
    assert limit.acquire("a", now=0.0) == 0 and limit.acquire("a", now=0.0) == 0
    assert limit.acquire("a", now=0.0) == pytest.approx(0.5)
    assert limit.acquire("a", now=0.5) == 0
    assert limit.acquire("b", now=0.5) == 0
    with pytest.raises(ValueError):
        WriteRateLimit(rate=0)


def test_no_token_in_logs_and_every_write_is_audited(tmp_path, caplog):
    for i in range(2):
        write_frame(tmp_path / "roots" / "set" / f"b{i}.fits", "bias", 0.0, seed=i)
    settings = make_settings(tmp_path, reader_tokens=[READER_TOKEN])
    caplog.set_level(logging.DEBUG)
    blocking = BlockingJob()
    with TestClient(create_app(settings, job_function=blocking, use_dask=False),
                    raise_server_exceptions=False) as client:
        state = client.app.state.sitiancal
        catalog = state.catalog
        product = publish_product(catalog, state.store, seed=5)
        before = len(catalog.audit_log())
        writes = []
        r = client.post("/v1/datasets", json={"camera": "MST3",
                                              "source": str(tmp_path / "roots" / "set")},
                        headers=OP)
        assert r.status_code == 201, r.text
        writes.append(("dataset", r.json()["id"]))
        r = client.post("/v1/datasets", json={"camera": "MST3", "source": None}, headers=OP)
        upload = r.json()["id"]
        writes.append(("dataset", upload))
        frame = write_frame(tmp_path / "up.fits", "bias", 0.0, seed=9).read_bytes()
        r = client.post(f"/v1/datasets/{upload}/frames", content=frame,
                        headers={**OP, "Content-Type": "application/fits"})
        assert r.status_code == 201, r.text
        r = client.post("/v1/jobs", json={"camera": "MST3", "dataset": upload,
                                          "products": ["bias"]}, headers=OP)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        writes.append(("job", job))
        assert blocking.started.wait(20)
        r = client.delete(f"/v1/jobs/{job}", headers=OP)
        assert r.status_code in (200, 202), r.text
        r = client.post(f"/v1/products/{product.id}/certify",
                        json={"valid_from": "2026-03-01T00:00:00Z"}, headers=OP)
        assert r.status_code == 200, r.text
        r = client.post(f"/v1/products/{product.id}/retract", json={"reason": "test"},
                        headers=OP)
        assert r.status_code == 200, r.text
        writes.append(("product", product.id))
        # failed attempts with secrets in them
        client.post("/v1/jobs", json={"camera": "MST3"},
                    headers={"Authorization": "Bearer secret-guess-123456"})
        client.get("/v1/products", headers={"Authorization": f"Bearer {READER_TOKEN}x"})
        entries = catalog.audit_log()[before:]
        actions = {e.action for e in entries}
        op_name = state.auth.identify(f"Bearer {OP_TOKEN}").name
        for entity, eid in writes:
            mine = [e for e in entries if e.entity_id == eid]
            assert mine, f"no audit entry for {entity} {eid}: {actions}"
        upload_entries = [e for e in entries if e.entity_id == upload]
        assert len(upload_entries) >= 2, "the frame upload is not audited"
        assert any(e.action.startswith("product.") and "certif" in e.action for e in entries)
        assert any("retract" in e.action for e in entries)
        assert any(e.entity_id == job and "cancel" in (e.action + str(e.details) + str(e.reason))
                   for e in entries), [(e.action, e.details) for e in entries
                                       if e.entity_id == job]
        api_entries = [e for e in entries if e.actor != "system" and e.actor != "runner"]
        assert all(e.actor == op_name for e in api_entries if e.actor.startswith("operator")), \
            {e.actor for e in entries}
        text = "\n".join(r.getMessage() for r in caplog.records)
        text += json.dumps([(e.actor, e.reason, e.details) for e in catalog.audit_log()],
                           default=str)
    for secret in (OP_TOKEN, READER_TOKEN, "secret-guess-123456"):
        assert secret not in text
        assert secret not in caplog.text



# -- integrity -----------------------------------------------------------------------------
def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_products_are_refused_on_every_download_path(tmp_path):
    import subprocess
    import sys

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False),
                    raise_server_exceptions=False) as client:
        state = client.app.state.sitiancal
        good = publish_product(state.catalog, state.store, seed=1)
        bad_fits = publish_product(state.catalog, state.store, seed=2)
        bad_zarr = publish_product(state.catalog, state.store, seed=3)
        url = f"/v1/products/{bad_fits.id}/fits"
        first = client.get(url)
        assert first.status_code == 200
        assert hashlib.sha256(first.content).hexdigest() == bad_fits.sha256
        fits_file = Path(state.store.fits_path(bad_fits.store_key))
        _flip_byte(fits_file, 2880 + 100)  # in the data: still a readable FITS file
        for headers in ({}, {"Range": "bytes=0-99"}, {"Range": "bytes=-10"}):
            r = client.get(url, headers=headers)
            assert r.status_code == 409, (headers, r.status_code)
            assert "corrupt" in r.json()["detail"] and "sha256" in r.json()["detail"]
        assert client.head(url).status_code == 409
        # a chunk of an array, corrupted before anyone read it over HTTP
        zroot = Path(state.store.fits_path(bad_zarr.store_key)).parent / "product.zarr"
        chunk = sorted(p for p in (zroot / "gain").rglob("*") if p.is_file()
                       and p.name != "zarr.json")[0]
        _flip_byte(chunk, len(chunk.read_bytes()) // 2)
        for key in ("zarr.json", "gain/zarr.json", "gain/" + chunk.relative_to(
                zroot / "gain").as_posix()):
            r = client.get(f"/v1/products/{bad_zarr.id}/zarr/{key}")
            assert r.status_code == 409, (key, r.status_code, r.text[:200])
            assert "array gain" in r.json()["detail"]
        # the good one is served as before
        assert client.get(f"/v1/products/{good.id}/fits").status_code == 200
        assert client.get(f"/v1/products/{good.id}/zarr/zarr.json").status_code == 200
        # the integrity checker remembers verified versions: no re-hash per request
        checker = client.app.state.integrity
        n = checker.hashed_fits
        for _ in range(5):
            assert client.get(f"/v1/products/{good.id}/fits").status_code == 200
        assert checker.hashed_fits == n
    # sitiancal verify over the whole store finds both
    env = {"SITIANCAL_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "sitiancal.service.cli", "verify"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert out.count("sha256") >= 2 or (bad_fits.id in out and bad_zarr.id in out), out
    assert "Traceback" not in out
