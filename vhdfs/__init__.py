"""vhdfs: virtual-disk images (VHD, VDI) exposed as flat raw files through FUSE.

From Python, ``vhdfs.open(path)`` gives the virtual disk as a seekable binary file object (see
``vhdfs.fileobj``); ``vhdfs.block.open_image`` is the block layer below it. Importing ``vhdfs``
loads neither of them (nor trio or pyfuse3) until they are used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import io

    from .fileobj import VirtualDiskIO

__version__ = "0.1.0"


def open(
    path: str | os.PathLike[str], mode: str = "rb", buffering: int = -1, **options: Any
) -> io.BufferedReader | io.BufferedRandom | VirtualDiskIO:
    """The virtual disk of an image (any format, with its parent chain) as a binary file.

    ``mode`` "rb" or "r+b"; ``buffering=0`` returns the raw ``VirtualDiskIO``; ``options``
    are ``open_image``'s (``parent_dirs``, ``force``, ``ignore_parent_id``, ``format``,
    ``size_rule``). See ``vhdfs.fileobj.open``.
    """
    from .fileobj import open as open_disk

    return open_disk(path, mode, buffering, **options)
