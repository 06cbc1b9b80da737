"""The calibration job: scan, cube, plan, tile pass, products, publish.

This is the one code path behind ``sitiancal calibrate`` and the service's
jobs. Each stage reports progress through a ``progress(stage, fraction)``
callback and can be cancelled between tasks through a ``cancelled()`` check.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from threadpoolctl import threadpool_limits

from sitiancal.compute.allocator import keep_freed_memory
from sitiancal.compute.graph import (
    ASSEMBLY_BYTES_PER_PIXEL,
    TileReader,
    build_tile_graph,
    row_band_tile,
    staggered_bands,
    sum_partials,
    tile_concurrency,
    tile_task_bytes,
)
from sitiancal.compute.plan import FrameTable, PlanResult, central_window, make_plan
from sitiancal.compute.products import (
    PRODUCT_BYTES_PER_PIXEL,
    PRODUCT_TYPES,
    ProductContent,
    assemble_products,
)
from sitiancal.compute.tile import CalibrationParams, TileResult, expected_maps
from sitiancal.service.settings import Settings
from sitiancal.storage.cube import ZarrFrameReader, cube_layout, frame_reader, plan_window_reader
from sitiancal.storage.direct import DirectStore

log = logging.getLogger(__name__)

#: ``progress(stage, fraction)``: fraction of the whole job done, 0..1.
StageProgress = Callable[[str, float], None]


class JobCancelled(RuntimeError):
    """The job was cancelled; nothing it computed is published."""


@dataclass
class ProductsOutcome:
    """What the compute stages of a job produced."""

    products: dict[str, ProductContent]
    missing: dict[str, str]
    planned: PlanResult
    timings: dict[str, float] = field(default_factory=dict)


def frame_table(ds: xr.Dataset) -> FrameTable:
    """Per-frame metadata and statistics of a cube as a :class:`FrameTable`."""
    times = ds["time"].values
    if np.issubdtype(times.dtype, np.datetime64):
        valid = ~np.isnat(times)
        t0 = times[valid].min() if valid.any() else None
        time_s = np.where(valid, (times - t0) / np.timedelta64(1, "s") if t0 is not None else np.nan,
                          np.nan).astype(np.float64)
    else:
        time_s = np.full(ds.sizes["frame"], np.nan)
    temperature = ds["temperature"].values.astype(np.float64) if "temperature" in ds else np.full(ds.sizes["frame"], np.nan)
    return FrameTable(
        frame_type=_strings(ds["frame_type"].values),
        exptime=ds["exptime"].values.astype(np.float64),
        time_s=time_s,
        frame_mean=ds["frame_mean"].values.astype(np.float64),
        frame_clipped_mean=ds["frame_clipped_mean"].values.astype(np.float64),
        center_mean=ds["center_mean"].values.astype(np.float64),
        temperature=temperature,
        row_mean=ds["row_mean"].values.astype(np.float64) if "row_mean" in ds else None,
        file=_strings(ds["file"].values) if "file" in ds else None,
        frame_clipped_std=ds["frame_clipped_std"].values.astype(np.float64)
        if "frame_clipped_std" in ds else None,
    )


def _strings(values: np.ndarray) -> np.ndarray:
    """A fixed-width unicode array from any string array (zarr 3 returns StringDType)."""
    return np.array([str(v) for v in values], dtype=str)


#: Tile reader of a copy cube's ``frames`` array; ``storage.cube.frame_reader`` picks
#: the reader for a cube's layout (copy or virtual).
CubeReader = ZarrFrameReader


class ZarrMapSink:
    """``TileSink`` writing each tile's maps into pre-created zarr arrays.

    Tiles align with the chunks, so concurrent tasks never write the same chunk.
    Works with threads and with distributed workers sharing the work folder.
    """

    def __init__(self, path: str | Path, *, shape: tuple[int, int], tile: tuple[int, int],
                 expected: Mapping[str, tuple[int, ...]]) -> None:
        self.path = str(path)
        group = zarr.open_group(DirectStore(self.path), mode="w")
        # Scratch maps are stored uncompressed. Noisy float32 maps compress by only
        # ~1.3x, and the assembly reads each map several times: with zstd level 1
        # the decoding alone took ~37 core-s of a 61 MP job (0.5 s per map read),
        # competing with the assembly for the cores; uncompressed reads are copies
        # from the page cache. Cost: ~0.25 GB of scratch disk per 61 MP map, for
        # the duration of the job. A stack of maps (the linearity residual of each
        # level) has one level per chunk: its product reads it level by level, and
        # a chunk holding every level was read whole for each (7.8 GB read for a
        # 0.74 GB stack of 3 levels, 300-frame 61 MP job; measured). Their chunks
        # are written and read past the page cache (``DirectStore``): 300 frames at
        # 61 MP, cold cache, old and new alternating: 107.1, 105.4 -> 99.3, 99.6 s
        # end to end, 184.4, 182.0 -> 171.1, 171.0 busy core-s.
        for name, lead in expected.items():
            group.create_array(name, shape=lead + shape, chunks=(1,) * len(lead) + tile,
                               dtype="float32", fill_value=np.nan, compressors=None)

    def __call__(self, ys: slice, xs: slice, result: TileResult) -> None:
        group = zarr.open_group(DirectStore(self.path), mode="r+")
        for name, tile_map in result.maps.items():
            # Every chunk is written, all-NaN ones too (a runtime setting, not
            # stored): zarr's default first compares each chunk with the fill value
            # (np.array_equal with NaNs, two isnan passes over it; seen in py-spy's
            # profile of a job), and an unwritten chunk reads as the same NaNs.
            group[name].with_config({"write_empty_chunks": True})[..., ys, xs] = tile_map

    def maps(self) -> dict[str, zarr.Array]:
        """The assembled maps, as lazily read zarr arrays."""
        group = zarr.open_group(DirectStore(self.path, read_only=True), mode="r")
        return {name: group[name] for name in group.array_keys()}


def _region_reader(reader: TileReader, cube_store: str, attrs: Mapping[str, Any],
                   shape: tuple[int, int], side: int) -> Callable[[Sequence[int]], np.ndarray]:
    """``read(indices)``: the central ``side`` x ``side`` region of frames (plan stage).

    From the copy of the region a virtual cube's build kept (one small
    compressed array, instead of the region's full-width rows of every frame
    from the disk again: ~6 GB for 300 frames at 61 MP) where it kept this
    region; from the frames otherwise.
    """
    ys, xs = central_window(shape, side)
    kept = plan_window_reader(cube_store, attrs, ys, xs)
    return kept if kept is not None else (lambda indices: reader(indices, ys, xs))


#: BLAS threads of a job's own calls (plan fits, population mixtures, spline
#: systems): all small, and OpenBLAS's idle workers spin for a while after each
#: call, on the cores the compiled kernels and the writer thread need (~3
#: core-s of a 300-frame 61 MP job, measured with ``perf``; the products stage
#: 25.1 -> 24.2 s with one thread).
_JOB_BLAS_THREADS = 1


@threadpool_limits.wrap(limits=_JOB_BLAS_THREADS, user_api="blas")
def compute_products(ds: xr.Dataset, cube_store: str, workdir: str | Path, *,
                     params: CalibrationParams | None = None,
                     wanted: Sequence[str] = PRODUCT_TYPES,
                     client: object | None = None,
                     progress: StageProgress | None = None,
                     cancelled: Callable[[], bool] | None = None,
                     span: tuple[float, float] = (0.0, 1.0),
                     emit: Callable[[ProductContent], None] | None = None,
                     on_plan: Callable[[PlanResult], None] | None = None,
                     memory_limit: int | None = None,
                     cores: int | None = None,
                     direct: bool = False) -> ProductsOutcome:
    """Run the plan stage, the tile pass and product assembly on a cube.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube (``storage.cube.open_cube``).
    cube_store : str
        Location of the cube; the tile tasks read it through
        ``storage.cube.frame_reader`` (either layout).
    workdir : path
        Scratch folder for the per-pixel maps (removed by the caller).
    params : CalibrationParams
        Job parameters (defaults if None).
    wanted : sequence of str
        Product types to build.
    client : distributed.Client or None
        Run the tile pass on this client; None runs it on the threaded scheduler.
    progress, cancelled : callable
        Progress report and cancellation check.
    span : (float, float)
        The fraction of the whole job these stages cover, for progress.
    emit : callable, optional
        Receives each product as soon as it is built (see ``assemble_products``).
    on_plan : callable, optional
        Receives the plan stage's result before the tile pass (e.g. which
        frames the products will come from, for their provenance).
    memory_limit : int, optional
        Memory budget of the run (bytes) on the threaded scheduler: the number
        of tile tasks run at once, and if need be the tile height, are chosen
        so that the estimated peak (:func:`compute.graph.tile_task_bytes` per
        task, plus the assembly's share) stays within it, whatever the number
        of frames. With a ``client`` the workers' own limits apply. The
        assembly gives freed memory back between products only where the
        resident set leaves less than a product's peak
        (``PRODUCT_BYTES_PER_PIXEL``) of it (after every product without one).
    cores : int, optional
        Cores of the local tile pass (default: the CPU count): one tile task
        per core plus ``EXTRA_TILE_TASKS`` run at once, memory permitting, with
        the cores' numba threads shared among them.
    direct : bool
        A virtual cube's bands are read past the page cache (``O_DIRECT``,
        ``storage.cube.frame_reader``).

    Notes
    -----
    On a virtual cube each tile task reads its next frame stack while it
    reduces the current one (``compute.graph.ReadAhead``, counted in the
    memory budget): cold frames are then faulted in by the read-ahead thread
    instead of stalling the task. 300 cold 61 MP frames on 2 cores: tile pass
    76.2 and 81.3 s against 80.6 and 85.2 s without (runs paired in time),
    1.84-1.86 instead of 1.79-1.81 cores busy, +0.1 GB peak.
    """
    params = params or CalibrationParams()
    lo, hi = span
    report = progress or (lambda stage, fraction: None)
    is_cancelled = cancelled or (lambda: False)
    timings: dict[str, float] = {}
    shape = (int(ds.sizes["y"]), int(ds.sizes["x"]))
    if "tile" in ds.attrs:
        tile = (int(ds.attrs["tile"][0]), int(ds.attrs["tile"][1]))
    else:
        chunks = ds["frames"].encoding.get("chunks") or ds["frames"].data.chunksize
        tile = (int(chunks[-2]), int(chunks[-1]))
    virtual = cube_layout(ds.attrs) == "virtual"
    read_ahead = virtual  # the tile tasks wait on the disk otherwise (measured: 4 s of ~80)
    if virtual:
        # frames read in place: full-width bands are contiguous in the files (a
        # copied cube's tiles follow its compressed chunks, each decoded once)
        tile = row_band_tile(shape, tile)
    reader = frame_reader(cube_store, direct=direct)

    t0 = time.perf_counter()
    report("plan", lo)
    table = frame_table(ds)
    planned = make_plan(table, _region_reader(reader, cube_store, ds.attrs, shape,
                                              params.ptc_region), params,
                        ny=shape[0], nx=shape[1])
    timings["plan"] = time.perf_counter() - t0
    if on_plan is not None:
        on_plan(planned)
    if is_cancelled():
        raise JobCancelled("cancelled after the plan stage")

    t0 = time.perf_counter()
    report("tiles", lo + (hi - lo) * 0.1)  # the stage starts now, not at its first tile's end
    threads = None
    if client is None:
        tile, threads = _fit_memory(planned, params, shape, tile, memory_limit,
                                    cores or os.cpu_count() or 1, read_ahead=read_ahead,
                                    split_rows=virtual)
        timings["tile_threads"] = float(threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chunk, tiles = tile, None
    if virtual and threads is not None and threads > 1:
        # tasks started together on equal bands stay in step (see staggered_bands)
        unit, bands = staggered_bands(shape[0], tile[0], threads)
        chunk, tiles = (unit, tile[1]), [(ys, slice(0, shape[1])) for ys in bands]
    sink = ZarrMapSink(workdir / "maps.zarr", shape=shape, tile=chunk,
                       expected=expected_maps(planned.plan))
    # numba threads per task: the cores shared by the tasks that run at once
    per_task = None if threads is None else max(1, (cores or os.cpu_count() or 1) // threads)
    tasks = build_tile_graph(reader, sink, shape=shape, tile=tile, plan=planned.plan, params=params,
                             threads_per_task=per_task, read_ahead=read_ahead, tiles=tiles)
    n_tiles = len(tasks)
    partials = _run_tasks(tasks, client, lambda done: report(
        "tiles", lo + (hi - lo) * (0.1 + 0.75 * done / n_tiles)), is_cancelled, threads=threads)
    timings["tiles"] = time.perf_counter() - t0
    timings["n_tiles"] = float(n_tiles)

    t0 = time.perf_counter()
    report("products", lo + (hi - lo) * 0.85)
    temps = table.temperature[np.isin(table.frame_type, ["dark", "bias"])]
    temperature = float(np.nanmedian(temps)) if np.isfinite(temps).any() else None
    # freed memory is kept for the next product while the resident set leaves
    # room for a product's peak within the budget (given back otherwise)
    resident_limit = (None if memory_limit is None else
                      max(0, memory_limit - PRODUCT_BYTES_PER_PIXEL * shape[0] * shape[1]))
    products, missing = assemble_products(sink.maps(), planned, params, shape=shape,
                                          temperature=temperature, partials=partials,
                                          wanted=tuple(wanted), emit=emit,
                                          resident_limit=resident_limit,
                                          flat_filter=ds.attrs.get("flat_filter"))
    timings["products"] = time.perf_counter() - t0
    report("products", hi)
    return ProductsOutcome(products, missing, planned, timings)


#: Smallest tile height the memory budget may shrink tiles to (rows).
_MIN_TILE_ROWS = 16
#: Resident memory of the job's process besides its tile tasks (interpreter,
#: numpy/numba/dask/zarr, the plan and frame table): ~0.3-0.8 GB measured.
_BASE_BYTES = 800_000_000
#: Tile tasks run at once beyond one per core. A task spends part of its time
#: waiting for its next stack from the disk (a tile's first stack is not read
#: ahead, and a dark or flat group is reduced faster than it is read); the
#: extra task computes meanwhile. 300-frame 61 MP job from cold files on
#: 2 cores (Zen 4 VM): see benchmarks/HISTORY.md (run 05l).
EXTRA_TILE_TASKS = 1


def _fit_memory(planned: PlanResult, params: CalibrationParams, shape: tuple[int, int],
                tile: tuple[int, int], memory_limit: int | None, cores: int, *,
                read_ahead: bool = False,
                split_rows: bool = False) -> tuple[tuple[int, int], int]:
    """Tile shape and concurrent tile tasks that keep the tile pass within ``memory_limit``.

    The tile pass and the assembly follow each other, so each must fit on its
    own: beside the process's base (``_BASE_BYTES``) as many tile tasks run at
    once as fit, up to one per core plus :data:`EXTRA_TILE_TASKS`; when even
    one does not fit, the tile height is halved (down to ``_MIN_TILE_ROWS``) -
    tiles need not follow the cube's chunks, a chunk is then read by several
    tasks. When the extra task does not fit beside the others and
    ``split_rows`` is set (frames read in place, where a band of any height is
    one contiguous read per frame), tiles get fewer rows (evenly split, never
    below half the height one task allows) so that it does; otherwise it is
    dropped (a copied cube's tiles stay its compressed chunks, each decoded
    once). An assembly (``ASSEMBLY_BYTES_PER_PIXEL``
    of the frame) or a single task that does not fit is noted in the job's
    provenance.
    """
    wanted = max(1, cores) + EXTRA_TILE_TASKS
    if memory_limit is None:
        return tile, wanted
    assembly = ASSEMBLY_BYTES_PER_PIXEL * shape[0] * shape[1]
    if assembly > memory_limit:
        planned.notes.append(
            f"memory limit {memory_limit / 1e9:.2f} GB is below the estimated need of the product "
            f"assembly ({assembly / 1e9:.2f} GB at {shape[0]} x {shape[1]})")
    reserve = _BASE_BYTES

    def task_bytes(rows: int) -> int:
        return tile_task_bytes(planned.plan, (rows, tile[1]), max_batch=params.max_batch_frames,
                               read_ahead=read_ahead)

    ty, tx = tile
    while reserve + task_bytes(ty) > memory_limit and ty > _MIN_TILE_ROWS:
        ty = max(_MIN_TILE_ROWS, (ty + 1) // 2)
    if reserve + task_bytes(ty) > memory_limit:
        planned.notes.append(
            f"memory limit {memory_limit / 1e9:.2f} GB is below the estimated need of one tile "
            f"task ({(reserve + task_bytes(ty)) / 1e9:.2f} GB): ran one task at a time")
        return (ty, tx), 1
    threads = tile_concurrency(memory_limit, task_bytes(ty), cores=wanted, reserve=reserve)
    if threads < wanted and split_rows:
        # the largest even split of the frame's rows at which ``wanted`` tasks fit
        ny, lowest = shape[0], max(_MIN_TILE_ROWS, ty // 2)
        bands = -(-ny // ty)
        rows = ty
        while rows >= lowest and reserve + wanted * task_bytes(rows) > memory_limit:
            bands += 1
            rows = -(-ny // bands)
        if rows >= lowest:
            ty, threads = rows, wanted
    return (ty, tx), threads


def _run_tasks(tasks: list, client: object | None, on_done: Callable[[int], None],
               cancelled: Callable[[], bool], *, threads: int | None = None) -> dict[str, float]:
    """Compute tile tasks, reporting each completion and honouring cancellation."""
    if client is None:
        from dask.callbacks import Callback

        done = [0]

        class _Count(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if isinstance(key, str) and key.startswith("tile-"):
                    done[0] += 1
                    on_done(done[0])
                if cancelled():
                    raise JobCancelled("cancelled during the tile pass")

        with _Count():
            results = dask.compute(*tasks, scheduler="threads", num_workers=threads)
        return sum_partials(results)
    from distributed import as_completed  # the service layer may use distributed

    futures = client.compute(tasks)  # type: ignore[attr-defined]
    order = {fut.key: i for i, fut in enumerate(futures)}
    results: list = [None] * len(futures)
    try:
        for i, fut in enumerate(as_completed(futures, loop=client.loop), start=1):  # type: ignore[attr-defined]
            # summed in task order below: float sums then do not depend on which
            # worker finished first (reproducible whole-frame figures)
            results[order[fut.key]] = fut.result()
            on_done(i)
            if cancelled():
                raise JobCancelled("cancelled during the tile pass")
    except BaseException:
        client.cancel(futures)  # type: ignore[attr-defined]
        raise
    return sum_partials(results)


def remove_tree(path: str | Path) -> None:
    """Remove a scratch folder, ignoring a folder that is already gone."""
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# The whole job: the part that touches the catalog and the store.
# ---------------------------------------------------------------------------
class _PayloadFactory:
    """Storage payloads of computed products: input frames, provenance, time span."""

    def __init__(self, *, camera: str, ds: xr.Dataset, params: CalibrationParams,
                 dataset_id: str | None, job_id: str | None, started: datetime) -> None:
        self.camera, self.params = camera, params
        self.dataset_id, self.job_id, self.started = dataset_id, job_id, started
        self.files = [str(f) for f in ds["file"].values]
        self.shas = [str(s) for s in ds["sha256"].values]
        self.types = _strings(ds["frame_type"].values)
        self.times = ds["time"].values
        self.timings: dict[str, float] = {}
        self.context: dict[str, object] = {}
        self.used = np.ones(len(self.files), dtype=bool)

    def use_plan(self, planned: PlanResult) -> None:
        """Inputs are the frames the plan uses: those it left out are no product's input."""
        self.used = np.zeros(len(self.files), dtype=bool)
        self.used[list(planned.plan.used_frames())] = True

    def __call__(self, content: ProductContent):
        from sitiancal.compute.defects import MaskBit
        from sitiancal.storage.store import ProductPayload, build_provenance

        use = _inputs_of(content.type, self.types) & self.used
        inputs = [{"path": self.files[i], "sha256": self.shas[i]} for i in np.flatnonzero(use)]
        tsel = self.times[use]
        tsel = tsel[~np.isnat(tsel)] if np.issubdtype(tsel.dtype, np.datetime64) else tsel[:0]
        return ProductPayload(
            camera=self.camera, type=content.type,
            arrays=list(content.arrays), tables=list(content.tables),
            stats=content.stats, units=content.units,
            provenance=build_provenance(params=self.params.to_dict(), started=self.started,
                                        finished=datetime.now(UTC), dataset_id=self.dataset_id,
                                        job_id=self.job_id, timings=self.timings, **self.context),
            inputs=inputs,
            date_beg=_to_utc(tsel.min()) if tsel.size else None,
            date_end=_to_utc(tsel.max()) if tsel.size else None,
            params=self.params.to_dict(),
            mask_bits={b.bit_length() - 1: b.name for b in MaskBit} if content.type == "mask" else None,
        )


