"""VDI writes against a flat shadow file: created dynamic/static images (checked by qemu-img),
small odd-sized images with discards, differencing chains of depth ≥ 3, concurrent allocation."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdfs.block import open_image
from vhdfs.formats.vdi.create import create_vdi

MIB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@st.composite
def ops(draw: st.DrawFn, size: int, block: int, discards: bool) -> list[tuple[str, int, int, int]]:
    """Writes (and discards) biased to straddle block boundaries and touch the disk's end."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["write", "write", "discard"] if discards else ["write"]))
        if draw(st.booleans()):
            boundary = block * draw(st.integers(0, max(0, (size - 1) // block)))
            offset = min(max(0, boundary + draw(st.integers(-3000, 3000))), size - 1)
        else:
            offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - offset, 3 * block + 1000)))
        out.append((kind, offset, length, draw(st.integers(0, 2**32))))
    return out


def apply(img, shadow: bytearray, plan: list[tuple[str, int, int, int]]) -> None:
    """Run ``plan`` on the image and the shadow; spot-check reads after each step."""
    for kind, offset, length, seed in plan:
        if kind == "write":
            data = payload(seed, length)
            assert img.write(offset, data) == length
            shadow[offset:offset + length] = data
        else:
            img.discard(offset, length)
            shadow[offset:offset + length] = bytes(length)
        lo, hi = max(0, offset - 700), min(len(shadow), offset + length + 700)
        assert img.read(lo, hi - lo) == bytes(shadow[lo:hi])


