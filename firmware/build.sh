#!/usr/bin/env bash
# Build loft's guest: kernel (Debian linux-source-6.1 + firmware/kernel/patches,
# tinyconfig + firmware/kernel/microvm.config) and busybox user space with
# firmware/init/init.sh as /init (+ firmware/init/fstab as /etc/fstab).
#
# Outputs (OUT_DIR, default <repo>/target/guest):
#   vmlinux         stripped ELF (64-bit entry + PVH note) -- use this one on kvm_pvm
#   bzImage         compressed kernel (boot protocol 2.15)
#   System.map      symbols of that kernel (to decode a guest RIP)
#   kernel.config   the full .config
#   initramfs.cpio  UNCOMPRESSED newc cpio: busybox-static + /init
#   rootfs.ext4     64 MiB ext4, label guestroot, same tree, /sbin/init -> /init
#
# Work dir (GUEST_BUILD_DIR, default <repo>/target/guest-build): kernel source
# tree and user-space staging. JOBS = make parallelism (default: nproc).
#
# Idempotent: the kernel is rebuilt only when the fragment, a patch or the
# Debian source package changed; a changed patch set means a fresh source tree.
# User space is rebuilt only when init.sh or busybox changed. Installs its
# apt dependencies when missing (needs root, as does mknod for /dev/console).
set -euo pipefail

FW="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$FW/.." && pwd)"
OUT_DIR="${OUT_DIR:-$REPO/target/guest}"
BUILD_DIR="${GUEST_BUILD_DIR:-$REPO/target/guest-build}"
JOBS="${JOBS:-$(nproc)}"
FRAG="$FW/kernel/microvm.config"
PATCH_DIR="$FW/kernel/patches"
INIT="$FW/init/init.sh"
FSTAB="$FW/init/fstab"
AGENT_BUILD="$FW/build-agent.sh"
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC="$BUILD_DIR/linux-source-6.1"
# Bump when the build recipe below changes in a way that changes the outputs.
KERNEL_RECIPE=1
USERSPACE_RECIPE=2

