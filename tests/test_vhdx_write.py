"""Writing VHDX: random writes against a flat shadow (fixed, dynamic, differencing; 512 and 4096
sectors), sector-exact differencing states, discard, the header/GUID protocol, on-disk replay
of a dirty log, batched commits, qemu-img as an oracle, and a crash-prefix replay of every
pwrite/sync the driver issues. Images come from the independent test writer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import needs_root
from images import vhdx_writer as w

from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.block.rawfile import RawFile
from vhdfs.formats.vhdx import layout as vlayout
from vhdfs.formats.vhdx import spec

MiB = 1024 * 1024
G_BASE, G_CHILD = uuid.UUID(int=0xB1), uuid.UUID(int=0xC1)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def headers(p: Path):
    data = p.read_bytes()
    lay, plan, _ = vlayout.open_layout(lambda n, o: data[o:o + n], len(data))
    return lay, plan


def make(tmp: Path, kind: str, logical: int, size: int = 8 * MiB) -> tuple[Path, bytearray, list[Path]]:
    """An image to write into, its expected content, and its parents."""
    rnd = random.Random(logical)
    if kind != "differencing":
        blocks = {} if kind == "fixed" else {0: rnd.randbytes(MiB), 2: w.ZERO, 5: w.UNMAPPED}
        if kind == "fixed":
            blocks = {b: rnd.randbytes(MiB) for b in range(size // MiB)}
        b = w.build_vhdx(size, block_size=MiB, logical=logical, kind=kind, blocks=blocks)
        b.set_headers(data_write_guid=G_BASE)
        p = tmp / f"{kind}.vhdx"
        p.write_bytes(b.data)
        return p, bytearray(b.raw_content()), []
    base = w.build_vhdx(size, block_size=MiB, logical=logical,
                        blocks={i: rnd.randbytes(MiB) for i in range(size // MiB)})
    base.set_headers(data_write_guid=G_BASE)
    bp = tmp / "base.vhdx"
    bp.write_bytes(base.data)
    child = w.build_vhdx(size, block_size=MiB, logical=logical, kind="differencing",
                         blocks={3: w.ZERO, 4: w.UNDEFINED},
                         parent_locator={"parent_linkage": "{%s}" % G_BASE,
                                         "relative_path": ".\\base.vhdx"})
    child.set_headers(data_write_guid=G_CHILD)
    cp = tmp / "child.avhdx"
    cp.write_bytes(child.data)
    expect = bytearray(base.raw_content())
    expect[3 * MiB:5 * MiB] = bytes(2 * MiB)
    return cp, expect, [bp]


def random_ops(rnd: random.Random, size: int, logical: int, count: int):
    for _ in range(count):
        n = rnd.choice([1, 7, logical - 1, logical, 3 * logical + 5, 70_000, MiB, MiB + 300])
        off = rnd.choice([rnd.randrange(size - n), rnd.randrange(size // logical - 8) * logical,
                          (rnd.randrange(size // MiB - 1) + 1) * MiB - rnd.randrange(1, 4096)])
        off = max(0, min(off, size - n))
        yield off, rnd.randbytes(n)


@pytest.mark.parametrize("logical", [512, 4096])
@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_random_writes_against_shadow(tmp_path, kind, logical):
    path, shadow, parents = make(tmp_path, kind, logical)
    size = len(shadow)
    parent_hashes = [sha(p) for p in parents]
    before, _ = headers(path)
    rnd = random.Random(hash((kind, logical)) & 0xFFFF)
    with open_image(path, writable=True) as img:
        for i, (off, data) in enumerate(random_ops(rnd, size, logical, 80)):
            img.write(off, data)
            shadow[off:off + len(data)] = data
            if i % 9 == 0:
                img.flush()
            if i % 13 == 0:
                d_off, d_len = rnd.randrange(size - 3 * MiB), rnd.choice([100, MiB, 2 * MiB + 700])
                img.discard(d_off, d_len)
                shadow[d_off:d_off + d_len] = bytes(d_len)
        assert img.read(0, size) == bytes(shadow)
    with open_image(path) as img:
        assert img.read(0, size) == bytes(shadow)
        assert [f for f in img.check() if f.severity == Severity.ERROR] == []
    after, plan = headers(path)
    assert plan is None and after.header.log_guid == spec.NULL_GUID        # clean close
    assert after.header.file_write_guid != before.header.file_write_guid
    assert after.header.data_write_guid != before.header.data_write_guid
    assert after.header.sequence_number > before.header.sequence_number
    assert [sha(p) for p in parents] == parent_hashes
    if logical == 512 and kind != "differencing" and shutil.which("qemu-img"):
        raw = tmp_path / "shadow.raw"
        raw.write_bytes(shadow)
        chk = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
        assert chk.returncode == 0, chk.stdout + chk.stderr
        cmp = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), str(raw)],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _entry(img, block: int) -> int:
    return img.entry(block)


@pytest.mark.parametrize("logical", [512, 4096])
def test_differencing_states_are_sector_exact(tmp_path, logical):
    path, expect, parents = make(tmp_path, "differencing", logical)
    with open_image(path, writable=True) as img:
        img.write(1 * MiB + 3 * logical + 1, b"xy")          # inside one sector of block 1
        img.write(2 * MiB, b"\x07" * MiB)                     # the whole of block 2
        img.write(3 * MiB + 5, b"z")                          # a ZERO block
        img.write(6 * MiB + MiB - 10, b"q" * 20)              # straddles blocks 6 and 7
    with open_image(path) as img:
        e1 = _entry(img, 1)
        assert e1 & 7 == spec.PAYLOAD_PARTIALLY_PRESENT
        spb = MiB // logical
        bits = img.block_bits(1, 0, spb)
        assert bits == 1 << 3                                 # exactly the one written sector
        assert _entry(img, 2) & 7 == spec.PAYLOAD_FULLY_PRESENT
        assert _entry(img, 3) & 7 == spec.PAYLOAD_FULLY_PRESENT
        assert img.read(3 * MiB, 8) == b"\0" * 5 + b"z\0\0"  # zero padded, not the parent
        assert img.block_bits(6, 0, spb) == 1 << (spb - 1)
        assert img.block_bits(7, 0, spb) == 1
        base = parents[0].read_bytes()
        want = bytearray(expect)
        want[MiB + 3 * logical + 1:MiB + 3 * logical + 3] = b"xy"
        want[2 * MiB:3 * MiB] = b"\x07" * MiB
        want[3 * MiB + 5] = ord("z")
        want[7 * MiB - 10:7 * MiB + 10] = b"q" * 20
        assert img.read(0, len(want)) == bytes(want)
        chunk = 0
        bm = img.bat[img.geometry.bitmap_index(chunk)]
        assert bm & 7 == spec.SB_PRESENT and spec.bat_offset(bm) % MiB == 0
    assert parents[0].read_bytes() == base


def test_discard_whole_block_in_child_reads_zeros(tmp_path):
    path, expect, parents = make(tmp_path, "differencing", 512)
    with open_image(path, writable=True) as img:
        img.discard(1 * MiB, MiB)
        img.discard(2 * MiB + 512, 1000)
    with open_image(path) as img:
        e = _entry(img, 1)
        assert e & 7 == spec.PAYLOAD_ZERO and spec.bat_offset(e) == 0
        assert img.read(MiB, MiB) == bytes(MiB)
        assert img.read(2 * MiB + 512, 1000) == bytes(1000)
        assert img.read(2 * MiB, 512) == bytes(expect[2 * MiB:2 * MiB + 512])
    d, shadow, _ = make(tmp_path, "dynamic", 512)
    with open_image(d, writable=True) as img:
        img.discard(0, MiB)
    with open_image(d) as img:
        assert _entry(img, 0) == spec.PAYLOAD_ZERO
        assert img.read(0, MiB) == bytes(MiB)


def test_writable_open_replays_a_dirty_log_on_disk(tmp_path):
    b = w.build_vhdx(4 * MiB, block_size=MiB, blocks={0: b"\x01" * MiB})
    off0 = b.block_offsets[0]
    b.add_log(uuid.UUID(int=0x10C), [w.Entry(1, pages={off0: b"\x02" * 4096})])
    b.set_headers(data_write_guid=G_BASE)          # add_log rewrote them with the defaults
    p = tmp_path / "dirty.vhdx"
    p.write_bytes(b.data)
    with open_image(p, writable=True) as img:
        assert img.describe()["log"].startswith("replayed on disk: 1 entries")
        assert img.read(0, 4097) == b"\x02" * 4096 + b"\x01"
    assert p.read_bytes()[off0:off0 + 4096] == b"\x02" * 4096
    lay, plan = headers(p)
    assert plan is None
    # a writable open with no write keeps the DataWriteGuid (children stay valid)
    assert lay.header.data_write_guid == G_BASE


def test_sequential_write_does_not_sync_per_block(tmp_path, monkeypatch):
    b = w.build_vhdx(64 * MiB, block_size=MiB)
    p = tmp_path / "seq.vhdx"
    p.write_bytes(b.data)
    syncs = []
    real = RawFile.sync
    monkeypatch.setattr(RawFile, "sync", lambda self: (syncs.append(1), real(self)))
    with open_image(p, writable=True) as img:
        opened = len(syncs)
        for i in range(64):
            img.write(i * MiB, bytes([i + 1]) * MiB)
        during = len(syncs) - opened
    assert during <= 4, during                 # DataWriteGuid header + at most a commit or so
    with open_image(p) as img:
        assert all(img.read(i * MiB, 1) == bytes([i + 1]) for i in range(64))


def test_writing_a_parent_changes_its_identity(tmp_path):
    path, _expect, parents = make(tmp_path, "differencing", 512)
    with open_image(parents[0], writable=True) as img:
        img.write(0, b"new")
    from vhdfs.errors import ChainError
    with pytest.raises(ChainError, match="ignore-parent-id"):
        open_image(path)


# --- crash-prefix replay ------------------------------------------------------------------------
class WriteLog:
    def __init__(self, target: Path) -> None:
        self.target = str(target.resolve())
        self.ops: list[tuple[str, int, bytes]] = []

    def install(self, mp) -> None:
        log = self
        rp, rt, rs = RawFile.pwrite, RawFile.truncate, RawFile.sync

        def pwrite(self, data, offset):
            if self.path == log.target:
                log.ops.append(("w", offset, bytes(data)))
            rp(self, data, offset)

        def truncate(self, length):
            if self.path == log.target:
                log.ops.append(("t", length, b""))
            rt(self, length)

        def sync(self):
            if self.path == log.target:
                log.ops.append(("s", 0, b""))   # the replay decides what was durable
                return
            rs(self)

        mp.setattr(RawFile, "pwrite", pwrite)
        mp.setattr(RawFile, "truncate", truncate)
        mp.setattr(RawFile, "sync", sync)

    def replay(self, original: Path, out: Path, upto: int, skip: frozenset[int] = frozenset(),
               tear: int | None = None) -> None:
        """Apply ops [0, upto) except ``skip`` (writes the disk had not made durable yet, in
        any order); op ``tear`` reaches the disk only in its first half (a torn write)."""
        shutil.copyfile(original, out)
        with open(out, "r+b") as f:
            for i, (kind, offset, data) in enumerate(self.ops[:upto]):
                if i in skip:
                    continue
                if i == tear and kind == "w":
                    # the disk wrote whole 512-byte file sectors of it, up to about half
                    keep = (offset + len(data) // 2) // 512 * 512 - offset
                    data = data[:max(0, keep)]
                if kind == "w":
                    f.seek(offset)
                    f.write(data)
                elif kind == "t":
                    f.truncate(offset)


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_every_prefix_of_the_write_log_replays_consistently(tmp_path, monkeypatch, kind):
    size = 6 * MiB
    path, shadow, parents = make(tmp_path, kind, 512, size)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    parent_hashes = [sha(p) for p in parents]
    rnd = random.Random(11)
    log = WriteLog(path)
    log.install(monkeypatch)
    # (op index after which the state is promised, content then)
    promised: list[tuple[int, bytes]] = [(0, bytes(shadow))]
    history = [bytes(shadow)]
    with open_image(path, writable=True) as img:
        for i, (off, data) in enumerate(random_ops(rnd, size, 512, 14)):
            img.write(off, data)
            shadow[off:off + len(data)] = data
            history.append(bytes(shadow))
            if i % 4 == 3:
                img.flush()
                promised.append((len(log.ops), bytes(shadow)))
    promised.append((len(log.ops), bytes(shadow)))
    monkeypatch.undo()
    cut_file = tmp_path / "cut.avhdx" if kind == "differencing" else tmp_path / "cut.vhdx"
    sector = 512
    pick = random.Random(5)
    syncs = [i for i, op in enumerate(log.ops) if op[0] == "s"]
    for cut in range(len(log.ops) + 1):
        last = max(c for c in promised if c[0] <= cut)
        since = max([i + 1 for i in syncs if i < cut] + [0])   # ops not yet made durable
        unsynced = range(since, cut)
        variants = [(frozenset(), None), (frozenset(), cut - 1)]
        if len(unsynced) > 1:
            variants.append((frozenset(i for i in unsynced if pick.random() < 0.5), None))
            variants.append((frozenset(unsynced[:-1]), None))      # only the newest landed
        for skip, tear in variants:
            log.replay(original, cut_file, cut, skip, tear)
            with open_image(cut_file) as img:
                got = img.read(0, size)
                errs = [f for f in img.check() if f.severity == Severity.ERROR]
            assert not errs, (cut, skip, tear, errs)
            # every flushed byte is there; any other sector holds a value written since
            assert _flushed_ok(got, last[1], history, sector), (cut, skip, tear)
    assert [sha(p) for p in parents] == parent_hashes


def _flushed_ok(got: bytes, promised: bytes, history: list[bytes], sector: int) -> bool:
    """Sectors differing from the promised state must hold a *later* value (never an older one)."""
    idx = history.index(promised) if promised in history else 0
    newer = history[idx:]
    step = 64 * 1024
    for c in range(0, len(got), step):
        if got[c:c + step] == promised[c:c + step]:
            continue
        for s in range(c, min(len(got), c + step), sector):
            g = got[s:s + sector]
            if g != promised[s:s + sector] and not any(h[s:s + sector] == g for h in newer):
                return False
    return True


def test_on_disk_replay_is_crash_safe(tmp_path, monkeypatch):
    """Kill a writable open of a dirty file at every op (header update, replay, new log, close):
    every prefix still reads as the replayed disk."""
    B = MiB
    b = w.build_vhdx(4 * MiB, block_size=B, blocks={0: b"\x01" * B})
    off0 = b.block_offsets[0]
    bat = bytearray(b.bat_page())
    bat[8:16] = ((off0 >> 20) << 20 | w.FULLY_PRESENT).to_bytes(8, "little")   # block 1 too
    b.add_log(uuid.UUID(int=0x10C), [w.Entry(1, pages={w.BAT_OFFSET: bytes(bat),
                                                      off0 + 4096: b"\x02" * 4096})])
    b.set_headers(data_write_guid=G_BASE)
    path = tmp_path / "dirty.vhdx"
    path.write_bytes(b.data)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    with open_image(path) as img:
        want = img.read(0, img.size)
    assert want[B:B + 8192] == b"\x01" * 4096 + b"\x02" * 4096
    log = WriteLog(path)
    log.install(monkeypatch)
    with open_image(path, writable=True) as img:
        img.write(3 * B, b"new")
    monkeypatch.undo()
    after = bytearray(want)
    after[3 * B:3 * B + 3] = b"new"
    cut_file = tmp_path / "cut.vhdx"
    for cut in range(len(log.ops) + 1):
        for tear in (None, cut - 1):
            log.replay(original, cut_file, cut, tear=tear)
            with open_image(cut_file) as img:
                got = img.read(0, img.size)
            assert got in (want, bytes(after)), (cut, tear)
    assert got == bytes(after)


def test_log_wraps_and_the_newest_entry_wins(tmp_path, monkeypatch):
    """Hundreds of commits wrap the 1 MiB log; a crash after the newest entry (pages not yet in
    place, or torn) still replays it, never an older one."""
    size = 16 * MiB
    b = w.build_vhdx(size, block_size=MiB)
    path = tmp_path / "wrap.vhdx"
    path.write_bytes(b.data)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    log = WriteLog(path)
    log.install(monkeypatch)
    shadow = bytearray(size)
    marks = []
    with open_image(path, writable=True) as img:
        for i in range(160):
            k = i % 16                                  # discard, then allocate anew: one
            img.discard(k * MiB, MiB)                   # BAT page change per commit
            img.write(k * MiB + 512 * (i // 16), bytes([i % 251 + 1]) * 512)
            shadow[k * MiB:(k + 1) * MiB] = bytes(MiB)
            shadow[k * MiB + 512 * (i // 16):k * MiB + 512 * (i // 16 + 1)] = bytes([i % 251 + 1]) * 512
            img.flush()
            if i >= 154:
                marks.append((len(log.ops), bytes(shadow)))
        assert img.journal.sequence * 8192 > MiB                # it wrapped
    monkeypatch.undo()
    cut_file = tmp_path / "cut.vhdx"
    for (start, before), (end, after) in zip(marks, marks[1:]):
        for cut in range(start, end + 1):
            for tear in (None, cut - 1):
                log.replay(original, cut_file, cut, tear=tear)
                with open_image(cut_file) as img:
                    got = img.read(0, size)
                assert got in (before, after), (cut, tear)


def _read_dissect(path: Path, size: int) -> bytes:
    from dissect.hypervisor.disk.vhdx import VHDX
    with open(path, "rb") as fh:
        v = VHDX(fh)
        v.seek(0)
        return v.read(size)


@contextlib.contextmanager
def _pyvhdi_chain(path: Path, parents: list[Path]):
    """libvhdi's file for ``path`` with its ``parents`` set, all closed afterwards."""
    import pyvhdi
    files = []
    try:
        for p in [path, *parents]:
            f = pyvhdi.file()
            f.open(str(p))
            files.append(f)
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        yield files[0]
    finally:
        for f in files:
            f.close()


