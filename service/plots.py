"""QC figures of a camera's products, rendered server-side with matplotlib (Agg).

Every figure is computed from the stored products, never from a full map in
matplotlib: thumbnails are read as strided bands of the zarr arrays (at most
``THUMB_SIDE`` pixels on a side), and histograms of per-pixel maps are built
from a bounded strided sample (at most ``SAMPLE_PIXELS`` pixels, read band by
band), so a 61 MP camera costs a few MB of memory per figure.

Each :class:`RenderedFigure` carries its PNG bytes, a title and a caption
with units; :mod:`sitiancal.service.report_html` assembles them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from scipy.special import ndtr

#: Largest side (px) of a thumbnail map.
THUMB_SIDE = 480
#: Largest number of pixels sampled for a histogram of a per-pixel map.
SAMPLE_PIXELS = 1_000_000
#: Rows read at once when sampling a map (bounds memory for wide frames).
BAND_ROWS = 512


@dataclass(frozen=True)
class RenderedFigure:
    """One QC figure: PNG bytes with its title and caption."""

    name: str
    title: str
    caption: str
    png: bytes
    labels: tuple[str, ...] = ()  # titles and axis labels drawn in the figure


# -- bounded reads ---------------------------------------------------------------

def strided_sample(array: Any, step: int) -> np.ndarray:
    """``array[::step, ::step]`` read in bands of rows, as float64.

    Parameters
    ----------
    array : zarr.Array or numpy.ndarray
        A 2-D map (any units).
    step : int
        Stride in both axes (>= 1).
    """
    ny = int(array.shape[0])
    band = max(step, (BAND_ROWS // step) * step)
    parts = [np.asarray(array[y0:min(ny, y0 + band):step, ::step], dtype=np.float64)
             for y0 in range(0, ny, band)]
    return np.concatenate(parts, axis=0) if parts else np.empty((0, 0))


def stride_for(shape: tuple[int, ...], *, max_side: int | None = None,
               max_pixels: int | None = None) -> int:
    """The smallest stride that keeps a strided read under the given bounds."""
    ny, nx = int(shape[0]), int(shape[1])
    step = 1
    if max_side is not None:
        step = max(step, math.ceil(max(ny, nx) / max_side))
    if max_pixels is not None:
        step = max(step, math.ceil(math.sqrt(ny * nx / max_pixels)))
    return step


# -- drawing helpers -------------------------------------------------------------

def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _labels(fig: Figure) -> tuple[str, ...]:
    out: list[str] = []
    for ax in fig.axes:
        out += [t for t in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) if t]
    return tuple(dict.fromkeys(out))


def _new(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def _gauss_counts(edges: np.ndarray, n: int, weights: np.ndarray, means: np.ndarray,
                  sigmas: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Expected counts per bin of a Gaussian mixture in ``transform(x)`` space."""
    t = transform(edges)
    out = np.zeros((len(weights), len(edges) - 1))
    for k, (w, mu, s) in enumerate(zip(weights, means, sigmas, strict=True)):
        cdf = ndtr((t - mu) / max(float(s), 1e-300))
        out[k] = n * w * np.diff(cdf)
    return out


# -- the figures -----------------------------------------------------------------

