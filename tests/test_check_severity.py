"""``vhdfs check`` does not cry wolf: valid images of real writers are clean (exit 0).

- every image of the shared corpus (Disk2vhd-free, but mkimg, QEMU, Windows, Xen Orchestra);
- images qemu-img 7.2 writes (vpc dynamic and fixed, vdi dynamic and static, odd sizes);
- the habit of Disk2vhd, mkimg, blktap and XO: bitmap bits set past the virtual end of a disk
  that ends inside a block: a note, shown only with --verbose, and ``--repair`` leaves it alone;
- each VHD and VDI finding text the drivers can make has the severity its meaning gives it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.formats.vdi.findings import classify as vdi_classify
from vhdfs.formats.vhd.findings import classify as vhd_classify
from vhdfs.tools.check import check_image
from vhdfs.tools.maintain import repair_image

from images import content, writers_vhd as vhdw
from conftest import corpus_ids

REPO = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-img")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdfs", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def _not_notes(path: Path) -> list[str]:
    with open_image(path) as img:
        return [f"{f.finding.severity.value}: {f.finding.text}" for f in check_image(img)
                if f.finding.severity is not Severity.NOTE]


@pytest.mark.parametrize("name", corpus_ids())
def test_corpus_image_is_clean(name: str, corpus_dir: Path) -> None:
    path = corpus_dir / name.removesuffix(".xz")
    assert _not_notes(path) == []
    res = _cli("check", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(QEMU is None, reason="no qemu-img")
@pytest.mark.parametrize("fmt,opts,size", [
    ("vpc", "subformat=dynamic", "64M"), ("vpc", "subformat=fixed", "8M"),
    ("vpc", "subformat=dynamic", "10000k"), ("vpc", "subformat=dynamic,force_size=on", "7M"),
    ("vdi", "", "20M"), ("vdi", "static=on", "5M"), ("vdi", "", "3333k"),
])
def test_qemu_img_images_are_clean(fmt: str, opts: str, size: str, tmp_path: Path) -> None:
    path = tmp_path / ("disk.vhd" if fmt == "vpc" else "disk.vdi")
    cmd = [QEMU, "create", "-q", "-f", fmt] + (["-o", opts] if opts else []) + [str(path), size]
    subprocess.run(cmd, check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 1M", "-c", "write -P 0 1M 1M",
                    str(path)], check=True, capture_output=True)
    assert _not_notes(path) == []
    res = _cli("check", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_bitmap_bits_past_the_end_are_a_note(tmp_path: Path) -> None:
    size = 3 * content.MiB   # ends in the middle of the second 2 MiB block
    sectors = {s: bytes([s & 0xFF]) * 512 for s in range(size // 512 - 8, size // 512)}
    sectors.update({s: bytes(512) for s in range(size // 512, 4 * content.MiB // 512)})  # the habit
    built = vhdw.build_sparse_vhd(tmp_path / "d2v.vhd", size, sectors)
    with open_image(built.path) as img:
        found = check_image(img)
    assert [f.finding.severity for f in found] == [Severity.NOTE], found
    assert "bitmap bits set past the virtual end" in found[0].finding.text
    res = _cli("check", str(built.path))
    assert res.returncode == 0 and "note: " not in res.stdout and "1 note(s)" in res.stdout, res.stdout
    res = _cli("check", "--verbose", str(built.path))
    assert res.returncode == 0 and "note: block 1: 2048 bitmap bits" in res.stdout, res.stdout
    before = built.path.read_bytes()
    assert repair_image(str(built.path), False, lambda s: None) == []
    assert built.path.read_bytes() == before


VHD_FINDINGS = [
    ("12 bytes of trailing data after the footer at offset 1024 (ignored)", Severity.NOTE),
    ("footer checksum mismatch (stored 0x00000001); using the copy at offset 0", Severity.ERROR),
    ("footer checksum mismatch (stored 0x00000001)", Severity.ERROR),
    ("no footer at the end of the file; using the copy at offset 0", Severity.ERROR),
    ("footer copy at offset 0: checksum mismatch (stored 0x00000001)", Severity.ERROR),
    ("footer copy at offset 0 differs from the footer at the end", Severity.ERROR),
    ("footer copy at offset 0 is missing", Severity.ERROR),
    ("dynamic header checksum mismatch (stored 0x00000001)", Severity.ERROR),
    ("BAT entries 1 and 2 overlap (blocks at 4096 and 4096)", Severity.ERROR),
    ("BAT entry 3 (block at 512) overlaps the footer at 512", Severity.ERROR),
    ("BAT entry 3 (block at 512) overlaps the dynamic header at 512", Severity.ERROR),
    ("BAT entry 3 (block at 2048) overlaps the parent locator 0 (W2ru) at 2048", Severity.ERROR),
    ("parent locator 0 (W2ru) has an invalid data space 4294967295", Severity.NOTE),
    ("parent locator 0 (W2ru) data at 9999 (+24) lies outside the file", Severity.NOTE),
    ("parent locator 0 (W2ru) claims 99999 bytes; ignored", Severity.NOTE),
    ("batmap at 99999 (4 sectors) lies outside the file; ignored", Severity.NOTE),
    ("batmap checksum mismatch; its bits are ignored", Severity.NOTE),
]
VDI_FINDINGS = [
    ("VDI sector size field is 4096, not 512 (ignored)", Severity.NOTE),
    ("VDI image UUID is null (VirtualBox refuses such images)", Severity.NOTE),
    ("VDI modification UUID is null (VirtualBox refuses such images)", Severity.NOTE),
    ("1 data blocks are used by more than one map entry (first: block 0)", Severity.ERROR),
    ("1 map entries point at or beyond blocks_allocated 2 (first: entry 2 -> block 7)", Severity.ERROR),
    ("1 map entries point past the end of the file (99) (first: entry 2 -> block 7)", Severity.ERROR),
    ("blocks_allocated is 1 but the map uses 2 blocks", Severity.ERROR),
    ("blocks_allocated is 9 but the file holds fewer blocks", Severity.NOTE),
    ("static image whose block map is not the identity (map[i] != i)", Severity.ERROR),
]


@pytest.mark.parametrize("text,severity", VHD_FINDINGS)
def test_vhd_finding_severity(text: str, severity: Severity) -> None:
    assert vhd_classify(text).severity is severity


@pytest.mark.parametrize("text,severity", VDI_FINDINGS)
def test_vdi_finding_severity(text: str, severity: Severity) -> None:
    assert vdi_classify(text).severity is severity


def test_every_finding_text_is_in_the_tables() -> None:
    """A new finding in the drivers must be sorted here too (its wording's stem is listed)."""
    import re
    stems = {t.split(" ")[0] for t, _s in VHD_FINDINGS + VDI_FINDINGS}
    for src in ["footer.py", "layout.py", "sparse.py"]:
        text = (REPO / "vhdfs" / "formats" / "vhd" / src).read_text()
        for m in re.finditer(r'findings\.append\(f?"([^"{]*)', text):
            assert any(t.startswith(m.group(1)[:12]) or m.group(1)[:12] in t
                       for t, _s in VHD_FINDINGS), f"{src}: {m.group(1)!r} has no severity test"
    assert stems
