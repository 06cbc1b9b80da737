"""In-memory answers of best-at-time lookups, so the pipeline read path stays off the database.

For each camera and product type the certified versions (with their
validity ranges and their serialised JSON) are loaded once; a lookup
``best(camera, type, at)`` is then a scan of a few ranges in memory: the
certified version whose ``[valid_from, valid_to)`` contains ``at``, highest
version first, exactly as :meth:`Catalog.best`.

Invalidation: every certify or retract committed through this process's
:class:`~sitiancal.storage.catalog.Catalog` (API, job runner) drops the
series at once (a catalog validity listener); a generation counter keeps a
load that raced with a change from being cached. Changes made by other
processes (the ``sitiancal products`` CLI, another replica) are picked up
when an entry expires, ``ttl`` seconds after it was loaded: the expired
entry still answers while one background task reloads it, so lookups never
wait for the database except the first one of a series and the first one
after a local change. Lookups the cache cannot answer (no covering range,
``as_of``, candidates) go to the catalog, which gives the precise reason.

Two ways in: :meth:`BestCache.lookup` (the route; loads a series it does not
hold) and :meth:`BestCache.peek` (the HTTP fast path of
:class:`~sitiancal.api.routers.products.BestLookupFastPath`; memory only, a
series not held is a miss handed to the route).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sitiancal.storage.catalog import Catalog, ProductVersion


@dataclass(frozen=True)
class _Range:
    start: datetime
    end: datetime | None
    version: int
    body: bytes


@dataclass(frozen=True)
class _Entry:
    expires: float
    ranges: tuple[_Range, ...]


class BestCache:
    """Certified validity ranges per camera and type, with their response bodies.

    Parameters
    ----------
    catalog : Catalog
    render : callable
        ``ProductVersion -> bytes``: the JSON body served for a version.
    ttl : float
        Seconds an entry is trusted for changes made by other processes.
    """

    def __init__(self, catalog: Catalog, render: Callable[[ProductVersion], bytes],
                 ttl: float = 1.0) -> None:
        self.catalog = catalog
        self.render = render
        self.ttl = ttl
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._generation: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Task[tuple[_Range, ...]]] = {}
        self.loads = 0
        self.hits = 0
        catalog.add_validity_listener(self.invalidate)

    def invalidate(self, camera: str, product_type: str) -> None:
        """Forget a series (called after a certify or retract); thread-safe."""
        key = (camera, product_type)
        self._generation[key] = self._generation.get(key, 0) + 1
        self._entries.pop(key, None)

    def _load(self, key: tuple[str, str]) -> tuple[_Range, ...]:
        products = self.catalog.list_products(camera=key[0], type=key[1], state="certified")
        self.loads += 1
        return tuple(_Range(p.valid_from, p.valid_to, p.version, self.render(p))
                     for p in products if p.valid_from is not None
                     and (p.valid_to is None or p.valid_to > p.valid_from))

    async def _reload(self, key: tuple[str, str]) -> tuple[_Range, ...]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires > time.monotonic():
                return entry.ranges
            generation = self._generation.get(key, 0)
            loaded = time.monotonic()
            ranges = await asyncio.to_thread(self._load, key)
            if self._generation.get(key, 0) == generation:
                self._entries[key] = _Entry(loaded + self.ttl, ranges)
            return ranges

    def _refresh_done(self, key: tuple[str, str], task: asyncio.Task[tuple[_Range, ...]]) -> None:
        if self._refreshing.get(key) is task:
            del self._refreshing[key]
        if not task.cancelled():
            task.exception()  # a failed refresh is retried by the next lookup

    def _held(self, key: tuple[str, str]) -> tuple[_Range, ...] | None:
        """The ranges held for a series (None if not loaded); an expired entry is refreshed."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic() and key not in self._refreshing:
            # expired: answer from the entry while one task reloads it in the background
            # (one per series: the lookups that arrive before it runs do not start more)
            task = asyncio.get_running_loop().create_task(self._reload(key))
            self._refreshing[key] = task
            task.add_done_callback(functools.partial(self._refresh_done, key))
        return entry.ranges

    def _pick(self, ranges: tuple[_Range, ...], at: datetime) -> bytes | None:
        best: _Range | None = None
        for r in ranges:
            if r.start <= at and (r.end is None or at < r.end) and (
                    best is None or r.version > best.version):
                best = r
        if best is None:
            return None
        self.hits += 1
        return best.body

    async def lookup(self, camera: str, product_type: str, at: datetime) -> bytes | None:
        """The JSON body of the certified version valid at ``at``, or None to ask the catalog.

        Loads the series from the catalog first when it is not held (the
        catalog's errors propagate).
        """
        key = (camera, product_type)
        ranges = self._held(key)
        if ranges is None:  # never loaded, or invalidated by a change: wait for the catalog
            ranges = await self._reload(key)
        return self._pick(ranges, at)

    def peek(self, camera: str, product_type: str, at: datetime) -> bytes | None:
        """Like :meth:`lookup`, from memory only: None also when the series is not held.

        Never waits and never raises for the catalog (a refresh of an expired
        entry runs in the background); for callers that hand everything else
        to :meth:`lookup`. Needs a running event loop.
        """
        ranges = self._held((camera, product_type))
        return None if ranges is None else self._pick(ranges, at)
