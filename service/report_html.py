"""The operators' QC report as one self-contained HTML page, and its file export.

The page holds the scalar QC table of :mod:`sitiancal.service.report` and the
figures of :mod:`sitiancal.service.plots` as base64-embedded PNGs, so it
works offline (no CDN, no external file). :func:`export_report` writes the
page, one PNG per figure and optionally a PDF with every figure.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sitiancal.service.plots import RenderedFigure, render_figures
from sitiancal.service.report import QCReport, build_report

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
        camera = html.escape(self.qc.camera)
        rows = "\n".join(
            f"<tr><td>{html.escape(f.label)}</td><td>{html.escape(f.text())}</td>"
            f"<td>{html.escape(f.product)}</td></tr>" for f in self.qc.figures)
        prod_rows = "\n".join(
            f"<tr><td>{html.escape(t)}</td><td>v{p.version}</td><td>{html.escape(p.state)}</td>"
            f"<td>{html.escape(p.created.isoformat())}</td><td><code>{html.escape(p.id)}</code>"
            f"</td></tr>" for t, p in sorted(self.products.items()))
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
        basis = html.escape(str(self.qc.context.get("basis", "latest")))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>QC report for camera {camera}</title><style>{_STYLE}</style></head><body>"
            f"<h1>QC report for camera {camera}</h1>"
            f"<p class='muted'>Products: {basis} versions. Generated {now}.</p>"
            "<h2>Product versions</h2><table><thead><tr><th>type</th><th>version</th>"
            f"<th>state</th><th>created</th><th>id</th></tr></thead><tbody>{prod_rows}"
            "</tbody></table>"
            "<h2>QC figures</h2><table><thead><tr><th>figure</th><th>value</th>"
            f"<th>product</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<h2>Plots</h2>{''.join(figs)}"
            f"<h2>Not computed</h2><ul>{skipped or '<li>nothing</li>'}</ul>"
            "</body></html>")


def select_products(catalog: Any, camera: str, basis: ReportBasis = "latest") -> dict[str, Any]:
    """Product type -> version the report uses (newest non-retracted, or certified now)."""
    from sitiancal.service.datasets import ALL_PRODUCTS
    from sitiancal.storage.catalog import NoProduct

    catalog.get_camera(camera)
    chosen: dict[str, Any] = {}
    if basis == "certified":
        for kind in ALL_PRODUCTS:
            try:
                chosen[kind] = catalog.best(camera, kind)
            except NoProduct:
                continue
        return chosen
    for product in catalog.list_products(camera=camera):
        if product.state != "retracted" and product.type not in chosen:
            chosen[product.type] = product
    return chosen


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
        qc = build_report(camera, {k: p.stats for k, p in products.items()},
                          context={"basis": basis})
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
        page.text(0.05, 0.95, f"QC report for camera {report.qc.camera}", fontsize=16,
                  va="top")
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
    @click.argument("camera")
    @click.option("--out", "out_dir", required=True,
                  type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for report.html and one PNG per figure.")
    @click.option("--basis", type=click.Choice(["latest", "certified"]), default="latest",
                  show_default=True, help="Newest versions, or the versions certified now.")
    @click.option("--pdf", is_flag=True, help="Also write report.pdf (one page per figure).")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data directory (default: SITIANCAL_DATA_DIR or ./data).")
    @_handle_errors
    def report(camera: str, out_dir: Path, basis: ReportBasis, pdf: bool,
               data_dir: Path | None) -> None:
        """Write the QC report of CAMERA (HTML with embedded plots, PNGs, optional PDF)."""
        from sitiancal.storage.catalog import Catalog
        from sitiancal.storage.store import ProductStore

        settings = _settings(data_dir)
        catalog = Catalog.open(settings.catalog_url)
        try:
            rendered = build_html_report(catalog, ProductStore(settings.product_store_url),
                                         camera, basis)
        finally:
            catalog.close()
        if not rendered.products:
            raise ValueError(f"camera {camera} has no products ({basis})")
        paths = export_report(rendered, out_dir, pdf=pdf)
        click.echo(f"{len(rendered.figures)} figures for camera {camera}; report: {paths[0]}")

    return report


#: ``sitiancal report CAMERA --out DIR``
report_command = _report_command()
