"""Open-time parsing of a VHDX file into one ``VhdxLayout`` ([MS-VHDX] §2.2, §2.6).

Everything here reads through a ``pread(length, offset)`` callable and never writes, so the
same code serves a read-only mount, a writable open and ``vhdfs info``. The order is the spec's:
choose the current header first (headers are never logged), then replay planning
(``log.plan_replay``) -- and only then the region table and metadata, read *through* the replay
overlay, because a dirty log may hold newer copies of them. :func:`open_layout` does the three
steps in that order.

Strictness follows the digest (FORMATS-VHDX.md): corruption is a ``FormatError``, a valid
feature vhdfs cannot honour (unknown Required region or item, another header or log version) is
an ``UnsupportedError``; tolerated oddities (one bad header, region table 2 used, an unknown
optional item, a missing physical sector size) are returned as ``findings`` strings.
"""

from __future__ import annotations

import functools
import itertools
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ...errors import FormatError, UnsupportedError
from . import locator_spec, spec
from . import log as vlog
from .spec import Header, MetadataEntry, RegionEntry

Pread = Callable[[int, int], bytes]
T = TypeVar("T")


def _guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Module boundary: a struct/index/decode slip on hostile bytes becomes a FormatError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FormatError:
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise FormatError(f"{fn.__name__}: malformed structure ({exc})") from None

    return wrapper


@dataclass(frozen=True)
class HeaderChoice:
    """The current header and what was seen in both slots."""

    header: Header
    slot: int  # 1 or 2
    headers: tuple[Header | None, Header | None]  # None where the slot is invalid
    raw: tuple[bytes, bytes]  # both 4 KiB slots as read
    findings: tuple[str, ...] = ()

    @property
    def sequences(self) -> tuple[int | None, int | None]:
        return tuple(h.sequence_number if h else None for h in self.headers)  # type: ignore


@dataclass
class VhdxLayout:
    """Everything an image driver needs to map guest offsets onto the file."""

    creator: str
    header: Header
    header_slot: int
    header_sequences: tuple[int | None, int | None]
    region_table_slot: int  # 1, or 2 when table 1 failed its CRC
    regions: list[RegionEntry]  # all of them, unknown ones kept for rewriting
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int
    metadata_entries: list[MetadataEntry]
    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: uuid.UUID
    parent_locator: dict[str, str] | None  # None unless the item is present
    geometry: spec.BatGeometry
    findings: list[str] = field(default_factory=list)

    @property
    def log_guid(self) -> uuid.UUID:
        return self.header.log_guid

    @property
    def log_offset(self) -> int:
        return self.header.log_offset

    @property
    def log_length(self) -> int:
        return self.header.log_length

    @property
    def log_dirty(self) -> bool:
        return self.header.log_guid != spec.NULL_GUID

    @property
    def chunk_ratio(self) -> int:
        return self.geometry.chunk_ratio

    @property
    def bat_entry_count(self) -> int:
        return self.geometry.entry_count


def _header_problem(raw: bytes) -> str:
    if raw[:4] != spec.HEADER_SIGNATURE:
        return "bad signature"
    return "bad checksum"


@_guarded
def choose_header(pread: Pread) -> HeaderChoice:
    """The current header (§2.2.2.1): the only valid one, or the valid one with the higher
    sequence number; equal sequence numbers only if byte-identical (Disk2vhd writes those)."""
    raws = (
        bytes(pread(spec.HEADER_SIZE, spec.HEADER1_OFFSET)),
        bytes(pread(spec.HEADER_SIZE, spec.HEADER2_OFFSET)),
    )
    parsed: list[Header | None] = []
    findings: list[str] = []
    for i, raw in enumerate(raws, 1):
        if len(raw) < spec.HEADER_SIZE or not spec.header_is_valid(raw):
            parsed.append(None)
            findings.append(f"header {i}: {_header_problem(raw) if raw else 'missing'}")
        else:
            parsed.append(spec.parse_header(raw, f"header {i}"))
    h1, h2 = parsed
    if h1 is None and h2 is None:
        raise FormatError("headers: no valid header (" + "; ".join(findings) + ")")
    if h1 is None or h2 is None:
        slot = 1 if h2 is None else 2
        findings[-1 if h2 is None else 0] += f"; using header {slot}"
    elif h1.sequence_number == h2.sequence_number:
        if raws[0] != raws[1]:
            raise FormatError(f"headers: both have sequence number {h1.sequence_number} but differ")
        slot = 1
        findings.append(f"headers: identical with equal sequence number {h1.sequence_number}")
    else:
        slot = 1 if h1.sequence_number > h2.sequence_number else 2
    h = parsed[slot - 1]
    assert h is not None
    if h.version != 1:
        raise UnsupportedError(f"header {slot}: version {h.version} (only 1 is known)")
    if h.log_version != 0:
        raise UnsupportedError(f"header {slot}: log version {h.log_version} (only 0 is known)")
    if h.log_offset % spec.ALIGNMENT or h.log_length % spec.ALIGNMENT:
        raise FormatError(
            f"header {slot}: log offset {h.log_offset} / length {h.log_length} not 1 MiB aligned"
        )
    if h.log_length and h.log_offset < spec.HEADER_AREA_SIZE:
        raise FormatError(f"header {slot}: log offset {h.log_offset} inside the first MiB")
    return HeaderChoice(h, slot, (h1, h2), raws, tuple(findings))


