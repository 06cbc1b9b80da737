"""The ``sitiancal`` command line.

Every command is a thin shell over a library function; errors that come from
bad input are reported as one clear line naming the file and the problem
(exit status 2), never as a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sitiancal import __version__


class _Shape(click.ParamType):
    name = "NYxNX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        try:
            ny, nx = (int(v) for v in str(value).lower().split("x"))
        except ValueError:
            self.fail(f"{value!r} is not a frame shape like 6388x9576", param, ctx)
        if ny <= 0 or nx <= 0:
            self.fail(f"{value!r}: both dimensions must be positive", param, ctx)
        return (ny, nx)


class _FloatList(click.ParamType):
    name = "T1,T2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, list):
            return value
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


TEMPERATURE_TOLERANCE_HELP = ("Sensor-temperature spread (deg C) beyond which the scan warns, "
                              "and the gap that splits the darks into temperature clusters "
                              "(the largest is kept). Default: 2.")
TYPES_FROM_PATHS_HELP = ("Files without a frame-type keyword (IMAGETYP...) take their type "
                         "from a word of their name or folders (bias, zero, dark, flat), "
                         "with a warning, instead of being rejected.")


def _fail(message: str) -> None:
    click.echo(f"sitiancal: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sitiancal")
def main() -> None:
    """sitiancal: per-pixel calibration of CMOS cameras."""
    # first, before any command starts a thread (a progress bar's monitor, a job's
    # pools): see compute.allocator.keep_freed_memory
    from sitiancal.compute.allocator import keep_freed_memory

    keep_freed_memory()


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=_Shape(), default="6388x9576", show_default=True,
              help="Frame shape (rows x columns).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--bias", "n_bias", type=int, default=None, help="Number of bias frames.")
@click.option("--darks", "dark_exptimes", type=_FloatList(), default=None,
              help="Dark exposure times in s, e.g. 0,10,30,60,120,300,600.")
@click.option("--dark-frames", type=int, default=None, help="Dark frames per exposure time.")
@click.option("--flat-levels", type=int, default=None, help="Number of flat levels.")
@click.option("--flat-frames", type=int, default=None, help="Flat frames per level.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other SimulationConfig field (JSON value), repeatable.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def simulate(out_dir: Path, shape: tuple[int, int], seed: int, n_bias: int | None,
             dark_exptimes: list[float] | None, dark_frames: int | None,
             flat_levels: int | None, flat_frames: int | None,
             overrides: tuple[str, ...], progress: bool) -> None:
    """Write a simulated camera dataset (FITS frames and truth.fits) to OUT_DIR."""
    from pydantic import ValidationError

    from sitiancal.compute.simulate import SimulationConfig, simulate_dataset
    from sitiancal.service.progress import progress_bar

    fields: dict[str, Any] = {"shape": shape, "seed": seed}
    for key, value in (("n_bias", n_bias), ("dark_exptimes", dark_exptimes),
                       ("dark_frames", dark_frames), ("flat_levels", flat_levels),
                       ("flat_frames", flat_frames)):
        if value is not None:
            fields[key] = value
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            _fail(f"--set {item!r}: expected KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key.strip()] = raw
    try:
        config = SimulationConfig(**fields)
    except ValidationError as exc:
        _fail(f"invalid simulation settings: {exc}")
    with progress_bar("simulate", enabled=progress) as bar:
        summary = simulate_dataset(out_dir, config, progress=bar)
    click.echo(f"wrote {summary.n_frames} frames and the truth file to {out_dir}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON.")
@click.option("--allow-mixed-states", is_flag=True,
              help="Accept frames taken with different GAIN/OFFSET/binning.")
@click.option("--types-from-paths", is_flag=True, help=TYPES_FROM_PATHS_HELP)
@click.option("--temperature-tolerance", type=click.FloatRange(min=0.0), default=None,
              metavar="DEG_C", help=TEMPERATURE_TOLERANCE_HELP)
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def scan(path: Path, as_json: bool, allow_mixed_states: bool, types_from_paths: bool,
         temperature_tolerance: float | None, progress: bool | None) -> None:
    """Read the FITS headers under PATH and print the dataset inventory."""
    from sitiancal.service.progress import progress_bar
    from sitiancal.storage.scan import ScanError
    from sitiancal.storage.scan import scan as scan_path

    show = sys.stderr.isatty() if progress is None else progress
    try:
        with progress_bar("scan", enabled=show) as bar:
            inventory = scan_path(path, allow_mixed_states=allow_mixed_states, progress=bar,
                                  types_from_paths=types_from_paths,
                                  temperature_tolerance=temperature_tolerance)
    except ScanError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(inventory.model_dump_json(indent=2, exclude={"frames"}))
    else:
        click.echo(inventory.summary())
    if not inventory.frames:
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", "store", required=True, help="Cube store (path or URL).")
@click.option("--types-from-paths", is_flag=True, help=TYPES_FROM_PATHS_HELP)
@click.option("--temperature-tolerance", type=click.FloatRange(min=0.0), default=None,
              metavar="DEG_C", help=TEMPERATURE_TOLERANCE_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def cube(path: Path, store: str, types_from_paths: bool, temperature_tolerance: float | None,
         progress: bool) -> None:
    """Scan PATH and write the accepted frames into a zarr v3 cube at STORE."""
    from sitiancal.service.progress import progress_bar
    from sitiancal.storage.cube import CubeError, build_cube
    from sitiancal.storage.scan import ScanError
    from sitiancal.storage.scan import scan as scan_path

    try:
        inventory = scan_path(path, types_from_paths=types_from_paths,
                              temperature_tolerance=temperature_tolerance)
        if not inventory.frames:
            _fail(f"{path}: no usable frame; " + "; ".join(
                f"{r.file}: {r.reason}" for r in inventory.rejected))
        with progress_bar("cube", enabled=progress) as bar:
            ds = build_cube(inventory, store, progress=bar)
    except (ScanError, CubeError) as exc:
        _fail(str(exc))
    except OSError as exc:  # disk full, file size limit, permissions: no traceback
        _fail(f"cube {store} not built: {exc}")
    for r in ds.attrs.get("left_out", []):
        click.echo(f"warning: {r['file']} left out: {r['reason']}", err=True)
    click.echo(f"cube of {ds.sizes['frame']} frames "
               f"({ds.sizes['y']} x {ds.sizes['x']}) written to {store}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--camera", required=True, help="Camera identifier, e.g. MST3.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data directory of the embedded deployment (default: SITIANCAL_DATA_DIR or ./data).")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write <type>.fits per product and report.json here.")
@click.option("--products", default=None, metavar="TYPE,...",
              help="Product types to compute (default: all the dataset supports).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Job parameter (JSON value), repeatable, e.g. --param clip_sigma=4.")
@click.option("--force", is_flag=True, help="Publish new versions even if identical ones exist.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory budget of the run, e.g. 4GB (default: SITIANCAL_MEMORY_LIMIT, 4GB); "
              "fewer tiles run at once, or smaller ones, to stay within it.")
@click.option("--types-from-paths", is_flag=True, help=TYPES_FROM_PATHS_HELP)
@click.option("--temperature-tolerance", type=click.FloatRange(min=0.0), default=None,
              metavar="DEG_C", help=TEMPERATURE_TOLERANCE_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def calibrate(path: Path, camera: str, data_dir: Path | None, export_dir: Path | None,
              products: str | None, params: tuple[str, ...], force: bool,
              memory_limit: str | None, types_from_paths: bool,
              temperature_tolerance: float | None, progress: bool) -> None:
    """Run the whole calibration of the camera dataset at PATH and store its products."""
    from dask.utils import parse_bytes

    from sitiancal.service.pipeline import calibrate as run_calibrate
    from sitiancal.service.settings import Settings

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    if memory_limit is not None:
        try:
            if parse_bytes(memory_limit) <= 0:
                raise ValueError
        except ValueError:
            _fail(f"--memory-limit {memory_limit!r}: expected a size such as 4GB or 512MB")
        overrides["memory_limit"] = memory_limit
    settings = Settings(**overrides)
    wanted = [p.strip() for p in products.split(",") if p.strip()] if products else None
    job_params: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep:
            _fail(f"--param {item!r}: expected KEY=VALUE")
        try:
            job_params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            job_params[key.strip()] = raw
    bar = _stage_bar() if progress else None
    try:
        run = run_calibrate(path, camera, settings, wanted=wanted, params=job_params, force=force,
                            export_dir=export_dir, progress=bar,
                            types_from_paths=types_from_paths,
                            temperature_tolerance=temperature_tolerance)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    click.echo(_report_table(run.report))
    click.echo(f"\ndataset {run.dataset_id}, job {run.job_id}: {len(run.product_ids)} products "
               f"stored in {settings.product_store_url} (catalog {settings.catalog_url})")
    for item in run.exported:
        click.echo(f"  exported {item}")


@main.command(name="compile")
@click.option("--progress/--no-progress", default=True, help="Say what it is doing.")
def compile_kernels(progress: bool) -> None:
    """Compile the calibration kernels into numba's cache, ahead of the first job.

    Run it after installing, and when building an image: a job that finds the
    cache empty compiles them itself (about 1.5 to 2 minutes of one core, and
    the compiler's memory on top of the job's).
    """
    from sitiancal.service.precompile import cache_folder, precompile

    say = (lambda message: click.echo(f"  {message}", err=True)) if progress else None
    try:
        report = precompile(progress=say)
    except (ValueError, OSError) as exc:
        _fail(f"compile: {exc}")
    where = cache_folder()
    if report.compiled:
        click.echo(f"compiled {len(report.compiled)} kernels ({report.signatures} signatures) "
                   f"in {report.seconds:.0f} s into {where}")
    else:
        click.echo(f"every kernel was in numba's cache already ({where}; {report.seconds:.0f} s)")


class _StageBar:
    """A tqdm bar for ``progress(stage, fraction)`` callbacks."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc="calibrate", unit="", dynamic_ncols=True,
                        bar_format="{desc:<9} {percentage:3.0f}%|{bar}| {elapsed}")

    def __call__(self, stage: str, fraction: float) -> None:
        n = int(1000 * min(max(fraction, 0.0), 1.0))
        if stage == self.bar.desc and n - self.bar.n < 10:
            return  # redraw at most every 1% within a stage
        self.bar.set_description(stage, refresh=False)
        self.bar.n = n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _stage_bar() -> _StageBar:
    return _StageBar()


def _report_table(report: dict[str, Any]) -> str:
    rows = report.get("table", [])
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"QC report for camera {report.get('camera')}", "-" * (width + 32)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    for name, reason in report.get("missing", {}).items():
        lines.append(f"{name} not computed: {reason}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def _register_groups() -> None:
    from sitiancal.service.products_cli import db, products, verify
    from sitiancal.service.report_html import report_command
    from sitiancal.service.server import serve

    main.add_command(serve)
    main.add_command(products)
    main.add_command(db)
    main.add_command(verify, name="verify")
    main.add_command(report_command)


_register_groups()


if __name__ == "__main__":  # pragma: no cover
    main()
