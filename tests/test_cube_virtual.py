"""Virtual cubes: FITS data blocks read in place, against copy cubes of the same frames.

- tile reads, ``ds.frames`` and per-frame statistics are identical in both layouts
  (BZERO 32768 and plain signed 16-bit storage);
- the products computed from both layouts are exactly equal, on the threaded
  scheduler and on a multi-process ``LocalCluster`` (readers pickled to workers);
- a raw file changed or removed after the build makes the cube stale: the readers
  raise, ``open_cube`` refuses it and ``dataset_cube`` builds it again;
- compressed or 8-bit frames make the whole cube a copy cube (with the reason);
- the build keeps every frame's plan region, which the plan stage reads instead;
- the tile tasks of one row band run together.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from fitscorpus import write_camera_set
from simdata import small_dataset

from sitiancal.compute.graph import build_tile_graph, iter_tiles, staggered_bands
from sitiancal.compute.tile import CalibrationParams
from sitiancal.service.pipeline import EXTRA_TILE_TASKS, compute_products, dataset_cube
from sitiancal.service.settings import Settings
from sitiancal.storage.cube import (
    CubeError,
    FrameSource,
    StaleCubeError,
    VirtualFrameReader,
    ZarrFrameReader,
    build_cube,
    frame_reader,
    open_cube,
)
from sitiancal.storage.digest import sha_instructions
from sitiancal.storage.frames import (
    DIRECT_ALIGN,
    FrameReadError,
    aligned_buffer,
    read_file_bytes,
    read_file_direct,
)
from sitiancal.storage.scan import Rejection, scan

SHAPE = (24, 40)
TILE = (8, 16)
SCALARS = ("frame_mean", "frame_median", "frame_clipped_mean", "frame_clipped_std",
           "center_mean", "row_mean", "col_mean")


def _both(raw: Path, tmp: Path, **kwargs):
    inventory = scan(raw)
    virtual = build_cube(inventory, tmp / "virtual.zarr", layout="virtual", **kwargs)
    copy = build_cube(inventory, tmp / "copy.zarr", layout="copy", **kwargs)
    return inventory, virtual, copy


def _windows(shape: tuple[int, int], tile: tuple[int, int]) -> list[tuple[slice, slice]]:
    ny, nx = shape
    return [*iter_tiles(shape, tile), (slice(3, 17), slice(5, 38)), (slice(0, ny), slice(0, nx)),
            (slice(ny - 1, ny), slice(7, 8)), (slice(1, 20, 3), slice(2, 39, 5)),
            (slice(5, 5), slice(0, 4))]


def _move_image_to_extension(path: Path) -> None:
    """Rewrite a frame with an empty primary HDU and the image (and cards) in HDU 1."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.copy()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header)]).writeto(
        path, overwrite=True)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16], ids=["bzero32768", "signed"])
