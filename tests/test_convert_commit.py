"""convert and commit: the bytes that come out are the bytes that went in, and nothing more.

Oracles: the corpus's expected hashes, ``qemu-img convert -O raw`` of every VHD/VDI output (a
reader we did not write), and for commit the child's own view read before the commit.
Corpus files are never written: every test that writes copies them to ``tmp_path`` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import corpus_entries
from mounting import sha256_file as file_sha, vhdfs

MiB = 1024 * 1024
ENTRIES = {e["image"]: e for e in corpus_entries()}








def image_sha(path: Path, fmt: str | None = None) -> tuple[int, str]:
    """Size and sha256 of the virtual disk as vhdfs reads it."""
    from vhdfs.block import open_image

    h = hashlib.sha256()
    with open_image(path, format=fmt) as img:
        for off in range(0, img.size, 4 * MiB):
            h.update(img.read(off, 4 * MiB))
        return img.size, h.hexdigest()


def qemu_sha(path: Path, tmp: Path) -> tuple[int, str]:
    """Size and sha256 of the virtual disk as ``qemu-img convert -O raw`` reads it.

    The format is named (``-f``): qemu probes VHD only by a footer copy at offset 0, which a
    fixed VHD does not have, and would read it as raw.
    """
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    out = tmp / f"{path.name}.qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vdi" if path.suffix == ".vdi" else "vpc",
                    "-O", "raw", str(path), str(out)], check=True, timeout=120,
                   capture_output=True)
    try:
        return out.stat().st_size, file_sha(out)
    finally:
        out.unlink()


def expected(name: str) -> tuple[int, str]:
    raw = ENTRIES[name]["expected_raw"]
    return raw["size"], raw["sha256"]


def copy_chain(corpus: Path, tmp: Path, top: str) -> Path:
    """Copy ``top`` and all its parents to ``tmp`` (writable), keeping the names."""
    name: str | None = top
    while name:
        shutil.copyfile(corpus / name, tmp / name)
        name = ENTRIES[name].get("parent")
    return tmp / top


# -- convert without any driver: raw to raw ----------------------------------------------------


def test_convert_raw_to_raw_is_sparse_and_identical(tmp_path: Path) -> None:
    from vhdfs.block import open_image
    from vhdfs.tools.convert import convert

    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(40 * MiB)
        f.seek(5 * MiB + 100)
        f.write(os.urandom(3 * MiB))      # straddles chunk and granule boundaries
        f.seek(20 * MiB)
        f.write(bytes(6 * MiB))           # explicit zeros: must not be written
        f.seek(39 * MiB + 7)
        f.write(b"tail")
    dst = tmp_path / "dst.raw"
    calls: list[tuple[int, int]] = []
    with open_image(src, format="raw") as img:
        written = convert(img, dst, to="raw", progress=lambda d, t: calls.append((d, t)))
    assert file_sha(dst) == file_sha(src) and dst.stat().st_size == 40 * MiB
    assert written < 4 * MiB
    assert dst.stat().st_blocks * 512 < 5 * MiB
    assert calls[0] == (0, 40 * MiB) and calls[-1] == (40 * MiB, 40 * MiB)


def test_convert_refuses_existing_output_and_cleans_up_on_failure(tmp_path: Path) -> None:
    from vhdfs.block import open_image
    from vhdfs.tools.convert import convert
    from vhdfs.errors import UsageError

    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(MiB))
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"precious")
    with open_image(src, format="raw") as img:
        with pytest.raises(UsageError):
            convert(img, dst, to="raw")
        assert dst.read_bytes() == b"precious"
        with pytest.raises(UsageError):
            convert(img, src, to="raw", overwrite=True)  # never the source itself
        dst.unlink()

        def boom(done: int, total: int) -> None:
            if done:
                raise RuntimeError("disk on fire")

        with pytest.raises(RuntimeError):
            convert(img, dst, to="raw", progress=boom)
    assert not dst.exists()
    assert src.stat().st_size == MiB


def test_convert_cli_raw_source_needs_from_or_raw_name(tmp_path: Path) -> None:
    src = tmp_path / "disk.data"
    src.write_bytes(os.urandom(64 * 1024))
    proc = vhdfs("convert", src, tmp_path / "out.raw")
    assert proc.returncode != 0 and "--from raw" in proc.stderr and "Traceback" not in proc.stderr
    proc = vhdfs("convert", "--from", "raw", src, tmp_path / "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert file_sha(tmp_path / "out.raw") == file_sha(src)


# -- convert corpus images ------------------------------------------------------------------

CONVERT_CASES = [
    ("xo-base.vhd", "raw"), ("xo-base.vhd", "vhd"), ("xo-base.vhd", "vdi"),
    ("qemu-static-mbr-fat12.vdi", "vhd"), ("dissect-qemu-pattern.vdi", "raw"),
    ("qem2-dynamic-mbr-oddsize.vhd", "vhd"), ("qemu-dynamic-mbr-ext4.vdi", "vdi"),
    ("dissect-win10-ntfs-fixed.vhd", "vdi"), ("mkimg-1x1-512-gpt-fixed.vhd", "raw"),
]


@pytest.mark.parametrize("name,to", CONVERT_CASES, ids=[f"{n}-to-{t}" for n, t in CONVERT_CASES])
def test_convert_corpus_image(name: str, to: str, corpus_dir: Path, tmp_path: Path) -> None:
    if name not in ENTRIES:
        pytest.skip(f"{name} not in corpus")
    dst = tmp_path / f"out.{to}"
    proc = vhdfs("convert", "--to", to, corpus_dir / name, dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is not a terminal: no progress bar
    want = expected(name)
    assert image_sha(dst, "raw" if to == "raw" else None) == want
    if to != "raw":
        assert qemu_sha(dst, tmp_path) == want
        info = json.loads(vhdfs("info", "--json", dst).stdout)
        assert info["type"] == "dynamic"
        # Sparse: the output stores no more than the source's data (plus metadata).
        assert info["allocated_bytes"] < want[0]
        assert dst.stat().st_size < want[0]
    else:
        assert dst.stat().st_blocks * 512 < want[0]
    assert file_sha(corpus_dir / name) == ENTRIES[name]["image_file_sha256"]


def test_convert_chain_to_flat_dynamic_vhd(corpus_dir: Path, tmp_path: Path) -> None:
    """qemu cannot read the chain, but it can read what convert makes of it."""
    if "xo-child2.vhd" not in ENTRIES:
        pytest.skip("xo chain not in corpus")
    dst = tmp_path / "flat.vhd"
    proc = vhdfs("convert", "--to", "vhd", "--type", "dynamic", corpus_dir / "xo-child2.vhd", dst)
    assert proc.returncode == 0, proc.stderr
    assert qemu_sha(dst, tmp_path) == expected("xo-child2.vhd")
    assert image_sha(dst) == expected("xo-child2.vhd")
    info = json.loads(vhdfs("info", "--json", dst).stdout)
    assert info["chain"] == [str(dst)] and info["type"] == "dynamic"


def test_convert_to_fixed_vhd(corpus_dir: Path, tmp_path: Path) -> None:
    if "dissect-win10-ntfs-dynamic.vhd" not in ENTRIES:
        pytest.skip("image not in corpus")
    dst = tmp_path / "fixed.vhd"
    proc = vhdfs("convert", "--type", "fixed", corpus_dir / "dissect-win10-ntfs-dynamic.vhd", dst)
    assert proc.returncode == 0, proc.stderr
    assert qemu_sha(dst, tmp_path) == expected("dissect-win10-ntfs-dynamic.vhd")
    assert json.loads(vhdfs("info", "--json", dst).stdout)["type"] == "fixed"


# -- commit -------------------------------------------------------------------------------------


def _make_chain(tmp: Path, fmt: str = "vhd") -> tuple[Path, Path, bytes]:
    """A dynamic base with some data, a differencing child with writes that straddle sectors and
    blocks; returns the paths and the child's full view (what the parent must read after commit)."""
    from vhdfs.block import open_image
    from vhdfs.tools.create import create_image

    base, child = tmp / f"base.{fmt}", tmp / f"child.{fmt}"
    create_image(base, format=fmt, type="dynamic", size=8 * MiB, block_size=MiB)
    with open_image(base, writable=True) as img:
        img.write(0, b"B" * (3 * MiB))
        img.write(6 * MiB, b"b" * 4096)
    create_image(child, parent=base)
    with open_image(child, writable=True) as img:
        img.write(1000, b"C" * 5000)                   # partial sectors at both ends
        img.write(2 * MiB - 300, os.urandom(600))      # across a block boundary
        img.write(5 * MiB, b"c" * MiB)                  # where the base has nothing
        img.write(6 * MiB + 512, bytes(512))            # zeros that must hide the base's data
        view = img.read(0, img.size)
    return base, child, view


