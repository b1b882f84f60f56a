"""Power cut during VHDX ``resize`` and ``compact``: every crash state reads the same.

As ``test_maintain_crash`` does for VHD and VDI: the writes of one operation are recorded
(``writelog.WriteLog``), cut into sync epochs, and every state -- the epochs before the cut plus
any subset (small epochs) or prefix/single write (larger ones) of the cut epoch -- is rebuilt
from the original file. Each must open (a dirty log is replayed in memory), have the old or the
new size and read the old content (then zeros); after ``check --repair`` (the log replayed on
disk) ``check`` finds no error; after an interrupted compact a second compact reads the same
and ends at the same file size. A parent's bytes never change.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.cli.create import parse_size
from vhdfs.tools.check import check_image
from vhdfs.tools.maintain import compact_image, repair_image, resize_image

from test_maintain_crash import _apply, _states
from test_vhdx_maintain import BIG, SIZE, make, tail_is_zero
from writelog import WriteLog

MiB = 1024 * 1024


def _content_ok(path: Path, sizes: tuple[int, int], shadow: bytes, what: str) -> None:
    with open_image(path) as img:
        assert img.size in sizes, f"{what}: size {img.size}"
        n = min(img.size, len(shadow))
        assert img.read(0, n) == shadow[:n], f"{what}: content changed"
        assert tail_is_zero(img, n), f"{what}: the tail is not zeros"


@pytest.mark.parametrize(
    "kind,op,sector",
    [
        ("dynamic", "+5M", 512),
        ("dynamic", BIG, 512),  # the BAT region moves and both region tables change
        ("dynamic", "shrink", 512),
        ("fixed", "+5M", 512),
        ("fixed", "+5M", 4096),
        ("fixed", "shrink", 512),  # entries cleared, then the file cut
        ("dynamic", "compact", 512),
        ("dynamic", "compact", 4096),
        ("differencing", "compact", 512),
        ("differencing", "+5M", 512),  # past the parent's end: the new tail reads zeros
        ("differencing", "shrink", 4096),  # the last chunk's sector-bitmap entry must stay
        ("dynamic", "compact-after-grow", 512),  # blocks packed, then the BAT region moved down
    ],
)
def test_every_crash_state_reads_the_same(
    kind: str, op: str, sector: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, shadow, parent = make(kind, tmp_path, sector)
    if op == "shrink":  # grow first (not recorded), then cut the zeros away again
        resize_image(str(path), "+3M", parse_size)
    if op == "compact-after-grow":  # the BAT region at the end of the file, past the blocks
        resize_image(str(path), BIG, parse_size)
        resize_image(str(path), str(SIZE), parse_size)
    parent_bytes = parent.read_bytes() if parent else None
    original = tmp_path / "original"
    shutil.copyfile(path, original)
    with open_image(path) as img:
        old = img.size
    log = WriteLog(str(path))
    log.install(monkeypatch)
    if op.startswith("compact"):
        compact_image(str(path), lambda d, t: None)
    else:
        resize_image(str(path), str(SIZE) if op == "shrink" else op, parse_size)
    monkeypatch.undo()
    with open_image(path) as img:
        new = img.size
    final_file = path.stat().st_size
    assert log.ops, "the operation wrote nothing"
    want = bytes(shadow)
    out = tmp_path / f"replay-{path.name}"  # beside the parent: its relative path finds it
    count = 0
    for what, ops in _states(log.ops):
        shutil.copyfile(original, out)
        _apply(out, ops)
        count += 1
        _content_ok(out, (old, new), want, what)
        repair_image(str(out), False, lambda s: None)
        with open_image(out) as img:
            errs = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]
            assert errs == [], f"{what}: {errs} left after repair"
        _content_ok(out, (old, new), want, what + " (repaired)")
        if op.startswith("compact"):
            compact_image(str(out), lambda d, t: None)
            assert out.stat().st_size == final_file, f"{what}: a second compact did not finish"
            _content_ok(out, (old,), want, what + " (compacted again)")
    assert count > 3
    if parent is not None:
        assert parent.read_bytes() == parent_bytes, "a parent changed"
