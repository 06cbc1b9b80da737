"""The calibration job on the embedded default: publish, reuse, force, cancel, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner
from simdata import small_dataset

from sitiancal.service.cli import main
from sitiancal.service.pipeline import JobCancelled, calibrate, run_calibration_job
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.cube import open_cube
from sitiancal.storage.scan import scan
from sitiancal.storage.store import ProductStore


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out, _ = small_dataset(tmp_path_factory.mktemp("pipeline"))
    frames = out.parent / "frames"
    if not frames.exists():
        shutil.copytree(out, frames, ignore=shutil.ignore_patterns("truth.fits"))
    return frames


def test_calibrate_publishes_every_product_then_reuses_them(raw, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    first = calibrate(raw, "MST9", settings, export_dir=tmp_path / "export")
    # plain BZERO 32768 frames: the job's cube references them in place
    cube = open_cube(f"{settings.cube_store_url}/{first.dataset_id}.zarr")
    assert cube.attrs["layout"] == "virtual" and "frames" in cube
    catalog = Catalog.open(settings.catalog_url)
    try:
        products = catalog.list_products(camera="MST9")
        assert sorted(p.type for p in products) == sorted(
            ["bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask"])
        assert all(p.version == 1 and p.state == "candidate" for p in products)
        # provenance names every input frame with its sha256
        bias = next(p for p in products if p.type == "bias")
        inputs = catalog.product_inputs(bias.id)
        assert len(inputs) == 24 and all(len(i["sha256"]) == 64 for i in inputs)
        assert bias.provenance["params"]["clip_sigma"] == 3.0

        # The same inputs, parameters and code: reused, not duplicated.
        second = calibrate(raw, "MST9", settings)
        assert sorted(second.product_ids) == sorted(first.product_ids)
        assert len(catalog.list_products(camera="MST9")) == 8
        # Forced: new versions.
        calibrate(raw, "MST9", settings, wanted=["bias"], force=True)
        assert [p.version for p in catalog.list_products(camera="MST9", type="bias")] == [2, 1]
    finally:
        catalog.close()

    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["camera"] == "MST9" and report["figures"]["gain_conventional"]["value"] > 0
    with fits.open(tmp_path / "export" / "gain.fits") as hdul:
        assert hdul[0].header["BUNIT"] == "e-/ADU"
        assert hdul[0].header["PRODTYPE"] == "gain"
        assert "GAIN_ERR" in hdul


def test_a_cancelled_job_publishes_nothing_and_leaves_no_staging(raw, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    catalog = Catalog.open(settings.catalog_url)
    store = ProductStore(settings.product_store_url)
    try:
        dataset = catalog.add_dataset("MST8", scan(raw))
        job = catalog.create_job("MST8", dataset)
        stages: list[str] = []

        def progress(stage: str, fraction: float) -> None:
            stages.append(stage)

        with pytest.raises(JobCancelled):
            run_calibration_job(catalog=catalog, store=store, settings=settings, job_id=job.id,
                                progress=progress, cancelled=lambda: "products" in stages)
        assert catalog.list_products(camera="MST8") == []
        assert store.list_staging() == []
        assert not (Path(settings.data_dir) / "work" / job.id).exists()
    finally:
        catalog.close()



class _FailingStore(ProductStore):
    """A product store whose staging of one product type fails (disk error)."""

    fail_on = "gain"

    def stage(self, payload, version):
        if payload.type == self.fail_on:
            raise OSError(28, "No space left on device (test)")
        return super().stage(payload, version)


def _failing_job_leaves_nothing(raw: Path, tmp_path: Path, store_class: type, camera: str,
                                error: type, match: str) -> None:
    """Run a job that fails; nothing is published and no staging or work files remain."""
    settings = Settings(data_dir=tmp_path / "data")
    catalog = Catalog.open(settings.catalog_url)
    store = store_class(settings.product_store_url)
    try:
        job = catalog.create_job(camera, catalog.add_dataset(camera, scan(raw))).id
        with pytest.raises(error, match=match):
            run_calibration_job(catalog=catalog, store=store, settings=settings, job_id=job)
        assert catalog.list_products(camera=camera) == []
        assert store.list_staging() == []  # what was staged before the failure is discarded
        assert not (Path(settings.data_dir) / "work" / job).exists()
    finally:
        catalog.close()


def test_a_staging_failure_on_the_writer_thread_fails_the_job_and_leaves_nothing(raw, tmp_path):
    """Products are written on a background thread: its error reaches the job."""
    _failing_job_leaves_nothing(raw, tmp_path, _FailingStore, "MST7", OSError, "No space left")


def test_an_assembly_failure_while_a_product_is_being_written_leaves_nothing(
        raw, tmp_path, monkeypatch):
    """The write in flight when assembly fails is awaited and its staging discarded."""
    from sitiancal.compute import products

    def broken(self):
        raise RuntimeError("assembly failed (test)")

    monkeypatch.setattr(products.Assembler, "linearity", broken)
    _failing_job_leaves_nothing(raw, tmp_path, ProductStore, "MST6", RuntimeError,
                                "assembly failed")


def test_unknown_job_parameter_is_a_clear_error(raw, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match=r"unknown job parameter.*clip_sgima"):
        calibrate(raw, "MST7", settings, params={"clip_sgima": 4})


def test_calibrate_cli(raw, tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(raw), "--camera", "MST6", "--data-dir",
                                       str(tmp_path / "d"), "--products", "bias,read_noise",
                                       "--temperature-tolerance", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Bias level" in result.output and "2 products stored" in result.output
    bad = CliRunner().invoke(main, ["calibrate", str(tmp_path / "nowhere"), "--camera", "X",
                                    "--data-dir", str(tmp_path / "d"), "--no-progress"])
    assert bad.exit_code == 2
    assert "nowhere" in bad.output and "Traceback" not in bad.output


def test_calibrate_cli_types_from_paths(raw, tmp_path):
    # The same frames without IMAGETYP, in folders named by type under neutral
    # file names (older SharpCap): rejected unless asked, then the same products.
    from astropy.io import fits

    untyped = tmp_path / "untyped"
    folders = {"bias": "Bias", "dark": "Darks", "flat": "FlatField"}
    for i, path in enumerate(sorted(raw.glob("*.fits"))):
        with fits.open(path) as hdul:
            kind = str(hdul[0].header["IMAGETYP"]).split()[0].lower()
            del hdul[0].header["IMAGETYP"]
            (untyped / folders[kind]).mkdir(parents=True, exist_ok=True)
            hdul.writeto(untyped / folders[kind] / f"Capture_{i:04d}.fits")
    args = ["calibrate", str(untyped), "--camera", "MST4", "--data-dir", str(tmp_path / "d"),
            "--products", "bias,read_noise", "--no-progress"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "--types-from-paths" in refused.output
    result = CliRunner().invoke(main, [*args, "--types-from-paths", "--export",
                                       str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    reference = CliRunner().invoke(main, ["calibrate", str(raw), "--camera", "MST3",
                                          "--data-dir", str(tmp_path / "r"), "--products",
                                          "bias,read_noise", "--no-progress", "--export",
                                          str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    for name in ("bias.fits", "read_noise.fits"):
        np.testing.assert_array_equal(fits.getdata(tmp_path / "export" / name),
                                      fits.getdata(tmp_path / "reference" / name))


def test_the_flat_product_names_its_filter(raw, tmp_path):
    # flats through 'g', two more through 'r' (rejected at the scan, named):
    # the flat's stats and its FITS header say 'g'
    from astropy.io import fits

    filtered = tmp_path / "filtered"
    shutil.copytree(raw, filtered)
    flats = []
    for path in sorted(filtered.glob("*.fits")):
        with fits.open(path, mode="update") as hdul:
            if str(hdul[0].header["IMAGETYP"]).lower().startswith("flat"):
                hdul[0].header["FILTER"] = "g"
                flats.append(path)
    for i, path in enumerate(flats[:2]):
        with fits.open(path) as hdul:
            hdul[0].header["FILTER"] = "r"
            hdul[0].data = hdul[0].data // 2
            hdul.writeto(filtered / f"r_{i}.fits")
    run = calibrate(filtered, "MST2", Settings(data_dir=tmp_path / "d"), wanted=["flat"],
                    export_dir=tmp_path / "export")
    catalog = Catalog.open(Settings(data_dir=tmp_path / "d").catalog_url)
    try:
        flat = catalog.get_product(run.product_ids[0])
        assert flat.stats["filter"] == "g"
        dataset = catalog.get_dataset(run.dataset_id)
    finally:
        catalog.close()
    assert fits.getheader(tmp_path / "export" / "flat.fits")["FILTER"] == "g"
    reasons = [r["reason"] for r in dataset.inventory["rejected"]]
    assert sum("flat with filter 'r'" in r for r in reasons) == 2


def test_verify_the_whole_store_detects_a_corrupted_chunk(raw, tmp_path):
    data = tmp_path / "d"
    calibrate(raw, "MST5", Settings(data_dir=data), wanted=["bias", "flat"])
    ok = CliRunner().invoke(main, ["verify", "--data-dir", str(data)])
    assert ok.exit_code == 0, ok.output
    assert "2 product versions verified, 0 with problems" in ok.output
    flat = data / "store" / "products" / "MST5" / "flat"
    chunk = next(p for p in flat.rglob("*") if p.is_file() and "c" in p.relative_to(flat).parts)
    raw_bytes = bytearray(chunk.read_bytes())
    raw_bytes[len(raw_bytes) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw_bytes))
    bad = CliRunner().invoke(main, ["verify", "--data-dir", str(data)])
    assert bad.exit_code == 1
    assert "1 with problems" in bad.output


class _GatedStore:
    """A store whose writes wait for a gate; records what it staged and discarded."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.staged: list[str] = []
        self.discarded: list[str] = []

    def stage(self, payload, version):
        assert self.gate.wait(30), "the test never opened the gate"
        self.staged.append(payload.name)
        return payload.name

    def discard(self, item) -> None:
        self.discarded.append(item)


