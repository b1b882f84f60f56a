"""``vhdfs mount``: expose images as raw files; returns only once the files are there.

Without ``--foreground`` every image is opened and laid out here first, so bad input fails fast
with one line, its exit code and nothing mounted; then this process forks (trio and pyfuse3 are
not imported yet) and the child serves those very images, detached (new session, its output to
a log file), while the parent waits for its ``READY=1`` on a private notify socket -- the same
message systemd waits for -- or for its death, whose last log line it prints. One Python
start-up, one import and one open of each image, not two.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from ..errors import UsageError
from . import add_export_options, open_from_args, snapshot_from_args

if TYPE_CHECKING:
    from ..aio.export import Export, Exposed
    from ..block.image import Image

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount",
        help="expose images as raw files in a folder (FUSE)",
        usage="vhdfs mount [options] IMAGE [IMAGE ...] MOUNTPOINT",
        description="Mount IMAGE... at MOUNTPOINT: each image appears as <stem>.raw, "
        "each of its partitions as <stem>-p<N>.raw. Read-only unless -w.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE",
        help="one or more images, then the mountpoint (an existing empty folder)",
    )
    p.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="FUSE mount options, e.g. allow_other",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="accepted for older command lines: caching is the default",
    )
    p.add_argument(
        "--direct-io",
        action="store_true",
        help="bypass the kernel page cache: every read reaches the daemon (no double caching)",
    )
    add_export_options(p, "allow writes to the images", "do not expose <stem>-p<N>.raw partition files")
    p.set_defaults(func=run, resume_gc_when_serving=True)  # service.startup


def run(args: argparse.Namespace) -> int:
    images, mountpoint = _split(args)
    check_mountpoint(mountpoint)
    if args.foreground:
        _configure_daemon_logging(args.debug)
        return _serve(args, _expose(args, images)[1], mountpoint)
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
    from ..service.state import vhdfs_mounts

    if os.path.abspath(mountpoint) in vhdfs_mounts() and not os.path.exists(mountpoint):
        raise UsageError(
            "a vhdfs mount whose daemon has died is still here; run 'vhdfs umount' on it first", mountpoint
        )
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


def _open(args: argparse.Namespace, path: str, writable: bool) -> Image:
    return open_from_args(args, path, writable, format=None if args.format == "auto" else args.format)


def _snapshot(args: argparse.Namespace, path: str) -> Exposed:
    """Create the differencing child over ``path``'s chain and open it writable."""
    from ..aio.export import Exposed
    from ..service.snapshot import stem

    with _open(args, path, False) as base:
        pass  # the whole chain opens: the child is never made over a broken one
    snap = snapshot_from_args(args, base, args.parent_dir)
    return Exposed(stem(path), snap.image, True, temp_child=snap.temp_child, snapshot=True)


def _expose(args: argparse.Namespace, images: list[str]) -> tuple[list[Exposed], list[Export]]:
    """Open every image (a snapshot child over it with ``--snapshot``) and lay out its files.

    All or none stay open: a bad image or partition table fails here, before anything mounts.
    """
    from ..aio.export import Exposed, build_exports
    from ..service.snapshot import stem

    exposed: list[Exposed] = []
    try:
        for path in images:
            if args.snapshot:
                exposed.append(_snapshot(args, path))
            else:
                exposed.append(Exposed(stem(path), _open(args, path, args.rw), args.rw))
        files = build_exports(exposed, partitions=not args.no_partitions)
    except BaseException:
        _abandon(exposed)
        raise
    return exposed, files


def _abandon(exposed: list[Exposed]) -> None:
    """Close images nobody will serve, and delete the snapshot children made for them."""
    for ex in exposed:
        ex.image.close()
        if ex.temp_child:
            os.unlink(ex.temp_child)


def _serve(args: argparse.Namespace, files: list[Export], mountpoint: str) -> int:
    """The daemon itself: mount, serve until unmounted (``serve`` closes the images)."""
    from ..fs.daemon import serve

    return serve(files, mountpoint, direct_io=args.direct_io, extra_options=_fuse_opts(args))


def _configure_daemon_logging(debug: bool) -> None:
    """Info-level logs to stderr; journald adds its own timestamps, a log file needs ours."""
    fmt = (
        "vhdfs: %(levelname)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s vhdfs[%(process)d] %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, force=True)


def _spawn(args: argparse.Namespace, images: list[str], mountpoint: str) -> NoReturn:
    """Open the images, fork the daemon that serves them; exit 0 once it serves, else raise its error."""
    from ..service import state
    from ..service.spawn import fork_daemon
    from . import reporting

    log_path = state.path_for(mountpoint, ".log")
    exposed, files = _expose(args, images)

    def daemon() -> int:
        _configure_daemon_logging(args.debug)
        return reporting(args, lambda: _serve(args, files, mountpoint))

    fork_daemon(daemon, log_path, mountpoint, abandon=lambda: _abandon(exposed))
    # The images are the daemon's now: leave without closing them (a writable close would
    # flush under its feet) and without the interpreter's teardown (~50 ms after READY).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
