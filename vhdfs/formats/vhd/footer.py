"""Finding a VHD's footer: at the end (512 or 511 bytes), after padding, or the head copy.

Also the registry's second look (a footer before padding; the first is ``magic.probe``) and the
footer fields every VHD type shows in ``vhdfs info``. Only reads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from ...block.driver import LIKELY, NO, ProbeData
from ...block.rawfile import RawFile
from ...errors import FormatError
from . import spec as fmt

TRAILING_SCAN = 4 * 1024 * 1024  # how far back from the end to look for a padded footer


def probe_padded(data: ProbeData) -> int:
    """LIKELY for a footer followed by junk (copy tools pad files): the second look, which reads
    the last few MiB (``find_footer``), made only when no format's first look was certain."""
    try:
        found = find_footer(lambda n, off: os.pread(data.fd, n, off), data.size)
    except (OSError, struct.error, ValueError):
        return NO
    return LIKELY if found is not None else NO


def find_footer(pread: Callable[[int, int], bytes], file_size: int) -> int | None:
    """Offset of the last valid footer in the file's last few MiB, on a sector boundary.

    Only used when no footer sits at the very end: the offset-0 copy of a dynamic disk is not
    counted (the caller handles it), and a candidate must carry a correct checksum.
    """
    start = max(fmt.SECTOR, file_size - TRAILING_SCAN - fmt.FOOTER_SIZE)
    start -= start % fmt.SECTOR
    if start >= file_size:
        return None
    buf = pread(file_size - start, start)
    pos = len(buf) - fmt.FOOTER_SIZE + 1
    while pos > 0:
        pos = buf.rfind(fmt.FOOTER_COOKIE, 0, pos + len(fmt.FOOTER_COOKIE) - 1)
        if pos < 0:
            return None
        off = start + pos
        if (
            off % fmt.SECTOR == 0
            and pos + fmt.FOOTER_SIZE <= len(buf)
            and fmt.parse_footer(buf[pos : pos + fmt.FOOTER_SIZE]).checksum_ok
        ):
            return off
    return None


def read_footer(f: RawFile, size: int) -> tuple[fmt.Footer, int, str, list[str]]:
    """(footer, offset of the tail footer or file size, where it came from, findings)."""
    findings: list[str] = []
    if size < fmt.FOOTER_SIZE:
        raise FormatError(f"file is too small to be a VHD ({size} bytes)")
    tail: fmt.Footer | None = None
    tail_off = size
    for length in (fmt.FOOTER_SIZE, 511):
        if length == 511 and size % fmt.SECTOR != 511:
            continue
        raw = f.pread(length, size - length)
        if raw[:8] == fmt.FOOTER_COOKIE:
            tail, tail_off = fmt.parse_footer(raw), size - length
            break
    else:
        found = find_footer(f.pread, size)
        if found is not None:
            tail, tail_off = fmt.parse_footer(f.pread(fmt.FOOTER_SIZE, found)), found
            findings.append(
                f"{size - found - fmt.FOOTER_SIZE} bytes of trailing data after the "
                f"footer at offset {found} (ignored)"
            )
    head_raw = f.pread(fmt.FOOTER_SIZE, 0)
    head = fmt.parse_footer(head_raw) if head_raw[:8] == fmt.FOOTER_COOKIE else None
    head_ok = head is not None and head.checksum_ok and head.disk_type in (3, 4)
    if tail is not None and tail.checksum_ok:
        footer, where = tail, "tail"
    elif tail is not None and head_ok and tail_off != 0:
        assert head is not None
        findings.append(
            f"footer checksum mismatch (stored 0x{tail.checksum:08x}); using the copy at offset 0"
        )
        footer, where = head, "head"
    elif tail is not None:
        findings.append(f"footer checksum mismatch (stored 0x{tail.checksum:08x})")
        footer, where = tail, "tail"
    elif head is not None and head.disk_type in (3, 4):
        findings.append("no footer at the end of the file; using the copy at offset 0")
        if not head.checksum_ok:
            findings.append(f"footer copy at offset 0: checksum mismatch (stored 0x{head.checksum:08x})")
        footer, where = head, "head"
    else:
        raise FormatError("not a VHD image (no 'conectix' footer at the end or at offset 0)")
    if footer.disk_type in (3, 4) and tail is not None and head is not None and tail_off != 0:
        if head.pack() != tail.pack() or head.checksum_ok != tail.checksum_ok:
            findings.append("footer copy at offset 0 differs from the footer at the end")
    elif footer.disk_type in (3, 4) and head is None:
        findings.append("footer copy at offset 0 is missing")
    return footer, tail_off, where, findings


def describe_footer(footer: fmt.Footer, size_rule: str, where: str) -> dict[str, Any]:
    """The footer fields ``vhdfs info`` shows, shared by every VHD type."""
    return {
        "format": "vhd",
        "type": footer.type_name,
        "uuid": fmt.uuid_str(footer.unique_id),
        "creator_app": fmt.fourcc(footer.creator_app),
        "creator_app_name": fmt.CREATOR_APPS.get(footer.creator_app, "unknown"),
        "creator_version": fmt.version_str(footer.creator_version),
        "creator_os": fmt.fourcc(footer.creator_os),
        "timestamp": fmt.unix_time(footer.timestamp),
        "original_size": footer.original_size,
        "current_size": footer.current_size,
        "geometry": [footer.cylinders, footer.heads, footer.sectors],
        "chs_size": footer.chs_size,
        "size_rule": size_rule,
        "footer_checksum_ok": footer.checksum_ok,
        "footer_from": where,
        "saved_state": bool(footer.saved_state),
    }
