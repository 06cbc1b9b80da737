"""Frame cubes: the accepted frames of a dataset in one zarr v3 group.

Layout (see docs/architecture.md, "Cube contract")::

    frames              (frame, y, x)  uint16, chunks (1, ty, tx), blosc zstd-1 + bitshuffle
    frame_type, exptime, temperature, time, level, file, sha256   (frame,) coordinates
    frame_mean, frame_median, frame_clipped_mean, frame_clipped_std, center_mean  (frame,)
    row_mean            (frame, y)
    col_mean            (frame, x)

Frames are ordered bias, dark, flat, then by exposure time, then by time. Every
file is read once: its bytes are hashed and parsed from the same buffer, the
pixels are written into their region of the pre-created array and the per-frame
statistics are computed while the frame is in memory. A cube is usable only once
its ``complete`` attribute has been set, which happens last.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dask
import dask.array as da
import numba
import numpy as np
import xarray as xr
import zarr
from dask.callbacks import Callback
from zarr.codecs import BloscCodec

from sitiancal import __version__
from sitiancal.storage.frames import FrameReadError, read_file_bytes, read_frame_bytes
from sitiancal.storage.scan import FrameRecord, FrameType, Inventory

#: Chunk shape aimed at (rows, columns): ~4.5 MB uint16 chunks, tasks of >~100 ms.
TILE_TARGET = (1600, 1400)
#: A divisor tile is accepted when within this factor of the target.
TILE_TOLERANCE = 1.5
#: Clipping half-width in robust standard deviations for frame_clipped_*.
CLIP_SIGMA = 3.0
#: MAD to Gaussian standard deviation, 1 / Phi^-1(3/4) (as astropy.stats.mad_std).
MAD_TO_SIGMA = 1.482602218505602
#: Format tag and version written in the group attributes.
CUBE_FORMAT = "sitiancal-cube"
CUBE_FORMAT_VERSION = 1

_TYPE_ORDER = {FrameType.BIAS: 0, FrameType.DARK: 1, FrameType.FLAT: 2}
_KEY_PREFIX = "sitiancal-cube-frame"

ProgressCallback = Callable[[int, int], None]


class CubeError(ValueError):
    """A cube cannot be built or opened; ``reason`` says why."""

    def __init__(self, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        super().__init__(store, reason)

    def __str__(self) -> str:
        return f"{self.store}: {self.reason}"


# ----------------------------------------------------------------------------- tiles


def _axis_tile(n: int, target: int) -> int:
    """Tile length for an axis of ``n`` pixels: an exact divisor near ``target`` if any."""
    if n <= target:
        return n
    best: tuple[float, int] | None = None
    for k in range(1, n + 1):
        if n % k:
            continue
        t = n // k
        if t < target / TILE_TOLERANCE:
            break
        distance = abs(math.log(t / target))
        if t <= target * TILE_TOLERANCE and (best is None or distance < best[0]):
            best = (distance, t)
    if best is not None:
        return best[1]
    return -(-n // max(1, round(n / target)))  # near-even split with a short last tile


def choose_tile(ny: int, nx: int, target: tuple[int, int] = TILE_TARGET) -> tuple[int, int]:
    """Chunk shape ``(ty, tx)`` for ``(ny, nx)`` frames.

    Each axis gets the exact divisor of its length closest (in ratio) to the
    target, within a factor :data:`TILE_TOLERANCE`; without one, a near-even
    split. Axes no longer than the target are one tile.

    Examples
    --------
    >>> choose_tile(6388, 9576)
    (1597, 1368)
    >>> choose_tile(24, 40)
    (24, 40)
    """
    return _axis_tile(int(ny), int(target[0])), _axis_tile(int(nx), int(target[1]))


# ----------------------------------------------------------------------------- statistics


@numba.njit(nogil=True, cache=True)
def _frame_pass(frame: np.ndarray, r0: int, r1: int, c0: int, c1: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover - numba
    """One pass over a uint16 frame: value histogram, row sums, column sums, box sum."""
    ny, nx = frame.shape
    hist = np.zeros(65536, dtype=np.int64)
    rows = np.zeros(ny, dtype=np.int64)
    cols = np.zeros(nx, dtype=np.int64)
    box = 0
    for i in range(ny):
        s = 0
        for j in range(nx):
            v = frame[i, j]
            hist[v] += 1
            s += v
            cols[j] += v
        rows[i] = s
        if r0 <= i < r1:
            for j in range(c0, c1):
                box += frame[i, j]
    return hist, rows, cols, box


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    """Median (numpy convention) of data given as sorted ``values`` with ``counts``."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    lo = values[np.searchsorted(cum, (n - 1) // 2, side="right")]
    hi = values[np.searchsorted(cum, n // 2, side="right")]
    return 0.5 * (float(lo) + float(hi))


@dataclass(frozen=True)
class FrameStats:
    """Statistics of one frame (ADU).

    ``median`` is exact (from the full value histogram); ``clipped_mean`` and
    ``clipped_std`` (ddof 0) are over the pixels within ``CLIP_SIGMA`` robust
    sigma (1.4826 MAD) of the median, one clipping pass, on the full frame;
    ``center_mean`` is the mean of the central box of half the width and height.
    """

    mean: float
    median: float
    clipped_mean: float
    clipped_std: float
    center_mean: float
    row_mean: np.ndarray
    col_mean: np.ndarray

    def to_dict(self) -> dict[str, float]:
        """Scalar statistics as a JSON-able dict."""
        return {"mean": self.mean, "median": self.median, "clipped_mean": self.clipped_mean,
                "clipped_std": self.clipped_std, "center_mean": self.center_mean}


def center_box(ny: int, nx: int) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of the central box of half the height and half the width."""
    h, w = max(1, ny // 2), max(1, nx // 2)
    r0, c0 = (ny - h) // 2, (nx - w) // 2
    return r0, r0 + h, c0, c0 + w


def frame_statistics(frame: np.ndarray, *, nsigma: float = CLIP_SIGMA) -> FrameStats:
    """Per-frame statistics in one compiled pass over the pixels.

    Parameters
    ----------
    frame
        ``(ny, nx)`` uint16 or uint8 counts (ADU).
    nsigma
        Clipping half-width in robust standard deviations.

    Notes
    -----
    A single pass builds the 65536-bin value histogram together with row,
    column and central-box sums, so the median, the MAD and the clipped moments
    are exact on the full frame and cost O(65536) afterwards. The numpy route
    (``np.median`` plus masked moments) needs several passes and frame-sized
    temporaries; this kernel is tested against numpy and astropy.
    """
    frame = np.ascontiguousarray(frame, dtype=np.uint16)
    ny, nx = frame.shape
    r0, r1, c0, c1 = center_box(ny, nx)
    hist, rows, cols, box = _frame_pass(frame, r0, r1, c0, c1)
    values = np.flatnonzero(hist)
    counts = hist[values]
    n = int(counts.sum())
    mean = float(rows.sum()) / n
    median = _weighted_median(values, counts)
    dev2 = np.abs(2 * values - round(2 * median))          # |v - median| on a half-ADU grid
    order = np.argsort(dev2, kind="stable")
    mad = 0.5 * _weighted_median(dev2[order], counts[order])
    half = nsigma * MAD_TO_SIGMA * mad
    keep = (values >= median - half) & (values <= median + half)
    v, c = values[keep].astype(np.float64), counts[keep].astype(np.float64)
    clipped_mean = float(np.dot(v, c) / c.sum())
    clipped_std = float(np.sqrt(np.dot(c, (v - clipped_mean) ** 2) / c.sum()))
    return FrameStats(
        mean=mean, median=median, clipped_mean=clipped_mean, clipped_std=clipped_std,
        center_mean=float(box) / ((r1 - r0) * (c1 - c0)),
        row_mean=rows / nx, col_mean=cols / ny,
    )


# ----------------------------------------------------------------------------- build


def cube_order(frames: Sequence[FrameRecord]) -> list[FrameRecord]:
    """Frames in cube order: bias, dark, flat; then exposure time; then time; then path."""
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(frames, key=lambda r: (_TYPE_ORDER[r.type], r.exptime, r.time or far, r.path))


def exposure_levels(frames: Sequence[FrameRecord]) -> np.ndarray:
    """Index of each frame's exposure-time group within its type (times rounded to 1 us)."""
    groups: dict[FrameType, list[float]] = {}
    for r in frames:
        groups.setdefault(r.type, []).append(round(r.exptime, 6))
    index = {t: {e: i for i, e in enumerate(sorted(set(v)))} for t, v in groups.items()}
    return np.array([index[r.type][round(r.exptime, 6)] for r in frames], dtype=np.int64)


@dataclass(frozen=True)
class _Ingested:
    index: int
    sha256: str
    stats: FrameStats


class _BufferPool:
    """File buffers reused by the frame tasks of one build (local schedulers only).

    A task takes a buffer, reads its file into it and gives it back when done, so
    at most one buffer per running task exists and the pages are faulted in once
    per thread instead of once per frame. The pool dies with the build.
    """

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

    def take(self) -> np.ndarray | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def give(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


def _ingest_frame(store: str, storage_options: dict[str, Any] | None, index: int, path: str,
                  hdu: int, shape: tuple[int, int], pool: _BufferPool | None = None
                  ) -> _Ingested:
    """Read one file once, write its pixels into ``frames[index]``, return its statistics."""
    buf = read_file_bytes(path, buffer=pool.take() if pool is not None else None)
    try:
        digest = hashlib.sha256(buf).hexdigest()
        frame = read_frame_bytes(buf, hdu, name=path)   # in place: aliases buf
        if frame.shape != tuple(shape):
            raise FrameReadError(path, f"shape {frame.shape} differs from the cube's "
                                       f"{tuple(shape)}")
        if frame.dtype != np.uint16:
            frame = frame.astype(np.uint16)
        array = zarr.open_array(store, path="frames", mode="r+",
                                storage_options=storage_options,
                                config={"write_empty_chunks": True})
        array[index] = frame
        stats = frame_statistics(frame)
    finally:
        if pool is not None:
            pool.give(buf.base if buf.base is not None else buf)
    return _Ingested(index, digest, stats)


class _Progress(Callback):
    """Counts finished frame tasks of a local dask scheduler."""

    def __init__(self, progress: ProgressCallback | None, total: int, prefix: str) -> None:
        super().__init__()
        self.progress, self.total, self.done, self.prefix = progress, total, 0, prefix

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        # Callbacks are global to the process: count only this build's keys.
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(self.prefix):
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)


def _is_client(scheduler: Any) -> bool:
    return hasattr(scheduler, "compute") and hasattr(scheduler, "submit")


def _run_tasks(tasks: list[Any], prefix: str, scheduler: Any, max_workers: int | None,
               progress: ProgressCallback | None) -> list[_Ingested]:
    total = len(tasks)
    if progress is not None:
        progress(0, total)
    if _is_client(scheduler):
        from distributed import as_completed

        futures = scheduler.compute(tasks)
        results = []
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                results.append(future.result())
                if progress is not None:
                    progress(done, total)
        except BaseException:
            scheduler.cancel(futures)
            raise
        return results
    workers = max_workers or min(os.cpu_count() or 1, 8)
    with _Progress(progress, total, prefix):
        return list(dask.compute(*tasks, scheduler=scheduler or "threads", num_workers=workers))


def _template(records: list[FrameRecord], inventory: Inventory, tile: tuple[int, int]
              ) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """The cube with lazy placeholders for everything written later."""
    n = len(records)
    ny, nx = inventory.shape  # type: ignore[misc]
    times = np.array([np.datetime64(r.time.astimezone(UTC).replace(tzinfo=None), "ns")
                      if r.time is not None else np.datetime64("NaT", "ns") for r in records],
                     dtype="datetime64[ns]")
    nan = np.full(n, np.nan)
    per_frame = ("frame",)
    attrs_adu = {"units": "ADU"}
    ds = xr.Dataset(
        data_vars={
            "frames": (("frame", "y", "x"),
                       da.zeros((n, ny, nx), dtype=np.uint16, chunks=(1, *tile)),
                       {"units": "ADU", "long_name": "raw counts"}),
            "frame_mean": (per_frame, nan, {**attrs_adu, "long_name": "mean of the frame"}),
            "frame_median": (per_frame, nan.copy(),
                             {**attrs_adu, "long_name": "median of the frame (exact)"}),
            "frame_clipped_mean": (per_frame, nan.copy(), {
                **attrs_adu, "long_name": f"mean within {CLIP_SIGMA:g} robust sigma "
                                          "(1.4826 MAD) of the median, one pass"}),
            "frame_clipped_std": (per_frame, nan.copy(), {
                **attrs_adu, "long_name": "standard deviation (ddof 0) of the same pixels"}),
            "center_mean": (per_frame, nan.copy(), {
                **attrs_adu, "long_name": "mean of the central half-height, half-width box"}),
            "row_mean": (("frame", "y"), da.full((n, ny), np.nan, chunks=(_rows(n, ny), ny)),
                         {**attrs_adu, "long_name": "mean of each row"}),
            "col_mean": (("frame", "x"), da.full((n, nx), np.nan, chunks=(_rows(n, nx), nx)),
                         {**attrs_adu, "long_name": "mean of each column"}),
        },
        coords={
            "frame_type": (per_frame, np.array([r.type.value for r in records], dtype=object)),
            "exptime": (per_frame, np.array([r.exptime for r in records]),
                        {"units": "s", "long_name": "exposure time"}),
            "temperature": (per_frame, np.array([np.nan if r.temperature is None
                                                 else r.temperature for r in records]),
                            {"units": "deg C", "long_name": "sensor temperature"}),
            "time": (per_frame, times, {"long_name": "start of exposure (UTC)"}),
            "level": (per_frame, exposure_levels(records),
                      {"long_name": "index of the exposure-time group within the frame type"}),
            "file": (per_frame, np.array([r.path for r in records], dtype=object)),
            "sha256": (per_frame, np.array([""] * n, dtype=object)),
        },
        attrs={
            "format": CUBE_FORMAT, "format_version": CUBE_FORMAT_VERSION,
            "source": inventory.source, "operating_state": inventory.operating_state,
            "shape": [ny, nx], "tile": list(tile), "counts": dict(inventory.counts),
            "created": datetime.now(UTC).isoformat(), "sitiancal_version": __version__,
            "complete": False,
        },
    )
    encoding = {
        "frames": {"chunks": (1, *tile), "compressors": (
            BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=2),)},
        "row_mean": {"chunks": (_rows(n, ny), ny)},
        "col_mean": {"chunks": (_rows(n, nx), nx)},
        "time": {"units": "microseconds since 1970-01-01", "calendar": "proleptic_gregorian",
                 "dtype": "int64"},
    }
    return ds, encoding


def _rows(n: int, width: int) -> int:
    """Frames per chunk of a (frame, width) float64 array: at most ~32 MB per chunk."""
    return max(1, min(n, (1 << 22) // max(width, 1)))


def _store_key(store: Any) -> str:
    return os.fspath(store) if isinstance(store, os.PathLike) else str(store)


def _check_target(store: str, storage_options: dict[str, Any] | None) -> None:
    """Refuse to overwrite anything that is not a zarr store."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store, **(storage_options or {}))
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise CubeError(store, "exists and is a file, not a zarr store")
    if fs.ls(root) and not fs.exists(f"{root.rstrip('/')}/zarr.json"):
        raise CubeError(store, "exists, is not empty and is not a zarr store; "
                               "refusing to overwrite it")


def build_cube(inventory: Inventory, store: str | os.PathLike[str], *,
               tile: tuple[int, int] | None = None, progress: ProgressCallback | None = None,
               scheduler: Any = None, max_workers: int | None = None,
               storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Write the accepted frames of ``inventory`` into a zarr v3 cube at ``store``.

    Parameters
    ----------
    inventory
        A scan result; its ``frames`` are written in cube order (bias, dark,
        flat; exposure time; time).
    store
        Local path or fsspec URL of the zarr group. An existing cube there is
        replaced; anything else that exists is refused.
    tile
        Chunk shape ``(ty, tx)``; default :func:`choose_tile`.
    progress
        ``progress(done, total)`` called as frames are written.
    scheduler
        A dask scheduler name (default ``"threads"``), a ``get`` function, or a
        ``distributed.Client`` (its workers must see the files and the store).
    max_workers
        Threads of the local scheduler (default ``min(cpu_count, 8)``).
    storage_options
        fsspec options for a URL store.

    Returns
    -------
    xarray.Dataset
        The cube, opened lazily (:func:`open_cube`).

    Raises
    ------
    CubeError
        No frames, unreadable frames, or a store that cannot be written.

    Notes
    -----
    One dask task per frame reads the file's bytes once into a buffer reused
    across the build's tasks, hashes them, converts the pixels in place (16-bit
    data need no second frame-sized array), writes them by region into the
    pre-created ``frames`` array and returns only the per-frame statistics
    (~130 kB at 61 MP). Memory is bounded by the number of threads, not frames:
    per thread one file buffer plus zarr's per-chunk encode buffers, about 1.8x
    the file size, i.e. ~0.2-0.25 GB per thread at 61 MP (122 MB files),
    ~2 GB with 8 threads (measured: +430 MB peak RSS for 2 threads).
    """
    key = _store_key(store)
    if not inventory.frames or inventory.shape is None:
        raise CubeError(key, "the inventory holds no accepted frame")
    records = cube_order(inventory.frames)
    ny, nx = inventory.shape
    bad = [r.path for r in records if tuple(r.shape) != (ny, nx)]
    if bad:
        raise CubeError(key, f"frames of another shape than {ny} x {nx}: {', '.join(bad[:3])}")
    tile = tuple(tile) if tile is not None else choose_tile(ny, nx)  # type: ignore[assignment]
    _check_target(key, storage_options)
    template, encoding = _template(records, inventory, tile)  # type: ignore[arg-type]
    try:
        template.to_zarr(key, mode="w", compute=False, zarr_format=3, consolidated=False,
                         encoding=encoding, storage_options=storage_options)
    except (OSError, ValueError) as exc:
        raise CubeError(key, f"cannot create the cube: {exc}") from None

    pool = None if _is_client(scheduler) or scheduler == "processes" else _BufferPool()
    prefix = f"{_KEY_PREFIX}-{uuid.uuid4().hex}-"
    tasks = [dask.delayed(_ingest_frame, pure=False)(
        key, storage_options, i, r.path, r.hdu, (ny, nx), pool,
        dask_key_name=f"{prefix}{i}") for i, r in enumerate(records)]
    try:
        results = _run_tasks(tasks, prefix, scheduler, max_workers, progress)
    except FrameReadError as exc:
        raise CubeError(key, f"cannot read frame {exc.path}: {exc.reason}") from None
    except OSError as exc:
        raise CubeError(key, f"cannot write the cube: {exc}") from None

    results.sort(key=lambda r: r.index)
    group = zarr.open_group(key, mode="r+", storage_options=storage_options)
    for name, attr in (("frame_mean", "mean"), ("frame_median", "median"),
                       ("frame_clipped_mean", "clipped_mean"),
                       ("frame_clipped_std", "clipped_std"), ("center_mean", "center_mean")):
        group[name][:] = np.array([getattr(r.stats, attr) for r in results])
    group["row_mean"][:] = np.stack([r.stats.row_mean for r in results])
    group["col_mean"][:] = np.stack([r.stats.col_mean for r in results])
    group["sha256"][:] = np.array([r.sha256 for r in results], dtype=object)
    group.attrs.update({"complete": True, "completed": datetime.now(UTC).isoformat()})
    return open_cube(key, storage_options=storage_options)


def open_cube(store: str | os.PathLike[str], *,
              storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a complete cube lazily (dask arrays with the zarr chunks).

    Raises
    ------
    CubeError
        ``store`` holds no cube, or a cube whose build did not finish.
    """
    key = _store_key(store)
    try:
        group = zarr.open_group(key, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError
            ) as exc:
        raise CubeError(key, f"no cube here ({type(exc).__name__})") from None
    if group.attrs.get("format") != CUBE_FORMAT:
        raise CubeError(key, "not a sitiancal cube (no 'format' attribute)")
    if group.attrs.get("complete") is not True:
        raise CubeError(key, "incomplete cube: its build did not finish; build it again")
    return xr.open_zarr(key, consolidated=False, chunks={}, zarr_format=3,
                        storage_options=storage_options)
