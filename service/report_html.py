"""The operators' QC report as one self-contained HTML page, and its file export.

The page holds the scalar QC table of :mod:`sitiancal.service.report` and the
figures of :mod:`sitiancal.service.plots` as base64-embedded PNGs, so it
works offline (no CDN, no external file). :func:`export_report` writes the
page, one PNG per figure and optionally a PDF with every figure.

A report covers either a camera (its newest or currently certified version
of each product type: :func:`build_html_report`) or one job (the versions it
produced or reused, as the catalog links them: :func:`job_report` and
:func:`build_job_html_report`); both draw the same figures.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sitiancal.service.plots import RenderedFigure, render_figures
from sitiancal.service.report import QCReport, build_report
from sitiancal.storage.catalog import StateConflict

ReportBasis = Literal["latest", "certified"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0;text-align:left}figure{margin:1.5em 0;border-top:1px solid #ddd;
padding-top:1em}figcaption{font-size:.9em;color:#444;max-width:800px}img{max-width:100%}
.muted{color:#777}
"""


@dataclass
class HTMLReport:
    """A rendered QC report: the scalar table, the figures and what was skipped."""

    qc: QCReport
    figures: list[RenderedFigure]
    skipped: dict[str, str] = field(default_factory=dict)
    products: dict[str, Any] = field(default_factory=dict)

    def html(self) -> str:
        """The whole report as one HTML document with embedded PNGs."""
        title, basis_line = (html.escape(t) for t in self.subject())
        rows = "\n".join(
            f"<tr><td>{html.escape(f.label)}</td><td>{html.escape(f.text())}</td>"
            f"<td>{html.escape(f.product)}</td></tr>" for f in self.qc.figures)
        prod_rows = "\n".join(
            f"<tr><td>{html.escape(t)}</td><td>v{p.version}</td><td>{html.escape(p.state)}</td>"
            f"<td>{html.escape(p.created.isoformat())}</td><td><code>{html.escape(p.id)}</code>"
            f"</td><td><code>{html.escape(p.job or '')}</code></td></tr>"
            for t, p in sorted(self.products.items()))
        figs = []
        for i, fig in enumerate(self.figures, 1):
            data = base64.b64encode(fig.png).decode("ascii")
            figs.append(
                f"<figure id='{html.escape(fig.name)}'><h3>Figure {i}. {html.escape(fig.title)}"
                f"</h3><img alt='{html.escape(fig.title)}: {html.escape('; '.join(fig.labels))}' "
                f"src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
        missing = dict(self.qc.missing)
        skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                          for k, v in {**missing, **self.skipped}.items())
        notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in self.qc.context.get("notes", []))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{title}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{title}</h1>"
            f"<p class='muted'>{basis_line} Generated {now}.</p>"
            "<h2>Product versions</h2><table><thead><tr><th>type</th><th>version</th>"
            "<th>state</th><th>created</th><th>id</th><th>made by job</th></tr></thead>"
            f"<tbody>{prod_rows}"
            "</tbody></table>"
            "<h2>QC figures</h2><table><thead><tr><th>figure</th><th>value</th>"
            f"<th>product</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<h2>Plots</h2>{''.join(figs)}"
            f"<h2>Notes of the calibration</h2><ul>{notes or '<li>none</li>'}</ul>"
            f"<h2>Not computed</h2><ul>{skipped or '<li>nothing</li>'}</ul>"
            "</body></html>")


    def subject(self) -> tuple[str, str]:
        """The report's title and the sentence saying which product versions it uses."""
        context = self.qc.context
        job = context.get("job")
        if job:
            reused = sum(1 for p in self.products.values() if p.job != job)
            return (f"QC report for job {job} (camera {self.qc.camera})",
                    f"Products: the {len(self.products)} versions job {job} produced "
                    f"({len(self.products) - reused} new, {reused} reused).")
        basis = str(context.get("basis", "latest"))
        return f"QC report for camera {self.qc.camera}", f"Products: {basis} versions."


