"""VHD driver entry points: ``probe``, ``open_layer``, and the fixed-disk layer.

``open_layer`` finds the footer (tail 512, tail 511, head copy), decides the virtual size
(QEMU 10's rule unless overridden), and hands dynamic and differencing disks to
``vhd_sparse.SparseVhd``. It only ever reads, so a failed open leaves the file untouched; any
low-level decoding error on corrupt input is turned into a one-line ``FormatError``.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable, Iterator

from ..errors import FormatError, ReadOnlyError, UnsupportedError, VhdfsError, warn
from ..format import vhd as fmt
from .base import Extent, Image, Kind, OpenOptions
from .raw_io import RawFile
from .vhd_layout import load_layout, parent_ref
from .vhd_sparse import SparseVhd, write_parts

MAX_FINDINGS = 50
TRAILING_SCAN = 4 * 1024 * 1024  # how far back from the end to look for a padded footer


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """True when the file carries a VHD footer where some reader would look for it."""
    if file_size >= fmt.FOOTER_SIZE and tail[-fmt.FOOTER_SIZE:][:8] == fmt.FOOTER_COOKIE:
        return True
    if file_size % fmt.SECTOR == 511 and len(tail) >= 511 and tail[-511:][:8] == fmt.FOOTER_COOKIE:
        return True
    return (len(head) >= fmt.FOOTER_SIZE and head[:8] == fmt.FOOTER_COOKIE
            and head[0x3C:0x40] in (b"\0\0\0\3", b"\0\0\0\4"))


def probe_slow(fd: int, file_size: int) -> bool:
    """Second look for a footer followed by junk (copy tools pad files); see ``find_footer``."""
    try:
        return find_footer(lambda n, off: os.pread(fd, n, off), file_size) is not None
    except (OSError, struct.error, ValueError):
        return False


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
        if off % fmt.SECTOR == 0 and pos + fmt.FOOTER_SIZE <= len(buf):
            if fmt.parse_footer(buf[pos:pos + fmt.FOOTER_SIZE]).checksum_ok:
                return off
    return None


def open_layer(path: str, options: OpenOptions) -> Image:
    """Open one VHD layer (parents are attached by ``chain.attach_parents``)."""
    f = RawFile(path, options.writable)
    try:
        return _open(path, f, options)
    except VhdfsError as exc:
        f.close()
        raise exc.with_path(f.path)
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError, UnicodeError) as exc:
        f.close()
        raise FormatError(f"corrupt VHD metadata ({type(exc).__name__}: {exc})", f.path) from None
    except BaseException:
        f.close()
        raise


def _read_footer(f: RawFile, size: int) -> tuple[fmt.Footer, int, str, list[str]]:
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
            findings.append(f"{size - found - fmt.FOOTER_SIZE} bytes of trailing data after the "
                            f"footer at offset {found} (ignored)")
    head_raw = f.pread(fmt.FOOTER_SIZE, 0)
    head = fmt.parse_footer(head_raw) if head_raw[:8] == fmt.FOOTER_COOKIE else None
    head_ok = head is not None and head.checksum_ok and head.disk_type in (3, 4)
    if tail is not None and tail.checksum_ok:
        footer, where = tail, "tail"
    elif tail is not None and head_ok and tail_off != 0:
        assert head is not None
        findings.append(f"footer checksum mismatch (stored 0x{tail.checksum:08x}); using the copy at offset 0")
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


def _open(path: str, f: RawFile, options: OpenOptions) -> Image:
    size = f.size()
    footer, footer_offset, where, findings = _read_footer(f, size)
    repair = bool(findings)  # every finding so far is about the footer
    if footer.disk_type not in fmt.DISK_TYPE_NAMES:
        raise UnsupportedError(f"VHD disk type {footer.disk_type} is not supported "
                               "(only fixed 2, dynamic 3, differencing 4)")
    vsize, rule = fmt.virtual_size(footer, options.size_rule)
    if footer.disk_type == fmt.DISK_FIXED:
        if where != "tail":
            raise FormatError("fixed VHD without a footer at the end of the file")
        if rule != "chs" and vsize > footer_offset:
            # only a CHS size may exceed the data (QEMU 2012 wrote such files); a larger
            # current_size means the data area was cut short
            raise FormatError(f"fixed VHD claims {vsize} bytes but holds only {footer_offset} "
                              "bytes of data (truncated?)")
        image: Image = FixedVhd(path, f, footer, footer_offset, vsize, rule, findings, repair)
    else:
        if vsize > fmt.MAX_VIRTUAL_SIZE:
            raise FormatError(f"virtual size {vsize} exceeds the VHD maximum of 2040 GiB")
        layout = load_layout(f, footer, footer_offset, size, vsize)
        findings += layout.findings
        del findings[MAX_FINDINGS:]
        image = SparseVhd(path, f, footer, footer_offset, size, layout, vsize, rule, findings,
                          where, repair)
        if footer.disk_type == fmt.DISK_DIFFERENCING:
            image.parent_ref = parent_ref(path, layout.header, layout.locators)
    if findings:
        if options.writable and not options.force:
            raise FormatError(f"{findings[0]}: refusing to open for writing (--force overrides this)")
        for finding in findings:
            warn(finding, f.path)
    if options.writable and footer.saved_state:
        warn("the image is marked 'saved state' by its hypervisor; writing may confuse it", f.path)
    return image


def describe_footer(footer: fmt.Footer, size_rule: str, where: str) -> dict[str, Any]:
    """The footer fields ``vhdfs info`` shows, shared by every VHD type."""
    return {
        "format": "vhd", "type": footer.type_name, "uuid": fmt.uuid_str(footer.unique_id),
        "creator_app": fmt.fourcc(footer.creator_app),
        "creator_app_name": fmt.CREATOR_APPS.get(footer.creator_app, "unknown"),
        "creator_version": fmt.version_str(footer.creator_version),
        "creator_os": fmt.fourcc(footer.creator_os),
        "timestamp": fmt.unix_time(footer.timestamp),
        "original_size": footer.original_size, "current_size": footer.current_size,
        "geometry": [footer.cylinders, footer.heads, footer.sectors], "chs_size": footer.chs_size,
        "size_rule": size_rule, "footer_checksum_ok": footer.checksum_ok, "footer_from": where,
        "saved_state": bool(footer.saved_state),
    }


class FixedVhd(Image):
    """A fixed VHD: virtual offset = file offset, footer after the data."""

    format = "vhd"
    type = "fixed"

    def __init__(self, path: str, f: RawFile, footer: fmt.Footer, footer_offset: int,
                 size: int, size_rule: str, findings: list[str], repair_footer: bool = False) -> None:
        super().__init__(path, size, f.writable)
        self.file = f
        self.footer = footer
        self.footer_offset = footer_offset
        self._repair_footer = repair_footer and f.writable
        self.size_rule = size_rule
        self.findings = findings
        # CHS·512 may exceed what was written (QEMU 2012 fixed images): the rest reads as zeros
        self.data_size = min(footer_offset, size)

    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        if offset < self.data_size:
            stop = min(end, self.data_size)
            yield Extent(offset, stop - offset, Kind.DATA, self.file.fd, offset)
            offset = stop
        if offset < end:
            yield Extent(offset, end - offset, Kind.ZERO)

    def _ensure_footer(self) -> None:
        """A force-opened image with a bad footer checksum gets a correct one before writing."""
        if self._repair_footer:
            with self.meta_lock:
                if self._repair_footer:
                    self.file.pwrite(self.footer.pack(), self.footer_offset)
                    self.file.sync()
                    self._repair_footer = False

    def _write(self, offset: int, data: memoryview) -> None:
        self._ensure_footer()
        if offset + len(data) > self.data_size:
            raise UnsupportedError(
                f"write at {offset} reaches past the data area ({self.data_size} bytes) of this "
                "fixed VHD, whose virtual size comes from its CHS geometry", self.path)
        self.file.pwrite(data, offset)

    def write_is_in_place(self, offset: int, length: int) -> bool:
        return offset + length <= self.data_size

    def discard(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.path)
        length = self._clip(offset, length)
        self._ensure_footer()
        stop = min(offset + length, self.data_size)
        if stop > offset:
            write_parts(self.file, [stop - offset], offset)

    def identity(self) -> str:
        return fmt.uuid_str(self.footer.unique_id)

    def describe(self) -> dict[str, Any]:
        out = describe_footer(self.footer, self.size_rule, "tail")
        out["data_size"] = self.data_size
        return out

    def check(self) -> list[str]:
        return list(self.findings)