@_guarded
def read_region_table(pread: Pread) -> tuple[list[RegionEntry], int, list[str]]:
    """Region table 1, or table 2 when table 1 is invalid: (entries, slot, findings)."""
    problems = []
    for slot, off in ((1, spec.REGION_TABLE1_OFFSET), (2, spec.REGION_TABLE2_OFFSET)):
        try:
            entries = spec.parse_region_table(pread(spec.REGION_TABLE_SIZE, off), f"region table {slot}")
        except FormatError as exc:
            problems.append(exc.message)
            continue
        return entries, slot, [p + f"; using region table {slot}" for p in problems]
    raise FormatError("region table: both copies invalid (" + "; ".join(problems) + ")")


def _check_regions(
    regions: list[RegionEntry], header: Header, file_size: int, findings: list[str]
) -> dict[uuid.UUID, RegionEntry]:
    known: dict[uuid.UUID, RegionEntry] = {}
    spans = []
    for r in regions:
        name = spec.REGION_NAMES.get(r.guid, str(r.guid))
        if r.guid in spec.REGION_NAMES:
            if r.guid in known:
                raise FormatError(f"region table: {name} region listed twice")
            known[r.guid] = r
        elif r.required:
            raise UnsupportedError(f"region table: unknown required region {r.guid}")
        else:
            findings.append(f"region table: unknown optional region {r.guid} ignored")
        if r.file_offset % spec.ALIGNMENT or r.length % spec.ALIGNMENT or r.length == 0:
            raise FormatError(
                f"region table: {name} region at {r.file_offset} length {r.length} not 1 MiB aligned"
            )
        if r.file_offset < spec.HEADER_AREA_SIZE:
            raise FormatError(f"region table: {name} region inside the first MiB")
        if r.file_offset + r.length > file_size:
            if r.guid not in spec.REGION_NAMES:  # ignored anyway
                findings.append(f"region table: {name} region ends past the end of the file")
            else:
                # Refused at open, not left to a lazy BAT read: a mount would otherwise start,
                # then fail on its first read with no reason the user sees. (A payload block
                # past the end stays a read-time error: it makes only that block unreadable.)
                raise FormatError(
                    f"region table: {name} region at {r.file_offset} length {r.length} "
                    f"ends past the end of the file ({file_size} bytes; truncated?)"
                )
        spans.append((r.file_offset, r.file_offset + r.length, f"{name} region"))
    for g, name in spec.REGION_NAMES.items():
        if g not in known:
            raise FormatError(f"region table: no {name} region")
    if header.log_length:
        spans.append((header.log_offset, header.log_offset + header.log_length, "log"))
    spans.sort()
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        if s2 < e1:
            raise FormatError(f"region table: {n1} and {n2} overlap")
    return known


def _read_items(
    pread: Pread, region: RegionEntry, findings: list[str]
) -> tuple[list[MetadataEntry], dict[uuid.UUID, bytes]]:
    entries = spec.parse_metadata_table(pread(spec.METADATA_TABLE_SIZE, region.file_offset))
    items: dict[uuid.UUID, bytes] = {}
    for e in entries:
        if e.item_id in items:
            raise FormatError(f"metadata: item {e.name} listed twice")
        if e.length and (e.offset < spec.METADATA_TABLE_SIZE or e.offset + e.length > region.length):
            raise FormatError(
                f"metadata: item {e.name} at {e.offset} length {e.length} outside the metadata region"
            )
        if e.item_id not in spec.METADATA_NAMES:
            if e.is_required:
                raise UnsupportedError(f"metadata: unknown required item {e.item_id}")
            findings.append(f"metadata: unknown optional item {e.item_id} ignored")
            continue
        data = bytes(pread(e.length, region.file_offset + e.offset)) if e.length else b""
        if len(data) < e.length:
            raise FormatError(f"metadata: item {e.name} runs past the end of the file")
        items[e.item_id] = data
    return entries, items