class JobReportUnavailable(StateConflict):
    """A job has no products to report on (queued, running, failed, cancelled) (HTTP 409)."""


def job_products(catalog: Any, job_id: str) -> tuple[Any, dict[str, Any]]:
    """The job and product type -> version it produced or reused (linked in the catalog).

    Raises
    ------
    NotFound
        Unknown job.
    JobReportUnavailable
        The job has not succeeded, or succeeded without any product; the
        message says which.
    """
    job = catalog.get_job(job_id)
    if job.state == "queued":
        raise JobReportUnavailable(f"job {job.id} is queued: it has no products yet; its "
                                   "report exists once it has succeeded")
    if job.state == "running":
        stage = f"stage {job.stage}, " if job.stage else ""
        raise JobReportUnavailable(f"job {job.id} is running ({stage}{job.progress:.0%}): its "
                                   "products are published when it succeeds")
    if job.state == "failed":
        raise JobReportUnavailable(f"job {job.id} failed ({job.error or 'no error text'}): a "
                                   "failed job publishes no products")
    if job.state == "cancelled":
        raise JobReportUnavailable(f"job {job.id} was cancelled: a cancelled job publishes "
                                   "no products")
    if not job.products:
        raise JobReportUnavailable(f"job {job.id} {job.state} without producing or reusing "
                                   "any product")
    chosen: dict[str, Any] = {}
    for product_id in job.products:
        product = catalog.get_product(product_id)
        held = chosen.get(product.type)
        if held is None or product.version > held.version:
            chosen[product.type] = product
    return job, chosen


def job_report(catalog: Any, job_id: str) -> tuple[QCReport, dict[str, Any]]:
    """The QC figures of the product versions one job produced or reused.

    Parameters
    ----------
    catalog : Catalog
        The product catalog.
    job_id : str
        Job id (``NotFound`` when unknown, :class:`JobReportUnavailable`
        when it has no products).

    Returns
    -------
    (QCReport, products)
        The report (JSON context: ``basis`` ``"job"``, ``job``, ``job_state``,
        ``products`` with ``reused``, ``jobs``, ``datasets``) and product type
        -> version.
    """
    job, products = job_products(catalog, job_id)
    missing = _missing_reasons(products, lambda kind: (
        "requested but not produced by this job" if kind in job.requested
        else "not requested by this job"))
    context: dict[str, Any] = {
        "basis": "job", "job": job.id, "job_state": job.state,
        "finished": job.finished.isoformat() if job.finished else None,
        "products": {k: {"id": p.id, "version": p.version, "state": p.state,
                         "created": p.created.isoformat(), "job": p.job,
                         "reused": p.job != job.id} for k, p in sorted(products.items())},
        "notes": _notes(products), **_lineage(products)}
    qc = build_report(job.camera, {k: p.stats for k, p in products.items()}, missing=missing,
                      context=context)
    return qc, products


def build_job_html_report(catalog: Any, store: Any, job_id: str) -> HTMLReport:
    """Render the QC report of one job from the product versions it produced or reused.

    Parameters
    ----------
    catalog : Catalog
        The product catalog.
    store : ProductStore
        The product store holding the arrays and tables.
    job_id : str
        Job id (``NotFound`` when unknown, :class:`JobReportUnavailable`
        when it has no products).
    """
    qc, products = job_report(catalog, job_id)
    figures, skipped = render_figures(store, products)
    return HTMLReport(qc=qc, figures=figures, skipped=skipped, products=products)


def latest_products(catalog: Any, camera: str) -> dict[str, Any]:
    """Product type -> newest version of that type that is not retracted."""
    return newest_not_retracted(catalog.list_products(camera=camera))


def newest_not_retracted(versions: Iterable[Any]) -> dict[str, Any]:
    """Product type -> the first version of each type in ``versions`` (newest first, as
    ``Catalog.list_products`` gives them) that is not retracted."""
    latest: dict[str, Any] = {}
    for product in versions:
        if product.state != "retracted" and product.type not in latest:
            latest[product.type] = product
    return latest