def test_commit_parent_reads_as_child_did(tmp_path: Path) -> None:
    from vhdfs.block import open_image
    from vhdfs.tools.commit import commit

    base, child, view = _make_chain(tmp_path)
    child_before = file_sha(child)
    calls: list[tuple[int, int]] = []
    result = commit(child, progress=lambda d, t: calls.append((d, t)))
    assert result.parent == str(base) and not result.removed
    with open_image(base) as img:
        assert img.read(0, img.size) == view
    assert file_sha(child) == child_before
    with open_image(child) as img:  # the child still reads the same on top of the new parent
        assert img.read(0, img.size) == view
    # exactly the sectors the child stores: 5000 bytes touch 11 sectors, 600 bytes touch 2, ...
    assert calls[-1][0] == calls[-1][1] == result.bytes_copied == (11 + 2 + 2048 + 1) * 512
    assert vhdfs("check", base).returncode == 0  # qemu-img check does not handle VHD


def test_commit_cli_remove_deletes_child(tmp_path: Path) -> None:
    from vhdfs.block import open_image

    base, child, view = _make_chain(tmp_path)
    proc = vhdfs("commit", "--remove", child)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    assert not child.exists()
    with open_image(base) as img:
        assert img.read(0, img.size) == view


def test_commit_interrupted_then_rerun_completes(tmp_path: Path) -> None:
    from vhdfs.block import open_image
    from vhdfs.tools.commit import commit

    base, child, view = _make_chain(tmp_path)
    child_before = file_sha(child)

    def crash(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        commit(child, progress=crash, remove=True)
    assert child.exists() and file_sha(child) == child_before
    with open_image(child) as img:
        assert img.read(0, img.size) == view
    commit(child, remove=True)
    assert not child.exists()
    with open_image(base) as img:
        assert img.read(0, img.size) == view


def test_commit_refuses_a_non_differencing_image(tmp_path: Path) -> None:
    from vhdfs.tools.create import create_image

    base = tmp_path / "base.vhd"
    create_image(base, size=4 * MiB)
    before = file_sha(base)
    proc = vhdfs("commit", base)
    assert proc.returncode == 2 and proc.stderr.startswith("vhdfs: ") and "differencing" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and file_sha(base) == before


def test_commit_corpus_xo_chain(corpus_dir: Path, tmp_path: Path) -> None:
    """child2 into child1, then child1 into the base: the base alone ends up as the full chain."""
    if "xo-child2.vhd" not in ENTRIES:
        pytest.skip("xo chain not in corpus")
    top = copy_chain(corpus_dir, tmp_path, "xo-child2.vhd")
    want = expected("xo-child2.vhd")
    proc = vhdfs("commit", "--remove", top)
    assert proc.returncode == 0, proc.stderr
    assert not top.exists()
    assert image_sha(tmp_path / "xo-child1.vhd") == want
    proc = vhdfs("commit", "--remove", tmp_path / "xo-child1.vhd")
    assert proc.returncode == 0, proc.stderr
    assert image_sha(tmp_path / "xo-base.vhd") == want
    assert qemu_sha(tmp_path / "xo-base.vhd", tmp_path) == want  # a dynamic VHD: qemu reads it
    assert vhdfs("check", tmp_path / "xo-base.vhd").returncode == 0


def test_commit_vdi_child(tmp_path: Path) -> None:
    """A VirtualBox-style snapshot (differencing VDI) commits into its parent the same way."""
    from vhdfs.block import open_image

    base, child, view = _make_chain(tmp_path, "vdi")
    with open_image(child) as img:
        assert img.type == "differencing" and img.backing is not None
    proc = vhdfs("commit", "--remove", child)
    assert proc.returncode == 0, proc.stderr
    assert not child.exists()
    with open_image(base) as img:
        assert img.read(0, img.size) == view
    assert qemu_sha(base, tmp_path)[1] == hashlib.sha256(view).hexdigest()


def test_convert_vdi_chain_to_raw(tmp_path: Path) -> None:
    base, child, view = _make_chain(tmp_path, "vdi")
    dst = tmp_path / "flat.raw"
    proc = vhdfs("convert", child, dst)
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == view
