"""Launch (issue 14): ``vhdfs mount`` forks its daemon instead of starting a second Python, and
commands import only what they use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root
from mounting import force_unmount, vhdfs

pytestmark = [pytest.mark.timeout(120)]


def test_version_imports_no_command_and_no_format() -> None:
    code = (
        "import sys\n"
        "from vhdfs.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('vhdfs.cli.', 'vhdfs.formats', 'trio')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vhdfs 0"), out.stdout
    assert out.stdout.splitlines()[-1] == ""


@needs_root
def test_background_daemon_is_a_fork_in_its_own_session(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = vhdfs("mount", "--format", "raw", img, mp)
    assert res.returncode == 0, res.stderr
    try:
        from vhdfs.service import state

        record = state.read(str(mp), ".json")
        assert record is not None
        pid = record["pid"]
        # a fork keeps the command line it was started with; a re-exec would say --foreground
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"mount" in cmdline and b"--foreground" not in cmdline, cmdline
        assert os.getsid(pid) == pid  # a session of its own: a closed terminal does not stop it
        assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
        assert os.readlink(f"/proc/{pid}/fd/2") == state.path_for(str(mp), ".log")
        assert (mp / "disk.raw").read_bytes() == img.read_bytes()
    finally:
        assert vhdfs("umount", mp).returncode == 0
        force_unmount(mp)


@needs_root
def test_background_error_after_the_fork_is_one_line_and_mounts_nothing(tmp_path: Path) -> None:
    """A failure inside the forked daemon (here: the FUSE mount refuses an option) reaches the CLI."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = vhdfs("mount", "--format", "raw", "-o", "no_such_fuse_option", img, mp)
    try:
        assert res.returncode == 1, res
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("vhdfs: "), res.stderr
        assert "Traceback" not in res.stderr
        assert not os.path.ismount(mp)
    finally:
        force_unmount(mp)
