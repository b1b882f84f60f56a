"""VHD parent locator payloads (FORMATS.md §2.1): decoding the paths they carry. Pure functions."""

from __future__ import annotations

import urllib.parse

from .spec import PLAT_MACX, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R, decode_utf16


def decode_locator(code: int, data: bytes) -> str | None:
    """The path a locator carries, as stored (``\\`` not yet converted); None if opaque."""
    try:
        if code in (PLAT_W2RU, PLAT_W2KU):
            return decode_utf16(data, "le") or None
        if code in (PLAT_WI2R, PLAT_WI2K):
            return data.split(b"\0", 1)[0].decode("latin-1") or None
        if code == PLAT_MACX:
            return data.split(b"\0", 1)[0].decode("utf-8", errors="replace") or None
    except (UnicodeDecodeError, ValueError):
        return None
    return None


def windows_path_to_posix(path: str) -> tuple[str, bool]:
    """(``\\`` → ``/``, leading ``.\\`` and drive letter stripped; True when it was absolute)."""
    p = path.replace("\\", "/")
    if len(p) >= 2 and p[1] == ":" and p[0].isalpha():
        p = p[2:]
    absolute = p.startswith("/")
    while p.startswith("./"):
        p = p[2:]
    return p, absolute


def macx_to_posix(url: str) -> str:
    """``file://localhost/dir/p.vhd`` → ``/dir/p.vhd``; ``file://p.vhd`` (blktap) → ``p.vhd``."""
    p = url
    if p.lower().startswith("file://"):
        p = p[7:]
    if p.lower().startswith("localhost/"):
        p = p[9:]
    p = urllib.parse.unquote(p)
    while p.startswith("./"):
        p = p[2:]
    return p


def encode_w2_locator(path: str) -> bytes:
    return path.encode("utf-16-le")
