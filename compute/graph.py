"""Dask graph builders over a frame cube.

The per-pixel pass is one dask task per tile (a tile is one zarr chunk of a
frame, e.g. 1597 x 1368 pixels for a 61 MP frame): each task reads its tile of
every frame exactly once, group by group, and reduces it with
:func:`~sitiancal.compute.tile.process_tile`. Tasks carry seconds of work
(far above dask's ~ms per-task overhead), memory is bounded by one group's
stack for one tile per running task, and nothing is rechunked.

I/O is injected so that this module never touches storage:

- ``reader(indices, ys, xs) -> ndarray (F, ty, tx)`` reads raw counts;
- ``sink(ys, xs, result)`` stores a tile's maps (into memory or a zarr store)
  and returns nothing; only the small partial sums travel back to the client.

Building the graph computes nothing (tested with ``raise_if_dask_computes``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import dask
import numpy as np
from dask.delayed import Delayed

from sitiancal.compute.tile import (
    CalibrationParams,
    TilePlan,
    TileResult,
    process_tile,
    tile_loads,
)

#: ``reader(indices, ys, xs) -> (F, ty, tx)`` raw counts (ADU).
TileReader = Callable[[Sequence[int], slice, slice], np.ndarray]
#: ``sink(ys, xs, result)`` stores one tile's maps.
TileSink = Callable[[slice, slice, TileResult], None]


def iter_tiles(shape: tuple[int, int], tile: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """Yield the ``(ys, xs)`` slices of the tiles covering a frame, row-major."""
    ny, nx = shape
    ty, tx = tile
    for y0 in range(0, ny, ty):
        for x0 in range(0, nx, tx):
            yield slice(y0, min(y0 + ty, ny)), slice(x0, min(x0 + tx, nx))


def row_band_tile(shape: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    """Full-width tile (a band of rows) with about as many pixels as ``tile``.

    Where frames are read in place from FITS files (a virtual cube), a band's
    window of a frame is one contiguous byte range of the file, while a
    ``1597 x 1368`` tile is a strided window of 1597 row pieces: the band is
    read with one mapping of exactly its bytes, in order. Measured on 300
    cached 61 MP frames: 0.37 s per band of 228 x 9576 pixels against 1.19 s
    per 1597 x 1368 tile, for the same 1.3 GB. Bands are near-equal (the last
    may be shorter); their number is that of the tiles, so tasks carry the
    same work and memory.

    Examples
    --------
    >>> row_band_tile((6388, 9576), (1597, 1368))
    (229, 9576)
    >>> row_band_tile((24, 40), (24, 40))
    (24, 40)
    """
    ny, nx = int(shape[0]), int(shape[1])
    n_bands = max(1, min(ny, round(ny * nx / max(1, int(tile[0]) * int(tile[1])))))
    return -(-ny // n_bands), nx


def staggered_bands(ny: int, rows: int, tasks: int) -> tuple[int, list[slice]]:
    """Full-width row bands of at most ``rows`` rows whose first ``tasks`` start out of step.

    Tile tasks that start together on bands of equal work stay in step: each
    reduces its bias stack (compute-bound) and then streams its dark and flat
    stacks (bound by the disk where the frames are read in place) at the same
    time as the others, so the cores idle while all of them wait on the disk
    and the disk idles while all of them compute. Here the first ``tasks - 1``
    bands are 1, 2, ..., ``tasks - 1`` units high (a unit is ``rows // tasks``
    rows) and the others ``tasks`` units: started together, the tasks on the
    short bands move to their next band after 1/``tasks``, 2/``tasks``, ... of
    a band's time, which spreads their phases evenly over a band. Every
    boundary is a multiple of the unit (the last band ends at ``ny``), so maps
    chunked by the unit are written by one task per chunk.

    Parameters
    ----------
    ny : int
        Frame rows.
    rows : int
        Most rows one task may take (the memory budget's band height).
    tasks : int
        Tile tasks run at once.

    Returns
    -------
    unit : int
        Rows of a unit (the chunk height of the maps).
    bands : list of slice
        Row ranges, covering ``0..ny`` in order, in the order they should start.
        Where ``tasks`` is 1 or the frame has too few rows for the staggered
        bands plus one whole one, equal bands of ``rows`` rows and ``unit ==
        rows``.

    Examples
    --------
    >>> staggered_bands(20, 6, 3)
    (2, [slice(0, 2, None), slice(2, 6, None), slice(6, 12, None), slice(12, 18, None), slice(18, 20, None)])
    """
    ny, rows, tasks = int(ny), max(1, min(int(rows), int(ny))), max(1, int(tasks))
    unit = rows // tasks
    heights = [k * unit for k in range(1, tasks)]
    if tasks == 1 or unit == 0 or sum(heights) + tasks * unit > ny:
        return rows, [ys for ys, _ in iter_tiles((ny, 1), (rows, 1))]
    starts = [0, *itertools.accumulate(heights)]
    bands = [slice(a, b) for a, b in itertools.pairwise(starts)]
    whole = tasks * unit
    return unit, bands + [slice(y0, min(y0 + whole, ny)) for y0 in range(starts[-1], ny, whole)]


class ReadAhead:
    """``load(indices)`` that reads the next expected stack while the caller works.

    ``expected`` is the sequence of index tuples the caller will ask for
    (:func:`compute.tile.tile_loads`). Each call returns its stack (read ahead
    if it was the expected one, else read now) and starts reading the entry
    that follows on a background thread, so that the caller's thread reduces
    the current stack while the next one's cold pages come from the disk
    (or an ``O_DIRECT`` reader's transfers run). At most one stack is read ahead; it is
    counted in :func:`tile_task_bytes` (``read_ahead=True``). Errors of a read
    ahead are raised by the call that asks for it. :meth:`close` waits for a
    pending read and stops the thread.
    """

    def __init__(self, load: Callable[[Sequence[int]], np.ndarray],
                 expected: Sequence[Sequence[int]]) -> None:
        self._load = load
        self._expected = [tuple(int(i) for i in e) for e in expected]
        self._next = 0
        self._pending: tuple[tuple[int, ...], Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sitiancal-read-ahead")

    def __call__(self, indices: Sequence[int]) -> np.ndarray:
        key = tuple(int(i) for i in indices)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            stack = pending[1].result()
        else:
            self._discard(pending)
            stack = self._load(key)
        try:
            self._next = self._expected.index(key, self._next) + 1
        except ValueError:
            return stack  # off the expected sequence: no read ahead
        if self._next < len(self._expected):
            ahead = self._expected[self._next]
            self._pending = (ahead, self._pool.submit(self._load, ahead))
        return stack

    @staticmethod
    def _discard(pending: tuple[tuple[int, ...], Future] | None) -> None:
        """Wait for an unused read ahead to end (its stack and errors are dropped)."""
        if pending is not None and not pending[1].cancel():
            with contextlib.suppress(Exception):
                pending[1].result()

    def close(self) -> None:
        """Wait for a pending read ahead (dropped) and stop the thread."""
        pending, self._pending = self._pending, None
        self._discard(pending)
        self._pool.shutdown(wait=True)


def _run_tile(reader: TileReader, sink: TileSink, ys: slice, xs: slice, plan: TilePlan,
              params: CalibrationParams, threads: int | None = None,
              frame_width: int | None = None, read_ahead: bool = False) -> dict[str, float]:
    load = partial(_load, reader, ys, xs)
    ahead = ReadAhead(load, tile_loads(plan, params.max_batch_frames)) if read_ahead else None
    try:
        result = process_tile(ahead or load, plan, params, threads=threads,
                              origin=(ys.start, xs.start), frame_width=frame_width)
    finally:
        if ahead is not None:
            ahead.close()
    sink(ys, xs, result)
    return result.partials


def _load(reader: TileReader, ys: slice, xs: slice, indices: Sequence[int]) -> np.ndarray:
    return reader(list(indices), ys, xs)


def build_tile_graph(reader: TileReader, sink: TileSink, *, shape: tuple[int, int],
                     tile: tuple[int, int], plan: TilePlan,
                     params: CalibrationParams,
                     threads_per_task: int | None = None,
                     read_ahead: bool = False,
                     tiles: Sequence[tuple[slice, slice]] | None = None) -> list[Delayed]:
    """One delayed task per tile; computing them fills the sink and returns partial sums.

    Parameters
    ----------
    reader, sink : callable
        Pixel I/O (see module docstring); both must be picklable for distributed.
    shape : tuple of int
        Frame shape ``(ny, nx)`` (pixels).
    tile : tuple of int
        Tile shape ``(ty, tx)``; use the cube's chunk shape so each chunk is read once.
    plan, params
        Dataset plan and job parameters.
    threads_per_task : int, optional
        numba threads of each task's kernels (``process_tile(threads=)``); None
        leaves numba's setting (one thread per core).
    read_ahead : bool
        Each task reads its next frame stack while it reduces the current one
        (:class:`ReadAhead`): for readers that wait on a disk. Costs one more
        stack per task (``tile_task_bytes``).
    tiles : sequence of (slice, slice), optional
        The tiles ``(ys, xs)`` instead of ``tile``'s grid, in the order they
        should start (e.g. :func:`staggered_bands`); they must cover the frame
        once, and the sink must take each of them whole.

    Returns
    -------
    list of Delayed
        Each evaluates to the tile's partial sums (dict of float), in
        row-major tile order (in the order of ``tiles`` where given).

    Notes
    -----
    Tiles of one row band run close together in time: the list is row-major
    and each task carries a dask ``priority`` annotation that decreases band by
    band (the distributed scheduler runs higher priorities first; the local
    schedulers follow ``dask.order``, which keeps the bands together for these
    independent tasks). When the reader maps FITS files in place, a band's
    tiles share the same file pages (page-cache readahead brings in whole rows),
    so a band is read from disk about once.

    Given ``tiles``, the keys are ``tile-<rank>-<y>-<x>`` with a zero-padded
    rank that falls along the list: the threaded scheduler breaks the tie
    between independent tasks by their keys, in decreasing order (tested), and
    the distributed one follows the priorities, which fall along the list too.
    """
    if tiles is None:
        n_bands = -(-shape[0] // tile[0])
        entries = [(ys, xs, n_bands - ys.start // tile[0], f"tile-{ys.start}-{xs.start}")
                   for ys, xs in iter_tiles(shape, tile)]
    else:
        n = len(tiles)
        entries = [(ys, xs, n - i, f"tile-{n - i:06d}-{ys.start}-{xs.start}")
                   for i, (ys, xs) in enumerate(tiles)]
    run = dask.delayed(_run_tile, pure=False)
    tasks = []
    for ys, xs, priority, key in entries:
        with dask.annotate(priority=priority):
            tasks.append(run(reader, sink, ys, xs, plan, params, threads_per_task, shape[1],
                             read_ahead, dask_key_name=key))
    return tasks


#: Memory of one tile task besides its frame stacks, bytes per tile pixel: the
#: per-pixel float64 fit outputs and float32 maps alive at once (measured with
#: memray on a 1597 x 1368 tile: 390-406 B/px for groups of 6-48 frames), rounded up.
TILE_BYTES_PER_PIXEL = 450
#: Memory per pixel and frame of the largest stack a task holds: the uint16
#: stack (2 B) and one working copy of the same size.
TILE_BYTES_PER_FRAME_PIXEL = 4
#: Memory of the product assembly per frame pixel (measured at 61 MP: 3.1 GB),
#: held by the process after the tile pass, rounded up.
ASSEMBLY_BYTES_PER_PIXEL = 56


def largest_stack(plan: TilePlan, max_batch: int) -> int:
    """Frames of the largest stack a tile task holds at once (bias whole, others in batches)."""
    sizes = [plan.bias.n if plan.bias is not None else 0]
    sizes += [min(g.n, max_batch) for g in (*plan.darks, *plan.flats)]
    return max(sizes)


def tile_task_bytes(plan: TilePlan, tile: tuple[int, int], *, max_batch: int,
                    read_ahead: bool = False) -> int:
    """Estimated peak memory (bytes) of one tile task of ``plan`` on tiles of ``tile`` pixels.

    With ``read_ahead`` (:class:`ReadAhead`) the stack being reduced coexists
    with the next one (2 B per frame pixel, uint16): the peak is that of the
    worst pair of consecutive loads.
    """
    pixels = int(tile[0]) * int(tile[1])
    frames = TILE_BYTES_PER_FRAME_PIXEL * largest_stack(plan, max_batch)
    if read_ahead:
        sizes = [len(e) for e in tile_loads(plan, max_batch)] + [0]
        frames = max([frames] + [TILE_BYTES_PER_FRAME_PIXEL * a + 2 * b
                                 for a, b in itertools.pairwise(sizes)])
    return pixels * (TILE_BYTES_PER_PIXEL + frames)


def tile_concurrency(memory_limit: int | None, task_bytes: int, *, cores: int,
                     reserve: int = 0) -> int:
    """Tile tasks to run at once so that ``reserve + n * task_bytes <= memory_limit``.

    Parameters
    ----------
    memory_limit : int or None
        Budget of the whole run (bytes); None: no limit (one task per core).
    task_bytes : int
        Peak memory of one task (:func:`tile_task_bytes`).
    cores : int
        Upper bound (one task per core).
    reserve : int
        Memory held by the process besides the tasks (bytes).

    Returns
    -------
    int
        At least 1: a budget too small for one task still runs one at a time
        (the caller reports the shortfall).
    """
    if memory_limit is None:
        return max(1, cores)
    fits = (int(memory_limit) - int(reserve)) // max(int(task_bytes), 1)
    return int(max(1, min(cores, fits)))


def sum_partials(partials: Sequence[dict[str, float]]) -> dict[str, float]:
    """Add the partial sums returned by the tile tasks."""
    total: dict[str, float] = {}
    for part in partials:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


class ArrayReader:
    """``TileReader`` over an in-memory ``(F, ny, nx)`` array (tests, small data)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    def __call__(self, indices: Sequence[int], ys: slice, xs: slice) -> np.ndarray:
        return self.frames[list(indices), ys, xs]


class MemorySink:
    """``TileSink`` that assembles full-frame maps in memory (threaded scheduler only).

    Attributes
    ----------
    maps : dict of str to ndarray
        Full-frame float32 maps, NaN where no tile wrote (``lin_resid`` is ``(K, ny, nx)``).
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.maps: dict[str, np.ndarray] = {}

    def __call__(self, ys: slice, xs: slice, result: TileResult) -> None:
        for name, tile_map in result.maps.items():
            if name not in self.maps:
                lead = tile_map.shape[:-2]
                self.maps[name] = np.full(lead + self.shape, np.nan, dtype=np.float32)
            self.maps[name][..., ys, xs] = tile_map
