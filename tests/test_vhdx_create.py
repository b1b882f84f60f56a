"""VHDX files made by ``vhdx/create.py``: they parse back, and three independent readers agree.

Oracles: qemu-img 7.2 (fixed and dynamic with 512-byte sectors, the only ones it opens:
``info``, ``check``, ``compare`` against a raw shadow), dissect.hypervisor and libvhdi-python
(every kind, differencing and 4K included, read whole and compared with the shadow). Each
image first gets data written by the tiny writer below (test-local on purpose: it shares only
the pure ``spec``/``layout`` layer with vhdfs, not the image driver), so the oracles compare
real content: FULLY_PRESENT blocks in all kinds, and in differencing files PARTIALLY_PRESENT
blocks with a sector bitmap over a parent holding its own data. Bitmap runs are whole bytes
(4 KiB at 512-byte sectors, 32 KiB at 4096) because dissect drops sectors of runs that start
and end inside one byte (FORMATS-VHDX.md) -- a peer bug, not something to test here.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from vhdfs.block.driver import CreateSpec
from vhdfs.block.rawfile import RawFile
from vhdfs.errors import UsageError
from vhdfs.formats.vhdx import create as vcreate
from vhdfs.formats.vhdx import layout as vlayout
from vhdfs.formats.vhdx import spec

MiB = spec.MiB
SIZE = 20 * MiB + 3 * 4096          # a last block partly past the disk's end
KINDS = ("fixed", "dynamic", "differencing")

try:
    import pyvhdi
except ImportError as exc:          # pragma: no cover - the test extra installs it
    pyvhdi = None
    PYVHDI_WHY = f"libvhdi-python not importable ({exc}); install the test extra"
try:
    from dissect.hypervisor.disk.vhdx import VHDX as DissectVHDX
except ImportError as exc:          # pragma: no cover
    DissectVHDX = None
    DISSECT_WHY = f"dissect.hypervisor not importable ({exc}); install the test extra"
QEMU_IMG = shutil.which("qemu-img")


def open_layout(path: Path) -> vlayout.VhdxLayout:
    f = RawFile(str(path))
    try:
        lay, plan, _ = vlayout.open_layout(f.pread, f.size())
        assert plan is None
        return lay
    finally:
        f.close()


# --- a tiny writer: allocate blocks straight into a clean file (no log needed at creation) --
class TinyWriter:
    def __init__(self, path: Path, base: bytes | None = None) -> None:
        self.path = path
        self.lay = open_layout(path)
        self.shadow = bytearray(base if base is not None else bytes(self.lay.virtual_size))

    def _entry(self, index: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.lay.bat_offset + 8 * index)
            return struct.unpack("<Q", f.read(8))[0]

    def _set_entry(self, index: int, value: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.lay.bat_offset + 8 * index)
            f.write(struct.pack("<Q", value))

    def _new_space(self, length: int) -> int:
        size = os.path.getsize(self.path)
        off = -(-size // MiB) * MiB
        os.truncate(self.path, off + length)
        return off

    def write_block(self, block: int, data: bytes) -> None:
        """Whole-block data: FULLY_PRESENT (fixed: in place at its existing offset)."""
        bs = self.lay.block_size
        data = data.ljust(bs, b"\0")[:bs]
        index = self.lay.geometry.payload_index(block)
        entry = self._entry(index)
        if spec.bat_state(entry) == spec.PAYLOAD_FULLY_PRESENT:
            off = spec.bat_offset(entry)
        else:
            off = self._new_space(bs)
            self._set_entry(index, spec.pack_bat_entry(spec.PAYLOAD_FULLY_PRESENT, off))
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)
        start = block * bs
        assert start < self.lay.virtual_size
        n = min(bs, self.lay.virtual_size - start)
        self.shadow[start:start + n] = data[:n]

    def write_partial(self, block: int, runs: list[tuple[int, int]], rnd: random.Random) -> None:
        """Differencing: sectors [s, s+n) of ``block`` from this file, the rest from the parent."""
        lay = self.lay
        bs, ss, ratio = lay.block_size, lay.logical_sector_size, lay.chunk_ratio
        data = rnd.randbytes(bs)
        off = self._new_space(bs)
        chunk = block // ratio
        sb_index = lay.geometry.bitmap_index(chunk)
        sb = self._entry(sb_index)
        if spec.bat_state(sb) != spec.SB_PRESENT:
            sb_off = self._new_space(spec.BITMAP_BLOCK_SIZE)
            self._set_entry(sb_index, spec.pack_bat_entry(spec.SB_PRESENT, sb_off))
        else:
            sb_off = spec.bat_offset(sb)
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)
            f.seek(sb_off)
            bitmap = bytearray(f.read(spec.BITMAP_BLOCK_SIZE))
            first = (block % ratio) * (bs // ss)
            for s, n in runs:
                for sector in range(s, s + n):
                    bit = first + sector
                    bitmap[bit // 8] |= 1 << (bit % 8)      # LSB-first
                    pos = block * bs + sector * ss
                    if pos < lay.virtual_size:
                        self.shadow[pos:pos + ss] = data[sector * ss:(sector + 1) * ss]
            f.seek(sb_off)
            f.write(bitmap)
        self._set_entry(lay.geometry.payload_index(block),
                        spec.pack_bat_entry(spec.PAYLOAD_PARTIALLY_PRESENT, off))


def _fill(w: TinyWriter, rnd: random.Random) -> None:
    blocks = w.lay.geometry.payload_blocks
    for b in sorted({0, blocks - 1, blocks // 2}):
        w.write_block(b, rnd.randbytes(w.lay.block_size))


def _make(tmp: Path, kind: str, sector: int, block_size: int, *, sub: bool = False,
          seed: int = 1) -> tuple[Path, bytes, Path | None]:
    """An image of ``kind`` with data, its expected raw content, and its parent if any."""
    rnd = random.Random(seed)
    if kind != "differencing":
        path = tmp / f"{kind}.vhdx"
        vcreate.create_vhdx(path, SIZE, kind, block_size=block_size, sector_size=sector)
        w = TinyWriter(path)
        _fill(w, rnd)
        return path, bytes(w.shadow), None
    parent = tmp / "base.vhdx"
    vcreate.create_vhdx(parent, SIZE, "dynamic", block_size=block_size, sector_size=sector)
    pw = TinyWriter(parent)
    _fill(pw, rnd)
    folder = tmp / "child" if sub else tmp
    folder.mkdir(exist_ok=True)
    path = folder / "child.avhdx"
    vcreate.create_vhdx(path, type="differencing", parent=parent, block_size=block_size)
    w = TinyWriter(path, pw.shadow)
    lay = w.lay
    blocks = lay.geometry.payload_blocks
    per_byte = 8                                       # sectors per bitmap byte
    last = (SIZE - (blocks - 1) * lay.block_size) // lay.logical_sector_size  # in the disk
    if blocks == 1:                                    # one block: partial runs only
        w.write_partial(0, [(0, per_byte), (3 * per_byte, 2 * per_byte),
                            (last - 2 * per_byte, per_byte)], rnd)
    else:
        w.write_block(1, rnd.randbytes(lay.block_size))
        w.write_partial(0, [(0, per_byte), (3 * per_byte, 2 * per_byte)], rnd)
        w.write_partial(blocks - 1, [(last // 2 // per_byte * per_byte, per_byte)], rnd)
    return path, bytes(w.shadow), parent


# --- structure ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("block_size", [1 * MiB, 2 * MiB, 32 * MiB])
def test_every_kind_parses_back(tmp_path: Path, kind: str, sector: int, block_size: int) -> None:
    path, _, parent = _make(tmp_path, kind, sector, block_size)
    lay = open_layout(path)
    assert lay.creator == vcreate.CREATOR
    assert lay.virtual_size == SIZE and lay.block_size == block_size
    assert lay.logical_sector_size == sector and lay.physical_sector_size == 4096
    assert lay.header.log_guid == spec.NULL_GUID
    assert (lay.header.log_offset, lay.header.log_length) == (1 * MiB, 1 * MiB)
    assert lay.header_sequences == (1, 2) and lay.region_table_slot == 1
    assert lay.findings == []
    assert lay.page83 != spec.NULL_GUID
    assert lay.leave_block_allocated == (kind == "fixed")
    assert lay.has_parent == (kind == "differencing")
    assert lay.bat_length % MiB == 0 and lay.bat_length >= lay.geometry.entry_count * 8
    raw = path.read_bytes()
    assert raw[spec.REGION_TABLE1_OFFSET:spec.REGION_TABLE1_OFFSET + spec.REGION_TABLE_SIZE] == \
        raw[spec.REGION_TABLE2_OFFSET:spec.REGION_TABLE2_OFFSET + spec.REGION_TABLE_SIZE]
    spans = sorted([(lay.header.log_offset, lay.header.log_length)] +
                   [(r.file_offset, r.length) for r in lay.regions])
    assert all(o % MiB == 0 and n % MiB == 0 for o, n in spans)
    if kind == "differencing":
        pl = open_layout(parent)
        loc = lay.parent_locator
        assert loc["parent_linkage"] == "{" + str(pl.header.data_write_guid) + "}"
        assert uuid.UUID(loc["parent_linkage2"]) == spec.NULL_GUID
        assert loc["relative_path"] == ".\\base.vhdx"
        assert loc["absolute_win32_path"] == str(parent).replace("/", "\\")


@pytest.mark.parametrize("sector", [512, 4096])
def test_fixed_bat_is_contiguous_and_dynamic_bat_empty(tmp_path: Path, sector: int) -> None:
    vcreate.create_vhdx(tmp_path / "f.vhdx", 9 * MiB, "fixed", block_size=1 * MiB, sector_size=sector)
    vcreate.create_vhdx(tmp_path / "d.vhdx", 9 * MiB, "dynamic", block_size=1 * MiB, sector_size=sector)
    for name in ("f.vhdx", "d.vhdx"):
        lay = open_layout(tmp_path / name)
        raw = (tmp_path / name).read_bytes()
        entries = struct.unpack_from(f"<{lay.geometry.entry_count}Q", raw, lay.bat_offset)
        if name == "d.vhdx":
            assert set(entries) == {0} and len(raw) == lay.bat_offset + lay.bat_length
            continue
        data = lay.bat_offset + lay.bat_length
        for b in range(lay.geometry.payload_blocks):
            e = entries[lay.geometry.payload_index(b)]
            assert spec.bat_state(e) == spec.PAYLOAD_FULLY_PRESENT
            assert spec.bat_offset(e) == data + b * MiB
        assert len(raw) == data + 9 * MiB


def test_defaults_are_hyperv_s(tmp_path: Path) -> None:
    vcreate.create_from_spec(CreateSpec(str(tmp_path / "d.vhdx"), "dynamic", 100 * MiB))
    vcreate.create_from_spec(CreateSpec(str(tmp_path / "f.vhdx"), "fixed", 10 * MiB))
    vcreate.create_from_spec(CreateSpec(str(tmp_path / "c.avhdx"), "differencing", 100 * MiB,
                                                parent=str(tmp_path / "d.vhdx")))
    assert open_layout(tmp_path / "d.vhdx").block_size == 32 * MiB
    assert open_layout(tmp_path / "f.vhdx").block_size == 2 * MiB
    c = open_layout(tmp_path / "c.avhdx")
    assert (c.block_size, c.logical_sector_size, c.physical_sector_size) == (2 * MiB, 512, 4096)
    assert vcreate.LIMITS.max_size == 64 * spec.TiB and vcreate.LIMITS.sector_sizes == (512, 4096)


def test_child_takes_the_parents_sectors_and_a_relative_path_up(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    parent = tmp_path / "a" / "base.vhdx"
    vcreate.create_vhdx(parent, 8 * MiB, "dynamic", sector_size=4096)
    vcreate.create_vhdx(tmp_path / "b" / "c.avhdx", type="differencing", parent=parent)
    c = open_layout(tmp_path / "b" / "c.avhdx")
    assert c.logical_sector_size == 4096 and c.virtual_size == 8 * MiB
    assert c.parent_locator["relative_path"] == "..\\a\\base.vhdx"
    with pytest.raises(UsageError, match="parent's 4096-byte sectors"):
        vcreate.create_vhdx(tmp_path / "b" / "d.avhdx", type="differencing", parent=parent,
                            sector_size=512)
    with pytest.raises(UsageError, match="parent's size"):
        vcreate.create_vhdx(tmp_path / "b" / "e.avhdx", 4 * MiB, "differencing", parent=parent)


def test_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    p = tmp_path / "x.vhdx"
    for kw in ({"size": 1000}, {"size": 65 * spec.TiB}, {"size": MiB, "block_size": 3 * MiB},
               {"size": MiB, "block_size": 512 * MiB}, {"size": MiB, "sector_size": 1024},
               {"size": 4096 + 512, "sector_size": 4096}):
        with pytest.raises(UsageError):
            vcreate.create_vhdx(p, **kw)
        assert not p.exists()
    vcreate.create_vhdx(p, MiB)
    with pytest.raises(UsageError, match="already exists"):
        vcreate.create_vhdx(p, MiB)


def test_64_tib_dynamic_is_small(tmp_path: Path) -> None:
    p = tmp_path / "big.vhdx"
    vcreate.create_vhdx(p, 64 * spec.TiB, "dynamic", block_size=1 * MiB)
    lay = open_layout(p)
    assert lay.virtual_size == 64 * spec.TiB and lay.bat_length == 513 * MiB
    assert os.stat(p).st_blocks * 512 < 2 * MiB          # the BAT is a hole


# --- oracles -----------------------------------------------------------------------------
def _qemu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) not installed")
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("block_size", [1 * MiB, 32 * MiB])
def test_qemu_img_reads_them_identically(tmp_path: Path, kind: str, block_size: int) -> None:
    path, content, _ = _make(tmp_path, kind, 512, block_size)
    shadow = tmp_path / "shadow.raw"
    shadow.write_bytes(content)
    info = _qemu("info", "--output=json", "-f", "vhdx", str(path))
    assert info.returncode == 0, info.stderr
    assert f'"virtual-size": {SIZE}' in info.stdout
    check = _qemu("check", "-f", "vhdx", str(path))
    assert check.returncode == 0 and "No errors" in check.stdout, check.stdout + check.stderr
    cmp = _qemu("compare", "-f", "vhdx", "-F", "raw", str(path), str(shadow))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) not installed")
def test_qemu_img_check_on_an_empty_fixed_and_dynamic(tmp_path: Path) -> None:
    for kind in ("fixed", "dynamic"):
        p = tmp_path / f"{kind}.vhdx"
        vcreate.create_vhdx(p, 64 * MiB, kind)
        check = _qemu("check", "-f", "vhdx", str(p))
        assert check.returncode == 0, check.stdout + check.stderr


CASES = [(k, s, b) for k in KINDS for s in (512, 4096) for b in (1 * MiB, 32 * MiB)]


@pytest.mark.skipif(DissectVHDX is None, reason=globals().get("DISSECT_WHY", ""))
@pytest.mark.parametrize("kind,sector,block_size", CASES)
def test_dissect_reads_them_identically(tmp_path: Path, kind: str, sector: int,
                                        block_size: int) -> None:
    path, content, _ = _make(tmp_path, kind, sector, block_size, sub=True)
    v = DissectVHDX(path)           # a Path: dissect then finds the parent by relative_path
    assert v.size == SIZE and v.sector_size == sector and v.block_size == block_size
    assert bool(v.has_parent) == (kind == "differencing")
    v.seek(0)
    got = v.read(SIZE)
    assert got == content


@pytest.mark.skipif(pyvhdi is None, reason=globals().get("PYVHDI_WHY", ""))
@pytest.mark.parametrize("kind,sector,block_size", CASES)
def test_libvhdi_reads_them_identically(tmp_path: Path, kind: str, sector: int,
                                        block_size: int) -> None:
    path, content, parent = _make(tmp_path, kind, sector, block_size)
    f = pyvhdi.file()
    f.open(str(path))
    opened = [f]
    try:
        assert f.get_media_size() == SIZE and f.get_bytes_per_sector() == sector
        if parent is not None:
            p = pyvhdi.file()
            p.open(str(parent))
            opened.append(p)
            # libvhdi's identifier of the parent is its DataWriteGuid: the linkage it checks
            assert f.get_parent_identifier() == p.get_identifier()
            f.set_parent(p)
        got = f.read_buffer_at_offset(SIZE, 0)
        assert got == content
    finally:
        for x in opened:
            x.close()
