"""Valid-but-odd images from the wild must open with the right data (issue 6).

Each image is built here independently of the drivers (``tests/images``), with a known raw
content; where qemu-img reads the format, its ``convert -O raw`` is a second oracle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from images import content, corpus, synthetic as syn, writers_vdi as vdiw, writers_vhd as vhdw
from images.content import MiB

from vhdfs.block import open_image

QEMU = shutil.which("qemu-img")


def _digest(img) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < img.size:
        chunk = img.read(pos, 1 << 20)
        assert chunk, f"short read at {pos}"
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _open_digest(path: Path, expected_size: int) -> str:
    before = corpus.sha256_file(path)
    with open_image(path) as img:
        assert img.size == expected_size, f"virtual size {img.size}, expected {expected_size}"
        out = _digest(img)
    assert corpus.sha256_file(path) == before, "reading changed the file"
    return out


def _qemu_raw_sha(path: Path, fmt: str, tmp: Path) -> str | None:
    if QEMU is None:
        return None
    out = tmp / (path.name + ".qemu.raw")
    subprocess.run([QEMU, "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True,
                   capture_output=True, timeout=120)
    try:
        return corpus.sha256_file(out)
    finally:
        out.unlink()


def _assert_reads(path: Path, raw: bytes, tmp: Path, qemu_fmt: str | None = None) -> None:
    assert _open_digest(path, len(raw)) == content.sha256(raw), f"{path.name}: wrong data"
    if qemu_fmt:
        q = _qemu_raw_sha(path, qemu_fmt, tmp)
        if q is not None:
            assert q == content.sha256(raw), f"qemu-img reads {path.name} differently (bad fixture?)"


# -- footers ---------------------------------------------------------------------------------

def test_511_byte_footer_dynamic(tmp_path: Path) -> None:
    i = syn.dyn_vhd(tmp_path)
    content.truncate(i.path, i.file_size - 1)   # pre-Virtual PC 2004: last reserved byte missing
    _assert_reads(i.path, syn.DYN_RAW, tmp_path)


def test_511_byte_footer_fixed(tmp_path: Path) -> None:
    p = syn.fixed_vhd(tmp_path)
    content.truncate(p, os.path.getsize(p) - 1)
    _assert_reads(p, syn.FIXED_RAW, tmp_path)


def test_511_byte_footer_corpus(tmp_path: Path, corpus_dir: Path) -> None:
    name = "dfvfs-qemu-ext2-dynamic.vhd"
    p = corpus.corpus_copy(corpus_dir, tmp_path, name)
    content.truncate(p, os.path.getsize(p) - 1)
    with open_image(p) as img:
        assert _digest(img) == corpus.corpus_sha256(name)


def test_footer_only_at_head(tmp_path: Path) -> None:
    i = syn.dyn_vhd(tmp_path)
    content.truncate(i.path, i.file_size - 512)
    _assert_reads(i.path, syn.DYN_RAW, tmp_path)


def test_footer_only_at_head_corpus(tmp_path: Path, corpus_dir: Path) -> None:
    name = "dissect-win10-ntfs-dynamic.vhd"
    p = corpus.corpus_copy(corpus_dir, tmp_path, name)
    content.truncate(p, os.path.getsize(p) - 512)
    with open_image(p) as img:
        assert _digest(img) == corpus.corpus_sha256(name)


@pytest.mark.parametrize("junk", [4096, 100, MiB], ids=["4KiB", "100B", "1MiB"])
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_trailing_bytes_after_footer(tmp_path: Path, kind: str, junk: int) -> None:
    """Copy tools pad images (to 4 KiB, 1 MiB) or append junk: the footer is still there."""
    if kind == "fixed":
        p, raw = syn.fixed_vhd(tmp_path), syn.FIXED_RAW
    else:
        p, raw = syn.dyn_vhd(tmp_path).path, syn.DYN_RAW
    with open(p, "ab") as f:
        f.write(content.pattern(junk, seed=99) if junk != MiB else bytes(junk))
    _assert_reads(p, raw, tmp_path)


def test_trailing_zeros_after_footer_corpus_fixed(tmp_path: Path, corpus_dir: Path) -> None:
    name = "qemu-fixed-mbr-fat16.vhd"
    p = corpus.corpus_copy(corpus_dir, tmp_path, name)
    with open(p, "ab") as f:
        f.write(bytes(65536))
    with open_image(p) as img:
        assert _digest(img) == corpus.corpus_sha256(name)


def test_header_data_offset_32bit_ones(tmp_path: Path) -> None:
    """The spec's text says 0xFFFFFFFF for the unused header field; accept it (FORMATS §2)."""
    i = syn.dyn_vhd(tmp_path)
    vhdw.patch_vhd_header(i.path, data_offset=0xFFFFFFFF)
    _assert_reads(i.path, syn.DYN_RAW, tmp_path)