log() { echo "[guest-build] $*"; }
die() { echo "[guest-build] ERROR: $*" >&2; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$OUT_DIR" "$BUILD_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"

# One build at a time (tests may call this script concurrently).
exec 9>"$BUILD_DIR/.lock"
flock 9

shopt -s nullglob
PATCHES=("$PATCH_DIR"/[0-9][0-9][0-9][0-9]-*.patch)
shopt -u nullglob
[ -f "$FRAG" ] || die "missing $FRAG"
[ -f "$INIT" ] || die "missing $INIT"
[ -f "$FSTAB" ] || die "missing $FSTAB"
[ "${#PATCHES[@]}" -gt 0 ] || die "no patches in $PATCH_DIR"

# ---------------------------------------------------------------- stamps --
# Versions of the Debian inputs; empty when not installed (then a cached
# output is trusted, so a pre-built target/guest needs no apt at all).
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

patchset_hash() { cat "${PATCHES[@]}" | sha256sum | cut -d' ' -f1; }
kernel_inputs_hash() {
  { echo "recipe=$KERNEL_RECIPE"; cat "$FRAG"
    for p in "${PATCHES[@]}"; do echo "== $(basename "$p")"; cat "$p"; done
  } | sha256sum | cut -d' ' -f1
}
userspace_inputs_hash() {
  { echo "recipe=$USERSPACE_RECIPE"; cat "$INIT"; echo "== fstab"; cat "$FSTAB"; echo "== agent"; sha256sum < "$AGENT"; } | sha256sum | cut -d' ' -f1
}
busybox_id() { [ -x /bin/busybox ] && sha256sum /bin/busybox | cut -d' ' -f1 || true; }

# stamp_ok STAMPFILE INPUTS_HASH DEP_ID OUTPUT...
# DEP_ID (Debian package version / binary hash) only counts when known now.
stamp_ok() {
  local stamp="$1" inputs="$2" dep="$3"; shift 3
  local f; for f in "$@"; do [ -s "$OUT_DIR/$f" ] || return 1; done
  [ -f "$stamp" ] || return 1
  grep -qx "inputs=$inputs" "$stamp" || return 1
  [ -z "$dep" ] || grep -qx "dep=$dep" "$stamp" || return 1
}

KERNEL_OUTPUTS=(vmlinux bzImage System.map kernel.config)
USERSPACE_OUTPUTS=(initramfs.cpio rootfs.ext4)
KSTAMP="$OUT_DIR/.kernel.stamp"
USTAMP="$OUT_DIR/.userspace.stamp"
# The guest agent, static (cargo rebuilds it only when agent/ changed; ~1 s when up to date).
AGENT="$("$AGENT_BUILD")" || die "guest agent build failed"
k_inputs="$(kernel_inputs_hash)"
u_inputs="$(userspace_inputs_hash)"

need_kernel=1; need_userspace=1
stamp_ok "$KSTAMP" "$k_inputs" "$(pkg_version linux-source-6.1)" "${KERNEL_OUTPUTS[@]}" && need_kernel=0
stamp_ok "$USTAMP" "$u_inputs" "$(busybox_id)" "${USERSPACE_OUTPUTS[@]}" && need_userspace=0
if [ "$need_kernel" = 0 ] && [ "$need_userspace" = 0 ]; then
  log "up to date: $OUT_DIR"
  exit 0
fi

# ---------------------------------------------------------- dependencies --
missing=()
[ -f "$SRC_TARBALL" ] || missing+=(linux-source-6.1)
command -v bc >/dev/null || missing+=(bc)
command -v flex >/dev/null || missing+=(flex)
command -v bison >/dev/null || missing+=(bison)
[ -f /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v cpio >/dev/null || missing+=(cpio)
{ command -v gcc && command -v make && command -v strip; } >/dev/null || missing+=(build-essential)
command -v xz >/dev/null || missing+=(xz-utils)
command -v lz4 >/dev/null || missing+=(lz4)
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" = "install ok installed" ] \
  || missing+=(busybox-static)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}); run as root or: apt-get install ${missing[*]}"
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
[ "$(id -u)" = 0 ] || [ "$need_userspace" = 0 ] || die "user space needs root (mknod dev/console)"

# ---------------------------------------------------------------- kernel --
build_kernel() {
  local t0 pset src_stamp="$BUILD_DIR/.source.stamp"
  t0="$(now)"
  # Source tree: reuse it only if it carries exactly this patch set on the
  # currently installed source package; otherwise start from a fresh tree.
  pset="patches=$(patchset_hash) source=$(pkg_version linux-source-6.1)"
  if [ -d "$SRC" ] && [ -f "$src_stamp" ] && [ "$(cat "$src_stamp")" = "$pset" ]; then
    log "kernel: reusing patched source tree $SRC"
  else
    log "kernel: extracting $SRC_TARBALL (patch set or source changed)"
    rm -rf "$SRC" "$src_stamp"
    tar -xaf "$SRC_TARBALL" -C "$BUILD_DIR"
    [ -d "$SRC" ] || die "tarball did not contain linux-source-6.1/"
    local p
    for p in "${PATCHES[@]}"; do
      patch -d "$SRC" -p1 --forward --batch -s < "$p" || die "patch failed: $(basename "$p")"
      log "kernel: applied $(basename "$p")"
    done
    echo "$pset" > "$src_stamp"
  fi

  cd "$SRC"
  log "kernel: configuring (tinyconfig + $(basename "$FRAG"))"
  {
    make ARCH=x86_64 tinyconfig
    # -n: allnoconfig semantics, so symbols not named in the fragment stay off
    ARCH=x86_64 scripts/kconfig/merge_config.sh -n .config "$FRAG"
    make ARCH=x86_64 olddefconfig
  } > "$BUILD_DIR/config.log" 2>&1 || { tail -30 "$BUILD_DIR/config.log"; die "kernel configuration failed"; }
  # Every fragment line must have stuck.
  local bad=0 line sym
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) grep -qxF -- "$line" .config || { echo "MISSING: $line" >&2; bad=1; } ;;
      "# CONFIG_"*" is not set")
        sym="${line#\# }"; sym="${sym%% is not set}"
        ! grep -q "^$sym=" .config || { echo "STILL SET: $sym" >&2; bad=1; } ;;
    esac
  done < "$FRAG"
  [ "$bad" = 0 ] || die "config fragment did not apply cleanly (see above)"

  log "kernel: make -j$JOBS bzImage vmlinux (log: $BUILD_DIR/kernel-build.log)"
  local m0; m0="$(now)"
  make ARCH=x86_64 -j"$JOBS" bzImage vmlinux > "$BUILD_DIR/kernel-build.log" 2>&1 \
    || { tail -40 "$BUILD_DIR/kernel-build.log"; die "kernel build failed"; }
  log "kernel: make wall time $(since "$m0") s"

  cp arch/x86/boot/bzImage "$OUT_DIR/bzImage.tmp"
  strip -o "$OUT_DIR/vmlinux.tmp" vmlinux
  cp System.map "$OUT_DIR/System.map.tmp"
  cp .config "$OUT_DIR/kernel.config.tmp"
  local f; for f in "${KERNEL_OUTPUTS[@]}"; do mv -f "$OUT_DIR/$f.tmp" "$OUT_DIR/$f"; done
  printf 'inputs=%s\ndep=%s\n' "$k_inputs" "$(pkg_version linux-source-6.1)" > "$KSTAMP"
  cd "$REPO"
  log "kernel: done in $(since "$t0") s (incl. extract/config)"
}

