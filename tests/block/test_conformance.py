"""What every writable format must do: one suite, run once per image kind in ``FACTORIES``.

In the manner of s3ql's ``with_backend`` and QEMU iotests' ``_supported_fmt``: each test takes a
``Factory``, which makes a fresh writable image of one kind (and the parents of its chain), and
checks it against a flat shadow of what was written.

**Adding a format is adding one line to ``FACTORIES``** (per kind worth telling apart: fixed,
dynamic with a few block sizes, differencing): ``Factory(name, fmt, type, block_size=...,
qemu=...)``; ``Factory`` and the workload live in ``tests/block/conformance.py``. Images are
made through the driver registry (``vhdfs.tools.create``), so a format vhdfs can create needs
nothing else; one it cannot create passes ``make_file``. Whether it has pending metadata
(``sparse``), children (``differencing`` among its driver's types) and discard follows from
the fields.

What each test proves, for every factory:

- ``test_new_image_is_clean``: a fresh image reads as zeros (or as its parent) and ``check()``
  finds nothing.
- ``test_random_io_matches_a_flat_shadow``: writes straddling blocks and sectors, sub-sector
  writes, reads of random ranges between them and flushes now and then; after a reopen the disk
  reads exactly as the shadow and ``check()`` finds no ERROR or LEAK.
- ``test_discard_reads_zeros``: whole, partial, straddling and sub-sector discards read as zeros
  at once and after a reopen (in a differencing child too, over the parent's non-zero data),
  and the space is writable again.
- ``test_chain_of_four``: every layer written in turn, each read alone and through the chain
  resolves to its own shadow; a child never changes its parents (sha256 of their files).
- ``test_every_prefix_of_the_write_log_is_a_consistent_image``: every write and sync recorded;
  at each cut the rebuilt file opens, ``check()`` reports nothing but leaks, every byte
  acknowledged by ``flush()`` reads back, every other sector holds some value it had since. Writes
  persist in the order issued (no reordering between syncs is modelled).
- ``test_a_write_during_the_commit_sync_stays_pending``: a commit syncs before it writes any
  metadata; its sync runs without the lock, and writes made meanwhile (new blocks, new bits in
  a block whose bits are being committed) are not written by that commit, never overwritten by
  its older copy, and land at the next.
- ``test_a_failed_write_leaves_the_open_image_consistent``: the n-th file write fails; the open
  image shows old or new sectors only and takes the write again once the fault is gone.
- ``test_a_failed_commit_rolls_memory_back_to_the_file``: the commit's sync, or its first entry
  write, fails; memory then shows what the file holds, and nothing is lost later.
- ``test_qemu_img_reads_what_vhdfs_wrote``: an independent reader (``qemu-img convert -O raw``)
  sees the same bytes, for the kinds it reads.

Reproducible by default (fixed seeds, like the ``suite`` hypothesis profile in conftest.py);
``VHDFS_HYPOTHESIS_RANDOM=1`` draws a fresh seed, ``VHDFS_CONFORMANCE_SEED=N`` replays one.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conformance import (
    SEED,
    SIZE,
    Factory,
    KiB,
    MiB,
    assert_unchanged,
    crash_problems,
    problems,
    rnd_for,
    sha256_file,
    unit_of,
    workload,
)
from vhdfs.block.rawfile import RawFile

from writelog import WriteLog, assert_each_sector_from, sectors


def _raw_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


VHDX_LOG = "log: "   # a crash leaves a log that the next open replays (a NOTE says so)

FACTORIES = [
    Factory("raw", "raw", "fixed", discard=False, make_file=_raw_file),
    Factory("vhd-fixed", "vhd", "fixed", qemu="vpc"),
    Factory("vhd-dynamic-4k", "vhd", "dynamic", block_size=4 * KiB, qemu="vpc"),
    Factory("vhd-dynamic-64k", "vhd", "dynamic", block_size=64 * KiB, qemu="vpc"),
    Factory("vhd-dynamic-1m", "vhd", "dynamic", block_size=MiB, qemu="vpc"),
    Factory("vhd-dynamic-2m", "vhd", "dynamic", qemu="vpc"),
    Factory("vhd-differencing", "vhd", "differencing", block_size=512 * KiB),
    Factory("vdi-static", "vdi", "fixed", qemu="vdi"),
    Factory("vdi-dynamic", "vdi", "dynamic", qemu="vdi"),
    Factory("vdi-dynamic-4k", "vdi", "dynamic", block_size=4 * KiB),
    Factory("vdi-differencing", "vdi", "differencing"),
    # VHDX: qemu-img reads fixed and dynamic with 512-byte sectors only (not differencing, not 4K).
    Factory("vhdx-fixed", "vhdx", "fixed", qemu="vhdx", crash_note=VHDX_LOG),
    Factory("vhdx-dynamic-1m", "vhdx", "dynamic", block_size=MiB, qemu="vhdx", crash_note=VHDX_LOG),
    Factory("vhdx-dynamic-32m", "vhdx", "dynamic", block_size=32 * MiB, qemu="vhdx", crash_note=VHDX_LOG),
    Factory("vhdx-dynamic-1m-4k", "vhdx", "dynamic", block_size=MiB, sector_size=4096, crash_note=VHDX_LOG),
    Factory("vhdx-dynamic-32m-4k", "vhdx", "dynamic", block_size=32 * MiB, sector_size=4096,
            crash_note=VHDX_LOG),
    Factory("vhdx-differencing", "vhdx", "differencing", block_size=MiB, crash_note=VHDX_LOG),
    Factory("vhdx-differencing-4k", "vhdx", "differencing", block_size=MiB, sector_size=4096,
            crash_note=VHDX_LOG),
]


def _ids(fs: list[Factory]) -> list[str]:
    return [f.name for f in fs]


ALL = pytest.mark.parametrize("f", FACTORIES, ids=_ids(FACTORIES))
SPARSE = [f for f in FACTORIES if f.sparse]


@pytest.fixture(autouse=True)
def _no_kernel_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability is modelled here by ``WriteLog`` (every ``RawFile.sync`` is still called and
    recorded); the kernel's own flush to the disk is not under test, and on a shared disk it
    would make this suite several times slower."""
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


