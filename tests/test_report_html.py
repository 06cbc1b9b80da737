"""The operators' QC report: every figure rendered from real products of a simulated camera."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image
from simdata import small_dataset
from test_api_support import TestClient

from sitiancal.api.app import create_app
from sitiancal.service.cli import main
from sitiancal.service.pipeline import calibrate
from sitiancal.service.plots import SAMPLE_PIXELS, stride_for, strided_sample
from sitiancal.service.report_html import build_html_report, export_report
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductStore

FIGURES = ["ptc", "gain_hist", "read_noise_hist", "dark_hist", "bias_stability", "profiles",
           "linearity", "thumbnails", "defects"]
#: Axis labels / titles (with units) each figure must draw.
LABELS = {
    "ptc": ["variance (ADU^2)", "mean signal (ADU)", "residual (%)"],
    "gain_hist": ["gain (e-/ADU)", "pixels per bin"],
    "read_noise_hist": ["read noise (e-)", "Read noise: conventional vs per pixel"],
    "dark_hist": ["dark rate (e-/s)", "pixels per bin"],
    "bias_stability": ["bias level (ADU)"],
    "profiles": ["row offset (ADU)", "column offset (ADU)"],
    "linearity": ["residual from linear fit (%)", "mean signal (ADU)"],
    "thumbnails": ["master bias (1:1)", "gain (1:1)", "dark rate (1:1)", "mask (1:1)"],
    "defects": ["defect class", "pixels"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out, _ = small_dataset(tmp_path_factory.mktemp("report"))
    frames = out.parent / "frames_report"
    if not frames.exists():
        shutil.copytree(out, frames, ignore=shutil.ignore_patterns("truth.fits"))
    data = tmp_path_factory.mktemp("report_data")
    calibrate(frames, "MST5", Settings(data_dir=data))
    return data


@pytest.fixture(scope="module")
def rendered(data_dir):
    settings = Settings(data_dir=data_dir)
    catalog = Catalog.open(settings.catalog_url)
    try:
        yield build_html_report(catalog, ProductStore(settings.product_store_url), "MST5")
    finally:
        catalog.close()


def _image(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG"
    return np.asarray(img.convert("L"), dtype=float)


def test_every_figure_is_rendered_with_real_content(rendered):
    assert [f.name for f in rendered.figures] == FIGURES
    assert rendered.skipped == {}
    for fig in rendered.figures:
        pixels = _image(fig.png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, fig.name
        # not a blank canvas: a real plot has many grey levels and ink on white
        assert pixels.std() > 10, fig.name
        assert len(np.unique(pixels)) > 20, fig.name
        for label in LABELS[fig.name]:
            assert label in fig.labels, (fig.name, label, fig.labels)
        assert re.search(r"\((ADU|e-|e-/ADU|e-/s|%)", fig.caption), fig.caption


def test_html_embeds_every_figure_offline(rendered):
    page = rendered.html()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(FIGURES)
    for data in images:
        assert _image(base64.b64decode(data)).std() > 10
    # no external resources: works without internet access
    assert "http://" not in page and "https://" not in page
    for title in ("Photon transfer curve", "Per-pixel gain histogram", "Read-noise histogram",
                  "Dark-rate histogram", "Bias stability series", "Row/column pattern profiles",
                  "Linearity residuals", "Thumbnail maps", "Defect counts per class"):
        assert title in page
    assert "variance (ADU^2)" in page and "dark rate (e-/s)" in page
    assert "Gain (conventional PTC)" in page  # the scalar table is there too


def test_cli_export_writes_html_pngs_and_pdf(data_dir, tmp_path):
    out = tmp_path / "review"
    result = CliRunner().invoke(main, ["report", "MST5", "--out", str(out), "--pdf",
                                       "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.stem.split("_", 1)[1] for p in pngs] == FIGURES
    assert (out / "report.html").stat().st_size > 50_000
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    bad = CliRunner().invoke(main, ["report", "NOPE", "--out", str(out),
                                    "--data-dir", str(data_dir)])
    assert bad.exit_code == 2 and "unknown camera" in bad.output
    assert "Traceback" not in bad.output


def test_export_skips_nothing_when_products_exist(rendered, tmp_path):
    paths = export_report(rendered, tmp_path)
    assert paths[0].name == "report.html" and len(paths) == 1 + len(FIGURES)


def test_http_report_html(data_dir):
    app = create_app(Settings(data_dir=data_dir, operator_tokens=["op"]), use_dask=False)
    with TestClient(app) as client:
        reply = client.get("/v1/cameras/MST5/report.html")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
        assert reply.text.count("data:image/png;base64,") == len(FIGURES)
        assert client.get("/v1/cameras/NOPE/report.html").status_code == 404


def test_histogram_samples_and_thumbnails_are_bounded():
    shape = (6388, 9576)
    step = stride_for(shape, max_pixels=SAMPLE_PIXELS)
    assert (shape[0] // step + 1) * (shape[1] // step + 1) <= 1.01 * SAMPLE_PIXELS
    assert max(shape) / stride_for(shape, max_side=480) <= 480
    arr = zarr.create_array(store={}, shape=(1100, 700), chunks=(128, 128), dtype="float32")
    arr[...] = np.arange(1100 * 700, dtype="float32").reshape(1100, 700)
    sample = strided_sample(arr, 7)
    assert np.array_equal(sample, arr[...][::7, ::7])


# -- the report of one job ---------------------------------------------------------

def _calibration_job(catalog: Catalog) -> str:
    jobs = [j for j in catalog.list_jobs(camera="MST5") if j.state == "succeeded"
            and j.products and all(catalog.get_product(p).job == j.id for p in j.products)]
    assert len(jobs) == 1
    return jobs[0].id


def test_http_job_report_draws_the_jobs_products(data_dir):
    app = create_app(Settings(data_dir=data_dir, operator_tokens=["op"]), use_dask=False)
    with TestClient(app) as client:
        catalog = client.app.state.sitiancal.catalog
        job_id = _calibration_job(catalog)
        made = {catalog.get_product(p).type: p for p in catalog.get_job(job_id).products}

        reply = client.get(f"/v1/jobs/{job_id}/report")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["camera"] == "MST5" and body["basis"] == "job" and body["job"] == job_id
        assert body["job_state"] == "succeeded" and body["jobs"] == [job_id]
        assert {k: v["id"] for k, v in body["products"].items()} == made
        assert not any(v["reused"] for v in body["products"].values())
        # the same figures as the camera report built from the same versions
        camera = client.get("/v1/cameras/MST5/report").json()
        assert body["figures"] == camera["figures"] and body["table"] == camera["table"]
        assert body["figures"]["gain_conventional"]["value"] > 0

        page = client.get(f"/v1/jobs/{job_id}/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"QC report for job {job_id} (camera MST5)" in page.text
        assert f"({len(made)} new, 0 reused)" in page.text
        images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page.text)
        assert len(images) == len(FIGURES)
        assert all(_image(base64.b64decode(d)).std() > 10 for d in images)
        for title in ("Photon transfer curve", "Per-pixel gain histogram", "Defect counts"):
            assert title in page.text

        # a later job that reused two of those versions reports just them, as reused
        later = catalog.create_job("MST5", products=("bias", "gain"), actor="test")
        for kind in ("bias", "gain"):
            catalog.link_product(later.id, made[kind], reused=True, actor="test")
        catalog.update_job(later.id, state="running", actor="test")
        catalog.update_job(later.id, state="succeeded", progress=1.0, actor="test")
        body = client.get(f"/v1/jobs/{later.id}/report").json()
        assert set(body["products"]) == {"bias", "gain"}
        assert all(v["reused"] and v["job"] == job_id for v in body["products"].values())
        assert body["missing"]["ptc"] == "not requested by this job"
        assert body["figures"]["gain_per_pixel"]["value"] == camera["figures"][
            "gain_per_pixel"]["value"]
        assert body["figures"]["gain_conventional"]["value"] is None  # no PTC in this job
        page = client.get(f"/v1/jobs/{later.id}/report.html").text
        assert "(0 new, 2 reused)" in page and "Per-pixel gain histogram" in page
        assert "Photon transfer curve" not in page and "ptc: no ptc product" in page


def test_http_job_report_of_a_job_without_products(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, operator_tokens=["op"]), use_dask=False)
    with TestClient(app) as client:
        catalog = client.app.state.sitiancal.catalog
        # created in the catalog behind the runner's back: it never runs them
        queued = catalog.create_job("MST9", products=("bias",), actor="test").id
        running = catalog.create_job("MST9", products=("bias",), actor="test").id
        catalog.update_job(running, state="running", stage="tiles", progress=0.4, actor="test")
        failed = catalog.create_job("MST9", products=("bias",), actor="test").id
        catalog.update_job(failed, state="failed", error="no bias frames", actor="test")
        cancelled = catalog.create_job("MST9", products=("bias",), actor="test").id
        catalog.update_job(cancelled, state="cancelled", actor="test")
        empty = catalog.create_job("MST9", products=("bias",), actor="test").id
        catalog.update_job(empty, state="running", actor="test")
        catalog.update_job(empty, state="succeeded", actor="test")
        expected = {queued: f"job {queued} is queued: it has no products yet",
                    running: f"job {running} is running (stage tiles, 40%)",
                    failed: f"job {failed} failed (no bias frames): a failed job publishes",
                    cancelled: f"job {cancelled} was cancelled",
                    empty: f"job {empty} succeeded without producing or reusing any product"}
        for job_id, reason in expected.items():
            for path in (f"/v1/jobs/{job_id}/report", f"/v1/jobs/{job_id}/report.html"):
                reply = client.get(path)
                assert reply.status_code == 409, (path, reply.text)
                assert reply.json()["detail"].startswith(reason), reply.json()
        for path in ("/v1/jobs/nope/report", "/v1/jobs/nope/report.html"):
            reply = client.get(path)
            assert reply.status_code == 404 and reply.json()["detail"] == "unknown job 'nope'"


def test_cli_job_report(data_dir, tmp_path):
    settings = Settings(data_dir=data_dir)
    catalog = Catalog.open(settings.catalog_url)
    try:
        job_id = _calibration_job(catalog)
    finally:
        catalog.close()
    out = tmp_path / "job"
    result = CliRunner().invoke(main, ["report", "--job", job_id, "--out", str(out),
                                       "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert f"for job {job_id} (camera MST5)" in result.output
    assert [p.stem.split("_", 1)[1] for p in sorted(out.glob("*.png"))] == FIGURES
    assert f"QC report for job {job_id}" in (out / "report.html").read_text()
    for args, message in ((["MST5", "--job", job_id], "either CAMERA or --job ID"),
                          ([], "either CAMERA or --job ID"),
                          (["--job", job_id, "--basis", "certified"], "--basis applies to"),
                          (["--job", "nope"], "unknown job 'nope'")):
        bad = CliRunner().invoke(main, ["report", *args, "--out", str(out),
                                        "--data-dir", str(data_dir)])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output


def test_figure_text_keeps_small_errors_visible():
    """Values with an error are quoted to the error's second significant digit."""
    from sitiancal.service.report import Figure

    dark = Figure("dark_current", "Dark current (median)", 0.002083, "e-/pix/s", 3.1e-7)
    assert dark.text() == "0.00208300 +- 0.00000031 e-/pix/s"
    assert Figure("gain", "Gain", 0.2544, "e-/ADU", 0.0001).text() == "0.25440 +- 0.00010 e-/ADU"
    assert Figure("bias", "Bias level", 500.1, "ADU").text() == "500.1 ADU"
    assert Figure("drift", "Drift", -0.004352, "ADU/h", 0.2336).text() == (
        "-0.00 +- 0.23 ADU/h")
    assert Figure("gain", "Gain", 0.25437, "e-/ADU", float("nan")).text() == "0.2544 +- nan e-/ADU"
    assert Figure("none", "Missing", None, "ADU").text() == "n/a"


