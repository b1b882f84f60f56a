"""SEEK_DATA / SEEK_HOLE through the mount (pyfuse3 with vendor/'s lseek patch): what cp,
qemu-img and rsync use to skip unallocated space, checked against qemu-img's own map."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import corpus_entries, needs_root
from mounting import mounted, new_vhd, run, sha256_file

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20
QEMU_MADE = [e for e in corpus_entries() if e["image"] in (
    "qemu-dynamic-mbr-ext4.vdi", "qemu-dynamic-gpt-fat32-ext4.vhd", "dfvfs-qemu-ext2-dynamic.vhd")]


def seek_map(path: Path) -> list[tuple[int, int]]:
    """The data runs ``[start, end)`` of a file, walked with SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == 6  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert start < end <= size
            runs.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return runs


def qemu_map(image: Path, fmt: str) -> list[tuple[int, int]]:
    """qemu-img's data runs of an image (adjacent ones joined)."""
    out = json.loads(run(["qemu-img", "map", "--output=json", "-f", fmt, str(image)], check=True).stdout)
    runs: list[tuple[int, int]] = []
    for r in out:
        if not r["data"]:
            continue
        if runs and runs[-1][1] == r["start"]:
            runs[-1] = (runs[-1][0], r["start"] + r["length"])
        else:
            runs.append((r["start"], r["start"] + r["length"]))
    return runs


@needs_root
@pytest.mark.parametrize("entry", QEMU_MADE, ids=lambda e: e["image"])
def test_seek_map_of_a_qemu_image_is_qemu_img_map(corpus_dir: Path, tmp_path: Path, entry: dict) -> None:
    image = corpus_dir / entry["image"]
    fmt = "vdi" if image.suffix == ".vdi" else "vpc"
    with mounted([image], tmp_path / "mnt", "--no-partitions") as m:
        got = seek_map(m.file(image.stem + ".raw"))
    want = qemu_map(image, fmt)
    assert want, "the corpus image holds data"
    assert got == want


WRITES = [(3 * MiB, 64 << 10), (100 * MiB, 5 * MiB), (255 * MiB, MiB)]


@needs_root
@pytest.mark.parametrize("fmt", ["vpc", "vdi", "vhdx"])
def test_seek_map_of_an_image_qemu_wrote(tmp_path: Path, fmt: str) -> None:
    """Images qemu-img made and qemu-io wrote into (runs far apart, one crossing blocks): every
    write lies in a data run, every hole reads as zeros, and where qemu-img can map the format
    (its vhdx driver calls everything data) the runs are exactly its map."""
    image = tmp_path / f"q.{'vhd' if fmt == 'vpc' else fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, str(image), "256M"], check=True)
    for off, n in WRITES:
        run(["qemu-io", "-f", fmt, "-c", f"write -P 0x61 {off} {n}", str(image)], check=True)
    with mounted([image], tmp_path / "mnt", "--no-partitions") as m:
        raw = m.file("q.raw")
        got = seek_map(raw)
        with open(raw, "rb") as f:
            pos = 0
            for start, end in [*got, (256 * MiB, 256 * MiB)]:
                f.seek(pos)
                assert f.read(start - pos).count(0) == start - pos, f"hole {pos}-{start} holds data"
                pos = end
    assert len(got) == len(WRITES)
    for (off, n), (start, end) in zip(WRITES, got):
        assert start <= off and off + n <= end
    if fmt != "vhdx":
        assert got == qemu_map(image, fmt)


@needs_root
def test_seek_follows_writes_and_cp_makes_a_sparse_copy(tmp_path: Path) -> None:
    img = new_vhd(tmp_path / "d.vhd")
    with mounted([img], tmp_path / "mnt", "-w") as m:
        f = m.file("d.raw")
        assert seek_map(f) == []
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
            assert os.lseek(fd, 5 * MiB, os.SEEK_HOLE) == 5 * MiB
            with pytest.raises(OSError) as exc:
                os.lseek(fd, 64 * MiB, os.SEEK_DATA)
            assert exc.value.errno == 6
        finally:
            os.close(fd)
        with open(f, "r+b") as fh:
            fh.seek(8 * MiB)
            fh.write(os.urandom(MiB))
            fh.seek(40 * MiB)
            fh.write(os.urandom(3 * MiB))
            fh.flush()
            os.fsync(fh.fileno())
        got = seek_map(f)
        copy = tmp_path / "copy.raw"
        shutil.copyfile(f, tmp_path / "plain.raw")  # reads everything: the reference bytes
        assert run(["cp", str(f), str(copy)], check=True).returncode == 0
        assert sha256_file(copy) == sha256_file(tmp_path / "plain.raw")
        assert os.stat(copy).st_blocks * 512 <= sum(b - a for a, b in got) + MiB
        assert m.unmount() == 0
    # whole VHD blocks (2 MiB) around the writes, as qemu-img maps the file itself
    assert got == qemu_map(img, "vpc") == [(8 * MiB, 10 * MiB), (40 * MiB, 44 * MiB)]
