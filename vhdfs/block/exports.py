"""Which byte windows of which images a front end serves, and what each is called.

One rule for every front end (FUSE files, NBD exports): a disk is named by its image's stem
(``disk`` for ``disk.vhd``), partition N of it ``<stem>-p<N>``; the FUSE mount adds ``.raw``
to make file names. Kept free of trio and pyfuse3 so that the nbdkit plugin, which runs in
nbdkit's embedded interpreter, plans its exports with the same code as the mount.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UsageError
from .image import Image
from .partitions import find_partitions


@dataclass
class Exposed:
    """An opened image and the stem its exports are named by (``disk`` for ``disk.vhd``)."""

    stem: str
    image: Image
    writable: bool
    temp_child: str | None = None  # a snapshot child removed when the front end stops
    snapshot: bool = False  # ``image`` is a child made over the image the user named


@dataclass(frozen=True)
class Window:
    """``[start, start+size)`` of ``exposed.image``, served under ``name``."""

    name: str
    exposed: Exposed
    start: int
    size: int
    partition: int = 0  # 0: the whole disk


def plan_exports(exposed: Iterable[Exposed], partitions: bool = True, suffix: str = "") -> list[Window]:
    """Every window, each whole disk first and its partitions after it, named ``<stem><suffix>``
    and ``<stem>-p<N><suffix>``.

    Two images with one stem (``a/disk.vhd``, ``b/disk.vhd``), or a stem that collides with a
    partition name, is a UsageError naming both: silently renaming would let a user write to
    the wrong disk.
    """
    out: list[Window] = []
    owners: dict[str, str] = {}

    def add(w: Window, owner: str) -> None:
        if w.name in owners:
            raise UsageError(
                f"two exports would be called {w.name} ({owners[w.name]} and {owner});"
                " open them separately or rename one"
            )
        owners[w.name] = owner
        out.append(w)

    for ex in exposed:
        add(Window(f"{ex.stem}{suffix}", ex, 0, ex.image.size), ex.image.path)
        if partitions:
            for part in find_partitions(ex.image):
                add(
                    Window(f"{ex.stem}-p{part.number}{suffix}", ex, part.start, part.length, part.number),
                    f"{ex.image.path} partition {part.number}",
                )
    return out
