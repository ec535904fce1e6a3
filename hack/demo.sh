#!/usr/bin/env bash
# The main job on one machine: a throwaway "node" network namespace with three dual-stack pods
# networked by the pontoon binary (called exactly as a runtime calls it), an "outside" host
# that sees the pods' egress masqueraded to the node's address, then CHECK and DEL.
# Everything lives in namespaces this script creates and removes; the machine's own network is
# never touched. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "run as root: the demo creates network namespaces" >&2
  exit 1
fi
bash hack/install-deps.sh
echo "== building pontoon (release)"
cargo build --release -q
BIN=$PWD/target/release/pontoon

ID=pdemo$$
NODE=$ID-node
OUT=$ID-outside
WORK=$(mktemp -d /tmp/pontoon-demo.XXXXXX)
cleanup() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$ID-" || true); do ip netns del "$ns"; done
  [ -n "${ECHO_PID:-}" ] && kill "$ECHO_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The node and an outside host on a documentation subnet (192.0.2.0/24, 2001:db8::/64) that
# exists only between these two namespaces; the outside host is the node's default gateway.
ip netns add "$NODE"
ip netns add "$OUT"
ip -n "$NODE" link set lo up
ip -n "$OUT" link set lo up
ip -n "$NODE" link add uplink type veth peer name eth0 netns "$OUT"
ip -n "$NODE" addr add 192.0.2.1/24 dev uplink
ip -n "$NODE" addr add 2001:db8::1/64 dev uplink nodad
ip -n "$OUT" addr add 192.0.2.2/24 dev eth0
ip -n "$OUT" addr add 2001:db8::2/64 dev eth0 nodad
ip -n "$NODE" link set uplink up
ip -n "$OUT" link set eth0 up
ip -n "$NODE" route add default via 192.0.2.2
ip -n "$NODE" -6 route add default via 2001:db8::2

# The plugin's config as a runtime injects it: plugins[0] of the example conflist plus the
# list's name and cniVersion; state kept under the demo's temp dir.
CONF=$(jq -c --arg dd "$WORK/ipam" --arg log "$WORK/pontoon.log" \
  '.plugins[0] + {name: .name, cniVersion: .cniVersion} | .ipam.dataDir = $dd | .logFile = $log' \
  cni-conf/10-pontoon-dualstack.conflist)

cni() { # cni VERB CONTAINER NETNS [STDIN]
  local stdin=${4:-$CONF}
  ip netns exec "$NODE" env CNI_COMMAND="$1" CNI_CONTAINERID="$2" CNI_NETNS="$3" \
    CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni "$BIN" <<<"$stdin"
}

# An echo server on the outside host that answers with the address it sees.
ip netns exec "$OUT" python3 -c '
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 8080)); s.listen(16)
    while True:
        c, peer = s.accept(); c.sendall((peer[0] + "\n").encode()); c.close()
threading.Thread(target=serve, args=(socket.AF_INET6, "2001:db8::2"), daemon=True).start()
serve(socket.AF_INET, "192.0.2.2")' &
ECHO_PID=$!
sleep 0.3

echo "== ADD: three pods"
declare -A V4 V6
for p in a b c; do
  ip netns add "$ID-$p"
  start=$(date +%s%N)
  res=$(cni ADD "pod-$p" "/var/run/netns/$ID-$p")
  ms=$(( ($(date +%s%N) - start) / 1000 ))
  V4[$p]=$(jq -r '.ips[] | select(.address | contains(".")) | .address' <<<"$res")
  V6[$p]=$(jq -r '.ips[] | select(.address | contains(":")) | .address' <<<"$res")
  eval "ADD_US_$p=$ms"
  eval "RES_$p='$res'"
done
printf '\n%-6s %-18s %-26s %-16s %s\n' POD IPv4 IPv6 "HOST VETH" "ADD (us, incl. exec)"
for p in a b c; do
  res_var="RES_$p"; us_var="ADD_US_$p"
  printf '%-6s %-18s %-26s %-16s %s\n' "pod-$p" "${V4[$p]}" "${V6[$p]}" \
    "$(jq -r '.interfaces[1].name' <<<"${!res_var}")" "${!us_var}"
done
echo
echo "pod-a's view:"
ip -n "$ID-a" -br addr show dev eth0
ip -n "$ID-a" route
ip -n "$ID-a" -6 route | grep default

echo
echo "== traffic"
ok=0
check() { if "$@" >/dev/null 2>&1; then echo "  ok   ${DESC}"; else echo "  FAIL ${DESC}"; ok=1; fi; }
DESC="pod-a -> pod-b ${V4[b]%/*}" check ip netns exec "$ID-a" ping -c1 -W2 "${V4[b]%/*}"
DESC="pod-b -> pod-c ${V6[c]%/*}" check ip netns exec "$ID-b" ping -c1 -W2 "${V6[c]%/*}"
DESC="pod-c -> gateway 10.244.1.1" check ip netns exec "$ID-c" ping -c1 -W2 10.244.1.1
DESC="node  -> pod-a" check ip netns exec "$NODE" ping -c1 -W2 "${V4[a]%/*}"
seen=$(ip netns exec "$ID-a" python3 -c 'import socket; s=socket.create_connection(("192.0.2.2",8080),2); print(s.recv(64).decode().strip())')
echo "  outside host sees pod-a's IPv4 egress from: $seen (node uplink is 192.0.2.1)"
[ "$seen" = 192.0.2.1 ] || ok=1
seen6=$(ip netns exec "$ID-b" python3 -c 'import socket; s=socket.create_connection(("2001:db8::2",8080),2); print(s.recv(64).decode().strip())')
echo "  outside host sees pod-b's IPv6 egress from: $seen6 (node uplink is 2001:db8::1)"
[ "$seen6" = 2001:db8::1 ] || ok=1

echo
echo "== masquerade rules (one set for the whole network, installed by the first ADD)"
ip netns exec "$NODE" nft list table inet pontoon | sed 's/^/  /'

echo
echo "== CHECK"
for p in a b c; do
  res_var="RES_$p"
  chk=$(jq -c --argjson prev "${!res_var}" '. + {prevResult: $prev}' <<<"$CONF")
  if cni CHECK "pod-$p" "/var/run/netns/$ID-$p" "$chk"; then echo "  pod-$p: healthy"; else ok=1; fi
done

echo
echo "== DEL (pod-c with an empty CNI_NETNS, as containerd sends on its second DEL)"
cni DEL pod-a "/var/run/netns/$ID-a"
cni DEL pod-b "/var/run/netns/$ID-b"
cni DEL pod-c ""
left=$(find "$WORK/ipam/pontoon" -maxdepth 1 -type f -name '*[.:]*' ! -name 'last_reserved*' | wc -l)
veths=$(ip -n "$NODE" -o link 2>/dev/null | grep -c ' pon' || true)
echo "  addresses still allocated: $left, pod veths left on the node: $veths"
[ "$left" = 0 ] && [ "$veths" = 0 ] || ok=1

echo
echo "== one log line per invocation ($WORK/pontoon.log)"
tail -n 4 "$WORK/pontoon.log" | sed 's/^/  /'
echo
if [ "$ok" = 0 ]; then echo "demo: all good"; else echo "demo: FAILED"; fi
exit "$ok"