#: Bytes of in-memory product arrays that may wait for the writer thread at once.
#: Arrays read lazily (the tile pass's maps, ``ScaledMap``) cost only a band
#: while they are written and count zero here.
_STAGING_INFLIGHT_BYTES = 1_000_000_000


def _resident_bytes(payload: object) -> int:
    """Bytes of a payload's arrays held in memory (numpy arrays; lazy arrays count 0)."""
    return sum(int(a.data.nbytes) for a in payload.arrays  # type: ignore[attr-defined]
               if isinstance(a.data, np.ndarray))


class _StagingWriter:
    """Writes staged products on one background thread, in order.

    Product assembly is CPU-bound and staging (zarr and FITS writes,
    checksums) mostly waits on the disk, so the store writes earlier products
    while later ones are assembled. Memory stays bounded: :meth:`submit`
    first collects finished writes, then waits for the oldest ones until the
    in-memory arrays of the products waiting to be written (and the new one)
    fit in ``inflight_bytes``. A product whose maps are all read lazily from
    the tile pass's store costs nothing to keep waiting.
    """

    def __init__(self, store: object, inflight_bytes: int = _STAGING_INFLIGHT_BYTES) -> None:
        self.store = store
        self.inflight_bytes = inflight_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sitiancal-stage")
        self._pending: list[tuple[Future, object, int]] = []
        self._finished: list[tuple[object, object]] = []

    def _collect(self, wait_for: int) -> None:
        """Move finished writes from the head of the queue to ``_finished``.

        Waits for the first ``wait_for`` of them; raises a failed write's error
        (what was collected before it stays in ``_finished`` for :meth:`close`).
        """
        while self._pending and (wait_for > 0 or self._pending[0][0].done()):
            future, payload, _ = self._pending.pop(0)
            wait_for -= 1
            self._finished.append((future.result(), payload))

    def _take(self) -> list[tuple[object, object]]:
        out, self._finished = self._finished, []
        return out

    def submit(self, payload: object, version: int) -> list[tuple[object, object]]:
        """Queue ``payload`` for writing; return the ``(staged, payload)`` of finished writes.

        Raises the error of a failed earlier write.
        """
        size = _resident_bytes(payload)
        self._collect(0)
        while self._pending and sum(n for _, _, n in self._pending) + size > self.inflight_bytes:
            self._collect(1)
        future = self._pool.submit(self.store.stage, payload, version)  # type: ignore[attr-defined]
        self._pending.append((future, payload, size))
        return self._take()

    def drain(self) -> list[tuple[object, object]]:
        """Wait for every queued write; return their ``(staged, payload)``."""
        self._collect(len(self._pending))
        return self._take()

    def close(self) -> None:
        """Wait for the queued writes, discard what they staged, and stop the thread."""
        staged = [item for item, _ in self._take()]
        pending, self._pending = self._pending, []
        for future, _, _ in pending:
            try:
                staged.append(future.result())
            except Exception:  # its error was raised, or is moot, where the job failed first
                log.debug("staging write failed during clean-up", exc_info=True)
        try:
            for item in staged:
                self.store.discard(item)  # type: ignore[attr-defined]
        finally:
            self._pool.shutdown(wait=True)