# -- the tests -----------------------------------------------------------------------------------

@ALL
def test_new_image_is_clean(f: Factory, tmp_path: Path) -> None:
    made = f.make(tmp_path)
    with f.open(made.path) as img:
        assert img.size == SIZE
        assert problems(img) == []
        if not made.parents:
            assert img.read(0, SIZE) == bytes(SIZE)
        else:
            with f.open(made.parents[0]) as parent:
                assert img.read(0, SIZE) == parent.read(0, SIZE)


@ALL
def test_random_io_matches_a_flat_shadow(f: Factory, tmp_path: Path) -> None:
    made = f.make(tmp_path)
    before = {p: sha256_file(p) for p in made.parents}
    with f.open(made.path) as img:
        shadow = bytearray(img.read(0, SIZE))
    rnd = rnd_for(f, "io")
    with f.open(made.path, writable=True) as img:
        for i, (off, data) in enumerate(workload(rnd, unit_of(img), 40)):
            img.write(off, data)
            shadow[off:off + len(data)] = data
            if i % 3 == 0:
                a = rnd.randrange(0, SIZE - 1)
                n = rnd.choice([1, 511, 4097, unit_of(img) + 1, 2 * MiB])
                assert img.read(a, n) == bytes(shadow[a:a + n]), f"write {i}: read at {a}+{n} (seed {SEED})"
            if i % 13 == 12:
                img.flush()
        assert img.read(SIZE - 10, 100) == bytes(shadow[-10:])   # short only at the end
        assert img.read(0, SIZE) == shadow, f"seed {SEED}"
    with f.open(made.path) as img:
        assert img.read(0, SIZE) == shadow, f"after reopen (seed {SEED})"
        assert problems(img) == []
    assert_unchanged(made.parents, before)


DISCARDING = [f for f in FACTORIES if f.discard]


