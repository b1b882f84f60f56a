"""``vhdfs check --repair`` on the named bad images (tests/images/cases.py CASES).

Every case that ``check`` reports, or that a normal open refuses for a table entry past the end
of the file, is repaired and then checked: no error is left (only the damage no tool can undo,
listed in UNREPAIRABLE, stays), the data that was readable before still reads the same, a
parent's bytes never change, ``--dry-run`` changes nothing and announces the same changes, and
``qemu-img check`` agrees for VDI (qemu-img 7.2 cannot check vpc).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from vhdfs import errors
from vhdfs.block import open_image
from vhdfs.block.driver import Severity
from vhdfs.tools.check import check_image
from vhdfs.tools.maintain import repair_image

from images import corpus as bic, synthetic as syn
from images.cases import CASES, Case

# what the repair may leave: damage whose right answer is unknowable (which of two blocks?)
UNREPAIRABLE = {"bat-two-entries-one-block", "bat-entry-on-metadata", "vdi-two-entries-one-block"}
PAST_EOF = {"bat-entry-past-eof", "bat-entry-partly-past-eof", "vdi-map-entry-past-eof",
            "vdi-map-entry-beyond-allocated", "dyn-truncated-in-block", "corpus-dyn-truncated-in-block"}


def _cases() -> list[Case]:
    return [c for c in CASES if (c.error is None or c.name in PAST_EOF) and c.name not in UNREPAIRABLE]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: bic.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _errors(path: Path) -> list[str]:
    with open_image(path) as img:
        return [f.finding.text for f in check_image(img) if f.finding.severity is Severity.ERROR]


def _digest(path: Path) -> str:
    with open_image(path) as img:
        return hashlib.sha256(img.read(0, img.size)).hexdigest()


@pytest.mark.parametrize("case", _cases(), ids=[c.name for c in _cases()])
def test_repair_named_bad_image(case: Case, tmp_path: Path, request) -> None:
    corpus = request.getfixturevalue("corpus_dir") if case.needs_corpus else None
    folder = tmp_path / "img"
    folder.mkdir()
    built = case.build(folder, corpus)
    before = _hashes(folder)
    try:
        had_errors = bool(_errors(built.path))
        readable = True
    except errors.VhdfsError:
        had_errors, readable = True, False
    said: list[str] = []
    dry = repair_image(str(built.path), True, said.append)
    assert _hashes(folder) == before, "--dry-run changed a file"
    assert dry == said
    done: list[str] = []
    changes = repair_image(str(built.path), False, done.append)
    assert changes == dry == done, "the dry run announced other changes than the repair made"
    after = _hashes(folder)
    for name in before:
        if name != built.path.name:
            assert after[name] == before[name], f"repair changed {name}, which is not the image"
    if had_errors:
        assert changes, f"{case.name}: check reported errors but repair changed nothing"
    assert _errors(built.path) == [], f"{case.name}: errors left after repair"
    if readable and built.expected_sha256:
        assert _digest(built.path) == built.expected_sha256, "repair changed what the image reads"
    if built.path.suffix == ".vdi" and shutil.which("qemu-img"):
        res = subprocess.run(["qemu-img", "check", "-f", "vdi", str(built.path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    assert repair_image(str(built.path), False, lambda s: None) == [], "a second repair found more"


def test_repair_refused_on_image_in_use(tmp_path: Path) -> None:
    path = syn.dyn_vhd(tmp_path).path
    with open_image(path):   # a read-only user (a mount holds the same shared lock)
        with pytest.raises(errors.BusyError):
            repair_image(str(path), False, lambda s: None)
