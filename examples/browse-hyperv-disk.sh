#!/usr/bin/env bash
# Browse the files of a Hyper-V / Windows VHD read-only: vhdfs exposes each partition as a file,
# so the first NTFS (or FAT/ext4) partition mounts with a plain loop mount. Run as root.
#   usage: browse-hyperv-disk.sh DISK.vhd [PARTITION_NUMBER]
set -euo pipefail
VHD=${1:?usage: $0 DISK.vhd [PARTITION_NUMBER]}
N=${2:-1}
VHDFS=${VHDFS:-vhdfs}
STEM=$(basename "${VHD%.*}")
RAW_DIR=$(mktemp -d /tmp/vhdfs-raw.XXXXXX)
FILES=$(mktemp -d /tmp/vhdfs-files.XXXXXX)
cleanup() {
    set +e
    mountpoint -q "$FILES" && umount "$FILES"
    mountpoint -q "$RAW_DIR" && "$VHDFS" umount "$RAW_DIR"
    rmdir "$FILES" "$RAW_DIR"
}
trap cleanup EXIT

"$VHDFS" mount "$VHD" "$RAW_DIR"            # read-only: the image is never changed
ls -l "$RAW_DIR"
mount -o ro,loop "$RAW_DIR/$STEM-p$N.raw" "$FILES"   # ntfs3 / ntfs-3g / vfat / ext4, as the kernel has
echo "Partition $N of $VHD is at $FILES; exit the shell to unmount."
(cd "$FILES" && "${SHELL:-/bin/bash}") || true
