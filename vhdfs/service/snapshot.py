"""Snapshot children: a new differencing child over an image, so writes never reach the image.

Used by ``mount --snapshot`` (and the NBD export): the child gets the format of the image it
covers (any driver that can create differencing images), lives in ``$TMPDIR`` (default
``/var/tmp``, on disk rather than in RAM) unless the user keeps it, and is opened writable with
the image's folder searched for its parent. The child is ``0600``: it holds the writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from ..block.chain import open_image
from ..block.driver import driver
from ..block.image import Image
from ..errors import UsageError
from ..tools.create import create_image


@dataclass
class Snapshot:
    image: Image  # the child, open writable, its chain attached
    temp_child: str | None  # the child's path when it is to be removed at the end


def check_can_snapshot(img: Image) -> None:
    """Refuse an image whose format cannot have a differencing child, naming it."""
    d = driver(img.format)
    if d.create is None or "differencing" not in d.limits().types:
        raise UsageError(
            f"--snapshot needs an image format with differencing children "
            f"(this is {d.title}); convert it first",
            img.path,
        )


def stem(path: str) -> str:
    """``/a/disk.vhd`` → ``disk``: what exports of the image are named by."""
    return os.path.splitext(os.path.basename(path))[0]


def create_snapshot(base: Image, keep: str | None = None, **open_kwargs: object) -> Snapshot:
    """Make a differencing child over ``base`` (its top file) and open it writable.

    ``open_kwargs`` are ``open_image``'s keywords for the child (force, parent_dirs, ...); the
    base's folder is searched for the parent first.
    """
    check_can_snapshot(base)
    suffix = driver(base.format).suffixes[0]
    if keep:
        child, temp = os.path.abspath(keep), None
    else:
        folder = os.environ.get("TMPDIR") or "/var/tmp"
        fd, child = tempfile.mkstemp(prefix=f"vhdfs-snapshot-{stem(base.path)}-", suffix=suffix, dir=folder)
        os.close(fd)
        os.unlink(child)
        temp = child
    create_image(child, format=base.format, type="differencing", parent=base.path)
    dirs = [os.path.dirname(base.path), *open_kwargs.pop("parent_dirs", ())]  # type: ignore[misc]
    try:
        # It will hold what is written through the mount: private to its user, whatever the
        # umask (the exports follow the base's access, aio/access.py). Before any data.
        os.chmod(child, 0o600)
        img = open_image(child, True, parent_dirs=dirs, **open_kwargs)  # type: ignore[arg-type]
    except BaseException:
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    return Snapshot(img, temp)
