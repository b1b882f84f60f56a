"""``AsyncImage.write``: an in-place write up to ``INLINE_MAX`` is a copy into the page cache
done on the trio thread; a larger one, and every write that changes metadata (an allocation, a
bitmap bit, a first-write header update), goes to a worker thread. Bytes always land."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import trio
from vhdfs.aio.image import INLINE_MAX, AsyncImage
from vhdfs.block import open_image
from vhdfs.formats.vhd.create import create_vhd

MiB = 1 << 20


@pytest.mark.parametrize("size", [4096, INLINE_MAX, INLINE_MAX + 4096])
async def test_in_place_writes_inline_when_small(tmp_path: Path, thread_hops: list[object], size: int) -> None:
    path = tmp_path / "d.vhd"
    create_vhd(str(path), 8 * MiB, "dynamic")
    data = random.Random(size).randbytes(size)
    hops = thread_hops
    with open_image(path, writable=True) as image:
        shared = AsyncImage(image, True, trio.CapacityLimiter(2))
        await shared.write(MiB, memoryview(bytes(size)))  # allocates block 0: a worker thread
        assert len(hops) == 1
        hops.clear()
        await shared.write(MiB, memoryview(data))  # in place now
        assert len(hops) == (0 if size <= INLINE_MAX else 1), hops
    with open_image(path) as image:
        assert image.read(MiB, size) == data


async def test_a_vdi_first_write_renews_its_uuid_in_a_worker_thread(
    corpus_dir: Path, tmp_path: Path, thread_hops: list[object]
) -> None:
    """Block 0 of the QEMU-made VDI is allocated, but the session's first change writes the
    header (VirtualBox's new modification UUID, under meta_lock): not in place, not inline."""
    src = corpus_dir / "qemu-dynamic-mbr-ext4.vdi"
    if not src.exists():
        pytest.skip("corpus image missing")
    path = tmp_path / "copy.vdi"
    shutil.copyfile(src, path)
    hops = thread_hops
    with open_image(path, writable=True) as image:
        before = image.header.uuid_modify  # type: ignore[attr-defined]
        assert not image.write_is_in_place(0, 512)
        shared = AsyncImage(image, True, trio.CapacityLimiter(2))
        await shared.write(0, memoryview(b"\x5a" * 512))
        assert len(hops) == 1 and image.header.uuid_modify != before  # type: ignore[attr-defined]
        assert image.write_is_in_place(0, 512)
        hops.clear()
        await shared.write(512, memoryview(b"\xa5" * 512))
        assert hops == []
    with open_image(path) as image:
        assert image.read(0, 1024) == b"\x5a" * 512 + b"\xa5" * 512
