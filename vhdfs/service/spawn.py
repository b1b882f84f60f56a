"""Starting a front-end daemon detached, and knowing when it serves.

The daemon is a re-exec of ``vhdfs`` in ``--foreground`` mode (never a fork inside ``trio.run``)
in a new session, its stderr to a log file. It sends ``READY=1`` on a private notify socket --
the message systemd waits for -- only once it has served a request of its own, so "ready"
means "served", not merely "mounted". If it dies first, its last log line is the error.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import tempfile
import time

from ..errors import VhdfsError
from .state import open_private

START_TIMEOUT = 60.0


def spawn_daemon(argv: list[str], log_path: str, what: str) -> None:
    """Run ``argv`` detached (new session, output to ``log_path``) and wait for its READY=1.

    Returns once the daemon said it serves; raises its last log line as a VhdfsError when it
    dies first, or a timeout naming the log. ``what`` (a mountpoint, a socket) names it.
    """
    with tempfile.TemporaryDirectory(prefix="vhdfs-notify-") as tmp:
        sock_path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind(sock_path)
            env = dict(os.environ, NOTIFY_SOCKET=sock_path)
            with os.fdopen(open_private(log_path), "wb") as logf:  # 0600: it names image paths
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([sock], [], [], 0.05)
                if ready and b"READY=1" in sock.recv(4096).split(b"\n"):
                    return
                if child.poll() is not None:
                    raise VhdfsError(
                        _last_error(log_path) or f"the daemon exited with status {child.returncode}"
                    )
            child.terminate()
            raise VhdfsError(
                f"the daemon did not become ready within {START_TIMEOUT:.0f} s (log: {log_path})", what
            )


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
    return last[len("vhdfs: ") :] if last.startswith("vhdfs: ") else last
