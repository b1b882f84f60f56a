"""``mount.vhdfs``: lets ``mount -t vhdfs`` and ``/etc/fstab`` mount an image.

mount(8) runs ``mount.vhdfs SPEC DIR [-sfnv] [-o OPTS]``; this translates the fstab option
string into ``vhdfs mount`` arguments and runs it in the background mode, which returns only
once the raw files are there -- exactly what mount(8) expects of a helper. Example line::

    /srv/img/disk.vhd  /mnt/vhd  vhdfs  ro,nofail  0 0

vhdfs options: ``rw``/``ro``, ``cache``, ``direct_io``, ``nopartitions``, ``snapshot``, ``parent_dir=DIR``
(repeatable), ``format=raw|vhd|vdi``, ``debug``. FUSE/VFS options (``allow_other``, ``nosuid``,
``nodev``, ``noexec``, ``noatime`` ...) pass through; mount(8)-only options are ignored.
"""

from __future__ import annotations

import sys

from ..errors import UsageError
from . import main as vhdfs_main

PASS_THROUGH = {
    "allow_other",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "relatime",
    "norelatime",
    "sync",
    "async",
    "dirsync",
    "auto_unmount",
}
IGNORED = {
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "user",
    "users",
    "owner",
    "group",
    "_netdev",
    "nouser",
    "default_permissions",
    "loop",
}


def translate(spec: str, directory: str, options: str, sloppy: bool = False) -> list[str]:
    """``vhdfs`` argv for an fstab entry (``--debug`` first, when asked)."""
    front: list[str] = []
    args: list[str] = ["mount"]
    fuse: list[str] = []
    for opt in filter(None, (o.strip() for o in options.split(","))):
        name, _, value = opt.partition("=")
        if name == "ro":
            continue
        if name == "rw":
            args.append("--rw")
        elif name == "cache":
            args.append("--cache")
        elif name in ("direct_io", "directio"):
            args.append("--direct-io")
        elif name in ("nopartitions", "no_partitions"):
            args.append("--no-partitions")
        elif name == "snapshot":
            args.append("--snapshot")
        elif name in ("parent_dir", "parent-dir") and value:
            args += ["--parent-dir", value]
        elif name == "format" and value:
            args += ["--format", value]
        elif name == "debug":
            front.append("--debug")
        elif name in PASS_THROUGH:
            fuse.append(opt)
        elif name in IGNORED or name.startswith(("x-", "comment")):
            continue
        elif not sloppy:
            raise UsageError(f"unknown mount option {opt!r} (see mount.vhdfs in the README)")
    if fuse:
        args += ["-o", ",".join(fuse)]
    return front + args + ["--", spec, directory]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mount.vhdfs``: parse mount(8)'s calling convention, then run ``vhdfs mount``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    sloppy = fake = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            options.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a.startswith("-") and len(a) > 1:
            sloppy |= "s" in a
            fake |= "f" in a
            if a in ("-t", "-N") and i + 1 < len(argv):  # type given again / namespace: skip value
                i += 1
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        print("usage: mount.vhdfs IMAGE MOUNTPOINT [-sfnv] [-o OPTIONS]", file=sys.stderr)
        return 2
    try:
        vhdfs_args = translate(positional[0], positional[1], ",".join(options), sloppy)
    except UsageError as exc:
        print(f"mount.vhdfs: {exc}", file=sys.stderr)
        return exc.exit_code
    if fake:
        return 0
    return vhdfs_main(vhdfs_args)


if __name__ == "__main__":
    sys.exit(main())
