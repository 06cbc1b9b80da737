"""Dataset registration over HTTP: input roots, symlinks, inventories, uploads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from simdata import small_dataset
from test_api_support import OP, TestClient, instant_job, make_settings, write_frame

from sitiancal.api.app import create_app
from sitiancal.service.datasets import InvalidSource, PathNotAllowed, check_source

LIMIT = 64 * 1024  # upload limit of the test app (bytes); a 16 x 24 frame is ~5.8 kB


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datasets")
    roots = tmp / "roots"
    sim, truth = small_dataset(roots / "sim")  # cached per session: may live elsewhere
    outside = tmp / "outside"
    for i in range(2):
        write_frame(outside / f"b{i}.fits", "bias", 0.0, seed=i)
    settings = make_settings(tmp, max_upload_bytes=LIMIT,
                             input_roots=[str(roots), str(sim.parent)])
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        yield {"client": client, "tmp": tmp, "roots": roots, "sim": sim, "truth": truth,
               "outside": outside, "settings": settings}


def register(client, source, camera="MST3", **extra):
    return client.post("/v1/datasets", json={"camera": camera, "source": source, **extra},
                       headers=OP)


def test_register_reads_the_inventory(env):
    client, truth = env["client"], env["truth"]
    r = register(client, str(env["sim"]), label="march")
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/datasets/{body['id']}"
    kinds = list(truth.frames["type"])
    assert body["counts"] == {k: kinds.count(k) for k in ("bias", "dark", "flat")}
    assert body["shape"] == list(truth.shape)
    assert body["exposure_times"]["dark"] == [0.0, 30.0, 120.0, 600.0]
    # truth.fits (float maps) sits next to the frames: it is the one rejection
    assert [Path(x["file"]).name for x in body["rejected"]] == ["truth.fits"]
    assert "no frame-type keyword" in body["rejected"][0]["reason"]
    assert body["label"] == "march" and body["camera"] == "MST3"
    assert body["supported_products"] == ["bias", "read_noise", "dark", "ptc", "gain",
                                          "linearity", "flat", "mask"]
    assert body["source"] == os.path.realpath(env["sim"])
    got = client.get(f"/v1/datasets/{body['id']}", headers=OP).json()
    assert got == body
    listed = client.get("/v1/datasets", params={"camera": "MST3"}, headers=OP).json()
    assert body["id"] in [d["id"] for d in listed["datasets"]]
    assert client.get("/v1/datasets", params={"camera": "OTHER"}).json() == {"datasets": []}


def test_path_traversal_is_refused_after_resolution(env):
    client, roots = env["client"], env["roots"]
    sneaky = f"{roots}/sim/../../outside"
    r = register(client, sneaky)
    assert r.status_code == 403
    assert "outside the input roots" in r.json()["detail"]
    assert str(env["outside"]) in r.json()["detail"]
    r = register(client, str(env["outside"]))
    assert r.status_code == 403
    r = register(client, "/etc")
    assert r.status_code == 403


def test_symlinks_escaping_the_roots_are_refused(env):
    client, roots, outside = env["client"], env["roots"], env["outside"]
    link = roots / "link-to-outside"
    link.symlink_to(outside, target_is_directory=True)
    r = register(client, str(link))
    assert r.status_code == 403
    assert "resolves to" in r.json()["detail"]
    planted = roots / "planted"
    write_frame(planted / "ok.fits", "bias", 0.0)
    (planted / "evil.fits").symlink_to(outside / "b0.fits")
    r = register(client, str(planted))
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert "evil.fits" in detail and "symbolic link" in detail
    # a link that stays inside the roots is fine
    inside = roots / "inside"
    inside.mkdir()
    (inside / "b.fits").symlink_to(planted / "ok.fits")
    (inside / "b2.fits").symlink_to(planted / "ok.fits")
    assert register(client, str(inside)).status_code == 201


@pytest.mark.parametrize(("source", "status", "words"), [
    ("relative/path", 422, "absolute path"),
    ("/no/such\x00dir", 422, "NUL"),
    ("s3://bucket/raw", 403, "not under any input root"),
])
def test_bad_sources(env, source, status, words):
    r = register(env["client"], source)
    assert r.status_code == status
    assert words in r.json()["detail"]


def test_missing_folder_inside_the_roots(env):
    r = register(env["client"], str(env["roots"] / "nope"))
    assert r.status_code == 422
    assert "no such file or folder" in r.json()["detail"]


def test_a_dataset_without_usable_frames_lists_every_reason(env):
    client, roots = env["client"], env["roots"]
    bad = roots / "bad"
    write_frame(bad / "light.fits", "bias", 1.0, header={"IMAGETYP": "LIGHT"})
    write_frame(bad / "notype.fits", "bias", 0.0, header={"IMAGETYP": "WHATEVER"})
    (bad / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    r = register(client, str(bad))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("no usable frame in")
    for name in ("light.fits", "notype.fits", "broken.fits"):
        assert name in detail
    empty = roots / "empty"
    empty.mkdir()
    r = register(client, str(empty))
    assert r.status_code == 422 and "no FITS files found" in r.json()["detail"]


@pytest.mark.parametrize(("body", "words"), [
    ({"camera": "MST3"}, "body.source: Field required"),
    ({"camera": "MST3", "source": None, "colour": "red"}, "body.colour: Extra inputs"),
    ({"camera": "bad name/..", "source": None}, "body.camera: String should match"),
    ({"camera": "caméra", "source": None}, "body.camera"),
    ({"camera": 12, "source": None}, "body.camera"),
    ({"camera": "MST3", "source": 5}, "body.source"),
])
def test_malformed_requests_are_422(env, body, words):
    r = env["client"].post("/v1/datasets", json=body, headers=OP)
    assert r.status_code == 422
    assert words in r.json()["detail"]


def test_unknown_dataset_is_404(env):
    r = env["client"].get("/v1/datasets/%E2%80%AE..%00", headers=OP)
    assert r.status_code == 404
    assert "unknown dataset" in r.json()["detail"]
    r = env["client"].get("/v1/datasets/..%2F..%2Fetc", headers=OP)
    assert r.status_code == 404
    assert "no endpoint" in r.json()["detail"]


# -- uploads -------------------------------------------------------------------------------
@pytest.fixture
def upload_dataset(env):
    r = register(env["client"], None, label="uploads")
    assert r.status_code == 201
    assert r.json()["counts"] == {"bias": 0, "dark": 0, "flat": 0}
    return r.json()["id"]


def _frame_bytes(tmp: Path, name: str, kind: str, exptime: float, seed: int, **kw) -> bytes:
    return write_frame(tmp / "frames" / name, kind, exptime, seed=seed, **kw).read_bytes()


def test_upload_raw_and_multipart(env, upload_dataset):
    client, tmp = env["client"], env["tmp"]
    url = f"/v1/datasets/{upload_dataset}/frames"
    raw = _frame_bytes(tmp, "a.fits", "bias", 0.0, 1)
    r = client.post(url, content=raw, params={"filename": "../../a.fits"},
                    headers={**OP, "Content-Type": "application/fits"})
    assert r.status_code == 201, r.text
    assert r.json()["counts"]["bias"] == 1
    second = _frame_bytes(tmp, "b.fits", "bias", 0.0, 2)
    r = client.post(url, files={"file": ("b.fits", io.BytesIO(second), "application/fits")},
                    data={"note": "x"}, headers=OP)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["counts"]["bias"] == 2
    assert body["supported_products"] == ["bias", "read_noise", "mask"]
    dataset = client.app.state.sitiancal.catalog.get_dataset(upload_dataset)
    paths = [Path(f.path) for f in dataset.frames]
    upload_dir = Path(env["settings"].data_dir).resolve() / "uploads" / upload_dataset
    assert all(p.parent == upload_dir for p in paths)  # '../../a.fits' stayed inside
    import hashlib

    assert dataset.frames[0].sha256 == hashlib.sha256(raw).hexdigest()


def test_rejected_upload_leaves_the_dataset_unchanged(env, upload_dataset):
    client, tmp = env["client"], env["tmp"]
    url = f"/v1/datasets/{upload_dataset}/frames"
    light = _frame_bytes(tmp, "l.fits", "bias", 1.0, 3, header={"IMAGETYP": "LIGHT"})
    r = client.post(url, content=light, headers=OP)
    assert r.status_code == 422
    assert "not a calibration frame" in r.json()["detail"] or "LIGHT" in r.json()["detail"]
    assert client.get(f"/v1/datasets/{upload_dataset}").json()["counts"]["bias"] == 0
    folder = Path(env["settings"].data_dir) / "uploads" / upload_dataset
    assert list(folder.iterdir()) == []


def test_oversize_uploads_are_413_and_leave_nothing(env, upload_dataset):
    client = env["client"]
    url = f"/v1/datasets/{upload_dataset}/frames"
    big = b"\0" * (LIMIT + 1)
    r = client.post(url, content=big, headers=OP)  # Content-Length says it all
    assert r.status_code == 413
    assert f"limit of {LIMIT} bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is checked while streaming
        for _ in range(2 * LIMIT // 4096):
            yield b"\0" * 4096

    r = client.post(url, content=chunks(), headers=OP)
    assert r.status_code == 413
    r = client.post(url, files={"file": ("x.fits", io.BytesIO(big * 2), "application/fits")},
                    headers=OP)
    assert r.status_code == 413
    folder = Path(env["settings"].data_dir) / "uploads" / upload_dataset
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize(("content", "headers", "status", "words"), [
    (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported content type"),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--xyz--\r\n",
     {"Content-Type": "multipart/form-data; boundary=xyz"}, 400, "no file part"),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n123",
     {"Content-Type": "multipart/form-data; boundary=xyz"}, 400, "ends inside the file part"),
    (b"abc", {"Content-Type": "multipart/form-data"}, 400, "boundary"),
    (b"", {"Content-Type": "application/fits"}, 400, "empty"),
])
def test_malformed_uploads(env, upload_dataset, content, headers, status, words):
    r = env["client"].post(f"/v1/datasets/{upload_dataset}/frames", content=content,
                           headers={**OP, **headers})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_upload_into_a_registered_folder_is_409(env):
    source = env["roots"] / "regd"
    write_frame(source / "b.fits", "bias", 0.0)
    ds = register(env["client"], str(source)).json()["id"]
    r = env["client"].post(f"/v1/datasets/{ds}/frames", content=b"x", headers=OP)
    assert r.status_code == 409
    assert "source" in r.json()["detail"]
    assert env["client"].post("/v1/datasets/nope/frames", content=b"x",
                              headers=OP).status_code == 404


# -- the root checks themselves ------------------------------------------------------------
def test_check_source_for_url_roots(tmp_path):
    roots = ["s3://bucket/raw", str(tmp_path)]
    assert check_source("s3://bucket/raw/mst3/", roots) == "s3://bucket/raw/mst3"
    assert check_source("S3://bucket/raw", roots) == "s3://bucket/raw"
    for bad in ("s3://bucket/raw2/x", "s3://bucket/raw/../secret", "s3://bucket/raw//x",
                "s3://other/raw/x", "gs://bucket/raw/x"):
        with pytest.raises(PathNotAllowed):
            check_source(bad, roots)
    with pytest.raises(PathNotAllowed, match="no input roots"):
        check_source(str(tmp_path), [])
    with pytest.raises(InvalidSource):
        check_source("file://relative", roots)
    assert check_source(f"file://{tmp_path}", roots) == os.path.realpath(tmp_path)


def test_register_with_types_from_paths(env):
    # frames without IMAGETYP in folders named by type (older SharpCap)
    from astropy.io import fits

    client, root = env["client"], env["roots"] / "untyped"
    for kind, folder, t in (("bias", "Bias", 0.0), ("dark", "Darks", 60.0), ("flat", "Flats", 2.0)):
        for i in range(2):
            path = write_frame(root / folder / f"Capture_{i:04d}.fits", kind, t,
                               seed=10 * len(folder) + i)
            with fits.open(path, mode="update") as hdul:
                del hdul[0].header["IMAGETYP"]
    refused = register(client, str(root))
    assert refused.status_code == 422, refused.text
    assert "types_from_paths" in refused.text
    r = register(client, str(root), types_from_paths=True)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["counts"] == {"bias": 2, "dark": 2, "flat": 2}
    assert any("taken as dark from its path ('Darks')" in w for w in body["warnings"])
