#!/usr/bin/env bash
# Network identity for clones, Firecracker's way: every clone keeps the guest's MAC and IP from
# the snapshot, and runs in a network namespace of its own with a TAP of the same name, so the
# same guest address exists once per namespace and nothing collides.
#
#   examples/clones-netns.sh [N]      (as root; loft built in target/release, the guest in target/guest)
#
# Creates namespaces loft-demo-snap and loft-demo-1..N, each with tap0 = 10.99.0.1/24 and a tiny
# HTTP server on 10.99.0.1:8080 answering "hello from namespace K"; snapshots a guest whose eth0
# is 10.99.0.2; restores it N times at once, one clone per namespace, each fetching from its
# own server. Everything it creates is removed at the end. Traffic stays inside the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
LOFT=$(pwd)/target/release/loft
SNAP=$(mktemp -d /tmp/loft-clones-netns.XXXXXX)
namespaces=(loft-demo-snap)
cleanup() {
  for ns in "${namespaces[@]}"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$SNAP"
}
trap cleanup EXIT

make_ns() { # NAME: a namespace with tap0 = 10.99.0.1/24
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" tuntap add dev tap0 mode tap
  ip -n "$1" addr add 10.99.0.1/24 dev tap0
  ip -n "$1" link set tap0 up
}

make_ns loft-demo-snap
ip netns exec loft-demo-snap "$LOFT" snapshot create "$SNAP/snap" \
  --net tap=tap0,mac=02:00:00:00:99:02 --when-console NET-UP \
  --cmdline 'guest_cmd="ifconfig eth0 10.99.0.2 netmask 255.255.255.0 up; echo NET-UP; sleep 100000"'

for k in $(seq 1 "$N"); do
  ns=loft-demo-$k; namespaces+=("$ns"); make_ns "$ns"
  mkdir -p "$SNAP/www$k"; echo "hello from namespace $k" > "$SNAP/www$k/index.html"
  ip netns exec "$ns" busybox httpd -f -p 10.99.0.1:8080 -h "$SNAP/www$k" &
done
sleep 0.5
clones=()
for k in $(seq 1 "$N"); do
  ( ip netns exec "loft-demo-$k" "$LOFT" run --restore "$SNAP/snap" --net tap=tap0 -- \
      wget -q -O - http://10.99.0.1:8080/ | sed "s/^/clone $k: /" ) &
  clones+=($!)
done
for p in "${clones[@]}"; do wait "$p"; done
