"""Starting a front-end daemon detached, and knowing when it serves.

Two ways in, one wait: ``fork_daemon`` forks this process (``vhdfs mount``: the images are
already open and checked, and trio/pyfuse3 are not yet imported, so the child starts serving
without a second Python start-up, import or open); ``spawn_daemon`` re-executes a command
(``vhdfs serve``: nbdkit). Either way the daemon runs in a new session, its output to a log
file, and sends ``READY=1`` on a private notify socket -- the message systemd waits for -- only
once it has served a request of its own, so "ready" means "served", not merely "mounted". If
it dies first, its last log line is the error and its exit status the exit code.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol

from ..errors import VhdfsError
from .state import open_private

START_TIMEOUT = 60.0


class _Child(Protocol):
    returncode: int | None

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...


def spawn_daemon(argv: list[str], log_path: str, what: str) -> None:
    """Run ``argv`` detached (new session, output to ``log_path``) and wait for its READY=1.

    Returns once the daemon said it serves; raises its last log line as a VhdfsError when it
    dies first, or a timeout naming the log. ``what`` (a mountpoint, a socket) names it.
    """
    with _notify_socket() as (sock, sock_path):
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
        _await_ready(sock, child, log_path, what)


def fork_daemon(serve: Callable[[], int], log_path: str, what: str, abandon: Callable[[], None]) -> None:
    """Fork; the child runs ``serve()`` detached (as ``spawn_daemon``'s) and exits with its result.

    Only safe before any thread or event loop exists (the CLI imports neither trio nor pyfuse3).
    The parent returns once the child sent READY=1, or raises as ``spawn_daemon``; ``abandon``
    runs in the parent only if no child was started (what ``serve`` would have owned).
    """
    try:
        stack = contextlib.ExitStack()
        sock, sock_path = stack.enter_context(_notify_socket())
        log_fd = open_private(log_path)  # 0600: it names image paths
    except BaseException:
        abandon()
        raise
    with stack:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(serve, sock, sock_path, log_fd)
        os.close(log_fd)
        _await_ready(sock, _Forked(pid), log_path, what)


class _Forked:
    """A forked child seen as ``subprocess.Popen`` sees its own (poll, terminate, returncode)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


def _run_child(serve: Callable[[], int], sock: socket.socket, sock_path: str, log_fd: int) -> NoReturn:
    """The forked daemon: new session, stdin from /dev/null, output to the log; never returns."""
    code = 1
    try:
        sock.close()
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ["NOTIFY_SOCKET"] = sock_path
        code = serve()
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in a private temporary folder, and its path (the daemon's NOTIFY_SOCKET)."""
    with tempfile.TemporaryDirectory(prefix="vhdfs-notify-") as tmp:
        sock_path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind(sock_path)
            yield sock, sock_path


def _await_ready(sock: socket.socket, child: _Child, log_path: str, what: str) -> None:
    """Return at the child's READY=1; raise its last log line (and exit status) if it dies first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready and b"READY=1" in sock.recv(4096).split(b"\n"):
            return
        if child.poll() is not None:
            status = child.returncode or 1
            err = VhdfsError(_last_error(log_path) or f"the daemon exited with status {status}")
            err.exit_code = status if status > 0 else 1
            raise err
    child.terminate()
    raise VhdfsError(f"the daemon did not become ready within {START_TIMEOUT:.0f} s (log: {log_path})", what)


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
