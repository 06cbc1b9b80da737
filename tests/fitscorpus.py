"""Generator of FITS test files: every header convention and every kind of bad file.

``write_corpus(directory)`` writes small frames (default 24 x 40 pixels) in the
conventions of MaxIm DL/ASCOM, N.I.N.A., SharpCap, IRAF and Ekos, with 8- and
16-bit data, images in extension 1, tile-compressed and gzip files, plus the bad
files a real folder holds (truncated, empty, not FITS, tables, wrong shape,
missing, negative or contradictory exposure, unknown or contradictory type,
scaled, 3-D, mixed GAIN or OFFSET, a duplicated frame...), and whole counts in
32/64-bit and floating-point types, which are accepted.
It returns one :class:`CorpusFile` per file with what a correct scan must say
about it, so the same corpus serves scan, cube and reliability tests.

``write_camera_set(directory, ...)`` writes a plain N.I.N.A.-style calibration
set (bias, darks, flats) for cube tests and benchmarks.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

#: The operating state every good corpus frame shares.
STATE = {"GAIN": 100, "OFFSET": 50, "XBINNING": 1, "YBINNING": 1,
         "INSTRUME": "ZWO ASI6200MM Pro"}
#: Start time of the corpus frames (UTC).
T0 = datetime(2026, 3, 14, 12, 0, 0, tzinfo=UTC)
#: Pixel values planted in 16-bit frames to exercise the BZERO conversion edges.
EDGE_VALUES = (0, 1, 32767, 32768, 32769, 65535)


@dataclass(frozen=True)
class CorpusFile:
    """One written file and what the scan must conclude about it.

    ``kind`` is ``"good"`` (accepted as ``frame_type``), ``"bad"`` (rejected with a
    reason containing ``reason``) or ``"ignored"`` (not a FITS candidate).
    ``pixels`` are the counts a correct reader returns (good files only).
    """

    name: str
    kind: str
    frame_type: str | None = None
    reason: str | None = None
    exptime: float | None = None
    temperature: float | None = None
    time: datetime | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    warning: str | None = None
    note: str = ""


def _header(cards: dict[str, Any]) -> fits.Header:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header


def write_fits(path: Path, data: np.ndarray | None, cards: dict[str, Any], *,
               layout: str = "primary") -> None:
    """Write ``data`` with header ``cards``.

    ``layout``: ``primary`` (image in the primary HDU), ``ext`` (empty primary,
    image and cards in extension 1), ``inherit`` (cards in the primary, image in
    extension 1), ``tile`` (RICE tile compression, ``.fz``), ``gzip`` (gzip of a
    plain file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(cards)
    if layout == "primary":
        hdul = fits.HDUList([fits.PrimaryHDU(data, header=header)])
    elif layout == "ext":
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header)])
    elif layout == "inherit":
        hdul = fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data)])
    elif layout == "tile":
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)])
    elif layout == "gzip":
        plain = path.with_name(path.name + ".tmp")
        fits.HDUList([fits.PrimaryHDU(data, header=header)]).writeto(plain)
        path.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
        return
    else:
        raise ValueError(f"unknown layout {layout!r}")
    hdul.writeto(path, overwrite=True)


def write_raw_fits(path: Path, cards: dict[str, Any], data: bytes) -> None:
    """Write a FITS file byte by byte (for headers astropy would refuse to write)."""
    text = _header(cards).tostring()
    padded = data + b"\0" * (-len(data) % 2880)
    path.write_bytes(text.encode("ascii") + padded)


def _frame(rng: np.random.Generator, shape: tuple[int, int], level: float,
           dtype: type = np.uint16, edges: bool = True) -> np.ndarray:
    """A frame of Poisson-like counts around ``level`` ADU with planted edge values."""
    values = rng.normal(level, max(3.0, np.sqrt(max(level, 1.0))), size=shape)
    info = np.iinfo(dtype)
    frame = np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if edges and dtype == np.uint16:
        frame.flat[: len(EDGE_VALUES)] = EDGE_VALUES
    return frame


