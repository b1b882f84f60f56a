"""Growing a VDI whose block map has no room before the first data block (``vdi/room.py``).

QEMU (and the independent test writer, with a VirtualBox header) put the first data block right
after the map, so a bigger disk needs that block's space: the first blocks move to the end of
the file and the map takes their place. Checked against a flat shadow, ``qemu-img check`` and
``qemu-img compare`` (QEMU reads VDI), ``vhdfs check``, and every crash state of the writes
(``test_maintain_crash._states``): each opens, with the old or the new size, reading the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.block.maintain import first_nonzero
from vhdfs.cli.create import parse_size
from vhdfs.tools.check import check_image
from vhdfs.tools.create import create_image
from vhdfs.tools.maintain import repair_image, resize_image

from images.writers_vdi import build_vdi, vdi_field
from test_maintain_crash import _apply, _states
from writelog import WriteLog

MiB = 1024 * 1024
QEMU = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="no qemu-img")


def _qemu_io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "vdi"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def _made_by_qemu(tmp: Path, size: int = 5 * MiB, static: bool = False) -> tuple[Path, bytearray]:
    """A QEMU image: blocks allocated in write order (block 0 of the data area is virtual
    block 3), so the block that must move is not virtual block 0."""
    path = tmp / "q.vdi"
    opts = ["-o", "static=on"] if static else []
    subprocess.run([QEMU, "create", "-q", "-f", "vdi", *opts, str(path), str(size)], check=True)
    shadow = bytearray(size)
    writes = [(3 * MiB + 4096, 0x33, 70000), (0, 0x11, 5000), (size - 1024, 0x55, 1024)]
    for off, byte, n in writes:
        _qemu_io(path, f"write -P {byte} {off} {n}")
        shadow[off:off + n] = bytes([byte]) * n
    return path, shadow


def _same(path: Path, prefix: bytes | bytearray, size: int, **kw: object) -> None:
    """The image reads ``prefix``, then zeros up to ``size`` (found without reading them all)."""
    with open_image(path, **kw) as img:
        assert img.size == size
        assert img.read(0, len(prefix)) == bytes(prefix)
        assert first_nonzero(img, len(prefix), size) is None
        bad = [f.finding.text for f in check_image(img) if f.finding.severity is not Severity.NOTE]
        assert bad == [], bad


def _qemu_same(path: Path, prefix: bytes | bytearray, size: int, tmp: Path) -> None:
    info = subprocess.run([QEMU, "info", "-f", "vdi", "--output=json", str(path)],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["virtual-size"] == size
    raw = tmp / "shadow.raw"       # sparse: qemu-img compare skips the holes on both sides
    raw.write_bytes(bytes(prefix))
    os.truncate(raw, size)
    res = subprocess.run([QEMU, "compare", "-f", "vdi", "-F", "raw", str(path), str(raw)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([QEMU, "check", "-f", "vdi", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _no_room(path: Path) -> int:
    return (vdi_field(path, "offset_data") - vdi_field(path, "offset_blocks")) // 4


@needs_qemu
@pytest.mark.parametrize("target,moved", [("2G", 1), ("+1G", 1), ("300G", 2)])
def test_grow_a_qemu_image_past_its_map_room(target: str, moved: int, tmp_path: Path) -> None:
    path, shadow = _made_by_qemu(tmp_path)
    old = len(shadow)
    assert _no_room(path) < 1024
    _old, new, done = resize_image(str(path), target, parse_size)
    assert any(f"moved {moved} data block(s) to the end of the file" in d for d in done), done
    assert vdi_field(path, "offset_blocks") == 0x400 and vdi_field(path, "blocks_allocated") == 3
    assert vdi_field(path, "offset_data") == 0x400 + moved * MiB
    _same(path, shadow, new)
    _qemu_same(path, shadow, new, tmp_path)
    # both writers go on allocating after it: neither reuses a moved or a renumbered block
    shadow.extend(bytes(2 * MiB))
    _qemu_io(path, f"write -P 0x66 {old + MiB} 4096")
    shadow[old + MiB:old + MiB + 4096] = b"\x66" * 4096
    with open_image(path, writable=True) as img:
        img.write(MiB + 100, b"v" * 3000)
        img.write(old + 10, b"w" * 3000)
    shadow[MiB + 100:MiB + 3100] = b"v" * 3000
    shadow[old + 10:old + 3010] = b"w" * 3000
    _same(path, shadow, new)
    _qemu_same(path, shadow, new, tmp_path)


@needs_qemu
def test_grow_an_empty_qemu_image(tmp_path: Path) -> None:
    path = tmp_path / "e.vdi"
    subprocess.run([QEMU, "create", "-q", "-f", "vdi", str(path), "3M"], check=True)
    _old, new, done = resize_image(str(path), "1G", parse_size)
    assert any("moved 0 data block(s)" in d for d in done), done
    assert vdi_field(path, "blocks_allocated") == 0
    _same(path, b"", new)
    _qemu_same(path, b"", new, tmp_path)


@pytest.mark.parametrize("extra", [0, 512])
def test_grow_a_virtualbox_header_image(extra: int, tmp_path: Path) -> None:
    """The test writer's VirtualBox layout (0x190 header, map then data), with block extra
    bytes too: a block's stride, not its size, is what moves."""
    rng = random.Random(extra)
    raw = bytearray(4 * MiB)
    raw[0:MiB] = rng.randbytes(MiB)
    raw[3 * MiB:3 * MiB + 9000] = rng.randbytes(9000)
    info = build_vdi(tmp_path / "vb.vdi", bytes(raw), header_size=0x190, block_extra=extra)
    assert _no_room(info.path) < 512
    _old, new, done = resize_image(str(info.path), "1G", parse_size)
    assert any("moved 1 data block(s)" in d for d in done), done
    _same(info.path, raw, new)
    if extra == 0 and QEMU is not None:
        _qemu_same(info.path, raw, new, tmp_path)