def test_tile_reads_and_statistics_are_identical(tmp_path: Path, dtype: type) -> None:
    files = write_camera_set(tmp_path / "set", SHAPE, seed=11, dtype=dtype)
    _move_image_to_extension(tmp_path / "set" / files[1].name)
    inventory, virtual, copy = _both(tmp_path / "set", tmp_path, tile=TILE)
    assert sorted(r.hdu for r in inventory.frames)[-1] == 1
    assert virtual.attrs["layout"] == "virtual" and copy.attrs["layout"] == "copy"
    # no pixels are copied: the group has no frames array, only the manifest
    group = zarr.open_group(str(tmp_path / "virtual.zarr"), mode="r")
    assert "frames" not in group.array_keys()
    sources = group.attrs["frame_sources"]
    assert len(sources) == len(files)
    assert {s["bzero"] for s in sources} == {32768 if dtype == np.uint16 else 0}
    assert all(s["dtype"] == ">i2" and s["offset"] % 2880 == 0 for s in sources)
    assert len({s["offset"] for s in sources}) == 2  # primary and extension images

    vreader = frame_reader(tmp_path / "virtual.zarr")
    creader = frame_reader(tmp_path / "copy.zarr")
    assert isinstance(vreader, VirtualFrameReader) and isinstance(creader, ZarrFrameReader)
    n = len(files)
    for indices in (list(range(n)), [n - 1, 0, 3], [2]):
        for ys, xs in _windows(SHAPE, TILE):
            got = vreader(indices, ys, xs)
            assert got.dtype == np.uint16 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, creader(indices, ys, xs))
    by_name = {f.name: f.pixels for f in files}
    frames = virtual.frames.values
    for i, path in enumerate(virtual.file.values):
        np.testing.assert_array_equal(frames[i], by_name[Path(str(path)).name])
    np.testing.assert_array_equal(frames, copy.frames.values)
    assert virtual.frames.data.chunksize == (1, *TILE)
    np.testing.assert_array_equal(virtual.frames[2, 3:7, 5].values, copy.frames[2, 3:7, 5].values)
    for name in SCALARS:
        np.testing.assert_array_equal(virtual[name].values, copy[name].values, err_msg=name)
    np.testing.assert_array_equal(virtual.sha256.values, copy.sha256.values)
    # picklable (distributed workers): the copy reads the same
    window = (slice(0, 8), slice(0, 16))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vreader))([1, 0], *window),
                                  creader([1, 0], *window))

    # read past the page cache: every window by O_DIRECT transfers of its rows
    dreader = frame_reader(tmp_path / "virtual.zarr", direct=True)
    assert pickle.loads(pickle.dumps(dreader)).direct
    mapped: list[str] = []
    original = VirtualFrameReader._copy

    def recording(self, source, ys, xs, out):
        mapped.append(source.path)
        return original(self, source, ys, xs, out)

    ny, nx = SHAPE
    bands = [(slice(0, ny), slice(0, nx)), (slice(1, 20, 3), slice(0, nx)),
             (slice(ny - 1, ny), slice(0, nx)), (slice(5, 13), slice(None)),
             (slice(5, 5), slice(0, nx))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VirtualFrameReader, "_copy", recording)
        for indices in (list(range(n)), [n - 1, 0, 3], [2]):
            for ys, xs in bands:
                np.testing.assert_array_equal(dreader(indices, ys, xs),
                                              creader(indices, ys, xs))
        for ys, xs in [*_windows(SHAPE, TILE), (slice(3, 17, 2), slice(5, 38, 3)),
                       (slice(ny // 4, 3 * ny // 4), slice(nx // 4, 3 * nx // 4))]:
            np.testing.assert_array_equal(dreader([1, 0], ys, xs), creader([1, 0], ys, xs))
        assert mapped == []
    # the plain reader maps every window
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VirtualFrameReader, "_copy", recording)
        vreader([0], slice(3, 17), slice(5, 38))
        assert mapped


def test_a_held_frame_of_the_copy_does_not_fail_the_read(tmp_path: Path, monkeypatch) -> None:
    """A view of the map outliving the copy (a profiler holding its frame) is no error.

    dask distributed's worker profiler samples running tasks' stacks and keeps
    the frames a moment; a kept frame of ``_convert_rows`` keeps its array over
    the map, and closing the map raised ``BufferError`` in a distributed test.
    """
    import sys

    import sitiancal.storage.cube as cube_mod

    write_camera_set(tmp_path / "set", SHAPE, seed=17)
    build_cube(scan(tmp_path / "set"), tmp_path / "c.zarr", tile=TILE, layout="virtual")
    reader = frame_reader(tmp_path / "c.zarr")
    window = (slice(3, 17), slice(5, 38))
    want = frame_reader(tmp_path / "c.zarr")([0, 2], *window)
    held: list[object] = []
    original = cube_mod._convert_rows

    def profiled(raw, offset, source, ys, xs, out):
        original(raw, offset, source, ys, xs, out)
        words = np.frombuffer(raw, dtype=np.uint8)  # a local array over the map ...
        held.append(sys._getframe())                # ... kept alive by a held frame
        assert words.size

    monkeypatch.setattr(cube_mod, "_convert_rows", profiled)
    np.testing.assert_array_equal(reader([0, 2], *window), want)
    assert len(held) == 2
    held.clear()  # the profiler lets go: the maps are closed with their last reference
    monkeypatch.setattr(cube_mod, "_convert_rows", original)
    np.testing.assert_array_equal(reader([0, 2], *window), want)


def test_direct_tile_reads_fall_back_where_o_direct_is_refused(tmp_path: Path, monkeypatch
                                                                ) -> None:
    write_camera_set(tmp_path / "set", SHAPE, seed=16)
    build_cube(scan(tmp_path / "set"), tmp_path / "c.zarr", tile=TILE, layout="virtual")
    reader = frame_reader(tmp_path / "c.zarr", direct=True)
    band = (slice(2, 20), slice(0, SHAPE[1]))
    want = frame_reader(tmp_path / "c.zarr")([0, 3, 1], *band)
    real_open = os.open

    def refuse(name, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # tmpfs
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    np.testing.assert_array_equal(reader([0, 3, 1], *band), want)
    monkeypatch.setattr(os, "open", real_open)
    # ... or opens the file and refuses the transfer
    monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(22, "no")))
    np.testing.assert_array_equal(reader([0, 3, 1], *band), want)
    # other errors are not hidden
    monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        reader([0], *band)


def test_frames_read_past_the_page_cache_give_the_same_cube(tmp_path: Path) -> None:
    write_camera_set(tmp_path / "set", SHAPE, seed=13)
    inventory = scan(tmp_path / "set")
    cached = build_cube(inventory, tmp_path / "cached.zarr", tile=TILE, layout="virtual",
                        direct=False)
    direct = build_cube(inventory, tmp_path / "direct.zarr", tile=TILE, layout="virtual",
                        direct=True)
    np.testing.assert_array_equal(direct.sha256.values, cached.sha256.values)
    for name in SCALARS:
        np.testing.assert_array_equal(direct[name].values, cached[name].values, err_msg=name)
    assert direct.attrs["frame_sources"] == cached.attrs["frame_sources"]
    np.testing.assert_array_equal(direct.frames.values, cached.frames.values)
    # the sha256 is the file's
    first = Path(str(direct.file.values[0]))
    assert direct.sha256.values[0] == hashlib.sha256(first.read_bytes()).hexdigest()


def test_read_file_direct_reads_every_byte(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    for size in (0, 1, 2880, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 17, 40 * 2880):
        path = tmp_path / f"f{size}.bin"
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        for buffer in (None, aligned_buffer(1 << 20), np.zeros(1 << 20, np.uint8)[1:],
                       aligned_buffer(DIRECT_ALIGN)):
            got = read_file_direct(path, buffer=buffer)
            assert got.tobytes() == data and got.dtype == np.uint8
            if size and buffer is not None and buffer.size >= size + DIRECT_ALIGN and (
                    buffer.ctypes.data % DIRECT_ALIGN == 0):
                assert np.shares_memory(got, buffer)  # reused
    # a file system without O_DIRECT (tmpfs): read through the page cache
    path = tmp_path / f"f{40 * 2880}.bin"
    real_open = os.open

    def refuse(name, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    assert read_file_direct(path).tobytes() == read_file_bytes(path).tobytes()
    monkeypatch.setattr(os, "open", real_open)
    # ... or that opens the file and refuses the transfer
    monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(22, "no")))
    assert read_file_direct(path).tobytes() == path.read_bytes()
    monkeypatch.undo()
    with pytest.raises(FrameReadError, match="unreadable"):
        read_file_direct(tmp_path / "missing.fits")


def test_service_setting_reads_frames_past_the_cache(tmp_path: Path, monkeypatch) -> None:
    import sitiancal.storage.cube as cube_module

    write_camera_set(tmp_path / "set", SHAPE, seed=15)
    inventory = scan(tmp_path / "set")
    direct_reads: list[str] = []  # frames read past the cache, one by one or side by side
    original, original_open = cube_module.read_file_direct, cube_module.open_direct

    def counting(path, **kwargs):
        direct_reads.append(str(path))
        return original(path, **kwargs)

    def counting_open(path, *args):
        direct_reads.append(str(path))
        return original_open(path, *args)

    monkeypatch.setattr(cube_module, "read_file_direct", counting)
    monkeypatch.setattr(cube_module, "open_direct", counting_open)
    monkeypatch.setenv("SITIANCAL_DIRECT_READS", "true")
    ds, _ = dataset_cube(Settings(data_dir=tmp_path / "data"), "ds1", inventory, plan_side=10)
    assert sorted(direct_reads) == sorted(str(r.path) for r in inventory.frames)
    assert ds.attrs["layout"] == "virtual"
    assert ds.attrs["plan_window"] == [7, 17, 15, 25]  # not in the page cache: kept
    monkeypatch.delenv("SITIANCAL_DIRECT_READS")
    direct_reads.clear()
    ds, _ = dataset_cube(Settings(data_dir=tmp_path / "data2"), "ds1", inventory, plan_side=10)
    assert direct_reads == []  # "auto" (the default): a set smaller than memory is cached
    assert "plan_window" not in ds.attrs  # and so is its plan region
    monkeypatch.setattr("sitiancal.service.pipeline.physical_memory_bytes", lambda: 1000)
    dataset_cube(Settings(data_dir=tmp_path / "data3"), "ds1", inventory)
    assert sorted(direct_reads) == sorted(str(r.path) for r in inventory.frames)
    direct_reads.clear()
    monkeypatch.setenv("SITIANCAL_DIRECT_READS", "false")
    dataset_cube(Settings(data_dir=tmp_path / "data4"), "ds1", inventory)
    assert direct_reads == []  # off whatever the size


@pytest.mark.parametrize(("setting", "frame_bytes", "memory", "expected"), [
    (True, 10, 100, True), (False, 1000, 100, False),
    ("auto", 10, 100, False), ("auto", 100, 100, False), ("auto", 101, 100, True),
    ("AUTO", 101, 100, True),
])
def test_direct_reads_auto_is_for_sets_larger_than_memory(setting, frame_bytes: int, memory: int,
                                                          expected: bool) -> None:
    from sitiancal.service.pipeline import use_direct_reads

    assert use_direct_reads(setting, frame_bytes, memory_bytes=memory) is expected


def test_direct_reads_setting_parses_booleans_and_auto(monkeypatch) -> None:
    from sitiancal.service.pipeline import use_direct_reads

    assert Settings().direct_reads == "auto"
    for text, value in (("true", True), ("0", False), ("auto", "auto")):
        monkeypatch.setenv("SITIANCAL_DIRECT_READS", text)
        assert Settings().direct_reads == value
    monkeypatch.setenv("SITIANCAL_DIRECT_READS", "sometimes")
    with pytest.raises(ValueError, match="direct_reads"):
        Settings()
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        use_direct_reads("sometimes", 1)


def test_service_setting_reads_tile_bands_past_the_cache(tmp_path: Path, monkeypatch) -> None:
    """Direct reads: the tile bands past the page cache, and the plan's region kept by
    the build; every figure as without them."""
    from sitiancal.service.pipeline import calibrate

    write_camera_set(tmp_path / "set", SHAPE, seed=17)
    direct: list[int] = []
    original = VirtualFrameReader._copy_direct

    def counting(self, source, ys, xs, out):
        direct.append(1)
        return original(self, source, ys, xs, out)

    monkeypatch.setattr(VirtualFrameReader, "_copy_direct", counting)
    monkeypatch.setenv("SITIANCAL_DIRECT_READS", "true")
    on = calibrate(tmp_path / "set", "MST1", Settings(data_dir=tmp_path / "on"))
    assert direct  # the tile pass read its bands with O_DIRECT
    monkeypatch.delenv("SITIANCAL_DIRECT_READS")
    direct.clear()
    off = calibrate(tmp_path / "set", "MST1", Settings(data_dir=tmp_path / "off"))
    assert direct == []
    # the plan read its region from the build's copy in one run, from the frames in the other
    cubes = [open_cube(next((tmp_path / run / "cubes").glob("*.zarr"))) for run in ("on", "off")]
    assert "plan_window" in cubes[0].attrs and "plan_window" not in cubes[1].attrs
    assert on.report["figures"] and on.report["figures"] == off.report["figures"]


def test_auto_layout_is_virtual_for_plain_16_bit_frames(tmp_path: Path) -> None:
    write_camera_set(tmp_path / "set", SHAPE, n_bias=2, dark_exptimes=(), flat_exptimes=(),
                     seed=12)
    ds = build_cube(scan(tmp_path / "set"), tmp_path / "c.zarr")
    assert ds.attrs["layout"] == "virtual" and "layout_note" not in ds.attrs
    assert ds.attrs["format_version"] == 2


def _products(ds, store: Path, work: Path, client=None, direct: bool = False) -> dict:
    # two cores (three tile tasks) whatever the machine's: the local run's bands are staggered
    outcome = compute_products(ds, str(store), work, params=CalibrationParams(), client=client,
                               direct=direct, cores=2)
    out = {}
    for kind, content in outcome.products.items():
        for array in content.arrays:
            out[f"{kind}/{array.name}"] = np.asarray(array.data)
        for table in content.tables:
            for col, values in table.columns.items():
                out[f"{kind}/{table.name}/{col}"] = np.asarray(values)
        out[f"{kind}/stats"] = content.stats
    return out


def _assert_close(a, b, rel: float, where: str) -> None:
    """Nested figures equal, floats to ``rel`` (exactly when ``rel`` is 0)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], rel, f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, rel, f"{where}[{k}]")
    elif isinstance(a, float) and rel:
        assert a == pytest.approx(b, rel=rel, nan_ok=True), where
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


def _assert_same_products(a: dict, b: dict, *, stats_rel: float = 0.0) -> None:
    """Maps and tables exactly equal; scalar figures equal to ``stats_rel``."""
    assert a.keys() == b.keys() and len(a) > 20
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_close(value, b[key], stats_rel, key)
        else:
            np.testing.assert_array_equal(value, b[key], err_msg=key)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("virtual-products")
    raw, _ = small_dataset(tmp)
    _, virtual, copy = _both(raw, tmp, tile=(24, 32))  # 4 tiles
    assert virtual.attrs["layout"] == "virtual"
    return tmp, virtual, copy


def test_products_are_identical_in_both_layouts(simulated, monkeypatch) -> None:
    from sitiancal.compute.graph import ReadAhead

    tmp, virtual, copy = simulated
    ahead: list[int] = []
    original = ReadAhead.__init__

    def counting(self, *args, **kwargs):
        ahead.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ReadAhead, "__init__", counting)
    products_virtual = _products(virtual, tmp / "virtual.zarr", tmp / "work-v")
    assert ahead  # a virtual cube's tile tasks read their next stack ahead
    ahead.clear()
    products_copy = _products(copy, tmp / "copy.zarr", tmp / "work-c")
    assert ahead == []  # a copy cube's tasks decode chunks: no read ahead
    assert {k.split("/")[0] for k in products_virtual} == {
        "bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask"}
    _assert_same_products(products_virtual, products_copy)
    # the tile pass of a virtual cube runs on full-width row bands (contiguous in the
    # FITS files), as many as the cube's tiles; a copied cube's follows its chunks
    ny, nx = (int(n) for n in virtual.attrs["shape"])
    chunks = {name: zarr.open_group(str(tmp / name / "maps.zarr"), mode="r")["bias_mean"].chunks
              for name in ("work-v", "work-c")}
    assert chunks["work-c"] == (24, 32)
    # ... whose starts are staggered (compute.graph.staggered_bands): the maps are
    # chunked by the stagger's unit
    rows = -(-ny // (ny * nx // (24 * 32)))
    unit, _ = staggered_bands(ny, rows, 2 + EXTRA_TILE_TASKS)
    assert chunks["work-v"] == (unit, nx) and unit < rows
    # bands read past the page cache, each task reading its next stack ahead: the same
    direct = _products(virtual, tmp / "virtual.zarr", tmp / "work-direct", direct=True)
    _assert_same_products(direct, products_copy)


def test_distributed_workers_read_the_virtual_cube(simulated) -> None:
    distributed = pytest.importorskip("distributed")
    tmp, virtual, copy = simulated
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_cluster = _products(virtual, tmp / "virtual.zarr", tmp / "work-d", client=client)
    # The client adds the tiles' partial sums in completion order, so whole-frame
    # figures may differ from the threaded run's in the last bits; maps are exact.
    _assert_same_products(on_cluster, _products(copy, tmp / "copy.zarr", tmp / "work-c2"),
                          stats_rel=1e-12)


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("direct", [False, True], ids=["mapped", "direct"])
def test_a_file_changed_after_the_build_is_detected(tmp_path: Path, direct: bool) -> None:
    write_camera_set(tmp_path / "set", SHAPE, seed=13)
    ds = build_cube(scan(tmp_path / "set"), tmp_path / "c.zarr", tile=TILE)
    reader = frame_reader(tmp_path / "c.zarr", direct=direct)
    window = (slice(0, 8), slice(0, SHAPE[1] if direct else 16))  # direct: whole rows
    first = Path(str(ds.file.values[0]))
    reader([0, 1], *window)

    # same size, new content (and so a new modification time)
    data = bytearray(first.read_bytes())
    data[-3000] ^= 0xFF
    first.write_bytes(bytes(data))
    _touch_later(first)
    with pytest.raises(StaleCubeError, match=r"changed \(mtime .*since the cube was built"):
        reader([1, 0], *window)
    reader([1, 2], *window)  # the other frames still read
    with pytest.raises(StaleCubeError, match=str(first.name)):
        open_cube(tmp_path / "c.zarr")
    with pytest.raises(StaleCubeError):
        ds.frames.values  # noqa: B018 - the lazily opened array checks too

    # grown (size differs) or removed
    last = Path(str(ds.file.values[-1]))
    with last.open("ab") as f:
        f.write(b"\0" * 2880)
    with pytest.raises(StaleCubeError, match="size"):
        reader([len(ds.file) - 1], *window)
    last.unlink()
    with pytest.raises(StaleCubeError, match="vanished"):
        reader([len(ds.file) - 1], *window)


def test_dataset_cube_rebuilds_a_stale_virtual_cube(tmp_path: Path) -> None:
    files = write_camera_set(tmp_path / "set", SHAPE, seed=14)
    inventory = scan(tmp_path / "set")
    settings = Settings(data_dir=tmp_path / "data")
    ds, store = dataset_cube(settings, "ds1", inventory)
    assert ds.attrs["layout"] == "virtual"
    shas = ds.sha256.values.copy()  # read now: ds is lazy and the store is rebuilt below
    again, _ = dataset_cube(settings, "ds1", inventory)
    assert again.attrs["completed"] == ds.attrs["completed"]  # reused, not rebuilt

    index = 3
    path = Path(str(ds.file.values[index]))
    name = path.name
    replacement = next(f.pixels for f in files if f.name == name)[::-1].copy()
    from astropy.io import fits

    header = fits.getheader(path)
    fits.PrimaryHDU(replacement, header=header).writeto(path, overwrite=True)
    _touch_later(path)
    rebuilt, _ = dataset_cube(settings, "ds1", inventory)
    assert rebuilt.attrs["completed"] != ds.attrs["completed"]
    assert rebuilt.sha256.values[index] != shas[index]
    assert rebuilt.sha256.values[index] == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(rebuilt.frames.values[index], replacement)
    reader = frame_reader(store)
    np.testing.assert_array_equal(reader([index], slice(0, 24), slice(0, 40))[0], replacement)


def _counted_builds(monkeypatch) -> dict[str, int]:
    """Make every cube build slow (0.3 s first) and count builds, and builds at once."""
    import sitiancal.storage.cube as cube_module

    real, seen, guard = cube_module.build_cube, {"builds": 0, "now": 0, "most": 0}, threading.Lock()

    def slow_build(*args, **kwargs):
        with guard:
            seen["builds"] += 1
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with guard:
                seen["now"] -= 1

    monkeypatch.setattr(cube_module, "build_cube", slow_build)
    return seen


def test_jobs_of_one_dataset_take_turns_to_build_its_cube(tmp_path: Path, monkeypatch) -> None:
    """Two jobs of a new dataset at once (the service runs two jobs at a time by default):
    one builds the cube, the other opens it. Both had built into the same store, and one
    or both failed ("cannot create the cube: No such file or directory ...")."""
    write_camera_set(tmp_path / "set", SHAPE, seed=16)
    inventory = scan(tmp_path / "set")
    settings = Settings(data_dir=tmp_path / "data")
    seen = _counted_builds(monkeypatch)
    got: dict[int, object] = {}

    def job(k: int) -> None:
        try:
            ds, _ = dataset_cube(settings, "ds1", inventory)
            got[k] = (ds.attrs["completed"], ds.sha256.values.tolist())
        except Exception as exc:
            got[k] = exc

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [v for v in got.values() if isinstance(v, Exception)], got
    assert got[0] == got[1] and seen["builds"] == 1 and seen["most"] == 1


def test_a_cube_is_built_again_only_once_no_job_reads_it(tmp_path: Path, monkeypatch) -> None:
    """Frames uploaded while a job reads the dataset's cube: the next job builds the cube
    again with them, but only after the first job lets go of it."""
    from sitiancal.service.pipeline import CUBES, reading_dataset_cube

    write_camera_set(tmp_path / "set", SHAPE, seed=17)
    full = scan(tmp_path / "set")
    first = full.leave_out([Rejection(file=full.frames[-1].path, reason="not uploaded yet")])
    settings = Settings(data_dir=tmp_path / "data")
    seen = _counted_builds(monkeypatch)
    second: dict[str, object] = {}

    def next_job() -> None:
        ds, _ = dataset_cube(settings, "ds1", full)
        second["files"] = {str(f) for f in ds.file.values}

    with reading_dataset_cube(settings, "ds1", first) as (ds, store):
        assert len(ds.file) == len(full.frames) - 1 and CUBES.readers(store) == 1
        waiting = threading.Thread(target=next_job)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and seen["builds"] == 1  # waits for the reading job
        np.testing.assert_array_equal(ds.frames.values[0], frame_reader(store)([0], slice(None),
                                                                            slice(None))[0])
    waiting.join(timeout=60)
    assert not waiting.is_alive() and seen["builds"] == 2 and CUBES.readers(store) == 0
    assert second["files"] == {f.path for f in full.frames}
    again, _ = dataset_cube(settings, "ds1", full)  # the same frames: opened, not built
    assert seen["builds"] == 2 and {str(f) for f in again.file.values} == second["files"]


def test_compressed_frames_fall_back_to_copy(tmp_path: Path) -> None:
    files = write_camera_set(tmp_path / "set", SHAPE, seed=15)
    victim = tmp_path / "set" / files[0].name
    gz = victim.with_name(victim.name + ".gz")
    gz.write_bytes(gzip.compress(victim.read_bytes(), mtime=0))
    victim.unlink()
    inventory = scan(tmp_path / "set")
    assert len(inventory.frames) == len(files)
    with pytest.raises(CubeError, match=r"readable in place.*compressed \(gzip\)"):
        build_cube(inventory, tmp_path / "v.zarr", layout="virtual")
    ds = build_cube(inventory, tmp_path / "c.zarr")
    assert ds.attrs["layout"] == "copy" and "gzip" in ds.attrs["layout_note"]
    assert isinstance(frame_reader(tmp_path / "c.zarr"), ZarrFrameReader)
    by_name = {f.name: f.pixels for f in files}
    for i, path in enumerate(ds.file.values):
        np.testing.assert_array_equal(ds.frames.values[i],
                                      by_name[Path(str(path)).name.removesuffix(".gz")])


def test_tile_compressed_and_8_bit_frames_fall_back_to_copy(tmp_path: Path) -> None:
    from astropy.io import fits

    write_camera_set(tmp_path / "a", SHAPE, n_bias=2, dark_exptimes=(), flat_exptimes=(),
                     seed=16)
    src = sorted((tmp_path / "a").glob("*.fits"))[0]
    with fits.open(src) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.copy()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(
        tmp_path / "a" / "z_tile.fits.fz")
    ds = build_cube(scan(tmp_path / "a"), tmp_path / "a.zarr")
    assert ds.attrs["layout"] == "copy" and "compressed" in ds.attrs["layout_note"]

    write_camera_set(tmp_path / "b", SHAPE, n_bias=2, dark_exptimes=(), flat_exptimes=(),
                     seed=17, dtype=np.uint8)
    ds = build_cube(scan(tmp_path / "b"), tmp_path / "b.zarr")
    assert ds.attrs["layout"] == "copy" and "BITPIX 8" in ds.attrs["layout_note"]



def test_frame_source_of_a_file_matches_the_cube_manifest(tmp_path: Path) -> None:
    """``FrameSource.of_file`` (headers only) gives the source the cube build records."""
    from astropy.io import fits

    files = write_camera_set(tmp_path / "set", SHAPE, n_bias=3, dark_exptimes=(),
                             flat_exptimes=(), seed=18)
    _move_image_to_extension(tmp_path / "set" / files[1].name)
    build_cube(scan(tmp_path / "set"), tmp_path / "v.zarr", layout="virtual")
    recorded = {Path(s["path"]).name: FrameSource.from_dict(s) for s in
                zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["frame_sources"]}
    for f in files:
        source = FrameSource.of_file(str(tmp_path / "set" / f.name))
        assert source == recorded[f.name]
        got = VirtualFrameReader("x", [source])([0], slice(0, SHAPE[0]), slice(0, SHAPE[1]))
        np.testing.assert_array_equal(got[0], f.pixels)
    # a tile-compressed image cannot be read in place: the reason names it
    with fits.open(tmp_path / "set" / files[0].name) as hdul:
        data = hdul[0].data.copy()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(tmp_path / "c.fits.fz")
    with pytest.raises(FrameReadError, match=r"cannot be read in place.*compressed"):
        FrameSource.of_file(str(tmp_path / "c.fits.fz"))

def test_tiles_of_a_row_band_run_together(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from sitiancal.compute import graph

    shape, tile = (6388, 9576), (1597, 1368)
    started: list[tuple[int, int]] = []

    def fake_process_tile(load, plan, params, **kwargs):  # records the order tiles are read in
        load([0])
        time.sleep(0.002)
        return SimpleNamespace(partials={}, maps={})

    def reader(indices, ys, xs):
        started.append((ys.start, xs.start))
        return np.zeros((len(indices), 1, 1), np.uint16)

    monkeypatch.setattr(graph, "process_tile", fake_process_tile)
    tasks = build_tile_graph(reader, lambda ys, xs, result: None, shape=shape, tile=tile,
                             plan=None, params=CalibrationParams())  # type: ignore[arg-type]
    bands = [int(str(t.key).split("-")[1]) // tile[0] for t in tasks]
    priorities = [layer.annotations["priority"] for t in tasks
                  for layer in t.dask.layers.values()]
    assert bands == sorted(bands) and len(tasks) == 28
    assert priorities == [4 - b for b in bands]          # earlier bands first (distributed)
    dask.compute(*tasks, scheduler="threads", num_workers=1)
    order = [y // tile[0] for y, _ in started]
    assert sorted(order) == sorted(bands)
    # the threaded scheduler (dask.order) runs each band's 7 tiles back to back
    assert [order[k] for k in range(0, 28, 7)] == [order[k + 6] for k in range(0, 28, 7)]
    assert all(len(set(order[k:k + 7])) == 1 for k in range(0, 28, 7)), order


def _same_cube(a, b) -> None:
    np.testing.assert_array_equal(a.sha256.values, b.sha256.values)
    for name in SCALARS:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.attrs["frame_sources"] == b.attrs["frame_sources"]


@pytest.mark.parametrize("kernel", [
    "vector", pytest.param("sha-ni", marks=pytest.mark.skipif(
        not sha_instructions(), reason="this CPU has no SHA extensions (x86 SHA-NI)"))])
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16], ids=["bzero32768", "signed"])
def test_frames_hashed_side_by_side_give_the_same_cube(tmp_path: Path, monkeypatch,
                                                       dtype: type, direct: bool, kernel: str) -> None:
    """Lanes (pieces of 4096 bytes: rows cut across pieces, a read ahead) against one task per frame."""
    import sitiancal.storage.cube as cube_module
    from sitiancal.storage import digest

    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 1.0, "sha-ni": 2.0} if kernel == "sha-ni"
                                              else {"vector": 2.0}])
    files = write_camera_set(tmp_path / "set", SHAPE, seed=17, dtype=dtype, n_bias=5)
    _move_image_to_extension(tmp_path / "set" / files[2].name)  # a file of another size
    inventory = scan(tmp_path / "set")
    monkeypatch.setattr(cube_module, "_LANE_PIECE", DIRECT_ALIGN)
    batches, singles = cube_module._lane_batches(inventory.frames, True)
    assert sorted([i for b in batches for i in b] + singles) == list(range(len(files)))
    assert len(batches) == 1 and len(batches[0]) == len(files) - 1 and len(singles) == 1
    seen: list[tuple[int, int]] = []
    lanes = build_cube(inventory, tmp_path / "lanes.zarr", tile=TILE, lane_hash=True,
                       direct=direct, progress=lambda done, total: seen.append((done, total)))
    alone = build_cube(inventory, tmp_path / "alone.zarr", tile=TILE, lane_hash=False,
                       direct=direct)
    _same_cube(lanes, alone)
    assert cube_module.frames_hashed_side_by_side(inventory.frames, True) == len(files) - 1
    assert cube_module.frames_hashed_side_by_side(inventory.frames, False) == 0
    assert seen[0] == (0, len(files)) and seen[-1] == (len(files), len(files))
    for i, path in enumerate(lanes.file.values):
        assert lanes.sha256.values[i] == hashlib.sha256(Path(str(path)).read_bytes()).hexdigest()


@pytest.mark.parametrize("lanes", [True, False], ids=["side-by-side", "one-by-one"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16], ids=["bzero32768", "signed"])
def test_the_build_keeps_the_plan_region_of_every_frame(tmp_path: Path, monkeypatch,
                                                        dtype: type, lanes: bool) -> None:
    """A virtual cube keeps each frame's plan region as it reads the frame (rows cut across
    pieces; a file of another size ingested alone): the counts the frame reader gives for
    it, which the plan stage then reads instead of the frames. Another region, or a copy
    cube, reads the frames."""
    import sitiancal.storage.cube as cube_module
    from sitiancal.compute.plan import central_window
    from sitiancal.service.pipeline import _region_reader
    from sitiancal.storage import digest
    from sitiancal.storage.cube import plan_window_reader

    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 2.0}])
    files = write_camera_set(tmp_path / "set", SHAPE, seed=23, dtype=dtype, n_bias=5)
    _move_image_to_extension(tmp_path / "set" / files[2].name)  # a file of another size
    inventory = scan(tmp_path / "set")
    monkeypatch.setattr(cube_module, "_LANE_PIECE", DIRECT_ALIGN)
    ys, xs = central_window(SHAPE, 10)
    assert (ys, xs) == (slice(7, 17), slice(15, 25))
    store = str(tmp_path / "virtual.zarr")
    ds = build_cube(inventory, store, tile=TILE, lane_hash=lanes, plan_window=(ys, xs))
    plain = build_cube(inventory, tmp_path / "plain.zarr", tile=TILE, lane_hash=lanes)
    _same_cube(ds, plain)
    assert set(ds.variables) == set(plain.variables)  # the kept regions are not cube variables
    assert ds.attrs["plan_window"] == [7, 17, 15, 25] and "plan_window" not in plain.attrs
    frames = VirtualFrameReader.from_attrs(store, ds.attrs)
    indices = [3, 0, len(files) - 1, 2, 3]
    kept = plan_window_reader(store, ds.attrs, ys, xs)
    assert kept is not None
    np.testing.assert_array_equal(kept(indices), frames(indices, ys, xs))
    assert kept(indices).dtype == np.uint16 and kept([]).shape == (0, 10, 10)

    def unread(indices, ys, xs):
        raise AssertionError("the frames were read again")

    plan_read = _region_reader(unread, store, ds.attrs, SHAPE, 10)
    np.testing.assert_array_equal(plan_read(indices), frames(indices, ys, xs))
    assert plan_window_reader(store, ds.attrs, *central_window(SHAPE, 8)) is None
    other = _region_reader(frames, store, ds.attrs, SHAPE, 8)
    np.testing.assert_array_equal(other(indices), frames(indices, *central_window(SHAPE, 8)))
    copy = build_cube(inventory, tmp_path / "copy.zarr", tile=TILE, layout="copy",
                      plan_window=(ys, xs))
    assert "plan_window" not in copy.attrs
    assert plan_window_reader(str(tmp_path / "copy.zarr"), copy.attrs, ys, xs) is None


def test_side_by_side_hashing_is_chosen_by_speed_and_size(tmp_path: Path, monkeypatch) -> None:
    """``lane_hash="auto"``: small sets are hashed one by one without timing the kernels."""
    import sitiancal.storage.cube as cube_module
    from sitiancal.storage import digest

    files = write_camera_set(tmp_path / "set", SHAPE, seed=21)
    inventory = scan(tmp_path / "set")
    monkeypatch.setattr(digest, "_SPEEDUPS", [])
    monkeypatch.setattr(digest, "_measure_speedups", lambda: pytest.fail("measured"))
    assert cube_module.frames_hashed_side_by_side(inventory.frames) == 0  # below LANE_MIN_BYTES
    monkeypatch.setattr(cube_module, "LANE_MIN_BYTES", 0)
    monkeypatch.setattr(digest, "sha_instructions", lambda: True)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 1.0, "sha-ni": 2.0}])
    assert cube_module.frames_hashed_side_by_side(inventory.frames) == len(files)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 0.9, "sha-ni": 1.05}])  # hashlib is as fast
    assert cube_module.frames_hashed_side_by_side(inventory.frames) == 0
    assert cube_module.frames_hashed_side_by_side(inventory.frames, True) == len(files)


def test_frames_hashed_side_by_side_fall_back_where_o_direct_is_refused(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A file system that opens files with O_DIRECT and refuses the transfer: read buffered."""
    import sitiancal.storage.cube as cube_module

    write_camera_set(tmp_path / "set", SHAPE, seed=19)
    inventory = scan(tmp_path / "set")
    monkeypatch.setattr(cube_module, "_LANE_PIECE", DIRECT_ALIGN)
    alone = build_cube(inventory, tmp_path / "alone.zarr", tile=TILE, lane_hash=False)
    refused: list[int] = []

    def refuse(fd: int, *args: object) -> None:
        refused.append(fd)

    monkeypatch.setattr(cube_module, "open_direct", lambda path: os.open(path, os.O_RDONLY))
    monkeypatch.setattr(cube_module, "pread_direct", refuse)
    lanes = build_cube(inventory, tmp_path / "lanes.zarr", tile=TILE, lane_hash=True,
                       direct=True)
    _same_cube(lanes, alone)
    assert len(refused) == len(inventory.frames)  # once per file, then buffered


