"""Differencing VHDs: copy-on-write per sector, chains of depth >= 3, parent lookup and refusal."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhd_helpers import qemu_info_size, patch_footer, patch_header, read_footer, read_header, set_locators, sha256
from vhdfs.block import Kind, open_image
from vhdfs.formats.vhd.create import create_vhd
from vhdfs.errors import ChainError, UsageError
from vhdfs.formats.vhd import spec as fmt

MiB = 1024 * 1024


def _random_base(path: Path, size: int, kind: str = "dynamic", seed: int = 1) -> bytes:
    create_vhd(path, size, kind, block_size=65536 if kind == "dynamic" else 2 * MiB)
    data = hashlib.shake_256(seed.to_bytes(4, "little")).digest(size)
    with open_image(path, writable=True) as img:
        # leave holes so the parent shows zeros in places too
        for off in range(0, size, 256 * 1024):
            img.write(off, data[off:off + 100 * 1024])
    with open_image(path) as img:
        return img.read(0, size)


def test_differencing_header_as_windows_writes_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.vhd"
    create_vhd(base, 3 * MiB, "dynamic")
    child = tmp_path / "sub" / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    h, f, pf = read_header(child), read_footer(child), read_footer(base)
    assert f.disk_type == 4 and f.current_size == pf.current_size
    assert (f.cylinders, f.heads, f.sectors) == (pf.cylinders, pf.heads, pf.sectors)
    assert h.parent_id == pf.unique_id and h.parent_name == "base.vhd"
    assert h.parent_timestamp == fmt.vhd_timestamp(base.stat().st_mtime)
    locs = {loc.code: loc for loc in h.locators if loc.code}
    data = child.read_bytes()
    w2ku, w2ru = locs[fmt.PLAT_W2KU], locs[fmt.PLAT_W2RU]
    assert data[w2ru.data_offset:w2ru.data_offset + w2ru.data_length].decode("utf-16-le") == "..\\base.vhd"
    assert data[w2ku.data_offset:w2ku.data_offset + w2ku.data_length].decode("utf-16-le") == \
        str(base).replace("/", "\\")
    for loc in (w2ku, w2ru):
        assert loc.data_space % 512 == 0 and loc.data_offset >= 1536 + 512 and loc.data_offset % 512 == 0
    with open_image(child) as img:
        assert img.type == "differencing" and img.chain[1].path == str(base)
        assert img.check() == [] and img.describe()["parent_uuid"] == img.chain[1].identity()
        assert qemu_info_size(child) == img.size   # qemu reads the child alone, same size


def test_partial_sector_writes_merge_parent_bytes(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    parent = _random_base(base, 2 * MiB, "fixed")
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    before = sha256(base)
    with open_image(child, writable=True) as img:
        img.write(5 * 512 + 100, b"abc")
        img.write(2 * MiB - 10, b"0123456789")          # straddles nothing, ends the disk
        expect = bytearray(parent)
        expect[5 * 512 + 100:5 * 512 + 103] = b"abc"
        expect[2 * MiB - 10:] = b"0123456789"
        assert img.read(0, 2 * MiB) == expect
        layer = [(e.offset, e.length, e.kind) for e in img.map_layer(0, 8 * 512)]
        assert layer == [(0, 2560, Kind.BACKING), (2560, 512, Kind.DATA), (3072, 1024, Kind.BACKING)]
        assert img.write_is_in_place(5 * 512, 512) and not img.write_is_in_place(4 * 512, 1024)
    assert sha256(base) == before


def test_discard_in_a_child_hides_the_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    parent = _random_base(base, 4 * MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base, block_size=MiB)
    with open_image(child, writable=True) as img:
        img.discard(MiB, MiB)            # one whole child block
        img.discard(100, 1000)           # partial sectors merged
        expect = bytearray(parent)
        expect[MiB:2 * MiB] = bytes(MiB)
        expect[100:1100] = bytes(1000)
        assert img.read(0, 4 * MiB) == expect


def _chain_writes(tmp: Path, base: Path, base_data: bytes, depth: int, writes: list) -> None:
    size = len(base_data)
    shadow = bytearray(base_data)
    parents = [base]
    top = base
    per_level = max(1, len(writes) // depth)
    with open_image(base) as img:
        base_depth = len(img.chain)
    for level in range(depth):
        child = tmp / f"c{level}.vhd"
        create_vhd(child, type="differencing", parent=top,
                   block_size=[4096, 65536, 2 * MiB][level % 3])
        hashes = {p: sha256(p) for p in parents}
        with open_image(child, writable=True) as img:
            assert img.size == size and len(img.chain) == base_depth + level + 1
            for pick, length, seed in writes[level * per_level:(level + 1) * per_level]:
                off = pick % size
                if pick % 2:   # near a 64 KiB / sector boundary, straddling it
                    off = max(0, min(size - 1, (off // 65536) * 65536 - seed % 600))
                data = hashlib.shake_128(seed.to_bytes(8, "little")).digest(min(length, size - off))
                img.write(off, data)
                shadow[off:off + len(data)] = data
            assert img.read(0, size) == shadow
            assert img.check() == []
        assert {p: sha256(p) for p in parents} == hashes   # parents untouched
        parents.append(child)
        top = child
    with open_image(top) as img:
        assert img.read(0, size) == shadow and len(img.chain) == base_depth + depth


WRITE = st.tuples(st.integers(0, 10**9), st.integers(1, 200_000), st.integers(0, 2**32))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WRITE, min_size=3, max_size=9))
def test_chain_of_depth_three_over_created_base(writes: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.vhd"
        data = _random_base(base, 3 * MiB - 5 * 512)
        _chain_writes(Path(tmp), base, data, 3, writes)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WRITE, min_size=3, max_size=6))
def test_chain_over_corpus_differencing_chain(corpus_dir: Path, writes: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("xo-base.vhd", "xo-child1.vhd", "xo-child2.vhd"):
            shutil.copyfile(corpus_dir / name, Path(tmp) / name)
        top = Path(tmp) / "xo-child2.vhd"
        with open_image(top) as img:
            data = img.read(0, img.size)
        _chain_writes(Path(tmp), top, data, 3, writes)


@pytest.mark.parametrize("name", ["qemu-fixed-mbr-fat16.vhd", "mkimg-63x255-512-mbr-dynamic.vhd"])
def test_child_of_corpus_image_keeps_its_virtual_size(corpus_dir: Path, tmp_path: Path, name: str) -> None:
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=corpus_dir / name)
    with open_image(corpus_dir / name) as p, open_image(child, writable=True) as c:
        assert c.size == p.size
        c.write(c.size - 3, b"end")
        assert c.read(0, c.size - 3) == p.read(0, p.size - 3)


# -- parent lookup ---------------------------------------------------------------------------

@pytest.fixture()
def moved_chain(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A parent in tmp/far/deep/, a child in tmp/kid/ whose own locators are wiped."""
    far = tmp_path / "far" / "deep"
    far.mkdir(parents=True)
    (tmp_path / "kid").mkdir()
    parent = far / "my parent.vhd"
    data = _random_base(parent, MiB)
    child = tmp_path / "kid" / "child.vhd"
    create_vhd(child, type="differencing", parent=parent)
    set_locators(child, [], name="nowhere.vhd")
    with pytest.raises(ChainError, match="not found"):
        open_image(child)
    return parent, child, data


