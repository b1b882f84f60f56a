"""VHDX log: find the active sequence, plan its replay, and build entries ([MS-VHDX] §2.3).

Why a *plan* and not a replay: a read-only mount must not write the file, yet a dirty file can
read as garbage (or an all-zero disk) until its log is applied. So this module only reads and
returns the ordered page writes and zero runs; the driver either applies them to the file
(``ReplayPlan.apply``, on a writable open, after its header update) or reads through them
(``ReplayPlan.overlay``, DiscUtils' snapshot-stream approach).

Which entries count (§2.3.2, §2.3.3, with OpenVMM's extra checks): only entries that carry the
header's LogGuid and pass every check (signature, CRC-32C over the whole entry, 4 KiB-multiple
length, descriptor signatures and sequence numbers, data-sector sequence halves, no descriptor
below 192 KiB or inside the log). From each 4 KiB offset the scanner grows the longest run of
physically consecutive entries with consecutive sequence numbers; a run is a valid sequence when
its head's Tail names one of its entries. The valid sequence with the largest head sequence
number is active, and only its entries from the head's Tail to the head are replayed. QEMU skips
the Tail rule; replaying "every valid entry" is not the same thing.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import FormatError
from . import spec
from .logspec import (
    DESCRIPTOR_SIZE,
    LOG_CHECKSUM_OFFSET,
    LogEntryHeader,
    ZeroDescriptor,
    descriptor_area_length,
    join_page,
    pack_data_descriptor,
    pack_log_entry_header,
    pack_zero_descriptor,
    parse_data_sector,
    parse_descriptor,
    parse_log_entry_header,
    split_page,
)

Pread = Callable[[int, int], bytes]  # (length, offset) -> bytes, short at EOF
Pwrite = Callable[[bytes, int], object]  # (data, offset)
SECTOR = spec.LOG_SECTOR


@dataclass(frozen=True)
class LogWrite:
    """One replay step: ``data`` (4 KiB) at ``file_offset``, or a zero run when data is None."""

    file_offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True)
class LogEntry:
    """A validated entry at ``log_offset`` (bytes from the start of the log)."""

    log_offset: int
    header: LogEntryHeader
    writes: tuple[LogWrite, ...]


@dataclass
class ReplayPlan:
    """The active sequence's effect, in replay order."""

    writes: list[LogWrite]
    flushed_file_offset: int  # head entry's: the file must be at least this long
    last_file_offset: int  # head entry's: extend the file to this after replay
    entry_count: int  # entries replayed (Tail to head)
    first_sequence: int = 0
    last_sequence: int = 0
    tail: int = 0  # log offsets of the replayed range [tail, head)
    head: int = 0
    findings: list[str] = field(default_factory=list)

    def new_file_size(self, file_size: int) -> int:
        """Size after replay: extended to LastFileOffset rounded up to 1 MiB (as QEMU does)."""
        last = -(-self.last_file_offset // spec.MiB) * spec.MiB
        return max(file_size, last)

    def apply(self, pwrite: Pwrite) -> None:
        """Write every step in order (the caller flushes and extends the file)."""
        for w in self.writes:
            if w.data is not None:
                pwrite(w.data, w.file_offset)
            else:
                chunk = bytes(min(w.length, spec.MiB))
                done = 0
                while done < w.length:
                    n = min(len(chunk), w.length - done)
                    pwrite(chunk[:n], w.file_offset + done)
                    done += n

    def overlay(self, pread: Pread, file_size: int) -> Pread:
        """A ``pread`` that reads the file as if the plan had been applied (nothing written)."""
        pages: dict[int, bytes] = {}
        zeros: list[tuple[int, int]] = []
        for w in self.writes:  # zero runs first, pages written later on top
            if w.data is None:
                end = w.file_offset + w.length
                for p in [p for p in pages if w.file_offset <= p < end]:
                    del pages[p]
                zeros.append((w.file_offset, end))
            else:
                pages[w.file_offset] = w.data
        keys = sorted(pages)
        size = self.new_file_size(file_size)

        def read(length: int, offset: int) -> bytes:
            want = max(0, min(length, size - offset))
            buf = bytearray(pread(want, offset)) if want else bytearray()
            if len(buf) < want:
                buf += bytes(want - len(buf))
            end = offset + want
            for zs, ze in zeros:
                s, e = max(zs, offset), min(ze, end)
                if s < e:
                    buf[s - offset : e - offset] = bytes(e - s)
            i = bisect.bisect_left(keys, offset - SECTOR + 1)
            while i < len(keys) and keys[i] < end:
                p = keys[i]
                s, e = max(p, offset), min(p + SECTOR, end)
                buf[s - offset : e - offset] = pages[p][s - p : e - p]
                i += 1
            return bytes(buf)

        return read


class _Log:
    """The log region read once into memory, with circular slicing."""

    def __init__(self, pread: Pread, log_offset: int, log_length: int) -> None:
        data = pread(log_length, log_offset)
        if len(data) < log_length:
            raise FormatError(f"log: region at {log_offset} runs past the end of the file")
        self.data = memoryview(bytes(data))
        self.offset = log_offset
        self.length = log_length
        # entry validity by log offset: the scanner retries runs from every 4 KiB offset, and a
        # run that fails its Tail check must not cost a second CRC pass over the same entries
        self.checked: dict[int, LogEntry | FormatError] = {}

    def read(self, at: int, length: int) -> bytes:
        end = at + length
        if end <= self.length:
            return bytes(self.data[at:end])
        return bytes(self.data[at:]) + bytes(self.data[: end - self.length])


def _entry_at(log: _Log, at: int, log_guid: uuid.UUID) -> LogEntry:
    """Validate the entry at log offset ``at``; FormatError says why it does not count."""
    got = log.checked.get(at)
    if got is None:
        try:
            got = _check_entry(log, at, log_guid)
        except FormatError as exc:
            got = exc
        log.checked[at] = got
    if isinstance(got, FormatError):
        raise got
    return got


def _check_entry(log: _Log, at: int, log_guid: uuid.UUID) -> LogEntry:
    where = f"log entry at offset {at}"
    try:
        h = parse_log_entry_header(log.read(at, 64))
    except FormatError:
        raise FormatError(f"{where}: no 'loge' signature") from None
    if h.log_guid != log_guid:
        raise FormatError(f"{where}: LogGuid {h.log_guid} is not the header's")
    if h.entry_length < SECTOR or h.entry_length % SECTOR or h.entry_length > log.length:
        raise FormatError(f"{where}: bad entry length {h.entry_length}")
    if h.tail % SECTOR or h.tail >= log.length:
        raise FormatError(f"{where}: bad tail {h.tail}")
    if h.sequence_number == 0:
        raise FormatError(f"{where}: sequence number 0")
    desc_len = descriptor_area_length(h.descriptor_count)
    if desc_len > h.entry_length:
        raise FormatError(f"{where}: {h.descriptor_count} descriptors overflow the entry")
    raw = log.read(at, h.entry_length)
    if spec.checksum_with_field_zeroed(raw, LOG_CHECKSUM_OFFSET) != h.checksum:
        raise FormatError(f"{where}: bad checksum")
    log_end = log.offset + log.length
    writes: list[LogWrite] = []
    data_index = 0
    for i in range(h.descriptor_count):
        try:
            d = parse_descriptor(raw[64 + DESCRIPTOR_SIZE * i : 64 + DESCRIPTOR_SIZE * (i + 1)])
        except FormatError:
            raise FormatError(f"{where}: descriptor {i} has a bad signature") from None
        if d.sequence_number != h.sequence_number:
            raise FormatError(f"{where}: descriptor {i} sequence number mismatch")
        length = d.length if isinstance(d, ZeroDescriptor) else SECTOR
        if d.file_offset % SECTOR or length % SECTOR:
            raise FormatError(f"{where}: descriptor {i} not 4 KiB aligned")
        if d.file_offset < spec.LOGGABLE_OFFSET:
            raise FormatError(f"{where}: descriptor {i} writes below 192 KiB")
        if d.file_offset < log_end and d.file_offset + length > log.offset:
            raise FormatError(f"{where}: descriptor {i} writes inside the log")
        if isinstance(d, ZeroDescriptor):
            writes.append(LogWrite(d.file_offset, d.length))
            continue
        start = desc_len + SECTOR * data_index
        data_index += 1
        if start + SECTOR > h.entry_length:
            raise FormatError(f"{where}: data sectors overflow the entry")
        try:
            seq, body = parse_data_sector(raw[start : start + SECTOR])
        except FormatError:
            raise FormatError(f"{where}: data sector {data_index - 1} has a bad signature") from None
        if seq != h.sequence_number:
            raise FormatError(f"{where}: data sector {data_index - 1} sequence mismatch")
        writes.append(LogWrite(d.file_offset, SECTOR, join_page(d, body)))
    return LogEntry(at, h, tuple(writes))


def _dist(a: int, b: int, length: int) -> int:
    """Bytes from log offset a forward to b (a full circle when equal)."""
    return (b - a) % length or length


def _sequence_from(log: _Log, start: int, log_guid: uuid.UUID) -> list[LogEntry] | None:
    """Longest valid sequence beginning at ``start``, already cut at its head's Tail."""
    entries: list[LogEntry] = []
    offsets: dict[int, int] = {}  # log offset -> index in entries
    used = 0
    tail_index: int | None = None  # index of the newest entry's Tail, None if outside
    at = start
    while True:
        try:
            e = _entry_at(log, at, log_guid)
        except FormatError:
            break
        if entries:
            if e.header.sequence_number != entries[-1].header.sequence_number + 1:
                break
            if e.header.entry_length > log.length - used:
                break
        idx = offsets.get(e.header.tail, len(entries) if e.header.tail == at else None)
        if entries and tail_index is not None and (idx is None or idx < tail_index):
            break  # a Tail may only move forward inside the sequence
        entries.append(e)
        offsets[at] = len(entries) - 1
        tail_index = idx
        used += e.header.entry_length
        at = (at + e.header.entry_length) % log.length
        if used >= log.length:
            break
    if not entries or tail_index is None:
        return None
    return entries[tail_index:]


def scan_entries(pread: Pread, log_guid: uuid.UUID, log_offset: int, log_length: int) -> list[LogEntry | str]:
    """Every 4 KiB log offset that holds a 'loge' signature: a LogEntry, or why it is invalid.

    Diagnostic (``vhdfs info``, tests); replay uses :func:`plan_replay`.
    """
    try:
        log = _Log(pread, log_offset, log_length)
        out: list[LogEntry | str] = []
        for at in range(0, log_length, SECTOR):
            if log.data[at : at + 4] != spec.LOG_ENTRY_SIGNATURE:
                continue
            try:
                out.append(_entry_at(log, at, log_guid))
            except FormatError as exc:
                out.append(exc.message)
        return out
    except (struct.error, IndexError, ValueError) as exc:  # defensive: never leak these
        raise FormatError(f"log: unreadable ({exc})") from None


def plan_replay(
    pread: Pread, log_guid: uuid.UUID, log_offset: int, log_length: int, file_size: int
) -> ReplayPlan | None:
    """Find the active sequence and return what replaying it does; None for a zero LogGuid.

    FormatError when the log region is misplaced or the file is shorter than the head entry's
    FlushedFileOffset (it was truncated after the log was written).
    """
    if log_guid == spec.NULL_GUID:
        return None
    if log_length == 0 or log_length % spec.MiB or log_offset % spec.MiB:
        raise FormatError(f"log: offset {log_offset} / length {log_length} not 1 MiB aligned")
    if log_offset < spec.HEADER_AREA_SIZE:
        raise FormatError(f"log: offset {log_offset} inside the header area")
    if log_offset + log_length > file_size:  # before reading it: LogLength may say 4 GiB
        raise FormatError(f"log: region at {log_offset} runs past the end of the file")
    try:
        log = _Log(pread, log_offset, log_length)
        best: list[LogEntry] | None = None
        start = 0
        while start < log_length:
            seq = _sequence_from(log, start, log_guid)
            if seq is None:
                start += SECTOR
                continue
            if best is None or seq[-1].header.sequence_number > best[-1].header.sequence_number:
                best = seq
            end = (seq[-1].log_offset + seq[-1].header.entry_length) % log_length
            if end <= start:
                break  # the sequence wrapped: everything has been seen
            start = end
    except (struct.error, IndexError, ValueError) as exc:  # defensive: never leak these
        raise FormatError(f"log: unreadable ({exc})") from None
    if best is None:
        return ReplayPlan(
            [], 0, 0, 0, findings=["log: LogGuid is set but no valid entry carries it; nothing to replay"]
        )
    head = best[-1]
    if file_size < head.header.flushed_file_offset:
        raise FormatError(
            f"log entry at offset {head.log_offset}: file is {file_size} bytes, "
            f"less than FlushedFileOffset {head.header.flushed_file_offset} "
            "(truncated)"
        )
    writes = [w for e in best for w in e.writes]
    return ReplayPlan(
        writes,
        head.header.flushed_file_offset,
        head.header.last_file_offset,
        len(best),
        best[0].header.sequence_number,
        head.header.sequence_number,
        best[0].log_offset,
        (head.log_offset + head.header.entry_length) % log_length,
    )


def build_entry(
    log_guid: uuid.UUID,
    sequence: int,
    tail: int,
    pages: dict[int, bytes],
    flushed_file_offset: int,
    last_file_offset: int,
    zeros: dict[int, int] | None = None,
) -> bytes:
    """One log entry: header, descriptors (zero runs, then pages), data sectors, CRC-32C.

    ``pages`` maps 4 KiB-aligned file offsets to 4096-byte pages; ``zeros`` maps offsets to
    zero-run lengths. The result's length is a multiple of 4 KiB; the writer places it at
    log offset ``tail``-relative head position and must not wrap it itself.
    """
    if sequence <= 0:
        raise ValueError("log sequence numbers start at 1")
    zeros = zeros or {}
    descs = [pack_zero_descriptor(ZeroDescriptor(o, n, sequence)) for o, n in zeros.items()]
    sectors = []
    for off, page in pages.items():
        if off % SECTOR:
            raise ValueError(f"page offset {off} not 4 KiB aligned")
        d, sector = split_page(off, page, sequence)
        descs.append(pack_data_descriptor(d))
        sectors.append(sector)
    desc_len = descriptor_area_length(len(descs))
    length = desc_len + SECTOR * len(sectors)
    h = LogEntryHeader(length, tail, sequence, len(descs), log_guid, flushed_file_offset, last_file_offset)
    buf = bytearray(pack_log_entry_header(h) + b"".join(descs))
    buf += bytes(desc_len - len(buf))
    buf += b"".join(sectors)
    struct.pack_into("<I", buf, LOG_CHECKSUM_OFFSET, spec.crc32c(buf))
    return bytes(buf)


def build_empty_entry(
    log_guid: uuid.UUID, sequence: int, tail: int, flushed_file_offset: int, last_file_offset: int
) -> bytes:
    """The 4 KiB entry with no descriptors that opens a session's sequence (OpenVMM, Windows)."""
    return build_entry(log_guid, sequence, tail, {}, flushed_file_offset, last_file_offset)
