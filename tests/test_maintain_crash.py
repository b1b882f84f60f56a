"""Power cut during ``resize`` and ``compact``: every write log prefix, and every reordering the
disk may do between two syncs, leaves an image that reads the same.

The writes each operation issues are recorded (``test_crash_replay.WriteLog``). The log is cut
into sync epochs; a crash state is every epoch before the cut applied, plus any subset of the
cut epoch's writes (all subsets for small epochs, prefixes and singles for larger ones). Each
state must open, have the old or the new size, and read exactly the old content (then zeros).
After ``check --repair`` no error is left; after an interrupted compact a second compact ends
at the same file size. A parent's bytes never change.

The one documented window: shrinking a *fixed* VHD writes the new footer into the sector being
cut away before the truncate, so the old-size state may show it there (it had to read as zeros).
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import pytest

try:                                   # the recorder is moving to tests/writelog.py
    from writelog import WriteLog
except ImportError:
    from test_crash_replay import WriteLog

from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.cli.create import parse_size
from vhdfs.tools.check import check_image
from vhdfs.tools.create import create_image
from vhdfs.tools.maintain import compact_image, repair_image, resize_image

MiB = 1024 * 1024
SIZE = 3 * MiB + 3584


def _epochs(ops: list[tuple[str, int, bytes]]) -> list[list[tuple[str, int, bytes]]]:
    out: list[list[tuple[str, int, bytes]]] = [[]]
    for op in ops:
        if op[0] == "s":
            out.append([])
        else:
            out[-1].append(op)
    return out


def _apply(path: Path, ops) -> None:
    with open(path, "r+b") as f:
        for kind, offset, data in ops:
            if kind == "w":
                f.seek(offset)
                f.write(data)
            elif kind == "t":
                f.truncate(offset)


def _states(ops):
    """Every crash state: (description, ops to apply)."""
    epochs = _epochs(ops)
    done: list = []
    for n, epoch in enumerate(epochs):
        if len(epoch) <= 3:
            subsets = [list(c) for k in range(len(epoch) + 1) for c in itertools.combinations(epoch, k)]
        else:
            subsets = [epoch[:k] for k in range(len(epoch) + 1)] + [[op] for op in epoch]
        for sub in subsets:
            yield f"epoch {n}, {len(sub)}/{len(epoch)} writes", done + sub
        done = done + epoch


def _make(kind: str, tmp: Path) -> tuple[Path, bytearray, list[Path]]:
    fmt, typ = kind.split("-")
    rng = random.Random(kind)
    parents: list[Path] = []
    bs = 65536 if kind == "vhd-dynamic" else None
    if typ == "differencing":
        base = tmp / "base.vhd"
        create_image(str(base), format="vhd", type="dynamic", size=SIZE)
        with open_image(base, writable=True) as img:
            img.write(0, rng.randbytes(SIZE))
        parents = [base]
    path = tmp / f"disk.{fmt}"
    create_image(str(path), format=fmt, type="fixed" if typ in ("fixed", "static") else
                 ("differencing" if parents else "dynamic"), size=SIZE, block_size=bs,
                 parent=str(parents[0]) if parents else None)
    with open_image(path, writable=True) as img:
        # released blocks are allocated first, so the blocks after them must move down
        if parents:
            with open_image(parents[0]) as base:                  # the parent's bytes: released
                img.write(2 * MiB + 65536, base.read(2 * MiB + 65536, 8192))
            img.write(5000, rng.randbytes(1500))
            img.write(512 * 1024, bytes(200_000))                 # zeros over parent data: stay
        else:
            if typ != "static":
                img.write(MiB, rng.randbytes(MiB))
            for off in (0, 2 * MiB + 5000, 3 * MiB - 70000):
                img.write(off, rng.randbytes(1500))
            if typ != "static":
                img.write(MiB, bytes(MiB))                        # zeros: compact releases them
        img.flush()
        shadow = bytearray(img.read(0, img.size))
    return path, shadow, parents


def _run(kind: str, op: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, shadow, parents = _make(kind, tmp)
    parent_bytes = [p.read_bytes() for p in parents]
    original = tmp / "original"
    shutil.copyfile(path, original)
    log = WriteLog(str(path))
    log.install(monkeypatch)
    if op == "compact":
        compact_image(str(path), lambda d, t: None)
        new_size = len(shadow)
    else:
        resize_image(str(path), op, parse_size)
        with open_image(path) as img:
            new_size = img.size
    monkeypatch.undo()
    final_file = path.stat().st_size
    assert log.ops, "the operation wrote nothing"
    old, new = bytes(shadow), bytes(shadow[:new_size]) + bytes(max(0, new_size - len(shadow)))
    out_dir = tmp / "replay"
    out_dir.mkdir()
    out = out_dir / path.name
    fixed_shrink = kind == "vhd-fixed" and new_size < len(shadow)
    count = 0
    for what, ops in _states(log.ops):
        shutil.copyfile(original, out)
        _apply(out, ops)
        count += 1
        with open_image(out) as img:
            size = img.size
            assert size in (len(old), len(new)), f"{what}: size {size}"
            data = img.read(0, size)
        want = old if size == len(old) else new
        if fixed_shrink and size == len(old) and data != want:
            a = new_size
            assert data[:a] == want[:a] and data[a + 512:] == want[a + 512:], f"{what}: content changed"
        else:
            assert data == want, f"{what}: content changed"
        repair_image(str(out), False, lambda s: None)
        with open_image(out) as img:
            errs = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]
            assert errs == [], f"{what}: {errs} left after repair"
            if not fixed_shrink:
                assert img.read(0, img.size) == want, f"{what}: repair changed the content"
        if op == "compact":
            compact_image(str(out), lambda d, t: None)
            assert out.stat().st_size == final_file, f"{what}: a second compact did not finish"
            with open_image(out) as img:
                assert img.read(0, img.size) == old
    assert count > 3
    assert [p.read_bytes() for p in parents] == parent_bytes, "a parent changed"


@pytest.mark.parametrize("kind,op", [
    ("vhd-fixed", "+1M"), ("vhd-fixed", "-69632"),
    ("vhd-dynamic", "+40M"), ("vhd-dynamic", "+1M"), ("vhd-dynamic", "-69632"),
    ("vdi-dynamic", "+2M"), ("vdi-dynamic", "-69632"), ("vdi-static", "+2M"),
    ("vhd-dynamic", "compact"), ("vhd-differencing", "compact"), ("vdi-dynamic", "compact"),
])
def test_every_crash_state_reads_the_same(kind: str, op: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _run(kind, op, tmp_path, monkeypatch)
