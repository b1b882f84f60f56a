"""One open image file: positional I/O, durability, and the lock that keeps writers apart.

Every driver goes through this so that "parents are opened O_RDONLY", "a second writer is
refused" and "short reads are errors, not zeros" hold in one place.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import BusyError, FormatError, VhdfsError


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
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1
