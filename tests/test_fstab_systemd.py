"""``mount -t vhdfs`` through the helper, and the systemd unit's contract (Type=notify)."""

from __future__ import annotations

import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, needs_root
from mounting import force_unmount, run

from vhdfs.cli.mount_helper import translate
from vhdfs.errors import UsageError

UNIT = REPO / "systemd" / "vhdfs@.service"


def test_fstab_options_translate() -> None:
    argv = translate("/i/d.vhd", "/mnt/x", "ro,nofail,noauto,x-systemd.automount,cache,allow_other,parent_dir=/p")
    assert argv == ["mount", "--cache", "--parent-dir", "/p", "-o", "allow_other", "--", "/i/d.vhd", "/mnt/x"]
    assert translate("a", "b", "rw,debug")[:3] == ["--debug", "mount", "--rw"]
    with pytest.raises(UsageError):
        translate("a", "b", "frobnicate")
    assert "frobnicate" not in translate("a", "b", "frobnicate", sloppy=True)


@needs_root
@pytest.mark.timeout(60)
def test_mount_t_vhdfs_and_umount(tmp_path: Path) -> None:
    if not os.path.exists("/sbin/mount.vhdfs"):
        pytest.skip("/sbin/mount.vhdfs not installed (run ./scripts/install.sh)")
    img, mp = tmp_path / "disk.img", tmp_path / "mnt"
    data = random.Random(3).randbytes(1 << 20)
    img.write_bytes(data)
    mp.mkdir()
    try:
        run(["mount", "-t", "vhdfs", "-o", "ro,nofail,format=raw", str(img), str(mp)])
        assert (mp / "disk.raw").read_bytes() == data
        run(["umount", str(mp)])
        assert not os.path.ismount(mp)
        res = subprocess.run(["mount", "-t", "vhdfs", "-o", "bogus", str(img), str(mp)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and "bogus" in res.stderr
        assert not os.path.ismount(mp)
    finally:
        force_unmount(mp)


def _unit_line(key: str) -> str:
    for line in UNIT.read_text().splitlines():
        if line.startswith(key + "="):
            return line[len(key) + 1:]
    raise AssertionError(f"{key}= missing in {UNIT}")


def test_unit_is_type_notify() -> None:
    assert _unit_line("Type") == "notify"
    assert "--foreground" in _unit_line("ExecStart")


def test_unit_verifies() -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not available")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        # systemd resolves a bare "vhdfs" on its own PATH; point it at this checkout's.
        text = UNIT.read_text().replace("ExecStart=vhdfs ", f"ExecStart={REPO}/.venv/bin/vhdfs ")
        unit = Path(d) / "vhdfs@test.service"
        unit.write_text(text)
        res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr


def _expand(cmdline: str, env: dict[str, str]) -> list[str]:
    """systemd's rules for ExecStart: ``${VAR}`` is one word, ``$VAR`` splits on whitespace."""
    out: list[str] = []
    for word in shlex.split(cmdline):
        m = re.fullmatch(r"\$(\w+)", word)
        if m:
            out.extend(env.get(m.group(1), "").split())
            continue
        out.append(re.sub(r"\$\{(\w+)\}", lambda mm: env.get(mm.group(1), ""), word))
    return out


@needs_root
@pytest.mark.timeout(60)
def test_execstart_sends_ready_only_once_readable(tmp_path: Path) -> None:
    img, mp = tmp_path / "disk.img", tmp_path / "mnt"
    data = random.Random(5).randbytes(2 << 20)
    img.write_bytes(data)
    mp.mkdir()
    env = {"IMAGE": str(img), "MOUNTPOINT": str(mp), "OPTIONS": "--format raw --cache"}
    argv = _expand(_unit_line("ExecStart"), env)
    assert argv[0] == "vhdfs"
    argv = [sys.executable, "-m", "vhdfs", *argv[1:]]
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    proc = subprocess.Popen(argv, env=dict(os.environ, NOTIFY_SOCKET=sock_path), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "no READY=1 within 20 s"
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            if select.select([sock], [], [], 0.05)[0]:
                msg = sock.recv(4096).decode().split("\n")
                if "READY=1" in msg:
                    break
        # At READY=1 the raw file is there and answers, at once.
        with open(mp / "disk.raw", "rb") as f:
            assert f.read() == data
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mp)
    finally:
        sock.close()
        force_unmount(mp)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
