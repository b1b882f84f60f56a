"""One measurement each: the client side of every row, always pinned with ``taskset -c CPU``.

Each function runs one repetition and returns one number (MB/s, IOPS, seconds or MiB).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import tempfile
import time

from bench_systems import pinned

MiB = 1 << 20


class WorkloadFailed(Exception):
    pass


def sh(cmd: list[str], timeout: float = 600, pin: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(pinned(cmd) if pin else cmd, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if p.returncode != 0:
        raise WorkloadFailed(f"{cmd[0]} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
    return p


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


_DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.]+) s", re.M)


def _dd_rate(stderr: str) -> float:
    m = _DD_RE.search(stderr)
    if not m:
        raise WorkloadFailed(f"dd said: {stderr.strip()[-200:]}")
    n, s = int(m.group(1)), float(m.group(2))
    return n / s / 1e6


def dd_read(path: str, mib: int, direct: bool = False) -> float:
    """Sequential 1 MiB reads of the first ``mib`` MiB: MB/s."""
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={mib}"]
    if direct:
        cmd.append("iflag=direct")
    return _dd_rate(sh(cmd).stderr)


def dd_write(src: str, dst: str, mib: int) -> float:
    """Sequential 1 MiB writes of ``mib`` MiB (from a page-cached file), then fsync: MB/s."""
    return _dd_rate(sh(["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={mib}",
                        "conv=notrunc,fsync"]).stderr)


def warm(path: str, mib: int) -> None:
    """Read the file once so the page cache (the backing file's, or FUSE's) holds it."""
    sh(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={mib}"])


def _fio(args: list[str], runtime: float) -> dict:
    cmd = ["fio", "--output-format=json", "--time_based", f"--runtime={int(runtime * 1000)}ms",
           "--randrepeat=0", "--norandommap", "--group_reporting", "--invalidate=0", *args]
    p = sh(cmd, timeout=runtime + 120)
    out = p.stdout
    out = out[out.index("{"):]
    return json.loads(out)["jobs"][0]


def fio_randread(path: str, size: int, qd: int, runtime: float) -> float:
    """Random 4 KiB reads, buffered, psync; queue depth = number of jobs: IOPS."""
    job = _fio(["--name=randread", f"--filename={path}", f"--size={size}", "--rw=randread",
                "--bs=4k", "--ioengine=psync", f"--numjobs={qd}", "--thread"], runtime)
    return job["read"]["iops"]


def fio_randwrite(path: str, size: int, runtime: float) -> float:
    """Random 4 KiB writes, psync, fdatasync every 64 writes: IOPS."""
    job = _fio(["--name=randwrite", f"--filename={path}", f"--size={size}", "--rw=randwrite",
                "--bs=4k", "--ioengine=psync", "--fdatasync=64"], runtime)
    return job["write"]["iops"]


# -- the filesystem workload -----------------------------------------------------------------

def make_tree(root: str, files: int = 5000, seed: int = 7) -> str:
    """~5,000 small files (0.5-16 KiB) in 50 folders; built once and reused."""
    tree = os.path.join(root, f"tree-{files}")
    if os.path.exists(os.path.join(tree, ".done")):
        return tree
    rng = random.Random(seed)
    pool = rng.randbytes(1 * MiB)
    for i in range(files):
        d = os.path.join(tree, f"d{i % 50:02d}")
        os.makedirs(d, exist_ok=True)
        n = rng.randrange(512, 16 << 10)
        s = rng.randrange(0, len(pool) - n)
        with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
            f.write(pool[s:s + n])
    open(os.path.join(tree, ".done"), "w").close()
    return tree


@contextlib.contextmanager
def loop_device(path: str, offset: int | None = None, sizelimit: int | None = None,
                ro: bool = False):
    # losetup's default (buffered), the way DESIGN.md section 1 tells users to do it: with
    # --direct-io=on, qemu-storage-daemon 7.2's writable FUSE export corrupts the new ext4
    extra = (["-o", str(offset)] if offset is not None else []) + \
        (["--sizelimit", str(sizelimit)] if sizelimit is not None else []) + (["-r"] if ro else [])
    dev = sh(["losetup", "-f", "--show", *extra, path], pin=False).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def _umount(mnt: str) -> None:
    for _ in range(50):
        if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def fs_workload(raw: str, tree: str, scratch: str) -> tuple[float, float]:
    """Through a loop device: mkfs.ext4 + untar the tree + sync (seconds), then remount with cold
    caches and tar it all back out (seconds)."""
    mnt = tempfile.mkdtemp(prefix="ext4.", dir=scratch)
    try:
        with loop_device(raw) as dev:
            t0 = time.perf_counter()
            sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
            sh(["mount", dev, mnt], pin=False)
            try:
                sh(["sh", "-c", f"tar -C {tree} -cf - . | tar -C {mnt} -xf - && sync -f {mnt}"])
            finally:
                _umount(mnt)
            t_write = time.perf_counter() - t0
            drop_caches()
            sh(["mount", "-o", "ro", dev, mnt], pin=False)
            try:
                t1 = time.perf_counter()
                out = sh(["sh", "-c", f"tar -C {mnt} -cf - . | wc -c"]).stdout
                t_read = time.perf_counter() - t1
            finally:
                _umount(mnt)
            if int(out.split()[0]) < 5000 * 512:
                raise WorkloadFailed(f"read back only {out.strip()} bytes")
        return t_write, t_read
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def first_byte(path: str, offset: int, deadline: float) -> bytes:
    """Open and read 4 KiB at ``offset`` as soon as the file exists."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
            break
        except OSError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.0005)
    try:
        return os.pread(fd, 4096, offset)
    finally:
        os.close(fd)


