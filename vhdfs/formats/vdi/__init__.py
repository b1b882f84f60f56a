"""VirtualBox VDI: dynamic, static ("fixed") and differencing (snapshot) images.

A differencing VDI names its parent only by UUID, so its parent is found by scanning the child's
folder and every ``--parent-dir`` for ``.vdi`` files (``parent_candidates``). Like every format
package, this module is only the registry entry: the code loads when first used
(``block.driver.deferred``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...block.driver import CERTAIN, NO, Driver, ProbeData, deferred, deferred_value
from . import magic

if TYPE_CHECKING:
    from ...block.image import Image, ParentRef

SUFFIXES = (".vdi",)


def probe(data: ProbeData) -> int:
    return CERTAIN if magic.probe(data.head) else NO


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
    open_layer=deferred(f"{__name__}.image", "open_layer"),
    create=deferred(f"{__name__}.create", "create_from_spec"),
    limits=deferred_value(f"{__name__}.create", "LIMITS"),
    type_names={"fixed": "static"},
    parent_candidates=parent_candidates,
    resize=deferred(f"{__name__}.maintain", "resize"),
    compact=deferred(f"{__name__}.maintain", "compact"),
    repair=deferred(f"{__name__}.maintain", "repair"),
)
