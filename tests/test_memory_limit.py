"""The memory budget of a run: tasks at once and tile size chosen from the plan."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from simdata import small_dataset

from sitiancal.compute.graph import (
    largest_stack,
    tile_concurrency,
    tile_task_bytes,
)
from sitiancal.compute.tile import CalibrationParams, FrameGroup, TilePlan
from sitiancal.service.cli import main
from sitiancal.service.pipeline import (
    _BASE_BYTES,
    EXTRA_TILE_TASKS,
    _fit_memory,
    compute_products,
    memory_limit_bytes,
)
from sitiancal.service.settings import Settings
from sitiancal.storage.cube import build_cube
from sitiancal.storage.scan import scan


def _plan(n_bias: int, flat_frames: int) -> TilePlan:
    flats = tuple(FrameGroup("flat", 1.0 + i, tuple(range(flat_frames))) for i in range(4))
    return TilePlan(bias=FrameGroup("bias", 0.0, tuple(range(n_bias))), bias_time_s=(),
                    bias_frame_level=(), darks=(), flats=flats, flat_dark=(None,) * 4,
                    saturation=60000.0, gain_levels=(True,) * 4, lin_used=(True,) * 4,
                    lin_at=(), flat_ref=0)


def test_task_bytes_and_concurrency() -> None:
    small, big = _plan(12, 6), _plan(300, 100)
    assert largest_stack(small, 64) == 12
    assert largest_stack(big, 64) == 300  # the bias stack is loaded whole
    assert largest_stack(_plan(12, 100), 64) == 64  # flat levels in batches
    tile = (1597, 1368)
    assert tile_task_bytes(big, tile, max_batch=64) > tile_task_bytes(small, tile, max_batch=64)
    assert tile_task_bytes(small, (800, 1368), max_batch=64) < tile_task_bytes(small, tile,
                                                                                max_batch=64)
    assert tile_concurrency(None, 10**9, cores=2) == 2
    assert tile_concurrency(10 * 10**9, 10**9, cores=2) == 2
    assert tile_concurrency(3 * 10**9, 10**9, cores=8, reserve=10**9) == 2
    assert tile_concurrency(10**8, 10**9, cores=8) == 1  # never zero


def _fit(plan: TilePlan, limit: int | None, *, tile=(229, 9576), shape=(6388, 9576), cores=2,
         split_rows=True):
    planned = SimpleNamespace(plan=plan, notes=[])
    got = _fit_memory(planned, CalibrationParams(), shape, tile, limit, cores, read_ahead=True,
                      split_rows=split_rows)
    return got, planned.notes


def test_one_task_more_than_cores_where_memory_allows() -> None:
    """A task waiting on the disk leaves its core to the extra task; tiles shrink for it."""
    plan = _plan(50, 10)
    wanted = 2 + EXTRA_TILE_TASKS

    def need(rows: int, tasks: int) -> int:
        return _BASE_BYTES + tasks * tile_task_bytes(plan, (rows, 9576), max_batch=64,
                                                     read_ahead=True)

    assert _fit(plan, None) == (((229, 9576), wanted), [])
    assert _fit(plan, need(229, wanted)) == (((229, 9576), wanted), [])
    # room for two tasks of 229 rows only: the rows are split evenly into more,
    # smaller bands until the third task fits
    (tile, tasks), notes = _fit(plan, need(229, 2))
    assert tasks == wanted and notes == []
    assert 229 // 2 <= tile[0] < 229 and tile[1] == 9576
    assert need(tile[0], wanted) <= need(229, 2)
    bands = -(-6388 // tile[0])
    assert tile[0] == -(-6388 // bands)  # an even split, not a cut of the last band
    assert need(-(-6388 // (bands - 1)), wanted) > need(229, 2)  # the largest such split
    # a copied cube's tiles are its compressed chunks: not split for the extra task
    assert _fit(plan, need(229, 2), split_rows=False) == (((229, 9576), 2), [])
    # one task fits only at half the height: the extra one at half of that again
    (tile, tasks), notes = _fit(plan, need(229, 1) - 1)
    assert tasks == wanted and not any("tile task" in n for n in notes)
    assert 115 // 2 <= tile[0] < 115 and need(tile[0], wanted) < need(229, 1)
    # near the smallest tile the extra task does not fit at any allowed height:
    # as many tasks as fit at the tile the single-task search chose
    per_row = tile_task_bytes(plan, (1, 9576), max_batch=64, read_ahead=True)
    (tile, tasks), notes = _fit(plan, _BASE_BYTES + int(2.5 * 16 * per_row))
    assert tile == (29, 9576) and tasks == 1  # 229 -> 115 -> 58 -> 29
    assert not any("tile task" in n for n in notes)
    # too tight for any task: one at a time, noted
    (tile, tasks), notes = _fit(plan, _BASE_BYTES + 1)
    assert tasks == 1 and tile[0] == 16 and any("tile task" in n for n in notes)


def test_settings_memory_limit() -> None:
    assert memory_limit_bytes(Settings(memory_limit="4GB")) == 4 * 10**9
    assert memory_limit_bytes(Settings(memory_limit="512MiB")) == 512 * 2**20
    assert memory_limit_bytes(Settings(memory_limit="auto")) is None


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> tuple[str, object]:
    root = tmp_path_factory.mktemp("memlimit")
    out, _ = small_dataset(root)
    frames = root / "frames"
    shutil.copytree(out, frames, ignore=shutil.ignore_patterns("truth.fits"))
    store = str(root / "cube.zarr")
    return store, build_cube(scan(frames), store)


def _maps(workdir: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(workdir / "maps.zarr"), mode="r")
    return {name: group[name][...] for name in group.array_keys()}


def test_a_tight_limit_runs_smaller_tiles_one_at_a_time_with_the_same_maps(cube, tmp_path):
    store, ds = cube
    free = compute_products(ds, store, tmp_path / "free", wanted=("bias",), cores=2)
    assert free.timings["tile_threads"] == 2.0 + EXTRA_TILE_TASKS
    assert not any("memory limit" in n for n in free.planned.notes)
    # room for the process and hardly anything else: the tile height is halved
    # until one task fits (or the smallest tile), and tasks run one at a time
    tight = _BASE_BYTES + 1
    limited = compute_products(ds, store, tmp_path / "tight", wanted=("bias",), cores=2,
                               memory_limit=tight)
    assert limited.timings["tile_threads"] == 1.0
    assert limited.timings["n_tiles"] > free.timings["n_tiles"]
    assert any("memory limit" in n and "tile task" in n for n in limited.planned.notes)
    a, b = _maps(tmp_path / "free"), _maps(tmp_path / "tight")
    assert a.keys() == b.keys()
    for name in a:  # per-pixel work does not depend on the tiling
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_rejects_a_bad_memory_limit(tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path), "--camera", "X",
                                       "--memory-limit", "lots", "--data-dir",
                                       str(tmp_path / "d")])
    assert result.exit_code != 0
    assert "--memory-limit 'lots'" in result.output and "Traceback" not in result.output


_REUSE_PROBE = """
import sys
import numpy as np
from sitiancal.compute.allocator import keep_freed_memory

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

