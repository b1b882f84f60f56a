"""The named bad VHD images: one builder each, and ``VHD_CASES`` (see ``synthetic.Case``)."""

from __future__ import annotations

import os
import uuid as uuidlib

from .content import MiB, patch_bytes, pattern, truncate
from .corpus import corpus_copy, corpus_sha256
from .synthetic import (
    CHILD_RAW_SECTORS,
    DYN_RAW,
    DYN_SIZE,
    FIXED_RAW,
    Built,
    Case,
    dyn_vhd,
    err,
    fixed_vhd,
    ok,
    patched,
    vhd_chain,
)
from .writers_vdi import build_vdi
from .writers_vhd import (
    W2KU,
    W2RU,
    VhdInfo,
    build_sparse_vhd,
    patch_vhd_footer,
    patch_vhd_header,
    set_bat_entry,
    vhd_bat,
    w2_locators,
)


def _b_zero(d, c):
    p = d / "empty.vhd"
    p.write_bytes(b"")
    return err(p)


def _b_dyn_trunc_footer(d, c):
    i = dyn_vhd(d)
    truncate(i.path, i.file_size - 100)
    return ok(i.path, DYN_RAW)


def _b_dyn_trunc_header(d, c):
    i = dyn_vhd(d)
    truncate(i.path, 512 + 300)
    return err(i.path)


def _b_dyn_trunc_bat(d, c):
    i = dyn_vhd(d)
    truncate(i.path, i.table_offset + 6)
    return err(i.path)


def _b_dyn_trunc_bitmap(d, c):
    i = dyn_vhd(d)
    last = max(i.blocks.values())
    truncate(i.path, last + 100)
    return err(i.path)


def _b_dyn_trunc_block(d, c):
    i = dyn_vhd(d)
    last = max(i.blocks.values())
    truncate(i.path, last + 512 + MiB + 4096)
    return err(i.path)


def _b_corpus_trunc_block(d, c):
    p = corpus_copy(c, d, "dissect-win10-ntfs-dynamic.vhd")
    truncate(p, os.path.getsize(p) - 512 - MiB)
    return err(p)


def _b_fixed_trunc_footer(d, c):
    p = fixed_vhd(d)
    truncate(p, os.path.getsize(p) - 100)
    return err(p)


def _b_fixed_trunc_data(d, c):
    p = fixed_vhd(d)
    truncate(p, 3 * MiB)
    return err(p)


def _b_tiny(d, c):
    i = dyn_vhd(d)
    truncate(i.path, 300)
    return err(i.path)


_b_dyn_cookie_both = patched(dyn_vhd, patch_vhd_footer, cookie=b"conectiX")


def _b_dyn_cookie_tail(d, c):
    i = dyn_vhd(d)
    patch_vhd_footer(i.path, which="tail", cookie=b"conectiX")
    return ok(i.path, DYN_RAW)


_b_dyn_header_cookie = patched(dyn_vhd, patch_vhd_header, cookie=b"cxsparsX")


def _b_fixed_cookie(d, c):
    p = fixed_vhd(d)
    patch_vhd_footer(p, which="tail", cookie=b"conectiX")
    return err(p)


def _b_dyn_csum_tail(d, c):
    i = dyn_vhd(d)
    patch_vhd_footer(i.path, which="tail", fix=False, checksum=0x12345678)
    return ok(i.path, DYN_RAW)


def _b_dyn_csum_both(d, c):
    i = dyn_vhd(d)
    patch_vhd_footer(i.path, fix=False, checksum=0x12345678)
    return ok(i.path, DYN_RAW)


def _b_corpus_csum_both(d, c):
    p = corpus_copy(c, d, "dfvfs-qemu-ext2-dynamic.vhd")
    patch_vhd_footer(p, fix=False, checksum=0)
    return Built(p, corpus_sha256("dfvfs-qemu-ext2-dynamic.vhd"))


def _b_fixed_csum(d, c):
    p = fixed_vhd(d)
    patch_vhd_footer(p, which="tail", fix=False, checksum=0xDEADBEEF)
    return ok(p, FIXED_RAW)


