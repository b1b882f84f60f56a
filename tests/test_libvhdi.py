"""libvhdi (``vhdimount``) as an independent second reader of the VHDs vhdfs writes.

qemu-img is the first oracle; libvhdi is another implementation by other people, so an image
both read identically to our shadow file is one other tools will read. libvhdi misreads
bitmap bytes with only some bits set (see the corpus MANIFEST), so differencing chains here
are written in whole 4 KiB runs, where it is exact.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from conftest import corpus_entries, needs_root
from mounting import force_unmount, sha256_file
from vhdfs.block import open_image
from vhdfs.formats.vhd.create import create_vhd

pytestmark = [needs_root, pytest.mark.skipif(shutil.which("vhdimount") is None,
                                              reason="vhdimount (libvhdi-utils) not installed")]
SIZE = 24 * 1024 * 1024


@contextmanager
def vhdimounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """``vhdimount IMAGE MNT``: yields the file holding the whole chain (highest vhdiN)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["vhdimount", "-X", "allow_root", str(image), str(mountpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=image.parent)
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None and not os.path.ismount(mountpoint):
                pytest.fail(f"vhdimount failed: {proc.stdout.read() if proc.stdout else ''}")
            if time.monotonic() > deadline:
                pytest.fail("vhdimount did not mount in 15 s")
            time.sleep(0.05)
        files = sorted(mountpoint.iterdir(), key=lambda p: int(p.name[4:]))
        yield files[-1]
    finally:
        force_unmount(mountpoint)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _scribble(path: Path, shadow: bytearray, seed: int, aligned: bool) -> None:
    rnd = random.Random(seed)
    with open_image(path, writable=True) as img:
        for _ in range(40):
            if aligned:
                length = rnd.choice([4096, 65536, 1 << 20])
                off = rnd.randrange(0, (SIZE - length) // 4096) * 4096
            else:
                length = rnd.randrange(1, 300_000)
                off = rnd.randrange(0, SIZE - length)
            data = rnd.randbytes(length)
            img.write(off, data)
            shadow[off:off + length] = data


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_libvhdi_reads_what_vhdfs_wrote(tmp_path: Path, kind: str) -> None:
    image = tmp_path / f"{kind}.vhd"
    create_vhd(str(image), SIZE, kind)
    shadow = bytearray(SIZE)
    _scribble(image, shadow, seed=len(kind), aligned=False)
    with vhdimounted(image, tmp_path / "mnt") as raw:
        assert raw.stat().st_size == SIZE
        assert raw.read_bytes() == bytes(shadow)


def test_libvhdi_reads_a_vhdfs_differencing_chain(tmp_path: Path) -> None:
    base, mid, top = (tmp_path / n for n in ("base.vhd", "mid.vhd", "top.vhd"))
    shadow = bytearray(SIZE)
    create_vhd(str(base), SIZE, "dynamic")
    _scribble(base, shadow, seed=1, aligned=True)
    base_hash = sha256_file(base)
    create_vhd(str(mid), SIZE, "differencing", parent=str(base))
    _scribble(mid, shadow, seed=2, aligned=True)
    create_vhd(str(top), SIZE, "differencing", parent=str(mid))
    _scribble(top, shadow, seed=3, aligned=True)
    with vhdimounted(top, tmp_path / "mnt") as raw:
        assert raw.name == "vhdi3"
        assert raw.read_bytes() == bytes(shadow)
    assert sha256_file(base) == base_hash


@pytest.mark.parametrize("entry", [e for e in corpus_entries() if e["image"].endswith(".vhd")
                                   and e.get("expected_raw") and e["readers"].get("vhdimount", {}).get("sha256")
                                   == e["expected_raw"]["sha256"]], ids=lambda e: e["image"])
def test_vhdfs_agrees_with_libvhdi_on_the_corpus(corpus_dir: Path, tmp_path: Path, entry: dict) -> None:
    image = corpus_dir / entry["image"]
    with vhdimounted(image, tmp_path / "mnt") as raw:
        theirs = sha256_file(raw)
    with open_image(image) as img:
        import hashlib
        ours = hashlib.sha256(img.read(0, img.size)).hexdigest()
    assert ours == theirs == entry["expected_raw"]["sha256"]
