"""Sector bitmaps of VHD blocks: runs of set/clear bits without a per-sector Python loop.

Bits are MSB-first (sector k is bit 7 - k%8 of byte k//8). We reverse the bits of each byte
with one ``bytes.translate`` and read the slice as a little-endian int, so sector k becomes bit
k; a run length is then the count of trailing zeros of a shifted int, found in C. Work is
O(runs), with a fast path when a range is all set or all clear.
"""

from __future__ import annotations

from collections.abc import Iterator

_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _tz(x: int) -> int:
    """Trailing zero bits of a non-zero int (works for negative ints too)."""
    return (x & -x).bit_length() - 1


def bits_as_int(bitmap: bytes | bytearray, s0: int, s1: int) -> int:
    """Bits of sectors [s0, s1) as an int whose bit 0 is sector s0."""
    b0, b1 = s0 >> 3, (s1 + 7) >> 3
    v = int.from_bytes(bytes(bitmap[b0:b1]).translate(_REVERSE), "little")
    return (v >> (s0 - (b0 << 3))) & ((1 << (s1 - s0)) - 1)


def runs(bitmap: bytes | bytearray, s0: int, s1: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_set) for maximal runs of equal bits over sectors [s0, s1)."""
    n = s1 - s0
    if n <= 0:
        return
    v = bits_as_int(bitmap, s0, s1)
    full = (1 << n) - 1
    if v == full:
        yield s0, s1, True
        return
    if v == 0:
        yield s0, s1, False
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
        yield s0 + p, s0 + p + length, bool(w & 1)
        p += length


def all_set(bitmap: bytes | bytearray, s0: int, s1: int) -> bool:
    return s1 <= s0 or bits_as_int(bitmap, s0, s1) == (1 << (s1 - s0)) - 1


def set_bits(bitmap: bytearray, s0: int, s1: int) -> tuple[int, int]:
    """Set sectors [s0, s1) in place; return the byte range [b0, b1) that changed."""
    if s1 <= s0:
        return 0, 0
    b0, b1 = s0 >> 3, (s1 + 7) >> 3
    current = int.from_bytes(bytes(bitmap[b0:b1]).translate(_REVERSE), "little")
    mask = ((1 << (s1 - s0)) - 1) << (s0 - (b0 << 3))
    updated = (current | mask).to_bytes(b1 - b0, "little").translate(_REVERSE)
    bitmap[b0:b1] = updated
    return b0, b1


def count_set(bitmap: bytes | bytearray, s0: int, s1: int) -> int:
    return bits_as_int(bitmap, s0, s1).bit_count() if s1 > s0 else 0
