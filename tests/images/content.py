"""What the independent writers share: sector and MiB, struct field helpers, test content."""

from __future__ import annotations

import hashlib
import os
import random
import struct

SECTOR = 512
MiB = 1024 * 1024


def set_fields(buf: bytearray, table: dict[str, tuple[int, str]], base: int = 0, **values) -> None:
    for name, value in values.items():
        off, code = table[name]
        if code.endswith("s") and isinstance(value, str):
            value = value.encode()
        struct.pack_into(code, buf, base + off, value)


def get_field(buf: bytes, table: dict[str, tuple[int, str]], name: str, base: int = 0):
    off, code = table[name]
    return struct.unpack_from(code, buf, base + off)[0]


def pattern(size: int, seed: int = 1, holes: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Random bytes of ``size`` with zero ``holes`` (start, length), reproducible."""
    buf = bytearray(random.Random(seed).randbytes(size))
    for start, length in holes:
        buf[start:start + length] = bytes(length)
    return bytes(buf)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patch_bytes(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: str | os.PathLike[str], length: int) -> None:
    os.truncate(path, length)
