"""The systems under test: how to expose one image as a raw file, and how to take it down.

Every system is a context manager factory: ``with system.mount(image, rw) as m:`` yields a
``Mounted`` with the path of the raw file and the daemon's pid (for RSS), and always cleans up in
``finally`` (unmount, wait, terminate, kill). Every daemon is started under ``taskset -c CPU`` so
it shares one CPU with the client (see DESIGN.md section 3: placement changes FUSE figures 5x).

A system that cannot serve an image raises ``NotApplicable`` with the reason; the table shows it
as ``n/a``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from bench_images import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
VHDFS = os.path.join(ROOT, ".venv", "bin", "vhdfs")
CPU = "0"
MOUNT_TIMEOUT = 30.0


class NotApplicable(Exception):
    """This system cannot run this cell; the message says why."""


class SystemFailed(Exception):
    """The system was expected to work here and did not; the message says how."""


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", CPU, *cmd]


@dataclass
class Mounted:
    path: str                     # the raw file to read/write
    pid: int | None = None        # the daemon serving it (None for the bare file)
    started: float = 0.0          # perf_counter() when the daemon was launched
    ready: float = 0.0            # perf_counter() when the raw file was visible
    log: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mount_seconds(self) -> float:
        return self.ready - self.started


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def is_mount(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == path:
                return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_file(path: str, proc: subprocess.Popen | None, deadline: float,
               mountpoint: str | None = None) -> None:
    while True:
        try:
            if os.stat(path).st_size > 0 and (mountpoint is None or is_mount(mountpoint)):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise SystemFailed(f"daemon exited with {proc.returncode} before {path} appeared")
        if time.perf_counter() > deadline:
            raise SystemFailed(f"{path} did not appear within {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.001)


def _spawn(cmd: list[str], logf: str) -> tuple[subprocess.Popen, float]:
    """Start a daemon pinned to the benchmark's CPU, its output in ``logf``; (proc, start)."""
    with open(logf, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(pinned(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return proc, t0


def _await(path: str, proc: subprocess.Popen | None, t0: float, mnt: str, logf: str) -> None:
    """``_wait_file``, with the daemon's last log lines in the error."""
    try:
        _wait_file(path, proc, t0 + MOUNT_TIMEOUT, mnt)
    except SystemFailed as e:
        raise SystemFailed(f"{e}: {_tail(logf, 2)}") from None


def _fusermount_u(mountpoint: str) -> None:
    for args in (["-u"], ["-u", "-z"]):
        if not is_mount(mountpoint):
            return
        subprocess.run(["fusermount3", *args, mountpoint], capture_output=True, timeout=30)
        for _ in range(200):
            if not is_mount(mountpoint):
                return
            time.sleep(0.01)


def _stop_proc(proc: subprocess.Popen | None, pid: int | None = None, grace: float = 20.0) -> None:
    """Wait for a daemon to exit after its unmount; terminate, then kill, if it lingers."""
    if proc is not None:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace if sig is None else 5)
                return
            except subprocess.TimeoutExpired:
                continue
        return
    if pid is None:
        return
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and _pid_alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        end = time.monotonic() + (grace if sig is None else 5)
        while time.monotonic() < end:
            if not _pid_alive(pid):
                return
            time.sleep(0.01)


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-n:])
    except OSError:
        return ""


class System:
    key = "?"
    label = "?"
    kind = "peer"  # bare | ceiling | vhdfs | peer
    writable = True

    def available(self) -> str | None:
        """None when usable on this machine, else why not."""
        return None

    def check(self, image: Image, rw: bool) -> None:
        """Raise NotApplicable when this system cannot serve ``image`` (``rw``: writable)."""
        if rw and not self.writable:
            raise NotApplicable(f"{self.label} is read-only")

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        raise NotImplementedError


class Bare(System):
    """The backing raw file itself: the physical limit on this machine."""

    key, label, kind = "bare", "bare file", "bare"

    def check(self, image: Image, rw: bool) -> None:
        if not image.raw:
            raise NotApplicable("no raw equivalent")

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        self.check(image, rw)
        t = time.perf_counter()
        yield Mounted(path=image.raw, started=t, ready=t)


class Passthrough(System):
    """bench/passthrough.py over the raw equivalent: the pyfuse3 + trio ceiling."""

    kind = "ceiling"

    def __init__(self, cache: bool) -> None:
        self.cache = cache
        self.key = "pt-cache" if cache else "pt"
        self.label = "pyfuse3 --cache" if cache else "pyfuse3"

    def check(self, image: Image, rw: bool) -> None:
        if not image.raw:
            raise NotApplicable("no raw equivalent")

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        self.check(image, rw)
        name = os.path.splitext(os.path.basename(image.raw))[0] + ".raw"
        cmd = [VENV_PY, os.path.join(HERE, "passthrough.py"), "--mode",
               "cache" if self.cache else "direct", "--name", name] + (["-w"] if rw else [])
        with _foreground_mount(scratch, "pt.", lambda mnt: cmd + [image.raw, mnt], name) as m:
            yield m


