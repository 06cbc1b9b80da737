"""Scan (headers only) and fast frame reads, on the FITS corpus of every convention."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner
from fitscorpus import STATE, CorpusFile, write_camera_set, write_corpus, write_fits

from sitiancal.service.cli import main as cli
from sitiancal.storage.frames import (
    FrameReadError,
    decode_be16,
    file_sha256,
    read_file_bytes,
    read_frame,
    read_frame_bytes,
)
from sitiancal.storage.scan import (
    FrameType,
    Inventory,
    ScanError,
    classify_frame_type,
    scan,
    type_from_path,
)

SHAPE = (24, 40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusFile], Inventory]:
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(root, SHAPE, seed=1)
    return root, files, scan(root)


def _by_path(inventory: Inventory, root: Path) -> tuple[dict, dict]:
    frames = {str(Path(r.path).relative_to(root)): r for r in inventory.frames}
    rejected = {str(Path(r.file).relative_to(root)): r.reason for r in inventory.rejected}
    return frames, rejected


def test_every_good_frame_is_classified(corpus) -> None:
    root, files, inventory = corpus
    frames, rejected = _by_path(inventory, root)
    good = [f for f in files if f.kind == "good"]
    assert len(good) >= 30
    for f in good:
        assert f.name in frames, f"{f.name} rejected: {rejected.get(f.name)}"
        record = frames[f.name]
        assert record.type == f.frame_type, f.name
        assert record.exptime == pytest.approx(f.exptime, abs=1e-9), f.name
        assert record.temperature == pytest.approx(f.temperature), f.name
        assert record.shape == SHAPE
        assert record.state.gain == STATE["GAIN"] and record.state.offset == STATE["OFFSET"]
        if f.time is None:
            assert record.time is None, f.name
        else:
            assert abs((record.time - f.time).total_seconds()) < 1e-3, f.name
            assert record.time.utcoffset().total_seconds() == 0
    assert len(frames) == len(good)
    assert inventory.counts == {t: sum(f.frame_type == t for f in good) for t in
                                ("bias", "dark", "flat")}


def test_every_bad_file_is_rejected_with_its_reason(corpus) -> None:
    root, files, inventory = corpus
    _, rejected = _by_path(inventory, root)
    bad = [f for f in files if f.kind == "bad"]
    assert len(bad) >= 19
    for f in bad:
        assert f.name in rejected, f"{f.name} was not rejected"
        assert f.reason in rejected[f.name], (f.name, rejected[f.name])
    assert len(rejected) == len(bad)


def test_ignored_files_are_neither_frames_nor_rejections(corpus) -> None:
    root, files, inventory = corpus
    frames, rejected = _by_path(inventory, root)
    for f in files:
        if f.kind == "ignored":
            assert f.name not in frames and f.name not in rejected
    assert inventory.n_files == len(frames) + len(rejected)


def test_file_names_are_not_trusted(corpus) -> None:
    root, _, inventory = corpus
    frames, _ = _by_path(inventory, root)
    assert frames["bias_001.fits"].type is FrameType.DARK
    assert frames["odd/frame_without_suffix"].type is FrameType.DARK


def test_expected_warnings_name_their_files(corpus) -> None:
    root, files, inventory = corpus
    text = "\n".join(inventory.warnings)
    for f in files:
        if f.warning:
            line = next((w for w in inventory.warnings if f.warning in w), None)
            assert line is not None, f"no warning {f.warning!r} in {text}"
            assert str(root / f.name) in line
    assert not any("spread" in w for w in inventory.warnings)


def test_operating_state_and_readouts(corpus) -> None:
    root, _, inventory = corpus
    frames, _ = _by_path(inventory, root)
    assert frames["layout/ext1_dark.fits"].hdu == 1
    assert frames["layout/tile_dark.fz"].hdu == 1 and frames["layout/tile_dark.fz"].compression
    assert frames["layout/gzip_flat.fits.gz"].compression == "gzip"
    assert frames["layout/uint8_bias.fits"].bitpix == 8
    assert frames["maxim/bias_frame.fits"].state.gain == 100  # GAIN, not EGAIN = 0.25
    assert inventory.operating_state["instrument"] == "ZWO ASI6200MM Pro"
    assert inventory.temperature == {"min": -10.1, "max": -9.9}
    assert inventory.exposure_times["dark"] == [1.0, 10.0, 30.0, 60.0]
    assert inventory.exposure_times["flat"] == [1.0, 2.0]


def test_inventory_json_matches_the_api(corpus) -> None:
    _, _, inventory = corpus
    doc = json.loads(inventory.model_dump_json(exclude={"frames"}))
    api_fields = {"source", "shape", "counts", "exposure_times", "temperature",
                  "operating_state", "rejected", "warnings"}
    assert api_fields <= set(doc)
    assert doc["shape"] == list(SHAPE)
    assert set(doc["counts"]) == {"bias", "dark", "flat"}
    assert {"dark", "flat"} <= set(doc["exposure_times"])
    assert set(doc["temperature"]) == {"min", "max"}
    assert all(set(r) == {"file", "reason"} for r in doc["rejected"])
    assert {"gain", "offset", "xbinning", "ybinning"} <= set(doc["operating_state"])


def test_scan_is_deterministic(corpus) -> None:
    root, _, inventory = corpus
    again = scan(root)
    assert again.model_dump_json() == inventory.model_dump_json()
    assert [r.path for r in inventory.frames] == sorted(r.path for r in inventory.frames)


def test_mixed_states_can_be_allowed(corpus) -> None:
    root, _, _ = corpus
    inventory = scan(root, allow_mixed_states=True)
    frames, rejected = _by_path(inventory, root)
    assert frames["bad/gain200_dark.fits"].state.gain == 200
    assert "bad/gain200_dark.fits" not in rejected
    assert any("mixed operating states accepted" in w and "gain=200" in w
               for w in inventory.warnings)


def test_temperature_spread_warns(tmp_path: Path) -> None:
    write_camera_set(tmp_path, SHAPE, n_bias=2, dark_exptimes=(), flat_exptimes=())
    write_fits(tmp_path / "warm.fits", np.full(SHAPE, 500, np.uint16),
               {**STATE, "IMAGETYP": "BIAS", "EXPTIME": 0.0, "CCD-TEMP": -6.5})
    inventory = scan(tmp_path)
    assert inventory.counts["bias"] == 3
    assert any("spread" in w and "-6.50" in w for w in inventory.warnings)


@pytest.mark.parametrize(("value", "expected"), [
    ("Bias Frame", "bias"), ("Dark Frame", "dark"), ("Flat Field", "flat"),
    ("Flat Frame", "flat"), ("BIAS", "bias"), ("DARK", "dark"), ("FLAT", "flat"),
    ("DARKFLAT", "dark"), ("Dark Flat", "dark"), ("Bias", "bias"), ("Dark", "dark"),
    ("Flat", "flat"), ("ZERO", "bias"), ("Zero", "bias"), ("zero", "bias"),
    ("FLATFIELD", "flat"), ("flat_field", "flat"), ("  dark   frame ", "dark"),
    ("LIGHT", None), ("Light Frame", None),
])
def test_frame_type_conventions(value: str, expected: str | None) -> None:
    assert classify_frame_type(value) == (FrameType(expected) if expected else None)


def test_unknown_frame_type_raises() -> None:
    with pytest.raises(KeyError):
        classify_frame_type("Focus Frame")


def test_missing_path_is_a_scan_error(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="no such file"):
        scan(tmp_path / "nope")


def test_empty_folder_and_single_file(tmp_path: Path) -> None:
    empty = scan(tmp_path)
    assert empty.frames == [] and any("no FITS files" in w for w in empty.warnings)
    files = write_camera_set(tmp_path / "set", SHAPE, n_bias=1, dark_exptimes=(),
                             flat_exptimes=())
    one = scan(tmp_path / "set" / files[0].name)
    assert [r.type for r in one.frames] == [FrameType.BIAS]


def test_fsspec_url_source(corpus) -> None:
    import fsspec

    root, files, _ = corpus
    fs = fsspec.filesystem("memory")
    names = ["nina/DARK_30s.fits", "layout/tile_dark.fz", "bad/cube3d.fits"]
    for name in names:
        fs.pipe(f"/corpus-test/{name}", (root / name).read_bytes())
    try:
        inventory = scan("memory://corpus-test")
        assert [r.type for r in inventory.frames] == [FrameType.DARK, FrameType.DARK]
        assert [r.reason[:9] for r in inventory.rejected] == ["3-D data "]
        pixels = next(f.pixels for f in files if f.name == names[0])
        np.testing.assert_array_equal(read_frame(inventory.frames[1].path), pixels)
    finally:
        fs.rm("/corpus-test", recursive=True)


# ----------------------------------------------------------------------------- frames


def test_read_frame_matches_the_written_pixels_and_astropy(corpus) -> None:
    root, files, inventory = corpus
    frames, _ = _by_path(inventory, root)
    for f in files:
        if f.kind != "good":
            continue
        path = root / f.name
        record = frames[f.name]
        got = read_frame(path, record.hdu)
        assert got.dtype == f.pixels.dtype and got.dtype.isnative, f.name
        np.testing.assert_array_equal(got, f.pixels, err_msg=f.name)
        with fits.open(path) as hdul:
            np.testing.assert_array_equal(got, hdul[record.hdu].data, err_msg=f.name)
        np.testing.assert_array_equal(read_frame(path), got)  # first image HDU by default
        np.testing.assert_array_equal(read_frame_bytes(path.read_bytes(), record.hdu), got)


def test_fast_path_converts_every_uint16_value(tmp_path: Path) -> None:
    # Every uint16 value once: the in-place byte swap and XOR 0x8000 must agree with
    # astropy's BZERO=32768 scaling over the whole range.
    data = np.random.default_rng(3).permutation(np.arange(65536, dtype=np.uint16))
    data = data.reshape(256, 256)
    path = tmp_path / "all.fits"
    fits.PrimaryHDU(data).writeto(path)
    assert fits.getheader(path)["BZERO"] == 32768
    got = read_frame(path)
    np.testing.assert_array_equal(got, fits.getdata(path))
    np.testing.assert_array_equal(got, data)
    buf = read_file_bytes(path)
    digest = hashlib.sha256(buf).hexdigest()
    assert digest == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    in_place = read_frame_bytes(buf)
    np.testing.assert_array_equal(in_place, data)
    assert np.shares_memory(in_place, np.frombuffer(buf, dtype=np.uint8))


@pytest.mark.parametrize("bzero", [32768, 0])
def test_decode_be16_matches_numpy(bzero: int) -> None:
    # every 16-bit word, as big-endian bytes: numpy's byte swap (and XOR for BZERO 32768)
    words = np.random.default_rng(4).permutation(np.arange(65536, dtype=np.uint16)).reshape(256, 256)
    raw = words.astype(">u2").view(np.uint16)  # the file's bytes, seen as native words
    expected = words ^ np.uint16(0x8000) if bzero == 32768 else words
    out = np.empty_like(raw)
    np.testing.assert_array_equal(decode_be16(raw, out, bzero=bzero), expected)
    in_place = raw.copy()
    assert decode_be16(in_place, in_place, bzero=bzero) is in_place
    np.testing.assert_array_equal(in_place, expected)
    flat = raw.ravel().copy()
    np.testing.assert_array_equal(decode_be16(flat, flat, bzero=bzero), expected.ravel())
    window = np.empty((85, 100), np.uint16)  # a strided window of a mapped block
    decode_be16(raw[1::3, 17:117], window, bzero=bzero)
    np.testing.assert_array_equal(window, expected[1::3, 17:117])
    with pytest.raises(ValueError, match="BZERO"):
        decode_be16(raw, out, bzero=1)
    with pytest.raises(ValueError, match="same shape"):
        decode_be16(raw, out[:10], bzero=bzero)


def test_read_frame_errors(corpus, tmp_path: Path) -> None:
    root, _, _ = corpus
    with pytest.raises(FrameReadError, match="truncated: 920 bytes of pixel data missing"):
        read_frame(root / "bad/truncated.fits")
    with pytest.raises(FrameReadError, match="not a FITS file"):
        read_frame(root / "bad/not_fits.fits")
    with pytest.raises(FrameReadError, match="no image HDU"):
        read_frame(root / "bad/table_only.fits")
    with pytest.raises(FrameReadError, match="expected a 2-D image"):
        read_frame(root / "bad/cube3d.fits")
    with pytest.raises(FrameReadError, match="corrupt gzip"):
        read_frame(root / "bad/corrupt.fits.gz")
    with pytest.raises(FrameReadError, match="unreadable"):
        read_frame(tmp_path / "missing.fits")
    negative = np.full(SHAPE, 5, np.int16)
    negative[3, 4] = -7
    write_fits(tmp_path / "neg.fits", negative, {"IMAGETYP": "BIAS"})
    with pytest.raises(FrameReadError, match=r"negative counts \(minimum -7\)"):
        read_frame(tmp_path / "neg.fits")


@pytest.mark.parametrize(("dtype", "value", "reason"), [
    (np.float32, np.nan, r"non-finite value nan at pixel \(300, 4\) in floating-point data"),
    (np.float64, 512.25, r"non-integer value 512.25 at pixel \(300, 4\) in floating-point"),
    (np.float64, -3.0, r"value -3 at pixel \(300, 4\) outside 0-65535 in floating-point"),
    (np.int64, 70000, r"value 70000 at pixel \(300, 4\) outside 0-65535 in 64-bit integer"),
    (np.int32, -1, r"value -1 at pixel \(300, 4\) outside 0-65535 in 32-bit integer"),
])
def test_wide_typed_frames_are_read_only_as_whole_16_bit_counts(tmp_path: Path, dtype, value,
                                                                 reason: str) -> None:
    """Counts in a wide type are read as uint16; a value that is not a count refuses the frame."""
    counts = np.random.default_rng(3).integers(0, 65536, (400, 9)).astype(dtype)
    counts[0, :2] = (0, 65535)  # the range's edges are counts
    write_fits(tmp_path / "ok.fits", counts, {"IMAGETYP": "BIAS"})
    got = read_frame(tmp_path / "ok.fits")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, counts.astype(np.uint16))
    counts[300, 4] = value  # past the first band of rows: every band is checked
    write_fits(tmp_path / "bad.fits", counts, {"IMAGETYP": "BIAS"})
    with pytest.raises(FrameReadError, match=reason):
        read_frame(tmp_path / "bad.fits")
    inventory = scan(tmp_path)  # headers only: accepted, with the warning
    assert len(inventory.frames) == 2 and not inventory.rejected
    assert any("converted to 16-bit counts when read" in w for w in inventory.warnings)


# ----------------------------------------------------------------------------- CLI


def test_cli_scan_json(corpus) -> None:
    root, files, _ = corpus
    result = CliRunner().invoke(cli, ["scan", str(root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "frames" not in doc
    assert sum(doc["counts"].values()) == sum(f.kind == "good" for f in files)
    assert len(doc["rejected"]) == sum(f.kind == "bad" for f in files)


def test_cli_scan_summary(corpus) -> None:
    root, _, _ = corpus
    result = CliRunner().invoke(cli, ["scan", str(root)])
    assert result.exit_code == 0, result.output
    assert "rejected (" in result.stdout and "truncated" in result.stdout
    assert "operating state: gain=100" in result.stdout


def test_cli_scan_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(cli, ["scan", str(missing)])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "no such file or directory" in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_scan_without_frames_exits_1(tmp_path: Path) -> None:
    shutil.copy(Path(__file__), tmp_path / "x.fits")
    result = CliRunner().invoke(cli, ["scan", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a FITS file" in result.stdout


def test_scan_reports_progress_per_file(corpus) -> None:
    root = corpus[0]
    calls: list[tuple[int, int]] = []
    inventory = scan(root, progress=lambda done, total: calls.append((done, total)))
    assert [d for d, _ in calls] == list(range(1, inventory.n_files + 1))
    assert all(t == inventory.n_files for _, t in calls)
    result = CliRunner().invoke(cli, ["scan", str(root), "--progress", "--json"])
    assert result.exit_code == 0


@pytest.mark.parametrize(("rel", "expected", "part"), [
    ("Bias/cap_001.fits", FrameType.BIAS, "Bias"),
    ("zeros/a.fits", FrameType.BIAS, "zeros"),
    ("x/DarkFlats/a.fits", FrameType.DARK, "DarkFlats"),      # darks for flats
    ("b/flat_dark_01.fits", FrameType.DARK, "flat_dark_01"),
    ("gain100_offset50/flat/Capture_0001.fits", FrameType.FLAT, "flat"),  # no "offset" word
    ("Bias/Dark_0001.fits", FrameType.DARK, "Dark_0001"),      # the nearest part decides
    ("SkyFlats/2024-03-01/frame.fit", FrameType.FLAT, "SkyFlats"),
    ("b/Lights/m31.fits", None, "Lights"),
])
def test_type_from_path_reads_the_nearest_naming_part(rel: str, expected, part: str) -> None:
    assert type_from_path(f"/data/set/{rel}", "/data/set") == (expected, part)
    assert type_from_path(f"s3://bucket/set/{rel}", "s3://bucket/set") == (expected, part)


@pytest.mark.parametrize(("rel", "message"), [
    ("darkroom/a.fits", "no frame type"),                # whole words only
    ("b/c.fits", "no frame type"),
    ("b/bias_dark.fits", "names several frame types (bias, dark)"),
])
def test_type_from_path_refuses_what_it_cannot_tell(rel: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        type_from_path(f"/data/{rel}", "/data")


def test_the_scanned_folder_names_a_type_but_not_the_folders_above_it() -> None:
    assert type_from_path("/data/darks/x.fits", "/data/darks") == (FrameType.DARK, "darks")
    with pytest.raises(ValueError):
        type_from_path("/darks/set/x.fits", "/darks/set")


def _untyped_set(root: Path) -> None:
    """Frames without IMAGETYP, named by their folders (as older SharpCap writes them)."""
    frame = np.full(SHAPE, 500, dtype=np.uint16)
    base = {**STATE, "CCD-TEMP": -10.0}
    minute = iter(range(60))

    def cards(exptime: float, **extra: Any) -> dict[str, Any]:
        return {**base, "EXPTIME": exptime, "DATE-OBS": f"2026-03-14T12:{next(minute):02d}:00",
                **extra}

    for i in range(2):
        write_fits(root / "Bias" / f"Capture_{i:04d}.fits", frame + i, cards(0.0))
        write_fits(root / "Darks" / "60s" / f"Capture_{i:04d}.fits", frame + 5 + i, cards(60.0))
        write_fits(root / "Flats" / f"Capture_{i:04d}.fits", frame + 9000 + i, cards(2.0))
    write_fits(root / "Lights" / "m31.fits", frame, cards(30.0))
    write_fits(root / "misc" / "capture.fits", frame, cards(1.0))
    # a frame-type keyword wins over the folder
    write_fits(root / "Bias" / "labelled.fits", frame + 7, cards(60.0, IMAGETYP="Dark Frame"))


def test_types_from_paths_only_when_asked(tmp_path: Path) -> None:
    _untyped_set(tmp_path)
    strict = scan(tmp_path)
    assert [r.type for r in strict.frames] == [FrameType.DARK]  # the labelled one
    assert all("--types-from-paths" in r.reason for r in strict.rejected)

    inv = scan(tmp_path, types_from_paths=True)
    types = {Path(r.path).relative_to(tmp_path).as_posix(): r.type for r in inv.frames}
    assert types == {"Bias/Capture_0000.fits": FrameType.BIAS,
                     "Bias/Capture_0001.fits": FrameType.BIAS,
                     "Bias/labelled.fits": FrameType.DARK,
                     "Darks/60s/Capture_0000.fits": FrameType.DARK,
                     "Darks/60s/Capture_0001.fits": FrameType.DARK,
                     "Flats/Capture_0000.fits": FrameType.FLAT,
                     "Flats/Capture_0001.fits": FrameType.FLAT}
    cards = {Path(r.path).name: r.type_card for r in inv.frames if "Flats" in r.path}
    assert cards == {f"Capture_000{i}.fits": "path part 'Flats'" for i in range(2)}
    reasons = {Path(r.file).parent.name: r.reason for r in inv.rejected}
    assert reasons["Lights"] == "not a calibration frame (path part 'Lights')"
    assert reasons["misc"].endswith("and no frame type in its name or folders")
    assert any("Capture_0000.fits" in w and "taken as bias from its path ('Bias')" in w
               for w in inv.warnings)


def test_cli_types_from_paths(tmp_path: Path) -> None:
    _untyped_set(tmp_path)
    result = CliRunner().invoke(cli, ["scan", str(tmp_path), "--json", "--types-from-paths"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"] == {"bias": 2, "dark": 3, "flat": 2}


def test_flats_of_one_filter_are_kept_the_others_named(tmp_path: Path) -> None:
    frame = np.full(SHAPE, 500, dtype=np.uint16)
    base = {**STATE, "CCD-TEMP": -10.0}
    minute = iter(range(60))

    def write(name: str, kind: str, exptime: float, value: int, **extra: Any) -> None:
        write_fits(tmp_path / name, frame + value,
                   {**base, "IMAGETYP": kind, "EXPTIME": exptime,
                    "DATE-OBS": f"2026-03-14T12:{next(minute):02d}:00", **extra})

    for i in range(3):
        write(f"flat_g_{i}.fits", "Flat Frame", 2.0, 9000 + i, FILTER="g")
    for i in range(2):
        write(f"flat_r_{i}.fits", "Flat Frame", 2.0, 7000 + i, FILTER="r")
    write("flat_none.fits", "Flat Frame", 2.0, 8000)
    # bias and darks are not checked: the filter wheel stands anywhere
    write("bias_0.fits", "Bias Frame", 0.0, 0, FILTER="Dark")
    write("dark_0.fits", "Dark Frame", 60.0, 5, FILTNAME="r")
    inv = scan(tmp_path)
    kept = {Path(r.path).name: r.filter for r in inv.frames}
    assert kept == {"flat_g_0.fits": "g", "flat_g_1.fits": "g", "flat_g_2.fits": "g",
                    "bias_0.fits": "Dark", "dark_0.fits": "r"}
    reasons = {Path(r.file).name: r.reason for r in inv.rejected}
    assert reasons["flat_r_0.fits"] == (
        "flat with filter 'r'; the set's flats are taken with filter 'g' (3 of 6 flats): a "
        "master flat is per filter, so calibrate each filter's flats as a dataset of their own")
    assert reasons["flat_none.fits"].startswith("flat with no filter name (FILTER...);")
    assert "flat filter: g" in inv.summary()


def test_darks_of_one_temperature_are_kept_the_others_named(tmp_path: Path) -> None:
    # a dark library at -10, 0 and +10 C in one folder: the largest cluster
    # is kept (the coldest of equals); bias frames and flats are not checked
    frame = np.full(SHAPE, 500, dtype=np.uint16)
    minute = iter(range(60))

    def write(name: str, kind: str, exptime: float, temp: float, value: int) -> None:
        write_fits(tmp_path / name, frame + value,
                   {**STATE, "IMAGETYP": kind, "EXPTIME": exptime, "CCD-TEMP": temp,
                    "DATE-OBS": f"2026-03-14T12:{next(minute):02d}:00"})

    for i in range(3):
        write(f"dark_m10_{i}.fits", "Dark Frame", 60.0, -10.0 + 0.1 * i, 10 + i)
        write(f"dark_0_{i}.fits", "Dark Frame", 60.0, 0.0, 20 + i)
    write("dark_p10.fits", "Dark Frame", 60.0, 10.0, 30)
    write("bias_p10.fits", "Bias Frame", 0.0, 10.0, 0)
    inv = scan(tmp_path)
    kept = sorted(Path(r.path).name for r in inv.frames)
    assert kept == ["bias_p10.fits"] + [f"dark_m10_{i}.fits" for i in range(3)]
    reasons = {Path(r.file).name: r.reason for r in inv.rejected}
    assert reasons["dark_0_0.fits"] == (
        "dark at 0.0 C; the set's darks are at -10.0 .. -9.8 C (3 of 7 darks): a dark rate "
        "is per temperature, so calibrate each temperature's darks as a dataset of their own")
    assert set(reasons) == {"dark_0_0.fits", "dark_0_1.fits", "dark_0_2.fits", "dark_p10.fits"}
    # within the tolerance nothing is rejected
    assert not scan(tmp_path, temperature_tolerance=25.0).rejected
    loose = CliRunner().invoke(cli, ["scan", str(tmp_path), "--json",
                                     "--temperature-tolerance", "25"])
    assert loose.exit_code == 0 and json.loads(loose.stdout)["counts"]["dark"] == 7
    strict = CliRunner().invoke(cli, ["scan", str(tmp_path), "--json"])
    assert json.loads(strict.stdout)["counts"]["dark"] == 3
    bad = CliRunner().invoke(cli, ["scan", str(tmp_path), "--temperature-tolerance", "-1"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
