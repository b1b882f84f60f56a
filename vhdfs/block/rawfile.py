"""One open image file: positional I/O, durability, and the lock that keeps writers apart.

Every driver goes through this so that "parents are opened O_RDONLY", "a second writer is
refused" and "short reads are errors, not zeros" hold in one place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ..errors import BusyError, FormatError, UsageError, VhdfsError

T = TypeVar("T")

_ZEROS = bytes(1 << 20)
_MAX_RUN = 8 * 1024 * 1024  # cap on one joined write of parts


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error, just more to do).

    A write that makes no progress (past the end of a block device) is ENOSPC, never a loop.
    """
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left: write past the end of the device")
        done += n


@contextlib.contextmanager
def named_errors(path: str) -> Iterator[None]:
    """Give an ``OSError`` from I/O on an fd the file's name (errno and class unchanged), so
    a user never sees a bare "Input/output error"."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise


# -- what may be an image -------------------------------------------------------------------
#
# An image is a regular file or a block device (an LVM volume, a USB disk, a loop device).
# Anything else is refused by name before it is read: a FIFO or a socket would block forever,
# a character device (/dev/zero) never ends. The one rule lives here and is used by
# ``RawFile`` (every driver's open), ``chain.probe_format`` and the parent search.

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
)


def refuse_kind(st: os.stat_result, path: str | os.PathLike[str]) -> None:
    """Raise unless ``st`` is a regular file or a block device, saying what it is instead."""
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise VhdfsError(f"is {what}, not an image file or a block device", path)


def stat_image(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of a would-be image, refusing other kinds by name (nothing is opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VhdfsError("no such file", path) from None
    except OSError as exc:
        raise VhdfsError(exc.strerror or str(exc), path) from None
    refuse_kind(st, path)
    return st


def open_image_fd(path: str | os.PathLike[str], writable: bool = False) -> tuple[int, os.stat_result]:
    """Open a regular file or block device for image I/O; anything else is refused by name.

    ``stat`` first, so a FIFO or a character device is never even opened; then the open itself
    is ``O_NONBLOCK | O_NOCTTY`` (a FIFO swapped in meanwhile cannot block it, a tty cannot
    become ours) and ``fstat`` of the fd decides, so the check holds for what was opened.
    A block device opened for writing also gets ``O_EXCL``: the kernel then refuses the open
    while the device is mounted or held exclusively (and refuses mounts while we hold it).
    """
    st = stat_image(path)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if writable and stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise VhdfsError("no such file", path) from None
    except IsADirectoryError:
        raise VhdfsError("is a directory, not an image file or a block device", path) from None
    except PermissionError:
        raise VhdfsError("permission denied" + (" (opening for writing)" if writable else ""), path) from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise BusyError(
                "block device is in use (mounted, or held open exclusively by another program)", path
            ) from None
        raise VhdfsError(exc.strerror or str(exc), path) from None
    try:
        st = os.fstat(fd)
        refuse_kind(st, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def fd_size(fd: int, st: os.stat_result | None = None) -> int:
    """Bytes in the open file: ``st_size``, or for a block device its size (``st_size`` is 0).

    ``lseek(SEEK_END)`` is the portable form of ``BLKGETSIZE64``; every read and write here is
    positional, so moving the fd's offset is harmless.
    """
    st = st if st is not None else os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


@contextlib.contextmanager
def new_file(path: str) -> Iterator[int]:
    """Create ``path`` exclusively and yield its fd; fsync on success, remove it on any failure.

    O_EXCL means a file someone else made (even between our check and this call) is never
    touched; only the file this call created is ever removed.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UsageError("already exists (refusing to overwrite it)", path) from None
    except OSError as exc:
        raise VhdfsError(f"cannot create: {exc.strerror or exc}", path) from None
    try:
        yield fd
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError) and not isinstance(exc, VhdfsError):
            raise VhdfsError(f"cannot write: {exc.strerror or exc}", path) from None
        raise
    os.close(fd)


class RawFile:
    """A file opened read-only (shared lock) or read-write (exclusive lock)."""

    def __init__(self, path: str, writable: bool = False, lock: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.writable = writable
        self.fd, st = open_image_fd(path, writable)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        # flock works on a block device's fd too (it locks the device node), so readers and
        # writers through the same node exclude each other as on a file; O_EXCL (above) adds
        # the kernel's own claim against mounts and other exclusive openers of the device.
        if lock:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self.fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    what = (
                        "is in use by another process"
                        if writable
                        else "is open for writing by another process"
                    )
                    raise BusyError(what, path) from None
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise VhdfsError(f"cannot lock: {exc.strerror}", path) from None

    def size(self) -> int:
        """The file's size; a block device's size from the device (its ``st_size`` is 0)."""
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes or a FormatError naming what is missing."""
        with named_errors(self.path):
            data = os.pread(self.fd, length, offset)
        while len(data) < length:
            with named_errors(self.path):
                more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise FormatError(
                    f"truncated: {length} bytes expected at offset {offset}, file ends at {self.size()}",
                    self.path,
                )
            data += more
        return data

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with named_errors(self.path):
            write_all(self.fd, data, offset)

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview | int], offset: int) -> None:
        """Write buffers (or ``int`` counts of zero bytes) back to back at ``offset``.

        Everything goes through ``pwrite`` (one call per contiguous run; zero runs in bounded
        pieces), so tests that record a file's writes see every byte we put there.
        """
        pending: list[bytes | bytearray | memoryview] = []
        size = 0
        for part in parts:
            if isinstance(part, int):
                for i in range(0, part, len(_ZEROS)):
                    pending.append(memoryview(_ZEROS)[: min(len(_ZEROS), part - i)])
                    size += len(pending[-1])
                    if size >= _MAX_RUN:
                        self.pwrite(pending[0] if len(pending) == 1 else b"".join(pending), offset)
                        offset, pending, size = offset + size, [], 0
            elif len(part):
                pending.append(part)
                size += len(part)
        if pending:
            self.pwrite(pending[0] if len(pending) == 1 else b"".join(pending), offset)

    def sync(self) -> None:
        with named_errors(self.path):
            os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def open_layer_file(path: str, writable: bool, title: str, body: Callable[[RawFile], T]) -> T:
    """Open ``path`` and hand it to ``body``, the driver's parser; on any failure close it again.

    A driver's low-level decoding errors on hostile input (struct, index, value, size, Unicode)
    become one ``FormatError`` line naming the file; ``VhdfsError`` gets the file's name.
    """
    f = RawFile(path, writable)
    try:
        return body(f)
    except VhdfsError as exc:
        f.close()
        raise exc.with_path(f.path) from None
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError, UnicodeError) as exc:
        f.close()
        raise FormatError(f"corrupt {title} metadata ({type(exc).__name__}: {exc})", f.path) from None
    except BaseException:
        f.close()
        raise
