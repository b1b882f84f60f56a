"""What identifies a VHD at a glance, and the registry's first look for one.

Kept apart from ``spec`` (which these constants belong to, and re-exports) so that probing a
file of another format never imports VHD's structures.
"""

from __future__ import annotations

from ...block.driver import CERTAIN, NO, ProbeData

SECTOR = 512
FOOTER_SIZE = 512
FOOTER_COOKIE = b"conectix"
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
_HEAD_COPY_TYPES = (DISK_DYNAMIC.to_bytes(4, "big"), DISK_DIFFERENCING.to_bytes(4, "big"))  # a copy at 0


def probe(data: ProbeData) -> int:
    """CERTAIN for a footer at the end (512 or 511 bytes) or a dynamic disk's head copy."""
    head, tail, file_size = data.head, data.tail, data.size
    if file_size >= FOOTER_SIZE and tail[-FOOTER_SIZE:][:8] == FOOTER_COOKIE:
        return CERTAIN
    if file_size % SECTOR == 511 and len(tail) >= 511 and tail[-511:][:8] == FOOTER_COOKIE:
        return CERTAIN
    if (
        len(head) >= FOOTER_SIZE
        and head[:8] == FOOTER_COOKIE
        and head[0x3C:0x40] in (b"\0\0\0\3", b"\0\0\0\4")
    ):
        return CERTAIN
    return NO
