"""``vhdfs umount MOUNTPOINT``: unmount, wait for the daemon, succeed only if it flushed.

The unmount itself is ``fusermount3 -u`` (never lazy): a mount still in use (a loop device, a
shell in it) is refused with the kernel's "busy" rather than detached under its users. The
daemon then sees its session end, flushes and closes every image and records its verdict
(``fs/state.py``); exit 0 means every byte written is durable in the images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from ..errors import VhdfsError

EXIT_TIMEOUT = 120.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "umount",
        help="unmount a vhdfs mount after flushing every image",
        description="Unmount MOUNTPOINT, wait until the daemon has flushed and exited.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service import state

    mountpoint = os.path.realpath(args.mountpoint)
    if mountpoint not in state.vhdfs_mounts():
        if not os.path.isdir(mountpoint):
            raise VhdfsError("no such folder", args.mountpoint)
        raise VhdfsError("not a vhdfs mount", args.mountpoint)
    record = state.read(mountpoint, ".json") or {}
    pid = int(record.get("pid", 0))
    unmount(mountpoint)
    if not pid:
        raise VhdfsError(
            "unmounted, but no daemon was recorded for it: cannot confirm its writes are durable", mountpoint
        )
    if not wait_for_exit(pid, EXIT_TIMEOUT):
        raise VhdfsError(
            f"unmounted, but daemon {pid} is still flushing after {EXIT_TIMEOUT:.0f} s", mountpoint
        )
    verdict = state.read(mountpoint, ".exit")
    state.remove(mountpoint, ".exit")
    if verdict is None or verdict.get("pid") != pid:
        raise VhdfsError(
            f"daemon {pid} exited without a clean shutdown; writes since the last fsync may be lost",
            mountpoint,
        )
    if not verdict.get("clean"):
        log_path = state.path_for(mountpoint, ".log")
        raise VhdfsError(f"flushing the images failed (see {log_path})", mountpoint)
    return 0


def unmount(mountpoint: str) -> None:
    """``fusermount3 -u`` (not lazy); its complaint becomes ours."""
    try:
        res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        res = subprocess.run(["umount", mountpoint], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["unmount failed"])[-1]
        if "busy" in why.lower():
            why = "still in use (a loop device, a mounted partition or an open file); release it first"
        raise VhdfsError(why, mountpoint)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` is gone (or a zombie); it is not our child, so poll /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.02)
    return False
