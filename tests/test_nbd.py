"""``vhdfs serve``: images over NBD through nbdkit and the vhdfs plugin, read by real clients
(libnbd's nbdinfo/nbdcopy and Python binding, qemu-img). Every server is stopped in a finally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import corpus_entries
from mounting import VHDFS, run, vhdfs

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("nbdinfo") is None,
                       reason="nbdkit and libnbd-bin are not installed (scripts/install.sh)"),
]

MiB = 1 << 20
DIST = "/usr/lib/python3/dist-packages"   # Debian's python3-libnbd (same 3.11 ABI as the venv)


def nbd_module():
    if DIST not in sys.path:
        sys.path.append(DIST)
    try:
        import nbd
    except ImportError:
        pytest.skip("python3-libnbd is not installed")
    return nbd


class Server:
    def __init__(self, proc: subprocess.Popen, sock: Path, log: Path) -> None:
        self.proc, self.sock, self.log_path = proc, sock, log

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def connect(self, export: str = ""):
        h = nbd_module().NBD()
        h.set_export_name(export)
        h.connect_unix(str(self.sock))
        return h


@contextlib.contextmanager
def served(tmp: Path, *args: str | os.PathLike[str], sock_name: str = "s.sock") -> Iterator[Server]:
    """``vhdfs serve -f ... --unix SOCK`` until it writes its pidfile; SIGTERM in the finally."""
    sock, pidfile, log = tmp / sock_name, tmp / f"{sock_name}.pid", tmp / f"{sock_name}.log"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*VHDFS, "serve", "-f", "--unix", str(sock), "--pidfile", str(pidfile),
                                 *map(str, args)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    server = Server(proc, sock, log)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{server.log()}"
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not sock.exists(), "the socket outlived the server"


def nbd_map(uri: str) -> list[tuple[int, int, str]]:
    out = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["description"]) for e in out]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create(path: Path, size: str = "64M", *extra: str) -> Path:
    vhdfs("create", "--size", size, *extra, path, check=True)
    return path


def write_with_vhdfs(path: Path, writes: dict[int, bytes]) -> None:
    from vhdfs.block import open_image

    with open_image(path, True) as img:
        for off, data in writes.items():
            img.write(off, data)


def read_with_vhdfs(path: Path, off: int = 0, n: int | None = None) -> bytes:
    from vhdfs.block import open_image

    with open_image(path) as img:
        return img.read(off, img.size - off if n is None else n)


def qemu_raw(path: Path, out: Path) -> bytes:
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


# -- block status ------------------------------------------------------------------------------

def test_map_shows_holes_where_nothing_is_allocated(tmp_path: Path) -> None:
    img = create(tmp_path / "d.vhd")
    write_with_vhdfs(img, {10 * MiB + 5: b"a" * 100, 40 * MiB: b"b" * (3 * MiB)})
    with served(tmp_path, img) as s:
        runs = [(o, n, d) for o, n, d in nbd_map(s.uri()) if d == "data"]
        # 2 MiB blocks: [10, 12) and [40, 44) MiB hold data; everything else is a hole
        assert runs == [(10 * MiB, 2 * MiB, "data"), (40 * MiB, 4 * MiB, "data")]
        holes = sum(n for o, n, d in nbd_map(s.uri()) if d == "hole,zero")
        assert holes == 64 * MiB - 6 * MiB
        assert s.stop() == 0


# -- corpus and chains, read by every client -----------------------------------------------------

@pytest.fixture(scope="module")
def corpus_server(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("nbdcorpus")
    images = [corpus_dir / e["image"] for e in corpus_entries()]
    with served(tmp, *images) as s:
        yield s
        assert s.stop() == 0


@pytest.mark.parametrize("entry", corpus_entries(), ids=lambda e: e["image"])
def test_nbdcopy_corpus_image_to_manifest_sha(corpus_server: Server, entry: dict, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    run(["nbdcopy", corpus_server.uri(Path(entry["image"]).stem), str(out)])
    assert out.stat().st_size == entry["expected_raw"]["size"]
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    assert h.hexdigest() == entry["expected_raw"]["sha256"]


def test_differencing_chain_and_qemu_img_compare(corpus_server: Server, corpus_dir: Path, tmp_path: Path) -> None:
    """xo-child2 (child of child1 of base) over NBD equals vhdfs's own flat read; qemu-img reads
    it over nbd+unix and converts it; and the map is not one big data run."""
    flat = tmp_path / "flat.raw"
    flat.write_bytes(read_with_vhdfs(corpus_dir / "xo-child2.vhd"))
    uri = corpus_server.uri("xo-child2")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(flat)])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(tmp_path / "c.qcow2")])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "c.qcow2"), str(flat)])
    assert any(d == "hole,zero" for _o, _n, d in nbd_map(uri))


def test_partition_export_is_the_partition(corpus_server: Server, corpus_dir: Path) -> None:
    from vhdfs.block import open_image
    from vhdfs.block.partitions import find_partitions

    with open_image(corpus_dir / "qemu-dynamic-gpt-fat32-ext4.vhd") as img:
        parts = find_partitions(img)
        assert parts
        p = parts[-1]
        want = img.read(p.start, p.length)
    h = corpus_server.connect(f"qemu-dynamic-gpt-fat32-ext4-p{p.number}")
    try:
        assert h.get_size() == p.length
        assert h.pread(len(want), 0) == want
    finally:
        h.shutdown()


def test_many_clients_at_once_read_the_same_bytes(corpus_server: Server, corpus_dir: Path) -> None:
    want = read_with_vhdfs(corpus_dir / "xo-child2.vhd")
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            h = corpus_server.connect("xo-child2")
            try:
                assert h.can_multi_conn() and h.is_read_only()
                rnd = random.Random(seed)
                for _ in range(150):
                    off = rnd.randrange(0, len(want) - 1)
                    n = min(rnd.choice((512, 4096, 65536, 3 * MiB)), len(want) - off)
                    assert h.pread(n, off) == want[off:off + n]
            finally:
                h.shutdown()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


# -- writing -----------------------------------------------------------------------------------------

def test_writes_and_trims_read_back_by_qemu_and_vhdfs(tmp_path: Path) -> None:
    img = create(tmp_path / "w.vhd")
    write_with_vhdfs(img, {0: os.urandom(8 * MiB)})
    shadow = bytearray(read_with_vhdfs(img))
    rnd = random.Random(7)
    with served(tmp_path, "-w", img) as s:
        h = s.connect()
        assert not h.is_read_only() and h.can_trim() and h.can_zero() and h.can_fua()
        for _ in range(40):
            off, n = rnd.randrange(0, 64 * MiB - 70000), rnd.randrange(1, 70000)
            data = rnd.randbytes(n)
            h.pwrite(data, off)
            shadow[off:off + n] = data
        h.trim(4 * MiB, 2 * MiB)                      # whole blocks: released
        shadow[2 * MiB:6 * MiB] = bytes(4 * MiB)
        h.trim(1000, 7 * MiB + 3)                     # partial: zeroed
        shadow[7 * MiB + 3:7 * MiB + 1003] = bytes(1000)
        h.zero(MiB, 30 * MiB)
        shadow[30 * MiB:31 * MiB] = bytes(MiB)
        h.pwrite(b"fua!", 50 * MiB, nbd_module().CMD_FLAG_FUA)
        shadow[50 * MiB:50 * MiB + 4] = b"fua!"
        h.flush()
        assert h.pread(64 * MiB, 0) == shadow
        released = [(o, n) for o, n, d in nbd_map(s.uri()) if d == "hole,zero"]
        assert any(o <= 2 * MiB and o + n >= 6 * MiB for o, n in released), released
        h.shutdown()
        assert s.stop() == 0
    assert qemu_raw(img, tmp_path / "q.raw") == shadow
    assert read_with_vhdfs(img) == shadow


def test_trim_in_a_differencing_child_reads_zeros_not_the_parent(tmp_path: Path) -> None:
    base = create(tmp_path / "base.vhd", "16M")
    write_with_vhdfs(base, {0: b"\xab" * (16 * MiB)})
    child = tmp_path / "child.vhd"
    vhdfs("create", "--type", "differencing", "--parent", base, child, check=True)
    before = base.read_bytes()
    with served(tmp_path, "-w", child) as s:
        h = s.connect()
        h.trim(2 * MiB, 4 * MiB)
        h.trim(100, 9 * MiB)
        assert h.pread(2 * MiB, 4 * MiB) == bytes(2 * MiB)
        assert h.pread(100, 9 * MiB) == bytes(100)
        assert h.pread(10, 9 * MiB + 100) == b"\xab" * 10
        h.shutdown()
        assert s.stop() == 0
    flat = read_with_vhdfs(child)
    assert flat[4 * MiB:6 * MiB] == bytes(2 * MiB) and flat[9 * MiB:9 * MiB + 100] == bytes(100)
    assert flat[:4 * MiB] == b"\xab" * (4 * MiB)
    assert base.read_bytes() == before


def test_many_writers_on_one_export(tmp_path: Path) -> None:
    """Six connections allocate blocks in parallel (PARALLEL thread model, the block layer's
    write rule); the image is consistent for qemu-img afterwards."""
    img = create(tmp_path / "m.vhd")
    chunks = {i: random.Random(i).randbytes(MiB + 4096) for i in range(24)}
    errors: list[BaseException] = []
    with served(tmp_path, "-w", img) as s:
        def writer(k: int) -> None:
            try:
                h = s.connect()
                for i in range(k, 24, 6):
                    h.pwrite(chunks[i], i * 2 * MiB + 512 * k)
                h.flush()
                h.shutdown()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert s.stop() == 0
    raw = qemu_raw(img, tmp_path / "q.raw")
    for i, data in chunks.items():
        off = i * 2 * MiB + 512 * (i % 6)
        assert raw[off:off + len(data)] == data


def test_second_writer_is_refused(tmp_path: Path) -> None:
    img = create(tmp_path / "d.vhd", "8M")
    with served(tmp_path, "-w", img):
        res = vhdfs("serve", "-w", "--unix", tmp_path / "other.sock", img)
        assert res.returncode == 4 and "in use" in res.stderr
        assert not (tmp_path / "other.sock").exists()


# -- refusing, surviving -------------------------------------------------------------------------------

def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    nbd = nbd_module()
    img = create(tmp_path / "r.vhd", "8M")
    write_with_vhdfs(img, {0: b"keep"})
    before = img.read_bytes()
    with served(tmp_path, img) as s:
        h = s.connect()
        assert h.is_read_only() and not h.can_trim()
        for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
            with pytest.raises(nbd.Error):
                op()
        assert h.pread(4, 0) == b"keep"
        h.shutdown()
        assert s.stop() == 0
    assert img.read_bytes() == before


def test_reads_past_the_end_fail_and_the_server_keeps_serving(tmp_path: Path) -> None:
    nbd = nbd_module()
    img = create(tmp_path / "e.vhd", "8M")
    with served(tmp_path, img) as s:
        h = s.connect()
        with pytest.raises(nbd.Error):
            h.pread(4096, 8 * MiB - 512)
        with pytest.raises(nbd.Error):
            h.pread(512, 1 << 40)
        assert h.pread(512, 8 * MiB - 512) == bytes(512)
        with pytest.raises(nbd.Error):
            s.connect("no-such-export")
        h2 = s.connect()
        assert h2.get_size() == 8 * MiB
        h2.shutdown()
        h.shutdown()
        assert s.stop() == 0


VANISH = r"""
import os, sys
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(16 << 20)))
for i in range(3):
    h.aio_pwrite(buf, i * (16 << 20))
