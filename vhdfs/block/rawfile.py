"""One open image file: positional I/O, durability, and the lock that keeps writers apart.

Every driver goes through this so that "parents are opened O_RDONLY", "a second writer is
refused" and "short reads are errors, not zeros" hold in one place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator, Sequence

from ..errors import BusyError, FormatError, UsageError, VhdfsError

_ZEROS = bytes(1 << 20)
_MAX_RUN = 8 * 1024 * 1024   # cap on one joined write of parts


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error, just more to do)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise VhdfsError("no such file", path) from None
        except IsADirectoryError:
            raise VhdfsError("is a directory, not an image file", path) from None
        except PermissionError:
            raise VhdfsError("permission denied" + (" (opening for writing)" if writable else ""), path) from None
        except OSError as exc:
            raise VhdfsError(exc.strerror or str(exc), path) from None
        if lock:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self.fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    what = "is in use by another process" if writable else "is open for writing by another process"
                    raise BusyError(what, path) from None
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise VhdfsError(f"cannot lock: {exc.strerror}", path) from None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes or a FormatError naming what is missing."""
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise FormatError(
                    f"truncated: {length} bytes expected at offset {offset}, file ends at {self.size()}",
                    self.path)
            data += more
        return data

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
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
                    pending.append(memoryview(_ZEROS)[:min(len(_ZEROS), part - i)])
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
        os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1
