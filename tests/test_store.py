"""Product store tests, run on a local folder and on a moto S3 server (``store_url``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import zarr

from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import (
    MAP_CHUNKS,
    ProductArray,
    ProductExists,
    ProductMissing,
    ProductPayload,
    ProductStore,
    ProductTable,
    content_key,
    default_chunks,
)

SEED = 20260314


def payload(seed: int = SEED, shape: tuple[int, int] = (30, 40), camera: str = "MST3",
            kind: str = "gain") -> ProductPayload:
    rng = np.random.default_rng(seed)
    gain = rng.normal(0.253, 0.004, shape).astype(np.float32)
    return ProductPayload(
        camera=camera, type=kind,
        arrays=[ProductArray("gain", gain, "e-/ADU", "per-pixel gain"),
                ProductArray("gain_err", np.full(shape, 0.004, np.float32), "e-/ADU",
                             "1-sigma gain uncertainty"),
                ProductArray("npix", np.arange(shape[1], dtype=np.int32), "1", "count",
                             dims=("x",))],
        tables=[ProductTable("levels", {"level": np.arange(4), "mean": np.linspace(1e3, 4e4, 4),
                                        "label": np.array(["a", "bb", "ccc", "dddd"])},
                             {"mean": "ADU"}, "flat levels")],
        stats={"gain_median": float(np.median(gain))},
        inputs=[{"path": f"/data/f{i}.fits", "sha256": f"{i:064x}"} for i in range(3)],
        date_beg=datetime(2026, 3, 14, 1, tzinfo=UTC), date_end=datetime(2026, 3, 14, 3, tzinfo=UTC),
        params={"levels_below": 0.7}, code_version="0.1.0-test")


@pytest.fixture
def store(store_url: str, store_options: dict) -> ProductStore:
    return ProductStore(store_url, store_options)


def test_stage_then_publish_round_trip(store: ProductStore) -> None:
    p = payload()
    staged = store.stage(p, 1)
    assert staged.key.startswith("staging/") and store.list_staging() == [staged.key]
    assert not store.exists("products/MST3/gain/v0001")  # nothing visible before publishing
    key = store.publish(staged)
    assert key == "products/MST3/gain/v0001"
    assert store.list_staging() == []
    np.testing.assert_array_equal(store.read_region(key, "gain", slice(5, 17), slice(3, 29)),
                                  p.arrays[0].data[5:17, 3:29])
    ds = store.open_dataset(key)
    assert ds["gain"].attrs == {"units": "e-/ADU", "long_name": "per-pixel gain"}
    assert ds["npix"].dims == ("x",)
    np.testing.assert_array_equal(ds["gain_err"].values, p.arrays[1].data)
    table = store.read_table(key, "levels")
    assert list(table) == ["level", "mean", "label"]
    assert table["label"].tolist() == ["a", "bb", "ccc", "dddd"]
    group = store.open_zarr(key)
    assert group.attrs["sitiancal"]["version"] == 1
    assert group.attrs["sitiancal"]["content_key"] == p.content_key
    assert group.attrs["checksums"] == staged.checksums.to_dict()
    assert set(staged.checksums.arrays) == {"gain", "gain_err", "npix", "tables/levels/label",
                                            "tables/levels/level", "tables/levels/mean"}
    assert store.verify(key, staged.checksums).ok
    with pytest.raises(ProductMissing):
        store.open_zarr("products/MST3/gain/v0099")


def test_published_versions_are_immutable(store: ProductStore) -> None:
    key = store.publish(store.stage(payload(), 1))
    before = store.fits_bytes(key)
    other = store.stage(payload(seed=1), 1)  # same version number, different content
    with pytest.raises(ProductExists, match="immutable"):
        store.publish(other)
    assert store.fits_bytes(key) == before
    assert store.verify(key).ok
    store.discard(other)
    assert store.list_staging() == []
    group = store.open_zarr(key)
    with pytest.raises((ValueError, PermissionError, OSError)):
        group["gain"][0, 0] = 1.0  # opened read-only
    with pytest.raises(ValueError, match="not a staging key"):
        store.discard(key)


def _flip_one_byte(store: ProductStore, path: str) -> None:
    blob = bytearray(store.fs.cat_file(path))
    blob[len(blob) // 2] ^= 0x01
    store.fs.pipe_file(path, bytes(blob))
    store.fs.invalidate_cache()


def test_verify_detects_a_corrupted_chunk_and_fits(store: ProductStore) -> None:
    staged = store.stage(payload(), 1)
    key = store.publish(staged)
    _flip_one_byte(store, store._path(key, "product.zarr", "gain", "c", "0", "0"))
    report = store.verify(key, staged.checksums)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith("array gain: sha256")
    _flip_one_byte(store, store._path(key, "product.fits"))
    report = store.verify(key, staged.checksums)
    assert [p.split(":")[0] for p in report.problems] == ["product.fits", "array gain"]


def test_failed_write_leaves_no_staging(store: ProductStore) -> None:
    class Exploding:
        """Array-like that fails on its second chunk, as a crashed computation would."""

        shape = (1700, 20)
        dtype = np.dtype(np.float32)

        def __init__(self) -> None:
            self.calls = 0

        def __getitem__(self, item):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("worker died")
            return np.zeros((1597, 20), np.float32)

    bad = payload()
    bad.arrays[0] = ProductArray("gain", Exploding(), "e-/ADU", "per-pixel gain")
    with pytest.raises(RuntimeError, match="worker died"):
        store.stage(bad, 1)
    assert store.list_staging() == []
    assert not store.exists("products")


def test_failed_fits_write_leaves_no_staging(store: ProductStore, monkeypatch) -> None:
    """The FITS file is written on a second thread beside the chunks: its failure fails the stage."""
    import sitiancal.storage.export as export

    real = export.write_fits

    def failing(group, path, *, sources=None, settle=True):
        real(group, path, sources=sources, settle=settle)  # a partial file exists when the error comes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_fits", failing)
    with pytest.raises(OSError, match="No space left"):
        store.stage(payload(), 1)
    assert store.list_staging() == []
    monkeypatch.setattr(export, "write_fits", real)
    staged = store.stage(payload(), 1)  # and the store works on afterwards
    assert store.list_staging() == [staged.key]


class CountingMap:
    """Array-like over ``values`` that counts the values served (a map read from disk)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.shape = values.shape
        self.dtype = values.dtype
        self.served = 0

    def __getitem__(self, region):
        out = self.values[region]
        self.served += out.size
        return out


