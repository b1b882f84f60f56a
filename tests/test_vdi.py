"""VDI reading: the corpus, header/map validation, zero markers, differencing chains by UUID."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest

from conftest import corpus_entries
from vhdfs.block import open_image
from vhdfs.formats.vdi.image import VdiImage
from vhdfs.formats.vdi.create import create_vdi
from vhdfs.errors import ChainError, FormatError, UnsupportedError, VhdfsError
from vhdfs.formats.vdi import spec as fmt

MIB = 1 << 20
VDI_ENTRIES = [e for e in corpus_entries() if e["format"] == "vdi"]


def sha256_file(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def set_map_entry(path: Path, index: int, value: int) -> None:
    """Patch one block-map entry of a VDI on disk (to build corrupt or marked images)."""
    with open(path, "r+b") as f:
        f.seek(fmt.PRE_HEADER_SIZE + 0x154 - 0x48)
        offset_bmap = struct.unpack("<I", f.read(4))[0]
        f.seek(offset_bmap + 4 * index)
        f.write(struct.pack("<I", value))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- the corpus ----------------------------------------------------------------------------

@pytest.mark.parametrize("entry", VDI_ENTRIES, ids=[e["image"] for e in VDI_ENTRIES])
def test_corpus_vdi_reads_expected_raw(corpus_dir: Path, entry: dict) -> None:
    path = corpus_dir / entry["image"]
    with open_image(path) as img:
        assert img.format == "vdi"
        assert img.type == {"vdi-dynamic": "dynamic", "vdi-static": "fixed"}[entry["disk_type"]]
        assert img.size == entry["expected_raw"]["size"]
        assert img.identity() == entry["vdi_header"]["uuid_create"]
        digest = hashlib.sha256()
        for off in range(0, img.size, 4 * MIB):
            digest.update(img.read(off, 4 * MIB))
        assert digest.hexdigest() == entry["expected_raw"]["sha256"]
        assert img.check() == []
        assert img.describe()["allocated_blocks"] <= entry["vdi_header"]["blocks_allocated"]


def test_corpus_extents_are_merged(corpus_dir: Path) -> None:
    """A static image's contiguous blocks map to one extent: one pread for the whole disk."""
    with open_image(corpus_dir / "qemu-static-mbr-fat12.vdi") as img:
        exts = list(img.extents())
        assert len(exts) == 1 and exts[0].length == img.size


# -- zero markers ----------------------------------------------------------------------------

def test_zero_marker_reads_zero_in_base_and_is_not_inherited(tmp_path: Path) -> None:
    base = tmp_path / "base.vdi"
    create_vdi(base, 4 * MIB)
    with open_image(base, writable=True) as img:
        img.write(0, b"\xaa" * (4 * MIB))
    set_map_entry(base, 1, fmt.BLOCK_ZERO)
    child = tmp_path / "child.vdi"
    create_vdi(child, 0, parent=str(base))
    with open_image(base) as img:
        assert img.read(MIB, MIB) == bytes(MIB)
        assert img.read(0, MIB) == b"\xaa" * MIB
    set_map_entry(child, 2, fmt.BLOCK_ZERO)
    with open_image(child) as img:
        assert img.read(0, MIB) == b"\xaa" * MIB          # free: from the parent
        assert img.read(2 * MIB, MIB) == bytes(MIB)       # zero marker: not inherited
        assert img.read(3 * MIB, MIB) == b"\xaa" * MIB


# -- differencing chains found by UUID ---------------------------------------------------------