def test_grow_a_differencing_vdi_past_its_map_room(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    create_image(str(base), format="vdi", type="dynamic", size=3 * MiB)
    rng = random.Random(3)
    with open_image(base, writable=True) as img:
        img.write(0, rng.randbytes(3 * MiB))
    create_image(str(child), format="vdi", type="differencing", parent=str(base))
    with open_image(child, writable=True) as img:
        img.write(2 * MiB + 7, b"c" * 9000)      # the child's data block 0 is virtual block 2
        shadow = bytearray(img.read(0, img.size))
    room = _no_room(child)
    _old, new, done = resize_image(str(child), str((room + 1) * MiB), parse_size)
    assert any("moved 1 data block(s)" in d for d in done), done
    _same(child, shadow, new, parent_dirs=[tmp_path])


@needs_qemu
def test_a_static_image_without_room_is_refused_unchanged(tmp_path: Path) -> None:
    path, _shadow = _made_by_qemu(tmp_path, static=True)
    before = path.read_bytes()
    with pytest.raises(errors.UnsupportedError, match="static VDI keeps its blocks in map order"):
        resize_image(str(path), "2G", parse_size)
    assert path.read_bytes() == before
    res = subprocess.run([sys.executable, "-m", "vhdfs", "resize", str(path), "2G"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and "use vhdfs convert" in res.stderr
    assert path.read_bytes() == before
    res = subprocess.run([sys.executable, "-m", "vhdfs", "resize", str(path), "+1M"],
                         capture_output=True, text=True, timeout=60)   # room enough: fine
    assert res.returncode == 0, res.stderr


def _replay(path: Path, run, old: bytes, new_size: int, tmp: Path, monkeypatch: pytest.MonkeyPatch,
            **open_kw: object) -> int:
    """Every crash state of ``run``'s writes to ``path``: old or new size, the same bytes."""
    original = tmp / "original.bin"
    shutil.copyfile(path, original)
    log = WriteLog(str(path))
    log.install(monkeypatch)
    run()
    monkeypatch.undo()
    out_dir = tmp / "replay"
    out_dir.mkdir()
    out = out_dir / path.name
    count = 0
    for what, ops in _states(log.ops):
        shutil.copyfile(original, out)
        _apply(out, ops)
        with open_image(out, **open_kw) as img:
            assert img.size in (len(old), new_size), f"{what}: size {img.size}"
            assert img.read(0, len(old)) == old, f"{what}: content"
            assert first_nonzero(img, len(old), img.size) is None, f"{what}: tail"
            # and no writer could reuse a block in use (an entry at or past blocks_allocated)
            errs = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]
            assert errs == [], f"{what}: {errs}"
        repair_image(str(out), False, lambda s: None)
        with open_image(out, **open_kw) as img:
            errs = [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]
            assert errs == [], f"{what}: {errs}"
        count += 1
    return count


@needs_qemu
def test_every_crash_state_of_a_move_reads_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, shadow = _made_by_qemu(tmp_path)
    n = _replay(path, lambda: resize_image(str(path), "2G", parse_size), bytes(shadow), 2 << 30,
                tmp_path, monkeypatch)
    assert n > 10


def test_every_crash_state_of_a_differencing_move_reads_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    create_image(str(base), format="vdi", type="dynamic", size=2 * MiB)
    with open_image(base, writable=True) as img:
        img.write(0, random.Random(5).randbytes(2 * MiB))
    create_image(str(child), format="vdi", type="differencing", parent=str(base))
    with open_image(child, writable=True) as img:
        img.write(MiB + 5, b"d" * 5000)
        img.write(100, b"e" * 100)
        old = img.read(0, img.size)
    target = (_no_room(child) + 3) * MiB
    n = _replay(child, lambda: resize_image(str(child), str(target), parse_size), old, target,
                tmp_path, monkeypatch, parent_dirs=[tmp_path])
    assert n > 10
