"""``AsyncImage.read`` on page-cache misses: a small request is read inline on the trio thread
(a worker-thread hop costs a cold 4 KiB read as much CPU as the read), a large one in a worker
thread (where several overlap); both must return the image's bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from vhdfs.aio.image import INLINE_MAX, AsyncImage
from vhdfs.block import open_image
from vhdfs.formats.vhd.create import create_vhd


@pytest.mark.parametrize("size", [4096, INLINE_MAX, INLINE_MAX + 4096, 1 << 20])
async def test_misses_inline_when_small_in_a_thread_when_large(
    tmp_path: Path, thread_hops: list[object], size: int
) -> None:
    path = tmp_path / "d.vhd"
    create_vhd(str(path), 8 << 20, "dynamic")
    data = random.Random(size).randbytes(4 << 20)
    with open_image(path, writable=True) as w:
        w.write(1 << 20, data)
    hops = thread_hops
    image = open_image(path)
    try:
        shared = AsyncImage(image, False, trio.CapacityLimiter(2))
        shared.nowait = False  # every read is a miss, as after drop_caches
        off = (1 << 20) + 12345
        await shared.read(off, size)  # the first read of a block maps it in a thread (bitmap I/O)
        hops.clear()
        got = await shared.read(off, size)
        assert bytes(got) == data[12345 : 12345 + size]
        assert len(hops) == (0 if size <= INLINE_MAX else 1), hops
    finally:
        image.close()
