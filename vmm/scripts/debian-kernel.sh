#!/usr/bin/env bash
# Prepares boot artifacts for runv-vmm's Linux test from Debian's package
# archive (and nowhere else): the guest kit (guest-kit.sh: OUT/vmlinuz,
# OUT/vmlinux, OUT/modules/, OUT/version) plus
#   OUT/initramfs.cpio.gz  busybox initramfs whose /init prints a marker and powers off
# Usage: debian-kernel.sh [OUT]   (default: target/debian-kernel). Needs apt-get, dpkg,
# gzip and, for the kernel payload, the decompressor Debian used (lz4/xz/zstd).
set -euo pipefail

out=${1:-target/debian-kernel}
bash "$(dirname "$0")/guest-kit.sh" "$out"
out=$(cd "$out" && pwd)
# This script's download cache before the kit had its own (.debs).
rm -rf "$out/work"
if [ -f "$out/initramfs.cpio.gz" ]; then
    exit 0
fi

work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg -x "$(ls "$out"/.debs/busybox-static_*.deb | tail -n 1)" "$work/bb"
mkdir -p "$work/initramfs/bin" "$work/initramfs/proc" "$work/initramfs/sys" "$work/initramfs/dev"
cp "$work/bb/bin/busybox" "$work/initramfs/bin/busybox"
cat >"$work/initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "runv-init: reached /init"
/bin/busybox uname -a
/bin/busybox poweroff -f
INIT
chmod +x "$work/initramfs/init"
(cd "$work/initramfs" && find . | "$work/bb/bin/busybox" cpio -o -H newc 2>/dev/null) \
    | gzip -9 >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "busybox initramfs: $out/initramfs.cpio.gz"
