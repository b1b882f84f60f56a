#!/usr/bin/env bash
# The one installer: Debian packages, a virtualenv at .venv, vhdfs installed editable with its
# test extra. Idempotent: a second run checks and returns in seconds, changing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc pkg-config patch
    fuse3 libfuse3-dev
    qemu-utils libvhdi-utils
    e2fsprogs dosfstools fdisk mtools util-linux xz-utils fio
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: missing Debian packages (${missing[*]}); run as root" >&2
        exit 1
    fi
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FUSE needs its device node and the kernel module (containers may lack both).
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

# Debian's own interpreter, not whatever python3 comes first on PATH.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv"
    "$PY" -m venv .venv
fi
# pyfuse3 3.5.0 binds no lseek, so SEEK_DATA/SEEK_HOLE fall back to "all data" and cp, qemu-img
# and rsync read every hole. vendor/ carries the small patch that adds the handler (libfuse 3.14
# has it); pyfuse3 is sdist-only anyway, so this builds the same sdist with the patch applied,
# before vhdfs's own install, which then finds pyfuse3 3.5.0 in place.
patch_file=vendor/pyfuse3-3.5.0-lseek.patch
pf_stamp=.venv/.pyfuse3-patched
pf_want="$(sha256sum "$patch_file" | cut -d' ' -f1)"
if [ ! -f "$pf_stamp" ] || [ "$(cat "$pf_stamp")" != "$pf_want" ] \
        || ! .venv/bin/python -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3.Operations, "lseek"))' 2>/dev/null; then
    echo "install.sh: building pyfuse3 3.5.0 with $patch_file"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    .venv/bin/python -m pip download -q --no-deps --no-binary pyfuse3 pyfuse3==3.5.0 -d "$build"
    tar xzf "$build"/pyfuse3-3.5.0.tar.gz -C "$build"
    patch -s -d "$build/pyfuse3-3.5.0" -p1 < "$patch_file"
    rm -f "$build/pyfuse3-3.5.0/src/pyfuse3/__init__.c"  # regenerated from the patched sources
    .venv/bin/python -m pip install -q --no-deps --force-reinstall "$build/pyfuse3-3.5.0"
    echo "$pf_want" > "$pf_stamp"
fi

stamp=.venv/.vhdfs-installed
# The stamp names the install mode too, so a venv made by an older install.sh is redone once.
want="$(sha256sum pyproject.toml | cut -d' ' -f1) editable_mode=compat"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c 'import vhdfs, pyfuse3, trio, pyvhdi, dissect.hypervisor' 2>/dev/null; then
    echo "install.sh: installing vhdfs into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    # compat: a plain .pth path entry, not pip's import-hook finder, whose import of pathlib,
    # importlib.util, urllib... cost every Python start (each vhdfs command, each daemon) ~20 ms.
    .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
    echo "$want" > "$stamp"
fi

# mount(8) looks for /sbin/mount.<type>; point it at the venv's helper.
if [ "$(id -u)" -eq 0 ] && [ -x .venv/bin/mount.vhdfs ]; then
    target="$(pwd)/.venv/bin/mount.vhdfs"
    [ "$(readlink /sbin/mount.vhdfs 2>/dev/null)" = "$target" ] || ln -sf "$target" /sbin/mount.vhdfs
fi
echo "install.sh: ready (.venv/bin/vhdfs)"
