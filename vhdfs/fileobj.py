"""``vhdfs.open``: the virtual disk of any image or chain as a seekable binary file object.

The convention of ``gzip.open`` and ``lzma.open``: Python tools that take a file (dissect,
pytsk3's ``Img_Info`` pattern, ``tarfile``, ``shutil``, ``hashlib``) read a VHD or VDI as the
flat disk it holds::

    import vhdfs
    with vhdfs.open("child.vhd", parent_dirs=["/srv/parents"]) as disk:
        disk.seek(446)
        mbr_partitions = disk.read(64)

``VirtualDiskIO`` is the ``io.RawIOBase``; ``open`` wraps it in a ``BufferedReader`` ("rb") or
``BufferedRandom`` ("r+b") as the builtin ``open`` does (``buffering=0`` returns the raw object).
Reads and writes go through ``Image.read``/``Image.write``, so a differencing chain, its parents
(read-only) and the crash guarantees are exactly those of the block layer and of a mount.

Errors: opening raises the block layer's ``VhdfsError`` (not an image, parent missing, busy...).
Once open, every failure is an ``OSError`` naming the image (a ``VhdfsError`` is its
``__cause__``), and a file object that met an I/O failure stays failed: every later call raises,
so it can never hand back bytes from a half-known state.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Any, cast

from .block.chain import open_image
from .block.extent import Kind
from .block.image import Image
from .errors import VhdfsError

DEFAULT_BUFFER_SIZE = 128 * 1024  # a disk is read in larger pieces than a text file
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class VirtualDiskIO(io.RawIOBase):
    """A raw, seekable binary file over an open ``Image`` (which it owns and closes)."""

    def __init__(self, image: Image, name: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.image = image
        self.name = os.fspath(name) if name is not None else image.path
        self.mode = "rb+" if image.writable else "rb"
        self._pos = 0
        self._failed: BaseException | None = None
        self._closing = False

    # -- what this object is ----------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk's size in bytes (fixed: writes never grow it)."""
        return self.image.size

    def readable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return self.image.writable

    def seekable(self) -> bool:
        self._check_open()
        return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"size={self.image.size}"
        return f"<vhdfs.VirtualDiskIO name={self.name!r} mode={self.mode!r} {state}>"

    # -- position -----------------------------------------------------------------------------

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """SEEK_SET, SEEK_CUR, SEEK_END; also SEEK_DATA/SEEK_HOLE over the chain's extents.

        Seeking past the end is allowed (reads there return b""), as on a file; a negative
        position is EINVAL.
        """
        self._check_open()
        offset = offset.__index__()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.image.size + offset
        elif whence in (_SEEK_DATA, _SEEK_HOLE):
            pos = self._seek_data_hole(offset, whence == _SEEK_DATA)
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self._pos = pos
        return pos

    def _seek_data_hole(self, offset: int, data: bool) -> int:
        """lseek(2)'s rule: ENXIO at or past the end; the end is an implicit hole."""
        if offset < 0 or offset >= self.image.size:
            raise OSError(errno.ENXIO, "no such device or address (offset at or past the end)", self.name)
        self._check_usable()
        found: int | None = None
        try:
            for ext in self.image.extents(offset):
                if (ext.kind == Kind.DATA) == data:
                    found = max(ext.offset, offset)
                    break
        except (VhdfsError, OSError) as exc:
            self._fail(exc)
        if found is not None:
            return found
        if data:
            raise OSError(errno.ENXIO, "no data after this offset", self.name)
        return self.image.size

    # -- reading ---------------------------------------------------------------------------

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current position with one ``Image.read``; 0 at the end."""
        self._check_usable()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.image.size - self._pos))
        if n == 0:
            return 0
        data = self._guarded(self.image.read, self._pos, n)
        if len(data) != n:  # Image.read is short only at the end of the disk
            self._fail(VhdfsError(f"short read: {len(data)} of {n} bytes at {self._pos}", self.image.path))
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        """The rest of the disk in one read (RawIOBase's default reads 8 KiB at a time)."""
        self._check_usable()
        n = max(0, self.image.size - self._pos)
        if n == 0:
            return b""
        data = self._guarded(self.image.read, self._pos, n)
        self._pos += len(data)
        return data

    # -- writing ---------------------------------------------------------------------------

    def write(self, buffer: Any) -> int:
        """All of ``buffer`` at the current position through ``Image.write``, or nothing.

        The disk never grows: a write reaching past its end writes nothing and raises ENOSPC.
        """
        self._check_open()
        if not self.image.writable:
            raise io.UnsupportedOperation("not writable (opened with mode 'rb'; use 'r+b')")
        view = memoryview(buffer).cast("B")
        if len(view) and self._pos + len(view) > self.image.size:
            raise OSError(
                errno.ENOSPC,
                f"write of {len(view)} bytes at offset {self._pos} goes past the end of "
                f"the virtual disk ({self.image.size} bytes)",
                self.name,
            )
        if len(view):
            self._guarded(self.image.write, self._pos, view)
            self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("a virtual disk has a fixed size; it cannot be truncated")

    def flush(self) -> None:
        """Make every write so far durable in the image (metadata commit + fdatasync).

        After a failure of a writable file this raises: writes may not have reached the image.
        """
        if self.closed or self._closing or not self.image.writable:
            return
        self._guarded(self.image.flush)

    def close(self) -> None:
        """Flush (when writable), then close the image and every parent it opened."""
        if self.closed:
            return
        self._closing = True
        try:
            if self._failed is None and self.image.writable:
                self._guarded(self.image.flush)
        finally:
            try:
                self.image.close()
            except (VhdfsError, OSError) as exc:
                if self._failed is None:
                    raise _os_error(exc, self.name) from exc
            finally:
                super().close()

    # -- failures ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise OSError(
                errno.EIO, f"unusable after an earlier error ({self._failed})", self.name
            ) from self._failed

    def _guarded(self, fn: Any, *args: Any) -> Any:
        """Run a block-layer call; its failure becomes an OSError and this object stays failed."""
        self._check_usable()
        try:
            return fn(*args)
        except (VhdfsError, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        raise _os_error(exc, self.name) from exc


def _os_error(exc: BaseException, name: str) -> OSError:
    if isinstance(exc, VhdfsError):
        return OSError(exc.errno, exc.message, exc.path or name)
    if isinstance(exc, OSError):
        return OSError(exc.errno or errno.EIO, exc.strerror or str(exc), exc.filename or name)
    return OSError(errno.EIO, str(exc), name)


class DiskBufferedRandom(io.BufferedRandom):
    """``BufferedRandom`` whose ``flush()`` also makes the writes durable in the image.

    The plain one only hands its buffer to the raw object; here ``flush()`` means what
    ``fsync`` means on a mounted image, so ``f.flush()`` is the one call a user needs.
    """

    def write(self, buffer: Any) -> int:
        """Buffered, but a write past the end of the disk fails here, not at a later flush."""
        length = memoryview(buffer).nbytes
        size = cast(VirtualDiskIO, self.raw).size
        if not self.closed and self.tell() + length > size:
            raise OSError(
                errno.ENOSPC,
                f"write of {length} bytes at offset {self.tell()} goes past the end of "
                f"the virtual disk ({size} bytes)",
                self.name,
            )
        return super().write(buffer)

    def flush(self) -> None:
        super().flush()
        if not self.closed:
            self.raw.flush()


def open(
    path: str | os.PathLike[str], mode: str = "rb", buffering: int = -1, **options: Any
) -> io.BufferedReader | io.BufferedRandom | VirtualDiskIO:
    """Open the virtual disk of ``path`` (any format vhdfs reads, with its parent chain).

    ``mode`` is "rb" (read-only; parents are always read-only) or "r+b" (write the top image;
    an exclusive lock refuses a second writer). ``buffering=0`` returns the raw
    ``VirtualDiskIO``; otherwise a buffered file (``buffering`` > 1 is the buffer size).
    ``options`` are ``open_image``'s: ``parent_dirs``, ``force``, ``ignore_parent_id``,
    ``format`` and format options such as ``size_rule="chs"``.
    """
    writable = _parse_mode(mode)
    if not isinstance(buffering, int):
        raise TypeError("buffering must be an integer")
    image = open_image(path, writable, **options)
    try:
        raw = VirtualDiskIO(image, path)
    except BaseException:
        image.close()
        raise
    if buffering == 0:
        return raw
    size = buffering if buffering > 1 else DEFAULT_BUFFER_SIZE
    return DiskBufferedRandom(raw, size) if writable else io.BufferedReader(raw, size)


def _parse_mode(mode: str) -> bool:
    """True for a writable mode; only "rb" and "r+b" (in any order, "b" optional) exist."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rb+") or "r" not in chars:
        raise ValueError(
            f"invalid mode {mode!r}: a virtual disk opens as 'rb' or 'r+b' "
            "(it is never created, truncated or appended to here)"
        )
    return "+" in chars


__all__ = ["DiskBufferedRandom", "VirtualDiskIO", "open"]
