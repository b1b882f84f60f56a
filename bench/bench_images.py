"""The benchmark's images, built once per size under bench/work/ (gitignored) and reused.

* ``base.raw``: SIZE bytes of content that is not zeros (random 1 MiB pieces, each tagged with
  its offset), the "bare file" of every read row;
* ``dyn.vhd`` / ``fixed.vhd`` / ``disk.vdi``: ``qemu-img convert`` of it (fully written);
* ``c1.vhd`` ... ``c8.vhd``: a differencing chain over ``dyn.vhd`` (``vhdfs create --parent``),
  each level rewriting a scattered 10 % in 64 KiB pieces through a ``vhdfs mount -w``; the same
  writes go into ``d1.raw`` / ``d8.raw``, so chains of depth 1 and 8 have a raw twin too;
* ``sparse.vhd``: a 2040 GiB (the VHD maximum) dynamic VHD with a few blocks written
  (``qemu-io``), and ``sparse.raw``, its sparse raw twin.

Every artifact is written under a temporary name and renamed when complete, so an interrupted
build is redone rather than trusted.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VHDFS = os.path.join(ROOT, ".venv", "bin", "vhdfs")
MiB = 1 << 20
SPARSE_SIZE = 2040 << 30          # the largest VHD: "2 TiB" in the issue
SPARSE_WRITES = [(0, 0x5A, 2 * MiB), (1 << 40, 0xA5, 2 * MiB), (SPARSE_SIZE - MiB, 0x33, MiB)]
SPARSE_PROBE = 1 << 40             # an allocated offset for time-to-first-byte
SPARSE_VHDX_SIZE = 64 << 40        # the largest VHDX: "64 TiB" in issue 10
# 64 TiB sparse VHDX: key -> block size (its BAT is 16 MiB at 32 MiB blocks, 512 MiB at 1 MiB)
SPARSE_VHDX = {"sparsex": 32 * MiB, "sparsex1m": 1 * MiB}
USER_DISK_SIZE = 512 * MiB         # the partitioned disk of the user workloads (issue 14)
USER_EXT4_SRC = "/usr/share/doc"   # a few thousand real files, copied in by mke2fs -d
USER_NTFS_SRC = "/usr/lib/python3"
PIECE = 64 << 10                   # granularity of the scattered rewrites in the chain
CHAIN_DEPTH = 8


@dataclass
class Image:
    key: str
    path: str
    fmt: str                  # vhd | vdi | vhdx | raw
    size: int
    raw: str | None = None    # a raw file with the same content (bare file / passthrough)
    parent: str | None = None
    depth: int = 0            # differencing levels above the base image
    note: str = ""


def run(cmd: list[str], timeout: float = 600) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return p.stdout


def _fill_raw(path: str, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    pool = rng.randbytes(16 * MiB)
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            start = rng.randrange(0, 15 * MiB)
            chunk = bytearray(pool[start:start + MiB])
            chunk[:16] = off.to_bytes(8, "little") * 2
            f.write(chunk[:min(MiB, size - off)])
        f.flush()
        os.fsync(f.fileno())


def _atomic(path: str, build) -> None:
    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    for p in (tmp,):
        if os.path.exists(p):
            os.unlink(p)
    build(tmp)
    os.rename(tmp, path)


def _level_writes(level: int, size: int) -> list[tuple[int, bytes]]:
    """Level ``level``'s scattered 10 %: 64 KiB pieces at distinct random offsets."""
    rng = random.Random(1000 + level)
    n = size // PIECE // 10
    offsets = rng.sample(range(size // PIECE), n)
    fill = rng.randbytes(PIECE * 4)
    out = []
    for i, o in enumerate(sorted(offsets)):
        s = (i * 4099) % (PIECE * 3)
        out.append((o * PIECE, fill[s:s + PIECE]))
    return out


def vhdfs_cli_ready() -> str | None:
    """None when ``vhdfs create`` and ``vhdfs mount`` work, else why not."""
    if not os.access(VHDFS, os.X_OK):
        return "vhdfs not installed"
    for sub in ("create", "mount", "umount"):
        p = subprocess.run([VHDFS, sub, "--help"], capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or "usage" not in p.stdout:
            return f"`vhdfs {sub}` not available"
    return None


def _write_level(child: str, level: int, size: int, ref_raws: list[str],
                 writes: list[tuple[int, bytes]] | None = None) -> None:
    """Rewrite a scattered 10 % of ``child`` through a writable vhdfs mount (and of ref_raws);
    or ``writes`` when given."""
    mnt = tempfile.mkdtemp(prefix="build.", dir=os.path.dirname(child))
    try:
        run([VHDFS, "mount", "-w", child, mnt], timeout=120)
        try:
            raw = os.path.join(mnt, os.path.splitext(os.path.basename(child))[0] + ".raw")
            if writes is None:
                writes = _level_writes(level, size)
            fds = [os.open(raw, os.O_WRONLY)] + [os.open(r, os.O_WRONLY) for r in ref_raws]
            try:
                for off, data in writes:
                    for fd in fds:
                        os.pwrite(fd, data, off)
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            run([VHDFS, "umount", mnt], timeout=120)
    finally:
        os.rmdir(mnt)


class ImageSet:
    def __init__(self, root: str, size: int, log=print) -> None:
        self.size = size
        self.dir = os.path.join(root, f"{size // MiB}M")
        self.log = log
        os.makedirs(self.dir, exist_ok=True)
        self.images: dict[str, Image] = {}
        self.notes: dict[str, str] = {}

    def p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def build(self) -> dict[str, Image]:
        t0 = time.monotonic()
        size = self.size
        base = self.p("base.raw")
        _atomic(base, lambda t: _fill_raw(t, size))
        for name, sub in (("dyn.vhd", "dynamic"), ("fixed.vhd", "fixed")):
            _atomic(self.p(name), lambda t, sub=sub: run(
                ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                 f"subformat={sub},force_size=on", base, t]))
        _atomic(self.p("disk.vdi"), lambda t: run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vdi", base, t]))
        self.images["dyn"] = Image("dyn", self.p("dyn.vhd"), "vhd", size, raw=base)
        self.images["fixed"] = Image("fixed", self.p("fixed.vhd"), "vhd", size, raw=base)
        self.images["vdi"] = Image("vdi", self.p("disk.vdi"), "vdi", size, raw=base)
        self._build_sparse()
        self._build_chain()
        self._build_vhdx()
        self.log(f"images: ready in {self.dir} ({time.monotonic() - t0:.1f} s)")
        return self.images

    def _build_sparse(self) -> None:
        def vhd(t: str) -> None:
            run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on",
                 t, str(SPARSE_SIZE)])
            cmds = []
            for off, pat, n in SPARSE_WRITES:
                cmds += ["-c", f"write -q -P {pat} {off} {n}"]
            run(["qemu-io", "-f", "vpc", *cmds, t])

        def raw(t: str) -> None:
            with open(t, "wb") as f:
                f.truncate(SPARSE_SIZE)
                for off, pat, n in SPARSE_WRITES:
                    os.pwrite(f.fileno(), bytes([pat]) * n, off)

        _atomic(self.p("sparse.vhd"), vhd)
        _atomic(self.p("sparse.raw"), raw)
        self.images["sparse"] = Image("sparse", self.p("sparse.vhd"), "vhd", SPARSE_SIZE,
                                      raw=self.p("sparse.raw"))

    def _build_chain(self) -> None:
        done = self.p("chain.ok")
        names = [self.p(f"c{i}.vhd") for i in range(1, CHAIN_DEPTH + 1)]
        if not os.path.exists(done):
            why = vhdfs_cli_ready()
            if why:
                self.notes["chain"] = f"not built: {why}"
                self.log(f"images: differencing chain not built ({why})")
                return
            self.log("images: building the differencing chain (vhdfs create + vhdfs mount -w)")
            for p in names + [self.p("d1.raw"), self.p("d8.raw"), done]:
                if os.path.exists(p):
                    os.unlink(p)
            try:
                for r in ("d1.raw", "d8.raw"):
                    shutil.copyfile(self.p("base.raw"), self.p(r))
                parent = self.p("dyn.vhd")
                for level, child in enumerate(names, 1):
                    run([VHDFS, "create", "--type", "differencing", "--parent", parent, child])
                    refs = [self.p("d8.raw")] + ([self.p("d1.raw")] if level == 1 else [])
                    _write_level(child, level, self.size, refs)
                    parent = child
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                self.notes["chain"] = f"not built: {e}"
                self.log(f"images: differencing chain failed: {e}")
                return
            with open(done, "w") as f:
                f.write("ok\n")
        self.images["diff1"] = Image("diff1", names[0], "vhd", self.size, raw=self.p("d1.raw"),
                                     parent=self.p("dyn.vhd"), depth=1)
        self.images["diff8"] = Image("diff8", names[-1], "vhd", self.size, raw=self.p("d8.raw"),
                                     parent=names[-2], depth=CHAIN_DEPTH)

    def _build_vhdx(self) -> None:
        """VHDX beside the VHD rows (issue 10): ``dyn.vhdx`` (``vhdfs convert``, Hyper-V's
        defaults: 32 MiB blocks), ``qdyn.vhdx`` (``qemu-img convert``: QEMU's own layout, 512-byte
        sectors), ``dx1.vhdx`` (a differencing child over dyn.vhdx with level 1's writes, raw twin
        ``dx1.raw``), and two 64 TiB sparse dynamic VHDX (32 MiB and 1 MiB blocks)."""
        why = vhdfs_cli_ready()
        if why:
            self.notes["vhdx"] = f"not built: {why}"
            return
        base, size = self.p("base.raw"), self.size
        try:
            _atomic(self.p("dyn.vhdx"), lambda t: run(
                [VHDFS, "convert", "-q", "--from", "raw", "--to", "vhdx", base, t]))
            _atomic(self.p("qdyn.vhdx"), lambda t: run(
                ["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                 base, t]))
            self.images["dynx"] = Image("dynx", self.p("dyn.vhdx"), "vhdx", size, raw=base)
            self.images["qdynx"] = Image("qdynx", self.p("qdyn.vhdx"), "vhdx", size, raw=base)
            if not os.path.exists(self.p("dx1.ok")):
                for p in (self.p("dx1.vhdx"), self.p("dx1.raw")):
                    if os.path.exists(p):
                        os.unlink(p)
                shutil.copyfile(base, self.p("dx1.raw"))
                run([VHDFS, "create", "--format", "vhdx", "--type", "differencing", "--parent",
                     self.p("dyn.vhdx"), self.p("dx1.vhdx")])
                _write_level(self.p("dx1.vhdx"), 1, size, [self.p("dx1.raw")])
                open(self.p("dx1.ok"), "w").close()
            self.images["dx1"] = Image("dx1", self.p("dx1.vhdx"), "vhdx", size,
                                       raw=self.p("dx1.raw"), parent=self.p("dyn.vhdx"), depth=1)
            for key, bs in SPARSE_VHDX.items():
                def build(t: str, bs: int = bs) -> None:
                    run([VHDFS, "create", "--format", "vhdx", "--type", "dynamic", "--size",
                         str(SPARSE_VHDX_SIZE), "--block-size", str(bs), t])
                    # _write_level serves the file under the final name's stem: write via a link
                    tmp = t + ".vhdx"
                    os.rename(t, tmp)
                    try:
                        _write_level(tmp, 0, SPARSE_VHDX_SIZE, [], writes=[
                            (off, bytes([pat]) * n) for off, pat, n in SPARSE_WRITES[:2]])
                    finally:
                        os.rename(tmp, t)
                _atomic(self.p(f"{key}.vhdx"), build)
                # no raw twin: ext4 files stop at 16 TiB
                self.images[key] = Image(key, self.p(f"{key}.vhdx"), "vhdx", SPARSE_VHDX_SIZE)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            self.notes["vhdx"] = f"not built: {e}"
            self.log(f"images: VHDX images failed: {e}")

    def user_disk(self, log=None) -> Image:
        """A 512 MiB GPT disk made by other tools (issue 14): partition 1 ext4 filled by
        ``mke2fs -d`` from /usr/share/doc, partition 2 NTFS (``mkntfs``, filled through ``ntfs-3g``
        from /usr/lib/python3); ``user.raw`` and its ``qemu-img convert`` ``user.vhd``."""
        d = os.path.join(os.path.dirname(self.dir), "user")
        os.makedirs(d, exist_ok=True)
        raw, vhd = os.path.join(d, "user.raw"), os.path.join(d, "user.vhd")

        def build_raw(t: str) -> None:
            with open(t, "wb") as f:
                f.truncate(USER_DISK_SIZE)
            subprocess.run(["sfdisk", "-q", "-X", "gpt", t], check=True, capture_output=True,
                           input=b"start=2048, size=557056, type=L\nstart=559104, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
            p1 = t + ".p1"
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", USER_EXT4_SRC, p1, "272M"])
            run(["dd", f"if={p1}", f"of={t}", "bs=1M", "seek=1", "conv=notrunc,sparse"])
            os.unlink(p1)
            p2 = t + ".p2"
            n2 = USER_DISK_SIZE - 559104 * 512 - 34 * 512
            with open(p2, "wb") as f:
                f.truncate(n2 // 4096 * 4096)
            run(["mkntfs", "-q", "-F", "-Q", "-p", "559104", "-H", "255", "-S", "63", p2])
            mnt = tempfile.mkdtemp(prefix="ntfs.", dir=d)
            try:
                run(["ntfs-3g", p2, mnt])
                try:
                    run(["cp", "-r", USER_NTFS_SRC, mnt + "/"])
                finally:
                    run(["umount", mnt])
            finally:
                os.rmdir(mnt)
            run(["dd", f"if={p2}", f"of={t}", "bs=512", "seek=559104", "conv=notrunc,sparse"])
            os.unlink(p2)

        _atomic(raw, build_raw)
        _atomic(vhd, lambda t: run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                                    "subformat=dynamic,force_size=on", raw, t]))
        img = Image("user", vhd, "vhd", USER_DISK_SIZE, raw=raw)
        img.note = "p1 ext4 at 1 MiB, p2 NTFS at sector 559104"
        return img

    # -- fresh images for the write rows ---------------------------------------------------

    def fresh_dynamic(self, scratch: str, tag: str) -> Image:
        path = os.path.join(scratch, f"new-{tag}.vhd")
        raw = os.path.join(scratch, f"new-{tag}.rawfile")
        for p in (path, raw):
            if os.path.exists(p):
                os.unlink(p)
        run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on",
             path, str(self.size)])
        with open(raw, "wb") as f:
            f.truncate(self.size)
        return Image("new", path, "vhd", self.size, raw=raw)

    def fresh_child(self, scratch: str, tag: str) -> Image:
        path = os.path.join(scratch, f"child-{tag}.vhd")
        raw = os.path.join(scratch, f"child-{tag}.rawfile")
        for p in (path, raw):
            if os.path.exists(p):
                os.unlink(p)
        why = vhdfs_cli_ready()
        if why:
            raise RuntimeError(why)
        run([VHDFS, "create", "--type", "differencing", "--parent", self.p("dyn.vhd"), path])
        with open(raw, "wb") as f:
            f.truncate(self.size)
        return Image("child", path, "vhd", self.size, raw=raw, parent=self.p("dyn.vhd"), depth=1)

    def working_copy(self, scratch: str, tag: str, fmt: str = "vhd") -> Image:
        """A writable copy of the fully allocated dynamic VHD (or VHDX) and of its raw twin."""
        path = os.path.join(scratch, f"work-{tag}.{fmt}")
        raw = os.path.join(scratch, f"work-{tag}.rawfile")
        shutil.copyfile(self.p(f"dyn.{fmt}"), path)
        shutil.copyfile(self.p("base.raw"), raw)
        return Image("work", path, fmt, self.size, raw=raw)

    def fresh_vhdx(self, scratch: str, tag: str, child: bool) -> Image:
        """A new empty dynamic VHDX (vhdfs create), or a new differencing child of dyn.vhdx."""
        name = "childx" if child else "newx"
        path = os.path.join(scratch, f"{name}-{tag}.vhdx")
        raw = os.path.join(scratch, f"{name}-{tag}.rawfile")
        for p in (path, raw):
            if os.path.exists(p):
                os.unlink(p)
        if child:
            run([VHDFS, "create", "--format", "vhdx", "--type", "differencing", "--parent",
                 self.p("dyn.vhdx"), path])
        else:
            run([VHDFS, "create", "--format", "vhdx", "--type", "dynamic", "--size",
                 str(self.size), path])
        with open(raw, "wb") as f:
            f.truncate(self.size)
        return Image(name, path, "vhdx", self.size, raw=raw,
                     parent=self.p("dyn.vhdx") if child else None, depth=int(child))


def sample_digest(path: str, size: int, n: int = 24) -> str:
    """sha256 of n 64 KiB samples spread over the file (plus its size): a cheap content check."""
    h = hashlib.sha256(str(size).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        step = max(PIECE, (size // n) // PIECE * PIECE)
        for i in range(n):
            off = min(i * step + (i * 7919 % 64) * 512, max(0, size - PIECE))
            h.update(os.pread(fd, PIECE, off))
    finally:
        os.close(fd)
    return h.hexdigest()[:16]
