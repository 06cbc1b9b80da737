"""The operators' dashboard: a static page polling the JSON API, and its fleet data.

``/ui`` serves ``api/static/index.html`` (vanilla JavaScript, no CDN, works
offline); ``/`` redirects to it. The page reads ``/v1/jobs`` and
``/v1/cameras`` directly and the two summaries below, which are computed
server-side from the catalog's product statistics:

- ``/ui/fleet.json``: the key figures of every camera's newest products
  (gain, read noise, dark current, anomalous fraction) and, per figure, the
  fleet median, robust sigma (1.4826 MAD) and which cameras lie more than
  ``OUTLIER_SIGMA`` robust sigma from it;
- ``/ui/trends.json``: the same figures for every version of every camera
  over time (drift).

``/ui/info.json`` gives the service version and the link to the dask
dashboard (the embedded cluster's, on ``SITIANCAL_DASK_DASHBOARD``, or the
external scheduler's) once the service has seen it answer.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from sitiancal.api.deps import CatalogDep, Reader
from sitiancal.service.report_html import latest_products, newest_not_retracted
from sitiancal.storage.catalog import Catalog, ProductVersion

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: Distance from the fleet median (in robust sigma) beyond which a camera is an outlier.
OUTLIER_SIGMA = 3.0
#: Fewest cameras with a figure before outliers are judged.
MIN_FLEET = 3


def _get(stats: Mapping[str, Any], *path: str) -> float | None:
    cur: Any = stats
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    try:
        value = float(cur)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


#: Key figure -> (label, units, product type, how to read it from that type's stats).
KEY_FIGURES: dict[str, tuple[str, str, str, Callable[[Mapping[str, Any]], float | None]]] = {
    "gain": ("Gain (PTC)", "e-/ADU", "ptc", lambda s: _get(s, "gain")),
    "read_noise": ("Read noise (per-pixel median)", "e-", "read_noise",
                   lambda s: _get(s, "median_e")),
    "dark": ("Dark current (median)", "e-/pix/s", "dark",
             lambda s: _get(s, "summary", "median")),
    "anomalous": ("Anomalous pixels", "%", "mask",
                  lambda s: _pct(_get(s, "counts", "any", "fraction"))),
}


def robust_outliers(values: Mapping[str, float], n_sigma: float = OUTLIER_SIGMA
                    ) -> tuple[float | None, float | None, list[str]]:
    """Fleet median, robust sigma (1.4826 MAD) and the names beyond ``n_sigma`` of it.

    With fewer than :data:`MIN_FLEET` values, or a zero spread, nothing is an outlier.
    """
    if not values:
        return None, None, []
    x = np.array(list(values.values()), dtype=float)
    median = float(np.median(x))
    sigma = float(1.4826 * np.median(np.abs(x - median)))
    if len(x) < MIN_FLEET or sigma <= 0:
        return median, sigma, []
    return median, sigma, sorted(k for k, v in values.items()
                                 if abs(v - median) > n_sigma * sigma)


def fleet_summary(catalog: Catalog) -> dict[str, Any]:
    """Key figures of every camera's newest products, with fleet statistics and outliers."""
    rows: dict[str, dict[str, float | None]] = {}
    for camera in catalog.list_cameras():
        latest = latest_products(catalog, camera.name)
        rows[camera.name] = {
            key: (get(latest[kind].stats) if kind in latest else None)
            for key, (_, _, kind, get) in KEY_FIGURES.items()}
    figures = {}
    for key, (label, units, kind, _) in KEY_FIGURES.items():
        values = {c: r[key] for c, r in rows.items() if r[key] is not None}
        median, sigma, outliers = robust_outliers(values)
        figures[key] = {"label": label, "units": units, "product": kind, "median": median,
                        "robust_sigma": sigma, "outliers": outliers}
    return {"n_sigma": OUTLIER_SIGMA, "figures": figures,
            "cameras": [{"camera": c, **r} for c, r in sorted(rows.items())]}


def camera_trends(catalog: Catalog, camera: str | None = None) -> dict[str, Any]:
    """Key figures of every version over time, per camera (oldest first)."""
    names = [camera] if camera else [c.name for c in catalog.list_cameras()]
    out: dict[str, Any] = {}
    for name in names:
        series: dict[str, list[dict[str, Any]]] = {}
        for key, (_, _, kind, get) in KEY_FIGURES.items():
            points = []
            for product in sorted(catalog.list_products(camera=name, type=kind),
                                  key=lambda p: p.created):
                value = get(product.stats)
                if value is not None:
                    points.append({"version": product.version, "state": product.state,
                                   "time": (product.date_beg or product.created).isoformat(),
                                   "value": value})
            series[key] = points
        out[name] = series
    return {"figures": {k: {"label": v[0], "units": v[1]} for k, v in KEY_FIGURES.items()},
            "cameras": out}