# -- the user's own tools (issue 14): each returns the seconds one command took ---------------

def timed(cmd: str, timeout: float = 600) -> float:
    """Seconds of one shell command line (pinned like every client)."""
    t0 = time.perf_counter()
    sh(["sh", "-c", cmd], timeout=timeout)
    return time.perf_counter() - t0


def whole_disk_cmd(tool: str, path: str) -> str:
    """The command line of a whole-disk read by an ordinary tool."""
    return {
        "sha256": f"sha256sum {path} >/dev/null",
        # cp to a file on tmpfs (cp to /dev/null is not what a user does, and cp may skip it)
        "cp": f"cp {path} /dev/shm/bench-cp.raw; rc=$?; rm -f /dev/shm/bench-cp.raw; exit $rc",
        "dd4k": f"dd if={path} of=/dev/null bs=4k status=none",
        "dd1m": f"dd if={path} of=/dev/null bs=1M status=none",
    }[tool]


FS_TOOLS = {
    "tar": "tar -C {mnt} -cf - . | wc -c >/dev/null",
    "find": "find {mnt} | wc -l >/dev/null",
    # a string found nowhere: grep reads every byte of every file; exit 1 = no match
    "grep": "grep -r -a -c -F ZQXJ_no_such_string_JXQZ {mnt} >/dev/null; test $? -le 1",
}


def tsk_cmd(tool: str, path: str, sector: int, out: str) -> str:
    """The Sleuth Kit on the raw disk, the partition given by its start sector."""
    return {
        "fls": f"fls -r -o {sector} {path} | wc -l >/dev/null",
        "icat": f"icat -o {sector} {path} 0 >/dev/null",          # the NTFS $MFT, whole
        "tsk_recover": f"rm -rf {out}; tsk_recover -e -o {sector} {path} {out} >/dev/null; "
                       f"rc=$?; rm -rf {out}; exit $rc",
    }[tool]


@contextlib.contextmanager
def mounted_partition(disk: str, offset: int, size: int | None, scratch: str, fstype: str):
    """A read-only loop device over one partition of ``disk``, mounted (ext4 by mount(8),
    NTFS by ntfs-3g)."""
    mnt = tempfile.mkdtemp(prefix=f"{fstype}.", dir=scratch)
    try:
        with loop_device(disk, offset, size, ro=True) as dev:
            if fstype == "ntfs":
                sh(["ntfs-3g", "-o", "ro", dev, mnt], pin=False)
            else:
                sh(["mount", "-o", "ro", dev, mnt], pin=False)
            try:
                yield mnt
            finally:
                _umount(mnt)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
