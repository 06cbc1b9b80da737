"""The direct-I/O zarr store: large chunks written and read past the page cache, same bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from sitiancal.storage import direct as direct_io
from sitiancal.storage.direct import DIRECT_MIN_BYTES, DirectStore, read_direct, write_direct
from sitiancal.storage.frames import DIRECT_ALIGN


def _direct_supported(folder: Path) -> bool:
    fd = direct_io.open_direct(str(folder / "probe"), os.O_WRONLY | os.O_CREAT)
    if fd is None:
        return False
    os.close(fd)
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("size", [DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 1,
                                  3 * DIRECT_MIN_BYTES + DIRECT_ALIGN - 7])
def test_write_direct_writes_exactly_the_bytes(tmp_path: Path, size: int) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    target = tmp_path / "sub" / "0"
    target.parent.mkdir()
    assert write_direct(target, memoryview(data))
    assert target.stat().st_size == size  # cut back from the aligned length
    assert target.read_bytes() == data.tobytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["0"]  # no partial file left
    buffered = tmp_path / "buffered"
    buffered.write_bytes(b"")
    assert target.stat().st_mode == buffered.stat().st_mode  # the permissions open() gives
    got = read_direct(target)
    assert got is not None and got.ctypes.data % DIRECT_ALIGN == 0
    assert got.tobytes() == data.tobytes()


def test_read_direct_leaves_small_and_missing_files_to_the_caller(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    assert read_direct(small) is None
    assert read_direct(tmp_path / "missing") is None


def test_refused_direct_io_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A file system without O_DIRECT (tmpfs), or one refusing the transfer: False, no file."""
    data = memoryview(np.ones(DIRECT_MIN_BYTES, dtype=np.uint8))
    monkeypatch.setattr(direct_io, "open_direct", lambda *a, **k: None)
    assert not write_direct(tmp_path / "a", data)
    monkeypatch.undo()
    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")

    def einval(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct_io.os, "pwritev", einval)
    assert not write_direct(tmp_path / "b", data)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_chunk(tmp_path: Path, monkeypatch) -> None:
    """A write that fails midway leaves the previous value whole and no partial file."""
    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    target = tmp_path / "0"
    old = np.full(DIRECT_MIN_BYTES, 7, dtype=np.uint8)
    assert write_direct(target, memoryview(old))

    def no_space(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwritev", no_space)
    with pytest.raises(OSError, match="No space"):
        write_direct(target, memoryview(np.zeros(DIRECT_MIN_BYTES, dtype=np.uint8)))
    assert target.read_bytes() == old.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["0"]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
def test_direct_store_round_trip(tmp_path: Path, monkeypatch, direct: bool) -> None:
    """Maps written tile by tile read back equal, whole and in parts, with or without O_DIRECT;
    the group is an ordinary zarr group (readable by a plain LocalStore)."""
    if direct and not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    calls: list[int] = []
    real = direct_io.write_direct

    def counting(path, data):
        calls.append(data.nbytes)
        return real(path, data)

    monkeypatch.setattr(direct_io, "write_direct", counting)
    if not direct:
        monkeypatch.setattr(direct_io, "open_direct", lambda *a, **k: None)
    path = str(tmp_path / "maps.zarr")
    group = zarr.open_group(DirectStore(path), mode="w")
    rows, cols = 301, 1000  # a tile of 301 rows: 1.2 MB chunks, not a multiple of 4096
    big = group.create_array("big", shape=(903, cols), chunks=(rows, cols), dtype="float32",
                             fill_value=np.nan, compressors=None)
    small = group.create_array("small", shape=(903, 10), chunks=(rows, 10), dtype="float32",
                               fill_value=np.nan, compressors=None)
    truth = np.random.default_rng(1).normal(size=(903, cols)).astype(np.float32)
    for r0 in range(0, 903, rows):
        big[r0:r0 + rows] = truth[r0:r0 + rows]
        small[r0:r0 + rows] = truth[r0:r0 + rows, :10]
    # every tile of the big map went to write_direct; the small map's chunks did not
    assert calls == [rows * cols * 4] * 3
    # a whole map at once: zarr writes its chunks from several threads at a time,
    # each with its own buffer
    many = group.create_array("many", shape=(12 * rows, cols), chunks=(rows, cols),
                              dtype="float32", fill_value=np.nan, compressors=None)
    stack = np.concatenate([truth[:rows] + k for k in range(12)])
    many[:] = stack
    assert len(calls) == 3 + 12
    for store in (DirectStore(path, read_only=True), zarr.storage.LocalStore(path)):
        back = zarr.open_group(store, mode="r")
        np.testing.assert_array_equal(back["many"][:], stack)
        np.testing.assert_array_equal(back["big"][:], truth)
        np.testing.assert_array_equal(back["big"][5:400, 17:23], truth[5:400, 17:23])
        np.testing.assert_array_equal(back["small"][:], truth[:, :10])


def test_staged_product_chunks_go_past_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    """A local product store writes its large chunks with O_DIRECT and checksums them on
    their way out (not read back); the checksums are those recomputed from the published
    files (with direct reads), the values read back are the values staged, and small
    arrays take the buffered path."""
    from sitiancal.storage.store import ProductArray, ProductPayload, ProductStore, default_chunks

    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    written: list[int] = []
    read: list[str] = []
    real_write, real_read = direct_io.write_direct, direct_io.read_direct

    def counting_write(path, data):
        written.append(data.nbytes)
        return real_write(path, data)

    def counting_read(path):
        got = real_read(path)
        if got is not None:
            read.append(str(path))
        return got

    monkeypatch.setattr(direct_io, "write_direct", counting_write)
    monkeypatch.setattr("sitiancal.storage.store.read_direct", counting_read)
    shape = (1100, 1300)  # one 5.7 MB chunk (noisy float32: barely compresses)
    assert default_chunks(shape) == shape
    values = np.random.default_rng(5).normal(0.253, 0.02, shape).astype(np.float32)
    payload = ProductPayload(
        camera="MST3", type="gain",
        arrays=[ProductArray("GAIN", values, "e-/ADU", "per-pixel gain"),
                ProductArray("SMALL", values[:8, :8].copy(), "e-/ADU", "a corner")],
        stats={}, inputs=[{"path": "/data/f.fits", "sha256": "0" * 64}],
        params={}, code_version="0.1.0-test")
    store = ProductStore(tmp_path / "store")
    staged = store.stage(payload, 1)
    assert len(written) == 1 and written[0] >= DIRECT_MIN_BYTES  # the GAIN chunk only
    assert read == []  # hashed as written
    key = store.publish(staged)
    assert store.compute_checksums(key) == staged.checksums
    assert len(read) == 1 and read[0].endswith("GAIN/c/0/0")  # the recomputation reads direct
    group = store.open_zarr(key)
    np.testing.assert_array_equal(group["GAIN"][:], values)
    np.testing.assert_array_equal(group["SMALL"][:], values[:8, :8])
