"""Images on block devices (loop devices over corpus images, as XenServer's LVM volumes or a VHD
``dd``'d onto a USB disk), and every other kind of file refused at once, by name.

Loop devices are always detached (``mounting.loop_device``); every CLI run has a timeout, so a
regression that blocks on a FIFO fails here instead of hanging the suite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdfs
from conftest import corpus_entries, needs_root
from mounting import loop_device, mounted, run, sha256_file, vhdfs as vhdfs_cli
from vhdfs.block import open_image
from vhdfs.errors import BusyError, VhdfsError

BY_NAME = {e["image"]: e for e in corpus_entries()}
ON_DEVICE = ["qemu-dynamic-gpt-fat32-ext4.vhd", "qemu-fixed-mbr-fat16.vhd", "qemu-dynamic-mbr-ext4.vdi",
             "qemu-static-mbr-fat12.vdi"]
needs_losetup = pytest.mark.skipif(shutil.which("losetup") is None or os.geteuid() != 0,
                                   reason="needs root and losetup")
pytestmark = [pytest.mark.timeout(180)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy(corpus_dir: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copyfile(corpus_dir / name, dst)
    return dst


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("vhdfs: warning:")]
    assert len(lines) == 1 and lines[0].startswith("vhdfs: "), proc.stderr
    return lines[0]


# -- images on block devices ----------------------------------------------------------------


@needs_losetup
@pytest.mark.parametrize("name", ON_DEVICE)
def test_info_check_and_read_of_an_image_on_a_loop_device(name: str, corpus_dir: Path, tmp_path: Path) -> None:
    entry = BY_NAME[name]
    with loop_device(_copy(corpus_dir, name, tmp_path), readonly=True) as dev:
        proc = vhdfs_cli("info", "--json", dev, timeout=30)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["format"] == entry["format"] and info["virtual_size"] == entry["expected_raw"]["size"]
        assert info["chain"] == [dev]
        assert 0 < info["allocated_bytes"] <= info["virtual_size"]
        text = vhdfs_cli("info", dev, timeout=30)
        assert text.returncode == 0 and "empty" not in text.stdout, text.stderr
        check = vhdfs_cli("check", dev, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with vhdfs.open(dev) as f:
            assert _sha(f.read()) == entry["expected_raw"]["sha256"]


@needs_losetup
@pytest.mark.parametrize("name", ON_DEVICE)
def test_read_write_on_a_loop_device(name: str, corpus_dir: Path, tmp_path: Path) -> None:
    """In-place writes land in the image; an allocation that needs room past the device's end is
    a clean ENOSPC that leaves the image as it was (a device does not grow like a file)."""
    path = _copy(corpus_dir, name, tmp_path)
    with loop_device(path) as dev:
        with vhdfs.open(dev, "r+b") as f:
            shadow = bytearray(f.read())
            img = f.raw.image
            with pytest.raises(BusyError):   # the writer holds the device: flock + O_EXCL
                vhdfs.open(dev, "r+b")
            with pytest.raises(BusyError):
                vhdfs.open(dev)
            placed = [e for e in img.extents() if e.kind == 0 and e.layer == 0]
            for i, ext in enumerate(placed[:8]):
                data = bytes([0x40 + i]) * min(ext.length, 8192)
                f.seek(ext.offset)
                f.write(data)
                shadow[ext.offset:ext.offset + len(data)] = data
            holes = [e for e in img.extents() if e.kind != 0]
        if holes and img.allocation_unit:   # a new block would go past the end of the device
            with vhdfs.open(dev, "r+b", buffering=0) as raw:
                raw.seek(holes[0].offset)
                with pytest.raises(OSError) as exc:
                    raw.write(b"\x99" * 512)
                assert exc.value.errno == errno.ENOSPC and dev in str(exc.value)
                with pytest.raises(OSError, match="earlier error"):
                    raw.read(1)
            assert vhdfs_cli("check", dev, timeout=30).returncode == 0
        with vhdfs.open(dev) as f:
            assert f.read() == shadow
    with vhdfs.open(path) as f:   # the same bytes through the file behind the device
        assert f.read() == shadow


@needs_losetup
def test_exclusive_open_of_the_device_by_another_holder_refuses_a_writer(corpus_dir: Path, tmp_path: Path) -> None:
    with loop_device(_copy(corpus_dir, "qemu-fixed-mbr-fat16.vhd", tmp_path)) as dev:
        holder = os.open(dev, os.O_RDONLY | os.O_EXCL)   # what a mount or LVM does to a device
        try:
            with pytest.raises(BusyError, match="in use"):
                open_image(dev, writable=True)
            with open_image(dev) as img:   # readers do not claim the device
                assert img.size == BY_NAME["qemu-fixed-mbr-fat16.vhd"]["expected_raw"]["size"]
        finally:
            os.close(holder)
        with open_image(dev, writable=True):
            with pytest.raises(OSError) as exc:
                os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
            assert exc.value.errno == errno.EBUSY


@needs_root
@needs_losetup
def test_fuse_mount_of_a_loop_device(corpus_dir: Path, tmp_path: Path) -> None:
    name = "qemu-dynamic-gpt-fat32-ext4.vhd"
    entry = BY_NAME[name]
    with loop_device(_copy(corpus_dir, name, tmp_path), readonly=True) as dev, \
            mounted([dev], tmp_path / "mnt", "--no-partitions") as m:
        f = m.file(Path(dev).name + ".raw")
        st = f.stat()
        assert st.st_size == entry["expected_raw"]["size"]
        with open_image(dev) as img:
            assert st.st_blocks * 512 == -(-img.allocated_bytes() // 512) * 512
        assert 0 < st.st_blocks * 512 < st.st_size
        assert sha256_file(f) == entry["expected_raw"]["sha256"]


@needs_root
@needs_losetup
def test_differencing_child_whose_parent_is_a_loop_device(corpus_dir: Path, tmp_path: Path) -> None:
    name = "qemu-dynamic-gpt-fat32-ext4.vhd"
    entry = BY_NAME[name]
    base = _copy(corpus_dir, name, tmp_path)
    before = sha256_file(base)
    with loop_device(base) as dev:
        child = tmp_path / "child.vhd"
        run([*[sys.executable, "-m", "vhdfs"], "create", "--type", "differencing", "--parent", dev, str(child)])
        info = json.loads(vhdfs_cli("info", "--json", child, timeout=30).stdout)
        assert info["chain"] == [str(child), dev]
        assert any(loc["path"].replace("\\", "/").endswith(dev) for loc in info["parent_locators"])
        with vhdfs.open(child) as f:
            assert _sha(f.read()) == entry["expected_raw"]["sha256"]
        with vhdfs.open(child, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"child" * 1000)
        with vhdfs.open(child) as f:
            f.seek(1 << 20)
            assert f.read(5000) == b"child" * 1000
        # the same chain mounted: the parent device is opened read-only and stays unchanged
        with mounted([child], tmp_path / "mnt", "--no-partitions", "-w") as m:
            raw = m.file("child.raw")
            with open(raw, "r+b") as g:
                g.seek(3 << 20)
                g.write(b"mounted" * 100)
            with open(raw, "rb") as g:
                g.seek(3 << 20)
                assert g.read(700) == b"mounted" * 100
            m.unmount()
    assert sha256_file(base) == before


# -- everything else is refused at once, by name --------------------------------------------


def _odd(kind: str, where: Path) -> str:
    path = where / f"odd-{kind}.vhd"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "directory":
        path.mkdir()
    elif kind == "zero":
        return "/dev/zero"
    elif kind == "mem":
        return "/proc/self/mem"
    return str(path)


ODD = ["fifo", "socket", "zero", "mem", "directory"]
WHAT = {"fifo": "FIFO", "socket": "socket", "zero": "character device", "mem": "empty file",
        "directory": "directory"}


class Blocked(BaseException):
    """Not an OSError (TimeoutError is one, and vhdfs turns OSErrors into its own errors)."""


class _Alarm:
    """Fail the test (instead of hanging the suite) if a call blocks for more than ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> "_Alarm":
        def fire(signum, frame):  # noqa: ANN001, ANN202
            raise Blocked(f"blocked for {self.seconds} s")
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds, 0.2)   # and again, while blocked
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        self.elapsed = time.monotonic() - self.start


