"""Scan a folder of FITS calibration frames: headers only, never file names.

The scan reads header blocks (a few kB per file) and the file size, never pixel
data, so a set of 300 full-size frames is inventoried in about a second. It
classifies each frame (bias, dark, flat) from its header in every common
convention, reads exposure time, sensor temperature, observation time and the
camera operating state, and rejects every unusable file with a precise reason.
The one exception to "headers only": frames whose headers agree in every field
that tells exposures apart are hashed, and a repeated file (same sha256, e.g. a
copy) is rejected as a duplicate of the first one in path order.

Recognised frame-type keywords (first present wins): ``IMAGETYP``, ``IMAGETYPE``,
``FRAMETYP``, ``FRAME``, ``OBSTYPE``. Values, compared case-insensitively with
``_``/``-`` read as spaces:

===========  ====================================================================
type         values
===========  ====================================================================
bias         ``BIAS`` (N.I.N.A., SGP), ``Bias Frame`` (MaxIm DL, ASCOM), ``Bias``
             (SharpCap 4), ``ZERO``/``zero`` (IRAF), ``Offset``
dark         ``DARK``, ``Dark Frame``, ``Dark``, ``DARKFLAT``/``Dark Flat``/``Flat
             Dark`` (a dark taken to match flats: it is a dark)
flat         ``FLAT``, ``Flat Frame``, ``Flat Field``, ``FLATFIELD``, ``Flat``, sky,
             dome, twilight and lamp flats
rejected     ``LIGHT``, ``Light Frame``, ``OBJECT``, ``SCIENCE``: not calibration frames
===========  ====================================================================

Older SharpCap versions write no frame-type keyword at all: such files are
rejected with that reason rather than guessed from their names, unless the
scan is asked to (``types_from_paths``, ``--types-from-paths``): then a file
without a frame-type keyword takes its type from the words of its name or of
the folders above it, up to the scanned folder (``bias``, ``zero``,
``dark``, ``flat``, ``dark flat``..., :func:`type_from_path`), with a warning
naming the word; a path whose nearest naming part is ambiguous, or names no
type, is rejected. A frame-type keyword always wins over the path.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from astropy.utils.exceptions import AstropyWarning
from pydantic import BaseModel, Field

from sitiancal.storage.frames import (
    FITS_MAGIC,
    GZIP_MAGIC,
    FrameReadError,
    HduInfo,
    file_sha256,
    find_image_hdu,
    open_binary,
    stream_size,
    truncation_reason,
)

#: File name endings (lower case) that mark a file as a FITS candidate.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz")
#: Sensor temperature spread (deg C) above which the scan warns. Dark current
#: doubles every ~6 C in CMOS sensors, so 2 C is a ~25% change in dark rate.
TEMPERATURE_TOLERANCE_C = 2.0

#: Two exposure-time cards of one header agree within this many seconds (or 0.1%).
EXPOSURE_AGREEMENT_S = 1e-3

TYPE_KEYWORDS = ("IMAGETYP", "IMAGETYPE", "FRAMETYP", "FRAME", "OBSTYPE")
EXPOSURE_KEYWORDS = ("EXPTIME", "EXPOSURE", "EXP_TIME")
TEMPERATURE_KEYWORDS = ("CCD-TEMP", "CCD_TEMP", "SENSOR-TEMP", "SENSOR_TEMP", "DET-TEMP",
                        "TEMPERAT")
SETPOINT_KEYWORDS = ("SET-TEMP", "SET_TEMP")
READOUT_KEYWORDS = ("READOUTM", "READMODE", "READOUT")
#: Filter name: FILTER (MaxIm, N.I.N.A., SharpCap), FILTNAME, FILTER1 (two-wheel
#: instruments), INSFLNAM (ESO).
FILTER_KEYWORDS = ("FILTER", "FILTNAME", "FILTER1", "INSFLNAM")


class FrameType(StrEnum):
    """Calibration frame type."""

    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"


_TYPE_VALUES: dict[str, FrameType | None] = {
    **dict.fromkeys(("bias", "bias frame", "zero", "zero frame", "offset", "offset frame"),
                    FrameType.BIAS),
    **dict.fromkeys(("dark", "dark frame", "darkflat", "dark flat", "flat dark", "flatdark",
                     "dark flat frame", "flat dark frame"), FrameType.DARK),
    **dict.fromkeys(("flat", "flat frame", "flat field", "flatfield", "sky flat", "skyflat",
                     "dome flat", "domeflat", "twilight flat", "twiflat", "lamp flat",
                     "flat field frame"), FrameType.FLAT),
    **dict.fromkeys(("light", "light frame", "object", "science", "tricolor image"), None),
}


#: Words of a path that name a frame type (``None``: a science frame); see
#: :func:`type_from_path`. ``offset`` is left out: folders are named after the
#: camera's OFFSET setting (``gain100_offset50``).
_PATH_WORDS: dict[str, FrameType | None] = {
    **dict.fromkeys(("bias", "biases", "zero", "zeros"), FrameType.BIAS),
    **dict.fromkeys(("dark", "darks", "darkflat", "darkflats", "flatdark", "flatdarks"),
                    FrameType.DARK),
    **dict.fromkeys(("flat", "flats", "flatfield", "flatfields", "skyflat", "skyflats",
                     "domeflat", "domeflats", "twiflat", "twiflats"), FrameType.FLAT),
    **dict.fromkeys(("light", "lights", "object", "science"), None),
}
_DARK_FLAT = re.compile(r"\b(dark flats?|flat darks?)\b")


def _path_words(part: str) -> list[str]:
    """Lower-case words of one path part: split at non-letters and camelCase humps."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", part)]


