"""Side-by-side SHA-256 (``storage.digest``) against hashlib.

- with each kernel (the SHA-instruction one where the CPU has them), every
  stream's digest equals ``hashlib.sha256`` of its bytes, for lengths around
  the padding boundaries (55/56/63/64 bytes), several blocks, streams fed in
  several updates, and any number of streams (groups of four, two and one);
- misuse (wrong shapes, partial blocks, unknown kernels) is refused;
- the faster kernel is chosen, and used only where it pays, from the
  measured speed-ups.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sitiancal.storage import digest
from sitiancal.storage.digest import (
    LANES,
    LaneSHA256,
    batch_speedup,
    lane_kernel,
    lane_speedup,
    lane_speedups,
    lanes_pay,
    sha_instructions,
)

KERNELS = [pytest.param("vector"),
           pytest.param("sha-ni", marks=pytest.mark.skipif(
               not sha_instructions(), reason="this CPU has no SHA extensions (x86 SHA-NI)"))]


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` in a C-contiguous (LANES, 4k) buffer (the rows padded to whole words)."""
    out = np.zeros((LANES, -(-a.shape[1] // 4) * 4 or 4), np.uint8)
    out[:, :a.shape[1]] = a
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("length", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 70001])
def test_each_lane_is_the_sha256_of_its_stream(length: int, kernel: str) -> None:
    data = np.random.default_rng(length).integers(0, 256, (LANES, length), dtype=np.uint8)
    whole = length - length % 64
    split = (whole // 128) * 64  # two updates (the first may be empty)
    h = LaneSHA256(kernel=kernel)
    h.update(_rows(data[:, :split]), split)
    h.update(_rows(data[:, split:]), whole - split)
    assert h.length == whole
    got = h.hexdigests(data[:, whole:])
    assert got == [hashlib.sha256(row.tobytes()).hexdigest() for row in data]
    assert h.length == length


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("streams", [1, 2, 3, 4, 5, 7, 30])
def test_only_the_streams_asked_for_are_returned(streams: int, kernel: str) -> None:
    """Any count: the SHA-instruction kernel hashes them in fours, then a pair or one."""
    data = np.random.default_rng(streams).integers(0, 256, (LANES, 200), dtype=np.uint8)
    data[streams:] = 0  # rows beyond the streams: not hashed (sha-ni) or ignored (vector)
    h = LaneSHA256(streams, kernel=kernel)
    h.update(data, 192)
    got = h.hexdigests(data[:, 192:])
    assert got == [hashlib.sha256(row.tobytes()).hexdigest() for row in data[:streams]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_known_answers(kernel: str) -> None:
    """FIPS 180-4 examples: "abc" and the empty message."""
    tails = np.zeros((LANES, 3), np.uint8)
    tails[0] = np.frombuffer(b"abc", np.uint8)
    got = LaneSHA256(kernel=kernel).hexdigests(tails)
    assert got[0] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert LaneSHA256(1, kernel=kernel).hexdigests(np.zeros((LANES, 0), np.uint8)) == [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]


def test_misuse_is_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match="streams must be"):
        LaneSHA256(0, kernel="vector")
    with pytest.raises(ValueError, match="streams must be"):
        LaneSHA256(LANES + 1, kernel="vector")
    with pytest.raises(ValueError, match="kernel must be"):
        LaneSHA256(kernel="md5")  # type: ignore[arg-type]
    monkeypatch.setattr(digest, "sha_instructions", lambda: False)
    with pytest.raises(ValueError, match="SHA extensions"):
        LaneSHA256(kernel="sha-ni")
    h = LaneSHA256(kernel="vector")
    with pytest.raises(ValueError, match="C-contiguous"):
        h.update(np.zeros((LANES - 1, 64), np.uint8), 64)
    with pytest.raises(ValueError, match="C-contiguous"):
        h.update(np.zeros((LANES, 128), np.uint8)[:, ::2], 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        h.update(np.zeros((LANES, 128), np.uint8), 100)
    with pytest.raises(ValueError, match="multiple of 64"):
        h.update(np.zeros((LANES, 64), np.uint8), 128)
    with pytest.raises(ValueError, match="m < 64"):
        h.hexdigests(np.zeros((LANES, 64), np.uint8))


def test_the_faster_kernel_is_measured_and_chosen(monkeypatch) -> None:
    speedups = lane_speedups()  # measured once, then remembered
    assert speedups is digest._SPEEDUPS[0] and speedups is lane_speedups()
    assert set(speedups) == ({"sha-ni", "vector"} if sha_instructions() else {"vector"})
    assert all(v > 0 for v in speedups.values())
    assert lane_speedup() == max(speedups.values())
    assert LaneSHA256().kernel == lane_kernel() == max(speedups, key=speedups.get)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 2.0}])
    assert lane_kernel() == "vector"
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 1.0, "sha-ni": 2.0}])
    assert lane_kernel() == "sha-ni"


