"""The tile graph against the kernels: any tiling gives the same per-pixel maps."""

from __future__ import annotations

import itertools

import dask
import numpy as np
import pytest

from sitiancal.compute.dark import fit_dark_rate
from sitiancal.compute.gain import fit_pixel_gain
from sitiancal.compute.graph import (
    ArrayReader,
    MemorySink,
    ReadAhead,
    build_tile_graph,
    iter_tiles,
    largest_stack,
    row_band_tile,
    staggered_bands,
    sum_partials,
    tile_task_bytes,
)
from sitiancal.compute.stats import group_moments, sigma_clipped_stats
from sitiancal.compute.tile import (
    CalibrationParams,
    FrameGroup,
    TilePlan,
    process_tile,
    tile_loads,
)


def _synthetic(seed: int = 5, ny: int = 40, nx: int = 52):
    """Bias, darks and a flat ladder with known per-pixel gain, as raw uint16 counts."""
    rng = np.random.default_rng(seed)
    gain = rng.normal(0.254, 0.002, (ny, nx))
    bias = 500 + rng.normal(0, 1.5, (ny, nx))
    rn = 4.0
    dark = np.abs(rng.normal(0.01, 0.003, (ny, nx)))  # ADU/s
    frames, kinds, times = [], [], []
    for _ in range(12):
        frames.append(bias + rng.normal(0, rn, (ny, nx)))
        kinds.append(("bias", 0.0))
    for t in (60.0, 300.0):
        for _ in range(4):
            frames.append(bias + dark * t + rng.normal(0, rn, (ny, nx)))
            kinds.append(("dark", t))
    for t in (1.0, 2.0, 4.0, 8.0):
        for _ in range(10):
            electrons = rng.poisson(2000.0 * t * np.ones((ny, nx)))
            frames.append(bias + dark * t + electrons / gain + rng.normal(0, rn, (ny, nx)))
            kinds.append(("flat", t))
    stack = np.clip(np.rint(frames), 0, 65535).astype(np.uint16)
    times = np.arange(len(frames), dtype=float) * 10.0
    return stack, kinds, times


def _plan(kinds, times) -> TilePlan:
    idx = {k: [i for i, (kind, t) in enumerate(kinds) if (kind, t) == k] for k in set(kinds)}
    bias = FrameGroup("bias", 0.0, tuple(idx[("bias", 0.0)]))
    darks = tuple(FrameGroup("dark", t, tuple(idx[("dark", t)])) for t in (60.0, 300.0))
    flats = tuple(FrameGroup("flat", t, tuple(idx[("flat", t)]), tuple([1.0] * 10))
                  for t in (1.0, 2.0, 4.0, 8.0))
    return TilePlan(
        bias=bias, bias_time_s=tuple(times[list(bias.indices)]),
        bias_frame_level=tuple([500.0] * bias.n), darks=darks, flats=flats,
        flat_dark=(None,) * 4, saturation=60000.0, gain_levels=(True,) * 4,
        lin_used=(True,) * 4, lin_at=(0, 3), flat_ref=2,
    )


def _maps(stack, plan, tile, params, *, read_ahead: bool = False, reader=None):
    sink = MemorySink(stack.shape[1:])
    tasks = build_tile_graph(reader or ArrayReader(stack), sink, shape=stack.shape[1:],
                             tile=tile, plan=plan, params=params, read_ahead=read_ahead)
    partials = sum_partials(dask.compute(*tasks, scheduler="sync"))
    return sink.maps, partials


@pytest.fixture(scope="module")
def data():
    stack, kinds, times = _synthetic()
    return stack, _plan(kinds, times)


@pytest.mark.parametrize("tile", [(40, 52), (16, 16), (7, 13), (40, 1)])
def test_maps_do_not_depend_on_tiling(data, tile):
    stack, plan = data
    params = CalibrationParams()
    ref, ref_part = _maps(stack, plan, (40, 52), params)
    got, part = _maps(stack, plan, tile, params)
    assert set(got) == set(ref)
    for name in ref:
        if name == "rtn":
            continue  # a dithered statistic; compared below
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert np.mean(got["rtn"] == ref["rtn"]) > 0.995
    for key in ref_part:
        assert part[key] == pytest.approx(ref_part[key], rel=1e-9)