def _payload(name: str, resident: int):
    import numpy as np

    from sitiancal.compute.content import ProductArray, ScaledMap

    data = np.zeros(resident, np.uint8) if resident else ScaledMap(np.zeros((2, 2)), 2.0)
    return SimpleNamespace(name=name, arrays=[ProductArray("A", data, "", "")])


def test_staging_writer_bounds_the_bytes_waiting_in_memory():
    """Lazy products queue freely; in-memory arrays wait once the budget is used."""
    import threading

    from sitiancal.service.pipeline import _StagingWriter

    store = _GatedStore()
    writer = _StagingWriter(store, inflight_bytes=100)
    try:
        assert writer.submit(_payload("a", 80), 1) == []   # 80 bytes waiting
        assert writer.submit(_payload("b", 0), 1) == []    # lazy: free
        handed: list = []
        third = threading.Thread(target=lambda: handed.extend(writer.submit(_payload("c", 80), 1)))
        third.start()
        third.join(0.3)
        assert third.is_alive()                            # 80 + 80 > 100: waits for "a"
        store.gate.set()
        third.join(10)
        assert not third.is_alive()
        assert [p.name for _, p in handed] == ["a", "b"]  # finished: handed over
        assert [p.name for _, p in writer.drain()] == ["c"]
        assert store.staged == ["a", "b", "c"]
    finally:
        store.gate.set()
        writer.close()
    assert store.discarded == []                           # all were handed over


