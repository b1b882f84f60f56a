"""pyfuse3 Operations: one flat directory of raw files, with one error boundary.

Every handler goes through ``_guard``: a ``VhdfsError`` answers its errno, an ``OSError`` its
own errno, and anything unexpected is logged, answered with EIO and switches the whole mount to
read-only ("failsafe", as s3ql does) -- because an exception escaping a pyfuse3 handler kills
the daemon and leaves "Transport endpoint is not connected" behind. Handlers that a flat,
fixed directory cannot honour (create, unlink, rename ...) answer EROFS/EPERM, never ENOSYS:
the kernel would remember ENOSYS for the life of the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from ..aio.access import changed
from ..aio.export import Export
from ..aio.image import AsyncImage
from ..errors import VhdfsError

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
ROOT = pyfuse3.ROOT_INODE
ATTR_TIMEOUT = 300.0  # seconds the kernel keeps entries and attributes (see __init__)


def _guard(
    fn: Callable[Concatenate[VhdfsOperations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[VhdfsOperations, P], Coroutine[Any, Any, T]]:
    """The single error-mapping wrapper of every FUSE handler (keeps the handler's signature)."""

    @functools.wraps(fn)
    async def wrapper(self: VhdfsOperations, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except VhdfsError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r; switching the mount to read-only", fn.__name__, args[:2])
            self.enter_failsafe()
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _invalidate(inode: int, attr_only: bool) -> None:
    """``pyfuse3.invalidate_inode``; ENOENT (the kernel never looked the file up, or forgot it)
    means there is nothing cached to drop, so the next file is still invalidated."""
    try:
        pyfuse3.invalidate_inode(inode, attr_only=attr_only)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


class VhdfsOperations(pyfuse3.Operations):
    """The mount: ``files`` in one root directory, inodes 2, 3, ... in the given order."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, files: Sequence[Export], direct_io: bool = False) -> None:
        super().__init__()
        self.files: dict[int, Export] = {ROOT + 1 + i: f for i, f in enumerate(files)}
        self.by_name: dict[bytes, int] = {os.fsencode(f.name): ino for ino, f in self.files.items()}
        self.failsafe = False
        # The kernel page cache (keep_cache, no direct_io) is the default: warm reads never
        # reach Python, small reads get the kernel's readahead. It stays coherent because
        # writes through the mount go through it, a rollback invalidates it (invalidate_image),
        # and files whose bytes overlap (a disk and its partitions) are never cached while
        # writable: a write through one would leave the other's pages stale. Those, and every
        # file with --direct-io, use direct_io (no page cache, one request per read).
        by_image: dict[int, list[int]] = {}
        for ino, f in self.files.items():
            by_image.setdefault(id(f.shared), []).append(ino)
        self.direct_io_inodes: set[int] = {
            ino
            for inos in by_image.values()
            for ino in inos
            if direct_io or (self.files[ino].writable and len(inos) > 1)
        }
        # Attributes are kept long (fewer getattr round trips: with auto_inval_data the kernel
        # asks before a read once they expire): sizes never change while mounted, chmod/chown
        # answer with the new attributes, and st_blocks, which writes change, is re-announced
        # by the committer (``AsyncImage.announce_allocation`` -> ``refresh_attributes``).
        self.attr_timeout = ATTR_TIMEOUT
        self.mtime_ns = time.time_ns()

    def watch_images(self) -> None:
        """Once mounted: a rolled-back write makes the kernel drop that image's cached pages, and
        a change of what is allocated makes it ask for the files' attributes again."""
        for shared in self.shared_images:
            shared.on_rollback = functools.partial(self.invalidate_image, shared)
            shared.on_allocation_changed = functools.partial(self.refresh_attributes, shared)

    def refresh_attributes(self, shared: AsyncImage) -> None:
        """Drop the kernel's cached attributes (never its pages) of every file of ``shared``."""
        for ino, f in self.files.items():
            if f.shared is shared:
                _invalidate(ino, attr_only=True)

    def invalidate_image(self, shared: AsyncImage) -> None:
        """Drop the kernel's cached pages of every file of ``shared`` (from a worker thread)."""
        for ino, f in self.files.items():
            if f.shared is shared and ino not in self.direct_io_inodes:
                _invalidate(ino, attr_only=False)

    @property
    def shared_images(self) -> list[AsyncImage]:
        """Each open image once (partition files share their disk's)."""
        seen: dict[int, AsyncImage] = {}
        for f in self.files.values():
            seen.setdefault(id(f.shared), f.shared)
        return list(seen.values())

    def enter_failsafe(self) -> None:
        """Refuse every further write: after an unexpected error the metadata may be suspect."""
        if not self.failsafe:
            self.failsafe = True
            for shared in self.shared_images:
                shared.writable = False
            log.error("failsafe: the mount is now read-only; unmount and check the image")

    def _file(self, inode: int) -> Export:
        try:
            return self.files[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _any_writable(self) -> bool:
        return any(s.writable for s in self.shared_images)

    async def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = self.attr_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 1 << 20
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.mtime_ns
        if inode == ROOT:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
            entry.st_blocks = 0
            return entry
        f = self._file(inode)
        access = f.access.for_writable(f.writable)  # the image's owner and bits (aio/access.py)
        entry.st_mode = stat.S_IFREG | access.mode
        entry.st_uid = access.uid
        entry.st_gid = access.gid
        entry.st_nlink = 1
        entry.st_size = f.size
        entry.st_blocks = (await f.allocated_bytes() + 511) // 512
        return entry

    # -- metadata ---------------------------------------------------------------------------

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return await self._attrs(inode)

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return await self._attrs(ROOT)
        inode = self.by_name.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attrs(inode)

    @_guard
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Timestamps are accepted (``touch`` works) and ignored; the size is fixed. A file's mode
        and owner change in memory as ``aio.access.changed`` allows (its owner or root; never
        a write bit on a read-only file); the folder's are fixed."""
        want_access = fields.update_mode or fields.update_uid or fields.update_gid
        if inode == ROOT:
            if want_access:
                raise pyfuse3.FUSEError(errno.EPERM)
            return await self._attrs(inode)
        f = self._file(inode)
        if fields.update_size and attr.st_size != f.size:
            raise pyfuse3.FUSEError(errno.EROFS if not f.writable else errno.EPERM)
        if want_access:
            try:
                f.access = changed(
                    f.access,
                    ctx.uid,
                    f.writable,
                    mode=attr.st_mode if fields.update_mode else None,
                    uid=attr.st_uid if fields.update_uid else None,
                    gid=attr.st_gid if fields.update_gid else None,
                )
            except OSError as exc:  # a refusal, not a fault: no warning in the log
                raise pyfuse3.FUSEError(exc.errno or errno.EPERM) from None
            log.info(
                "%s: now mode %04o, owner %d:%d (by uid %d)",
                f.name,
                f.access.mode,
                f.access.uid,
                f.access.gid,
                ctx.uid,
            )
        return await self._attrs(inode)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 512
        st.f_blocks = sum((f.size + 511) // 512 for f in self.files.values())
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.files) + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- directory --------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for inode in sorted(self.files):
            if inode <= start_id:
                continue
            name = os.fsencode(self.files[inode].name)
            if not pyfuse3.readdir_reply(token, name, await self._attrs(inode), inode):
                break

    @_guard
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- files ------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        f = self._file(inode)
        if flags & (os.O_WRONLY | os.O_RDWR) and not f.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM if f.writable else errno.EROFS)
        # Default: the kernel page cache, kept across opens. direct_io: see __init__.
        direct = inode in self.direct_io_inodes
        return pyfuse3.FileInfo(fh=inode, direct_io=direct, keep_cache=not direct)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._file(fh).read(off, size)  # type: ignore[return-value]

    @_guard
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` (the only ones the kernel sends), so ``cp``, ``qemu-img``
        and ``rsync`` skip unallocated space. Reached only with vendor/'s pyfuse3 (lseek
        patch, scripts/install.sh); a stock pyfuse3 never calls it and the kernel then treats
        the whole file as data."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        pos = await self._file(fh).seek(off, whence == os.SEEK_HOLE)
        if pos is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return pos

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._file(fh).write(off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self._file(fh).shared.flush()

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._file(fh).shared.flush()

    @_guard
    async def release(self, fh: int) -> None:
        return None

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not (inode != ROOT and mode & os.W_OK and not self._file(inode).writable)

    # -- a fixed directory: nothing is created, removed or renamed ---------------------------

    def _fixed(self) -> pyfuse3.FUSEError:
        return pyfuse3.FUSEError(errno.EPERM if self._any_writable() else errno.EROFS)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> Any:
        raise self._fixed()

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> Any:
        raise self._fixed()

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        raise self._fixed()

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._fixed()

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._fixed()

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise self._fixed()

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> Any:
        raise self._fixed()

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> Any:
        raise self._fixed()