def type_from_path(path: str, root: str) -> tuple[FrameType | None, str]:
    """Frame type named by a file's path, for files without a frame-type keyword.

    The file's name (without its suffixes) is read first, then each folder
    above it up to and including ``root`` (the scanned folder); the first part
    with a frame-type word decides: ``bias``/``zero``, ``dark`` (also ``dark
    flat``, ``flat dark``: darks for flats), ``flat`` (sky, dome, twilight),
    ``light``/``object``/``science`` (a science frame), singular or plural,
    whole words only (``darkroom`` is none), camelCase split (``DarkFrames``).

    Parameters
    ----------
    path, root : str
        The file and the scanned folder (a local path or URL; ``root`` equal to
        ``path`` for a single file).

    Returns
    -------
    (FrameType or None, str)
        The type (``None``: a science frame) and the part that named it.

    Raises
    ------
    ValueError
        When no part names a type, or the deciding part names two.
    """
    rel = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
    parts = [p for p in re.split(r"[/\\]", rel) if p]
    root_name = [p for p in re.split(r"[/\\]", root) if p][-1:] if rel != path else []
    if parts:
        parts[-1] = parts[-1].split(".", 1)[0]  # the name without .fits, .fits.gz...
    for part in reversed(root_name + parts):
        words = _path_words(part)
        joined = " ".join(words)
        if _DARK_FLAT.search(joined):
            return FrameType.DARK, part
        found = {_PATH_WORDS[w] for w in words if w in _PATH_WORDS}
        if len(found) > 1:
            names = sorted("light" if t is None else t.value for t in found)
            raise ValueError(f"its path part {part!r} names several frame types "
                             f"({', '.join(names)})")
        if found:
            return found.pop(), part
    raise ValueError("no frame type in its name or folders")


def classify_frame_type(value: Any) -> FrameType | None:
    """Map a frame-type keyword value to a :class:`FrameType`.

    Returns ``None`` for a science (light) frame. Raises ``KeyError`` for an
    unknown value.
    """
    key = re.sub(r"[\s_\-]+", " ", str(value)).strip().lower()
    return _TYPE_VALUES[key]


class OperatingState(BaseModel):
    """Camera settings that must be equal across a calibration set."""

    gain: float | None = Field(None, description="GAIN: camera gain setting (not EGAIN)")
    offset: float | None = Field(None, description="OFFSET (or BLKLEVEL): bias offset setting")
    xbinning: int = 1
    ybinning: int = 1
    readout_mode: str | None = None
    instrument: str | None = Field(None, description="INSTRUME; differences only warn")

    def key(self) -> tuple[Any, ...]:
        """The fields compared between frames (the instrument name is not)."""
        return (self.gain, self.offset, self.xbinning, self.ybinning, self.readout_mode)

    def describe(self) -> str:
        """Short text, e.g. ``gain=100, offset=50, binning 1x1, readout mode None``."""
        def num(v: float | None) -> str:
            return "none" if v is None else f"{v:g}"
        return (f"gain={num(self.gain)}, offset={num(self.offset)}, "
                f"binning {self.xbinning}x{self.ybinning}, readout mode {self.readout_mode!r}")


class FrameRecord(BaseModel):
    """One accepted frame."""

    path: str = Field(description="absolute path or URL")
    type: FrameType
    exptime: float = Field(description="exposure time, s")
    temperature: float | None = Field(description="sensor temperature, deg C")
    time: datetime | None = Field(description="start of exposure, UTC")
    shape: tuple[int, int] = Field(description="(ny, nx) pixels")
    bitpix: int
    state: OperatingState
    hdu: int = Field(description="index of the image HDU in the file")
    type_card: str = Field("", description="the header card that gave the type")
    compression: str | None = Field(None, description="'gzip', a ZCMPTYPE, or None")
    size: int = Field(0, description="file size, bytes")
    filter: str | None = Field(None, description="filter name (FILTER...), None if unnamed")


class Rejection(BaseModel):
    """A file that was not accepted, with the reason."""

    file: str
    reason: str