def _read_pyvhdi(path: Path, parents: list[Path], size: int) -> bytes:
    with _pyvhdi_chain(path, parents) as f:
        return f.read_buffer_at_offset(size, 0)


@pytest.mark.parametrize("logical", [512, 4096])
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_written_images_read_the_same_in_dissect_and_libvhdi(tmp_path, kind, logical):
    """Oracles: what vhdfs wrote (PARTIALLY_PRESENT bitmaps, new bitmap blocks, 4K sectors)
    reads back identically in dissect.hypervisor and libvhdi (pyvhdi)."""
    pytest.importorskip("dissect.hypervisor")
    pytest.importorskip("pyvhdi")
    path, shadow, parents = make(tmp_path, kind, logical)
    # no ZERO/UNDEFINED blocks left in the child: libvhdi reads those from the parent
    rnd = random.Random(3)
    with open_image(path, writable=True) as img:
        if kind == "differencing":
            for b in (3, 4):
                img.write(b * MiB, bytes(MiB))
        for off, data in random_ops(rnd, len(shadow), logical, 40):
            img.write(off, data)
            shadow[off:off + len(data)] = data
    want = bytes(shadow)
    assert _read_dissect(path, len(want)) == want
    assert _read_pyvhdi(path, parents, len(want)) == want


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_qemu_replays_our_log_after_a_kill(tmp_path, monkeypatch):
    """Cut the write stream right after our last log entry is durable, before its pages are in
    place (a kill there): QEMU's replay (`check -r all`) and vhdfs's read the same disk."""
    path, shadow, _ = make(tmp_path, "dynamic", 512)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    log = WriteLog(path)
    log.install(monkeypatch)
    rnd = random.Random(9)
    with open_image(path, writable=True) as img:
        for off, data in random_ops(rnd, len(shadow), 512, 30):
            img.write(off, data)
            shadow[off:off + len(data)] = data
        img.flush()
    monkeypatch.undo()
    entries = [i for i, (k, off, data) in enumerate(log.ops)
               if k == "w" and data[:4] == b"loge" and w.LOG_OFFSET <= off < 2 * MiB
               and int.from_bytes(data[24:28], "little")]          # descriptors > 0
    cut = entries[-1] + 2                       # the entry and its sync, no page in place yet
    assert log.ops[cut - 1][0] == "s" and log.ops[cut][0] == "w"
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    log.replay(original, ours, cut)
    shutil.copyfile(ours, theirs)
    lay, plan = headers(ours)
    assert plan is not None and plan.writes and lay.header.log_guid != spec.NULL_GUID
    with open_image(ours) as o:
        assert o.read(0, o.size) == bytes(shadow)
    chk = subprocess.run(["qemu-img", "check", "-r", "all", "-f", "vhdx", str(theirs)],
                         capture_output=True, text=True, check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    raw = tmp_path / "theirs.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(theirs), str(raw)],
                   check=True, capture_output=True)
    assert raw.read_bytes() == bytes(shadow)


