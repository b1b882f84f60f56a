#!/usr/bin/env bash
# The benchmark: vhdfs against qemu-storage-daemon, vhdimount, a bare pyfuse3 passthrough and the
# bare file, on this machine, in one run.   Usage (root): bench/run.sh [--quick] [--json FILE]
# Installs what it needs (idempotent), builds its images under bench/work/ (kept for the next run),
# pins itself - and so every daemon and client - to CPU 0, and prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/run.sh: run as root (drop_caches, loop devices, FUSE mounts)" >&2
    exit 2
fi

# Peers and tools: fio, qemu-storage-daemon (qemu-system-common), qemu-img/qemu-io (qemu-utils),
# vhdimount (libvhdi-utils), taskset (util-linux), mkfs.ext4 (e2fsprogs), fusermount3 (fuse3);
# the user-tool rows (issue 14): sfdisk (fdisk), fls/icat/tsk_recover (sleuthkit), mkntfs + ntfs-3g.
BENCH_PACKAGES=(fio qemu-system-common qemu-utils libvhdi-utils util-linux e2fsprogs fuse3 tar
                fdisk sleuthkit ntfs-3g coreutils)
missing=()
for pkg in "${BENCH_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "bench/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

./scripts/install.sh >/dev/null
# Byte-compile vhdfs as pip does for an installed package: with PYTHONDONTWRITEBYTECODE set (as in
# this project's sandboxes) an editable checkout is otherwise recompiled at every daemon start,
# which the launch -> first read row would measure.
.venv/bin/python -m compileall -q vhdfs >/dev/null || true

exec taskset -c 0 .venv/bin/python bench/bench.py "$@"