def test_staging_writer_close_discards_what_was_not_handed_over():
    from sitiancal.service.pipeline import _StagingWriter

    store = _GatedStore()
    store.gate.set()
    writer = _StagingWriter(store)
    handed = writer.submit(_payload("a", 10), 1) + writer.submit(_payload("b", 0), 1)
    writer.close()  # the job failed: the caller discards what it was handed, close the rest
    assert sorted(store.discarded + [item for item, _ in handed]) == ["a", "b"]
    assert not set(store.discarded) & {item for item, _ in handed}


def test_a_job_runs_its_own_blas_calls_on_one_thread(raw, tmp_path, monkeypatch):
    """The job's small BLAS calls (mixtures, spline systems) run single-threaded, so idle
    OpenBLAS workers do not spin on the kernels' cores; the setting ends with the job."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from sitiancal.compute import products

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    seen: list[list[int]] = []
    original = products.Assembler.gain

    def recording(self):
        seen.append(blas_threads())
        return original(self)

    monkeypatch.setattr(products.Assembler, "gain", recording)
    with threadpool_limits(limits=2, user_api="blas"):  # the process's setting, any machine
        before = blas_threads()
        calibrate(raw, "MST5", Settings(data_dir=tmp_path / "data"))
        after = blas_threads()
    assert before and set(before) == {2}
    assert seen and seen[0] == [1] * len(before)
    assert after == before


def test_scratch_map_sink_writes_every_chunk(tmp_path: Path) -> None:
    """Tile maps, all-NaN ones included, are stored chunk for chunk and read back as written."""
    import numpy as np

    from sitiancal.compute.tile import TileResult
    from sitiancal.service.pipeline import ZarrMapSink

    sink = ZarrMapSink(tmp_path / "maps", shape=(6, 8), tile=(3, 8),
                       expected={"gain": (), "lin_resid": (2,)})
    top = np.arange(24, dtype=np.float32).reshape(3, 8)
    nan = np.full((3, 8), np.nan, np.float32)
    sink(slice(0, 3), slice(0, 8), TileResult({"gain": top, "lin_resid": np.stack([top, nan])}, {}))
    sink(slice(3, 6), slice(0, 8), TileResult({"gain": nan, "lin_resid": np.stack([nan, top])}, {}))
    maps = sink.maps()
    np.testing.assert_array_equal(maps["gain"][:], np.concatenate([top, nan]))
    np.testing.assert_array_equal(maps["lin_resid"][:], np.stack([np.concatenate([top, nan]),
                                                                  np.concatenate([nan, top])]))
    stored = sorted(p.relative_to(tmp_path / "maps").as_posix()
                    for p in (tmp_path / "maps").rglob("*") if p.is_file() and "c" in p.parts)
    assert stored == ["gain/c/0/0", "gain/c/1/0", "lin_resid/c/0/0/0", "lin_resid/c/0/1/0",
                      "lin_resid/c/1/0/0", "lin_resid/c/1/1/0"]
