"""VirtualBox VDI driver: dynamic, static ("fixed") and differencing v1.1 images.

The whole block map lives in memory (4 bytes per block), so mapping a range costs one array
lookup per block touched and no I/O. Allocation follows VirtualBox's and QEMU's crash-safe order:
whole block data → fdatasync → header ``blocks_allocated`` → fdatasync → map entry, and the
in-memory map changes only after that, so a crash can leak a block but never reuse an index or
expose a block whose data is not on disk.
"""

from __future__ import annotations

import os
import struct
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ...block.driver import Finding
from ...block.extent import run_end
from ...block.image import Extent, Image, Kind, OpenOptions, ParentRef
from ...block.pending import PendingCounter, PendingGroup, PendingTable
from ...block.rawfile import RawFile
from ...errors import ChainError, FormatError, VhdfsError, warn
from . import spec as fmt

_ZERO_CHUNK = 1 << 20  # zero-fill granularity for discards of allocated data


def open_layer(path: str, options: OpenOptions) -> VdiImage:
    """Open one VDI layer; a differencing layer's parent is attached later by ``chain``."""
    f = RawFile(path, options.writable)
    try:
        file_size = f.size()
        header = fmt.parse_header(os.pread(f.fd, fmt.HEADER_READ_SIZE, 0), file_size)
        bmap = fmt.parse_map(f.pread(header.map_bytes, header.offset_bmap))
        used = list(filter(fmt.BLOCK_ZERO.__gt__, bmap))
        _check_map_fits(header, bmap, file_size)
        notes = list(header.warnings)
        if len(set(used)) != len(used):
            notes.append("several block map entries share one data block (see vhdfs check)")
            if options.writable and not options.force:
                raise FormatError(
                    "several block map entries share one data block: a write would change "
                    "both; open it read-only (or pass --force)"
                )
        img = VdiImage(path, f, header, bmap, file_size)
    except VhdfsError as exc:
        f.close()
        raise exc.with_path(path) from None
    except (ValueError, struct.error, OverflowError) as exc:
        f.close()
        raise FormatError(f"corrupt VDI image: {exc}", path) from None
    except BaseException:
        f.close()
        raise
    for message in notes:
        warn(message, path)
    return img