@dataclass
class _Writer:
    root: Path
    shape: tuple[int, int]
    rng: np.random.Generator
    files: list[CorpusFile] = field(default_factory=list)
    count: int = 0

    def next_time(self) -> datetime:
        self.count += 1
        return T0 + timedelta(seconds=37 * self.count)

    def good(self, name: str, ftype: str, cards: dict[str, Any], *, exptime: float,
             temperature: float | None = -10.0, layout: str = "primary",
             dtype: type = np.uint16, time: datetime | None = None, warning: str | None = None,
             note: str = "", state: dict[str, Any] | None = None) -> None:
        level = {"bias": 500.0, "dark": 500.0 + 2.0 * exptime, "flat": 500.0 + 3000.0 * exptime}
        pixels = _frame(self.rng, self.shape, level[ftype] if dtype == np.uint16 else 100.0,
                        dtype=dtype)
        all_cards = {**(STATE if state is None else state), **cards}
        write_fits(self.root / name, pixels, all_cards, layout=layout)
        self.files.append(CorpusFile(name, "good", ftype, exptime=exptime,
                                     temperature=temperature, time=time, pixels=pixels,
                                     warning=warning, note=note))

    def bad(self, name: str, reason: str, note: str = "") -> None:
        self.files.append(CorpusFile(name, "bad", reason=reason, note=note))


