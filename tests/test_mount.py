"""Real FUSE mounts of raw files and VHDs: what ``vhdfs mount`` promises a user (issue 4)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

from conftest import corpus_entries, needs_root
from mounting import (force_unmount, fs_mounted, loop_device, make_tree, mounted, new_vhd, partition_device,
                      read_tree, run, sha256_file, vhdfs)

pytestmark = [pytest.mark.timeout(120)]


def _raw(path: Path, size: int = 16 << 20, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _assert_not_mounted(mp: Path) -> None:
    assert not os.path.ismount(mp)


# -- raw-backed mounts: the daemon itself ---------------------------------------------------

@needs_root
def test_raw_read_write_and_clean_umount(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = bytearray(_raw(img))
    with mounted([img], tmp_path / "mnt", "--format", "raw", "-w") as m:
        f = m.file("disk.raw")
        assert f.stat().st_size == len(data)
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
        assert f.read_bytes() == data
        patch = os.urandom(3 * 65536 + 17)
        with open(f, "r+b") as fh:
            fh.seek(12345)
            fh.write(patch)
            fh.flush()
            os.fsync(fh.fileno())
        data[12345:12345 + len(patch)] = patch
        assert f.read_bytes() == data
        assert m.unmount() == 0
    assert img.read_bytes() == data


@needs_root
def test_st_blocks_follows_writes_while_attributes_are_cached(tmp_path: Path) -> None:
    """Attributes are kept 300 s; the committer re-announces st_blocks once writes allocate."""
    with mounted([new_vhd(tmp_path / "d.vhd")], tmp_path / "mnt", "-w") as m:
        f = m.file("d.raw")
        before = f.stat().st_blocks
        assert before * 512 < 1 << 20
        with open(f, "r+b") as fh:
            fh.seek(32 << 20)
            fh.write(os.urandom(4 << 20))
            fh.flush()
            os.fsync(fh.fileno())
        deadline = time.monotonic() + 10
        while f.stat().st_blocks * 512 < before * 512 + (4 << 20):
            assert time.monotonic() < deadline, f"st_blocks stuck at {f.stat().st_blocks}"
            time.sleep(0.1)
        assert m.unmount() == 0


@needs_root
def test_readonly_refuses_writes(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    _raw(img, 1 << 20)
    with mounted([img], tmp_path / "mnt", "--format", "raw") as m:
        f = m.file("disk.raw")
        assert stat.S_IMODE(f.stat().st_mode) == 0o444
        with pytest.raises(OSError) as exc:
            os.open(f, os.O_WRONLY)
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            (m.path / "new").write_bytes(b"x")
        assert exc.value.errno in (errno.EROFS, errno.EPERM)


@needs_root
def test_background_mount_then_umount(tmp_path: Path) -> None:
    img, mp = tmp_path / "a.img", tmp_path / "mnt"
    data = _raw(img, 4 << 20)
    mp.mkdir()
    try:
        res = vhdfs("mount", "--format", "raw", img, mp)
        assert res.returncode == 0, res.stderr
        # Exit 0 means the file is there, now.
        assert (mp / "a.raw").read_bytes() == data
        res = vhdfs("umount", mp)
        assert res.returncode == 0, res.stderr
        _assert_not_mounted(mp)
    finally:
        force_unmount(mp)


@needs_root
def test_stem_clash_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    _raw(tmp_path / "x" / "disk.img", 4096)
    _raw(tmp_path / "y" / "disk.img", 4096)
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = vhdfs("mount", "--format", "raw", tmp_path / "x/disk.img", tmp_path / "y/disk.img", mp)
    assert res.returncode == 2 and "disk.raw" in res.stderr
    _assert_not_mounted(mp)


@needs_root
def test_second_writable_mount_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    _raw(img, 1 << 20)
    (tmp_path / "m2").mkdir()
    with mounted([img], tmp_path / "m1", "--format", "raw", "-w"):
        res = vhdfs("mount", "--format", "raw", "-w", img, tmp_path / "m2")
        assert res.returncode == 4, res.stderr
        assert "in use by another process" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        _assert_not_mounted(tmp_path / "m2")


@needs_root
def test_sigterm_unmounts_and_flushes(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = bytearray(_raw(img, 2 << 20))
    with mounted([img], tmp_path / "mnt", "--format", "raw", "-w") as m:
        patch = os.urandom(100_000)
        with open(m.file("disk.raw"), "r+b") as fh:
            fh.seek(4096)
            fh.write(patch)
        data[4096:4096 + len(patch)] = patch
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0, m.log()
        _assert_not_mounted(m.path)
    assert img.read_bytes() == data


@needs_root
@pytest.mark.parametrize("case", ["missing", "not_a_folder", "not_empty", "garbage", "missing_parent"])
def test_bad_input_one_line_nothing_mounted(tmp_path: Path, case: str) -> None:
    img, mp = tmp_path / "disk.vhd", tmp_path / "mnt"
    mp.mkdir()
    if case == "missing":
        pass
    elif case == "not_a_folder":
        _raw(img, 4096)
        mp.rmdir()
        mp.write_text("x")
        args = ["--format", "raw"]
    elif case == "not_empty":
        _raw(img, 4096)
        (mp / "junk").write_text("x")
    elif case in ("garbage", "missing_parent"):
        if case == "garbage":
            _raw(img, 1 << 20)
        else:
            base = tmp_path / "base.vhd"
            run([*_create(), "--type", "dynamic", "--size", "8M", base], check=True)
            run([*_create(), "--type", "differencing", "--parent", base, img], check=True)
            base.unlink()
    args = ["--format", "raw"] if case in ("not_a_folder", "not_empty") else []
    res = vhdfs("mount", *args, img, mp)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdfs: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not (mp.is_dir() and os.path.ismount(mp))


@needs_root
@pytest.mark.parametrize("kind", ["raw", "vhd-dynamic", "vhd-differencing"])
def test_fio_concurrent_readers_and_writers(tmp_path: Path, kind: str) -> None:
    """Four verifying writers and two readers at once: allocation races lose nothing."""
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    if kind == "raw":
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(32 << 20))
        opts = ["--format", "raw"]
    else:
        from vhdfs.formats.vhd.create import create_vhd
        base = tmp_path / "base.vhd"
        create_vhd(str(base), 32 << 20, "dynamic", block_size=1 << 20)
        img = base
        if kind == "vhd-differencing":
            img = tmp_path / "child.vhd"
            create_vhd(str(img), 32 << 20, "differencing", parent=str(base))
        opts = []
    with mounted([img], tmp_path / "mnt", "-w", "--no-partitions", *opts) as m:
        target = str(m.file(img.stem + ".raw"))
        res = run(["fio", "--name=verify", f"--filename={target}", "--rw=randwrite", "--bs=4k",
                   "--size=8M", "--offset_increment=8M", "--numjobs=4", "--ioengine=psync",
                   "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--group_reporting",
                   "--name=reader", f"--filename={target}", "--rw=randread", "--bs=64k",
                   "--size=32M", "--numjobs=2", "--ioengine=psync", "--time_based", "--runtime=3"],
                  timeout=120, check=False, cwd=tmp_path)  # fio drops verify state files in cwd
        assert res.returncode == 0 and "verify:" not in res.stderr, res.stdout + res.stderr
        assert m.unmount() == 0
    if kind != "raw":
        assert run([*__import__("mounting").VHDFS, "check", str(img)], check=False).returncode == 0


# -- VHD-backed mounts (skip until the driver lands) -----------------------------------------

def _create() -> list[str]:
    return [*__import__("mounting").VHDFS, "create"]


def _readable_corpus() -> list[dict]:
    return [e for e in corpus_entries() if e.get("expected_raw")]


@needs_root
@pytest.mark.parametrize("entry", _readable_corpus(), ids=lambda e: e["image"])
def test_corpus_image_reads_as_manifest(corpus_dir: Path, tmp_path: Path, entry: dict) -> None:
    with mounted([corpus_dir / entry["image"]], tmp_path / "mnt", "--no-partitions") as m:
        f = m.file(Path(entry["image"]).stem + ".raw")
        assert f.stat().st_size == entry["expected_raw"]["size"]
        assert sha256_file(f) == entry["expected_raw"]["sha256"]


@needs_root
def test_dynamic_vhd_filesystem_roundtrip_via_qemu(tmp_path: Path) -> None:
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img missing")
    img = tmp_path / "disk.vhd"
    run([*_create(), "--type", "dynamic", "--size", "64M", img])
    src = tmp_path / "src"
    tree = make_tree(src)
    with mounted([img], tmp_path / "mnt", "-w", "--no-partitions") as m:
        raw = m.file("disk.raw")
        run(["sfdisk", "-q", str(raw)], input="label: dos\n,,L\n")
        with partition_device(raw, 1) as part:
            run(["mkfs.ext4", "-q", "-F", part])
            with fs_mounted(part, tmp_path / "fs") as fs:
                run(["cp", "-a", f"{src}/.", str(fs)])
        assert m.unmount() == 0
    flat = tmp_path / "flat.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(img), str(flat)])
    with partition_device(flat, 1, readonly=True) as part:
        with fs_mounted(part, tmp_path / "check", "ro") as fs:
            assert read_tree(fs) == tree


@needs_root
def test_differencing_child_over_corpus_parent(corpus_dir: Path, tmp_path: Path) -> None:
    name = "qemu-dynamic-gpt-fat32-ext4.vhd"
    if not (corpus_dir / name).exists():
        pytest.skip(f"{name} not in the corpus")
    parent = tmp_path / "parent.vhd"
    shutil.copyfile(corpus_dir / name, parent)
    parent_sha = sha256_file(parent)
    child = tmp_path / "child.vhd"
    run([*_create(), "--type", "differencing", "--parent", parent, child])
    shadow = tmp_path / "shadow.raw"
    with mounted([parent], tmp_path / "m0", "--no-partitions") as m:
        shutil.copyfile(m.file("parent.raw"), shadow)
    rnd = random.Random(7)
    size = shadow.stat().st_size
    # Block-level writes inside partition 1 (FAT, never mounted here), mirrored on the shadow;
    # the file system writes go to partition 2 (ext4, from 41 MiB).
    assert size > 41 << 20
    writes = [(rnd.randrange(2 << 20, 40 << 20), rnd.randbytes(rnd.choice([1, 512, 4096, 65_537])))
              for _ in range(40)]
    tree = make_tree(tmp_path / "src", files=10)
    with mounted([child], tmp_path / "mnt", "-w") as m:
        with open(m.file("child.raw"), "r+b") as fh, open(shadow, "r+b") as sh:
            for off, data in writes:
                for f in (fh, sh):
                    f.seek(off)
                    f.write(data)
        # And a file system write through a loop device, on the ext4 partition (p2).
        ext4 = m.file("child-p2.raw")
        with loop_device(ext4) as dev, fs_mounted(dev, tmp_path / "fs") as fs:
            run(["cp", "-a", f"{tmp_path / 'src'}/.", str(fs)])
        assert m.unmount() == 0
    assert sha256_file(parent) == parent_sha
    with mounted([child], tmp_path / "m2", "--no-partitions") as m:
        got = m.file("child.raw")
        with open(got, "rb") as g, open(shadow, "rb") as sh:
            for off, data in writes:
                g.seek(off)
                sh.seek(off)
                assert g.read(len(data)) == sh.read(len(data))
        with partition_device(got, 2, readonly=True) as part:
            with fs_mounted(part, tmp_path / "check", "ro") as fs:
                assert {k: (fs / k).read_bytes() for k in tree} == tree
    # The block layer reads the same chain.
    from vhdfs.block import open_image

    with open_image(child) as img, open(shadow, "rb") as sh:
        assert img.backing is not None and img.backing.path == str(parent)
        for off, data in writes:
            sh.seek(off)
            assert img.read(off, len(data)) == sh.read(len(data))
        assert img.read(0, 40 << 20) == (sh.seek(0), sh.read(40 << 20))[1]


@needs_root
def test_snapshot_leaves_base_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    run([*_create(), "--type", "dynamic", "--size", "16M", base])
    before = sha256_file(base)
    keep = tmp_path / "kept.vhd"
    patch = os.urandom(300_000)
    with mounted([base], tmp_path / "mnt", "--snapshot", "--keep", keep) as m:
        with open(m.file("base.raw"), "r+b") as fh:
            fh.seek(1 << 20)
            fh.write(patch)
        assert m.unmount() == 0
    assert sha256_file(base) == before
    with mounted([keep], tmp_path / "m2") as m:
        with open(m.file("kept.raw"), "rb") as fh:
            fh.seek(1 << 20)
            assert fh.read(len(patch)) == patch


# -- the error boundary, in process (no mount needed) -----------------------------------------

class _Exploding:
    """An image whose mapping raises a bug-like exception."""

    path = "/fake.img"
    size = 1 << 20
    chain: list = []

    def extents(self, off: int, n: int):  # noqa: ANN201
        raise RuntimeError("a bug")

    def write_is_in_place(self, off: int, n: int) -> bool:
        return True

    def write(self, off: int, data: bytes) -> int:
        return len(data)


async def test_unexpected_error_is_eio_and_switches_to_failsafe() -> None:
    import pyfuse3
    import trio

    from vhdfs.aio.export import Export as ImageFile
    from vhdfs.aio.image import AsyncImage as SharedImage
    from vhdfs.fs.operations import VhdfsOperations

    shared = SharedImage(_Exploding(), True, trio.CapacityLimiter(2))  # type: ignore[arg-type]
    ops = VhdfsOperations([ImageFile("x.raw", shared)])
    ino = pyfuse3.ROOT_INODE + 1
    assert await ops.write(ino, 0, b"ok") == 2
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(ino, 0, 10)
    assert exc.value.errno == errno.EIO
    assert ops.failsafe
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.write(ino, 0, b"no")
    assert exc.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(pyfuse3.ROOT_INODE, b"missing", None)
    assert exc.value.errno == errno.ENOENT


async def test_failed_background_commit_is_reported_once_at_the_next_fsync(tmp_path: Path) -> None:
    """Group commit: the daemon commits pending metadata in the background; if that fails, the
    writes it covered are rolled back, so the next fsync must say EIO (then the mount goes on)."""
    import pyfuse3
    import trio

    from vhdfs.block import open_image
    from vhdfs.block.rawfile import RawFile
    from vhdfs.formats.vhd.create import create_vhd
    from vhdfs.aio.export import Export as ImageFile
    from vhdfs.aio.image import AsyncImage as SharedImage
    from vhdfs.fs.operations import VhdfsOperations

    path = tmp_path / "d.vhd"
    create_vhd(str(path), 8 << 20, "dynamic")
    image = open_image(path, writable=True)
    shared = SharedImage(image, True, trio.CapacityLimiter(2))
    ops = VhdfsOperations([ImageFile("d.raw", shared)])
    ino = pyfuse3.ROOT_INODE + 1
    assert await ops.write(ino, 0, b"lost" * 1024) == 4096
    assert image.has_pending_metadata()
    real_sync = RawFile.sync

    def failing_sync(self: RawFile) -> None:
        raise OSError(errno.EIO, "injected")

    rollbacks: list[int] = []
    shared.on_rollback = lambda: rollbacks.append(1)   # the daemon drops the kernel's cached pages here
    RawFile.sync = failing_sync  # type: ignore[method-assign]
    try:
        await shared.commit_pending()      # logs, never raises
    finally:
        RawFile.sync = real_sync           # type: ignore[method-assign]
    assert rollbacks == [1], "a rollback must invalidate what the kernel caches"
    assert not image.has_pending_metadata()
    assert await ops.read(ino, 0, 4) == bytes(4), "rolled-back data must not show"
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.fsync(ino, True)
    assert exc.value.errno == errno.EIO
    await ops.fsync(ino, True)             # reported once; the mount goes on
    assert await ops.write(ino, 0, b"kept") == 4
    await ops.fsync(ino, True)
    image.close()
    with open_image(path) as again:
        assert again.read(0, 4) == b"kept" and [p for p in again.check() if p.severity.name != "LEAK"] == []


async def test_invalidating_skips_a_file_the_kernel_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOENT from the kernel for one file (never looked up) must not stop the others."""
    import pyfuse3
    import trio

    from vhdfs.aio.export import Export as ImageFile
    from vhdfs.aio.image import AsyncImage as SharedImage
    from vhdfs.fs.operations import VhdfsOperations

    shared = SharedImage(_Exploding(), False, trio.CapacityLimiter(2))  # type: ignore[arg-type]
    ops = VhdfsOperations([ImageFile("d.raw", shared), ImageFile("d-p1.raw", shared, 4096, 8192)])
    first, second = pyfuse3.ROOT_INODE + 1, pyfuse3.ROOT_INODE + 2
    seen: list[tuple[int, bool]] = []

    def invalidate(ino: int, attr_only: bool = False) -> None:
        seen.append((ino, attr_only))
        if ino == first:
            raise OSError(errno.ENOENT, "not cached")

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate)
    ops.refresh_attributes(shared)
    ops.invalidate_image(shared)
    assert seen == [(first, True), (second, True), (first, False), (second, False)]
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: (_ for _ in ()).throw(
        OSError(errno.EIO, "other")))
    with pytest.raises(OSError):
        ops.refresh_attributes(shared)
