"""Hypothesis fuzzing of hostile images (issue 6).

Real and synthetic images get their footers, dynamic headers, BATs, bitmaps, parent locators,
VDI headers/maps, and VHDX headers, region tables, metadata table and items, BAT, parent
locator key/value table and log entry (header, descriptor, data sector) mutated (byte flips,
field overwrites with boundary values, truncation, with or without re-summed checksums). Each
case runs ``open_image``, ``describe``, ``check``, a full chunked read and the
``info``/``check`` commands in-process, under a time bound and a memory bound
(``images.hostile.run_hostile``). Allowed outcomes: correct data or a one-line
``VhdfsError``; the file's bytes never change; and while the dirty-log target's log entry and
headers are intact, its disk never reads as the stale (log ignored) content.

Default: about 200 examples over all targets (< 60 s). ``VHDFS_FUZZ_EXAMPLES=N`` scales it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from images import hostile

TOTAL = int(os.environ.get("VHDFS_FUZZ_EXAMPLES", "200"))
TARGET_NAMES = ["synthetic-dynamic", "synthetic-differencing", "synthetic-fixed", "synthetic-vdi",
                "corpus:dfvfs-qemu-ext2-dynamic.vhd", "corpus:dissect-qemu-pattern.vdi",
                "corpus:mkimg-63x255-512-mbr-dynamic.vhd",
                "synthetic-vhdx-dynamic", "synthetic-vhdx-differencing", "synthetic-vhdx-dirty-log"]
PER_TARGET = max(5, TOTAL // len(TARGET_NAMES))

_targets: dict[str, hostile.Target] = {}


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, hostile.Target]:
    if not _targets:
        work = tmp_path_factory.mktemp("fuzz")
        for t in hostile.fuzz_targets(corpus_dir, work):
            _targets[t.name] = t
        _targets["__work__"] = work  # type: ignore[assignment]
    return _targets


values = st.one_of(st.sampled_from(hostile.BOUNDARY_U32 + hostile.BOUNDARY_U64),
                   st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1))
mutations = st.builds(
    hostile.Mutation,
    region=st.integers(0, 63),
    kind=st.sampled_from(["flip", "field", "field", "field", "bytes", "truncate"]),
    where=st.integers(0, 1 << 16),
    value=values,
    fix_checksum=st.booleans(),
    blob=st.binary(max_size=24),
)


# No shrinking: a hang costs its full time bound per attempt, and the assertion message already
# spells out the mutations. VHDFS_FUZZ_SHRINK=1 turns it back on.
PHASES = tuple(Phase) if os.environ.get("VHDFS_FUZZ_SHRINK") else (
    Phase.explicit, Phase.reuse, Phase.generate)


@pytest.mark.parametrize("name", TARGET_NAMES)
@settings(max_examples=PER_TARGET, deadline=None, database=None, print_blob=True, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(muts=st.lists(mutations, min_size=1, max_size=3))
def test_fuzz_hostile_image(targets: dict, name: str, muts: list[hostile.Mutation]) -> None:
    if name not in targets:
        pytest.skip(f"{name} not available (corpus or driver missing)")
    target: hostile.Target = targets[name]
    data, must_match = target.data, True
    for m in muts:
        data, keep = hostile.apply_mutation(target, m, data)
        must_match = must_match and keep
    folder = targets["__work__"] / f"case-{name.replace(':', '_')}"
    path = hostile.write_case(target, data, folder)
    stale = target.stale_sha256 if target.log_intact(data) else None
    outcome = hostile.run_hostile(path, target.expected_sha256, must_match, stale_sha256=stale,
                                  lazy_blocks=target.fmt == "vhdx")
    what = "; ".join(m.describe(target) for m in muts)
    assert outcome.status != "FAIL", f"{what}: {outcome.detail}"


def test_unmutated_targets_read_correctly(targets: dict) -> None:
    """The fuzz bases themselves are sane (otherwise every finding above is noise)."""
    for name in TARGET_NAMES:
        if name not in targets:
            continue
        t = targets[name]
        path = hostile.write_case(t, t.data, targets["__work__"] / "base")
        out = hostile.run_hostile(path, t.expected_sha256, True)
        assert out.status == "ok", f"{name}: {out}"


def test_vhdx_huge_log_length_is_refused_without_reading_it(targets: dict) -> None:
    """Found by the fuzzer: dirty-log target, header 2 LogLength = 0x80000000 (re-summed)."""
    t = targets["synthetic-vhdx-dirty-log"]
    header2 = next(i for i, r in enumerate(t.regions) if r.name == "vhdx-header2")
    field = list(t.regions[header2].fields).index("log_length")
    data, _ = hostile.apply_mutation(t, hostile.Mutation(header2, "field", field, 0x80000000))
    path = hostile.write_case(t, data, targets["__work__"] / "huge-log-length")
    outcome = hostile.run_hostile(path, t.expected_sha256, False, lazy_blocks=True)
    assert outcome.status == "error", outcome
    assert "runs past the end of the file" in outcome.detail, outcome
