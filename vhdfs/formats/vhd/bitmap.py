"""VHD sector bitmaps are MSB-first: sector k is bit ``7 - k % 8`` of byte ``k // 8`` (FORMATS.md
§3.2), the opposite of VHDX. The run and bit operations themselves live in ``block/bits.py``."""

from __future__ import annotations

from ...block.bits import MSB_FIRST

all_set = MSB_FIRST.all_set
count_set = MSB_FIRST.count_set
runs = MSB_FIRST.runs
set_bits = MSB_FIRST.set_bits
