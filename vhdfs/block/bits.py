"""Sector bitmaps: runs of set and clear bits without a per-sector Python loop, in either order.

VHD numbers a block's sectors MSB-first (sector k is bit ``7 - k % 8`` of byte ``k // 8``), VHDX
LSB-first (bit ``k % 8``). Either way a byte slice becomes an int whose bit k is sector k (VHD's
bytes are bit-reversed first with one ``bytes.translate``); a run length is then the count of
trailing zeros of a shifted int, found in C. Work is O(runs), with a fast path when a range is
all set or all clear, and runs may start and end anywhere inside a byte.
"""

from __future__ import annotations

from collections.abc import Iterator

_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))

Bitmap = bytes | bytearray | memoryview


def _tz(x: int) -> int:
    """Trailing zero bits of a non-zero int (works for negative ints too)."""
    return (x & -x).bit_length() - 1


def runs_of(v: int, n: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_set) for maximal runs of equal bits among the low ``n`` bits of ``v``."""
    if n <= 0:
        return
    if v == (1 << n) - 1:
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


class BitOrder:
    """The bitmap operations for one bit order (``MSB_FIRST`` for VHD, ``LSB_FIRST`` for VHDX)."""

    def __init__(self, msb_first: bool) -> None:
        self._table = _REVERSE if msb_first else None

    def _load(self, raw: Bitmap) -> int:
        data = bytes(raw)
        return int.from_bytes(data.translate(self._table) if self._table else data, "little")

    def bits_as_int(self, bitmap: Bitmap, s0: int, s1: int) -> int:
        """Bits of sectors [s0, s1) as an int whose bit 0 is sector s0."""
        b0, b1 = s0 >> 3, (s1 + 7) >> 3
        return (self._load(bitmap[b0:b1]) >> (s0 - (b0 << 3))) & ((1 << (s1 - s0)) - 1)

    def runs(self, bitmap: Bitmap, s0: int, s1: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, is_set) for maximal runs of equal bits over sectors [s0, s1)."""
        for a, b, is_set in runs_of(self.bits_as_int(bitmap, s0, s1) if s1 > s0 else 0, s1 - s0):
            yield s0 + a, s0 + b, is_set

    def all_set(self, bitmap: Bitmap, s0: int, s1: int) -> bool:
        return s1 <= s0 or self.bits_as_int(bitmap, s0, s1) == (1 << (s1 - s0)) - 1

    def count_set(self, bitmap: Bitmap, s0: int, s1: int) -> int:
        return self.bits_as_int(bitmap, s0, s1).bit_count() if s1 > s0 else 0

    def set_bits(self, bitmap: bytearray, s0: int, s1: int) -> tuple[int, int]:
        """Set sectors [s0, s1) in place; return the byte range [b0, b1) that changed."""
        if s1 <= s0:
            return 0, 0
        b0, b1 = s0 >> 3, (s1 + 7) >> 3
        mask = ((1 << (s1 - s0)) - 1) << (s0 - (b0 << 3))
        out = (self._load(bitmap[b0:b1]) | mask).to_bytes(b1 - b0, "little")
        bitmap[b0:b1] = out.translate(self._table) if self._table else out
        return b0, b1


MSB_FIRST = BitOrder(msb_first=True)
LSB_FIRST = BitOrder(msb_first=False)
