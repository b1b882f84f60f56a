"""``vhdfs resize`` and ``vhdfs compact`` for VHDX, against a flat shadow and three other readers.

Each image gets data through the block layer, then is resized or compacted; afterwards it must
read as the shadow (the old bytes, then zeros), ``check`` must find no error or leak, and the
independent readers must agree: qemu-img 7.2 (fixed and dynamic with 512-byte sectors, the only
VHDX it opens: ``info`` size, ``check``, ``compare``), dissect.hypervisor and libvhdi-python
(every kind and sector size, a differencing file with its parent). Huge virtual sizes (a grow
past what a 1 MiB BAT region holds) are compared where data lives and at the new tail.
Differencing writes are whole 32 KiB runs, because dissect drops sectors of bitmap runs that
start and end inside one byte (FORMATS-VHDX.md).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.block.image import Image
from vhdfs.block.maintain import first_nonzero
from vhdfs.cli.create import parse_size
from vhdfs.formats.vhdx import spec
from vhdfs.tools.check import check_image
from vhdfs.tools.create import create_image
from vhdfs.tools.maintain import compact_image, resize_image

try:
    import pyvhdi
except ImportError:  # pragma: no cover - the test extra installs it
    pyvhdi = None
try:
    from dissect.hypervisor.disk.vhdx import VHDX as DissectVHDX
except ImportError:  # pragma: no cover
    DissectVHDX = None

MiB = 1024 * 1024
GiB = 1024 * MiB
SIZE = 20 * MiB + 3 * 32768  # the last block ends past the disk's end
QEMU = shutil.which("qemu-img")
BIG = "+200G"  # past the 131072 entries a 1 MiB BAT region holds (1 MiB blocks)


def make(
    kind: str, tmp: Path, sector: int = 512, block_size: int = MiB
) -> tuple[Path, bytearray, Path | None]:
    """An image of ``kind`` with data (and all-zero blocks compact can release), its shadow, its parent."""
    rng = random.Random(f"{kind}{sector}")
    parent = None
    if kind == "differencing":
        parent = tmp / "base.vhdx"
        create_image(
            str(parent), format="vhdx", type="dynamic", size=SIZE, block_size=block_size, sector_size=sector
        )
        with open_image(parent, writable=True) as img:
            img.write(0, rng.randbytes(SIZE))
    path = tmp / ("child.avhdx" if parent else f"{kind}.vhdx")
    create_image(
        str(path),
        format="vhdx",
        type=kind,
        size=None if parent else SIZE,
        block_size=block_size,
        sector_size=None if parent else sector,
        parent=str(parent) if parent else None,
    )
    with open_image(path, writable=True) as img:
        if parent is not None:
            img.write(2 * MiB, img.read(2 * MiB, MiB))  # the parent's bytes: released
            img.write(4 * MiB + 32768, rng.randbytes(65536))  # PARTIALLY_PRESENT
            img.write(9 * MiB, bytes(MiB))  # zeros over parent data: stay
            img.write(12 * MiB, rng.randbytes(MiB))
            img.write(12 * MiB, img.backing.read(12 * MiB, MiB))  # back to the parent's: released
        else:
            img.write(MiB, bytes(MiB))  # zeros: compact releases them
            img.write(6 * MiB, bytes(2 * MiB))
            for off in (0, 3 * MiB + 32768, 10 * MiB + 5000, SIZE - 32768):
                img.write(off, rng.randbytes(32768))
        img.flush()
        shadow = bytearray(img.read(0, img.size))
    return path, shadow, parent


def tail_is_zero(img: Image, start: int) -> bool:
    """``[start, size)`` reads as zeros; a huge tail (200 GiB: 200K extents, data in a fixed
    file) is sampled at its start, middle and end instead."""
    if img.size - start <= 256 * MiB:
        return first_nonzero(img, start, img.size) is None
    return all(img.read(at, MiB) == bytes(MiB) for at in (start, (start + img.size) // 2, img.size - MiB))


def reads_as(path: Path, size: int, prefix: bytes | bytearray, *, clean: bool = True) -> None:
    """The image has ``size`` bytes: ``prefix``, then zeros; ``check`` finds nothing wrong."""
    with open_image(path) as img:
        assert img.size == size
        n = min(size, len(prefix))
        assert img.read(0, n) == bytes(prefix[:n])
        assert tail_is_zero(img, n)
        if clean:
            bad = [f.finding.text for f in check_image(img) if f.finding.severity is not Severity.NOTE]
            assert bad == [], bad


def oracles(
    path: Path, size: int, prefix: bytes | bytearray, tmp: Path, parent: Path | None = None, tail: bool = True
) -> None:
    """qemu-img, dissect and libvhdi see the same size and bytes (the tail as zeros).

    ``tail=False`` for a child larger than its parent: dissect.hypervisor and libvhdi both fail
    on a read that falls through past the parent's end (neither has a rule for chains of
    another size), so only the size and the prefix are asked of them there."""
    n = min(size, len(prefix))
    end = (max(n, size - MiB), size)
    if QEMU and parent is None and _sector(path) == 512:
        info = subprocess.run(
            [QEMU, "info", "-f", "vhdx", "--output=json", str(path)], capture_output=True, text=True
        )
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == size
        res = subprocess.run([QEMU, "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        if size <= 64 * MiB:
            raw = tmp / "shadow.raw"
            raw.write_bytes(bytes(prefix[:n]) + bytes(size - n))
            res = subprocess.run(
                [QEMU, "compare", "-f", "vhdx", "-F", "raw", str(path), str(raw)],
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stdout + res.stderr
    if DissectVHDX is not None:
        v = DissectVHDX(path)
        assert v.size == size
        v.seek(0)
        assert v.read(n) == bytes(prefix[:n])
        if tail:
            v.seek(end[0])
            assert v.read(end[1] - end[0]) == bytes(end[1] - end[0])
    if pyvhdi is not None:
        f = pyvhdi.file()
        f.open(str(path))
        opened = [f]
        try:
            if parent is not None:
                p = pyvhdi.file()
                p.open(str(parent))
                opened.append(p)
                f.set_parent(p)
            assert f.get_media_size() == size
            assert f.read_buffer_at_offset(n, 0) == bytes(prefix[:n])
            if tail:
                assert f.read_buffer_at_offset(end[1] - end[0], end[0]) == bytes(end[1] - end[0])
        finally:
            for x in opened:
                x.close()


def _sector(path: Path) -> int:
    with open_image(path) as img:
        return img.sector_size


def _states(path: Path) -> list[int]:
    with open_image(path) as img:
        G = img.geometry
        return [img.bat[G.payload_index(b)] & 7 for b in range(G.payload_blocks)]


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("how", ["+5M", "+1G", "1073741000"])
def test_grow(kind: str, sector: int, how: str, tmp_path: Path) -> None:
    path, shadow, _ = make(kind, tmp_path, sector)
    old, new, _done = resize_image(str(path), how, parse_size)
    want = -(-parse_size(how.lstrip("+")) // sector) * sector + (SIZE if how[0] == "+" else 0)
    assert (old, new) == (SIZE, want)
    reads_as(path, new, shadow)
    oracles(path, new, shadow, tmp_path)
    if kind == "fixed":  # fixed = every block allocated, the new ones too
        assert set(_states(path)) == {spec.PAYLOAD_FULLY_PRESENT}


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("sector", [512, 4096])
def test_grow_across_a_bat_that_must_move(kind: str, sector: int, tmp_path: Path) -> None:
    path, shadow, _ = make(kind, tmp_path, sector)
    with open_image(path) as img:
        bat_before = img.layout.bat_offset
    _old, new, done = resize_image(str(path), BIG, parse_size)
    assert new == SIZE + 200 * GiB
    assert any("BAT region moved from" in d for d in done), done
    with open_image(path) as img:
        assert img.layout.bat_offset != bat_before
        assert img.layout.bat_length >= img.geometry.entry_count * 8
    reads_as(path, new, shadow)
    oracles(path, new, shadow, tmp_path)
    if kind == "fixed":
        assert set(_states(path)) == {spec.PAYLOAD_FULLY_PRESENT}
    with open_image(path, writable=True) as img:  # the new tail is writable, in the moved BAT
        img.write(new - 4096, b"\x5a" * 4096)
    with open_image(path) as img:
        assert img.read(new - 8192, 8192) == bytes(4096) + b"\x5a" * 4096
        assert img.read(0, SIZE) == bytes(shadow)


def test_bat_extended_in_place_when_nothing_follows(tmp_path: Path) -> None:
    path = tmp_path / "empty.vhdx"
    create_image(str(path), format="vhdx", type="dynamic", size=SIZE, block_size=MiB)
    _old, new, done = resize_image(str(path), BIG, parse_size)
    assert any("extended in place" in d for d in done), done
    reads_as(path, new, b"")
    oracles(path, new, b"", tmp_path)


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("sector", [512, 4096])
def test_shrink_only_zeros(kind: str, sector: int, tmp_path: Path) -> None:
    path, shadow, _ = make(kind, tmp_path, sector)
    resize_image(str(path), "+3M", parse_size)
    before = path.read_bytes()
    with pytest.raises(errors.UsageError, match=f"offset {SIZE - 32768} holds data"):
        resize_image(str(path), "-4M", parse_size)
    assert path.read_bytes() == before, "a refused shrink changed the image"
    size_before = path.stat().st_size
    _old, new, _done = resize_image(str(path), str(SIZE), parse_size)
    assert new == SIZE
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path)
    with open_image(path, writable=True) as img:  # cut to a block boundary: a short last block
        img.write(SIZE - 32768, bytes(32768))
    shadow[SIZE - 32768 :] = bytes(32768)
    resize_image(str(path), str(18 * MiB), parse_size)
    reads_as(path, 18 * MiB, shadow)
    oracles(path, 18 * MiB, shadow, tmp_path)
    if kind == "fixed":
        assert path.stat().st_size < size_before, "the cut blocks still fill the file"
    resize_image(str(path), "+5M", parse_size)  # cleared entries come back as zeros
    reads_as(path, 23 * MiB, shadow[: 18 * MiB])


def test_shrink_after_bat_move_and_grow_again(tmp_path: Path) -> None:
    path, shadow, _ = make("dynamic", tmp_path)
    resize_image(str(path), BIG, parse_size)
    resize_image(str(path), str(SIZE), parse_size)
    reads_as(path, SIZE, shadow)
    _b, after, done = compact_image(str(path), lambda d, t: None)  # the BAT comes back down
    assert any("BAT region moved down" in d for d in done), done
    assert after <= 4 * MiB + 5 * MiB, after  # header, log, metadata, BAT (2 MiB), 5 blocks
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path)
    resize_image(str(path), BIG, parse_size)
    reads_as(path, SIZE + 200 * GiB, shadow)
    oracles(path, SIZE + 200 * GiB, shadow, tmp_path)


@pytest.mark.parametrize("sector", [512, 4096])
def test_differencing_grow_and_shrink(sector: int, tmp_path: Path) -> None:
    """A child grows past its parent's end (the new tail reads zeros) and shrinks back; the parent
    never changes, and dissect and libvhdi read the child over its smaller parent the same."""
    path, shadow, parent = make("differencing", tmp_path, sector)
    parent_bytes = parent.read_bytes()
    old, new, _done = resize_image(str(path), "+3M", parse_size)
    assert (old, new) == (SIZE, SIZE + 3 * MiB)
    reads_as(path, SIZE + 3 * MiB, shadow)
    oracles(path, SIZE + 3 * MiB, shadow, tmp_path, parent, tail=False)
    with open_image(path, writable=True) as img:  # a write into the tail past the parent's end
        img.write(SIZE + MiB, b"t" * 4096)
    with open_image(path) as img:
        assert img.read(SIZE + MiB - 512, 4608 + 512) == bytes(512) + b"t" * 4096 + bytes(512)
    with pytest.raises(errors.UsageError, match="holds data"):
        resize_image(str(path), str(SIZE + MiB), parse_size)
    with open_image(path, writable=True) as img:
        img.write(SIZE + MiB, bytes(4096))
    resize_image(str(path), str(SIZE), parse_size)
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path, parent)
    assert parent.read_bytes() == parent_bytes


@pytest.mark.parametrize("sector", [512, 4096])
def test_compact_dynamic(sector: int, tmp_path: Path) -> None:
    path, shadow, _ = make("dynamic", tmp_path, sector)
    before = path.stat().st_size
    seen: list[tuple[int, int]] = []
    _b, after, done = compact_image(str(path), lambda d, t: seen.append((d, t)))
    assert "released 3 block(s)" in done[0], done
    assert any(d.startswith("moved ") and not d.startswith("moved 0") for d in done), done
    assert after == path.stat().st_size <= before - 3 * MiB
    assert seen and seen[-1][0] == seen[-1][1]
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path)
    _b, again, done = compact_image(str(path), lambda d, t: None)  # nothing left to do
    assert again == after and "released 0" in done[0]


@pytest.mark.parametrize("sector", [512, 4096])
def test_compact_differencing_keeps_zeros_over_parent_data(sector: int, tmp_path: Path) -> None:
    path, shadow, parent = make("differencing", tmp_path, sector)
    parent_bytes = parent.read_bytes()
    before = path.stat().st_size
    _b, after, done = compact_image(str(path), lambda d, t: None)
    assert "released 2 block(s)" in done[0], done
    assert after <= before - 2 * MiB
    states = _states(path)
    assert states[9] == spec.PAYLOAD_FULLY_PRESENT  # zeros over the parent's data stay
    assert states[2] == states[12] == spec.PAYLOAD_NOT_PRESENT
    assert states[4] == spec.PAYLOAD_PARTIALLY_PRESENT
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path, parent)
    assert parent.read_bytes() == parent_bytes


def test_compact_keeps_an_unused_sector_bitmap(tmp_path: Path) -> None:
    """libvhdi reads NOT_PRESENT blocks of a chunk without a bitmap as zeros after sector 0."""
    path, shadow, parent = make("differencing", tmp_path)
    with open_image(path, writable=True) as img:  # the only partial block: back to the parent's
        img.write(4 * MiB, img.backing.read(4 * MiB, MiB))
        shadow[4 * MiB : 5 * MiB] = img.backing.read(4 * MiB, MiB)
    _b, _a, done = compact_image(str(path), lambda d, t: None)
    assert "released 3 block(s)" in done[0], done
    with open_image(path) as img:
        assert img.bat[img.geometry.bitmap_index(0)] & 7 == spec.SB_PRESENT
    reads_as(path, SIZE, shadow)
    oracles(path, SIZE, shadow, tmp_path, parent)


def test_compact_fixed_refused(tmp_path: Path) -> None:
    path, _shadow, _ = make("fixed", tmp_path)
    with pytest.raises(errors.UnsupportedError, match="fixed VHDX"):
        compact_image(str(path), lambda d, t: None)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vhdfs", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_cli_resize_and_compact(tmp_path: Path) -> None:
    path, shadow, _ = make("dynamic", tmp_path)
    res = _cli("resize", str(path), "+1G")
    assert res.returncode == 0 and f"{SIZE} → {SIZE + GiB} bytes" in res.stdout, res.stdout + res.stderr
    res = _cli("resize", str(path), "1M")
    assert res.returncode == 2 and f"offset {3 * MiB + 32768} holds data" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("compact", str(path))
    assert res.returncode == 0 and "released 3 block(s)" in res.stdout, res.stdout + res.stderr
    res = _cli("check", str(path))
    assert res.returncode == 0 and "no problems found" in res.stdout, res.stdout + res.stderr
    (tmp_path / "d").mkdir()
    child, _s, _p = make("differencing", tmp_path / "d")
    res = _cli("resize", str(child), "+1G")  # a child grows past its parent's end
    assert res.returncode == 0 and f"{SIZE} → {SIZE + GiB} bytes" in res.stdout, res.stdout + res.stderr
    res = _cli("check", str(child))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    reads_as(path, SIZE + GiB, shadow)


def _allocations(path: Path) -> list[tuple[int, int, int]]:
    from vhdfs.formats.vhdx import space

    with open_image(path) as img:
        return space.allocations(img)


def test_damaged_image_refused_unchanged_and_neighbours_stay_quiet(tmp_path: Path) -> None:
    """A dynamic VHDX cut inside a block's data: resize and compact refuse it by name before any
    write (a writable open would rewrite its headers); a damaged image beside another one does
    not make ``resize`` of the good one print its warnings (the folder scan for children)."""
    path, _shadow, _ = make("dynamic", tmp_path)
    ok = tmp_path / "ok.vhdx"
    shutil.copyfile(path, ok)
    first_block = min(o for o, _n, _i in _allocations(path))
    with path.open("r+b") as f:
        f.truncate(first_block + MiB // 2)  # inside the first block's data
    before = path.read_bytes()
    for args in (("resize", str(path), "+1M"), ("compact", str(path))):
        res = _cli(*args)
        assert res.returncode == 3, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "past the end of the file" in lines[0] and "Traceback" not in res.stderr
        assert path.read_bytes() == before
    bad = tmp_path / "bad.vhd"  # a neighbour that warns when opened: a wrong footer checksum
    create_image(str(bad), format="vhd", type="dynamic", size=4 * MiB)
    with bad.open("r+b") as f:
        f.seek(bad.stat().st_size - 512 + 0x40)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert "warning" in _cli("info", str(bad)).stderr  # it does warn when asked about
    res = _cli("resize", str(ok), "+1M")
    assert res.returncode == 0 and res.stderr == "", res.stderr
