"""VirtualBox VDI: dynamic, static ("fixed") and differencing (snapshot) images.

A differencing VDI names its parent only by UUID, so its parent is found by scanning the child's
folder and every ``--parent-dir`` for ``.vdi`` files (``parent_candidates``).
"""

from __future__ import annotations

import os

from ...block.driver import CERTAIN, NO, Driver, Limits, ProbeData
from ...block.image import Image, ParentRef
from . import spec as fmt
from .create import create_from_spec
from .image import VdiImage, open_layer
from .maintain import compact, repair, resize

SUFFIXES = (".vdi",)


def probe(data: ProbeData) -> int:
    return CERTAIN if fmt.probe(data.head) else NO


def parent_candidates(child: Image, ref: ParentRef, parent_dirs: tuple[str, ...]) -> list[str]:
    """Every ``.vdi`` beside the child and in each ``--parent-dir``, by name (UUID decides)."""
    out: list[str] = []
    for folder in (os.path.dirname(child.path), *parent_dirs):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        out.extend(os.path.join(folder, n) for n in names if n.lower().endswith(SUFFIXES))
    return out


DRIVER = Driver(
    name="vdi",
    title="VDI",
    suffixes=SUFFIXES,
    probe=probe,
    open_layer=open_layer,
    create=create_from_spec,
    limits=Limits(
        max_size=fmt.MAX_BLOCK_INDEX * fmt.MAX_BLOCK_SIZE,
        block_sizes=(fmt.MIN_BLOCK_SIZE, fmt.MAX_BLOCK_SIZE),
        fixed_has_blocks=True,
    ),
    type_names={"fixed": "static"},
    parent_candidates=parent_candidates,
    resize=resize,
    compact=compact,
    repair=repair,
)

__all__ = ["DRIVER", "VdiImage"]