def _chain(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "a" / "base.vdi"
    base.parent.mkdir()
    create_vdi(base, 2 * MIB)
    with open_image(base, writable=True) as img:
        img.write(0, b"B" * (2 * MIB))
    child = tmp_path / "a" / "snap.vdi"
    create_vdi(child, 0, parent=str(base))
    return base, child


def test_parent_found_by_uuid_in_childs_folder(tmp_path: Path) -> None:
    base, child = _chain(tmp_path)
    # a decoy with another UUID sorts first and must be skipped
    create_vdi(tmp_path / "a" / "aaa-decoy.vdi", 2 * MIB)
    with open_image(child) as img:
        assert img.type == "differencing"
        assert [layer.path for layer in img.chain] == [str(child), str(base)]
        assert img.read(0, 10) == b"B" * 10
        assert img.describe()["parent_uuid"] == img.backing.identity()


def test_parent_found_via_parent_dirs_and_missing_parent_refused(tmp_path: Path) -> None:
    base, child = _chain(tmp_path)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    moved = elsewhere / "renamed-parent.vdi"
    shutil.move(base, moved)
    with pytest.raises(ChainError) as err:
        open_image(child)
    assert "\n" not in str(err.value)
    with open_image(child, parent_dirs=[elsewhere]) as img:
        assert img.backing.path == str(moved)
        assert img.read(MIB, 4) == b"BBBB"
    os.unlink(moved)
    with pytest.raises(ChainError):
        open_image(child, parent_dirs=[elsewhere])


def test_modified_parent_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child = _chain(tmp_path)
    with open_image(base, writable=True) as img:  # a write renews the modification UUID
        img.write(0, b"changed")
    capsys.readouterr()
    with open_image(child) as img:
        assert img.read(0, 7) == b"changed"
    assert "modified after this snapshot" in capsys.readouterr().err


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.vdi"
    create_vdi(path, MIB)
    before = sha256_file(path)
    with pytest.raises(VhdfsError, match="already exists"):
        create_vdi(path, MIB)
    assert sha256_file(path) == before
    with pytest.raises(ValueError):
        create_vdi(tmp_path / "y.vdi", MIB, block_size=3000)
    with pytest.raises(ValueError):
        create_vdi(tmp_path / "y.vdi", MIB, "static", parent=str(path))
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(MIB))
    with pytest.raises(VhdfsError):
        create_vdi(tmp_path / "z.vdi", 0, parent=str(raw))
    assert not (tmp_path / "y.vdi").exists() and not (tmp_path / "z.vdi").exists()


# -- corrupt input: one-line FormatError, file unchanged ----------------------------------------

def _bad_image(tmp_path: Path, damage: str) -> Path:
    path = tmp_path / f"{damage}.vdi"
    create_vdi(path, 4 * MIB, block_size=MIB)
    with open_image(path, writable=True) as img:
        img.write(MIB, b"data" * 1000)
    if damage == "truncated":
        os.truncate(path, 0x100)
    elif damage == "signature":
        patch(path, 0x40, b"\0\0\0\0")
    elif damage == "entry_past_eof":
        set_map_entry(path, 3, 7)
    elif damage == "absurd_block_count":
        patch(path, 0x180, struct.pack("<I", 0x3FFFFFFF))
    elif damage == "block_size":
        patch(path, 0x178, struct.pack("<I", 3 * MIB))
    elif damage == "map_past_eof":
        patch(path, 0x154, struct.pack("<I", 0x7FFFFFF0))
    elif damage == "header_truncated_mid_map":
        os.truncate(path, 0x202)
    return path


@pytest.mark.parametrize("damage", ["truncated", "signature", "entry_past_eof", "absurd_block_count",
                                    "block_size", "map_past_eof", "header_truncated_mid_map"])
def test_corrupt_images_are_refused_with_one_line(tmp_path: Path, damage: str) -> None:
    path = _bad_image(tmp_path, damage)
    before = sha256_file(path)
    for writable in (False, True):
        with pytest.raises(FormatError) as err:
            open_image(path, writable=writable)
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(path))
    assert sha256_file(path) == before


def test_version_0_and_undo_are_unsupported(tmp_path: Path) -> None:
    path = _bad_image(tmp_path, "none")
    patch(path, 0x44, struct.pack("<I", 0x00000002))
    with pytest.raises(UnsupportedError, match="version 0"):
        open_image(path)
    patch(path, 0x44, struct.pack("<I", fmt.VERSION_1_1))
    patch(path, 0x4C, struct.pack("<I", fmt.TYPE_UNDO))
    with pytest.raises(UnsupportedError, match="undo"):
        open_image(path)


def test_check_finds_duplicates_and_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "dup.vdi"
    create_vdi(path, 4 * MIB, block_size=MIB)
    with open_image(path, writable=True) as img:
        img.write(0, b"x" * (2 * MIB))
        assert img.check() == []
    set_map_entry(path, 3, 0)                    # entry 3 shares block 0
    patch(path, 0x184, struct.pack("<I", 1))     # header claims 1 block allocated
    with open_image(path) as img:
        problems = img.check()
        assert any("more than one map entry" in p.text for p in problems)
        assert any("blocks_allocated" in p.text for p in problems)


