"""kill -9 of a writing daemon over a real FUSE mount, many times over (issue 6).

Each round mounts an image read-write, a writer thread issues random writes (unaligned, across
block boundaries, allocating) with periodic ``fsync``, and the daemon gets SIGKILL at a random
moment. After a lazy unmount:

- ``vhdfs check`` is clean or reports only leaks (exit 0);
- for a dynamic VHD, ``qemu-img convert`` reads the image and agrees with vhdfs;
- every byte acknowledged by ``fsync`` before the kill reads back exactly, and every byte
  written since reads as either its old value or the value of one of the writes since;
- a differencing image's parent is byte-identical.

The same rounds run over dynamic and differencing VHDX (``vhdx-dynamic``, ``vhdx-differencing``),
whose metadata goes through the log: after each kill vhdfs reopens the file (replaying the log in
memory, the file left byte-identical) and must show the shadow's durable state; for dynamic VHDX
(512-byte sectors, which qemu opens) ``qemu-img check -r all`` repairs a copy, and
``qemu-img convert -O raw`` of that copy must equal vhdfs's own reading byte for byte.

Default: 25 rounds per kind (VHD and VHDX, dynamic and differencing): VHD in about a minute
and a half, VHDX in about 80 s;
``VHDFS_KILL9_ROUNDS=N`` scales it. A concurrency test checks that many writers hitting the same
unallocated blocks at once allocate each block once.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import needs_root

from images import content, corpus, writers_vhd as vhdw
from mounting import force_unmount, mounted

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("VHDFS_KILL9_ROUNDS", "50"))
SIZE = 8 * 1024 * 1024
FRESH_EVERY = 5          # a new image every N rounds, so allocation keeps being exercised
QEMU = shutil.which("qemu-img")
KINDS = ["dynamic", "differencing", "vhdx-dynamic", "vhdx-differencing"]


def _ones(n: int) -> int:
    return int.from_bytes(b"\x01" * n, "big")


def _nonzero_lanes(x: int, ones: int) -> int:
    """One bit per byte of ``x``: 1 where that byte is non-zero (big-int SWAR, no numpy)."""
    x |= x >> 4
    x |= x >> 2
    x |= x >> 1
    return x & ones


@dataclass
class Shadow:
    """What the disk may contain: the state at the last completed fsync, plus writes since."""

    durable: bytearray
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    synced_writes: int = 0

    def candidates(self) -> list[bytes]:
        out = [bytes(self.durable)]
        for off, data in self.pending:
            c = bytearray(self.durable)
            c[off:off + len(data)] = data
            out.append(bytes(c))
        return out

    def verify(self, actual: bytes, who: str) -> None:
        """Every byte equals the durable value or one pending write's value at that offset."""
        assert len(actual) == len(self.durable), f"{who}: size {len(actual)} != {len(self.durable)}"
        if actual == self.durable:
            return
        n = len(actual)
        ones = _ones(n)
        a = int.from_bytes(actual, "big")
        bad = ones
        for cand in self.candidates():
            bad &= _nonzero_lanes(a ^ int.from_bytes(cand, "big"), ones)
            if not bad:
                return
        pos = n - 1 - (bad.bit_length() - 1) // 8   # first bad byte from the start
        synced = all(not (off <= pos < off + len(d)) for off, d in self.pending)
        raise AssertionError(
            f"{who}: byte {pos} reads {actual[pos]:#04x}, durable value {self.durable[pos]:#04x}"
            f"{' (durable: acknowledged by fsync, or read back after the previous kill)' if synced else ''}; pending writes covering it: "
            f"{[(o, len(d)) for o, d in self.pending if o <= pos < o + len(d)]}")


