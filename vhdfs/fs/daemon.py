"""The daemon's life: lay out the files, mount, serve until unmounted or signalled, flush, exit.

Runs in the foreground (``vhdfs mount --foreground``, systemd ``Type=notify``); the CLI's
background mode forks before calling ``serve`` (so before ``trio.run``), never inside it.
Readiness (``READY=1`` on ``$NOTIFY_SOCKET``) is sent only after the daemon has read a byte of
its own first file through the mount from a worker thread, so "ready" means "served", not
merely "mounted".
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
from collections.abc import Iterable

import pyfuse3
import trio

from ..aio.export import Export
from ..errors import VhdfsError
from ..service import startup, state
from .operations import VhdfsOperations

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
READAHEAD_KB = 4096  # the mount's readahead (the kernel's FUSE default is 128 KiB)
COMMIT_INTERVAL = 1.0  # seconds between background commits of pending metadata (group commit)


def fuse_options(writable: bool, extra: Iterable[str] = ()) -> set[str]:
    """Mount options: fsname/subtype identify us in mountinfo; ``ro`` lets the VFS refuse writes."""
    opts = {"fsname=vhdfs", "subtype=vhdfs", "default_permissions"}
    if not writable:
        opts.add("ro")
    for opt in extra:
        if opt in ("rw", "ro"):
            continue
        opts.add(opt)
    return opts


def serve(
    files: list[Export],
    mountpoint: str,
    *,
    direct_io: bool = False,
    extra_options: Iterable[str] = (),
) -> int:
    """Mount, serve until unmounted or SIGTERM/SIGINT, then flush and close every image.

    Returns 0 only when every image was flushed and closed without error.
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mountpoint = os.path.abspath(mountpoint)
    ops = VhdfsOperations(files, direct_io=direct_io)
    writable = any(f.writable for f in files)
    options = fuse_options(writable, extra_options)
    log.debug("FUSE options: %s", sorted(options))
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError:
        _close_images(ops)
        raise VhdfsError("cannot mount here (see the FUSE message above)", mountpoint) from None
    ops.watch_images()
    served_ok = False
    try:
        trio.run(_main, ops, mountpoint, files)
        served_ok = True
    except BaseException:
        log.exception("the FUSE loop stopped unexpectedly")
    finally:
        state.sd_notify("STOPPING=1")
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session")
    closed_ok = _close_images(ops)
    ok = served_ok and closed_ok
    state.write(mountpoint, ".exit", {"pid": os.getpid(), "clean": ok})
    state.remove(mountpoint, ".json")
    log.info("unmounted %s (%s)", mountpoint, "clean" if ok else "WITH ERRORS")
    return 0 if ok else 1


def _raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead ``READAHEAD_KB`` on this mount (root only; best effort).

    Cached sequential reads then reach the daemon as 1 MiB requests (FUSE's largest) with
    several in flight, instead of 128 KiB ones: ``dd bs=4k`` of a cold disk went from ~260 to
    ~1100 MB/s. Found through mountinfo, not ``stat``, which would be a request to ourselves.
    """
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [ln.split()[2] for ln in f if ln.split()[4] == mountpoint]
        if devs:
            with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
                f.write(str(READAHEAD_KB))
    except OSError as exc:
        log.debug("readahead left at the kernel's default: %s", exc)


async def _main(ops: VhdfsOperations, mountpoint: str, files: list[Export]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals)
        nursery.start_soon(_announce_ready, ops, mountpoint, files)
        for shared in ops.shared_images:
            if shared.writable:  # group commit: pending metadata reaches the file within ~1 s
                nursery.start_soon(shared.run_committer, COMMIT_INTERVAL)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT end the FUSE loop; ``serve`` then unmounts and flushes."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _announce_ready(ops: VhdfsOperations, mountpoint: str, files: list[Export]) -> None:
    """Prove the mount serves (read a byte through it), then record it and send READY=1."""
    probe = os.path.join(mountpoint, files[0].name) if files else mountpoint

    def read_one() -> None:
        if files:
            with open(probe, "rb", buffering=0) as f:
                f.read(1)
        else:
            os.listdir(probe)

    with trio.move_on_after(READY_TIMEOUT) as scope:
        await trio.to_thread.run_sync(read_one, abandon_on_cancel=True)
    if scope.cancelled_caught:
        log.error("the mount did not answer within %.0f s; giving up", READY_TIMEOUT)
        pyfuse3.terminate()
        return
    if len(ops.direct_io_inodes) < len(files):
        _raise_readahead(mountpoint)  # after FUSE_INIT, whose reply resets it
    state.write(
        mountpoint,
        ".json",
        {
            "pid": os.getpid(),
            "mountpoint": mountpoint,
            "images": [s.image.path for s in ops.shared_images],
            "writable": any(s.writable for s in ops.shared_images),
        },
    )
    state.remove(mountpoint, ".exit")
    names = ", ".join(f.name for f in files)
    state.sd_notify(f"READY=1\nSTATUS=serving {names}\nMAINPID={os.getpid()}")
    log.info("serving %s at %s", names, mountpoint)
    startup.resume()  # the CLI paused the garbage collector for the launch
    state.prune()  # housekeeping: after READY, so no launch waits for it


def _close_images(ops: VhdfsOperations) -> bool:
    """Flush and close each image (and delete snapshot temp children); False if any failed."""
    ok = True
    for shared in ops.shared_images:
        try:
            shared.image.close()
        except Exception as exc:  # keep closing the others; report at the end
            ok = False
            log.error("%s: flush/close failed: %s", shared.image.path, exc)
        if shared.temp_child:
            try:
                os.unlink(shared.temp_child)
            except OSError as exc:
                log.warning("%s: cannot remove the snapshot child: %s", shared.temp_child, exc)
    return ok
