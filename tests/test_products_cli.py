"""``sitiancal products`` and ``sitiancal db`` through click's CliRunner."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from click.testing import CliRunner

from sitiancal.service.products_cli import db, products
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductArray, ProductPayload, ProductStore


def make_payload(seed: int) -> ProductPayload:
    rng = np.random.default_rng(seed)
    return ProductPayload(
        camera="MST3", type="dark",
        arrays=[ProductArray("DARK", rng.normal(0.002, 0.001, (5, 6)).astype(np.float32),
                             "e-/s", "dark rate")],
        stats={"median_rate": 0.002}, inputs=[{"path": f"/d/{seed}.fits", "sha256": f"{seed:064x}"}],
        code_version="0.1.0-test")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    for name in ("SITIANCAL_DATABASE_URL", "SITIANCAL_STORE_URL", "SITIANCAL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    store = ProductStore(settings.product_store_url)
    with Catalog.open(settings.catalog_url) as catalog:
        for seed in (1, 2):
            catalog.publish_payload(store, make_payload(seed))
    return tmp_path / "data"


def run(group, args, data_dir=None):
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return CliRunner().invoke(group, [*args, *extra])


def test_list_show_certify_best_history(data_dir) -> None:
    listed = run(products, ["list"], data_dir)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:3] == ["PRODUCT", "STATE", "VALID"]
    assert [ln.split()[0] for ln in lines[1:]] == ["MST3/dark/v2", "MST3/dark/v1"]
    as_json = json.loads(run(products, ["list", "--json", "--state", "candidate"],
                             data_dir).output)
    assert [p["version"] for p in as_json] == [2, 1]
    shown = run(products, ["show", "MST3/dark/v1"], data_dir)
    assert "stats.median_rate  0.002" in shown.output
    assert any(ln.split() == ["units", "e-/s"] for ln in shown.output.splitlines())
    ok = run(products, ["certify", "MST3/dark/v1", "--from", "2026-01-01", "--actor", "alice",
                        "--reason", "QC ok"], data_dir)
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == "certified MST3/dark/v1 for [2026-01-01T00:00:00Z, open)"
    run(products, ["certify", "MST3/dark/v2", "--from", "2026-02-01T00:00:00Z"], data_dir)
    best = json.loads(run(products, ["best", "MST3", "dark", "--at", "2026-01-31T23:59:59Z",
                                     "--json"], data_dir).output)
    assert (best["version"], best["valid_to"]) == (1, "2026-02-01T00:00:00Z")
    assert json.loads(run(products, ["best", "MST3", "dark", "--json"],
                          data_dir).output)["version"] == 2
    hist = run(products, ["history", "MST3", "dark"], data_dir).output
    assert "trim" in hist and "alice" in hist
    retracted = run(products, ["retract", "MST3/dark/v2", "--reason", "light leak"], data_dir)
    assert retracted.output.strip() == "retracted MST3/dark/v2"


def test_errors_are_one_line_with_exit_2(data_dir) -> None:
    run(products, ["certify", "MST3/dark/v2", "--from", "2026-02-01"], data_dir)
    cases = [
        (["certify", "MST3/dark/v1", "--from", "2026-01-01", "--to", "2026-03-01"],
         "would overlap certified MST3/dark v2"),
        (["best", "MST3", "dark", "--at", "2026-01-15"], "before the first certified range v2"),
        (["best", "MST3", "flat"], "no flat product for camera MST3"),
        (["show", "nope"], "unknown product 'nope'"),
        (["retract", "MST3/dark/v1", "--reason", ""], "retracting needs a reason"),
    ]
    for args, message in cases:
        result = run(products, args, data_dir)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("sitiancal: error: ")
        assert "Traceback" not in result.output
    bad_time = run(products, ["best", "MST3", "dark", "--at", "yesterday"], data_dir)
    assert bad_time.exit_code == 2 and "not an ISO 8601 time" in bad_time.stderr


def test_verify_reports_corruption_with_exit_1(data_dir) -> None:
    assert run(products, ["verify", "MST3/dark/v1"], data_dir).exit_code == 0
    chunk = data_dir / "store" / "products" / "MST3" / "dark" / "v0001" / "product.zarr" / \
        "DARK" / "c" / "0" / "0"
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    result = run(products, ["verify", "MST3/dark/v1", "--json"], data_dir)
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert not report["ok"] and report["problems"][0].startswith("array DARK: sha256")


def test_db_upgrade_and_current(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SITIANCAL_DATABASE_URL", raising=False)
    fresh = tmp_path / "fresh"
    before = json.loads(run(db, ["current", "--json"], fresh).output)
    assert before["current"] is None and not before["up_to_date"]
    up = run(db, ["upgrade"], fresh)
    assert up.exit_code == 0 and f"upgraded from empty to {before['head']}" in up.output
    assert "up to date" in run(db, ["upgrade"], fresh).output
    after = json.loads(run(db, ["current", "--json"], fresh).output)
    assert after["current"] == after["head"] and after["up_to_date"]


def test_database_url_from_the_environment(catalog_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SITIANCAL_DATABASE_URL", catalog_url)
    monkeypatch.setenv("SITIANCAL_STORE_URL", str(tmp_path / "elsewhere"))
    store = ProductStore(tmp_path / "elsewhere")
    with Catalog.open(catalog_url) as catalog:
        catalog.publish_payload(store, make_payload(5))
    data_dir = tmp_path / "unused"
    ok = run(products, ["certify", "MST3/dark/v1", "--from", "2026-01-01T00:00:00+08:00"],
             data_dir)
    assert ok.exit_code == 0, ok.output
    best = json.loads(run(products, ["best", "MST3", "dark", "--at", "2026-06-01", "--json"],
                          data_dir).output)
    assert best["valid_from"] == "2025-12-31T16:00:00Z"
    assert run(products, ["verify", best["id"]], data_dir).exit_code == 0
    assert not (data_dir / "catalog.sqlite").exists()
    assert datetime.fromisoformat(best["created"]).tzinfo == UTC