def test_piece_statistics_equal_the_whole_frame_pass(tmp_path: Path) -> None:
    """Pieces of any sizes (a row cut anywhere, pieces inside one row) give the same counts."""
    from sitiancal.storage.cube import _PieceStatistics, _virtual_statistics
    from sitiancal.storage.frames import find_image_hdu

    files = write_camera_set(tmp_path / "set", (37, 53), seed=5, n_bias=1, n_dark=1, n_flat=1)
    rng = np.random.default_rng(2)
    for f in files:
        path = str(tmp_path / "set" / f.name)
        raw = np.frombuffer(Path(path).read_bytes(), np.uint8).copy()
        info = find_image_hdu(lambda o, n, raw=raw: raw[o:o + n].tobytes(), path, 0,
                              size=raw.size)[1]
        want = _virtual_statistics(raw, info, path, (37, 53))
        counter = _PieceStatistics(info, (37, 53), path)
        offset = 0
        while offset < raw.size:
            n = int(rng.choice([1, 7, 50, 106, 107, 500, 4096]))
            counter.feed(raw[offset:offset + n], offset)
            offset += n
        got = counter.result()
        for name in ("mean", "median", "clipped_mean", "clipped_std", "center_mean"):
            assert getattr(got, name) == getattr(want, name), name
        np.testing.assert_array_equal(got.row_mean, want.row_mean)
        np.testing.assert_array_equal(got.col_mean, want.col_mean)


