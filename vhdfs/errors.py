"""The one exception tree of vhdfs.

Every failure a user can meet is a ``VhdfsError``. Each class carries exactly one errno (what
the FUSE boundary answers the kernel) and one exit code (what the CLI returns), so neither the
daemon nor the CLI needs its own table. The message is one line that names the file, because
that line is all a user sees.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class VhdfsError(Exception):
    """Base: something about an image or the command is wrong."""

    errno: int = errno.EIO
    exit_code: int = 1

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def with_path(self, path: str | os.PathLike[str]) -> VhdfsError:
        """Attach the file name once the caller knows it (parsers see only bytes)."""
        if self.path is None:
            self.path = os.fspath(path)
        return self


class FormatError(VhdfsError):
    """Bad magic, checksum, offsets past EOF, impossible sizes: the file is not a sane image."""

    errno = errno.EIO
    exit_code = 3


class NotAnImageError(FormatError):
    """No driver recognises the file: it is not an image of any format vhdfs reads."""

    errno = errno.EIO
    exit_code = 3


class UnsupportedError(FormatError):
    """A valid structure vhdfs does not handle; the message says which."""

    errno = errno.EOPNOTSUPP
    exit_code = 3


class ChainError(VhdfsError):
    """A differencing chain cannot be assembled: parent missing, UUID mismatch, loop, size."""

    errno = errno.ENOENT
    exit_code = 3


class ReadOnlyError(VhdfsError):
    """A write to something opened read-only (a read-only mount, or any parent)."""

    errno = errno.EROFS
    exit_code = 1


class BusyError(VhdfsError):
    """Another process holds the image for writing."""

    errno = errno.EBUSY
    exit_code = 4


class UsageError(VhdfsError):
    """The command line is wrong."""

    errno = errno.EINVAL
    exit_code = 2


_QUIET = [0]  # > 0 inside ``quiet()``


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings inside: for images opened only to be looked at in passing (a folder scan
    for differencing children), whose oddities are not what the user asked about."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def warn(message: str, path: str | os.PathLike[str] | None = None) -> None:
    """Report a tolerated oddity (bad checksum on a read-only open, ...) on stderr.

    Kept here so every layer warns the same way; tests capture it with ``capsys``.
    """
    import sys

    if _QUIET[0]:
        return
    where = f"{os.fspath(path)}: " if path is not None else ""
    print(f"vhdfs: warning: {where}{message}", file=sys.stderr)
