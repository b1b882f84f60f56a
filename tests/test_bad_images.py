"""The table of named bad images (issue 6): each one either reads correctly (tolerable damage,
with a warning) or fails with a ``VhdfsError`` whose one-line message says what is wrong.

For every case: ``open_image`` + a full chunked read, the bytes of every file in the folder
unchanged, and the CLI (``vhdfs info`` and ``vhdfs check``) answering with exactly one
``vhdfs: `` line on stderr, no traceback, and a non-zero exit for images that cannot be opened.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from images import content, corpus, synthetic as syn, writers_vhd as vhdw
from images.cases import CASES, Case

from vhdfs import errors
from vhdfs.block import open_image

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: corpus.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _read_all(img) -> bytes:
    h = hashlib.sha256()
    pos = 0
    while pos < img.size:
        data = img.read(pos, CHUNK)
        assert data, f"short read at {pos} of {img.size}"
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def _build(case: Case, tmp_path: Path, request) -> syn.Built:
    corpus = None
    if case.needs_corpus:
        corpus = request.getfixturevalue("corpus_dir")
    folder = tmp_path / "img"
    folder.mkdir()
    return case.build(folder, corpus)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdfs", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def _has_command(name: str) -> bool:
    return (REPO / "vhdfs" / "cli" / f"{name}.py").is_file()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_image_open_and_read(case: Case, tmp_path: Path, request, capsys) -> None:
    built = _build(case, tmp_path, request)
    before = _folder_hashes(built.path.parent)
    outcome: BaseException | None = None
    digest = None
    try:
        with open_image(built.path) as img:
            size = img.size
            digest = _read_all(img)
            problems = img.check()
    except errors.VhdfsError as exc:
        outcome = exc
    err = capsys.readouterr().err
    assert _folder_hashes(built.path.parent) == before, "opening or reading changed a file"

    if case.error is not None:
        assert outcome is not None, (
            f"{case.name}: opened and read without error (size {size}); expected "
            f"{case.error} mentioning {case.fragments}; stderr: {err!r}")
        assert type(outcome).__name__ == case.error, f"{type(outcome).__name__}: {outcome}"
        msg = str(outcome)
        assert "\n" not in msg, f"message is not one line: {msg!r}"
        assert str(built.path) in msg or built.path.name in msg, f"message does not name the file: {msg}"
        for frag in case.fragments:
            assert frag in msg, f"{frag!r} not in {msg!r}"
        return

    assert outcome is None, f"{case.name}: tolerable damage refused: {type(outcome).__name__}: {outcome}"
    if built.expected_sha256:
        assert digest == built.expected_sha256, f"{case.name}: wrong data"
    if built.expected_size is not None:
        assert size == built.expected_size
    for frag in case.warnings:
        assert frag in err, f"warning {frag!r} not on stderr: {err!r}"
    for line in err.splitlines():
        assert line.startswith("vhdfs: warning: "), f"unexpected stderr line {line!r}"
    for frag in case.check_finds:
        assert any(frag in p.text for p in problems), f"check() does not report {frag!r}: {problems}"
    if case.writable_refused:
        with pytest.raises(errors.VhdfsError) as exc_info:
            open_image(built.path, writable=True).close()
        assert "\n" not in str(exc_info.value)
        assert _folder_hashes(built.path.parent) == before, "a refused writable open changed a file"


@pytest.mark.parametrize("command", ["info", "check"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_image_cli(case: Case, command: str, tmp_path: Path, request) -> None:
    if not _has_command(command):
        pytest.skip(f"vhdfs {command} does not exist yet")
    built = _build(case, tmp_path, request)
    before = _folder_hashes(built.path.parent)
    res = _cli(command, str(built.path))
    assert _folder_hashes(built.path.parent) == before, f"vhdfs {command} changed a file"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.splitlines()
    if case.error is not None and case.lazy:
        assert all(line.startswith("vhdfs: warning: ") for line in lines) or command == "check", lines
        assert res.returncode == (0 if command == "info" else 1), (res.returncode, res.stdout, res.stderr)
        if command == "check":
            for frag in case.fragments:
                assert frag in res.stdout + res.stderr, f"{frag!r} not in check output {res.stdout!r}"
        return
    if case.error is not None:
        assert res.returncode != 0, f"exit 0 for a broken image: {res.stdout}{res.stderr}"
        # One error line; warnings that explain it (e.g. a locator outside the file before
        # "parent not found") may precede it, each a "vhdfs: warning: " line.
        errs = [ln for ln in lines if not ln.startswith("vhdfs: warning: ")]
        assert len(errs) == 1, f"expected exactly one error line on stderr, got {lines}"
        assert errs[0] == lines[-1] and errs[0].startswith("vhdfs: "), lines
        for frag in case.fragments:
            assert frag in errs[0], f"{frag!r} not in {errs[0]!r}"
        return
    # Tolerable damage: info shows the image with warnings; check reports and exits 1 when the
    # findings are real problems (a leak-only image would exit 0).
    assert all(line.startswith("vhdfs: warning: ") for line in lines), lines
    if command == "info":
        assert res.returncode == 0, res.stderr
    elif case.check_finds:
        assert res.returncode == (0 if case.check_note else 1), (res.returncode, res.stdout, res.stderr)
        if case.check_note:   # a harmless finding: shown with --verbose, exit 0
            res = _cli(command, "--verbose", str(built.path))
            assert "note: " in res.stdout, res.stdout
        for frag in case.check_finds:
            assert frag in res.stdout, f"{frag!r} not in check output {res.stdout!r}"


def test_ignore_parent_id_accepts_mismatch(tmp_path: Path) -> None:
    """The escape hatch the UUID-mismatch message names really opens the chain."""
    d = tmp_path / "img"
    d.mkdir()
    parent, child, flat = syn.vhd_chain(d)
    vhdw.patch_vhd_footer(parent.path, unique_id=bytes(range(16)))
    with open_image(child.path, ignore_parent_id=True) as img:
        assert _read_all(img) == content.sha256(flat)


def test_parent_dir_finds_moved_parent(tmp_path: Path) -> None:
    """The parent-missing message says --parent-dir; it must work."""
    d = tmp_path / "img"
    d.mkdir()
    parent, child, flat = syn.vhd_chain(d)
    other = tmp_path / "elsewhere"
    other.mkdir()
    parent.path.rename(other / parent.path.name)
    with pytest.raises(errors.ChainError):
        open_image(child.path)
    with open_image(child.path, parent_dirs=[other]) as img:
        assert _read_all(img) == content.sha256(flat)
