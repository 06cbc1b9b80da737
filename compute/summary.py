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

import numpy as np

__all__ = ["MAD_TO_SIGMA", "finite_values", "mean_std", "quantiles", "row_bands"]

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
