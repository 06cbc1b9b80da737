"""Scale-out of the tile pass on a real dask scheduler with N worker processes (issue 6).

Builds the cube and the plan of a camera set once, then runs the tile pass
(the per-pixel work: every frame read once, tile by tile) on a dask scheduler
with 1, 2, 4, ... single-threaded worker processes on loopback, started as
separate ``dask scheduler`` / ``dask worker`` processes (``run.spawned_cluster``).
Prints and writes (``scaleout.json``, ``scaleout.md``) the wall time,
Gpix/s, input GB/s, speed-up and parallel efficiency per worker count, and
projects the time to calibrate the whole network from the measured figures:

* per camera: cube + plan + tile pass (at the best worker count of one
  camera) + assembly (measured once, serial per camera);
* network: ``cameras`` camera sets on ``machines`` machines of ``workers``
  workers each, cameras run side by side (a camera's tile pass alone does
  not fill many workers: it has only ``n_tiles`` tasks).

Usage::

    python benchmarks/scaleout.py --frames-dir /work/bench/raw --workers 1,2 --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import spawned_cluster  # the benchmark's own cluster helper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames-dir", type=Path, required=True, help="camera set (FITS folder)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="results folder")
    p.add_argument("--cameras", type=int, default=60, help="cameras of the network")
    p.add_argument("--machines", default="1,4,8", help="machine counts for the projection")
    p.add_argument("--assembly", action="store_true",
                   help="also time the product assembly once (serial per camera)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from distributed import Client

    from sitiancal.compute.graph import build_tile_graph
    from sitiancal.compute.plan import make_plan
    from sitiancal.compute.products import assemble_products
    from sitiancal.compute.tile import CalibrationParams, expected_maps
    from sitiancal.service.pipeline import ZarrMapSink, _region_reader, _run_tasks, frame_table
    from sitiancal.storage.cube import build_cube, frame_reader
    from sitiancal.storage.scan import scan

    out: Path = args.out
    work = out / "scaleout-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inventory = scan(args.frames_dir)
    if not inventory.frames:
        raise SystemExit(f"error: {args.frames_dir}: no usable frame")
    ny, nx = inventory.shape
    n_frames = len(inventory.frames)
    gpix = ny * nx * n_frames / 1e9
    gbytes = sum(os.path.getsize(f.path) for f in inventory.frames) / 1e9

    t0 = time.perf_counter()
    ds = build_cube(inventory, str(work / "cube.zarr"))
    cube_s = time.perf_counter() - t0
    params = CalibrationParams()
    reader = frame_reader(str(work / "cube.zarr"))
    tile = (int(ds.attrs["tile"][0]), int(ds.attrs["tile"][1]))
    t0 = time.perf_counter()
    planned = make_plan(frame_table(ds), _region_reader(reader, (ny, nx), params.ptc_region),
                        params, ny=ny, nx=nx)
    plan_s = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    for n in (int(v) for v in args.workers.split(",")):
        with spawned_cluster(n, work) as address, Client(address) as client:
            client.wait_for_workers(n, timeout=120)
            sink = ZarrMapSink(work / f"maps-{n}.zarr", shape=(ny, nx), tile=tile,
                               expected=expected_maps(planned.plan))
            tasks = build_tile_graph(reader, sink, shape=(ny, nx), tile=tile,
                                     plan=planned.plan, params=params)
            # compile the kernels in every worker first (numba JIT / cache load), as
            # a long-running service's workers are: the timing is of the work alone
            client.run(_warm_up, reader, planned.plan, params)
            t0 = time.perf_counter()
            partials = _run_tasks(tasks, client, lambda done: None, lambda: False)
            wall = time.perf_counter() - t0
        rows.append({"workers": n, "wall_s": wall, "gpixps": gpix / wall,
                     "input_gbps": gbytes / wall, "n_tiles": len(tasks)})
        print(f"{n:3d} workers: tile pass {wall:7.1f} s, {gpix / wall:6.3f} Gpix/s", flush=True)
        if n != max(int(v) for v in args.workers.split(",")):
            shutil.rmtree(work / f"maps-{n}.zarr", ignore_errors=True)
    base = rows[0]["wall_s"] * rows[0]["workers"]
    for r in rows:
        r["speedup"] = rows[0]["wall_s"] / r["wall_s"]
        r["efficiency"] = base / (r["wall_s"] * r["workers"])

    assembly_s = None
    if args.assembly:
        last = max(rows, key=lambda r: r["workers"])["workers"]
        import zarr

        group = zarr.open_group(str(work / f"maps-{last}.zarr"), mode="r")
        maps = {name: group[name] for name in group.array_keys()}
        t0 = time.perf_counter()
        assemble_products(maps, planned, params, shape=(ny, nx), partials=partials,
                          emit=lambda content: None)
        assembly_s = time.perf_counter() - t0

    per_worker = rows[0]["gpixps"] / rows[0]["workers"]  # Gpix/s of one worker
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True)},
        "frames": n_frames, "shape": [ny, nx], "gpix": gpix, "input_gb": gbytes,
        "cube_s": cube_s, "plan_s": plan_s, "assembly_s": assembly_s, "tile_pass": rows,
        "per_worker_gpixps": per_worker,
    }
    result["projection"] = project(result, args.cameras,
                                   [int(v) for v in args.machines.split(",")])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(result, indent=2))
    (out / "scaleout.md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def _warm_up(reader: Any, plan: Any, params: Any) -> None:
    """Run the tile function on a 16 x 16 window (compiles every kernel it uses)."""
    from functools import partial

    from sitiancal.compute.graph import _load
    from sitiancal.compute.tile import process_tile

    process_tile(partial(_load, reader, slice(0, 16), slice(0, 16)), plan, params)


def project(result: dict[str, Any], cameras: int, machines: list[int]) -> list[dict[str, Any]]:
    """Network time from the measured figures (see the module docstring).

    One camera's job is serial outside its tile pass (cube statistics, plan,
    assembly: one process each); its tile pass has ``n_tiles`` tasks of
    ``tile_s1`` seconds of one worker each. With ``W`` workers per machine
    and ``M`` machines, cameras run side by side, each on its own worker
    share: the network's work is ``cameras * (serial + n_tiles * tile_s1)``
    worker-seconds, spread over ``M * W`` workers.
    """
    rows = result["tile_pass"]
    one = rows[0]
    tile_s1 = one["wall_s"] * one["workers"] / one["n_tiles"]  # worker-seconds per tile
    serial = result["cube_s"] + result["plan_s"] + (result["assembly_s"] or 0.0)
    per_camera_ws = serial + one["n_tiles"] * tile_s1
    workers = result["machine"]["cpus"] or 1
    out = []
    for m in machines:
        total = cameras * per_camera_ws / (m * workers)
        out.append({"machines": m, "workers_per_machine": workers, "cameras": cameras,
                    "worker_seconds_per_camera": per_camera_ws,
                    "network_hours": total / 3600.0,
                    "cameras_per_hour": 3600.0 * m * workers / per_camera_ws})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Scale-out {result['date']} on {result['machine']['cpus']} CPUs "
             f"({result['machine']['platform']}); {result['frames']} frames of "
             f"{result['shape'][0]}x{result['shape'][1]} ({result['input_gb']:.2f} GB, "
             f"{result['gpix']:.2f} Gpix); cube {result['cube_s']:.1f} s, plan "
             f"{result['plan_s']:.1f} s" + (f", assembly {result['assembly_s']:.1f} s"
                                            if result["assembly_s"] else "") + ".", "",
             "| workers | tile pass (s) | Gpix/s | input GB/s | speed-up | efficiency |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["tile_pass"]:
        lines.append(f"| {r['workers']} | {r['wall_s']:.1f} | {r['gpixps']:.3f} | "
                     f"{r['input_gbps']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.0%} |")
    lines += ["", f"Per worker: {result['per_worker_gpixps']:.3f} Gpix/s. Projection for "
              f"{result['projection'][0]['cameras']} camera sets like this one:", "",
              "| machines | workers each | network time (h) | camera sets per hour |",
              "|---:|---:|---:|---:|"]
    for p in result["projection"]:
        lines.append(f"| {p['machines']} | {p['workers_per_machine']} | "
                     f"{p['network_hours']:.2f} | {p['cameras_per_hour']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
    sys.exit(0)
