#!/usr/bin/env python3
"""A bare pyfuse3 + trio passthrough of ONE raw file: the Python ceiling for the benchmark.

It has the shape of the vhdfs daemon with none of the VHD work: a flat directory holding one
file, reads served by an inline ``os.preadv(..., RWF_NOWAIT)`` that falls back to a worker
thread when the data is not in the page cache (or the read comes back short), writes and
``fdatasync`` in worker threads under one ``trio.CapacityLimiter``. Two modes, matching vhdfs's:

* ``--mode direct`` (default): ``FileInfo.direct_io`` - 1 MiB read requests, no FUSE page cache;
* ``--mode cache``: ``FileInfo.keep_cache`` and long entry/attribute timeouts - the kernel page
  cache serves repeated reads without waking the daemon.

    python bench/passthrough.py [-w] [--mode direct|cache] [--name NAME] FILE MOUNTPOINT

Runs in the foreground until SIGINT/SIGTERM or ``fusermount3 -u MOUNTPOINT``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
LONG_TIMEOUT = 300.0  # as vhdfs --cache


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, path: str, name: str, writable: bool, cache: bool) -> None:
        super().__init__()
        self.writable = writable
        self.cache = cache
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.name = name.encode()
        self.limiter = trio.CapacityLimiter(8)
        self.timeout = LONG_TIMEOUT if cache else 1.0
        self.uid, self.gid = os.getuid(), os.getgid()

    # -- metadata ---------------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | (0o644 if self.writable else 0o444)
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = (self.size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = 2, 0, 0
        s.f_namemax = 255
        return s

    # -- data -------------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY and not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        fi = pyfuse3.FileInfo(fh=FILE_INODE)
        if self.cache:
            fi.keep_cache = True
        else:
            fi.direct_io = True
        return fi

    async def read(self, fh, off, size):
        if off >= self.size:
            return b""
        size = min(size, self.size - off)
        buf = bytearray(size)
        try:
            got = os.preadv(self.fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            got = 0
        if got < size:
            view = memoryview(buf)[got:]
            fd, pos = self.fd, off + got

            def _rest() -> int:
                return os.preadv(fd, [view], pos)

            got += await trio.to_thread.run_sync(_rest, limiter=self.limiter)
            return memoryview(buf)[:got]
        return buf

    async def write(self, fh, off, buf):
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return await trio.to_thread.run_sync(os.pwrite, self.fd, buf, off, limiter=self.limiter)

    async def fsync(self, fh, datasync):
        if self.writable:
            await trio.to_thread.run_sync(os.fdatasync, self.fd, limiter=self.limiter)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def _signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("mountpoint")
    p.add_argument("-w", "--rw", action="store_true", help="writable")
    p.add_argument("--mode", choices=("direct", "cache"), default="direct")
    p.add_argument("--name", help="name of the exposed file (default: <stem>.raw)")
    a = p.parse_args(argv)
    name = a.name or os.path.splitext(os.path.basename(a.file))[0] + ".raw"
    ops = Passthrough(a.file, name, a.rw, a.mode == "cache")
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=pyfuse3-passthrough", "subtype=passthrough"}
    if not a.rw:
        opts.add("ro")
    pyfuse3.init(ops, a.mountpoint, opts)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(ops.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
