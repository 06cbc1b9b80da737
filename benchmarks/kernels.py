"""Throughput of the per-pixel kernels and of one tile of the tile pass (issue 6).

Data in memory, synthetic uint16 frames (bias level, read noise, cosmic-ray
hits, hot and telegraph pixels, dark and flat ladders), so the script needs no
files and no astropy (the astropy reference of ``sigma_clipped_stats`` is
timed only where astropy is installed). For each kernel it prints the best
wall time of ``--repeat`` runs and the throughput in Gpix/s (frames x pixels
per second) for the compiled kernel (``backend="auto"``) and the numpy
reference (``backend="numpy"``):

* ``group_moments`` (uint16 exact integer path, and with an offset map and
  per-frame scale, the flat path);
* ``sigma_clipped_stats`` (3 sigma, 5 iterations, median centre) and the
  fused ``clipped_stats_and_moments`` of the bias stack;
* ``process_tile`` on a tile-sized data set (12 bias, 3 x 3 darks at
  0/60/300 s, 8 flat levels x 6 frames, like ``sitiancal simulate --bias 12
  --darks 0,60,300 --dark-frames 3 --flat-levels 8 --flat-frames 6``), alone
  and two tiles at once on two Python threads (as the dask threaded
  scheduler runs them), with all numba threads per task and with half of
  them per task (``process_tile(..., threads=...)``).

Usage::

    python benchmarks/kernels.py                      # 32 x 1597 x 1368, then a tile
    python benchmarks/kernels.py --threads 2 --full-frames 12   # + 12 x 61 MP frames
    python benchmarks/kernels.py --frames 50 --repeat 5 --skip-tile

Gpix/s = F * P / seconds. ``--threads`` sets numba's thread count (default:
numba's, i.e. the CPU count or ``NUMBA_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from sitiancal.compute.stats import clipped_stats_and_moments, group_moments, sigma_clipped_stats
from sitiancal.compute.tile import CalibrationParams, FrameGroup, TilePlan, process_tile

#: Bias level (ADU) and read noise (ADU) of the synthetic frames (IMX455-like).
_BIAS_ADU = 500.0
_READ_ADU = 4.0
#: Gain (e-/ADU) of the synthetic flats.
_GAIN = 0.25


def _shape(text: str) -> tuple[int, int]:
    ny, nx = text.lower().split("x")
    return int(ny), int(nx)


class _Frames:
    """Fast synthetic frames: a fixed pattern plus slices of one noise pool at random offsets."""

    def __init__(self, shape: tuple[int, int], seed: int) -> None:
        self.shape = shape
        self.size = shape[0] * shape[1]
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(self.size + 65_536, dtype=np.float32)
        self.pattern = (_BIAS_ADU + self.rng.normal(0.0, 2.0, self.size)).astype(np.float32)
        self.hot = self.rng.random(self.size) < 1e-3  # hot pixels: dark rate x 100
        self.rtn = np.flatnonzero(self.rng.random(self.size) < 2e-4)  # telegraph pixels

    def frame(self, signal: float | np.ndarray, noise: float | np.ndarray, *,
              hit_rate: float = 5e-4) -> np.ndarray:
        """One uint16 frame: pattern + signal + noise * N(0, 1) + cosmic rays + RTN jumps.

        ``hit_rate``: fraction of pixels hit by a cosmic ray (5e-4: a stress
        test of the clip; ~1e-5 for a short exposure).
        """
        off = int(self.rng.integers(0, 65_536))
        x = self.pattern + signal + np.asarray(noise, np.float32) * self.pool[off:off + self.size]
        hits = self.rng.integers(0, self.size, int(self.size * hit_rate))
        x[hits] += self.rng.uniform(50.0, 2000.0, hits.size).astype(np.float32)
        x[self.rtn] += np.where(self.rng.random(self.rtn.size) < 0.5, 8.0 * _READ_ADU, 0.0)
        return np.clip(np.rint(x), 0, 65535).astype(np.uint16).reshape(self.shape)

    def stack(self, n: int, signal: float = 0.0) -> np.ndarray:
        """``(n, ny, nx)`` uint16 bias-like frames."""
        return np.stack([self.frame(signal, _READ_ADU) for _ in range(n)])


def tile_dataset(shape: tuple[int, int], seed: int = 1) -> tuple[np.ndarray, TilePlan]:
    """A tile-sized data set in memory and its :class:`TilePlan`.

    12 bias frames; darks at 0, 60, 300 s (3 each; rate 0.02 ADU/s, hot
    pixels 2 ADU/s); 8 flat levels x 6 frames from ~1000 to ~45000 ADU with
    shot noise (gain 0.25 e-/ADU) and per-frame illumination scatter; 2e-4
    telegraph pixels; cosmic rays at 1e-5 of the pixels per short frame.
    """
    gen = _Frames(shape, seed)
    rate = np.where(gen.hot, 2.0, 0.02).astype(np.float32)
    frames: list[np.ndarray] = []
    bias = tuple(range(12))
    frames += [gen.frame(0.0, _READ_ADU, hit_rate=1e-5) for _ in bias]
    darks = []
    for t in (0.0, 60.0, 300.0):
        idx = tuple(range(len(frames), len(frames) + 3))
        frames += [gen.frame(rate * t, np.sqrt(_READ_ADU**2 + rate * t / _GAIN),
                             hit_rate=1e-5 + 2e-7 * t) for _ in idx]
        darks.append(FrameGroup("dark", t, idx))
    flats = []
    times = np.array([0.248, 1.355, 2.461, 3.568, 4.675, 5.782, 7.434, 10.737])
    for t in times:
        idx = tuple(range(len(frames), len(frames) + 6))
        scale = 1.0 + gen.rng.normal(0.0, 0.003, len(idx))
        for s in scale:
            signal = 4200.0 * t / s
            frames.append(gen.frame(signal, np.sqrt(_READ_ADU**2 + signal / _GAIN), hit_rate=1e-5))
        flats.append(FrameGroup("flat", float(t), idx, tuple(float(s) for s in scale)))
    plan = TilePlan(
        bias=FrameGroup("bias", 0.0, bias),
        bias_time_s=tuple(2.0 * i for i in range(len(bias))),
        bias_frame_level=tuple(_BIAS_ADU + gen.rng.normal(0.0, 0.02, len(bias))),
        darks=tuple(darks), flats=tuple(flats), flat_dark=(None,) * len(flats),
        saturation=52000.0, gain_levels=(True,) * 5 + (False,) * 3,
        lin_used=(False,) + (True,) * 5 + (False,) * 2, lin_at=(1, 3, 5), flat_ref=3,
        linearizer=(1.0, 0.0),
    )
    return np.stack(frames), plan


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time (s) of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _row(name: str, n_values: float, fast: float | None, ref: float | None) -> None:
    def fmt(t: float | None) -> str:
        return "        -" if t is None else f"{t:8.3f}s {n_values / t / 1e9:7.3f}"

    ratio = f"{ref / fast:6.1f}x" if fast and ref else "      -"
    print(f"{name:42s} {fmt(fast)}   {fmt(ref)}   {ratio}")


def bench_kernels(stack: np.ndarray, repeat: int, *, numpy_ref: bool) -> None:
    """Time the statistics kernels on one in-memory stack."""
    n_f = stack.shape[0]
    n = float(stack.size)
    print(f"\nstack {n_f} x {stack.shape[1]} x {stack.shape[2]} uint16 "
          f"({stack.nbytes / 1e9:.2f} GB), {numba.get_num_threads()} numba threads")
    print(f"{'kernel':42s} {'numba: s    Gpix/s':>18s}   {'numpy: s    Gpix/s':>18s}   speedup")
    rng = np.random.default_rng(0)
    offset = _BIAS_ADU + rng.normal(0.0, 1.0, stack.shape[1:])
    scale = 1.0 + rng.normal(0.0, 0.003, n_f)
    ref_t = (lambda fn: _best(fn, max(1, repeat // 2))) if numpy_ref else (lambda fn: None)
    _row("group_moments (uint16, exact)", n, _best(lambda: group_moments(stack), repeat),
         ref_t(lambda: group_moments(stack, backend="numpy")))
    _row("group_moments (offset map, frame scale)", n,
         _best(lambda: group_moments(stack, offset=offset, scale=scale), repeat),
         ref_t(lambda: group_moments(stack, offset=offset, scale=scale, backend="numpy")))
    fast = _best(lambda: sigma_clipped_stats(stack), repeat)
    ref = None
    if numpy_ref and importlib.util.find_spec("astropy") is not None:
        # astropy works on float64 copies (8 bytes per value): time a slice of the pixels
        sub = np.ascontiguousarray(stack[:, : max(1, stack.shape[1] // 8)])
        ref = _best(lambda: sigma_clipped_stats(sub, backend="numpy"), 1) * stack.size / sub.size
    _row("sigma_clipped_stats (3 sigma, 5 iter)", n, fast, ref)
    _row("clipped_stats_and_moments (fused)", n,
         _best(lambda: clipped_stats_and_moments(stack), repeat),
         None if ref is None else ref + ref_t(lambda: group_moments(stack, backend="numpy")))


def bench_tile(shape: tuple[int, int], repeat: int) -> None:
    """Time ``process_tile`` alone and two tiles at once on two Python threads."""
    frames, plan = tile_dataset(shape)
    params = CalibrationParams()
    n_f = frames.shape[0]
    n = float(frames.size)

    def load(idx):  # the cube reader returns a fresh (F, ty, tx) array per group
        return frames[list(idx)]

    print(f"\nprocess_tile: {n_f} frames x {shape[0]} x {shape[1]} "
          f"({frames.nbytes / 1e9:.2f} GB in memory), {numba.get_num_threads()} numba threads")
    t1 = _best(lambda: process_tile(load, plan, params), repeat)
    print(f"{'one tile':42s} {t1:8.3f}s {n / t1 / 1e9:7.3f} Gpix/s")
    threads = numba.get_num_threads()
    for per_task in sorted({threads, max(1, threads // 2)}, reverse=True):
        with ThreadPoolExecutor(2) as pool:
            def pair(per_task: int = per_task) -> None:
                list(pool.map(lambda _: process_tile(load, plan, params, threads=per_task),
                              range(2)))
            t2 = _best(pair, repeat)
        print(f"{'two tiles at once, ' + str(per_task) + ' numba thread(s) each':42s} "
              f"{t2:8.3f}s {2 * n / t2 / 1e9:7.3f} Gpix/s  ({t2 / 2:.3f} s per tile)")


def bench_graph(n_frames: int = 300, shape: tuple[int, int] = (6388, 9576),
                tile: tuple[int, int] = (1597, 1368)) -> None:
    """Time building the tile graph of a full-size cube of ``n_frames`` frames (nothing runs)."""
    from sitiancal.compute.graph import MemorySink, build_tile_graph

    per = n_frames // 3
    bias, darks, flats = (tuple(range(i * per, (i + 1) * per)) for i in range(3))
    plan = TilePlan(
        bias=FrameGroup("bias", 0.0, bias), bias_time_s=tuple(map(float, range(per))),
        bias_frame_level=(500.0,) * per,
        darks=tuple(FrameGroup("dark", float(t), darks[k::5]) for k, t in enumerate(range(1, 6))),
        flats=tuple(FrameGroup("flat", float(t), flats[k::10], (1.0,) * len(flats[k::10]))
                    for k, t in enumerate(range(1, 11))),
        flat_dark=(None,) * 10, saturation=60000.0, gain_levels=(True,) * 10,
        lin_used=(True,) * 10, lin_at=(0, 5, 9), flat_ref=5)

    def reader(indices, ys, xs):  # never called: building reads nothing
        raise AssertionError("pixels read while building the graph")

    best = min(_time_once(lambda: build_tile_graph(reader, MemorySink((1, 1)), shape=shape,
                                                   tile=tile, plan=plan,
                                                   params=CalibrationParams()))
               for _ in range(5))
    print(f"\ngraph construction, {n_frames} frames of {shape[0]} x {shape[1]}: "
          f"{best * 1e3:.1f} ms (target < 1 s)")


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=32, help="frames of the kernel stack")
    ap.add_argument("--shape", type=_shape, default=(1597, 1368), help="tile shape NYxNX")
    ap.add_argument("--full-frames", type=int, default=0,
                    help="also time a stack of this many full frames (0: skip; 12 needs 1.5 GB)")
    ap.add_argument("--full-shape", type=_shape, default=(6388, 9576), help="full frame NYxNX")
    ap.add_argument("--threads", type=int, default=None, help="numba threads")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per kernel (best is kept)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy reference timings")
    ap.add_argument("--skip-tile", action="store_true", help="skip process_tile")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numba {numba.__version__} ({numba.config.THREADING_LAYER} layer), numpy {np.__version__}")
    bench_kernels(_Frames(args.shape, 0).stack(args.frames), args.repeat,
                  numpy_ref=not args.no_numpy)
    if args.full_frames:
        bench_kernels(_Frames(args.full_shape, 0).stack(args.full_frames), max(1, args.repeat - 1),
                      numpy_ref=not args.no_numpy)
    if not args.skip_tile:
        bench_tile(args.shape, args.repeat)
    bench_graph()


if __name__ == "__main__":
    main()
