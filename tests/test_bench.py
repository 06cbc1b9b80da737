"""The benchmark (benchmarks/run.py) runs end to end on a tiny simulated set."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("sitiancal_bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--simulate", "--shape", "64x96", "--bias", "3",
         "--darks", "0,60", "--dark-frames", "2", "--flat-levels", "6", "--flat-frames", "2",
         "--out", str(out), "--memory-limit", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["n_frames"] == 3 + 2 * 2 + 6 * 2
    assert result["shape"] == [64, 96]
    assert list(result["stages"]) == ["scan", "cube", "plan", "tiles", "products", "publish"]
    e2e = result["end_to_end"]
    assert e2e["wall_s"] >= sum(s["wall_s"] for s in result["stages"].values()) * 0.99
    assert e2e["peak_rss_gb"] > 0.05
    # CPU time of every stage (all threads): the end to end is their sum
    assert all(s["cpu_s"] >= s["sys_s"] >= 0 for s in result["stages"].values())
    assert e2e["cpu_s"] == pytest.approx(sum(s["cpu_s"] for s in result["stages"].values()))
    assert e2e["cpu_s"] > 0
    for name in ("read", "numpy"):
        assert result["baselines"][name]["wall_s"] > 0
    read = result["baselines"]["read"]
    assert len(read["runs_s"]) == 3  # --read-repeats' default; the fastest is the limit
    assert read["wall_s"] == min(read["runs_s"]) <= read["median_s"] <= max(read["runs_s"])
    assert e2e["x_numpy"] > 0 and e2e["x_read"] == pytest.approx(e2e["wall_s"] / read["wall_s"])
    mb = result["master_bias"]
    assert mb["n_frames"] == 3 and mb["speedup"] > 0 and mb["kernel_speedup"] > 0
    assert all(mb[k]["peak_rss_gb"] > 0.01 for k in ("sitiancal", "kernel", "ccdproc"))
    assert result["graph"]["tasks"] == 1 and result["graph"]["wall_s"] > 0
    table = (out / "results.md").read_text()
    assert "| **end to end** |" in table and "| ccdproc `combine`" in table
    assert "| cores busy (of which system) |" in table
    assert "| sitiancal master-bias kernel" in table and "Graph construction" in table
    assert "| **end to end** |" in proc.stdout
    assert "read once, 3 runs: " in table and "the ratios use the fastest" in table
    assert (f"Busy core-s: {e2e['cpu_s']:.1f} (scan " in table
            and f"3x the read once is {3 * read['wall_s']:.1f} s." in table)
    compiled = result["compiled_during_run"]  # depends on the cache this suite filled so far
    assert isinstance(compiled, list) and all(n.startswith("sitiancal.") for n in compiled)
    assert (f"numba compiled {len(set(compiled))} kernels" if compiled
            else "no kernel compiled during the run") in table
    side = int(result["stages"]["cube"]["frames_hashed_side_by_side"])
    assert 0 <= side <= result["n_frames"]
    assert f"cube: {side} of {result['n_frames']} frames hashed side by side" in table
    leftovers = [p.name for p in out.iterdir() if p.name.startswith("sitiancal-bench-")]
    assert leftovers == []  # scratch cube and store removed


def test_compile_note_says_what_the_figures_include() -> None:
    bench = _load()
    assert bench._compile_note([], distributed=False) == (
        "no kernel compiled during the run: numba's cache held them all")
    note = bench._compile_note(["sitiancal.a.k", "sitiancal.a.k", "sitiancal.b.j"],
                               distributed=False)
    assert note.startswith("numba compiled 2 kernels (3 signatures) during the run")
    assert "`sitiancal compile`" in note
    assert "workers' are not counted" in bench._compile_note([], distributed=True)


def test_bench_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(RUN), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--frames-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(RUN), "--frames-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    proc = subprocess.run([sys.executable, str(RUN), "--simulate", "--read-repeats", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--read-repeats must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_numpy_baseline_and_read_once_measure_the_files(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    from astropy.io import fits

    bench = _load()
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}.fits"
        fits.PrimaryHDU(np.full((32, 48), 1000 + i, dtype=np.uint16)).writeto(p)
        paths.append(str(p))
    assert bench.read_once(paths) > 0
    assert bench.numpy_single_pass({"g": [(p, 0) for p in paths]}) > 0
    sampler = bench.RssSampler(0.01).start()
    try:
        blob = np.ones(50_000_000 // 8)  # +50 MB while sampled
        sampler.reset()
        blob2 = blob.copy()
        assert sampler.peak >= blob2.nbytes
    finally:
        sampler.stop()


def test_rss_sampler_counts_children_listed_once_a_second(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    bench = _load()
    sampler = bench.RssSampler(0.01).start()
    flag = tmp_path / "allocated"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\n"
        "b = bytearray(200_000_000)\n"
        "b[::4096] = b'x' * len(b[::4096])\n"  # touched: resident
        f"pathlib.Path({str(flag)!r}).write_text('1')\n"
        "time.sleep(30)\n")])
    try:
        deadline = time.monotonic() + 20
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        own = sampler._proc.memory_info().rss
        time.sleep(bench.RssSampler.CHILDREN_EVERY + 0.3)  # listed again by now
        assert sampler.peak >= own + 190_000_000
    finally:
        child.kill()
        child.wait()
        sampler.stop()


@pytest.mark.parametrize("tuned", [True, False])
def test_a_tuned_child_sets_the_allocator_before_its_sampler_thread(monkeypatch,
                                                                      tuned: bool) -> None:
    """The pipeline's child process applies a job's allocator settings before it starts
    the RSS sampler thread (a thread started first hands its malloc arena on to the
    job's threads); the baselines' children keep glibc's defaults."""
    import sitiancal.compute.allocator as allocator

    bench = _load()
    order: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: order.append("allocator") or True)
    real_start = bench.RssSampler.start

    def start(self):
        order.append("sampler")
        return real_start(self)

    monkeypatch.setattr(bench.RssSampler, "start", start)
    result, peak = bench._in_child(lambda: "ran", (), False, tuned)
    assert result == "ran" and peak > 0
    assert order == (["allocator", "sampler"] if tuned else ["sampler"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_spawned_workers_keep_freed_memory_as_a_job_does(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale-out benchmark's ``dask worker`` processes start with a job's allocator
    settings (as deploy/ starts them), so a task's freed arrays stay for reuse, also
    where this process's environment holds dask's own default: an in-process nanny
    (a ``LocalCluster`` of processes, as an earlier test starts) leaves it there, and
    a nanny prefers a variable of its environment over its configuration."""
    import platform

    from distributed import Client

    from sitiancal.compute.allocator import allocator_environment

    def released_by_a_task() -> dict:
        """In a worker: the allocator variables and the bytes a freed 128 MB array gave back
        (defined here so that it travels by value: the worker cannot import this module)."""
        import os

        import numpy as np

        def rss_anon() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("RssAnon"))

        a = np.ones(128 << 20, np.uint8)
        held = rss_anon()
        del a
        return {"released": held - rss_anon(),
                "env": {k: os.environ.get(k) for k in
                        ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    bench = _load()
    with bench.spawned_cluster(1, tmp_path) as address, Client(address, timeout="60s") as client:
        client.wait_for_workers(1, timeout=60)
        got = client.submit(released_by_a_task, pure=False).result()
    assert got["env"] == allocator_environment()
    if platform.libc_ver()[0] == "glibc":
        assert got["released"] < 8 << 20


def test_cpu_floor_note_sets_the_core_seconds_against_the_read() -> None:
    bench = _load()
    result = {"scheduler": "threads (2)", "machine": {"cpus": 2},
              "stages": {"cube": {"cpu_s": 30.5}, "tiles": {"cpu_s": 66.0}},
              "end_to_end": {"cpu_s": 96.5}, "baselines": {"read": {"wall_s": 16.1}}}
    assert bench.cpu_floor_note(result) == (
        "Busy core-s: 96.5 (cube 30.5, tiles 66.0): on 2 cores at least 48.2 s however "
        "well they are kept busy; 3x the read once is 48.3 s.")
    del result["baselines"]["read"]
    assert bench.cpu_floor_note(result).endswith("kept busy.")
    result["scheduler"] = "distributed tcp://127.0.0.1:8786, 4 workers"
    assert bench.cpu_floor_note(result) is None  # the workers' CPU is elsewhere