@pytest.mark.parametrize("f", DISCARDING, ids=_ids(DISCARDING))
def test_discard_reads_zeros(f: Factory, tmp_path: Path) -> None:
    made = f.make(tmp_path)
    before = {p: sha256_file(p) for p in made.parents}
    rnd = rnd_for(f, "discard")
    with f.open(made.path, writable=True) as img:
        B = unit_of(img)
        if made.parents:   # own data over the first half; the second half shows the parent's
            img.write(0, rnd.randbytes(SIZE // 2))
        else:
            img.write(0, rnd.randbytes(SIZE))
        img.flush()
        shadow = bytearray(img.read(0, SIZE))
        ranges = [(0, B), (B + 100, B // 2), (2 * B - 700, 1400), (2 * B + 1000, 100),
                  (SIZE // 2, SIZE // 4), (SIZE - B - 5, B + 5)]
        for off, n in ranges:
            assert shadow[off:off + n].count(0) < n, f"discard {off}+{n} would prove nothing"
            img.discard(off, n)
            shadow[off:off + n] = bytes(n)
            assert img.read(off, n) == bytes(n), f"discard {off}+{n} does not read as zeros"
        assert img.read(0, SIZE) == shadow
        img.flush()
    with f.open(made.path, writable=True) as img:
        assert img.read(0, SIZE) == shadow, "after reopen"
        assert problems(img) == []
        data = rnd.randbytes(B + 1000)       # discarded space takes writes again
        img.write(B - 500, data)
        shadow[B - 500:B - 500 + len(data)] = data
    with f.open(made.path) as img:
        assert img.read(0, SIZE) == shadow
        assert problems(img) == []
    assert_unchanged(made.parents, before)


CHAINED = [f for f in FACTORIES if f.children]


@pytest.mark.parametrize("f", CHAINED, ids=_ids(CHAINED))
def test_chain_of_four(f: Factory, tmp_path: Path) -> None:
    made = f.make(tmp_path)
    layers = [made.path]
    rnd = rnd_for(f, "chain")
    with f.open(made.path) as img:
        shadow = bytearray(img.read(0, SIZE))
    shadows: list[bytes] = []
    frozen: dict[Path, str] = {}
    for depth in range(4):
        if depth:
            child = tmp_path / f"layer{depth}{f.suffix}"
            f.create(child, "differencing", parent=layers[-1])
            layers.append(child)
        with f.open(layers[-1], writable=True) as img:
            assert img.read(0, SIZE) == shadow, f"layer {depth} does not start as its parent"
            for off, data in workload(rnd, unit_of(img), 8):
                img.write(off, data)
                shadow[off:off + len(data)] = data
            if f.discard and depth:   # zeros over the data of every layer below
                off = rnd.randrange(0, SIZE - MiB)
                img.discard(off, MiB)
                shadow[off:off + MiB] = bytes(MiB)
            assert img.read(0, SIZE) == shadow
        shadows.append(bytes(shadow))
        sums = {p: sha256_file(p) for p in [*made.parents, *layers]}
        if depth:
            assert_unchanged([*made.parents, *layers[:-1]], frozen)
        frozen = sums
    with f.open(layers[-1]) as top:
        assert len(top.chain) == 4 + len(made.parents)
        assert top.read(0, SIZE) == shadows[-1]
        assert problems(top) == []
    for depth, path in enumerate(layers):
        with f.open(path) as img:
            assert img.read(0, SIZE) == shadows[depth], f"layer {depth} read on its own"
    assert_unchanged([*made.parents, *layers], frozen)


def _acked_candidates(windows: list[tuple[int, bytes, list[bytes]]], cut: int, final: bytes) -> list[bytes]:
    """What a cut may show: the acknowledged state of the window it falls in, or any after it."""
    if cut >= windows[-1][0]:
        return [final]
    _sync_index, acked_state, states = next(w for w in windows if cut <= w[0])
    return [acked_state, *states]


@ALL
def test_every_prefix_of_the_write_log_is_a_consistent_image(
        f: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = f.make(tmp_path)
    parent_bytes = [p.read_bytes() for p in made.parents]
    with f.open(made.path) as img:
        before = img.read(0, SIZE)
    original = tmp_path / "original"
    shutil.copyfile(made.path, original)

    log = WriteLog(made.path)
    log.install(monkeypatch)
    rnd = rnd_for(f, "crash")
    shadow = bytearray(before)
    # Per sync window: the acknowledged state at its start and every state written inside it.
    windows: list[tuple[int, bytes, list[bytes]]] = []  # (log index of the sync, acked, states)
    acked = bytes(shadow)
    pending: list[bytes] = []
    with f.open(made.path, writable=True) as img:
        for i, (off, data) in enumerate(workload(rnd, unit_of(img), 24)):
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
    replayed = tmp_path / ("replay" + f.suffix)
    for cut in log.replay_each(original, replayed, cuts):
        candidates = _acked_candidates(windows, cut, bytes(shadow))
        with f.open(replayed) as img:
            found = crash_problems(f, img)
            assert found == [], f"cut {cut}/{len(log.ops)}: {found} (seed {SEED})"
            got = img.read(0, SIZE)
        assert_each_sector_from(got, candidates, f"cut {cut}/{len(log.ops)} (seed {SEED})")
    for p, data in zip(made.parents, parent_bytes, strict=True):
        assert p.read_bytes() == data, f"parent {p} changed"


FAIL_AT = [(f, n) for f in FACTORIES for n in (range(4) if f.sparse else range(1))]


@pytest.mark.parametrize("f,fail_at", FAIL_AT, ids=[f"{f.name}-{n}" for f, n in FAIL_AT])
def test_a_failed_write_leaves_the_open_image_consistent(
        f: Factory, fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = f.make(tmp_path)
    with f.open(made.path) as img:
        old = img.read(0, SIZE)
    log = WriteLog(made.path)
    log.install(monkeypatch)
    off, data = 3 * MiB - 1000, random.Random(fail_at).randbytes(MiB)
    new = bytearray(old)
    new[off:off + len(data)] = data
    with f.open(made.path, writable=True) as img:
        log.fail_at = log.pwrites + fail_at   # the n-th file write of this write and its commit
        try:
            img.write(off, data)
            img.flush()
        except OSError:
            pass
        assert log.fail_at is None, "the injected failure was never reached"
        got = img.read(0, SIZE)
        old_s, new_s = sectors(old), sectors(bytes(new))
        for n, sector in enumerate(sectors(got)):
            assert sector in (old_s[n], new_s[n]), f"sector {n} is garbage"
        # The image must still accept the write once the fault is gone.
        img.write(off, data)
        assert img.read(off, len(data)) == data
    monkeypatch.undo()
    with f.open(made.path) as img:
        assert crash_problems(f, img) == []
        assert img.read(0, SIZE) == bytes(new)


@pytest.mark.parametrize("fail", ["sync", "entry"])
@pytest.mark.parametrize("f", SPARSE, ids=_ids(SPARSE))
def test_a_failed_commit_rolls_memory_back_to_the_file(
        f: Factory, fail: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending metadata (new blocks' entries, differencing bits) goes out at flush; when that
    fails, the open image must show what the file holds, stay writable, and lose nothing later."""
    made = f.make(tmp_path)
    with f.open(made.path) as img:
        old = img.read(0, SIZE)
    log = WriteLog(made.path)
    log.install(monkeypatch)
    rnd = random.Random(fail)
    writes = [(off, rnd.randbytes(n)) for off, n in
              [(5000, 3 * MiB), (6 * MiB + 17, 4000), (700, 300)]]
    new = bytearray(old)
    for off, data in writes:
        new[off:off + len(data)] = data
    real_sync = RawFile.sync
    with f.open(made.path, writable=True) as img:
        for off, data in writes:
            img.write(off, data)
        assert img.has_pending_metadata()
        if fail == "sync":
            def failing_sync(self: RawFile) -> None:
                monkeypatch.setattr(RawFile, "sync", real_sync)
                raise OSError(errno.EIO, "injected sync failure")
            monkeypatch.setattr(RawFile, "sync", failing_sync)
        else:
            log.fail_at = log.pwrites   # the first metadata write, after the commit's sync
        with pytest.raises(OSError):
            img.flush()
        assert not img.has_pending_metadata(), "what was due must leave the pending set"
        got = img.read(0, SIZE)
        reopened = tmp_path / ("mem-vs-file" + f.suffix)
        shutil.copyfile(made.path, reopened)
        with f.open(reopened) as disk:
            assert got == disk.read(0, SIZE), "memory and file disagree after a failed commit"
        old_s, new_s = sectors(old), sectors(bytes(new))
        for n, sector in enumerate(sectors(got)):
            assert sector in (old_s[n], new_s[n]), f"sector {n} is garbage"
        for off, data in writes:          # written again once the fault is gone: all lands
            img.write(off, data)
        img.flush()
    monkeypatch.undo()
    with f.open(made.path) as img:
        assert crash_problems(f, img) == []
        assert img.read(0, SIZE) == bytes(new)


@pytest.mark.parametrize("f", SPARSE, ids=_ids(SPARSE))
def test_a_write_during_the_commit_sync_stays_pending(
        f: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Needs blocks 1-3: a kind whose block covers the 8 MiB disk (VHDX 32 MiB) runs on a
    disk of four blocks."""
    size = f.blocks_size
    made = f.make(tmp_path, size)
    with f.open(made.path) as img:
        shadow = bytearray(img.read(0, size))
    rnd = rnd_for(f, "during-sync")
    log = WriteLog(made.path)
    log.install(monkeypatch)
    real_sync = RawFile.sync
    with f.open(made.path, writable=True) as img:
        B = min(img.allocation_unit or 64 * KiB, size // 4)
        setup = [(B + 6 * 512, rnd.randbytes(512))]        # block 1 allocated and committed
        first = [(B + 512, rnd.randbytes(512)),             # block 1: new bits pending
                 (3 * B, rnd.randbytes(700))]               # a new block: its entry pending
        during = [(B + 3 * 512, rnd.randbytes(512)),        # block 1: its bits change again
                  (2 * B + 100, rnd.randbytes(900))]        # another new block
        for i, (off, data) in enumerate(setup + first):
            img.write(off, data)
            shadow[off:off + len(data)] = data
            if i < len(setup):
                img.flush()
        calls = []

        def sync_with_a_writer(self: RawFile) -> None:
            real_sync(self)
            if not calls:   # the commit's sync: another writer goes on before the lock is back
                calls.append(1)
                for off, data in during:
                    img.write(off, data)
                    shadow[off:off + len(data)] = data

        monkeypatch.setattr(RawFile, "sync", sync_with_a_writer)
        mark = len(log.ops)
        img.commit()
        assert log.ops[mark][0] == "s", "the commit wrote metadata before the sync covering its data"
        assert calls and img.has_pending_metadata(), "the writes made during the sync must wait"
        assert img.read(0, size) == shadow
        monkeypatch.undo()
        img.flush()
    with f.open(made.path) as img:
        assert img.read(0, size) == shadow, f"seed {SEED}"
        assert problems(img) == []


QEMU = [f for f in FACTORIES if f.qemu]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("f", QEMU, ids=_ids(QEMU))
def test_qemu_img_reads_what_vhdfs_wrote(f: Factory, tmp_path: Path) -> None:
    made = f.make(tmp_path)
    rnd = rnd_for(f, "qemu")
    with f.open(made.path, writable=True) as img:
        shadow = bytearray(img.read(0, SIZE))
        for off, data in workload(rnd, unit_of(img), 16):
            img.write(off, data)
            shadow[off:off + len(data)] = data
        if f.discard:
            img.discard(SIZE // 4, SIZE // 8)
            shadow[SIZE // 4:SIZE // 4 + SIZE // 8] = bytes(SIZE // 8)
    out = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", f.qemu, "-O", "raw", str(made.path), str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == shadow, "qemu-img reads other bytes than vhdfs wrote"
