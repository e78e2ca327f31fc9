#!/usr/bin/env bash
# Build loft's guest agent (agent/, crate loft-agent) as a STATIC x86_64 binary for the guest.
#
#   firmware/build-agent.sh        # prints the path of the binary on its last line
#
# Output: $AGENT_OUT (default <repo>/target/agent/loft-agent), stripped, statically linked
# (glibc, +crt-static, non-PIE). Built in its own target dir (AGENT_TARGET_DIR, default
# <repo>/target/agent) so that host builds are not disturbed; cargo makes it incremental
# (~1 min from scratch on 2 cores, ~1 s when up to date). Logs go to stderr.
set -euo pipefail

FW="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$FW/.." && pwd)"
TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${AGENT_TARGET_DIR:-$REPO/target/agent}"
OUT="${AGENT_OUT:-$CARGO_TARGET_DIR/loft-agent}"

log() { echo "[agent-build] $*" >&2; }
die() { echo "[agent-build] ERROR: $*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found"
command -v file >/dev/null || die "'file' not found (apt-get install file)"

# cargo build, static, for the guest. --target makes RUSTFLAGS apply to the guest binaries only,
# not to build scripts / proc macros. Small and quick to load in the guest: no debug info,
# stripped, one codegen unit, LTO.
static_build() {
  RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static -C relocation-model=static" \
  CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_STRIP=symbols \
  CARGO_PROFILE_RELEASE_LTO=true \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  CARGO_PROFILE_RELEASE_PANIC=abort \
    cargo build --release --locked -p loft-agent --target "$TARGET" --manifest-path "$REPO/Cargo.toml" "$@" >&2
}

log "cargo build --release -p loft-agent --target $TARGET (static) in $CARGO_TARGET_DIR"
static_build

# The tests' in-guest probe (agent/examples/vsock_probe.rs), static the same way; it is not put
# in the guest image: the tests hand it to a guest on a data disk.
log "cargo build --release -p loft-agent --example vsock_probe (static) for the tests"
static_build --features client --example vsock_probe
PROBE="$CARGO_TARGET_DIR/$TARGET/release/examples/vsock_probe"
[ -x "$PROBE" ] || die "no binary at $PROBE"
cp "$PROBE" "$CARGO_TARGET_DIR/vsock_probe.tmp" && mv -f "$CARGO_TARGET_DIR/vsock_probe.tmp" "$CARGO_TARGET_DIR/vsock_probe"

BIN="$CARGO_TARGET_DIR/$TARGET/release/loft-agent"
[ -x "$BIN" ] || die "no binary at $BIN"

# It must run in a busybox guest without any shared library.
desc="$(file -b "$BIN")"
case "$desc" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) die "not static: $desc" ;;
esac
case "$desc" in *x86-64*) ;; *) die "not x86-64: $desc" ;; esac
if ldd_out="$(ldd "$BIN" 2>&1)"; then
  case "$ldd_out" in
    *"not a dynamic executable"* | *"statically linked"*) ;;
    *) die "ldd lists libraries: $ldd_out" ;;
  esac
fi

mkdir -p "$(dirname "$OUT")"
if ! cmp -s "$BIN" "$OUT"; then
  cp "$BIN" "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"
fi
log "$(stat -c %s "$OUT") bytes: $desc"
echo "$OUT"
