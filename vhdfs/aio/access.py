"""Who may read an exposed thing: never more than may read the image it comes from.

One rule for every front end (the FUSE files, the NBD export's Unix socket): an exposed disk
or partition gets the owner, group and permission bits of the image file the user named (the
top of a chain; a snapshot's base, never the daemon's own child). Read bits are the image's;
write bits are the image's only on a writable export, none otherwise; execute, set-id and
sticky bits are dropped. ``allow_other`` only lets other users reach the mount: the kernel
(``default_permissions``) then checks these bits, so nobody reads the disk who could not read
the image. Directory search permission on the image's folders is not copied (as with a hard
link, the file's own bits decide).

One exception keeps "a user mounts an image they can read" working: when the bits would refuse
the daemon's own non-root user what it needs (read, and write on a writable export) -- access
granted by an ACL, or a snapshot over a base the user may only read -- the exposed thing is
that user's alone (``0400``/``0600``, its uid and gid): still nobody else, and no wider than
what that user demonstrably has.

``chmod``/``chown`` of an exposed thing (:func:`changed`) follow qemu-storage-daemon's FUSE
export: its owner and root may change the mode, only root the owner or group, and no write bit
is ever added to a read-only export (EROFS, qsd's answer: "+w for read-only exports makes no
sense"). Changes live in memory for the life of the export; the image file is never touched.
No pyfuse3 or trio here: every front end imports it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace

READ_BITS = 0o444
WRITE_BITS = 0o222


@dataclass(frozen=True)
class Access:
    """Permission bits (no file type), owner and group of an exposed thing."""

    mode: int
    uid: int
    gid: int

    def for_writable(self, writable: bool) -> Access:
        """What to report now: no write bit while the export is read-only (e.g. after failsafe)."""
        return self if writable else replace(self, mode=self.mode & ~WRITE_BITS)


def private(writable: bool) -> Access:
    """The daemon's user only (``0400``, ``0600`` writable): the fallback, and the default."""
    return Access(0o600 if writable else 0o400, os.geteuid(), os.getegid())


def exposed_access(
    source: str | int | os.stat_result,
    writable: bool,
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: Iterable[int] = (),
) -> Access:
    """The access of a thing exposing the image ``source`` (a path, an open fd, or its stat).

    Pass the file the user named: for a chain its top, for a snapshot the base, not the child.
    ``uid``, ``gid`` and supplementary ``groups`` are the serving process's (default: this
    process's effective ones); they matter only for the non-root fallback (module docstring).
    """
    if isinstance(source, os.stat_result):
        st = source
    elif isinstance(source, int):
        st = os.fstat(source)
    else:
        st = os.stat(source)
    bits = stat.S_IMODE(st.st_mode)
    mode = (bits & READ_BITS) | ((bits & WRITE_BITS) if writable else 0)
    derived = Access(mode, st.st_uid, st.st_gid)
    if uid is None:
        uid, gid, groups = os.geteuid(), os.getegid(), os.getgroups()
    if uid == 0:
        return derived  # root passes the kernel's check anyway; others get the image's bits
    gid = os.getegid() if gid is None else gid
    need = 0o6 if writable else 0o4
    if _class_bits(derived, uid, {gid, *groups}) & need != need:
        return Access(0o600 if writable else 0o400, uid, gid)
    return derived


def _class_bits(a: Access, uid: int, groups: set[int]) -> int:
    """The rwx triple the kernel applies to ``uid`` (owner, else group, else other)."""
    if uid == a.uid:
        return (a.mode >> 6) & 7
    if a.gid in groups:
        return (a.mode >> 3) & 7
    return a.mode & 7


def changed(
    current: Access,
    caller_uid: int,
    writable: bool,
    *,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> Access:
    """``current`` after a chmod (``mode``) and/or chown (``uid``, ``gid``) by ``caller_uid``.

    Raises ``PermissionError`` (EPERM) when the caller is neither root nor the owner, or is not
    root and changes the owner or group (a value equal to the current one is no change); and
    ``OSError(EROFS)`` when the new mode has a write bit on a read-only export. Only
    permission bits are kept (``mode & 0o777``): no set-id bit, which the kernel would have
    to clear on every write.
    """
    if caller_uid != 0:
        if caller_uid != current.uid:
            raise PermissionError(errno.EPERM, "only the owner or root may change this file")
        if (uid is not None and uid != current.uid) or (gid is not None and gid != current.gid):
            raise PermissionError(errno.EPERM, "only root may change the owner or group")
    new = current
    if mode is not None:
        bits = stat.S_IMODE(mode) & 0o777
        if not writable and bits & WRITE_BITS:
            raise OSError(errno.EROFS, "a read-only export cannot be made writable")
        new = replace(new, mode=bits)
    if uid is not None:
        new = replace(new, uid=uid)
    if gid is not None:
        new = replace(new, gid=gid)
    return new


def socket_mode(a: Access) -> int:
    """Bits for a Unix socket serving the export: connecting needs write permission on a
    socket, so every class that may read the image gets ``rw`` (the export itself still
    refuses writes when read-only)."""
    r = a.mode & READ_BITS
    return r | (r >> 1)
