#!/usr/bin/env bash
# A differencing chain: base.vhd <- child.vhd. Writes through the child never touch the base;
# the child's raw file shows the merged view. Runs in a scratch folder; root for the mount.
set -euo pipefail
VHDFS=${VHDFS:-vhdfs}
WORK=$(mktemp -d /tmp/vhdfs-chain.XXXXXX)
cleanup() { mountpoint -q "$WORK/mnt" && "$VHDFS" umount "$WORK/mnt"; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK" && mkdir mnt

"$VHDFS" create --type dynamic --size 32M base.vhd
"$VHDFS" mount -w base.vhd mnt                      # put something in the base
printf 'base data\n' | dd of=mnt/base.raw bs=512 seek=0 conv=notrunc status=none
"$VHDFS" umount mnt
sha256sum base.vhd > base.sha

"$VHDFS" create --type differencing --parent base.vhd child.vhd
"$VHDFS" mount -w child.vhd mnt                     # vhdfs finds base.vhd by the child's locators
printf 'child data\n' | dd of=mnt/child.raw bs=512 seek=1 conv=notrunc status=none
head -c 1024 mnt/child.raw | tr -d '\0'             # base data, then child data
"$VHDFS" umount mnt

sha256sum -c base.sha                               # the base did not change
# Moved the parent elsewhere? Tell vhdfs where to look:  vhdfs mount --parent-dir DIR child.vhd mnt
# Try changes without keeping them:                     vhdfs mount --snapshot base.vhd mnt
