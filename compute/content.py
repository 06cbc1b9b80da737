"""What a calibration product is made of: named arrays, tables and scalar figures.

These plain containers are shared by the compute layer (which fills them)
and the storage layer (which writes them as zarr and FITS); they hold no
logic beyond checking dimension names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ProductArray:
    """One named array of a product (the first array of a product is its main map).

    Attributes
    ----------
    name : str
        Array name (``GAIN``, ``GAIN_ERR``...); ``*_ERR`` for 1-sigma uncertainties.
    data : array-like
        A numpy array, or anything with ``shape``, ``dtype`` and numpy slicing.
    units : str
        Physical units (``ADU``, ``e-``, ``e-/ADU``, ``e-/s``...).
    long_name : str
        Human-readable description.
    dims : tuple of str or None
        Dimension names; default ``("y", "x")`` for 2-D arrays.
    """

    name: str
    data: Any
    units: str
    long_name: str
    dims: tuple[str, ...] | None = None

    def dimension_names(self) -> tuple[str, ...]:
        """The dimension names, defaulted and checked against the array rank."""
        ndim = len(self.data.shape)
        if self.dims is not None:
            if len(self.dims) != ndim:
                raise ValueError(f"array {self.name!r} has {ndim} dimensions but "
                                 f"{len(self.dims)} names {self.dims}")
            return tuple(self.dims)
        if ndim == 2:
            return ("y", "x")
        return tuple(f"{self.name}_dim{i}" for i in range(ndim))


class ScaledMap:
    """A map times a factor, evaluated region by region when read (float32).

    A product can store a map in other units (ADU -> e- through a gain map)
    without holding the converted map in memory: the store reads it chunk by
    chunk, and each read multiplies just that region.

    Parameters
    ----------
    source : array-like
        The map (a numpy or zarr array; anything with ``shape`` and slicing).
    factor : float or numpy.ndarray
        Scalar, or an array of the source's shape.
    """

    def __init__(self, source: Any, factor: Any) -> None:
        if np.ndim(factor) and tuple(np.shape(factor)) != tuple(source.shape):
            raise ValueError(f"factor of shape {np.shape(factor)} does not match the map "
                             f"{tuple(source.shape)}")
        self.source = source
        self.factor = factor
        self.shape = tuple(int(n) for n in source.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, region: Any) -> np.ndarray:
        f = self.factor if np.ndim(self.factor) == 0 else np.asarray(self.factor[region])
        values = np.asarray(self.source[region], dtype=np.float32)
        return np.multiply(values, f, dtype=np.float32)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a ScaledMap is computed when read: it cannot be viewed without a copy")
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class ProductTable:
    """A small table of a product (stored as a FITS BinTable and zarr 1-D arrays)."""

    name: str
    columns: dict[str, np.ndarray]
    units: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass
class ProductContent:
    """Everything computed for one product type.

    Attributes
    ----------
    type : str
        Product type (DESIGN.md section 4).
    units : str
        Units of the main array (or of the main figure for table-only products).
    arrays, tables : list
        The maps and tables.
    stats : dict
        JSON-able scalar figures (and small nested dicts) of the product.
    """

    type: str
    units: str
    arrays: list[ProductArray] = field(default_factory=list)
    tables: list[ProductTable] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
