"""Process-wide glibc allocator settings of a calibration job (a no-op on other C libraries).

:func:`keep_freed_memory` keeps freed array memory for reuse (called by every
job and by the service at start-up); :func:`return_freed_memory` hands it back
between products where the resident set is over a bound. Only ``ctypes``:
cheap to import where a process starts.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's own symbols where its C library is glibc, else None (looked up once).

    ``confstr`` answers without a subprocess (``ctypes.util.find_library`` runs
    one: ~30 ms at every CLI command's start); glibc is loaded already, so
    ``dlopen(NULL)`` finds its functions.
    """
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not glibc
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _libc_function(name: str) -> Callable[..., Any] | None:
    """Function ``name`` of glibc, or None where the C library is not glibc or lacks it."""
    lib = _glibc()
    return getattr(lib, name, None) if lib is not None else None


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD_BYTES = 256 << 20
_TRIM_THRESHOLD_BYTES = 1 << 30
#: Each setting: its ``mallopt`` parameter, its glibc environment variable, its value.
_SETTINGS = ((_M_ARENA_MAX, "MALLOC_ARENA_MAX", 1),
             (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", _MMAP_THRESHOLD_BYTES),
             (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", _TRIM_THRESHOLD_BYTES))


def keep_freed_memory() -> bool:
    """Let the process reuse the memory of freed arrays instead of returning it at once (glibc).

    A job allocates and frees tens of GB of tile stacks, moments and map
    temporaries of 10-250 MB each. By default glibc serves each from a fresh
    ``mmap`` and unmaps it when freed, so the kernel zeroes every page again
    (measured here: 19% of the job's CPU time in ``clear_page``). With these
    settings arrays up to 256 MB come from one heap shared by all threads and
    freed memory stays in it for reuse, until the heap's free top reaches
    1 GB: glibc then gives all of it back (down to ``M_TOP_PAD``, 128 kB),
    not only the part above the threshold. :func:`compute.products.assemble_products`
    hands freed memory back between products (:func:`return_freed_memory`), so the
    peak stays within the job's budget. A whole 300-frame 61 MP job (2 cores)
    shrank its heap 11-12 times, ~3-4 GB in all, nearly all of it those explicit
    calls; never trimming by itself (``M_TRIM_THRESHOLD`` -1) changed neither
    that nor the job's time (benchmarks/HISTORY.md, 2026-12-08). Measured on a
    69-frame 61 MP set (2 cores): ``clear_page``
    fell from 19% to 8% of the CPU samples and the job from 75 s to 71-73 s,
    at the same peak RSS (3.1 GB). Called at the start of every job, and by
    the service before it starts any thread: the one-arena setting applies to
    threads that have not allocated yet. A thread that allocated before keeps
    an arena of its own, whose heaps are at most 64 MB, so every larger array
    it allocates is mapped (and zeroed by the kernel) afresh: a 61 MP tile
    pass whose zarr I/O thread had started first spent 14% of its CPU time in
    ``clear_page`` (measured; 1% with the call first). Threads started after
    the call are not safe from it either: with one arena allowed and more
    than one in the process, glibc hands each new thread the existing arenas
    in turn, the early thread's included. So the call belongs at the very
    start of the process (the CLI's entry point, the service's start-up, the
    benchmark's child process): a 300-frame 61 MP job whose benchmark process
    had started its memory sampler thread first took 9.3 s of system time in
    one copy of the tile pass alone (its level-major arrays, mapped afresh per
    tile) instead of 1.5 s, the tile pass 0.47 instead of 0.29 cores of
    system time (measured).

    Returns False (and changes nothing) where the C library has no ``mallopt``.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    ok = True
    for param, _, value in _SETTINGS:
        ok = bool(mallopt(ctypes.c_int(param), ctypes.c_int(value))) and ok
    return ok


#: dask configuration variable whose JSON object a nanny adds to the environment
#: of the worker process it starts (``distributed.nanny.pre-spawn-environ``).
DASK_NANNY_ENVIRON = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"


def allocator_environment() -> dict[str, str]:
    """glibc's environment variables for :func:`keep_freed_memory`'s settings.

    For processes sitiancal does not start itself, dask workers above all: glibc
    reads these before the process's first allocation, so no thread can hold an
    arena of its own. A nanny-started dask worker gets them through
    :data:`DASK_NANNY_ENVIRON` (dask's own default there,
    ``MALLOC_TRIM_THRESHOLD_=65536``, hands freed memory back at once: a
    128 MB array freed by a task was given back whole, and kept with these;
    measured). ``deploy/`` sets them so (tested against this function).
    """
    return {variable: str(value) for _, variable, value in _SETTINGS}


def resident_bytes() -> int | None:
    """Resident set of this process (bytes), from ``/proc/self/statm``; None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def return_freed_memory(above: int | None = None) -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Between products the process has freed several full-frame maps; blocks of
    them that glibc kept in its arenas would otherwise stay in the resident
    set. Memory given back costs its pages again when the next product
    allocates them (the kernel zeroes every page it hands out): so, given
    ``above`` (bytes), only while the resident set exceeds it. Returns
    whether the memory was given back.
    """
    if above is not None:
        resident = resident_bytes()
        if resident is not None and resident <= above:
            return False
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
