"""Launch (issue 14): ``vhdfs mount`` forks its daemon instead of starting a second Python, and
commands import only what they use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_root
from mounting import force_unmount, stop_daemon, vhdfs

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


def _modules_after(code: str) -> set[str]:
    """The vhdfs/pyfuse3/importlib.metadata modules a fresh interpreter holds after ``code``."""
    code += (
        "\nimport sys\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('vhdfs.', 'pyfuse3', 'importlib.metadata')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.splitlines()[-1].split(","))


def test_opening_an_image_loads_only_its_own_format(tmp_path: Path) -> None:
    """The registry names every format's code lazily (block.driver.deferred): opening a VHD loads
    neither VDI nor VHDX nor VHD's create/resize/compact/repair; a VHDX open loads no VHD reader."""
    for fmt in ("vhd", "vhdx"):
        img = tmp_path / f"disk.{fmt}"
        assert vhdfs("create", "--size", "8M", img).returncode == 0
        mods = _modules_after(f"import vhdfs.block\nvhdfs.block.open_image({str(img)!r}).close()")
        assert f"vhdfs.formats.{fmt}.layer" in mods, mods  # the test can fail: the reader is there
        others = {"vhd", "vdi", "vhdx"} - {fmt}
        loaded = {m for m in mods if m.startswith("vhdfs.formats.")}
        stray = {
            m
            for m in loaded
            if m.split(".")[2] in others and m.split(".")[3:] not in (["magic"], [])
            or m.split(".")[-1] in ("create", "resize", "compact", "repair", "maintain", "space", "room")
        }
        assert not stray, stray  # (a VHDX open probes VHD and VDI first: only their magic loads)


def test_fuse_package_imports_pyfuse3_without_importlib_metadata() -> None:
    """pyfuse3 3.5 imports importlib.metadata only for its __version__ (~40 ms of a launch)."""
    code = (
        "import sys, vhdfs.fs, pyfuse3\n"
        "assert 'importlib.metadata' not in sys.modules, 'the stand-in stayed or the real one loaded'\n"
        "import importlib.metadata\n"
        "assert pyfuse3.__version__ == importlib.metadata.version('pyfuse3'), pyfuse3.__version__\n"
        "assert importlib.metadata.version('trio')  # the real module works afterwards\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_garbage_collector_resumes_after_a_command(tmp_path: Path) -> None:
    img = tmp_path / "disk.vhd"
    assert vhdfs("create", "--size", "8M", img).returncode == 0
    code = (
        "import gc, sys\n"
        "from vhdfs.cli import main\n"
        f"rc = main(['info', {str(img)!r}])\n"
        "sys.stdout.flush()\n"
        "print('gc', rc, gc.isenabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "gc 0 True", out.stdout


@needs_root
def test_daemon_imports_with_the_collector_paused_and_resumes_it_when_serving(tmp_path: Path) -> None:
    """``service.startup``: paused through the daemon's imports and open, on again once it serves."""
    img = tmp_path / "disk.vhd"
    assert vhdfs("create", "--size", "8M", img).returncode == 0
    mp = tmp_path / "mnt"
    mp.mkdir()
    marker = tmp_path / "gc.txt"
    code = (
        "import gc, sys\n"
        "from vhdfs.service import startup\n"
        "resume = startup.resume\n"
        "def watched():\n"
        "    before = (gc.isenabled(), 'pyfuse3' in sys.modules)\n"
        "    resume()\n"
        f"    open({str(marker)!r}, 'w').write(f'{{before}} {{gc.isenabled()}} {{gc.get_freeze_count() > 0}}')\n"
        "startup.resume = watched\n"
        "from vhdfs.cli import main\n"
        f"sys.exit(main(['mount', '-f', {str(img)!r}, {str(mp)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if marker.exists() and marker.read_text():
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        assert marker.read_text() == "(False, True) True True"
        assert (mp / "disk.raw").read_bytes()[:512] == bytes(512)
    finally:
        force_unmount(mp)
        stop_daemon(proc)


def test_the_slow_vhd_probe_runs_only_when_no_format_is_certain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VHD's second look (a footer before padding: a 4 MiB read at the end) is not made for a
    VHDX or VDI, whose magic the first pass finds; a padded VHD still opens as VHD."""
    from vhdfs.block.chain import probe_format
    from vhdfs.formats.vhd import footer

    calls: list[str] = []
    real = footer.probe_padded

    def counting(data):  # type: ignore[no-untyped-def]
        calls.append("slow")
        return real(data)

    monkeypatch.setattr(footer, "probe_padded", counting)
    for fmt in ("vhdx", "vdi", "vhd"):
        img = tmp_path / f"d.{fmt}"
        assert vhdfs("create", "--size", "8M", img).returncode == 0
        assert probe_format(str(img)) == fmt
    assert calls == []
    fixed = tmp_path / "fixed.vhd"  # no head copy of the footer: only the slow look finds it
    assert vhdfs("create", "--type", "fixed", "--size", "8M", fixed).returncode == 0
    padded = tmp_path / "padded.vhd"
    padded.write_bytes(fixed.read_bytes() + bytes(4096))
    assert probe_format(str(padded)) == "vhd" and calls == ["slow"]
