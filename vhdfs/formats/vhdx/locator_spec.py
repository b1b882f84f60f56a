"""The VHDX parent locator item (§2.6.2.6): a type GUID and UTF-16LE key/value pairs. Pure."""

from __future__ import annotations

import struct
import uuid

from ...errors import FormatError
from .spec import PARENT_LOCATOR_TYPE, require_length

LOCATOR_HEADER_STRUCT = struct.Struct("<16sHH")  # type, reserved, key/value count
LOCATOR_ENTRY_STRUCT = struct.Struct("<IIHH")  # key off, value off, key len, value len


def parse_parent_locator(data: bytes) -> tuple[uuid.UUID, dict[str, str]]:
    """Return (locator type, {key: value}); strings are UTF-16LE without a NUL."""
    what = "metadata: parent locator"
    require_length(data, LOCATOR_HEADER_STRUCT.size, what)
    t, _, count = LOCATOR_HEADER_STRUCT.unpack_from(data)
    require_length(data, LOCATOR_HEADER_STRUCT.size + 12 * count, what)
    out: dict[str, str] = {}
    for i in range(count):
        ko, vo, kl, vl = LOCATOR_ENTRY_STRUCT.unpack_from(data, 20 + 12 * i)
        if ko + kl > len(data) or vo + vl > len(data) or kl == 0 or kl % 2 or vl % 2:
            raise FormatError(f"{what}: entry {i} out of bounds or odd length")
        try:
            key = bytes(data[ko : ko + kl]).decode("utf-16-le")
            value = bytes(data[vo : vo + vl]).decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{what}: entry {i} is not UTF-16LE") from exc
        if key in out:
            raise FormatError(f"{what}: duplicate key {key!r}")
        out[key] = value
    return uuid.UUID(bytes_le=t), out


def pack_parent_locator(entries: dict[str, str], locator_type: uuid.UUID = PARENT_LOCATOR_TYPE) -> bytes:
    head = bytearray(LOCATOR_HEADER_STRUCT.pack(locator_type.bytes_le, 0, len(entries)))
    table = bytearray()
    blob = bytearray()
    base = len(head) + 12 * len(entries)
    for k, v in entries.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = base + len(blob)
        blob += kb
        vo = base + len(blob)
        blob += vb
        table += LOCATOR_ENTRY_STRUCT.pack(ko, vo, len(kb), len(vb))
    return bytes(head + table + blob)
