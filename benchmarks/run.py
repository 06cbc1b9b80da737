"""Full-scale benchmark of the sitiancal calibration pipeline (issue 6).

Runs scan, cube, plan, tile pass, product assembly and publish on a camera
set (reused with ``--frames-dir`` or simulated with ``--simulate``) and
reports per stage and end to end: wall time (s), input throughput (GB/s of
FITS files), pixel throughput (Gpix/s), peak RSS (GB, this process and its
children, sampled every 50 ms), and the ratio of the end-to-end time to two
baselines over the same files:

* ``numpy``: a plain-numpy single pass (per-pixel float64 sum and sum of
  squares per frame group, one frame in memory at a time, astropy read);
* ``read``: reading every file once (cold when the page cache can be dropped,
  otherwise warm; the JSON says which), ``--read-repeats`` times: the
  fastest is the physical limit the ratios use (a shared VM's disk varies
  run to run; all the times and their median are reported too).

The peer comparison runs ccdproc's ``combine`` (average, sigma clipping) on
the bias frames, against the pipeline's own master bias on the same frames.

Usage::

    python benchmarks/run.py --frames-dir /work/bench/raw --out bench-out
    python benchmarks/run.py --simulate --shape 512x768 --out /tmp/b
    python benchmarks/run.py --frames-dir DIR --scheduler-address tcp://127.0.0.1:8786
    python benchmarks/run.py --simulate --spawn-workers 2 --out /tmp/b

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

STAGES = ("scan", "cube", "plan", "tiles", "products", "publish")
BASELINES = ("read", "numpy", "ccdproc", "graph")


class RssSampler:
    """Sample the resident set size of this process and its children in a thread.

    Parameters
    ----------
    interval : float
        Sampling period, s.
    """

    #: Seconds between two listings of the child processes. Listing them scans
    #: every process of the machine (``/proc``): at each 50 ms sample that cost
    #: ~0.05 cores, taken from the pipeline being measured; the children here
    #: (an isolated run, dask workers) live for seconds to minutes.
    CHILDREN_EVERY = 1.0

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._peak = 0
        self._overall = 0
        self._children: list[psutil.Process] = []
        self._listed = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _rss(self) -> int:
        now = time.monotonic()
        if now - self._listed >= self.CHILDREN_EVERY:
            with contextlib.suppress(psutil.Error):
                self._children = self._proc.children(recursive=True)
            self._listed = now
        total = 0
        for p in [self._proc, *self._children]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            self._peak = max(self._peak, rss)
            self._overall = max(self._overall, rss)
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        """Start a new per-stage peak (bytes)."""
        self._peak = self._rss()

    @property
    def peak(self) -> int:
        """Peak RSS since the last :meth:`reset`, bytes."""
        return max(self._peak, self._rss())

    @property
    def overall(self) -> int:
        """Peak RSS since :meth:`start`, bytes."""
        return max(self._overall, self._rss())


def drop_caches() -> bool:
    """Try to drop the page cache (root only); return True when it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_once(paths: Sequence[str], block: int = 16 << 20) -> float:
    """Read every file once in ``block``-byte pieces; return the wall time, s."""
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def numpy_single_pass(groups: dict[str, list[tuple[str, int]]]) -> float:
    """Plain-numpy per-pixel float64 sum and sum of squares per frame group.

    One frame in memory at a time (astropy read, then a float64 copy).

    Parameters
    ----------
    groups : dict
        Group name -> list of ``(path, hdu)``.

    Returns
    -------
    float
        Wall time, s.
    """
    from astropy.io import fits

    t0 = time.perf_counter()
    for members in groups.values():
        s = ss = None
        for path, hdu in members:
            with fits.open(path, memmap=False) as hdul:
                frame = np.asarray(hdul[hdu].data, dtype=np.float64)
            if s is None:
                s = np.zeros_like(frame)
                ss = np.zeros_like(frame)
            s += frame
            ss += frame * frame
            del frame
        del s, ss
    return time.perf_counter() - t0


