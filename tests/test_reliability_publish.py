"""Fault: the product store failing in the middle of a publication.

Run on a local folder and on a moto S3 server (``store_url``). The fault is
injected into the store's own filesystem object: on S3 the copy of the staged
files raises after a few files have been copied (and, in the harsher case, the
store keeps failing, so that the clean-up fails too); on a local disk the
``rename(2)`` that makes the version visible fails with ``EIO``. Whatever
happened, no reader (:class:`ProductStore`, the catalog, ``verify``) sees a
partial version; staging is swept; once the store works again, a retry
publishes a complete, verifiable version.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from test_store import payload

import sitiancal.storage.store as store_module
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import PUBLISHED_NAME, ProductMissing, ProductStore

FINAL = "products/MST3/gain/v0001"


class StoreDown(OSError):
    """The injected storage failure."""


@contextmanager
def failing_copy(store: ProductStore, after: int, *, cleanup_fails: bool = False
                 ) -> Iterator[list[str]]:
    """Make the store fail during publication; yield the files copied before the fault.

    On object storage, every copy after the first ``after`` ones raises (and,
    with ``cleanup_fails``, every removal too: the store is down). On a local
    disk the one ``rename`` of the publication raises ``EIO``.
    """
    copied: list[str] = []
    mp = pytest.MonkeyPatch()
    try:
        if store.local:
            real_rename = os.rename

            def rename(src: str, dst: str, *args, **kwargs) -> None:
                if str(dst).startswith(store.root):
                    raise StoreDown(errno.EIO, "injected I/O error", str(dst))
                real_rename(src, dst, *args, **kwargs)

            mp.setattr(store_module.os, "rename", rename)
        else:
            real_cp = store.fs._cp_file

            async def cp_file(path1: str, path2: str, **kwargs) -> None:
                if len(copied) >= after:
                    raise StoreDown(errno.EIO, "injected: store unreachable", path2)
                await real_cp(path1, path2, **kwargs)
                copied.append(path2)

            mp.setattr(store.fs, "_cp_file", cp_file)
            mp.setattr(store.fs, "batch_size", 1)  # one file at a time: a fault midway
            if cleanup_fails:
                def rm(*args, **kwargs) -> None:
                    raise StoreDown(errno.EIO, "injected: store unreachable")

                async def async_rm(*args, **kwargs) -> None:
                    rm()

                for name in ("rm", "rm_file"):  # fsspec's sync mirrors are bound at creation
                    mp.setattr(store.fs, name, rm)
                    mp.setattr(store.fs, f"_{name}", async_rm)
        yield copied
    finally:
        mp.undo()


def _files(store: ProductStore, key: str) -> list[str]:
    store.fs.invalidate_cache()
    path = store._path(key)
    return sorted(store.fs.find(path)) if store.fs.exists(path) else []


def _assert_invisible(store: ProductStore, catalog: Catalog, key: str) -> None:
    assert not store.is_published(key)
    for read in (store.open_zarr, store.fits_bytes, store.open_fits, store.verify,
                 store.compute_checksums, store.open_dataset):
        with pytest.raises(ProductMissing):
            read(key)
    with pytest.raises(ProductMissing):
        store.read_region(key, "gain")
    assert catalog.list_products() == []


@pytest.mark.parametrize("cleanup_fails", [False, True], ids=["fault", "store-down"])
def test_fault_midway_leaves_no_visible_version_and_a_retry_publishes(
        store_url: str, store_options: dict, tmp_path, cleanup_fails: bool) -> None:
    store = ProductStore(store_url, store_options)
    if store.local and cleanup_fails:
        pytest.skip("a local publication is one rename: there is nothing to clean up")
    p = payload()
    with Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}") as catalog:
        with failing_copy(store, after=3, cleanup_fails=cleanup_fails) as copied:
            with pytest.raises(StoreDown):
                catalog.publish_payload(store, p)
        if not store.local:
            assert len(copied) == 3  # the fault hit in the middle of the copy
        _assert_invisible(store, catalog, FINAL)
        leftovers = _files(store, FINAL)
        if cleanup_fails:
            # what was copied stays, but without the commit marker no reader sees it
            assert leftovers and not any(f.endswith(PUBLISHED_NAME) for f in leftovers)
            assert store.list_staging() != []
            later = datetime.now(UTC) + timedelta(hours=2)
            removed = catalog.sweep_orphans(store, timedelta(hours=1), now=later)
            assert FINAL in removed
        assert _files(store, FINAL) == []
        assert store.list_staging() == []  # staging swept
        # the store works again: a retry publishes the same content completely
        done = catalog.publish_payload(store, p)
        assert not done.reused and done.product.version == 2
        key = done.product.store_key
        assert store.is_published(key) and catalog.verify(done.product.id, store).ok
        np.testing.assert_array_equal(store.read_region(key, "gain"), p.arrays[0].data)
        assert [x.version for x in catalog.list_products()] == [2]
        assert store.list_staging() == []
        assert store.list_product_keys() == [key]


def test_files_without_the_commit_marker_are_not_a_version(store_url: str,
                                                            store_options: dict) -> None:
    store = ProductStore(store_url, store_options)
    key = store.publish(store.stage(payload(), 1))
    assert store.verify(key).ok
    # a copy that stopped before its last array chunk and the commit marker
    store.fs.rm(store._path(key, PUBLISHED_NAME))
    chunk = sorted(store.fs.find(store._path(key, "product.zarr", "gain_err")))[-1]
    saved = store.fs.cat_file(chunk)
    store.fs.rm(chunk)
    for read in (store.open_zarr, store.fits_bytes, store.verify):
        with pytest.raises(ProductMissing):
            read(key)
    assert not store.is_published(key)
    assert key in store.list_product_keys()  # still found by the sweep
    # every byte back: a version published before commit markers existed is
    # adopted once it verifies in full against the checksums of its group
    store.fs.pipe_file(chunk, saved)
    assert store.verify(key).ok and store.is_published(key)
    marker = json.loads(store.fs.cat_file(store._path(key, PUBLISHED_NAME)))
    assert marker["adopted"] is True


def test_publication_is_one_rename_on_a_local_disk(tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = ProductStore(tmp_path / "store")
    staged = store.stage(payload(), 1)
    renames: list[tuple[str, str]] = []
    real = os.rename

    def rename(src: str, dst: str) -> None:
        # the version appears complete, commit marker included, in this one step
        assert os.path.exists(os.path.join(src, PUBLISHED_NAME))
        assert not os.path.exists(dst)
        renames.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(store_module.os, "rename", rename)
    key = store.publish(staged)
    assert renames == [(store._path(staged.key), store._path(key))]
    marker = json.loads(store.fs.cat_file(store._path(key, PUBLISHED_NAME)))
    assert marker["key"] == key and marker["checksums"] == staged.checksums.to_dict()


def test_staging_of_a_dead_writer_is_swept_at_once(store_url: str, store_options: dict) -> None:
    store = ProductStore(store_url, store_options)
    mine = store.stage(payload(), 1)
    dead = store.stage(payload(seed=2), 2)
    other_host = store.stage(payload(seed=3), 3)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    marker_path = store._path(dead.key, "_staging.json")
    marker = json.loads(store.fs.cat_file(marker_path))
    marker["pid"] = int(child.stdout)  # a writer that has exited
    store.fs.pipe_file(marker_path, json.dumps(marker).encode())
    other_path = store._path(other_host.key, "_staging.json")
    other = json.loads(store.fs.cat_file(other_path))
    other.update(host=socket.gethostname() + "-elsewhere", pid=int(child.stdout))
    store.fs.pipe_file(other_path, json.dumps(other).encode())
    assert store.sweep_staging(timedelta(hours=1)) == [dead.key]
    assert store.list_staging() == sorted([mine.key, other_host.key])


def test_service_start_sweeps_what_a_crashed_publication_left(tmp_path) -> None:
    from test_api_support import TestClient, instant_job, make_settings

    from sitiancal.api.app import create_app

    settings = make_settings(tmp_path)
    store = ProductStore(settings.product_store_url)
    crashed = store.stage(payload(), 1)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    marker_path = store._path(crashed.key, "_staging.json")
    marker = json.loads(store.fs.cat_file(marker_path))
    marker["pid"] = int(child.stdout)  # its writer is gone
    store.fs.pipe_file(marker_path, json.dumps(marker).encode())
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        assert client.get("/healthz").status_code == 200
        assert store.list_staging() == []


def test_the_api_serves_no_partial_version(tmp_path) -> None:
    from test_api_support import TestClient, instant_job, make_settings

    from sitiancal.api.app import create_app

    settings = make_settings(tmp_path)
    store = ProductStore(settings.product_store_url)
    with Catalog.open(settings.catalog_url) as catalog:
        with failing_copy(store, after=0), pytest.raises(StoreDown):
            catalog.publish_payload(store, payload())
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        assert client.get("/v1/products", params={"camera": "MST3"}).json()["products"] == []
        r = client.get("/v1/cameras/MST3/best/gain", params={"state": "candidate"})
        assert r.status_code == 404, r.text
        for ref in ("MST3/gain/v1", "MST3/gain/1"):
            assert client.get(f"/v1/products/{ref}/fits").status_code == 404
    assert store.list_product_keys() == [] and store.list_staging() == []
    with Catalog.open(settings.catalog_url) as catalog:  # the retry
        done = catalog.publish_payload(store, payload()).product
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as client:
        r = client.get(f"/v1/products/{done.id}/fits")
        assert r.status_code == 200 and r.content == store.fits_bytes(done.store_key)


def test_catalog_verify_reports_a_version_gone_from_the_store(store_url: str, store_options: dict,
                                                              tmp_path) -> None:
    """A catalogued version whose files vanished is a failed check, not an abort."""
    store = ProductStore(store_url, store_options)
    with Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}") as catalog:
        done = catalog.publish_payload(store, payload())
        assert catalog.verify(done.product.id, store).ok
        store.fs.rm(store._path(done.product.store_key, PUBLISHED_NAME))
        chunk = sorted(store.fs.find(store._path(done.product.store_key, "product.zarr", "gain")))[-1]
        store.fs.rm(chunk)  # and it is not intact either: it cannot be adopted back
        report = catalog.verify(done.product.id, store)
        assert not report.ok and "missing from the store" in report.problems[0]
