"""``sitiancal compile``: numba's cache filled ahead of a job, so that a job compiles nothing.

The coverage test runs in fresh processes with a fresh ``NUMBA_CACHE_DIR``
(the suite's own cache, which other tests fill, would hide a kernel that
:func:`precompile` misses): the first compiles everything (~2 minutes of one
core), then a job on another camera, of another size and header dialect,
must not compile a single kernel (the test takes ~2.5 minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from numba import njit

from sitiancal.service.cli import main
from sitiancal.service.precompile import (
    PRECOMPILE_CAMERA,
    cache_folder,
    compile_events,
    small_job_settings,
)


def test_compile_events_records_compilations_not_reuse():
    @njit(cache=False)
    def twice(x):
        return 2 * x

    with compile_events(package=None) as first:
        twice(np.arange(3))
    with compile_events(package=None) as again:
        twice(np.arange(5))  # the same signature: no compilation
    with compile_events(package=None) as other:
        twice(np.arange(3.0))  # float64: a new signature
    assert [n for n in first if n.endswith("twice")] == [f"{__name__}.{twice.py_func.__qualname__}"]
    assert [n for n in again if n.endswith("twice")] == []
    assert len([n for n in other if n.endswith("twice")]) == 1
    with compile_events() as ours:  # only sitiancal's kernels by default
        twice(np.arange(3, dtype=np.float32))
    assert ours == []


def test_the_small_job_stays_out_of_a_deployments_catalog_and_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SITIANCAL_DATABASE_URL", "postgresql+psycopg://calib@db:5432/sitiancal")
    monkeypatch.setenv("SITIANCAL_STORE_URL", "s3://products/sitiancal")
    monkeypatch.setenv("SITIANCAL_CUBE_URL", "s3://cubes/sitiancal")
    monkeypatch.setenv("SITIANCAL_SCHEDULER_ADDRESS", "tcp://scheduler:8786")
    settings = small_job_settings(tmp_path)
    data = (tmp_path / "data").resolve()
    assert settings.catalog_url == f"sqlite:///{data / 'catalog.sqlite'}"
    assert settings.product_store_url == str(data / "store")
    assert settings.cube_store_url == str(data / "cubes")
    assert settings.scheduler_address is None


def test_cache_folder_is_numbas_choice(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "from sitiancal.service.precompile import cache_folder; "
         "print(cache_folder())"],
        env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}, capture_output=True, text=True,
        check=True)
    assert Path(out.stdout.strip()).parent == tmp_path
    assert Path(cache_folder()).name  # this process: the suite's own cache


_OTHER_JOB = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from sitiancal.compute.simulate import SimulationConfig, simulate_dataset
    from sitiancal.service.pipeline import calibrate
    from sitiancal.service.precompile import compile_events
    from sitiancal.service.settings import Settings

    root = Path(sys.argv[1])
    simulate_dataset(root / "raw", SimulationConfig(
        shape=(1040, 1096), seed=11, n_bias=12, dark_exptimes=[0.0, 30.0, 120.0], dark_frames=2,
        flat_levels=8, flat_frames=6, header_convention="nina", hot_fraction=1e-3,
        rtn_fraction=1e-3))
    with compile_events() as compiled:
        run = calibrate(root / "raw", "OTHER", Settings(data_dir=root / "data"))
    print(json.dumps({"compiled": compiled, "products": len(run.product_ids)}))
""")


