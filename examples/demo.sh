#!/usr/bin/env bash
# vhdfs in one minute: build a small dynamic VHD holding an ext4 partition with a few files, then
# mount it read-only with vhdfs and browse it through a loop device. Run as root; no arguments.
# Every mount and loop device it makes is undone on exit, even when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (FUSE, loop devices, mount)" >&2; exit 1; }

step "Installing what vhdfs needs"
./scripts/install.sh
VHDFS="$REPO/.venv/bin/vhdfs"

WORK=$(mktemp -d /tmp/vhdfs-demo.XXXXXX)
LOOPS=()
MOUNTS=()
cleanup() {
    set +e
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
        mp=${MOUNTS[i]}
        mountpoint -q "$mp" || continue
        if grep -q " $mp fuse.vhdfs " /proc/mounts; then
            "$VHDFS" umount "$mp" 2>/dev/null || fusermount3 -u -z "$mp"
        else
            umount "$mp" 2>/dev/null || umount -l "$mp"
        fi
    done
    for dev in "${LOOPS[@]}"; do [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
mkdir -p vhd fs
echo "scratch folder: $WORK"

# Sets PART to a block device for partition 1 of a raw disk file: the kernel's own view
# (losetup -P) where the kernel reads partition tables, else vhdfs's partition file <stem>-p1.raw.
partition1() {   # RAWFILE [-r]
    local raw=$1 ro=${2:-} dev
    dev=$(losetup -f --show -P $ro "$raw"); LOOPS+=("$dev")
    sleep 0.3
    if [ -b "${dev}p1" ]; then PART="${dev}p1"; echo "+ losetup -P $ro $raw -> $PART"; return; fi
    losetup -d "$dev"; unset 'LOOPS[-1]'
    echo "   (this kernel does not parse partition tables; using ${raw%.raw}-p1.raw instead)"
    dev=$(losetup -f --show $ro "${raw%.raw}-p1.raw"); LOOPS+=("$dev")
    PART=$dev; echo "+ losetup $ro ${raw%.raw}-p1.raw -> $PART"
}

step "Creating a 64 MiB dynamic VHD"
run "$VHDFS" create --type dynamic --size 64M demo.vhd
run ls -ls demo.vhd

step "Mounting it writable and writing an MBR with one Linux partition"
MOUNTS+=("$WORK/vhd")
run "$VHDFS" mount -w demo.vhd vhd
printf 'label: dos\n,,L\n' | run sfdisk -q vhd/demo.raw
run "$VHDFS" umount vhd
run "$VHDFS" mount -w demo.vhd vhd
run ls -l vhd

step "Making an ext4 file system and copying a few files in"
partition1 vhd/demo.raw
run mkfs.ext4 -q -L vhdfs-demo "$PART"
MOUNTS+=("$WORK/fs")
run mount "$PART" fs
echo "Hello from inside a VHD." > fs/hello.txt
cp "$REPO/pyproject.toml" fs/
seq 1 20000 > fs/numbers.txt
run ls -l fs
run umount fs
run losetup -d "$PART"; unset 'LOOPS[-1]'
run "$VHDFS" umount vhd
run ls -ls demo.vhd

step "The main job: vhdfs mount, read-only"
run "$VHDFS" mount demo.vhd vhd
run ls -l vhd
partition1 vhd/demo.raw -r
run mount -o ro "$PART" fs
run ls -l fs
run cat fs/hello.txt
run tail -n 2 fs/numbers.txt

step "Unmounting everything"
run umount fs
run losetup -d "$PART"; unset 'LOOPS[-1]'
run "$VHDFS" umount vhd
echo
echo "Done: no mount and no loop device left behind."
