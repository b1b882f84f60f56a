"""The machinery of the conformance suite: ``Factory`` (one image kind) and the workload.

``tests/block/test_conformance.py`` holds the list of factories and the tests; a format's own
tests may reuse these pieces (``from conformance import Factory, workload``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vhdfs.block import Image, open_image
from vhdfs.block.driver import Finding, Severity, driver
from vhdfs.tools.create import create_image

KiB, MiB = 1024, 1024 * 1024
SIZE = 8 * MiB
SEED = os.environ.get("VHDFS_CONFORMANCE_SEED") or (
    str(random.randrange(1 << 32)) if os.environ.get("VHDFS_HYPOTHESIS_RANDOM") else "0")


@dataclass(frozen=True)
class Made:
    """A fresh image to write into, plus its parents (which must never change)."""

    path: Path
    parents: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Factory:
    name: str                      # the test id
    fmt: str                       # driver name
    type: str                      # "fixed" | "dynamic" | "differencing"
    block_size: int | None = None  # None: the driver's default
    parent_type: str = "dynamic"   # a differencing kind's parent
    qemu: str | None = None        # qemu-img's name for it, when qemu reads this kind
    sector_size: int | None = None  # logical sector size (None: the driver's default)
    # NOTE findings a crash legitimately leaves (VHDX: "log: ..." for a log replayed on open);
    # after a crash or a failed write/commit anything else beyond LEAK fails the test.
    crash_note: str | None = None
    discard: bool = True
    make_file: Callable[[Path, int], None] | None = None   # formats vhdfs cannot create

    @property
    def suffix(self) -> str:
        return driver(self.fmt).suffixes[0]

    @property
    def sparse(self) -> bool:
        """Allocates blocks, so has metadata pending until a commit."""
        return self.type != "fixed"

    @property
    def children(self) -> bool:
        d = driver(self.fmt)
        return d.create is not None and "differencing" in d.limits().types

    def open(self, path: Path, writable: bool = False) -> Image:
        return open_image(path, writable, parent_dirs=[str(path.parent)], format=self.fmt)

    def create(self, path: Path, type: str, parent: Path | None = None, size: int = SIZE) -> None:
        if self.make_file is not None:
            self.make_file(path, size)
        elif parent is not None:
            create_image(path, format=self.fmt, parent=parent,
                         block_size=self.block_size if self.fmt in ("vhd", "vhdx") else None,
                         sector_size=self.sector_size)
        else:
            create_image(path, format=self.fmt, type=type, size=size, block_size=self.block_size,
                         sector_size=self.sector_size)

    def make(self, folder: Path, size: int = SIZE) -> Made:
        if self.type != "differencing":
            path = folder / f"disk{self.suffix}"
            self.create(path, self.type, size=size)
            return Made(path)
        base = folder / f"base{self.suffix}"
        self.create(base, self.parent_type, size=size)
        with self.open(base, writable=True) as img:
            img.write(0, rnd_for(self, "parent").randbytes(size))
            img.discard(size * 3 // 8, size // 16)   # a hole in the parent, read through
        path = folder / f"disk{self.suffix}"
        self.create(path, "differencing", parent=base)
        return Made(path, [base])


    @property
    def blocks_size(self) -> int:
        """A disk size with at least four blocks (SIZE, unless one block covers most of it)."""
        return max(SIZE, 4 * (self.block_size or 0))


def rnd_for(f: Factory, what: str) -> random.Random:
    return random.Random(f"{SEED}:{f.name}:{what}")


def unit_of(img: Image) -> int:
    """The block size to aim writes at (fixed kinds: an arbitrary 64 KiB grid)."""
    return min(img.allocation_unit or 64 * KiB, SIZE // 4)


def workload(rnd: random.Random, unit: int, count: int, size: int = SIZE) -> Iterator[tuple[int, bytes]]:
    """Writes that straddle blocks and sectors, sub-sector ones, large ones over many blocks."""
    lengths = [1, 100, 511, 512, 513, 3 * 512 + 7, 4096, unit - 1, unit + 300, 70_000, MiB + 300]
    for _ in range(count):
        length = min(rnd.choice(lengths), size - 1)
        aim = rnd.random()
        if aim < 0.35:      # across a block boundary
            edge = rnd.randrange(1, size // unit) * unit
            off = edge - rnd.randrange(1, min(length, unit) + 1) if length > 1 else edge - 1
        elif aim < 0.6:     # across a sector boundary, or inside one sector
            off = rnd.randrange(1, size // 512) * 512 - rnd.randrange(1, 512)
        else:
            off = rnd.randrange(0, size - length)
        off = max(0, min(off, size - length))
        yield off, rnd.randbytes(length)


def problems(img: Image, allow: tuple[Severity, ...] = (Severity.NOTE,)) -> list[Finding]:
    """Findings of every layer of the chain beyond the allowed severities."""
    return [p for layer in img.chain for p in layer.check() if p.severity not in allow]


def crash_problems(f: Factory, img: Image) -> list[Finding]:
    """``problems`` after a crash or a failed write/commit: LEAKs allowed, and the factory's
    ``crash_note`` NOTEs (a log to replay is the format's way of surviving a crash)."""
    return [p for p in problems(img, allow=(Severity.LEAK,))
            if not (f.crash_note and p.severity is Severity.NOTE and p.text.startswith(f.crash_note))]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_unchanged(paths: list[Path], before: dict[Path, str]) -> None:
    for p in paths:
        assert sha256_file(p) == before[p], f"{p.name} changed (seed {SEED})"
