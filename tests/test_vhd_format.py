"""VHD on-disk structures (vhdfs.format.vhd) and the bitmap run scanner, without any file I/O."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdfs.formats.vhd.bitmap import all_set, count_set, runs, set_bits
from vhdfs.errors import FormatError
from vhdfs.formats.vhd import spec as fmt
from vhdfs.formats.vhd import spec_batmap as vbat
from vhdfs.formats.vhd import spec_locators as vloc


def test_checksum_is_ones_complement_of_byte_sum_without_the_field() -> None:
    f = fmt.make_footer(10 * 1024 * 1024, fmt.DISK_FIXED)
    raw = f.pack()
    stored = struct.unpack_from(">I", raw, 0x40)[0]
    assert stored == ~(sum(raw) - sum(raw[0x40:0x44])) & 0xFFFFFFFF
    assert fmt.parse_footer(raw).checksum_ok


def test_footer_round_trip_and_bad_checksum_is_flagged_not_fatal() -> None:
    f = fmt.make_footer(5 * 1024 * 1024, fmt.DISK_DYNAMIC)
    raw = bytearray(f.pack())
    g = fmt.parse_footer(bytes(raw))
    assert (g.current_size, g.disk_type, g.unique_id, g.data_offset) == (5 << 20, 3, f.unique_id, 512)
    raw[0x30] ^= 1
    assert not fmt.parse_footer(bytes(raw)).checksum_ok


def test_511_byte_footer_parses_with_the_same_checksum() -> None:
    raw = fmt.make_footer(1 << 20, fmt.DISK_FIXED).pack()
    assert fmt.parse_footer(raw[:511]).checksum_ok


def test_footer_without_cookie_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="conectix"):
        fmt.parse_footer(bytes(512))


@pytest.mark.parametrize("size,chs", [
    (5 * 1024**3, (10402, 16, 63)),          # FORMATS §1.4 example, rounds down
    (10 * 1024 * 1024, (301, 4, 17)),          # Windows 10 corpus images
    (33562624, (964, 4, 17)),
    (200 * 1024**3, (65535, 16, 255)),         # capped at the maximum
])
def test_chs_geometry_follows_the_spec_appendix(size: int, chs: tuple[int, int, int]) -> None:
    assert fmt.chs_geometry(size) == chs


@pytest.mark.parametrize("app,geometry,expected", [
    (b"vpc ", (241, 4, 17), "chs"), (b"qemu", (241, 4, 17), "chs"),
    (b"qemu", (65535, 16, 255), "current"), (b"win ", (241, 4, 17), "current"),
    (b"*img", (150, 4, 17), "current"), (b"wa\0\0", (241, 4, 17), "current"),
    (b"tap\0", (241, 4, 17), "current"), (b"vbox", (241, 4, 17), "current"),
])
def test_qemu10_size_rule(app: bytes, geometry: tuple[int, int, int], expected: str) -> None:
    f = fmt.make_footer(8 * 1024 * 1024 + 1000, fmt.DISK_FIXED, creator_app=app, geometry=geometry)
    size, rule = fmt.virtual_size(f)
    assert rule == expected
    assert size == (f.chs_size if expected == "chs" else (8 * 1024 * 1024 + 1000) // 512 * 512)
    assert fmt.virtual_size(f, "chs") == (f.chs_size, "chs")
    assert fmt.virtual_size(f, "current")[1] == "current"
    with pytest.raises(FormatError):
        fmt.virtual_size(f, "bogus")


def _header(**kw: object) -> bytes:
    h = fmt.DynamicHeader(fmt.HEADER_DATA_OFFSET, 1536, fmt.HEADER_VERSION, 4, 2 << 20, 0,
                          bytes(16), 0, b"")
    for k, v in kw.items():
        setattr(h, k, v)
    return h.pack()


def test_header_round_trip() -> None:
    h = fmt.parse_header(_header(parent_name_raw="p\u00e4rent.vhd".encode("utf-16-be")))
    assert h.checksum_ok and h.block_size == 2 << 20 and h.parent_name == "p\u00e4rent.vhd"
    assert h.bitmap_size == 512


@pytest.mark.parametrize("bs", [0, 256, 3000, 1 << 31, 0xFFFFFFFF])
def test_absurd_block_sizes_are_refused(bs: int) -> None:
    with pytest.raises(FormatError, match="block size"):
        fmt.parse_header(_header(block_size=bs))


def test_bitmap_size_rounds_up_to_a_sector() -> None:
    assert [fmt.bitmap_size(b) for b in (512, 4096, 2 << 20, 4 << 20, 16 << 20)] == [512, 512, 512, 1024, 4096]


def test_locator_space_sectors_or_bytes() -> None:
    assert fmt.Locator(fmt.PLAT_W2RU, 1, 20, 0, 0).space_bytes() == 512
    assert fmt.Locator(fmt.PLAT_W2RU, 4096, 20, 0, 0).space_bytes() == 4096
    assert fmt.Locator(fmt.PLAT_W2RU, 1000, 20, 0, 0).space_bytes() is None


def test_locator_decoding() -> None:
    assert vloc.decode_locator(fmt.PLAT_W2RU, ".\\p.vhd".encode("utf-16-le") + b"\0\0junk") == ".\\p.vhd"
    assert vloc.decode_locator(fmt.PLAT_MACX, b"file://localhost/a%20b.vhd\0") == "file://localhost/a%20b.vhd"
    assert vloc.decode_locator(fmt.PLAT_WI2K, b"c:\\x.vhd\0\0") == "c:\\x.vhd"
    assert vloc.decode_locator(fmt.PLAT_MAC, b"alias") is None
    # an unpaired surrogate never raises
    assert vloc.decode_locator(fmt.PLAT_W2KU, b"\x00\xd8a\x00") is not None
    assert fmt.decode_utf16(b"\xd8\x00\x00a", "be")


def test_path_normalisation() -> None:
    assert vloc.windows_path_to_posix(".\\sub\\p.vhd") == ("sub/p.vhd", False)
    assert vloc.windows_path_to_posix("..\\..\\x\\p.vhd") == ("../../x/p.vhd", False)
    assert vloc.windows_path_to_posix("C:\\dir\\p.vhd") == ("/dir/p.vhd", True)
    assert vloc.macx_to_posix("file://localhost/dir/a%20b.vhd") == "/dir/a b.vhd"
    assert vloc.macx_to_posix("file://./p.vhd") == "p.vhd"


def test_uuid_and_timestamps() -> None:
    raw = uuid.uuid4().bytes
    assert fmt.uuid_str(raw) == str(uuid.UUID(bytes=raw))
    assert fmt.vhd_timestamp(946684800 + 5) == 5
    assert fmt.vhd_timestamp(0) == 0
    assert fmt.unix_time(5) == 946684805


def test_batmap_header_and_checksum() -> None:
    h = vbat.BatmapHeader(0, 2048, 1, 0x00010002, 0, 0)
    raw = vbat.pack_batmap_header(h, b"")
    back = vbat.parse_batmap_header(raw, 1536)
    assert back is not None and back.map_offset == 2048 and back.map_sectors == 1
    assert vbat.parse_batmap_header(bytes(512), 0) is None
    assert vbat.batmap_checksum(b"\x80\x01", 0x00010002) == ~0x81 & 0xFFFFFFFF
    assert vbat.batmap_checksum(b"\x80\x01", 0x00010001) == ~(-128 + 1) & 0xFFFFFFFF


# -- bitmap runs against a naive per-bit reference --------------------------------------------

def _naive(bm: bytes, s0: int, s1: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for s in range(s0, s1):
        bit = bool(bm[s // 8] & (0x80 >> (s % 8)))
        if out and out[-1][2] == bit and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1, bit)
        else:
            out.append((s, s + 1, bit))
    return out


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_runs_match_a_per_bit_reference(bm: bytes, data: st.DataObject) -> None:
    n = len(bm) * 8
    s0 = data.draw(st.integers(0, n - 1))
    s1 = data.draw(st.integers(s0, n))
    assert list(runs(bm, s0, s1)) == _naive(bm, s0, s1)
    assert all_set(bm, s0, s1) == all(r[2] for r in _naive(bm, s0, s1))
    assert count_set(bm, s0, s1) == sum(r[1] - r[0] for r in _naive(bm, s0, s1) if r[2])


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.data())
def test_set_bits_sets_exactly_the_range(bm: bytes, data: st.DataObject) -> None:
    n = len(bm) * 8
    s0 = data.draw(st.integers(0, n - 1))
    s1 = data.draw(st.integers(s0, n))
    buf = bytearray(bm)
    b0, b1 = set_bits(buf, s0, s1)
    for s in range(n):
        expect = s0 <= s < s1 or bool(bm[s // 8] & (0x80 >> (s % 8)))
        assert bool(buf[s // 8] & (0x80 >> (s % 8))) == expect
    assert buf[:b0] == bm[:b0] and buf[b1:] == bm[b1:]
