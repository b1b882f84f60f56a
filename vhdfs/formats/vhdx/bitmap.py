"""VHDX sector bitmaps are LSB-first (§2.5.2): sector k of a chunk is bit ``k % 8`` of byte
``k // 8``, the opposite of VHD. The run and bit operations themselves live in ``block/bits.py``;
runs may start and end anywhere inside a byte (dissect drops such runs; tests pin them)."""

from __future__ import annotations

from ...block.bits import LSB_FIRST, runs_of

bits_as_int = LSB_FIRST.bits_as_int
count_set = LSB_FIRST.count_set
runs = LSB_FIRST.runs
set_bits = LSB_FIRST.set_bits

__all__ = ["bits_as_int", "count_set", "runs", "runs_of", "set_bits"]