if sys.argv[1] == "tuned":
    assert keep_freed_memory()
a = np.ones(64 << 20, np.uint8)  # 64 MB, touched
held = rss_anon()
del a
print(held - rss_anon())
"""


def _released(probe: str, mode: str) -> int:
    """Bytes of anonymous memory the probe's process gave back when it freed its array."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", probe, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux only")
def test_keep_freed_memory_keeps_a_freed_array_for_reuse() -> None:
    """By default glibc unmaps a freed 64 MB array (its pages are zeroed again when
    reallocated); after ``keep_freed_memory`` the memory stays in the process."""
    assert _released(_REUSE_PROBE, "default") > 60 << 20
    assert _released(_REUSE_PROBE, "tuned") < 8 << 20


_THREAD_PROBE = """
import sys, threading
import numpy as np
from sitiancal.compute.allocator import keep_freed_memory

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

go = threading.Event()
one_at_a_time = threading.Lock()
out = []

def work():
    np.ones(1 << 10)  # the thread's first allocation: its arena is chosen now
    go.wait()
    # one worker measures at a time: another worker touching its own array
    # between this one's two readings would hide part of what this one freed
    with one_at_a_time:
        a = np.ones(128 << 20, np.uint8)  # 128 MB, larger than a thread arena's heap
        held = rss_anon()
        del a
        out.append(held - rss_anon())

def bystander():
    np.ones(1 << 10)  # allocates before the call: the process now has two arenas
    go.wait()

mode = sys.argv[1]
if mode == "late":  # the thread allocated before the call
    threads = [threading.Thread(target=work)]
    threads[0].start(); keep_freed_memory()
elif mode == "bystander":  # another thread did; two workers start after the call
    threads = [threading.Thread(target=bystander)]
    threads[0].start(); keep_freed_memory()
    threads += [threading.Thread(target=work) for _ in range(2)]
    for t in threads[1:]:
        t.start()
else:
    keep_freed_memory()
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
go.set()
for t in threads:
    t.join()
print(max(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux only")
def test_keep_freed_memory_must_come_before_the_threads() -> None:
    """A thread that allocated before the call keeps an arena of its own and gives a
    freed 128 MB array back at once. Threads started after the call are handed the
    existing arenas in turn, so one of two lands in the arena of a thread that had
    allocated before it; with the call first both share the kept heap (why the CLI,
    the service and the benchmark's child call it before their first thread)."""
    assert _released(_THREAD_PROBE, "late") > 120 << 20
    assert _released(_THREAD_PROBE, "bystander") > 120 << 20
    assert _released(_THREAD_PROBE, "first") < 8 << 20


def test_the_cli_keeps_freed_memory_before_its_command_runs(monkeypatch) -> None:
    from click.testing import CliRunner

    import sitiancal.compute.allocator as allocator
    from sitiancal.service.cli import main

    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    result = CliRunner().invoke(main, ["calibrate", "/nonexistent/frames", "--camera", "MST3"])
    assert result.exit_code != 0  # the command itself refuses the folder, after the call
    assert calls == ["kept"]


def test_the_service_keeps_freed_memory_from_start_up(tmp_path, monkeypatch) -> None:
    from test_api_support import TestClient, make_settings

    import sitiancal.compute.allocator as allocator
    from sitiancal.api.app import create_app

    calls: list[int] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    app = create_app(make_settings(tmp_path), job_function=lambda **kw: [], use_dask=False)
    with TestClient(app):
        assert calls == [1]  # at start-up, before any job
