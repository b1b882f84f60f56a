"""Power cut below the daemon: record every write one image file receives, replay prefixes.

``WriteLog.install`` wraps ``RawFile.pwrite``/``truncate``/``sync`` (the only way the block layer
touches a file) for one target path; ``replay`` rebuilds the file as it would stand had the
power failed after the first ``upto`` operations. ``fail_at`` makes the n-th pwrite fail with
EIO, for tests of what a failed write leaves behind. Used by ``tests/block/test_conformance.py``
for every format; a driver's own tests may use it too.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhdfs.block.rawfile import RawFile

SECTOR = 512


class WriteLog:
    """Every pwrite/truncate that reaches one file, in order, with sync points marked."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = os.path.abspath(target)
        self.ops: list[tuple[str, int, bytes]] = []
        self.pwrites = 0                   # pwrites seen so far
        self.fail_at: int | None = None    # fail the pwrite with this number (0 = the first)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        log = self
        real_pwrite, real_truncate, real_sync = RawFile.pwrite, RawFile.truncate, RawFile.sync

        def pwrite(self: RawFile, data, offset: int) -> None:
            if self.path == log.target:
                log.pwrites += 1
                if log.fail_at is not None and log.pwrites - 1 == log.fail_at:
                    log.fail_at = None
                    raise OSError(errno.EIO, "injected write failure")
                log.ops.append(("w", offset, bytes(data)))
            real_pwrite(self, data, offset)

        def truncate(self: RawFile, length: int) -> None:
            if self.path == log.target:
                log.ops.append(("t", length, b""))
            real_truncate(self, length)

        def sync(self: RawFile) -> None:
            if self.path == log.target:
                log.ops.append(("s", 0, b""))
            real_sync(self)

        monkeypatch.setattr(RawFile, "pwrite", pwrite)
        monkeypatch.setattr(RawFile, "truncate", truncate)
        monkeypatch.setattr(RawFile, "sync", sync)

    def replay(self, original: Path, out: Path, upto: int) -> None:
        """The file as it stands after the first ``upto`` ops, persisted in order."""
        shutil.copyfile(original, out)
        self._apply(out, 0, upto)

    def replay_each(self, original: Path, out: Path, cuts: list[int]) -> Iterator[int]:
        """``replay`` at each of the increasing ``cuts`` in turn, applying each op once.

        The caller must leave ``out`` unchanged between cuts (open it read-only)."""
        shutil.copyfile(original, out)
        done = 0
        for cut in cuts:
            self._apply(out, done, cut)
            done = cut
            yield cut

    def _apply(self, out: Path, start: int, end: int) -> None:
        with open(out, "r+b") as f:
            for kind, offset, data in self.ops[start:end]:
                if kind == "w":
                    f.seek(offset)
                    f.write(data)
                elif kind == "t":
                    f.truncate(offset)


def sectors(data: bytes) -> list[bytes]:
    return [data[i:i + SECTOR] for i in range(0, len(data), SECTOR)]


def assert_each_sector_from(got: bytes, candidates: list[bytes], what: str) -> None:
    """Every sector of ``got`` equals that sector in one of ``candidates`` (never garbage)."""
    if got in candidates:
        return
    chunk = 64 * SECTOR
    for start in range(0, len(got), chunk):     # whole chunks first: most match a candidate
        end = start + chunk
        piece = got[start:end]
        if any(piece == c[start:end] for c in candidates):
            continue
        for a in range(start, min(end, len(got)), SECTOR):
            sector = got[a:a + SECTOR]
            assert any(sector == c[a:a + SECTOR] for c in candidates), (
                f"{what}: sector {a // SECTOR} holds bytes that were never written there")
