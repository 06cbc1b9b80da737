"""FITS export: layout, headers, units, mask bit names and deterministic bytes."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from astropy.io import fits

from sitiancal.storage.export import export_fits
from sitiancal.storage.store import ProductArray, ProductPayload, ProductStore, ProductTable

SEED = 6388


def gain_payload() -> ProductPayload:
    rng = np.random.default_rng(SEED)
    gain = rng.normal(0.253, 0.004, (12, 16)).astype(np.float32)
    return ProductPayload(
        camera="MST3", type="gain",
        arrays=[ProductArray("GAIN", gain, "e-/ADU", "per-pixel gain"),
                ProductArray("GAIN_ERR", np.full((12, 16), 0.004, np.float32), "e-/ADU",
                             "1-sigma gain uncertainty (σ)"),
                ProductArray("FIT_OK", gain > 0.25, "1", "fit accepted")],
        tables=[ProductTable("POPULATIONS", {"weight": np.array([0.9, 0.1]),
                                             "mean": np.array([0.253, 0.262]),
                                             "component": np.array(["main", "second"])},
                             {"weight": "", "mean": "e-/ADU"}, "gain populations")],
        stats={"gain_median": 0.253},
        inputs=[{"path": "/data/mst3/flat_0001.fits", "sha256": "1" * 64},
                {"path": "/data/mst3/flat_Ω.fits", "sha256": "2" * 64}],
        date_beg=datetime(2026, 3, 14, 1, 2, 3, tzinfo=UTC),
        date_end=datetime(2026, 3, 14, 4, 5, 6, tzinfo=UTC),
        params={"max_level": 0.7}, code_version="0.1.0+git.abc1234")


def open_fits(data: bytes) -> fits.HDUList:
    return fits.open(io.BytesIO(data))


def test_layout_headers_and_units(tmp_path) -> None:
    store = ProductStore(tmp_path / "store")
    p = gain_payload()
    key = store.publish(store.stage(p, 7))
    with open_fits(store.fits_bytes(key)) as hdul:
        assert [h.name for h in hdul] == ["GAIN", "GAIN_ERR", "FIT_OK", "POPULATIONS", "INPUTS"]
        h = hdul[0].header
        assert (h["CAMERA"], h["PRODTYPE"], h["VERSION"]) == ("MST3", "gain", 7)
        assert h["SHA256"] == p.content_key
        assert (h["DATE-BEG"], h["DATE-END"], h["TIMESYS"]) == (
            "2026-03-14T01:02:03", "2026-03-14T04:05:06", "UTC")
        assert h["SWVERSN"] == "0.1.0+git.abc1234"
        assert h["BUNIT"] == "e-/ADU" and hdul["GAIN_ERR"].header["BUNIT"] == "e-/ADU"
        assert hdul["GAIN_ERR"].header["LONGNAME"] == "1-sigma gain uncertainty (\\u03c3)"
        assert "MASKB0" not in h  # only mask products carry bit names
        np.testing.assert_array_equal(hdul[0].data, p.arrays[0].data)
        np.testing.assert_array_equal(hdul["FIT_OK"].data, p.arrays[2].data.astype(np.uint8))
        pops = hdul["POPULATIONS"]
        assert pops.columns["mean"].unit == "e-/ADU" and pops.columns["weight"].unit is None
        assert list(pops.data["component"]) == ["main", "second"]
        np.testing.assert_array_equal(pops.data["weight"], [0.9, 0.1])
        inputs = hdul["INPUTS"].data
        assert list(inputs["path"]) == ["/data/mst3/flat_0001.fits", "/data/mst3/flat_\\u03a9.fits"]
        assert h["NINPUTS"] == 2 and list(inputs["sha256"]) == ["1" * 64, "2" * 64]


def test_bytes_are_deterministic(tmp_path) -> None:
    p = gain_payload()
    first, second = ProductStore(tmp_path / "a"), ProductStore(tmp_path / "b")
    s1 = first.stage(p, 3)
    s2 = second.stage(p, 3)  # another store, another moment
    assert s1.checksums == s2.checksums
    key = first.publish(s1)
    data = first.fits_bytes(key)
    assert hashlib.sha256(data).hexdigest() == s1.checksums.fits
    assert export_fits(first.open_zarr(key)) == data  # re-export of the stored version
    other_version = second.stage(p, 4)
    assert other_version.checksums.fits != s1.checksums.fits  # VERSION differs
    assert other_version.checksums.arrays == s1.checksums.arrays  # the arrays do not


def test_mask_product_bit_names_and_exact_uint16(tmp_path) -> None:
    from sitiancal.compute.defects import MaskBit

    rng = np.random.default_rng(SEED)
    mask = rng.integers(0, 512, (10, 14), dtype=np.uint16)
    mask[0, 0] = 65535
    store = ProductStore(tmp_path / "store")
    p = ProductPayload(camera="MST3", type="mask",
                       arrays=[ProductArray("MASK", mask, "1", "defect bitmask")],
                       stats={"fraction": 0.0007}, code_version="0.1.0")
    key = store.publish(store.stage(p, 1))
    with open_fits(store.fits_bytes(key)) as hdul:
        h = hdul[0].header
        assert [h[f"MASKB{b}"] for b in range(9)] == [bit.name for bit in MaskBit]
        assert hdul[0].data.dtype == np.uint16
        np.testing.assert_array_equal(hdul[0].data, mask)
    p.mask_bits = {0: "HOT", 4: "NOISY"}
    key2 = store.publish(store.stage(p, 2))
    with open_fits(store.fits_bytes(key2)) as hdul:
        h = hdul[0].header
        assert (h["MASKB0"], h["MASKB4"]) == ("HOT", "NOISY") and "MASKB1" not in h


def test_table_only_product(tmp_path) -> None:
    store = ProductStore(tmp_path / "store")
    p = ProductPayload(camera="MST3", type="ptc", arrays=[],
                       tables=[ProductTable("PTC", {"mean": np.array([100.0, 2000.0]),
                                                    "variance": np.array([400.0, 8000.0])},
                                            {"mean": "ADU", "variance": "ADU2"})],
                       units="e-/ADU", stats={"gain": 0.253}, code_version="0.1.0")
    key = store.publish(store.stage(p, 1))
    with open_fits(store.fits_bytes(key)) as hdul:
        assert hdul[0].data is None and hdul[0].header["BUNIT"] == "e-/ADU"
        assert hdul["PTC"].columns["variance"].unit == "ADU2"


def test_invalid_payloads_are_refused(tmp_path) -> None:
    store = ProductStore(tmp_path / "store")
    p = gain_payload()
    p.camera = "../escape"
    with pytest.raises(ValueError, match="invalid camera name"):
        store.stage(p, 1)
    p = gain_payload()
    p.date_beg = datetime(2026, 3, 14)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.stage(p, 1)
    p = gain_payload()
    p.arrays[1].dims = ("y",)
    with pytest.raises(ValueError, match="2 dimensions but 1 names"):
        store.stage(p, 1)
    assert store.list_staging() == []


def test_streamed_file_equals_astropy_writeto(tmp_path) -> None:
    """write_fits streams band by band; its bytes are those of astropy's own writer."""
    from sitiancal.storage.export import _BAND_ROWS, build_hdulist, write_fits

    rng = np.random.default_rng(SEED)
    ny = 2 * _BAND_ROWS + 37  # several bands, the last one partial
    payload = ProductPayload(
        camera="MST3", type="mask",
        arrays=[ProductArray("MASK", rng.integers(0, 1 << 16, (ny, 9), dtype=np.uint16), "",
                             "defect bitmask"),
                ProductArray("RESID", rng.normal(0, 1, (2, ny, 9)).astype(np.float32), "%",
                             "residual", dims=("level", "y", "x")),
                ProductArray("CLASS", rng.integers(0, 4, (ny, 9), dtype=np.uint8), "", "class"),
                ProductArray("F64", rng.normal(0, 1, (ny, 9)), "ADU", "float64 map"),
                ProductArray("FLAG", rng.random((ny, 9)) > 0.5, "", "flag")],
        tables=[ProductTable("T", {"a": np.arange(3, dtype=np.uint16)}, {"a": "s"}, "t")],
        stats={}, inputs=[{"path": "/x.fits", "sha256": "3" * 64}], params={},
        code_version="0.1.0")
    store = ProductStore(tmp_path / "store")
    key = store.publish(store.stage(payload, 1))
    group = store.open_zarr(key)
    buffer = io.BytesIO()
    build_hdulist(group).writeto(buffer, output_verify="exception")
    sha = write_fits(group, tmp_path / "streamed.fits")
    data = (tmp_path / "streamed.fits").read_bytes()
    assert data == buffer.getvalue()
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.fits_bytes(key) == data  # staged from the payload's arrays (sources)
    sources = {a.name: a.data for a in payload.arrays}
    write_fits(group, tmp_path / "from_sources.fits", sources=sources)
    assert (tmp_path / "from_sources.fits").read_bytes() == data
    with pytest.raises(ValueError, match="shape"):
        write_fits(group, tmp_path / "bad.fits", sources={"MASK": np.zeros((3, 3), np.uint16)})
    with fits.open(io.BytesIO(data)) as hdul:
        np.testing.assert_array_equal(hdul["MASK"].data, payload.arrays[0].data)
        np.testing.assert_array_equal(hdul["RESID"].data, payload.arrays[1].data)