@pytest.mark.parametrize("kind", ODD)
def test_odd_file_is_refused_at_once_by_name(kind: str, tmp_path: Path) -> None:
    path = _odd(kind, tmp_path)
    with _Alarm(1.0) as alarm:   # in-process: the refusal itself takes well under a second
        with pytest.raises(VhdfsError) as exc:
            open_image(path)
        with pytest.raises(VhdfsError):
            vhdfs.open(path, "r+b")
    assert alarm.elapsed < 1.0
    assert str(exc.value).startswith(f"{path}: ") and WHAT[kind] in str(exc.value)
    for command in ("info", "check"):
        start = time.monotonic()
        proc = vhdfs_cli(command, path, timeout=10)   # a blocking open would time out here
        line = _one_line(proc)
        assert line.startswith(f"vhdfs: {path}: ") and WHAT[kind] in line, line
        assert time.monotonic() - start < 5   # interpreter start included; no wait on the file


@pytest.mark.parametrize("kind", ODD)
def test_odd_file_as_parent_candidate_is_refused_by_name(kind: str, corpus_dir: Path, tmp_path: Path) -> None:
    base = _copy(corpus_dir, "dfvfs-qemu-ext2-dynamic.vhd", tmp_path)
    child = tmp_path / "child.vhd"
    run([sys.executable, "-m", "vhdfs", "create", "--type", "differencing", "--parent", str(base), str(child)])
    base.unlink()
    odd = _odd(kind, tmp_path)
    if odd.startswith(str(tmp_path)):
        os.rename(odd, base)    # the child's locators name base's path: the odd file sits there
    else:
        os.symlink(odd, base)   # /dev/zero, /proc/self/mem: through a link at that path
    with _Alarm(1.0):
        with pytest.raises(VhdfsError) as exc:
            open_image(child)
    assert str(base) in str(exc.value) and WHAT[kind] in str(exc.value)
    line = _one_line(vhdfs_cli("info", child, timeout=10))
    assert line.startswith(f"vhdfs: {child}: ") and str(base) in line and WHAT[kind] in line, line


