"""Open one VHDX layer: read-only (a dirty log replayed in memory) or writable (replayed on disk).

``open_layer`` only reads until a writable open has chosen the header: a failed open leaves
the file untouched. ``repair`` (``check --repair``) replays a dirty log onto the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ...block.image import Image, OpenOptions
from ...block.rawfile import RawFile, open_layer_file
from .image import VhdxImage
from .journal import Journal
from .layout import VhdxLayout, open_layout
from .log import ReplayPlan
from .overlay import ReplayOverlay
from .parent import parent_ref


def open_layer(path: str, options: OpenOptions) -> Image:
    """Open one VHDX layer (parents are attached by ``chain.attach_parents``)."""
    return open_layer_file(path, options.writable, "VHDX", lambda f: _open(path, f, options))


def _open(path: str, f: RawFile, options: OpenOptions) -> Image:
    size = f.size()
    fd = f.fd

    def pread(length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset) if length > 0 and offset >= 0 else b""

    layout, plan, view = open_layout(pread, size)
    if options.writable:
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


def open_writable(path: str, f: RawFile, layout: VhdxLayout, plan: ReplayPlan | None, size: int) -> VhdxImage:
    """Header update, on-disk replay and a fresh log (``wal.VhdxLog``'s order), then the image."""
    journal = Journal(f, layout)
    file_size = journal.start(plan, size)

    def pread(length: int, offset: int) -> bytes:
        return os.pread(f.fd, length, offset) if length > 0 else b""

    state = "replayed on disk" if plan is not None else "clean"
    image = VhdxImage(path, f, layout, pread, file_size, plan, None, state)
    image._begin_session(journal)
    return image


def repair(path: str, dry_run: bool, say: Callable[[str], None]) -> list[str]:
    """``check --repair``: a dirty log is replayed on disk (what ``qemu-img check -r all`` does).

    Everything else a VHDX can suffer is either read around (a damaged header or region table
    has its second copy) or refused by name at open.
    """
    f = RawFile(path, False)
    try:
        _layout, plan, _view = open_layout(lambda n, off: os.pread(f.fd, n, off) if n > 0 else b"", f.size())
    finally:
        f.close()
    if plan is None:
        return []
    text = (
        f"log: replay {plan.entry_count} entr{'y' if plan.entry_count == 1 else 'ies'} "
        f"(sequence {plan.first_sequence}..{plan.last_sequence}) onto the file, then clear it"
    )
    say(text)
    if not dry_run:
        open_layer(path, OpenOptions(writable=True)).close()  # a writable open replays on disk
    return [text]