def test_reports_carry_the_calibrations_notes(tmp_path):
    """A bias frame whose level jumped is left out: the camera and job reports
    (JSON and HTML) say so, as the CLI's QC table does."""
    from astropy.io import fits

    from sitiancal.service.report_html import build_job_html_report, camera_report, job_report

    out, _ = small_dataset(tmp_path / "sim", shape=(32, 40), seed=58)
    frames = tmp_path / "frames"
    shutil.copytree(out, frames, ignore=shutil.ignore_patterns("truth.fits"))
    jumped = sorted(frames.glob("bias*.fits"))[3]
    with fits.open(jumped) as hdul:
        data, header = hdul[0].data.astype(np.int64) + 30, hdul[0].header.copy()
    fits.PrimaryHDU(data.astype(np.uint16), header=header).writeto(jumped, overwrite=True)
    settings = Settings(data_dir=tmp_path / "data")
    run = calibrate(frames, "MST6", settings)
    with Catalog.open(settings.catalog_url) as catalog:
        store = ProductStore(settings.product_store_url)
        for qc in (camera_report(catalog, "MST6"), job_report(catalog, run.job_id)[0]):
            notes = qc.to_dict()["notes"]
            assert sum(jumped.name in n and "left out" in n for n in notes) == 1, notes
            assert len(notes) == len(set(notes))
        page = build_job_html_report(catalog, store, run.job_id).html()
        assert "<h2>Notes of the calibration</h2>" in page
        assert f"bias frame {jumped}" in page and "left out" in page
        # the frame is no product's input (the other bias frames are the bias's)
        bias = next(catalog.get_product(p) for p in run.product_ids
                    if catalog.get_product(p).type == "bias")
        paths = {i["path"] for i in catalog.product_inputs(bias.id)}
        assert str(jumped) not in paths
        assert len(paths) == len(list(frames.glob("bias*.fits"))) - 1
    assert any(jumped.name in n for n in run.report["notes"])
