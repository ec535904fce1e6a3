#!/usr/bin/env bash
# Podman end-to-end tier: Debian's Podman, with its CNI backend (libcni, as CRI-O's ocicni
# drives plugins: VERSION, the result cache, prevResult on DEL, capability arguments), runs
# containers on a pontoon network. Everything happens inside a throwaway node netns (joined to
# an "outside" netns on 192.0.2.0/24) and a private mount namespace: Podman's storage, run
# dirs, config and CNI state live in a temp dir or on private tmpfs, never in the machine's
# /etc/containers, /var/lib/containers, /etc/cni or /var/lib/cni. One PASS/FAIL line per step.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
self=$PWD/hack/e2e-podman.sh

# ---------------------------------------------------------------------------------------------
# Inside: the node netns and a private mount namespace.
inner() {
  W=$1
  pass=0 fail=0
  step() { # step NAME COMMAND...
    local name=$1; shift
    if out=$("$@" 2>&1); then
      echo "PASS $name"; pass=$((pass + 1))
    else
      echo "FAIL $name: $(echo "$out" | tail -5 | tr '\n' ' ')"; fail=$((fail + 1))
    fi
  }

  # This machine's quirks: `ip netns exec` remounted /sys without the cgroup hierarchies (mount
  # them again as the machine has them); Podman and containerd write /var/lib and /run
  # whatever their roots say (private tmpfs); /etc/containers and /etc/cni are the test's.
  grep ' /sys/fs/cgroup' /proc/1/mounts >"$W/cgroups" || true
  while read -r dev mnt type opts _; do
    o=$(echo "$opts" | tr , '\n' | { grep -vx 'rw\|ro\|relatime' || true; } | paste -sd, -)
    mkdir -p "$mnt"
    mount -t "$type" -o "${o:-defaults}" "$dev" "$mnt"
  done <"$W/cgroups"
  mount -t tmpfs tmpfs /var/lib
  mount -t tmpfs tmpfs /run
  mkdir -p "$W"/{etc,storage,run,tmp,bin,net.d,rootfs/bin}
  # root here lacks CAP_SYS_RESOURCE: container ulimits stay below what runc may set.
  lim() { local h; h=$(ulimit -H "$1"); if [ "$h" = unlimited ] || [ "$h" -gt 8192 ]; then echo 8192; else echo "$h"; fi; }
  cat >"$W/etc/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(lim -n):$(lim -n)", "nproc=$(lim -u):$(lim -u)"]
[engine]
events_logger = "file"
cgroup_manager = "cgroupfs"
image_copy_tmp_dir = "$W/tmp"
[network]
network_backend = "cni"
cni_plugin_dirs = ["$W/bin"]
network_config_dir = "$W/net.d"
EOF
  cat >"$W/etc/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$W/storage"