class Inventory(BaseModel):
    """What a scan found; serialises to the dataset JSON of API.md."""

    source: str
    shape: tuple[int, int] | None
    counts: dict[str, int]
    exposure_times: dict[str, list[float]]
    temperature: dict[str, float | None]
    operating_state: dict[str, Any]
    frames: list[FrameRecord]
    rejected: list[Rejection]
    warnings: list[str]
    n_files: int = Field(0, description="FITS candidates examined")

    def leave_out(self, rejections: Sequence[Rejection]) -> Inventory:
        """This inventory with the frames of ``rejections`` moved to its rejected files.

        For frames found unusable after the scan, once their pixels were read
        (``storage.cube.build_cube``): the counts, exposure times, temperature
        range and shape are those of the frames left.
        """
        gone = {r.file for r in rejections}
        frames = [r for r in self.frames if r.path not in gone]
        rejected = sorted([*self.rejected, *rejections], key=lambda r: r.file)
        return self.model_copy(update={**_tallies(frames), "frames": frames,
                                       "rejected": rejected})

    def summary(self) -> str:
        """Human-readable multi-line description of the inventory."""
        lines = [f"source: {self.source}",
                 f"files: {self.n_files} FITS candidates, {len(self.frames)} accepted, "
                 f"{len(self.rejected)} rejected"]
        if self.shape is not None:
            lines.append(f"shape: {self.shape[0]} x {self.shape[1]} (rows x columns)")
        for t in FrameType:
            n = self.counts.get(t.value, 0)
            times = ", ".join(f"{x:g}" for x in self.exposure_times.get(t.value, []))
            lines.append(f"{t.value:>5}: {n:4d} frames" + (f", exposure times {times} s" if n else ""))
        tmin, tmax = self.temperature.get("min"), self.temperature.get("max")
        lines.append("temperature: unknown" if tmin is None
                     else f"temperature: {tmin:.2f} .. {tmax:.2f} C")
        filters = sorted({str(r.filter) for r in self.frames
                          if r.type is FrameType.FLAT and r.filter is not None})
        if filters:
            lines.append(f"flat filter: {', '.join(filters)}")
        if self.operating_state:
            lines.append("operating state: " + OperatingState(**self.operating_state).describe()
                         + f", instrument {self.operating_state.get('instrument')!r}")
        if self.rejected:
            lines.append(f"rejected ({len(self.rejected)}):")
            lines.extend(f"  {r.file}: {r.reason}" for r in self.rejected)
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines.extend(f"  {w}" for w in self.warnings)
        return "\n".join(lines)


class ScanError(ValueError):
    """The scanned PATH itself is unusable (missing, unreadable); not a per-file problem."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class _Warnings:
    """Collects warnings, grouping one message shared by many files into one line."""

    def __init__(self) -> None:
        self._by_message: dict[str, list[str]] = defaultdict(list)
        self._plain: list[str] = []

    def file(self, path: str, message: str) -> None:
        self._by_message[message].append(path)

    def add(self, message: str) -> None:
        self._plain.append(message)

    def render(self) -> list[str]:
        out = []
        for message, files in self._by_message.items():
            if len(files) == 1:
                out.append(f"{files[0]}: {message}")
            else:
                shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
                out.append(f"{message} ({len(files)} files: {shown})")
        return out + self._plain


# ----------------------------------------------------------------------------- files


def _is_candidate_name(name: str) -> bool:
    return name.lower().endswith(FITS_SUFFIXES)


def _list_local(root: Path) -> list[str]:
    """Candidate files under a local folder, sorted; hidden entries and ``*.zarr`` skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not d.lower().endswith(".zarr"))
        for fname in filenames:
            if fname.startswith("."):
                continue
            full = os.path.join(dirpath, fname)
            if not os.path.isfile(full):
                continue
            if _is_candidate_name(fname) or _has_fits_magic(full):
                out.append(full)
    return sorted(out)


def _has_fits_magic(path: str) -> bool:
    try:
        with open_binary(path) as f:
            return f.read(len(FITS_MAGIC)) == FITS_MAGIC
    except OSError:
        return False


