"""Product store: zarr v3 groups and FITS files over fsspec (local folder or ``s3://``).

Layout under the store root (a path, ``file://`` URL or ``s3://bucket/prefix``)::

    staging/<uuid>/_staging.json          marker written first (creation time, owner)
    staging/<uuid>/product.zarr/          zarr v3 group being written
    staging/<uuid>/product.fits           canonical FITS export (storage.export)
    products/<camera>/<type>/v<NNNN>/     the same, once published (immutable)
    products/<camera>/<type>/v<NNNN>/_published.json   commit marker (written last)

Life of a version (see :class:`sitiancal.storage.catalog.Catalog`):

1. the catalog reserves the version number (never reused);
2. :meth:`ProductStore.stage` writes the zarr group chunk by chunk under
   ``staging/``, exports the FITS file from it, and checksums both: the sha256
   of the FITS bytes and, per zarr array, the sha256 of its ``zarr.json`` and of
   its stored chunk bytes in C order of the chunk grid (:func:`array_checksum`);
   the checksums also go into the group attributes;
3. :meth:`ProductStore.publish` makes the staged version visible at its
   final key in one atomic step and refuses to overwrite anything already
   there (:class:`ProductExists`). A version is visible only once its commit
   marker ``_published.json`` is there: on a local disk the marker is written
   into the staging folder, which is then renamed to the final key (one
   ``rename(2)``); on object storage the files are copied to the final key
   and the marker is written last. Every reader (:meth:`ProductStore.open_zarr`,
   :meth:`ProductStore.open_fits`, :meth:`ProductStore.verify`...) requires the
   marker, so a publication that fails or crashes midway leaves nothing
   readable; what it copied is removed at once if the store allows, else by
   :meth:`sitiancal.storage.catalog.Catalog.sweep_orphans`;
4. the catalog inserts the version row in one transaction; if that fails the
   final key is removed again (:meth:`ProductStore.delete_orphan`).

Anything that fails while staging removes its staging folder;
:meth:`ProductStore.sweep_staging` removes what a crashed process left behind
(at once when the marker names a process of this host that no longer runs;
the service sweeps at start-up). A version published before commit markers
existed is made visible again once it verifies in full against the checksums
recorded in its group.
Published groups are opened read-only; :meth:`ProductStore.verify` recomputes
the checksums on demand and reports any difference (a flipped byte in one chunk
changes that array's checksum).

Public API
----------
``ProductArray``, ``ProductTable``, ``ProductPayload`` (what a pipeline hands
over; ``sitiancal.compute.products``' arrays and tables fit as they are), ``Checksums``, ``StagedProduct``, ``VerifyReport``,
``ProductStore(url, storage_options=None)`` with ``stage``, ``publish``,
``discard``, ``delete_orphan``, ``exists``, ``open_zarr``, ``zarr_store``,
``open_dataset``, ``read_region``, ``read_table``, ``fits_bytes``,
``fits_path``, ``open_fits``, ``compute_checksums``, ``verify``,
``list_staging``, ``sweep_staging``, ``list_product_keys``, ``is_published``,
``product_created``; ``product_key``, ``content_key``,
``code_version``, ``library_versions``, ``build_provenance``, ``to_jsonable``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import posixpath
import re
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import zarr
import zarr.storage
from fsspec.implementations.local import LocalFileSystem

from sitiancal.compute.content import ProductArray, ProductTable
from sitiancal.storage.direct import DirectStore, read_direct
from sitiancal.storage.export import BandStream, StreamAborted
from sitiancal.storage.frames import FrameReadError

__all__ = ["ProductArray", "ProductPayload", "ProductStore", "ProductTable"]

log = logging.getLogger(__name__)

#: 2-D maps are chunked like the compute tiles: 6388 x 9576 = 4 x 7 chunks of
#: 1597 x 1368 (DESIGN.md section 7).
MAP_CHUNKS = (1597, 1368)
#: Largest chunk of other arrays, in elements (~64 MB of float64).
MAX_CHUNK_ELEMENTS = 8 * 1024 * 1024
#: Zarr group of a product, relative to its key.
ZARR_NAME = "product.zarr"
#: FITS export of a product, relative to its key.
FITS_NAME = "product.fits"
#: Marker of a staging folder, relative to its key.
MARKER_NAME = "_staging.json"
#: Commit marker of a published version, relative to its key: written last;
#: readers ignore a version without it.
PUBLISHED_NAME = "_published.json"
#: Root attribute of a product group that holds its identity.
META_ATTR = "sitiancal"
#: Version of the layout of a product group.
FORMAT_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ARRAY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_HASH_BATCH = 16


def _compressor() -> zarr.codecs.BloscCodec:
    # Measured on 61 MP float32 maps (2 cores): lz4 + bitshuffle writes in 0.15 s
    # and reads in 0.10 s at a ratio of 1.36; zstd level 5, 0.24 s and 0.13 s at
    # 1.33. Noisy float maps barely compress, so the faster codec wins. Level 1
    # rather than 5: on one 1597 x 1368 chunk of each array of a 300-frame job's
    # products (one thread), ratios 0.1-1 % lower on the float maps (1.14-1.63),
    # encoding 1.1-2.0x and decoding 1.1-1.4x as fast (BIAS 1.10 -> 2.24 GB/s).
    return zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")


# -- errors ------------------------------------------------------------------
class StoreError(Exception):
    """Base class of product store errors."""


class ProductExists(StoreError, FileExistsError):
    """A published key already exists: published versions are never overwritten."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"product {self.key} already exists in the store; published versions are immutable"


