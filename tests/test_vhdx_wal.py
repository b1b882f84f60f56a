"""The VHDX write-ahead log (``vhdx/wal.py``) on files made by ``vhdx/create.py``.

The crash tests record every pwrite/truncate/fdatasync the log issues (as
``test_crash_replay.py`` does) and rebuild the file as a power cut could leave it: every
prefix of the writes, the write at the cut torn (a 4 KiB- or sector-granular prefix of it) or with its first
sector destroyed (garbage, as a cut mid-sector may leave), a long write with a random half of
its 4 KiB sectors landed (disks reorder them), and, between
two fdatasyncs, any subset of that epoch's writes (the disk may reorder what was not flushed).
Each rebuilt file must open (``layout.open_layout``: a valid current header, region table,
metadata), and the tracked pages read through its replay must equal the state after exactly k
commits, for a k between the commits that had returned and those that had started: old or
new, never a mix of two commits, never a commit lost once ``commit`` returned. Some of the
states are also replayed on disk by ``VhdxLog.open_writable`` and closed, and must give the
same pages.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vhdfs.block.rawfile import RawFile
from vhdfs.errors import UnsupportedError
from vhdfs.formats.vhdx import layout as vlayout
from vhdfs.formats.vhdx import log as vlog
from vhdfs.formats.vhdx import spec
from vhdfs.formats.vhdx.create import create_vhdx
from vhdfs.formats.vhdx.logspec import parse_log_entry_header
from vhdfs.formats.vhdx.wal import VhdxLog

MiB = spec.MiB
PAGE = spec.LOG_SECTOR


def _make(tmp: Path, name: str = "disk.vhdx") -> Path:
    path = tmp / name
    create_vhdx(path, 64 * MiB, "dynamic", block_size=1 * MiB)
    return path


def _open(path: Path) -> tuple[RawFile, vlayout.VhdxLayout, VhdxLog]:
    f = RawFile(str(path), writable=True)
    lay, plan, _ = vlayout.open_layout(f.pread, f.size())
    w = VhdxLog(f, lay)
    w.open_writable(plan)
    return f, lay, w


def _both_headers(data: bytes) -> tuple[spec.Header, spec.Header]:
    return (spec.parse_header(data[spec.HEADER1_OFFSET:spec.HEADER1_OFFSET + PAGE]),
            spec.parse_header(data[spec.HEADER2_OFFSET:spec.HEADER2_OFFSET + PAGE]))


def _view(buf: bytes | bytearray) -> tuple[vlayout.VhdxLayout, vlog.ReplayPlan | None, object]:
    data = bytes(buf)
    return vlayout.open_layout(lambda n, o: data[o:o + n], len(data))


# --- recording -------------------------------------------------------------------------
class Recorder:
    """Every pwrite/truncate/sync that reaches one file, in order."""

    def __init__(self, target: Path) -> None:
        self.target = os.path.abspath(target)
        self.ops: list[tuple[str, int, bytes]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rec = self
        real_pwrite, real_truncate, real_sync = RawFile.pwrite, RawFile.truncate, RawFile.sync

        def pwrite(self: RawFile, data, offset: int) -> None:  # noqa: ANN001
            if self.path == rec.target:
                rec.ops.append(("w", offset, bytes(data)))
            real_pwrite(self, data, offset)

        def truncate(self: RawFile, length: int) -> None:
            if self.path == rec.target:
                rec.ops.append(("t", length, b""))
            real_truncate(self, length)

        def sync(self: RawFile) -> None:
            if self.path == rec.target:
                rec.ops.append(("s", 0, b""))
            real_sync(self)

        monkeypatch.setattr(RawFile, "pwrite", pwrite)
        monkeypatch.setattr(RawFile, "truncate", truncate)
        monkeypatch.setattr(RawFile, "sync", sync)


def _apply(buf: bytearray, op: tuple[str, int, bytes], upto: int | None = None) -> None:
    kind, off, data = op
    if kind == "t":
        del buf[off:]
        buf.extend(bytes(off - len(buf)))
    elif kind == "w":
        data = data if upto is None else data[:upto]
        if off + len(data) > len(buf):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data


def crash_states(base: bytes, ops: list[tuple[str, int, bytes]], subsets: int = 12):
    """(description, cut, bytes) for every way a power cut may leave the file.

    ``cut`` is the number of ops fully issued before the crash point (for the commit window).
    """
    syncs = [i for i, op in enumerate(ops) if op[0] == "s"]
    bounds = [-1] + syncs + [len(ops)]
    buf = bytearray(base)
    done = 0                                     # ops applied to buf
    rnd = random.Random(5)
    for lo, hi in zip(bounds, bounds[1:]):
        epoch = [i for i in range(lo + 1, hi) if ops[i][0] != "s"]
        # prefixes and torn writes inside the epoch
        cur = bytearray(buf)
        for i in epoch:
            op = ops[i]
            if op[0] == "w" and len(op[2]) > 512:
                unit = PAGE if len(op[2]) > PAGE else 512     # a lone 4 KiB page tears by sector
                n = len(op[2])
                for keep in sorted({unit, n // 2 // unit * unit, n - unit} - {0, n}):
                    torn = bytearray(cur)
                    _apply(torn, op, keep)
                    yield f"op {i} torn at {keep}", i, torn
            if op[0] == "w" and len(op[2]) > 2 * PAGE:   # a long write lands in any order
                for _ in range(3):
                    scattered = bytearray(cur)
                    for k in range(0, len(op[2]), PAGE):
                        if rnd.random() < 0.5:
                            _apply(scattered, ("w", op[1] + k, op[2][k:k + PAGE]))
                    yield f"op {i} scattered", i + 1, scattered
            if op[0] == "w":                 # the sector under the head at the cut: garbage
                garbled = bytearray(cur)
                _apply(garbled, ("w", op[1], b"\xa5" * 512 + op[2][512:]))
                yield f"op {i} garbled", i, garbled
            _apply(cur, op)
            yield f"after op {i}", i + 1, bytes(cur)
        # any subset of the epoch's writes (unflushed writes may land in any order)
        if 1 < len(epoch):
            if len(epoch) <= 5:
                combos = [c for r in range(1, len(epoch))
                          for c in itertools.combinations(epoch, r)]
            else:
                combos = [tuple(sorted(rnd.sample(epoch, rnd.randrange(1, len(epoch)))))
                          for _ in range(subsets)]
            for combo in combos:
                sub = bytearray(buf)
                for i in combo:
                    _apply(sub, ops[i])
                yield f"subset {combo}", max(combo) + 1, bytes(sub)
        for i in range(done, hi if hi < len(ops) else len(ops)):
            _apply(buf, ops[i])
        done = hi + 1 if hi < len(ops) else len(ops)
        if hi < len(ops):
            yield f"after sync {hi}", hi + 1, bytes(buf)


@dataclass
class Scenario:
    base: bytes
    ops: list = field(default_factory=list)
    windows: list[tuple[int, int]] = field(default_factory=list)   # (ops before, ops after) per commit
    states: list[dict[int, bytes]] = field(default_factory=list)   # tracked pages after k commits
    tracked: list[int] = field(default_factory=list)


def _run(path: Path, monkeypatch: pytest.MonkeyPatch, commits: list[dict]) -> Scenario:
    """Open writable, run ``commits`` (kwargs for commit), close; everything recorded."""
    base = path.read_bytes()
    lay0 = _view(base)[0]
    tracked = sorted({o for c in commits for o in c["pages"]} |
                     {o + k for c in commits for o, n in c.get("zeros", {}).items()
                      for k in range(0, n, PAGE)})
    state = {o: base[o:o + PAGE] for o in tracked}
    sc = Scenario(base, tracked=tracked, states=[dict(state)])
    rec = Recorder(path)
    rec.install(monkeypatch)
    f, lay, w = _open(path)
    assert lay.bat_offset == lay0.bat_offset
    w.mark_data_changed()
    for c in commits:
        before = len(rec.ops)
        w.commit(**c)
        sc.windows.append((before, len(rec.ops)))
        for o, n in c.get("zeros", {}).items():
            for k in range(0, n, PAGE):
                state[o + k] = bytes(PAGE)
        state.update(c["pages"])
        sc.states.append(dict(state))
    w.close()
    f.close()
    monkeypatch.undo()
    sc.ops = rec.ops
    return sc


def _pages(read, tracked: list[int]) -> dict[int, bytes]:
    return {o: bytes(read(PAGE, o)) for o in tracked}


def _check_states(sc: Scenario, tmp: Path, disk_every: int = 0) -> int:
    """Every crash state replays to state k, k within the commit window of the cut."""
    n = 0
    for what, cut, data in crash_states(sc.base, sc.ops):
        lay, plan, view = _view(data)             # must open: headers, regions, metadata
        got = _pages(view, sc.tracked)
        returned = sum(1 for _, after in sc.windows if after <= cut)
        started = sum(1 for before, _ in sc.windows if before < cut)
        ok = [k for k in range(returned, started + 1) if sc.states[k] == got]
        assert ok, (f"{what}: pages match no state in commits {returned}..{started} "
                    f"(a torn mix, a lost commit or a revert)")
        if disk_every and n % disk_every == 0:
            p = tmp / "replayed.vhdx"
            p.write_bytes(data)
            f = RawFile(str(p), writable=True)
            lay2, plan2, _ = vlayout.open_layout(f.pread, f.size())
            w = VhdxLog(f, lay2)
            w.open_writable(plan2)
            w.close()
            f.close()
            raw = p.read_bytes()
            assert _pages(lambda ln, o: raw[o:o + ln], sc.tracked) == got, what
            assert all(h.log_guid == spec.NULL_GUID for h in _both_headers(raw)), what
            p.unlink()
        n += 1
    return n


def _bat_pages(lay: vlayout.VhdxLayout, idx: list[int], rnd: random.Random) -> dict[int, bytes]:
    return {lay.bat_offset + PAGE * i: rnd.randbytes(PAGE) for i in idx}


# --- behaviour -------------------------------------------------------------------------
def test_commit_lands_in_place_and_close_is_clean(tmp_path: Path) -> None:
    path = _make(tmp_path)
    created = _both_headers(path.read_bytes())
    f, lay, w = _open(path)
    opened = w.header
    assert opened.log_guid != spec.NULL_GUID
    assert opened.file_write_guid != created[1].file_write_guid
    assert opened.data_write_guid == created[1].data_write_guid   # nothing visible changed yet
    rnd = random.Random(1)
    pages = _bat_pages(lay, [0, 1, 2, 9], rnd)
    assert w.mark_data_changed() is True
    dwg = w.header.data_write_guid
    assert dwg != created[1].data_write_guid
    assert w.mark_data_changed() is False and w.header.data_write_guid == dwg   # once per open
    w.commit(pages, {lay.bat_offset + 16 * PAGE: 3 * PAGE})
    raw = path.read_bytes()
    for o, p in pages.items():
        assert raw[o:o + PAGE] == p
    assert raw[lay.bat_offset + 16 * PAGE:lay.bat_offset + 19 * PAGE] == bytes(3 * PAGE)
    dirty = _both_headers(raw)
    assert all(h.log_guid == w.log_guid for h in dirty)      # both slots fresh
    w.close()
    f.close()
    raw = path.read_bytes()
    h1, h2 = _both_headers(raw)
    assert h1.log_guid == h2.log_guid == spec.NULL_GUID
    assert abs(h1.sequence_number - h2.sequence_number) == 1
    assert h1.data_write_guid == h2.data_write_guid == dwg
    lay2, plan, _ = _view(raw)
    assert plan is None and lay2.findings == []


def test_entries_carry_sequence_tail_and_file_offsets(tmp_path: Path) -> None:
    path = _make(tmp_path)
    f, lay, w = _open(path)
    w.commit(_bat_pages(lay, [3], random.Random(2)))
    raw = path.read_bytes()
    log = raw[lay.log_offset:lay.log_offset + lay.log_length]
    first = parse_log_entry_header(log[:64])          # the empty entry open_writable writes
    assert (first.sequence_number, first.descriptor_count, first.tail) == (1, 0, 0)
    second = parse_log_entry_header(log[PAGE:PAGE + 64])
    assert (second.sequence_number, second.descriptor_count, second.tail) == (2, 1, PAGE)
    assert second.log_guid == w.log_guid
    assert second.flushed_file_offset == second.last_file_offset == len(raw)
    w.close()
    f.close()


def _data_not_synced_before_an_entry(ops: list[tuple[str, int, bytes]], lay: vlayout.VhdxLayout,
                                     data: object) -> list[tuple[int, int]]:
    """(data write, log entry write) pairs with no fdatasync between them: an entry that may
    reach the disk before the data it makes visible (a crash then shows garbage as disk data).
    ``data(offset)`` says which writes are data; entries are writes into the log region."""
    log = range(lay.log_offset, lay.log_offset + lay.log_length)
    bad, unsynced = [], []
    for i, (kind, off, _) in enumerate(ops):
        if kind == "s":
            unsynced = []
        elif kind == "w" and off in log:
            bad += [(j, i) for j in unsynced]
        elif kind == "w" and data(off):
            unsynced.append(i)
    return bad


def test_commit_syncs_the_data_before_writing_its_entry(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``commit`` (flush_data=True, the default): a data block written just before is durable
    before the log entry whose BAT page points at it is written (step 1 of the protocol)."""
    path = _make(tmp_path)
    f, lay, w = _open(path)
    rec = Recorder(path)
    rec.install(monkeypatch)
    at = -(-f.size() // MiB) * MiB
    f.pwrite(b"\x5a" * MiB, at)                          # block 0's data, past the old end
    page = bytearray(f.pread(PAGE, lay.bat_offset))
    page[0:8] = ((at >> 20) << 20 | spec.PAYLOAD_FULLY_PRESENT).to_bytes(8, "little")
    w.commit({lay.bat_offset: bytes(page)})
    monkeypatch.undo()
    log = range(lay.log_offset, lay.log_offset + lay.log_length)
    assert rec.ops[0][:2] == ("w", at) and any(k == "w" and o in log for k, o, _ in rec.ops)
    assert _data_not_synced_before_an_entry(rec.ops, lay, lambda o: o >= at) == []
    w.close()
    f.close()


def test_image_writes_sync_data_before_every_entry(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rule through the image driver (``Image.commit`` syncs, then the journal logs with
    flush_data=False): every payload write is durable before any later log entry is written."""
    from vhdfs.block import open_image
    path = _make(tmp_path)
    with open_image(path) as img:
        lay = img.layout
    end = max(lay.bat_offset + lay.bat_length, lay.metadata_offset + lay.metadata_length,
              lay.log_offset + lay.log_length)
    rec = Recorder(path)
    rec.install(monkeypatch)
    rnd = random.Random(4)
    with open_image(path, writable=True) as img:
        for i in range(40):
            img.write(rnd.randrange(60) * MiB + rnd.randrange(MiB - 9000), rnd.randbytes(9000))
            if i % 7 == 6:
                img.flush()
    monkeypatch.undo()
    log = range(lay.log_offset, lay.log_offset + lay.log_length)
    assert sum(1 for k, o, _ in rec.ops if k == "w" and o in log) >= 6      # several commits
    assert _data_not_synced_before_an_entry(rec.ops, lay, lambda o: o >= end) == []


def test_refusals(tmp_path: Path) -> None:
    path = _make(tmp_path)
    f, lay, w = _open(path)
    for pages in ({lay.bat_offset + 1: bytes(PAGE)}, {lay.bat_offset: bytes(100)},
                  {spec.HEADER1_OFFSET: bytes(PAGE)}, {lay.log_offset: bytes(PAGE)}):
        with pytest.raises(ValueError):
            w.commit(pages)
    too_many = {lay.bat_offset + PAGE * i: bytes(PAGE) for i in range(w.max_commit_pages() + 1)}
    with pytest.raises(ValueError, match="does not fit"):
        w.commit(too_many)
    w.commit(too_many, split=True)
    raw = path.read_bytes()
    assert all(raw[o:o + PAGE] == p for o, p in too_many.items())
    w.close()
    f.close()


def test_sequence_overflow_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = _make(tmp_path)
    raw = bytearray(path.read_bytes())
    h = _both_headers(raw)[0]
    for slot, seq in ((spec.HEADER1_OFFSET, 2**64 - 3), (spec.HEADER2_OFFSET, 2**64 - 2)):
        raw[slot:slot + PAGE] = spec.pack_header(spec.Header(
            seq, h.file_write_guid, h.data_write_guid, h.log_guid, 0, 1, h.log_length, h.log_offset))
    path.write_bytes(raw)
    f = RawFile(str(path), writable=True)
    lay, plan, _ = vlayout.open_layout(f.pread, f.size())
    with pytest.raises(UnsupportedError, match="overflow"):
        VhdxLog(f, lay).open_writable(plan)
    f.close()
    assert path.read_bytes() == bytes(raw)


def test_many_commits_wrap_the_log_and_replay_is_a_no_op_throughout(tmp_path: Path) -> None:
    path = _make(tmp_path)
    f, lay, w = _open(path)
    rnd = random.Random(3)
    wraps, last_head = 0, 0
    for i in range(160):
        n = rnd.choice([1, 2, 5, 30, 120, w.max_commit_pages()])
        idx = rnd.sample(range(256), n)
        chained = i % 3 == 1
        w.commit(_bat_pages(lay, idx, rnd), flush_data=not chained, sync_in_place=not chained)
        if w._head < last_head:
            wraps += 1
        last_head = w._head
        if i % 8 == 0 or chained:
            raw = path.read_bytes()
            plan = vlog.plan_replay(lambda ln, o: raw[o:o + ln], w.log_guid, lay.log_offset,
                                    lay.log_length, len(raw))
            assert plan.last_sequence == w.sequence_number - 1       # the newest entry is head
            oldest_needed = w._pending[0][0] if w._pending else w._latest[0]
            assert plan.tail == oldest_needed and plan.entry_count >= 1
            assert plan.last_sequence - plan.first_sequence + 1 == plan.entry_count
            # replaying the active sequence over the live file changes nothing (no stale entry)
            for wr in plan.writes:
                assert wr.data == raw[wr.file_offset:wr.file_offset + PAGE]
    assert wraps >= 20
    w.close()
    f.close()


# --- crash-prefix ------------------------------------------------------------------------
def _commits(lay: vlayout.VhdxLayout, rnd: random.Random) -> list[dict]:
    pool = list(range(0, 40))
    out = []
    for i in range(10):                               # small, overlapping, some chained
        chained = i in (3, 4, 7)
        out.append({"pages": _bat_pages(lay, rnd.sample(pool, rnd.choice([1, 2, 4])), rnd),
                    "flush_data": not chained, "sync_in_place": not chained})
    out.append({"pages": _bat_pages(lay, [1, 2], rnd), "zeros": {lay.bat_offset: 8 * PAGE}})
    for _ in range(4):                                # big: wrap the log, force the empty entry
        start = rnd.randrange(0, 50)                  # (contiguous: a few writes in place)
        idx = [i for i in range(start, start + 206) if i % 50 != 7]
        out.append({"pages": _bat_pages(lay, idx, rnd)})
    out.append({"pages": _bat_pages(lay, [0, 5], rnd), "sync_in_place": False})
    out.append({"pages": _bat_pages(lay, [5, 6], rnd), "flush_data": False, "sync_in_place": False})
    return out


def test_every_crash_state_replays_to_old_or_new_never_a_mix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make(tmp_path)
    lay = _view(path.read_bytes())[0]
    sc = _run(path, monkeypatch, _commits(lay, random.Random(11)))
    assert _check_states(sc, tmp_path, disk_every=40) > 300
    final = path.read_bytes()
    assert _pages(lambda n, o: final[o:o + n], sc.tracked) == sc.states[-1]


def test_crash_during_replay_of_a_dirty_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A file left dirty (entry flushed, no page in place yet): the replaying open, a commit
    and close, cut anywhere, never lose the logged pages."""
    path = _make(tmp_path)
    base = path.read_bytes()
    lay = _view(base)[0]
    rnd = random.Random(4)
    pages = _bat_pages(lay, list(range(12)), rnd)
    rec = Recorder(path)
    rec.install(monkeypatch)
    f, _, w = _open(path)
    w.commit(pages)
    f.close()
    monkeypatch.undo()
    entry_sync = [i for i, op in enumerate(rec.ops) if op[0] == "s"][-2]
    dirty = bytearray(base)
    for op in rec.ops[:entry_sync + 1]:
        _apply(dirty, op)
    assert _view(dirty)[1] is not None
    assert all(dirty[o:o + PAGE] != p for o, p in pages.items())     # only in the log
    crashed = tmp_path / "dirty.vhdx"
    crashed.write_bytes(dirty)
    extra = {lay.bat_offset + 40 * PAGE: bytes([7]) * PAGE}
    sc = _run(crashed, monkeypatch, [{"pages": extra}])
    # the spec's order: a header update (new FileWriteGuid) before the replay writes anything
    headers = (spec.HEADER1_OFFSET, spec.HEADER2_OFFSET)
    first_other = next(i for i, op in enumerate(sc.ops) if op[0] == "w" and op[1] not in headers)
    assert sc.ops[0][0] == "w" and sc.ops[0][1] in headers
    assert [op[0] for op in sc.ops[:first_other]].count("s") >= 1
    assert sc.ops[first_other][1] in pages                   # that first other write: replay
    sc.tracked = sorted(set(pages) | set(extra))
    (eo,) = extra
    sc.states = [{**pages, eo: bytes(dirty[eo:eo + PAGE])}, {**pages, **extra}]
    assert _check_states(sc, tmp_path, disk_every=5) > 30
    final = crashed.read_bytes()
    assert _pages(lambda n, o: final[o:o + n], sc.tracked) == sc.states[1]
    assert _view(final)[1] is None


def test_a_torn_entry_is_ignored_and_the_previous_commit_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make(tmp_path)
    lay = _view(path.read_bytes())[0]
    rnd = random.Random(9)
    a = _bat_pages(lay, [0, 1, 2], rnd)
    b = _bat_pages(lay, list(range(0, 60)), rnd)
    sc = _run(path, monkeypatch, [{"pages": a}, {"pages": b}])
    before_b, _ = sc.windows[1]
    entry = next(i for i in range(before_b, len(sc.ops)) if sc.ops[i][0] == "w")
    buf = bytearray(sc.base)
    for op in sc.ops[:entry]:
        _apply(buf, op)
    _apply(buf, sc.ops[entry], len(sc.ops[entry][2]) // 2)    # half of B's entry reached the disk
    lay2, plan, view = _view(buf)
    assert plan is not None and plan.entry_count == 1
    assert _pages(view, sc.tracked) == sc.states[1]           # A, not a mix with B


def test_header_update_crash_leaves_a_valid_current_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-current slot is corrupt: a torn write of the current slot would leave none."""
    path = _make(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[spec.HEADER1_OFFSET + 100] ^= 0xFF            # slot 1 (seq 1) invalid; slot 2 current
    path.write_bytes(raw)
    rec = Recorder(path)
    rec.install(monkeypatch)
    f = RawFile(str(path), writable=True)
    lay, plan, _ = vlayout.open_layout(f.pread, f.size())
    w = VhdxLog(f, lay)
    w.open_writable(plan)
    old_dwg = w.header.data_write_guid
    w.mark_data_changed()
    new_dwg = w.header.data_write_guid
    w.close()
    f.close()
    monkeypatch.undo()
    n = 0
    for what, cut, data in crash_states(bytes(raw), rec.ops):
        choice = vlayout.choose_header(lambda ln, o: data[o:o + ln])
        assert choice.header.data_write_guid in (old_dwg, new_dwg), what
        n += 1
    assert n > 20