@_guarded
def read_layout(pread: Pread, file_size: int, choice: HeaderChoice | None = None) -> VhdxLayout:
    """Parse and validate everything but the BAT contents.

    ``pread`` should already see the replayed log (``ReplayPlan.overlay``) when the header's
    LogGuid is set; :func:`open_layout` arranges that.
    """
    creator = spec.parse_file_identifier(pread(520, 0))
    choice = choice or choose_header(pread)
    findings = list(choice.findings)
    regions, rt_slot, rt_findings = read_region_table(pread)
    findings += rt_findings
    known = _check_regions(regions, choice.header, file_size, findings)
    bat, meta = known[spec.BAT_REGION], known[spec.METADATA_REGION]
    entries, items = _read_items(pread, meta, findings)

    def need(g: uuid.UUID) -> bytes:
        if g not in items:
            raise FormatError(f"metadata: missing {spec.METADATA_NAMES[g]} item")
        return items[g]

    params = spec.parse_file_parameters(need(spec.FILE_PARAMETERS))
    bs = params.block_size
    if bs < spec.MIN_BLOCK_SIZE or bs > spec.MAX_BLOCK_SIZE or bs & (bs - 1):
        raise FormatError(f"metadata: block size {bs} is not a power of two from 1 to 256 MiB")
    virtual = spec.parse_u64(need(spec.VIRTUAL_DISK_SIZE), "virtual disk size")
    logical = spec.parse_u32(need(spec.LOGICAL_SECTOR_SIZE), "logical sector size")
    if spec.PHYSICAL_SECTOR_SIZE in items:
        physical = spec.parse_u32(items[spec.PHYSICAL_SECTOR_SIZE], "physical sector size")
    else:
        physical = logical
        findings.append("metadata: no physical sector size item; using the logical size")
    for what, v in (("logical", logical), ("physical", physical)):
        if v not in spec.SECTOR_SIZES:
            raise FormatError(f"metadata: {what} sector size {v} (must be 512 or 4096)")
    if virtual == 0 or virtual % logical:
        raise FormatError(
            f"metadata: virtual disk size {virtual} is not a positive multiple "
            f"of the logical sector size {logical}"
        )
    if virtual > spec.MAX_VIRTUAL_SIZE:
        raise FormatError(f"metadata: virtual disk size {virtual} exceeds 64 TiB")
    if spec.PAGE83 in items:
        page83 = spec.parse_page83(items[spec.PAGE83])
    else:
        page83 = spec.NULL_GUID
        findings.append("metadata: no page 83 item")
    locator = None
    if spec.PARENT_LOCATOR in items:
        ltype, locator = locator_spec.parse_parent_locator(items[spec.PARENT_LOCATOR])
        if ltype != spec.PARENT_LOCATOR_TYPE:
            raise UnsupportedError(f"metadata: parent locator type {ltype} (only the VHDX type is known)")
        if not params.has_parent:
            findings.append("metadata: parent locator present without HasParent; ignored")
    if params.has_parent:
        if locator is None:
            raise FormatError("metadata: HasParent set but no parent locator item")
        if "parent_linkage" not in locator:
            findings.append("metadata: parent locator has no parent_linkage key")
        if params.leave_block_allocated:
            findings.append("metadata: LeaveBlockAllocated ignored on a differencing file")
    if spec.INCOMPLETE_FILE in items:
        findings.append("metadata: incomplete-file item present (creation did not finish)")
    geometry = spec.bat_geometry(virtual, bs, logical, params.has_parent)
    if bat.length < geometry.entry_count * 8:
        raise FormatError(
            f"region table: BAT region of {bat.length} bytes holds fewer than "
            f"the {geometry.entry_count} entries needed"
        )
    return VhdxLayout(
        creator=creator,
        header=choice.header,
        header_slot=choice.slot,
        header_sequences=choice.sequences,
        region_table_slot=rt_slot,
        regions=regions,
        bat_offset=bat.file_offset,
        bat_length=bat.length,
        metadata_offset=meta.file_offset,
        metadata_length=meta.length,
        metadata_entries=entries,
        block_size=bs,
        leave_block_allocated=params.leave_block_allocated,
        has_parent=params.has_parent,
        virtual_size=virtual,
        logical_sector_size=logical,
        physical_sector_size=physical,
        page83=page83,
        parent_locator=locator,
        geometry=geometry,
        findings=findings,
    )


@_guarded
def open_layout(pread: Pread, file_size: int) -> tuple[VhdxLayout, vlog.ReplayPlan | None, Pread]:
    """Header, then replay plan, then layout read through the replayed view.

    Returns (layout, plan or None when the log is clean, the pread to use for everything else:
    the overlay when there is a plan). Nothing is written; a writable driver applies the plan
    after its own header update.
    """
    spec.parse_file_identifier(pread(520, 0))
    choice = choose_header(pread)
    h = choice.header
    plan = vlog.plan_replay(pread, h.log_guid, h.log_offset, h.log_length, file_size)
    view = plan.overlay(pread, file_size) if plan else pread
    size = plan.new_file_size(file_size) if plan else file_size
    layout = read_layout(view, size, choice)
    if plan:
        layout.findings += plan.findings
        layout.findings.append(
            f"log: dirty, {plan.entry_count} entries to replay "
            f"(sequence {plan.first_sequence}..{plan.last_sequence})"
        )
    return layout, plan, view