def test_frames_hashed_side_by_side_are_refused_as_one_by_one(tmp_path: Path, monkeypatch) -> None:
    """Negative counts without BZERO (the frame left out), a truncated file (the build
    fails): the same reasons, naming the file."""
    from fitscorpus import STATE, write_fits

    import sitiancal.storage.cube as cube_module

    monkeypatch.setattr(cube_module, "_LANE_PIECE", DIRECT_ALIGN)
    write_camera_set(tmp_path / "set", SHAPE, seed=3, dtype=np.int16)
    bad = tmp_path / "set" / "frame_0000.fits"
    pixels = np.full(SHAPE, 100, np.int16)
    pixels[3, 4] = -7
    write_fits(bad, pixels, {**STATE, "IMAGETYP": "BIAS", "EXPTIME": 0.0, "CCD-TEMP": -10.0,
                             "DATE-OBS": "2026-01-01T00:00:00"})
    inventory = scan(tmp_path / "set")
    assert str(bad) in {r.path for r in inventory.frames}  # the header cannot tell
    cubes = [build_cube(inventory, tmp_path / f"n{lane_hash}.zarr", tile=TILE,
                        lane_hash=lane_hash) for lane_hash in (True, False)]
    reason = ("refused when read: negative counts (minimum -7) in signed 16-bit data "
              "without BZERO offset")
    for ds in cubes:
        assert ds.attrs["left_out"] == [{"file": str(bad), "reason": reason}]
        assert ds.sizes["frame"] == len(inventory.frames) - 1 and str(bad) not in ds.file.values
        assert ds.attrs["counts"]["bias"] == inventory.counts["bias"] - 1
    _same_cube(*cubes)
    clean = inventory.leave_out([Rejection(file=str(bad), reason="left out by hand")])
    _same_cube(cubes[0], build_cube(clean, tmp_path / "clean.zarr", tile=TILE, lane_hash=True))
    # every frame refused: the build fails, saying so
    write_camera_set(tmp_path / "neg", SHAPE, seed=3, dtype=np.int16, n_bias=0)
    for k, path in enumerate(sorted((tmp_path / "neg").glob("*.fits"))):
        write_fits(path, pixels, {**STATE, "IMAGETYP": "BIAS", "EXPTIME": 0.0, "CCD-TEMP": -10.0,
                                  "DATE-OBS": f"2026-01-01T00:0{k}:00"})
    with pytest.raises(CubeError, match="every frame was refused when read"):
        build_cube(scan(tmp_path / "neg"), tmp_path / "neg.zarr", tile=TILE)

    # one file cut (its size is no longer the batch's: ingested alone), then every file
    write_camera_set(tmp_path / "set2", SHAPE, seed=3)
    inventory = scan(tmp_path / "set2")
    for cut in ([inventory.frames[1]], inventory.frames):
        for r in cut:
            data = Path(r.path).read_bytes()
            Path(r.path).write_bytes(data[:len(data) - 2880])
        messages = []
        for lane_hash in (True, False):
            with pytest.raises(CubeError, match="truncated") as err:
                build_cube(inventory, tmp_path / f"t{lane_hash}.zarr", tile=TILE,
                           lane_hash=lane_hash)
            messages.append(str(err.value).split(".fits: ", 1)[1])  # the reason (which
        assert messages[0] == messages[1]                              # file fails first varies)
