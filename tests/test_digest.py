"""Side-by-side SHA-256 (``storage.digest``) against hashlib.

- every lane's digest equals ``hashlib.sha256`` of its stream, for lengths
  around the padding boundaries (55/56/63/64 bytes), several blocks, and
  streams fed in several updates;
- misuse (wrong shapes, partial blocks) is refused;
- the lanes are chosen only where they pay, from the measured speed-up.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sitiancal.storage import digest
from sitiancal.storage.digest import LANES, LaneSHA256, lane_speedup, lanes_pay


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` in a C-contiguous (LANES, 4k) buffer (the rows padded to whole words)."""
    out = np.zeros((LANES, -(-a.shape[1] // 4) * 4 or 4), np.uint8)
    out[:, :a.shape[1]] = a
    return out


@pytest.mark.parametrize("length", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 70001])
def test_each_lane_is_the_sha256_of_its_stream(length: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, (LANES, length), dtype=np.uint8)
    whole = length - length % 64
    split = (whole // 128) * 64  # two updates (the first may be empty)
    h = LaneSHA256()
    h.update(_rows(data[:, :split]), split)
    h.update(_rows(data[:, split:]), whole - split)
    assert h.length == whole
    got = h.hexdigests(data[:, whole:])
    assert got == [hashlib.sha256(row.tobytes()).hexdigest() for row in data]
    assert h.length == length


def test_known_answers() -> None:
    """FIPS 180-4 examples: "abc" and the empty message."""
    tails = np.zeros((LANES, 3), np.uint8)
    tails[0] = np.frombuffer(b"abc", np.uint8)
    got = LaneSHA256().hexdigests(tails)
    assert got[0] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert LaneSHA256().hexdigests(np.zeros((LANES, 0), np.uint8))[0] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_misuse_is_refused() -> None:
    h = LaneSHA256()
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


def test_lanes_are_used_only_where_they_pay(monkeypatch) -> None:
    assert lane_speedup() > 0  # measured once, then remembered
    assert lane_speedup() == digest._SPEEDUP[0]
    monkeypatch.setattr(digest, "_SPEEDUP", [2.0])
    assert lanes_pay(LANES) and lanes_pay(LANES // 2 + 2) and not lanes_pay(LANES // 2)
    assert not lanes_pay(1)
    monkeypatch.setattr(digest, "_SPEEDUP", [0.9])  # OpenSSL's SHA instructions win
    assert not lanes_pay(LANES)