def _check_map_fits(h: fmt.VdiHeader, bmap: array, file_size: int) -> None:
    """Refuse a map whose data for the virtual disk lies past the end of the file.

    Only entries inside the virtual size are read, so only they count (a hostile map may name
    a huge block in an entry past the disk's end). Among them, checking the highest block
    suffices: every lower block ends before it starts. Only the bytes that hold virtual data
    must exist (the last virtual block may be partial).
    """
    in_disk = bmap[: -(-h.disk_size // h.block_size)]
    top = _highest_used(in_disk)
    if top < 0:
        return
    block = in_disk.index(top)
    needed = min(h.block_size, h.disk_size - block * h.block_size)
    end = h.offset_data + top * h.block_stride + h.block_extra + needed
    if end > file_size:
        raise FormatError(
            f"block map entry {block} points to data at {end - needed}-{end}, "
            f"past the end of the file ({file_size})"
        )


def _highest_used(bmap: array) -> int:
    """The highest data-block index the map names, -1 if none (a C-level scan, no genexpr)."""
    return max(filter(fmt.BLOCK_ZERO.__gt__, bmap), default=-1)


class VdiImage(Image):
    """One VDI layer. ``type`` is "dynamic", "fixed" (VirtualBox: static) or "differencing"."""

    file: RawFile  # always open (narrows Image.file)

    format = "vdi"

    def __init__(self, path: str, f: RawFile, header: fmt.VdiHeader, bmap: array, file_size: int) -> None:
        self._backing: Image | None = None
        self.header = header
        super().__init__(path, header.disk_size, f.writable)
        self.file = f
        self.bmap = bmap
        self.type = header.type_name
        self.block_size = self.allocation_unit = header.block_size
        self.diff = header.is_diff
        self._free_kind = Kind.BACKING if self.diff else Kind.ZERO
        self._modify_renewed = False
        self._zero_block: bytes | None = None
        self._next_index = self._first_free_index(file_size)
        # Group commit (block/pending.py): the header's blocks_allocated, then new blocks' map
        # entries, reach the file at the next commit, after a sync made the data durable, with a
        # sync between the two (else the disk may store an entry past blocks_allocated, a block
        # QEMU would hand out again). A failed entry write rolls that block back to its entry in
        # the file; blocks_allocated may then stay above the blocks in use, which only leaks
        # space (never reused).
        self._pending = PendingTable("<I", header.offset_bmap, f, self._roll_back_entry)
        allocated = PendingCounter(
            "<I",
            fmt.BLOCKS_ALLOCATED_OFFSET,
            f,
            lambda: self.header.blocks_allocated,
            header.blocks_allocated,
        )
        self.pending = PendingGroup(allocated, self._pending, barrier=f.sync)
        if self.diff:
            link = str(header.uuid_link)
            self.parent_ref = ParentRef(name=link, expected_id=link, format="vdi", scan=True)

    def _first_free_index(self, file_size: int) -> int:
        """max(blocks_allocated, highest used + 1, blocks the file already holds): never reuse."""
        h = self.header
        used = _highest_used(self.bmap)
        in_file = -(-(file_size - h.offset_data) // h.block_stride) if file_size > h.offset_data else 0
        return max(h.blocks_allocated, used + 1, in_file)

    # -- the parent: warn when it was modified after the child was made --------------------

    @property
    def backing(self) -> Image | None:
        return self._backing

    @backing.setter
    def backing(self, parent: Image | None) -> None:
        self._backing = parent
        if parent is not None and isinstance(parent, VdiImage):
            expected = self.header.uuid_parent_modify
            if expected != fmt.NULL_UUID and parent.header.uuid_modify != expected:
                warn(
                    f"parent {parent.path} was modified after this snapshot was taken "
                    f"(modification UUID {parent.header.uuid_modify}, expected {expected})",
                    self.path,
                )

    # -- mapping ----------------------------------------------------------------------------

    def _data_offset(self, entry: int) -> int:
        return self.header.offset_data + entry * self.header.block_stride + self.header.block_extra

    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        bs = self.block_size
        fd = self.file.fd
        bmap = self.bmap
        pos, end = offset, offset + length
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            entry = bmap[block]
            if entry < fmt.BLOCK_ZERO:
                yield Extent(pos, n, Kind.DATA, fd, self._data_offset(entry) + within)
                pos += n
                continue
            # a run of zero (or of free) blocks is one extent
            n = min(run_end(block, (end - 1) // bs, bmap.__getitem__) * bs, end) - pos
            yield Extent(pos, n, Kind.ZERO if entry == fmt.BLOCK_ZERO else self._free_kind)
            pos += n

    def write_is_in_place(self, offset: int, length: int) -> bool:
        if not self._modify_renewed:
            return False  # the first change writes the header (_renew_modify_uuid)
        if length <= 0:
            return True
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        return all(e < fmt.BLOCK_ZERO for e in self.bmap[first : last + 1])

    # -- writing ----------------------------------------------------------------------------

    def _write(self, offset: int, data: memoryview) -> None:
        self._renew_modify_uuid()
        bs = self.block_size
        pos, end = offset, offset + len(data)
        run_file = run_start = run_len = 0  # one pwrite per contiguous run of allocated data
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            entry = self.bmap[block]
            if entry < fmt.BLOCK_ZERO:
                file_off = self._data_offset(entry) + within
                if run_len and run_file + run_len == file_off:
                    run_len += n
                else:
                    if run_len:
                        self.file.pwrite(data[run_start : run_start + run_len], run_file)
                    run_file, run_start, run_len = file_off, pos - offset, n
            else:
                if run_len:
                    self.file.pwrite(data[run_start : run_start + run_len], run_file)
                    run_len = 0
                self._allocate(block, within, data[pos - offset : pos - offset + n])
            pos += n
        if run_len:
            self.file.pwrite(data[run_start : run_start + run_len], run_file)

    def _renew_modify_uuid(self) -> None:
        """VirtualBox gives an image a new modification UUID on its first change after open;
        doing the same lets a snapshot child notice its parent was changed under it."""
        if self._modify_renewed:
            return
        with self.meta_lock:
            if self._modify_renewed:
                return
            new = uuid.uuid4()
            self.file.pwrite(fmt.encode_uuid(new), fmt.MODIFY_UUID_OFFSET)
            self.header.uuid_modify = new
            self._modify_renewed = True

    def _is_zero_block(self, chunk: memoryview) -> bool:
        if self._zero_block is None:
            self._zero_block = bytes(self.block_size)
        return len(chunk) == self.block_size and chunk == self._zero_block

    def _allocate(self, block: int, within: int, chunk: memoryview) -> None:
        """Give ``block`` a data block in the file holding ``chunk`` at ``within``."""
        with self.meta_lock:
            entry = self.bmap[block]
            if entry < fmt.BLOCK_ZERO:  # another writer allocated it meanwhile
                self.file.pwrite(chunk, self._data_offset(entry) + within)
                return
            inherit = entry == fmt.BLOCK_FREE and self.diff
            if within == 0 and self._is_zero_block(chunk):
                if inherit:  # zeros over the parent: the zero marker, no data block
                    self._set_entries(block, [fmt.BLOCK_ZERO])
                return  # the block already reads as zeros
            h = self.header
            bs, extra = self.block_size, h.block_extra
            buf = bytearray(h.block_stride)
            start = block * bs
            covered = within == 0 and len(chunk) >= min(bs, self.size - start)
            if inherit and not covered:
                if self.backing is None:
                    raise ChainError("cannot copy-on-write: the parent image is not open", self.path)
                parent = self.backing.read(start, min(bs, self.size - start))
                buf[extra : extra + len(parent)] = parent
            buf[extra + within : extra + within + len(chunk)] = chunk
            index = self._next_index
            if index > fmt.MAX_BLOCK_INDEX:
                raise FormatError("the image has no free block indices left", self.path)
            self.file.pwrite(buf, h.offset_data + index * h.block_stride)
            # Publish now; the entry reaches the file at the next commit, after the data.
            self._pending.set(block, index, file_entry=entry)
            self.bmap[block] = index
            h.blocks_allocated = max(h.blocks_allocated, index + 1)
            self._next_index = index + 1

    def _roll_back_entry(self, block: int, file_entry: int) -> None:
        self.bmap[block] = file_entry

    def _set_entries(self, first: int, values: list[int]) -> None:
        """Durably write map entries ``first..`` (one pwrite), then publish them in memory."""
        self.commit()  # a pending entry for one of these blocks must not land after them
        self.file.pwrite(fmt.pack_entries(values), self.header.offset_bmap + 4 * first)
        self.file.sync()
        self.bmap[first : first + len(values)] = array(self.bmap.typecode, values)

    def _discard(self, offset: int, length: int) -> None:
        """Whole blocks become zero markers (their space leaks, as the brief allows); partial
        blocks get zeros written. Static images keep map[i] = i, so they get zeros in place."""
        if length == 0:
            return
        end, bs = offset + length, self.block_size
        if self.type == "fixed":
            self._zero_fill(offset, end)
            return
        first = -(-offset // bs)
        last = -(-end // bs) if end == self.size else end // bs
        if first >= last:
            self._zero_fill(offset, end)
            return
        self._zero_fill(offset, first * bs)
        self._zero_fill(last * bs, end)
        self._renew_modify_uuid()
        with self.meta_lock:
            self.commit()  # a pending entry for a discarded block must not land after its marker
            runs: list[tuple[int, int]] = []
            for block in range(first, last):
                entry = self.bmap[block]
                if entry == fmt.BLOCK_ZERO or (entry == fmt.BLOCK_FREE and not self.diff):
                    continue  # already reads as zeros
                if runs and runs[-1][1] == block:
                    runs[-1] = (runs[-1][0], block + 1)
                else:
                    runs.append((block, block + 1))
            for a, b in runs:
                self.file.pwrite(
                    fmt.pack_entries([fmt.BLOCK_ZERO] * (b - a)), self.header.offset_bmap + 4 * a
                )
            if runs:
                self.file.sync()
            for a, b in runs:
                self.bmap[a:b] = array(self.bmap.typecode, [fmt.BLOCK_ZERO] * (b - a))

    def _zero_fill(self, start: int, end: int) -> None:
        """Write zeros over ``[start, end)`` where it does not already read as zeros."""
        bs = self.block_size
        pos = start
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            entry = self.bmap[block]
            if entry < fmt.BLOCK_ZERO or (entry == fmt.BLOCK_FREE and self.diff):
                for off in range(0, n, _ZERO_CHUNK):
                    self._write(pos + off, memoryview(bytes(min(_ZERO_CHUNK, n - off))))
            pos += n

    # -- the rest of the protocol -------------------------------------------------------

    def identity(self) -> str:
        return str(self.header.uuid_create)

    def allocated_blocks(self) -> int:
        return len(self.bmap) - self.bmap.count(fmt.BLOCK_ZERO) - self.bmap.count(fmt.BLOCK_FREE)

    def allocated_bytes(self) -> int:
        return min(self.size, self.allocated_blocks() * self.block_size)

    def describe(self) -> dict[str, Any]:
        h = self.header
        zero = self.bmap.count(fmt.BLOCK_ZERO)
        allocated = self.allocated_blocks()
        out: dict[str, Any] = {
            "format": "vdi",
            "type": self.type,
            "image_type": h.image_type,
            "version": f"{h.version >> 16}.{h.version & 0xFFFF}",
            "header_size": h.header_size,
            "pre_header": h.text.decode("latin-1").strip(),
            "description": h.description_text,
            "block_size": h.block_size,
            "block_extra": h.block_extra,
            "total_blocks": h.blocks_in_image,
            "allocated_blocks": allocated,
            "zero_blocks": zero,
            "blocks_allocated_field": h.blocks_allocated,
            "unreferenced_blocks": max(0, self._next_index - allocated),
            "block_map_offset": h.offset_bmap,
            "data_offset": h.offset_data,
            "uuid": str(h.uuid_create),
            "modify_uuid": str(h.uuid_modify),
            "disk_size_field": h.disk_size,
        }
        if self.diff:
            out["parent_uuid"] = str(h.uuid_link)
            out["parent_modify_uuid"] = str(h.uuid_parent_modify)
        return out

    def check(self) -> list[Finding]:
        """Duplicate or out-of-range entries, blocks past EOF, a wrong allocated count.

        Blocks the file holds but the map no longer names (a discard, or a crash between the
        header and map updates) only leak space: ``describe`` counts them, check does not.
        """
        h = self.header
        problems = list(h.warnings)
        file_size = self.file.size()
        used = [(i, e) for i, e in enumerate(self.bmap) if e < fmt.BLOCK_ZERO]
        counts = Counter(e for _, e in used)
        dups = sorted(e for e, c in counts.items() if c > 1)
        if dups:
            problems.append(
                f"{len(dups)} data blocks are used by more than one map entry (first: block {dups[0]})"
            )
        high = [(i, e) for i, e in used if e >= h.blocks_allocated]
        if high:
            problems.append(
                f"{len(high)} map entries point at or beyond blocks_allocated {h.blocks_allocated} "
                f"(first: entry {high[0][0]} -> block {high[0][1]})"
            )
        past = [(i, e) for i, e in used if self._data_offset(e) + self.block_size > file_size]
        if past:
            problems.append(
                f"{len(past)} map entries point past the end of the file ({file_size}) "
                f"(first: entry {past[0][0]} -> block {past[0][1]})"
            )
        if len(counts) > h.blocks_allocated:
            problems.append(f"blocks_allocated is {h.blocks_allocated} but the map uses {len(counts)} blocks")
        if h.offset_data + h.blocks_allocated * h.block_stride > file_size:
            problems.append(f"blocks_allocated is {h.blocks_allocated} but the file holds fewer blocks")
        if self.type == "fixed" and any(e != i for i, e in enumerate(self.bmap)):
            problems.append("static image whose block map is not the identity (map[i] != i)")
        from .findings import findings

        return findings(self, problems)