def qemu_raw(path: Path) -> bytes:
    out = path.with_suffix(".qemu.raw")
    subprocess.run([QEMU_IMG, "convert", "-f", "vdi", "-O", "raw", str(path), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_check(path: Path) -> None:
    res = subprocess.run([QEMU_IMG, "check", "-f", "vdi", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- created images, verified by qemu-img ------------------------------------------------------

@needs_qemu
@settings(FAST, max_examples=30)
@given(data=st.data(), kind=st.sampled_from(["dynamic", "static"]),
       size=st.integers(1, 5 * MIB // 512).map(lambda s: s * 512))
def test_created_images_match_shadow_and_qemu(data: st.DataObject, kind: str, size: int) -> None:
    plan = data.draw(ops(size, MIB, discards=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.vdi"
        create_vdi(path, size, kind)
        shadow = bytearray(size)
        with open_image(path, writable=True) as img:
            apply(img, shadow, plan)
            assert img.check() == []
        with open_image(path) as img:
            assert img.size == size and img.read(0, size) == shadow
        assert qemu_raw(path) == shadow
        qemu_check(path)


@needs_qemu
def test_writes_to_a_qemu_made_image(corpus_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "copy.vdi"
    shutil.copyfile(corpus_dir / "qemu-dynamic-mbr-ext4.vdi", path)
    path.chmod(0o644)
    shadow = bytearray(qemu_raw(path))
    plan = [("write", 5 * MIB - 100, 2 * MIB + 300, 1), ("write", 60 * MIB + 7, 4000, 2),
            ("write", 0, 512, 3), ("write", 64 * MIB - 1, 1, 4)]
    with open_image(path, writable=True) as img:
        apply(img, shadow, plan)
        in_place = img.write_is_in_place(0, 512)  # after the first change's header update
    assert in_place  # block 0 holds the MBR: qemu allocated it
    assert qemu_raw(path) == shadow
    qemu_check(path)


# -- small blocks, odd sizes, discards -----------------------------------------------------------

@settings(FAST, max_examples=80)
@given(data=st.data(), block=st.sampled_from([512, 4096, 65536]),
       size=st.integers(1, 600).map(lambda s: s * 512))
def test_small_blocks_and_discard_match_shadow(data: st.DataObject, block: int, size: int) -> None:
    plan = data.draw(ops(size, block, discards=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.vdi"
        create_vdi(path, size, "dynamic", block_size=block)
        shadow = bytearray(size)
        with open_image(path, writable=True) as img:
            apply(img, shadow, plan)
            assert img.check() == []
        with open_image(path) as img:
            assert img.read(0, size) == shadow
            assert img.check() == []


# -- differencing chains -------------------------------------------------------------------------

def _build_chain(root: Path, size: int) -> tuple[list[Path], bytearray]:
    """base ← c1 ← c2 ← top, each lower layer written; c2 uses a smaller block size."""
    shadow = bytearray(size)
    paths = [root / "base.vdi", root / "c1.vdi", root / "c2.vdi", root / "top.vdi"]
    create_vdi(paths[0], size, "dynamic", block_size=65536)
    rng = random.Random(7)
    for i, path in enumerate(paths):
        if i:
            create_vdi(path, 0, parent=str(paths[i - 1]), block_size=4096 if i == 2 else None)
        if i == len(paths) - 1:
            break
        with open_image(path, writable=True) as img:
            for _ in range(6):
                off = rng.randrange(size)
                n = rng.randrange(1, min(size - off, 100_000) + 1)
                data = rng.randbytes(n)
                img.write(off, data)
                shadow[off:off + n] = data
            if i == 1:
                img.discard(65536, 65536)
                shadow[65536:131072] = bytes(65536)
    return paths, shadow


@settings(FAST, max_examples=30)
@given(data=st.data())
def test_diff_chain_depth_4_matches_shadow_and_parents_unchanged(data: st.DataObject) -> None:
    size = 640 * 1024 + 512
    with tempfile.TemporaryDirectory() as tmp:
        paths, shadow = _build_chain(Path(tmp), size)
        before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:-1]]
        with open_image(paths[-1], writable=True) as img:
            assert [Path(layer.path) for layer in img.chain] == paths[::-1]
            assert img.read(0, size) == shadow
            apply(img, shadow, data.draw(ops(size, 65536, discards=True)))
        with open_image(paths[-1]) as img:
            assert img.read(0, size) == shadow
            assert img.check() == []
        assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:-1]] == before


def test_concurrent_allocating_writers(tmp_path: Path) -> None:
    """Threads allocating different blocks at once never share an index."""
    path = tmp_path / "threads.vdi"
    block = 4096
    create_vdi(path, 64 * block, "dynamic", block_size=block)
    with open_image(path, writable=True) as img:
        def worker(k: int) -> None:
            for b in range(k, 64, 4):
                img.write(b * block + 10, bytes([b + 1]) * 100)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert img.check() == []
    with open_image(path) as img:
        for b in range(64):
            assert img.read(b * block + 10, 100) == bytes([b + 1]) * 100
        assert img.describe()["allocated_blocks"] == 64


def test_blocks_allocated_is_durable_before_the_map_entries_that_use_it(tmp_path, monkeypatch):
    """A commit that allocates writes ``blocks_allocated``, syncs, then the map entries: with no
    sync between them a power cut could store an entry past ``blocks_allocated``, a block that
    QEMU (which allocates at ``blocks_allocated``) would hand out a second time."""
    from vhdfs.formats.vdi import spec as fmt
    from vhdfs.tools.create import create_image
    from writelog import WriteLog

    path = tmp_path / "d.vdi"
    create_image(str(path), format="vdi", type="dynamic", size=8 * MIB)
    with open_image(path) as img:
        map_start, map_end = img.header.offset_bmap, img.header.offset_bmap + 4 * img.header.blocks_in_image
    log = WriteLog(str(path))
    log.install(monkeypatch)
    with open_image(path, writable=True) as img:
        img.write(0, b"a" * MIB)
        img.write(3 * MIB, b"b" * MIB)
    monkeypatch.undo()
    kinds = []
    for op, off, _data in log.ops:
        if op == "s":
            kinds.append("sync")
        elif op == "w" and off == fmt.BLOCKS_ALLOCATED_OFFSET:
            kinds.append("count")
        elif op == "w" and map_start <= off < map_end:
            kinds.append("entry")
    assert "count" in kinds and "entry" in kinds, kinds
    for i, k in enumerate(kinds):
        if k == "entry":
            last_count = max(j for j in range(i) if kinds[j] == "count")
            assert "sync" in kinds[last_count + 1 : i], kinds
    with open_image(path) as img:
        assert img.read(0, MIB) == b"a" * MIB and img.read(3 * MIB, MIB) == b"b" * MIB