def _opens(child: Path, data: bytes, **kw: object) -> None:
    with open_image(child, **kw) as img:
        assert img.read(0, len(data)) == data


def test_parent_via_w2ru(moved_chain: tuple[Path, Path, bytes]) -> None:
    parent, child, data = moved_chain
    set_locators(child, [(fmt.PLAT_W2RU, "..\\far\\deep\\my parent.vhd".encode("utf-16-le"))])
    _opens(child, data)


def test_parent_via_w2ku_absolute_and_relative_after_drive_strip(moved_chain: tuple[Path, Path, bytes]) -> None:
    parent, child, data = moved_chain
    set_locators(child, [(fmt.PLAT_W2KU, ("C:" + str(parent).replace("/", "\\")).encode("utf-16-le"))])
    _opens(child, data)
    # an absolute path from another machine that matches below the child's folder
    shutil.move(str(parent.parent.parent), str(child.parent / "far"))
    set_locators(child, [(fmt.PLAT_W2KU, "D:\\far\\deep\\my parent.vhd".encode("utf-16-le"))])
    _opens(child, data)


def test_parent_via_macx(moved_chain: tuple[Path, Path, bytes]) -> None:
    parent, child, data = moved_chain
    url = "file://localhost" + urllib.parse.quote(str(parent))
    set_locators(child, [(fmt.PLAT_MAC, b"opaque alias"), (fmt.PLAT_MACX, url.encode())])
    _opens(child, data)


def test_parent_via_header_name_in_child_folder(moved_chain: tuple[Path, Path, bytes]) -> None:
    parent, child, data = moved_chain
    shutil.copyfile(parent, child.parent / "renamed.vhd")
    set_locators(child, [], name="C:\\old\\renamed.vhd")
    _opens(child, data)


def test_parent_via_parent_dirs(moved_chain: tuple[Path, Path, bytes]) -> None:
    parent, child, data = moved_chain
    set_locators(child, [], name="my parent.vhd")
    with pytest.raises(ChainError):
        open_image(child)
    _opens(child, data, parent_dirs=[parent.parent])


def test_differencing_size_must_match_parent(tmp_path: Path) -> None:
    create_vhd(tmp_path / "base.vhd", MiB)
    with pytest.raises(UsageError, match="parent's size"):
        create_vhd(tmp_path / "c.vhd", 2 * MiB, "differencing", parent=tmp_path / "base.vhd")
    assert not (tmp_path / "c.vhd").exists()


def test_missing_parent_names_the_files(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_vhd(base, MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    base.unlink()
    with pytest.raises(ChainError) as err:
        open_image(child)
    assert "base.vhd" in str(err.value) and str(child) in str(err.value)


def test_uuid_mismatch_is_refused_unless_ignored(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_vhd(base, MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    base.unlink()
    create_vhd(base, MiB)                 # same name and size, another UUID
    with pytest.raises(ChainError, match="id"):
        open_image(child)
    with open_image(child, ignore_parent_id=True) as img:
        assert len(img.chain) == 2


def test_a_parent_larger_than_the_child_gives_its_prefix(tmp_path: Path) -> None:
    # Resize-VHD on a differencing disk: the chain is not refused, the child reads its own size
    base = tmp_path / "base.vhd"
    data = _random_base(base, 4 * MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    patch_footer(child, current_size=2 * MiB)
    with open_image(child) as img:
        assert img.size == 2 * MiB and len(img.chain) == 2
        assert img.read(0, img.size) == data[:2 * MiB]


def test_loop_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    create_vhd(a, MiB)
    create_vhd(b, type="differencing", parent=a)
    # turn a into a child of b
    patch_footer(a, disk_type=fmt.DISK_DIFFERENCING)
    patch_header(a, parent_id=read_footer(b).unique_id, parent_name_raw="b.vhd".encode("utf-16-be"))
    with pytest.raises(ChainError, match="loop"):
        open_image(b)
    with pytest.raises(ChainError, match="loop"):
        open_image(a)


def test_parent_is_opened_read_only(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_vhd(base, MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    with open_image(child, writable=True) as img:
        assert img.writable and not img.backing.writable
        assert os.access(base, os.W_OK)
