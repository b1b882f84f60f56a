"""``vhdfs mount``: expose images as raw files; returns only once the files are there.

Without ``--foreground`` every image is opened here first, so bad input fails fast with one line
and nothing mounted; then the daemon is re-executed detached (``--foreground`` in a new session,
its stderr to a log file) and this process waits for its ``READY=1`` on a private notify socket
-- the same message systemd waits for -- or for its death, whose last log line it prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

from ..errors import UsageError, VhdfsError
from . import add_image_options

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="expose images as raw files in a folder (FUSE)",
                       usage="vhdfs mount [options] IMAGE [IMAGE ...] MOUNTPOINT",
                       description="Mount IMAGE... at MOUNTPOINT: each image appears as <stem>.raw, "
                                   "each of its partitions as <stem>-p<N>.raw. Read-only unless -w.")
    p.add_argument("paths", nargs="+", metavar="IMAGE",
                   help="one or more images, then the mountpoint (an existing empty folder)")
    p.add_argument("-w", "--rw", action="store_true", help="allow writes to the images")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (systemd, debugging)")
    p.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other")
    p.add_argument("--cache", action="store_true",
                   help="keep attributes long on writable mounts too (the kernel page cache is the default)")
    p.add_argument("--direct-io", action="store_true",
                   help="bypass the kernel page cache: every read reaches the daemon (no double caching)")
    p.add_argument("--no-partitions", action="store_true", help="do not expose <stem>-p<N>.raw partition files")
    p.add_argument("--snapshot", action="store_true",
                   help="writes go to a new differencing child; the image itself never changes")
    p.add_argument("--keep", metavar="CHILD.vhd", help="with --snapshot: keep the child at this path")
    p.add_argument("--format", choices=("auto", "vhd", "vdi", "raw"), default="auto",
                   help="image format (default: probe); raw exposes a plain disk file")
    p.add_argument("--force", action="store_true", help="open images with bad checksums for writing")
    add_image_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    images, mountpoint = _split(args)
    check_mountpoint(mountpoint)
    if args.foreground:
        return _serve(args, images, mountpoint)
    _validate(args, images)
    return _spawn(args, images, mountpoint)


def _split(args: argparse.Namespace) -> tuple[list[str], str]:
    if len(args.paths) < 2:
        raise UsageError("give at least one IMAGE and a MOUNTPOINT")
    if args.keep and not args.snapshot:
        raise UsageError("--keep needs --snapshot")
    if args.snapshot and args.rw:
        raise UsageError("--snapshot already makes the file writable; drop -w")
    images = [os.path.abspath(p) for p in args.paths[:-1]]
    if args.keep and len(images) > 1:
        raise UsageError("--keep names one child: use it with one image")
    if args.keep and os.path.exists(args.keep):
        raise UsageError("already exists; --keep will not overwrite a file", args.keep)
    return images, os.path.abspath(args.paths[-1])


def check_mountpoint(mountpoint: str) -> None:
    """The mountpoint must be an empty folder that is not already a mount."""
    from ..fs.state import vhdfs_mounts
    if os.path.abspath(mountpoint) in vhdfs_mounts() and not os.path.exists(mountpoint):
        raise UsageError("a vhdfs mount whose daemon has died is still here; "
                         "run 'vhdfs umount' on it first", mountpoint)
    if not os.path.exists(mountpoint):
        raise UsageError("mountpoint does not exist", mountpoint)
    if not os.path.isdir(mountpoint):
        raise UsageError("mountpoint is not a folder", mountpoint)
    if os.path.ismount(mountpoint):
        raise UsageError("something is already mounted here", mountpoint)
    if os.listdir(mountpoint):
        raise UsageError("mountpoint is not empty", mountpoint)


def _fuse_opts(args: argparse.Namespace) -> list[str]:
    return [o.strip() for group in args.fuse_options for o in group.split(",") if o.strip()]


def _open(args: argparse.Namespace, path: str, writable: bool):  # noqa: ANN202 - an Image
    from ..block import open_image

    fmt = None if args.format == "auto" else args.format
    return open_image(path, writable, parent_dirs=args.parent_dir, force=args.force,
                      size_rule=args.size_rule, ignore_parent_id=args.ignore_parent_id, format=fmt)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _validate(args: argparse.Namespace, images: list[str]) -> None:
    """Open every image as the daemon will (and lay out the files), then close them again."""
    from ..fs.daemon import Exposed, build_files

    opened = []
    try:
        for path in images:
            img = _open(args, path, args.rw)
            opened.append(Exposed(_stem(path), img, args.rw))
            if args.snapshot:
                _check_snapshot_parent(img)
        build_files(opened, partitions=not args.no_partitions)
    finally:
        for ex in opened:
            ex.image.close()


def _check_snapshot_parent(img) -> None:  # noqa: ANN001
    if img.format != "vhd":
        raise UsageError(f"--snapshot needs a VHD image (this is {img.format}); convert it first", img.path)


def _snapshot(args: argparse.Namespace, path: str):  # noqa: ANN202
    """Create the differencing child over ``path``'s chain and open it writable."""
    from ..fs.daemon import Exposed

    create = _differencing_creator()
    base = _open(args, path, False)
    try:
        _check_snapshot_parent(base)
        size = base.size
    finally:
        base.close()
    if args.keep:
        child, temp = os.path.abspath(args.keep), None
    else:
        folder = os.environ.get("TMPDIR") or "/var/tmp"
        fd, child = tempfile.mkstemp(prefix=f"vhdfs-snapshot-{_stem(path)}-", suffix=".vhd", dir=folder)
        os.close(fd)
        os.unlink(child)
        temp = child
    create(child, size, path)
    try:
        parent_dirs = [os.path.dirname(path), *args.parent_dir]
        from ..block import open_image
        img = open_image(child, True, parent_dirs=parent_dirs, force=args.force,
                         size_rule=args.size_rule, ignore_parent_id=args.ignore_parent_id)
    except BaseException:
        if temp:
            os.unlink(temp)
        raise
    return Exposed(_stem(path), img, True, temp_child=temp)


