"""FITS export of a product version (DESIGN.md section 6).

Layout of the file:

- primary HDU: the main map (the first array of the product) with ``BUNIT``
  and the identity of the product: ``CAMERA``, ``PRODTYPE``, ``VERSION``,
  ``SHA256`` (the content key: sha256 over the sorted input sha256s, the
  parameters, the product type and the code version), ``DATE-BEG`` /
  ``DATE-END`` of the inputs (UTC, ``TIMESYS``), ``SWCREATE`` / ``SWVERSN``
  (code version), ``NINPUTS``, and for a mask product the bit names
  ``MASKB0`` .. ``MASKB8`` (DESIGN.md section 5);
- one image extension per other array, ``EXTNAME`` = the array name in upper
  case (``GAIN_ERR`` for the uncertainty of ``gain``), with ``BUNIT``;
- one binary-table extension per product table (``TUNITn`` for the units);
- a final ``INPUTS`` table with the path and sha256 of every input frame.

The bytes depend only on the stored product: there is no date of writing and
no checksum card with a timestamp, so exporting the same version twice gives
the same sha256 (the catalog records it, HTTP serves it as the ETag).

The file is written HDU by HDU and image data band by band
(:func:`write_fits`: astropy's headers, the data blocks as FITS defines them,
the same bytes as ``HDUList.writeto``), so exporting a 61 MP product with
several maps holds one band of rows in memory, not the product (and not a
second copy of its bytes).

Public API: ``write_fits(group, path) -> sha256``, ``export_fits(group) -> bytes``,
``build_hdulist(group) -> HDUList``, ``default_mask_bits()``.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import queue
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zarr
from astropy.io import fits


def default_mask_bits() -> dict[int, str]:
    """Bit number -> name of :class:`sitiancal.compute.defects.MaskBit` (DESIGN.md section 5).

    Used for a ``mask`` product that does not carry its own bit names.
    """
    from sitiancal.compute.defects import MaskBit

    return {int(bit).bit_length() - 1: str(bit.name) for bit in MaskBit}

_META_ATTR = "sitiancal"
#: FITS binary-table formats of numpy dtypes (uint16/uint32 are widened).
_TFORM = {"f8": "D", "f4": "E", "i8": "K", "i4": "J", "i2": "I", "u1": "B", "b1": "L",
          "u2": "J", "u4": "K", "i1": "I"}
_WIDEN = {"u2": np.int32, "u4": np.int64, "i1": np.int16}


def _ascii(text: Any) -> str:
    """FITS headers and strings are printable ASCII: escape anything else."""
    value = str(text).encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in value)


def _set(header: fits.Header, key: str, value: Any, comment: str = "") -> None:
    """Set a card, dropping the comment where it would not fit in 80 columns."""
    width = len(str(value)) + 2 if isinstance(value, str) else len(str(value))
    if 10 + max(20, width) + 3 + len(comment) > 80:
        comment = ""
    header[key] = (value, comment) if comment else value


def _fits_date(iso: str | None) -> str | None:
    if not iso:
        return None
    return iso.replace("Z", "").replace("+00:00", "")


def _image_data(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "b":
        return values.astype(np.uint8)
    if values.dtype.byteorder not in ("=", "|", ">"):
        return values.astype(values.dtype.newbyteorder("="))
    return values


def _primary_header(meta: Mapping[str, Any], n_inputs: int,
                    stats: Mapping[str, Any] | None = None) -> list[tuple[str, Any, str]]:
    cards: list[tuple[str, Any, str]] = [
        ("CAMERA", _ascii(meta["camera"]), "camera name"),
        ("PRODTYPE", _ascii(meta["type"]), "product type"),
        ("VERSION", int(meta["version"]), "product version (per camera and type)"),
        ("SHA256", _ascii(meta["content_key"]), "content key: sha256 of inputs, params, code"),
        ("TIMESYS", "UTC", "time scale of DATE-BEG and DATE-END"),
    ]
    beg, end = _fits_date(meta.get("date_beg")), _fits_date(meta.get("date_end"))
    if beg:
        cards.append(("DATE-BEG", beg, "first input frame (UTC)"))
    if end:
        cards.append(("DATE-END", end, "last input frame (UTC)"))
    cards += [
        ("SWCREATE", "sitiancal", "software that created the product"),
        ("SWVERSN", _ascii(meta.get("code_version", "")), "software version"),
        ("NINPUTS", int(n_inputs), "number of input frames (INPUTS table)"),
    ]
    if (stats or {}).get("filter"):  # a master flat is per filter
        cards.append(("FILTER", _ascii(str(stats["filter"])), "filter of the input flats"))
    bits = meta.get("mask_bits")
    if not bits and meta.get("type") == "mask":
        bits = {str(k): v for k, v in default_mask_bits().items()}
    for bit, name in sorted((bits or {}).items(), key=lambda item: int(item[0])):
        cards.append((f"MASKB{int(bit)}", _ascii(name), f"name of mask bit {int(bit)} "
                      f"(value {1 << int(bit)})"))
    return cards


def _table_hdu(name: str, table: zarr.Group) -> fits.BinTableHDU:
    units: Mapping[str, str] = table.attrs.get("units", {})
    columns = []
    for col in table.attrs["columns"]:
        values = np.asarray(table[col][...])
        unit = _ascii(units.get(col, "")) or None
        if values.dtype.kind in "TUSO":
            text = np.array([_ascii(v) for v in values.tolist()], dtype=np.str_)
            width = max(1, max((len(v) for v in text), default=1))
            columns.append(fits.Column(name=col, format=f"{width}A", unit=unit,
                                       array=text.astype(f"S{width}")))
            continue
        code = values.dtype.str[1:]
        if code in _WIDEN:
            values = values.astype(_WIDEN[code])
            code = values.dtype.str[1:]
        if code not in _TFORM:
            raise TypeError(f"table {name}: column {col} has dtype {values.dtype} "
                            "that FITS tables do not hold")
        columns.append(fits.Column(name=col, format=_TFORM[code], unit=unit,
                                   array=_image_data(values)))
    hdu = fits.BinTableHDU.from_columns(columns, name=name.upper())
    description = table.attrs.get("description", "")
    if description:
        hdu.header["COMMENT"] = _ascii(description)[:72]
    return hdu


def _inputs_hdu(inputs: list[Mapping[str, str]]) -> fits.BinTableHDU:
    paths = [_ascii(item["path"]) for item in inputs]
    shas = [_ascii(item["sha256"]) for item in inputs]
    width = max(1, max((len(p) for p in paths), default=1))
    cols = [
        fits.Column(name="path", format=f"{width}A", array=np.array(paths, dtype=f"S{width}")),
        fits.Column(name="sha256", format="64A", array=np.array(shas, dtype="S64")),
    ]
    return fits.BinTableHDU.from_columns(cols, name="INPUTS")


def build_hdulist(group: zarr.Group) -> fits.HDUList:
    """Build the FITS HDU list of a stored product group (see the module docstring)."""
    meta = group.attrs[_META_ATTR]
    inputs = list(group.attrs.get("inputs", []))
    names = list(meta["arrays"])
    if names:
        main = group[names[0]]
        primary = fits.PrimaryHDU(data=_image_data(np.asarray(main[...])))
        _set(primary.header, "EXTNAME", names[0].upper(), "main map")
        _set(primary.header, "BUNIT", _ascii(main.attrs.get("units", meta.get("units", ""))),
             "units")
        _set(primary.header, "LONGNAME", _ascii(main.attrs.get("long_name", "")))
    else:  # a table-only product: the header alone
        primary = fits.PrimaryHDU()
        _set(primary.header, "BUNIT", _ascii(meta.get("units", "")), "units of the figures")
    header = primary.header
    for key, value, comment in _primary_header(meta, len(inputs), group.attrs.get("stats")):
        _set(header, key, value, comment)
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [primary]
    for name in names[1:]:
        arr = group[name]
        hdu = fits.ImageHDU(data=_image_data(np.asarray(arr[...])), name=name.upper())
        _set(hdu.header, "BUNIT", _ascii(arr.attrs.get("units", "")), "units")
        _set(hdu.header, "LONGNAME", _ascii(arr.attrs.get("long_name", "")))
        hdus.append(hdu)
    tables = meta.get("tables") or []
    for name in tables:
        hdus.append(_table_hdu(name, group["tables"][name]))
    hdus.append(_inputs_hdu(inputs))
    return fits.HDUList(hdus)


#: Rows of an image written per band by :func:`write_fits` (a band of a 9576-wide
#: float32 map is ~20 MB).
_BAND_ROWS = 512


class StreamAborted(RuntimeError):
    """The other side of a :class:`BandStream` gave up (its own error is the cause to report)."""


class BandStream:
    """An image's values, handed over band by band from the thread that reads them.

    A source for :func:`write_fits` that is not read again: the thread that
    reads an array once (to store it as zarr chunks) hands each band of rows
    to :meth:`put`, in C order of the array (a stack of maps one map after
    the other), and the FITS writer consumes them in that order. Each band of
    the product is then read once from where it comes from (scratch maps on
    the disk, at 61 MP) for both copies instead of twice.

    At most ``depth`` bands wait in between (memory: ``depth`` + 2 bands).
    :meth:`abort`, from either side, makes the other side's next
    :meth:`put` or iteration raise :class:`StreamAborted` instead of waiting
    for ever.

    Parameters
    ----------
    shape
        Shape of the whole array.
    dtype
        Its dtype (bands are cast to it by the writer).
    depth
        Bands that may wait in between.
    """

    _END = object()

    def __init__(self, shape: tuple[int, ...], dtype: Any, *, depth: int = 1) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._aborted = threading.Event()

    def put(self, band: np.ndarray) -> None:
        """Hand over the next band of rows (waits while ``depth`` bands wait)."""
        self._offer(band)

    def close(self) -> None:
        """Say that every band has been handed over."""
        self._offer(self._END)

    def abort(self) -> None:
        """Stop the exchange: the other side raises :class:`StreamAborted`."""
        self._aborted.set()

    def _offer(self, item: Any) -> None:
        while True:
            if self._aborted.is_set():
                raise StreamAborted("the FITS writer stopped")
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            if self._aborted.is_set():
                raise StreamAborted("the array's reader stopped")
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is self._END:
                return
            yield item


def _image_dtype(dtype: np.dtype) -> np.dtype:
    """The in-memory dtype astropy writes an array of ``dtype`` as (bool as uint8)."""
    return np.dtype(np.uint8) if dtype.kind == "b" else np.dtype(dtype).newbyteorder("=")


def _image_header(arr: zarr.Array, name: str, primary: bool) -> fits.Header:
    """Header of an image HDU for ``arr`` as astropy would write it (BITPIX, NAXISn, BZERO)."""
    dtype = _image_dtype(arr.dtype)
    dummy = np.zeros((1,) * len(arr.shape), dtype=dtype)
    hdu = fits.PrimaryHDU(data=dummy) if primary else fits.ImageHDU(data=dummy, name=name.upper())
    header = hdu.header.copy()  # BITPIX, and BZERO/BSCALE for unsigned integers
    for axis, size in enumerate(reversed(arr.shape), start=1):
        header[f"NAXIS{axis}"] = int(size)
    return header


def _stored_band(values: np.ndarray, header: fits.Header) -> np.ndarray:
    """A band of values in the type of the FITS data block (before byte order)."""
    values = np.asarray(values, dtype=_image_dtype(values.dtype))
    if values.dtype.kind == "u" and values.dtype.itemsize > 1:
        # FITS stores unsigned integers as signed ones with BZERO = 2**(bits-1):
        # flipping the sign bit is that subtraction, exactly.
        flip = np.array(1 << (8 * values.dtype.itemsize - 1), dtype=values.dtype)
        values = np.bitwise_xor(values, flip).view(values.dtype.str.replace("u", "i"))
    return values


def _stream_image(out: _HashedFile, arr: zarr.Array, header: fits.Header,
                  source: Any = None) -> None:
    """Append the image HDU of ``arr``, its values read band by band from ``source`` (default ``arr``).

    The header block is astropy's (``Header.tostring``, as ``StreamingHDU``
    writes it for the headers of :func:`_image_header`); the data block is the
    values big-endian in the header's BITPIX type, zero-padded to a 2880-byte
    block, as FITS defines it (the bytes of ``HDUList.writeto``, tested).
    """
    shape = tuple(int(n) for n in arr.shape)
    data = arr if source is None else source
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    if tuple(int(n) for n in data.shape) != shape:
        raise ValueError(f"source of {arr.name!r} has shape {tuple(data.shape)}, "
                         f"the stored array {shape}")
    out.write(header.tostring(sep="", endcard=True, padding=True).encode("ascii"))
    expected = abs(int(header["BITPIX"])) // 8 * (math.prod(shape) if shape else 0)
    written = 0
    if not shape or 0 in shape:
        pass  # no data block
    elif isinstance(data, BandStream):  # bands of rows in C order, any height
        for band in data:
            band = np.asarray(band, dtype=arr.dtype)
            rows = band.reshape(-1, shape[-1])
            for y0 in range(0, rows.shape[0], _BAND_ROWS):  # one band's big-endian copy at a time
                written += out.write(_big_endian(rows[y0:y0 + _BAND_ROWS], header))
    elif len(shape) < 2:  # small vectors: one write
        written += out.write(_big_endian(np.asarray(data[...], dtype=arr.dtype), header))
    else:
        lead = shape[:-2]
        for index in np.ndindex(*lead) if lead else [()]:
            for y0 in range(0, shape[-2], _BAND_ROWS):
                band = np.asarray(data[(*index, slice(y0, y0 + _BAND_ROWS))], dtype=arr.dtype)
                written += out.write(_big_endian(band, header))
    if written != expected:
        raise ValueError(f"{arr.name!r}: {written} data bytes written, the header says "
                         f"{expected}")
    out.write(bytes(-written % _FITS_BLOCK))


#: FITS block size, bytes: headers and data blocks are padded to a multiple of it.
_FITS_BLOCK = 2880


def _big_endian(values: np.ndarray, header: fits.Header) -> np.ndarray:
    """A band of values as the bytes of a FITS data block (BITPIX type, big-endian)."""
    stored = _stored_band(values, header)
    return stored.astype(stored.dtype.newbyteorder(">"), copy=False, order="C")


class _HashedFile:
    """A new file written front to back, every byte hashed (sha256) on its way out.

    Where ``direct`` and the file system allow it, the bytes go through a
    page-aligned buffer and whole aligned blocks are written with ``O_DIRECT``:
    the staged products (GBs of FITS at 61 MP) never enter the page cache,
    whose growth the kernel pays for in system time on a VM whose free memory
    goes back to its host, and need not be read back to be hashed. The last
    partial block, and everything where ``O_DIRECT`` is refused, is written
    through the page cache. :meth:`close` makes the bytes durable
    (:func:`settle_file`) when ``direct``.
    """

    _BLOCK = 8 << 20

    def __init__(self, path: str, *, direct: bool) -> None:
        from sitiancal.storage.frames import DIRECT_ALIGN, aligned_buffer, open_direct

        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self._align = DIRECT_ALIGN
        self._settle = direct
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = open_direct(path, flags) if direct else None
        self._direct = fd is not None
        self.fd = fd if fd is not None else os.open(path, flags, 0o644)
        self._buf = aligned_buffer(self._BLOCK)
        self._fill = 0

    def write(self, data: Any) -> int:
        """Append the bytes of ``data`` (bytes or a C-contiguous array); return their count."""
        view = memoryview(data).cast("B")
        self.digest.update(view)
        n = len(view)
        src = np.frombuffer(view, dtype=np.uint8)
        done = 0
        while done < n:
            take = min(self._buf.size - self._fill, n - done)
            self._buf[self._fill:self._fill + take] = src[done:done + take]
            self._fill += take
            done += take
            if self._fill == self._buf.size:
                self._flush(self._fill)
        self.size += n
        return n

    def _flush(self, n: int) -> None:
        """Write the first ``n`` buffered bytes and keep the rest at the front of the buffer."""
        view = memoryview(self._buf)
        done = 0
        while done < n:
            try:
                wrote = os.write(self.fd, view[done:n])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()  # opened with O_DIRECT, but the transfer is refused
                continue
            done += wrote
            if self._direct and done < n and done % self._align:
                self._buffered()  # a short transfer off the alignment
        rest = self._fill - n
        if rest:
            self._buf[:rest] = self._buf[n:self._fill].copy()
        self._fill = rest

    def _buffered(self) -> None:
        """Write the rest of the file through the page cache."""
        import fcntl

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))
        self._direct = False

    def close(self) -> None:
        """Write what is buffered, settle the file (``direct``) and close it."""
        if self.fd < 0:
            return
        try:
            if self._fill:
                whole = self._fill - self._fill % self._align if self._direct else 0
                if whole:
                    self._flush(whole)
                if self._fill:
                    if self._direct:
                        self._buffered()
                    self._flush(self._fill)
        finally:
            os.close(self.fd)
            self.fd = -1
        if self._settle:
            settle_file(self.path)

    def abort(self) -> None:
        """Close without writing what is buffered (the caller removes the file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: ``errno`` values of a sync that the file system does not support.
_NO_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS}