@contextlib.contextmanager
def _foreground_mount(scratch: str, prefix: str, make_cmd, name: str,
                      unmount_cmd: list[str] | None = None) -> Iterator[Mounted]:
    """A foreground FUSE daemon serving ``name`` in a fresh folder under ``scratch``.

    ``make_cmd(mountpoint)`` is the command; ``unmount_cmd`` (mountpoint appended) is tried
    before fusermount3. Always unmounted, stopped and cleaned up.
    """
    mnt = tempfile.mkdtemp(prefix=prefix, dir=scratch)
    logf = os.path.join(scratch, os.path.basename(mnt) + ".log")
    path = os.path.join(mnt, name)
    proc = None
    try:
        proc, t0 = _spawn(make_cmd(mnt), logf)
        _await(path, proc, t0, mnt, logf)
        yield Mounted(path=path, pid=proc.pid, started=t0, ready=time.perf_counter(), log=logf)
    finally:
        if unmount_cmd and is_mount(mnt):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(unmount_cmd + [mnt], capture_output=True, timeout=60)
        _fusermount_u(mnt)
        _stop_proc(proc)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def _vhdfs_help() -> str:
    try:
        return subprocess.run([VHDFS, "mount", "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


class Vhdfs(System):
    """``vhdfs mount -f [-w]`` with default options, in the foreground so its pid is the daemon's.

    The only vhdfs column: a target holds only in the configuration a user gets without flags
    (``--cache`` changes nothing since the default keeps attributes long too).
    """

    kind = "vhdfs"
    key = "vhdfs"
    label = "vhdfs"

    def available(self) -> str | None:
        if not os.access(VHDFS, os.X_OK):
            return f"{VHDFS} missing"
        help_ = _vhdfs_help()
        if "usage" not in help_:
            return "`vhdfs mount` not implemented yet"
        return None

    def check(self, image: Image, rw: bool) -> None:
        if image.fmt not in ("vhd", "vdi", "vhdx"):
            raise NotApplicable(f"format {image.fmt}")

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        self.check(image, rw)
        cmd = [VHDFS, "mount", "-f"] + (["-w"] if rw else [])
        name = os.path.splitext(os.path.basename(image.path))[0] + ".raw"
        with _foreground_mount(scratch, "vhdfs.", lambda mnt: cmd + [image.path, mnt], name,
                               unmount_cmd=[VHDFS, "umount"]) as m:
            yield m


class Qsd(System):
    """qemu-storage-daemon: ``--blockdev`` file + vpc/vdi, ``--export type=fuse``."""

    key, label = "qsd", "qemu-storage-daemon"

    def available(self) -> str | None:
        return None if shutil.which("qemu-storage-daemon") else "qemu-storage-daemon not installed"

    def check(self, image: Image, rw: bool) -> None:
        if image.fmt not in ("vhd", "vdi", "vhdx"):
            raise NotApplicable(f"format {image.fmt}")
        if image.parent:
            raise NotApplicable(f"QEMU's {'vhdx' if image.fmt == 'vhdx' else 'vpc'} driver has no "
                                "differencing support")

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        self.check(image, rw)
        fd, mnt = tempfile.mkstemp(prefix="qsd.", suffix=".raw", dir=scratch)
        os.close(fd)
        pidf = mnt + ".pid"
        logf = mnt + ".log"
        ro = "off" if rw else "on"
        drv = {"vhd": "vpc", "vdi": "vdi", "vhdx": "vhdx"}[image.fmt]
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=f0,filename={image.path},read-only={ro}",
               "--blockdev", f"driver={drv},node-name=d0,file=f0,read-only={ro}",
               "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={mnt},"
                           f"writable={'on' if rw else 'off'}",
               "--pidfile", pidf]
        proc = None
        pid = None
        try:
            proc, t0 = _spawn(cmd, logf)
            pid = proc.pid
            _await(mnt, proc, t0, mnt, logf)
            yield Mounted(path=mnt, pid=pid, started=t0, ready=time.perf_counter(), log=logf)
        finally:
            # qsd leaves a dead mount behind when signalled first, and does not exit when
            # unmounted: unmount, then SIGTERM it
            _fusermount_u(mnt)
            if proc is not None and proc.poll() is None:
                proc.terminate()
            _stop_proc(proc, grace=10)
            _fusermount_u(mnt)
            for p in (mnt, pidf):
                with contextlib.suppress(OSError):
                    os.unlink(p)


class Vhdimount(System):
    """libvhdi's ``vhdimount`` (read-only, VHD only); it backgrounds itself."""

    key, label = "vhdimount", "vhdimount"
    writable = False

    def available(self) -> str | None:
        return None if shutil.which("vhdimount") else "vhdimount not installed"

    def check(self, image: Image, rw: bool) -> None:
        super().check(image, rw)
        if image.fmt != "vhd":
            raise NotApplicable("vhdimount reads VHD only")

    @staticmethod
    def _find_pid(mnt: str) -> int | None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if args and os.path.basename(args[0]) == b"vhdimount" and mnt.encode() in args:
                return int(d)
        return None

    @contextlib.contextmanager
    def mount(self, image: Image, rw: bool, scratch: str) -> Iterator[Mounted]:
        self.check(image, rw)
        mnt = tempfile.mkdtemp(prefix="vhdimount.", dir=scratch)
        logf = os.path.join(scratch, os.path.basename(mnt) + ".log")
        pid = None
        proc = None
        try:
            proc, t0 = _spawn(["vhdimount", image.path, mnt], logf)
            # one file per layer, vhdi1 the bottom parent: the image itself is the last one
            path = os.path.join(mnt, f"vhdi{image.depth + 1}")
            _await(path, None, t0, mnt, logf)  # it backgrounds itself: proc exits early
            ready = time.perf_counter()
            pid = self._find_pid(mnt)
            yield Mounted(path=path, pid=pid, started=t0, ready=ready, log=logf)
        finally:
            _fusermount_u(mnt)
            _stop_proc(None, pid)
            if proc is not None:
                with contextlib.suppress(subprocess.SubprocessError):
                    proc.wait(timeout=5)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def all_systems() -> list[System]:
    return [Bare(), Passthrough(False), Passthrough(True), Vhdfs(), Qsd(),
            Vhdimount()]