def test_tile_maps_equal_the_kernels_on_the_whole_frame(data):
    stack, plan = data
    params = CalibrationParams()
    maps, _ = _maps(stack, plan, (16, 16), params)
    b = stack[list(plan.bias.indices)]
    clipped = sigma_clipped_stats(b, sigma=params.clip_sigma, maxiters=params.clip_maxiters)
    np.testing.assert_allclose(maps["bias_mean"], clipped.mean, rtol=1e-6)
    mom = group_moments(b)
    np.testing.assert_allclose(maps["bias_std"], np.sqrt(mom.var), rtol=1e-6)

    groups = [mom] + [group_moments(stack[list(g.indices)]) for g in plan.darks]
    fit = fit_dark_rate(np.array([0.0, 60.0, 300.0]), np.stack([g.mean for g in groups], -1),
                        np.stack([g.var for g in groups], -1),
                        np.array([plan.bias.n] + [g.n for g in plan.darks]))
    np.testing.assert_allclose(maps["dark_rate"], fit.rate, rtol=1e-5, atol=1e-7)

    means, variances = [], []
    for g in plan.flats:
        offset = clipped.mean + fit.rate * g.exptime
        m = group_moments(stack[list(g.indices)], offset=offset, scale=np.asarray(g.scale))
        means.append(m.mean)
        variances.append(m.var)
    gfit = fit_pixel_gain(np.stack(means, -1), np.stack(variances, -1),
                          np.array([g.n for g in plan.flats], dtype=float),
                          max_mean=params.gain_max_fraction * plan.saturation)
    np.testing.assert_allclose(maps["gain"], gfit.gain, rtol=1e-4)
    # A sanity check only (3 levels of 10 frames: ~25% per pixel, and the median of
    # 1/K is skewed high at that precision); accuracy is tested in test_products_truth.
    assert np.nanmedian(maps["gain"]) == pytest.approx(0.254, rel=0.05)


def _refuse(*args, **kwargs):
    raise AssertionError("the graph builder computed something")


def test_full_size_graph_computes_nothing():
    """A 300-frame 9576 x 6388 cube: building the tile graph runs and allocates nothing.

    Its time is a benchmark figure (``benchmarks/run.py``), not asserted here.
    """
    ny, nx, n = 6388, 9576, 300

    def reader(indices, ys, xs):  # never called while building
        raise AssertionError("pixels were read while building the graph")

    per = n // 3
    groups = [tuple(range(i * per, (i + 1) * per)) for i in range(3)]
    plan = TilePlan(
        bias=FrameGroup("bias", 0.0, groups[0]), bias_time_s=tuple(float(i) for i in range(per)),
        bias_frame_level=(500.0,) * per,
        darks=tuple(FrameGroup("dark", t, groups[1][k::5]) for k, t in enumerate((1, 2, 3, 4, 5))),
        flats=tuple(FrameGroup("flat", t, groups[2][k::10], (1.0,) * 10) for k, t in enumerate(range(1, 11))),
        flat_dark=(None,) * 10, saturation=60000.0, gain_levels=(True,) * 10,
        lin_used=(True,) * 10, lin_at=(0, 5, 9), flat_ref=5,
    )
    sink = MemorySink((1, 1))  # never called while building
    with dask.config.set(scheduler=_refuse):
        tasks = build_tile_graph(reader, sink, shape=(ny, nx), tile=(1597, 1368), plan=plan,
                                 params=CalibrationParams())
    assert len(tasks) == len(list(iter_tiles((ny, nx), (1597, 1368)))) == 28


