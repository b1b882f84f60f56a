"""The named bad VDI images: one builder each, and ``VDI_CASES`` (see ``synthetic.Case``)."""

from __future__ import annotations

import uuid as uuidlib

from .content import MiB, truncate
from .corpus import corpus_copy
from .synthetic import VDI_RAW, Case, err, ok, patched, synthetic_vdi
from .writers_vdi import patch_vdi, set_vdi_entry

_b_vdi_signature = patched(synthetic_vdi, patch_vdi, signature=0xBEDA1070)


def _b_vdi_corpus_signature(d, c):
    p = corpus_copy(c, d, "qemu-static-mbr-fat12.vdi")
    patch_vdi(p, signature=0)
    return err(p)


def _b_vdi_trunc_header(d, c):
    i = synthetic_vdi(d)
    truncate(i.path, 0x100)
    return err(i.path)


def _b_vdi_trunc_map(d, c):
    i = synthetic_vdi(d)
    truncate(i.path, i.offset_blocks + 6)
    return err(i.path)


def _b_vdi_trunc_data(d, c):
    i = synthetic_vdi(d)
    truncate(i.path, i.file_size - MiB // 2)
    return err(i.path)


_b_vdi_map_past_eof = patched(synthetic_vdi, patch_vdi, offset_blocks=0x7FFFFE00)
_b_vdi_data_past_eof = patched(synthetic_vdi, patch_vdi, offset_data=0xFFFFFE00)
_b_vdi_blocks_absurd = patched(synthetic_vdi, patch_vdi, blocks=0xFFFFFFFF)
_b_vdi_blocks_too_few = patched(synthetic_vdi, patch_vdi, blocks=1)
_b_vdi_block_2_31 = patched(synthetic_vdi, patch_vdi, block_size=1 << 31)
_b_vdi_block_zero = patched(synthetic_vdi, patch_vdi, block_size=0)
_b_vdi_disk_huge = patched(synthetic_vdi, patch_vdi, disk_size=1 << 62)


def _b_vdi_entry_past_eof(d, c):
    i = synthetic_vdi(d)
    patch_vdi(i.path, blocks_allocated=0xFFFFFFF0)
    set_vdi_entry(i.path, 2, 0xFFFFFF00)
    return err(i.path)


def _b_vdi_entry_beyond_allocated(d, c):
    i = synthetic_vdi(d)
    set_vdi_entry(i.path, 2, 7)    # only 2 blocks allocated
    return err(i.path)


def _b_vdi_duplicate_entries(d, c):
    i = synthetic_vdi(d)
    set_vdi_entry(i.path, 2, 0)
    flat = bytearray(VDI_RAW)
    flat[2 * MiB:3 * MiB] = VDI_RAW[0:MiB]
    return ok(i.path, bytes(flat))


_b_vdi_version = patched(synthetic_vdi, patch_vdi, version=0x00020000)


def _b_vdi_sector_size(d, c):
    i = synthetic_vdi(d)
    patch_vdi(i.path, sector_size=4096)
    return ok(i.path, VDI_RAW)


_b_vdi_extra_huge = patched(synthetic_vdi, patch_vdi, block_extra=0x80000000)
_b_vdi_image_type = patched(synthetic_vdi, patch_vdi, image_type=9)


def _b_vdi_link_missing(d, c):
    # A diff VDI whose parent UUID matches nothing in its folder.
    i = synthetic_vdi(d)
    patch_vdi(i.path, image_type=4, uuid_link=uuidlib.uuid4().bytes,
              uuid_parent_modify=uuidlib.uuid4().bytes)
    return err(i.path)


VDI_CASES: list[Case] = [
    # -- VDI ------------------------------------------------------------------------------------
    Case("vdi-bad-signature", _b_vdi_signature, "NotAnImageError", ("not a VHD",),
         fmt="vdi"),
    Case("corpus-vdi-bad-signature", _b_vdi_corpus_signature, "NotAnImageError",
         ("not a VHD",), needs_corpus=True, fmt="vdi"),
    Case("vdi-truncated-in-header", _b_vdi_trunc_header, "FormatError",
         ("truncated: the VDI header needs 456 bytes, file has 256",), fmt="vdi"),
    Case("vdi-truncated-in-map", _b_vdi_trunc_map, "FormatError",
         ("VDI block map (3 entries at 0x200) runs past the end of the file (518)",), fmt="vdi"),
    Case("vdi-truncated-in-data", _b_vdi_trunc_data, "FormatError",
         ("block map entry 2 points to data at 1049600-2098176, past the end of the file (1573888)",),
         fmt="vdi"),
    Case("vdi-map-past-eof", _b_vdi_map_past_eof, "FormatError",
         ("VDI block map (3 entries at 0x7ffffe00) runs past the end of the file",), fmt="vdi"),
    Case("vdi-data-offset-past-eof", _b_vdi_data_past_eof, "FormatError",
         ("block map entry 2 points to data at 4296015360-", "past the end of the file",),
         fmt="vdi"),
    Case("vdi-absurd-block-count", _b_vdi_blocks_absurd, "FormatError",
         ("VDI block count 4294967295 is absurd",), fmt="vdi"),
    Case("vdi-too-few-blocks", _b_vdi_blocks_too_few, "FormatError",
         ("VDI disk size 3145728 needs more than the 1 blocks of 1048576 bytes",), fmt="vdi"),
    Case("vdi-block-size-2^31", _b_vdi_block_2_31, "FormatError",
         ("VDI block size 2147483648 must be a power of two between 512 and 128 MiB",), fmt="vdi"),
    Case("vdi-block-size-0", _b_vdi_block_zero, "FormatError",
         ("VDI block size 0 must be a power of two",), fmt="vdi"),
    Case("vdi-disk-size-2^62", _b_vdi_disk_huge, "FormatError",
         ("VDI disk size 4611686018427387904 needs more than the 3 blocks",), fmt="vdi"),
    Case("vdi-map-entry-past-eof", _b_vdi_entry_past_eof, "FormatError",
         ("block map entry 2 points to data at", "past the end of the file"), fmt="vdi"),
    Case("vdi-map-entry-beyond-allocated", _b_vdi_entry_beyond_allocated, "FormatError",
         ("block map entry 2 points to data at 7341056-", "past the end of the file",), fmt="vdi"),
    Case("vdi-two-entries-one-block", _b_vdi_duplicate_entries, None, writable_refused=True,
         check_finds=("1 data blocks are used by more than one map entry (first: block 0)",),
         fmt="vdi"),
    Case("vdi-unknown-version", _b_vdi_version, "UnsupportedError",
         ("VDI header version 2.0 is not supported (only 1.x)",), fmt="vdi"),
    Case("vdi-sector-size-4096", _b_vdi_sector_size, None,
         warnings=("VDI sector size field is 4096, not 512 (ignored)",), fmt="vdi"),
    Case("vdi-block-extra-2^31", _b_vdi_extra_huge, "FormatError",
         ("VDI block extra 2147483648 is absurd (more than 128 MiB)",), fmt="vdi"),
    Case("vdi-unknown-image-type", _b_vdi_image_type, "UnsupportedError",
         ("VDI image type 9 is not supported",), fmt="vdi"),
    Case("vdi-diff-parent-missing", _b_vdi_link_missing, "ChainError",
         ("not found", "use --parent-dir DIR"), fmt="vdi"),
]
