#!/usr/bin/env python3
"""NBD rows: ``vhdfs serve`` against ``qemu-nbd`` and qemu-storage-daemon's NBD export, same image.

    taskset -c 0 .venv/bin/python bench/bench_nbd.py [--size-mib 512] [--seconds 5] [--json FILE]

Every server runs with default options on a unix socket, read-only, over one fully written
dynamic VHD (random content, built with qemu-img convert under bench/work/nbd/). Workloads:
``nbdcopy URI null:`` (sequential, libnbd's default 4 connections if multi-conn, else 1) and
random 4 KiB reads through the libnbd Python binding at queue depth 1 and 16, run by Debian's
``/usr/bin/python3`` (where python3-libnbd lives). Each workload first checks a sampled read
against the raw twin. Every server is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work", "nbd")
MiB = 1 << 20

RANDREAD = r"""
import os, random, sys, time
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
sock, export, qd, seconds, raw = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
h = nbd.NBD(); h.set_export_name(export); h.connect_unix(sock)
size = h.get_size()
rnd = random.Random(1)
with open(raw, "rb") as f:                       # content check first
    for _ in range(16):
        off = rnd.randrange(0, size // 4096) * 4096
        f.seek(off)
        assert h.pread(4096, off) == f.read(4096), "WRONG DATA"
bufs = [nbd.Buffer(4096) for _ in range(qd)]
done = 0
t0 = time.monotonic(); end = t0 + seconds
if qd == 1:
    while time.monotonic() < end:
        h.pread(4096, rnd.randrange(0, size // 4096) * 4096); done += 1
else:
    free = list(range(qd)); inflight = {}
    while True:
        now = time.monotonic()
        while free and now < end:
            i = free.pop()
            c = h.aio_pread(bufs[i], rnd.randrange(0, size // 4096) * 4096)
            inflight[c] = i
        if not inflight:
            break
        h.poll(-1)
        for c in [c for c in inflight if h.aio_command_completed(c)]:
            free.append(inflight.pop(c)); done += 1
print(done / (time.monotonic() - t0))
"""


def build(size_mib: int) -> tuple[str, str]:
    os.makedirs(WORK, exist_ok=True)
    raw, vhd = os.path.join(WORK, f"base{size_mib}.raw"), os.path.join(WORK, f"base{size_mib}.vhd")
    if not os.path.exists(vhd):
        with open(raw + ".tmp", "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        os.replace(raw + ".tmp", raw)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic",
                        raw, vhd + ".tmp"], check=True)
        os.replace(vhd + ".tmp", vhd)
        # qemu's vpc size rounding: keep the raw twin at the size every reader shows
        size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", vhd], capture_output=True,
                                             check=True).stdout)["virtual-size"])
        os.truncate(raw, size)
    return raw, vhd


def servers(vhd: str, sock: str) -> dict[str, list[str]]:
    stem = os.path.splitext(os.path.basename(vhd))[0]
    return {
        "vhdfs serve": [sys.executable, "-m", "vhdfs", "serve", "-f", "--unix", sock, vhd],
        "qemu-nbd": ["qemu-nbd", "-r", "-t", "-e", "16", "-f", "vpc", "-k", sock, "-x", stem, vhd],
        "qsd": ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={vhd},read-only=on",
                "--blockdev", "driver=vpc,node-name=d,file=f,read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e,node-name=d,name={stem},writable=off"],
    }


@contextlib.contextmanager
def started(cmd: list[str], sock: str, export: str):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["nbdinfo", "--size", f"nbd+unix:///{export}?socket={sock}"],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def seq_copy(uri: str, size: int) -> float:
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return size / MiB / (time.monotonic() - t0)


def rand_read(sock: str, export: str, qd: int, seconds: float, raw: str) -> float:
    out = subprocess.run(["/usr/bin/python3", "-c", RANDREAD, sock, export, str(qd), str(seconds), raw],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy", "qemu-nbd", "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"bench_nbd: {tool} is missing (scripts/install.sh, qemu-system-common)", file=sys.stderr)
            return 2
    raw, vhd = build(a.size_mib)
    size = os.path.getsize(raw)
    export = os.path.splitext(os.path.basename(vhd))[0]
    sock = os.path.join(WORK, "bench.sock")
    rows: dict[str, dict[str, float]] = {}
    for name, cmd in servers(vhd, sock).items():
        with started(cmd, sock, export):
            uri = f"nbd+unix:///{export}?socket={sock}"
            r: dict[str, float] = {}
            drop_caches()
            r["seq cold MiB/s"] = seq_copy(uri, size)
            r["seq warm MiB/s"] = max(seq_copy(uri, size) for _ in range(a.reps))
            r["4k QD1 IOPS"] = max(rand_read(sock, export, 1, a.seconds, raw) for _ in range(a.reps))
            r["4k QD16 IOPS"] = max(rand_read(sock, export, 16, a.seconds, raw) for _ in range(a.reps))
            rows[name] = r
            print(f"{name:12s} " + "  ".join(f"{k} {v:8.0f}" for k, v in r.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size_mib": a.size_mib, "seconds": a.seconds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
