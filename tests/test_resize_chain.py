"""Differencing images of another size than their parent: resize, read, write, commit.

Hyper-V resizes a differencing disk (Resize-VHD) and QEMU reads an overlay over a shorter
backing file; vhdfs does both: past the parent's end a child reads zeros, a larger parent
counts only up to the child's end. Every result is compared with a flat shadow computed here.
QEMU is an oracle only where it is right: its vpc driver ignores a differencing VHD's parent and
bitmap (unallocated reads as zeros), so it is asked for the virtual size and for the bytes the
child itself wrote (and the grown tail, which lies past the parent anyway); a committed parent
(an ordinary dynamic VHD or VDI) it reads whole. Crash states come from ``tests/writelog.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.block.image import Image
from vhdfs.block.maintain import first_nonzero
from vhdfs.cli.create import parse_size
from vhdfs.tools.check import check_image
from vhdfs.tools.commit import commit
from vhdfs.tools.create import create_image
from vhdfs.tools.maintain import repair_image, resize_image

from images import vhdx_writer as vw
from mounting import mounted
from test_maintain_crash import _apply, _states
from writelog import WriteLog

MiB = 1024 * 1024
SIZE = 3 * MiB + 3584            # the old end inside a block
QEMU = shutil.which("qemu-img")
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdfs", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def _chain(tmp: Path, fmt: str, size: int = SIZE) -> tuple[Path, Path, bytearray, list[tuple[int, int]]]:
    """base (random bytes everywhere) <- child (a few writes); the child's shadow and writes."""
    base, child = tmp / f"base.{fmt}", tmp / f"child.{fmt}"
    rng = random.Random(fmt)
    create_image(str(base), format=fmt, type="dynamic", size=size)
    with open_image(base, writable=True) as img:
        img.write(0, rng.randbytes(size))
    create_image(str(child), format=fmt, type="differencing", parent=str(base))
    written = [(5000, 3000), (MiB + 77, 20000), (size - 1000, 1000)]
    with open_image(child, writable=True) as img:
        for off, n in written:
            img.write(off, rng.randbytes(n))
        shadow = bytearray(img.read(0, img.size))
    return base, child, shadow, written


def _reads(img: Image, shadow: bytes | bytearray, size: int, what: str = "") -> None:
    assert img.size == size, what
    assert img.read(0, len(shadow)) == bytes(shadow), what
    assert first_nonzero(img, len(shadow), size) is None, what


def _same(path: Path, shadow: bytes | bytearray, size: int | None = None, **kw: object) -> None:
    """Reads ``shadow`` then zeros to ``size``; ``check`` finds nothing but notes."""
    size = len(shadow) if size is None else size
    with open_image(path, **kw) as img:
        _reads(img, shadow, size)
        bad = [f.finding.text for f in check_image(img) if f.finding.severity is not Severity.NOTE]
        assert bad == [], bad


