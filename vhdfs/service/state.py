"""Where a running mount is recorded, so ``vhdfs umount`` can find its daemon and its verdict.

The daemon writes ``<key>.json`` (pid, images, log) once it serves and, when it exits, replaces
it with ``<key>.exit`` holding whether every image was flushed and closed cleanly. ``umount``
waits for the pid to go and then reads that verdict: its exit 0 means "durable", not merely
"unmounted". Kept free of pyfuse3/trio so the CLI can import it cheaply.

The records and logs name image paths and mountpoints, so they are private to their user: the
folder is ``0700`` (made so if an older vhdfs left it wider) and every file in it ``0600``. A
folder of that name owned by someone else is refused, never used.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
from typing import Any
from urllib.parse import quote

from ..errors import VhdfsError

FILE_MODE = 0o600
DIR_MODE = 0o700


def state_dir() -> str:
    """``/run/vhdfs`` for root, the user's runtime dir (or the temp dir) otherwise; ``0700``."""
    if os.geteuid() == 0:
        base = "/run/vhdfs"
    else:
        base = os.path.join(
            os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"vhdfs-{os.getuid()}"
        )
    os.makedirs(base, mode=DIR_MODE, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise VhdfsError("is not a folder of this user's; refusing to keep mount records there", base)
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(base, DIR_MODE)
    return base


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """Open (creating ``0600``) a file of the state folder, and make it ``0600`` if it was wider."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def key(mountpoint: str) -> str:
    """A file name that identifies the mountpoint (its escaped absolute path)."""
    return quote(os.path.realpath(mountpoint), safe="")


def path_for(mountpoint: str, suffix: str) -> str:
    return os.path.join(state_dir(), key(mountpoint) + suffix)


def path_for_name(name: str, suffix: str) -> str:
    """A state file for something that is not a folder (``serve-unix:/run/x.sock``)."""
    return os.path.join(state_dir(), quote(name, safe="") + suffix)


def write(mountpoint: str, suffix: str, data: dict[str, Any]) -> None:
    """Write atomically (rename), so a reader never sees half a record."""
    write_path(path_for(mountpoint, suffix), data)


def write_path(target: str, data: dict[str, Any]) -> None:
    """Write a record at ``target`` atomically."""
    tmp = f"{target}.{os.getpid()}.tmp"
    with os.fdopen(open_private(tmp), "w") as f:
        json.dump(data, f)
    os.replace(tmp, target)


def read(mountpoint: str, suffix: str) -> dict[str, Any] | None:
    try:
        with open(path_for(mountpoint, suffix)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove(mountpoint: str, suffix: str) -> None:
    try:
        os.unlink(path_for(mountpoint, suffix))
    except FileNotFoundError:
        pass


def sd_notify(message: str) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET`` (systemd's protocol, or our own parent waiting).

    Written with ``socket`` directly: one datagram, no dependency. False when nobody listens.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def vhdfs_mounts() -> dict[str, str]:
    """Mountpoints of vhdfs mounts (from /proc/self/mountinfo) -> their fs type."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                fstype = right.split()[0] if right else ""
                if fstype in ("fuse.vhdfs", "fuseblk.vhdfs") and len(fields) > 4:
                    mp = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
                    out[mp] = fstype
    except OSError:
        pass
    return out


def prune(max_age: float = 600.0) -> None:
    """Drop verdicts nobody collected (mounts undone by umount(8) or fusermount3)."""
    import time

    try:
        folder = state_dir()
        now = time.time()
        for name in os.listdir(folder):
            if name.endswith(".exit"):
                path = os.path.join(folder, name)
                if now - os.stat(path).st_mtime > max_age:
                    os.unlink(path)
    except OSError:
        pass
