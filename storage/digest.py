"""SHA-256 of many files at once (multi-buffer hashing), for the cube build.

A camera set is hundreds of equal-sized FITS files, and the cube build hashes
every byte of them (DESIGN.md: the sha256 of each frame is part of its
provenance). One SHA-256 stream is a chain of dependent rounds; OpenSSL
(:mod:`hashlib`) runs it with the CPU's SHA instructions where it has them,
1.2-1.8 GB/s per core on the benchmark machines. Independent streams can
instead run side by side in the lanes of the vector registers: here
:data:`LANES` files are hashed in lockstep, each lane of a 32-bit vector
operation belonging to one file (FIPS 180-4 word for word; the digests are
tested against :mod:`hashlib`). On an Intel Xeon (AVX-512, 2.6 GHz) that
runs at 2.2-2.3 GB/s per core against OpenSSL's 1.2-1.7 GB/s; on an AMD Zen 4
(AVX-512 on 256-bit units, faster SHA instructions) OpenSSL is the faster.
:func:`lane_speedup` measures both once per process, and the build uses the
lanes only where they are faster (:func:`lanes_pay`).

Only whole 64-byte blocks go through the lanes while a file is read
(:meth:`LaneSHA256.update`); :meth:`LaneSHA256.hexdigests` pads the last
bytes, which must have the same length in every lane: the lanes hash files of
one size.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

from sitiancal.compute.summary import best_of_three, measured_once

__all__ = ["LANES", "LaneSHA256", "lane_speedup", "lanes_pay"]

#: Files hashed side by side (32 x 32-bit = two AVX-512 registers per value;
#: 16 lanes ran at 2.05 GB/s, 32 at 2.29, 64 at 1.96 on the Xeon).
LANES = 32

_K = np.array([
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
], dtype=np.uint32)
_H0 = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19], dtype=np.uint32)

_u32 = np.uint32


@numba.njit(inline="always")
def _rotr(x, n):  # pragma: no cover - numba
    # numba widens 32-bit integer arithmetic to 64 bits; the casts keep the
    # words 32-bit so that LLVM emits 32-bit vector rotations
    return _u32((x >> n) | (x << (32 - n)))


@numba.njit(inline="always")
def _round(a, b, c, d, e, f, g, h, w, t, k):  # pragma: no cover - numba
    """One SHA-256 round in every lane; the caller rotates the roles of a..h."""
    for lane in range(LANES):
        ee = e[lane]
        aa = a[lane]
        s1 = _u32(_rotr(ee, 6) ^ _rotr(ee, 11) ^ _rotr(ee, 25))
        ch = _u32((ee & f[lane]) ^ (_u32(~ee) & g[lane]))
        t1 = _u32(h[lane] + s1 + ch + k + w[t, lane])
        s0 = _u32(_rotr(aa, 2) ^ _rotr(aa, 13) ^ _rotr(aa, 22))
        bb = b[lane]
        cc = c[lane]
        maj = _u32((aa & bb) ^ (aa & cc) ^ (bb & cc))
        d[lane] = _u32(d[lane] + t1)
        h[lane] = _u32(t1 + s0 + maj)


@numba.njit(nogil=True, cache=True)
def _compress_lanes(state: np.ndarray, data: np.ndarray, nblocks: int,
                    k: np.ndarray) -> None:  # pragma: no cover - numba
    """Run the SHA-256 compression of ``nblocks`` 64-byte blocks in every lane.

    ``state``: ``(8, LANES)`` uint32 chaining values, updated in place;
    ``data``: ``(LANES, >= 16 * nblocks)`` uint32 view of each lane's bytes
    (native order: each word is byte-swapped to FIPS 180-4's big-endian words).
    The loops over the lanes are the innermost, so each step is one vector
    operation over the lanes (the working variables stay in L1).
    """
    w = np.empty((64, LANES), np.uint32)
    v = np.empty((8, LANES), np.uint32)
    a, b, c, d, e, f, g, h = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    for blk in range(nblocks):
        base = blk * 16
        for t in range(16):
            for lane in range(LANES):
                x = data[lane, base + t]
                w[t, lane] = _u32((x >> 24) | ((x >> 8) & 0xFF00) | ((x << 8) & 0xFF0000) | (x << 24))
        for t in range(16, 64):
            for lane in range(LANES):
                x = w[t - 15, lane]
                y = w[t - 2, lane]
                s0 = _u32(_rotr(x, 7) ^ _rotr(x, 18) ^ (x >> 3))
                s1 = _u32(_rotr(y, 17) ^ _rotr(y, 19) ^ (y >> 10))
                w[t, lane] = _u32(w[t - 16, lane] + s0 + w[t - 7, lane] + s1)
        for r in range(8):
            for lane in range(LANES):
                v[r, lane] = state[r, lane]
        for t in range(0, 64, 8):
            _round(a, b, c, d, e, f, g, h, w, t, k[t])
            _round(h, a, b, c, d, e, f, g, w, t + 1, k[t + 1])
            _round(g, h, a, b, c, d, e, f, w, t + 2, k[t + 2])
            _round(f, g, h, a, b, c, d, e, w, t + 3, k[t + 3])
            _round(e, f, g, h, a, b, c, d, w, t + 4, k[t + 4])
            _round(d, e, f, g, h, a, b, c, w, t + 5, k[t + 5])
            _round(c, d, e, f, g, h, a, b, w, t + 6, k[t + 6])
            _round(b, c, d, e, f, g, h, a, w, t + 7, k[t + 7])
        for r in range(8):
            for lane in range(LANES):
                state[r, lane] = _u32(state[r, lane] + v[r, lane])


class LaneSHA256:
    """SHA-256 of up to :data:`LANES` byte streams of equal length, hashed side by side.

    Feed each stream's bytes with :meth:`update` (whole 64-byte blocks, the
    same count in every lane) and end with :meth:`hexdigests`. Lanes beyond
    the streams of interest are hashed too (their digests are ignored).
    """

    def __init__(self) -> None:
        self._state = np.repeat(_H0[:, None], LANES, axis=1)
        self._length = 0

    @property
    def length(self) -> int:
        """Bytes hashed so far in each lane."""
        return self._length

    def update(self, data: np.ndarray, nbytes: int) -> None:
        """Hash the first ``nbytes`` of each row of ``data``.

        Parameters
        ----------
        data
            ``(LANES, n)`` C-contiguous uint8 array, ``n`` a multiple of 4;
            row ``i`` holds stream ``i``'s next bytes.
        nbytes
            A multiple of 64, at most ``n``.
        """
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[0] != LANES \
                or not data.flags.c_contiguous or data.shape[1] % 4:
            raise ValueError(f"data must be a C-contiguous ({LANES}, 4k) uint8 array")
        if nbytes % 64 or not 0 <= nbytes <= data.shape[1]:
            raise ValueError(f"nbytes must be a multiple of 64 within the rows, not {nbytes}")
        if nbytes:
            _compress_lanes(self._state, data.view(np.uint32), nbytes // 64, _K)
            self._length += nbytes

    def hexdigests(self, tails: np.ndarray) -> list[str]:
        """Hash the last bytes of each stream (fewer than 64, padded) and return the digests.

        Parameters
        ----------
        tails
            ``(LANES, m)`` uint8, ``m < 64``: each stream's bytes after the
            last :meth:`update`.

        Returns
        -------
        list of str
            The hexadecimal SHA-256 digest of each lane's whole stream.
        """
        m = int(tails.shape[1])
        if tails.shape[0] != LANES or m >= 64:
            raise ValueError(f"tails must be ({LANES}, m) with m < 64")
        total = self._length + m
        padded = 64 if m < 56 else 128
        block = np.zeros((LANES, padded), np.uint8)
        block[:, :m] = tails
        block[:, m] = 0x80
        block[:, padded - 8:] = np.frombuffer((8 * total).to_bytes(8, "big"), np.uint8)
        _compress_lanes(self._state, block.view(np.uint32), padded // 64, _K)
        self._length = total
        digests = self._state.T.astype(">u4")
        return [digests[i].tobytes().hex() for i in range(LANES)]


#: The measured speed-up (one entry once measured; :func:`lane_speedup`).
_SPEEDUP: list[float] = []


def lane_speedup() -> float:
    """Throughput of :class:`LaneSHA256` (all lanes used) over :mod:`hashlib`'s, on this CPU.

    Measured once per process and remembered (:func:`~sitiancal.compute.summary.measured_once`):
    the fastest of three passes over :data:`LANES` x 2 MiB (the cube build's
    pieces; out of the caches as there: on the Xeon, 256 kB per lane in the L2
    cache favour OpenSSL, 1.13-1.21x against 1.28-1.35x at 2-4 MiB), ~0.3 s.
    """
    return measured_once(_SPEEDUP, _measure_speedup)


def _measure_speedup() -> float:
    """Time the lanes and hashlib on the same bytes (:func:`lane_speedup`)."""
    n = 2 << 20
    data = np.empty((LANES, n), np.uint8)
    data[:] = (np.arange(n, dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8)
    data ^= np.arange(LANES, dtype=np.uint8)[:, None]
    LaneSHA256().update(data[:, :64].copy(), 64)  # compiled (or loaded) first

    def one_by_one() -> None:
        for row in data:
            hashlib.sha256(row).digest()

    return float(best_of_three(one_by_one) / best_of_three(lambda: LaneSHA256().update(data, n)))


def lanes_pay(n_streams: int) -> bool:
    """Whether hashing ``n_streams`` equal-sized streams side by side beats :mod:`hashlib`.

    Unused lanes cost as much as used ones, so a batch of ``n`` streams runs
    at ``n / LANES`` of the lanes' throughput; 10 % is kept as a margin.
    Fewer than half the lanes would need a speed-up above 2.2x (at most 2.0x
    measured): nothing is measured for them (a small job pays no timing).
    """
    if 2 * n_streams < LANES:
        return False
    return lane_speedup() * min(n_streams, LANES) / LANES > 1.1
