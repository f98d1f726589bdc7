#!/usr/bin/env bash
# Installs the default guest kit, Debian's cloud kernel taken from Debian's
# archive (and nowhere else), into KIT (default /var/lib/runv/guests/kit):
#   KIT/vmlinuz   the bzImage as Debian ships it
#   KIT/vmlinux   the ELF kernel extracted from it (boots through PVH)
#   KIT/modules/  the kernel's lib/modules/<release> tree: the .ko files (plain,
#                 decompressed if the package compressed them), modules.builtin
#                 and a modules.dep made with busybox's depmod
#   KIT/version   the kernel release (written last: a kit without it is incomplete)
# The node agent builds each guest's initramfs (runv-init plus the modules it
# needs) from this directory.
#
# Usage: guest-kit.sh [KIT]. Idempotent: a kit of the current kernel package is
# left as it is, and the downloaded .debs are kept in KIT/.debs. Needs apt-get,
# dpkg and the decompressor Debian used for the kernel payload (lz4 for 6.1).
set -euo pipefail

kit=${1:-/var/lib/runv/guests/kit}
mkdir -p "$kit"
kit=$(cd "$kit" && pwd)
debs=$kit/.debs
mkdir -p "$debs"

if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$pkg" ] || { echo "cannot resolve linux-image-cloud-amd64's kernel package" >&2; exit 1; }
release=${pkg#linux-image-}

if [ "$(cat "$kit/version" 2>/dev/null)" = "$release" ] \
    && [ -f "$kit/vmlinuz" ] && [ -f "$kit/vmlinux" ] && [ -f "$kit/modules/modules.dep" ]; then
    echo "guest kit: $release already installed in $kit"
    exit 0
fi
rm -f "$kit/version"

# The .debs, cached under their file names, which carry the package version.
fetch() {
    local name=$1 version file
    version=$(apt-cache show --no-all-versions "$name" | awk '/^Version:/ {print $2; exit}')
    [ -n "$version" ] || { echo "apt-cache knows no package $name" >&2; exit 1; }
    file=$(ls "$debs/${name}_${version//:/%3a}"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$file" ]; then
        (cd "$debs" && apt-get download -q "$name=$version" >&2)
        file=$(ls "$debs/${name}_${version//:/%3a}"_*.deb | head -n 1)
    fi
    echo "$file"
}
kernel_deb=$(fetch "$pkg")
busybox_deb=$(fetch busybox-static)

work=$(mktemp -d "$kit/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg -x "$kernel_deb" "$work/kroot"
dpkg -x "$busybox_deb" "$work/bb"
mods=$work/kroot/lib/modules/$release
[ -d "$mods" ] || { echo "$kernel_deb has no lib/modules/$release" >&2; exit 1; }
# Debian 12 ships plain .ko files; later kernels may compress them. The kit
# keeps them plain, so the agent copies them into the initramfs as they are.
find "$mods" -name '*.ko.xz' -exec xz -d {} +
find "$mods" -name '*.ko.zst' -exec zstd -q -d --rm {} +
# Debian makes modules.dep at install time (depmod in the package's postinst);
# busybox's depmod writes the same format from the .ko files.
"$work/bb/bin/busybox" depmod -b "$work/kroot" "$release"
[ -s "$mods/modules.dep" ] || { echo "depmod wrote no modules.dep" >&2; exit 1; }

cp "$work/kroot/boot/vmlinuz-$release" "$work/vmlinuz"
# Extract the ELF vmlinux from the bzImage payload (as the kernel's
# scripts/extract-vmlinux does): find a compressed stream, decompress, keep it if ELF.
extract() {
    local magic=$1 tool=$2 off
    for off in $(grep -aboP "$magic" "$work/vmlinuz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$work/vmlinuz" | $tool >"$work/vmlinux" 2>/dev/null || true
        if [ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
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

rm -rf "$kit/modules"
mv "$mods" "$kit/modules"
mv "$work/vmlinuz" "$work/vmlinux" "$kit/"
echo "$release" >"$kit/version.tmp"
mv "$kit/version.tmp" "$kit/version"
echo "guest kit: $release installed in $kit"
