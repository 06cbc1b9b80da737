"""Service metrics in the Prometheus text exposition format (version 0.0.4).

A deliberately small, thread-safe implementation of counters and histograms
(the service's needs are a handful of series; ``prometheus_client`` is not a
dependency). Gauges that reflect the catalog (jobs by state) are computed at
scrape time and passed to :meth:`Metrics.render`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping

#: Bucket upper bounds (s) of job durations: seconds to hours.
JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
#: Bucket upper bounds (s) of best-product lookups: a fraction of a ms to 1 s.
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count, optionally labelled."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0) to the series with these label values."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (got {amount})")
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """Current value of one series (0 if never incremented)."""
        return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        lines += [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]
        return lines


class Histogram:
    """Cumulative-bucket histogram of observations, optionally labelled."""

    def __init__(self, name: str, doc: str, buckets: Iterable[float],
                 labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self.buckets = (*sorted(float(b) for b in buckets), math.inf)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation (in the metric's unit)."""
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        """Number of observations of one series."""
        series = self._series.get(tuple(str(labels[n]) for n in self.label_names))
        return series[0][-1] if series else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._series.items())
        for key, (counts, total) in items:
            for bound, n in zip(self.buckets, counts, strict=True):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {n}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {counts[-1]}")
        return lines


class Metrics:
    """All metrics of one service instance."""

    def __init__(self) -> None:
        self.product_requests = Counter(
            "sitiancal_product_requests_total",
            "Product requests by endpoint kind and HTTP status.", ("kind", "status"))
        self.bytes_served = Counter(
            "sitiancal_product_bytes_served_total",
            "Bytes of product content sent (FITS and zarr).", ("kind",))
        self.cache_hits = Counter(
            "sitiancal_product_cache_hits_total",
            "Conditional requests answered 304 Not Modified.", ("kind",))
        self.lookup_latency = Histogram(
            "sitiancal_best_lookup_seconds",
            "Latency of best-product-at-time lookups (s).", LOOKUP_BUCKETS)
        self.job_duration = Histogram(
            "sitiancal_job_duration_seconds",
            "Run time of finished jobs by final state (s).", JOB_DURATION_BUCKETS, ("state",))

    def render(self, jobs_by_state: Mapping[str, int]) -> str:
        """The whole exposition text, including the jobs-by-state gauge."""
        lines = ["# HELP sitiancal_jobs Jobs in the catalog by state.",
                 "# TYPE sitiancal_jobs gauge"]
        lines += [f'sitiancal_jobs{{state="{_escape(s)}"}} {int(n)}'
                  for s, n in sorted(jobs_by_state.items())]
        for metric in (self.product_requests, self.bytes_served, self.cache_hits,
                       self.lookup_latency, self.job_duration):
            lines += metric.render()
        return "\n".join(lines) + "\n"