def test_stale_blocks_allocated_never_reuses_an_index(tmp_path: Path) -> None:
    """A crash between the map and header writes: the next block goes past the used ones."""
    path = tmp_path / "stale.vdi"
    create_vdi(path, 4 * MIB, block_size=MIB)
    with open_image(path, writable=True) as img:
        img.write(0, b"1" * MIB)
        img.write(MIB, b"2" * MIB)
    patch(path, 0x184, struct.pack("<I", 0))
    with open_image(path, writable=True) as img:
        img.write(2 * MIB, b"3" * MIB)
        assert img.read(0, 3 * MIB) == b"1" * MIB + b"2" * MIB + b"3" * MIB
    with open_image(path) as img:
        assert isinstance(img, VdiImage) and img.check() == []
        assert img.header.blocks_allocated == 3


def test_whole_zero_block_writes_allocate_nothing(tmp_path: Path) -> None:
    """A block of zeros over a free entry: nothing in a base image, a zero marker in a diff."""
    base = tmp_path / "base.vdi"
    create_vdi(base, 2 * MIB)
    with open_image(base, writable=True) as img:
        img.write(MIB, bytes(MIB))
        assert img.describe()["allocated_blocks"] == 0
        img.write(0, b"p" * (2 * MIB))
    child = tmp_path / "child.vdi"
    create_vdi(child, 0, parent=str(base))
    size_before = child.stat().st_size
    with open_image(child, writable=True) as img:
        img.write(MIB, bytes(MIB))
        assert img.read(MIB - 1, 2) == b"p\0"
        assert img.describe()["zero_blocks"] == 1 and img.describe()["allocated_blocks"] == 0
    assert child.stat().st_size == size_before


def test_virtualbox_layout_with_block_extra_and_0x190_header(tmp_path: Path) -> None:
    """Header 0x190 with LCHS, map and data far apart, private bytes before each block."""
    import uuid

    path = tmp_path / "vbox.vdi"
    block, extra, blocks = 4096, 512, 5
    size = blocks * block - 1024
    h = fmt.VdiHeader(text=fmt.PRE_HEADER_TEXT, header_size=fmt.HEADER_V1PLUS, image_type=fmt.TYPE_NORMAL,
                      offset_bmap=0x400, offset_data=0x1000, disk_size=size, block_size=block,
                      block_extra=extra, blocks_in_image=blocks, uuid_create=uuid.uuid4(),
                      uuid_modify=uuid.uuid4(), lchs=(10, 16, 63, 512))
    with open(path, "wb") as f:
        f.write(fmt.pack_header(h))
        f.seek(0x400)
        f.write(b"\xff" * 4 * blocks)
        f.truncate(0x1000)
    shadow = bytearray(size)
    with open_image(path, writable=True) as img:
        for off, n in ((100, 5000), (size - 300, 300), (3 * block - 1, 2)):
            data = os.urandom(n)
            img.write(off, data)
            shadow[off:off + n] = data
    raw = path.read_bytes()
    with open_image(path) as img:
        assert img.read(0, size) == shadow and img.check() == []
        assert img.describe()["header_size"] == 0x190
        first = img.bmap[0]
    stride = extra + block
    assert raw[0x1000 + first * stride:0x1000 + first * stride + extra] == bytes(extra)
    assert raw[0x1000 + first * stride + extra + 100:][:10] == shadow[100:110]


def test_header_and_map_corruption_raises_only_vhdfs_errors(tmp_path: Path) -> None:
    """Random damage to the header and map: a clean open or a VhdfsError, never another type."""
    import random

    good = tmp_path / "good.vdi"
    create_vdi(good, 64 * 1024, block_size=4096)
    with open_image(good, writable=True) as img:
        img.write(5000, b"z" * 20000)
    pristine = good.read_bytes()
    rng = random.Random(1)
    for _ in range(300):
        raw = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            pos = rng.choice([rng.randrange(0x40, 0x1D8), rng.randrange(0x200, 0x240)])
            raw[pos] = rng.randrange(256)
        bad = tmp_path / "bad.vdi"
        bad.write_bytes(raw)
        try:
            with open_image(bad) as img:
                img.read(0, img.size)
                img.check()
                img.describe()
        except VhdfsError as exc:
            assert "\n" not in str(exc)
