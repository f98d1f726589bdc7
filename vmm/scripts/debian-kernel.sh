#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox from Debian's package archive (and
# nowhere else) and prepares boot artifacts for runv-vmm:
#   OUT/vmlinuz          the bzImage as Debian ships it
#   OUT/vmlinux          the ELF kernel extracted from it (boots through PVH)
#   OUT/initramfs.cpio.gz  busybox initramfs whose /init prints a marker and powers off
#   OUT/version          the package name
# Usage: debian-kernel.sh [OUT]   (default: target/debian-kernel). Needs apt-get, dpkg,
# gzip and, for the kernel payload, the decompressor Debian used (lz4/xz/zstd).
set -euo pipefail

out=${1:-target/debian-kernel}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/work
mkdir -p "$work"
cd "$work"

if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$pkg" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
echo "$pkg" > "$out/version"

if [ ! -f kernel.deb ]; then
  apt-get download -q "$pkg"
  mv "${pkg}"_*.deb kernel.deb
fi
if [ ! -f busybox.deb ]; then
  apt-get download -q busybox-static
  mv busybox-static_*.deb busybox.deb
fi
rm -rf kroot bb
dpkg -x kernel.deb kroot
dpkg -x busybox.deb bb
cp kroot/boot/vmlinuz-* "$out/vmlinuz"

# Extract the ELF vmlinux from the bzImage payload (as the kernel's
# scripts/extract-vmlinux does): find a compressed stream, decompress, keep it if ELF.
extract() {
  local magic=$1 tool=$2
  local off
  for off in $(grep -aboP "$magic" "$out/vmlinuz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$out/vmlinuz" | $tool > vmlinux.try 2>/dev/null || true
    if [ "$(head -c 4 vmlinux.try | od -An -c | tr -d ' ')" = '177ELF' ]; then
      mv vmlinux.try "$out/vmlinux"
      return 0
    fi
  done
  return 1
}
extract '\x02\x21\x4c\x18' 'lz4 -dc' \
  || extract '\x1f\x8b\x08' 'gzip -dc' \
  || extract '\xfd\x37\x7a\x58\x5a\x00' 'xz -dc' \
  || extract '\x28\xb5\x2f\xfd' 'zstd -dc' \
  || { echo "could not extract vmlinux from the bzImage" >&2; exit 1; }
rm -f vmlinux.try

# busybox initramfs.
rm -rf initramfs
mkdir -p initramfs/bin initramfs/proc initramfs/sys initramfs/dev
cp bb/bin/busybox initramfs/bin/busybox
cat > initramfs/init <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "runv-init: reached /init"
/bin/busybox uname -a
/bin/busybox poweroff -f
INIT
chmod +x initramfs/init
(cd initramfs && find . | ../bb/bin/busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initramfs.cpio.gz"
echo "kernel: $pkg"
ls -la "$out"