def _list_source(path: str) -> tuple[str, list[str]]:
    """Resolve PATH and list its candidate files (local path or fsspec URL)."""
    if "://" in path:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(path)
            if not fs.exists(root):
                raise ScanError(path, "no such file or directory")
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            if fs.isfile(root):
                return path, [path]
            files = sorted(fs.find(root))
        except ScanError:
            raise
        except Exception as exc:  # fsspec backends raise their own types
            raise ScanError(path, f"cannot list: {exc}") from None
        urls = []
        prefix = root.rstrip("/") + "/"
        for f in files:
            parts = f[len(prefix):].split("/") if f.startswith(prefix) else [f.split("/")[-1]]
            if any(p.startswith(".") or p.lower().endswith(".zarr") for p in parts):
                continue
            url = f"{protocol}://{f}"
            if _is_candidate_name(parts[-1]) or _has_fits_magic(url):
                urls.append(url)
        return path, urls
    p = Path(path)
    if not p.exists():
        raise ScanError(path, "no such file or directory")
    if p.is_file():
        return str(p.absolute()), [str(p.absolute())]
    if not p.is_dir():
        raise ScanError(path, "not a regular file or folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ScanError(path, "folder is not readable")
    return str(p.absolute()), _list_local(p.absolute())


@dataclass
class _Header:
    """The cards of one file that the scan needs: image HDU first, then primary."""

    image: HduInfo
    primary: HduInfo
    size: int
    compression: str | None

    def get(self, key: str) -> Any:
        value = self.image.header.get(key)
        if value is None and self.primary.index != self.image.index:
            value = self.primary.header.get(key)
        return value

    def first(self, keys: Iterable[str]) -> tuple[str, Any] | None:
        for key in keys:
            value = self.get(key)
            if value is not None and not (isinstance(value, str) and not value.strip()):
                return key, value
        return None


def _read_headers(path: str) -> _Header:
    """Read and walk the headers of one file, checking that its data are all there."""
    with open_binary(path) as f:
        size = stream_size(f)
        if size == 0:
            raise FrameReadError(path, "empty file (0 bytes)")
        head = f.read(2)
        f.seek(0)
        if head == GZIP_MAGIC:
            return _read_gzip_headers(path, f, size)
        primary, image = _find(path, f, size)
        if size < image.data_end:
            raise FrameReadError(path, truncation_reason(size, image.data_end))
        compression = str(image.header.get("ZCMPTYPE", "")).strip() or None
        return _Header(image, primary, size, compression if image.is_compressed_image else None)


def _find(path: str, f: IO[bytes], size: int | None) -> tuple[HduInfo, HduInfo]:
    def read_at(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)
    return find_image_hdu(read_at, path, size=size)


def _read_gzip_headers(path: str, raw: IO[bytes], size: int) -> _Header:
    """Headers of a gzip-compressed FITS file; the stream is decompressed once to check it."""
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as g:
            primary, image = _find(path, g, None)
            g.seek(0)
            total = 0
            while block := g.read(1 << 22):
                total += len(block)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise FrameReadError(path, f"corrupt or truncated gzip stream: {exc}") from None
    if total < image.data_end:
        raise FrameReadError(path, truncation_reason(total, image.data_end))
    return _Header(image, primary, size, "gzip")


def _number(card: tuple[str, Any]) -> float:
    key, value = card
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None


def _optional_number(hdr: _Header, keys: Iterable[str], path: str, warn: _Warnings
                     ) -> float | None:
    card = hdr.first(keys)
    if card is None:
        return None
    try:
        value = _number(card)
    except ValueError as exc:
        warn.file(path, f"ignored {exc}")
        return None
    return value if math.isfinite(value) else None


def _parse_iso(value: str) -> datetime:
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    t = datetime.fromisoformat(text)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _observation_time(hdr: _Header, exptime: float, path: str, warn: _Warnings
                      ) -> datetime | None:
    """Start of exposure (UTC) from DATE-OBS[+TIME-OBS], DATE-BEG, MJD-OBS or DATE-AVG."""
    from astropy.time import Time

    timesys = str(hdr.get("TIMESYS") or "UTC").strip().upper()
    if timesys not in ("UTC", "UT"):
        warn.file(path, f"TIMESYS={timesys!r} ignored; times are read as UTC")
    for key in ("DATE-OBS", "DATE-BEG"):
        value = hdr.get(key)
        if value is None:
            continue
        text = str(value).strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            clock = hdr.first(("TIME-OBS", "UT", "UTSTART", "UTC-OBS"))
            if clock is not None:
                text = f"{text}T{str(clock[1]).strip()}"
            else:
                warn.file(path, f"{key}={value!r} has no time of day; midnight used")
        try:
            return _parse_iso(text)
        except ValueError:
            warn.file(path, f"unparsable {key}={value!r}; observation time unknown")
            return None
    for key, shift in (("MJD-OBS", 0.0), ("DATE-AVG", exptime / 2), ("MJD-AVG", exptime / 2)):
        value = hdr.get(key)
        if value is None:
            continue
        try:
            t = (Time(float(value), format="mjd", scale="utc").to_datetime(timezone=UTC)
                 if key.startswith("MJD") else _parse_iso(str(value)))
        except (ValueError, TypeError):
            warn.file(path, f"unparsable {key}={value!r}; observation time unknown")
            return None
        return t - timedelta(seconds=shift)
    warn.file(path, "no observation time (DATE-OBS, DATE-BEG, MJD-OBS, DATE-AVG)")
    return None


def _operating_state(hdr: _Header, path: str, warn: _Warnings) -> OperatingState:
    gain = _optional_number(hdr, ("GAIN",), path, warn)
    offset = _optional_number(hdr, ("OFFSET", "BLKLEVEL"), path, warn)
    xbin = _optional_number(hdr, ("XBINNING", "CCDXBIN"), path, warn)
    ybin = _optional_number(hdr, ("YBINNING", "CCDYBIN"), path, warn)
    readout = hdr.first(READOUT_KEYWORDS)
    instrument = hdr.get("INSTRUME")
    return OperatingState(
        gain=gain, offset=offset,
        xbinning=int(xbin) if xbin is not None else 1,
        ybinning=int(ybin) if ybin is not None else 1,
        readout_mode=str(readout[1]).strip() if readout is not None else None,
        instrument=str(instrument).strip() if instrument is not None else None,
    )


#: Pixel types of files that hold counts in a wider type than the camera's 16
#: bits (a simulator's or converter's ``int64`` or ``float64``): accepted, and
#: each frame is converted when read, refused then unless its values are whole
#: counts within 0-65535 (``storage.frames``).
WIDE_BITPIX = (32, 64, -32, -64)


def _check_pixels(image: HduInfo) -> str | None:
    """Raise ValueError unless the image holds 2-D raw counts; a warning for wide types.

    8- and 16-bit integers are the camera's counts. 32/64-bit integers and
    floating point are accepted with the returned warning: their values are
    checked when the frame is read (whole numbers within 0-65535, else the
    frame is refused naming the file), which the header alone cannot tell.
    """
    axes = image.image_axes
    if len(axes) != 2:
        shape = " x ".join(str(a) for a in axes)
        raise ValueError(f"{len(axes)}-D data (NAXIS={len(axes)}, shape {shape}): "
                         "one 2-D frame per file expected")
    if 0 in axes:
        raise ValueError(f"empty image (shape {axes[0]} x {axes[1]})")
    bitpix = image.bitpix
    bzero, bscale = image.bzero, image.bscale
    allowed = {8: (0.0,), 16: (0.0, 32768.0), 32: (0.0, 2.0**31), 64: (0.0, 2.0**63),
               -32: (0.0,), -64: (0.0,)}.get(bitpix, ())
    if bscale != 1.0 or bzero not in allowed:
        raise ValueError(f"scaled data (BITPIX={bitpix}, BZERO={bzero:g}, BSCALE={bscale:g}) "
                         "are not raw counts")
    if bitpix in WIDE_BITPIX:
        kind = "floating-point" if bitpix < 0 else f"{bitpix}-bit integer"
        return (f"{kind} data (BITPIX={bitpix}): converted to 16-bit counts when read, "
                "and refused then unless every value is a whole count within 0-65535")
    return None


def _inspect(path: str, warn: _Warnings, path_root: str | None = None) -> FrameRecord | Rejection:
    """Read one file's headers and turn them into a record or a rejection.

    ``path_root``: the scanned folder, when types may come from paths.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            hdr = _read_headers(path)
            result = _classify(path, hdr, warn, path_root)
        for w in caught:
            warn.file(path, f"header: {w.message}")
        return result
    except FrameReadError as exc:
        return Rejection(file=path, reason=exc.reason)
    except PermissionError:
        return Rejection(file=path, reason="unreadable: permission denied")
    except OSError as exc:
        return Rejection(file=path, reason=f"unreadable: {exc.strerror or exc}")


def _classify(path: str, hdr: _Header, warn: _Warnings,
              path_root: str | None = None) -> FrameRecord | Rejection:
    image = hdr.image
    try:
        wide = _check_pixels(image)
    except ValueError as exc:
        return Rejection(file=path, reason=str(exc))

    combined = _combined_frame(hdr)
    if combined is not None:
        return Rejection(file=path, reason=combined)
    cards = [(k, hdr.get(k)) for k in TYPE_KEYWORDS if hdr.get(k) is not None]
    type_card: str | None = None
    if not cards:
        keywords = ", ".join(TYPE_KEYWORDS)
        if path_root is None:
            return Rejection(file=path, reason=f"no frame-type keyword ({keywords}); file names "
                             "are not trusted (--types-from-paths, or types_from_paths in a "
                             "dataset registration, takes the type from them)")
        try:
            by_path, part = type_from_path(path, path_root)
        except ValueError as exc:
            return Rejection(file=path, reason=f"no frame-type keyword ({keywords}) and {exc}")
        if by_path is None:
            return Rejection(file=path, reason=f"not a calibration frame (path part {part!r})")
        warn.file(path, f"no frame-type keyword: taken as {by_path.value} from its path "
                        f"({part!r})")
        cards = [("path", by_path.value)]
        type_card = f"path part {part!r}"
    types: dict[str, FrameType | None] = {}
    for key, value in cards:
        try:
            types[key] = classify_frame_type(value)
        except KeyError:
            if key == cards[0][0]:
                return Rejection(file=path, reason=f"unknown frame type {key}={value!r}")
    key, value = cards[0]
    ftype = types[key]
    if ftype is None:
        return Rejection(file=path, reason=f"not a calibration frame ({key}={value!r})")
    for other, t in types.items():
        if t is not None and t != ftype:
            return Rejection(file=path, reason=f"conflicting frame types {key}={value!r} and "
                                               f"{other}={hdr.get(other)!r}")

    exp_card = hdr.first(EXPOSURE_KEYWORDS)
    if exp_card is None:
        if ftype is not FrameType.BIAS:
            return Rejection(file=path, reason=f"missing exposure time (no "
                             f"{', '.join(EXPOSURE_KEYWORDS)}) for a {ftype.value} frame")
        warn.file(path, "bias frame without exposure time: taken as 0 s")
        exptime = 0.0
    else:
        try:
            exptime = _number(exp_card)
        except ValueError as exc:
            return Rejection(file=path, reason=f"unparsable exposure time: {exc}")
        if not math.isfinite(exptime):
            return Rejection(file=path, reason=f"non-finite exposure time {exp_card[0]}={exptime}")
        if exptime < 0:
            return Rejection(file=path, reason=f"negative exposure time "
                                               f"{exp_card[0]}={exptime:g} s")
        for other in EXPOSURE_KEYWORDS:
            value2 = hdr.get(other)
            if other == exp_card[0] or value2 is None:
                continue
            try:
                exptime2 = _number((other, value2))
            except ValueError:
                continue
            if abs(exptime2 - exptime) > max(EXPOSURE_AGREEMENT_S, 1e-3 * abs(exptime)):
                return Rejection(file=path, reason=f"conflicting exposure times "
                                 f"{exp_card[0]}={exptime:g} s and {other}={exptime2:g} s")

    temperature = _optional_number(hdr, TEMPERATURE_KEYWORDS, path, warn)
    if temperature is None:
        setpoint = _optional_number(hdr, SETPOINT_KEYWORDS, path, warn)
        if setpoint is not None:
            warn.file(path, "no sensor temperature (CCD-TEMP); using the cooler set point SET-TEMP")
            temperature = setpoint
        else:
            warn.file(path, "no sensor temperature (CCD-TEMP, SET-TEMP)")

    if image.bitpix == 16 and image.bzero == 0.0:
        warn.file(path, "signed 16-bit data without BZERO=32768: negative values are "
                        "refused when the pixels are read")
    if wide is not None:
        warn.file(path, wide)
    ny, nx = image.image_axes
    return FrameRecord(
        path=path, type=ftype, exptime=exptime, temperature=temperature,
        time=_observation_time(hdr, exptime, path, warn), shape=(ny, nx),
        bitpix=image.bitpix, state=_operating_state(hdr, path, warn), hdu=image.index,
        type_card=type_card or f"{key}={value!r}", compression=hdr.compression, size=hdr.size,
        filter=_filter_name(hdr),
    )


#: Keywords that count the frames a combined (master) frame was made of: IRAF,
#: MaxIm and PixInsight (NCOMBINE), Siril (STACKCNT).
COMBINE_KEYWORDS = ("NCOMBINE", "STACKCNT")


def _combined_frame(hdr: _Header) -> str | None:
    """The reason a file is a combined (master) frame rather than a raw one, else None.

    A master bias, dark or flat left in an operator's folder beside the raw
    frames (from MaxIm, PixInsight, Siril...) is no raw frame: as one more
    bias it would bias the temporal statistics, and its floating-point
    values are refused when read (the whole job with them). It is told by a
    frame count above one, or by a frame type that says ``master``.
    """
    card = hdr.first(COMBINE_KEYWORDS)
    if card is not None:
        key, value = card
        try:
            count = float(value)
        except (TypeError, ValueError):
            count = None
        if count is not None and count > 1:
            return f"a combined (master) frame ({key}={value!r}), not a raw frame"
    for key in TYPE_KEYWORDS:
        value = hdr.get(key)
        if isinstance(value, str) and value.strip().lower().startswith("master"):
            return f"a combined (master) frame ({key}={value!r}), not a raw frame"
    return None


def _filter_name(hdr: _Header) -> str | None:
    """The frame's filter name, stripped; None when no filter keyword names one."""
    card = hdr.first(FILTER_KEYWORDS)
    return None if card is None else str(card[1]).strip()


# ----------------------------------------------------------------------------- set checks


def _majority(values: list[Any]) -> Any:
    """Most common value; ties go to the one seen first (files are sorted)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _reject_duplicates(records: list[FrameRecord], rejected: list[Rejection]
                       ) -> list[FrameRecord]:
    """Reject every frame whose bytes repeat an earlier one (same sha256), e.g. a copied file.

    Only frames whose headers already agree (size, type, exposure, time,
    temperature, state, shape) are hashed, so a scan still reads headers only
    unless a folder holds look-alike files. The first file in path order is kept.
    """
    groups: dict[tuple[Any, ...], list[FrameRecord]] = defaultdict(list)
    for r in records:
        groups[(r.size, r.type, r.exptime, r.time, r.temperature, r.state.key(), r.shape,
                r.compression)].append(r)
    dropped: set[str] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        first: dict[str, str] = {}
        for r in sorted(group, key=lambda r: r.path):
            try:
                digest = file_sha256(r.path)
            except FrameReadError as exc:
                rejected.append(Rejection(file=r.path, reason=exc.reason))
                dropped.add(r.path)
                continue
            if digest in first:
                rejected.append(Rejection(
                    file=r.path, reason=f"duplicate frame: same bytes (sha256 {digest[:16]}...) "
                    f"as {first[digest]}"))
                dropped.add(r.path)
            else:
                first[digest] = r.path
    return [r for r in records if r.path not in dropped]


def _apply_set_checks(records: list[FrameRecord], rejected: list[Rejection], warn: _Warnings,
                      allow_mixed_states: bool, tolerance: float
                      ) -> tuple[list[FrameRecord], OperatingState | None]:
    """Keep the majority operating state and shape; warn on instruments and temperatures."""
    if not records:
        return records, None
    keys = [r.state.key() for r in records]
    main_key = _majority(keys)
    main_state = next(r.state for r in records if r.state.key() == main_key)
    n_main = keys.count(main_key)
    if len(set(keys)) > 1:
        if allow_mixed_states:
            others = sorted({r.state.describe() for r in records if r.state.key() != main_key})
            warn.add(f"mixed operating states accepted: {n_main} frames with "
                     f"{main_state.describe()}; others: {'; '.join(others)}")
        else:
            kept = []
            for r in records:
                if r.state.key() == main_key:
                    kept.append(r)
                else:
                    rejected.append(Rejection(
                        file=r.path, reason=f"operating state {r.state.describe()} differs from "
                        f"the set's majority state {main_state.describe()} "
                        f"({n_main} of {len(records)} frames)"))
            records = kept
    instruments = sorted({str(r.state.instrument) for r in records})
    if len(instruments) > 1:
        warn.add(f"frames name different instruments (INSTRUME): {', '.join(instruments)}")

    records = _one_flat_filter(records, rejected)
    records = _one_dark_temperature(records, rejected, tolerance)
    records = _keep_majority(
        records, rejected, lambda r: r.shape,
        lambda r, main, n_main, n: f"shape {r.shape[0]} x {r.shape[1]} differs from the set's "
        f"majority shape {main[0]} x {main[1]} (rows x columns)")

    temps = [r.temperature for r in records if r.temperature is not None]
    if temps and max(temps) - min(temps) > tolerance:
        warn.add(f"sensor temperature spans {min(temps):.2f} .. {max(temps):.2f} C "
                 f"(spread {max(temps) - min(temps):.2f} C > tolerance {tolerance:g} C)")
    return records, main_state


def _one_flat_filter(records: list[FrameRecord],
                     rejected: list[Rejection]) -> list[FrameRecord]:
    """Keep the flats of the majority filter: a master flat (and its PRNU) is per filter.

    Flats through other filters (or without a filter name, where others have
    one) are rejected, naming both; bias and dark frames (shutter closed) are
    not checked.
    """
    def name(f: str | None) -> str:
        return "no filter name (FILTER...)" if f is None else f"filter {f!r}"

    return _keep_majority(
        records, rejected, lambda r: r.filter,
        lambda r, main, n_main, n: f"flat with {name(r.filter)}; the set's flats are taken with "
        f"{name(main)} ({n_main} of {n} flats): a master flat is per filter, so calibrate "
        "each filter's flats as a dataset of their own",
        applies=lambda r: r.type is FrameType.FLAT)


def _keep_majority(records: list[FrameRecord], rejected: list[Rejection],
                   value: Callable[[FrameRecord], Any],
                   reason: Callable[[FrameRecord, Any, int, int], str], *,
                   applies: Callable[[FrameRecord], bool] = lambda r: True
                   ) -> list[FrameRecord]:
    """Keep the records whose ``value`` is the majority's among those it ``applies`` to.

    The others are rejected with ``reason(record, majority value, records
    with it, records it applies to)``; records it does not apply to are kept.
    """
    values = [value(r) for r in records if applies(r)]
    if len(set(values)) < 2:
        return records
    main = _majority(values)
    n_main = values.count(main)
    kept = []
    for r in records:
        if not applies(r) or value(r) == main:
            kept.append(r)
        else:
            rejected.append(Rejection(file=r.path,
                                      reason=reason(r, main, n_main, len(values))))
    return kept


def _one_dark_temperature(records: list[FrameRecord], rejected: list[Rejection],
                          tolerance: float) -> list[FrameRecord]:
    """Keep the darks of the largest temperature cluster: a dark rate is per temperature.

    Dark current doubles every ~6 C: darks of a library at several
    temperatures (-10, 0, +10 C) in one folder would be fitted as one series.
    The darks' temperatures are split where sorted neighbours are more than
    ``tolerance`` (deg C) apart; the cluster with the most darks is kept (the
    coldest of equals), the others are rejected, naming both temperatures.
    Darks without a temperature, bias frames and flats are not checked.
    """
    darks = sorted((r.temperature, i) for i, r in enumerate(records)
                   if r.type is FrameType.DARK and r.temperature is not None)
    if len(darks) < 2 or darks[-1][0] - darks[0][0] <= tolerance:
        return records
    clusters: list[list[tuple[float, int]]] = [[darks[0]]]
    for prev, cur in itertools.pairwise(darks):
        if cur[0] - prev[0] > tolerance:
            clusters.append([])
        clusters[-1].append(cur)
    if len(clusters) < 2:
        return records
    main = max(clusters, key=len)  # the first (coldest) of equals
    lo, hi = main[0][0], main[-1][0]
    span = f"{lo:.1f} C" if hi - lo < 0.05 else f"{lo:.1f} .. {hi:.1f} C"
    out = {i for _, i in main}
    dropped = {i for c in clusters if c is not main for _, i in c}
    for i in sorted(dropped):
        rejected.append(Rejection(
            file=records[i].path, reason=f"dark at {records[i].temperature:.1f} C; the set's "
            f"darks are at {span} ({len(out)} of {len(darks)} darks): a dark rate is per "
            "temperature, so calibrate each temperature's darks as a dataset of their own"))
    return [r for i, r in enumerate(records) if i not in dropped]


def scan(path: str | os.PathLike[str], *, allow_mixed_states: bool = False,
         temperature_tolerance: float | None = None,
         progress: Callable[[int, int], None] | None = None,
         types_from_paths: bool = False) -> Inventory:
    """Inventory the calibration frames under ``path`` from their headers.

    Parameters
    ----------
    path
        A folder (walked recursively), a single file, or an fsspec URL prefix.
        Files ending in .fits, .fit, .fts, .fits.gz, .fz (any case) are
        candidates; any other file is examined only if it begins with a FITS
        ``SIMPLE  =`` card, and ignored otherwise. Hidden files and folders and
        ``*.zarr`` folders are skipped.
    allow_mixed_states
        Accept frames whose GAIN/OFFSET/binning/readout mode differ from the
        majority (with a warning) instead of rejecting them.
    temperature_tolerance
        Sensor-temperature spread (deg C) beyond which a warning is issued,
        and the gap that splits the darks into temperature clusters (the
        largest is kept); None: :data:`TEMPERATURE_TOLERANCE_C`.
    progress
        ``progress(done, total)`` called after each file's headers are read.
    types_from_paths
        A file without a frame-type keyword takes its type from its name or
        folders (:func:`type_from_path`; a warning names the part), instead of
        being rejected.

    Returns
    -------
    Inventory
        Accepted frames sorted by path, rejections (one reason per file) and warnings.

    Raises
    ------
    ScanError
        Only when ``path`` itself is unusable (does not exist, unreadable).
    """
    source, files = _list_source(os.fspath(path))
    warn = _Warnings()
    records: list[FrameRecord] = []
    rejected: list[Rejection] = []
    path_root = source if types_from_paths else None
    for done, file in enumerate(files, start=1):
        result = _inspect(file, warn, path_root)
        (records if isinstance(result, FrameRecord) else rejected).append(result)
        if progress is not None:
            progress(done, len(files))
    records = _reject_duplicates(records, rejected)
    tolerance = TEMPERATURE_TOLERANCE_C if temperature_tolerance is None else temperature_tolerance
    records, state = _apply_set_checks(records, rejected, warn, allow_mixed_states, tolerance)
    if not files:
        warn.add(f"no FITS files found under {source}")
    elif not records:
        warn.add("no usable calibration frame")
    rejected.sort(key=lambda r: r.file)
    return Inventory(
        source=source, **_tallies(records),
        operating_state=state.model_dump() if state is not None and records else {},
        frames=records, rejected=rejected, warnings=warn.render(), n_files=len(files),
    )


def _tallies(records: Sequence[FrameRecord]) -> dict[str, Any]:
    """The :class:`Inventory` fields that summarise its accepted ``records``."""
    temps = [r.temperature for r in records if r.temperature is not None]
    return {
        "shape": records[0].shape if records else None,
        "counts": {t.value: sum(r.type is t for r in records) for t in FrameType},
        "exposure_times": {t.value: sorted({r.exptime for r in records if r.type is t})
                           for t in FrameType},
        "temperature": {"min": min(temps) if temps else None,
                        "max": max(temps) if temps else None},
    }
