#!/usr/bin/env python3
"""Coverage-guided fuzzing of hostile images with atheris (issue 6).

The same mutators and checks as ``tests/test_fuzz.py`` (``tests/images/hostile.py``): atheris picks
the base image, the region (footer, dynamic header, BAT, bitmaps, locators, VDI header/map), the
kind of damage and its values; each case runs ``open_image``, ``describe``, ``check``, a full read
and ``vhdfs info``/``check`` in-process, under a time and a memory bound. Failures are printed
and counted, not fatal, so one run reports them all.

    .venv/bin/python -m tools.fuzz_atheris -atheris_runs=2000
    .venv/bin/python -m tools.fuzz_atheris -max_total_time=600

Prints at exit: ``fuzz: cases tried: N, errors (refused cleanly): E, failures: F``.
Exit status 1 when any case failed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

from . import REPO

with atheris.instrument_imports(include=["vhdfs"]):
    import vhdfs.block.chain
    import vhdfs.cli
    import vhdfs.formats.vhd
    try:
        import vhdfs.formats.vdi.image  # noqa: F401
    except ImportError:
        pass

from images import corpus, hostile  # tests/images, put on the path by tools/__init__.py

CORPUS = Path(os.environ.get("VHDFS_CORPUS", REPO.parent / "shared" / "corpus"))
WANTED = ("dfvfs-qemu-ext2-dynamic.vhd", "dissect-qemu-pattern.vdi", "mkimg-63x255-512-mbr-dynamic.vhd")
KINDS = ["flip", "field", "field", "field", "bytes", "truncate"]
BOUNDARIES = list(hostile.BOUNDARY_U32 + hostile.BOUNDARY_U64)

stats = {"cases": 0, "errors": 0, "ok": 0, "failures": 0}
failures: list[str] = []


def decompressed_corpus(work: Path) -> Path | None:
    return corpus.unpack_corpus(CORPUS, work / "corpus", WANTED)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vhdfs-atheris-"))
    targets = hostile.fuzz_targets(decompressed_corpus(work), work)
    case_dir = work / "case"

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        target = targets[fdp.ConsumeIntInRange(0, len(targets) - 1)]
        muts = []
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            value = (fdp.PickValueInList(BOUNDARIES) if fdp.ConsumeBool()
                     else fdp.ConsumeIntInRange(0, (1 << 64) - 1))
            muts.append(hostile.Mutation(
                region=fdp.ConsumeIntInRange(0, 63), kind=fdp.PickValueInList(KINDS),
                where=fdp.ConsumeIntInRange(0, 1 << 16), value=value,
                fix_checksum=fdp.ConsumeBool(), blob=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))))
        buf, must_match = target.data, True
        for m in muts:
            buf, keep = hostile.apply_mutation(target, m, buf)
            must_match = must_match and keep
        path = hostile.write_case(target, buf, case_dir)
        out = hostile.run_hostile(path, target.expected_sha256, must_match)
        stats["cases"] += 1
        if out.status == "FAIL":
            stats["failures"] += 1
            what = "; ".join(m.describe(target) for m in muts)
            line = f"FAIL {what}: {out.detail}"
            failures.append(line)
            print(line, file=sys.stderr, flush=True)
            keep_dir = work / "failures" / f"{stats['failures']:04d}"
            shutil.copytree(case_dir, keep_dir)
        else:
            stats["errors" if out.status == "error" else "ok"] += 1

    def report() -> None:
        print(f"fuzz: cases tried: {stats['cases']}, read ok: {stats['ok']}, "
              f"errors (refused cleanly): {stats['errors']}, failures: {stats['failures']}",
              flush=True)
        if failures:
            print(f"failing images kept under {work / 'failures'}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if stats["failures"]:
            os._exit(1)

    atexit.register(report)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
