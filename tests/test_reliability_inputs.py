"""Bad input, end to end: every case of the corpus gives its reason and changes nothing stored.

- The whole bad-input corpus (``fitscorpus``: truncated, empty, not FITS, no
  image HDU, scaled BITPIX, 3-D, wrong shape,
  a duplicated frame, negative, missing, unparsable or contradictory exposure,
  unknown or contradictory frame type, mixed GAIN or OFFSET, unparsable
  DATE-OBS, mixed temperatures) registered through the HTTP API: the dataset
  report names each file with its specific reason or warning.
- Sets the scan accepts but the calibration cannot fully use (saturated flat
  levels, a flat ladder that never leaves the read-noise regime, too few frames
  per level for per-pixel products), run through ``calibrate``: each missing
  product comes with its specific reason.
- Tile-compressed and gzip frames, counts written as 32/64-bit integers
  or floating point, and frames stored as one-plane cubes (NAXIS3 = 1), are
  read end to end: scan, cube and calibration give the
  same products as the same frames uncompressed in 16 bits.

Each time, the catalog rows and store files that existed before are compared
with those after: nothing already stored changes.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from fitscorpus import STATE, write_corpus, write_fits
from simdata import small_dataset
from test_api_support import (
    OP,
    TestClient,
    instant_job,
    make_settings,
    publish_product,
    wait_for,
)

from sitiancal.api.app import create_app
from sitiancal.service.pipeline import calibrate
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductStore

SHAPE = (24, 40)


class Snapshot:
    """Every catalog row (SQLite) and every store file (sha256) at one moment."""

    def __init__(self, settings: Settings) -> None:
        db = Path(settings.data_dir) / "catalog.sqlite"
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            self.rows = {t: {repr(row) for row in conn.execute(f'SELECT * FROM "{t}"')}
                         for t in tables}
        store = Path(settings.data_dir) / "store"
        self.files = {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in store.rglob("*") if p.is_file()} if store.exists() else {}

    def assert_kept_in(self, later: Snapshot) -> None:
        """Every row and file of this snapshot is still there, unchanged, in ``later``."""
        for table, rows in self.rows.items():
            lost = rows - later.rows.get(table, set())
            assert not lost, f"catalog table {table}: rows changed or removed: {sorted(lost)[:3]}"
        changed = {k for k, v in self.files.items() if later.files.get(k) != v}
        assert not changed, f"store files changed or removed: {sorted(changed)[:5]}"


def _existing_state(settings: Settings) -> Snapshot:
    """A catalog and store holding a published product and a dataset, as a live service has."""
    with Catalog.open(settings.catalog_url) as catalog:
        publish_product(catalog, ProductStore(settings.product_store_url), camera="KEEP")
        catalog.add_dataset("KEEP", {"source": "/data/KEEP", "frames": []})
    return Snapshot(settings)


def test_every_bad_file_is_reported_with_its_reason_and_nothing_stored_changes(tmp_path):
    settings = make_settings(tmp_path)
    folder = tmp_path / "roots" / "corpus"
    files = write_corpus(folder, SHAPE, seed=11)
    # a bias frame 6 C warmer than the rest: the temperature spread is reported;
    # a dark as warm is rejected (a dark rate is per temperature)
    write_fits(folder / "warm/bias_warm.fits", np.full(SHAPE, 510, np.uint16),
               {**STATE, "IMAGETYP": "BIAS", "EXPTIME": 0.0, "CCD-TEMP": -4.0,
                "DATE-OBS": "2026-03-14T13:00:00"})
    write_fits(folder / "warm/dark_warm.fits", np.full(SHAPE, 520, np.uint16),
               {**STATE, "IMAGETYP": "DARK", "EXPTIME": 10.0, "CCD-TEMP": -4.0,
                "DATE-OBS": "2026-03-14T13:01:00"})
    before = _existing_state(settings)
    app = create_app(settings, job_function=instant_job, use_dask=False)
    with TestClient(app) as client:
        r = client.post("/v1/datasets", json={"camera": "BAD", "source": str(folder)},
                        headers=OP)
        assert r.status_code == 201, r.text
        report = client.get(f"/v1/datasets/{r.json()['id']}").json()
    rejected = {str(Path(x["file"]).relative_to(folder.resolve())): x["reason"]
                for x in report["rejected"]}
    bad = [f for f in files if f.kind == "bad"]
    assert len(bad) >= 21
    for f in bad:
        assert f.name in rejected, f"{f.name} was not rejected"
        assert f.reason in rejected[f.name], (f.name, rejected[f.name])
    assert rejected.pop("warm/dark_warm.fits").startswith(
        "dark at -4.0 C; the set's darks are at -10.1 .. -10.0 C")
    assert len(rejected) == len(bad)
    warnings = "\n".join(report["warnings"])
    for f in files:
        if f.warning:  # accepted with a reason to worry: unparsable DATE-OBS, no EXPTIME...
            assert f.warning in warnings and f.name in warnings, f.warning
    assert "unparsable DATE-OBS='14/03/26'" in warnings
    assert "sensor temperature spans -10.10 .. -4.00 C" in warnings
    before.assert_kept_in(Snapshot(settings))


def _write_compressed_copy(src: Path, dst: Path) -> dict[str, int]:
    """Copy the frames of ``src``: bias tile-compressed (RICE), darks gzip, flats alternating."""
    dst.mkdir(parents=True)
    kinds = {"tile": 0, "gzip": 0}
    for k, path in enumerate(sorted(p for p in src.glob("*.fits") if p.name != "truth.fits")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        kind = header.get("IMAGETYP", "").lower()
        tile = "bias" in kind or ("flat" in kind and k % 2 == 0)
        if tile:
            for card in ("BZERO", "BSCALE"):
                header.remove(card, ignore_missing=True)
            fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(
                data, header=header, compression_type="RICE_1")]).writeto(
                dst / (path.stem + ".fz"))
            kinds["tile"] += 1
        else:
            (dst / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            kinds["gzip"] += 1
    return kinds


def _write_wide_copy(src: Path, dst: Path) -> dict[str, int]:
    """Copy the frames of ``src`` with their counts as int32, int64, float32 and float64 in turn."""
    dst.mkdir(parents=True)
    kinds: dict[str, int] = {}
    types = (np.int32, np.int64, np.float32, np.float64)
    for k, path in enumerate(sorted(p for p in src.glob("*.fits") if p.name != "truth.fits")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        for card in ("BZERO", "BSCALE"):
            header.remove(card, ignore_missing=True)
        dtype = types[k % 4]
        fits.PrimaryHDU(data.astype(dtype), header=header).writeto(dst / path.name)
        kinds[np.dtype(dtype).name] = kinds.get(np.dtype(dtype).name, 0) + 1
    return kinds


def _write_plane_copy(src: Path, dst: Path) -> dict[str, int]:
    """Copy the frames of ``src`` as one-plane cubes (NAXIS3 = 1): uint16 and float32 in turn."""
    dst.mkdir(parents=True)
    kinds: dict[str, int] = {}
    for k, path in enumerate(sorted(p for p in src.glob("*.fits") if p.name != "truth.fits")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        for card in ("BZERO", "BSCALE"):
            header.remove(card, ignore_missing=True)
        dtype = (np.uint16, np.float32)[k % 2]
        fits.PrimaryHDU(data.astype(dtype)[np.newaxis], header=header).writeto(dst / path.name)
        kinds[np.dtype(dtype).name] = kinds.get(np.dtype(dtype).name, 0) + 1
    with fits.open(dst / path.name) as hdul:
        assert hdul[0].header["NAXIS"] == 3 and hdul[0].header["NAXIS3"] == 1
    return kinds


@pytest.mark.parametrize("layout", ["compressed", "wide", "planes"])
def test_compressed_or_wide_typed_frames_give_the_same_products(tmp_path, layout: str):
    sim, _ = small_dataset(tmp_path / "roots")
    packed = tmp_path / "roots" / "packed"
    if layout == "compressed":
        kinds = _write_compressed_copy(sim, packed)
        assert kinds["tile"] > 10 and kinds["gzip"] > 10
    elif layout == "wide":
        kinds = _write_wide_copy(sim, packed)
        assert min(kinds.values()) > 10 and len(kinds) == 4
    else:
        kinds = _write_plane_copy(sim, packed)
        assert min(kinds.values()) > 10 and len(kinds) == 2
    plain_settings = Settings(data_dir=tmp_path / "plain")
    packed_settings = Settings(data_dir=tmp_path / "packed-data")
    plain = calibrate(sim, "PLAIN", plain_settings)
    before = _existing_state(packed_settings)
    packed_run = calibrate(packed, "PACKED", packed_settings)
    with Catalog.open(plain_settings.catalog_url) as a, \
            Catalog.open(packed_settings.catalog_url) as b:
        inv_a, inv_b = (c.get_dataset(run.dataset_id).inventory for c, run in
                        ((a, plain), (b, packed_run)))
        assert inv_b["counts"] == inv_a["counts"] and inv_b["rejected"] == []
        if layout == "compressed":
            assert {f["compression"] for f in inv_b["frames"]} == {"gzip", "RICE_1"}
        elif layout == "wide":
            assert {f["bitpix"] for f in inv_b["frames"]} == {32, 64, -32, -64}
        else:
            assert {f["bitpix"] for f in inv_b["frames"]} == {16, -32}
        want = {p.type: p for p in map(a.get_product, plain.product_ids)}
        got = {p.type: p for p in map(b.get_product, packed_run.product_ids)}
    assert set(got) == set(want) and len(want) >= 6
    store_a = ProductStore(plain_settings.product_store_url)
    store_b = ProductStore(packed_settings.product_store_url)
    for kind, product in got.items():
        ga, gb = store_a.open_zarr(want[kind].store_key), store_b.open_zarr(product.store_key)
        assert sorted(gb.array_keys()) == sorted(ga.array_keys()), kind
        for name in ga.array_keys():
            np.testing.assert_array_equal(gb[name][...], ga[name][...], err_msg=f"{kind}/{name}")
        assert product.stats == want[kind].stats, kind
    before.assert_kept_in(Snapshot(packed_settings))


#: Sets the scan accepts whose flats the calibration cannot fully use.
FLAT_CASES = {
    "saturated flat levels": (
        {"flat_exptimes": [200.0, 300.0, 400.0, 500.0], "flat_frames": 6},
        {"flat": "no flat level below saturation: every one of the 4 levels",
         "ptc": "4 of the 4 flat levels have no temporal noise (saturated or clipped pixels)",
         "gain": "the dataset has 0 such levels",
         "linearity": "linearity needs at least three flat levels between"}),
    "flat ladder in the read-noise regime": (
        {"flat_exptimes": [0.0001, 0.0002, 0.0003, 0.0004], "flat_frames": 6},
        {name: "the flat ladder never leaves the read-noise regime" for name in
         ("ptc", "gain", "flat")}),
    "too few frames per level": (
        {"flat_frames": 2},
        {"gain": "per-pixel gain needs at least three flat levels below 70% of saturation "
                 "with >= 5 frames each (temporal statistics per pixel); the dataset has 0 "
                 "such levels (at most 2 frames per level)"}),
}


@pytest.mark.parametrize("case", list(FLAT_CASES))
def test_unusable_flats_give_specific_missing_reasons(tmp_path, case):
    config, reasons = FLAT_CASES[case]
    sim, _ = small_dataset(tmp_path / "roots", shape=(32, 40), n_bias=8, dark_frames=3,
                           **config)
    src = tmp_path / "roots" / "set"
    shutil.copytree(sim, src, ignore=shutil.ignore_patterns("truth.fits"))
    settings = make_settings(tmp_path)
    before = _existing_state(settings)
    run = calibrate(src, "FLATS", settings)
    missing = run.report["missing"]
    with Catalog.open(settings.catalog_url) as catalog:
        types = {catalog.get_product(pid).type for pid in run.product_ids}
        job = catalog.get_job(run.job_id)
    for name, reason in reasons.items():
        assert reason in missing.get(name, ""), (name, missing)
        assert name not in types
    assert {"bias", "read_noise", "dark"} <= types  # what does not need the flats
    assert job.state == "succeeded" and all(reason in (job.message or "")
                                            for reason in reasons.values())
    before.assert_kept_in(Snapshot(settings))


def _spoil(path: Path, dtype: type, value: float) -> None:
    """Rewrite ``path`` with its counts in ``dtype`` and ``value`` at pixel (3, 5)."""
    with fits.open(path) as hdul:
        data, header = hdul[0].data.astype(dtype), hdul[0].header.copy()
    for card in ("BZERO", "BSCALE"):
        header.remove(card, ignore_missing=True)
    data[3, 5] = value
    path.unlink()
    fits.PrimaryHDU(data, header=header).writeto(path)


def test_frames_refused_when_read_are_left_out_and_named(tmp_path):
    """A NaN in a float flat and a fraction in a float dark: the job leaves both out.

    Their headers are fine (the scan accepts them); only their pixels show that
    they are not raw counts. The products equal those of the set without the
    two files, and the job's message, the products' notes and the cube name
    each file with its reason.
    """
    sim, _ = small_dataset(tmp_path / "roots")
    spoilt, clean = tmp_path / "roots" / "spoilt", tmp_path / "roots" / "clean"
    shutil.copytree(sim, spoilt)
    shutil.copytree(sim, clean)
    names = sorted(p.name for p in sim.glob("*.fits") if p.name != "truth.fits")
    flat = next(n for n in names if "flat" in n.lower())
    dark = next(n for n in names if "dark" in n.lower())
    _spoil(spoilt / flat, np.float32, np.nan)
    _spoil(spoilt / dark, np.float64, 1000.5)
    for path in (clean / flat, clean / dark, clean / "truth.fits", spoilt / "truth.fits"):
        path.unlink()
    clean_settings = Settings(data_dir=tmp_path / "clean-data")
    spoilt_settings = Settings(data_dir=tmp_path / "spoilt-data")
    want_run = calibrate(clean, "CLEAN", clean_settings)
    before = _existing_state(spoilt_settings)
    got_run = calibrate(spoilt, "SPOILT", spoilt_settings)

    reasons = {flat: "non-finite value nan at pixel (3, 5) in floating-point data",
               dark: "non-integer value 1000.5 at pixel (3, 5) in floating-point data"}
    with Catalog.open(spoilt_settings.catalog_url) as catalog:
        # the headers were fine; once read, the dataset rejects both files, with the reasons
        inventory = catalog.get_dataset(got_run.dataset_id).inventory
        assert inventory["rejected"] == [
            {"file": str(spoilt / name), "reason": f"refused when read: {why}: not raw counts"}
            for name, why in sorted(reasons.items())]
        assert {f["path"] for f in inventory["frames"]} == {str(spoilt / p.name) for p in
                                                            clean.glob("*.fits")}
        with Catalog.open(clean_settings.catalog_url) as clean_catalog:
            clean_inventory = clean_catalog.get_dataset(want_run.dataset_id).inventory
        for key in ("counts", "exposure_times", "temperature", "shape"):
            assert inventory[key] == clean_inventory[key], key
        assert {f.path for f in catalog.get_dataset(got_run.dataset_id).frames} == {
            f["path"] for f in inventory["frames"]}
        message = catalog.get_job(got_run.job_id).message
        products = [catalog.get_product(i) for i in got_run.product_ids]
    for name, why in reasons.items():
        line = f"{spoilt / name} left out: refused when read: {why}"
        assert line in message
        assert all(any(n.startswith(line) for n in p.provenance["notes"]) for p in products)
        assert any(n.startswith(line) for n in got_run.report["notes"])
    with Catalog.open(clean_settings.catalog_url) as catalog:
        want = {p.type: p for p in map(catalog.get_product, want_run.product_ids)}
    got = {p.type: p for p in products}
    assert set(got) == set(want) and len(want) >= 6
    store_a = ProductStore(clean_settings.product_store_url)
    store_b = ProductStore(spoilt_settings.product_store_url)
    for kind, product in got.items():
        ga, gb = store_a.open_zarr(want[kind].store_key), store_b.open_zarr(product.store_key)
        for name in ga.array_keys():
            np.testing.assert_array_equal(gb[name][...], ga[name][...], err_msg=f"{kind}/{name}")
        assert product.stats == want[kind].stats, kind
    before.assert_kept_in(Snapshot(spoilt_settings))


def test_uploads_after_a_job_are_in_the_next_jobs_cube_and_refused_frames_stay_rejected(tmp_path):
    """An upload dataset calibrated, then given one more frame, then calibrated again.

    The first job's cube leaves out a float bias holding a NaN (its header is
    fine): the dataset then lists it as rejected, with the reason, and a later
    upload (which scans the upload folder again) does not bring it back. The
    second job's cube is built again with the frame uploaded since (the cube of
    the first job, kept for the dataset, lacked it): its products list it among
    their inputs.
    """
    sim, _ = small_dataset(tmp_path / "roots", n_bias=6, dark_exptimes=[0.0, 60.0],
                           dark_frames=3, flat_levels=4, flat_frames=4)
    names = sorted(p.name for p in sim.glob("*.fits") if p.name != "truth.fits")
    later = next(n for n in names if "bias" in n.lower())
    spoilt = tmp_path / "spoilt" / "nan-bias.fits"
    spoilt.parent.mkdir()
    shutil.copy(sim / later, spoilt)
    _spoil(spoilt, np.float32, np.nan)
    settings = make_settings(tmp_path, max_upload_bytes=1 << 20)

    def upload(path: Path) -> dict:
        r = client.post(f"/v1/datasets/{dataset}/frames", params={"filename": path.name},
                        content=path.read_bytes(), headers=OP)
        assert r.status_code == 201, r.text
        return r.json()

    def run_job() -> dict:
        r = client.post("/v1/jobs", json={"camera": "UP1", "dataset": dataset}, headers=OP)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=OP).json())
                        ["state"] in ("succeeded", "failed") and j, timeout=120)

    with TestClient(create_app(settings, use_dask=False)) as client:
        r = client.post("/v1/datasets", json={"camera": "UP1", "source": None}, headers=OP)
        dataset = r.json()["id"]
        for name in names:
            if name != later:
                upload(sim / name)
        body = upload(spoilt)
        assert body["counts"]["bias"] == 6 and body["rejected"] == []
        catalog = client.app.state.sitiancal.catalog
        uploaded_nan = next(f.path for f in catalog.get_dataset(dataset).frames
                            if f.path.endswith("nan-bias.fits"))
        first = run_job()
        assert first["state"] == "succeeded", first
        assert "nan-bias.fits left out" in first["message"]
        body = client.get(f"/v1/datasets/{dataset}", headers=OP).json()
        assert body["rejected"] == [{"file": uploaded_nan, "reason": "refused when read: "
                                     "non-finite value nan at pixel (3, 5) in floating-point data: "
                                     "not raw counts"}]
        assert body["counts"]["bias"] == 5

        body = upload(sim / later)
        assert body["counts"]["bias"] == 6 and [r["file"] for r in body["rejected"]] == [
            uploaded_nan]
        uploaded_later = next(f.path for f in catalog.get_dataset(dataset).frames
                              if f.path.endswith(later))
        second = run_job()
        assert second["state"] == "succeeded", second
        bias = next(p for p in map(catalog.get_product, second["products"]) if p.type == "bias")
        inputs = {i["path"] for i in catalog.product_inputs(bias.id)}
        assert uploaded_later in inputs and uploaded_nan not in inputs
        assert len([p for p in inputs if "bias" in Path(p).name.lower()]) == 6
