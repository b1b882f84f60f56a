"""The VHDX driver end to end, reading: the real corpus, chains built by the independent test
writer (tests/images/vhdx_writer.py), parent lookup and linkage, 4K sectors, the CLI, a real
FUSE mount, and hostile input (truncations and byte flips never traceback, hang or write)."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import needs_root
from images import vhdx_writer as w

from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.extent import Kind
from vhdfs.block.partitions import find_partitions

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus-vhdx"
G_BASE, G_MID, G_TOP = (uuid.UUID(int=n) for n in (0xB1, 0xB2, 0xB3))


def corpus_entries() -> list[dict]:
    m = CORPUS / "manifest.json"
    return json.loads(m.read_text())["images"] if m.is_file() else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not corpus_entries():
        pytest.skip(f"VHDX corpus not found at {CORPUS}")
    out = tmp_path_factory.mktemp("corpus-vhdx")
    for e in corpus_entries():
        with lzma.open(CORPUS / e["stored_as"]) as src, open(out / e["image"], "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.chmod(out / e["image"], 0o444)
    return out


def sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def sha_image(img) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < img.size:
        d = img.read(pos, 4 * MiB)
        assert d
        h.update(d)
        pos += len(d)
    return h.hexdigest()


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdfs", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


# --- the corpus ---------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", corpus_entries(), ids=lambda e: e["image"])
def test_corpus_reads_to_manifest_hash(entry, corpus):
    path = corpus / entry["image"]
    before = sha_file(path)
    with open_image(path) as img:
        assert img.format == "vhdx"
        assert img.size == entry["expected_raw"]["size"]
        assert img.sector_size == entry["logical_sector_size"]
        assert img.allocation_unit == entry["block_size"]
        got = sha_image(img)
        info = img.describe()
    assert got not in entry.get("stale_no_replay_sha256", [])
    assert got == entry["expected_raw"]["sha256"]
    assert sha_file(path) == before == entry["image_file_sha256"]
    if entry["log_dirty"]:
        assert info["log"].startswith("replayed in memory: 1 entries")
    else:
        assert info["log"] == "clean"


@pytest.mark.parametrize("entry", corpus_entries(), ids=lambda e: e["image"])
def test_corpus_info_and_check(entry, corpus):
    path = corpus / entry["image"]
    res = cli("info", path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    res_json = cli("info", "--json", path)
    assert res_json.returncode == 0, res_json.stderr
    chk = cli("check", "--verbose", path)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    if entry["log_dirty"]:
        assert "replayed" in res.stdout and "replayed" in chk.stdout + chk.stderr
    assert sha_file(path) == entry["image_file_sha256"]


@needs_root
def test_corpus_fuse_mount(corpus, tmp_path):
    from mounting import mounted
    fixed = corpus / "dissect-fixed.vhdx"
    entry = {e["image"]: e for e in corpus_entries()}["dissect-fixed.vhdx"]
    with mounted([fixed], tmp_path / "mnt") as m:
        assert sha_file(m.file("dissect-fixed.raw")) == entry["expected_raw"]["sha256"]
        m.unmount()
    dirty = corpus / "qemu-iotest-dirtylog-10G-4M.vhdx"
    with mounted([dirty], tmp_path / "mnt2") as m:
        with open(m.file("qemu-iotest-dirtylog-10G-4M.raw"), "rb") as f:
            assert f.read(18 * MiB) == b"\xa5" * (18 * MiB)
            assert f.read(MiB) == bytes(MiB)
        m.unmount()
    assert sha_file(dirty) == {e["image"]: e for e in corpus_entries()}[dirty.name]["image_file_sha256"]


# --- chains built by the test writer ------------------------------------------------------------
def _save(b: w.Built, path: Path, dwg: uuid.UUID) -> Path:
    b.set_headers(data_write_guid=dwg)
    path.write_bytes(b.data)
    return path


def _locator(parent_guid: uuid.UUID, rel: str, **extra) -> dict[str, str]:
    loc = {"parent_linkage": "{%s}" % parent_guid, "relative_path": rel}
    loc.update(extra)
    return loc


def _bitmap_for(ratio: int, spb: int, marks: dict[int, list[tuple[int, int]]]) -> bytes:
    """A chunk bitmap with sectors [a, b) of each block set, LSB-first."""
    bm = bytearray(MiB)
    for block, ranges in marks.items():
        for a, b in ranges:
            for s in range(a, b):
                k = (block % ratio) * spb + s
                bm[k // 8] |= 1 << (k % 8)
    return bytes(bm)


def build_chain(tmp: Path, logical: int) -> tuple[Path, bytes, list[Path]]:
    """base (dynamic) <- mid (PARTIALLY_PRESENT, sub-byte runs) <- top (ZERO, FULLY, partial)."""
    B = 1 * MiB
    size = 6 * MiB
    spb = B // logical
    ratio = (1 << 23) * logical // B
    rnd = random.Random(logical)
    base_blocks = {b: rnd.randbytes(B) for b in range(5)}       # block 5 NOT_PRESENT: zeros
    base = w.build_vhdx(size, block_size=B, logical=logical, blocks=base_blocks)
    _save(base, tmp / "base.vhdx", G_BASE)
    expect = bytearray(base.raw_content())

    # mid: block 0 partial with runs starting/ending inside a byte, block 2 partial one sector
    mid_marks = {0: [(3, 5), (9, 10), (17, 40), (spb - 3, spb)], 2: [(1, 2)]}
    mid_data = {0: rnd.randbytes(B), 2: rnd.randbytes(B)}
    mid = w.build_vhdx(size, block_size=B, logical=logical, kind="differencing",
                       blocks={0: (w.PARTIALLY_PRESENT, mid_data[0]),
                               2: (w.PARTIALLY_PRESENT, mid_data[2]),
                               4: w.ZERO},
                       bitmaps={0: _bitmap_for(ratio, spb, mid_marks)},
                       parent_locator=_locator(G_BASE, ".\\..\\base.vhdx"))
    sub = tmp / "sub"
    sub.mkdir()
    _save(mid, sub / "mid.avhdx", G_MID)
    for blk, ranges in mid_marks.items():
        for a, b in ranges:
            lo, hi = blk * B + a * logical, blk * B + b * logical
            expect[lo:hi] = mid_data[blk][a * logical:b * logical]
    expect[4 * B:5 * B] = bytes(B)                      # ZERO in a child: zeros, not the parent

    # top: block 1 ZERO, block 3 FULLY, block 0 partial over mid's partial, UNMAPPED 5, UNDEFINED
    top_marks = {0: [(4, 12)]}
    top_data = {0: rnd.randbytes(B), 3: rnd.randbytes(B)}
    top = w.build_vhdx(size, block_size=B, logical=logical, kind="differencing",
                       blocks={0: (w.PARTIALLY_PRESENT, top_data[0]), 1: w.ZERO,
                               3: top_data[3], 5: w.UNMAPPED},
                       bitmaps={0: _bitmap_for(ratio, spb, top_marks)},
                       parent_locator=_locator(G_MID, "..\\sub\\mid.avhdx",
                                               absolute_win32_path="D:\\VMs\\sub\\mid.avhdx"))
    top_dir = tmp / "top"
    top_dir.mkdir()
    _save(top, top_dir / "top.avhdx", G_TOP)
    for a, b in top_marks[0]:
        expect[a * logical:b * logical] = top_data[0][a * logical:b * logical]
    expect[1 * B:2 * B] = bytes(B)
    expect[3 * B:4 * B] = top_data[3]
    expect[5 * B:6 * B] = bytes(B)
    return top_dir / "top.avhdx", bytes(expect), [tmp / "base.vhdx", sub / "mid.avhdx"]


@pytest.mark.parametrize("logical", [512, 4096])
def test_maps_without_io_is_true_only_when_mapping_reads_nothing(tmp_path, logical):
    """``maps_without_io`` (which lets a trio front end map on its event loop) is True only
    when the BAT page and, for a PARTIALLY_PRESENT block, the sector-bitmap pages are cached:
    mapping then reads nothing. Once mapped, a range maps without I/O."""
    top, _expect, _ = build_chain(tmp_path, logical)
    rnd = random.Random(7)
    with open_image(top) as img:
        reads = [0]
        for layer in img.chain:
            for cache in (layer.bat, layer.bitmaps):
                real = cache.pread
                cache.pread = lambda n, o, real=real: (reads.__setitem__(0, reads[0] + 1), real(n, o))[1]
        said_no = 0
        # partial block 0 mapped, then its bitmap page evicted (its BAT pages stay): that range
        # must say False again; later ranges evict bitmap pages at random
        ranges = [(0, 4096), (0, 4096)]
        for _ in range(300):
            off = rnd.randrange(img.size - 1)
            ranges.append((off, min(img.size - off, rnd.choice([1, 512, 4096, 70_000, MiB, 3 * MiB]))))
        for i, (off, n) in enumerate(ranges):
            for layer in img.chain:
                if i == 1 or rnd.random() < 0.2:
                    layer.bitmaps.pages.clear()
                before = reads[0]
                cached = layer.maps_without_io(off, n)
                list(layer.map_layer(off, n))
                assert not cached or reads[0] == before, (layer.path, off, n)
                said_no += not cached
                assert layer.maps_without_io(off, n), (layer.path, off, n)
        assert said_no >= len(img.chain)              # a fresh open has nothing cached


@pytest.mark.parametrize("logical", [512, 4096])
def test_chain_of_three(tmp_path, logical):
    top, expect, parents = build_chain(tmp_path, logical)
    hashes = [sha_file(p) for p in [top, *parents]]
    with open_image(top) as img:
        assert [i.format for i in img.chain] == ["vhdx"] * 3
        assert img.sector_size == logical
        assert img.read(0, img.size) == expect
        # odd, unaligned reads inside and across blocks
        rnd = random.Random(1)
        for _ in range(200):
            off = rnd.randrange(img.size)
            n = rnd.randrange(1, 3 * logical + 5)
            assert img.read(off, n) == expect[off:off + n]
        kinds = {e.kind for e in img.map_layer(0, img.size)}
        assert kinds == {Kind.DATA, Kind.ZERO, Kind.BACKING}
    assert [sha_file(p) for p in [top, *parents]] == hashes


def test_wrong_linkage_refused_linkage2_accepted(tmp_path):
    B = MiB
    base = w.build_vhdx(4 * MiB, block_size=B, blocks={0: b"\x11" * B})
    _save(base, tmp_path / "base.vhdx", G_BASE)
    child = w.build_vhdx(4 * MiB, block_size=B, kind="differencing",
                         parent_locator=_locator(G_MID, "base.vhdx"))
    _save(child, tmp_path / "child.vhdx", G_TOP)
    with pytest.raises(errors.ChainError, match="ignore-parent-id") as ei:
        open_image(tmp_path / "child.vhdx")
    assert "base.vhdx" in str(ei.value) and str(G_BASE) in str(ei.value)
    with open_image(tmp_path / "child.vhdx", ignore_parent_id=True) as img:
        assert img.read(0, 4) == b"\x11" * 4
    res = cli("info", tmp_path / "child.vhdx")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "ignore-parent-id" in res.stderr
    child2 = w.build_vhdx(4 * MiB, block_size=B, kind="differencing",
                          parent_locator=_locator(G_MID, "base.vhdx",
                                                  parent_linkage2="{%s}" % G_BASE))
    _save(child2, tmp_path / "child2.vhdx", G_TOP)
    with open_image(tmp_path / "child2.vhdx") as img:
        assert img.read(0, 4) == b"\x11" * 4


def test_parent_lookup_paths(tmp_path):
    B = MiB
    far = tmp_path / "elsewhere"
    far.mkdir()
    base = w.build_vhdx(4 * MiB, block_size=B, blocks={1: b"\x22" * B})
    _save(base, far / "Base Disk.vhdx", G_BASE)
    here = tmp_path / "child"
    here.mkdir()
    # only a volume path and an absolute path that do not exist here: found by --parent-dir
    child = w.build_vhdx(4 * MiB, block_size=B, kind="differencing", parent_locator={
        "parent_linkage": "{%s}" % G_BASE,
        "volume_path": "\\\\?\\Volume{01234567-89ab-cdef-0123-456789abcdef}\\VMs\\Base Disk.vhdx",
        "absolute_win32_path": "C:\\VMs\\Base Disk.vhdx"})
    _save(child, here / "c.avhdx", G_TOP)
    with pytest.raises(errors.ChainError, match="not found"):
        open_image(here / "c.avhdx")
    with open_image(here / "c.avhdx", parent_dirs=[far]) as img:
        assert img.read(B, 2) == b"\x22\x22"
    # the absolute path re-rooted under the child's folder
    (here / "VMs").mkdir()
    os.rename(far / "Base Disk.vhdx", here / "VMs" / "Base Disk.vhdx")
    with open_image(here / "c.avhdx") as img:
        assert img.backing.path == str(here / "VMs" / "Base Disk.vhdx")


def test_4k_sector_disk_partitions(tmp_path):
    mbr = bytearray(4096)
    # one partition from LBA 2 (4096-byte sectors = byte 8192), 100 sectors long
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2).to_bytes(4, "little") + (100).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    b = w.build_vhdx(4 * MiB, block_size=MiB, logical=4096, blocks={0: bytes(mbr)})
    _save(b, tmp_path / "4k.vhdx", G_BASE)
    with open_image(tmp_path / "4k.vhdx") as img:
        assert img.sector_size == 4096
        parts = find_partitions(img)
    assert [(p.start, p.length) for p in parts] == [(8192, 409600)]


def test_lazy_bat_for_a_huge_sparse_disk(tmp_path):
    # 2 TiB at 1 MiB blocks: a 16 MiB BAT that open must not read whole
    b = w.build_vhdx(2 << 40, block_size=MiB, blocks={5: b"\x33" * MiB})
    _save(b, tmp_path / "big.vhdx", G_BASE)
    with open_image(tmp_path / "big.vhdx") as img:
        assert img.read(5 * MiB, 3) == b"\x33" * 3
        assert len(img.bat.pages) == 1
        assert img.read((2 << 40) - 512, 512) == bytes(512)
        assert img.allocated_bytes() == MiB


def test_dirty_log_writer_image_read_only(tmp_path):
    """A log entry changing a BAT page and a payload page: replayed in memory, file intact."""
    B = MiB
    b = w.build_vhdx(4 * MiB, block_size=B, blocks={0: b"\x01" * B})
    off0 = b.block_offsets[0]
    bat = bytearray(b.bat_page())
    new_entry = (off0 >> 20) << 20 | w.FULLY_PRESENT
    bat[8:16] = new_entry.to_bytes(8, "little")            # block 1 -> same space as block 0
    b.set_headers(data_write_guid=G_BASE)
    b.add_log(uuid.UUID(int=0x10C), [w.Entry(1, pages={w.BAT_OFFSET: bytes(bat),
                                                      off0 + 4096: b"\x02" * 4096})])
    p = tmp_path / "dirty.vhdx"
    p.write_bytes(b.data)
    before = sha_file(p)
    with open_image(p) as img:
        data = img.read(0, 2 * B)
        exts = list(img.extents(0, 2 * B))
        assert img.describe()["log"].startswith("replayed in memory: 1 entries")
    want = b"\x01" * 4096 + b"\x02" * 4096 + b"\x01" * (B - 8192)
    assert data == want * 2
    assert len({e.fd for e in exts}) == 2                 # image fd and the memfd
    assert sha_file(p) == before


# --- hostile input ------------------------------------------------------------------------------
def _hostile_sources(tmp: Path) -> list[bytes]:
    top, _expect, _parents = build_chain(tmp, 512)
    d = w.build_vhdx(4 * MiB, block_size=MiB, blocks={0: b"\x01" * MiB, 2: w.ZERO})
    d.add_log(uuid.UUID(int=0x10C), [w.Entry(1, pages={w.BAT_OFFSET: d.bat_page()})])
    return [top.read_bytes(), bytes(d.data)]


def _try_open_and_read(p: Path) -> None:
    try:
        with open_image(p, ignore_parent_id=True) as img:
            pos = 0
            while pos < img.size:
                img.read(pos, 4 * MiB)
                pos += 4 * MiB
            img.check()
            img.describe()
    except errors.VhdfsError as exc:
        assert "\n" not in str(exc)


def test_truncations_and_byte_flips_never_traceback(tmp_path):
    sources = _hostile_sources(tmp_path)
    rnd = random.Random(2026)
    case = tmp_path / "top"
    for src in sources:
        cuts = sorted({0, 8, 4096, 64 * 1024 + 100, 200 * 1024, MiB, MiB + 4096, 2 * MiB + 10,
                       3 * MiB, 3 * MiB + 4, len(src) - MiB, len(src) - 1})
        mutants = [src[:c] for c in cuts if 0 <= c < len(src)]
        hot = [0, 64 * 1024, 128 * 1024, 192 * 1024, 256 * 1024, MiB, 2 * MiB, 2 * MiB + 65536,
               3 * MiB]
        for _ in range(120):
            m = bytearray(src)
            for _ in range(rnd.choice([1, 3, 10])):
                base = rnd.choice(hot + [rnd.randrange(len(src))])
                pos = min(len(m) - 1, base + rnd.randrange(256))
                m[pos] = rnd.randrange(256)
            mutants.append(bytes(m))
        for m in mutants:
            p = case / "mutant.avhdx"
            p.write_bytes(m)
            digest = sha_file(p)
            _try_open_and_read(p)
            assert sha_file(p) == digest


def test_block_data_past_end_of_file(tmp_path):
    b = w.build_vhdx(4 * MiB, block_size=MiB, blocks={0: b"\x01" * MiB, 1: b"\x02" * MiB})
    _save(b, tmp_path / "t.vhdx", G_BASE)
    p = tmp_path / "t.vhdx"
    os.truncate(p, b.block_offsets[1] + 4096)           # block 1 cut short
    with open_image(p) as img:
        assert img.read(0, 4) == b"\x01" * 4
        with pytest.raises(errors.FormatError, match="block 1 .*past the end of the file"):
            img.read(MiB, 8192)
        assert any("block 1" in f.text and f.severity.value == "error" for f in img.check())
    assert cli("check", p).returncode == 1


@needs_root
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_bat_region_cut_refused_by_every_command(tmp_path, kind):
    """A file cut inside its BAT region: info, check, mount and mount -w each say why in one
    line and exit 3 (a mount used to start, then exit 1 with only the daemon's last log line),
    and the file is unchanged."""
    b = w.build_vhdx(4 * MiB, block_size=MiB, kind=kind, blocks={0: b"\x01" * MiB})
    p = tmp_path / "t.vhdx"
    p.write_bytes(bytes(b.data[:w.BAT_OFFSET + 4096]))
    digest = sha_file(p)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (["info", p], ["check", p], ["mount", p, mnt], ["mount", "-w", p, mnt]):
        res = cli(*args)
        assert res.returncode == 3, (args, res.returncode, res.stdout, res.stderr)
        assert res.stderr.splitlines() == [
            f"vhdfs: {p}: region table: BAT region at {w.BAT_OFFSET} length {MiB} ends past the "
            f"end of the file ({w.BAT_OFFSET + 4096} bytes; truncated?)"
        ], args
        assert not os.path.ismount(mnt)
    assert sha_file(p) == digest


@needs_root
def test_fuse_dirty_data_pages_and_rw_mount(tmp_path):
    """Replayed payload pages reach FUSE readers through the memfd; a -w mount writes through
    the log and leaves a clean file."""
    from mounting import mounted
    B = MiB
    b = w.build_vhdx(4 * MiB, block_size=B, blocks={0: b"\x01" * B})
    off0 = b.block_offsets[0]
    b.add_log(uuid.UUID(int=0x10C), [w.Entry(1, pages={off0 + 8192: b"\x02" * 4096})])
    b.set_headers(data_write_guid=G_BASE)
    p = tmp_path / "d.vhdx"
    p.write_bytes(b.data)
    before = sha_file(p)
    want = bytearray(b"\x01" * B + bytes(3 * B))
    want[8192:12288] = b"\x02" * 4096
    with mounted([p], tmp_path / "mnt") as m:
        assert m.file("d.raw").read_bytes() == bytes(want)
        m.unmount()
    assert sha_file(p) == before
    with mounted([p], tmp_path / "mnt", "-w") as m:
        with open(m.file("d.raw"), "r+b") as f:
            f.seek(3 * B - 100)
            f.write(b"\x09" * 300)
            f.flush()
            os.fsync(f.fileno())
        m.unmount()
    want[3 * B - 100:3 * B + 200] = b"\x09" * 300
    with open_image(p) as img:
        assert img.read(0, img.size) == bytes(want)
        assert img.describe()["log"] == "clean"


def test_64tib_sparse_opens_without_reading_its_bat(tmp_path):
    """512 MiB of BAT (64 TiB at 1 MiB blocks): open, first read and allocated_bytes touch only
    a few pages (SEEK_DATA skips the BAT's holes), and a write at the very end works."""
    import time
    create = pytest.importorskip("vhdfs.formats.vhdx.create")
    p = tmp_path / "huge.vhdx"
    create.create_vhdx(p, 64 << 40, "dynamic", block_size=MiB)
    t = time.monotonic()
    with open_image(p) as img:
        assert img.read(0, 4096) == bytes(4096)
        assert img.allocated_bytes() == 0
        assert len(img.bat.pages) == 1
    assert time.monotonic() - t < 1.0
    with open_image(p, writable=True) as img:
        img.write(img.size - 4096, b"\x44" * 4096)
    with open_image(p) as img:
        assert img.read(img.size - 4096, 4096) == b"\x44" * 4096
        assert img.allocated_bytes() == MiB
        assert [f for f in img.check() if f.severity.value == "error"] == []


def test_repair_replays_a_dirty_log_on_disk(corpus, tmp_path):
    """``check --repair``: --dry-run changes nothing; the repair replays the log onto the file,
    which then reads the same (never the stale content), has a clean log, and qemu-img -- which
    refuses a dirty log read-only -- checks it clean."""
    entry = next(e for e in corpus_entries() if e.get("log_dirty"))
    img = tmp_path / "dirty.vhdx"
    img.write_bytes((corpus / entry["image"]).read_bytes())
    before = sha_file(img)
    dry = cli("check", "--repair", "--dry-run", img)
    assert dry.returncode == 0 and "replay 1 entry" in dry.stdout, dry.stdout + dry.stderr
    assert sha_file(img) == before
    done = cli("check", "--repair", img)
    assert done.returncode == 0 and "replay" in done.stdout, done.stdout + done.stderr
    assert sha_file(img) != before
    info = cli("info", "--json", img)
    assert json.loads(info.stdout)["log"] == "clean", info.stdout
    with open_image(img) as im:
        assert sha_image(im) == entry["expected_raw"]["sha256"]
    again = cli("check", "--repair", "--dry-run", img)
    assert "log: replay" not in again.stdout, again.stdout
    qemu = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(img)], capture_output=True, text=True)
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