def test_a_commit_too_big_for_one_entry_lands_in_safe_pieces(tmp_path, monkeypatch):
    """300 blocks over 75 chunks (hundreds of BAT and bitmap pages) in one commit: whatever
    prefix of its entries survives, the chain opens, checks clean and reads old or new."""
    size = 300 << 30
    base = w.build_vhdx(size, block_size=MiB)
    base.set_headers(data_write_guid=G_BASE)
    (tmp_path / "base.vhdx").write_bytes(base.data)
    child = w.build_vhdx(size, block_size=MiB, kind="differencing",
                         parent_locator={"parent_linkage": "{%s}" % G_BASE,
                                         "relative_path": "base.vhdx"})
    child.set_headers(data_write_guid=G_CHILD)
    path = tmp_path / "child.avhdx"
    path.write_bytes(child.data)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    log = WriteLog(path)
    log.install(monkeypatch)
    spots = [(i * 1021 * MiB + 512 * (i % 7), bytes([i % 250 + 1]) * 512) for i in range(300)]
    with open_image(path, writable=True) as img:
        img.auto_commit = False
        for off, data in spots:
            img.write(off, data)
        img.flush()
    monkeypatch.undo()
    entries = [i for i, (k, off, data) in enumerate(log.ops)
               if k == "w" and data[:4] == b"loge" and w.LOG_OFFSET <= off < 2 * MiB]
    assert len(entries) >= 3                       # the empty one, then at least two pieces
    cut_file = tmp_path / "cut.avhdx"
    for e in entries[1:]:
        for cut in (e + 1, e + 2):                 # the entry written; and made durable
            log.replay(original, cut_file, cut)
            with open_image(cut_file) as img:
                assert [f for f in img.check() if f.severity == Severity.ERROR] == []
                for off, data in spots:
                    assert img.read(off, 512) in (data, bytes(512))
    with open_image(path) as img:
        assert all(img.read(off, 512) == data for off, data in spots)


