"""Summary statistics of full-frame maps in bounded memory.

A 61 MP map is 245 MB in float32 and 490 MB in float64; the product assembly
computes medians, quantiles, means and robust widths of a dozen such maps.
The helpers here keep to one float32 copy of the finite values (sorted or
partitioned in place) and accumulate sums in float64 over blocks, so no
full-size float64 temporary is made, while the sums keep float64 accuracy.

Medians and quantiles of float32 values are exact order statistics (the
linear interpolation between two neighbours is done in the values' dtype);
their float32 rounding (~6e-8 relative) is far below any statistical error
of a map of millions of pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numba
import numpy as np
from numba import njit, prange

__all__ = ["MAD_TO_SIGMA", "finite_values", "mean_std", "median", "order_statistics",
           "quantiles", "row_bands"]

#: 1.4826: the MAD of a Gaussian times this is its standard deviation.
MAD_TO_SIGMA = 1.482602218505602
#: Values per block of the float64 accumulations (8 MB of float64).
_BLOCK = 1 << 20


def finite_values(values: np.ndarray) -> np.ndarray:
    """A 1-D copy of the finite values, float32 kept as float32 (other types: float64).

    Parameters
    ----------
    values : array_like
        Any shape and units.

    Returns
    -------
    numpy.ndarray
        A new array the caller may sort or overwrite.
    """
    a = np.asarray(values)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    return a[np.isfinite(a)].ravel()


def mean_std(values: np.ndarray, *, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of a 1-D array, accumulated in float64 by blocks.

    Two passes (mean, then squared deviations from it), each over blocks of
    ``2**20`` values converted to float64, so the result has float64 accuracy
    without a full-size float64 copy. NaN for too few values.
    """
    v = np.asarray(values).ravel()
    n = v.size
    if n == 0:
        return float("nan"), float("nan")
    total = 0.0
    for i in range(0, n, _BLOCK):
        total += float(np.sum(v[i:i + _BLOCK], dtype=np.float64))
    mean = total / n
    if n - ddof <= 0:
        return mean, float("nan")
    ss = 0.0
    for i in range(0, n, _BLOCK):
        d = v[i:i + _BLOCK].astype(np.float64) - mean
        ss += float(np.dot(d, d))
    return mean, float(np.sqrt(ss / (n - ddof)))


def quantiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Quantiles (numpy's default linear method) of a 1-D array, partitioning it in place.

    Parameters
    ----------
    values : numpy.ndarray
        1-D array of finite values; it is reordered (pass a copy you own, e.g.
        from :func:`finite_values`).
    q : sequence of float
        Quantiles in [0, 1].

    Returns
    -------
    numpy.ndarray
        float64 quantiles, same as ``np.quantile(values, q)``.
    """
    if values.size == 0:
        return np.full(len(q), np.nan)
    return np.asarray(np.quantile(values, np.asarray(q, dtype=np.float64), overwrite_input=True),
                      dtype=np.float64)


def row_bands(n_rows: int, n_cols: int, *, pixels: int = 1 << 22) -> Iterator[slice]:
    """Slices of consecutive rows holding about ``pixels`` pixels each (at least one row)."""
    step = max(1, pixels // max(n_cols, 1))
    for y0 in range(0, n_rows, step):
        yield slice(y0, min(y0 + step, n_rows))


# ---------------------------------------------------------------------------
# Exact order statistics of float32 values by a two-pass radix select.
#
# np.median partitions with one thread (~0.6 s for 61 M float32 values, and the
# assembly takes a dozen medians of full maps). float32 values map to uint32
# keys whose unsigned order is the values' order (flip every bit of negatives,
# the sign bit of the others); a parallel histogram of the top 16 bits finds
# the 65536-wide key range holding the wanted rank, a second one of the low 16
# bits within that range finds the key itself. Two parallel passes, exact for
# any distribution (no bins tuned to the data), and no reordering of the input.

_RADIX = 1 << 16


@njit(cache=True, inline="always")
def _key(bits: np.uint32) -> np.uint32:
    if bits >> np.uint32(31):
        return ~bits
    return bits | np.uint32(0x80000000)


@njit(parallel=True, cache=True)
def _radix_histogram(bits: np.ndarray, top: np.int64, n_parts: np.int64) -> np.ndarray:
    """Counts of the top 16 key bits (``top < 0``), or of the low 16 bits of keys whose top is ``top``."""
    n = bits.size
    hist = np.zeros((n_parts, _RADIX), dtype=np.int64)
    step = (n + n_parts - 1) // n_parts
    for part in prange(n_parts):
        for i in range(part * step, min(n, (part + 1) * step)):
            key = _key(bits[i])
            if top < 0:
                hist[part, key >> np.uint32(16)] += 1
            elif (key >> np.uint32(16)) == top:
                hist[part, key & np.uint32(0xFFFF)] += 1
    return hist.sum(axis=0)


def _from_key(key: int) -> np.float32:
    bits = key ^ 0x80000000 if key >> 31 else key ^ 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def order_statistics(values: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """Values of the given ranks (0 = smallest) of a 1-D float32 array of finite values.

    Same as ``np.sort(values)[ranks]`` (tested), by a parallel two-pass radix
    select: the input is read, never reordered. Other dtypes: ``np.partition``.

    Parameters
    ----------
    values : numpy.ndarray
        1-D, finite values (e.g. from :func:`finite_values`).
    ranks : sequence of int
        Ranks in ``[0, values.size)``.
    """
    v = np.ascontiguousarray(values)
    wanted = [int(r) for r in ranks]
    if any(r < 0 or r >= v.size for r in wanted):
        raise IndexError(f"ranks {wanted} outside [0, {v.size})")
    if v.dtype != np.float32:
        return np.partition(v, wanted)[wanted]
    bits = v.view(np.uint32)
    parts = np.int64(numba.get_num_threads())
    cum_top = np.cumsum(_radix_histogram(bits, np.int64(-1), parts))
    out = np.empty(len(wanted), dtype=np.float32)
    low_cum: dict[int, np.ndarray] = {}
    for j, rank in enumerate(wanted):
        top = int(np.searchsorted(cum_top, rank, side="right"))
        before = int(cum_top[top - 1]) if top else 0
        if top not in low_cum:
            low_cum[top] = np.cumsum(_radix_histogram(bits, np.int64(top), parts))
        low = int(np.searchsorted(low_cum[top], rank - before, side="right"))
        out[j] = _from_key((top << 16) | low)
    return out


def median(values: np.ndarray) -> float:
    """Median of a 1-D array of finite values: ``np.median(values)`` exactly, for float32 in parallel.

    NaN for an empty array. The input is not modified.
    """
    n = values.size
    if n == 0:
        return float("nan")
    if values.dtype != np.float32:
        return float(np.median(values))
    if n % 2:
        return float(order_statistics(values, [n // 2])[0])
    a, b = order_statistics(values, [n // 2 - 1, n // 2])
    # np.median averages the two middle values in the array's dtype
    return float((a + b) / np.float32(2.0))
