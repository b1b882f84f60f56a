"""VHDX sector bitmaps: runs of set/clear bits, LSB-first, without a per-sector Python loop.

Bit order is the opposite of VHD's (§2.5.2): sector k of a chunk is bit ``k % 8`` of byte
``k // 8``, least significant first. So a byte slice read as a *little-endian* int already has
sector k at bit k; no byte reversal is needed (VHD's ``bitmap.py`` translates each byte first).
Run lengths are trailing-zero counts of shifted ints, computed in C; work is O(runs), with a
fast path when a range is all set or all clear. Runs may start and end anywhere inside a byte
(dissect drops such runs; ``tests/test_vhdx_image.py`` pins them).
"""

from __future__ import annotations

from collections.abc import Iterator


def _tz(x: int) -> int:
    """Trailing zero bits of a non-zero int (works for negative ints too)."""
    return (x & -x).bit_length() - 1


def bits_as_int(bitmap: bytes | bytearray | memoryview, s0: int, s1: int) -> int:
    """Bits of sectors [s0, s1) as an int whose bit 0 is sector s0."""
    b0, b1 = s0 >> 3, (s1 + 7) >> 3
    v = int.from_bytes(bitmap[b0:b1], "little")
    return (v >> (s0 - (b0 << 3))) & ((1 << (s1 - s0)) - 1)


def runs_of(v: int, n: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_set) for maximal runs of equal bits among the low ``n`` bits of ``v``."""
    if n <= 0:
        return
    full = (1 << n) - 1
    if v == full:
        yield 0, n, True
        return
    if v == 0:
        yield 0, n, False
        return
    p = 0
    while p < n:
        w = v >> p
        if w & 1:
            length = _tz(~w)
        elif w == 0:
            length = n - p
        else:
            length = _tz(w)
        length = min(length, n - p)
        yield p, p + length, bool(w & 1)
        p += length


def runs(bitmap: bytes | bytearray | memoryview, s0: int, s1: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_set) for maximal runs of equal bits over sectors [s0, s1)."""
    for a, b, is_set in runs_of(bits_as_int(bitmap, s0, s1), s1 - s0):
        yield s0 + a, s0 + b, is_set


def set_bits(bitmap: bytearray, s0: int, s1: int) -> tuple[int, int]:
    """Set sectors [s0, s1) in place; return the byte range [b0, b1) that changed."""
    if s1 <= s0:
        return 0, 0
    b0, b1 = s0 >> 3, (s1 + 7) >> 3
    current = int.from_bytes(bitmap[b0:b1], "little")
    mask = ((1 << (s1 - s0)) - 1) << (s0 - (b0 << 3))
    bitmap[b0:b1] = (current | mask).to_bytes(b1 - b0, "little")
    return b0, b1


def count_set(bitmap: bytes | bytearray | memoryview, s0: int, s1: int) -> int:
    return bits_as_int(bitmap, s0, s1).bit_count() if s1 > s0 else 0