#: Frame types each product is computed from (its inputs in provenance and content key).
_PRODUCT_INPUTS = {
    "bias": ("bias",), "read_noise": ("bias", "flat"), "dark": ("bias", "dark", "flat"),
    "ptc": ("bias", "dark", "flat"), "gain": ("bias", "dark", "flat"),
    "linearity": ("bias", "dark", "flat"), "flat": ("bias", "dark", "flat"),
    "mask": ("bias", "dark", "flat"),
}


def _inputs_of(kind: str, types: np.ndarray) -> np.ndarray:
    return np.isin(types, _PRODUCT_INPUTS.get(kind, ("bias", "dark", "flat")))


def _to_utc(value: np.datetime64) -> datetime:
    seconds = value.astype("datetime64[us]").astype(np.int64) / 1e6
    return datetime.fromtimestamp(seconds, tz=UTC)


def params_from_job(raw: Mapping[str, object] | None) -> CalibrationParams:
    """Job parameters from a job's JSON ``params`` (unknown names are an error)."""
    from dataclasses import fields as dc_fields

    from sitiancal.compute.defects import DefectConfig

    raw = dict(raw or {})
    known = {f.name for f in dc_fields(CalibrationParams)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown job parameter(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    defects = raw.pop("defects", None)
    if defects is not None:
        dknown = {f.name for f in dc_fields(DefectConfig)}
        bad = sorted(set(defects) - dknown)  # type: ignore[arg-type]
        if bad:
            raise ValueError(f"unknown defect threshold(s): {', '.join(bad)}")
        raw["defects"] = DefectConfig(**defects)  # type: ignore[arg-type]
    return CalibrationParams(**raw)  # type: ignore[arg-type]


def memory_limit_bytes(settings: Settings) -> int | None:
    """The run's memory budget in bytes from ``settings.memory_limit`` ("4GB"; "" or "auto": none)."""
    from dask.utils import parse_bytes

    text = str(settings.memory_limit or "").strip()
    if text.lower() in ("", "auto", "none", "0"):
        return None
    return int(parse_bytes(text))


def physical_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def use_direct_reads(setting: bool | str, frame_bytes: int, *,
                     memory_bytes: int | None = None) -> bool:
    """Whether a job reads its raw frames past the page cache (``O_DIRECT``).

    Parameters
    ----------
    setting : bool or "auto"
        ``Settings.direct_reads``.
    frame_bytes : int
        The dataset's pixels, bytes (frames x rows x columns x 2 for 16-bit counts).
    memory_bytes : int, optional
        Physical memory, bytes; default :func:`physical_memory_bytes`.

    Returns
    -------
    bool
        The setting when it is a bool. ``"auto"``: True when the pixels exceed
        the physical memory. Such a set cannot stay in the page cache between
        the cube build and the tile pass, so caching every byte on the way is
        kernel work for nothing. Measured with 300 cold 61 MP frames (36.7 GB)
        on two 2-core, 24 GB VMs: end to end 150 s against 152 s on one (the
        build 11 s faster, the tile pass 6 s slower), 122-134 s (8 runs)
        against 130-143 s (2 runs) on the other, whose kernel spends
        ~0.9 core-s per GB read through the page cache.
    """
    if isinstance(setting, bool):
        return setting
    if str(setting).lower() != "auto":
        raise ValueError(f"direct_reads must be true, false or 'auto', not {setting!r}")
    memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
    return memory is not None and frame_bytes > memory


class CubeGuard:
    """Which datasets' cubes this process's jobs open, build and read.

    One job at a time opens, checks or builds a given cube (two jobs of one
    new dataset had built it into the same store at once, and one or both
    failed), and a cube is built again only once no job of the process reads
    it (a copy cube rebuilt under a running job would hand it other frames at
    the same indices). Jobs of other processes sharing the cube store are not
    coordinated.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: set[str] = set()
        self._readers: Counter[str] = Counter()

    @contextmanager
    def turn(self, store: str) -> Iterator[None]:
        """Hold ``store``'s turn: no other job opens, checks or builds it meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: store not in self._busy)
            self._busy.add(store)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(store)
                self._cond.notify_all()

    def wait_unread(self, store: str) -> None:
        """Wait until no job reads ``store`` (call it holding the store's turn)."""
        with self._cond:
            if self._readers[store]:
                log.info("waiting for %d job(s) reading %s before building it again",
                         self._readers[store], store)
            self._cond.wait_for(lambda: self._readers[store] == 0)

    @contextmanager
    def reading(self, store: str) -> Iterator[None]:
        """Count a job as reading ``store`` for the duration."""
        with self._cond:
            self._readers[store] += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[store] -= 1
                if not self._readers[store]:
                    del self._readers[store]
                self._cond.notify_all()

    def readers(self, store: str) -> int:
        """Jobs reading ``store`` now."""
        with self._cond:
            return self._readers[store]


#: The process's :class:`CubeGuard` (used by :func:`reading_dataset_cube`).
CUBES = CubeGuard()


def dataset_cube(settings: Settings, dataset_id: str, inventory, *,
                 progress: StageProgress | None = None, span: tuple[float, float] = (0.0, 1.0),
                 scheduler: object | None = None,
                 plan_side: int | None = None) -> tuple[xr.Dataset, str]:
    """Open the dataset's cube, building it first if there is no usable one.

    :func:`reading_dataset_cube` for a caller that does not hold the cube
    afterwards (the same parameters; a job holds it while it reads).
    """
    with reading_dataset_cube(settings, dataset_id, inventory, progress=progress, span=span,
                              scheduler=scheduler, plan_side=plan_side) as opened:
        return opened


@contextmanager
def reading_dataset_cube(settings: Settings, dataset_id: str, inventory, *,
                         progress: StageProgress | None = None,
                         span: tuple[float, float] = (0.0, 1.0),
                         scheduler: object | None = None,
                         plan_side: int | None = None) -> Iterator[tuple[xr.Dataset, str]]:
    """The dataset's cube and its store, built first if there is no usable one, held while open.

    A cube that is missing, incomplete, virtual with a raw file changed or
    vanished since its build (``StaleCubeError``), or built from other frames
    than ``inventory`` accepts now (frames uploaded since; the frames the
    build itself left out, its ``left_out``, aside) is built again;
    ``build_cube`` picks the layout (virtual when every frame can be read in
    place). The process's jobs take turns to open or build a cube, and one
    is built again only once no job holds it (:data:`CUBES`).
    ``progress``: the build's progress as stage ``"cube"`` within ``span``.
    ``plan_side``: a virtual cube built now past the page cache (direct
    reads, see :func:`use_direct_reads`) keeps the plan stage's central region
    of this side (``CalibrationParams.ptc_region``) of every frame.
    """
    store = f"{settings.cube_store_url.rstrip('/')}/{dataset_id}.zarr"
    with ExitStack() as held:
        with CUBES.turn(store):
            ds = _open_or_build_cube(settings, dataset_id, store, inventory, progress=progress,
                                     span=span, scheduler=scheduler, plan_side=plan_side)
            held.enter_context(CUBES.reading(store))  # counted before the turn passes on
        yield ds, store


def _open_or_build_cube(settings: Settings, dataset_id: str, store: str, inventory, *,
                        progress: StageProgress | None, span: tuple[float, float],
                        scheduler: object | None, plan_side: int | None) -> xr.Dataset:
    """The body of :func:`reading_dataset_cube`, holding the store's turn."""
    from sitiancal.storage.cube import CubeError, build_cube, open_cube

    try:
        ds = open_cube(store)
    except (CubeError, FileNotFoundError):
        pass  # not built yet, an incomplete build or a stale virtual cube: rebuild
    else:
        if cube_frames_match(ds, inventory):
            return ds
        # frames uploaded (or gone) since the build: the cube must hold them
        log.info("the cube of dataset %s holds other frames than its inventory: building it "
                 "again", dataset_id)
    CUBES.wait_unread(store)
    lo, hi = span

    def cb(done: int, total: int) -> None:
        if progress is not None and total:
            progress("cube", lo + (hi - lo) * done / total)

    if "://" not in store:  # a local leftover of an interrupted build
        remove_tree(store)
    workers = None
    limit = memory_limit_bytes(settings)
    if limit is not None and inventory.shape is not None and scheduler is None:
        # one file buffer plus the frame's statistics per thread: ~2.5x a frame.
        # Ingesting waits on reads as much as it computes (hash, statistics): two
        # threads per core read a cold 61 MP set ~20% faster than one (measured,
        # 11-13 s vs 13-17 s for 8.4 GB on 2 cores).
        per_thread = 2.5 * 2 * inventory.shape[0] * inventory.shape[1]
        workers = int(max(1, min(2 * (os.cpu_count() or 1), 8, limit // per_thread)))
    n_pixels = len(inventory.frames) * math.prod(inventory.shape or (0, 0))
    direct = use_direct_reads(settings.direct_reads, 2 * n_pixels)
    # Read past the page cache, the frames are not cached for the plan stage right
    # after: the build keeps the plan's region of each frame (a set read through
    # the cache finds it there, and a small set would pay ~4 ms per frame for
    # nothing).
    window = (None if not direct or plan_side is None or inventory.shape is None else
              central_window(tuple(inventory.shape), plan_side))
    return build_cube(inventory, store, progress=cb, scheduler=scheduler, max_workers=workers,
                      direct=direct, plan_window=window)


def cube_frames_match(ds: xr.Dataset, inventory) -> bool:
    """Whether the cube ``ds`` holds exactly the frames ``inventory`` accepts.

    Frames the cube's build refused when it read them (its ``left_out``) are
    not expected in it, whether or not the inventory still lists them.
    """
    left_out = {str(r["file"]) for r in ds.attrs.get("left_out", [])}
    expected = {str(f.path) for f in inventory.frames} - left_out
    return {str(f) for f in ds["file"].values} == expected


def run_calibration_job(*, catalog, store, settings: Settings, job_id: str,
                        client: object | None = None,
                        progress: StageProgress | None = None,
                        cancelled: Callable[[], bool] | None = None) -> list[str]:
    """Run one catalog job end to end; return the ids of its products (new or reused).

    Raises
    ------
    JobCancelled
        When ``cancelled()`` turns true; nothing is published.
    ValueError
        For bad job parameters or a dataset that supports none of the products.
    """
    from sitiancal.storage.scan import Inventory

    report = progress or (lambda stage, fraction: None)
    is_cancelled = cancelled or (lambda: False)
    started = datetime.now(UTC)
    keep_freed_memory()
    job = catalog.get_job(job_id)
    if job.dataset is None:
        raise ValueError(f"job {job_id} has no dataset")
    params = params_from_job(job.params)
    dataset = catalog.get_dataset(job.dataset)
    inventory = Inventory.model_validate(dataset.inventory)
    if not inventory.frames:
        raise ValueError(f"dataset {dataset.id} has no usable frame")
    wanted = tuple(job.requested) or PRODUCT_TYPES
    t0 = time.perf_counter()
    report("cube", 0.02)
    limit = memory_limit_bytes(settings)
    # held until the job ends: the cube is not built again while this job reads it
    with reading_dataset_cube(settings, dataset.id, inventory, progress=report,
                              span=(0.02, 0.45), scheduler=client,
                              plan_side=params.ptc_region) as (ds, cube_store):
        catalog.set_frame_checksums(dataset.id, {
            str(f): str(s) for f, s in zip(ds["file"].values, ds["sha256"].values, strict=True)})
        # frames refused once their pixels were read: the dataset rejects them too
        catalog.leave_out_frames(dataset.id, ds.attrs.get("left_out", []))
        cube_s = time.perf_counter() - t0
        if is_cancelled():
            raise JobCancelled("cancelled after the cube was built")
        workdir = Path(settings.data_dir) / "work" / job_id
        make_payload = _PayloadFactory(camera=job.camera, ds=ds, params=params,
                                       dataset_id=dataset.id, job_id=job_id, started=started)
        make_payload.timings["cube"] = cube_s
        staged: list = []  # (StagedProduct, payload): published together at the end
        reused: list[str] = []
        writer = _StagingWriter(store)

        def stage(content: ProductContent) -> None:
            """Stage a product as soon as it is built, so its maps can leave memory.

            The catalog work (reuse check, version) happens here; the store write
            runs on the writer thread while the next product is assembled.
            """
            payload = make_payload(content)
            if not job.force:
                existing = catalog.find_by_content_key(job.camera, content.type, payload.content_key)
                if existing is not None:
                    reused.append(existing.id)
                    catalog.link_product(job_id, existing.id, reused=True)
                    return
            try:
                payload.validate()
            except ValueError as exc:
                raise ValueError(f"{content.type}: {exc}") from exc
            version = catalog.reserve_version(job.camera, content.type)
            staged.extend(writer.submit(payload, version))

        try:
            outcome = compute_products(ds, cube_store, workdir, params=params, wanted=wanted,
                                       client=client, progress=report, cancelled=is_cancelled,
                                       memory_limit=None if client is not None else limit,
                                       span=(0.45, 0.92), emit=stage, on_plan=make_payload.use_plan,
                                       direct=use_direct_reads(settings.direct_reads,
                                                               2 * math.prod(ds["frames"].shape)))
            staged.extend(writer.drain())
            # frames the cube build read and refused (their pixels are not raw counts)
            left_out = [f"{r['file']} left out: {r['reason']}" for r in ds.attrs.get("left_out", [])]
            notes = [*left_out, *outcome.planned.notes]
            if not outcome.products:
                reasons = "; ".join(f"{k}: {v}" for k, v in outcome.missing.items())
                raise ValueError(f"the dataset supports none of the requested products ({reasons})")
            if is_cancelled():
                raise JobCancelled("cancelled before publishing")
            report("publish", 0.95)
            ids = list(reused)
            while staged:
                item, payload = staged.pop(0)
                # the missing products and notes go into every version's provenance
                payload.provenance.update({"missing": outcome.missing, "notes": notes,
                                           "timings": {**make_payload.timings, **outcome.timings}})
                product = catalog.publish_product(item, payload, store=store, job_id=job_id,
                                                  dataset_id=dataset.id, force=job.force)
                ids.append(product.id)
            message = "; ".join([*left_out, *(f"{k} not computed: {v}"
                                              for k, v in outcome.missing.items())]) or None
            catalog.update_job(job_id, message=message)
            report("done", 1.0)
            return ids
        finally:
            writer.close()
            for item, _ in staged:  # anything not published (failure or cancellation)
                store.discard(item)
            remove_tree(workdir)


@dataclass
class CalibrationRun:
    """Result of :func:`calibrate`."""

    dataset_id: str
    job_id: str
    product_ids: list[str]
    report: dict
    exported: list[Path] = field(default_factory=list)


def calibrate(source: str | Path, camera: str, settings: Settings, *,
              wanted: Sequence[str] | None = None, params: Mapping[str, object] | None = None,
              force: bool = False, export_dir: str | Path | None = None,
              progress: StageProgress | None = None,
              types_from_paths: bool = False,
              temperature_tolerance: float | None = None) -> CalibrationRun:
    """Scan, register, run and (optionally) export one camera dataset on the embedded default.

    This is ``sitiancal calibrate``: the same job body as the service's jobs.
    ``types_from_paths``: files without a frame-type keyword take their type
    from their names or folders (``storage.scan.type_from_path``);
    ``temperature_tolerance`` (deg C): the scan's (None: its default).
    """
    from sitiancal.service.report import build_report
    from sitiancal.storage.catalog import Catalog
    from sitiancal.storage.scan import scan
    from sitiancal.storage.store import ProductStore

    report = progress or (lambda stage, fraction: None)
    report("scan", 0.0)
    inventory = scan(source, types_from_paths=types_from_paths,
                     temperature_tolerance=temperature_tolerance)
    if not inventory.frames:
        reasons = "; ".join(f"{r.file}: {r.reason}" for r in inventory.rejected) or "no FITS files"
        raise ValueError(f"{source}: no usable frame ({reasons})")
    params_from_job(params)  # fail early on bad parameters
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    catalog = Catalog.open(settings.catalog_url)
    try:
        store = ProductStore(settings.product_store_url)
        dataset_id = catalog.add_dataset(camera, inventory, source=str(source), actor="cli")
        job = catalog.create_job(camera, dataset_id, products=tuple(wanted or ()),
                                 params=dict(params or {}), force=force, actor="cli")
        catalog.update_job(job.id, state="running", stage="cube", progress=0.0)
        try:
            ids = run_calibration_job(catalog=catalog, store=store, settings=settings,
                                      job_id=job.id, progress=report)
        except BaseException as exc:
            catalog.update_job(job.id, state="failed", error=str(exc) or type(exc).__name__)
            raise
        catalog.update_job(job.id, state="succeeded", progress=1.0, stage="done")
        products = [catalog.get_product(pid) for pid in ids]
        job = catalog.get_job(job.id)
        missing = dict(products[0].provenance.get("missing", {})) if products else {}
        notes = list(products[0].provenance.get("notes", [])) if products else []
        qc = build_report(camera, {p.type: p.stats for p in products}, missing=missing,
                          context={"dataset": dataset_id, "job": job.id,
                                   "products": {p.type: {"id": p.id, "version": p.version}
                                                for p in products},
                                   "notes": notes})
        run = CalibrationRun(dataset_id, job.id, ids, qc.to_dict())
        if export_dir is not None:
            out = Path(export_dir)
            out.mkdir(parents=True, exist_ok=True)
            for p in products:
                path = out / f"{p.type}.fits"
                with store.open_fits(p.store_key) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)  # streamed: products can be GBs
                run.exported.append(path)
            (out / "report.json").write_text(json.dumps(run.report, indent=2, default=str))
            run.exported.append(out / "report.json")
        return run
    finally:
        catalog.close()
