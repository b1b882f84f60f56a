"""What the nbdkit plugin does, as plain Python: the images, their exports, every request.

``plugin.py`` is only nbdkit's glue around this (callback names, flags, errno); everything
here runs and is testable in any interpreter, without nbdkit.

Threads (nbdkit's PARALLEL model: many connections, up to 16 requests in flight each, every
callback on some nbdkit thread, Python code serialised by the GIL, ``os.preadv``/``pwrite``/
``fdatasync`` releasing it):

* Every connection to an export shares the process's one ``Image`` per image file (opened at
  ``get_ready``), so a flush on any connection makes every connection's acknowledged writes
  durable, which is what NBD's multi-conn promises.
* The write rule is the block layer's, the same one the FUSE mount relies on: ``Image.write``
  writes in place (data over an already mapped range: no lock at all) or, when it must
  allocate a block or set bitmap bits, holds ``image.meta_lock`` across plan, write and
  publish (``formats/vhd/sparse.py``, ``formats/vdi/image.py``). ``Image.discard`` takes the
  same lock. Reads take no lock: drivers publish a mapping only after its data is written, so
  a concurrent reader sees either the old mapping or the complete new one. The FUSE side's
  ``trio.Lock`` only keeps its worker threads from queueing on ``meta_lock``; it is no part
  of consistency, so nothing of it is repeated here.
* Group commit: ``image.auto_commit`` is off and a committer thread writes pending metadata
  every ``commit_interval`` seconds (or at once when a write finds a commit due), as the FUSE
  daemon's committer does: a killed server loses at most about a second of unflushed writes,
  never an acknowledged flush. A background commit that fails is reported as EIO at the next
  flush of that image.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from ..block.chain import open_image
from ..block.exports import Exposed, Window, plan_exports
from ..block.extent import Kind
from ..block.image import Image
from ..errors import ReadOnlyError, UsageError, VhdfsError

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)
EXTENTS_SPAN = 1 << 30  # one block-status reply covers at most this much (clients ask again)
ZERO_CHUNK = 1 << 20


def errno_of(exc: BaseException) -> int:
    """The errno a client should see for ``exc``."""
    if isinstance(exc, VhdfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


@dataclass
class Config:
    """The plugin's parameters, as nbdkit passes them (``key=value`` after the script name).

    ``image=PATH`` may repeat; ``name=STEM`` right after it names that image's exports (a
    snapshot child is exported under its base's name). ``to_args`` writes what ``apply``
    reads, so ``vhdfs serve`` and a hand-written ``nbdkit python plugin.py ...`` agree.
    """

    images: list[list[str | None]] = field(default_factory=list)  # [path, name or None]
    writable: bool = False
    parent_dirs: list[str] = field(default_factory=list)
    force: bool = False
    ignore_parent_id: bool = False
    format: str | None = None
    partitions: bool = True
    options: dict[str, str] = field(default_factory=dict)  # driver options (size_rule=chs)
    verdict: str | None = None  # where cleanup records whether every image closed cleanly
    commit_interval: float = 1.0

    _BOOLS: ClassVar[frozenset[str]] = frozenset({"writable", "force", "ignore_parent_id", "partitions"})

    def apply(self, key: str, value: str) -> None:
        key = key.replace("-", "_")
        if key == "image":
            self.images.append([os.path.abspath(value), None])
        elif key == "name":
            if not self.images or self.images[-1][1] is not None:
                raise UsageError("name= must follow the image= it names")
            self.images[-1][1] = value
        elif key == "parent_dir":
            self.parent_dirs.append(os.path.abspath(value))
        elif key in self._BOOLS:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UsageError(f"{key}= takes a boolean, not {value!r}")
            setattr(self, key, value.lower() in ("1", "true", "yes", "on"))
        elif key == "format":
            self.format = None if value == "auto" else value
        elif key == "verdict":
            self.verdict = os.path.abspath(value)
        elif key == "commit_interval":
            self.commit_interval = float(value)
        else:
            from ..block.driver import drivers

            if key not in {o.name for d in drivers() for o in d.options}:
                raise UsageError(f"unknown parameter {key}=")
            self.options[key] = value

    def to_args(self) -> list[str]:
        out: list[str] = []
        for path, name in self.images:
            out.append(f"image={path}")
            if name is not None:
                out.append(f"name={name}")
        for d in self.parent_dirs:
            out.append(f"parent_dir={d}")
        for key in sorted(self._BOOLS):
            out.append(f"{key}={int(getattr(self, key))}")
        if self.format:
            out.append(f"format={self.format}")
        out += [f"{k}={v}" for k, v in sorted(self.options.items())]
        if self.verdict:
            out.append(f"verdict={self.verdict}")
        out.append(f"commit_interval={self.commit_interval:g}")
        return out

    def check(self) -> None:
        if not self.images:
            raise UsageError("give at least one image=PATH")

    def open_images(self) -> list[Exposed]:
        """Open every image with its chain, as the exports will use them; close all on failure."""
        from ..service.snapshot import stem

        opened: list[Exposed] = []
        try:
            for path, name in self.images:
                assert path is not None  # only a name may be None
                img = open_image(
                    path,
                    self.writable,
                    parent_dirs=self.parent_dirs,
                    force=self.force,
                    ignore_parent_id=self.ignore_parent_id,
                    format=self.format,
                    **self.options,
                )
                opened.append(Exposed(name or stem(path), img, self.writable))
        except BaseException:
            for ex in opened:
                ex.image.close()
            raise
        return opened


class Shared:
    """One open image and what every export of it shares: the commit-failure latch."""

    def __init__(self, exposed: Exposed) -> None:
        self.image: Image = exposed.image
        self.writable = exposed.writable
        self.commit_failed: Exception | None = None
        self.latch = threading.Lock()

    def commit_pending(self) -> None:
        """Write pending metadata (never raises: a failure waits for the next flush)."""
        if not (self.writable and self.image.has_pending_metadata()):
            return
        try:
            self.image.commit()
        except Exception as exc:
            log.error("%s: background commit failed: %s", self.image.path, exc)
            with self.latch:
                self.commit_failed = exc

    def flush(self) -> None:
        if not self.writable:
            return
        self.image.flush()
        with self.latch:
            failed, self.commit_failed = self.commit_failed, None
        if failed is not None:
            raise OSError(errno.EIO, f"an earlier background commit failed: {failed}")


class Server:
    """Every image of one nbdkit process, its exports, and the committer thread."""

    def __init__(self, config: Config) -> None:
        config.check()
        self.config = config
        self.exposed = config.open_images()
        try:
            self.windows = plan_exports(self.exposed, partitions=config.partitions)
        except BaseException:
            for ex in self.exposed:
                ex.image.close()
            raise
        self.by_name = {w.name: w for w in self.windows}
        self.shared = {id(ex): Shared(ex) for ex in self.exposed}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def default_export(self) -> str:
        return self.windows[0].name

    def describe(self, w: Window) -> str:
        img = w.exposed.image
        what = f"{img.format} {img.type}"
        if w.partition:
            return f"partition {w.partition} of {os.path.basename(img.path)} ({what})"
        return f"{os.path.basename(img.path)} ({what}, {img.size} bytes)"

    def list_exports(self) -> list[tuple[str, str]]:
        return [(w.name, self.describe(w)) for w in self.windows]

    def start_committer(self) -> None:
        """Start the committer (after nbdkit forked: threads do not survive a fork)."""
        with self._start_lock:
            if self._committer is not None or not any(s.writable for s in self.shared.values()):
                return
            for s in self.shared.values():
                s.image.auto_commit = False
            self._committer = threading.Thread(target=self._commit_loop, name="vhdfs-commit", daemon=True)
            self._committer.start()

    def _commit_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.commit_interval)
            self._wake.clear()
            for s in self.shared.values():
                s.commit_pending()

    def wake_committer(self) -> None:
        self._wake.set()

    def connect(self, name: str, readonly: bool) -> Handle:
        """A handle on export ``name`` ('' is the default); ENOENT for a name we do not serve."""
        self.start_committer()
        w = self.by_name.get(name or self.default_export)
        if w is None and name.endswith(".raw"):
            w = self.by_name.get(name[:-4])  # the mount's file name works too
        if w is None:
            raise OSError(errno.ENOENT, f"no export called {name!r}")
        return Handle(self, w, readonly or not w.exposed.writable)

    def close(self) -> bool:
        """Stop committing, flush and close every image; record the verdict. True when clean."""
        self._stop.set()
        self._wake.set()
        if self._committer is not None:
            self._committer.join(timeout=60)
        ok = True
        for ex in self.exposed:
            s = self.shared[id(ex)]
            try:
                s.flush()
            except Exception as exc:
                ok = False
                log.error("%s: flush failed: %s", ex.image.path, exc)
            try:
                ex.image.close()
            except Exception as exc:
                ok = False
                log.error("%s: close failed: %s", ex.image.path, exc)
        if self.config.verdict:
            write_verdict(self.config.verdict, ok, [ex.image.path for ex in self.exposed])
        return ok


def write_verdict(path: str, clean: bool, images: Iterable[str]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "clean": clean, "images": list(images)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Handle:
    """One client connection to one export: requests clipped to the export's window.

    nbdkit has already refused requests past ``size``, writes on a read-only connection and
    unsupported flags; the checks here repeat the ones that guard the image itself.
    """

    def __init__(self, server: Server, window: Window, readonly: bool) -> None:
        self.server = server
        self.window = window
        self.image = window.exposed.image
        self.shared = server.shared[id(window.exposed)]
        self.readonly = readonly
        self.size = window.size

    def _range(self, off: int, n: int) -> int:
        if off < 0 or n < 0 or off + n > self.size:
            raise OSError(errno.EINVAL, f"request [{off}, {off + n}) outside the export ({self.size} bytes)")
        return self.window.start + off

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError("export is read-only", self.image.path)

    def pread(self, buf: memoryview, off: int) -> None:
        """Fill ``buf`` (every byte: nbdkit's buffer is not zeroed) from ``off``."""
        view = memoryview(buf).cast("B")
        base = self._range(off, len(view))
        exts = list(self.image.extents(base, len(view)))
        covered = 0
        data = []
        for e in exts:
            covered += e.length
            if e.kind == Kind.DATA:
                data.append(e)
            else:
                _zero_fill(view, e.offset - base, e.length)
        if covered != len(view):
            raise OSError(errno.EIO, "the image map does not cover the request")
        if data:
            self.image.readinto_extents(data, view, base)

    def pwrite(self, buf: memoryview, off: int, fua: bool = False) -> None:
        self._writable()
        view = memoryview(buf).cast("B")
        base = self._range(off, len(view))
        self.image.write(base, view)
        self._after_change(fua)

    def _after_change(self, fua: bool) -> None:
        if fua:
            self.flush()
        elif self.image.commit_due():
            self.server.wake_committer()

    def flush(self) -> None:
        self.shared.flush()

    def trim(self, n: int, off: int, fua: bool = False) -> None:
        """Discard: the range reads as zeros (in a differencing child too); whole blocks freed."""
        self._writable()
        self.image.discard(self._range(off, n), n)
        self._after_change(fua)

    def zero(self, n: int, off: int, may_trim: bool = False, fua: bool = False) -> None:
        """Make the range read as zeros: a discard when allowed, else zeros written over data."""
        self._writable()
        base = self._range(off, n)
        if may_trim:
            self.image.discard(base, n)
        else:
            for e in list(self.image.extents(base, n)):
                if e.is_hole:
                    continue  # reads as zeros already
                pos = e.offset
                while pos < e.end:
                    k = min(ZERO_CHUNK, e.end - pos)
                    self.image.write(pos, memoryview(_ZEROS)[:k])
                    pos += k
        self._after_change(fua)

    def extents(self, n: int, off: int, req_one: bool = False) -> list[tuple[int, int, bool]]:
        """``(offset, length, reads_as_zero)`` runs from ``off``, after chain resolution.

        At most ``EXTENTS_SPAN`` bytes per reply (NBD lets a reply end early), one run with
        ``req_one``. ZERO and unallocated runs are ``True`` (the plugin says hole|zero).
        """
        base = self._range(off, n)
        out: list[list] = []
        for e in self.image.extents(base, min(n, EXTENTS_SPAN)):
            zero = e.is_hole
            start = e.offset - self.window.start
            if out and out[-1][2] == zero and out[-1][0] + out[-1][1] == start:
                out[-1][1] += e.length
            else:
                if req_one and out:
                    break
                out.append([start, e.length, zero])
        return [(a, b, z) for a, b, z in out]


def _zero_fill(view: memoryview, start: int, length: int) -> None:
    pos, end = start, start + length
    while pos < end:
        k = min(len(_ZEROS), end - pos)
        view[pos : pos + k] = _ZEROS[:k]
        pos += k