def test_bat_with_extra_entries(tmp_path: Path) -> None:
    """blktap pre-sizes the BAT; vhd-lib writes one entry too many: both are legal."""
    i = vhdw.build_sparse_vhd(tmp_path / "x.vhd", syn.DYN_SIZE, vhdw.sectors_of(syn.DYN_RAW),
                            extra_entries=61)
    _assert_reads(i.path, syn.DYN_RAW, tmp_path, "vpc")


# -- block sizes and virtual sizes -------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4096, 64 * 1024, 512 * 1024, 8 * MiB])
def test_block_size_other_than_2mib(tmp_path: Path, block_size: int) -> None:
    size = 10 * MiB
    raw = content.pattern(size, seed=block_size, holes=((MiB, 3 * MiB), (8 * MiB, 4096)))
    i = vhdw.build_sparse_vhd(tmp_path / "b.vhd", size, vhdw.sectors_of(raw), block_size=block_size,
                            reverse_blocks=True)
    _assert_reads(i.path, raw, tmp_path, "vpc")


@pytest.mark.parametrize("size", [5 * MiB + 7 * 512, 2 * MiB + 512, 512 * 3])
def test_virtual_size_not_multiple_of_block(tmp_path: Path, size: int) -> None:
    raw = content.pattern(size, seed=size)
    i = vhdw.build_sparse_vhd(tmp_path / "odd.vhd", size, vhdw.sectors_of(raw))
    _assert_reads(i.path, raw, tmp_path, "vpc")


def test_virtual_size_not_multiple_of_block_corpus(corpus_dir: Path) -> None:
    name = "qem2-dynamic-mbr-oddsize.vhd"
    with open_image(corpus_dir / name) as img:
        assert img.size % (2 * MiB) != 0
        assert _digest(img) == corpus.corpus_sha256(name)


@pytest.mark.parametrize("block_size", [4096, 512 * 1024, 8 * MiB])
def test_created_block_size_roundtrip(tmp_path: Path, block_size: int) -> None:
    """create_vhd with a non-default block size, written through the driver, read by qemu."""
    import vhdfs.formats.vhd.create as vc
    size = 6 * MiB + 3 * 512   # also not a multiple of the block size
    p = tmp_path / "c.vhd"
    vc.create_vhd(p, size, "dynamic", block_size=block_size)
    raw = bytearray(size)
    writes = [(0, 5000), (min(block_size, 4 * MiB) - 100, 300), (3 * MiB + 17, 70000),
              (size - 1000, 1000)]
    with open_image(p, writable=True) as img:
        for n, (off, ln) in enumerate(writes):
            data = content.pattern(ln, seed=n)
            img.write(off, data)
            raw[off:off + ln] = data
    with open_image(p) as img:
        assert img.describe().get("block_size") == block_size
        assert [x for x in img.check() if x.severity.name != "LEAK"] == []
    _assert_reads(p, bytes(raw), tmp_path, "vpc")
    # (qemu-img 7.2 has no "check" for vpc: its convert above is the independent reader)


# -- VDI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    dict(block_size=512 * 1024), dict(block_size=2 * MiB), dict(block_extra=4096),
    dict(header_size=0x190), dict(offset_blocks=MiB), dict(zero_marker=True),
    dict(static=True),
], ids=["block-512KiB", "block-2MiB", "block-extra", "header-0x190", "map-at-1MiB",
        "zero-marker", "static"])
def test_vdi_variants(tmp_path: Path, variant: dict) -> None:
    size = 5 * MiB + 512 * 9   # not a multiple of any block size
    raw = content.pattern(size, seed=7, holes=((MiB, 2 * MiB),))
    info = vdiw.build_vdi(tmp_path / "v.vdi", raw, **variant)
    qemu_ok = info.block_size == MiB and info.block_extra == 0 and not variant.get("zero_marker")
    _assert_reads(info.path, raw, tmp_path, "vdi" if qemu_ok else None)