def settle_file(path: str | os.PathLike[str], start: int = 0, length: int = 0) -> None:
    """Write a byte range of a file back to disk and drop it from the page cache.

    For files written once and not read again by this process (staged
    products): their pages are freed for the next writes instead of the page
    cache growing by every byte written. Growing it costs the kernel far more
    than writing into recycled pages where memory is fresh to the machine (a
    VM whose free memory goes back to its host: ~2 s vs ~0.3 s of system time
    per GB, measured on the benchmark machine), and staged bytes are on disk
    before they are published. ``length`` 0: to the end of the file. A no-op
    for the page cache where ``posix_fadvise`` does not exist.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            if hasattr(os, "fdatasync"):
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        except OSError as exc:  # a file system without sync support: nothing to settle
            if exc.errno not in _NO_SYNC:
                raise  # a real write error (EIO, ENOSPC) fails the staging
            return
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only
    finally:
        os.close(fd)


class _SettledHash:
    """sha256 of a file that is being appended to, settled step by step.

    :meth:`update` hashes the bytes appended since its last call (read back
    from the page cache into one reused buffer), then :func:`settle_file`s
    them, so a file of any size holds at most one step (an HDU) in the page
    cache. The digest is the sha256 of the whole file's bytes.
    """

    _BLOCK = 16 << 20

    def __init__(self, path: str, *, settle: bool = True, digest: Any = None,
                 pos: int = 0) -> None:
        self.path = path
        self.settle = settle
        self.pos = pos  # bytes already in ``digest`` (the hash of the file's first bytes)
        self.digest = digest if digest is not None else hashlib.sha256()
        self._buf = bytearray(self._BLOCK)

    def update(self) -> None:
        """Hash and settle everything appended to the file since the last call."""
        end = os.path.getsize(self.path)
        view = memoryview(self._buf)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.pos)
            while self.pos < end:
                n = f.readinto(view[: min(self._BLOCK, end - self.pos)])
                if not n:
                    raise OSError(f"{self.path}: shorter than its size while hashing")
                self.digest.update(view[:n])
                self.pos += n
        if self.settle:
            settle_file(self.path)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def write_fits(group: zarr.Group, path: str | os.PathLike[str], *,
               sources: Mapping[str, Any] | None = None, settle: bool = True) -> str:
    """Write the FITS file of a stored product group to ``path``; return its sha256.

    The bytes are those astropy's ``HDUList.writeto`` gives for
    :func:`build_hdulist` (tested), written one image HDU at a time,
    ``_BAND_ROWS`` rows at a time, so memory stays at one band whatever the
    size of the product, and hashed on their way out (:class:`_HashedFile`).
    An existing file at ``path`` is replaced.

    ``sources`` maps array names to the array-likes the group's arrays were
    just written from (same shape, values cast to the stored dtype): their
    bands are read instead of decoding the stored chunks again, for the same
    bytes (the zarr codecs are lossless). Metadata always comes from the group.

    ``settle``: the images are written past the page cache (``O_DIRECT``
    where the file system allows it) and the file is synced and dropped from
    the page cache at the end (:func:`settle_file`); off for a temporary file
    that is read or uploaded next. Staging the 300-frame benchmark's products
    (~7 GB of FITS at 61 MP) spent ~15 s of CPU on the FITS thread when each
    HDU was written through the page cache and read back to be hashed.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        os.remove(path)
    meta = group.attrs[_META_ATTR]
    inputs = list(group.attrs.get("inputs", []))
    names = list(meta["arrays"])
    if names:
        main = group[names[0]]
        header = _image_header(main, names[0], primary=True)
        _set(header, "EXTNAME", names[0].upper(), "main map")
        _set(header, "BUNIT", _ascii(main.attrs.get("units", meta.get("units", ""))), "units")
        _set(header, "LONGNAME", _ascii(main.attrs.get("long_name", "")))
    else:  # a table-only product: the header alone
        header = fits.PrimaryHDU().header
        _set(header, "BUNIT", _ascii(meta.get("units", "")), "units of the figures")
    for key, value, comment in _primary_header(meta, len(inputs), group.attrs.get("stats")):
        _set(header, key, value, comment)
    src = dict(sources or {})
    # The images (nearly all the bytes) are hashed as they are written; the small
    # tables are appended by astropy and hashed from the file (see _SettledHash).
    out = _HashedFile(path, direct=settle)
    try:
        if names:
            _stream_image(out, group[names[0]], header, src.get(names[0]))
        else:
            out.write(header.tostring(sep="", endcard=True, padding=True).encode("ascii"))
        for name in names[1:]:
            arr = group[name]
            header = _image_header(arr, name, primary=False)
            _set(header, "BUNIT", _ascii(arr.attrs.get("units", "")), "units")
            _set(header, "LONGNAME", _ascii(arr.attrs.get("long_name", "")))
            _stream_image(out, arr, header, src.get(name))
    except BaseException:
        out.abort()
        raise
    out.close()
    written = _SettledHash(path, settle=settle, digest=out.digest, pos=out.size)
    small = [_table_hdu(name, group["tables"][name]) for name in meta.get("tables") or []]
    small.append(_inputs_hdu(inputs))
    for hdu in small:  # tables are small: appended whole
        fits.append(path, hdu.data, hdu.header, output_verify="exception")
    written.update()
    return written.hexdigest()


def export_fits(group: zarr.Group) -> bytes:
    """The canonical FITS bytes of a stored product group (deterministic).

    Holds the whole file in memory: for large products use :func:`write_fits`.
    """
    with tempfile.TemporaryDirectory(prefix="sitiancal-fits-") as tmp:
        path = os.path.join(tmp, "product.fits")
        write_fits(group, path, settle=False)
        with open(path, "rb") as f:
            return f.read()
