"""Real mounts for tests: a foreground daemon, loop devices and kernel mounts that always go away.

Every context manager here cleans up in ``finally`` whatever happened inside, with timeouts on
every subprocess, so a failing test never leaves a mount or a loop device behind (DESIGN.md §7).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
VHDFS = [sys.executable, "-m", "vhdfs"]


def run(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a timeout and captured text output; a failure shows stderr."""
    kw.setdefault("cwd", REPO)
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)  # CI has no stdin; nothing may wait on it
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def vhdfs(*args: str | os.PathLike[str], check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m vhdfs ARGS`` with captured text output."""
    return run([*VHDFS, *map(str, args)], check=check, timeout=timeout)


def new_vhd(path: Path, size: str = "64M") -> Path:
    """A new, empty dynamic VHD made by ``vhdfs create`` (what a -w mount test starts from)."""
    assert vhdfs("create", "--size", size, path).returncode == 0
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True while anything is mounted there, per /proc/self/mountinfo.

    Unlike ``os.path.ismount``, also true for a FUSE mount whose daemon died (its root then
    fails ``lstat`` with ENOTCONN), which is exactly the mount a killed-daemon test leaves.
    """
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False


def force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Unmount if mounted: ``fusermount3 -u``, then ``umount``, then lazily."""
    mp = os.fspath(mountpoint)
    for cmd in (["fusermount3", "-u", mp], ["umount", mp], ["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
        if not is_mounted(mp):
            return
        with contextlib.suppress(Exception):
            subprocess.run(cmd, capture_output=True, timeout=30)


@dataclass
class Mount:
    """A running foreground daemon serving ``path``."""

    path: Path
    proc: subprocess.Popen
    logfile: object = field(repr=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self) -> str:
        self.logfile.seek(0)  # type: ignore[attr-defined]
        return self.logfile.read().decode(errors="replace")  # type: ignore[attr-defined]

    def unmount(self, timeout: float = 60) -> int:
        """Clean unmount via ``vhdfs umount``; returns the daemon's exit status."""
        res = vhdfs("umount", self.path, timeout=timeout)
        assert res.returncode == 0, f"vhdfs umount failed: {res.stderr}\n--- daemon log ---\n{self.log()}"
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def mounted(images: Sequence[str | os.PathLike[str]], mountpoint: str | os.PathLike[str],
            *options: str, timeout: float = 20) -> Iterator[Mount]:
    """``vhdfs mount --foreground OPTIONS IMAGES MOUNTPOINT`` for the ``with`` body.

    Waits until the mountpoint is live and its first file answers; fails at once if the daemon
    died (with its log). Always unmounts, then terminates and finally kills the daemon.
    """
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    logf = tempfile.TemporaryFile()
    cmd = [*VHDFS, "mount", "--foreground", *map(str, options), *map(str, images), str(mp)]
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    m = Mount(mp, proc, logf)
    try:
        deadline = time.monotonic() + timeout
        from vhdfs.service import state

        # Ready = the daemon recorded itself (after reading its own first file through the mount).
        while not (os.path.ismount(mp) and (state.read(str(mp), ".json") or {}).get("pid") == proc.pid):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} before mounting:\n{m.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mount not live after {timeout} s:\n{m.log()}")
            time.sleep(0.02)
        yield m
    finally:
        force_unmount(mp)
        stop_daemon(proc)
        logf.close()


def stop_daemon(proc: subprocess.Popen) -> None:
    """Wait for an unmounted daemon to exit; terminate it, then kill it, if it does not."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def loop_device(path: str | os.PathLike[str], partscan: bool = False, readonly: bool = False) -> Iterator[str]:
    """``losetup -f --show`` the file; always detached afterwards."""
    cmd = ["losetup", "-f", "--show"] + (["-P"] if partscan else []) + (["-r"] if readonly else [])
    dev = run([*cmd, os.fspath(path)]).stdout.strip()
    try:
        if partscan and shutil.which("udevadm"):
            run(["udevadm", "settle", "--timeout=10"], check=False)
        yield dev
    finally:
        for _ in range(50):
            res = subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
            if res.returncode == 0:
                break
            time.sleep(0.1)


def wait_for(path: str, timeout: float = 10) -> None:
    """Partition nodes appear asynchronously after ``losetup -P``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@contextlib.contextmanager
def fs_mounted(source: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
               *options: str) -> Iterator[Path]:
    """A kernel mount (``mount [-o ...] SOURCE MOUNTPOINT``); always unmounted."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    cmd = ["mount"] + (["-o", ",".join(options)] if options else []) + [os.fspath(source), str(mp)]
    run(cmd)
    try:
        yield mp
    finally:
        for _ in range(50):
            if not is_mounted(mp):
                break
            res = subprocess.run(["umount", str(mp)], capture_output=True, timeout=30)
            if res.returncode != 0:
                time.sleep(0.1)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True, timeout=30)


def make_tree(root: Path, seed: int = 1, files: int = 40) -> dict[str, bytes]:
    """A small tree of files with varied sizes; returns relative path -> content."""
    import random

    rnd = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(files):
        rel = f"d{i % 5}/sub{i % 3}/f{i}.bin"
        data = rnd.randbytes(rnd.choice([0, 1, 511, 4096, 70_000, 300_000]))
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = data
    return out


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.bin")}


def sfdisk_partitions(path: str | os.PathLike[str]) -> dict[int, tuple[int, int]]:
    """Partition number -> (byte offset, byte length), as sfdisk reads the table."""
    import json

    table = json.loads(run(["sfdisk", "--json", os.fspath(path)]).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    out = {}
    for p in table.get("partitions", []):
        number = int("".join(ch for ch in p["node"][len(os.fspath(path)):] if ch.isdigit()))
        out[number] = (p["start"] * sector, p["size"] * sector)
    return out


_KERNEL_PARTSCAN: bool | None = None  # learnt once: does this kernel parse partition tables?


@contextlib.contextmanager
def partition_device(path: str | os.PathLike[str], number: int, readonly: bool = False) -> Iterator[str]:
    """A block device for partition ``number`` of a disk file, made by the kernel's own reading.

    ``losetup -P`` where the kernel parses partition tables; on kernels built without
    MSDOS/EFI partition support (this CI's), a loop device with sfdisk's offset and size.
    """
    global _KERNEL_PARTSCAN
    if _KERNEL_PARTSCAN is not False:
        with loop_device(path, partscan=True, readonly=readonly) as dev:
            node = f"{dev}p{number}"
            deadline = time.monotonic() + 2
            while not os.path.exists(node) and time.monotonic() < deadline:
                time.sleep(0.05)
            _KERNEL_PARTSCAN = os.path.exists(node)
            if _KERNEL_PARTSCAN:
                yield node
                return
    start, length = sfdisk_partitions(path)[number]
    cmd = ["losetup", "-f", "--show", "--offset", str(start), "--sizelimit", str(length)]
    dev = run(cmd + (["-r"] if readonly else []) + [os.fspath(path)]).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.1)