def test_precompile_leaves_nothing_for_a_job_to_compile(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    cli = [sys.executable, "-m", "sitiancal.service.cli", "compile", "--no-progress"]
    first = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("compiled ") and str(tmp_path / "numba-cache") in first.stdout
    job = subprocess.run([sys.executable, "-c", _OTHER_JOB, str(tmp_path / "job")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["products"] == 8
    assert result["compiled"] == [], f"compiled by the job: {sorted(set(result['compiled']))}"


def test_compile_command_says_when_the_cache_was_complete(monkeypatch):
    from sitiancal.service.precompile import PrecompileReport

    reports = iter([PrecompileReport(compiled=("sitiancal.a.k", "sitiancal.b.j"), signatures=3,
                                     seconds=95.2),
                    PrecompileReport(compiled=(), signatures=0, seconds=12.4)])
    monkeypatch.setattr("sitiancal.service.precompile.precompile",
                        lambda progress=None: next(reports))
    first = CliRunner().invoke(main, ["compile", "--no-progress"])
    assert first.exit_code == 0
    assert first.output.startswith("compiled 2 kernels (3 signatures) in 95 s into ")
    assert cache_folder() in first.output
    again = CliRunner().invoke(main, ["compile", "--no-progress"])
    assert again.exit_code == 0
    assert again.output.startswith("every kernel was in numba's cache already (")


def test_compile_command_reports_a_clear_error(monkeypatch):
    def broken(progress=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sitiancal.service.precompile.precompile", broken)
    result = CliRunner().invoke(main, ["compile", "--no-progress"])
    assert result.exit_code == 2
    assert "sitiancal: error: compile: [Errno 28] No space left on device" in result.output
    assert "Traceback" not in result.output


def test_precompile_camera_reaches_the_parallel_kernels():
    from sitiancal.compute.defects import _CHUNK_PIXELS, _FUSED_MIN
    from sitiancal.compute.summary import _PARALLEL_MIN

    ny, nx = PRECOMPILE_CAMERA["shape"]
    assert ny * nx >= max(_PARALLEL_MIN, _FUSED_MIN) > _CHUNK_PIXELS


def test_precompile_decodes_words_in_place(monkeypatch):
    # A job's direct reads decode each frame's kept plan window in place (one
    # contiguous array for src and out): a kernel of its own, which a 61 MP job
    # compiled during its run until `sitiancal compile` called it this way.
    from sitiancal.service import precompile
    from sitiancal.storage import frames

    calls = []
    decode = frames.decode_be16

    def recording(src, out, *, bzero):
        calls.append((out is src, src.flags.c_contiguous, src.flags.writeable))
        return decode(src, out, bzero=bzero)

    monkeypatch.setattr(frames, "decode_be16", recording)
    precompile._remaining_signatures()
    assert (True, True, True) in calls  # in place
    assert (False, False, False) in calls  # a read-only window into another array


def test_precompile_compiles_the_grouped_medians_tie_scan(monkeypatch):
    # A large dark map whose rates tie at its median reaches the tie scan,
    # which the small job's maps never do: the 61 MP benchmark compiled it
    # during its run until `sitiancal compile` called it.
    from sitiancal.compute import summary
    from sitiancal.service import precompile

    dtypes = set()
    scan = summary._tie_scan

    def recording(v, lo, hi):
        dtypes.add(v.dtype.name)
        return scan(v, lo, hi)

    monkeypatch.setattr(summary, "_tie_scan", recording)
    precompile._remaining_signatures()
    assert dtypes == {"float32", "float64"}


def test_rtn_kernels_are_handed_c_rows(monkeypatch):
    # rtn_confirm's values are (frames, pixels) and the k-means start takes one
    # row per pixel. Handed the transpose (Fortran order), numba compiled a
    # second signature of the kernel during a 61 MP job.
    from sitiancal.compute import defects

    layouts = []
    kernel = defects._kmeans_1d_kernel

    def recording(y, means):
        layouts.append(y.flags.c_contiguous)
        return kernel(y, means)

    monkeypatch.setattr(defects, "_kmeans_1d_kernel", recording)
    rng = np.random.default_rng(3)
    values = rng.normal(100.0, 3.0, (30, 40))
    values[:15, :5] += 20.0  # two-level pixels
    defects.rtn_confirm(values)
    defects._tied_gmm(np.asfortranarray(values.T), 2)  # any caller's layout
    assert layouts and all(layouts)
