"""Fault: the disk filling up while a cube is built or a calibration runs.

A real operating-system limit, not a mock: the ``sitiancal`` command runs in a
child process whose ``RLIMIT_FSIZE`` is set below the size of a file it must
write (with ``SIGXFSZ`` ignored, a write past the limit fails with ``EFBIG``,
"File too large", as a write on a full disk fails with ``ENOSPC``). The limit
is measured from a clean run of the same command (just under its largest cube
file, then just under its largest product file), so the test holds whatever
the cube layout (copied pixels or FITS read in place) and whatever the sizes.

Checked: a clear one-line error naming the problem (no traceback), a non-zero
exit, no cube marked complete, no product published and no staging left; then,
without the limit, the same command succeeds and its results equal those of
the clean run (the partial cube is not reused).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import _new_schema
from simdata import small_dataset

from sitiancal.storage.catalog import Catalog
from sitiancal.storage.cube import CubeError, open_cube
from sitiancal.storage.store import ProductStore

#: What the OS says when a write is refused for lack of room or past the size limit.
DISK_FULL = ("File too large", "No space left on device")


def _limit(max_bytes: int | None) -> Callable[[], None] | None:
    """``preexec_fn`` capping every file the child writes at ``max_bytes``."""
    if max_bytes is None:
        return None

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def _sitiancal(*args: str, max_bytes: int | None = None, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sitiancal.service.cli", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, preexec_fn=_limit(max_bytes))


def _largest_file(root: Path, *, data: bool = True) -> int:
    """Size in bytes of the largest file under ``root``: data (chunks, FITS...) or zarr.json."""
    return max(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and (p.name == "zarr.json") is not data)


def _assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("sitiancal: error: "), result.stderr
    assert any(text in lines[-1] for text in DISK_FULL), lines[-1]


def _complete_cubes(cubes: Path) -> list[str]:
    done = []
    for meta in cubes.glob("*.zarr/zarr.json") if cubes.exists() else ():
        if json.loads(meta.read_text()).get("attributes", {}).get("complete") is True:
            done.append(meta.parent.name)
    return done


@pytest.mark.parametrize("full_at", [
    "data",
    "completion",
])
def test_disk_full_while_building_a_cube(tmp_path: Path, full_at: str) -> None:
    sim, _ = small_dataset(tmp_path / "roots")
    clean = tmp_path / "clean.zarr"
    ok = _sitiancal("cube", str(sim), "--out", str(clean), "--no-progress")
    assert ok.returncode == 0, ok.stderr
    target = tmp_path / "cube.zarr"
    # "data": a chunk write fails; "completion": the last write, that of the group
    # metadata marking the cube complete, fails
    if full_at == "data":
        limit = _largest_file(clean) - 1
    else:
        limit = (clean / "zarr.json").stat().st_size - 1
        if max(_largest_file(clean), _largest_file(clean, data=False)) > limit + 1:
            pytest.skip("in this layout the cube's final metadata is not its largest file")
    failed = _sitiancal("cube", str(sim), "--out", str(target), "--no-progress",
                        max_bytes=limit)
    _assert_clean_failure(failed)
    with pytest.raises(CubeError, match="incomplete cube"):
        open_cube(target)
    assert _complete_cubes(tmp_path) == ["clean.zarr"]
    again = _sitiancal("cube", str(sim), "--out", str(target), "--no-progress")
    assert again.returncode == 0, again.stderr
    want, got = open_cube(clean), open_cube(target)
    assert set(got.variables) == set(want.variables)
    for name in want.variables:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert zarr.open_group(str(target), mode="r").attrs["complete"] is True


@pytest.mark.postgres
def test_disk_full_during_calibration(tmp_path: Path, postgres_database: str) -> None:
    # The catalog is a PostgreSQL server (its own process, as in production): the limit
    # applies to what the calibration itself writes (cube, work files, products).
    sim, _ = small_dataset(tmp_path / "roots")
    clean_db, db = _new_schema(postgres_database), _new_schema(postgres_database)
    clean_dir, data = tmp_path / "clean", tmp_path / "data"
    ok = _sitiancal("calibrate", str(sim), "--camera", "DISK", "--data-dir", str(clean_dir),
                    "--no-progress", env={"SITIANCAL_DATABASE_URL": clean_db})
    assert ok.returncode == 0, ok.stderr
    cube_max = _largest_file(clean_dir / "cubes")  # a chunk of the cube
    product_max = _largest_file(clean_dir / "store" / "products")
    assert product_max > cube_max
    env = {"SITIANCAL_DATABASE_URL": db}
    store = ProductStore(data / "store")
    for stage, limit in (("cube", cube_max - 1), ("products", product_max - 1)):
        before = set(_complete_cubes(data / "cubes"))
        failed = _sitiancal("calibrate", str(sim), "--camera", "DISK", "--data-dir", str(data),
                            "--no-progress", max_bytes=limit, env=env)
        _assert_clean_failure(failed)
        with Catalog.open(db) as catalog:
            jobs = catalog.list_jobs(camera="DISK")
            assert jobs and all(j.state == "failed" for j in jobs), (stage, jobs)
            assert any(text in (jobs[0].error or "") for text in DISK_FULL), jobs[0].error
            assert catalog.list_products(camera="DISK") == [], stage
        if stage == "cube":
            assert set(_complete_cubes(data / "cubes")) == before  # the partial one is not
        assert store.list_product_keys() == [] and store.list_staging() == [], stage
        work = data / "work"
        assert not work.exists() or list(work.iterdir()) == [], stage
    again = _sitiancal("calibrate", str(sim), "--camera", "DISK", "--data-dir", str(data),
                       "--no-progress", env=env)
    assert again.returncode == 0, again.stderr
    with Catalog.open(clean_db) as want_cat, Catalog.open(db) as got_cat:
        want = {p.type: p for p in want_cat.list_products(camera="DISK")}
        got = {p.type: p for p in got_cat.list_products(camera="DISK")}
        assert set(got) == set(want) and want
        for kind, product in got.items():
            # same bytes in every array, same figures: the partial cube was not reused
            assert product.array_checksums == want[kind].array_checksums, kind
            assert product.content_key == want[kind].content_key, kind
            assert product.stats == want[kind].stats, kind
            assert got_cat.verify(product.id, store).ok, kind
