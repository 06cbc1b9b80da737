"""Compile the calibration job's numba kernels into numba's on-disk cache, ahead of a job.

numba compiles a kernel at its first call with a new signature and keeps the
machine code in its cache (``cache=True``; ``__pycache__`` beside the sources
where that is writable, else ``NUMBA_CACHE_DIR`` or a per-user folder). A job
that finds the cache empty compiles every kernel it meets: on a 2-core Intel
Xeon VM the compilation of a whole job took 87-114 s of one core (numba
compiles one kernel at a time), and the compiler's memory (~0.6 GB), kept by the
allocator settings of a job (:func:`sitiancal.compute.allocator.keep_freed_memory`),
added to the job's own: a full-size 300-frame job with an empty cache took
254.6 s and peaked at 4.03 GB against 168.0 s and 2.94 GB with a warm one
(measured; ``benchmarks/results-*.md``). A fresh container image, a new
worker machine or a new installation starts with an empty cache.

:func:`precompile` fills the cache the way a job would: it runs the whole
calibration (scan, cube, plan, tile pass, products, publish) on a small
simulated camera in a temporary folder on the embedded default, and then
calls the kernels whose signatures a small set does not reach: the decoding
of FITS words from windows of read-only and writable buffers (a full-size
tile pass reads bands of frames through both), both candidates of each sort
whose backend is chosen by timing on the machine
(:func:`sitiancal.compute.summary.sort_backend`) and the mixture
classification of float32 and float64 data. A signature that neither
reaches (data of another type, say) is still compiled at its first call. ``sitiancal compile`` is
this function; run it after installing and when building an image.

The cache is keyed by the kernels' sources and by the CPU (its name and
features): a cache built on another CPU model is not used, and the job
compiles for its own (deploy/settings.md).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numba.core import event

if TYPE_CHECKING:
    from sitiancal.service.settings import Settings

#: The small camera of :func:`precompile`: every product of a full set (bias,
#: read noise, dark, PTC, per-pixel gain, linearity, flat, mask), RTN tests
#: included (16 bias frames >= ``rtn_min_frames``). Its frames (1.18 Mpx) are
#: larger than the size above which kernels switch to their parallel variants
#: (``2**20`` pixels of a map) and its tiles larger than the RTN test's pixel
#: chunks (``2**18``), so the job calls the kernels of a full-size one.
PRECOMPILE_CAMERA = {
    "shape": (1024, 1152), "seed": 7, "n_bias": 16, "dark_exptimes": [0.0, 60.0, 300.0, 600.0],
    "dark_frames": 3, "flat_levels": 10, "flat_frames": 8, "gain2_fraction": 0.15,
    "gain2_mean": 0.30, "hot_fraction": 5e-3, "rtn_fraction": 5e-3,
}


@dataclass(frozen=True)
class PrecompileReport:
    """What :func:`precompile` did.

    Attributes
    ----------
    compiled : tuple of str
        Kernels (``module.function``) compiled for at least one new signature;
        empty when the cache held every one.
    signatures : int
        Signatures compiled (a kernel can have several: array layouts, dtypes).
    seconds : float
        Wall time of the whole run (s).
    """

    compiled: tuple[str, ...]
    signatures: int
    seconds: float


def cache_folder() -> str:
    """Where numba keeps the compiled kernels of :mod:`sitiancal.compute` in this process.

    ``__pycache__`` beside the sources where that is writable, else
    ``NUMBA_CACHE_DIR`` or the user's cache folder (numba's choice, in its order).
    """
    from sitiancal.compute.gain import _gain_fit_kernel

    return str(Path(_gain_fit_kernel.stats.cache_path))


@contextmanager
def compile_events(package: str | None = "sitiancal") -> Iterator[list[str]]:
    """Record the kernels numba compiles (not those it loads from its cache) in the block.

    Parameters
    ----------
    package : str or None
        Record only functions of this top-level package (numba's own helpers,
        which a kernel's compilation compiles too, are left out); None: all.

    Yields
    ------
    list of str
        Receives ``module.function`` once per signature compiled in any thread
        of the process, when the block ends (numba's ``numba:compile`` event,
        which a cache hit does not raise).
    """
    names: list[str] = []
    with event.install_recorder("numba:compile") as recorder:
        yield names
        for _, ev in recorder.buffer:
            func = getattr(ev.data.get("dispatcher"), "py_func", None)
            module = str(getattr(func, "__module__", ""))
            if ev.is_start and (package is None or module.split(".")[0] == package):
                names.append(f"{module}.{func.__qualname__}")


def precompile(workdir: str | Path | None = None,
               progress: Callable[[str], None] | None = None) -> PrecompileReport:
    """Compile every kernel a calibration job calls into numba's cache.

    Parameters
    ----------
    workdir : path, optional
        Folder for the small camera set, its catalog and products (default: a
        temporary folder, deleted afterwards).
    progress : callable, optional
        ``progress(message)`` at each step.

    Returns
    -------
    PrecompileReport
        The kernels compiled now (none when the cache was complete already).
    """
    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    with compile_events() as names:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="sitiancal-compile-") as tmp:
                _run_small_job(Path(tmp), say)
        else:
            _run_small_job(Path(workdir), say)
        say("layout- and machine-dependent kernels")
        _remaining_signatures()
    return PrecompileReport(compiled=tuple(sorted(set(names))), signatures=len(names),
                            seconds=time.perf_counter() - t0)


def _run_small_job(root: Path, say: Callable[[str], None]) -> None:
    """The whole calibration of :data:`PRECOMPILE_CAMERA` under ``root`` (embedded default)."""
    from sitiancal.compute.simulate import SimulationConfig, simulate_dataset
    from sitiancal.service.pipeline import calibrate

    raw = root / "raw"
    say(f"simulating a {PRECOMPILE_CAMERA['shape'][0]} x {PRECOMPILE_CAMERA['shape'][1]} camera")
    simulate_dataset(raw, SimulationConfig(**PRECOMPILE_CAMERA))
    say("running its calibration (compiles what the cache lacks)")
    calibrate(raw, "PRECOMPILE", small_job_settings(root))


def small_job_settings(root: Path) -> Settings:
    """The embedded default under ``root``, whatever ``SITIANCAL_*`` says.

    ``sitiancal compile`` may run where the environment points a deployment at
    its PostgreSQL catalog, object store and dask scheduler (a worker's
    container); the small job must not register its camera there.
    """
    from sitiancal.service.settings import Settings

    return Settings(data_dir=root / "data", database_url=None, store_url=None, cube_url=None,
                    scheduler_address=None)


def _remaining_signatures() -> None:
    """Kernels whose signatures a small job does not reach.

    * FITS word decoding from windows (``A`` layout) and whole rows (``C``),
      of read-only buffers (a memory map, bytes) and writable ones (the
      direct reader's aligned buffers), into C arrays, and in place (a frame
      read whole into memory, the plan window kept from a set's direct reads:
      the 61 MP benchmark compiled it during its run).
    * Both candidates of the sorts chosen by timing (:func:`sort_backend`,
      :func:`row_sort_backend`): each times both, so both are compiled even
      where the other wins.
    * The classification of points by a mixture, for float32 and float64
      values and errors (which of them a product passes depends on its data).
    * The grouped median's tie scan (float32 and float64 maps), which a job
      reaches only where many of a map's values tie with its median: the
      61 MP benchmark compiled it during its run.
    * The side-by-side SHA-256 kernels of the cube build, which a job uses
      for frames of one size where they are faster than hashlib
      (:func:`~sitiancal.storage.digest.lane_speedups` times each).
    """
    from sitiancal.compute.gain import fit_pixel_gain
    from sitiancal.compute.mixture import MixtureModel
    from sitiancal.compute.summary import grouped_median, row_sort_backend, sort_backend
    from sitiancal.storage.digest import lane_speedups
    from sitiancal.storage.frames import decode_be16

    words = np.arange(4 * 8, dtype=np.uint16).reshape(4, 8)
    for writable in (True, False):
        src = words.copy()
        src.flags.writeable = writable
        for window in (src, src[:, 2:6]):
            decode_be16(window, np.empty(window.shape, np.uint16), bzero=32768)
    decode_be16(words, words, bzero=32768)  # in place, whole words
    sort_backend()
    row_sort_backend()
    lane_speedups()
    two = MixtureModel(weights=np.array([0.5, 0.5]), means=np.array([0.0, 1.0]),
                       sigmas=np.array([0.1, 0.1]), loglike=0.0, bic=0.0, n_samples=4,
                       converged=True)
    for x_type in (np.float32, np.float64):
        for err_type in (np.float32, np.float64):
            two.classify(np.linspace(0.0, 1.0, 4, dtype=x_type), np.full(4, 0.1, err_type))
    # the refit of pixels with a flat level left out (float64 rows), which needs a hit
    levels = np.array([[100.0, 400.0, 1600.0, 6400.0]])
    variances = levels / 0.25 + 16.0
    variances[0, 1] *= 100.0
    fit_pixel_gain(levels, variances, np.full(4, 8.0), max_mean=1e4, reject_alpha=1e-6)
    # the grouped median's tie scan, reached only where many values tie with
    # the median (a large dark map of few distinct rates)
    for x_type in (np.float32, np.float64):
        grouped_median(np.repeat(np.arange(3, dtype=x_type), 4))
