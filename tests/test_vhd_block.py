"""VHD block driver: the corpus, created images, random writes against a flat shadow and qemu-img."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import corpus_entries
from vhd_helpers import qemu_check_ok, qemu_info_size, qemu_raw, read_footer, read_header, sha256
from vhdfs.block import Kind, open_image
from vhdfs.formats.vhd.create import create_vhd
from vhdfs.errors import ReadOnlyError, UsageError
from vhdfs.formats.vhd import spec as fmt

VHD_ENTRIES = [e for e in corpus_entries() if e["image"].endswith(".vhd")]
MiB = 1024 * 1024


@pytest.mark.parametrize("entry", VHD_ENTRIES, ids=[e["image"] for e in VHD_ENTRIES])
def test_corpus_image_reads_to_expected_hash(corpus_dir: Path, entry: dict) -> None:
    path = corpus_dir / entry["image"]
    before = sha256(path)
    with open_image(path) as img:
        assert img.format == "vhd"
        assert img.size == entry["expected_raw"]["size"]
        h = hashlib.sha256()
        for off in range(0, img.size, 4 * MiB):
            h.update(img.read(off, 4 * MiB))
        assert h.hexdigest() == entry["expected_raw"]["sha256"]
        assert img.check() == []
        info = img.describe()
        assert info["type"] == entry["disk_type"] and info["uuid"] == img.identity()
        assert len(img.chain) == 1 + (entry["image"] == "xo-child1.vhd") + 2 * (entry["image"] == "xo-child2.vhd")
    assert sha256(path) == before


def test_corpus_extent_map_is_per_run_not_per_sector(corpus_dir: Path) -> None:
    with open_image(corpus_dir / "qemu-dynamic-gpt-fat32-ext4.vhd") as img:
        exts = list(img.extents())
        assert len(exts) < 64
        assert sum(e.length for e in exts) == img.size
        assert {e.kind for e in exts} <= {Kind.DATA, Kind.ZERO}


# -- created images -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,size", [("fixed", 3 * MiB + 1000), ("fixed", 16 * MiB),
                                       ("dynamic", 5 * MiB + 512), ("dynamic", 1024**3)])
def test_created_image_size_agrees_with_qemu(tmp_path: Path, kind: str, size: int) -> None:
    path = tmp_path / "d.vhd"
    create_vhd(path, size, kind)
    with open_image(path) as img:
        assert img.size == (size + 511) // 512 * 512 == qemu_info_size(path)
        assert img.check() == []
        assert img.read(0, 4096) == bytes(4096)
    f = read_footer(path)
    assert (f.creator_app, f.creator_os, f.current_size) == (b"win ", b"Wi2k", img.size)
    if kind == "dynamic":
        h = read_header(path)
        assert h.max_table_entries == -(-img.size // (2 * MiB))
        assert path.stat().st_size == 512 + 1024 + fmt.bat_bytes(h.max_table_entries) + 512
    else:
        assert path.stat().st_size == img.size + 512


def test_fixed_whole_mib_meets_azure_rules(tmp_path: Path) -> None:
    create_vhd(tmp_path / "a.vhd", 8 * MiB, "fixed")
    f = read_footer(tmp_path / "a.vhd")
    assert f.current_size == 8 * MiB and f.creator_os == b"Wi2k" and f.disk_type == 2
    assert (tmp_path / "a.vhd").stat().st_size == 8 * MiB + 512


def test_create_refuses_existing_files_and_bad_arguments(tmp_path: Path) -> None:
    p = tmp_path / "x.vhd"
    p.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        create_vhd(p, MiB)
    assert p.read_bytes() == b"precious"
    for kwargs in ({"size": 2041 * 1024**3}, {"size": 0}, {"size": MiB, "block_size": 3 * 4096},
                   {"size": MiB, "block_size": 512}, {"size": MiB, "type": "sparse"},
                   {"size": MiB, "type": "differencing"}):
        with pytest.raises(UsageError):
            create_vhd(tmp_path / "new.vhd", **kwargs)
        assert not (tmp_path / "new.vhd").exists()


WRITE = st.tuples(st.integers(0, 10**9), st.integers(1, 300_000), st.integers(0, 2**32))


def _place(size: int, block: int, raw: tuple[int, int, int]) -> tuple[int, bytes]:
    """Bias offsets to block and sector boundaries (± a few bytes) so writes straddle them."""
    pick, length, seed = raw
    if pick % 3 == 0:
        off = (pick // 3) % size
    else:
        edge = ((pick // 3) % max(1, size // block)) * block + (block if pick % 3 == 1 else 0)
        off = min(max(0, edge - (seed % 700)), size - 1)
    length = min(length, size - off)
    data = hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)
    return off, data


def _random_writes_vs_shadow(kind: str, block: int, writes: list, discard: tuple | None) -> None:
    size = 3 * MiB + 5 * 512 if kind == "dynamic" else 2 * MiB + 7 * 512
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.vhd"
        create_vhd(path, size, kind, block_size=block)
        shadow = bytearray(size)
        with open_image(path, writable=True) as img:
            for raw in writes:
                off, data = _place(size, block, raw)
                img.write(off, data)
                shadow[off:off + len(data)] = data
                assert img.read(off, len(data)) == data
            if discard is not None:
                off, length = discard[0] % size, discard[1]
                length = min(length, size - off)
                img.discard(off, length)
                shadow[off:off + length] = bytes(length)
            assert img.read(0, size) == shadow
            assert img.check() == []
        with open_image(path) as img:
            assert img.read(0, size) == shadow
            assert img.check() == []
        assert qemu_raw(path, Path(tmp) / "out.raw") == shadow
        assert qemu_info_size(path) == size
        assert qemu_check_ok(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([4096, 65536, 2 * MiB]), st.lists(WRITE, min_size=1, max_size=8),
       st.none() | st.tuples(st.integers(0, 10**9), st.integers(1, 3 * MiB)))
def test_dynamic_random_writes_match_shadow_and_qemu(block: int, writes: list, discard: tuple | None) -> None:
    _random_writes_vs_shadow("dynamic", block, writes, discard)


@settings(max_examples=10, deadline=None)
@given(st.lists(WRITE, min_size=1, max_size=6),
       st.none() | st.tuples(st.integers(0, 10**9), st.integers(1, MiB)))
def test_fixed_random_writes_match_shadow_and_qemu(writes: list, discard: tuple | None) -> None:
    _random_writes_vs_shadow("fixed", 2 * MiB, writes, discard)


def test_dynamic_allocation_sets_every_bit_so_later_writes_are_in_place(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_vhd(path, 4 * MiB, "dynamic")
    with open_image(path, writable=True) as img:
        assert not img.write_is_in_place(0, 512)
        img.write(1000, b"x" * 20)             # allocates block 0, zero-filled, every bit set
        exts = list(img.map_layer(0, 2 * MiB))
        assert [(e.offset, e.length, e.kind) for e in exts] == [(0, 2 * MiB, Kind.DATA)]
        assert img.write_is_in_place(0, 2 * MiB) and not img.write_is_in_place(0, 2 * MiB + 1)
        assert img.read(512, 512) == bytes(488) + b"x" * 20 + bytes(4)
        assert img.read(0, 512) == bytes(512)
        size_before = path.stat().st_size
        img.write(1500, b"y")                  # no allocation, no metadata
        assert path.stat().st_size == size_before
        img.discard(0, 2 * MiB)                # whole block: back to unallocated
        assert list(img.map_layer(0, 2 * MiB))[0].kind == Kind.ZERO
        assert img.read(0, 4096) == bytes(4096)
    assert qemu_raw(path, tmp_path / "o.raw") == bytes(4 * MiB)


def test_dynamic_clear_bits_read_as_zeros_and_are_set_when_written(tmp_path: Path) -> None:
    """Images from other tools may have clear bits over non-zero bytes: those read as zeros."""
    import struct
    path = tmp_path / "d.vhd"
    create_vhd(path, 4 * MiB, "dynamic")
    with open_image(path, writable=True) as img:
        img.write(0, b"\x11" * (2 * MiB))
    with open(path, "r+b") as f:
        f.seek(1536)
        bitmap_at = struct.unpack(">I", f.read(4))[0] * 512
        f.seek(bitmap_at)
        f.write(b"\x00")                      # sectors 0-7: bits clear, bytes still 0x11
    with open_image(path, writable=True) as img:
        exts = list(img.map_layer(0, 2 * MiB))
        assert [(e.offset, e.length, e.kind) for e in exts] == [
            (0, 4096, Kind.ZERO), (4096, 2 * MiB - 4096, Kind.DATA)]
        assert img.read(0, 4096) == bytes(4096)
        assert not img.write_is_in_place(0, 512) and img.write_is_in_place(4096, 512)
        img.write(100, b"z")                   # merged with zeros, not with the stale 0x11
        assert img.read(0, 512) == bytes(100) + b"z" + bytes(411)
        assert img.read(512, 3584) == bytes(3584)
        assert img.check() == []


def test_new_blocks_never_overwrite_locators_before_the_bat(tmp_path: Path) -> None:
    """Windows places locator data before the BAT; an allocator must still go past it."""
    path = tmp_path / "d.vhd"
    create_vhd(path, 4 * MiB, "dynamic")
    raw = bytearray(path.read_bytes())
    # move the BAT from 1536 to 4096 and put "locator" bytes in 1536..4096 (listed as W2ku)
    bat = raw[1536:2048]
    new = raw[:1536] + b"L" * (4096 - 1536) + bat + raw[2048:]
    path.write_bytes(bytes(new))
    from vhd_helpers import patch_header, write_footer
    h = read_header(path)
    patch_header(path, table_offset=4096,
                 locators=[fmt.Locator(fmt.PLAT_W2KU, 2560, 2560, 0, 1536)])
    write_footer(path, read_footer(path))
    with open_image(path, writable=True) as img:
        assert img.check() == []
        img.write(0, b"z" * 4096)
        img.write(3 * MiB, b"w" * 4096)
    assert path.read_bytes()[1536:4096] == b"L" * 2560
    with open_image(path) as img:
        assert img.read(0, 4096) == b"z" * 4096 and img.read(3 * MiB, 4096) == b"w" * 4096
        assert h.max_table_entries == 2


def test_read_only_image_refuses_writes(tmp_path: Path) -> None:
    create_vhd(tmp_path / "d.vhd", MiB)
    with open_image(tmp_path / "d.vhd") as img:
        with pytest.raises(ReadOnlyError):
            img.write(0, b"x")
        with pytest.raises(ReadOnlyError):
            img.discard(0, 512)


def test_describe_keys(tmp_path: Path) -> None:
    create_vhd(tmp_path / "d.vhd", 3 * MiB, block_size=65536)
    with open_image(tmp_path / "d.vhd") as img:
        d = img.describe()
    for key in ("creator_app", "creator_version", "creator_os", "uuid", "block_size", "allocated_blocks",
                "max_table_entries", "geometry", "original_size", "current_size", "size_rule",
                "footer_checksum_ok", "batmap"):
        assert key in d
    assert d["block_size"] == 65536 and d["allocated_blocks"] == 0 and d["creator_app"] == "win "


def test_copy_of_corpus_dynamic_is_writable(corpus_dir: Path, tmp_path: Path) -> None:
    src = corpus_dir / "dissect-win10-ntfs-dynamic.vhd"
    path = tmp_path / "w.vhd"
    shutil.copyfile(src, path)
    path.chmod(0o644)
    with open_image(src) as img:
        shadow = bytearray(img.read(0, img.size))
    with open_image(path, writable=True) as img:
        for off in (0, 2 * MiB - 3, 7 * MiB + 11, img.size - 700):
            img.write(off, b"Q" * 700)
            shadow[off:off + 700] = b"Q" * 700
    with open_image(path) as img:
        assert img.read(0, img.size) == shadow and img.check() == []
    assert qemu_raw(path, tmp_path / "o.raw") == shadow
