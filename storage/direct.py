"""A local zarr store that writes and reads large chunks past the page cache (``O_DIRECT``).

For data a process writes once and reads back at most a few times: a job's
scratch maps, and a staged product's arrays (written, checksummed from direct
reads, settled; the service reads published products through the page cache
as usual).

The tile pass writes every per-pixel map of a job once (a 300-frame 61 MP
job: ~4.5 GB of float32) and the products stage reads each back. Written
through the page cache, each of those bytes is first copied into a newly
allocated cache page; on a virtual machine whose freed memory goes back to
the host (virtio-balloon free page reporting, as on the benchmark machine)
every such page is a host fault on first touch: 2.4 s of system time per GB
written there (measured: 0.41 GB/s for buffered writes after the page cache
was dropped, 3.6 GB/s when freed cache pages were reused), ~10 core-s of a
job's tile pass. With ``O_DIRECT`` the disk takes the bytes straight from a
small reused buffer, whose pages stay mapped.

Reads of large values take the same path (``O_DIRECT`` into a buffer of the
process's heap, which the job's allocator settings keep mapped): read through
the page cache, each chunk would fill newly allocated cache pages and pay the
same first-touch cost there instead (measured: the tile pass 54 -> 49 s with
direct writes alone, and the products stage 25 -> 29 s). With both, a
300-frame 61 MP job (cold cache, old and new alternating) took 99.3 and
99.6 s instead of 107.1 and 105.4 s, system time 16.8 and 17.7 instead of
28.8 and 27.9 core-s, on that machine. Staging the products the same way
(the arrays' ~3 GB at 300 frames) took the products stage's system time from
6.7-8.5 to 4.3 core-s.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import uuid
from pathlib import Path

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from sitiancal.storage.frames import DIRECT_ALIGN, aligned_buffer, open_direct, read_file_direct

#: Values smaller than this (metadata documents, small chunks) are written
#: through the page cache as by :class:`zarr.storage.LocalStore`, bytes.
DIRECT_MIN_BYTES = 1 << 20

_local = threading.local()


def _thread_buffer(nbytes: int) -> np.ndarray:
    """This thread's page-aligned buffer of at least ``nbytes`` (kept and reused).

    One per writing thread (zarr's few I/O threads): a chunk's size each.
    """
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.size < nbytes:
        buf = aligned_buffer(nbytes)
        _local.buffer = buf
    return buf


def write_direct(path: str | os.PathLike[str], data: memoryview) -> bool:
    """Write ``data`` as the whole file ``path`` with ``O_DIRECT``; False where not possible.

    The bytes are copied into a reused page-aligned buffer, padded with zeros
    to :data:`~sitiancal.storage.frames.DIRECT_ALIGN`, written, and the file
    is cut back to ``len(data)``. The file appears under ``path`` only when
    it is complete (written under a temporary name, then renamed). False, with
    nothing written, where the file system refuses ``O_DIRECT`` (tmpfs); any
    other error is raised (``OSError``).
    """
    target = Path(path)
    size = data.nbytes
    span = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    tmp = target.with_suffix(f".{uuid.uuid4().hex}.partial")
    fd = open_direct(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as open(): umask
    if fd is None:
        tmp.unlink(missing_ok=True)
        return False
    try:
        buf = _thread_buffer(span)
        buf[:size] = np.frombuffer(data, dtype=np.uint8)
        buf[size:span] = 0
        view = memoryview(buf)
        done = 0
        while done < span:
            try:
                done += os.pwritev(fd, [view[done:span]], done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and not done:  # opened, but no direct transfers
                    os.close(fd)
                    fd = -1
                    tmp.unlink(missing_ok=True)
                    return False
                raise
        os.ftruncate(fd, size)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return True


def read_direct(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The bytes of file ``path`` read with ``O_DIRECT`` into a new heap array (uint8).

    None where the file does not exist or is smaller than
    :data:`DIRECT_MIN_BYTES` (the caller reads it as usual). The array is
    allocated by numpy (not a fresh memory map: heap memory freed by earlier
    reads is reused) and aligned inside a slightly larger allocation; file
    systems that refuse ``O_DIRECT`` are read through the page cache.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    if size < DIRECT_MIN_BYTES:
        return None
    span = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    raw = np.empty(span + DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return read_file_direct(path, buffer=raw[start:start + span])


class DirectStore(LocalStore):
    """:class:`zarr.storage.LocalStore` whose large values are written and read with ``O_DIRECT``.

    For data that is written once and read soon after by the same process (a
    few times at most): see the module docstring for why. Values of
    :data:`DIRECT_MIN_BYTES` or more go past the page cache where the file
    system allows it; everything else, and every value on a file system that
    refuses ``O_DIRECT``, is written as :class:`~zarr.storage.LocalStore` does.
    """

    async def set(self, key: str, value: Buffer) -> None:
        """Store ``value`` under ``key`` (see the class docstring)."""
        if not self._is_open:
            await self._open()
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"DirectStore.set(): `value` must be a Buffer, not {type(value)}")
        data = memoryview(value.as_buffer_like()).cast("B")
        if data.nbytes >= DIRECT_MIN_BYTES:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            if await asyncio.to_thread(write_direct, path, data):
                return
        await super().set(key, value)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        """The value under ``key`` (whole values of :data:`DIRECT_MIN_BYTES` or more read with ``O_DIRECT``)."""
        if byte_range is None:
            if not self._is_open:
                await self._open()
            data = await asyncio.to_thread(read_direct, self.root / key)
            if data is not None:
                return (prototype or default_buffer_prototype()).buffer.from_array_like(data)
        return await super().get(key, prototype, byte_range)
