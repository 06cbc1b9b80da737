"""``sitiancal products ...`` and ``sitiancal db ...``: the catalog from the command line.

Both groups work against :class:`sitiancal.service.settings.Settings`: every
command takes ``--data-dir`` and honours ``SITIANCAL_DATABASE_URL`` and
``SITIANCAL_STORE_URL``. ``--json`` prints JSON; otherwise a readable table.
Errors (unknown product, conflicting certification, no product at a time...)
are one line on stderr with exit status 2, never a traceback; ``products
verify`` exits 1 when a checksum does not match.

Commands::

    sitiancal products list [--camera C] [--type T] [--state S] [--limit N]
    sitiancal products show REF
    sitiancal products certify REF --from TIME [--to TIME] [--reason TEXT] [--actor NAME]
    sitiancal products retract REF --reason TEXT [--actor NAME]
    sitiancal products best CAMERA TYPE [--at TIME] [--state certified|candidate] [--as-of TIME]
    sitiancal products history CAMERA TYPE
    sitiancal products verify [REF]   (also ``sitiancal verify``: every version without REF)
    sitiancal db upgrade
    sitiancal db current

``REF`` is a product id or ``CAMERA/TYPE/vN``; ``TIME`` is ISO 8601 (UTC if no
offset is given) or ``now``.
"""

from __future__ import annotations

import functools
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class _Time(click.ParamType):
    """ISO 8601 time (naive = UTC) or ``now``."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        text = str(value).strip()
        if text.lower() == "now":
            return datetime.now(UTC)
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time like 2026-03-14T00:00:00Z", param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=UTC)


TIME = _Time()


def _fail(message: str) -> None:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    click.echo(f"sitiancal: error: {first}", err=True)
    sys.exit(2)


def _handle_errors(func: F) -> F:
    """Turn the expected errors of a command into one line and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        from sitiancal.storage.catalog import CatalogError
        from sitiancal.storage.store import StoreError

        try:
            return func(*args, **kwargs)
        except (CatalogError, StoreError) as exc:
            _fail(str(exc))
        except SQLAlchemyError as exc:
            _fail(f"database error: {getattr(exc, 'orig', None) or exc}")
        except (OSError, ValueError) as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _common(func: F) -> F:
    """``--data-dir`` and ``--json`` on every command."""
    func = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)
    func = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Data directory (default: SITIANCAL_DATA_DIR or ./data).")(
        func)
    return func


def _settings(data_dir: Path | None) -> Any:
    from sitiancal.service.settings import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _catalog(data_dir: Path | None) -> Any:
    from sitiancal.storage.catalog import Catalog

    return Catalog.open(_settings(data_dir).catalog_url)


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _product_lines(product: Any) -> str:
    rows = [
        ("id", product.id),
        ("product", f"{product.camera}/{product.type}/v{product.version}"),
        ("state", product.state),
        ("valid", f"[{_iso(product.valid_from)}, "
                  f"{_iso(product.valid_to) if product.valid_to else 'open'})"
         if product.valid_from else "-"),
        ("created", _iso(product.created)),
        ("units", product.units),
        ("shape", " x ".join(str(n) for n in product.shape) or "-"),
        ("sha256", product.sha256),
        ("content key", product.content_key),
        ("job", product.job or "-"),
        ("dataset", product.dataset or "-"),
        ("store key", product.store_key),
    ]
    for key, value in sorted(product.stats.items()):
        if not isinstance(value, (dict, list)):
            rows.append((f"stats.{key}", value))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


# -- products --------------------------------------------------------------------
@click.group("products")
def products() -> None:
    """List, inspect, certify and retract product versions."""


@products.command("list")
@click.option("--camera", default=None, help="Only this camera.")
@click.option("--type", "product_type", default=None, help="Only this product type.")
@click.option("--state", type=click.Choice(["candidate", "certified", "retracted"]),
              default=None, help="Only versions in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N versions.")
@_common
@_handle_errors
def list_products(camera: str | None, product_type: str | None, state: str | None,
                  limit: int | None, data_dir: Path | None, as_json: bool) -> None:
    """List product versions (newest version first within a camera and type)."""
    with _catalog(data_dir) as catalog:
        found = catalog.list_products(camera=camera, type=product_type, state=state,
                                      limit=limit)
    if as_json:
        _echo_json([p.to_dict() for p in found])
        return
    if not found:
        click.echo("no product versions")
        return
    rows = [(f"{p.camera}/{p.type}/v{p.version}", p.state, _iso(p.valid_from),
             _iso(p.valid_to) if p.valid_to else ("open" if p.valid_from else "-"),
             _iso(p.created), p.id) for p in found]
    click.echo(_table(["PRODUCT", "STATE", "VALID FROM", "VALID TO", "CREATED", "ID"], rows))


@products.command("show")
@click.argument("ref")
@_common
@_handle_errors
def show(ref: str, data_dir: Path | None, as_json: bool) -> None:
    """Show one product version (REF: id or CAMERA/TYPE/vN)."""
    with _catalog(data_dir) as catalog:
        product = catalog.get_product(ref)
    if as_json:
        _echo_json(product.to_dict())
    else:
        click.echo(_product_lines(product))


@products.command("certify")
@click.argument("ref")
@click.option("--from", "valid_from", type=TIME, required=True,
              help="Start of validity (inclusive).")
@click.option("--to", "valid_to", type=TIME, default=None,
              help="End of validity (exclusive); default open ended.")
