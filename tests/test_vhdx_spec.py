"""The pure VHDX layer (vhdfs.formats.vhdx): structures, header/region/metadata parsing, log.

Fixtures come from tests/images/vhdx_writer.py, an independent writer that shares no code with
the parser, and from the real files in ../shared/corpus-vhdx (skipped when absent), whose raw
content is checked end to end with a tiny test-local BAT reader -- before any driver exists.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import uuid
from pathlib import Path

import pytest

from images import vhdx_writer as w
from vhdfs.errors import FormatError, UnsupportedError
from vhdfs.formats.vhdx import layout, log, logspec, spec
from vhdfs.formats.vhdx import locator_spec

MiB = 1024 * 1024
G1, G2, G3 = (uuid.UUID(int=n) for n in (0xA1, 0xA2, 0xA3))


def reader(data: bytes | bytearray):
    data = bytes(data)
    return lambda n, o: data[o:o + n]


def open_built(b: w.Built):
    return layout.open_layout(reader(b.data), len(b.data))


def page(byte: int) -> bytes:
    return bytes([byte]) * 4096


# --- spec: pack/parse round trips and CRCs ------------------------------------------------------
def test_header_round_trip_and_crc():
    h = spec.Header(7, G1, G2, G3, 0, 1, MiB, MiB)
    raw = spec.pack_header(h)
    assert len(raw) == 4096 and spec.header_is_valid(raw)
    got = spec.parse_header(raw)
    assert (got.sequence_number, got.file_write_guid, got.log_guid, got.log_offset) == (7, G1, G3, MiB)
    # the independent writer computes the same bytes
    assert raw == w.header_bytes(7, G3, file_write_guid=G1, data_write_guid=G2)
    bad = bytearray(raw)
    bad[4000] ^= 1                  # the CRC covers the reserved area too
    with pytest.raises(FormatError, match="header: bad checksum"):
        spec.parse_header(bytes(bad))


def test_region_table_round_trip():
    entries = [spec.RegionEntry(spec.BAT_REGION, 3 * MiB, MiB, True, 1),
               spec.RegionEntry(spec.METADATA_REGION, 2 * MiB, MiB, False, 0)]
    raw = spec.pack_region_table(entries)
    assert spec.parse_region_table(raw) == entries
    assert raw == w.region_table_bytes([(e.guid, e.file_offset, e.length, e.required) for e in entries])
    with pytest.raises(FormatError, match="bad checksum"):
        spec.parse_region_table(raw[:100] + b"x" + raw[101:])


def test_metadata_table_items_and_locator_round_trip():
    e = [spec.MetadataEntry(spec.FILE_PARAMETERS, 65536, 8, False, False, True, 4),
         spec.MetadataEntry(spec.PAGE83, 65544, 16, False, True, True, 6)]
    assert spec.parse_metadata_table(spec.pack_metadata_table(e)) == e
    p = spec.FileParameters(32 * MiB, True, False)
    assert spec.parse_file_parameters(spec.pack_file_parameters(p)) == p
    keys = {"parent_linkage": "{%s}" % G1, "relative_path": ".\\base.vhdx"}
    raw = locator_spec.pack_parent_locator(keys)
    assert raw == w.locator_bytes(keys)
    assert locator_spec.parse_parent_locator(raw) == (spec.PARENT_LOCATOR_TYPE, keys)
    with pytest.raises(FormatError, match="parent locator"):
        locator_spec.parse_parent_locator(raw[:-2])


def test_bat_entry_bits():
    e = spec.pack_bat_entry(spec.PAYLOAD_FULLY_PRESENT, 5 * MiB)
    assert e == (5 << 20) | 6 and spec.bat_state(e) == 6 and spec.bat_offset(e) == 5 * MiB
    assert spec.bat_offset((1 << 20) | (0xFFFF << 3)) == MiB    # bits 3-19 are reserved


@pytest.mark.parametrize("logical,block,ratio", [(512, 2 * MiB, 2048), (512, 32 * MiB, 128),
                                                 (4096, 1 * MiB, 32768)])
def test_chunk_ratio(logical, block, ratio):
    assert spec.chunk_ratio(logical, block) == ratio


def test_bat_geometry_indexes_and_counts():
    g = spec.bat_geometry(4097 * 2 * MiB, 2 * MiB, 512, False)
    assert (g.chunk_ratio, g.payload_blocks, g.bitmap_blocks) == (2048, 4097, 3)
    assert [g.payload_index(b) for b in (0, 2047, 2048, 4096)] == [0, 2047, 2049, 4098]
    assert [g.bitmap_index(c) for c in (0, 1)] == [2048, 4097]
    assert g.entry_count == 4097 + 4096 // 2048
    d = spec.bat_geometry(10 * MiB, 2 * MiB, 512, True)
    assert (d.payload_blocks, d.entry_count) == (5, 2049)
    assert spec.bat_geometry(10 * MiB, 2 * MiB, 512, False).entry_count == 5


def test_log_structures_round_trip():
    h = logspec.LogEntryHeader(8192, 4096, 9, 1, G1, 5 * MiB, 6 * MiB)
    assert logspec.parse_log_entry_header(logspec.pack_log_entry_header(h)) == h
    z = logspec.ZeroDescriptor(4 * MiB, 8192, 9)
    assert logspec.parse_descriptor(logspec.pack_zero_descriptor(z)) == z
    pg = os.urandom(4096)
    d, sector = logspec.split_page(3 * MiB, pg, (5 << 32) | 9)
    assert logspec.parse_descriptor(logspec.pack_data_descriptor(d)) == d
    seq, body = logspec.parse_data_sector(sector)
    assert seq == (5 << 32) | 9 and logspec.join_page(d, body) == pg
    assert logspec.descriptor_area_length(126) == 4096 and logspec.descriptor_area_length(127) == 8192


# --- layout: header choice, region tables, metadata -------------------------------------------
def test_dynamic_layout_fields():
    b = w.build_vhdx(8 * MiB, block_size=2 * MiB, blocks={1: b"x" * 100, 2: w.ZERO})
    lay, plan, _ = open_built(b)
    assert plan is None and not lay.log_dirty
    assert (lay.block_size, lay.virtual_size, lay.logical_sector_size, lay.physical_sector_size) == (
        2 * MiB, 8 * MiB, 512, 4096)
    assert (lay.chunk_ratio, lay.bat_entry_count, lay.bat_offset) == (2048, 4, w.BAT_OFFSET)
    assert (lay.has_parent, lay.leave_block_allocated, lay.parent_locator) == (False, False, None)
    assert lay.creator == "vhdfs test writer" and lay.page83 == uuid.UUID(int=0xABCDEF)
    assert lay.findings == []


@pytest.mark.parametrize("seqs,slot", [((5, 3), 1), ((3, 5), 2), ((4, 4), 1)])
def test_header_choice_by_sequence(seqs, slot):
    b = w.build_vhdx(4 * MiB, seqs=seqs)
    lay, _, _ = open_built(b)
    assert lay.header_slot == slot and lay.header_sequences == seqs


def test_equal_sequence_headers_must_be_identical():
    b = w.build_vhdx(4 * MiB, seqs=(4, 4))
    b.data[128 * 1024:132 * 1024] = w.header_bytes(4, file_write_guid=G2)
    with pytest.raises(FormatError, match="both have sequence number 4 but differ"):
        open_built(b)


@pytest.mark.parametrize("broken,slot", [(1, 2), (2, 1)])
def test_one_corrupt_header_uses_the_other(broken, slot):
    b = w.build_vhdx(4 * MiB, seqs=(9, 1) if broken == 1 else (1, 9))  # broken one is newer
    b.data[w.HEADER_OFFSETS[broken - 1] + 200] ^= 0x55
    lay, _, _ = open_built(b)
    assert lay.header_slot == slot
    assert f"header {broken}: bad checksum; using header {slot}" in lay.findings


def test_no_valid_header():
    b = w.build_vhdx(4 * MiB)
    for off in w.HEADER_OFFSETS:
        b.data[off + 10] ^= 1
    with pytest.raises(FormatError, match="no valid header"):
        open_built(b)


def test_region_table_2_fallback_and_both_bad():
    b = w.build_vhdx(4 * MiB)
    b.data[w.REGION_OFFSETS[0] + 20] ^= 1
    lay, _, _ = open_built(b)
    assert lay.region_table_slot == 2 and lay.bat_offset == w.BAT_OFFSET
    b.data[w.REGION_OFFSETS[1] + 20] ^= 1
    with pytest.raises(FormatError, match="region table: both copies invalid"):
        open_built(b)


def test_unknown_regions():
    g = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    b = w.build_vhdx(4 * MiB, extra_regions=[(g, 40 * MiB, MiB, False)])
    assert any(str(g) in f for f in open_built(b)[0].findings)
    b = w.build_vhdx(4 * MiB, extra_regions=[(g, 40 * MiB, MiB, True)])
    with pytest.raises(UnsupportedError, match=f"unknown required region {g}"):
        open_built(b)


def test_overlapping_region_and_log_refused():
    b = w.build_vhdx(4 * MiB, extra_regions=[(G1, w.LOG_OFFSET, MiB, False)])
    with pytest.raises(FormatError, match="overlap"):
        open_built(b)


def test_unknown_metadata_items():
    g = uuid.UUID("87654321-1234-5678-9abc-def012345678")
    lay, _, _ = open_built(w.build_vhdx(4 * MiB, extra_items=[(g, b"abcd", 2)]))
    assert any(str(g) in f for f in lay.findings)
    with pytest.raises(UnsupportedError, match=f"unknown required item {g}"):
        open_built(w.build_vhdx(4 * MiB, extra_items=[(g, b"abcd", 4)]))
    # CHS is not in the spec but known (OpenVMM): tolerated even when marked required
    open_built(w.build_vhdx(4 * MiB, extra_items=[(w.CHS_PARAMETERS, bytes(8), 4)]))


def test_items_in_any_order_and_metadata_region_first():
    a = open_built(w.build_vhdx(6 * MiB, block_size=2 * MiB, logical=4096))[0]
    b = open_built(w.build_vhdx(6 * MiB, block_size=2 * MiB, logical=4096, shuffle_items=True,
                                metadata_first=True))[0]
    assert [e.item_id for e in a.metadata_entries] != [e.item_id for e in b.metadata_entries]
    for f in ("block_size", "virtual_size", "logical_sector_size", "physical_sector_size", "page83"):
        assert getattr(a, f) == getattr(b, f)
    assert b.logical_sector_size == 4096 and b.chunk_ratio == 16384


@pytest.mark.parametrize("kw,msg", [
    (dict(block_size=3 * MiB), "block size"),
    (dict(block_size=512 * MiB), "block size"),
    (dict(logical=1024), "logical sector size 1024"),
    (dict(physical=2048), "physical sector size 2048"),
])
def test_metadata_validation(kw, msg):
    with pytest.raises(FormatError, match=msg):
        open_built(w.build_vhdx(8 * MiB, **kw))


def test_virtual_size_must_be_sector_multiple():
    with pytest.raises(FormatError, match="multiple of the logical sector size"):
        open_built(w.build_vhdx(8 * MiB + 512, logical=4096))


def test_fixed_and_differencing():
    fx = open_built(w.build_vhdx(5 * MiB, kind="fixed", block_size=2 * MiB))[0]
    assert fx.leave_block_allocated and fx.bat_entry_count == 3
    keys = {"parent_linkage": "{%s}" % G1, "parent_linkage2": "{%s}" % uuid.UUID(int=0),
            "relative_path": ".\\base.vhdx", "absolute_win32_path": "C:\\vm\\base.vhdx"}
    d = open_built(w.build_vhdx(10 * MiB, kind="differencing", block_size=2 * MiB,
                                parent_locator=keys))[0]
    assert d.has_parent and d.parent_locator == keys and d.bat_entry_count == 2049
    with pytest.raises(FormatError, match="no parent locator"):
        open_built(w.build_vhdx(10 * MiB, kind="differencing"))


def test_hostile_bytes_never_leak_struct_errors():
    b = w.build_vhdx(4 * MiB)
    with pytest.raises(FormatError):
        layout.open_layout(reader(b.data[:200 * 1024]), 200 * 1024)


# --- log: the active sequence ------------------------------------------------------------------
def plan_of(b: w.Built, size: int | None = None):
    return log.plan_replay(reader(b.data), b.log_guid, w.LOG_OFFSET, w.LOG_LENGTH,
                           len(b.data) if size is None else size)


def offsets_of(plan) -> list[int]:
    return [x.file_offset for x in plan.writes]


P = [w.BAT_OFFSET + 4096 * i for i in range(8)]     # loggable targets inside the BAT region


def test_zero_log_guid_never_replays():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(1, {P[0]: page(1)})])
    b.log_guid = uuid.UUID(int=0)
    assert plan_of(b) is None


def test_stale_entries_with_another_log_guid_ignored():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(20, {P[0]: page(1)}, guid=G2), w.Entry(21, {P[1]: page(2)}, guid=G2),
                   w.Entry(3, {P[2]: page(3)})])
    plan = plan_of(b)
    assert offsets_of(plan) == [P[2]] and plan.entry_count == 1 and plan.last_sequence == 3
    reasons = [x for x in log.scan_entries(reader(b.data), G1, w.LOG_OFFSET, w.LOG_LENGTH)
               if isinstance(x, str)]
    assert len(reasons) == 2 and all("is not the header's" in r for r in reasons)


def test_tail_rule_replays_from_head_tail_only():
    b = w.build_vhdx(4 * MiB)
    # entries of 8 KiB each at log offsets 0, 8192, 16384; the head's Tail names the second
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}), w.Entry(6, {P[1]: page(2)}, tail=0),
                   w.Entry(7, {P[2]: page(3)}, tail=8192)])
    plan = plan_of(b)
    assert offsets_of(plan) == [P[1], P[2]] and plan.first_sequence == 6


def test_empty_first_entry_then_data():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(1), w.Entry(2, {P[0]: page(9)}, tail=0)])
    plan = plan_of(b)
    assert plan.entry_count == 2 and [x.data for x in plan.writes] == [page(9)]


def test_non_consecutive_sequence_numbers():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}), w.Entry(7, {P[1]: page(2)}, tail=0)])
    assert offsets_of(plan_of(b)) == [P[0]]        # 7's Tail is outside its own sequence
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}), w.Entry(7, {P[1]: page(2)})])
    assert offsets_of(plan_of(b)) == [P[1]]        # two sequences: the higher head wins


def test_largest_head_wins_regardless_of_position():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(40, {P[0]: page(1)}), w.Entry(41, {P[1]: page(2)}, tail=0),
                   w.Entry(12, {P[2]: page(3)})])
    assert offsets_of(plan_of(b)) == [P[0], P[1]]


def test_torn_entry_is_ignored():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}), w.Entry(6, {P[1]: page(2)}, tail=0, bad_crc=True)])
    assert offsets_of(plan_of(b)) == [P[0]]


def test_data_sector_sequence_mismatch_rejected():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}), w.Entry(6, {P[1]: page(2)}, tail=0,
                                                       data_seq_mismatch=True)])
    assert offsets_of(plan_of(b)) == [P[0]]
    found = log.scan_entries(reader(b.data), G1, w.LOG_OFFSET, w.LOG_LENGTH)
    assert "data sector 0 sequence mismatch" in found[1]


@pytest.mark.parametrize("target,msg", [(64 * 1024, "below 192 KiB"), (w.LOG_OFFSET, "inside the log")])
def test_descriptor_targets_rejected(target, msg):
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {target: page(1)})])
    assert plan_of(b).writes == []
    assert msg in log.scan_entries(reader(b.data), G1, w.LOG_OFFSET, w.LOG_LENGTH)[0]


def test_truncated_file_refused():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}, flushed=len(b.data) + MiB)])
    with pytest.raises(FormatError, match="truncated"):
        plan_of(b)
    with pytest.raises(FormatError, match="truncated"):
        open_built(b)


def test_entry_wrapping_the_log_end():
    b = w.build_vhdx(4 * MiB)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}, at=w.LOG_LENGTH - 4096)])
    assert offsets_of(plan_of(b)) == [P[0]]


def test_sequence_wrapping_the_log_end():
    b = w.build_vhdx(4 * MiB)
    end = w.LOG_LENGTH - 8192
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}, at=end), w.Entry(6, {P[1]: page(2)}, tail=end)])
    plan = plan_of(b)
    assert offsets_of(plan) == [P[0], P[1]] and (plan.tail, plan.head) == (end, 8192)


def test_last_file_offset_extends_the_view():
    b = w.build_vhdx(4 * MiB)
    size = len(b.data)
    b.add_log(G1, [w.Entry(5, {P[0]: page(1)}, last=size + 1)])
    plan = plan_of(b)
    assert plan.new_file_size(size) == size + MiB          # rounded up to 1 MiB, like QEMU
    view = plan.overlay(reader(b.data), size)
    assert view(8192, size - 4096) == bytes(8192) and view(10, size + MiB) == b""


def test_build_entry_matches_writer_and_scans_back():
    pages = {P[3]: os.urandom(4096), P[1]: os.urandom(4096)}
    zeros = {P[5]: 8192}
    raw = log.build_entry(G1, 12, 0, pages, 3 * MiB, 6 * MiB, zeros)
    assert raw == w.log_entry_bytes(w.Entry(12, pages, zeros), G1, 0, 3 * MiB, 6 * MiB)
    b = w.build_vhdx(4 * MiB)
    b.set_headers(log_guid=G1)
    b.data[w.LOG_OFFSET:w.LOG_OFFSET + len(raw)] = raw
    plan = plan_of(b)
    assert [(x.file_offset, x.length, x.data) for x in plan.writes] == [
        (P[5], 8192, None), (P[3], 4096, pages[P[3]]), (P[1], 4096, pages[P[1]])]
    assert (plan.flushed_file_offset, plan.last_file_offset) == (3 * MiB, 6 * MiB)
    empty = log.build_empty_entry(G1, 1, 0, 0, 0)
    assert len(empty) == 4096 and empty == w.log_entry_bytes(w.Entry(1), G1, 0, 0, 0)


def bat_read(lay, pread) -> bytes:
    """Test-local reader: FULLY_PRESENT -> the file at its offset; anything else zeros."""
    n = lay.bat_entry_count
    bat = struct.unpack(f"<{n}Q", pread(8 * n, lay.bat_offset))
    ratio, bs, h = lay.chunk_ratio, lay.block_size, hashlib.sha256()
    zero = bytes(bs)
    for blk in range(-(-lay.virtual_size // bs)):
        e = bat[blk + blk // ratio]
        n = min(bs, lay.virtual_size - blk * bs)
        if e & 7 == 6:
            data = pread(n, (e >> 20) << 20)
            h.update(data + bytes(n - len(data)))
        else:
            h.update(zero[:n])
    return h.hexdigest()


def test_synthetic_dirty_image_end_to_end():
    b = w.build_vhdx(8 * MiB, block_size=MiB, blocks={0: b"\xa5" * MiB, 5: b"\x5a" * 3000,
                                                      6: b"\x77" * MiB})
    want = hashlib.sha256(b.raw_content()).hexdigest()
    real = b.bat_page(0)
    b.data[w.BAT_OFFSET:w.BAT_OFFSET + 4096] = bytes(4096)    # on disk: nothing allocated
    zeroed = w.BAT_OFFSET + 4096 * 2   # a later zero run and page prove ordering works
    b.add_log(G1, [w.Entry(1), w.Entry(2, {w.BAT_OFFSET: real}, zeros={zeroed: 8192}, tail=0),
                   w.Entry(3, {zeroed: page(3)}, tail=0)])
    lay, plan, view = open_built(b)
    assert lay.log_dirty and plan.entry_count == 3
    assert bat_read(lay, view) == want
    assert view(4096, zeroed) == page(3) and view(4096, zeroed + 4096) == bytes(4096)
    assert bat_read(lay, reader(b.data)) == hashlib.sha256(bytes(8 * MiB)).hexdigest()
    out = bytearray(b.data)
    def pwrite(data, off):
        out[off:off + len(data)] = data
    plan.apply(pwrite)
    assert bat_read(lay, reader(out)) == want


# --- the real corpus ----------------------------------------------------------------------------
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus-vhdx"
MANIFEST = CORPUS / "manifest.json"
IMAGES = json.loads(MANIFEST.read_text())["images"] if MANIFEST.is_file() else []


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    if not IMAGES:
        pytest.skip(f"VHDX corpus not found at {CORPUS}")
    out = tmp_path_factory.mktemp("corpus-vhdx")
    for e in IMAGES:
        (out / e["image"]).write_bytes(lzma.decompress((CORPUS / e["stored_as"]).read_bytes()))
    return out


@pytest.mark.parametrize("entry", IMAGES, ids=[e["image"] for e in IMAGES])
def test_corpus_image(entry, corpus_files):
    path = corpus_files / entry["image"]
    fd = os.open(path, os.O_RDONLY)
    try:
        pread = lambda n, o: os.pread(fd, n, o)
        size = os.fstat(fd).st_size
        lay, plan, view = layout.open_layout(pread, size)
        assert (lay.virtual_size, lay.block_size) == (entry["virtual_size"], entry["block_size"])
        assert (lay.logical_sector_size, lay.physical_sector_size) == (
            entry["logical_sector_size"], entry["physical_sector_size"])
        assert lay.has_parent == entry["has_parent"] and lay.log_dirty == entry["log_dirty"]
        assert (plan is not None) == entry["log_dirty"]
        digest = bat_read(lay, view)
        assert digest == entry["expected_raw"]["sha256"]
        assert digest not in entry.get("stale_no_replay_sha256", [])
        if entry["log_dirty"]:
            # the 6 stale entries are skipped, the one entry with the header's LogGuid replayed
            found = log.scan_entries(pread, lay.log_guid, lay.log_offset, lay.log_length)
            assert sum(isinstance(x, str) for x in found) == 6
            assert plan.entry_count == 1
            # and reading without the plan really is the stale content: the test can fail
            stale = layout.read_layout(pread, size, layout.choose_header(pread))
            assert bat_read(stale, pread) in entry["stale_no_replay_sha256"]
    finally:
        os.close(fd)


def test_random_corruption_only_raises_format_errors():
    """Flip bytes in every structure (re-sealing CRCs half the time so parsing goes deeper):
    the only exceptions allowed out are FormatError and its UnsupportedError subclass."""
    import random
    rng = random.Random(1234)
    base = w.build_vhdx(8 * MiB, block_size=MiB, kind="differencing", blocks={0: b"a" * 10},
                        parent_locator={"parent_linkage": "{%s}" % G1})
    base.add_log(G1, [w.Entry(1), w.Entry(2, {P[0]: base.bat_page(0)}, zeros={P[4]: 4096},
                                          tail=0)])
    areas = [(64 * 1024, 64), (128 * 1024, 64), (192 * 1024, 128), (256 * 1024, 128),
             (w.METADATA_OFFSET, 256), (w.METADATA_OFFSET + 65536, 256), (w.LOG_OFFSET, 8192)]
    outcomes = set()
    for _ in range(300):
        d = bytearray(base.data)
        start, span = rng.choice(areas)
        for _ in range(rng.randint(1, 4)):
            d[start + rng.randrange(span)] = rng.randrange(256)
        if rng.random() < 0.5:
            for off, size in ((64 * 1024, 4096), (128 * 1024, 4096), (192 * 1024, 65536),
                              (256 * 1024, 65536)):
                d[off:off + size] = w.sealed(d[off:off + size])
        try:
            layout.open_layout(reader(d), len(d))
            outcomes.add("ok")
        except FormatError as exc:
            assert "\n" not in str(exc)
            outcomes.add(type(exc).__name__)
    assert {"ok", "FormatError"} <= outcomes


def test_bat_scan_yields_exactly_the_nonzero_entries():
    """``Bat.scan`` (``check`` and ``allocated_bytes`` of a huge BAT): every non-zero entry once,
    in order, from file pages and from cached (changed, uncommitted) pages alike, none past the
    entry count, zero pages skipped without decoding -- against a plain decode of the table."""
    import random
    import struct

    from vhdfs.formats.vhdx.bat import ENTRIES_PER_PAGE, PAGE, Bat

    rnd = random.Random(12)
    count = 3 * 256 * ENTRIES_PER_PAGE + 77            # three scan chunks and a partial page
    pages = -(-count // ENTRIES_PER_PAGE)
    table = [0] * (pages * ENTRIES_PER_PAGE)
    for i in ([0, ENTRIES_PER_PAGE - 1, ENTRIES_PER_PAGE, 256 * ENTRIES_PER_PAGE - 1, count - 1]
              + rnd.sample(range(count), 40)):
        table[i] = (rnd.randrange(1, 1 << 40) << 20) | 6
    table[count + 5] = 6                               # past the entry count: never yielded
    raw = bytearray(1 << 20) + bytearray(struct.pack(f"<{len(table)}Q", *table))
    bat = Bat(lambda n, o: bytes(raw[o:o + n]), 1 << 20, count)
    assert list(bat.scan()) == [(i, e) for i, e in enumerate(table[:count]) if e]
    bat[300] = 7                                       # a cached, changed page wins
    bat[ENTRIES_PER_PAGE - 1] = 0
    table[300], table[ENTRIES_PER_PAGE - 1] = 7, 0
    raw[(1 << 20) + 300 * 8:(1 << 20) + 301 * 8] = bytes(8)        # the file still says zero
    assert list(bat.scan(chunk_pages=7)) == [(i, e) for i, e in enumerate(table[:count]) if e]
    assert PAGE == ENTRIES_PER_PAGE * 8
