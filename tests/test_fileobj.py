"""``vhdfs.open``: every corpus image and chain as a Python file object, checked from outside.

Reads against the manifest's sha256 (the consensus of independent readers) and against a flat
shadow with random seeks of all three whences; writes read back by ``qemu-img convert``; a
failure underneath a live file object makes it raise, never return other bytes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdfs
from conftest import corpus_entries
from mounting import run
from vhdfs.block import open_image
from vhdfs.errors import BusyError, ChainError, VhdfsError
from vhdfs.fileobj import VirtualDiskIO

READABLE = [e for e in corpus_entries() if e.get("expected_raw")]
BY_NAME = {e["image"]: e for e in corpus_entries()}
# qemu-img is the independent reader of written images; only where it agrees with the manifest
# (it reads no VHD differencing chain, and sizes mkimg's fixed VHD by another rule)
QEMU_AGREES = [e for e in READABLE if e["readers"].get("qemu", {}).get("matches_expected")]
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


class _Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)


def _chain_files(name: str) -> list[str]:
    out = [name]
    while BY_NAME[out[-1]].get("parent"):
        out.append(BY_NAME[out[-1]]["parent"])
    return out


def _copy_chain(corpus_dir: Path, name: str, dst: Path) -> Path:
    for n in _chain_files(name):
        shutil.copyfile(corpus_dir / n, dst / n)
    return dst / name


def _flat(path: Path, entry: dict) -> bytes:
    """The disk through the block layer, trusted only because it hashes to the manifest."""
    with open_image(path) as img:
        data = img.read(0, img.size)
    assert hashlib.sha256(data).hexdigest() == entry["expected_raw"]["sha256"]
    return data


def _qemu_raw(path: Path, out: Path) -> bytes:
    fmt = "vdi" if path.suffix == ".vdi" else "vpc"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], timeout=120)
    return out.read_bytes()


# -- reading --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", READABLE, ids=lambda e: e["image"])
def test_copyfileobj_hashes_to_manifest(entry: dict, corpus_dir: Path) -> None:
    with vhdfs.open(corpus_dir / entry["image"]) as f:
        assert isinstance(f, io.BufferedReader) and f.readable() and f.seekable() and not f.writable()
        sink = _Hasher()
        shutil.copyfileobj(f, sink)
        assert f.tell() == entry["expected_raw"]["size"] == sink.n
        assert f.read(1) == b""
    assert sink.h.hexdigest() == entry["expected_raw"]["sha256"]
    assert f.closed


@pytest.mark.parametrize("buffering", [-1, 0, 4096])
@pytest.mark.parametrize("entry", READABLE, ids=lambda e: e["image"])
def test_random_seeks_and_reads_match_the_flat_disk(entry: dict, corpus_dir: Path, buffering: int) -> None:
    flat = _flat(corpus_dir / entry["image"], entry)
    size = len(flat)
    rnd = random.Random(f"{entry['image']}-{buffering}")
    with vhdfs.open(corpus_dir / entry["image"], buffering=buffering) as f:
        assert isinstance(f, VirtualDiskIO) == (buffering == 0)
        pos = 0
        for _ in range(300):
            whence = rnd.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            target = rnd.choice([0, size, rnd.randrange(size), rnd.randrange(size) // 512 * 512,
                                 size - rnd.randrange(1, 4096), size + 100])
            offset = {os.SEEK_SET: target, os.SEEK_CUR: target - pos, os.SEEK_END: target - size}[whence]
            assert f.seek(offset, whence) == target
            n = rnd.choice([0, 1, 511, 512, 4096, 65536, 3 << 20, rnd.randrange(1, 300_000)])
            if rnd.random() < 0.3:
                buf = bytearray(b"\xAA" * n)   # garbage in the buffer must never show through
                got = bytes(buf[:f.readinto(buf)])
            else:
                got = f.read(n)
            assert got == flat[target:target + n], (target, n)
            pos = target + len(got)
            assert f.tell() == pos
        f.seek(size // 3)
        assert f.read() == flat[size // 3:]


def test_seek_data_and_hole_follow_the_chain(corpus_dir: Path) -> None:
    path = corpus_dir / "xo-child2.vhd"
    with open_image(path) as img:
        exts = list(img.extents())
    with vhdfs.open(path, buffering=0) as f:
        for ext in exts:
            mid = ext.offset + ext.length // 2
            if ext.kind == 0:   # DATA somewhere in the chain
                assert f.seek(mid, os.SEEK_DATA) == mid
                assert f.seek(mid, os.SEEK_HOLE) >= ext.end
            else:
                assert f.seek(mid, os.SEEK_HOLE) == mid
                if ext.end < f.size:
                    assert f.seek(mid, os.SEEK_DATA) >= ext.end
                else:   # a trailing hole: no data after it, as lseek(2) says
                    with pytest.raises(OSError) as exc:
                        f.seek(mid, os.SEEK_DATA)
                    assert exc.value.errno == errno.ENXIO
        assert any(e.kind == 0 for e in exts) and any(e.kind != 0 for e in exts)
        with pytest.raises(OSError) as exc:
            f.seek(f.size, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
    with vhdfs.open(corpus_dir / "qemu-fixed-mbr-fat16.vhd") as f:   # a fixed disk is all data
        assert f.seek(0, os.SEEK_DATA) == 0 and f.seek(0, os.SEEK_HOLE) == BY_NAME["qemu-fixed-mbr-fat16.vhd"]["expected_raw"]["size"]


# -- writing ----------------------------------------------------------------------------------


def _random_writes(f: io.BufferedRandom | VirtualDiskIO, shadow: bytearray, seed: str, count: int = 60) -> None:
    rnd = random.Random(seed)
    size = len(shadow)
    for _ in range(count):
        n = rnd.choice([1, 512, 4096, 70_000, 2 << 20 | 123])
        off = rnd.choice([0, rnd.randrange(size - n), size - n, rnd.randrange(size // 4096) * 4096])
        off = min(off, size - n)
        data = rnd.randbytes(n)
        f.seek(off - size, os.SEEK_END) if rnd.random() < 0.3 else f.seek(off)
        assert f.write(data) == n
        shadow[off:off + n] = data


@needs_qemu
@pytest.mark.parametrize("entry", QEMU_AGREES, ids=lambda e: e["image"])
def test_writes_read_back_by_qemu(entry: dict, corpus_dir: Path, tmp_path: Path) -> None:
    path = _copy_chain(corpus_dir, entry["image"], tmp_path)
    shadow = bytearray(_flat(path, entry))
    with vhdfs.open(path, "r+b") as f:
        assert isinstance(f, io.BufferedRandom) and f.writable()
        _random_writes(f, shadow, entry["image"])
        # a write reaching past the end fails at once and writes nothing
        f.seek(len(shadow) - 10)
        with pytest.raises(OSError) as exc:
            f.write(b"x" * 11)
        assert exc.value.errno == errno.ENOSPC and str(path) in str(exc.value)
    assert _qemu_raw(path, tmp_path / "out.raw") == shadow
    run([sys.executable, "-m", "vhdfs", "check", str(path)])


def test_chain_writes_go_to_the_top_and_read_back(corpus_dir: Path, tmp_path: Path) -> None:
    path = _copy_chain(corpus_dir, "xo-child2.vhd", tmp_path)
    parents = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("xo-child1.vhd", "xo-base.vhd")}
    shadow = bytearray(_flat(path, BY_NAME["xo-child2.vhd"]))
    with vhdfs.open(path, "r+b", buffering=0) as raw:
        _random_writes(raw, shadow, "chain")
    with vhdfs.open(path) as f:
        assert f.read() == shadow
    assert {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in parents} == parents


def test_second_writer_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    path = _copy_chain(corpus_dir, "qemu-dynamic-mbr-ext4.vdi", tmp_path)
    with vhdfs.open(path, "r+b"):
        with pytest.raises(BusyError):
            vhdfs.open(path, "r+b")
        with pytest.raises(BusyError):
            vhdfs.open(path)


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qemu-dynamic-gpt-fat32-ext4.vhd", "qemu-dynamic-mbr-ext4.vdi",
                                  "qemu-fixed-mbr-fat16.vhd"])
def test_a_failure_underneath_raises_and_stays_raised(name: str, corpus_dir: Path, tmp_path: Path) -> None:
    path = _copy_chain(corpus_dir, name, tmp_path)
    flat = _flat(path, BY_NAME[name])
    with vhdfs.open(path, buffering=0) as f:
        assert f.read(4096) == flat[:4096]
        os.truncate(path, 64 * 1024)   # the file is cut short behind the open object
        with pytest.raises(OSError) as exc:
            f.seek(0)
            while True:   # somewhere the data is now missing: it must raise, never give zeros
                chunk = f.read(1 << 20)
                assert chunk, "read the whole disk from a truncated file"
                assert chunk == flat[f.tell() - len(chunk):f.tell()]
        assert str(path) in str(exc.value)
        assert isinstance(exc.value.__cause__, (VhdfsError, OSError))
        f.seek(0)
        with pytest.raises(OSError, match="earlier error"):
            f.read(512)    # even bytes that are still there: the object stays failed


def test_failed_write_raises_then_close_reports_it(corpus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    path = _copy_chain(corpus_dir, "qemu-dynamic-mbr-ext4.vdi", tmp_path)
    from vhdfs.block import rawfile

    f = vhdfs.open(path, "r+b", buffering=0)

    def failing(self, data, offset):  # noqa: ANN001, ANN202
        raise OSError(errno.EIO, "injected write failure")

    monkeypatch.setattr(rawfile.RawFile, "pwrite", failing)
    with pytest.raises(OSError, match="injected"):
        f.write(b"x" * 4096)
    with pytest.raises(OSError, match="earlier error"):
        f.read(1)
    monkeypatch.undo()
    with pytest.raises(OSError, match="earlier error"):
        f.flush()
    f.close()   # closes the image after a failure without a second report
    assert f.closed
    run([sys.executable, "-m", "vhdfs", "check", str(path)])


# -- the API ---------------------------------------------------------------------------------


def test_modes_options_and_errors(corpus_dir: Path, tmp_path: Path) -> None:
    path = corpus_dir / "qemu-static-mbr-fat12.vdi"
    for bad in ("w", "wb", "ab", "rt", "r+w", "rbb", "x"):
        with pytest.raises(ValueError):
            vhdfs.open(path, bad)
    with vhdfs.open(path, "r", buffering=0) as raw:
        assert raw.mode == "rb" and raw.name == str(path) and not raw.writable()
        with pytest.raises(io.UnsupportedOperation):
            raw.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            raw.truncate(0)
        with pytest.raises(io.UnsupportedOperation):
            raw.fileno()
        with pytest.raises(OSError):
            raw.seek(-1)
        assert raw.seek(-512, os.SEEK_END) == raw.size - 512
    with pytest.raises(ValueError):
        raw.read(1)
    # options are open_image's: format, parent_dirs
    with vhdfs.open(path, format="raw") as f:
        assert f.seek(0, os.SEEK_END) == path.stat().st_size
    apart = tmp_path / "apart"
    apart.mkdir()
    shutil.copyfile(corpus_dir / "xo-child2.vhd", apart / "xo-child2.vhd")
    with pytest.raises(ChainError):
        vhdfs.open(apart / "xo-child2.vhd")
    with vhdfs.open(apart / "xo-child2.vhd", parent_dirs=[corpus_dir]) as f:
        assert hashlib.sha256(f.read()).hexdigest() == BY_NAME["xo-child2.vhd"]["expected_raw"]["sha256"]
    with pytest.raises(TypeError):
        vhdfs.open(path, no_such_option=1)


def test_importing_vhdfs_stays_cheap() -> None:
    code = "import sys, vhdfs; print(sorted(m for m in sys.modules if m.split('.')[0] in ('vhdfs', 'trio', 'pyfuse3')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "['vhdfs']"


def test_example_script_runs(corpus_dir: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "file_object.py"
    env = {**os.environ, "PYTHONPATH": str(example.parents[1])}   # this checkout's vhdfs
    out = run([sys.executable, str(example), str(corpus_dir / "qemu-dynamic-mbr-ext4.vdi")], env=env)
    assert BY_NAME["qemu-dynamic-mbr-ext4.vdi"]["expected_raw"]["sha256"] in out.stdout
    assert "partition 1" in out.stdout