def test_settled_hash_is_the_file_digest_across_steps_and_blocks(tmp_path, monkeypatch) -> None:
    """The FITS digest is taken step by step as the file grows (and its pages settled)."""
    from sitiancal.storage.export import _SettledHash, settle_file

    monkeypatch.setattr(_SettledHash, "_BLOCK", 7)  # many blocks per step, partial last ones
    path = tmp_path / "grown.bin"
    chunks = [b"", np.random.default_rng(SEED).bytes(1000), b"x", b"", bytes(range(256)) * 3]
    path.write_bytes(b"")
    hashed = _SettledHash(str(path))
    for chunk in chunks:
        with open(path, "ab") as f:
            f.write(chunk)
        hashed.update()
    data = path.read_bytes()
    assert data == b"".join(chunks)  # settling leaves the bytes as they are
    assert hashed.hexdigest() == hashlib.sha256(data).hexdigest()
    settle_file(path, 10, 20)
    assert path.read_bytes() == data


def test_settle_file_skips_unsupported_sync_and_raises_write_errors(tmp_path, monkeypatch) -> None:
    """A file system without sync support is not an error; a failed write-back is."""
    import errno
    import os

    from sitiancal.storage.export import settle_file

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")

    def failing(code: int):
        def sync(fd: int) -> None:
            raise OSError(code, os.strerror(code))
        return sync

    monkeypatch.setattr(os, "fdatasync", failing(errno.EINVAL), raising=False)
    settle_file(path)  # nothing to settle there
    monkeypatch.setattr(os, "fdatasync", failing(errno.EIO), raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        settle_file(path)
    assert path.read_bytes() == b"abc"


def test_fits_written_past_the_page_cache_falls_back_byte_for_byte(tmp_path, monkeypatch) -> None:
    """O_DIRECT refused at open, refused at the first transfer, or a short transfer: same bytes."""
    import os

    from sitiancal.storage import export
    from sitiancal.storage.export import write_fits

    monkeypatch.setattr(export._HashedFile, "_BLOCK", 3 * 4096)  # many blocks per image
    rng = np.random.default_rng(SEED)
    payload = ProductPayload(
        camera="MST3", type="gain",
        arrays=[ProductArray("GAIN", rng.normal(0.25, 0.01, (700, 33)).astype(np.float32),
                             "e-/ADU", "gain"),
                ProductArray("N", rng.integers(0, 1 << 16, (700, 33), dtype=np.uint16), "",
                             "count")],
        tables=[ProductTable("T", {"a": np.arange(3, dtype=np.uint16)}, {"a": "s"}, "t")],
        stats={}, inputs=[{"path": "/x.fits", "sha256": "3" * 64}], params={},
        code_version="0.1.0")
    store = ProductStore(tmp_path / "store")
    group = store.open_zarr(store.publish(store.stage(payload, 1)))
    want = io.BytesIO()
    export.build_hdulist(group).writeto(want, output_verify="exception")
    want_sha = hashlib.sha256(want.getvalue()).hexdigest()

    def check(name: str) -> None:
        path = tmp_path / name
        assert write_fits(group, path) == want_sha
        assert path.read_bytes() == want.getvalue()

    real_open, real_write = os.open, os.write
    direct_writes: list[int] = []

    def counting(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            direct_writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting)
    check("direct.fits")
    if getattr(os, "O_DIRECT", 0):
        assert direct_writes and all(n % 4096 == 0 for n in direct_writes)

    def refuse_open(name, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # tmpfs
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refuse_open)
    check("no-o-direct.fits")
    monkeypatch.setattr(os, "open", real_open)

    calls = [0]

    def refuse_first(fd, data):
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(22, "Invalid argument")  # opened, but the transfer is refused
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_first)
    check("refused-transfer.fits")

    calls[0] = 0

    def short(fd, data):
        calls[0] += 1
        return real_write(fd, data[:1000] if calls[0] == 2 else data)  # off the alignment

    monkeypatch.setattr(os, "write", short)
    check("short-transfer.fits")
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError, match="full"):
        write_fits(group, tmp_path / "full.fits")
