"""blktap (XenServer) batmap: read as "block fully populated", kept correct on write."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from vhd_helpers import read_footer, write_footer
from vhdfs.block import open_image
from vhdfs.formats.vhd.create import create_vhd
from vhdfs.formats.vhd import spec as fmt
from vhdfs.formats.vhd import spec_batmap as vbat

MiB = 1024 * 1024
HDR, MAP = 2048, 2560


def _tap_image(path: Path) -> None:
    """An 8 MiB dynamic VHD laid out as tapdisk does: BAT, batmap header, map, then blocks."""
    create_vhd(path, 8 * MiB, "dynamic")
    footer = replace(read_footer(path), creator_app=b"tap\0", creator_version=0x00010003,
                     creator_os=b"\0\0\0\0")
    with open(path, "r+b") as f:
        f.truncate(3072)
        f.seek(HDR)
        f.write(vbat.pack_batmap_header(vbat.BatmapHeader(HDR, MAP, 1, 0x00010002,
                                                        vbat.batmap_checksum(bytes(512), 0x00010002), 0), b""))
        f.seek(MAP)
        f.write(bytes(512))
        f.write(bytes(512))   # footer slot at 3072
    write_footer(path, footer)


def _set_batmap(path: Path, first_byte: int) -> None:
    data = bytes([first_byte]) + bytes(511)
    with open(path, "r+b") as f:
        f.seek(MAP)
        f.write(data)
        f.seek(HDR)
        f.write(vbat.pack_batmap_header(
            vbat.BatmapHeader(HDR, MAP, 1, 0x00010002, vbat.batmap_checksum(data, 0x00010002), 0), b""))


def _batmap_state(path: Path) -> tuple[int, bool]:
    raw = path.read_bytes()
    hdr = vbat.parse_batmap_header(raw[HDR:HDR + 512], HDR)
    assert hdr is not None
    data = raw[MAP:MAP + 512]
    return data[0], vbat.batmap_checksum(data, hdr.version) == hdr.checksum


def test_batmap_is_read_and_kept_correct(tmp_path: Path) -> None:
    p = tmp_path / "tap.vhd"
    _tap_image(p)
    pattern = bytes(range(256)) * (2 * MiB // 256)
    with open_image(p, writable=True) as img:
        assert img.describe()["batmap"] and img.check() == []
        img.write(0, pattern)                      # block 0 full
        img.write(2 * MiB + 10, b"partial")        # block 1 partial
        assert min(e for e in img.bat if e != fmt.UNUSED_BAT) * 512 >= 3072   # past the batmap
    bat = struct.unpack(">4I", p.read_bytes()[1536:1552])
    # tapdisk marks block 0 full; we also plant a stale bit for unallocated block 2, and zero
    # block 0's own bitmap so only the batmap says it is populated
    _set_batmap(p, 0x80 | 0x20)
    with open(p, "r+b") as f:
        f.seek(bat[0] * 512)
        f.write(bytes(512))
    with open_image(p) as img:
        assert img.read(0, 2 * MiB) == pattern
        assert img.read(2 * MiB, 17) == bytes(10) + b"partial"
        assert img.check() == []
    with open_image(p, writable=True) as img:
        img.write(100, b"in place")                # block 0 stays full: bit 0 stays
        assert _batmap_state(p) == (0xA0, True)
        img.write(4 * MiB + 1, b"new block")       # block 2 allocated: stale bit cleared first
        assert _batmap_state(p) == (0x80, True)
        img.discard(0, 2 * MiB)                    # block 0 released: bit cleared
        assert _batmap_state(p) == (0x00, True)
        assert img.read(0, 2 * MiB) == bytes(2 * MiB)
    with open_image(p) as img:
        assert img.read(4 * MiB, 10) == b"\0new block" and img.check() == []


def test_batmap_with_bad_checksum_is_ignored_then_cleared(tmp_path: Path) -> None:
    p = tmp_path / "tap.vhd"
    _tap_image(p)
    with open_image(p, writable=True) as img:
        img.write(0, b"x" * 512)
    with open(p, "r+b") as f:                       # a set bit, but a wrong sum
        f.seek(MAP)
        f.write(b"\x80")
    with open_image(p) as img:
        assert img.read(0, 1024) == b"x" * 512 + bytes(512)   # the bit is not trusted
        assert any("batmap checksum" in c.text for c in img.check())
    with open_image(p, writable=True, force=True) as img:
        img.write(6 * MiB, b"y")
    assert _batmap_state(p) == (0x00, True)
