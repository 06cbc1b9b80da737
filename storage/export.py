"""FITS export of a product version (DESIGN.md section 6).

Layout of the file:

- primary HDU: the main map (the first array of the product) with ``BUNIT``
  and the identity of the product: ``CAMERA``, ``PRODTYPE``, ``VERSION``,
  ``SHA256`` (the content key: sha256 over the sorted input sha256s, the
  parameters, the product type and the code version), ``DATE-BEG`` /
  ``DATE-END`` of the inputs (UTC, ``TIMESYS``), ``SWCREATE`` / ``SWVERSN``
  (code version), ``NINPUTS``, and for a mask product the bit names
  ``MASKB0`` .. ``MASKB8`` (DESIGN.md section 5);
- one image extension per other array, ``EXTNAME`` = the array name in upper
  case (``GAIN_ERR`` for the uncertainty of ``gain``), with ``BUNIT``;
- one binary-table extension per product table (``TUNITn`` for the units);
- a final ``INPUTS`` table with the path and sha256 of every input frame.

The bytes depend only on the stored product: there is no date of writing and
no checksum card with a timestamp, so exporting the same version twice gives
the same sha256 (the catalog records it, HTTP serves it as the ETag).

Public API: ``export_fits(group) -> bytes``, ``build_hdulist(group) -> HDUList``,
``default_mask_bits()``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from astropy.io import fits


def default_mask_bits() -> dict[int, str]:
    """Bit number -> name of :class:`sitiancal.compute.defects.MaskBit` (DESIGN.md section 5).

    Used for a ``mask`` product that does not carry its own bit names.
    """
    from sitiancal.compute.defects import MaskBit

    return {int(bit).bit_length() - 1: str(bit.name) for bit in MaskBit}

_META_ATTR = "sitiancal"
#: FITS binary-table formats of numpy dtypes (uint16/uint32 are widened).
_TFORM = {"f8": "D", "f4": "E", "i8": "K", "i4": "J", "i2": "I", "u1": "B", "b1": "L",
          "u2": "J", "u4": "K", "i1": "I"}
_WIDEN = {"u2": np.int32, "u4": np.int64, "i1": np.int16}


def _ascii(text: Any) -> str:
    """FITS headers and strings are printable ASCII: escape anything else."""
    value = str(text).encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in value)


def _set(header: fits.Header, key: str, value: Any, comment: str = "") -> None:
    """Set a card, dropping the comment where it would not fit in 80 columns."""
    width = len(str(value)) + 2 if isinstance(value, str) else len(str(value))
    if 10 + max(20, width) + 3 + len(comment) > 80:
        comment = ""
    header[key] = (value, comment) if comment else value


def _fits_date(iso: str | None) -> str | None:
    if not iso:
        return None
    return iso.replace("Z", "").replace("+00:00", "")


def _image_data(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "b":
        return values.astype(np.uint8)
    if values.dtype.byteorder not in ("=", "|", ">"):
        return values.astype(values.dtype.newbyteorder("="))
    return values


def _primary_header(meta: Mapping[str, Any], n_inputs: int) -> list[tuple[str, Any, str]]:
    cards: list[tuple[str, Any, str]] = [
        ("CAMERA", _ascii(meta["camera"]), "camera name"),
        ("PRODTYPE", _ascii(meta["type"]), "product type"),
        ("VERSION", int(meta["version"]), "product version (per camera and type)"),
        ("SHA256", _ascii(meta["content_key"]), "content key: sha256 of inputs, params, code"),
        ("TIMESYS", "UTC", "time scale of DATE-BEG and DATE-END"),
    ]
    beg, end = _fits_date(meta.get("date_beg")), _fits_date(meta.get("date_end"))
    if beg:
        cards.append(("DATE-BEG", beg, "first input frame (UTC)"))
    if end:
        cards.append(("DATE-END", end, "last input frame (UTC)"))
    cards += [
        ("SWCREATE", "sitiancal", "software that created the product"),
        ("SWVERSN", _ascii(meta.get("code_version", "")), "software version"),
        ("NINPUTS", int(n_inputs), "number of input frames (INPUTS table)"),
    ]
    bits = meta.get("mask_bits")
    if not bits and meta.get("type") == "mask":
        bits = {str(k): v for k, v in default_mask_bits().items()}
    for bit, name in sorted((bits or {}).items(), key=lambda item: int(item[0])):
        cards.append((f"MASKB{int(bit)}", _ascii(name), f"name of mask bit {int(bit)} "
                      f"(value {1 << int(bit)})"))
    return cards


def _table_hdu(name: str, table: zarr.Group) -> fits.BinTableHDU:
    units: Mapping[str, str] = table.attrs.get("units", {})
    columns = []
    for col in table.attrs["columns"]:
        values = np.asarray(table[col][...])
        unit = _ascii(units.get(col, "")) or None
        if values.dtype.kind in "TUSO":
            text = np.array([_ascii(v) for v in values.tolist()], dtype=np.str_)
            width = max(1, max((len(v) for v in text), default=1))
            columns.append(fits.Column(name=col, format=f"{width}A", unit=unit,
                                       array=text.astype(f"S{width}")))
            continue
        code = values.dtype.str[1:]
        if code in _WIDEN:
            values = values.astype(_WIDEN[code])
            code = values.dtype.str[1:]
        if code not in _TFORM:
            raise TypeError(f"table {name}: column {col} has dtype {values.dtype} "
                            "that FITS tables do not hold")
        columns.append(fits.Column(name=col, format=_TFORM[code], unit=unit,
                                   array=_image_data(values)))
    hdu = fits.BinTableHDU.from_columns(columns, name=name.upper())
    description = table.attrs.get("description", "")
    if description:
        hdu.header["COMMENT"] = _ascii(description)[:72]
    return hdu


def _inputs_hdu(inputs: list[Mapping[str, str]]) -> fits.BinTableHDU:
    paths = [_ascii(item["path"]) for item in inputs]
    shas = [_ascii(item["sha256"]) for item in inputs]
    width = max(1, max((len(p) for p in paths), default=1))
    cols = [
        fits.Column(name="path", format=f"{width}A", array=np.array(paths, dtype=f"S{width}")),
        fits.Column(name="sha256", format="64A", array=np.array(shas, dtype="S64")),
    ]
    return fits.BinTableHDU.from_columns(cols, name="INPUTS")


def build_hdulist(group: zarr.Group) -> fits.HDUList:
    """Build the FITS HDU list of a stored product group (see the module docstring)."""
    meta = group.attrs[_META_ATTR]
    inputs = list(group.attrs.get("inputs", []))
    names = list(meta["arrays"])
    if names:
        main = group[names[0]]
        primary = fits.PrimaryHDU(data=_image_data(np.asarray(main[...])))
        _set(primary.header, "EXTNAME", names[0].upper(), "main map")
        _set(primary.header, "BUNIT", _ascii(main.attrs.get("units", meta.get("units", ""))),
             "units")
        _set(primary.header, "LONGNAME", _ascii(main.attrs.get("long_name", "")))
    else:  # a table-only product: the header alone
        primary = fits.PrimaryHDU()
        _set(primary.header, "BUNIT", _ascii(meta.get("units", "")), "units of the figures")
    header = primary.header
    for key, value, comment in _primary_header(meta, len(inputs)):
        _set(header, key, value, comment)
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [primary]
    for name in names[1:]:
        arr = group[name]
        hdu = fits.ImageHDU(data=_image_data(np.asarray(arr[...])), name=name.upper())
        _set(hdu.header, "BUNIT", _ascii(arr.attrs.get("units", "")), "units")
        _set(hdu.header, "LONGNAME", _ascii(arr.attrs.get("long_name", "")))
        hdus.append(hdu)
    tables = meta.get("tables") or []
    for name in tables:
        hdus.append(_table_hdu(name, group["tables"][name]))
    hdus.append(_inputs_hdu(inputs))
    return fits.HDUList(hdus)


def export_fits(group: zarr.Group) -> bytes:
    """The canonical FITS bytes of a stored product group (deterministic)."""
    buffer = io.BytesIO()
    build_hdulist(group).writeto(buffer, output_verify="exception")
    return buffer.getvalue()