def _b_corpus_fixed_csum(d, c):
    p = corpus_copy(c, d, "qemu-fixed-mbr-fat16.vhd")
    patch_vhd_footer(p, which="tail", fix=False, checksum=1)
    return Built(p, corpus_sha256("qemu-fixed-mbr-fat16.vhd"))


def _b_dyn_header_csum(d, c):
    i = dyn_vhd(d)
    patch_vhd_header(i.path, fix=False, checksum=0)
    return ok(i.path, DYN_RAW)


def _b_bat_past_eof(d, c):
    i = dyn_vhd(d)
    set_bat_entry(i.path, 2, (i.file_size + 8 * MiB) // 512)
    return err(i.path)


def _b_bat_partly_past_eof(d, c):
    # The block starts inside the file but its data runs past the end.
    i = dyn_vhd(d)
    set_bat_entry(i.path, 2, (i.file_size - 4096) // 512)
    return err(i.path)


def _b_bat_duplicate(d, c):
    i = dyn_vhd(d)
    _table, bat = vhd_bat(i.path)
    set_bat_entry(i.path, 2, bat[0])
    flat = bytearray(DYN_RAW)
    flat[4 * MiB:6 * MiB] = DYN_RAW[0:2 * MiB]   # what the BAT now says block 2 holds
    return ok(i.path, bytes(flat))


def _b_bat_into_header(d, c):
    # A block whose data would sit on top of the footer copy / header / BAT.
    i = dyn_vhd(d)
    set_bat_entry(i.path, 1, 0)
    flat = bytearray(DYN_RAW)
    with open(i.path, "rb") as f:
        f.seek(512)  # bitmap = the first 512 bytes (the footer copy); data from offset 512
        flat[2 * MiB:4 * MiB] = f.read(2 * MiB)
    return Built(i.path)


_b_bat_2_32 = patched(dyn_vhd, patch_vhd_header, max_table_entries=0xFFFFFFFF)


def _b_corpus_bat_2_32(d, c):
    p = corpus_copy(c, d, "xo-base.vhd")
    patch_vhd_header(p, max_table_entries=0xFFFFFFFF)
    return err(p)


_b_bat_too_few = patched(dyn_vhd, patch_vhd_header, max_table_entries=1)
_b_bat_zero = patched(dyn_vhd, patch_vhd_header, max_table_entries=0)
_b_block_2_31 = patched(dyn_vhd, patch_vhd_header, block_size=1 << 31)
_b_block_not_pow2 = patched(dyn_vhd, patch_vhd_header, block_size=3 * MiB)
_b_block_zero = patched(dyn_vhd, patch_vhd_header, block_size=0)
_b_header_offset_far = patched(dyn_vhd, patch_vhd_footer, data_offset=1 << 62)
_b_header_offset_max = patched(dyn_vhd, patch_vhd_footer, data_offset=0xFFFFFFFFFFFFFFFF)
_b_bat_offset_past_eof = patched(dyn_vhd, patch_vhd_header, table_offset=1 << 40)
_b_vsize_huge = patched(dyn_vhd, patch_vhd_footer, current_size=0xFFFFFFFFFFFFFE00)


def _b_fixed_vsize_larger(d, c):
    # A fixed footer claiming more data than the file holds.
    p = fixed_vhd(d)
    patch_vhd_footer(p, which="tail", current_size=64 * MiB)
    return err(p)


_b_disk_type_5 = patched(dyn_vhd, patch_vhd_footer, disk_type=5)


def _b_disk_type_0(d, c):
    p = fixed_vhd(d)
    patch_vhd_footer(p, which="tail", disk_type=0)
    return err(p)


def _b_diff_parent_missing(d, c):
    parent, child, _flat = vhd_chain(d)
    parent.path.unlink()
    return err(child.path)


def _b_corpus_parent_missing(d, c):
    p = corpus_copy(c, d, "xo-child2.vhd")
    corpus_copy(c, d, "xo-base.vhd")     # grandparent present, direct parent (xo-child1) missing
    return err(p)


def _b_diff_uuid_mismatch(d, c):
    parent, child, _flat = vhd_chain(d)
    patch_vhd_footer(parent.path, unique_id=uuidlib.UUID(int=0x1234).bytes)
    return err(child.path)


def _b_corpus_uuid_mismatch(d, c):
    p = corpus_copy(c, d, "xo-child1.vhd")
    base = corpus_copy(c, d, "xo-base.vhd")
    patch_vhd_footer(base, unique_id=uuidlib.UUID(int=0xABCDEF).bytes)
    return err(p)


def _b_diff_parent_smaller(d, c):
    # a grown child (Resize-VHD on a differencing disk): past the parent's end it reads zeros
    _parent, child, _flat = vhd_chain(d, parent_size=4 * MiB)
    flat = bytearray(DYN_RAW[:4 * MiB] + bytes(DYN_SIZE - 4 * MiB))
    for s, data in CHILD_RAW_SECTORS.items():
        flat[s * 512:(s + 1) * 512] = data
    return ok(child.path, bytes(flat))


def _b_diff_parent_larger(d, c):
    # a shrunk child: only the parent's prefix counts
    _parent, child, flat = vhd_chain(d, parent_size=8 * MiB)
    return ok(child.path, flat)


def retarget_locators(info: VhdInfo, name: str) -> None:
    """Point every W2ru/W2ku locator of ``info`` at ``name`` (lengths updated, sums fixed)."""
    for idx, (code, off, _length) in enumerate(info.locators):
        text = {W2RU: ".\\" + name, W2KU: "C:\\nowhere\\" + name}[code].encode("utf-16-le")
        assert len(text) <= 512
        patch_bytes(info.path, off, text.ljust(512, b"\0"))
        patch_vhd_header(info.path, **{f"loc{idx}_length": len(text)})


def _b_diff_loop(d, c):
    # parent <- a <- b, then a's parent id, name and locators patched to name b: a -> b -> a.
    _parent, a, _flat = vhd_chain(d, child_name="a.vhd")
    b = build_sparse_vhd(d / "b.vhd", DYN_SIZE, {3: pattern(512, 5)}, disk_type=4,
                         parent_uid=a.uid, parent_name="a.vhd", locators=w2_locators("a.vhd"))
    retarget_locators(a, "b.vhd")
    patch_vhd_header(a.path, parent_id=b.uid, parent_name="b.vhd".encode("utf-16-be"))
    return err(a.path)


def _b_diff_self_loop(d, c):
    _parent, child, _flat = vhd_chain(d)
    retarget_locators(child, "child.vhd")
    patch_vhd_header(child.path, parent_id=child.uid,
                     parent_name="child.vhd".encode("utf-16-be"))
    return err(child.path)


def _b_diff_locator_outside(d, c):
    # W2ru points past the end of the file; W2ku and the parent name still find the parent.
    _parent, child, flat = vhd_chain(d)
    patch_vhd_header(child.path, loc0_offset=child.file_size + 1 * MiB)
    return ok(child.path, flat)


def _b_diff_locator_4g(d, c):
    _parent, child, flat = vhd_chain(d)
    patch_vhd_header(child.path, loc0_length=0xFFFFFFFF)
    return ok(child.path, flat)


def _b_diff_locator_space_4g(d, c):
    _parent, child, flat = vhd_chain(d)
    patch_vhd_header(child.path, loc0_space=0xFFFFFFFF)
    return ok(child.path, flat)


def _b_diff_all_locators_bad(d, c):
    # Every locator outside the file and no parent name: nothing names the parent.
    _parent, child, _flat = vhd_chain(d, parent_name="")
    patch_vhd_header(child.path, loc0_offset=1 << 50, loc1_offset=1 << 50)
    return err(child.path)


def _b_diff_parent_is_vdi(d, c):
    parent, child, _flat = vhd_chain(d)
    parent.path.unlink()
    build_vdi(parent.path, DYN_RAW)  # a VDI where the VHD parent should be
    return err(child.path)


def _b_diff_parent_broken(d, c):
    parent, child, _flat = vhd_chain(d)
    patch_vhd_header(parent.path, max_table_entries=0xFFFFFFFF)
    return err(child.path)


VHD_CASES: list[Case] = [
    # -- VHD: truncation ---------------------------------------------------------------------
    Case("zero-length", _b_zero, "NotAnImageError", ("empty file",)),
    Case("vhd-shorter-than-footer", _b_tiny, "NotAnImageError", ("not a VHD",)),
    Case("dyn-truncated-in-footer", _b_dyn_trunc_footer, None,
         warnings=("no footer at the end of the file; using the copy at offset 0",),
         writable_refused=True, check_finds=("no footer at the end",)),
    Case("dyn-truncated-in-header", _b_dyn_trunc_header, "FormatError",
         ("dynamic header offset 512 lies outside the file",)),
    Case("dyn-truncated-in-bat", _b_dyn_trunc_bat, "FormatError",
         ("BAT (3 entries at offset 1536) runs past the end of the file",)),
    Case("dyn-truncated-in-bitmap", _b_dyn_trunc_bitmap, "FormatError",
         ("BAT entry 0 points past the end of the file",)),
    Case("dyn-truncated-in-block", _b_dyn_trunc_block, "FormatError",
         ("BAT entry 0 points past the end of the file",)),
    Case("corpus-dyn-truncated-in-block", _b_corpus_trunc_block, "FormatError",
         ("points past the end of the file",), needs_corpus=True),
    Case("fixed-truncated-in-footer", _b_fixed_trunc_footer, "NotAnImageError",
         ("not a VHD",)),
    Case("fixed-truncated-in-data", _b_fixed_trunc_data, "NotAnImageError",
         ("not a VHD",)),
    # -- VHD: cookies and checksums ------------------------------------------------------------
    Case("dyn-wrong-cookie-both-footers", _b_dyn_cookie_both, "NotAnImageError",
         ("not a VHD",)),
    Case("dyn-wrong-cookie-tail-footer", _b_dyn_cookie_tail, None,
         warnings=("using the copy at offset 0",), writable_refused=True),
    Case("dyn-wrong-header-cookie", _b_dyn_header_cookie, "FormatError",
         ("no dynamic disk header (cookie 'cxsparse' not found)",)),
    Case("fixed-wrong-cookie", _b_fixed_cookie, "NotAnImageError", ("not a VHD",)),
    Case("dyn-bad-footer-checksum-tail", _b_dyn_csum_tail, None,
         warnings=("footer checksum mismatch (stored 0x12345678); using the copy at offset 0",),
         writable_refused=True, check_finds=("footer checksum mismatch",)),
    Case("dyn-bad-footer-checksum-both", _b_dyn_csum_both, None,
         warnings=("footer checksum mismatch (stored 0x12345678)",), writable_refused=True,
         check_finds=("footer checksum mismatch",)),
    Case("corpus-dyn-bad-footer-checksum", _b_corpus_csum_both, None,
         warnings=("footer checksum mismatch (stored 0x00000000)",), writable_refused=True,
         needs_corpus=True),
    Case("fixed-bad-footer-checksum", _b_fixed_csum, None,
         warnings=("footer checksum mismatch (stored 0xdeadbeef)",), writable_refused=True,
         check_finds=("footer checksum mismatch",)),
    Case("corpus-fixed-bad-footer-checksum", _b_corpus_fixed_csum, None,
         warnings=("footer checksum mismatch",), writable_refused=True, needs_corpus=True),
    Case("dyn-bad-header-checksum", _b_dyn_header_csum, None,
         warnings=("dynamic header checksum mismatch (stored 0x00000000)",),
         writable_refused=True, check_finds=("dynamic header checksum mismatch",)),
    # -- VHD: BAT -------------------------------------------------------------------------------
    Case("bat-entry-past-eof", _b_bat_past_eof, "FormatError",
         ("BAT entry 2 points past the end of the file",)),
    Case("bat-entry-partly-past-eof", _b_bat_partly_past_eof, "FormatError",
         ("BAT entry 2 points past the end of the file",)),
    Case("bat-two-entries-one-block", _b_bat_duplicate, None,
         warnings=("BAT entries 0 and 2 overlap",), writable_refused=True,
         check_finds=("BAT entries 0 and 2 overlap",)),
    Case("bat-entry-on-metadata", _b_bat_into_header, None,
         warnings=("BAT entry 1 (block at 0) overlaps the",), writable_refused=True,
         check_finds=("overlaps the",)),
    Case("bat-claims-2^32-entries", _b_bat_2_32, "FormatError",
         ("BAT (4294967295 entries at offset 1536) runs past the end of the file",)),
    Case("corpus-bat-claims-2^32-entries", _b_corpus_bat_2_32, "FormatError",
         ("BAT (4294967295 entries", "runs past the end of the file"), needs_corpus=True),
    Case("bat-too-few-entries", _b_bat_too_few, "FormatError",
         ("BAT has 1 entries of 2097152 bytes, too few for the virtual size 6291456",)),
    Case("bat-zero-entries", _b_bat_zero, "FormatError", ("max_table_entries 0",)),
    Case("block-size-2^31", _b_block_2_31, "FormatError", ("block size 2147483648",)),
    Case("block-size-3MiB", _b_block_not_pow2, "FormatError",
         ("block size 3145728 must be a power of two",)),
    Case("block-size-0", _b_block_zero, "FormatError", ("block size 0",)),
    Case("header-offset-2^62", _b_header_offset_far, "FormatError",
         ("dynamic header offset 4611686018427387904 lies outside the file",)),
    Case("header-offset-all-ones", _b_header_offset_max, "FormatError",
         ("dynamic header offset 18446744073709551615 lies outside the file",)),
    Case("bat-offset-past-eof", _b_bat_offset_past_eof, "FormatError",
         ("runs past the end of the file",)),
    Case("virtual-size-2^64", _b_vsize_huge, "FormatError",
         ("exceeds the VHD maximum of 2040 GiB",)),
    # DESIGN.md §5: "impossible sizes" are FormatErrors; at the very least the open must warn.
    Case("fixed-size-larger-than-file", _b_fixed_vsize_larger, "FormatError",
         ("fixed VHD claims 67108864 bytes but holds only 6291456 bytes of data (truncated?)",)),
    Case("disk-type-5", _b_disk_type_5, "UnsupportedError",
         ("VHD disk type 5 is not supported",)),
    Case("disk-type-0", _b_disk_type_0, "UnsupportedError",
         ("VHD disk type 0 is not supported",)),
    # -- VHD: chains ----------------------------------------------------------------------------
    Case("diff-parent-missing", _b_diff_parent_missing, "ChainError",
         ("parent parent.vhd not found (tried", "use --parent-dir DIR")),
    Case("corpus-diff-parent-missing", _b_corpus_parent_missing, "ChainError",
         ("parent xo-child1.vhd not found",), needs_corpus=True),
    Case("diff-uuid-mismatch", _b_diff_uuid_mismatch, "ChainError",
         ("not found with id", "has id 00000000-0000-0000-0000-000000001234",
          "--ignore-parent-id")),
    Case("corpus-diff-uuid-mismatch", _b_corpus_uuid_mismatch, "ChainError",
         ("parent xo-base.vhd not found with id", "--ignore-parent-id"), needs_corpus=True),
    Case("diff-parent-smaller", _b_diff_parent_smaller),
    Case("diff-parent-larger", _b_diff_parent_larger),
    Case("diff-chain-loops", _b_diff_loop, "ChainError", ("chain loops",)),
    Case("diff-parent-is-itself", _b_diff_self_loop, "ChainError", ("chain loops",)),
    Case("diff-locator-outside-file", _b_diff_locator_outside, None,
         warnings=("parent locator 0 (W2ru) data at", "lies outside the file"),
         writable_refused=True, check_finds=("lies outside the file",), check_note=True),
    Case("diff-locator-length-4GiB", _b_diff_locator_4g, None,
         warnings=("parent locator 0 (W2ru) data at 2048 (+4294967295) lies outside the file",),
         writable_refused=True),
    Case("diff-locator-space-4GiB", _b_diff_locator_space_4g, None,
         warnings=("parent locator 0 (W2ru) has an invalid data space 4294967295",),
         writable_refused=True),
    Case("diff-no-usable-locator", _b_diff_all_locators_bad, "ChainError",
         ("parent (unnamed parent) not found (tried no candidate paths; use --parent-dir DIR)",)),
    Case("diff-parent-is-a-vdi", _b_diff_parent_is_vdi, "ChainError",
         ("parent parent.vhd cannot be opened", "is a vdi image; a vhd child needs a vhd parent")),
    Case("diff-parent-broken", _b_diff_parent_broken, "ChainError",
         ("cannot be opened", "runs past the end of the file")),
]
