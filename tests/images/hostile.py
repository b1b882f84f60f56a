"""Fuzzing hostile images: base targets, mutations, and running one mutated image.

Shared by ``tests/test_fuzz.py`` (hypothesis) and ``tools/soak.py``/``tools/fuzz_atheris.py``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import vhdx_writer as vw
from .content import MiB, get_field, sha256
from .corpus import corpus_sha256, sha256_file
from .synthetic import DYN_RAW, FIXED_RAW, VDI_RAW, dyn_vhd, fixed_vhd, synthetic_vdi, vhd_chain
from .vhdx_writer import sealed as vhdx_sealed
from .writers_vdi import VDI_FIELDS
from .writers_vhd import (
    FOOTER_CSUM,
    FOOTER_FIELDS,
    HEADER_CSUM,
    HEADER_FIELDS,
    UNUSED,
    bitmap_bytes,
    fix_vhd_checksum,
)

# -- fuzz mutators ---------------------------------------------------------------------------

BOUNDARY_U32 = (0, 1, 2, 511, 512, 513, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
BOUNDARY_U64 = (0, 1, 512, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF,
                1 << 32, (1 << 41) - 512)


@dataclass
class Region:
    """A mutable part of a base image: absolute offset, length, named fields, checksum to fix."""

    name: str
    offset: int
    length: int
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)  # relative offsets
    checksum: tuple[int, int, int] | None = None  # (region-relative start, length, csum offset)
    crc32c: bool = False          # the checksum is VHDX's CRC-32C (else VHD's one's complement)


@dataclass
class Target:
    """A base image (bytes) and the regions of it worth mutating."""

    name: str
    data: bytes
    fmt: str
    regions: list[Region]
    expected_sha256: str          # of the raw disk, when nothing meaningful was changed
    parent: tuple[str, bytes] | None = None   # (file name, bytes) written next to it
    # A dirty VHDX log: the disk as read ignoring the log (never a right answer while the log
    # and the headers are intact) and the spans that keep the log valid.
    stale_sha256: str | None = None
    log_spans: tuple[tuple[int, int], ...] = ()

    def log_intact(self, data: bytes) -> bool:
        return self.stale_sha256 is not None and all(
            data[o:o + n] == self.data[o:o + n] for o, n in self.log_spans)


def _vhd_regions(data: bytes, with_header: bool) -> list[Region]:
    size = len(data)
    regions = [Region("tail-footer", size - 512, 512, FOOTER_FIELDS, (0, 512, FOOTER_CSUM))]
    if not with_header:
        return regions
    regions.append(Region("head-footer", 0, 512, FOOTER_FIELDS, (0, 512, FOOTER_CSUM)))
    hoff = get_field(data[-512:], FOOTER_FIELDS, "data_offset")
    regions.append(Region("dyn-header", hoff, 1024, HEADER_FIELDS, (0, 1024, HEADER_CSUM)))
    h = data[hoff:hoff + 1024]
    table = get_field(h, HEADER_FIELDS, "table_offset")
    n = get_field(h, HEADER_FIELDS, "max_table_entries")
    bat_fields = {f"bat{i}": (4 * i, ">I") for i in range(n)}
    regions.append(Region("bat", table, 4 * n, bat_fields))
    bat = struct.unpack_from(f">{n}I", data, table)
    bsize = get_field(h, HEADER_FIELDS, "block_size")
    bm_len = bitmap_bytes(bsize)
    for i, e in enumerate(bat):
        if e != UNUSED:
            regions.append(Region(f"bitmap{i}", e * 512, bm_len))
            if len([r for r in regions if r.name.startswith("bitmap")]) >= 3:
                break
    for i in range(8):
        code = get_field(h, HEADER_FIELDS, f"loc{i}_code")
        if code:
            off = get_field(h, HEADER_FIELDS, f"loc{i}_offset")
            ln = get_field(h, HEADER_FIELDS, f"loc{i}_length")
            regions.append(Region(f"locator{i}-data", off, min(ln, 512)))
    return regions


def _vdi_regions(data: bytes) -> list[Region]:
    nblocks = get_field(data, VDI_FIELDS, "blocks")
    moff = get_field(data, VDI_FIELDS, "offset_blocks")
    return [Region("vdi-header", 0, 0x200, VDI_FIELDS),
            Region("vdi-map", moff, 4 * nblocks,
                   {f"map{i}": (4 * i, "<I") for i in range(nblocks)})]


_VHDX_HEADER = {"seq": (8, "<Q"), "file_write_guid": (16, "16s"), "data_write_guid": (32, "16s"),
                "log_guid": (48, "16s"), "log_version": (64, "<H"), "version": (66, "<H"),
                "log_length": (68, "<I"), "log_offset": (72, "<Q"), "checksum": (4, "<I"),
                "signature": (0, "4s")}


def _vhdx_regions(data: bytes, *, locator: int = 0, log_entry: int = 0) -> list[Region]:
    """Headers, region tables, metadata table and items, BAT (first 64 entries), and when
    present the parent locator's key/value table (``locator`` bytes) and the first log entry
    (``log_entry`` bytes: its header, first descriptor and first data sector)."""
    rt = {"count": (8, "<I"), "checksum": (4, "<I")}
    for i in range(2):
        rt |= {f"r{i}_guid": (16 + 32 * i, "16s"), f"r{i}_offset": (32 + 32 * i, "<Q"),
               f"r{i}_length": (40 + 32 * i, "<I"), f"r{i}_required": (44 + 32 * i, "<I")}
    n = struct.unpack_from("<H", data, vw.METADATA_OFFSET + 10)[0]
    mt = {"count": (10, "<H"), "signature": (0, "8s")}
    for i in range(n):
        mt |= {f"e{i}_id": (32 + 32 * i, "16s"), f"e{i}_offset": (48 + 32 * i, "<I"),
               f"e{i}_length": (52 + 32 * i, "<I"), f"e{i}_flags": (56 + 32 * i, "<I")}
    items = {"block_size": (0, "<I"), "file_flags": (4, "<I"), "virtual_size": (8, "<Q"),
             "logical_sector": (32, "<I"), "physical_sector": (40, "<I")}
    regions = [Region(f"vhdx-header{i + 1}", off, 4096, _VHDX_HEADER, (0, 4096, 4), True)
               for i, off in enumerate(vw.HEADER_OFFSETS)]
    regions += [Region(f"region-table{i + 1}", off, 32 + 32 * 2, rt, (0, 64 * 1024, 4), True)
                for i, off in enumerate(vw.REGION_OFFSETS)]
    regions.append(Region("metadata-table", vw.METADATA_OFFSET, 32 + 32 * n, mt))
    regions.append(Region("metadata-items", vw.METADATA_OFFSET + 64 * 1024, 48, items))
    regions.append(Region("vhdx-bat", vw.BAT_OFFSET, 8 * 64, {f"bat{i}": (8 * i, "<Q") for i in range(64)}))
    if locator:
        count = struct.unpack_from("<H", data, vw.METADATA_OFFSET + 64 * 1024 + 48 + 18)[0]
        lt = {"key_count": (18, "<H"), "locator_type": (0, "16s")}
        for i in range(count):
            lt |= {f"k{i}_key_offset": (20 + 12 * i, "<I"), f"k{i}_value_offset": (24 + 12 * i, "<I"),
                   f"k{i}_key_length": (28 + 12 * i, "<H"), f"k{i}_value_length": (30 + 12 * i, "<H")}
        regions.append(Region("parent-locator", vw.METADATA_OFFSET + 64 * 1024 + 48, locator, lt))
    if log_entry:
        le = {"signature": (0, "4s"), "entry_checksum": (4, "<I"), "entry_length": (8, "<I"),
              "tail": (12, "<I"), "sequence": (16, "<Q"), "descriptor_count": (24, "<I"),
              "log_guid": (32, "16s"), "flushed_offset": (48, "<Q"), "last_offset": (56, "<Q"),
              "desc_signature": (64, "4s"), "desc_trailing": (68, "4s"), "desc_leading": (72, "8s"),
              "desc_file_offset": (80, "<Q"), "desc_sequence": (88, "<Q")}
        regions.append(Region("log-entry", vw.LOG_OFFSET, 4096, le, (0, log_entry, 4), True))
        regions.append(Region("log-data", vw.LOG_OFFSET + 4096, 4096,
                              {"data_signature": (0, "4s"), "sequence_high": (4, "<I"),
                               "sequence_low": (4092, "<I")}, (-4096, log_entry, 4), True))
    return regions


def vhdx_targets(workdir: Path) -> list[Target]:
    """Dynamic, differencing (its parent next to it) and dirty-log VHDX from the writer."""
    from . import cases_vhdx as cx

    d = workdir / "fuzz-bases-vhdx"
    d.mkdir(parents=True, exist_ok=True)
    dyn = bytes(cx._built().data)
    out = [Target("synthetic-vhdx-dynamic", dyn, "vhdx", _vhdx_regions(dyn), sha256(cx.VHDX_RAW))]
    child, flat = cx._chain(d)
    cdata = bytes(child.data)
    loc = len(vw.locator_bytes(cx._locator()))
    out.append(Target("synthetic-vhdx-differencing", cdata, "vhdx", _vhdx_regions(cdata, locator=loc),
                      sha256(flat), ("parent.vhdx", (d / "parent.vhdx").read_bytes())))
    dirty = cx._dirty()
    ddata = bytes(dirty.data)
    entry_len = struct.unpack_from("<I", ddata, vw.LOG_OFFSET + 8)[0]
    replayed = bytearray(cx.VHDX_RAW)
    replayed[MiB:2 * MiB] = cx.pattern(MiB, seed=41)
    spans = ((vw.LOG_OFFSET, entry_len), *((o, 4096) for o in vw.HEADER_OFFSETS))
    out.append(Target("synthetic-vhdx-dirty-log", ddata, "vhdx",
                      _vhdx_regions(ddata, log_entry=entry_len), sha256(bytes(replayed)),
                      stale_sha256=sha256(cx.VHDX_RAW), log_spans=spans))
    return out


def fuzz_targets(corpus: Path | None, workdir: Path) -> list[Target]:
    """Base images: synthetic dynamic/differencing/fixed VHD and VDI, plus corpus ones."""
    out: list[Target] = []
    d = workdir / "fuzz-bases"
    d.mkdir(parents=True, exist_ok=True)
    i = dyn_vhd(d)
    out.append(Target("synthetic-dynamic", i.path.read_bytes(), "vhd",
                      _vhd_regions(i.path.read_bytes(), True), sha256(DYN_RAW)))
    parent, child, flat = vhd_chain(d)
    cdata = child.path.read_bytes()
    out.append(Target("synthetic-differencing", cdata, "vhd", _vhd_regions(cdata, True),
                      sha256(flat), ("parent.vhd", parent.path.read_bytes())))
    p = fixed_vhd(d)
    out.append(Target("synthetic-fixed", p.read_bytes(), "vhd",
                      _vhd_regions(p.read_bytes(), False), sha256(FIXED_RAW)))
    v = synthetic_vdi(d)
    out.append(Target("synthetic-vdi", v.path.read_bytes(), "vdi", _vdi_regions(v.path.read_bytes()),
                      sha256(VDI_RAW)))
    if corpus is not None:
        for name, fmt in (("dfvfs-qemu-ext2-dynamic.vhd", "vhd"), ("dissect-qemu-pattern.vdi", "vdi"),
                          ("mkimg-63x255-512-mbr-dynamic.vhd", "vhd")):
            if (corpus / name).is_file():
                data = (corpus / name).read_bytes()
                regs = _vhd_regions(data, True) if fmt == "vhd" else _vdi_regions(data)
                out.append(Target(f"corpus:{name}", data, fmt, regs, corpus_sha256(name)))
    out += vhdx_targets(workdir)
    return out


@dataclass
class Mutation:
    """What to do to a target: ``kind`` "flip" | "field" | "bytes" | "truncate"."""

    region: int
    kind: str
    where: int = 0        # byte offset inside the region / field index
    value: int = 0        # xor mask, field value, or truncation delta
    fix_checksum: bool = True
    blob: bytes = b""

    def describe(self, target: Target) -> str:
        r = target.regions[self.region % len(target.regions)]
        if self.kind == "field" and r.fields:
            name = list(r.fields)[self.where % len(r.fields)]
            return f"{target.name}/{r.name}.{name}={self.value:#x} fix={self.fix_checksum}"
        return (f"{target.name}/{r.name} {self.kind} at {self.where} value={self.value:#x} "
                f"blob={self.blob.hex()} fix={self.fix_checksum}")


def apply_mutation(target: Target, m: Mutation, data: bytes | None = None) -> tuple[bytes, bool]:
    """(mutated bytes, whether the virtual disk must still read exactly as the base).

    ``data`` (default: the target's bytes) lets several mutations stack; offsets come from the
    base image's regions, and a mutation past the (possibly truncated) end is a no-op.
    """
    base = target.data if data is None else data
    buf = bytearray(base)
    r = target.regions[m.region % len(target.regions)]
    if r.length == 0 or r.offset >= len(buf):
        return bytes(buf), bytes(buf) == target.data
    benign = False
    if m.kind == "flip":
        pos = r.offset + m.where % r.length
        if pos < len(buf):
            buf[pos] ^= (m.value % 255) + 1
    elif m.kind == "field" and r.fields:
        name = list(r.fields)[m.where % len(r.fields)]
        off, code = r.fields[name]
        width = struct.calcsize(code)
        if r.offset + off + width > len(buf):
            return bytes(buf), bytes(buf) == target.data
        if code.endswith("s"):
            n = min(width, 8)
            value = (m.value % (1 << (8 * n))).to_bytes(n, "big").ljust(width, b"\0")
        else:
            value = m.value % (1 << (8 * width))
        struct.pack_into(code, buf, r.offset + off, value)
        benign = name == "checksum"
    elif m.kind in ("bytes", "field"):
        pos = r.offset + m.where % r.length
        blob = m.blob or bytes([m.value & 0xFF])
        buf[pos:pos + len(blob)] = blob
        del buf[len(base):]
    elif m.kind == "truncate":
        cut = r.offset + m.where % max(1, r.length)
        del buf[cut:]
    if m.fix_checksum and r.checksum is not None and m.kind != "truncate" and not benign:
        start, length, csum = r.checksum
        block = bytearray(buf[r.offset + start:r.offset + start + length])
        if len(block) == length:
            if r.crc32c:
                block = bytearray(vhdx_sealed(block, csum))
            else:
                fix_vhd_checksum(block, csum)
            buf[r.offset + start:r.offset + start + length] = block
    same = bytes(buf) == target.data
    # A rewritten checksum field leaves every other byte as it was: the disk must read the same.
    return bytes(buf), same or (benign and len(buf) == len(target.data)
                               and (data is None or data == target.data))


# -- running one hostile image ----------------------------------------------------------------

FULL_READ_LIMIT = 64 * MiB


def sparse_read(img, budget: int = 256 * MiB) -> None:
    """Read a (mutated) disk too large to read whole: every extent's first and last MiB.

    A hostile header can legitimately describe a 2 TB sparse disk in a 6 MB file; reading all
    of its zeros would only measure Python's speed. Every byte that lives in a file is still
    visited as long as the total stays within ``budget``.
    """
    from vhdfs.block.image import Kind

    spent = 0
    for ext in img.extents(0, img.size):
        if ext.kind == Kind.DATA and spent + ext.length <= budget:
            spots = range(ext.offset, ext.end, MiB)
        else:
            spots = sorted({ext.offset, max(ext.offset, ext.end - MiB)})
        for pos in spots:
            n = min(MiB, ext.end - pos)
            got = img.read(pos, n)
            if len(got) != n:
                raise AssertionError(f"short read at {pos}: {len(got)} of {n}")
            spent += n


class Hang(BaseException):
    """Raised in the main thread when one case runs past its time bound."""


@dataclass
class Outcome:
    status: str                  # "ok" | "error" | "FAIL"
    detail: str = ""


def run_hostile(path: Path, expected_sha256: str | None, must_match: bool, *,
                time_limit: float = 10.0, mem_limit: int = 256 * MiB, cli: bool = True,
                stale_sha256: str | None = None, lazy_blocks: bool = False) -> Outcome:
    """open_image, describe, check, a full chunked read, and (in-process) ``info``/``check``.

    Allowed: correct data, or a one-line ``VhdfsError``. FAIL: any other exception, a case
    slower than ``time_limit`` seconds, more than ``mem_limit`` bytes allocated (tracemalloc
    peak, with RLIMIT_AS as a safety net), a changed file, or wrong data where the mutation
    could not have changed it, or data equal to ``stale_sha256`` (a dirty log ignored).
    ``lazy_blocks`` (VHDX, whose BAT is not read whole at open): an image that opens but fails
    on a block's read may have ``info`` exit 0; ``check`` must still fail.
    """
    import contextlib
    import io
    import resource
    import signal
    import threading
    import traceback
    import tracemalloc

    from vhdfs import errors
    from vhdfs.block import open_image

    folder_before = {p: sha256_file(p) for p in path.parent.iterdir() if p.is_file()}
    main = threading.get_ident()

    def on_alarm(_sig, _frame):
        raise Hang()

    old_handler = signal.signal(signal.SIGUSR1, on_alarm)
    timer = threading.Timer(time_limit, lambda: signal.pthread_kill(main, signal.SIGUSR1))
    timer.daemon = True
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    outcome = Outcome("ok")
    tracemalloc.start()
    timer.start()
    try:
        with open("/proc/self/statm") as f:
            vm_now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft = vm_now + 4 * mem_limit
        if old_as[1] == resource.RLIM_INFINITY or soft < old_as[1]:
            resource.setrlimit(resource.RLIMIT_AS, (soft, old_as[1]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                opened = False
                with open_image(path) as img:
                    opened = True
                    img.describe()
                    img.check()
                    img.allocated_bytes()
                    if img.size <= FULL_READ_LIMIT:
                        h = hashlib.sha256()
                        pos = 0
                        while pos < img.size:
                            chunk = img.read(pos, MiB)
                            if not chunk:
                                return Outcome("FAIL", f"short read at {pos} of {img.size}")
                            h.update(chunk)
                            pos += len(chunk)
                        if must_match and expected_sha256 and h.hexdigest() != expected_sha256:
                            outcome = Outcome("FAIL", "wrong data although the mutation kept the disk")
                        elif stale_sha256 and h.hexdigest() == stale_sha256:
                            outcome = Outcome("FAIL", "stale data: a valid log was not replayed")
                    else:
                        sparse_read(img)
            except errors.VhdfsError as exc:
                msg = str(exc)
                if "\n" in msg or "MemoryError" in msg or "RecursionError" in msg:
                    outcome = Outcome("FAIL", f"bad error message: {msg!r}")
                else:
                    outcome = Outcome("error", f"{type(exc).__name__}: {msg}")
            if cli and outcome.status != "FAIL":
                from vhdfs.cli import main as cli_main
                for cmd in ("info", "check"):
                    out, cerr = io.StringIO(), io.StringIO()
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(cerr):
                        rc = cli_main([cmd, str(path)])
                    lines = [ln for ln in cerr.getvalue().splitlines()
                             if not ln.startswith("vhdfs: warning: ")]
                    if rc not in (0, 1) and (len(lines) != 1 or not lines[0].startswith("vhdfs: ")):
                        outcome = Outcome("FAIL", f"vhdfs {cmd} exit {rc}, stderr {cerr.getvalue()!r}")
                    if outcome.status == "error" and rc == 0 and not (
                            lazy_blocks and opened and cmd == "info"):
                        outcome = Outcome("FAIL", f"vhdfs {cmd} exit 0 for an image open_image refuses")
        _cur, peak = tracemalloc.get_traced_memory()
        if peak > mem_limit:
            outcome = Outcome("FAIL", f"allocated {peak} bytes (limit {mem_limit})")
    except Hang:
        outcome = Outcome("FAIL", f"no answer within {time_limit} s (hang)")
    except BaseException as exc:  # anything else is the bug we look for
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome("FAIL", f"{type(exc).__name__}: {exc} at {tb.filename}:{tb.lineno} "
                                  f"({tb.name})")
    finally:
        timer.cancel()
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        signal.signal(signal.SIGUSR1, old_handler)
    after = {p: sha256_file(p) for p in path.parent.iterdir() if p.is_file()}
    if after != folder_before:
        outcome = Outcome("FAIL", "a file changed")
    return outcome


def write_case(target: Target, data: bytes, folder: Path) -> Path:
    """The mutated image (and an untouched parent next to it) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    ext = {"vdi": ".vdi", "vhdx": ".vhdx"}.get(target.fmt, ".vhd")
    name = ("child" if target.parent else "image") + ext
    path = folder / name
    path.write_bytes(data)
    if target.parent:
        (folder / target.parent[0]).write_bytes(target.parent[1])
    return path
