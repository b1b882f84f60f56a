"""Interleaved A/B runs of the user-disk and random-read rows: a fairer comparison on a busy machine.

``bench.py`` measures one system after the other, so a change of background load between them
moves a ratio (LATEST.txt's "grep -r cold 0.28x qsd" was such a change: interleaved it was
0.8-1.1x). Here every configuration is mounted at the same time and the runs alternate (ABC,
CBA, ...), and each line also gives the daemon's own CPU time and bytes (``/proc/<pid>/stat``
and ``/proc/<pid>/io``: ``rchar`` = what it was asked for, ``read_bytes`` = what the disk
delivered), steadier measures than wall time when the machine is shared.

    sudo taskset -c 0 .venv/bin/python bench/bench_ab.py ROWS REPS CONFIG...

ROWS: comma-separated ``TOOL_cold``/``TOOL_warm`` with TOOL one of sha256 cp dd4k dd1m (whole
disk), tar find grep (ext4 on loop), fls icat tsk_recover (NTFS; cold), rr1 rr16 (fio random
4 KiB on the dynamic VHD). CONFIG: ``qsd`` or ``vhdfs[:READAHEAD_KB[:MOUNT,ARGS[:ENV=V,...]]]``,
e.g. ``vhdfs:128`` (bdi readahead set after start), ``vhdfs::--direct-io``,
``vhdfs:::PYTHONPATH=/work/main`` (another tree). Images: as built by bench.py (``bench/work``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import bench_systems as S
import bench_workloads as W
from bench_images import Image

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
P1_OFF, P1_LEN, NTFS_SECTOR = 2048 * 512, 557056 * 512, 559104  # bench.phase_user's partitions


class VhdfsWith(S.Vhdfs):
    """``vhdfs mount -f`` with extra mount arguments."""

    def __init__(self, extra: list[str]) -> None:
        super().__init__(False)
        self.extra = extra

    @contextlib.contextmanager
    def mount(self, image, rw, scratch):
        cmd = [S.VHDFS, "mount", "-f", *self.extra]
        name = os.path.splitext(os.path.basename(image.path))[0] + ".raw"
        with S._foreground_mount(scratch, "vhdfs.", lambda mnt: [*cmd, image.path, mnt], name,
                                 unmount_cmd=[S.VHDFS, "umount"]) as m:
            yield m


def proc_counters(pid: int) -> tuple[int, int, int]:
    """(disk read_bytes, rchar, CPU ms) of a process so far."""
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for ln in f:
            k, v = ln.split(":")
            io[k] = int(v)
    with open(f"/proc/{pid}/stat") as f:
        t = f.read().rsplit(")", 1)[1].split()
    ticks = int(t[11]) + int(t[12])
    return io["read_bytes"], io["rchar"], ticks * 1000 // os.sysconf("SC_CLK_TCK")


def bdi_readahead(path: str) -> str:
    st = os.stat(path)
    return f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"


def command(row: str, disk: str, mnt: str | None):
    """The measurement of one row: seconds, or -IOPS for the fio rows."""
    tool = row.rsplit("_", 1)[0]
    if tool in ("sha256", "cp", "dd4k", "dd1m"):
        return lambda: W.timed(W.whole_disk_cmd(tool, disk))
    if tool in W.FS_TOOLS:
        line = W.FS_TOOLS[tool].format(mnt=mnt)
        return lambda: W.timed(line)
    if tool in ("fls", "icat", "tsk_recover"):
        return lambda: W.timed(W.tsk_cmd(tool, disk, NTFS_SECTOR, "/dev/shm/bench-ab-tsk"))
    if tool in ("rr1", "rr16"):
        return lambda: -W.fio_randread(disk, 512 << 20, int(tool[2:]), 1.0)
    raise SystemExit(f"bench_ab: unknown row {row}")


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    rows, reps, configs = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3:]
    user = Image("user", os.path.join(WORK, "user", "user.vhd"), "vhd", 512 << 20,
                 raw=os.path.join(WORK, "user", "user.raw"))
    dyn = Image("dyn", os.path.join(WORK, "512M", "dyn.vhd"), "vhd", 512 << 20,
                raw=os.path.join(WORK, "512M", "base.raw"))
    img = dyn if all(r.startswith("rr") for r in rows) else user
    scratch = os.path.join(WORK, "scratch")
    os.makedirs(scratch, exist_ok=True)
    with contextlib.ExitStack() as stack:
        mounted = []
        for config in configs:
            parts = config.split(":") + ["", "", ""]
            system = S.Qsd() if parts[0] == "qsd" else VhdfsWith(parts[2].split(",") if parts[2] else [])
            env = dict(kv.split("=", 1) for kv in parts[3].split(",")) if parts[3] else {}
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                m = stack.enter_context(system.mount(img, False, scratch))
            finally:
                os.environ.clear()
                os.environ.update(saved)
            time.sleep(1.0)  # vhdfs raises its readahead just after it is ready
            if parts[1]:
                with open(bdi_readahead(m.path), "w") as f:
                    f.write(parts[1])
            mnt = None
            if any(r.rsplit("_", 1)[0] in W.FS_TOOLS for r in rows):
                mnt = stack.enter_context(W.mounted_partition(m.path, P1_OFF, P1_LEN, scratch, "ext4"))
            with open(bdi_readahead(m.path)) as f:
                print(f"{config}: read_ahead_kb {f.read().strip()}", flush=True)
            mounted.append((config, m, mnt))
        for row in rows:
            got: dict[str, list[tuple[float, int, int, int]]] = {}
            for rep in range(reps):
                for config, m, mnt in (mounted if rep % 2 == 0 else mounted[::-1]):
                    run = command(row, m.path, mnt)
                    if row.endswith("cold"):
                        W.drop_caches()
                    elif rep == 0:
                        run()
                    before = proc_counters(m.pid)
                    value = run()
                    after = proc_counters(m.pid)
                    got.setdefault(config, []).append((value, *(a - b for a, b in zip(after, before, strict=True))))
            for config, runs in got.items():
                values = [v[0] for v in runs]
                med = statistics.median(values)
                shown = f"{-med:8.0f} IOPS" if med < 0 else f"{med * 1000:7.0f} ms"
                each = " ".join(f"{-v:.0f}" if v < 0 else f"{v * 1000:.0f}" for v in values)
                disk, rchar, cpu = (statistics.median(v[i] for v in runs) for i in (1, 2, 3))
                print(f"{row:16s} {config:30s} {shown} [{each}]  disk {disk / 2**20:6.1f} MiB  "
                      f"rchar {rchar / 2**20:6.1f} MiB  daemon CPU {cpu:.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
