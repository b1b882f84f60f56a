"""Corrupt and hostile VHDs: clear one-line errors, no other exception type, files unchanged."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhd_helpers import patch_footer, patch_header, read_footer, read_header, sha256
from vhdfs.block import open_image
from vhdfs.formats.vhd.create import create_vhd
from vhdfs.errors import FormatError, UnsupportedError, VhdfsError
from vhdfs.formats.vhd import spec as fmt

MiB = 1024 * 1024


def _dynamic_with_data(path: Path, size: int = 4 * MiB) -> bytes:
    create_vhd(path, size, "dynamic")
    with open_image(path, writable=True) as img:
        img.write(0, b"A" * 5000)
        img.write(3 * MiB, b"B" * 5000)
        return img.read(0, size)


def _refused(path: Path, match: str, **kw: object) -> FormatError:
    before = sha256(path)
    with pytest.raises(FormatError, match=match) as err:
        open_image(path, **kw)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert sha256(path) == before
    return err.value


def test_truncated_dynamic_image(tmp_path: Path) -> None:
    p = tmp_path / "t.vhd"
    _dynamic_with_data(p)
    os.truncate(p, p.stat().st_size - 1024 * 1024)
    _refused(p, "past the end of the file")


def test_truncated_fixed_image_has_no_footer(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    create_vhd(p, MiB, "fixed")
    os.truncate(p, MiB - 4096)
    _refused(p, "not a VHD")


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    p = tmp_path / "b.vhd"
    _dynamic_with_data(p)
    with open(p, "r+b") as f:
        f.seek(1536 + 4)
        f.write(struct.pack(">I", 0x00FFFFFF))
    _refused(p, "BAT entry 1 points past the end of the file")


def test_overlapping_bat_entries_are_a_finding_and_refuse_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "o.vhd"
    _dynamic_with_data(p)
    bat = p.read_bytes()[1536:1544]
    with open(p, "r+b") as f:   # block 1 points at block 0's data
        f.seek(1536 + 4)
        f.write(bat[:4])
    with open_image(p) as img:
        assert any("overlap" in c.text for c in img.check())
    _refused(p, "overlap", writable=True)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_bad_footer_checksum_read_only_warns_writable_refuses(tmp_path: Path, kind: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "c.vhd"
    create_vhd(p, 2 * MiB, kind)
    size = p.stat().st_size
    with open(p, "r+b") as f:     # corrupt the tail footer's reserved area (not its sum)
        f.seek(size - 512 + 0x100)
        f.write(b"\x01")
        if kind == "dynamic":     # and the head copy, so no good copy remains
            f.seek(0x100)
            f.write(b"\x01")
    with open_image(p) as img:
        assert img.read(0, 512) == bytes(512)
        assert any("checksum" in c.text for c in img.check())
    assert "checksum" in capsys.readouterr().err
    _refused(p, "checksum.*refusing to open for writing", writable=True)
    with open_image(p, writable=True, force=True) as img:
        img.write(0, b"forced")
    with open_image(p) as img:
        assert img.read(0, 6) == b"forced" and img.check() == []


def test_bad_tail_checksum_falls_back_to_the_head_copy(tmp_path: Path) -> None:
    p = tmp_path / "h.vhd"
    create_vhd(p, 2 * MiB)
    patch_footer(p, current_size=MiB)        # both copies say 1 MiB, sums correct
    with open(p, "r+b") as f:                  # break the tail's sum
        f.seek(p.stat().st_size - 512 + 0x40)
        f.write(b"\0\0\0\0")
    with open_image(p) as img:
        assert img.size == MiB
        assert any("using the copy at offset 0" in c.text for c in img.check())
    with open_image(p, writable=True, force=True) as img:
        img.write(0, b"x")
    with open_image(p) as img:
        assert img.size == MiB and img.check() == []


def test_bad_header_checksum(tmp_path: Path) -> None:
    p = tmp_path / "hc.vhd"
    create_vhd(p, 2 * MiB)
    with open(p, "r+b") as f:
        f.seek(512 + 0x300)
        f.write(b"\x07")
    with open_image(p) as img:
        assert any("header checksum" in c.text for c in img.check())
    _refused(p, "header checksum", writable=True)


def test_head_only_footer_read_only_then_forced_repair(tmp_path: Path) -> None:
    p = tmp_path / "ho.vhd"
    data = _dynamic_with_data(p)
    os.truncate(p, p.stat().st_size - 512)
    with open_image(p) as img:
        assert img.read(0, img.size) == data
        assert any("no footer at the end" in c.text for c in img.check())
    _refused(p, "no footer", writable=True)
    with open_image(p, writable=True, force=True) as img:
        img.write(2 * MiB, b"C" * 10)     # allocation writes a footer at the new end
    with open_image(p) as img:
        assert img.check() == [] and img.read(2 * MiB, 10) == b"C" * 10


def test_fixed_current_size_beyond_data_is_refused_but_chs_beyond_data_reads_zeros(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    create_vhd(p, MiB, "fixed")
    patch_footer(p, current_size=64 * MiB)
    _refused(p, "claims 67108864 bytes")
    # a QEMU 2012-style image: CHS (qemu creator) covers more than the data written
    patch_footer(p, current_size=MiB, creator_app=b"qemu", cylinders=40, heads=4, sectors=17)
    with open_image(p) as img:
        assert img.size == 40 * 4 * 17 * 512 > MiB and img.read(MiB - 2, 10) == bytes(10)


def test_511_byte_footer(tmp_path: Path) -> None:
    p = tmp_path / "old.vhd"
    create_vhd(p, MiB, "fixed")
    with open_image(p, writable=True) as img:
        img.write(0, b"old")
    os.truncate(p, p.stat().st_size - 1)
    with open_image(p) as img:
        assert img.size == MiB and img.read(0, 3) == b"old" and img.check() == []


@pytest.mark.parametrize("field,value,match", [
    ("max_table_entries", 0xFFFFFFFF, "runs past the end"),
    ("max_table_entries", 0, "max_table_entries 0"),
    ("block_size", 1 << 31, "block size"),
    ("block_size", 3000, "block size"),
    ("block_size", 256, "block size"),
    ("table_offset", 1 << 62, "runs past the end"),
])
def test_hostile_header_values_fail_before_allocating(tmp_path: Path, field: str, value: int, match: str) -> None:
    p = tmp_path / "x.vhd"
    create_vhd(p, 4 * MiB)
    patch_header(p, **{field: value})
    _refused(p, match)


def test_too_small_bat_for_the_size(tmp_path: Path) -> None:
    p = tmp_path / "s.vhd"
    create_vhd(p, 4 * MiB)
    patch_footer(p, current_size=64 * MiB)
    _refused(p, "too few")


def test_header_offset_outside_the_file(tmp_path: Path) -> None:
    p = tmp_path / "ho.vhd"
    create_vhd(p, 4 * MiB)
    patch_footer(p, data_offset=0xFFFFFFFFFFFFFFFF)
    _refused(p, "outside the file")


def test_unsupported_disk_type(tmp_path: Path) -> None:
    p = tmp_path / "u.vhd"
    create_vhd(p, MiB, "fixed")
    patch_footer(p, disk_type=5)
    with pytest.raises(UnsupportedError, match="type 5"):
        open_image(p)


def test_huge_locator_length_is_ignored_not_allocated(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_vhd(base, MiB)
    child = tmp_path / "child.vhd"
    create_vhd(child, type="differencing", parent=base)
    h = read_header(child)
    h.locators[0].data_length = 0xFFFFFFFF
    h.locators[1].data_space = 0xFFFFFFFF
    patch_header(child, locators=h.locators)
    with open_image(child) as img:      # found by its header name instead
        assert len(img.chain) == 2
        assert any("outside the file" in c.text for c in img.check())
        assert any("invalid data space" in c.text for c in img.check())


def test_not_a_vhd(tmp_path: Path) -> None:
    p = tmp_path / "junk.vhd"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError):
        open_image(p)


FLIP = st.tuples(st.integers(0, 4095), st.integers(1, 255))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FLIP, min_size=1, max_size=6), st.booleans())
def test_corrupt_metadata_raises_only_vhdfs_errors(flips: list, at_tail: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.vhd"
        create_vhd(base, 2 * MiB, block_size=65536)
        with open_image(base, writable=True) as img:
            img.write(70000, b"p" * 3000)
        child = Path(tmp) / "child.vhd"
        create_vhd(child, type="differencing", parent=base, block_size=4096)
        with open_image(child, writable=True) as img:
            img.write(100, b"c" * 9000)
        target = base if at_tail else child
        data = bytearray(target.read_bytes())
        for pos, x in flips:
            pos = pos if not at_tail else len(data) - 1 - pos % 1024
            data[pos % len(data)] ^= x
        target.write_bytes(bytes(data))
        before = sha256(target)
        for writable in (False, True):
            try:
                with open_image(child, writable=writable) as img:
                    img.read(0, img.size)
                    img.check()
                    img.describe()
            except VhdfsError as exc:
                assert "\n" not in str(exc)
        assert sha256(target) == before     # neither a failed nor a write-free open changes it


def test_failed_bat_write_leaves_memory_and_file_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "crash.vhd"
    create_vhd(p, 4 * MiB)
    img = open_image(p, writable=True)
    real = img.file.pwrite

    def failing(data: object, offset: int) -> None:
        if offset == 1536:          # the BAT entry of block 0
            raise OSError(5, "simulated I/O error")
        real(data, offset)

    monkeypatch.setattr(img.file, "pwrite", failing)
    img.write(0, b"lost")       # the BAT entry waits for the commit (group commit) ...
    assert img.read(0, 4) == b"lost"
    with pytest.raises(OSError):
        img.flush()             # ... which fails, so memory rolls back to what the file holds
    assert img.bat[0] == fmt.UNUSED_BAT and img.read(0, 4) == bytes(4)
    monkeypatch.setattr(img.file, "pwrite", real)
    img.write(0, b"kept")
    img.close()
    with open_image(p) as again:
        assert again.read(0, 4) == b"kept" and again.check() == []
        assert read_footer(p).pack() == p.read_bytes()[:512]


def test_copy_of_corpus_file_is_not_modified_by_reads(corpus_dir: Path, tmp_path: Path) -> None:
    src = corpus_dir / "dissect-win10-ntfs-dynamic.vhd"
    dst = tmp_path / "copy.vhd"
    shutil.copyfile(src, dst)
    before = sha256(dst)
    with open_image(dst) as img:
        img.read(0, img.size)
    assert sha256(dst) == before