def _qemu_size(path: Path) -> int:
    fmt = {".vhd": "vpc", ".vdi": "vdi"}[path.suffix]
    out = subprocess.run([QEMU, "info", "-f", fmt, "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["virtual-size"]


def _qemu_raw(path: Path, tmp: Path) -> bytes:
    fmt = {".vhd": "vpc", ".vdi": "vdi"}[path.suffix]
    raw = tmp / "qemu.raw"
    subprocess.run([QEMU, "convert", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


# -- resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
@pytest.mark.parametrize("how", ["+5M", "+513", "40M"])
def test_grow_a_child_over_its_parent(fmt: str, how: str, tmp_path: Path) -> None:
    base, child, shadow, written = _chain(tmp_path, fmt)
    base_bytes = base.read_bytes()
    old, new, done = resize_image(str(child), how, parse_size)
    assert old == SIZE and new > SIZE and done
    _same(child, shadow, new)
    assert base.read_bytes() == base_bytes
    with open_image(child) as img:
        notes = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.NOTE]
    assert any(f"is {SIZE} bytes, the child {new}: reads as zeros past its end" in n for n in notes), notes
    # writes into the tail: whole blocks, a partial sector just past the parent's end
    tail = [(SIZE + 100, b"t" * 10), (new - 4096, b"u" * 4096)]
    with open_image(child, writable=True) as img:
        for off, data in tail:
            img.write(off, data)
    full = bytearray(shadow) + bytearray(new - SIZE)
    for off, data in tail:
        full[off:off + len(data)] = data
    _same(child, full)
    if QEMU is not None and fmt == "vhd":    # qemu's vpc: right about the size and own bytes
        assert _qemu_size(child) == new
        theirs = _qemu_raw(child, tmp_path)
        for off, n in [*written, (SIZE, new - SIZE)]:
            assert theirs[off:off + n] == full[off:off + n], off


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_compact_releases_zeros_written_past_a_smaller_parent(fmt: str, tmp_path: Path) -> None:
    """What the child would read without its block, past the parent's end, is zeros."""
    _base, child, shadow, _w = _chain(tmp_path, fmt)
    _o, new, _d = resize_image(str(child), "+4M", parse_size)
    with open_image(child, writable=True) as img:
        img.write(new - MiB + 512, bytes(1000))   # allocates a block that reads as zeros
        before = img.allocated_bytes()
    res = _cli("compact", str(child))
    assert res.returncode == 0, res.stderr
    with open_image(child, parent_dirs=[tmp_path]) as img:
        assert img.allocated_bytes() < before
    _same(child, shadow, new, parent_dirs=[tmp_path])


def test_a_grown_child_through_a_fuse_mount(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    _base, child, shadow, _w = _chain(tmp_path, "vhd")
    _o, new, _d = resize_image(str(child), "+2M", parse_size)
    full = bytes(shadow) + bytes(new - SIZE)
    with mounted([child], tmp_path / "mnt", "-w") as m:
        f = m.file("child.raw")
        assert f.stat().st_size == new and f.read_bytes() == full
        with open(f, "r+b") as fh:
            fh.seek(SIZE + 512 * 3 + 7)
            fh.write(b"fuse")
        m.unmount()
    at = SIZE + 512 * 3 + 7
    _same(child, full[:at] + b"fuse" + full[at + 4:])


def test_shrink_then_grow_over_a_parent_with_data_is_refused(tmp_path: Path) -> None:
    base, child, shadow, _w = _chain(tmp_path, "vhd")
    with open_image(child, writable=True) as img:    # zeros over the parent's last MiB
        img.write(SIZE - MiB, bytes(MiB))
    _o, new, _d = resize_image(str(child), str(SIZE - MiB), parse_size)
    assert new == SIZE - MiB
    _same(child, shadow[:new])                       # the larger parent: its prefix only
    before = child.read_bytes()
    with pytest.raises(errors.UsageError, match=r"holds data at offset \d+, past this child's end"):
        resize_image(str(child), "+1M", parse_size)
    assert child.read_bytes() == before
    res = _cli("resize", str(child), "+1M")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and child.read_bytes() == before
    # a parent that is zero there: the child grows into it
    with open_image(base, writable=True) as img:
        img.discard(new, SIZE - new)
    _o, grown, _d = resize_image(str(child), str(SIZE), parse_size)
    _same(child, shadow[:new], grown)


def test_cli_resize_of_a_child(tmp_path: Path) -> None:
    _base, child, shadow, _w = _chain(tmp_path, "vdi")
    res = _cli("resize", str(child), "+3M")
    assert res.returncode == 0, res.stderr
    _same(child, shadow, SIZE + 3 * MiB, parent_dirs=[tmp_path])
    res = _cli("check", "--verbose", str(child))
    assert res.returncode == 0 and "reads as zeros past its end" in res.stdout, res.stdout + res.stderr


def test_a_vhdx_child_over_a_smaller_and_a_larger_parent(tmp_path: Path) -> None:
    """The clip is the chain's, not a driver's: a VHDX child reads the same rule."""
    g_base = uuid.UUID(int=0xB2)
    for parent_size, child_size in ((4 * MiB, 8 * MiB), (8 * MiB, 4 * MiB)):
        raw = bytes(random.Random(parent_size).randbytes(parent_size))
        base = vw.build_vhdx(parent_size, block_size=MiB,
                             blocks={b: raw[b * MiB:(b + 1) * MiB] for b in range(parent_size // MiB)})
        base.set_headers(data_write_guid=g_base)
        (tmp_path / "base.vhdx").write_bytes(base.data)
        child = vw.build_vhdx(child_size, block_size=MiB, kind="differencing",
                              parent_locator={"parent_linkage": f"{{{g_base}}}",
                                              "relative_path": "base.vhdx"})
        path = tmp_path / "child.avhdx"
        path.write_bytes(child.data)
        n = min(parent_size, child_size)
        _same(path, raw[:n], child_size)
        with open_image(path, writable=True) as img:    # a partial block past the parent's end
            img.write(child_size - 1000, b"x" * 10)
        full = bytearray(raw[:n] + bytes(child_size - n))
        full[child_size - 1000:child_size - 990] = b"x" * 10
        _same(path, full)


# -- commit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_commit_of_a_grown_child_grows_the_parent_first(fmt: str, tmp_path: Path) -> None:
    base, child, shadow, _w = _chain(tmp_path, fmt)
    _o, new, _d = resize_image(str(child), "+4M", parse_size)
    with open_image(child, writable=True) as img:
        img.write(new - 5000, b"g" * 5000)
    full = bytes(shadow) + bytes(new - SIZE - 5000) + b"g" * 5000
    res = _cli("commit", str(child))
    assert res.returncode == 0 and "grew" in res.stdout, res.stdout + res.stderr
    _same(base, full)
    _same(child, full, parent_dirs=[tmp_path])            # the child still reads the same over it
    if QEMU is not None:                                  # the parent is a plain dynamic image
        assert _qemu_size(base) == new and _qemu_raw(base, tmp_path) == full


def test_commit_of_a_shrunk_child(tmp_path: Path) -> None:
    base, child, shadow, _w = _chain(tmp_path, "vhd")
    with open_image(child, writable=True) as img:
        img.write(SIZE - MiB, bytes(MiB))
    cut = SIZE - MiB
    resize_image(str(child), str(cut), parse_size)
    before = base.read_bytes()
    with pytest.raises(errors.ChainError, match=r"holds data at offset .* past the child's end"):
        commit(child)
    assert base.read_bytes() == before
    res = _cli("commit", str(child))
    assert res.returncode != 0 and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert base.read_bytes() == before
    with open_image(base, writable=True) as img:           # nothing there any more: accepted
        img.discard(cut, SIZE - cut)
    commit(child)
    _same(base, shadow[:cut], SIZE)                        # the parent keeps its size, zeros past


# -- crash states ---------------------------------------------------------------------------


def _record(path: Path, run, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    original = path.with_name(path.name + ".orig")
    shutil.copyfile(path, original)
    log = WriteLog(str(path))
    log.install(monkeypatch)
    run()
    monkeypatch.undo()
    assert log.ops
    return original, log.ops


@pytest.mark.parametrize("fmt,how", [("vhd", "+40M"), ("vhd", "+1M"), ("vdi", "+2M"),
                                     ("vhd", "-1118208"), ("vdi", "-1118208")])
def test_every_crash_state_of_a_child_resize(fmt: str, how: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, child, shadow, _w = _chain(tmp_path, fmt)
    if how[0] == "-":     # a shrink cuts only zeros: the child hides the parent's tail
        cut = int(how[1:])
        with open_image(child, writable=True) as img:
            img.write(SIZE - cut, bytes(cut))
        shadow[SIZE - cut:] = bytes(cut)
    base_bytes = base.read_bytes()
    original, ops = _record(child, lambda: resize_image(str(child), how, parse_size), monkeypatch)
    with open_image(child) as img:
        new = img.size
    out = tmp_path / "replay" / child.name
    out.parent.mkdir()
    count = 0
    for what, state in _states(ops):
        shutil.copyfile(original, out)
        _apply(out, state)
        with open_image(out, parent_dirs=[tmp_path]) as img:
            assert img.size in (SIZE, new), f"{what}: size {img.size}"
            assert img.read(0, SIZE) == bytes(shadow[:img.size]), f"{what}: content"
            assert first_nonzero(img, SIZE, img.size) is None, f"{what}: tail"
        repair_image(str(out), False, lambda s: None)
        with open_image(out, parent_dirs=[tmp_path]) as img:
            errs = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]
            assert errs == [], f"{what}: {errs}"
        count += 1
    assert count > 3 and base.read_bytes() == base_bytes


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_every_crash_state_of_a_growing_commit(fmt: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's writes (its growth, then the merge): at every cut the child still reads as
    before over it; after a cut in the growth (repaired, as after any interrupted resize),
    running the commit again finishes it. (A cut in the merge of a VHD can leave a block's
    sectors past the footer, which a writable open refuses and repair leaves alone: the
    writer's own crash window, not the growth's, so those cuts are only read.)"""
    from vhdfs.tools import commit as commit_mod

    base, child, shadow, _w = _chain(tmp_path, fmt)
    _o, new, _d = resize_image(str(child), "+2M", parse_size)
    with open_image(child, writable=True) as img:
        img.write(new - 700, b"k" * 700)
    full = bytes(shadow) + bytes(new - SIZE - 700) + b"k" * 700
    child_bytes = child.read_bytes()
    original = tmp_path / "base.orig"
    shutil.copyfile(base, original)
    log = WriteLog(str(base))
    log.install(monkeypatch)
    grown_at: list[int] = []
    real_grow = commit_mod.grow_open

    def grow(img: Image, target: int) -> list[str]:
        done = real_grow(img, target)
        grown_at.append(sum(1 for op in log.ops if op[0] == "s"))   # the epochs it took
        return done

    monkeypatch.setattr(commit_mod, "grow_open", grow)
    commit(child)
    monkeypatch.undo()
    assert grown_at and log.ops
    states = list(_states(log.ops))
    for n, (what, state) in enumerate(states):
        shutil.copyfile(original, base)
        _apply(base, state)
        with open_image(child) as img:
            _reads(img, full, new, what)
        if int(what.split()[1].rstrip(",")) <= grown_at[0] or n == len(states) - 1:
            repair_image(str(base), False, lambda s: None)
            commit(child)
            _same(base, full)
        assert child.read_bytes() == child_bytes, what
