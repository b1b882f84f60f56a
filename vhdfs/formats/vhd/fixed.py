"""The fixed VHD layer: virtual offset = file offset, the footer right after the data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...block.driver import Finding
from ...block.image import Extent, Image, Kind
from ...block.rawfile import RawFile
from ...errors import UnsupportedError
from . import spec as fmt
from .findings import classify
from .footer import describe_footer


class FixedVhd(Image):
    """A fixed VHD: virtual offset = file offset, footer after the data."""

    file: RawFile  # always open (narrows Image.file)

    format = "vhd"
    type = "fixed"

    def __init__(
        self,
        path: str,
        f: RawFile,
        footer: fmt.Footer,
        footer_offset: int,
        size: int,
        size_rule: str,
        findings: list[str],
        repair_footer: bool = False,
    ) -> None:
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
                "fixed VHD, whose virtual size comes from its CHS geometry",
                self.path,
            )
        self.file.pwrite(data, offset)

    def write_is_in_place(self, offset: int, length: int) -> bool:
        return not self._repair_footer and offset + length <= self.data_size

    def _discard(self, offset: int, length: int) -> None:
        self._ensure_footer()
        stop = min(offset + length, self.data_size)
        if stop > offset:
            self.file.write_parts([stop - offset], offset)

    def identity(self) -> str:
        return fmt.uuid_str(self.footer.unique_id)

    def describe(self) -> dict[str, Any]:
        out = describe_footer(self.footer, self.size_rule, "tail")
        out["data_size"] = self.data_size
        return out

    def check(self) -> list[Finding]:
        return [classify(f) for f in self.findings]