runroot = "$W/run"
EOF
  echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$W/etc/policy.json"
  echo 'unqualified-search-registries = []' >"$W/etc/registries.conf"
  mount --bind "$W/etc" /etc/containers
  mount -t tmpfs tmpfs /etc/cni
  export TMPDIR=$W/tmp
  cp "$PONTOON_BIN" "$W/bin/pontoon"

  # The image, imported from local files: Debian's static busybox.
  cp /bin/busybox "$W/rootfs/bin/busybox"
  for applet in $("$W/rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$W/rootfs/bin/$applet"
  done
  tar -C "$W/rootfs" -c . | podman import -q --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - localhost/pontoon-e2e:1 >/dev/null

  conflist() { # conflist CAPABILITIES-JSON
    cat >"$W/net.d/pontoon.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "pontoon", "plugins": [{"type": "pontoon", "bridge": "pon0",
 "isGateway": true, "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
 "capabilities": $1,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/24"}]]}}]}
EOF
  }
  # What the README's example conflists declare.
  conflist '{"portMappings": true, "ips": true, "mac": true, "bandwidth": true}'
  # An idle container (plain `sleep`: PID 1 ignores SIGTERM, so stops use -t0) and servers
  # answering their name on port 80.
  idle() { podman run -d -q --name "$1" --network pontoon --cap-add NET_RAW "${@:2}" localhost/pontoon-e2e:1 sleep 3600 >/dev/null; }
  server() { podman run -d -q --name "$1" --network pontoon "${@:2}" localhost/pontoon-e2e:1 nc -ll -p 80 -e echo "$1" >/dev/null; }
  ip_of() { podman inspect -f '{{(index .NetworkSettings.Networks "pontoon").IPAddress}}' "$1"; }
  # TCP client from the node, from the outside host (its netns, by the pid of its server).
  ask() { python3 -c 'import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 3); print(s.recv(100).decode().strip())' "$@"; }
  outside() { nsenter --net="/proc/$OUTSIDE_PID/ns/net" "$@"; }
  answers() { # answers WANT COMMAND...: the command's output is WANT
    local want=$1 got; shift
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      got=$("$@" 2>/dev/null || true)
      [ "$got" = "$want" ] && return 0
      sleep 0.3
    done
    echo "wanted '$want', got '$got'"; return 1
  }
  silent() { # silent COMMAND...: nothing answers
    if got=$("$@" 2>&1) && [ -n "$got" ]; then echo "answered '$got'"; return 1; fi
  }
  cleanup_containers() { podman rm -af -t0 >/dev/null 2>&1 || true; }
  trap cleanup_containers EXIT

  two_pods() {
    idle c1 && idle c2 || return 1
    a=$(ip_of c1) b=$(ip_of c2)
    echo "c1 $a c2 $b"
    case $a in 10.89.0.*) ;; *) echo "c1 has '$a'"; return 1 ;; esac
    # What the last step proves gone is here now: pontoon's allocation, libcni's cache entry.
    [ -e "/var/lib/cni/networks/pontoon/$a" ] || { echo "no allocation file for $a"; return 1; }
    ls /var/lib/cni/results | grep -q '^pontoon-' || { echo "no libcni cache entry"; return 1; }
    podman exec c1 ping -c1 -W2 "$b" && podman exec c2 ping -c1 -W2 "$a"
  }
  step "two containers get addresses from pontoon and reach each other" two_pods
  step "egress is masqueraded (the outside host sees the node's address)" \
    answers 192.0.2.1 podman exec c1 nc 192.0.2.2 8080

  server web -p 8080:80
  step "-p from the node" answers web ask 192.0.2.1 8080
  step "-p from the outside host" answers web outside python3 -c 'import socket; s=socket.create_connection(("192.0.2.1", 8080), 3); print(s.recv(100).decode().strip())'
  step "-p from another container" answers web podman exec c1 nc 192.0.2.1 8080

  static_ip() {
    server fixed --ip 10.89.0.50 -p 8081:80 || return 1
    [ "$(ip_of fixed)" = 10.89.0.50 ] || { echo "address $(ip_of fixed)"; return 1; }
    answers fixed outside python3 -c 'import socket; s=socket.create_connection(("192.0.2.1", 8081), 3); print(s.recv(100).decode().strip())'
  }
  step "--ip with -p gets its address and keeps its hostPort" static_ip

  mac() {
    idle macc --mac-address 02:42:0a:59:00:99 || return 1
    answers 02:42:0a:59:00:99 podman exec macc cat /sys/class/net/eth0/address
  }
  step "--mac-address sets the container's MAC" mac

  restarted() {
    podman restart -t0 web >/dev/null || return 1
    answers web outside python3 -c 'import socket; s=socket.create_connection(("192.0.2.1", 8080), 3); print(s.recv(100).decode().strip())' &&
      podman exec c1 ping -c1 -W2 "$(ip_of web)"
  }
  step "restart: the container comes back with its network and hostPort" restarted

  nothing_left() {
    podman rm -f -t0 c1 c2 web fixed macc >/dev/null || return 1
    local left
    left=$(ls /var/lib/cni/networks/pontoon 2>/dev/null | grep -E '^[0-9]' || true)
    [ -z "$left" ] || { echo "allocations left: $left"; return 1; }
    left=$(ip -o link show | grep -o 'pon[0-9a-f]\{12\}' || true)
    [ -z "$left" ] || { echo "veths left: $left"; return 1; }
    left=$(nft list table inet pontoon | grep -A3 '^\s*map hp' | grep elements || true)
    [ -z "$left" ] || { echo "hostPort elements left: $left"; return 1; }
    left=$(ls /var/lib/cni/results 2>/dev/null || true)
    [ -z "$left" ] || { echo "libcni cache entries left: $left"; return 1; }
  }
  step "rm -f leaves no allocation, veth, map element or cache entry" nothing_left

  # The trap: without `ips` in pontoon's capabilities, Podman replaces the whole object with
  # {"ips": true} for --ip, libcni stops passing portMappings, and the hostPort is gone.
  conflist '{"portMappings": true}'
  trap_is_real() {
    server trapped --ip 10.89.0.60 -p 8082:80 || return 1
    # The container is up at its address and serves; only the hostPort is missing.
    [ "$(ip_of trapped)" = 10.89.0.60 ] || { echo "address $(ip_of trapped)"; return 1; }
    answers trapped ask 10.89.0.60 80 || return 1
    silent outside python3 -c 'import socket; s=socket.create_connection(("192.0.2.1", 8082), 2); print(s.recv(100).decode().strip())'
  }
  step "without ips declared, --ip loses its hostPort (the trap the README warns of)" trap_is_real
  podman rm -f -t0 trapped >/dev/null 2>&1 || true

  echo "podman tier: $pass passed, $fail failed"
  [ "$fail" = 0 ]
}

if [ "${1:-}" = --inner ]; then
  inner "$2"
  exit
fi

# ---------------------------------------------------------------------------------------------
# Outside: dependencies, the binary, the namespaces, and their removal.
if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 1; fi
bash hack/install-deps.sh
need=()
for pkg in podman busybox-static util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PONTOON_BIN=${PONTOON_BIN:-$(bash hack/build-static.sh)}
export PONTOON_BIN

work=$(mktemp -d /tmp/pontoon-podman.XXXXXX)
node=pontoon-podman-$$
out=$node-out
cleanup() {
  # Only what this run started: the processes in its own namespaces.
  for ns in "$node" "$out"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$node"
ip netns add "$out"
ip -n "$node" link set lo up
ip -n "$out" link set lo up
ip -n "$node" link add uplink type veth peer name eth0 netns "$out"
ip -n "$node" addr add 192.0.2.1/24 dev uplink
ip -n "$out" addr add 192.0.2.2/24 dev eth0
ip -n "$node" link set uplink up
ip -n "$out" link set eth0 up
ip -n "$node" route add default via 192.0.2.2
# The outside host answers with the address it sees (masquerade shows as 192.0.2.1).
ip netns exec "$out" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.2", 8080)); s.listen(16)
while True:
    c, p = s.accept(); c.sendall((p[0] + "\n").encode()); c.close()
' &
OUTSIDE_PID=$!
disown "$OUTSIDE_PID"
export OUTSIDE_PID
ip netns exec "$node" unshare -m --propagation private bash ${PONTOON_E2E_TRACE:+-x} "$self" --inner "$work"
