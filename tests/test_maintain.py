"""``vhdfs resize`` and ``vhdfs compact`` for every format and type, against a flat shadow and qemu-img.

Each image is filled with a known pattern through the block layer, then resized or compacted;
afterwards it must read exactly as the shadow (the old bytes, then zeros), ``check`` must find
no error or leak, and qemu-img (which reads vpc and vdi) must report the same size and, for the
sparse types, the same bytes (``qemu-img compare`` against the shadow as a raw file).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.cli.create import parse_size
from vhdfs.tools.check import check_image
from vhdfs.tools.create import create_image
from vhdfs.tools.maintain import compact_image, resize_image

MiB = 1024 * 1024
SIZE = 9 * MiB + 512 * 7          # ends inside a block
KINDS = ["vhd-fixed", "vhd-dynamic", "vdi-dynamic", "vdi-static"]
QEMU = shutil.which("qemu-img")


def _make(kind: str, tmp: Path, size: int = SIZE, writes: list[tuple[int, bytes]] | None = None,
          block_size: int | None = None) -> tuple[Path, bytearray]:
    fmt, typ = kind.split("-")
    path = tmp / f"disk.{fmt}"
    create_image(str(path), format=fmt, type="fixed" if typ in ("fixed", "static") else "dynamic", size=size,
                 block_size=block_size)
    shadow = bytearray(size)
    rng = random.Random(kind)
    if writes is None:
        writes = [(0, rng.randbytes(4096)), (3 * MiB + 1000, rng.randbytes(70000)),
                  (size - 1024, rng.randbytes(1024)), (5 * MiB, bytes(MiB))]
    with open_image(path, writable=True) as img:
        for off, data in writes:
            img.write(off, data)
            shadow[off:off + len(data)] = data
        img.flush()
    return path, shadow


def _same(path: Path, shadow: bytes | bytearray) -> None:
    with open_image(path) as img:
        assert img.size == len(shadow)
        assert img.read(0, img.size) == bytes(shadow)
        bad = [f.finding.text for f in check_image(img) if f.finding.severity is not Severity.NOTE]
        assert bad == [], bad


def _qemu(path: Path, shadow: bytes | bytearray, tmp: Path, compare: bool = True) -> None:
    if QEMU is None:
        return
    fmt = "vpc" if path.suffix == ".vhd" else "vdi"
    info = subprocess.run([QEMU, "info", "-f", fmt, "--output=json", str(path)],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    import json
    vsize = json.loads(info.stdout)["virtual-size"]
    # qemu-img 7.2 counts a fixed VHD's footer as data (its size is the file's)
    fixed_vhd = fmt == "vpc" and path.stat().st_size == len(shadow) + 512
    assert vsize in (len(shadow), len(shadow) + 512 if fixed_vhd else len(shadow)), (vsize, len(shadow))
    if compare and not (fmt == "vpc" and vsize != len(shadow)):
        raw = tmp / "shadow.raw"
        raw.write_bytes(bytes(shadow))
        res = subprocess.run([QEMU, "compare", "-f", fmt, "-F", "raw", str(path), str(raw)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    if fmt == "vdi":
        res = subprocess.run([QEMU, "check", "-f", "vdi", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["+5M", "40M", "+513"])
def test_grow(kind: str, how: str, tmp_path: Path) -> None:
    path, shadow = _make(kind, tmp_path)
    old, new, done = resize_image(str(path), how, parse_size)
    assert old == SIZE and new >= SIZE and done
    want = SIZE + parse_size(how[1:]) if how[0] == "+" else parse_size(how)
    assert new >= want and new - want < 1 * MiB + 512, (new, want, done)
    shadow.extend(bytes(new - SIZE))
    _same(path, shadow)
    _qemu(path, shadow, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_only_zeros(kind: str, tmp_path: Path) -> None:
    path, shadow = _make(kind, tmp_path, writes=[(0, b"a" * 4096), (6 * MiB + 4608, b"b" * 512)])
    with pytest.raises(errors.UsageError) as exc:
        resize_image(str(path), "6M", parse_size)
    assert f"offset {6 * MiB + 4608} holds data" in str(exc.value)
    _same(path, shadow)
    _old, new, _done = resize_image(str(path), str(6 * MiB + 8192), parse_size)
    assert new == 6 * MiB + 8192
    _same(path, shadow[:new])
    _qemu(path, shadow[:new], tmp_path)
    _old, new2, _done = resize_image(str(path), "-3072", parse_size)   # relative, to the data's end
    assert new2 == 6 * MiB + 5120
    _same(path, shadow[:new2])
    _qemu(path, shadow[:new2], tmp_path)


def test_vhd_bat_moved_when_a_block_follows_it(tmp_path: Path) -> None:
    """The first block sits right after the BAT: the grown BAT goes past everything."""
    path, shadow = _make("vhd-dynamic", tmp_path, size=4 * MiB, block_size=65536,
                         writes=[(0, b"x" * 8192), (3 * MiB, b"y" * 512)])
    with open_image(path) as img:
        old_bat = img.header.table_offset
        first_block = min(e for e in img.bat if e != 0xFFFFFFFF) * 512
    assert first_block < old_bat + 4096
    _o, new, done = resize_image(str(path), "40M", parse_size)   # 640 entries reach the first block
    assert any("moved from" in line for line in done), done
    with open_image(path) as img:
        assert img.header.table_offset > first_block
    shadow.extend(bytes(new - len(shadow)))
    _same(path, shadow)
    _qemu(path, shadow, tmp_path)    # QEMU reads a VHD block's data whatever its bitmap says
    _qemu(path, shadow, tmp_path)
    # and the image still takes writes in the new tail
    with open_image(path, writable=True) as img:
        img.write(new - 4096, b"z" * 4096)
        shadow[new - 4096:] = b"z" * 4096
    _same(path, shadow)


def test_vhd_chs_rule_for_a_qemu_image(tmp_path: Path) -> None:
    if QEMU is None:
        pytest.skip("no qemu-img")
    path = tmp_path / "q.vhd"
    subprocess.run([QEMU, "create", "-q", "-f", "vpc", str(path), "20M"], check=True)
    _o, new, done = resize_image(str(path), "50M", parse_size)
    assert any("size rule: CHS" in d for d in done), done
    _same(path, bytes(new))
    _qemu(path, bytes(new), tmp_path)


def test_resize_refused_with_a_child_and_in_use(tmp_path: Path) -> None:
    path, shadow = _make("vhd-dynamic", tmp_path)
    create_image(str(tmp_path / "child.vhd"), format="vhd", type="differencing", parent=str(path))
    with pytest.raises(errors.BusyError) as exc:
        resize_image(str(path), "+1M", parse_size)
    assert "child.vhd" in str(exc.value)
    os.unlink(tmp_path / "child.vhd")
    with open_image(path):           # what a read-only mount holds
        with pytest.raises(errors.BusyError):
            resize_image(str(path), "+1M", parse_size)
        with pytest.raises(errors.BusyError):
            compact_image(str(path), lambda d, t: None)
    _same(path, shadow)


@pytest.mark.parametrize("kind", ["vhd-dynamic", "vdi-dynamic"])
def test_compact(kind: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    writes = [(i * MiB, rng.randbytes(MiB)) for i in range(8)]
    path, shadow = _make(kind, tmp_path, size=8 * MiB, writes=writes)
    with open_image(path, writable=True) as img:   # zero the guest's free space, as zerofree does
        for i in (0, 2, 3, 6):
            img.write(i * MiB, bytes(MiB))
            shadow[i * MiB:(i + 1) * MiB] = bytes(MiB)
    before = path.stat().st_size
    seen: list[tuple[int, int]] = []
    b, after, done = compact_image(str(path), lambda d, t: seen.append((d, t)))
    assert b == before and after < before, (before, after, done)
    assert seen and seen[-1][0] == seen[-1][1]
    _same(path, shadow)
    _qemu(path, shadow, tmp_path)
    with open_image(path) as img:   # VHD blocks are 2 MiB: blocks 0-1 hold data, 2-3 are zeros
        assert img.allocated_blocks() == (3 if kind.startswith("vhd") else 4)
    assert compact_image(str(path), lambda d, t: None)[1] == after   # nothing left to do


def test_compact_differencing_keeps_zeros_over_parent_data(tmp_path: Path) -> None:
    rng = random.Random(3)
    base_data = rng.randbytes(6 * MiB)
    base, shadow = _make("vhd-dynamic", tmp_path, size=6 * MiB, writes=[(0, base_data)])
    child = tmp_path / "child.vhd"
    create_image(str(child), format="vhd", type="differencing", parent=str(base))
    with open_image(child, writable=True) as img:
        img.write(0, bytes(2 * MiB))                       # zeros over data: must stay
        img.write(2 * MiB, base_data[2 * MiB:4 * MiB])     # same as the parent: released
        img.write(4 * MiB, b"q" * 4096)                    # real change: stays
    shadow[0:2 * MiB] = bytes(2 * MiB)
    shadow[4 * MiB:4 * MiB + 4096] = b"q" * 4096
    base_hash = base.read_bytes()
    _b, _a, done = compact_image(str(child), lambda d, t: None)
    assert base.read_bytes() == base_hash
    assert done[0].startswith("released 1 ")
    with open_image(child) as img:
        assert img.read(0, img.size) == bytes(shadow)
        assert [e != 0xFFFFFFFF for e in img.bat] == [True, False, True]
        assert not [f for f in check_image(img) if f.finding.severity is not Severity.NOTE]


def test_vdi_map_without_room(tmp_path: Path) -> None:
    """Dynamic: the first data blocks move to make room (tests/test_vdi_room.py has the rest);
    static (an identity map): refused by name, unchanged."""
    from vhdfs.block.maintain import first_nonzero
    path, shadow = _make("vdi-dynamic", tmp_path)
    _o, new, done = resize_image(str(path), "2G", parse_size)
    assert any("data block(s) to the end of the file" in d for d in done), done
    with open_image(path) as img:
        assert img.size == new and img.read(0, len(shadow)) == bytes(shadow)
        assert first_nonzero(img, len(shadow), new) is None
    os.unlink(path)
    path, shadow = _make("vdi-static", tmp_path)
    with pytest.raises(errors.UnsupportedError) as exc:
        resize_image(str(path), "2G", parse_size)
    assert "room for" in str(exc.value) and "vhdfs convert" in str(exc.value)
    _same(path, shadow)


@pytest.mark.parametrize("kind", ["vhd-dynamic", "vdi-dynamic"])
def test_grow_hides_junk_past_the_old_end(kind: str, tmp_path: Path) -> None:
    """Bytes a writer left past the virtual end inside the last block must not appear."""
    path, shadow = _make(kind, tmp_path)
    with open_image(path) as img:
        last = (img.size - 1) // img.block_size
        if kind.startswith("vhd"):
            at = img.bat[last] * 512 + img.bitmap_bytes + (img.size - last * img.block_size)
        else:
            at = img._data_offset(img.bmap[last]) + (img.size - last * img.block_size)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xee" * 1024)
    _same(path, shadow)     # invisible before
    _o, new, _d = resize_image(str(path), "+1M", parse_size)
    shadow.extend(bytes(new - len(shadow)))
    _same(path, shadow)
    _qemu(path, shadow, tmp_path)    # QEMU reads a VHD block's data whatever its bitmap says


def _corpus_copy(corpus_dir: Path, name: str, tmp: Path) -> Path:
    for p in corpus_dir.iterdir():       # a chain needs its parents beside it
        shutil.copyfile(p, tmp / p.name)
        os.chmod(tmp / p.name, 0o644)
    return tmp / name.removesuffix(".xz")


def _corpus_names() -> list[str]:
    from conftest import corpus_ids
    return corpus_ids()


@pytest.mark.parametrize("name", _corpus_names())
def test_corpus_grow_and_compact(name: str, corpus_dir: Path, tmp_path: Path) -> None:
    """Images of real writers (Windows, mkimg, QEMU, Xen Orchestra chains): same bytes after."""
    path = _corpus_copy(corpus_dir, name, tmp_path)
    with open_image(path) as img:
        before = img.read(0, img.size)
        chained = img.backing is not None
        kind = img.type
    if kind == "dynamic" or kind == "differencing":
        compact_image(str(path), lambda d, t: None)
        _same(path, before)
    if chained:   # a differencing child grows too: its new tail lies past the parent's end
        _o, new, _d = resize_image(str(path), "+1M", parse_size, force=True)
        _same(path, before + bytes(new - len(before)))
        return
    try:   # qemu-img 7.2 sizes some writers' VHDs by CHS (QEMU 10 and vhdfs do not)
        _qemu(path, before, tmp_path, compare=False)
        qemu_agrees = True
    except AssertionError:
        qemu_agrees = False
    _o, new, _d = resize_image(str(path), "+1M", parse_size, force=True)
    _same(path, before + bytes(new - len(before)))
    if qemu_agrees:
        _qemu(path, before + bytes(new - len(before)), tmp_path, compare=kind != "fixed")


def _cli(*args: str) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "vhdfs", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)


def test_cli_resize_compact_repair(tmp_path: Path) -> None:
    path, shadow = _make("vhd-dynamic", tmp_path)
    res = _cli("resize", str(path), "+2M")
    assert res.returncode == 0 and "size rule: current_size" in res.stdout, res.stdout + res.stderr
    res = _cli("resize", str(path), "1M")
    assert res.returncode == 2 and f"offset {3 * MiB + 1000} holds data" in res.stderr, res.stderr
    res = _cli("compact", str(path))     # stderr is no terminal: no progress bar
    assert res.returncode == 0 and res.stderr == "" and "released" in res.stdout, res.stdout + res.stderr
    with open(path, "r+b") as f:         # damage the head footer copy
        f.seek(100)
        f.write(b"\x01")
    before = path.read_bytes()
    res = _cli("check", "--repair", "--dry-run", str(path))
    assert res.returncode == 0 and "would change: footer copy at offset 0" in res.stdout, res.stdout
    assert path.read_bytes() == before
    res = _cli("check", "--repair", str(path))
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and "changing: footer copy at offset 0" in lines[0], res.stdout
    assert "no problems found" in lines[-1], res.stdout
    shadow.extend(bytes(2 * MiB))
    _same(path, shadow)


def test_mounted_image_refused_by_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from vhdfs.cli.maintain import refuse_if_mounted
    from vhdfs.service import state
    path, _shadow = _make("vdi-dynamic", tmp_path)
    monkeypatch.setattr(state, "state_dir", lambda: str(tmp_path))
    refuse_if_mounted(str(path))     # no record: fine
    (tmp_path / "x.json").write_text(json.dumps({"pid": os.getpid(), "mountpoint": "/mnt/x",
                                                 "images": [str(path)]}))
    with pytest.raises(errors.BusyError) as exc:
        refuse_if_mounted(str(path))
    assert "/mnt/x" in str(exc.value)
