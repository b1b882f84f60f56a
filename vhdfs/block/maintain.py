"""Format-neutral questions the maintenance hooks (resize, compact) ask of an open layer.

Drivers import these so the rule "the content a reader sees never changes" is written once:
a block may be released only when the chain below reads the same without it, and a disk may
be cut only where every byte reads as zero.
"""

from __future__ import annotations

from collections.abc import Callable

from .extent import Kind
from .image import Image
from .rawfile import RawFile

CHUNK = 4 * 1024 * 1024


def below(img: Image, offset: int, length: int) -> bytes:
    """What a reader would see at ``[offset, offset+length)`` without this layer's own data."""
    data = img.backing.read(offset, length) if img.backing is not None else b""
    return data + bytes(length - len(data))  # zeros past a smaller parent's end


def releasable(img: Image, offset: int, length: int) -> bool:
    """The layer's block over ``[offset, offset+length)`` changes nothing a reader sees."""
    return img.read(offset, length) == below(img, offset, length)


def first_nonzero(img: Image, start: int, end: int) -> int | None:
    """The first offset in ``[start, end)`` that does not read as zero, or None.

    ZERO extents (and BACKING runs with nothing below) are skipped without reading.
    """
    end = min(end, img.size)
    for ext in img.extents(start, max(0, end - start)):
        if ext.kind == Kind.ZERO:
            continue
        pos, stop = ext.offset, ext.offset + ext.length
        while pos < stop:
            n = min(CHUNK, stop - pos)
            data = img.read(pos, n)
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + n - len(stripped)
            pos += n
    return None


class RepairSession:
    """What ``check --repair`` does to one file: every change said before it is made.

    The rule lives here once for every driver: a change is printed first, recorded, and (unless
    this is a dry run) made and synced before the next change is looked at, so a kill between
    two repairs leaves each one whole.
    """

    def __init__(self, f: RawFile, dry_run: bool, say: Callable[[str], None]) -> None:
        self.f = f
        self.dry_run = dry_run
        self.say = say
        self.changes: list[str] = []

    def change(self, text: str, do: Callable[[], object]) -> None:
        self.say(text)
        self.changes.append(text)
        if not self.dry_run:
            do()
            self.f.sync()
