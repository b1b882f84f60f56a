"""Power cut below the daemon: record every write the block layer issues, replay prefixes.

For each cut point the replayed file must open, ``check()`` must report nothing but leaked
space, every byte acknowledged by ``flush()`` before the cut must read back exactly, and every
other sector must hold one of the values it had since the last flush (old or new, never garbage).
A second test fails one write mid-run and checks that the open image stays consistent.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from vhdfs.block import open_image
from vhdfs.block.rawfile import RawFile
from vhdfs.block.driver import Severity

SECTOR = 512
SIZE = 8 * 1024 * 1024


class WriteLog:
    """Every pwrite/truncate that reaches one file, in order, with sync points marked."""

    def __init__(self, target: str) -> None:
        self.target = os.path.abspath(target)
        self.ops: list[tuple[str, int, bytes]] = []
        self.pwrites = 0                   # pwrites seen so far
        self.fail_at: int | None = None    # fail the pwrite with this number (0 = the first)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        log = self
        real_pwrite, real_truncate, real_sync = RawFile.pwrite, RawFile.truncate, RawFile.sync

        def pwrite(self: RawFile, data, offset: int) -> None:  # noqa: ANN001
            if self.path == log.target:
                log.pwrites += 1
                if log.fail_at is not None and log.pwrites - 1 == log.fail_at:
                    log.fail_at = None
                    raise OSError(errno.EIO, "injected write failure")
                log.ops.append(("w", offset, bytes(data)))
            real_pwrite(self, data, offset)

        def truncate(self: RawFile, length: int) -> None:
            if self.path == log.target:
                log.ops.append(("t", length, b""))
            real_truncate(self, length)

        def sync(self: RawFile) -> None:
            if self.path == log.target:
                log.ops.append(("s", 0, b""))
            real_sync(self)

        monkeypatch.setattr(RawFile, "pwrite", pwrite)
        monkeypatch.setattr(RawFile, "truncate", truncate)
        monkeypatch.setattr(RawFile, "sync", sync)

    def replay(self, original: Path, out: Path, upto: int) -> None:
        shutil.copyfile(original, out)
        with open(out, "r+b") as f:
            for kind, offset, data in self.ops[:upto]:
                if kind == "w":
                    f.seek(offset)
                    f.write(data)
                elif kind == "t":
                    f.truncate(offset)


def _make(kind: str, tmp: Path) -> tuple[Path, list[Path]]:
    """A fresh image of ``kind`` to write into, plus its parents (which must never change)."""
    if kind.startswith("vdi"):
        from vhdfs.formats.vdi.create import create_vdi
        path = tmp / "disk.vdi"
        create_vdi(str(path), SIZE, "dynamic")
        return path, []
    from vhdfs.formats.vhd.create import create_vhd
    if kind == "vhd-dynamic":
        path = tmp / "disk.vhd"
        create_vhd(str(path), SIZE, "dynamic", block_size=1024 * 1024)
        return path, []
    base = tmp / "base.vhd"
    create_vhd(str(base), SIZE, "dynamic", block_size=1024 * 1024)
    with open_image(base, writable=True) as img:
        rnd = random.Random(7)
        for _ in range(6):
            off = rnd.randrange(0, SIZE // SECTOR - 64) * SECTOR
            img.write(off, rnd.randbytes(64 * SECTOR))
    path = tmp / "child.vhd"
    create_vhd(str(path), SIZE, "differencing", parent=str(base))
    return path, [base]


def _random_writes(rnd: random.Random, count: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(count):
        length = rnd.choice([1, 100, SECTOR, 3 * SECTOR + 7, 70_000, 1024 * 1024 + 300])
        off = rnd.randrange(0, SIZE - length)
        out.append((off, rnd.randbytes(length)))
    return out


def _sectors(data: bytes) -> list[bytes]:
    return [data[i:i + SECTOR] for i in range(0, len(data), SECTOR)]


@pytest.mark.parametrize("kind", ["vhd-dynamic", "vhd-differencing", "vdi-dynamic"])
def test_every_prefix_of_the_write_log_is_a_consistent_image(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, parents = _make(kind, tmp_path)
    parent_bytes = [p.read_bytes() for p in parents]
    with open_image(path) as img:
        before = img.read(0, SIZE)
    original = tmp_path / "original"
    shutil.copyfile(path, original)

    log = WriteLog(str(path))
    log.install(monkeypatch)
    rnd = random.Random(kind)
    shadow = bytearray(before)
    # Per sync window: the acknowledged state at its start and every state written inside it.
    windows: list[tuple[int, bytes, list[bytes]]] = []  # (log index of the sync, acked, states)
    acked = bytes(shadow)
    pending: list[bytes] = []
    with open_image(path, writable=True) as img:
        for i, (off, data) in enumerate(_random_writes(rnd, 24)):
            img.write(off, data)
            shadow[off:off + len(data)] = data
            pending.append(bytes(shadow))
            if i % 4 == 3:
                img.flush()
                windows.append((len(log.ops), acked, pending))
                acked, pending = bytes(shadow), []
        img.flush()
        windows.append((len(log.ops), acked, pending))
    monkeypatch.undo()

    cuts = sorted(set(range(0, len(log.ops) + 1, max(1, len(log.ops) // 60))) | {len(log.ops)})
    assert len(cuts) >= 50 or len(cuts) == len(log.ops) + 1
    replayed = tmp_path / ("replay" + path.suffix)
    for cut in cuts:
        log.replay(original, replayed, cut)
        # What the cut may show: acked state of the window it falls in, or any state after it.
        for sync_index, acked_state, states in windows:
            if cut <= sync_index:
                break
        else:
            acked_state, states = windows[-1][1], windows[-1][2]
        candidates = [acked_state, *states]
        if cut >= windows[-1][0]:
            candidates = [bytes(shadow)]
        with open_image(replayed, parent_dirs=[str(tmp_path)]) as img:
            problems = [p for p in img.check() if p.severity is not Severity.LEAK]
            assert problems == [], f"cut {cut}/{len(log.ops)}: {problems}"
            got = img.read(0, SIZE)
        if got in candidates:
            continue
        cand_sectors = [_sectors(c) for c in candidates]
        for n, sector in enumerate(_sectors(got)):
            assert any(sector == c[n] for c in cand_sectors), (
                f"cut {cut}/{len(log.ops)}: sector {n} holds bytes that were never written there")
    for p, data in zip(parents, parent_bytes):
        assert p.read_bytes() == data, f"parent {p} changed"


@pytest.mark.parametrize("kind", ["vhd-dynamic", "vhd-differencing", "vdi-dynamic"])
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_a_failed_write_leaves_the_open_image_consistent(
        kind: str, fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _make(kind, tmp_path)
    with open_image(path) as img:
        old = img.read(0, SIZE)
    log = WriteLog(str(path))
    log.install(monkeypatch)
    off, data = 3 * 1024 * 1024 - 1000, random.Random(fail_at).randbytes(1024 * 1024)
    new = bytearray(old)
    new[off:off + len(data)] = data
    with open_image(path, writable=True) as img:
        log.fail_at = log.pwrites + fail_at   # the n-th file write of this write and its commit
        try:
            img.write(off, data)
            img.flush()
        except OSError:
            pass
        assert log.fail_at is None, "the injected failure was never reached"
        got = img.read(0, SIZE)
        if got not in (old, bytes(new)):
            old_s, new_s = _sectors(old), _sectors(bytes(new))
            for n, sector in enumerate(_sectors(got)):
                assert sector in (old_s[n], new_s[n]), f"sector {n} is garbage"
        # The image must still accept the write once the fault is gone.
        img.write(off, data)
        assert img.read(off, len(data)) == data
    monkeypatch.undo()
    with open_image(path, parent_dirs=[str(tmp_path)]) as img:
        assert [p for p in img.check() if not p.startswith("leak")] == []
        assert img.read(0, SIZE) == bytes(new)


@pytest.mark.parametrize("kind", ["vhd-dynamic", "vhd-differencing", "vdi-dynamic"])
@pytest.mark.parametrize("fail", ["sync", "entry"])
def test_a_failed_commit_rolls_memory_back_to_the_file(
        kind: str, fail: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending metadata (new blocks' entries, differencing bits) goes out at flush; when that
    fails, the open image must show what the file holds, stay writable, and lose nothing later."""
    path, _ = _make(kind, tmp_path)
    with open_image(path) as img:
        old = img.read(0, SIZE)
    log = WriteLog(str(path))
    log.install(monkeypatch)
    rnd = random.Random(fail)
    writes = [(off, rnd.randbytes(n)) for off, n in
              [(5000, 3 * 1024 * 1024), (6 * 1024 * 1024 + 17, 4000), (700, 300)]]
    new = bytearray(old)
    for off, data in writes:
        new[off:off + len(data)] = data
    real_sync = RawFile.sync
    with open_image(path, writable=True) as img:
        for off, data in writes:
            img.write(off, data)
        if fail == "sync":
            def failing_sync(self: RawFile) -> None:
                monkeypatch.setattr(RawFile, "sync", real_sync)
                raise OSError(errno.EIO, "injected sync failure")
            monkeypatch.setattr(RawFile, "sync", failing_sync)
        else:
            log.fail_at = log.pwrites   # the first metadata write, after the commit's sync
        failed = False
        try:
            img.flush()
        except OSError:
            failed = True
        got = img.read(0, SIZE)
        if failed:
            reopened = tmp_path / ("mem-vs-file" + path.suffix)
            shutil.copyfile(path, reopened)
            with open_image(reopened, parent_dirs=[str(tmp_path)]) as disk:
                assert got == disk.read(0, SIZE), "memory and file disagree after a failed commit"
        old_s, new_s = _sectors(old), _sectors(bytes(new))
        for n, sector in enumerate(_sectors(got)):
            assert sector in (old_s[n], new_s[n]), f"sector {n} is garbage"
        for off, data in writes:          # written again once the fault is gone: all lands
            img.write(off, data)
        img.flush()
    monkeypatch.undo()
    with open_image(path, parent_dirs=[str(tmp_path)]) as img:
        assert [p for p in img.check() if not p.startswith("leak")] == []
        assert img.read(0, SIZE) == bytes(new)
