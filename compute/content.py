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