def fig_ptc(table: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> RenderedFigure:
    """Photon transfer curve (variance vs mean, log-log) with the linear fit and residuals."""
    mean = np.asarray(table["mean"], float)
    var = np.asarray(table["var"], float)
    err = np.asarray(table.get("var_err", np.zeros_like(var)), float)
    used = np.asarray(table.get("used", np.ones_like(mean)), bool)
    gain = float(stats.get("gain") or np.nan)
    rn_adu = float(stats.get("read_noise_adu") or 0.0)
    fig = _new(6.4, 5.4)
    ax, rax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ok = (mean > 0) & (var > 0)
    ax.errorbar(mean[ok & used], var[ok & used], yerr=err[ok & used], fmt="o", ms=4,
                label="pairs used in the fit")
    if np.any(ok & ~used):
        ax.plot(mean[ok & ~used], var[ok & ~used], "x", color="grey", label="excluded")
    model = None
    if np.isfinite(gain) and gain > 0:
        xs = np.geomspace(max(mean[ok].min() * 0.8, 1.0), mean[ok].max() * 1.2, 200)
        ax.plot(xs, xs / gain + rn_adu**2, "-", color="C3",
                label=f"fit: var = mean/g + RN^2, g = {gain:.4f} e-/ADU")
        model = mean / gain + rn_adu**2
    turnoff = stats.get("turnoff_adu")
    if turnoff:
        ax.axvline(float(turnoff), color="grey", ls=":", label=f"turnoff {float(turnoff):.0f} ADU")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("variance (ADU^2)")
    ax.set_title("Photon transfer curve")
    ax.legend(fontsize=8)
    if model is not None:
        resid = 100.0 * (var - model) / model
        rax.plot(mean[ok & used], resid[ok & used], "o", ms=4)
        if np.any(ok & ~used):
            rax.plot(mean[ok & ~used], resid[ok & ~used], "x", color="grey")
        rax.axhline(0, color="C3", lw=1)
    from matplotlib.ticker import NullFormatter

    rax.xaxis.set_minor_formatter(NullFormatter())
    rax.set_xlabel("mean signal (ADU)")
    rax.set_ylabel("residual (%)")
    caption = ("Conventional PTC from frame-pair differences: temporal variance (ADU^2) "
               "against mean signal (ADU), log-log, with the linear fit "
               "var = mean/g + RN^2 and its residuals (%).")
    return RenderedFigure("ptc", "Photon transfer curve", caption, _png(fig), _labels(fig))


def fig_gain_hist(sample: np.ndarray, table: Mapping[str, np.ndarray] | None,
                  stats: Mapping[str, Any], n_pixels: int) -> RenderedFigure:
    """Per-pixel gain histogram with the fitted populations."""
    values = _finite(sample)
    values = values[values > 0]
    fig = _new()
    ax = fig.subplots()
    lo, hi = np.percentile(values, [0.1, 99.9]) if values.size else (0.1, 1.0)
    edges = np.linspace(lo, hi, 80)
    ax.hist(values, bins=edges, histtype="stepfilled", alpha=0.5, label="per-pixel gain")
    if table is not None and "ln_gain" in table and values.size:
        rel = float(stats.get("median_rel_err") or 0.0)
        w = np.asarray(table["weight"], float)
        mu = np.asarray(table["ln_gain"], float)
        s = np.hypot(np.asarray(table["ln_gain_sigma"], float), rel)
        counts = _gauss_counts(edges, values.size, w, mu, s, np.log)
        centers = 0.5 * (edges[1:] + edges[:-1])
        for k in range(len(w)):
            ax.plot(centers, counts[k], "--",
                    label=f"population {k + 1}: w={w[k]:.2f}, g={math.exp(mu[k]):.4f} e-/ADU")
        if len(w) > 1:
            ax.plot(centers, counts.sum(axis=0), "-", color="k", lw=1, label="mixture")
    ax.set_xlabel("gain (e-/ADU)")
    ax.set_ylabel("pixels per bin")
    ax.set_title("Per-pixel gain")
    ax.legend(fontsize=8)
    caption = (f"Histogram of the per-pixel gain g (e-/ADU) from each pixel's photon transfer "
               f"curve ({values.size} of {n_pixels} pixels sampled), with the fitted gain "
               "populations (log-normal, convolved with the median per-pixel error).")
    return RenderedFigure("gain_hist", "Per-pixel gain histogram", caption, _png(fig), _labels(fig))


def fig_read_noise(sample_e: np.ndarray, stats: Mapping[str, Any],
                   n_pixels: int) -> RenderedFigure:
    """Read-noise histogram (per pixel) against the conventional value."""
    values = _finite(sample_e)
    fig = _new()
    ax = fig.subplots()
    hi = np.percentile(values, 99.9) if values.size else 1.0
    ax.hist(values, bins=np.linspace(0, hi * 1.05, 80), histtype="stepfilled", alpha=0.6,
            label="per-pixel read noise")
    ax.set_yscale("log")
    conv = stats.get("conventional_e")
    med = stats.get("median_e")
    if conv is not None:
        ax.axvline(float(conv), color="C3", label=f"conventional (bias pairs) {float(conv):.3f} e-")
    if med is not None:
        # the map's median over the median of a sample std from the bias frames used
        ax.axvline(float(med), color="k", ls="--",
                   label=f"per-pixel median {float(med):.3f} e- (for the frame count)")
    ax.set_xlabel("read noise (e-)")
    ax.set_ylabel("pixels per bin")
    ax.set_title("Read noise: conventional vs per pixel")
    ax.legend(fontsize=8)
    caption = (f"Per-pixel read noise (e- rms, temporal std of the bias stack times the gain; "
               f"{values.size} of {n_pixels} pixels sampled) with the conventional read noise "
               "from bias-pair differences.")
    return RenderedFigure("read_noise_hist", "Read-noise histogram", caption, _png(fig), _labels(fig))


def fig_dark_hist(sample: np.ndarray, table: Mapping[str, np.ndarray] | None,
                  stats: Mapping[str, Any], n_pixels: int) -> RenderedFigure:
    """Dark-rate histogram on a log axis with the fitted population mixture."""
    values = _finite(sample)
    positive = values[values > 0]
    units = str(stats.get("summary", {}).get("units", "e-/s"))
    fig = _new()
    ax = fig.subplots()
    if positive.size:
        lo = max(np.percentile(positive, 0.1), positive.max() * 1e-6)
        edges = np.geomspace(lo, positive.max() * 1.05, 90)
    else:
        edges = np.geomspace(1e-4, 1.0, 90)
    ax.hist(positive, bins=edges, histtype="stepfilled", alpha=0.5, label="per-pixel dark rate")
    if table is not None and "mean" in table and positive.size:
        err = float(stats.get("summary", {}).get("median_pixel_err") or 0.0)
        w = np.asarray(table["weight"], float)
        mu = np.asarray(table["mean"], float)
        s = np.hypot(np.asarray(table["sigma"], float), err)
        counts = _gauss_counts(edges, values.size, w, mu, s, lambda x: x)
        centers = np.sqrt(edges[1:] * edges[:-1])
        for k in range(len(w)):
            ax.plot(centers, counts[k], "--",
                    label=f"population {k + 1}: w={w[k]:.3f}, mean={mu[k]:.3g} {units}")
        ax.plot(centers, counts.sum(axis=0), "-", color="k", lw=1, label="mixture")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel(f"dark rate ({units})")
    ax.set_ylabel("pixels per bin")
    ax.set_title("Dark current")
    ax.legend(fontsize=7)
    caption = (f"Per-pixel dark rate ({units}) on a logarithmic axis ({positive.size} positive "
               f"rates of {values.size} sampled pixels, {n_pixels} in all), with the fitted "
               "mixture of pixel populations (convolved with the median per-pixel error).")
    return RenderedFigure("dark_hist", "Dark-rate histogram", caption, _png(fig), _labels(fig))


def fig_bias_stability(table: Mapping[str, np.ndarray]) -> RenderedFigure:
    """Bias level of each frame against time."""
    t = np.asarray(table["time"])
    level = np.asarray(table["level"], float)
    fig = _new(6.4, 3.4)
    ax = fig.subplots()
    if np.issubdtype(t.dtype, np.number):
        x = (t - t[0]) / (3600.0 if np.nanmax(t) - t[0] > 7200 else 60.0) if t.size else t
        unit = "h" if t.size and np.nanmax(t) - t[0] > 7200 else "min"
        xlabel = f"time since first frame ({unit})"
    else:
        tt = t.astype("datetime64[s]").astype(np.int64).astype(float)
        x = (tt - tt[0]) / 60.0 if tt.size else tt
        xlabel = "time since first frame (min)"
    ax.plot(x, level, "o-", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("bias level (ADU)")
    ax.set_title("Bias stability")
    caption = ("Sigma-clipped mean bias level (ADU) of each bias frame against time: "
               "stability (std, peak-to-peak) and drift (ADU/h).")
    return RenderedFigure("bias_stability", "Bias stability series", caption, _png(fig), _labels(fig))


def fig_profiles(row: Mapping[str, np.ndarray], col: Mapping[str, np.ndarray]) -> RenderedFigure:
    """Row and column pattern profiles of the master bias."""
    fig = _new(6.4, 4.6)
    ax1, ax2 = fig.subplots(2, 1)
    ax1.plot(np.asarray(row["row"]), np.asarray(row["offset"], float), lw=0.8)
    ax1.set_xlabel("row (y, px)")
    ax1.set_ylabel("row offset (ADU)")
    ax1.set_title("Row and column pattern")
    ax2.plot(np.asarray(col["column"]), np.asarray(col["offset"], float), lw=0.8, color="C1")
    ax2.set_xlabel("column (x, px)")
    ax2.set_ylabel("column offset (ADU)")
    caption = ("Fixed row and column pattern of the master bias: mean offset (ADU) of each row "
               "and column from the frame median.")
    return RenderedFigure("profiles", "Row/column pattern profiles", caption, _png(fig), _labels(fig))


def fig_linearity(table: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> RenderedFigure:
    """Linearity residuals against signal."""
    signal = np.asarray(table["signal"], float)
    resid = np.asarray(table["residual_pct"], float)
    used = np.asarray(table.get("used", np.ones_like(signal)), bool)
    fig = _new(6.4, 3.8)
    ax = fig.subplots()
    ax.plot(signal[used], resid[used], "o-", ms=4, label="levels in the fit")
    if np.any(~used):
        ax.plot(signal[~used], resid[~used], "x", color="grey", label="excluded (above turnoff)")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(3000, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("mean signal (ADU)")
    ax.set_ylabel("residual from linear fit (%)")
    ax.set_title("Linearity residuals")
    ax.legend(fontsize=8)
    r2 = stats.get("r2")
    mx = stats.get("max_nonlinearity_pct")
    extra = f" R^2 = {float(r2):.6f}, max nonlinearity {float(mx):.3f} %." if (
        r2 is not None and mx is not None) else ""
    caption = ("Residuals (%) of the mean signal (ADU) of each flat level from the linear fit "
               "of signal against exposure time." + extra)
    return RenderedFigure("linearity", "Linearity residuals", caption, _png(fig), _labels(fig))


def fig_thumbnails(maps: Mapping[str, tuple[np.ndarray, str, int]]) -> RenderedFigure:
    """Downsampled maps (label -> (thumbnail, units, stride)) side by side."""
    n = max(1, len(maps))
    cols = min(2, n)
    rows = math.ceil(n / cols)
    fig = _new(4.2 * cols, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    strides = []
    for ax, (label, (thumb, units, step)) in zip(axes, maps.items(), strict=False):
        data = np.asarray(thumb, float)
        finite = data[np.isfinite(data)]
        if label == "mask":
            im = ax.imshow(data > 0, cmap="gray_r", interpolation="nearest", origin="lower")
        else:
            vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
            im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                           interpolation="nearest")
        fig.colorbar(im, ax=ax, label=units)
        ax.set_title(f"{label} (1:{step})")
        ax.set_xlabel("x (px / stride)")
        ax.set_ylabel("y (px / stride)")
        strides.append(step)
    for ax in axes[len(maps):]:
        ax.set_axis_off()
    caption = ("Thumbnails of the master bias (ADU), gain (e-/ADU), dark rate (e-/s) and "
               "defect mask (any flag), read with a stride of "
               f"{max(strides) if strides else 1} px or less (colour range 1-99th percentile).")
    return RenderedFigure("thumbnails", "Thumbnail maps", caption, _png(fig), _labels(fig))


def fig_defects(stats: Mapping[str, Any]) -> RenderedFigure:
    """Defect counts per mask class."""
    counts = {k: v for k, v in (stats.get("counts") or {}).items() if k != "any"}
    names = list(counts)
    values = [int(counts[k].get("count", 0)) for k in names]
    fig = _new(6.4, 3.8)
    ax = fig.subplots()
    bars = ax.bar(names, values, color="C2")
    for bar, k in zip(bars, names, strict=True):
        frac = counts[k].get("fraction")
        if frac is not None:
            ax.annotate(f"{100 * float(frac):.3g}%", (bar.get_x() + bar.get_width() / 2,
                                                      bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("pixels")
    ax.set_xlabel("defect class")
    ax.set_title("Defect counts per class")
    ax.tick_params(axis="x", rotation=45)
    anyc = (stats.get("counts") or {}).get("any", {})
    caption = ("Number of pixels flagged in each class of the defect mask (pixels; one may be in several "
               f"classes), with the fraction of all pixels (%); any flag: {anyc.get('count', 'n/a')} "
               "pixels.")
    return RenderedFigure("defects", "Defect counts per class", caption, _png(fig), _labels(fig))


# -- from products ---------------------------------------------------------------

def render_figures(store: Any, products: Mapping[str, Any]) -> tuple[list[RenderedFigure],
                                                                        dict[str, str]]:
    """Render every QC figure the products allow.

    Parameters
    ----------
    store : ProductStore
        Where the products' arrays and tables are.
    products : mapping
        Product type -> :class:`~sitiancal.storage.catalog.ProductVersion`.

    Returns
    -------
    (figures, skipped)
        The figures in report order, and figure name -> why it was not drawn.
    """
    figures: list[RenderedFigure] = []
    skipped: dict[str, str] = {}

    def attempt(name: str, needs: str, build: Callable[[Any], RenderedFigure]) -> None:
        product = products.get(needs)
        if product is None:
            skipped[name] = f"no {needs} product"
            return
        try:
            figures.append(build(product))
        except (KeyError, ValueError, IndexError) as exc:
            skipped[name] = f"{needs} product lacks what the figure needs: {exc}"

    def sample(product: Any, array: str) -> tuple[np.ndarray, int]:
        arr = store.open_zarr(product.store_key)[array]
        step = stride_for(arr.shape, max_pixels=SAMPLE_PIXELS)
        return strided_sample(arr, step), int(arr.shape[0]) * int(arr.shape[1])

    def table(product: Any, name: str) -> dict[str, np.ndarray] | None:
        try:
            return store.read_table(product.store_key, name)
        except KeyError:
            return None

    attempt("ptc", "ptc", lambda p: fig_ptc(store.read_table(p.store_key, "PTC"), p.stats))
    def gain(p: Any) -> RenderedFigure:
        values, n = sample(p, "GAIN")
        return fig_gain_hist(values, table(p, "POPULATIONS"), p.stats, n)

    attempt("gain_hist", "gain", gain)

    def read_noise(p: Any) -> RenderedFigure:
        values, n = sample(p, "READ_NOISE_E")
        stats = dict(p.stats)
        ptc = products.get("ptc")
        if stats.get("conventional_e") is None and ptc is not None:
            stats["conventional_e"] = ptc.stats.get("read_noise_e")
        return fig_read_noise(values, stats, n)

    attempt("read_noise_hist", "read_noise", read_noise)

    def dark(p: Any) -> RenderedFigure:
        values, n = sample(p, "DARK_RATE")
        return fig_dark_hist(values, table(p, "POPULATIONS"), p.stats, n)

    attempt("dark_hist", "dark", dark)
    attempt("bias_stability", "bias",
            lambda p: fig_bias_stability(store.read_table(p.store_key, "STABILITY")))
    attempt("profiles", "bias", lambda p: fig_profiles(
        store.read_table(p.store_key, "ROW_PROFILE"), store.read_table(p.store_key, "COL_PROFILE")))
    attempt("linearity", "linearity",
            lambda p: fig_linearity(store.read_table(p.store_key, "LINEARITY"), p.stats))

    thumbs: dict[str, tuple[np.ndarray, str, int]] = {}
    for label, kind, array, units in (("master bias", "bias", "BIAS", "ADU"),
                                      ("gain", "gain", "GAIN", "e-/ADU"),
                                      ("dark rate", "dark", "DARK_RATE", "e-/s"),
                                      ("mask", "mask", "MASK", "any flag")):
        product = products.get(kind)
        if product is None:
            continue
        try:
            arr = store.open_zarr(product.store_key)[array]
        except KeyError:
            continue
        step = stride_for(arr.shape, max_side=THUMB_SIDE)
        thumbs[label] = (strided_sample(arr, step), units, step)
    if thumbs:
        figures.append(fig_thumbnails(thumbs))
    else:
        skipped["thumbnails"] = "no map products"
    attempt("defects", "mask", lambda p: fig_defects(p.stats))
    return figures, skipped