def test_io_errors_name_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    """/proc/self/mem is a regular file whose reads fail with EIO: the error carries its name,
    and the CLI names the image even for an OSError that has none."""
    from vhdfs.cli import info, main
    from vhdfs.formats.raw import RawImage

    img = RawImage("/proc/self/mem")
    try:
        with pytest.raises(OSError) as exc:
            img.file.pread(16, 0)
        assert exc.value.errno == errno.EIO and exc.value.filename == "/proc/self/mem"
    finally:
        img.close()
    image = tmp_path / "disk.vhd"
    run([sys.executable, "-m", "vhdfs", "create", "--size", "4M", str(image)])

    def failing(img):  # noqa: ANN001, ANN202
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(info, "image_info", failing)
    assert main(["info", str(image)]) == 1
    assert capsys.readouterr().err.strip() == f"vhdfs: {image}: Input/output error"


@needs_losetup
def test_xen_style_chain_of_devices_linked_by_relative_name(corpus_dir: Path, tmp_path: Path) -> None:
    """XenServer LVHD: child and parent are both volumes in /dev/VG_XenStorage-<sr>/, the child's
    locator names the parent relative to that folder. Here the folder holds symlinks to loop
    devices (as /dev/VG/ holds links to /dev/dm-N), and it is renamed after the child was made,
    so only the relative locator can lead to the parent."""
    name = "qemu-dynamic-gpt-fat32-ext4.vhd"
    base = _copy(corpus_dir, name, tmp_path)
    vg = tmp_path / "VG_XenStorage-old"
    vg.mkdir()
    with loop_device(base, readonly=True) as parent_dev:
        os.symlink(parent_dev, vg / "VHD-parent")
        run([sys.executable, "-m", "vhdfs", "create", "--type", "differencing", "--parent",
             str(vg / "VHD-parent"), str(vg / "VHD-child")])
        child_file = tmp_path / "child-volume"
        os.rename(vg / "VHD-child", child_file)
        os.truncate(child_file, -(-child_file.stat().st_size // 4096) * 4096)   # a device's size
        with loop_device(child_file) as child_dev:
            os.symlink(child_dev, vg / "VHD-child")
            moved = tmp_path / "VG_XenStorage-sr"
            os.rename(vg, moved)
            with open_image(moved / "VHD-child") as img:
                assert [i.path for i in img.chain] == [str(moved / "VHD-child"), str(moved / "VHD-parent")]
            with vhdfs.open(moved / "VHD-child") as f:
                assert _sha(f.read()) == BY_NAME[name]["expected_raw"]["sha256"]
