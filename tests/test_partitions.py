"""Partitions as files: ``<stem>-p<N>.raw`` equals what the kernel sees, and writes stay inside."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from conftest import needs_root
from mounting import fs_mounted, mounted, partition_device, run, sfdisk_partitions

from vhdfs.formats.raw import RawImage
from vhdfs.block.partitions import find_partitions

MBR_LAYOUT = "label: dos\n,4M,L\n,3M,83\n,,E\n,2M,L\n,,L\n"          # p1 p2, extended p3 with p5 p6
GPT_LAYOUT = "label: gpt\n,3M,L\n,2M,L\n,1M,L\n,,L\n"


def _disk(path: Path, layout: str, size: int = 16 << 20) -> bytes:
    """A disk file with a partition table and random bytes inside every partition."""
    path.write_bytes(bytes(size))
    run(["sfdisk", "-q", str(path)], input=layout)
    data = bytearray(path.read_bytes())
    rnd = random.Random(len(layout))
    for n, (start, length) in sfdisk_partitions(path).items():
        if layout != MBR_LAYOUT or n != 3:  # never scribble over the extended container's EBRs
            data[start + 512:start + length] = rnd.randbytes(length - 512)
    path.write_bytes(data)
    return bytes(data)


@pytest.mark.parametrize("layout", [MBR_LAYOUT, GPT_LAYOUT], ids=["mbr", "gpt"])
def test_find_partitions_matches_sfdisk(tmp_path: Path, layout: str) -> None:
    disk = tmp_path / "disk.img"
    _disk(disk, layout)
    want = {n: v for n, v in sfdisk_partitions(disk).items() if not (layout == MBR_LAYOUT and n == 3)}
    with RawImage(str(disk)) as img:
        got = {p.number: (p.start, p.length) for p in find_partitions(img)}
    assert got == want


def test_no_table_no_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "blank.img"
    disk.write_bytes(os.urandom(1 << 20))
    with RawImage(str(disk)) as img:
        assert find_partitions(img) == []


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [MBR_LAYOUT, GPT_LAYOUT], ids=["mbr", "gpt"])
def test_partition_files_equal_kernel_view(tmp_path: Path, layout: str) -> None:
    disk = tmp_path / "disk.img"
    _disk(disk, layout)
    parts = sfdisk_partitions(disk)
    with mounted([disk], tmp_path / "mnt", "--format", "raw") as m:
        names = sorted(os.listdir(m.path))
        numbers = [n for n in parts if not (layout == MBR_LAYOUT and n == 3)]
        assert names == sorted(["disk.raw"] + [f"disk-p{n}.raw" for n in numbers])
        for n in numbers:
            with partition_device(m.file("disk.raw"), n, readonly=True) as dev:
                with open(dev, "rb") as kernel_view:
                    assert m.file(f"disk-p{n}.raw").read_bytes() == kernel_view.read()


@needs_root
@pytest.mark.timeout(120)
def test_writes_are_clipped_to_the_partition(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    before = _disk(disk, MBR_LAYOUT)
    start, length = sfdisk_partitions(disk)[2]
    with mounted([disk], tmp_path / "mnt", "--format", "raw", "-w") as m:
        part = m.file("disk-p2.raw")
        assert part.stat().st_size == length
        with open(part, "r+b", buffering=0) as fh:
            fh.seek(length - 100)
            assert fh.write(b"\xab" * 4096) == 100        # short write at the end of the partition
            with pytest.raises(OSError) as exc:
                fh.write(b"\xcd" * 10)                    # and nothing past it
            assert exc.value.errno == errno.ENOSPC
        assert m.unmount() == 0
    after = disk.read_bytes()
    end = start + length
    assert after[:end - 100] == before[:end - 100]
    assert after[end - 100:end] == b"\xab" * 100
    assert after[end:] == before[end:]


@pytest.mark.parametrize("flags", [(), ("--no-partitions",)], ids=["partitions", "disk-only"])
def test_cached_reads_see_writes_through_any_file(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """The kernel page cache is on by default: a write through one file must show in every
    file over the same bytes (the disk and its partition), however much of them was cached."""
    disk = tmp_path / "disk.img"
    _disk(disk, MBR_LAYOUT)
    start, length = sfdisk_partitions(disk)[2]
    with mounted([disk], tmp_path / "mnt", "--format", "raw", "-w", *flags) as m:
        whole = m.file("disk.raw").read_bytes()            # fill the caches of both files
        part_path = m.file("disk-p2.raw") if not flags else None
        if part_path:
            assert part_path.read_bytes() == whole[start:start + length]
            with open(part_path, "r+b", buffering=0) as fh:
                fh.seek(8192)
                fh.write(b"\x11" * 4096)
            with open(m.file("disk.raw"), "rb") as fh:
                fh.seek(start + 8192)
                assert fh.read(4096) == b"\x11" * 4096, "the disk file shows the partition's write"
        with open(m.file("disk.raw"), "r+b", buffering=0) as fh:
            fh.seek(start + 16384)
            fh.write(b"\x22" * 4096)
        with open(m.file("disk.raw"), "rb") as fh:
            fh.seek(start + 16384)
            assert fh.read(4096) == b"\x22" * 4096
        if part_path:
            with open(part_path, "rb") as fh:
                fh.seek(16384)
                assert fh.read(4096) == b"\x22" * 4096, "the partition file shows the disk's write"
        assert m.unmount() == 0
    after = disk.read_bytes()
    assert after[start + 16384:start + 20480] == b"\x22" * 4096


@needs_root
@pytest.mark.timeout(120)
def test_mount_a_partition_file_directly_and_hide_them(tmp_path: Path) -> None:
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 missing")
    disk = tmp_path / "disk.img"
    _disk(disk, GPT_LAYOUT)
    with mounted([disk], tmp_path / "mnt", "--format", "raw", "-w") as m:
        run(["mkfs.ext4", "-q", "-F", str(m.file("disk-p1.raw"))])
        with fs_mounted(m.file("disk-p1.raw"), tmp_path / "fs", "loop") as fs:
            (fs / "hello.txt").write_text("hi")
        assert m.unmount() == 0
    with mounted([disk], tmp_path / "mnt2", "--format", "raw", "--no-partitions") as m:
        assert os.listdir(m.path) == ["disk.raw"]
        with partition_device(m.file("disk.raw"), 1, readonly=True) as dev:
            with fs_mounted(dev, tmp_path / "fs2", "ro") as fs:
                assert (fs / "hello.txt").read_text() == "hi"
