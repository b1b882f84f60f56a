#!/usr/bin/env python3
"""Soak: the kill -9 crash harness for many rounds, then random hostile-image fuzzing.

    .venv/bin/python -m tools.soak                  # 200 kill -9 rounds, 5000 fuzz cases
    .venv/bin/python -m tools.soak --rounds 1000 --fuzz-cases 20000 --seed 7

The crash part needs root, /dev/fuse and fusermount3 (it is skipped, and says so, otherwise).
Prints per phase and at the end:

    soak: rounds survived: 200/200 (dynamic 100, differencing 100), cases tried: 5000, failures: 0

Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from images import corpus, hostile  # tests/images, put on the path by tools/__init__.py

from . import REPO

CORPUS = Path(os.environ.get("VHDFS_CORPUS", REPO.parent / "shared" / "corpus"))
FUZZ_CORPUS = ("dfvfs-qemu-ext2-dynamic.vhd", "dissect-qemu-pattern.vdi",
               "mkimg-63x255-512-mbr-dynamic.vhd")


def kill9_phase(rounds: int, seed: int, work: Path) -> tuple[int, int, list[str]]:
    import test_kill9 as k9
    from conftest import has_root_fuse

    if not has_root_fuse():
        print("kill9: skipped (needs root, /dev/fuse and fusermount3)", flush=True)
        return 0, 0, []
    survived, failures = 0, []
    per_kind = {"dynamic": (rounds + 1) // 2, "differencing": rounds // 2}
    t0 = time.monotonic()
    for kind, n in per_kind.items():
        h = k9.Kill9Harness(work / kind, kind, seed)
        (work / kind).mkdir(parents=True, exist_ok=True)
        done = 0
        for _ in range(n):
            try:
                h.round()
                survived += 1
                done += 1
            except Exception as exc:  # count and go on with a fresh image
                failures.append(f"kill9 {kind} round {h.stats.rounds}: {type(exc).__name__}: {exc}")
                print(failures[-1], file=sys.stderr, flush=True)
                traceback.print_exc()
                h.image = None
                h.stats.rounds += 1
            if done and done % 25 == 0:
                print(f"kill9 {kind}: {done}/{n} rounds, {time.monotonic() - t0:.0f} s", flush=True)
        print(f"kill9 {kind}: rounds survived {done}/{n}, fsync-acknowledged writes checked "
              f"{h.stats.synced_writes}, unsynced writes at kill {h.stats.pending_at_kill}, "
              f"rounds where qemu-img and vhdfs differ on unsynced bytes "
              f"{h.stats.qemu_disagreements}", flush=True)
    return survived, rounds, failures


def fuzz_phase(cases: int, seed: int, work: Path) -> tuple[int, list[str]]:
    unpacked = corpus.unpack_corpus(CORPUS, work / "corpus", FUZZ_CORPUS)
    targets = hostile.fuzz_targets(unpacked, work)
    rnd = random.Random(seed)
    bounds = list(hostile.BOUNDARY_U32 + hostile.BOUNDARY_U64)
    kinds = ["flip", "field", "field", "field", "bytes", "truncate"]
    failures: list[str] = []
    t0 = time.monotonic()
    for n in range(1, cases + 1):
        target = rnd.choice(targets)
        muts = [hostile.Mutation(region=rnd.randrange(64), kind=rnd.choice(kinds),
                            where=rnd.randrange(1 << 16),
                            value=rnd.choice(bounds) if rnd.random() < 0.5 else rnd.getrandbits(
                                rnd.choice((8, 16, 32, 64))),
                            fix_checksum=rnd.random() < 0.7,
                            blob=rnd.randbytes(rnd.randrange(0, 25)))
                for _ in range(rnd.randint(1, 3))]
        data, must_match = target.data, True
        for m in muts:
            data, keep = hostile.apply_mutation(target, m, data)
            must_match = must_match and keep
        path = hostile.write_case(target, data, work / "case")
        out = hostile.run_hostile(path, target.expected_sha256, must_match)
        if out.status == "FAIL":
            line = "; ".join(m.describe(target) for m in muts) + f": {out.detail}"
            failures.append(line)
            print(f"fuzz FAIL {line}", file=sys.stderr, flush=True)
        if n % 500 == 0:
            print(f"fuzz: {n}/{cases} cases, {len(failures)} failures, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    return cases, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("VHDFS_KILL9_ROUNDS", 200)))
    ap.add_argument("--fuzz-cases", type=int, default=int(os.environ.get("VHDFS_FUZZ_EXAMPLES", 5000)))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    print(f"soak: seed {args.seed}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vhdfs-soak-"))
    try:
        survived, rounds, k_fail = kill9_phase(args.rounds, args.seed, work / "kill9")
        cases, f_fail = fuzz_phase(args.fuzz_cases, args.seed, work / "fuzz")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = len(k_fail) + len(f_fail)
    print(f"soak: rounds survived: {survived}/{rounds}, cases tried: {cases}, failures: {failures}",
          flush=True)
    for line in k_fail + f_fail:
        print(f"  {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