def test_candidates_are_timed_interleaved(monkeypatch) -> None:
    """``fastest_each`` times each candidate's runs between the others': a machine
    that slows down midway (here 2x after the third call) slows every candidate
    alike, where timing one after the other would make the later one look slower."""
    import sitiancal.compute.summary as summary

    clock = {"now": 0.0, "calls": 0}

    def work(seconds: float):
        def run() -> None:
            clock["calls"] += 1
            clock["now"] += seconds * (2.0 if clock["calls"] > 3 else 1.0)
        return run

    monkeypatch.setattr(summary.time, "perf_counter", lambda: clock["now"])
    order: list[str] = []
    a, b = work(1.0), work(1.0)
    best = summary.fastest_each(lambda: order.append("a") or a(), lambda: order.append("b") or b())
    assert order == ["a", "b"] * 3
    assert best == (1.0, 1.0)        # equal work measured equal
    clock.update(now=0.0, calls=0)   # one after the other, as before: b read 2x slower
    sequential = [summary.fastest_each(work(1.0))[0] for _ in range(2)]
    assert sequential == [1.0, 2.0]
    assert summary.fastest_each(work(0.5), rounds=2) == (1.0,)  # both runs after the slowdown


def test_batches_are_hashed_side_by_side_only_where_they_pay(monkeypatch) -> None:
    # the vector kernel hashes all lanes whatever the batch: it pays only for full ones
    assert batch_speedup("vector", 2.0, LANES) == 2.0
    assert batch_speedup("vector", 2.0, LANES // 2) == 1.0
    # the SHA-instruction kernel hashes the batch only; a last odd stream alone
    assert batch_speedup("sha-ni", 2.0, 2) == 2.0
    assert batch_speedup("sha-ni", 2.0, 3) == pytest.approx(3 / 2)
    assert batch_speedup("sha-ni", 2.0, 1) == 1.0
    monkeypatch.setattr(digest, "sha_instructions", lambda: False)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 2.0}])
    assert lanes_pay(LANES) and lanes_pay(LANES // 2 + 2) and not lanes_pay(LANES // 2)
    assert not lanes_pay(1)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 0.9}])  # OpenSSL's SHA instructions win
    assert not lanes_pay(LANES)
    monkeypatch.setattr(digest, "sha_instructions", lambda: True)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 0.9, "sha-ni": 2.1}])
    assert lanes_pay(2) and lanes_pay(3) and lanes_pay(LANES) and not lanes_pay(1)
    monkeypatch.setattr(digest, "_SPEEDUPS", [{"vector": 0.9, "sha-ni": 1.05}])
    assert not lanes_pay(LANES)


def test_small_batches_are_refused_without_measuring(monkeypatch) -> None:
    """Without the SHA extensions, small jobs (tests, a demo) pay no timing."""
    monkeypatch.setattr(digest, "sha_instructions", lambda: False)
    monkeypatch.setattr(digest, "_SPEEDUPS", [])
    monkeypatch.setattr(digest, "_measure_speedups", lambda: pytest.fail("measured"))
    assert not lanes_pay(LANES // 2 - 1) and not lanes_pay(2)
