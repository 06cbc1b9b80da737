"""QC report of a camera: the scalar figures of every product.

The table follows the Mini-SiTian CMOS characterisation study: bias level and
stability, dark current, read noise conventional vs per pixel, gain
conventional vs per pixel, full well, nonlinearity and R^2, PRNU, DSNU and
anomalous-pixel fractions. Every figure carries its units and, where one is
defined, its 1-sigma uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One scalar figure of the QC table."""

    key: str
    label: str
    value: float | None
    units: str
    error: float | None = None
    product: str = ""

    def text(self) -> str:
        """The value as printed in the table (``n/a`` when unavailable)."""
        if self.value is None:
            return "n/a"
        digits = _digits(self.value)
        if self.error is not None and math.isfinite(self.error) and self.error > 0:
            # as measurements are quoted: the error to two significant digits and
            # the value to the same decimal place (an error below the value's
            # usual last digit would otherwise print as 0)
            digits = max(0, min(12, 1 - math.floor(math.log10(self.error))))
        body = f"{self.value:.{digits}f}"
        if self.error is not None:
            body += f" +- {self.error:.{digits}f}"
        return f"{body} {self.units}".rstrip()


def _digits(value: float) -> int:
    mag = abs(value)
    if mag == 0 or mag >= 100:
        return 1
    if mag >= 1:
        return 3
    if mag >= 0.01:
        return 4
    return 6


def _get(stats: Mapping[str, Any], *path: str) -> Any:
    cur: Any = stats
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


@dataclass
class QCReport:
    """The QC figures of a camera's products."""

    camera: str
    figures: list[Figure]
    missing: dict[str, str] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``report.json``, ``GET /v1/cameras/{camera}/report`` and
        ``GET /v1/jobs/{job_id}/report``)."""
        return {
            "camera": self.camera,
            "figures": {f.key: {"label": f.label, "value": f.value, "error": f.error,
                                "units": f.units, "product": f.product} for f in self.figures},
            "table": [[f.label, f.text()] for f in self.figures],
            "missing": self.missing,
            **self.context,
        }

    def table(self) -> str:
        """The figures as a fixed-width text table."""
        width = max(len(f.label) for f in self.figures) if self.figures else 10
        lines = [f"QC report for camera {self.camera}", "-" * (width + 30)]
        lines += [f"{f.label:<{width}}  {f.text()}" for f in self.figures]
        for name, reason in self.missing.items():
            lines.append(f"{'(' + name + ' not computed)':<{width}}  {reason}")
        return "\n".join(lines)


def build_report(camera: str, stats: Mapping[str, Mapping[str, Any]], *,
                 missing: Mapping[str, str] | None = None,
                 context: Mapping[str, Any] | None = None) -> QCReport:
    """Gather the QC figures from the ``stats`` of each product type.

    Parameters
    ----------
    camera : str
        Camera identifier.
    stats : mapping
        Product type -> its ``stats`` dict (as stored with the product version).
    missing : mapping, optional
        Product type -> reason it was not computed.
    context : mapping, optional
        Extra JSON fields (dataset, job, product versions).
    """
    b = stats.get("bias", {})
    rn = stats.get("read_noise", {})
    d = stats.get("dark", {})
    p = stats.get("ptc", {})
    g = stats.get("gain", {})
    lin = stats.get("linearity", {})
    fl = stats.get("flat", {})
    bound = bool(_get(fl, "prnu_upper_bound"))  # one-frame flat levels: noise not removed
    m = stats.get("mask", {})
    dark_units = d.get("units", "e-/s")
    figs = [
        Figure("bias_level", "Bias level", _get(b, "level_median_adu"), "ADU",
               _get(b, "stability", "mean_err"), product="bias"),
        Figure("bias_stability_std", "Bias stability (std)", _get(b, "stability", "std"), "ADU",
               _get(b, "stability", "std_err"), product="bias"),
        Figure("bias_stability_p2p", "Bias stability (peak-to-peak)",
               _get(b, "stability", "peak_to_peak"), "ADU", product="bias"),
        Figure("bias_drift", "Bias drift", _get(b, "stability", "drift"), "ADU/h",
               _get(b, "stability", "drift_err"), product="bias"),
        Figure("dark_current", "Dark current (median)", _get(d, "summary", "median"),
               dark_units.replace("e-/s", "e-/pix/s"), _get(d, "summary", "median_err"),
               product="dark"),
        Figure("dark_current_mean", "Dark current (mean)", _get(d, "summary", "mean"),
               dark_units.replace("e-/s", "e-/pix/s"), _get(d, "summary", "mean_err"),
               product="dark"),
        Figure("dark_temperature", "Sensor temperature", _get(d, "temperature_c"), "C",
               product="dark"),
        Figure("read_noise_conventional", "Read noise (conventional)",
               _get(rn, "conventional_e"), "e-", _get(rn, "conventional_e_err"),
               product="read_noise"),
        Figure("read_noise_per_pixel", "Read noise (per-pixel median)", _get(rn, "median_e"), "e-",
               _get(rn, "median_e_err"), product="read_noise"),
        Figure("gain_conventional", "Gain (conventional PTC)", _get(p, "gain"), "e-/ADU",
               _get(p, "gain_err"), product="ptc"),
        Figure("gain_per_pixel", "Gain (per-pixel, population)",
               next((v for v in (_get(g, "population_gain"), _get(g, "median")) if v is not None),
                    None), "e-/ADU", _get(g, "population_gain_err"), product="gain"),
        Figure("full_well", "Full well (lower bound)" if _get(p, "full_well_lower_bound")
               else "Full well", _get(p, "full_well_e"), "e-", product="ptc"),
        Figure("nonlinearity", "Nonlinearity (max)", _get(lin, "max_nonlinearity_pct"), "%",
               product="linearity"),
        Figure("nonlinearity_above_3000", "Nonlinearity (max, > 3000 ADU)",
               _get(lin, "max_nonlinearity_above_3000_pct"), "%", product="linearity"),
        Figure("linearity_r2", "Linearity R^2", _get(lin, "r2"), "", product="linearity"),
        Figure("prnu", "PRNU" + (" (upper bound)" if bound else ""),
               _get(fl, "prnu_pct"), "%", product="flat"),
        Figure("prnu_highpass", "PRNU (vignetting removed" + (", upper bound)" if bound else ")"),
               _get(fl, "prnu_highpass_pct"), "%", product="flat"),
        Figure("dsnu", "DSNU (bias, total)", _get(b, "dsnu", "total"), "ADU", product="bias"),
        Figure("anomalous_fraction", "Anomalous pixels", _pct(_get(m, "counts", "any", "fraction")),
               "%", product="mask"),
    ]
    pops = _get(g, "populations")
    if isinstance(pops, Mapping) and len(pops.get("weights", [])) > 1:
        for i, (w, mu) in enumerate(zip(pops["weights"], pops["gain_means"], strict=False)):
            figs.append(Figure(f"gain_population_{i}", f"Gain population {i + 1} (weight {w:.3%})",
                               float(mu), "e-/ADU", product="gain"))
    return QCReport(camera, figs, dict(missing or {}), dict(context or {}))


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * float(fraction)
