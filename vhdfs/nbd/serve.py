"""Running nbdkit with the vhdfs plugin, and staying its parent until it stops.

``vhdfs serve -f`` is this module: it starts ``nbdkit --exit-with-parent -f ... python
plugin.py ...`` with ``PYTHONPATH`` pointing nbdkit's embedded interpreter (Debian's 3.11,
whatever ``python3`` is on PATH) at this vhdfs and the virtualenv's packages, waits for the
pidfile nbdkit writes once it accepts connections, says ``READY=1`` (systemd, or ``vhdfs serve``
without ``-f`` waiting in ``service.spawn``), forwards SIGTERM/SIGINT/SIGHUP, and on nbdkit's exit
reads the verdict the plugin's cleanup wrote after flushing and closing every image. Exit 0
means nbdkit stopped cleanly *and* every image closed cleanly: every acknowledged write is
durable. If this process is killed, ``--exit-with-parent`` makes nbdkit stop (and flush) too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import quote

from ..aio.access import Access, exposed_access, private, socket_mode
from ..errors import UsageError, VhdfsError
from ..service import state
from .backend import Config

log = logging.getLogger(__name__)

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
START_TIMEOUT = 60.0


@dataclass
class Listen:
    """Where nbdkit listens: a unix socket, or a TCP port on one address."""

    unix: str | None = None
    port: int | None = None
    bind: str = "127.0.0.1"

    @property
    def key(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"tcp:{self.bind}:{self.port}"

    def is_loopback(self) -> bool:
        if self.unix:
            return True
        if self.bind == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False  # a host name: we cannot tell, so treat it as the network

    def uri(self, export: str = "", tls: bool = False) -> str:
        scheme = "nbds" if tls else "nbd"
        if self.unix:
            return f"{scheme}+unix:///{quote(export)}?socket={self.unix}"
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{scheme}://{host}:{self.port}/{quote(export)}"

    def nbdkit_args(self) -> list[str]:
        if self.unix:
            return ["-U", self.unix]
        return ["-i", self.bind, "-p", str(self.port)]

    def prepare(self) -> None:
        """A unix socket path must be free: a stale socket (nobody listening) is removed."""
        if not self.unix:
            return
        try:
            st = os.lstat(self.unix)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError("exists and is not a socket", self.unix)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.unix)
            except OSError:
                os.unlink(self.unix)  # stale: left by a server that died
                return
        raise UsageError("another server is listening on this socket", self.unix)


def nbdkit_path() -> str:
    """The nbdkit binary with its Python plugin, or a VhdfsError saying what to install."""
    exe = shutil.which("nbdkit")
    if exe is None:
        raise VhdfsError("nbdkit is not installed (Debian: apt-get install nbdkit nbdkit-plugin-python)")
    probe = subprocess.run([exe, "python", "--version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        raise VhdfsError(
            "nbdkit's Python plugin is not installed (Debian: apt-get install nbdkit-plugin-python)"
        )
    return exe


def plugin_env() -> dict[str, str]:
    """The environment for nbdkit: its embedded Python finds this vhdfs first, then our packages.

    The package's own folder comes first because an editable install's ``.pth`` hook is not
    read from a ``PYTHONPATH`` entry.
    """
    import vhdfs

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(vhdfs.__file__)))]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths and os.path.isdir(p):
            paths.append(p)
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))


def nbdkit_argv(
    exe: str,
    config: Config,
    listen: Listen,
    *,
    pidfile: str,
    tls_psk: str | None = None,
    verbose: bool = False,
) -> list[str]:
    argv = [exe, "-f", "--exit-with-parent", *listen.nbdkit_args(), "-P", pidfile]
    if not config.writable:
        argv.append("-r")  # nbdkit itself refuses writes, trim and zero
    if tls_psk:
        argv += ["--tls=require", f"--tls-psk={tls_psk}"]
    if verbose:
        argv.append("-v")
    return argv + ["python", PLUGIN, *config.to_args()]


def socket_access(named: list[str], writable: bool) -> Access:
    """Who may connect to the Unix socket: never more than may read every image it serves.

    The images' common owner and group with the bits all of them grant (``aio/access.py``'s
    rule); images of different owners leave the socket to this process's user alone.
    """
    each = [exposed_access(p, writable) for p in named]
    if not each or len({(a.uid, a.gid) for a in each}) != 1:
        return private(writable)
    mode = 0o777
    for a in each:
        mode &= a.mode
    return Access(mode, each[0].uid, each[0].gid)


def _share_socket(path: str, access: Access) -> None:
    """nbdkit made the socket under umask 077 (nobody else could connect); now widen it."""
    os.chown(path, access.uid, access.gid)
    os.chmod(path, socket_mode(access))


def run(
    config: Config,
    listen: Listen,
    *,
    tls_psk: str | None = None,
    verbose: bool = False,
    temp_children: list[str] | None = None,
    pidfile: str | None = None,
    named: list[str] | None = None,
) -> int:
    """Serve until nbdkit stops (SIGTERM/SIGINT/SIGHUP to us stop it); 0 when all is durable."""
    exe = nbdkit_path()
    listen.prepare()
    tmp = tempfile.mkdtemp(prefix="vhdfs-serve-")
    nbdkit_pidfile = os.path.join(tmp, "nbdkit.pid")
    config.verdict = os.path.join(tmp, "verdict.json")
    record = state.path_for_name("serve-" + listen.key, ".json")
    child: subprocess.Popen[bytes] | None = None
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        argv = nbdkit_argv(exe, config, listen, pidfile=nbdkit_pidfile, tls_psk=tls_psk, verbose=verbose)
        log.debug("running %s", " ".join(argv))
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=plugin_env(),
            close_fds=True,
            umask=0o077,
        )
        relay = _Relay(child.stderr)
        if stopping:
            child.send_signal(signal.SIGTERM)
        ready = _wait_ready(child, nbdkit_pidfile)
        if not ready and not stopping:
            child.wait()
            relay.join()
            raise VhdfsError(f"nbdkit could not start: {relay.last or f'exit status {child.returncode}'}")
        if ready and listen.unix:
            _share_socket(
                listen.unix, socket_access(named or [str(p) for p, _n in config.images], config.writable)
            )
        if ready:
            state.write_path(
                record,
                {
                    "pid": os.getpid(),
                    "nbdkit_pid": child.pid,
                    "listen": listen.key,
                    "uri": listen.uri(tls=bool(tls_psk)),
                    "images": [p for p, _n in config.images],
                    "writable": config.writable,
                },
            )
            if pidfile:
                _write_pid(pidfile)
            log.info("serving %s on %s", ", ".join(str(n or p) for p, n in config.images), listen.uri())
            state.sd_notify(f"READY=1\nSTATUS=serving on {listen.uri()}\nMAINPID={os.getpid()}")
        rc = child.wait()
        relay.join()
        state.sd_notify("STOPPING=1")
        clean = _verdict(config.verdict)
        if rc != 0:
            log.error("nbdkit exited with status %d", rc)
        elif not clean:
            log.error("some image was not flushed and closed cleanly (see above)")
        else:
            log.info("stopped; every image flushed and closed")
        return 0 if rc == 0 and clean else 1
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait()
        for s, h in old.items():
            signal.signal(s, h)
        with contextlib.suppress(OSError):
            os.unlink(record)
        if listen.unix:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(listen.unix).st_mode):
                    os.unlink(listen.unix)  # nbdkit leaves its socket behind
        for path in temp_children or ():
            with contextlib.suppress(OSError):
                os.unlink(path)
        shutil.rmtree(tmp, ignore_errors=True)


def _write_pid(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


class _Relay:
    """Copy nbdkit's stderr to ours line by line, remembering the last line (its error)."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        import threading

        self.last = ""
        self.stream = stream
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if line.strip():
                self.last = line.removeprefix("nbdkit: ")
            print(line, file=sys.stderr, flush=True)

    def join(self) -> None:
        self.thread.join(timeout=10)


def _wait_ready(child: subprocess.Popen[bytes], pidfile: str) -> bool:
    """True once nbdkit wrote its pidfile (it does so only when it accepts connections)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        with contextlib.suppress(OSError), open(pidfile) as f:
            if f.read().strip():
                return True
        time.sleep(0.02)
    log.error("nbdkit did not become ready within %.0f s", START_TIMEOUT)
    child.send_signal(signal.SIGTERM)
    return False


def _verdict(path: str | None) -> bool:
    if not path:
        return False
    try:
        with open(path) as f:
            return bool(json.load(f).get("clean"))
    except (OSError, ValueError):
        return False


def configure_logging(debug: bool) -> None:
    """Info-level logs to stderr (journald or the serve log file)."""
    fmt = (
        "vhdfs: %(levelname)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM") or sys.stderr.isatty()
        else "%(asctime)s vhdfs[%(process)d] %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, force=True)
