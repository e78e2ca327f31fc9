#!/usr/bin/env bash
# Installs loft to a prefix: the binaries to PREFIX/bin and the bundled guest (kernel,
# initramfs, ext4 root) to PREFIX/share/loft/guest, where an installed loft looks for it
# (BIN/../share/loft/guest), so it works from any directory.
#
#   scripts/install.sh [--prefix DIR]     (default /usr/local)
#
# Builds what is missing first: loft in release mode, and the guest with firmware/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/local
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "install: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

"${CARGO:-cargo}" build --release --quiet -p loft-cli
[ -s target/guest/vmlinux ] || firmware/build.sh

mkdir -p "$PREFIX/bin" "$PREFIX/share/loft/guest"
for bin in loft loft-oci; do
  [ -f "target/release/$bin" ] && install -m 0755 "target/release/$bin" "$PREFIX/bin/$bin"
done
for f in vmlinux initramfs.cpio rootfs.ext4 bzImage; do
  [ -f "target/guest/$f" ] && install -m 0644 "target/guest/$f" "$PREFIX/share/loft/guest/$f"
done
echo "install: loft in $PREFIX/bin, its guest in $PREFIX/share/loft/guest"
