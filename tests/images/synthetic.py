"""The synthetic base images every bad case, fuzz target and odd-image test starts from.

``Built`` and ``Case`` describe one named bad image (``cases.CASES``); ``ok``/``err``/``patched``
are the small builder helpers the case modules share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .content import MiB, pattern, sha256
from .writers_vdi import VdiInfo, build_vdi
from .writers_vhd import VhdInfo, build_fixed_vhd, build_sparse_vhd, sectors_of, w2_locators

# -- the table of named bad images ------------------------------------------------------------


@dataclass
class Built:
    """A bad image on disk: the file to open, and (when tolerable) what it must read as."""

    path: Path
    expected_sha256: str | None = None
    expected_size: int | None = None


@dataclass
class Case:
    """One named bad image.

    ``error``: the ``VhdfsError`` subclass name expected from ``open_image`` + full read, with
    ``fragments`` that must all appear in its one-line message. ``error is None``: tolerable,
    the image must read as ``Built.expected_sha256`` and the ``warnings`` fragments must appear
    on stderr; ``writable_refused`` says a writable open must then be refused.
    ``check_finds``: fragments that ``Image.check()`` must report (tolerated cases).
    """

    name: str
    build: Callable[[Path, Path | None], Built]
    error: str | None = None
    fragments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    writable_refused: bool = False
    check_finds: tuple[str, ...] = ()
    check_note: bool = False       # what check finds is harmless: a note, exit 0
    needs_corpus: bool = False
    fmt: str = "vhd"
    # The damage is in one block's BAT entry, found when that block is read (a VHDX BAT is not
    # read whole at open): ``info`` answers (exit 0), ``check`` reports ``fragments`` (exit 1).
    lazy: bool = False


# Synthetic images: 6 MiB dynamic, blocks 0 and 2 allocated (stored in reverse order), block 1
# unallocated; a 6 MiB fixed; a 3 MiB VDI with its middle block free.
DYN_SIZE = 6 * MiB
DYN_RAW = pattern(DYN_SIZE, seed=11, holes=((2 * MiB, 2 * MiB), (5 * MiB, 4096)))
FIXED_RAW = pattern(DYN_SIZE, seed=12, holes=((MiB, MiB),))
VDI_RAW = pattern(3 * MiB, seed=13, holes=((MiB, MiB),))


def dyn_vhd(d: Path, name: str = "dyn.vhd", **kw) -> VhdInfo:
    return build_sparse_vhd(d / name, DYN_SIZE, sectors_of(DYN_RAW), reverse_blocks=True, **kw)


def fixed_vhd(d: Path) -> Path:
    return build_fixed_vhd(d / "fixed.vhd", FIXED_RAW)


def synthetic_vdi(d: Path, **kw) -> VdiInfo:
    return build_vdi(d / "disk.vdi", VDI_RAW, **kw)


CHILD_RAW_SECTORS = {s: pattern(512, seed=1000 + s) for s in
                     (0, 1, 7, 4095, 4096, 4097, 9000, 12287)}


def vhd_chain(d: Path, parent_size: int = DYN_SIZE, child_uid: bytes | None = None,
           locators: list[tuple[int, bytes]] | None = None, parent_name: str = "parent.vhd",
           child_name: str = "child.vhd") -> tuple[VhdInfo, VhdInfo, bytes]:
    """parent.vhd (dynamic, DYN_RAW) <- child.vhd (differencing, a few sectors)."""
    praw = DYN_RAW[:parent_size] if parent_size <= DYN_SIZE else DYN_RAW + bytes(parent_size - DYN_SIZE)
    parent = build_sparse_vhd(d / "parent.vhd", parent_size, sectors_of(praw))
    child = build_sparse_vhd(
        d / child_name, DYN_SIZE, CHILD_RAW_SECTORS, disk_type=4, uid=child_uid,
        parent_uid=parent.uid, parent_name=parent_name,
        locators=w2_locators(parent_name) if locators is None else locators)
    flat = bytearray(DYN_RAW)
    for s, data in CHILD_RAW_SECTORS.items():
        flat[s * 512:(s + 1) * 512] = data
    return parent, child, bytes(flat)


def ok(path: Path, raw: bytes) -> Built:
    return Built(path, sha256(raw), len(raw))


def err(path: Path) -> Built:
    return Built(path)


def patched(make, patch, **fields):
    """A builder: a fresh image from ``make``, with ``patch`` applied to the given fields."""
    def build(d: Path, c: object) -> Built:
        info = make(d)
        patch(info.path, **fields)
        return err(info.path)
    return build
