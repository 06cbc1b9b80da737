"""``make demo``: one camera, end to end, on the embedded default.

Simulates a small ZWO ASI6200MM Pro calibration set (a 256 x 320 window of
the sensor with the reference study's properties), runs the whole
calibration job (scan, cube, per-pixel products, publish into the SQLite
catalog and local zarr store), prints the QC table, the stored product
versions and where every result is.

Run with ``python -m sitiancal.service.demo [DIR]`` (default ``./demo``).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from sitiancal.compute.simulate import SimulationConfig, simulate_dataset
from sitiancal.service.pipeline import calibrate
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog

#: The demo camera: a 256 x 320 window, 16 bias, 5 dark exposure times, 10 flat
#: levels of 24 frames (enough for per-pixel gain), a 15% second gain population.
DEMO_CAMERA = {
    "shape": (256, 320), "seed": 2026, "n_bias": 16, "dark_exptimes": [0.0, 60.0, 300.0, 600.0],
    "dark_frames": 4, "flat_levels": 10, "flat_frames": 24, "gain2_fraction": 0.15,
    "gain2_mean": 0.30, "hot_fraction": 5e-4, "rtn_fraction": 5e-4,
}


def run(root: Path) -> int:
    """Run the demo under ``root``; return a process exit status."""
    raw = root / "raw" / "MST3"
    data = root / "data"
    export = root / "export"
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    print(f"[1/3] simulating camera MST3 ({DEMO_CAMERA['shape'][0]} x {DEMO_CAMERA['shape'][1]} px) "
          f"into {raw}")
    summary = simulate_dataset(raw, SimulationConfig(**DEMO_CAMERA))
    # The truth file is for tests; keep it beside, not inside, the dataset folder.
    truth = root / "truth.fits"
    summary.truth_path.rename(truth)
    print(f"      {summary.n_frames} FITS frames; simulator truth in {truth}")

    print("[2/3] calibrating (scan, cube, per-pixel products, publish)")
    settings = Settings(data_dir=data)
    result = calibrate(raw, "MST3", settings, export_dir=export)
    table = result.report["table"]
    width = max(len(row[0]) for row in table)
    print(f"\nQC report, camera MST3 (dataset {result.dataset_id})")
    print("-" * (width + 30))
    for label, value in table:
        print(f"{label:<{width}}  {value}")
    for name, reason in result.report.get("missing", {}).items():
        print(f"{name} not computed: {reason}")

    print("\n[3/3] stored product versions")
    catalog = Catalog.open(settings.catalog_url)
    try:
        for p in catalog.list_products(camera="MST3"):
            print(f"  MST3/{p.type:<10} v{p.version}  {p.state:<9} sha256 {p.sha256[:12]}  "
                  f"{settings.product_store_url}/{p.store_key}")
    finally:
        catalog.close()
    print(f"\nresults:\n  catalog   {settings.catalog_url}\n  store     {settings.product_store_url}\n"
          f"  FITS      {export}/<type>.fits\n  report    {export / 'report.json'}\n"
          f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run(Path(args[0]) if args else Path("demo"))


if __name__ == "__main__":
    sys.exit(main())
