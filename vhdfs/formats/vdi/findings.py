"""What each VDI finding means for a user: error, leak or note (see ``vhd/findings.py``).

- error: entries that share a block or point where no block is (data lost or shown twice), a
  ``blocks_allocated`` too low (VirtualBox would hand out a block still in use), a static image
  whose map is not the identity;
- note: fields every reader ignores (sector size), null UUIDs (VirtualBox refuses them; vhdfs
  and QEMU read the image), a count higher than the blocks the file holds (VirtualBox appends
  past it), and data blocks no entry names (leaked space: ``vhdfs compact`` returns it; left a
  note, as VirtualBox leaves them until ``--compact``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...block.driver import Finding, error, note
from . import spec as fmt

if TYPE_CHECKING:
    from .image import VdiImage

_NOTES = ("sector size field", "UUID is null", "the file holds fewer blocks")


def classify(text: str) -> Finding:
    return note(text) if any(n in text for n in _NOTES) else error(text)


def unreferenced(img: "VdiImage") -> int:
    """Data blocks below ``blocks_allocated`` (or in the file) that no map entry names."""
    h = img.header
    used = {e for e in img.bmap[:h.blocks_in_image] if e < fmt.BLOCK_ZERO}
    return max(0, img._next_index - len(used))


def findings(img: "VdiImage", problems: list[str]) -> list[Finding]:
    out = [classify(p) for p in problems]
    leaked = unreferenced(img)
    if leaked and img.type != "fixed":
        out.append(note(f"{leaked} data block(s) no map entry uses (leaked space; "
                        "vhdfs compact returns it)"))
    return out
