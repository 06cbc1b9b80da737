"""Frame cubes: exact round trip, coordinates, per-frame statistics, chunks, codecs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits
from click.testing import CliRunner
from fitscorpus import write_camera_set, write_corpus
from framestats import reference_stats

from sitiancal.service.cli import main as cli
from sitiancal.storage import cube as cube_module
from sitiancal.storage.cube import (
    CubeError,
    build_cube,
    choose_tile,
    frame_statistics,
    frame_statistics_be16,
    open_cube,
)
from sitiancal.storage.scan import scan

SHAPE = (24, 40)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(root, SHAPE, seed=2)
    inventory = scan(root)
    store = tmp_path_factory.mktemp("cube") / "cube.zarr"
    calls: list[tuple[int, int]] = []
    ds = build_cube(inventory, store, tile=(8, 16), max_workers=2,
                    progress=lambda done, total: calls.append((done, total)))
    good = {str(root / f.name): f for f in files if f.kind == "good"}
    return root, good, inventory, store, ds, calls


def test_round_trip_is_exact(built) -> None:
    _, good, inventory, _, ds, _ = built
    assert ds.sizes["frame"] == len(inventory.frames) == len(good)
    assert ds.frames.dtype == np.uint16
    frames = ds.frames.values
    for i, path in enumerate(ds.file.values):
        expected = good[str(path)].pixels
        np.testing.assert_array_equal(frames[i], expected.astype(np.uint16), err_msg=str(path))
    uint8 = [i for i, p in enumerate(ds.file.values) if good[str(p)].pixels.dtype == np.uint8]
    assert len(uint8) == 1


def test_coordinates(built) -> None:
    _, good, _, _, ds, _ = built
    order = {"bias": 0, "dark": 1, "flat": 2}
    types = [str(t) for t in ds.frame_type.values]
    exptimes = ds.exptime.values
    keys = [(order[t], e) for t, e in zip(types, exptimes, strict=True)]
    assert keys == sorted(keys)
    for i, path in enumerate(ds.file.values):
        f = good[str(path)]
        assert types[i] == f.frame_type
        assert exptimes[i] == pytest.approx(f.exptime)
        assert ds.temperature.values[i] == pytest.approx(f.temperature)
        assert ds.sha256.values[i] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        t = ds.time.values[i]
        if f.time is None:
            assert np.isnat(t)
        else:
            expected = np.datetime64(f.time.replace(tzinfo=None), "ns")
            assert abs(t - expected) < np.timedelta64(1, "ms")
    for t in order:
        sel = np.array(types) == t
        levels = ds.level.values[sel]
        uniq = np.unique(np.round(exptimes[sel], 6))
        np.testing.assert_array_equal(levels, np.searchsorted(uniq, np.round(exptimes[sel], 6)))
    # times increase within a (type, exptime) group
    for t in order:
        for e in np.unique(exptimes):
            sel = (np.array(types) == t) & (exptimes == e)
            times = ds.time.values[sel]
            times = times[~np.isnat(times)]
            assert np.all(np.diff(times) >= np.timedelta64(0, "ns"))


def test_frame_statistics_match_numpy(built) -> None:
    _, _, _, _, ds, _ = built
    frames = ds.frames.values.astype(np.float64)
    for i in range(ds.sizes["frame"]):
        ref = reference_stats(frames[i])
        assert ds.frame_mean.values[i] == pytest.approx(ref["mean"], rel=1e-12)
        assert ds.frame_median.values[i] == ref["median"]
        assert ds.frame_clipped_mean.values[i] == pytest.approx(ref["clipped_mean"], rel=1e-12)
        assert ds.frame_clipped_std.values[i] == pytest.approx(ref["clipped_std"], rel=1e-10)
        assert ds.center_mean.values[i] == pytest.approx(ref["center_mean"], rel=1e-12)
        np.testing.assert_allclose(ds.row_mean.values[i], frames[i].mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(ds.col_mean.values[i], frames[i].mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(64, 96), (33, 17), (1, 5)])
def test_statistics_kernel_against_numpy_and_astropy(seed: int, shape: tuple[int, int]) -> None:
    # Heavy-tailed core (Student t, 3 dof: many pixels near the 3-sigma bounds), hot
    # pixels and a saturated one: the clipping must keep exactly the pixels that
    # astropy's one-pass median/MAD clip keeps.
    rng = np.random.default_rng(seed)
    frame = np.rint(1000 + 500 * seed + (7 + seed) * rng.standard_t(3, size=shape))
    hot = rng.random(shape) < 0.02
    frame[hot] = rng.integers(2000, 65536, size=int(hot.sum()))
    frame.flat[0] = 65535
    frame = frame.astype(np.uint16)
    stats = frame_statistics(frame)
    ref = reference_stats(frame)
    assert stats.mean == pytest.approx(ref["mean"], rel=1e-12)
    assert stats.median == ref["median"]
    assert stats.clipped_mean == pytest.approx(ref["clipped_mean"], rel=1e-12)
    assert stats.clipped_std == pytest.approx(ref["clipped_std"], rel=1e-10, abs=1e-12)
    assert stats.center_mean == pytest.approx(ref["center_mean"], rel=1e-12)
    np.testing.assert_allclose(stats.row_mean, frame.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.col_mean, frame.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("bzero", [32768, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_of_fits_words_equal_those_of_the_counts(seed: int, bzero: int) -> None:
    # The virtual build takes the statistics straight from the file's big-endian
    # words (histogram of the words, permuted; sums decoded in the loop): every
    # field must equal that of the decoded counts, including the extremes.
    rng = np.random.default_rng(seed)
    shape = (37, 53)  # odd width: the histogram's tail loop
    hi = 65536 if bzero else 32768  # BZERO 0 stores non-negative int16 counts
    counts = np.rint(900 + 40 * rng.standard_t(3, size=shape)).clip(0, hi - 1)
    hot = rng.random(shape) < 0.03
    counts[hot] = rng.integers(0, hi, size=int(hot.sum()))
    counts.flat[:3] = (0, hi - 1, hi - 1)
    counts = counts.astype(np.uint16)
    stored = (counts.astype(np.int32) - bzero).astype(">i2")  # the FITS data block
    words = stored.view(np.uint16)  # its bytes as the file buffer holds them
    got, ref = frame_statistics_be16(words, bzero=bzero), frame_statistics(counts)
    for name in ("mean", "median", "clipped_mean", "clipped_std", "center_mean"):
        assert getattr(got, name) == getattr(ref, name), name
    np.testing.assert_array_equal(got.row_mean, ref.row_mean)
    np.testing.assert_array_equal(got.col_mean, ref.col_mean)
    with pytest.raises(ValueError, match="BZERO"):
        frame_statistics_be16(words, bzero=1)


def test_statistics_of_a_constant_frame() -> None:
    stats = frame_statistics(np.full((4, 6), 700, np.uint16))
    assert (stats.mean, stats.median, stats.clipped_mean, stats.clipped_std) == (700, 700, 700, 0)


def test_chunks_and_codec(built) -> None:
    _, _, _, store, ds, _ = built
    # the corpus holds tile-compressed, gzip and 8-bit frames: the auto layout copies
    assert ds.attrs["layout"] == "copy" and ds.attrs["layout_note"]
    array = zarr.open_group(store, mode="r")["frames"]
    assert array.chunks == (1, 8, 16)
    assert ds.frames.data.chunksize == (1, 8, 16)
    blosc = [c for c in array.metadata.codecs if type(c).__name__ == "BloscCodec"]
    assert len(blosc) == 1
    codec = blosc[0].to_dict()["configuration"]
    assert (codec["cname"], codec["clevel"], codec["shuffle"]) == ("zstd", 1, "bitshuffle")
    assert array.metadata.dimension_names == ("frame", "y", "x")
    plain = xr.open_zarr(store, consolidated=False)
    assert plain.attrs["complete"] is True and plain.attrs["tile"] == [8, 16]
    assert plain.attrs["operating_state"]["gain"] == 100


def test_progress_reports_every_frame(built) -> None:
    *_, ds, calls = built
    n = ds.sizes["frame"]
    assert calls[0] == (0, n) and calls[-1] == (n, n)
    assert [d for d, _ in calls] == list(range(n + 1))


@pytest.mark.parametrize(("ny", "nx", "expected"), [
    (6388, 9576, (1597, 1368)), (24, 40, (24, 40)), (1600, 1400, (1600, 1400)),
    (3194, 4788, (1597, 1596)),
])
def test_choose_tile(ny: int, nx: int, expected: tuple[int, int]) -> None:
    assert choose_tile(ny, nx) == expected


def test_choose_tile_without_a_divisor() -> None:
    ty, tx = choose_tile(6389, 9587)  # 6389 and 9587 are prime
    assert ty * 4 >= 6389 > ty * 3 and tx * 7 >= 9587 > tx * 6


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("layout", ["virtual", "copy"])
def test_each_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                layout: str, direct: bool) -> None:
    files = write_camera_set(tmp_path / "set", SHAPE, seed=5, dtype=np.uint16)
    inventory = scan(tmp_path / "set")
    reads: list[tuple[str, str]] = []

    def counting(name: str):
        original = getattr(cube_module, name)

        def read(path, **kwargs):
            reads.append((name, str(path)))
            return original(path, **kwargs)
        return read

    for name in ("read_file_bytes", "read_file_direct"):
        monkeypatch.setattr(cube_module, name, counting(name))
    ds = build_cube(inventory, tmp_path / "c.zarr", scheduler="synchronous", layout=layout,
                    direct=direct, lane_hash=False)
    reader = "read_file_direct" if direct else "read_file_bytes"
    assert sorted(reads) == sorted((reader, str(tmp_path / "set" / f.name)) for f in files)
    assert ds.sizes["frame"] == len(files) and ds.attrs["layout"] == layout


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_each_file_is_read_once_when_hashed_side_by_side(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         direct: bool) -> None:
    """The pieces read of each file cover it once, end to end (the lanes of the virtual layout)."""
    files = write_camera_set(tmp_path / "set", SHAPE, seed=5, dtype=np.uint16)
    inventory = scan(tmp_path / "set")
    monkeypatch.setattr(cube_module, "_LANE_PIECE", 4096)
    pieces: dict[str, list[tuple[int, int]]] = {}
    original = cube_module._read_piece

    def counting(lane, view, offset, n, path):
        pieces.setdefault(path, []).append((offset, n))
        return original(lane, view, offset, n, path)

    monkeypatch.setattr(cube_module, "_read_piece", counting)
    build_cube(inventory, tmp_path / "c.zarr", scheduler="synchronous", layout="virtual",
               direct=direct, lane_hash=True)
    assert sorted(pieces) == sorted(str(tmp_path / "set" / f.name) for f in files)
    for path, got in pieces.items():
        ends = [0] + [offset + n for offset, n in got]
        assert [offset for offset, _ in got] == ends[:-1] and ends[-1] == Path(path).stat().st_size


@pytest.mark.parametrize("layout", ["virtual", "copy"])
def test_incomplete_cube_is_refused(tmp_path: Path, layout: str) -> None:
    write_camera_set(tmp_path / "set", SHAPE, seed=6)
    inventory = scan(tmp_path / "set")
    victim = Path(inventory.frames[-1].path)
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated after the scan
    store = tmp_path / "c.zarr"
    with pytest.raises(CubeError, match="truncated"):
        build_cube(inventory, store, layout=layout)
    with pytest.raises(CubeError, match="incomplete cube"):
        open_cube(store)


def test_existing_store_handling(tmp_path: Path) -> None:
    write_camera_set(tmp_path / "set", SHAPE, n_bias=2, dark_exptimes=(), flat_exptimes=(),
                     seed=7)
    inventory = scan(tmp_path / "set")
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("do not delete")
    with pytest.raises(CubeError, match="refusing to overwrite"):
        build_cube(inventory, other)
    assert (other / "thesis.tex").exists()
    store = tmp_path / "c.zarr"
    build_cube(inventory, store)
    again = build_cube(inventory, store)  # an existing cube is replaced
    assert again.sizes["frame"] == 2
    with pytest.raises(CubeError, match="no cube"):
        open_cube(tmp_path / "nothing.zarr")


def test_cli_cube(tmp_path: Path) -> None:
    files = write_camera_set(tmp_path / "set", SHAPE, seed=8)
    store = tmp_path / "cli.zarr"
    result = CliRunner().invoke(cli, ["cube", str(tmp_path / "set"), "--out", str(store),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"cube of {len(files)} frames (24 x 40)" in result.stdout
    ds = open_cube(store)
    assert ds.sizes["frame"] == len(files)


def test_cli_cube_names_a_frame_refused_when_read(tmp_path: Path) -> None:
    """A float frame holding a NaN (its header is fine): left out, with a warning naming it."""
    files = write_camera_set(tmp_path / "set", SHAPE, seed=8)
    bad = tmp_path / "set" / files[0].name
    with fits.open(bad) as hdul:
        data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
    del header["BZERO"]
    data[2, 3] = np.nan
    fits.PrimaryHDU(data, header=header).writeto(bad, overwrite=True)
    store = tmp_path / "cli.zarr"
    result = CliRunner().invoke(cli, ["cube", str(tmp_path / "set"), "--out", str(store),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (f"warning: {bad} left out: refused when read: non-finite value nan at pixel (2, 3) "
            "in floating-point data: not raw counts") in result.stderr
    assert f"cube of {len(files) - 1} frames (24 x 40)" in result.stdout
    assert open_cube(store).sizes["frame"] == len(files) - 1


def test_cli_cube_without_frames(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.fits").write_text("not fits")
    result = CliRunner().invoke(cli, ["cube", str(tmp_path / "set"), "--out",
                                      str(tmp_path / "c.zarr"), "--no-progress"])
    assert result.exit_code == 2
    assert "no usable frame" in result.stderr and "not a FITS file" in result.stderr


@pytest.mark.parametrize("layout", ["virtual", "copy"])
def test_distributed_client(tmp_path: Path, layout: str) -> None:
    distributed = pytest.importorskip("distributed")
    files = write_camera_set(tmp_path / "set", SHAPE, seed=9)
    inventory = scan(tmp_path / "set")
    calls: list[tuple[int, int]] = []
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        ds = build_cube(inventory, tmp_path / "c.zarr", scheduler=client, layout=layout,
                        progress=lambda d, t: calls.append((d, t)))
        frames = ds.frames.values
    assert calls[-1] == (len(files), len(files)) and ds.attrs["layout"] == layout
    by_name = {f.name: f.pixels for f in files}
    for i, path in enumerate(ds.file.values):
        np.testing.assert_array_equal(frames[i], by_name[Path(str(path)).name])


def test_fsspec_url_store(built) -> None:
    _, _, inventory, _, local, _ = built
    url = "memory://sitiancal-test/cube.zarr"
    try:
        ds = build_cube(inventory, url, tile=(12, 20))
        assert ds.frames.data.chunksize == (1, 12, 20)
        np.testing.assert_array_equal(ds.frames.values, local.frames.values)
        np.testing.assert_array_equal(open_cube(url).sha256.values, local.sha256.values)
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/sitiancal-test", recursive=True)
