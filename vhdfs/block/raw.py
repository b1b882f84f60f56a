"""A plain raw disk file as an Image: the source of ``convert``, the benchmark's baseline."""

from __future__ import annotations

from typing import Iterator

from .base import Extent, Image, Kind
from .raw_io import RawFile


class RawImage(Image):
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
