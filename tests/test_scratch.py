"""The scratch zarr store: large chunks written and read past the page cache, same bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from sitiancal.storage import scratch
from sitiancal.storage.frames import DIRECT_ALIGN
from sitiancal.storage.scratch import DIRECT_MIN_BYTES, ScratchStore, read_direct, write_direct


def _direct_supported(folder: Path) -> bool:
    fd = scratch.open_direct(str(folder / "probe"), os.O_WRONLY | os.O_CREAT)
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
    monkeypatch.setattr(scratch, "open_direct", lambda *a, **k: None)
    assert not write_direct(tmp_path / "a", data)
    monkeypatch.undo()
    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")

    def einval(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(scratch.os, "pwritev", einval)
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

    monkeypatch.setattr(scratch.os, "pwritev", no_space)
    with pytest.raises(OSError, match="No space"):
        write_direct(target, memoryview(np.zeros(DIRECT_MIN_BYTES, dtype=np.uint8)))
    assert target.read_bytes() == old.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["0"]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
def test_scratch_store_round_trip(tmp_path: Path, monkeypatch, direct: bool) -> None:
    """Maps written tile by tile read back equal, whole and in parts, with or without O_DIRECT;
    the group is an ordinary zarr group (readable by a plain LocalStore)."""
    if direct and not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    calls: list[int] = []
    real = scratch.write_direct

    def counting(path, data):
        calls.append(data.nbytes)
        return real(path, data)

    monkeypatch.setattr(scratch, "write_direct", counting)
    if not direct:
        monkeypatch.setattr(scratch, "open_direct", lambda *a, **k: None)
    path = str(tmp_path / "maps.zarr")
    group = zarr.open_group(ScratchStore(path), mode="w")
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
    for store in (ScratchStore(path, read_only=True), zarr.storage.LocalStore(path)):
        back = zarr.open_group(store, mode="r")
        np.testing.assert_array_equal(back["big"][:], truth)
        np.testing.assert_array_equal(back["big"][5:400, 17:23], truth[5:400, 17:23])
        np.testing.assert_array_equal(back["small"][:], truth[:, :10])
