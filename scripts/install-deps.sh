#!/usr/bin/env bash
# Installs the Debian packages loft's build, guest, tests and benchmarks need. Idempotent: when
# everything is there it returns at once without touching apt.
set -euo pipefail

PACKAGES=(
  # building loft (crates with C parts) and the guest kernel
  build-essential pkg-config bc flex bison libelf-dev libssl-dev cpio xz-utils lz4 time
  linux-source-6.1
  # the guest's user space and disk images
  busybox-static e2fsprogs
  # tests: network namespaces, veth and TAP devices; curl drives the control API's socket; tmux
  # is the terminal `loft run -it` is tested in
  iproute2 curl tmux
  # benchmarks: the peers loft is compared with
  qemu-system-x86 crun runc
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
