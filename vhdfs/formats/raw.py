"""A plain raw disk file as an Image: the source of ``convert``, the benchmark's baseline."""

from __future__ import annotations

from collections.abc import Iterator

from ..block.driver import NO, Driver, Limits, ProbeData
from ..block.extent import Extent, Kind
from ..block.image import Image, OpenOptions
from ..block.rawfile import RawFile


class RawImage(Image):
    file: RawFile  # always open (narrows Image.file)
    format = "raw"
    type = "fixed"

    def __init__(self, path: str, writable: bool = False) -> None:
        self.file = RawFile(path, writable)
        super().__init__(path, self.file.size(), writable)

    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, Kind.DATA, self.file.fd, offset)

    def _write(self, offset: int, data: memoryview) -> None:
        self.file.pwrite(data, offset)

    def write_is_in_place(self, offset: int, length: int) -> bool:
        return True

    def identity(self) -> str:
        return ""


def probe(data: ProbeData) -> int:
    """Any file is a raw disk, so raw is never guessed: ``--format raw`` asks for it."""
    return NO


def open_layer(path: str, options: OpenOptions) -> RawImage:
    return RawImage(path, options.writable)


RAW_LIMITS = Limits(max_size=2**63 - 1, types=("fixed",))

DRIVER = Driver(
    name="raw",
    title="raw",
    suffixes=(".raw", ".img"),
    probe=probe,
    open_layer=open_layer,
    create=None,
    limits=lambda: RAW_LIMITS,
)
