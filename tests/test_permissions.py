"""Exposed files are never more readable than the image (issue 13): real mounts, real users.

As root, images of mode 0600, 0640 and 0644 are mounted with ``-o allow_other`` and read by two
unprivileged users the tests create (``member`` is in the image's group, ``outsider`` is not):
each may read an exposed file -- the disk and every partition -- exactly when it may read the
image itself. chmod/chown follow the owner/root rule, never add a write bit to a read-only
mount, and never touch the image, whose bytes and mode are checked after every test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from conftest import needs_root
from mounting import mounted, run, sfdisk_partitions, sha256_file, vhdfs

from vhdfs.aio.access import Access, changed, exposed_access, socket_mode

pytestmark = [pytest.mark.timeout(180)]

LAYOUT = "label: dos\n,3M,L\n,,L\n"       # two partitions: disk.raw, disk-p1.raw, disk-p2.raw
FILES = ("disk.raw", "disk-p1.raw", "disk-p2.raw")

# What a user runs: one operation, answered "ok [sha256]" or the errno's name. System python,
# so that nothing of the test's own environment is needed by the unprivileged user.
PROBE = r"""
import errno, hashlib, os, sys
op, path, *rest = sys.argv[1:]
try:
    if op == "read":
        with open(path, "rb") as f:
            print("ok", hashlib.sha256(f.read()).hexdigest())
    elif op == "write":
        os.close(os.open(path, os.O_WRONLY))
        print("ok")
    elif op == "chmod":
        os.chmod(path, int(rest[0], 8)); print("ok")
    elif op == "chown":
        os.chown(path, int(rest[0]), int(rest[1])); print("ok")
    elif op == "stat":
        st = os.stat(path); print("ok %o %d" % (st.st_mode & 0o7777, st.st_uid))
    elif op == "list":
        os.listdir(path); print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""

needs_useradd = pytest.mark.skipif(shutil.which("useradd") is None or shutil.which("runuser") is None,
                                   reason="needs useradd and runuser")


@dataclass
class User:
    name: str
    uid: int
    gid: int

    def do(self, op: str, path: str | os.PathLike[str], *args: object) -> str:
        """Run one PROBE operation as this user; its answer ("ok <sha>", "ok", "EACCES" ...)."""
        res = run(["runuser", "-u", self.name, "--", "/usr/bin/python3", "-c", PROBE, op, os.fspath(path),
                   *map(str, args)], cwd="/")
        return res.stdout.strip()