@pytest.mark.parametrize(("shape", "tile", "band"), [
    ((6388, 9576), (1597, 1368), (229, 9576)),   # 28 bands (as tiles), the last of 205 rows
    ((3194, 4788), (1597, 1596), (533, 4788)),   # 6 bands
    ((24, 40), (24, 40), (24, 40)),
    ((100, 10), (7, 3), (3, 10)),                # never more bands than rows
    ((5, 1000), (1, 1), (1, 1000)),
])
def test_row_band_tile_keeps_the_number_of_tiles(shape, tile, band) -> None:
    assert row_band_tile(shape, tile) == band
    ny, nx = shape
    n_tiles = len(list(iter_tiles(shape, tile)))
    n_bands = len(list(iter_tiles(shape, band)))
    # near-equal bands, at most as many as tiles' worth of pixels (or rows)
    assert n_bands <= min(ny, round(ny * nx / (tile[0] * tile[1])))
    assert n_bands <= n_tiles or n_tiles == 1
    assert ny - (n_bands - 1) * band[0] > 0            # no empty band
    if shape == (6388, 9576):
        assert n_bands == n_tiles == 28


@pytest.mark.parametrize(("ny", "rows", "tasks"), [
    (6388, 164, 3), (6388, 229, 2), (6388, 229, 4), (20, 6, 3), (100, 7, 3), (40, 40, 3),
    (5, 5, 3), (12, 6, 3), (6388, 164, 1), (1, 1, 2),
])
def test_staggered_bands_cover_the_frame_on_unit_boundaries(ny, rows, tasks) -> None:
    unit, bands = staggered_bands(ny, rows, tasks)
    heights = [b.stop - b.start for b in bands]
    # contiguous, in order, covering every row once, none empty or above the budget
    assert bands[0].start == 0 and bands[-1].stop == ny
    assert all(a.stop == b.start for a, b in itertools.pairwise(bands))
    assert all(0 < h <= rows for h in heights)
    # every boundary on the unit (the maps' chunk height): one task per chunk
    assert all(b.start % unit == 0 for b in bands)
    unit_rows = rows // tasks
    staggered = tasks > 1 and unit_rows > 0 and ny >= unit_rows * (tasks * (tasks - 1) // 2 + tasks)
    if staggered:
        # the first tasks - 1 bands are 1, 2, ... units, then whole bands of tasks units
        assert unit == unit_rows
        assert heights[:tasks - 1] == [k * unit for k in range(1, tasks)]
        assert set(heights[tasks - 1:-1]) <= {tasks * unit}
        assert heights[-1] <= tasks * unit
    else:
        assert unit == min(rows, ny) and set(heights[:-1]) <= {unit}


def test_staggered_tiles_start_in_their_order_with_the_same_maps(data) -> None:
    """Given ``tiles``, the threaded scheduler starts them in the list's order."""
    import threading

    stack, plan = data
    params = CalibrationParams()
    ny, nx = stack.shape[1:]
    _, bands = staggered_bands(ny, 12, 3)
    assert [b.stop - b.start for b in bands][:3] == [4, 8, 12]
    started: list[int] = []
    lock = threading.Lock()

    class Recording(ArrayReader):
        def __call__(self, indices, ys, xs):
            with lock:
                if not started or started[-1] != ys.start:
                    started.append(ys.start)
            return super().__call__(indices, ys, xs)

    sink = MemorySink((ny, nx))
    tiles = [(ys, slice(0, nx)) for ys in bands]
    tasks = build_tile_graph(Recording(stack), sink, shape=(ny, nx), tile=(12, nx), plan=plan,
                             params=params, tiles=tiles)
    assert len(tasks) == len(bands)
    partials = sum_partials(dask.compute(*tasks, scheduler="threads", num_workers=1))
    assert started == [b.start for b in bands]  # one worker: exactly the list's order
    ref, ref_part = _maps(stack, plan, (40, 52), params)
    for name in ref:
        if name == "rtn":
            continue  # a dithered statistic (its dither is per pixel, not per tile)
        np.testing.assert_allclose(sink.maps[name], ref[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert np.mean(sink.maps["rtn"] == ref["rtn"]) > 0.995
    assert partials.keys() == ref_part.keys()


# ----------------------------------------------------------------------------- read ahead


class _RecordingReader(ArrayReader):
    """ArrayReader that records the frame indices of every call, and on which thread."""

    def __init__(self, frames: np.ndarray) -> None:
        super().__init__(frames)
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def __call__(self, indices, ys, xs):
        import threading

        self.calls.append((tuple(indices), threading.current_thread().name))
        return super().__call__(indices, ys, xs)


@pytest.mark.parametrize("max_batch", [64, 3, 1])
def test_tile_loads_are_the_calls_of_process_tile(data, max_batch) -> None:
    stack, plan = data
    params = CalibrationParams(max_batch_frames=max_batch)
    calls: list[tuple[int, ...]] = []

    def load(indices):
        calls.append(tuple(indices))
        return stack[list(indices), :8, :8]

    process_tile(load, plan, params)
    assert calls == tile_loads(plan, max_batch)
    assert len(calls) == 1 + sum(-(-g.n // max_batch) for g in (*plan.darks, *plan.flats))
    # a one-frame bias stack is not loaded (no master bias from one frame)
    one = TilePlan(**{**plan.__dict__, "bias": FrameGroup("bias", 0.0, (0,)),
                      "bias_time_s": (0.0,), "bias_frame_level": (500.0,)})
    calls.clear()
    process_tile(load, one, params)
    assert calls == tile_loads(one, max_batch) and calls[0] != (0,)


@pytest.mark.parametrize("max_batch", [64, 3])
def test_read_ahead_gives_the_same_maps(data, max_batch) -> None:
    stack, plan = data
    params = CalibrationParams(max_batch_frames=max_batch)
    ref, ref_part = _maps(stack, plan, (16, 52), params)
    reader = _RecordingReader(stack)
    got, part = _maps(stack, plan, (16, 52), params, read_ahead=True, reader=reader)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert part == ref_part
    # each tile read each stack once, all but its first on the read-ahead thread
    expected = tile_loads(plan, max_batch)
    n_tiles = len(list(iter_tiles(stack.shape[1:], (16, 52))))
    assert sorted(c for c, _ in reader.calls) == sorted(expected * n_tiles)
    ahead = [c for c, thread in reader.calls if thread.startswith("sitiancal-read-ahead")]
    assert sorted(ahead) == sorted(expected[1:] * n_tiles)


def test_read_ahead_off_the_expected_sequence_and_errors() -> None:
    frames = np.arange(6 * 2 * 3, dtype=np.uint16).reshape(6, 2, 3)
    calls: list[tuple[int, ...]] = []

    def load(indices):
        calls.append(tuple(indices))
        if 5 in indices:
            raise OSError("disk error on frame 5")
        return frames[list(indices)]

    ahead = ReadAhead(load, [(0, 1), (2, 3), (4, 5)])
    try:
        np.testing.assert_array_equal(ahead([0, 1]), frames[[0, 1]])
        # not the expected next stack: read now, the read ahead (2, 3) is dropped
        np.testing.assert_array_equal(ahead([3]), frames[[3]])
        np.testing.assert_array_equal(ahead([2, 3]), frames[[2, 3]])
        # the read ahead of (4, 5) failed: its error is raised by the call asking for it
        with pytest.raises(OSError, match="frame 5"):
            ahead([4, 5])
    finally:
        ahead.close()
    assert calls == [(0, 1), (2, 3), (3,), (2, 3), (4, 5)]
    # a failed read ahead that nobody asks for is dropped silently
    ahead = ReadAhead(load, [(0,), (5,)])
    ahead([0])
    ahead.close()


def test_read_ahead_is_counted_in_the_task_memory(data) -> None:
    _, plan = data
    tile = (100, 100)
    base = tile_task_bytes(plan, tile, max_batch=64)
    ahead = tile_task_bytes(plan, tile, max_batch=64, read_ahead=True)
    # the worst pair: a flat level (10 frames, 4 B per frame pixel) reduced while the
    # next one is read (2 B), 60 B/px against the bias stack's 4 x 12 = 48 without
    assert largest_stack(plan, 64) == 12
    assert ahead - base == 100 * 100 * (4 * 10 + 2 * 10 - 4 * 12)
    # with batches of 3: the bias (12 frames) while the first dark batch (3) is read
    assert (tile_task_bytes(plan, tile, max_batch=3, read_ahead=True)
            - tile_task_bytes(plan, tile, max_batch=3)) == 100 * 100 * 2 * 3