def _differencing_creator():  # noqa: ANN202 - (child, size, parent) -> None
    """The block layer's creator of a differencing VHD (generic entry first, format one next)."""
    try:
        from ..block.create import create_image
        return lambda child, size, parent: create_image(child, format="vhd", type="differencing", parent=parent)
    except ImportError:
        pass
    try:
        from ..block.vhd_create import create_vhd
        return lambda child, size, parent: create_vhd(child, size, type="differencing", parent=parent)
    except ImportError:
        raise UsageError("--snapshot needs VHD creation support, which this build lacks") from None


def _serve(args: argparse.Namespace, images: list[str], mountpoint: str) -> int:
    """The daemon itself: open, lay out, serve until unmounted."""
    from ..fs.daemon import Exposed, build_files, serve

    _configure_daemon_logging(args.debug)
    exposed: list[Exposed] = []
    try:
        for path in images:
            if args.snapshot:
                exposed.append(_snapshot(args, path))
            else:
                exposed.append(Exposed(_stem(path), _open(args, path, args.rw), args.rw))
        files = build_files(exposed, partitions=not args.no_partitions)
    except BaseException:
        for ex in exposed:
            ex.image.close()
            if ex.temp_child:
                os.unlink(ex.temp_child)
        raise
    return serve(files, mountpoint, cache=args.cache, direct_io=args.direct_io, extra_options=_fuse_opts(args))


def _configure_daemon_logging(debug: bool) -> None:
    """Info-level logs to stderr; journald adds its own timestamps, a log file needs ours."""
    fmt = "vhdfs: %(levelname)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s vhdfs[%(process)d] %(levelname)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, force=True)


def _child_argv(args: argparse.Namespace, images: list[str], mountpoint: str) -> list[str]:
    argv = [sys.executable, "-m", "vhdfs"]
    if args.debug:
        argv.append("--debug")
    argv += ["mount", "--foreground", "--format", args.format, "--size-rule", args.size_rule]
    for flag, on in (("--rw", args.rw), ("--cache", args.cache), ("--direct-io", args.direct_io),
                     ("--no-partitions", args.no_partitions),
                     ("--snapshot", args.snapshot), ("--force", args.force),
                     ("--ignore-parent-id", args.ignore_parent_id)):
        if on:
            argv.append(flag)
    if args.keep:
        argv += ["--keep", os.path.abspath(args.keep)]
    for d in args.parent_dir:
        argv += ["--parent-dir", os.path.abspath(d)]
    opts = _fuse_opts(args)
    if opts:
        argv += ["-o", ",".join(opts)]
    return argv + ["--", *images, mountpoint]


def _spawn(args: argparse.Namespace, images: list[str], mountpoint: str) -> int:
    """Start the daemon detached and wait for READY=1 (exit 0) or its death (its last error)."""
    from ..fs import state

    log_path = state.path_for(mountpoint, ".log")
    with tempfile.TemporaryDirectory(prefix="vhdfs-notify-") as tmp:
        sock_path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind(sock_path)
            env = dict(os.environ, NOTIFY_SOCKET=sock_path)
            with open(log_path, "wb") as logf:
                child = subprocess.Popen(_child_argv(args, images, mountpoint), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, env=env, start_new_session=True,
                                         close_fds=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([sock], [], [], 0.05)
                if ready and b"READY=1" in sock.recv(4096).split(b"\n"):
                    return 0
                if child.poll() is not None:
                    raise VhdfsError(_last_error(log_path) or f"the daemon exited with status {child.returncode}")
            child.terminate()
            raise VhdfsError(f"the daemon did not become ready within {START_TIMEOUT:.0f} s (log: {log_path})",
                             mountpoint)


def _last_error(log_path: str) -> str:
    """The daemon's last log line, without its ``vhdfs:`` prefix (main prints its own)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    last = lines[-1]
    return last[len("vhdfs: "):] if last.startswith("vhdfs: ") else last
