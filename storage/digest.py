"""SHA-256 of many files at once (multi-buffer hashing), for the cube build.

A camera set is hundreds of equal-sized FITS files, and the cube build hashes
every byte of them (DESIGN.md: the sha256 of each frame is part of its
provenance). One SHA-256 stream is a chain of dependent rounds; OpenSSL
(:mod:`hashlib`) runs it with the CPU's SHA instructions where it has them,
1.2-1.8 GB/s per core on the benchmark machines, limited by the latency of
each round instruction rather than by the core's throughput. Independent
streams can instead run side by side. Two kernels do so, both FIPS 180-4 word
for word (the digests are tested against :mod:`hashlib`):

* ``"sha-ni"``, where the CPU has the x86 SHA extensions: the same round
  instructions as OpenSSL, four streams interleaved so that each round's
  latency is hidden behind the other streams' rounds (3.9 GB/s per core on an
  AMD Zen 4, against OpenSSL's 1.8);
* ``"vector"``: :data:`LANES` files in lockstep, each lane of a 32-bit vector
  operation belonging to one file (2.2-2.3 GB/s per core on an Intel Xeon with
  AVX-512, 2.6 GHz, against OpenSSL's 1.2-1.7), for CPUs without the SHA
  extensions.

:func:`lane_speedups` measures each against :mod:`hashlib` once per process;
the build hashes a batch side by side with the fastest kernel, and only where
that is faster than one file after the other (:func:`lanes_pay`) in a set large
enough to win back the measurement (``storage.cube.LANE_MIN_BYTES``).

Only whole 64-byte blocks are hashed while a file is read
(:meth:`LaneSHA256.update`); :meth:`LaneSHA256.hexdigests` pads the last
bytes, which must have the same length in every stream: the streams are files
of one size.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, Literal

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

from sitiancal.compute.summary import fastest_each, measured_once

__all__ = ["LANES", "Kernel", "LaneSHA256", "batch_speedup", "lane_kernel", "lane_speedup",
           "lane_speedups", "lanes_pay", "sha_instructions"]

#: The side-by-side kernels (module docstring).
Kernel = Literal["sha-ni", "vector"]

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


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V4 = ir.VectorType(_I32, 4)


@functools.cache
def sha_instructions() -> bool:
    """Whether numba compiles for a CPU with the x86 SHA extensions (``sha256rnds2`` etc.).

    As numba chooses its target: ``NUMBA_CPU_FEATURES`` where set, else the
    host CPU's features (asked of LLVM once per process: ~0.15 ms a query).
    """
    features = config.CPU_FEATURES
    if features is None:
        return bool(llvm.get_host_cpu_features().get("sha", False))
    return "+sha" in str(features).split(",")


def _sha_ni_codegen(group: int) -> Callable[..., Any]:
    """The LLVM IR of the SHA-instruction compression of ``group`` interleaved streams.

    Emitted in place of a call ``f(state, data, nblocks, first)`` (see
    :func:`_compress_sha_ni`): streams ``first .. first + group - 1``, i.e.
    columns of ``state`` (``(8, n)`` uint32 chaining values a..h) and rows of
    ``data`` (uint8 bytes), ``nblocks`` 64-byte blocks each. Each step of the
    rounds is issued for every stream before the next step, so the streams'
    dependency chains overlap. The register layout is the SHA extensions':
    one vector holds (f, e, b, a), the other (h, g, d, c), low lane first.
    """

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        module = builder.module
        rounds2 = cgutils.get_or_insert_function(
            module, ir.FunctionType(_V4, [_V4, _V4, _V4]), "llvm.x86.sha256rnds2")
        msg1 = cgutils.get_or_insert_function(module, ir.FunctionType(_V4, [_V4, _V4]),
                                              "llvm.x86.sha256msg1")
        msg2 = cgutils.get_or_insert_function(module, ir.FunctionType(_V4, [_V4, _V4]),
                                              "llvm.x86.sha256msg2")
        bswap = cgutils.get_or_insert_function(module, ir.FunctionType(_V4, [_V4]),
                                               "llvm.bswap.v4i32")
        state = context.make_array(signature.args[0])(context, builder, args[0])
        data = context.make_array(signature.args[1])(context, builder, args[1])
        nblocks, first = args[2], args[3]
        st_strides = cgutils.unpack_tuple(builder, state.strides, 2)
        row_stride = cgutils.unpack_tuple(builder, data.strides, 2)[0]
        st_base = builder.bitcast(state.data, ir.IntType(8).as_pointer())
        data_base = builder.bitcast(data.data, ir.IntType(8).as_pointer())

        def const(v: int) -> ir.Constant:
            return ir.Constant(_I64, v)

        def word_ptr(r: int, s: int) -> ir.Value:
            column = builder.add(first, const(s))
            offset = builder.add(builder.mul(const(r), st_strides[0]), builder.mul(column, st_strides[1]))
            return builder.bitcast(builder.gep(st_base, [offset]), _I32.as_pointer())

        def vector(values: list[ir.Value]) -> ir.Value:
            v = ir.Constant(_V4, ir.Undefined)
            for i, x in enumerate(values):
                v = builder.insert_element(v, x, ir.Constant(_I32, i))
            return v

        def shuffle(a: ir.Value, b: ir.Value, mask: list[int]) -> ir.Value:
            return builder.shuffle_vector(a, b, ir.Constant(_V4, [ir.Constant(_I32, m) for m in mask]))

        slots, rows = [], []
        for s in range(group):
            a, b, c, d, e, f, g, h = (builder.load(word_ptr(r, s)) for r in range(8))
            fe_ba, hg_dc = cgutils.alloca_once(builder, _V4), cgutils.alloca_once(builder, _V4)
            builder.store(vector([f, e, b, a]), fe_ba)
            builder.store(vector([h, g, d, c]), hg_dc)
            slots.append((fe_ba, hg_dc))
            rows.append(builder.gep(data_base, [builder.mul(builder.add(first, const(s)), row_stride)]))
        k4 = [ir.Constant(_V4, [ir.Constant(_I32, int(x)) for x in _K[4 * r:4 * r + 4]])
              for r in range(16)]
        with cgutils.for_range(builder, nblocks) as loop:
            start = builder.mul(loop.index, const(64))
            s0 = [builder.load(p) for p, _ in slots]
            s1 = [builder.load(p) for _, p in slots]
            w = []
            for row in rows:
                loads = (builder.load(builder.bitcast(builder.gep(row, [builder.add(start, const(16 * i))]),
                                                      _V4.as_pointer()), align=1) for i in range(4))
                w.append([builder.call(bswap, [x]) for x in loads])
            for r in range(16):  # four rounds (two instructions) per step
                for s in range(group):
                    ws = w[s]
                    m = builder.add(ws[r % 4], k4[r])
                    s1[s] = builder.call(rounds2, [s1[s], s0[s], m])
                    s0[s] = builder.call(rounds2, [s0[s], s1[s], shuffle(m, m, [2, 3, 2, 3])])
                    if r < 12:  # the message schedule, words 4r+16 .. 4r+19
                        x = builder.call(msg1, [ws[r % 4], ws[(r + 1) % 4]])
                        x = builder.add(x, shuffle(ws[(r + 2) % 4], ws[(r + 3) % 4], [1, 2, 3, 4]))
                        ws[r % 4] = builder.call(msg2, [x, ws[(r + 3) % 4]])
            for s, (fe_ba, hg_dc) in enumerate(slots):
                builder.store(builder.add(s0[s], builder.load(fe_ba)), fe_ba)
                builder.store(builder.add(s1[s], builder.load(hg_dc)), hg_dc)
        for s, (fe_ba, hg_dc) in enumerate(slots):
            v0, v1 = builder.load(fe_ba), builder.load(hg_dc)
            words = [(v0, 3), (v0, 2), (v1, 3), (v1, 2), (v0, 1), (v0, 0), (v1, 1), (v1, 0)]
            for r, (v, lane) in enumerate(words):
                builder.store(builder.extract_element(v, ir.Constant(_I32, lane)), word_ptr(r, s))
        return context.get_dummy_value()

    return codegen


def _sha_ni_intrinsic(group: int) -> Any:
    """A numba intrinsic ``f(state, data, nblocks, first)`` (:func:`_sha_ni_codegen`)."""

    def typer(typingctx: Any, state: Any, data: Any, nblocks: Any, first: Any) -> Any:
        if not (isinstance(state, types.Array) and state.dtype == types.uint32 and state.ndim == 2
                and isinstance(data, types.Array) and data.dtype == types.uint8 and data.ndim == 2
                and nblocks == types.int64 and first == types.int64):
            return None
        return types.void(state, data, nblocks, first), _sha_ni_codegen(group)

    typer.__name__ = f"_sha_ni_{group}"
    return intrinsic(typer)


#: Streams interleaved by the SHA-instruction kernel: four, then two or one
#: for the rest (a C prototype with the same instructions ran 1, 2, 3, 4, 6
#: streams at 1.83, 3.51, 3.73, 3.75, 2.79 GB/s per core on the Zen 4: four
#: hide the round instruction's latency, more spill the registers).
_sha_ni_4, _sha_ni_2, _sha_ni_1 = (_sha_ni_intrinsic(g) for g in (4, 2, 1))


@numba.njit(nogil=True, cache=True)
def _compress_sha_ni(state: np.ndarray, data: np.ndarray, nblocks: int,
                     streams: int) -> None:  # pragma: no cover - numba
    """SHA-256 compression of ``nblocks`` 64-byte blocks of each of the first ``streams`` streams.

    ``state``: ``(8, >= streams)`` uint32 chaining values, updated in place;
    ``data``: ``(>= streams, >= 64 * nblocks)`` uint8, row ``i`` stream ``i``'s
    bytes. Streams go four at a time through the SHA instructions. Call only
    where :func:`sha_instructions` (else LLVM cannot compile it).
    """
    s = 0
    while s + 4 <= streams:
        _sha_ni_4(state, data, np.int64(nblocks), np.int64(s))
        s += 4
    if s + 2 <= streams:
        _sha_ni_2(state, data, np.int64(nblocks), np.int64(s))
        s += 2
    if s < streams:
        _sha_ni_1(state, data, np.int64(nblocks), np.int64(s))


class LaneSHA256:
    """SHA-256 of up to :data:`LANES` byte streams of equal length, hashed side by side.

    Feed each stream's bytes with :meth:`update` (whole 64-byte blocks, the
    same count in every stream) and end with :meth:`hexdigests`.

    Parameters
    ----------
    streams
        The streams of interest, rows ``0 .. streams - 1`` of the data. The
        ``"vector"`` kernel hashes all :data:`LANES` rows whatever their count
        (the digests of the others are not returned); ``"sha-ni"`` only these.
    kernel
        ``"sha-ni"`` or ``"vector"`` (module docstring); default: the faster
        here (:func:`lane_kernel`, measured once per process).
    """

    def __init__(self, streams: int = LANES, kernel: Kernel | None = None) -> None:
        if not 1 <= streams <= LANES:
            raise ValueError(f"streams must be 1 .. {LANES}, not {streams}")
        kernel = lane_kernel() if kernel is None else kernel
        if kernel not in ("sha-ni", "vector"):
            raise ValueError(f"kernel must be 'sha-ni' or 'vector', not {kernel!r}")
        if kernel == "sha-ni" and not sha_instructions():
            raise ValueError("the 'sha-ni' kernel needs a CPU with the SHA extensions")
        self.streams = streams
        self.kernel: Kernel = kernel
        self._state = np.repeat(_H0[:, None], LANES, axis=1)
        self._length = 0

    @property
    def length(self) -> int:
        """Bytes hashed so far in each stream."""
        return self._length

    def _compress(self, data: np.ndarray, nblocks: int) -> None:
        if self.kernel == "sha-ni":
            _compress_sha_ni(self._state, data, nblocks, self.streams)
        else:
            _compress_lanes(self._state, data.view(np.uint32), nblocks, _K)

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
            self._compress(data, nbytes // 64)
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
            The hexadecimal SHA-256 digest of each of the :attr:`streams` streams.
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
        self._compress(block, padded // 64)
        self._length = total
        digests = self._state.T.astype(">u4")
        return [digests[i].tobytes().hex() for i in range(self.streams)]


#: The measured speed-ups (one entry once measured; :func:`lane_speedups`).
_SPEEDUPS: list[dict[str, float]] = []


def lane_speedups() -> dict[str, float]:
    """Throughput of each side-by-side kernel over :mod:`hashlib`'s, on this CPU.

    Measured once per process and remembered (:func:`~sitiancal.compute.summary.measured_once`),
    ~0.3 s: the fastest of three passes over :data:`LANES` x 2 MiB (the cube
    build's pieces; out of the caches as there: on the Xeon, 256 kB per lane
    in the L2 cache favour OpenSSL, 1.13-1.21x against 1.28-1.35x at
    2-4 MiB). The kernels' passes are interleaved with :mod:`hashlib`'s
    (:func:`~sitiancal.compute.summary.fastest_each`): on a VM whose speed
    varied up to 1.9x within a minute, timed one after the other they once
    read 1.09x (under a profiler), below the 1.1 that :func:`lanes_pay`
    needs, where they read 1.2-1.3x otherwise.
    ``"sha-ni"`` is measured only where :func:`sha_instructions`.

    Returns
    -------
    dict
        ``{kernel: speed-up}``, > 1 where the kernel is the faster.
    """
    return measured_once(_SPEEDUPS, _measure_speedups)


def lane_kernel() -> Kernel:
    """The faster side-by-side kernel on this CPU (:func:`lane_speedups`)."""
    speedups = lane_speedups()
    return "sha-ni" if speedups.get("sha-ni", 0.0) > speedups["vector"] else "vector"


def lane_speedup() -> float:
    """The speed-up of :func:`lane_kernel` over :mod:`hashlib` (all :data:`LANES` streams used)."""
    return lane_speedups()[lane_kernel()]


def _measure_speedups() -> dict[str, float]:
    """Time the kernels and hashlib on the same bytes (:func:`lane_speedups`)."""
    n = 2 << 20
    data = np.empty((LANES, n), np.uint8)
    data[:] = (np.arange(n, dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8)
    data ^= np.arange(LANES, dtype=np.uint8)[:, None]

    def one_by_one() -> None:
        for row in data:
            hashlib.sha256(row).digest()

    kernels: list[Kernel] = ["sha-ni", "vector"] if sha_instructions() else ["vector"]
    for kernel in kernels:
        LaneSHA256(kernel=kernel).update(data[:, :64].copy(), 64)  # compiled (or loaded) first
    reference, *times = fastest_each(
        one_by_one, *(lambda kernel=kernel: LaneSHA256(kernel=kernel).update(data, n)
                      for kernel in kernels))
    return {kernel: float(reference / t) for kernel, t in zip(kernels, times, strict=True)}


def batch_speedup(kernel: Kernel, speedup: float, n_streams: int) -> float:
    """The speed-up over :mod:`hashlib` of hashing ``n_streams`` side by side.

    ``speedup``: the kernel's with all :data:`LANES` streams used
    (:func:`lane_speedups`). Unused lanes of the ``"vector"`` kernel cost as
    much as used ones, so it runs at ``n / LANES`` of its throughput; the
    ``"sha-ni"`` kernel hashes only the streams given, a last odd one at
    hashlib's speed (the same instructions, nothing to interleave with).
    """
    n = min(n_streams, LANES)
    if kernel == "vector":
        return speedup * n / LANES
    return n / ((n - n % 2) / speedup + n % 2)


def lanes_pay(n_streams: int) -> bool:
    """Whether hashing ``n_streams`` equal-sized streams side by side beats :mod:`hashlib`.

    With the faster kernel here (:func:`batch_speedup`); 10 % is kept as a
    margin. Without the SHA extensions, fewer than half the lanes would need
    a speed-up above 2.2x from the ``"vector"`` kernel (at most 2.0x
    measured): nothing is measured for them (a small job pays no timing).
    """
    if n_streams < 2 or (2 * n_streams < LANES and not sha_instructions()):
        return False
    kernel = lane_kernel()
    return batch_speedup(kernel, lane_speedups()[kernel], n_streams) > 1.1