def test_stage_reads_each_band_once_for_the_chunks_and_the_fits(store: ProductStore) -> None:
    """Staging reads a map once: each band read for the zarr chunks feeds the FITS writer too."""
    import io

    from sitiancal.storage.export import build_hdulist

    rng = np.random.default_rng(SEED)
    ny = 2 * MAP_CHUNKS[0] + 101  # three bands of chunk rows, the last one partial
    single = CountingMap(rng.normal(0.253, 0.004, (ny, 30)).astype(np.float32))
    stack = CountingMap(rng.normal(0, 1, (3, MAP_CHUNKS[0] + 7, 30)).astype(np.float32))
    p = payload()
    p.arrays[0] = ProductArray("gain", single, "e-/ADU", "per-pixel gain")
    p.arrays[1] = ProductArray("resid", stack, "%", "residual per level",
                               dims=("level", "y", "x"))
    key = store.publish(store.stage(p, 1))
    assert single.served == single.values.size  # every value once, not once per copy
    assert stack.served == stack.values.size
    buffer = io.BytesIO()
    build_hdulist(store.open_zarr(key)).writeto(buffer, output_verify="exception")
    assert store.fits_bytes(key) == buffer.getvalue()
    assert store.verify(key).ok
    np.testing.assert_array_equal(store.open_zarr(key)["resid"][...], stack.values)


def test_staging_hashes_the_chunks_as_written_not_read_back(store: ProductStore,
                                                           monkeypatch) -> None:
    """The checksums of a product's arrays come from their chunks on their way to the store
    (only the tables' small arrays are read back), and equal a read-back's."""
    read_back: list[str] = []
    real = ProductStore._array_checksum

    def counting(self, key, name):
        read_back.append(name)
        return real(self, key, name)

    monkeypatch.setattr(ProductStore, "_array_checksum", counting)
    p = payload(shape=(2 * MAP_CHUNKS[0] + 3, MAP_CHUNKS[1] + 5))  # 3 x 2 chunks
    staged = store.stage(p, 1)
    assert sorted(read_back) == [n for n in sorted(staged.checksums.arrays)
                                 if n.startswith("tables/")]
    key = store.publish(staged)
    assert store.verify(key, staged.checksums).ok
    read_back.clear()
    assert store._array_checksums(key) == staged.checksums.arrays