def _read_at(path: Path, parents: list[Path], spans: list[tuple[int, int]]) -> tuple[list[bytes], ...]:
    """``spans`` read by dissect.hypervisor and by libvhdi (pyvhdi), each opened once."""
    from dissect.hypervisor.disk.vhdx import VHDX
    with open(path, "rb") as fh:
        v = VHDX(fh)
        by_dissect = []
        for off, n in spans:
            v.seek(off)
            by_dissect.append(v.read(n))
    with _pyvhdi_chain(path, parents) as f:
        by_libvhdi = [f.read_buffer_at_offset(n, off) for off, n in spans]
    return by_dissect, by_libvhdi


@pytest.mark.parametrize("logical", [512, 4096])
def test_last_sector_of_a_block_of_a_chunk_and_of_the_disk(tmp_path, logical):
    """Single-sector writes into a differencing VHDX at the bitmap's edges: the last sector of
    block 0, the last sector of a chunk (the last bit of its 1 MiB sector bitmap), the first of
    the next chunk, and the last sector of the disk. dissect.hypervisor and libvhdi read the same
    bytes as vhdfs (the parent around each sector, the written sector itself), and the bitmap's
    last bit is set in the file."""
    pytest.importorskip("dissect.hypervisor")
    pytest.importorskip("pyvhdi")
    B = MiB
    ratio = (1 << 23) * logical // B                    # blocks per chunk: 2^23 sectors each
    size = 2 * ratio * B                                # two chunks
    rnd = random.Random(logical)
    edge_blocks = (0, 1, ratio - 1, ratio, 2 * ratio - 1)
    base = w.build_vhdx(size, block_size=B, logical=logical,
                        blocks={b: rnd.randbytes(B) for b in edge_blocks})
    base.set_headers(data_write_guid=G_BASE)
    bp = tmp_path / "base.vhdx"
    bp.write_bytes(base.data)
    child = w.build_vhdx(size, block_size=B, logical=logical, kind="differencing",
                         parent_locator={"parent_linkage": "{%s}" % G_BASE,
                                         "relative_path": ".\\base.vhdx"})
    child.set_headers(data_write_guid=G_CHILD)
    cp = tmp_path / "child.avhdx"
    cp.write_bytes(child.data)
    sectors = (B - logical, ratio * B - logical, ratio * B, size - logical)
    written = {s: rnd.randbytes(logical) for s in sectors}
    with open_image(cp, writable=True) as img:
        for s, data in written.items():
            img.write(s, data)
    # whole blocks for the oracles: dissect misreads a partial block from a sector that is not
    # the first of its bitmap byte (its _iter_partial_runs yields nothing for bit 7 alone)
    blocks = sorted({s // B for s in sectors})
    want = {}
    for b in blocks:
        buf = bytearray(base.data[base.block_offsets[b]:base.block_offsets[b] + B])
        for s, data in written.items():
            if s // B == b:
                buf[s - b * B:s - b * B + logical] = data
        want[b] = bytes(buf)
    spans = [(b * B, B) for b in blocks]
    with open_image(cp) as img:
        assert [img.read(off, n) for off, n in spans] == list(want.values())
        for s in sectors:                               # and unaligned, across the sector
            lo, hi = max(0, s - 3 * logical // 2), min(size, s + 5 * logical // 2)
            flat = b"".join(want.get(b, base.data[base.block_offsets[b]:][:B])
                            for b in range(lo // B, (hi - 1) // B + 1))
            assert img.read(lo, hi - lo) == flat[lo % B:lo % B + hi - lo], s
    by_dissect, by_libvhdi = _read_at(cp, [bp], spans)
    assert by_dissect == list(want.values())
    assert by_libvhdi == list(want.values())
    raw = cp.read_bytes()
    for c in (0, 1):                                    # each chunk's bitmap: last bit set
        index = (c + 1) * ratio + c
        entry = int.from_bytes(raw[w.BAT_OFFSET + 8 * index:w.BAT_OFFSET + 8 * index + 8], "little")
        assert entry & 7 == w.SB_PRESENT, (c, entry)
        bitmap = (entry >> 20) << 20
        assert raw[bitmap + MiB - 1] & 0x80, c


def _with_log_ignored(src: Path, dst: Path) -> None:
    """``src`` with LogGuid cleared in both headers: what a reader that ignores the log sees."""
    import dataclasses
    data = bytearray(src.read_bytes())
    for off in (spec.HEADER1_OFFSET, spec.HEADER2_OFFSET):
        h = spec.parse_header(bytes(data[off:off + 4096]))
        data[off:off + 4096] = spec.pack_header(dataclasses.replace(h, log_guid=spec.NULL_GUID,
                                                                    checksum=0))
    dst.write_bytes(bytes(data))


@needs_root
def test_read_only_opens_replay_our_own_dirty_log(tmp_path, monkeypatch):
    """A vhdfs writer killed after its last log entry was durable, before the pages it carries
    were in place (the new blocks' BAT entries are only in the log): vhdfs.open, ``info`` and a
    read-only mount all show the replayed disk, never the stale one (the file read with the log
    ignored), and none of them changes the file."""
    import vhdfs
    from mounting import mounted
    path, shadow, _ = make(tmp_path, "dynamic", 512)
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    log = WriteLog(path)
    log.install(monkeypatch)
    with open_image(path, writable=True) as img:
        img.write(100, b"\x11" * 5000)                  # block 0, already allocated
        img.flush()
        for b in (1, 3, 6):                             # NOT_PRESENT blocks: allocated now
            img.write(b * MiB + 512, bytes([b]) * 70_000)
            shadow[b * MiB + 512:b * MiB + 512 + 70_000] = bytes([b]) * 70_000
        shadow[100:5100] = b"\x11" * 5000
        img.flush()
    monkeypatch.undo()
    entries = [i for i, (k, off, data) in enumerate(log.ops)
               if k == "w" and data[:4] == b"loge" and w.LOG_OFFSET <= off < 2 * MiB
               and int.from_bytes(data[24:28], "little")]
    cut = entries[-1] + 2                               # the entry and its sync, nothing in place
    assert log.ops[cut - 1][0] == "s" and log.ops[cut][0] == "w"
    dirty, stale = tmp_path / "dirty.vhdx", tmp_path / "stale.vhdx"
    log.replay(original, dirty, cut)
    _with_log_ignored(dirty, stale)
    want = bytes(shadow)
    with open_image(stale) as img:
        stale_data = img.read(0, img.size)
        stale_blocks = img.allocated_blocks()
    assert stale_data != want                           # the replay is what makes it right
    digest = sha(dirty)

    with vhdfs.open(dirty) as f:
        assert f.read() == want
    res = subprocess.run([sys.executable, "-m", "vhdfs", "info", "--json", str(dirty)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["log"].startswith("replayed in memory"), info["log"]
    assert info["allocated_blocks"] == stale_blocks + 3, (info["allocated_blocks"], stale_blocks)
    with mounted([dirty], tmp_path / "mnt") as m:
        assert Path(m.file("dirty.raw")).read_bytes() == want
        m.unmount()
    assert sha(dirty) == digest
