#!/usr/bin/env bash
# One command on a fresh Debian machine: install dependencies, build the guest (kernel +
# initramfs + rootfs, into target/guest/) and loft, then boot the guest once.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
firmware/build.sh
cargo build --release

echo
echo "setup: booting the guest (on a nested kvm_pvm host this takes a minute or two)"
target/release/loft run --cmdline 'guest_cmd="uname -sr; nproc"' </dev/null
echo "setup: done. 'target/release/loft run' boots the guest with a shell on this terminal (Ctrl-A x quits)."