def select_products(catalog: Any, camera: str, basis: ReportBasis = "latest") -> dict[str, Any]:
    """Product type -> version the report uses (newest non-retracted, or certified now)."""
    from sitiancal.service.datasets import ALL_PRODUCTS
    from sitiancal.storage.catalog import NoProduct

    catalog.get_camera(camera)
    if basis == "latest":
        return latest_products(catalog, camera)
    chosen: dict[str, Any] = {}
    for kind in ALL_PRODUCTS:
        try:
            chosen[kind] = catalog.best(camera, kind)
        except NoProduct:
            continue
    return chosen


def _missing_reasons(products: Mapping[str, Any],
                     default: Callable[[str], str]) -> dict[str, str]:
    """Why each product type is absent: the reason its job recorded, else ``default(type)``."""
    from sitiancal.service.datasets import ALL_PRODUCTS

    missing: dict[str, str] = {}
    for product in products.values():
        for kind, reason in (product.provenance.get("missing") or {}).items():
            if kind not in products:
                missing[kind] = str(reason)
    for kind in ALL_PRODUCTS:
        if kind not in products and kind not in missing:
            missing[kind] = default(kind)
    return missing


def _notes(products: Mapping[str, Any]) -> list[str]:
    """The calibration notes of the products' jobs (frames left out, offsets used...), once each.

    A job writes its plan's notes into every product's provenance; products
    of several jobs (a camera's latest versions) bring each job's.
    """
    seen: dict[str, None] = {}
    for _, product in sorted(products.items()):
        for note in (product.provenance or {}).get("notes") or []:
            seen.setdefault(str(note), None)
    return list(seen)


def _lineage(products: Mapping[str, Any]) -> dict[str, list[str]]:
    """The jobs and datasets the chosen versions came from."""
    return {"jobs": sorted({p.job for p in products.values() if p.job}),
            "datasets": sorted({p.dataset for p in products.values() if p.dataset})}


def camera_report(catalog: Any, camera: str, basis: ReportBasis = "latest") -> QCReport:
    """The QC figures of a camera from its newest (or currently certified) versions.

    Parameters
    ----------
    catalog : Catalog
        The product catalog.
    camera : str
        Camera name (``NotFound`` when unknown).
    basis : {"latest", "certified"}
        Which versions to use.
    """
    products = select_products(catalog, camera, basis)
    reason = ("no certified version valid now" if basis == "certified"
              else "no product of this type yet")
    missing = _missing_reasons(products, lambda kind: reason)
    context: dict[str, Any] = {
        "basis": basis,
        "products": {k: {"id": p.id, "version": p.version, "state": p.state,
                         "created": p.created.isoformat()} for k, p in sorted(products.items())},
        "notes": _notes(products), **_lineage(products)}
    return build_report(camera, {k: p.stats for k, p in products.items()}, missing=missing,
                        context=context)


def build_html_report(catalog: Any, store: Any, camera: str, basis: ReportBasis = "latest",
                      qc: QCReport | None = None) -> HTMLReport:
    """Render the QC report of a camera from its catalog products.

    Parameters
    ----------
    catalog : Catalog
        The product catalog.
    store : ProductStore
        The product store holding the arrays and tables.
    camera : str
        Camera name (``NotFound`` when unknown).
    basis : {"latest", "certified"}
        Which versions to use.
    qc : QCReport, optional
        The scalar report when the caller already built it.
    """
    products = select_products(catalog, camera, basis)
    if qc is None:
        qc = camera_report(catalog, camera, basis)
    figures, skipped = render_figures(store, products)
    return HTMLReport(qc=qc, figures=figures, skipped=skipped, products=products)


