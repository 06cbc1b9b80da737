"""A product's zarr v3 group served read-only, key by key, for ``xarray.open_zarr`` over HTTP.

HTTP cannot list folders, so zarr needs consolidated metadata to find a
group's arrays: the root ``zarr.json`` is served with the metadata of every
member inlined (``consolidated_metadata``, zarr v3's inline form), built from
the stored documents on first request and cached (versions never change).
Every other key is served as stored; a missing key is a ``404``, which is how
zarr learns that a chunk is absent (fill value).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from zarr.core.buffer import default_buffer_prototype

from sitiancal.storage.catalog import NotFound
from sitiancal.storage.store import ProductStore

ZARR_JSON = "zarr.json"
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")


class NoSuchKey(NotFound):
    """A key that is not in a product's zarr store (HTTP 404)."""

    def __init__(self, product_id: str, key: str) -> None:
        super().__init__(f"product {product_id} has no zarr key {key!r}")
        self.product_id = product_id
        self.key = key


def valid_key(key: str) -> bool:
    """Whether ``key`` is a plain relative zarr key (no '..', '.', empty segments, oddities)."""
    if not key or len(key) > 1024:
        return False
    parts = key.split("/")
    return all(p not in (".", "..") and _SEGMENT.match(p) for p in parts)


class ZarrServer:
    """Reads keys of products' zarr groups from the product store.

    Parameters
    ----------
    store : ProductStore
    cache_size : int
        Consolidated root documents kept in memory.
    """

    def __init__(self, store: ProductStore, cache_size: int = 256) -> None:
        self.store = store
        self.cache_size = cache_size
        self._roots: OrderedDict[str, bytes] = OrderedDict()

    async def _raw(self, zstore: Any, key: str) -> bytes | None:
        buf = await zstore.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def _consolidated(self, zstore: Any, root: bytes) -> bytes:
        doc = json.loads(root)
        if doc.get("consolidated_metadata"):
            return root
        members: dict[str, Any] = {}
        async for key in zstore.list():
            if key.endswith("/" + ZARR_JSON):
                raw = await self._raw(zstore, key)
                if raw is not None:
                    members[key[: -len(ZARR_JSON) - 1]] = json.loads(raw)
        doc["consolidated_metadata"] = {
            "kind": "inline", "must_understand": False,
            "metadata": dict(sorted(members.items(), key=lambda kv: (kv[0].count("/"),
                                                                      kv[0])))}
        return json.dumps(doc, allow_nan=True).encode()

    async def get(self, product_id: str, store_key: str, key: str) -> bytes:
        """The bytes of ``key`` in the product's group.

        Raises
        ------
        NoSuchKey
            The key is malformed or not stored.
        """
        if not valid_key(key):
            raise NoSuchKey(product_id, key)
        if key == ZARR_JSON and product_id in self._roots:
            self._roots.move_to_end(product_id)
            return self._roots[product_id]
        zstore = self.store.zarr_store(store_key, read_only=True)
        try:
            raw = await self._raw(zstore, key)
            if raw is None:
                raise NoSuchKey(product_id, key)
            if key == ZARR_JSON:
                raw = await self._consolidated(zstore, raw)
                self._roots[product_id] = raw
                while len(self._roots) > self.cache_size:
                    self._roots.popitem(last=False)
            return raw
        finally:
            zstore.close()