def write_good_frames(w: _Writer) -> None:
    """Every accepted convention, layout and pixel type."""
    def date(t: datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%M:%S")

    # MaxIm DL / ASCOM
    t = w.next_time()
    w.good("maxim/bias_frame.fits", "bias", {"IMAGETYP": "Bias Frame", "EXPTIME": 0.0,
           "CCD-TEMP": -10.0, "SET-TEMP": -10.0, "DATE-OBS": date(t), "EGAIN": 0.25},
           exptime=0.0, time=t, note="MaxIm 'Bias Frame'; EGAIN is not GAIN")
    t = w.next_time()
    w.good("maxim/dark_frame.fit", "dark", {"IMAGETYP": "Dark Frame", "EXPTIME": 10.0,
           "CCD-TEMP": -10.1, "DATE-OBS": date(t)}, exptime=10.0, temperature=-10.1, time=t)
    t = w.next_time()
    w.good("maxim/flat_field.fts", "flat", {"IMAGETYP": "Flat Field", "EXPTIME": 1.0,
           "CCD-TEMP": -9.9, "DATE-OBS": date(t)}, exptime=1.0, temperature=-9.9, time=t)
    t = w.next_time()
    w.good("maxim/FLAT_FRAME.FITS", "flat", {"IMAGETYP": "Flat Frame", "EXPTIME": 2.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=2.0, time=t,
           note="upper-case extension")
    # N.I.N.A.
    nina = {"SWCREATE": "N.I.N.A. 3.1.2.9001", "SET-TEMP": -10.0}
    for ftype, value, exptime in (("bias", "BIAS", 0.0), ("dark", "DARK", 30.0),
                                  ("flat", "FLAT", 1.0), ("dark", "DARKFLAT", 1.0)):
        t = w.next_time()
        w.good(f"nina/{value}_{exptime:g}s.fits", ftype,
               {**nina, "IMAGETYP": value, "EXPOSURE": exptime, "EXPTIME": exptime,
                "CCD-TEMP": -10.0, "DATE-OBS": t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]},
               exptime=exptime, time=t)
    # SharpCap 4 (capture tools write 'Bias'/'Dark'/'Flat'; 7-digit fractions)
    for ftype, exptime in (("bias", 0.000032), ("dark", 10.0), ("flat", 2.0)):
        t = w.next_time() + timedelta(microseconds=384632)
        w.good(f"sharpcap/{ftype}.fits", ftype,
               {"SWCREATE": "SharpCap v4.1.12946.0, 64 bit", "IMAGETYP": ftype.capitalize(),
                "EXPTIME": exptime, "CCD-TEMP": -10.0,
                "DATE-OBS": t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "3", "BLKLEVEL": 50},
               exptime=exptime, time=t)
    # IRAF: OBSTYPE / IMAGETYP 'zero', date-only DATE-OBS with TIME-OBS
    t = w.next_time()
    w.good("iraf/zero_upper.fits", "bias", {"OBSTYPE": "ZERO", "EXPTIME": 0.0,
           "CCD_TEMP": -10.0, "DATE-OBS": t.strftime("%Y-%m-%d"),
           "TIME-OBS": t.strftime("%H:%M:%S")}, exptime=0.0, time=t)
    t = w.next_time()
    w.good("iraf/zero_lower.fits", "bias", {"IMAGETYP": "zero", "EXPTIME": 0.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=0.0, time=t)
    t = w.next_time()
    w.good("iraf/Zero_mixed.fits", "bias", {"IMAGETYP": "Zero", "EXPTIME": 0.0,
           "CCD-TEMP": -10.0, "MJD-OBS": 61113.5}, exptime=0.0,
           time=datetime(2026, 3, 14, 12, 0, 0, tzinfo=UTC), note="time from MJD-OBS")
    # other keywords and cases
    t = w.next_time()
    w.good("ekos/frame_dark.fits", "dark", {"FRAME": "Dark", "EXPTIME": 30.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=30.0, time=t)
    t = w.next_time()
    w.good("misc/frametyp_flatfield.fits", "flat", {"FRAMETYP": "FLATFIELD", "EXP_TIME": 1.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=1.0, time=t, note="EXP_TIME")
    t = w.next_time()
    w.good("misc/lower_dark_frame.fits", "dark", {"IMAGETYP": "dark frame", "EXPOSURE": 10.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=10.0, time=t)
    t = w.next_time()
    w.good("misc/upper_flat_field.fits", "flat", {"IMAGETYP": "FLAT FIELD", "EXPTIME": 2.0,
           "CCD-TEMP": -10.0, "DATE-AVG": date(t + timedelta(seconds=1))}, exptime=2.0,
           time=t, note="DATE-AVG minus half the exposure")
    # pixel types and layouts
    t = w.next_time()
    w.good("layout/uint8_bias.fits", "bias", {"IMAGETYP": "BIAS", "EXPTIME": 0.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=0.0, dtype=np.uint8, time=t)
    t = w.next_time()
    w.good("layout/ext1_dark.fits", "dark", {"IMAGETYP": "DARK", "EXPTIME": 10.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=10.0, layout="ext", time=t)
    t = w.next_time()
    w.good("layout/ext1_inherit_flat.fits", "flat", {"IMAGETYP": "FLAT", "EXPTIME": 1.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=1.0, layout="inherit", time=t,
           note="cards in the primary header, image in extension 1")
    t = w.next_time()
    w.good("layout/tile_dark.fz", "dark", {"IMAGETYP": "DARK", "EXPTIME": 30.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=30.0, layout="tile", time=t)
    t = w.next_time()
    w.good("layout/gzip_flat.fits.gz", "flat", {"IMAGETYP": "FLAT", "EXPTIME": 2.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=2.0, layout="gzip", time=t)
    t = w.next_time()
    signed = np.clip(np.rint(w.rng.normal(500, 5, w.shape)), 0, 32767).astype(np.int16)
    signed.flat[:2] = (0, 32767)
    write_fits(w.root / "layout/int16_bias.fits", signed,
               {**STATE, "IMAGETYP": "BIAS", "EXPTIME": 0.0, "CCD-TEMP": -10.0,
                "DATE-OBS": date(t)})
    w.files.append(CorpusFile("layout/int16_bias.fits", "good", "bias", exptime=0.0,
                              temperature=-10.0, time=t, pixels=signed.astype(np.uint16),
                              warning="signed 16-bit data without BZERO=32768"))
    # whole counts in wide types (a simulator's int64 or float64): converted when read
    for bitpix, dtype in ((32, np.int32), (64, np.int64), (-32, np.float32), (-64, np.float64)):
        t = w.next_time()
        counts = _frame(w.rng, w.shape, 700.0)
        name = f"layout/bitpix{bitpix}_dark.fits"
        write_fits(w.root / name, counts.astype(dtype),
                   {**STATE, "IMAGETYP": "DARK", "EXPTIME": 10.0, "CCD-TEMP": -10.0,
                    "DATE-OBS": date(t)})
        w.files.append(CorpusFile(name, "good", "dark", exptime=10.0, temperature=-10.0, time=t,
                                  pixels=counts, warning=f"data (BITPIX={bitpix}): converted to "
                                                         "16-bit counts when read"))
    # names are not trusted; odd but acceptable headers
    t = w.next_time()
    w.good("bias_001.fits", "dark", {"IMAGETYP": "DARK", "EXPTIME": 60.0, "CCD-TEMP": -10.0,
           "DATE-OBS": date(t)}, exptime=60.0, time=t, note="a dark named like a bias")
    t = w.next_time()
    w.good("odd/bias_no_exptime.fits", "bias", {"IMAGETYP": "BIAS", "CCD-TEMP": -10.0,
           "DATE-OBS": date(t)}, exptime=0.0, time=t,
           warning="bias frame without exposure time: taken as 0 s")
    t = w.next_time()
    w.good("odd/setpoint_only.fits", "dark", {"IMAGETYP": "DARK", "EXPTIME": 10.0,
           "SET-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=10.0, time=t,
           warning="using the cooler set point SET-TEMP")
    w.good("odd/bad_date.fits", "flat", {"IMAGETYP": "FLAT", "EXPTIME": 1.0,
           "CCD-TEMP": -10.0, "DATE-OBS": "14/03/26"}, exptime=1.0, time=None,
           warning="unparsable DATE-OBS='14/03/26'")
    t = w.next_time()
    w.good("odd/frame_without_suffix", "dark", {"IMAGETYP": "DARK", "EXPTIME": 10.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=10.0, time=t,
           note="no FITS suffix: found by its SIMPLE card")
    t = w.next_time()
    w.good("night2/deep/nina_flat.fits", "flat", {"IMAGETYP": "FLAT", "EXPTIME": 1.0,
           "CCD-TEMP": -10.0, "DATE-OBS": date(t)}, exptime=1.0, time=t, note="sub-folder")


def write_bad_files(w: _Writer) -> None:
    """Every kind of file that must be rejected, each with its expected reason."""
    ny, nx = w.shape
    base = {**STATE, "EXPTIME": 10.0, "CCD-TEMP": -10.0, "DATE-OBS": "2026-03-14T12:00:00"}
    dark = _frame(w.rng, w.shape, 520.0)

    good = w.root / "bad/truncated.fits"
    write_fits(good, dark, {**base, "IMAGETYP": "DARK"})
    blob = good.read_bytes()
    data_start = len(blob) - 2880 * (-(-ny * nx * 2 // 2880))
    keep = data_start + 1000
    good.write_bytes(blob[:keep])
    w.bad("bad/truncated.fits", f"truncated: {ny * nx * 2 - 1000} bytes of pixel data missing")
    (w.root / "bad/truncated_header.fits").write_bytes(blob[:1000])
    w.bad("bad/truncated_header.fits", "ends inside its header")
    (w.root / "bad/empty.fits").write_bytes(b"")
    w.bad("bad/empty.fits", "empty file (0 bytes)")
    (w.root / "bad/not_fits.fits").write_text("this is a text file, not an image\n" * 100)
    w.bad("bad/not_fits.fits", "not a FITS file")
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.ones(3))])
    table.header["IMAGETYP"] = "DARK"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(w.root / "bad/table_only.fits")
    w.bad("bad/table_only.fits", "no image HDU (found 0: primary (empty), 1: BINTABLE)")
    write_fits(w.root / "bad/wrong_shape.fits", _frame(w.rng, (ny - 4, nx), 520.0),
               {**base, "IMAGETYP": "DARK"})
    w.bad("bad/wrong_shape.fits", f"shape {ny - 4} x {nx} differs from the set's majority "
                                  f"shape {ny} x {nx}")
    write_fits(w.root / "bad/dark_no_exptime.fits", dark,
               {k: v for k, v in {**base, "IMAGETYP": "DARK"}.items() if k != "EXPTIME"})
    w.bad("bad/dark_no_exptime.fits", "missing exposure time")
    write_fits(w.root / "bad/negative_exptime.fits", dark,
               {**base, "IMAGETYP": "DARK", "EXPTIME": -5.0})
    w.bad("bad/negative_exptime.fits", "negative exposure time EXPTIME=-5 s")
    write_fits(w.root / "bad/text_exptime.fits", dark,
               {**base, "IMAGETYP": "DARK", "EXPTIME": "ten"})
    w.bad("bad/text_exptime.fits", "unparsable exposure time: EXPTIME='ten'")
    write_fits(w.root / "bad/unknown_type.fits", dark, {**base, "IMAGETYP": "Focus Frame"})
    w.bad("bad/unknown_type.fits", "unknown frame type IMAGETYP='Focus Frame'")
    write_fits(w.root / "bad/master_bias.fits", dark.astype(np.float32) + np.float32(0.25),
               {**base, "IMAGETYP": "Bias Frame", "NCOMBINE": 20})
    w.bad("bad/master_bias.fits", "a combined (master) frame (NCOMBINE=20), not a raw frame")
    write_fits(w.root / "bad/master_dark.fits", dark, {**base, "IMAGETYP": "Master Dark"})
    w.bad("bad/master_dark.fits",
          "a combined (master) frame (IMAGETYP='Master Dark'), not a raw frame")
    write_fits(w.root / "bad/light.fits", dark, {**base, "IMAGETYP": "Light Frame"})
    w.bad("bad/light.fits", "not a calibration frame (IMAGETYP='Light Frame')")
    write_fits(w.root / "bad/sharpcap_old_no_type.fits", dark,
               {**base, "SWCREATE": "SharpCap"})
    w.bad("bad/sharpcap_old_no_type.fits", "no frame-type keyword")
    write_fits(w.root / "bad/cube3d.fits", np.stack([dark, dark, dark]),
               {**base, "IMAGETYP": "DARK"})
    w.bad("bad/cube3d.fits", f"3-D data (NAXIS=3, shape 3 x {ny} x {nx})")
    write_fits(w.root / "bad/gain200_dark.fits", dark, {**base, "IMAGETYP": "DARK", "GAIN": 200})
    w.bad("bad/gain200_dark.fits", "operating state gain=200, offset=50, binning 1x1, readout "
                                   "mode None differs from the set's majority state gain=100")
    write_fits(w.root / "bad/offset60_flat.fits", dark,
               {**base, "IMAGETYP": "FLAT", "EXPTIME": 1.0, "OFFSET": 60})
    w.bad("bad/offset60_flat.fits", "operating state gain=100, offset=60, binning 1x1, readout "
                                    "mode None differs from the set's majority state gain=100, "
                                    "offset=50")
    write_fits(w.root / "bad/conflicting_type.fits", dark,
               {**base, "IMAGETYP": "DARK", "FRAME": "Flat"})
    w.bad("bad/conflicting_type.fits", "conflicting frame types IMAGETYP='DARK' and "
                                       "FRAME='Flat'")
    write_fits(w.root / "bad/conflicting_exptime.fits", dark,
               {**base, "IMAGETYP": "DARK", "EXPOSURE": 30.0})
    w.bad("bad/conflicting_exptime.fits", "conflicting exposure times EXPTIME=10 s and "
                                          "EXPOSURE=30 s")
    write_fits(w.root / "bad/text_date_exptime.fits", dark,
               {**base, "IMAGETYP": "DARK", "EXPTIME": "2026-03-14"})
    w.bad("bad/text_date_exptime.fits", "unparsable exposure time: EXPTIME='2026-03-14'")
    # a copy of an accepted frame (same sha256) under a later path: the first is kept
    original = next(f for f in w.files if f.name == "maxim/dark_frame.fit")
    copy = w.root / "zz_copies/dark_frame (1).fit"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes((w.root / original.name).read_bytes())
    w.bad("zz_copies/dark_frame (1).fit",
          f"duplicate frame: same bytes (sha256 {hashlib.sha256(copy.read_bytes()).hexdigest()[:16]}"
          f"...) as {w.root / original.name}")
    raw = gzip.compress(blob, mtime=0)
    (w.root / "bad/corrupt.fits.gz").write_bytes(raw[: len(raw) // 2])
    w.bad("bad/corrupt.fits.gz", "corrupt or truncated gzip stream")
    be = (dark.astype(np.int32) - 32768).astype(">i2").tobytes()
    write_raw_fits(w.root / "bad/scaled.fits",
                   {"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": nx, "NAXIS2": ny,
                    "BSCALE": 2.0, "BZERO": 32768, **base, "IMAGETYP": "DARK"}, be)
    w.bad("bad/scaled.fits", "scaled data (BITPIX=16, BZERO=32768, BSCALE=2)")


def write_ignored_files(root: Path) -> list[CorpusFile]:
    """Files that a scan must skip silently."""
    (root / "README.txt").write_text("calibration night of 2026-03-14\n")
    (root / "notes.json").write_text("{}\n")
    (root / ".hidden.fits").write_text("macOS resource fork\n")
    (root / "old.zarr").mkdir(exist_ok=True)
    (root / "old.zarr" / "frame.fits").write_text("not scanned\n")
    return [CorpusFile(n, "ignored") for n in ("README.txt", "notes.json", ".hidden.fits",
                                               "old.zarr/frame.fits")]


def write_corpus(directory: Path, shape: tuple[int, int] = (24, 40), seed: int = 0
                 ) -> list[CorpusFile]:
    """Write the whole corpus under ``directory`` and return its manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w = _Writer(directory, shape, np.random.default_rng(seed))
    write_good_frames(w)
    write_bad_files(w)
    return w.files + write_ignored_files(directory)


def write_camera_set(directory: Path, shape: tuple[int, int] = (24, 40), *, n_bias: int = 3,
                     dark_exptimes: tuple[float, ...] = (10.0, 30.0), n_dark: int = 2,
                     flat_exptimes: tuple[float, ...] = (1.0, 2.0), n_flat: int = 2,
                     seed: int = 0, dtype: type = np.uint16) -> list[CorpusFile]:
    """A plain N.I.N.A.-style calibration set, written in a scrambled file order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = ([("bias", 0.0)] * n_bias + [("dark", t) for t in dark_exptimes for _ in range(n_dark)]
            + [("flat", t) for t in flat_exptimes for _ in range(n_flat)])
    files = []
    order = rng.permutation(len(plan))
    for k, idx in enumerate(order):
        ftype, exptime = plan[idx]
        t = T0 + timedelta(seconds=60 * int(idx))
        level = {"bias": 500.0, "dark": 500.0 + 2.0 * exptime, "flat": 500.0 + 3000.0 * exptime}
        pixels = _frame(rng, shape, level[ftype], dtype=dtype)
        temp = -10.0 + 0.1 * float(rng.standard_normal())
        name = f"frame_{k:04d}.fits"
        write_fits(directory / name, pixels,
                   {**STATE, "IMAGETYP": ftype.upper(), "EXPTIME": exptime,
                    "CCD-TEMP": round(temp, 2), "DATE-OBS": t.strftime("%Y-%m-%dT%H:%M:%S")})
        files.append(CorpusFile(name, "good", ftype, exptime=exptime,
                                temperature=round(temp, 2), time=t, pixels=pixels))
    return files