def export_report(report: HTMLReport, out_dir: str | Path, *, pdf: bool = False) -> list[Path]:
    """Write ``report.html``, one ``<name>.png`` per figure and optionally ``report.pdf``.

    Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.html"]
    written[0].write_text(report.html(), encoding="utf-8")
    for i, fig in enumerate(report.figures, 1):
        path = out / f"{i:02d}_{fig.name}.png"
        path.write_bytes(fig.png)
        written.append(path)
    if pdf:
        written.append(_write_pdf(report, out / "report.pdf"))
    return written


def _write_pdf(report: HTMLReport, path: Path) -> Path:
    """One page per figure (the PNG with its caption) via matplotlib's PdfPages."""
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    with PdfPages(path) as pdf:
        page = Figure(figsize=(8.27, 11.69))
        page.text(0.05, 0.95, report.subject()[0], fontsize=16, va="top")
        page.text(0.05, 0.9, report.qc.table(), family="monospace", fontsize=7, va="top")
        pdf.savefig(page)
        for fig in report.figures:
            page = Figure(figsize=(8.27, 11.69))
            ax = page.add_axes((0.05, 0.25, 0.9, 0.7))
            ax.imshow(mpimg.imread(io.BytesIO(fig.png), format="png"))
            ax.set_axis_off()
            page.text(0.05, 0.2, f"{fig.title}\n\n{fig.caption}", fontsize=9, va="top",
                      wrap=True)
            pdf.savefig(page)
    return path


def report_for(products: Mapping[str, Any]) -> dict[str, Any]:
    """JSON description of the versions a report used (for the CLI)."""
    return {t: {"id": p.id, "version": p.version, "state": p.state}
            for t, p in sorted(products.items())}


# -- command line ----------------------------------------------------------------

def _report_command() -> Any:
    import click

    from sitiancal.service.products_cli import _handle_errors, _settings

    @click.command("report")
    @click.argument("camera", required=False)
    @click.option("--job", "job_id", default=None,
                  help="Report on the products this job produced or reused (instead of CAMERA).")
    @click.option("--out", "out_dir", required=True,
                  type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for report.html and one PNG per figure.")
    @click.option("--basis", type=click.Choice(["latest", "certified"]), default=None,
                  help="Newest versions (default), or the versions certified now; "
                  "camera reports only.")
    @click.option("--pdf", is_flag=True, help="Also write report.pdf (one page per figure).")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data directory (default: SITIANCAL_DATA_DIR or ./data).")
    @_handle_errors
    def report(camera: str | None, job_id: str | None, out_dir: Path,
               basis: ReportBasis | None, pdf: bool, data_dir: Path | None) -> None:
        """Write the QC report of CAMERA, or of one job with --job ID (HTML with embedded
        plots, PNGs, optional PDF)."""
        from sitiancal.storage.catalog import Catalog
        from sitiancal.storage.store import ProductStore

        if (camera is None) == (job_id is None):
            raise click.UsageError("give either CAMERA or --job ID")
        if job_id is not None and basis is not None:
            raise click.UsageError("--basis applies to camera reports; a job report uses the "
                                   "versions the job produced or reused")
        settings = _settings(data_dir)
        catalog = Catalog.open(settings.catalog_url)
        store = ProductStore(settings.product_store_url)
        try:
            if job_id is not None:
                rendered = build_job_html_report(catalog, store, job_id)
            else:
                rendered = build_html_report(catalog, store, str(camera), basis or "latest")
        finally:
            catalog.close()
        if not rendered.products:
            raise ValueError(f"camera {camera} has no products ({basis or 'latest'})")
        paths = export_report(rendered, out_dir, pdf=pdf)
        what = f"job {job_id} (camera {rendered.qc.camera})" if job_id else f"camera {camera}"
        click.echo(f"{len(rendered.figures)} figures for {what}; report: {paths[0]}")

    return report


#: ``sitiancal report CAMERA --out DIR`` or ``sitiancal report --job ID --out DIR``
report_command = _report_command()