os._exit(0)    # gone mid-write: no flush, no disconnect
"""


def test_client_vanishing_mid_write_does_not_kill_the_server(tmp_path: Path) -> None:
    img = create(tmp_path / "v.vhd")
    with served(tmp_path, "-w", img) as s:
        h = s.connect()
        h.pwrite(b"acknowledged", 60 * MiB)
        h.flush()
        for _ in range(3):
            subprocess.run([sys.executable, "-c", VANISH, str(s.sock)], timeout=60)
        assert s.proc.poll() is None
        assert h.pread(12, 60 * MiB) == b"acknowledged"
        h.shutdown()
        assert s.stop() == 0
    assert read_with_vhdfs(img, 60 * MiB, 12) == b"acknowledged"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(img), str(tmp_path / "q.raw")])


def test_sigterm_exits_0_and_unflushed_writes_are_durable(tmp_path: Path) -> None:
    img = create(tmp_path / "t.vhd")
    data = os.urandom(5 * MiB)
    with served(tmp_path, "-w", img) as s:
        h = s.connect()
        h.pwrite(data, 9 * MiB + 7)      # no flush: the server's shutdown must make it durable
        h.shutdown()
        assert s.stop() == 0, s.log()
    assert qemu_raw(img, tmp_path / "q.raw")[9 * MiB + 7:14 * MiB + 7] == data


def test_snapshot_keeps_the_image_unchanged(tmp_path: Path) -> None:
    img = create(tmp_path / "base.vhd", "8M")
    before = img.read_bytes()
    kept = tmp_path / "kept.vhd"
    with served(tmp_path, "--snapshot", "--keep", kept, img) as s:
        h = s.connect("base")
        assert not h.is_read_only()
        h.pwrite(b"child", 0)
        h.flush()
        h.shutdown()
        assert s.stop() == 0
    assert img.read_bytes() == before
    assert read_with_vhdfs(kept, 0, 5) == b"child"
    leftovers = list(Path(os.environ.get("TMPDIR") or "/var/tmp").glob("vhdfs-snapshot-base-*"))
    with served(tmp_path, "--snapshot", img) as s:
        h = s.connect()
        h.pwrite(b"gone", 0)
        h.shutdown()
        assert s.stop() == 0
    assert list(Path(os.environ.get("TMPDIR") or "/var/tmp").glob("vhdfs-snapshot-base-*")) == leftovers


# -- the command line ------------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    (tmp_path / "junk.vhd").write_bytes(b"not an image" * 100)
    res = vhdfs("serve", "--unix", sock, tmp_path / "junk.vhd")
    assert res.returncode == 3 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = vhdfs("serve", "--port", "10809", "--bind", "0.0.0.0", tmp_path / "junk.vhd")
    assert res.returncode == 2 and "--tls-psk" in res.stderr
    res = vhdfs("serve", "--unix", sock, "--keep", tmp_path / "k.vhd", tmp_path / "junk.vhd")
    assert res.returncode == 2
    assert not sock.exists()


def test_background_serve_returns_once_clients_can_connect(tmp_path: Path) -> None:
    img = create(tmp_path / "bg.vhd", "8M")
    sock = tmp_path / "bg.sock"
    res = vhdfs("serve", "--unix", sock, "--pidfile", tmp_path / "bg.pid", img)
    assert res.returncode == 0, res.stderr
    pid = int((tmp_path / "bg.pid").read_text())
    try:
        assert res.stdout.startswith(f"nbd+unix:///bg?socket={sock}")
        assert json.loads(run(["nbdinfo", "--json", f"nbd+unix:///?socket={sock}"]).stdout)["exports"][0]["export-size"] == 8 * MiB
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
    assert not sock.exists()


def test_tls_psk_is_required_when_given(tmp_path: Path) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    psk.chmod(0o600)
    img = create(tmp_path / "t.vhd", "8M")
    with served(tmp_path, "--tls-psk", psk, img) as s:
        plain = run(["nbdinfo", "--size", s.uri()], check=False)
        assert plain.returncode != 0
        tls = run(["nbdinfo", "--size", f"nbds+unix://alice@/?socket={s.sock}&tls-psk-file={psk}"])
        assert tls.stdout.strip() == str(8 * MiB)
        assert s.stop() == 0


def test_systemd_unit_execstart_sends_ready_and_stops_clean(tmp_path: Path) -> None:
    """The unit's ExecStart, expanded as systemd does, says READY=1 once nbdkit serves and exits
    0 on SIGTERM."""
    import select
    import socket

    from test_fstab_systemd import _expand

    unit = Path(__file__).resolve().parent.parent / "systemd" / "vhdfs-serve@.service"
    lines = dict(ln.split("=", 1) for ln in unit.read_text().splitlines() if "=" in ln and not ln.startswith("#"))
    assert lines["Type"] == "notify"
    img = create(tmp_path / "u.vhd", "8M")
    sock = tmp_path / "u.sock"
    argv = _expand(lines["ExecStart"], {"IMAGES": str(img), "LISTEN": f"--unix {sock}", "OPTIONS": "-w"})
    assert argv[0] == "vhdfs"
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        proc = subprocess.Popen([*VHDFS, *argv[1:]], env=dict(os.environ, NOTIFY_SOCKET=str(notify)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline and proc.poll() is None, "no READY=1"
                if select.select([ns], [], [], 0.05)[0] and "READY=1" in ns.recv(4096).decode().split("\n"):
                    break
            res = run(["nbdinfo", "--can", "write", f"nbd+unix:///?socket={sock}"], check=False)
            assert res.returncode == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not sock.exists()


def test_kill9_loses_no_write_older_than_the_commit_interval(tmp_path: Path) -> None:
    """The committer writes new blocks' BAT entries within ~1 s: after kill -9 of nbdkit, a
    write (never flushed) from 3 s before is in the image."""
    img = create(tmp_path / "k.vhd")
    data = os.urandom(3 * MiB)
    with served(tmp_path, "-w", img) as s:
        h = s.connect()
        h.pwrite(data, 20 * MiB)
        time.sleep(3)
        nbdkit_pid = next(_children(s.proc.pid))
        os.kill(nbdkit_pid, signal.SIGKILL)
        assert s.proc.wait(30) != 0      # the server says it did not stop cleanly
    assert qemu_raw(img, tmp_path / "q.raw")[20 * MiB:23 * MiB] == data


def _children(pid: int) -> Iterator[int]:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    yield int(p.name)


@pytest.mark.parametrize("image_mode, socket_mode", [(0o600, 0o600), (0o640, 0o660), (0o644, 0o666)])
def test_socket_is_never_more_reachable_than_the_image(tmp_path: Path, image_mode: int,
                                                       socket_mode: int) -> None:
    """Issue 13's rule on the NBD side: connecting to a Unix socket needs write permission, so
    every class that may read the image gets rw on the socket, and nobody else anything."""
    img = create(tmp_path / "d.vhd")
    os.chown(img, 1234, 4321)
    img.chmod(image_mode)
    with served(tmp_path, img) as s:
        st = s.sock.stat()
        assert stat.S_IMODE(st.st_mode) == socket_mode
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        assert s.stop() == 0