def _writer(fd: int, shadow: Shadow, rnd: random.Random, stop: threading.Event,
            block: int) -> None:
    """Random writes with an fsync every few; stops at the first error (the daemon died)."""
    try:
        n = 0
        while not stop.is_set():
            kind = rnd.random()
            if kind < 0.3:      # straddle a block boundary
                b = rnd.randrange(1, SIZE // block)
                off = b * block - rnd.randrange(1, 8192)
                ln = rnd.randrange(1, 16384)
            elif kind < 0.6:    # small unaligned
                off = rnd.randrange(0, SIZE - 4096)
                ln = rnd.randrange(1, 4096)
            else:               # larger, sector aligned
                off = rnd.randrange(0, SIZE // 512 - 256) * 512
                ln = rnd.randrange(1, 256) * 512
            ln = min(ln, SIZE - off)
            data = rnd.randbytes(ln)
            with shadow.lock:
                shadow.pending.append((off, data))
            done = 0
            while done < ln:
                done += os.pwrite(fd, data[done:], off + done)
            n += 1
            if n % rnd.choice((2, 3, 5)) == 0:
                os.fsync(fd)
                with shadow.lock:
                    for o, d in shadow.pending:
                        shadow.durable[o:o + len(d)] = d
                    shadow.synced_writes += len(shadow.pending)
                    shadow.pending.clear()
    except OSError:
        return


def _read_image(path: Path) -> bytes:
    from vhdfs.block import open_image
    with open_image(path) as img:
        return img.read(0, img.size)


def _qemu_raw(path: Path, fmt: str = "vpc") -> bytes | None:
    if QEMU is None:
        return None
    out = path.with_suffix(".qemu.raw")
    try:
        subprocess.run([QEMU, "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                       check=True, capture_output=True, timeout=60)
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def _vhdfs_check(path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "vhdfs", "check", str(path)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, f"vhdfs check after kill -9:\n{res.stdout}{res.stderr}"
    assert "Traceback" not in res.stderr


@dataclass
class Kill9Stats:
    rounds: int = 0
    synced_writes: int = 0
    pending_at_kill: int = 0
    qemu_disagreements: int = 0    # rounds where qemu and vhdfs differ on unsynced bytes
    dirty_logs: int = 0            # VHDX rounds whose kill left a log to replay
    qemu_repairs: int = 0          # VHDX rounds compared with qemu-img check -r all


def _vhdx_log_dirty(path: Path) -> bool:
    """The current header (the valid one with the higher sequence number) has a LogGuid."""
    import struct

    import google_crc32c

    best = (-1, False)
    with open(path, "rb") as f:
        for off in (64 * 1024, 128 * 1024):
            f.seek(off)
            h = bytearray(f.read(4096))
            stored = struct.unpack_from("<I", h, 4)[0]
            h[4:8] = bytes(4)
            if h[:4] == b"head" and google_crc32c.value(bytes(h)) == stored:
                seq = struct.unpack_from("<Q", h, 8)[0]
                best = max(best, (seq, any(h[48:64])))
    return best[1]


class Kill9Harness:
    """Rounds of mount → random writes → kill -9 → verify, over one kind of image."""

    def __init__(self, work: Path, kind: str, seed: int) -> None:
        self.work = work
        self.kind = kind
        self.rnd = random.Random(seed)
        self.stats = Kill9Stats()
        self.image: Path | None = None
        self.parent: Path | None = None
        self.parent_sha = ""
        self.shadow: Shadow | None = None
        self.generation = 0

    def fresh(self) -> None:
        from vhdfs.formats.vhd.create import create_vhd
        from vhdfs.formats.vhdx.create import create_vhdx

        self.generation += 1
        d = self.work / f"{self.kind}-{self.generation}"
        d.mkdir(parents=True)
        if self.kind == "vhdx-dynamic":
            self.image = d / "disk.vhdx"
            create_vhdx(self.image, SIZE, "dynamic", block_size=self.block)
            base = bytes(SIZE)
        elif self.kind == "vhdx-differencing":
            from vhdfs.block import open_image
            raw = content.pattern(SIZE, seed=self.generation, holes=((2 * 1024 * 1024, 2 * 1024 * 1024),))
            self.parent = d / "base.vhdx"
            create_vhdx(self.parent, SIZE, "dynamic", block_size=self.block)
            with open_image(self.parent, writable=True) as w:
                w.write(0, raw)
            self.parent.chmod(0o444)
            self.parent_sha = corpus.sha256_file(self.parent)
            self.image = d / "disk.vhdx"
            create_vhdx(self.image, None, "differencing", parent=self.parent, block_size=self.block)
            base = raw
        elif self.kind == "dynamic":
            self.image = d / "disk.vhd"
            create_vhd(self.image, SIZE, "dynamic", block_size=512 * 1024)
            base = bytes(SIZE)
        else:
            raw = content.pattern(SIZE, seed=self.generation, holes=((2 * 1024 * 1024, 2 * 1024 * 1024),))
            self.parent = d / "base.vhd"
            vhdw.build_sparse_vhd(self.parent, SIZE, vhdw.sectors_of(raw))
            self.parent.chmod(0o444)
            self.parent_sha = corpus.sha256_file(self.parent)
            self.image = d / "disk.vhd"
            create_vhd(self.image, None, "differencing", parent=self.parent)
            base = raw
        self.shadow = Shadow(bytearray(base))

    @property
    def block(self) -> int:
        if self.kind.startswith("vhdx"):
            return 1024 * 1024
        return 512 * 1024 if self.kind == "dynamic" else 2 * 1024 * 1024

    def round(self) -> None:
        if self.image is None or self.stats.rounds % FRESH_EVERY == 0:
            self.fresh()
        assert self.image is not None and self.shadow is not None
        mp = self.work / "mnt"
        stop = threading.Event()
        with mounted([self.image], mp, "-w", "--no-partitions") as m:
            fd = os.open(mp / (self.image.stem + ".raw"), os.O_RDWR)
            t = threading.Thread(target=_writer, daemon=True,
                                 args=(fd, self.shadow, random.Random(self.rnd.random()), stop,
                                       self.block))
            t.start()
            time.sleep(self.rnd.uniform(0.01, 0.25))
            os.kill(m.proc.pid, signal.SIGKILL)
            stop.set()
            t.join(timeout=30)
            assert not t.is_alive(), "writer stuck after the daemon was killed"
            try:
                os.close(fd)
            except OSError:
                pass
            m.proc.wait(timeout=30)
            force_unmount(mp)
        self.stats.rounds += 1
        self.stats.pending_at_kill += len(self.shadow.pending)
        self.verify()

    def verify(self) -> None:
        assert self.image is not None and self.shadow is not None
        who = f"{self.kind} round {self.stats.rounds}"
        sha = corpus.sha256_file(self.image)
        if self.kind.startswith("vhdx") and _vhdx_log_dirty(self.image):
            self.stats.dirty_logs += 1
        _vhdfs_check(self.image)
        actual = _read_image(self.image)       # VHDX: the log replayed in memory
        self.shadow.verify(actual, f"{who} (vhdfs)")
        if self.kind.startswith("vhdx"):
            assert corpus.sha256_file(self.image) == sha, f"{who}: a read-only open changed the file"
        if self.kind == "vhdx-dynamic" and QEMU is not None:
            copy = self.image.with_name("qemu-copy.vhdx")
            shutil.copyfile(self.image, copy)
            try:
                res = subprocess.run([QEMU, "check", "-r", "all", "-f", "vhdx", str(copy)],
                                     capture_output=True, text=True, timeout=60)
                assert res.returncode == 0, f"{who}: qemu-img check -r all:\n{res.stdout}{res.stderr}"
                q = _qemu_raw(copy, "vhdx")
                assert q == actual, f"{who}: qemu-img's repaired copy and vhdfs's replay differ"
                self.stats.qemu_repairs += 1
            finally:
                copy.unlink(missing_ok=True)
        if self.kind == "dynamic":
            q = _qemu_raw(self.image)
            if q is not None:
                # qemu reads a block's data area whatever its bitmap says; vhdfs reads zeros
                # under a clear bit. After a kill between "data" and "bitmap" they may differ
                # on unsynced bytes, but both must show old or new data, never garbage.
                self.shadow.verify(q, f"{who} (qemu-img)")
                if q != actual:
                    self.stats.qemu_disagreements += 1
        if self.parent is not None:
            assert corpus.sha256_file(self.parent) == self.parent_sha, f"{who}: parent changed"
        # What survived becomes the starting point of the next round.
        self.shadow.durable[:] = actual
        self.stats.synced_writes += self.shadow.synced_writes
        self.shadow.synced_writes = 0
        self.shadow.pending.clear()


@needs_root
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_kill9_rounds(kind: str, tmp_path: Path) -> None:
    rounds = (ROUNDS + 1) // 2
    h = Kill9Harness(tmp_path, kind, seed=zlib.crc32(kind.encode()))  # same rounds every run
    for _ in range(rounds):
        h.round()
    assert h.stats.rounds == rounds
    assert h.stats.synced_writes > 0, "no write was ever acknowledged: the test tested nothing"
    if kind.startswith("vhdx"):
        assert h.stats.dirty_logs > 0, "no kill left a log to replay: the replay was never tested"
    if kind == "vhdx-dynamic" and QEMU is not None:
        assert h.stats.qemu_repairs == rounds
    print(f"kill9 {kind}: {h.stats}")


@needs_root
@pytest.mark.timeout(300)
def test_concurrent_writers_allocate_once(tmp_path: Path) -> None:
    """Many writers hit the same two unallocated blocks at once; readers run alongside."""
    from vhdfs.block import open_image

    import vhdfs.formats.vhd.create as vc
    img = tmp_path / "c.vhd"
    B = 2 * 1024 * 1024
    vc.create_vhd(img, 8 * 1024 * 1024, "dynamic")
    fill = content.pattern(B, seed=5)
    with open_image(img, writable=True) as w:
        w.write(3 * B, fill)          # block 3: allocated beforehand, read while writers run
    size_before = os.path.getsize(img)
    expected = bytearray(8 * 1024 * 1024)
    expected[3 * B:4 * B] = fill
    threads_n, piece = 16, 64 * 1024
    for t in range(threads_n):
        for blk in (0, 2):
            off = blk * B + t * piece
            expected[off:off + piece] = content.pattern(piece, seed=100 * blk + t)
    errors: list[str] = []
    with mounted([img], tmp_path / "mnt", "-w", "--no-partitions") as m:
        path = m.file("c.raw")
        barrier = threading.Barrier(threads_n + 4)
        stop = threading.Event()

        def writer(t: int) -> None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    barrier.wait()
                    for blk in (0, 2):
                        off = blk * B + t * piece
                        os.pwrite(fd, content.pattern(piece, seed=100 * blk + t), off)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"writer {t}: {exc!r}")

        def reader(r: int) -> None:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    barrier.wait()
                    while not stop.is_set():
                        if os.pread(fd, B, 3 * B) != fill:
                            errors.append(f"reader {r}: block 3 changed under concurrent writes")
                            return
                finally:
                    os.close(fd)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"reader {r}: {exc!r}")

        ws = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        rs = [threading.Thread(target=reader, args=(r,)) for r in range(4)]
        for th in ws + rs:
            th.start()
        for th in ws:
            th.join(timeout=120)
        stop.set()
        for th in rs:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in ws + rs), "deadlock: a thread never finished"
        assert not errors, errors
        with open(path, "rb") as f:
            assert f.read() == bytes(expected), "data read through the mount is wrong"
        m.unmount()
    with open_image(img) as im:
        assert im.describe()["allocated_blocks"] == 3, im.describe()
        assert [p for p in im.check() if p.severity.name != "LEAK"] == []
        assert im.read(0, im.size) == bytes(expected)
    # Each new block is one bitmap sector + 2 MiB (+ alignment < 4 KiB): no block allocated twice.
    grown = os.path.getsize(img) - size_before
    assert grown <= 2 * (512 + B) + 2 * 4096, f"file grew by {grown}: a block was allocated twice"


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_unsynced_writes_survive_a_kill_after_the_commit_interval(kind: str, tmp_path: Path) -> None:
    """Group commit holds new blocks' entries back, but the daemon commits them within about a
    second: writes never fsynced, killed a few intervals later, must all read back."""
    from vhdfs.fs.daemon import COMMIT_INTERVAL

    h = Kill9Harness(tmp_path, kind, seed=3)
    h.fresh()
    assert h.image is not None and h.shadow is not None
    rnd = random.Random(kind)
    writes = [(off, rnd.randbytes(n)) for off, n in
              [(100, 3 * 1024 * 1024), (5 * 1024 * 1024 + 7, 70_000), (7 * 1024 * 1024, 4096)]]
    with mounted([h.image], tmp_path / "mnt", "-w", "--no-partitions") as m:
        fd = os.open(m.file(h.image.stem + ".raw"), os.O_RDWR)
        try:
            for off, data in writes:
                assert os.pwrite(fd, data, off) == len(data)
                h.shadow.durable[off:off + len(data)] = data   # expected to survive: no pending
            # Without any fsync, the file itself must come to point at every write (the
            # periodic commit); give a loaded machine many intervals before calling it lost.
            # (A copy is read: the live image is locked against other opens.)
            snapshot = h.image.with_name("snapshot" + h.image.suffix)
            deadline = time.monotonic() + COMMIT_INTERVAL * 15
            while shutil.copyfile(h.image, snapshot) and _read_image(snapshot) != bytes(h.shadow.durable):
                assert time.monotonic() < deadline, "writes never committed without an fsync"
                time.sleep(COMMIT_INTERVAL / 4)
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=30)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        force_unmount(tmp_path / "mnt")
    h.verify()
