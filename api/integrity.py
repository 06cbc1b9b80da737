"""Checksums checked on every product download path, so a corrupt product is never served.

The catalog records, for each product version, the sha256 of its FITS export
and of each zarr array (``zarr.json`` and chunks). :class:`IntegrityChecker`
recomputes them before content is served:

- FITS: the whole file is hashed before the first byte of any response
  (whole file or range). The result is remembered for the file's
  fingerprint (size and modification time or store ETag), so a file that
  changes afterwards is hashed again.
- zarr: on the first request for a product's keys, every array of the
  product is hashed and compared with the catalog (``ProductStore.verify``).
  The answer is remembered per product version (versions are immutable);
  ``sitiancal verify`` rechecks the whole store.

A mismatch raises :class:`CorruptProduct` (HTTP 409 with the problem named);
the content is refused, never served as good.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from sitiancal.storage.catalog import ProductVersion
from sitiancal.storage.store import FITS_NAME, ProductMissing, ProductStore


class CorruptProduct(RuntimeError):
    """Stored content that does not match the checksums recorded at publication (HTTP 409)."""

    def __init__(self, product_id: str, problems: list[str] | tuple[str, ...]) -> None:
        super().__init__(product_id, tuple(problems))
        self.product_id = product_id
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return (f"product {self.product_id} is corrupt in the store and is not served: "
                + "; ".join(self.problems) + " (run `sitiancal verify`)")


class IntegrityChecker:
    """Verifies stored products against their catalog checksums, remembering the answers.

    Parameters
    ----------
    store : ProductStore
    cache_size : int
        Verified FITS fingerprints and zarr products remembered (each).
    """

    def __init__(self, store: ProductStore, cache_size: int = 4096) -> None:
        self.store = store
        self.cache_size = cache_size
        self._fits: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._zarr: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()
        self.hashed_fits = 0
        self.verified_zarr = 0

    def _fingerprint(self, product: ProductVersion) -> tuple[Any, ...]:
        path = self.store.fits_path(product.store_key)
        try:
            info = self.store.fs.info(path)
        except FileNotFoundError as exc:
            raise ProductMissing(product.store_key) from exc
        return (info.get("size"), info.get("mtime"), info.get("LastModified"),
                info.get("ETag"), info.get("ino"))

    def _remember(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)

    def check_fits(self, product: ProductVersion) -> None:
        """Raise :class:`CorruptProduct` unless the stored FITS file has the recorded sha256."""
        fingerprint = self._fingerprint(product)
        with self._lock:
            if self._fits.get(product.id) == fingerprint:
                return
        h = hashlib.sha256()
        with self.store.open_fits(product.store_key) as fobj:
            for block in iter(lambda: fobj.read(8 * 1024 * 1024), b""):
                h.update(block)
        self.hashed_fits += 1
        if h.hexdigest() != product.sha256:
            with self._lock:
                self._fits.pop(product.id, None)
            raise CorruptProduct(product.id, [f"{FITS_NAME}: sha256 {h.hexdigest()} != "
                                              f"recorded {product.sha256}"])
        self._remember(self._fits, product.id, fingerprint)

    def check_zarr(self, product: ProductVersion) -> None:
        """Raise :class:`CorruptProduct` unless every array matches its recorded sha256."""
        with self._lock:
            if self._zarr.get(product.id):
                return
        report = self.store.verify(product.store_key, product.checksums)
        self.verified_zarr += 1
        problems = [p for p in report.problems if not p.startswith(FITS_NAME)]
        if problems:
            raise CorruptProduct(product.id, problems)
        self._remember(self._zarr, product.id, True)