def ccdproc_master_bias(paths: Sequence[str], mem_limit: float) -> float:
    """ccdproc ``combine``: average with sigma clipping; return the wall time, s."""
    import warnings

    from astropy.utils.exceptions import AstropyWarning
    from ccdproc import combine

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        combine(list(paths), method="average", sigma_clip=True,
                sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                mem_limit=mem_limit, unit="adu", dtype=np.float32)
    return time.perf_counter() - t0


def master_bias_kernel(paths: Sequence[str], threads: int) -> float:
    """The master bias alone, as the tile pass computes it; return the wall time, s.

    The bias frames are read in place (``VirtualFrameReader`` over their FITS
    data blocks, the virtual cube's reader), one dask task per tile computes
    the per-pixel 3-sigma clipped mean (median centre, up to 5 iterations: more
    than ccdproc's single clip) with the compiled kernel, and the tiles fill
    one float32 map. No hashing, catalog or product files: those are in the
    whole-job figure. Runs on the local threaded scheduler with ``threads``,
    with the allocator settings of a job (run ``isolated(..., tuned=True)``).
    """
    import dask
    import numba

    from sitiancal.compute.graph import iter_tiles
    from sitiancal.compute.stats import sigma_clipped_stats
    from sitiancal.storage.cube import FrameSource, VirtualFrameReader, choose_tile

    t0 = time.perf_counter()
    sources = [FrameSource.of_file(str(p)) for p in paths]
    reader = VirtualFrameReader("bench", sources)
    shape = sources[0].shape
    master = np.empty(shape, dtype=np.float32)
    frames = list(range(len(sources)))

    # numba threads per task: the cores shared by the tasks that run at once, as
    # the tile pass does (process_tile's threads=), so that they do not oversubscribe
    per_task = max(1, (os.cpu_count() or 1) // max(1, threads))

    def one(ys: slice, xs: slice) -> None:
        numba.set_num_threads(min(per_task, numba.config.NUMBA_NUM_THREADS))
        master[ys, xs] = sigma_clipped_stats(reader(frames, ys, xs), sigma=3.0, maxiters=5).mean

    tasks = [dask.delayed(one)(ys, xs) for ys, xs in iter_tiles(shape, choose_tile(*shape))]
    dask.compute(*tasks, scheduler="threads", num_workers=threads)
    return time.perf_counter() - t0


@contextlib.contextmanager
def spawned_cluster(n_workers: int, workdir: Path) -> Iterator[str]:
    """Start ``dask scheduler`` and ``n_workers`` ``dask worker`` processes on loopback.

    Yields the scheduler address; the processes are terminated on exit.
    """
    # the modules rather than the ``dask`` script: works where packages were
    # installed without console scripts (pip --target)
    scheduler_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
    sched_file = workdir / "scheduler.json"
    procs: list[subprocess.Popen] = []
    log = open(workdir / "cluster.log", "w")  # closed in the finally clause
    try:
        procs.append(subprocess.Popen(
            [*scheduler_cmd, "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(sched_file)],
            stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start (see {workdir / 'cluster.log'})")
            time.sleep(0.2)
        # the workers' processes with a job's allocator settings, as deploy/ starts them;
        # the settings also replace any of the same variables in this process's
        # environment, which a nanny prefers over its configuration (an in-process
        # dask nanny, e.g. of a LocalCluster, leaves dask's defaults there)
        from sitiancal.compute.allocator import DASK_NANNY_ENVIRON, allocator_environment

        allocator = allocator_environment()
        worker_env = {**os.environ, **allocator, DASK_NANNY_ENVIRON: json.dumps(allocator)}
        for _ in range(n_workers):
            procs.append(subprocess.Popen(
                [*worker_cmd, "--scheduler-file", str(sched_file), "--nthreads", "1",
                 "--nworkers", "1", "--host", "127.0.0.1", "--dashboard-address", ":0",
                 "--local-directory", str(workdir / "dask-worker")],
                stdout=log, stderr=subprocess.STDOUT, env=worker_env))
        yield json.loads(sched_file.read_text())["address"]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def _cpu_times() -> tuple[float, float]:
    """CPU time of this process's threads so far: (user + system, system), s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def run_pipeline(frames_dir: Path, data_dir: Path, *, client: Any, sampler: RssSampler,
                 wanted: Sequence[str] | None = None) -> tuple[dict[str, dict[str, float]], Any]:
    """Scan, then run the calibration job body, timing each stage.

    Stage boundaries come from the job's progress reports (scan, cube, plan,
    tiles, products, publish, done).

    Returns
    -------
    stages : dict
        Stage -> ``{"wall_s", "cpu_s", "sys_s", "peak_rss_gb"}`` (``cpu_s``: CPU
        time of all the process's threads, s, of which ``sys_s`` in the kernel;
        ``cpu_s / wall_s`` is the cores kept busy).
    inventory : Inventory
        The scan result.
    """
    from sitiancal.service.pipeline import run_calibration_job
    from sitiancal.service.settings import Settings
    from sitiancal.storage.catalog import Catalog
    from sitiancal.storage.cube import frames_hashed_side_by_side
    from sitiancal.storage.scan import scan
    from sitiancal.storage.store import ProductStore

    marks: list[tuple[str, float, tuple[float, float], int]] = []  # stage, wall, CPU, peak

    def mark(stage: str) -> None:
        if marks and marks[-1][0] == stage:
            return
        now, cpu = time.perf_counter(), _cpu_times()
        if marks:  # close the previous stage's peak
            name, t, c, _ = marks[-1]
            marks[-1] = (name, t, c, sampler.peak)
        sampler.reset()
        marks.append((stage, now, cpu, 0))

    mark("scan")
    inventory = scan(frames_dir)
    if not inventory.frames:
        raise SystemExit(f"error: {frames_dir}: no usable frame")
    settings = Settings(data_dir=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.open(settings.catalog_url)
    try:
        store = ProductStore(settings.product_store_url)
        dataset_id = catalog.add_dataset("BENCH", inventory, source=str(frames_dir), actor="bench")
        job = catalog.create_job("BENCH", dataset_id, products=tuple(wanted or ()), params={},
                                 force=True, actor="bench")
        mark("cube")
        run_calibration_job(catalog=catalog, store=store, settings=settings, job_id=job.id,
                            client=client,
                            progress=lambda stage, fraction: mark(stage) if stage in STAGES
                            else None)
        mark("done")
        side_by_side = frames_hashed_side_by_side(inventory.frames)  # as the build chose
    finally:
        catalog.close()
    stages: dict[str, dict[str, float]] = {}
    for (name, t, c, peak), (_, t_next, c_next, _) in itertools.pairwise(marks):
        stages[name] = {"wall_s": t_next - t, "cpu_s": c_next[0] - c[0],
                        "sys_s": c_next[1] - c[1], "peak_rss_gb": peak / 1e9}
    if "cube" in stages:
        stages["cube"]["frames_hashed_side_by_side"] = float(side_by_side)
    return stages, inventory


def graph_construction(shape: tuple[int, int], n_frames: int = 300) -> dict[str, float]:
    """Seconds to build the tile graph of an ``n_frames`` cube of ``shape`` (nothing computed).

    The plan splits the frames into a bias stack, five dark times and ten flat
    levels; the reader and sink refuse to be called, and dask's scheduler is
    replaced by one that refuses to run, so only graph construction is timed.
    """
    import dask

    from sitiancal.compute.graph import build_tile_graph
    from sitiancal.compute.tile import CalibrationParams, FrameGroup, TilePlan
    from sitiancal.storage.cube import choose_tile

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("graph construction computed something")

    per = n_frames // 3
    bias, darks, flats = (tuple(range(i * per, (i + 1) * per)) for i in range(3))
    plan = TilePlan(
        bias=FrameGroup("bias", 0.0, bias), bias_time_s=tuple(float(i) for i in range(per)),
        bias_frame_level=(500.0,) * per,
        darks=tuple(FrameGroup("dark", float(t), darks[k::5]) for k, t in enumerate((1, 2, 3, 4, 5))),
        flats=tuple(FrameGroup("flat", float(t), flats[k::10], (1.0,) * len(flats[k::10]))
                    for k, t in enumerate(range(1, 11))),
        flat_dark=(None,) * 10, saturation=60000.0, gain_levels=(True,) * 10,
        lin_used=(True,) * 10, lin_at=(0, 5, 9), flat_ref=5)
    tile = choose_tile(*shape)
    with dask.config.set(scheduler=refuse):
        t0 = time.perf_counter()
        tasks = build_tile_graph(refuse, refuse, shape=shape, tile=tile, plan=plan,
                                 params=CalibrationParams())
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "n_frames": float(n_frames), "tasks": float(len(tasks))}


def _in_child(fn: Any, args: tuple, with_sampler: bool, tuned: bool) -> tuple[Any, int]:
    """Child side of :func:`isolated`: run ``fn`` while sampling this process tree's RSS."""
    if tuned:
        from sitiancal.compute.allocator import keep_freed_memory

        # as the CLI and the service do, before this process's first thread (the
        # sampler): a thread started later can otherwise be handed the sampler's
        # malloc arena, whose large arrays are mapped and zeroed afresh each time
        keep_freed_memory()
    sampler = RssSampler().start()
    try:
        result = fn(*args, sampler) if with_sampler else fn(*args)
        return result, sampler.overall
    finally:
        sampler.stop()


def isolated(fn: Any, *args: Any, with_sampler: bool = False,
             tuned: bool = False) -> tuple[Any, float]:
    """Run ``fn(*args)`` in a fresh (spawned) Python process; return its result and peak RSS.

    Each measurement starts from a new interpreter, so its peak resident set
    size (GB, the process and its children) holds only what it allocated, not
    what an earlier measurement left in this process's heap. With
    ``with_sampler`` the child's :class:`RssSampler` is passed as the last
    argument (for per-stage peaks). ``tuned``: the child starts with a job's
    allocator settings (``keep_freed_memory``, as the CLI and the service
    do); the baselines (read, numpy pass, ccdproc) run with glibc's defaults,
    as their users would run them.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, peak = pool.submit(_in_child, fn, args, with_sampler, tuned).result()
    return result, peak / 1e9


def pipeline_run(frames_dir: Path, data_dir: Path, address: str | None, threads: int,
                 wanted: Sequence[str] | None, sampler: RssSampler
                 ) -> tuple[dict[str, dict[str, float]], float, list[str], dict[str, float] | None]:
    """:func:`run_pipeline` on the threaded scheduler (``threads``) or a dask scheduler.

    Returns the per-stage figures, the end-to-end wall time, s (the package
    is imported first: interpreter start-up is not a pipeline stage), the
    kernels numba compiled in this process during the run (one entry per
    signature; a filled cache, ``sitiancal compile``, leaves none: compiling
    a whole job takes ~1.5-2 min of one core, which the figures would include),
    and the speed-ups of the side-by-side SHA-256 kernels over hashlib measured
    by the cube build (:func:`sitiancal.storage.digest.lane_speedups`; None
    where not measured).
    """
    import dask

    import sitiancal.service.pipeline
    import sitiancal.storage.catalog
    import sitiancal.storage.scan  # noqa: F401
    from sitiancal.service.precompile import compile_events

    with contextlib.ExitStack() as stack:
        client = None
        if address:
            from distributed import Client

            client = stack.enter_context(Client(address, timeout="60s"))
        else:
            stack.enter_context(dask.config.set(num_workers=threads))
        with compile_events() as compiled:
            t0 = time.perf_counter()
            stages, _ = run_pipeline(frames_dir, data_dir, client=client, sampler=sampler,
                                     wanted=wanted)
            wall = time.perf_counter() - t0
        from sitiancal.storage import digest

        return stages, wall, compiled, (digest._SPEEDUPS or [None])[0]


def _compile_note(compiled: Sequence[str], *, distributed: bool) -> str:
    """The results' note on what numba compiled during the pipeline run."""
    where = "in this process (the workers' are not counted)" if distributed else "during the run"
    if not compiled:
        return f"no kernel compiled {where}: numba's cache held them all"
    return (f"numba compiled {len(set(compiled))} kernels ({len(compiled)} signatures) {where}: "
            "its cache lacked them and the figures include compiling them (`sitiancal compile`)")


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def cpu_floor_note(result: dict[str, Any]) -> str | None:
    """What the job's CPU time alone allows: its busy core-seconds over the machine's cores.

    The wall time of a run can come near its read baseline only while the
    CPU work fits in that time: busy core-s / cores is the least wall time
    the stages' CPU work takes however well the cores are kept busy. Given
    for runs on the local threaded scheduler only (a cluster's workers are
    other processes on other machines).
    """
    e2e = result.get("end_to_end")
    if not e2e or "cpu_s" not in e2e or not str(result.get("scheduler", "")).startswith("threads"):
        return None
    cores = int(result["machine"]["cpus"])
    parts = ", ".join(f"{name} {s['cpu_s']:.1f}" for name, s in result["stages"].items()
                      if "cpu_s" in s)
    note = (f"Busy core-s: {e2e['cpu_s']:.1f} ({parts}): on {cores} cores at least "
            f"{e2e['cpu_s'] / cores:.1f} s however well they are kept busy")
    read_s = result["baselines"].get("read", {}).get("wall_s")
    if read_s:
        note += f"; 3x the read once is {3 * read_s:.1f} s"
    return note + "."


def markdown(result: dict[str, Any]) -> str:
    """Render the result as a markdown table (plus a header line and notes)."""
    m = result["machine"]
    lines = [f"Benchmark {result['date']} on {m['cpus']} cores, {m['memory_gb']:.0f} GB "
             f"({m['platform']}); {result['n_frames']} frames of {result['shape'][0]}x"
             f"{result['shape'][1]} ({result['input_gb']:.2f} GB, {result['gpix']:.2f} Gpix); "
             f"scheduler: {result['scheduler']}; memory limit {result['memory_limit_gb']} GB.",
             "",
             "| stage | wall (s) | cores busy (of which system) | input GB/s | Gpix/s | peak RSS (GB) | x numpy pass "
             "| x read once |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    numpy_s = result["baselines"].get("numpy", {}).get("wall_s")
    read_s = result["baselines"].get("read", {}).get("wall_s")

    def row(name: str, s: dict[str, float]) -> str:
        w = s["wall_s"]
        rn = f"{w / numpy_s:.2f}" if numpy_s else "-"
        rr = f"{w / read_s:.2f}" if read_s else "-"
        busy = (f"{s['cpu_s'] / w:.2f} ({s['sys_s'] / w:.2f})" if "cpu_s" in s and w > 0
                else "-")
        return (f"| {name} | {w:.1f} | {busy} | {s['input_gbps']:.3f} | {s['gpixps']:.3f} | "
                f"{s['peak_rss_gb']:.2f} | {rn} | {rr} |")

    for name, s in result["stages"].items():
        lines.append(row(name, s))
    if "end_to_end" in result:
        lines.append(row("**end to end**", result["end_to_end"]))
    for name, s in result["baselines"].items():
        if name == "ccdproc":
            continue
        lines.append(row(f"baseline: {name}" + (f" ({s['cache']})" if "cache" in s else ""), s))
    mb = result.get("master_bias")
    if mb:
        lines += ["", "| master bias, " + f"{mb['n_frames']} frames | wall (s) | Gpix/s | "
                  "peak RSS (GB) |", "|---|---:|---:|---:|"]
        labels = {"kernel": "sitiancal master-bias kernel (frames read in place, clipped mean)",
                  "sitiancal": "sitiancal whole job on the bias frames (bias product, published)",
                  "ccdproc": "ccdproc `combine` (average, 3-sigma clip)"}
        for name, label in labels.items():
            if name in mb:
                s = mb[name]
                lines.append(f"| {label} | {s['wall_s']:.1f} | {s['gpixps']:.3f} | "
                             f"{s['peak_rss_gb']:.2f} |")
        for key, label in (("kernel_speedup", "kernel"), ("speedup", "whole job")):
            if key in mb:
                lines.append(f"| speed-up vs ccdproc, {label} | {mb[key]:.1f}x | | |")
    floor = cpu_floor_note(result)
    if floor:
        lines += ["", floor]
    graph = result.get("graph")
    if graph:
        lines += ["", f"Graph construction for a {graph['n_frames']:.0f}-frame cube of this "
                  f"shape: {graph['wall_s'] * 1e3:.0f} ms ({graph['tasks']:.0f} tile tasks, "
                  "nothing computed)."]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--frames-dir", type=Path, help="reuse the FITS frames in this folder")
    src.add_argument("--simulate", action="store_true",
                     help="simulate a set into OUT/raw (see --shape and the frame counts)")
    p.add_argument("--shape", default="6388x9576", help="simulated frame shape, ROWSxCOLS")
    p.add_argument("--bias", type=int, default=12, help="simulated bias frames")
    p.add_argument("--darks", default="0,60,300", help="simulated dark exposure times, s")
    p.add_argument("--dark-frames", type=int, default=3, help="simulated dark frames per time")
    p.add_argument("--flat-levels", type=int, default=8, help="simulated flat levels")
    p.add_argument("--flat-frames", type=int, default=6, help="simulated flat frames per level")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="results folder")
    p.add_argument("--memory-limit", type=float, default=4.0,
                   help="memory limit, GB: bounds the threads of the local run and ccdproc's "
                   "mem_limit; the peak RSS reached is reported against it")
    p.add_argument("--scheduler-address", help="run on this dask scheduler (tcp://...)")
    p.add_argument("--spawn-workers", type=int, default=0,
                   help="start a dask scheduler and N single-thread workers on loopback")
    p.add_argument("--stages", default=",".join(STAGES + BASELINES),
                   help="comma-separated subset of: pipeline stages (any one runs the whole "
                   "pipeline), read, numpy, ccdproc")
    p.add_argument("--read-repeats", type=int, default=3,
                   help="times the read-once baseline is measured; the fastest is used")
    p.add_argument("--keep", action="store_true", help="keep the cube and product store")
    args = p.parse_args(argv)
    if not args.frames_dir and not args.simulate:
        p.error("give --frames-dir DIR or --simulate")
    if args.read_repeats < 1:
        p.error("--read-repeats must be at least 1")
    if args.frames_dir and not args.frames_dir.is_dir():
        p.error(f"--frames-dir {args.frames_dir}: not a folder")
    if args.memory_limit <= 0:
        p.error("--memory-limit must be > 0")
    unknown = set(args.stages.split(",")) - set(STAGES + BASELINES)
    if unknown:
        p.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import dask

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wanted_stages = set(args.stages.split(","))
    notes: list[str] = []
    if args.simulate:
        from sitiancal.compute.simulate import SimulationConfig, simulate_dataset

        rows, cols = (int(v) for v in args.shape.lower().split("x"))
        frames_dir = out / "raw"
        if not (frames_dir / "truth.fits").exists():
            simulate_dataset(frames_dir, SimulationConfig(
                shape=(rows, cols), n_bias=args.bias,
                dark_exptimes=[float(v) for v in args.darks.split(",")],
                dark_frames=args.dark_frames, flat_levels=args.flat_levels,
                flat_frames=args.flat_frames))
    else:
        frames_dir = args.frames_dir

    from sitiancal.storage.scan import scan

    inventory = scan(frames_dir)
    if not inventory.frames:
        raise SystemExit(f"error: {frames_dir}: no usable frame")
    paths = [f.path for f in inventory.frames]
    input_bytes = float(sum(os.path.getsize(p) for p in paths))
    ny, nx = inventory.shape
    npix = float(ny * nx * len(paths))
    cpus = os.cpu_count() or 1
    limit = args.memory_limit * 1e9
    # about 0.25 GB per cube thread and ~0.5 GB per tile-pass thread at 61 MP, plus a base
    per_thread = max(0.05e9, 0.6 * ny * nx * 8)
    threads = max(1, min(cpus, int((limit - 1.0e9) // per_thread)))
    sampler = RssSampler().start()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": cpus, "memory_gb": psutil.virtual_memory().total / 1e9,
                    "platform": platform.platform(terse=True), "python": platform.python_version()},
        "frames_dir": str(frames_dir), "n_frames": len(paths), "shape": [ny, nx],
        "input_gb": input_bytes / 1e9, "gpix": npix / 1e9,
        "memory_limit_gb": args.memory_limit, "threads": threads,
        "stages": {}, "baselines": {}, "notes": notes,
    }

    def add_rates(s: dict[str, float], nbytes: float = input_bytes, n: float = npix) -> None:
        s["input_gbps"] = _rate(nbytes / 1e9, s["wall_s"])
        s["gpixps"] = _rate(n / 1e9, s["wall_s"])

    if "graph" in wanted_stages:
        result["graph"] = graph_construction((ny, nx))
    if "read" in wanted_stages:
        runs, peaks, colds = [], [], []
        for _ in range(args.read_repeats):
            colds.append(drop_caches())
            wall, peak = isolated(read_once, paths)
            runs.append(wall)
            peaks.append(peak)
        s = {"wall_s": min(runs), "runs_s": runs, "median_s": float(np.median(runs)),
             "cache": "cold" if all(colds) else "warm", "peak_rss_gb": max(peaks)}
        add_rates(s)
        result["baselines"]["read"] = s
        if len(runs) > 1:
            notes.append(f"read once, {len(runs)} runs: "
                         + ", ".join(f"{w:.1f}" for w in runs)
                         + f" s (median {s['median_s']:.1f} s); the ratios use the fastest")
    if "numpy" in wanted_stages:
        groups: dict[str, list[tuple[str, int]]] = {}
        for f in inventory.frames:
            groups.setdefault(f"{f.type}-{f.exptime:g}", []).append((f.path, f.hdu))
        cold = drop_caches()
        wall, peak = isolated(numpy_single_pass, groups)
        s = {"wall_s": wall, "cache": "cold" if cold else "warm", "peak_rss_gb": peak}
        add_rates(s)
        result["baselines"]["numpy"] = s

    work = Path(tempfile.mkdtemp(prefix="sitiancal-bench-", dir=out))
    try:
        with contextlib.ExitStack() as stack:
            client = None
            address = args.scheduler_address
            if args.spawn_workers > 0:
                address = stack.enter_context(spawned_cluster(args.spawn_workers, work))
            if address:
                from distributed import Client

                client = stack.enter_context(Client(address, timeout="60s"))
                if args.spawn_workers > 0:
                    client.wait_for_workers(args.spawn_workers, timeout=120)
                n_workers = len(client.scheduler_info()["workers"])
                result["scheduler"] = f"distributed {address}, {n_workers} workers"
                result["n_workers"] = n_workers
            else:
                result["scheduler"] = f"threads ({threads})"
                stack.enter_context(dask.config.set(num_workers=threads))
            if wanted_stages & set(STAGES):
                if drop_caches():
                    notes.append("pipeline started with a cold page cache")
                else:
                    notes.append("page cache could not be dropped (not root): warm cache")
                (stages, total, compiled, lanes), _ = isolated(
                    pipeline_run, frames_dir, work / "pipeline", address, threads, None,
                    with_sampler=True, tuned=True)
                result["compiled_during_run"] = compiled
                notes.append(_compile_note(compiled, distributed=bool(address)))
                if "cube" in stages:
                    result["lane_hash_speedups"] = lanes
                    side = int(stages["cube"].get("frames_hashed_side_by_side", 0))
                    speed = ("; ".join(f"{k} kernel {v:.2f}x" for k, v in lanes.items())
                             + " hashlib's speed here") if lanes else "not measured"
                    notes.append(f"cube: {side} of {len(paths)} frames hashed side by side "
                                 f"(SHA-256 of several files at once: {speed})")
                for s in stages.values():
                    add_rates(s)
                result["stages"] = stages
                e2e = {"wall_s": total, "cpu_s": sum(s["cpu_s"] for s in stages.values()),
                       "sys_s": sum(s["sys_s"] for s in stages.values()),
                       "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values())}
                add_rates(e2e)
                result["end_to_end"] = e2e
                if not args.keep:
                    shutil.rmtree(work / "pipeline", ignore_errors=True)
            if "ccdproc" in wanted_stages:
                result["master_bias"] = master_bias(inventory, work, address,
                                                    args.memory_limit, ny * nx, threads)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        sampler.stop()
    result["peak_rss_gb"] = sampler.overall / 1e9
    e2e = result.get("end_to_end")
    if e2e:
        for name, key in (("numpy", "x_numpy"), ("read", "x_read")):
            if name in result["baselines"]:
                e2e[key] = e2e["wall_s"] / result["baselines"][name]["wall_s"]
        e2e["within_memory_limit"] = e2e["peak_rss_gb"] <= args.memory_limit
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "results.md").write_text(table)
    print(table)
    return result


def master_bias(inventory: Any, work: Path, address: str | None, mem_limit_gb: float,
                frame_pix: int, threads: int) -> dict[str, Any]:
    """Our master bias against ccdproc's combine, each from a cold page cache in its own process.

    Two figures of ours: the whole job on the bias frames alone (scan, hashing,
    plan, the tile pass with RTN and trends, the bias product with its FITS
    file, publication) and the master-bias kernel alone
    (:func:`master_bias_kernel`), which computes what ``combine`` computes.
    """
    bias = [f.path for f in inventory.frames if f.type == "bias"]
    out: dict[str, Any] = {"n_frames": len(bias)}
    if not bias:
        return out
    npix = float(len(bias) * frame_pix)
    bias_dir = work / "bias-only"
    bias_dir.mkdir(parents=True, exist_ok=True)
    for p in bias:
        link = bias_dir / Path(p).name
        if not link.exists():
            link.symlink_to(p)

    def figure(wall: float, peak: float) -> dict[str, float]:
        return {"wall_s": wall, "gpixps": npix / 1e9 / wall, "peak_rss_gb": peak}

    drop_caches()
    (_, wall, _, _), peak = isolated(pipeline_run, bias_dir, work / "bias-pipeline", address,
                               threads, ("bias",), with_sampler=True, tuned=True)
    out["sitiancal"] = figure(wall, peak)
    shutil.rmtree(work / "bias-pipeline", ignore_errors=True)
    drop_caches()
    out["kernel"] = figure(*isolated(master_bias_kernel, bias, threads, tuned=True))
    drop_caches()
    out["ccdproc"] = figure(*isolated(ccdproc_master_bias, bias, mem_limit_gb * 1e9))
    out["speedup"] = out["ccdproc"]["wall_s"] / out["sitiancal"]["wall_s"]
    out["kernel_speedup"] = out["ccdproc"]["wall_s"] / out["kernel"]["wall_s"]
    return out

if __name__ == "__main__":
    main()