@pytest.mark.timeout(120)
def test_fits_writer_failing_before_it_reads_stops_the_chunk_writer(store: ProductStore,
                                                                    monkeypatch) -> None:
    """A FITS writer that fails before taking any band does not leave the other thread waiting."""
    import sitiancal.storage.export as export

    def failing(out, arr, header, source=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_stream_image", failing)
    big = payload(shape=(3 * MAP_CHUNKS[0], 20))  # bands to hand over beyond the queue's room
    with pytest.raises(OSError, match="No space left"):
        store.stage(big, 1)
    assert store.list_staging() == []


def test_sweep_staging_removes_only_old_leftovers(store: ProductStore) -> None:
    kept = store.stage(payload(), 1)
    assert store.sweep_staging(timedelta(hours=1)) == []
    later = datetime.now(UTC) + timedelta(hours=2)
    assert store.sweep_staging(timedelta(hours=1), now=later) == [kept.key]
    assert store.list_staging() == []


def test_catalog_failure_after_the_move_removes_the_product(store: ProductStore,
                                                            tmp_path) -> None:
    with Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}") as catalog:
        p = payload()
        with pytest.raises(Exception, match="FOREIGN KEY"):
            catalog.publish_payload(store, p, dataset_id="missing-dataset")
        assert not store.exists("products/MST3/gain/v0001")
        assert store.list_staging() == []
        assert catalog.list_products() == []
        done = catalog.publish_payload(store, p).product
        assert done.version == 2 and catalog.verify(done.id, store).ok


def test_chunking_of_maps_and_content_key() -> None:
    assert default_chunks((6388, 9576)) == MAP_CHUNKS == (1597, 1368)
    assert default_chunks((100, 50)) == (100, 50)
    assert default_chunks((9576,)) == (9576,)
    assert default_chunks((3, 6388, 9576)) == (1, *MAP_CHUNKS)  # LIN_RESID: tiles per level
    assert default_chunks((3, 40, 50)) == (3, 40, 50)
    key = content_key(["b", "a"], {"x": 1, "y": [1, 2]}, "gain", "1.0")
    assert key == content_key(["a", "b"], {"y": [1, 2], "x": 1}, "gain", "1.0")
    assert key != content_key(["a", "b"], {"y": [1, 2], "x": 1}, "gain", "1.1")
    assert key != content_key(["a", "b"], {"y": [1, 2], "x": 1}, "dark", "1.0")


def test_large_map_is_tiled_and_regions_cross_chunks(tmp_path) -> None:
    store = ProductStore(tmp_path / "store")
    rng = np.random.default_rng(SEED)
    shape = (MAP_CHUNKS[0] + 11, MAP_CHUNKS[1] + 7)
    data = rng.integers(0, 512, shape, dtype=np.uint16)
    p = ProductPayload(camera="MST3", type="bias",
                       arrays=[ProductArray("bias", data, "ADU", "master bias")],
                       code_version="0.1.0-test")
    key = store.publish(store.stage(p, 1))
    arr = store.open_zarr(key)["bias"]
    assert arr.chunks == MAP_CHUNKS
    chunk_files = sorted(store.fs.find(store._path(key, "product.zarr", "bias", "c")))
    assert len(chunk_files) == 4
    region = store.read_region(key, "bias", slice(1590, 1600), slice(1360, 1370))
    np.testing.assert_array_equal(region, data[1590:1600, 1360:1370])
    marker_free = [p for p in store.fs.find(store._path(key)) if p.endswith("_staging.json")]
    assert marker_free == []
    meta = json.loads(store.fs.cat_file(store._path(key, "product.zarr", "bias", "zarr.json")))
    assert meta["dimension_names"] == ["y", "x"]
    blosc = [c["configuration"] for c in meta["codecs"] if c["name"] == "blosc"]
    assert [(c["cname"], c["clevel"], c["shuffle"]) for c in blosc] == [("lz4", 1, "bitshuffle")]
    assert isinstance(store.open_zarr(key), zarr.Group)


def test_sweep_orphans_keeps_what_the_catalog_references(store: ProductStore, tmp_path) -> None:
    with Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}") as catalog:
        kept = catalog.publish_payload(store, payload()).product
        orphan = store.publish(store.stage(payload(seed=2), 2))  # a crash before the commit
        leftover = store.stage(payload(seed=3), 3)
        assert catalog.sweep_orphans(store, timedelta(minutes=10)) == []  # too recent
        later = datetime.now(UTC) + timedelta(hours=1)
        removed = catalog.sweep_orphans(store, timedelta(minutes=10), now=later)
        assert sorted(removed) == sorted([leftover.key, orphan])
        assert store.list_product_keys() == [kept.store_key]
        assert catalog.verify(kept.id, store).ok
