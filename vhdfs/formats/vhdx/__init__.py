"""VHDX ([MS-VHDX] v2): Hyper-V's format since 2012 -- fixed, dynamic and differencing.

The pure layer (``spec``/``logspec`` structures, ``log`` replay planning, ``layout`` open-time
parsing) reads bytes and never writes; ``image.VhdxImage`` maps virtual offsets (``bat``,
``bitmap``), ``overlay`` replays a dirty log in memory for read-only opens, ``write`` holds the
write path (its headers and log through ``journal`` onto ``wal.VhdxLog``), ``parent``
finds and checks parents. ``open_layer`` below only reads until a
writable open has chosen the header: a failed open leaves the file untouched.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ...block.driver import CERTAIN, NO, CreateSpec, Driver, Limits, ProbeData
from ...block.image import Image, OpenOptions
from ...block.rawfile import RawFile
from ...errors import FormatError, VhdfsError
from . import spec
from .image import VhdxImage
from .layout import open_layout
from .overlay import ReplayOverlay
from .parent import parent_ref

_create: Callable[[CreateSpec], None] | None
try:  # create.py is written alongside (another engineer); the driver reads without it
    from .create import create_from_spec as _create
except ImportError:  # pragma: no cover - until create.py lands
    _create = None

SUFFIXES = (".vhdx", ".avhdx")


def probe(data: ProbeData) -> int:
    return CERTAIN if data.head[:8] == spec.FILE_ID_SIGNATURE else NO


def open_layer(path: str, options: OpenOptions) -> Image:
    """Open one VHDX layer (parents are attached by ``chain.attach_parents``)."""
    f = RawFile(path, options.writable)
    try:
        return _open(path, f, options)
    except VhdfsError as exc:
        f.close()
        raise exc.with_path(f.path)
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError,
            UnicodeError) as exc:
        f.close()
        raise FormatError(f"corrupt VHDX metadata ({type(exc).__name__}: {exc})",
                          f.path) from None
    except BaseException:
        f.close()
        raise


def _open(path: str, f: RawFile, options: OpenOptions) -> Image:
    size = f.size()
    fd = f.fd

    def pread(length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset) if length > 0 and offset >= 0 else b""

    layout, plan, view = open_layout(pread, size)
    if options.writable:
        from .write import open_writable
        image: VhdxImage = open_writable(path, f, layout, plan, size)
    else:
        overlay = None
        file_size = size
        state = "clean"
        if plan is not None:
            file_size = plan.new_file_size(size)
            state = "replayed in memory"
            if plan.writes or file_size > size:
                overlay = ReplayOverlay(plan, size)
        try:
            image = VhdxImage(path, f, layout, view, file_size, plan, overlay, state)
        except BaseException:
            if overlay is not None:
                overlay.close()
            raise
    if layout.has_parent:
        image.parent_ref = parent_ref(image.path, layout.parent_locator or {})
    return image


DRIVER = Driver(
    name="vhdx", title="VHDX", suffixes=SUFFIXES, probe=probe, open_layer=open_layer,
    create=_create,
    limits=Limits(max_size=spec.MAX_VIRTUAL_SIZE,
                  block_sizes=(spec.MIN_BLOCK_SIZE, spec.MAX_BLOCK_SIZE),
                  fixed_has_blocks=True, sector_sizes=spec.SECTOR_SIZES))

__all__ = ["DRIVER", "VhdxImage"]
