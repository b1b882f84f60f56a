"""The offline CLI (info, check, create) as a user runs it: a subprocess, its exit code, its output.

What matters to a user is checked from outside: JSON facts against the corpus manifest, created
images against ``qemu-img``, and for bad input exactly one ``vhdfs: ...`` line, no traceback, a
non-zero exit and the file left byte-for-byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import corpus_entries
from mounting import sha256_file as sha256, vhdfs

TYPE_OF = {"dynamic": "dynamic", "fixed": "fixed", "differencing": "differencing",
           "vdi-dynamic": "dynamic", "vdi-static": "fixed"}
MiB = 1024 * 1024



def qemu_info(path: Path) -> dict:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    fmt = "vdi" if path.suffix == ".vdi" else "vpc"  # qemu probes VHD by a head footer only
    out = subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("vhdfs: warning:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vhdfs: "), proc.stderr


# -- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "check", "create", "convert", "commit"])
def test_every_command_has_help(command: str) -> None:
    proc = vhdfs(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"vhdfs {command}" in proc.stdout and len(proc.stdout.splitlines()) > 5


# -- info and check on every corpus image ---------------------------------------------------


@pytest.mark.parametrize("entry", corpus_entries(), ids=lambda e: e["image"])
def test_info_json_matches_manifest(entry: dict, corpus_dir: Path) -> None:
    proc = vhdfs("info", "--json", corpus_dir / entry["image"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == entry["format"]
    assert info["type"] == TYPE_OF[entry["disk_type"]]
    assert info["virtual_size"] == entry["expected_raw"]["size"]
    assert info["chain"][0] == str(corpus_dir / entry["image"])
    assert all(os.path.isabs(p) for p in info["chain"])
    assert len(info["layers"]) == len(info["chain"])
    text = vhdfs("info", corpus_dir / entry["image"])
    assert text.returncode == 0 and "virtual size:" in text.stdout, text.stderr


def test_info_of_a_chain_lists_every_layer(corpus_dir: Path) -> None:
    info = json.loads(vhdfs("info", "--json", corpus_dir / "xo-child2.vhd").stdout)
    assert info["chain"] == [str(corpus_dir / n) for n in ("xo-child2.vhd", "xo-child1.vhd", "xo-base.vhd")]
    assert [layer["type"] for layer in info["layers"]] == ["differencing", "differencing", "dynamic"]
    assert all(layer["uuid"] for layer in info["layers"])
    text = vhdfs("info", corpus_dir / "xo-child2.vhd").stdout
    assert "chain (3 images" in text and "xo-base.vhd" in text


@pytest.mark.parametrize("entry", corpus_entries(), ids=lambda e: e["image"])
def test_check_corpus_image_is_clean(entry: dict, corpus_dir: Path) -> None:
    path = corpus_dir / entry["image"]
    proc = vhdfs("check", "--json", path)
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] == 0 and proc.returncode == 0, report["findings"]
    assert report["chain"][0] == str(path)
    assert sha256(path) == entry["image_file_sha256"]


# -- create -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kind,size", [
    ("vhd", "dynamic", "64M"), ("vhd", "fixed", "10M"), ("vhd", "dynamic", "1000000K"),
    ("vdi", "dynamic", "32M"), ("vdi", "fixed", "8M"), ("vhd", "dynamic", "1G"),
])
def test_create_reads_at_requested_size_in_qemu(fmt: str, kind: str, size: str, tmp_path: Path) -> None:
    from vhdfs.cli.create import parse_size

    path = tmp_path / f"new.{fmt}"
    proc = vhdfs("create", "--format", fmt, "--type", kind, "--size", size, path)
    assert proc.returncode == 0, proc.stderr
    qi = qemu_info(path)
    assert qi["virtual-size"] == parse_size(size)
    assert qi["format"] == ("vpc" if fmt == "vhd" else "vdi")
    info = json.loads(vhdfs("info", "--json", path).stdout)
    assert (info["format"], info["type"], info["virtual_size"]) == (fmt, kind, parse_size(size))
    assert vhdfs("check", path).returncode == 0
    if fmt == "vdi":  # qemu-img check has no VHD support
        check = subprocess.run(["qemu-img", "check", "-f", "vdi", str(path)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_create_differencing_takes_parent_size(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    assert vhdfs("create", "--size", "20M", "--block-size", "512K", base).returncode == 0
    proc = vhdfs("create", "--parent", base, child)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(vhdfs("info", "--json", child).stdout)
    assert info["type"] == "differencing" and info["virtual_size"] == 20 * MiB
    assert info["chain"] == [str(child), str(base)]
    assert info["layers"][1]["block_size"] == 512 * 1024


def test_create_takes_format_from_name_and_parent(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "snap.vdi"
    assert vhdfs("create", "--size", "16M", base).returncode == 0
    proc = vhdfs("create", "--parent", base, child)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(vhdfs("info", "--json", child).stdout)
    assert (info["format"], info["type"], info["virtual_size"]) == ("vdi", "differencing", 16 * MiB)
    assert info["chain"] == [str(child), str(base)]
    mixed = vhdfs("create", "--format", "vhd", "--parent", base, tmp_path / "x.vhd")
    assert_one_error_line(mixed)
    assert mixed.returncode == 2 and not (tmp_path / "x.vhd").exists()


@pytest.mark.parametrize("text,value", [("4096", 4096), ("10G", 10 << 30), ("512m", 512 << 20),
                                        ("1.5K", 1536), ("2TiB", 2 << 40), ("3 MB", 3 << 20)])
def test_parse_size(text: str, value: int) -> None:
    from vhdfs.cli.create import parse_size

    assert parse_size(text) == value


@pytest.mark.parametrize("args", [
    ["--size", "12Q"], ["--size", "0"], ["--size=-5M"], ["--size", "1000"],  # not whole sectors
    [],  # no size
    ["--type", "differencing", "--size", "1M"],  # no parent
    ["--size", "1M", "--block-size", "3000"],
    ["--size", "3000G"],  # past VHD's 2040 GiB
])
def test_create_bad_arguments_exit_2(args: list[str], tmp_path: Path) -> None:
    path = tmp_path / "new.vhd"
    proc = vhdfs("create", *args, path)
    assert_one_error_line(proc)
    assert proc.returncode == 2
    assert not path.exists()


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "precious.vhd"
    path.write_bytes(b"keep me" * 100)
    before = sha256(path)
    proc = vhdfs("create", "--size", "1M", path)
    assert_one_error_line(proc)
    assert proc.returncode == 2 and sha256(path) == before


# -- bad input ------------------------------------------------------------------------------


def _nonexistent(tmp: Path, corpus: Path) -> Path:
    return tmp / "nope.vhd"


def _text_file(tmp: Path, corpus: Path) -> Path:
    p = tmp / "notes.vhd"
    p.write_text("this is not a disk image\n" * 200)
    return p


def _empty(tmp: Path, corpus: Path) -> Path:
    p = tmp / "empty.vhd"
    p.touch()
    return p


def _truncated(tmp: Path, corpus: Path) -> Path:
    p = tmp / "truncated.vhd"
    data = (corpus / "dissect-win10-ntfs-dynamic.vhd").read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _truncated_vdi(tmp: Path, corpus: Path) -> Path:
    p = tmp / "truncated.vdi"
    data = (corpus / "qemu-dynamic-mbr-ext4.vdi").read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return p


def _missing_parent(tmp: Path, corpus: Path) -> Path:
    p = tmp / "xo-child1.vhd"
    shutil.copyfile(corpus / "xo-child1.vhd", p)
    return p


def _directory(tmp: Path, corpus: Path) -> Path:
    p = tmp / "dir.vhd"
    p.mkdir()
    return p


BAD_INPUTS = [_nonexistent, _text_file, _empty, _truncated, _truncated_vdi, _missing_parent, _directory]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("command", ["info", "check", "convert", "commit"])
def test_bad_input_one_line_no_traceback_file_unchanged(make, command: str, corpus_dir: Path,
                                                        tmp_path: Path) -> None:
    path = make(tmp_path, corpus_dir)
    before = sha256(path) if path.is_file() else None
    args = {"info": ["info", path], "check": ["check", path],
            "convert": ["convert", "--to", "raw", path, tmp_path / "out.raw"],
            "commit": ["commit", path]}[command]
    proc = vhdfs(*args)
    assert_one_error_line(proc)
    if before is not None:
        assert sha256(path) == before
    assert not (tmp_path / "out.raw").exists()


def test_check_reports_overlapping_bat_entries(tmp_path: Path) -> None:
    """An image that opens but is damaged: findings on stdout, exit 1, file untouched."""
    from vhdfs.block import open_image
    from vhdfs.tools.create import create_image

    path = tmp_path / "overlap.vhd"
    create_image(path, size=8 * MiB, block_size=MiB)
    with open_image(path, writable=True) as img:
        img.write(0, b"a" * (2 * MiB))
        bat = img.describe()["bat_offset"]
    with open(path, "r+b") as f:  # BAT entry 1 := BAT entry 0
        f.seek(bat)
        first = f.read(4)
        f.seek(bat + 4)
        f.write(first)
    before = sha256(path)
    proc = vhdfs("check", "--json", path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] >= 1 and not report["clean"]
    assert any("overlap" in f["problem"] for f in report["findings"])
    text = vhdfs("check", path)
    assert text.returncode == 1 and "overlap" in text.stdout
    assert sha256(path) == before