# ------------------------------------------------------------ user space --
build_userspace() {
  local t0 stage="$BUILD_DIR/userspace"
  t0="$(now)"
  rm -rf "$stage"; mkdir -p "$stage"
  mktree() {  # $1 = root of a busybox tree
    local r="$1" a
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,home/loft}
    cp /bin/busybox "$r/bin/busybox"
    # applet links -> /bin/busybox (absolute inside the guest; not `busybox --install`,
    # which would link to the staging path)
    /bin/busybox --list-full | while read -r a; do
      [ "$a" = bin/busybox ] || ln -sf /bin/busybox "$r/$a"
    done
    mknod -m 600 "$r/dev/console" c 5 1
    mknod -m 666 "$r/dev/null" c 1 3
    # root, and `loft` (1000:1000), the unprivileged user the host may run commands as
    # (ExecRequest::user). Everything in the image is root's (cpio --owner=0:0), so loft's home
    # is world-writable and sticky, like /tmp; /root is root's alone.
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'loft:x:1000:1000:loft:/home/loft:/bin/sh' \
      > "$r/etc/passwd"
    printf '%s\n' 'root:x:0:' 'loft:x:1000:' > "$r/etc/group"
    chmod 1777 "$r/tmp" "$r/home/loft"
    chmod 700 "$r/root"
    install -m 644 "$FSTAB" "$r/etc/fstab"
    install -m 755 "$INIT" "$r/init"
    install -m 755 "$AGENT" "$r/sbin/loft-agent"
  }
  # initramfs: the kernel runs /init
  mktree "$stage/initramfs"
  ( cd "$stage/initramfs" && find . -print0 | LC_ALL=C sort -z \
      | cpio --null -o -H newc --owner=0:0 --quiet ) > "$OUT_DIR/initramfs.cpio.tmp"
  # ext4 root: the kernel runs /sbin/init
  mktree "$stage/rootfs"
  ln -sfn /init "$stage/rootfs/sbin/init"
  rm -f "$OUT_DIR/rootfs.ext4.tmp"
  truncate -s 64M "$OUT_DIR/rootfs.ext4.tmp"
  mkfs.ext4 -q -F -L guestroot -E root_owner=0:0 -d "$stage/rootfs" "$OUT_DIR/rootfs.ext4.tmp" \
    || die "mkfs.ext4 failed"
  mv -f "$OUT_DIR/initramfs.cpio.tmp" "$OUT_DIR/initramfs.cpio"
  mv -f "$OUT_DIR/rootfs.ext4.tmp" "$OUT_DIR/rootfs.ext4"
  printf 'inputs=%s\ndep=%s\n' "$u_inputs" "$(busybox_id)" > "$USTAMP"
  log "user space: done in $(since "$t0") s"
}

if [ "$need_kernel" = 1 ]; then build_kernel; else log "kernel: up to date"; fi
if [ "$need_userspace" = 1 ]; then build_userspace; else log "user space: up to date"; fi
ls -l "$OUT_DIR"
