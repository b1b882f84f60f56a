"""What each VDI finding means for a user: error, leak or note (see ``vhd/findings.py``).

- error: entries that share a block or point where no block is (data lost or shown twice), a
  ``blocks_allocated`` too low (VirtualBox would hand out a block still in use), a static image
  whose map is not the identity;
- note: fields every reader ignores (sector size), null UUIDs (VirtualBox refuses them; vhdfs
  and QEMU read the image), a count higher than the blocks the file holds (VirtualBox appends
  past it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...block.driver import Finding, error, note

if TYPE_CHECKING:
    from .image import VdiImage

_NOTES = ("sector size field", "UUID is null", "the file holds fewer blocks")


def classify(text: str) -> Finding:
    return note(text) if any(n in text for n in _NOTES) else error(text)


def findings(img: VdiImage, problems: list[str]) -> list[Finding]:
    """Blocks no entry names are not reported: a crash between a block's data and its entry
    leaks one by design (the allocation order), ``describe`` counts them as
    ``unreferenced_blocks``, ``--repair`` mentions them and ``compact`` returns them."""
    return [classify(p) for p in problems]
