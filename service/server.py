"""``sitiancal serve``: run the HTTP service with uvicorn.

The embedded default needs no configuration: a SQLite catalog, a local zarr
store and a dask LocalCluster (worker threads in the service process), all
under ``--data-dir``. Every setting can also come from ``SITIANCAL_*``
environment variables (:class:`~sitiancal.service.settings.Settings`); flags
win over the environment.

When no operator token is configured, one is generated and stored in
``<data dir>/operator-token`` with owner-only permissions (0600); its
location, never the token itself, is printed.

uvicorn runs on its fastest implementations when they are installed
(``httptools`` for HTTP/1.1 parsing, ``uvloop`` as the event loop): the
load test measured about 70 us of service CPU per cached best-at-time
lookup with them against about 170 us with the pure-Python ``h11`` on
asyncio. Idle keep-alive connections are kept ``KEEP_ALIVE_S`` seconds, so
a pipeline that looks calibrations up once per exposure reuses its
connection instead of opening one per lookup.
"""

from __future__ import annotations

import gc
import os
import secrets
import stat
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import click

from sitiancal.service.settings import Settings

#: File of the generated operator token, relative to the data dir.
TOKEN_FILE = "operator-token"
#: Seconds an idle keep-alive connection stays open (uvicorn's default is 5 s).
KEEP_ALIVE_S = 75


def uvicorn_options() -> dict[str, Any]:
    """uvicorn's HTTP parser, event loop and keep-alive: the fastest installed ones.

    Returns
    -------
    dict
        ``http`` (``"httptools"`` or ``"h11"``), ``loop`` (``"uvloop"`` or
        ``"asyncio"``) and ``timeout_keep_alive`` (s), as ``uvicorn.run`` takes them.
    """
    return {"http": "httptools" if find_spec("httptools") else "h11",
            "loop": "uvloop" if find_spec("uvloop") and sys.platform != "win32" else "asyncio",
            "timeout_keep_alive": KEEP_ALIVE_S}


class TokenFileError(RuntimeError):
    """The operator token file exists but cannot be used safely."""


def ensure_operator_token(settings: Settings) -> tuple[Settings, Path | None]:
    """Settings with an operator token: the configured ones, or one from the data dir.

    Returns
    -------
    (Settings, Path or None)
        The settings to serve with, and the token file when one is used.

    Raises
    ------
    TokenFileError
        The token file is readable by others than its owner, or empty.
    """
    if settings.operator_tokens:
        return settings, None
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise TokenFileError(f"{path} is accessible by other users (mode {mode:04o}); "
                                 "run `chmod 600` on it or delete it to get a new token") from None
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise TokenFileError(f"{path} is empty; delete it to get a new token") from None
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
    return settings.model_copy(update={"operator_tokens": [token]}), path


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data directory (catalog, store, cubes, token); default SITIANCAL_DATA_DIR "
              "or ./data.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Log every request at info level (about 25 us of CPU per request; "
              "writes are audited either way).")
def serve(host: str, port: int, data_dir: Path | None, log_level: str, access_log: bool) -> None:
    """Run the calibration service (HTTP API of API.md)."""
    import uvicorn

    from sitiancal.api.app import create_app

    settings = Settings(**({"data_dir": data_dir} if data_dir is not None else {}))
    try:
        settings, token_path = ensure_operator_token(settings)
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from None
    if token_path is not None:
        click.echo(f"operator token: stored in {token_path} (mode 0600); send it as "
                   "'Authorization: Bearer <token>'", err=True)
    from sqlalchemy.engine import make_url

    catalog = make_url(settings.catalog_url).render_as_string(hide_password=True)
    where = settings.scheduler_address or "a local dask cluster (worker threads)"
    options = uvicorn_options()
    click.echo(f"sitiancal {host}:{port}: catalog {catalog}, store "
               f"{settings.product_store_url}, compute on {where}; HTTP {options['http']} on "
               f"{options['loop']}", err=True)
    app = create_app(settings)
    # The imported libraries and the app are some 230 000 objects that live as long as the
    # process. Frozen, they are out of the cyclic collector's sight: a full collection while
    # serving scans only what was made since (measured: under 1 ms instead of about 100 ms,
    # a pause every request in flight would wait for).
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                    **options)
    finally:
        gc.unfreeze()


#: Name under which the lead registers the command in ``service/cli.py``.
serve_command = serve