def dask_dashboard(request: Request) -> tuple[str | None, str]:
    """The dask dashboard link for the page, and its state.

    Returns
    -------
    (url, state)
        ``state`` is ``"running"`` (the scheduler serves the dashboard's pages), ``"disabled"``
        (``SITIANCAL_DASK_DASHBOARD`` is off, or the service runs without dask)
        or ``"unavailable"`` (the scheduler serves no dashboard, or it does not
        answer, or the scheduler cannot be reached); ``url`` is None unless running.
    """
    state = getattr(request.app.state, "sitiancal", None)
    runner = getattr(state, "runner", None)
    if runner is None:
        return None, "unavailable"
    if runner.settings.dask_dashboard is None or not runner.uses_dask:
        return None, "disabled"
    try:
        where = runner.dask_dashboard()
    except Exception:  # a lost scheduler must not break the dashboard page
        log.debug("could not ask the dask scheduler for its dashboard", exc_info=True)
        return None, "unavailable"
    if where is None or not _serves(where.probe):
        return None, "unavailable"
    return where.url, "running"


#: probe URL -> (monotonic time, whether the dashboard is served)
_PROBED: dict[str, tuple[float, bool]] = {}
#: The probe goes straight to the scheduler, never through an HTTP proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _serves(probe: str, ttl: float = 60.0, retry: float = 5.0, timeout: float = 5.0) -> bool:
    """Whether the scheduler behind ``probe`` (its ``individual-plots.json``) serves
    the dashboard's bokeh pages: it answers 200 with a non-empty JSON object. Without
    bokeh the scheduler's HTTP server still runs and answers ``{}`` (and ``/status``
    is a page asking to install bokeh). An answer is remembered ``ttl`` seconds, a
    failure ``retry`` seconds."""
    now = time.monotonic()
    hit = _PROBED.get(probe)
    if hit is not None and now - hit[0] < (ttl if hit[1] else retry):
        return hit[1]
    try:
        with _DIRECT.open(probe, timeout=timeout) as reply:
            plots = json.loads(reply.read()) if reply.status == 200 else None
        ok = isinstance(plots, dict) and bool(plots)
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    _PROBED[probe] = (now, ok)
    return ok


@router.get("/", response_class=RedirectResponse)
def root() -> RedirectResponse:
    """The dashboard."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui", response_class=FileResponse)
def dashboard() -> FileResponse:
    """The dashboard page (static HTML + vanilla JavaScript polling the API)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


@router.get("/ui/fleet.json")
def fleet(catalog: CatalogDep, _: Reader) -> dict[str, Any]:
    """Key figures of every camera with fleet median, robust sigma and outliers."""
    return fleet_summary(catalog)


@router.get("/ui/trends.json")
def trends(catalog: CatalogDep, _: Reader, camera: str | None = None) -> dict[str, Any]:
    """Key figures across versions over time (per camera)."""
    if camera is not None:
        catalog.get_camera(camera)
    return camera_trends(catalog, camera)


@router.get("/ui/info.json")
def info(request: Request, _: Reader) -> dict[str, Any]:
    """Service facts for the page: version, and the dask dashboard link when one runs
    (``dask_dashboard_state``: running, disabled or unavailable)."""
    from sitiancal import __version__

    url, state = dask_dashboard(request)
    return {"version": __version__, "dask_dashboard": url, "dask_dashboard_state": state}


def camera_products(catalog: Catalog) -> dict[str, Any]:
    """Per camera and product type: the newest version and the version certified now.

    Both columns of a camera come from one read of its versions, so a certification
    or retraction committed while the answer is built shows in both or in neither
    (reading them with two queries once showed a version as "candidate" in one
    column and "certified" in the other).
    """
    from sitiancal.service.datasets import ALL_PRODUCTS

    def brief(p: ProductVersion) -> dict[str, Any]:
        return {"id": p.id, "version": p.version, "state": p.state,
                "valid_from": p.valid_from.isoformat() if p.valid_from else None,
                "valid_to": p.valid_to.isoformat() if p.valid_to else None,
                "created": p.created.isoformat()}

    now = datetime.now(UTC)
    cameras = []
    for camera in catalog.list_cameras():
        versions = catalog.list_products(camera=camera.name)  # newest version first
        newest = newest_not_retracted(versions)
        types = {}
        for kind in ALL_PRODUCTS:
            latest = newest.get(kind)
            # as Catalog.best: the newest certified version whose range holds now
            certified = next((p for p in versions if p.type == kind
                              and p.state == "certified" and p.covers(now)), None)
            if latest or certified:
                types[kind] = {"latest": brief(latest) if latest else None,
                               "certified": brief(certified) if certified else None}
        cameras.append({"camera": camera.name, "products": types})
    return {"cameras": cameras}


@router.get("/ui/cameras.json")
def cameras(catalog: CatalogDep, _: Reader) -> dict[str, Any]:
    """Per camera: newest and currently certified version of each product type."""
    return camera_products(catalog)
