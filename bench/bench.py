#!/usr/bin/env python3
"""vhdfs against qemu-storage-daemon, vhdimount, a bare pyfuse3 passthrough and the bare file.

Run through ``bench/run.sh [--quick] [--json FILE]`` (root): it installs what is needed, pins
this process - and so every daemon and client it starts - to one CPU, and calls this.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_report as R  # noqa: E402
import bench_workloads as W  # noqa: E402
from bench_images import MiB, SPARSE_PROBE, SPARSE_VHDX, SPARSE_WRITES, ImageSet, sample_digest  # noqa: E402
from bench_systems import CPU, NotApplicable, SystemFailed, all_systems, rss_mib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.size = (512 if args.quick else 2048) * MiB
        self.reps = args.reps
        self.fio_runtime = 0.5 if args.quick else 3
        # a seq-read cell reads the whole image unless a first pass shows that would take longer
        # than read_slow seconds (vhdimount): then only what read_budget seconds read
        self.read_slow = 3.0 if args.quick else 10.0
        self.read_budget = 1.0 if args.quick else 4.0
        # MiB written per seq-write run (into an image of self.size)
        self.write_mib = 128 if args.quick else 1024
        self.work = os.path.join(HERE, "work")
        self.scratch = os.path.join(self.work, "scratch")
        self.results: dict[str, dict[str, R.Cell]] = {r.key: {} for r in R.ROWS}
        self.systems = [s for s in all_systems()
                        if not args.systems or s.key in args.systems.split(",")]
        self.unavailable = {s.key: s.available() for s in self.systems}
        self.refs: dict[str, str] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def cell(self, row: str, sys_key: str) -> R.Cell:
        return self.results[row].setdefault(sys_key, R.Cell())

    @contextlib.contextmanager
    def guarded(self, rows: list[str], sys_key: str, cleanup: bool = False) -> Iterator[None]:
        """One system's runs of ``rows``: not applicable or failed goes in the table, never up."""
        try:
            yield
        except NotApplicable as e:
            self.mark(rows, sys_key, f"n/a: {e}")
        except (SystemFailed, W.WorkloadFailed, OSError, subprocess.SubprocessError) as e:
            log(f"  {sys_key}: {e}")
            self.mark(rows, sys_key, f"FAILED: {sys_key}: {e}")
        finally:
            if cleanup:
                self._cleanup_scratch_images()

    def mark(self, rows: list[str], sys_key: str, note: str) -> None:
        for r in rows:
            c = self.cell(r, sys_key)
            if not c.values and c.note is None:
                c.note = note

    def measure(self, row: str, sys_key: str, fn, *a) -> None:
        c = self.cell(row, sys_key)
        try:
            c.values.append(fn(*a))
        except (W.WorkloadFailed, OSError, subprocess.SubprocessError) as e:
            if c.note is None:
                c.note = f"FAILED: {sys_key}: {row}: {e}"
            log(f"  {sys_key} {row}: {e}")

    def wanted(self, rows: list[str]) -> bool:
        if self.args.only and not any(fnmatch.fnmatchcase(r, p) for r in rows
                                      for p in self.args.only.split(",")):
            return False
        return not self.args.rows or any(r.startswith(p) for r in rows
                                         for p in self.args.rows.split(","))

    def each_system(self, rows: list[str], keys: list[str] | None = None):
        for s in self.systems:
            if keys is not None and s.key not in keys:
                continue
            why = self.unavailable.get(s.key)
            if why:
                self.mark(rows, s.key, f"n/a: {why}")
                continue
            yield s

    def verify(self, sys_key: str, image, path: str, rows: list[str]) -> bool:
        """Sampled content check against the raw twin: a fast wrong answer is no win."""
        if not image.raw:
            return True
        ref = self.refs.get(image.raw)
        if ref is None:
            ref = self.refs[image.raw] = sample_digest(image.raw, image.size)
        got = sample_digest(path, image.size)
        if got != ref:
            for r in rows:
                self.cell(r, sys_key).flags.append(f"WRONG DATA from {sys_key} on {image.key}")
            log(f"  {sys_key}: content of {image.key} DIFFERS from its raw twin")
            return False
        return True

    # -- phases --------------------------------------------------------------------------------

    def read_cap(self, path: str, mib: int) -> int:
        """MiB to read per seq-read run: all, unless that would take longer than the budget."""
        probe = min(mib, 32)
        rate = W.dd_read(path, probe)  # MB/s
        full = mib * MiB / 1e6 / rate
        if full <= self.read_slow:
            return mib
        return max(16, int(self.read_budget * rate * 1e6 / MiB) // 16 * 16)

    def phase_read_dyn(self, images) -> None:
        rows = ["seq_dd_warm", "seq_dd_cold", "seq_ddd_warm", "seq_ddd_cold",
                "rr_qd1_warm", "rr_qd1_cold", "rr_qd16_warm", "rr_qd16_cold"]
        if not self.wanted(rows):
            return
        img = images["dyn"]
        mib = self.size // MiB
        for s in self.each_system(rows):
            log(f"read/dyn: {s.key}")
            with self.guarded(rows, s.key):
                s.check(img, False)
                with s.mount(img, False, self.scratch) as m:
                    self.verify(s.key, img, m.path, rows)
                    n = self.read_cap(m.path, mib)
                    if n < mib:
                        for r in rows[:4]:
                            self.cell(r, s.key).flags.append(f"first {n} MiB per run (slow)")
                    W.warm(m.path, n)
                    for _ in range(self.reps):
                        self.measure("seq_dd_warm", s.key, W.dd_read, m.path, n)
                        self.measure("seq_ddd_warm", s.key, W.dd_read, m.path, n, True)
                    for _ in range(self.reps):
                        W.drop_caches()
                        self.measure("seq_dd_cold", s.key, W.dd_read, m.path, n)
                        W.drop_caches()
                        self.measure("seq_ddd_cold", s.key, W.dd_read, m.path, n, True)
                    W.warm(m.path, n)
                    for _ in range(self.reps):
                        self.measure("rr_qd1_warm", s.key, W.fio_randread, m.path, img.size, 1,
                                     self.fio_runtime)
                        self.measure("rr_qd16_warm", s.key, W.fio_randread, m.path, img.size, 16,
                                     self.fio_runtime)
                    for _ in range(self.reps):
                        W.drop_caches()
                        self.measure("rr_qd1_cold", s.key, W.fio_randread, m.path, img.size, 1,
                                     self.fio_runtime)
                        W.drop_caches()
                        self.measure("rr_qd16_cold", s.key, W.fio_randread, m.path, img.size, 16,
                                     self.fio_runtime)

    def phase_read_other(self, images, notes) -> None:
        for key, row in (("fixed", "seq_fixed_warm"), ("diff1", "seq_diff1_warm"),
                         ("diff8", "seq_diff8_warm"), ("vdi", "seq_vdi_warm")):
            if not self.wanted([row]):
                continue
            img = images.get(key)
            if img is None:
                for s in self.systems:
                    self.mark([row], s.key, f"n/a: {key}: {notes.get('chain', 'image not built')}")
                continue
            mib = self.size // MiB
            for s in self.each_system([row]):
                log(f"read/{key}: {s.key}")
                with self.guarded([row], s.key):
                    s.check(img, False)
                    with s.mount(img, False, self.scratch) as m:
                        self.verify(s.key, img, m.path, [row])
                        n = self.read_cap(m.path, mib)
                        if n < mib:
                            self.cell(row, s.key).flags.append(f"first {n} MiB per run (slow)")
                        W.warm(m.path, n)
                        for _ in range(self.reps):
                            self.measure(row, s.key, W.dd_read, m.path, n)

    def _fresh(self, iset: ImageSet, kind: str, tag: str):
        return iset.fresh_dynamic(self.scratch, tag) if kind == "new" else \
            iset.fresh_child(self.scratch, tag)

    def _cleanup_scratch_images(self) -> None:
        for f in os.listdir(self.scratch):
            if f.endswith((".vhd", ".vhdx", ".rawfile")):
                os.unlink(os.path.join(self.scratch, f))

    def phase_write(self, iset: ImageSet) -> None:
        mib = self.size // MiB
        src = os.path.join(iset.dir, "base.raw")
        for kind, row in (("new", "sw_new"), ("child", "sw_child")):
            if not self.wanted([row]):
                continue
            W.warm(src, mib)
            for s in self.each_system([row]):
                log(f"write/{kind}: {s.key}")
                with self.guarded([row], s.key, cleanup=True):
                    for i in range(self.reps):
                        try:
                            img = self._fresh(iset, kind, s.key)
                        except (RuntimeError, OSError) as e:
                            raise NotApplicable(f"differencing child not created: {e}") from None
                        s.check(img, True)
                        with s.mount(img, True, self.scratch) as m:
                            self.measure(row, s.key, W.dd_write, src, m.path, self.write_mib)

        row = "rw_fsync64"
        if self.wanted([row]):
            for s in self.each_system([row]):
                log(f"write/random: {s.key}")
                with self.guarded([row], s.key, cleanup=True):
                    s.check(iset.images["dyn"], True)
                    img = iset.working_copy(self.scratch, s.key)
                    with s.mount(img, True, self.scratch) as m:
                        for _ in range(self.reps):
                            self.measure(row, s.key, W.fio_randwrite, m.path, img.size,
                                         self.fio_runtime)

    def phase_fs(self, iset: ImageSet) -> None:
        rows = ["fs_write", "fs_read"]
        if not self.wanted(rows):
            return
        tree = W.make_tree(self.work)
        subprocess.run(["sh", "-c", f"tar -C {tree} -cf - . | wc -c"], capture_output=True)
        for s in self.each_system(rows):
            log(f"fs: {s.key}")
            with self.guarded(rows, s.key, cleanup=True):
                for _ in range(self.reps):
                    img = iset.fresh_dynamic(self.scratch, s.key)
                    s.check(img, True)
                    with s.mount(img, True, self.scratch) as m:
                        try:
                            tw, tr = W.fs_workload(m.path, tree, self.scratch)
                        except (W.WorkloadFailed, OSError, subprocess.SubprocessError) as e:
                            self.mark(rows, s.key, f"FAILED: {s.key}: {e}")
                            log(f"  {s.key}: {e}")
                            break
                    self.cell("fs_write", s.key).values.append(tw)
                    self.cell("fs_read", s.key).values.append(tr)

    def phase_sparse(self, images) -> None:
        rows = ["sparse_mount", "sparse_ttfb", "sparse_rss"]
        if not self.wanted(rows):
            return
        img = images["sparse"]
        want = bytes([SPARSE_WRITES[1][1]]) * 4096
        for s in self.each_system(rows):
            log(f"sparse: {s.key}")
            with self.guarded(rows, s.key):
                s.check(img, False)
                for _ in range(self.reps):
                    # the image's pages leave the page cache (the software's stay: a warm start)
                    for p in (img.path, img.raw):
                        fd = os.open(p, os.O_RDONLY)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
                    with s.mount(img, False, self.scratch) as m:
                        data = W.first_byte(m.path, SPARSE_PROBE, m.started + 30)
                        t = time.perf_counter() - m.started
                        if data != want:
                            raise W.WorkloadFailed("wrong data at 1 TiB")
                        if s.key != "bare":
                            self.cell("sparse_mount", s.key).values.append(m.mount_seconds)
                            rss = rss_mib(m.pid)
                            if rss is not None:
                                self.cell("sparse_rss", s.key).values.append(rss)
                        self.cell("sparse_ttfb", s.key).values.append(t)
                if s.key == "bare":
                    self.mark(["sparse_mount", "sparse_rss"], s.key, "n/a: no daemon")

    # -- VHDX beside VHD (issue 10) --------------------------------------------------------------

    X_SYSTEMS = ["vhdfs", "qsd"]   # default options against the one peer that reads VHDX

    def phase_read_vhdx(self, images, notes) -> None:
        """VHDX read rows, and the dynamic VHD (``xr``) and the depth-1 differencing VHD with the
        same writes as ``dx1.vhdx`` (``xrd``) measured again beside them.

        The targets compare VHDX with the dynamic VHD, so both are mounted at once and their
        runs alternate (A B C D, D C B A, ...): measured phases apart, a change of background
        load moved the ratio by more than the formats differ (0.77-1.16x for the same code).
        """
        sets = [(pre, key) for pre, key in (("xr", "dyn"), ("xrd", "diff1"), ("x", "dynx"), ("xq", "qdynx"),
                                                 ("xd", "dx1"))
                if self.wanted(self._x_rows(pre))]
        for pre, key in list(sets):
            if images.get(key) is None:
                for s in self.systems:
                    self.mark(self._x_rows(pre), s.key, f"n/a: {key}: {notes.get('vhdx', 'image not built')}")
                sets.remove((pre, key))
        mib = self.size // MiB
        for s in self.each_system([r for pre, _ in sets for r in self._x_rows(pre)], self.X_SYSTEMS):
            mine = [(pre, key) for pre, key in sets if s.key == "vhdfs" or pre in ("x", "xq")]
            with contextlib.ExitStack() as stack:
                ready = []  # (row prefix, image, mount)
                for pre, key in mine:
                    log(f"read/{key}: {s.key}")
                    with self.guarded(self._x_rows(pre), s.key):
                        img = images[key]
                        s.check(img, False)
                        m = stack.enter_context(s.mount(img, False, self.scratch))
                        self.verify(s.key, img, m.path, self._x_rows(pre))
                        ready.append((pre, img, m))

                def each(rep: int):
                    return ready if rep % 2 == 0 else ready[::-1]

                for _pre, _img, m in ready:
                    W.warm(m.path, mib)
                for rep in range(self.reps):
                    for pre, img, m in each(rep):
                        self.measure(f"{pre}_seq_warm", s.key, W.dd_read, m.path, mib)
                        self.measure(f"{pre}_rr_qd1_warm", s.key, W.fio_randread, m.path, img.size, 1,
                                     self.fio_runtime)
                for rep in range(self.reps):
                    for pre, img, m in each(rep):
                        W.drop_caches()
                        self.measure(f"{pre}_seq_cold", s.key, W.dd_read, m.path, mib)
                        W.drop_caches()
                        self.measure(f"{pre}_rr_qd16_cold", s.key, W.fio_randread, m.path, img.size, 16,
                                     self.fio_runtime)

    @staticmethod
    def _x_rows(pre: str) -> list[str]:
        return [f"{pre}_seq_warm", f"{pre}_seq_cold", f"{pre}_rr_qd1_warm", f"{pre}_rr_qd16_cold"]

    def phase_write_vhdx(self, iset: ImageSet) -> None:
        if "dynx" not in iset.images:
            return
        src = os.path.join(iset.dir, "base.raw")
        for child, row in ((False, "x_sw_new"), (True, "x_sw_child")):
            if not self.wanted([row]):
                continue
            W.warm(src, self.size // MiB)
            for s in self.each_system([row], self.X_SYSTEMS):
                log(f"write/vhdx {'child' if child else 'new'}: {s.key}")
                with self.guarded([row], s.key, cleanup=True):
                    for _ in range(self.reps):
                        img = iset.fresh_vhdx(self.scratch, s.key, child)
                        s.check(img, True)
                        with s.mount(img, True, self.scratch) as m:
                            self.measure(row, s.key, W.dd_write, src, m.path, self.write_mib)
        row = "x_rw_fsync64"
        if self.wanted([row]):
            for s in self.each_system([row], self.X_SYSTEMS):
                log(f"write/vhdx random: {s.key}")
                with self.guarded([row], s.key, cleanup=True):
                    img = iset.working_copy(self.scratch, s.key, "vhdx")
                    s.check(img, True)
                    with s.mount(img, True, self.scratch) as m:
                        for _ in range(self.reps):
                            self.measure(row, s.key, W.fio_randwrite, m.path, img.size,
                                         self.fio_runtime)

    def phase_sparse_vhdx(self, images) -> None:
        want = bytes([SPARSE_WRITES[1][1]]) * 4096
        for key in SPARSE_VHDX:
            rows = [f"{key}_ttfb", f"{key}_rss"]
            if not self.wanted(rows):
                continue
            img = images.get(key)
            if img is None:
                self.mark(rows, "vhdfs", "n/a: image not built")
                continue
            for s in self.each_system(rows, self.X_SYSTEMS):
                log(f"sparse/{key}: {s.key}")
                with self.guarded(rows, s.key):
                    s.check(img, False)
                    for _ in range(self.reps):
                        fd = os.open(img.path, os.O_RDONLY)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
                        with s.mount(img, False, self.scratch) as m:
                            data = W.first_byte(m.path, SPARSE_PROBE, m.started + 30)
                            t = time.perf_counter() - m.started
                            if data != want:
                                raise W.WorkloadFailed("wrong data at 1 TiB")
                            self.cell(rows[0], s.key).values.append(t)
                            rss = rss_mib(m.pid)
                            if rss is not None:
                                self.cell(rows[1], s.key).values.append(rss)

    # -- the user's own tools (issue 14) -------------------------------------------------------

    def phase_user(self, iset: ImageSet) -> None:
        rows = [r.key for r in R.ROWS if r.key.startswith("u_")]
        if not self.wanted(rows):
            return
        try:
            img = iset.user_disk()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log(f"user disk not built: {e}")
            for s in self.systems:
                self.mark(rows, s.key, f"n/a: user disk not built: {e}")
            return
        p1_off, p1_len, ntfs_sector = 2048 * 512, 557056 * 512, 559104
        out = os.path.join("/dev/shm", "bench-tsk")

        # All systems are mounted at once and their runs alternate (A B, B A, ...): measured one
        # system after the other, a change of background load between them moved a ratio
        # (LATEST.txt's "grep -r cold 0.28x qsd" was 0.8-1.1x interleaved; bench_ab.py).
        fs_rows = [r for r in rows if r[2:].startswith(("tar", "find", "grep"))]
        with contextlib.ExitStack() as stack:
            ready = []  # (system key, mounted disk, its ext4 partition's mountpoint or None)
            # --quick: vhdfs against qsd only (the target); the full run adds the bare file
            for s in self.each_system(rows, ["vhdfs", "qsd"] if self.quick else ["bare", "vhdfs", "qsd"]):
                log(f"user: {s.key}")
                with self.guarded(rows, s.key):
                    s.check(img, False)
                    m = stack.enter_context(s.mount(img, False, self.scratch))
                    self.verify(s.key, img, m.path, rows)
                    mnt = None
                    if self.wanted(fs_rows):
                        mnt = stack.enter_context(
                            W.mounted_partition(m.path, p1_off, p1_len, self.scratch, "ext4"))
                    ready.append((s.key, m, mnt))

            def cold_warm(tool: str, make_run, modes=("cold", "warm")) -> None:
                """``make_run(mounted, ext4_mnt)`` gives the measurement of one system."""
                for mode in modes:
                    row = f"u_{tool}_{mode}"
                    if not self.wanted([row]):
                        continue
                    if mode == "warm":
                        for _, m, mnt in ready:
                            with contextlib.suppress(W.WorkloadFailed, OSError, subprocess.SubprocessError):
                                make_run(m, mnt)()
                    for rep in range(self.reps):
                        for key, m, mnt in (ready if rep % 2 == 0 else ready[::-1]):
                            if mode == "cold":
                                W.drop_caches()
                            self.measure(row, key, make_run(m, mnt))

            for tool in ("sha256", "cp", "dd4k", "dd1m"):
                cold_warm(tool, lambda m, mnt, t=tool: lambda: W.timed(W.whole_disk_cmd(t, m.path)))
            for tool, cmd in W.FS_TOOLS.items():
                cold_warm(tool, lambda m, mnt, c=cmd: lambda: W.timed(c.format(mnt=mnt)))
            for tool in ("fls", "icat", "tsk_recover"):
                cold_warm(tool, lambda m, mnt, t=tool: lambda: W.timed(
                    W.tsk_cmd(t, m.path, ntfs_sector, out)), ("cold",))

            def ntfs3g(m, mnt) -> Callable[[], float]:
                def run() -> float:
                    t0 = time.perf_counter()
                    with W.mounted_partition(m.path, ntfs_sector * 512, None, self.scratch,
                                             "ntfs") as nmnt:
                        W.timed(W.FS_TOOLS["tar"].format(mnt=nmnt))
                    return time.perf_counter() - t0
                return run
            cold_warm("ntfs3g", ntfs3g, ("cold",))

    # -- header and main ---------------------------------------------------------------------

    def meta(self, load_before: str) -> dict:
        def ver(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=10).stdout.strip().splitlines()[0]
            except (OSError, IndexError, subprocess.SubprocessError):
                return "?"
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/loadavg") as f:
            load_after = f.read().strip()
        rev = ver(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "vhdfs"],
                               capture_output=True, text=True).stdout.strip()
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": "quick" if self.quick else "full",
            "image_size_mib": self.size // MiB,
            "reps": self.reps,
            "fio_runtime_s": self.fio_runtime,
            "write_mib": self.write_mib,
            "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(),
            "placement": f"every daemon and client pinned with taskset -c {CPU} "
                         f"(this process affinity: {sorted(os.sched_getaffinity(0))})",
            "loadavg_before": load_before, "loadavg_after": load_after,
            "vhdfs": f"git {rev}{' +uncommitted vhdfs/ changes' if dirty else ''}",
            "qemu": ver(["qemu-storage-daemon", "--version"]),
            "vhdimount": ver(["vhdimount", "-V"]),
            "fio": ver(["fio", "--version"]),
            "python": platform.python_version(),
            "unavailable": {k: v for k, v in self.unavailable.items() if v},
        }

    def run(self) -> int:
        with open("/proc/loadavg") as f:
            load_before = f.read().strip()
        t0 = time.monotonic()
        os.makedirs(self.scratch, exist_ok=True)
        for f in os.listdir(self.scratch):  # daemon logs of the previous run
            if f.endswith(".log"):
                os.unlink(os.path.join(self.scratch, f))
        for k, v in self.unavailable.items():
            if v:
                log(f"{k}: unavailable: {v}")
        iset = ImageSet(self.work, self.size, log)
        images = iset.build()
        try:
            self.phase_read_dyn(images)
            self.phase_read_other(images, iset.notes)
            self.phase_sparse(images)
            self.phase_write(iset)
            self.phase_fs(iset)
            self.phase_read_vhdx(images, iset.notes)
            self.phase_sparse_vhdx(images)
            self.phase_write_vhdx(iset)
            self.phase_user(iset)
        finally:
            self._cleanup_scratch_images()
        meta = self.meta(load_before)
        meta["elapsed_s"] = round(time.monotonic() - t0, 1)
        header = [
            f"vhdfs benchmark ({meta['mode']}): {meta['date']}  {meta['vhdfs']}",
            f"machine: {meta['cpus']} x {meta['cpu']}, kernel {meta['kernel']}, Python {meta['python']}",
            f"placement: {meta['placement']}",
            f"background load (/proc/loadavg): before {meta['loadavg_before']}, after {meta['loadavg_after']}",
            f"images {meta['image_size_mib']} MiB (sparse: 2040 GiB VHD, 64 TiB VHDX; user disk 512 MiB; writes {self.write_mib} MiB), {self.reps} runs per cell, "
            f"fio {self.fio_runtime} s per run, elapsed {meta['elapsed_s']} s",
            f"peers: {meta['qemu']}; vhdimount {meta['vhdimount']}; {meta['fio']}",
            "",
        ]
        text = R.table(self.results, header)
        ts = R.targets(self.results)
        text += "\n\n" + R.targets_text(ts) + "\n"
        print(text)
        if self.args.json:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
            R.dump_json(self.args.json, meta, self.results, ts, text)
            log(f"wrote {self.args.json}")
        if self.args.text:
            with open(self.args.text, "w") as f:
                f.write(text)
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="512 MiB images, 0.5 s fio runs, 128 MiB writes (< 5 min)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--text", help="also write the table here")
    p.add_argument("--reps", type=int, default=3, help="runs per cell (default 3)")
    p.add_argument("--systems", help="only these system keys (comma-separated; for debugging)")
    p.add_argument("--rows", help="only rows starting with these prefixes (for debugging)")
    p.add_argument("--only", metavar="PATTERN",
                   help="only rows whose key matches one of these comma-separated globs, e.g. "
                        "'x_*,sparsex*' (VHDX) or 'u_*' (user tools); see bench_report.ROWS")
    p.add_argument("--from-json", metavar="FILE", help="re-render the table of an earlier --json run")
    args = p.parse_args()
    if args.from_json:
        meta, results = R.load_json(args.from_json)
        header = [line for line in R.json_header(args.from_json)]
        text = R.table(results, header) + "\n\n" + R.targets_text(R.targets(results)) + "\n"
        print(text)
        if args.text:
            with open(args.text, "w") as f:
                f.write(text)
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (drop_caches, loop devices, FUSE)", file=sys.stderr)
        return 2
    try:
        return Bench(args).run()
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