@dataclass
class Users:
    group: str
    gid: int
    member: User       # in ``group``
    outsider: User     # not


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Two throwaway users and a group, always removed afterwards (even when a test fails)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users")
    tag = uuid.uuid4().hex[:8]
    group, member, outsider = f"vhdfs-g{tag}", f"vhdfs-m{tag}", f"vhdfs-o{tag}"
    made: list[tuple[str, str]] = []
    try:
        run(["groupadd", group]); made.append(("groupdel", group))
        for name, extra in ((member, ["-G", group]), (outsider, [])):
            run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name])
            made.insert(0, ("userdel", name))
        import grp
        import pwd

        def user(name: str) -> User:
            pw = pwd.getpwnam(name)
            return User(name, pw.pw_uid, pw.pw_gid)

        yield Users(group, grp.getgrnam(group).gr_gid, user(member), user(outsider))
    finally:
        for cmd, name in made:
            subprocess.run([cmd, name], capture_output=True, timeout=30)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users may traverse (pytest's tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="vhdfs-perm-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _disk(path: Path, mode: int, owner: int = 0, group: int = 0) -> None:
    """A raw disk with two partitions full of random bytes, with the given owner and mode."""
    path.write_bytes(random.Random(7).randbytes(8 << 20))
    run(["sfdisk", "-q", str(path)], input=LAYOUT)
    assert len(sfdisk_partitions(path)) == 2
    os.chown(path, owner, group)
    os.chmod(path, mode)


def _windows(path: Path) -> dict[str, str]:
    """Expected sha256 of each exposed file, cut from the image itself."""
    data = path.read_bytes()
    out = {"disk.raw": hashlib.sha256(data).hexdigest()}
    for n, (start, length) in sfdisk_partitions(path).items():
        out[f"disk-p{n}.raw"] = hashlib.sha256(data[start:start + length]).hexdigest()
    return out


class Unchanged:
    """The image's bytes, mode and owner, checked again at the end of the ``with``."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths

    def _state(self) -> list[tuple[str, int, int, int]]:
        return [(sha256_file(p), *(lambda st: (st.st_mode, st.st_uid, st.st_gid))(os.stat(p))) for p in self.paths]

    def __enter__(self) -> "Unchanged":
        self.before = self._state()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert self._state() == self.before, "the image changed"


# -- reading: the exposed files say what the image says --------------------------------------

@needs_root
@needs_useradd
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_allow_other_reads_follow_the_image_mode(users: Users, shared_dir: Path, mode: int) -> None:
    img = shared_dir / "disk.img"
    _disk(img, mode, 0, users.gid)
    want = _windows(img)
    may_read = {users.member.name: bool(mode & 0o040), users.outsider.name: bool(mode & 0o004)}
    with Unchanged(img), mounted([img], shared_dir / "mnt", "--format", "raw", "-o", "allow_other") as m:
        for name in FILES:
            st = os.stat(m.file(name))
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode & 0o444, 0, users.gid), name
        for user in (users.member, users.outsider):
            # The user's verdict on the image itself is the verdict on every exposed file.
            direct = user.do("read", img)
            assert direct.startswith("ok") == may_read[user.name], (user.name, direct)
            for name in FILES:
                got = user.do("read", m.file(name))
                assert got == (f"ok {want[name]}" if may_read[user.name] else "EACCES"), (user.name, name, got)
                assert user.do("write", m.file(name)) in ("EACCES", "EROFS")


@needs_root
@needs_useradd
def test_writable_mount_of_a_0644_image_refuses_other_writers(users: Users, shared_dir: Path) -> None:
    img = shared_dir / "disk.img"
    _disk(img, 0o644)
    with Unchanged(img), mounted([img], shared_dir / "mnt", "--format", "raw", "-w", "-o", "allow_other") as m:
        for name in FILES:
            assert stat.S_IMODE(os.stat(m.file(name)).st_mode) == 0o644
            for user in (users.member, users.outsider):
                assert user.do("write", m.file(name)) == "EACCES", (user.name, name)
                assert user.do("read", m.file(name)).startswith("ok ")
        fd = os.open(m.file("disk-p2.raw"), os.O_RDWR)     # the mount is writable: root may
        os.close(fd)


@needs_root
@needs_useradd
def test_chain_top_decides_and_snapshot_base_decides(users: Users, shared_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    parent, child = shared_dir / "parent.vhd", shared_dir / "child.vhd"
    vhdfs("create", "--type", "dynamic", "--size", "8M", parent, check=True)
    vhdfs("create", "--parent", parent, child, check=True)
    os.chmod(parent, 0o644)
    os.chown(child, 0, users.gid)
    os.chmod(child, 0o640)
    with Unchanged(parent, child):
        with mounted([child], shared_dir / "m1", "-o", "allow_other") as m:
            st = os.stat(m.file("child.raw"))
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o440, users.gid)
            assert users.member.do("read", m.file("child.raw")).startswith("ok ")
            assert users.outsider.do("read", m.file("child.raw")) == "EACCES"
        # --snapshot: the base the user named decides (write bits included: the mount is
        # writable); the daemon's child is 0600, private.
        tmp = shared_dir / "tmp"
        tmp.mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp))
        with mounted([child], shared_dir / "m2", "--snapshot", "-o", "allow_other") as m:
            st = os.stat(m.file("child.raw"))
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, users.gid)
            assert users.member.do("read", m.file("child.raw")).startswith("ok ")
            assert users.member.do("write", m.file("child.raw")) == "EACCES"
            assert users.outsider.do("read", m.file("child.raw")) == "EACCES"
            (snap,) = tmp.iterdir()
            assert stat.S_IMODE(snap.stat().st_mode) == 0o600
            assert users.member.do("read", snap) == "EACCES"
            assert m.unmount() == 0


# -- chmod / chown --------------------------------------------------------------------------

@needs_root
@needs_useradd
def test_chmod_chown_by_owner_root_and_others(users: Users, shared_dir: Path) -> None:
    member, outsider = users.member, users.outsider
    img = shared_dir / "disk.img"
    _disk(img, 0o644, member.uid, member.gid)
    with Unchanged(img), mounted([img], shared_dir / "mnt", "--format", "raw", "-w", "-o", "allow_other") as m:
        disk, p1 = m.file("disk.raw"), m.file("disk-p1.raw")
        assert (os.stat(disk).st_uid, os.stat(disk).st_gid) == (member.uid, member.gid)
        # Another user may change nothing.
        assert outsider.do("chmod", disk, "600") == "EPERM"
        assert outsider.do("chown", disk, outsider.uid, -1) == "EPERM"
        # The owner narrows the mode: others lose access at once; the partition keeps its own.
        assert member.do("chmod", disk, "600") == "ok"
        assert stat.S_IMODE(os.stat(disk).st_mode) == 0o600
        assert outsider.do("read", disk) == "EACCES"
        assert member.do("read", disk).startswith("ok ")
        assert outsider.do("read", p1).startswith("ok ")
        # ... and may widen it again, but never give the file away or to another group.
        assert member.do("chmod", disk, "644") == "ok"
        assert member.do("chown", disk, outsider.uid, -1) == "EPERM"
        assert member.do("chown", disk, -1, users.gid) == "EPERM"
        # Root gives it away: the new owner decides, the old one no longer may.
        os.chown(disk, outsider.uid, outsider.gid)
        assert (os.stat(disk).st_uid, os.stat(disk).st_gid) == (outsider.uid, outsider.gid)
        assert member.do("chmod", disk, "600") == "EPERM"
        assert outsider.do("chmod", disk, "600") == "ok"
        assert member.do("read", disk) == "EACCES"
        os.chmod(p1, 0o400)                                  # root may chmod any file
        assert stat.S_IMODE(os.stat(p1).st_mode) == 0o400
        assert outsider.do("read", p1) == "EACCES"
        # Truncation stays refused.
        with pytest.raises(OSError) as exc:
            os.truncate(disk, 4096)
        assert exc.value.errno == errno.EPERM
    assert (stat.S_IMODE(img.stat().st_mode), img.stat().st_uid) == (0o644, member.uid)


@needs_root
@needs_useradd
def test_chmod_never_adds_write_bits_to_a_readonly_mount(users: Users, shared_dir: Path) -> None:
    member = users.member
    img = shared_dir / "disk.img"
    _disk(img, 0o664, member.uid, member.gid)
    with Unchanged(img), mounted([img], shared_dir / "mnt", "--format", "raw", "-o", "allow_other") as m:
        disk = m.file("disk.raw")
        assert stat.S_IMODE(os.stat(disk).st_mode) == 0o444
        assert member.do("chmod", disk, "644") == "EROFS"          # the VFS: a read-only mount
        # Remounted read-write behind vhdfs's back, the daemon itself still refuses.
        run(["mount", "-i", "-o", "remount,rw", str(m.path)])
        assert member.do("chmod", disk, "644") == "EROFS"
        assert member.do("chmod", disk, "466") == "EROFS"
        with pytest.raises(OSError) as exc:
            os.chmod(disk, 0o666)
        assert exc.value.errno == errno.EROFS
        assert stat.S_IMODE(os.stat(disk).st_mode) == 0o444
        assert member.do("chmod", disk, "400") == "ok"              # narrowing is fine
        assert users.outsider.do("read", disk) == "EACCES"
        with pytest.raises(OSError) as exc:
            os.open(disk, os.O_RDWR)
        assert exc.value.errno == errno.EROFS


def _users_may_open_dev_fuse() -> bool:
    try:
        return bool(os.stat("/dev/fuse").st_mode & 0o006 == 0o006)
    except OSError:
        return False


@needs_root
@needs_useradd
@pytest.mark.skipif(not _users_may_open_dev_fuse(), reason="/dev/fuse is not open to other users here")
def test_a_user_mounts_an_image_it_can_read(users: Users, shared_dir: Path) -> None:
    """Without allow_other, as before: only the mounting user gets in, and it does."""
    from mounting import REPO, force_unmount

    member = users.member
    img, mp = shared_dir / "disk.img", shared_dir / "um"
    _disk(img, 0o640, 0, users.gid)              # the member reads it through the group
    mp.mkdir()
    os.chown(mp, member.uid, member.gid)
    env = ["env", f"PYTHONPATH={REPO}", "XDG_RUNTIME_DIR="]
    vh = ["runuser", "-u", member.name, "--", *env, sys.executable, "-m", "vhdfs"]
    try:
        with Unchanged(img):
            run([*vh, "mount", "--format", "raw", str(img), str(mp)], cwd="/")
            assert member.do("read", mp / "disk-p1.raw") == f"ok {_windows(img)['disk-p1.raw']}"
            assert users.outsider.do("read", mp / "disk.raw") == "EACCES"
            run([*vh, "umount", str(mp)], cwd="/")
            # A snapshot over an image it may only read: the image's bits would refuse it the
            # writes it owns, so the file is the member's alone (the fallback of aio/access).
            vdisk = shared_dir / "base.vhd"
            vhdfs("create", "--type", "dynamic", "--size", "8M", vdisk, check=True)
            os.chown(vdisk, 0, users.gid)
            os.chmod(vdisk, 0o640)
            run([*vh, "mount", "--snapshot", str(vdisk), str(mp)], cwd="/")
            assert member.do("stat", mp / "base.raw") == f"ok 600 {member.uid}"
            assert member.do("write", mp / "base.raw") == "ok"
            run([*vh, "umount", str(mp)], cwd="/")
        folder = Path(tempfile.gettempdir()) / f"vhdfs-{member.uid}"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        force_unmount(mp)
        shutil.rmtree(Path(tempfile.gettempdir()) / f"vhdfs-{member.uid}", ignore_errors=True)


# -- state files ----------------------------------------------------------------------------

@needs_root
@needs_useradd
def test_state_folder_and_files_are_private(users: Users, shared_dir: Path) -> None:
    from vhdfs.service import state

    img, mp = shared_dir / "disk.img", shared_dir / "bg"
    _disk(img, 0o600)
    mp.mkdir()
    folder = state.state_dir()
    os.chmod(folder, 0o755)                      # as an older vhdfs left it: made private again
    try:
        res = vhdfs("mount", "--format", "raw", "-o", "allow_other", img, mp)
        assert res.returncode == 0, res.stderr
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        for suffix in (".json", ".log"):
            st = os.stat(state.path_for(str(mp), suffix))
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0), suffix
        assert users.outsider.do("list", folder) == "EACCES"
        assert users.outsider.do("read", state.path_for(str(mp), ".json")) == "EACCES"
        assert vhdfs("umount", mp).returncode == 0
    finally:
        from mounting import force_unmount
        force_unmount(mp)


# -- the rule itself, without a mount ---------------------------------------------------------

def _st(mode: int, uid: int = 1000, gid: int = 1000) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_exposed_access_rule() -> None:
    root = {"uid": 0, "gid": 0}
    assert exposed_access(_st(0o640), False, **root) == Access(0o440, 1000, 1000)
    assert exposed_access(_st(0o640), True, **root) == Access(0o640, 1000, 1000)
    assert exposed_access(_st(0o4755), True, **root) == Access(0o644, 1000, 1000)   # no x, no set-id
    assert exposed_access(_st(0o444), True, **root) == Access(0o444, 1000, 1000)    # no w the image lacks
    # A non-root daemon that may use the image gets its bits as they are ...
    assert exposed_access(_st(0o640), False, uid=2000, gid=5, groups=[1000]) == Access(0o440, 1000, 1000)
    assert exposed_access(_st(0o604), False, uid=2000, gid=5) == Access(0o404, 1000, 1000)
    # ... and when those bits would refuse it what it demonstrably has (an ACL, a snapshot over
    # a base it may only read), the file is its alone.
    assert exposed_access(_st(0o600), False, uid=2000, gid=5) == Access(0o400, 2000, 5)
    assert exposed_access(_st(0o644), True, uid=2000, gid=5) == Access(0o600, 2000, 5)
    assert socket_mode(Access(0o440, 0, 0)) == 0o660


def test_changed_rule() -> None:
    cur = Access(0o644, 1000, 1000)
    assert changed(cur, 1000, True, mode=0o100600) == Access(0o600, 1000, 1000)
    assert changed(cur, 1000, True, mode=0o6644) == Access(0o644, 1000, 1000)      # set-id dropped
    assert changed(cur, 0, True, uid=7, gid=8) == Access(0o644, 7, 8)
    assert changed(cur, 1000, True, uid=1000, gid=1000) == cur                      # no change
    for caller, kw, err in ((1001, {"mode": 0o600}, errno.EPERM), (1000, {"uid": 1001}, errno.EPERM),
                            (1000, {"gid": 1001}, errno.EPERM), (1000, {"mode": 0o640}, None)):
        if err is None:
            changed(cur, caller, True, **kw)
            continue
        with pytest.raises(OSError) as exc:
            changed(cur, caller, True, **kw)
        assert exc.value.errno == err
    ro = Access(0o444, 1000, 1000)
    for caller in (0, 1000):
        with pytest.raises(OSError) as exc:
            changed(ro, caller, False, mode=0o644)
        assert exc.value.errno == errno.EROFS
    assert changed(ro, 1000, False, mode=0o400) == Access(0o400, 1000, 1000)


async def test_setattr_applies_the_rule_itself() -> None:
    """The daemon checks the caller even though the kernel (default_permissions) does too."""
    import pyfuse3
    import trio

    from vhdfs.aio.export import Export
    from vhdfs.aio.image import AsyncImage
    from vhdfs.fs.operations import VhdfsOperations

    class Img:
        path, size, chain, backing, file = "/fake.img", 1 << 20, [], None, None

    f = Export("x.raw", AsyncImage(Img(), False, trio.CapacityLimiter(1)),  # type: ignore[arg-type]
               access=Access(0o644 & 0o444, 1000, 1000))
    ops = VhdfsOperations([f])
    ino = pyfuse3.ROOT_INODE + 1
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o400
    # pyfuse3's SetattrFields cannot be built from Python; setattr reads only these.
    fields = SimpleNamespace(update_mode=True, update_uid=False, update_gid=False, update_size=False)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setattr(ino, attr, fields, None, SimpleNamespace(uid=1001, gid=1001))
    assert exc.value.errno == errno.EPERM
    assert (await ops.getattr(ino)).st_mode == stat.S_IFREG | 0o444
    entry = await ops.setattr(ino, attr, fields, None, SimpleNamespace(uid=1000, gid=1000))
    assert (entry.st_mode, entry.st_uid, entry.st_gid) == (stat.S_IFREG | 0o400, 1000, 1000)
    attr.st_mode = stat.S_IFREG | 0o600
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setattr(ino, attr, fields, None, SimpleNamespace(uid=0, gid=0))
    assert exc.value.errno == errno.EROFS
