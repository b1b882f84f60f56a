"""What identifies a VDI at a glance (kept apart from ``spec``, which re-exports it, so that
probing a file of another format never imports VDI's structures)."""

from __future__ import annotations

SIGNATURE = 0xBEDA107F
SIGNATURE_BYTES = SIGNATURE.to_bytes(4, "little")  # 7F 10 DA BE
SIGNATURE_OFFSET = 0x40
PRE_HEADER_SIZE = 0x48  # text (64) + signature + version


def probe(head: bytes) -> bool:
    """True when ``head`` carries the VDI signature (the pre-header text is not checked)."""
    return len(head) >= PRE_HEADER_SIZE and head[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 4] == SIGNATURE_BYTES