class ProductMissing(StoreError, KeyError):
    """A key has no product in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no product at {self.key} in the store"


# -- what a pipeline hands over -------------------------------------------------
# ProductArray and ProductTable are the compute layer's (imports point down).
@dataclass
class ProductPayload:
    """Everything a new product version is made of.

    Parameters
    ----------
    camera, type
        Camera name and product type (DESIGN.md section 4: ``bias``, ``gain``...).
    arrays
        The arrays (:class:`ProductArray` or any object with the same
        fields); the first is the main map (FITS primary HDU). May be empty
        for a table-only product (the primary HDU then has no data).
    tables
        Small tables (FITS binary tables).
    stats
        JSON-able scalar figures (and small nested dicts).
    units
        Units of the main map; default: those of ``arrays[0]``.
    provenance
        Anything else worth recording (dataset, job, host, timings, library
        versions: see :func:`build_provenance`).
    inputs
        Input frames, ``{"path": ..., "sha256": ...}`` each.
    date_beg, date_end
        Time span of the input frames (UTC).
    params
        Parameters of the computation (part of the content key).
    code_version
        Code version (part of the content key); default :func:`code_version`.
    mask_bits
        Names of the mask bits (``{0: "HOT", ...}``) for a mask product.
    """

    camera: str
    type: str
    arrays: list[Any]
    tables: list[Any] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    units: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, str]] = field(default_factory=list)
    date_beg: datetime | None = None
    date_end: datetime | None = None
    params: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=lambda: code_version())
    mask_bits: dict[int, str] | None = None

    @property
    def main_units(self) -> str:
        """Units of the main map."""
        return self.units or (self.arrays[0].units if self.arrays else "")

    @property
    def content_key(self) -> str:
        """sha256 identifying the computation (see :func:`content_key`)."""
        return content_key([str(item["sha256"]) for item in self.inputs], self.params,
                           self.type, self.code_version)

    def validate(self) -> None:
        """Raise ``ValueError`` with a precise message if the payload cannot be stored."""
        check_name(self.camera, "camera")
        check_type(self.type)
        if not self.arrays and not self.tables:
            raise ValueError(f"{self.camera}/{self.type}: a product needs an array or a table")
        seen: set[str] = set()
        for arr in self.arrays:
            if not _ARRAY_RE.match(arr.name) or arr.name in seen:
                raise ValueError(f"bad or repeated array name {arr.name!r}")
            seen.add(arr.name)
            dimension_names(arr)
            if np.dtype(arr.data.dtype).kind not in "biuf":
                raise ValueError(f"array {arr.name!r}: dtype {arr.data.dtype} is not numeric")
        for table in self.tables:
            if not _ARRAY_RE.match(table.name) or table.name in seen:
                raise ValueError(f"bad or repeated table name {table.name!r}")
            seen.add(table.name)
            lengths = {len(np.asarray(col)) for col in table.columns.values()}
            if len(lengths) > 1:
                raise ValueError(f"table {table.name!r}: columns of different lengths {lengths}")
            for col in table.columns:
                if not _ARRAY_RE.match(col):
                    raise ValueError(f"table {table.name!r}: bad column name {col!r}")
        for item in self.inputs:
            if "path" not in item or "sha256" not in item:
                raise ValueError(f"input {item!r} needs 'path' and 'sha256'")
        for label, when in (("date_beg", self.date_beg), ("date_end", self.date_end)):
            if when is not None and when.tzinfo is None:
                raise ValueError(f"{label} must be timezone-aware (UTC)")
        json.dumps(to_jsonable(self.stats), allow_nan=True)
        json.dumps(to_jsonable(self.provenance), allow_nan=True)
        json.dumps(to_jsonable(self.params), allow_nan=True)


@dataclass(frozen=True)
class Checksums:
    """sha256 of the FITS export and of each zarr array (path in the group -> hex)."""

    fits: str
    arrays: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (as stored in the catalog and in the group attributes)."""
        return {"fits": self.fits, "arrays": dict(sorted(self.arrays.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checksums:
        """Inverse of :meth:`to_dict`."""
        return cls(fits=str(data["fits"]), arrays={str(k): str(v) for k, v in
                                                    dict(data["arrays"]).items()})


@dataclass(frozen=True)
class StagedProduct:
    """A product written to staging, not yet visible."""

    key: str
    camera: str
    type: str
    version: int
    content_key: str
    checksums: Checksums
    shape: tuple[int, ...]
    units: str
    created: datetime

    @property
    def final_key(self) -> str:
        """The key the product gets when published."""
        return product_key(self.camera, self.type, self.version)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`ProductStore.verify`."""

    key: str
    ok: bool
    checked: tuple[str, ...]
    problems: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"key": self.key, "ok": self.ok, "checked": list(self.checked),
                "problems": list(self.problems)}


# -- helpers -------------------------------------------------------------------
def dimension_names(arr: Any) -> tuple[str, ...]:
    """Dimension names of a product array (any object with ``name``, ``data``, ``dims``).

    ``None``, or the 2-D default ``("y", "x")`` on an array that is not 2-D,
    gives ``("y", "x")`` for 2-D arrays and ``("<name>_dim0", ...)`` otherwise.
    """
    ndim = len(arr.data.shape)
    dims = getattr(arr, "dims", None)
    if dims is not None and not (tuple(dims) == ("y", "x") and ndim != 2):
        if len(dims) != ndim:
            raise ValueError(f"array {arr.name!r} has {ndim} dimensions but "
                             f"{len(dims)} names {tuple(dims)}")
        return tuple(str(d) for d in dims)
    if ndim == 2:
        return ("y", "x")
    return tuple(f"{arr.name}_dim{i}" for i in range(ndim))


def check_name(name: str, what: str = "camera") -> str:
    """Return ``name`` if it is a safe camera name (letters, digits, ``_.-``), else raise."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' "
                         "(at most 64 characters, starting with a letter or digit)")
    return name


def check_type(product_type: str) -> str:
    """Return ``product_type`` if it is a valid product type name, else raise."""
    if not isinstance(product_type, str) or not _TYPE_RE.match(product_type):
        raise ValueError(f"invalid product type {product_type!r}: use lower-case letters, "
                         "digits and '_'")
    return product_type


def product_key(camera: str, product_type: str, version: int) -> str:
    """Final store key of a version: ``products/<camera>/<type>/v<NNNN>``."""
    check_name(camera)
    check_type(product_type)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    return f"products/{camera}/{product_type}/v{version:04d}"


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, datetimes and tuples to plain JSON types, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, datetime):
        return _iso(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, ASCII."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True)


def content_key(input_sha256s: Sequence[str], params: Mapping[str, Any], product_type: str,
                code_version: str) -> str:
    """sha256 (hex) of the canonical JSON of the sorted input sha256s, params, type, code.

    Two computations with the same key are the same computation: the pipeline
    reuses the existing version instead of publishing a duplicate.
    """
    doc = {"inputs": sorted(str(s) for s in input_sha256s), "params": dict(params),
           "type": product_type, "code_version": code_version}
    return hashlib.sha256(canonical_json(doc).encode("ascii")).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus ``git describe`` of the checkout when there is one."""
    from sitiancal import __version__

    root = Path(__file__).resolve().parent.parent
    describe = ""
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty",
                                  "--tags"], capture_output=True, text=True, timeout=5,
                                 check=False)
            describe = out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            describe = ""
    return f"{__version__}+git.{describe}" if describe else __version__


def library_versions() -> dict[str, str]:
    """Versions of the libraries a product depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "scikit-learn", "numba", "astropy", "dask", "xarray",
                 "zarr", "numcodecs", "sqlalchemy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def build_provenance(*, params: Mapping[str, Any] | None = None,
                     started: datetime | None = None, finished: datetime | None = None,
                     dataset_id: str | None = None, job_id: str | None = None,
                     timings: Mapping[str, float] | None = None,
                     **extra: Any) -> dict[str, Any]:
    """Provenance record of a product: code and library versions, host, times.

    ``timings`` are durations in s per stage. Input frames are recorded by
    :class:`ProductPayload` (``inputs``) and copied in by the store.
    """
    doc: dict[str, Any] = {
        "code_version": code_version(),
        "libraries": library_versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "dataset": dataset_id,
        "job": job_id,
        "params": dict(params or {}),
        "started": _iso(started) if started else None,
        "finished": _iso(finished) if finished else None,
        "timings": dict(timings or {}),
    }
    doc.update(extra)
    return to_jsonable(doc)


def _iso(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: use timezone-aware UTC times")
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def default_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of a stored array: 1597 x 1368 tiles for maps, bounded chunks otherwise.

    A stack of maps ``(level, y, x)`` is chunked one map tile at a time, ``(1, ty, tx)``,
    so a region read of one level fetches only the tiles it covers.
    """
    if len(shape) == 0:
        return ()
    if len(shape) == 2:
        return (max(1, min(shape[0], MAP_CHUNKS[0])), max(1, min(shape[1], MAP_CHUNKS[1])))
    if len(shape) == 3 and math.prod(shape[1:]) > MAX_CHUNK_ELEMENTS:
        return (1, *default_chunks(shape[1:]))
    rest = math.prod(max(1, n) for n in shape[1:])
    first = max(1, min(max(1, shape[0]), MAX_CHUNK_ELEMENTS // rest))
    return (first, *(max(1, n) for n in shape[1:]))


#: Largest band of chunk rows written in one call (bytes): zarr then encodes the
#: chunks of the band concurrently.
_WRITE_BAND_BYTES = 128 * 1024**2


def _write_regions(shape: tuple[int, ...], chunks: tuple[int, ...],
                   itemsize: int) -> Iterator[tuple[slice, ...]]:
    """Regions to write an array in: bands of whole chunk rows, else single chunks.

    For 2-D maps a band is a row of chunks across the map; for stacks of maps
    (leading axes chunked by 1) a band is a row of chunks of one map.
    """
    if len(shape) < 2:
        yield from _chunk_slices(shape, chunks)
        return
    lead = len(shape) - 2
    band = shape[-1] * chunks[-2] * itemsize
    if any(c != 1 for c in chunks[:lead]) or band > _WRITE_BAND_BYTES:
        yield from _chunk_slices(shape, chunks)
        return
    for index in itertools.product(*(range(n) for n in shape[:lead])):
        for y0 in range(0, shape[-2], chunks[-2]):
            yield (*(slice(i, i + 1) for i in index),
                   slice(y0, min(y0 + chunks[-2], shape[-2])), slice(0, shape[-1]))


def _streams_bands(target: zarr.Array) -> bool:
    """Whether :meth:`ProductStore._fill_array` writes ``target`` in consecutive blocks of C order.

    Those blocks, one after the other, are the array's values in C order, the
    order of a FITS data block, so they can feed the FITS writer as they are
    (:class:`BandStream`): true where every region written is contiguous
    (axes before some axis of length 1, axes after it whole), as for bands
    of full-width rows, one map of a stack at a time, or single chunks that
    hold whole maps; not for an empty array.
    """
    shape = tuple(int(n) for n in target.shape)
    if len(shape) < 2 or 0 in shape:
        return False
    for region in _write_regions(shape, tuple(target.chunks), target.dtype.itemsize):
        lengths = [r.stop - r.start for r in region]
        k = next((i for i, n in enumerate(lengths) if n != 1), len(shape) - 1)
        if any(lengths[i] != shape[i] for i in range(k + 1, len(shape))):
            return False
    return True


def _chunk_slices(shape: tuple[int, ...],
                  chunks: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    ranges = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape,
                                                                   strict=True))


def _chunk_keys(meta: Mapping[str, Any]) -> list[str]:
    """Keys of every chunk of an array (relative to the array), in C order of its grid.

    ``meta``: the array's ``zarr.json``.
    """
    shape = [int(n) for n in meta["shape"]]
    chunks = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    sep = encoding.get("configuration", {}).get(
        "separator", "/" if encoding["name"] == "default" else ".")
    grid = [range(math.ceil(n / c)) if n else range(0) for n, c in zip(shape, chunks, strict=True)]
    if encoding["name"] == "default":
        return [sep.join(["c", *map(str, idx)]) for idx in itertools.product(*grid)]
    return [sep.join(map(str, idx)) or "0" for idx in itertools.product(*grid)]


def _hash_chunk(h: Any, chunk_key: str, blob: Any | None) -> None:
    """Add one chunk to an array checksum (``None``: no chunk stored, hashed as ``absent``)."""
    h.update(chunk_key.encode() + b"\0")
    if blob is None:
        h.update(b"absent\0")
    else:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)  # hashed where it lies (no concatenated copy)


class _ChunkRecorder(zarr.storage.WrapperStore):
    """A store wrapper that keeps the bytes of chunks written through it, until taken.

    Staging hashes each array's chunks as they are written
    (:class:`_StreamedChecksum`) instead of reading them back from the disk:
    the bytes hashed are the bytes handed to the store, which writes them
    whole or fails. Only chunks of the arrays being :meth:`watch` ed are kept.
    """

    def __init__(self, store: Any, shared: _Recorded | None = None) -> None:
        super().__init__(store)
        self._shared = _Recorded() if shared is None else shared

    def _with_store(self, store: Any) -> _ChunkRecorder:
        return type(self)(store, self._shared)  # the same records (zarr re-wraps stores)

    def watch(self, name: str) -> None:
        """Keep the chunks written under array ``name`` from now on."""
        with self._shared.lock:
            self._shared.watched.add(name + "/")

    def unwatch(self, name: str) -> None:
        """Stop keeping them, and drop any not taken."""
        prefix = name + "/"
        with self._shared.lock:
            self._shared.watched.discard(prefix)
            for key in [k for k in self._shared.chunks if k.startswith(prefix)]:
                del self._shared.chunks[key]

    def take(self, key: str) -> Any | None:
        """The bytes written under ``key`` (None if not recorded), forgotten here."""
        with self._shared.lock:
            return self._shared.chunks.pop(key, None)

    async def set(self, key: str, value: Any) -> None:
        await self._store.set(key, value)
        if key.endswith("zarr.json"):
            return
        with self._shared.lock:
            if any(key.startswith(prefix) for prefix in self._shared.watched):
                self._shared.chunks[key] = value.as_numpy_array()


@dataclass
class _Recorded:
    """What a :class:`_ChunkRecorder` and its re-wrapped copies keep, under one lock."""

    chunks: dict[str, Any] = field(default_factory=dict)
    watched: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _StreamedChecksum:
    """The checksum of one array (as :meth:`ProductStore._array_checksum`), fed as it is written.

    Its chunks must come in C order of the grid, as the regions of
    :func:`_write_regions` write them; :meth:`feed` hashes every chunk
    recorded so far that is next in that order. :meth:`hexdigest` is None
    unless every chunk was hashed this way (then the caller reads the
    array back).
    """

    def __init__(self, recorder: _ChunkRecorder, name: str, raw_meta: bytes) -> None:
        self.recorder, self.name = recorder, name
        self.keys = _chunk_keys(json.loads(raw_meta))
        self.done = 0
        self.h = hashlib.sha256(raw_meta)
        recorder.watch(name)

    def feed(self) -> None:
        while self.done < len(self.keys):
            blob = self.recorder.take(f"{self.name}/{self.keys[self.done]}")
            if blob is None:
                return
            _hash_chunk(self.h, self.keys[self.done], blob)
            self.done += 1

    def hexdigest(self) -> str | None:
        self.feed()
        self.recorder.unwatch(self.name)
        return self.h.hexdigest() if self.done == len(self.keys) else None


def _pid_running(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 probe)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, under another user
        return True
    except OSError:
        return True
    return True


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind == "f" else 0


# -- the store -------------------------------------------------------------------
class ProductStore:
    """Zarr v3 product store on a local folder or object storage.

    Parameters
    ----------
    url
        Root of the store: a path, ``file://`` URL or ``s3://bucket/prefix``.
    storage_options
        fsspec options (for s3fs: ``endpoint_url``, ``key``, ``secret``,
        ``client_kwargs``...).
    """

    def __init__(self, url: str | os.PathLike[str],
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._protocol = "file" if self.local else protocol
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ProductStore({self.url!r})"

    # -- locations -------------------------------------------------------------
    def _path(self, key: str, *parts: str) -> str:
        return posixpath.join(self.root, key, *parts)

    def _url(self, key: str, *parts: str) -> str:
        path = self._path(key, *parts)
        return path if self.local else f"{self._protocol}://{path}"

    def zarr_store(self, key: str, *, read_only: bool = True) -> zarr.abc.store.Store:
        """The zarr store object of a product's group (read-only unless asked)."""
        if self.local:
            # staged once and not read again by this process: chunks past the page cache
            store_type = zarr.storage.LocalStore if read_only else DirectStore
            return store_type(self._path(key, ZARR_NAME), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self._url(key, ZARR_NAME), storage_options=self.storage_options,
            read_only=read_only)

    def fits_path(self, key: str) -> str:
        """Path (local) or URL (object storage) of a product's FITS export."""
        return self._url(key, FITS_NAME)

    def exists(self, key: str) -> bool:
        """Whether anything is stored under ``key``."""
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._path(key)))

    def is_published(self, key: str) -> bool:
        """Whether ``key`` holds a completely published version (its commit marker is there).

        Files under a key without the marker are a publication that failed or
        is still being copied: no reader sees them.
        """
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._path(key, PUBLISHED_NAME)))

    def _require(self, key: str) -> None:
        if not (self.is_published(key) or self._adopt_unmarked(key)):
            raise ProductMissing(key)

    def _adopt_unmarked(self, key: str) -> bool:
        """Make visible a version published before commit markers existed, if it is whole.

        A product folder without the marker is visible only when every byte
        verifies against the checksums recorded in its group at staging time
        (the FITS file and every array): then the marker is written (once) and
        True returned. A partial copy never verifies.
        """
        if not key.startswith("products/"):
            return False
        try:
            recorded = self._json(key, "zarr.json").get("attributes", {}).get("checksums")
            if not recorded:
                return False
            expected = Checksums.from_dict(recorded)
            if self._fits_checksum(key) != expected.fits:
                return False
            if self._array_checksums(key) != expected.arrays:
                return False
        except (OSError, KeyError, ValueError, TypeError):
            return False
        commit = {"key": key, "published": _iso(datetime.now(UTC)),
                  "checksums": expected.to_dict(), "adopted": True}
        try:
            self.fs.pipe_file(self._path(key, PUBLISHED_NAME), json.dumps(commit).encode())
        except OSError:  # a read-only store: visible anyway, verified again next time
            log.warning("could not write the commit marker of %s", key, exc_info=True)
        log.info("adopted %s, published before commit markers, after verifying it", key)
        return True

    # -- writing ---------------------------------------------------------------
    def stage(self, payload: ProductPayload, version: int) -> StagedProduct:
        """Write a product to ``staging/<uuid>/`` and checksum it.

        Parameters
        ----------
        payload
            The product.
        version
            Its version number (reserved in the catalog beforehand); it goes
            into the group attributes and the FITS header.

        Returns
        -------
        StagedProduct
            Where it is and its checksums. Nothing is left behind on failure.
        """
        payload.validate()
        product_key(payload.camera, payload.type, version)
        key = f"staging/{uuid.uuid4().hex}"
        created = datetime.now(UTC)
        marker = {"created": _iso(created), "camera": payload.camera, "type": payload.type,
                  "version": version, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self.fs.makedirs(self._path(key), exist_ok=True)
            self.fs.pipe_file(self._path(key, MARKER_NAME), json.dumps(marker).encode())
            meta = {
                "format": FORMAT_VERSION,
                "camera": payload.camera,
                "type": payload.type,
                "version": int(version),
                "units": payload.main_units,
                "content_key": payload.content_key,
                "code_version": payload.code_version,
                "date_beg": _iso(payload.date_beg) if payload.date_beg else None,
                "date_end": _iso(payload.date_end) if payload.date_end else None,
                "arrays": [a.name for a in payload.arrays],
                "tables": [t.name for t in payload.tables],
                "mask_bits": ({str(int(k)): str(v) for k, v in sorted(payload.mask_bits.items())}
                              if payload.mask_bits else None),
                "created": _iso(created),
            }
            provenance = dict(to_jsonable(payload.provenance))
            provenance.setdefault("code_version", payload.code_version)
            provenance.setdefault("libraries", library_versions())
            provenance.setdefault("host", socket.gethostname())
            provenance["params"] = to_jsonable(payload.params)
            provenance["content_key"] = payload.content_key
            attrs = {META_ATTR: meta, "stats": to_jsonable(payload.stats),
                     "provenance": provenance,
                     "inputs": [{"path": str(i["path"]), "sha256": str(i["sha256"])}
                                for i in payload.inputs]}
            recorder = _ChunkRecorder(self.zarr_store(key, read_only=False))
            group = zarr.open_group(recorder, mode="w-", zarr_format=3, attributes=attrs)
            targets = [self._create_array(group, arr) for arr in payload.arrays]
            if payload.tables:
                tables = group.create_group("tables")
                for table in payload.tables:
                    self._write_table(tables, table)
            # The FITS file needs only the group's metadata (all written by now) and the
            # payload's arrays, not their chunks: it is written on a second thread while
            # this one fills and checksums the chunks (the same bytes either way). Each
            # band this thread reads for the chunks is handed on to the FITS writer
            # (BandStream), so the payload's maps are read once, not once per copy.
            streams = {arr.name: BandStream(target.shape, target.dtype)
                       for arr, target in zip(payload.arrays, targets, strict=True)
                       if _streams_bands(target)}
            sources = {arr.name: streams.get(arr.name, arr.data) for arr in payload.arrays}

            def write_fits() -> str:
                try:
                    return self._write_fits(key, sources)
                finally:  # a failed writer (or one that left a stream unread) stops the reader
                    for stream in streams.values():
                        stream.abort()

            with ThreadPoolExecutor(1, thread_name_prefix="sitiancal-fits") as pool:
                fits_sha = pool.submit(write_fits)
                try:
                    # each array's checksum is hashed from its chunks as they are written
                    hashed: dict[str, str | None] = {}
                    for arr, target in zip(payload.arrays, targets, strict=True):
                        raw = bytes(self.fs.cat_file(self._path(key, ZARR_NAME, arr.name,
                                                                "zarr.json")))
                        checksum = _StreamedChecksum(recorder, arr.name, raw)
                        self._fill_array(target, arr, streams.get(arr.name), checksum)
                        hashed[arr.name] = checksum.hexdigest()
                    arrays = {}
                    for name in self._array_names(key):
                        # the tables' few small chunks are read back
                        arrays[name] = hashed.get(name) or self._array_checksum(key, name)
                        self._settle_array(key, name)
                except StreamAborted:
                    fits_sha.result()  # the FITS writer's own error
                    raise
                except BaseException:
                    for stream in streams.values():
                        stream.abort()
                    fits_sha.cancel()
                    raise
                checksums = Checksums(fits=fits_sha.result(), arrays=arrays)
            group.attrs.update({"checksums": checksums.to_dict()})
        except BaseException:
            self._rm(key)
            raise
        return StagedProduct(key=key, camera=payload.camera, type=payload.type,
                             version=int(version), content_key=payload.content_key,
                             checksums=checksums,
                             shape=(tuple(int(n) for n in payload.arrays[0].data.shape)
                                    if payload.arrays else ()),
                             units=payload.main_units, created=created)

    def _write_fits(self, key: str, sources: dict[str, Any] | None = None) -> str:
        """Write the FITS export of a staged product (streamed); return its sha256.

        ``sources``: the arrays the group was written from (see ``write_fits``).
        """
        from sitiancal.storage.export import write_fits

        if self.local:
            return write_fits(self._open_group(key), self._path(key, FITS_NAME), sources=sources)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sitiancal-fits-") as tmp:
            local = os.path.join(tmp, FITS_NAME)
            sha = write_fits(self._open_group(key), local, sources=sources, settle=False)
            self.fs.put_file(local, self._path(key, FITS_NAME))
        return sha

    def _create_array(self, group: zarr.Group, arr: Any) -> zarr.Array:
        """Create the zarr array of a product array (metadata only; see :meth:`_fill_array`)."""
        shape = tuple(int(n) for n in arr.data.shape)
        dtype = np.dtype(arr.data.dtype)
        return group.create_array(
            arr.name, shape=shape, dtype=dtype, chunks=default_chunks(shape),
            dimension_names=dimension_names(arr), compressors=_compressor(),
            fill_value=_fill_value(dtype), config={"write_empty_chunks": True},
            attributes={"units": arr.units, "long_name": arr.long_name})

    def _fill_array(self, target: zarr.Array, arr: Any, stream: BandStream | None = None,
                    checksum: _StreamedChecksum | None = None) -> None:
        """Write the values of ``arr`` into ``target``, band by band.

        ``stream``: each band is also handed to it (see :func:`_streams_bands`:
        the bands then follow one another in C order), and it is closed at the end.
        ``checksum``: fed the chunks of each band once written (they come in C
        order of the chunk grid).
        """
        shape = tuple(int(n) for n in target.shape)
        if len(shape) == 0:
            target[()] = np.asarray(arr.data[()])
        else:
            for region in _write_regions(shape, tuple(target.chunks), target.dtype.itemsize):
                band = np.asarray(arr.data[region], dtype=target.dtype)
                target[region] = band
                if checksum is not None:
                    checksum.feed()  # this band's chunks, before the next band's arrive
                if stream is not None:
                    stream.put(band)
        if stream is not None:
            stream.close()
        if checksum is not None:
            checksum.feed()

    def _write_table(self, parent: zarr.Group, table: Any) -> None:
        names = list(table.columns)
        group = parent.create_group(table.name, attributes={
            "description": table.description, "columns": names,
            "units": {k: str(v) for k, v in table.units.items()}})
        for name in names:
            values = np.asarray(table.columns[name])
            if values.dtype.kind in "USOT":
                values = values.astype(str).astype(np.dtypes.StringDType())
                dtype: Any = str
                fill: Any = ""
            else:
                dtype = values.dtype
                fill = _fill_value(values.dtype)
            col = group.create_array(
                name, shape=values.shape, dtype=dtype,
                chunks=default_chunks(tuple(values.shape)) or None,
                dimension_names=(f"{table.name}_row",), fill_value=fill,
                config={"write_empty_chunks": True},
                attributes={"units": str(table.units.get(name, ""))})
            if values.size:
                col[...] = values

    def publish(self, staged: StagedProduct, key: str | None = None) -> str:
        """Make a staged product visible at its final key, atomically; return the key.

        A reader sees either no version or the complete one: on a local disk
        the staging folder, commit marker included, is renamed to the final
        key in one ``rename(2)``; on object storage the files are copied to
        the final key and the commit marker (:data:`PUBLISHED_NAME`) is
        written last, and readers require it. If the publication fails midway,
        what was copied to the final key is removed (where the store still
        allows it; otherwise it stays invisible until
        :meth:`sitiancal.storage.catalog.Catalog.sweep_orphans`) and the error
        propagates; the staged files are left for the caller to discard or retry.

        Raises
        ------
        ProductExists
            If anything is stored under the key already.
        ProductMissing
            If the staged product is not (completely) there.
        """
        final = key or staged.final_key
        if self.exists(final):
            raise ProductExists(final)
        src = self._path(staged.key)
        if not self.fs.exists(self._path(staged.key, ZARR_NAME, "zarr.json")):
            raise ProductMissing(staged.key)
        commit = json.dumps({"key": final, "published": _iso(datetime.now(UTC)),
                             "checksums": staged.checksums.to_dict(),
                             "host": socket.gethostname(), "pid": os.getpid()}).encode()
        dst = self._path(final)
        if self.local:
            os.makedirs(posixpath.dirname(dst), exist_ok=True)
            self.fs.pipe_file(self._path(staged.key, PUBLISHED_NAME), commit)
            self.fs.rm(self._path(staged.key, MARKER_NAME))
            try:
                # one atomic step; fails if another publish put files there first
                os.rename(src, dst)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ProductExists(final) from exc
                raise
            return final
        marker = self._path(staged.key, MARKER_NAME)
        sources = sorted(p for p in self.fs.find(src) if p != marker)
        targets = [dst + p[len(src):] for p in sources]
        try:
            self.fs.copy(sources, targets)
            self.fs.pipe_file(self._path(final, PUBLISHED_NAME), commit)  # the commit point
        except BaseException:
            try:
                self._rm(final)
            except Exception:  # the store is failing: the files stay invisible (no marker)
                log.warning("could not remove the partial copy at %s; sweep_orphans will",
                            final, exc_info=True)
            raise
        try:
            self._rm(staged.key)
        except Exception:  # published already; the leftover staging folder is swept later
            log.warning("could not remove %s after publishing %s", staged.key, final,
                        exc_info=True)
        return final

    def discard(self, staged: StagedProduct | str) -> None:
        """Remove a staged product (a no-op if it is gone already)."""
        key = staged.key if isinstance(staged, StagedProduct) else staged
        if not key.startswith("staging/"):
            raise ValueError(f"{key} is not a staging key")
        self._rm(key)

    def delete_orphan(self, key: str) -> None:
        """Remove a published key that the catalog does not reference.

        Only for rolling back a publish whose catalog transaction failed.
        """
        if not key.startswith("products/"):
            raise ValueError(f"{key} is not a product key")
        self._rm(key)

    def _rm(self, key: str) -> None:
        self.fs.invalidate_cache()
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache()

    def list_product_keys(self) -> list[str]:
        """Keys of every product folder (``products/<camera>/<type>/vNNNN``).

        Includes folders without a commit marker (a failed or unfinished
        publication; see :meth:`is_published`), so that a sweep finds them.
        """
        self.fs.invalidate_cache()
        base = self._path("products")
        if not self.fs.exists(base):
            return []
        keys = set()
        for path in self.fs.glob(posixpath.join(base, "*", "*", "v*")):
            keys.add("products/" + path[len(base):].strip("/"))
        return sorted(keys)

    def product_created(self, key: str) -> datetime | None:
        """Creation time recorded in a product group.

        When the group metadata is unreadable (a publication that failed, or
        is still copying, before its ``zarr.json``), the latest modification
        time of the files under ``key``; ``None`` if there are none.
        """
        try:
            meta = json.loads(self.fs.cat_file(self._path(key, ZARR_NAME, "zarr.json")))
            return _parse_iso(meta["attributes"][META_ATTR]["created"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return self._latest_modified(key)

    def _latest_modified(self, key: str) -> datetime | None:
        """Latest modification time (UTC) of the files under ``key``; ``None`` if none."""
        times = []
        self.fs.invalidate_cache()
        for path in self.fs.find(self._path(key)):
            try:
                modified = self.fs.modified(path)
            except (OSError, NotImplementedError):
                continue
            times.append(modified if modified.tzinfo else modified.replace(tzinfo=UTC))
        return max(times) if times else None

    def list_staging(self) -> list[str]:
        """Keys of the staging folders present."""
        self.fs.invalidate_cache()
        base = self._path("staging")
        if not self.fs.exists(base):
            return []
        out = []
        for entry in self.fs.ls(base, detail=True):
            if entry["type"] == "directory":
                out.append("staging/" + posixpath.basename(entry["name"].rstrip("/")))
        return sorted(out)

    def sweep_staging(self, older_than: timedelta, *,
                      now: datetime | None = None) -> list[str]:
        """Remove abandoned staging folders; return their keys.

        A folder is abandoned when it was created more than ``older_than``
        ago, or when its marker names a process of this host that no longer
        runs (a crashed writer: swept at once, whatever its age). Age comes
        from the staging marker; a folder without a readable marker (a crash
        before it was written) is aged by its files' modification time, or
        swept if it has none.
        """
        now = now or datetime.now(UTC)
        removed = []
        for key in self.list_staging():
            created, owner_alive = self._staging_owner(key)
            if created is None or now - created > older_than or owner_alive is False:
                self._rm(key)
                removed.append(key)
        return removed

    def _staging_owner(self, key: str) -> tuple[datetime | None, bool | None]:
        """Creation time of a staging folder and whether its writer still runs.

        The second item is ``None`` when that cannot be told (no marker, or a
        writer on another host).
        """
        try:
            marker = json.loads(self.fs.cat_file(self._path(key, MARKER_NAME)))
            created = _parse_iso(marker["created"])
        except (OSError, ValueError, KeyError, TypeError):
            marker, created = None, None
        if marker is not None and created is not None:
            alive = None
            if marker.get("host") == socket.gethostname() and isinstance(marker.get("pid"), int):
                alive = _pid_running(marker["pid"])
            return created, alive
        return self._latest_modified(key), None

    # -- reading ---------------------------------------------------------------
    def _open_group(self, key: str) -> zarr.Group:
        return zarr.open_group(self.zarr_store(key, read_only=True), mode="r", zarr_format=3,
                               use_consolidated=False)

    def open_zarr(self, key: str) -> zarr.Group:
        """The product's zarr group, read-only."""
        self._require(key)
        return self._open_group(key)

    def open_dataset(self, key: str) -> Any:
        """The product's arrays as a lazy ``xarray.Dataset`` (tables: :meth:`read_table`)."""
        import xarray as xr

        self._require(key)
        return xr.open_zarr(self.zarr_store(key, read_only=True), consolidated=False,
                            zarr_format=3)

    def read_region(self, key: str, array: str, ys: slice = slice(None),
                    xs: slice = slice(None)) -> np.ndarray:
        """Read ``array[ys, xs]`` of a product, touching only the chunks it overlaps."""
        group = self.open_zarr(key)
        if array not in group.array_keys():
            raise KeyError(f"product {key} has no array {array!r}; it has "
                           f"{sorted(group.array_keys())}")
        return np.asarray(group[array][ys, xs])

    def read_table(self, key: str, name: str) -> dict[str, np.ndarray]:
        """Columns of a product table, in their stored order."""
        group = self.open_zarr(key)
        try:
            table = group["tables"][name]
        except KeyError as exc:
            raise KeyError(f"product {key} has no table {name!r}") from exc
        out = {}
        for col in table.attrs["columns"]:
            values = np.asarray(table[col][...])
            out[col] = (np.array(values.tolist(), dtype=np.str_) if values.dtype.kind == "T"
                        else values)
        return out

    def fits_bytes(self, key: str) -> bytes:
        """The stored FITS export of a product."""
        self._require(key)
        try:
            return bytes(self.fs.cat_file(self._path(key, FITS_NAME)))
        except FileNotFoundError as exc:
            raise ProductMissing(key) from exc

    def open_fits(self, key: str) -> IO[bytes]:
        """A binary file object on the stored FITS export (for streaming)."""
        self._require(key)
        try:
            return self.fs.open(self._path(key, FITS_NAME), "rb")
        except FileNotFoundError as exc:
            raise ProductMissing(key) from exc

    # -- checksums ---------------------------------------------------------------
    def _json(self, key: str, *parts: str) -> dict[str, Any]:
        return dict(json.loads(self.fs.cat_file(self._path(key, ZARR_NAME, *parts))))

    def _array_names(self, key: str) -> list[str]:
        """Paths of the product's arrays in its group, from the group attributes."""
        meta = self._json(key, "zarr.json")["attributes"][META_ATTR]
        names = list(meta["arrays"])
        for table in meta.get("tables") or []:
            attrs = self._json(key, "tables", table, "zarr.json")["attributes"]
            names += [f"tables/{table}/{col}" for col in attrs["columns"]]
        return sorted(names)

    def _array_checksums(self, key: str) -> dict[str, str | None]:
        """sha256 of each array (``None`` where its metadata cannot be read)."""
        out: dict[str, str | None] = {}
        for name in self._array_names(key):
            try:
                out[name] = self._array_checksum(key, name)
            except (FileNotFoundError, KeyError, ValueError):
                out[name] = None
        return out

    def _settle_array(self, key: str, name: str) -> None:
        """Write a local array's chunk files back to disk and drop them from the page cache.

        Called once the array is checksummed, the last time this process reads
        it (see ``storage.export.settle_file``). A no-op for remote stores.
        """
        if not self.local:
            return
        from sitiancal.storage.export import settle_file

        for folder, _, files in os.walk(self._path(key, ZARR_NAME, name)):
            for file in files:
                settle_file(os.path.join(folder, file))

    def _array_checksum(self, key: str, name: str) -> str:
        """sha256 of an array's ``zarr.json`` and its stored chunks in C order of the grid.

        Read with fsspec alone (not through zarr), so the bytes hashed are the
        bytes stored; a missing chunk hashes as ``absent``.
        """
        base = self._path(key, ZARR_NAME, name)
        raw = bytes(self.fs.cat_file(posixpath.join(base, "zarr.json")))
        chunk_keys = _chunk_keys(json.loads(raw))
        h = hashlib.sha256()
        h.update(raw)
        for start in range(0, len(chunk_keys), _HASH_BATCH):
            batch = chunk_keys[start:start + _HASH_BATCH]
            paths = [posixpath.join(base, k) for k in batch]
            blobs = self._cat(paths)
            for ckey, path in zip(batch, paths, strict=True):
                _hash_chunk(h, ckey, blobs.get(path))
        return h.hexdigest()

    def _cat(self, paths: list[str]) -> dict[str, Any]:
        """The bytes of the files ``paths`` that exist (``fs.cat`` with ``on_error="omit"``).

        Local chunk files of a megabyte or more are read with ``O_DIRECT``
        (:func:`storage.direct.read_direct`): the checksum reads a staged
        product once, and through the page cache every byte would fill a newly
        allocated cache page (the cost ``storage.direct`` describes).
        """
        if not self.local:
            return self.fs.cat(paths, on_error="omit")
        out: dict[str, Any] = {}
        rest: list[str] = []
        for path in paths:
            try:
                data = read_direct(path)
            except (OSError, FrameReadError):
                data = None
            if data is None:
                rest.append(path)
            else:
                out[path] = data
        if rest:
            out.update(self.fs.cat(rest, on_error="omit"))
        return out

    def compute_checksums(self, key: str) -> Checksums:
        """Recompute the checksums of a stored product from its bytes.

        Raises ``ProductMissing`` if the FITS file or an array is missing.
        """
        self._require(key)
        arrays = self._array_checksums(key)
        missing = sorted(name for name, sha in arrays.items() if sha is None)
        if missing:
            raise ProductMissing(f"{key}/{ZARR_NAME}/{missing[0]}")
        return Checksums(fits=self._fits_checksum(key),
                         arrays={k: v for k, v in arrays.items() if v is not None})

    def _fits_checksum(self, key: str) -> str | None:
        h = hashlib.sha256()
        try:
            with self.fs.open(self._path(key, FITS_NAME), "rb") as fobj:
                for block in iter(lambda: fobj.read(8 * 1024 * 1024), b""):
                    h.update(block)
        except FileNotFoundError:
            return None
        return h.hexdigest()

    def verify(self, key: str, checksums: Checksums | Mapping[str, Any] | None = None
               ) -> VerifyReport:
        """Recompute a product's checksums and compare them with the expected ones.

        Parameters
        ----------
        key
            Product key.
        checksums
            Expected checksums (from the catalog); default: those recorded in
            the group attributes when it was staged.
        """
        self._require(key)
        if checksums is None:
            checksums = self._json(key, "zarr.json").get("attributes", {}).get("checksums")
            if checksums is None:
                return VerifyReport(key, False, (), ("no checksums recorded with the group",))
        expected = (checksums if isinstance(checksums, Checksums)
                    else Checksums.from_dict(checksums))
        problems: list[str] = []
        fits_sha = self._fits_checksum(key)
        arrays = self._array_checksums(key)
        if fits_sha is None:
            problems.append(f"{FITS_NAME}: missing")
        elif fits_sha != expected.fits:
            problems.append(f"{FITS_NAME}: sha256 {fits_sha} != expected {expected.fits}")
        for name in sorted(set(expected.arrays) | set(arrays)):
            want, got = expected.arrays.get(name), arrays.get(name)
            if want is None:
                problems.append(f"array {name}: not in the expected checksums")
            elif got is None:
                problems.append(f"array {name}: missing")
            elif want != got:
                problems.append(f"array {name}: sha256 {got} != expected {want}")
        checked = (FITS_NAME, *sorted(arrays))
        return VerifyReport(key, not problems, checked, tuple(problems))