@click.option("--reason", default=None, help="Why (kept in the audit log).")
@click.option("--actor", default=None, help="Who (default: the login name).")
@_common
@_handle_errors
def certify(ref: str, valid_from: datetime, valid_to: datetime | None, reason: str | None,
            actor: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Certify a version for [FROM, TO); overlapping ranges are trimmed or refused."""
    with _catalog(data_dir) as catalog:
        product = catalog.certify(ref, valid_from, valid_to, actor=_actor(actor), reason=reason)
    if as_json:
        _echo_json(product.to_dict())
    else:
        end = _iso(product.valid_to) if product.valid_to else "open"
        click.echo(f"certified {product.camera}/{product.type}/v{product.version} for "
                   f"[{_iso(product.valid_from)}, {end})")


@products.command("retract")
@click.argument("ref")
@click.option("--reason", required=True, help="Why (kept in the history and audit log).")
@click.option("--actor", default=None, help="Who (default: the login name).")
@_common
@_handle_errors
def retract(ref: str, reason: str, actor: str | None, data_dir: Path | None,
            as_json: bool) -> None:
    """Retract a version; its history is kept."""
    with _catalog(data_dir) as catalog:
        product = catalog.retract(ref, actor=_actor(actor), reason=reason)
    if as_json:
        _echo_json(product.to_dict())
    else:
        click.echo(f"retracted {product.camera}/{product.type}/v{product.version}")


@products.command("best")
@click.argument("camera")
@click.argument("product_type", metavar="TYPE")
@click.option("--at", type=TIME, default=None, help="Observation time (default now).")
@click.option("--state", type=click.Choice(["certified", "candidate"]), default="certified",
              show_default=True, help="certified: valid at --at; candidate: the newest.")
@click.option("--as-of", "as_of", type=TIME, default=None,
              help="Answer as the catalog would have at this time.")
@_common
@_handle_errors
def best(camera: str, product_type: str, at: datetime | None, state: str,
         as_of: datetime | None, data_dir: Path | None, as_json: bool) -> None:
    """The version of TYPE to use for CAMERA at a time."""
    with _catalog(data_dir) as catalog:
        product = catalog.best(camera, product_type, at, state=state, as_of=as_of)
    if as_json:
        _echo_json(product.to_dict())
    else:
        click.echo(_product_lines(product))


@products.command("history")
@click.argument("camera")
@click.argument("product_type", metavar="TYPE")
@_common
@_handle_errors
def history(camera: str, product_type: str, data_dir: Path | None, as_json: bool) -> None:
    """Every state and validity change of CAMERA's TYPE versions."""
    with _catalog(data_dir) as catalog:
        records = catalog.history(camera, product_type)
    if as_json:
        _echo_json([r.to_dict() for r in records])
        return
    if not records:
        click.echo(f"no history for {camera}/{product_type}")
        return
    rows = [(_iso(r.recorded_at), f"v{r.version}", r.action, r.state, _iso(r.valid_from),
             _iso(r.valid_to) if r.valid_to else ("open" if r.valid_from else "-"), r.actor,
             r.reason or "") for r in records]
    click.echo(_table(["RECORDED", "VERSION", "ACTION", "STATE", "VALID FROM", "VALID TO",
                       "ACTOR", "REASON"], rows))


@products.command("verify")
@click.argument("ref", required=False)
@_common
@_handle_errors
def verify(ref: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Recompute checksums in the store: one version (REF) or every version (exit 1 on any mismatch)."""
    from sitiancal.storage.catalog import Catalog
    from sitiancal.storage.store import ProductStore

    settings = _settings(data_dir)
    store = ProductStore(settings.product_store_url)
    with Catalog.open(settings.catalog_url) as catalog:
        refs = [ref] if ref else [p.id for p in catalog.list_products()]
        reports = [catalog.verify(r, store) for r in refs]
    if as_json:
        _echo_json([r.to_dict() for r in reports] if ref is None else reports[0].to_dict())
    for report in [] if as_json else reports:
        if report.ok:
            click.echo(f"{report.key}: ok ({len(report.checked)} checksums)")
        else:
            click.echo(f"{report.key}: {len(report.problems)} problem(s)")
            for problem in report.problems:
                click.echo(f"  {problem}")
    if ref is None and not as_json:
        bad = sum(not r.ok for r in reports)
        click.echo(f"{len(reports)} product versions verified, {bad} with problems")
    if not all(r.ok for r in reports):
        sys.exit(1)


# -- db ------------------------------------------------------------------------------
@click.group("db")
def db() -> None:
    """Catalog database schema (Alembic migrations)."""


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    from sitiancal.storage.catalog import normalize_url

    return make_url(normalize_url(url)).render_as_string(hide_password=True)


@db.command("upgrade")
@_common
@_handle_errors
def db_upgrade(data_dir: Path | None, as_json: bool) -> None:
    """Migrate the catalog to the newest schema."""
    from sitiancal.storage.catalog import upgrade

    url = _settings(data_dir).catalog_url
    before, after = upgrade(url)
    if as_json:
        _echo_json({"url": _masked(url), "before": before, "after": after})
    elif before == after:
        click.echo(f"catalog {_masked(url)} is at revision {after} (up to date)")
    else:
        click.echo(f"catalog {_masked(url)} upgraded from {before or 'empty'} to {after}")


@db.command("current")
@_common
@_handle_errors
def db_current(data_dir: Path | None, as_json: bool) -> None:
    """Show the catalog's schema revision and the newest one."""
    from sitiancal.storage.catalog import current_revision, head_revision

    url = _settings(data_dir).catalog_url
    current, head = current_revision(url), head_revision()
    if as_json:
        _echo_json({"url": _masked(url), "current": current, "head": head,
                    "up_to_date": current == head})
    else:
        state = "up to date" if current == head else "run `sitiancal db upgrade`"
        click.echo(f"catalog {_masked(url)}: revision {current or 'none'} "
                   f"(head {head}; {state})")
