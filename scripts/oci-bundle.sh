#!/usr/bin/env bash
# Build the OCI bundle the boot benchmark (benches/boot.rs) runs with crun, runc and
# unshare+chroot: the same busybox-static user space as the guest, with the process
# `/bin/sh -c 'echo GUEST-INIT-READY'`.
#
# Usage: scripts/oci-bundle.sh [OUT_DIR]     (default <repo>/target/bench/oci)
#
#   OUT_DIR/rootfs       busybox-static tree: /bin/busybox + applet symlinks (-> /bin/busybox),
#                        /etc/passwd, /etc/group, empty /proc /sys /dev /tmp ...; no device nodes
#                        (the runtime makes /dev). Copied from the project's guest tree
#                        (target/guest-build/userspace/rootfs, made by firmware/build.sh) when it
#                        is there, else made here the same way from /bin/busybox.
#   OUT_DIR/config.json  `crun spec` (or `runc spec`), patched: terminal=false, the args above,
#                        readonly root, hostname "bench".
#
# Idempotent: when busybox, the source tree and this script are unchanged since the last
# build (OUT_DIR/.stamp) it only prints the bundle path. Needs busybox-static (installed if
# missing, as root) and crun or runc for the spec.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${1:-$REPO/target/bench/oci}"
SRC_TREE="${GUEST_BUILD_DIR:-$REPO/target/guest-build}/userspace/rootfs"
MARKER=GUEST-INIT-READY

log() { echo "[oci-bundle] $*" >&2; }
die() { echo "[oci-bundle] ERROR: $*" >&2; exit 1; }

if [ ! -x /bin/busybox ] || ! /bin/busybox --list >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "busybox-static is missing; apt-get install busybox-static"
  log "installing busybox-static"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
fi
SPEC_TOOL=""
for t in crun runc; do command -v "$t" >/dev/null && { SPEC_TOOL="$t"; break; }; done
[ -n "$SPEC_TOOL" ] || die "neither crun nor runc is installed (scripts/install-deps.sh installs both)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
src_id="none"
[ -x "$SRC_TREE/bin/busybox" ] && src_id="$(sha256sum "$SRC_TREE/bin/busybox" | cut -d' ' -f1)"
stamp="script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
busybox=$(sha256sum /bin/busybox | cut -d' ' -f1)
source=$src_id
spec=$SPEC_TOOL"
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$stamp" ] \
   && [ -x "$OUT/rootfs/bin/busybox" ] && [ -s "$OUT/config.json" ]; then
  log "up to date: $OUT"
  echo "$OUT"
  exit 0
fi

rm -rf "$OUT/rootfs.tmp" "$OUT/.stamp"
R="$OUT/rootfs.tmp"
if [ "$src_id" != none ]; then
  log "rootfs: copying the guest's busybox tree $SRC_TREE"
  cp -a "$SRC_TREE" "$R"
  # the guest's /init and /sbin/init are not part of the container's process
  rm -f "$R/init" "$R/sbin/init"
else
  log "rootfs: no guest tree at $SRC_TREE (firmware/build.sh makes it); building from /bin/busybox"
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt}
  cp /bin/busybox "$R/bin/busybox"
  # applet links -> /bin/busybox (absolute inside the container)
  /bin/busybox --list-full | while read -r a; do
    [ "$a" = bin/busybox ] || ln -sf /bin/busybox "$R/$a"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
  echo 'root:x:0:' > "$R/etc/group"
  chmod 1777 "$R/tmp"
fi
# no device nodes: the runtime populates /dev
find "$R/dev" -mindepth 1 -delete
mkdir -p "$R"/{proc,sys,dev,tmp}
[ -x "$R/bin/sh" ] || die "rootfs has no /bin/sh"
rm -rf "$OUT/rootfs"
mv "$R" "$OUT/rootfs"

# config.json: the runtime's default spec, patched
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && "$SPEC_TOOL" spec ) || die "$SPEC_TOOL spec failed"
python3 - "$tmp/config.json" "$OUT/config.json" "$MARKER" <<'PY'
import json, sys
src, dst, marker = sys.argv[1:4]
c = json.load(open(src))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/sh", "-c", "echo " + marker]
c["root"] = {"path": "rootfs", "readonly": True}
c["hostname"] = "bench"
json.dump(c, open(dst, "w"), indent=2)
PY
echo "$stamp" > "$OUT/.stamp"
log "bundle: $OUT (config.json from $SPEC_TOOL spec + rootfs/)"
echo "$OUT"
