#!/usr/bin/env bash
# End to end on a real kind cluster (needs docker, kind and kubectl; not run in CI here, where
# no Docker engine exists). Creates a 3-node dual-stack cluster without kind's CNI, loads the
# pontoon image, applies deploy/pontoon.yaml, waits for the nodes, then checks pod-to-pod on one
# node and across nodes (routes programmed by `pontoon agent`), pod-to-service and egress.
# FOCUS=... additionally runs the upstream e2e.test binary (if present) with that ginkgo focus,
# e.g. FOCUS='\[sig-network\] (Networking Granular Checks|HostPort)'.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=${CLUSTER:-pontoon}
for t in docker kind kubectl; do command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }; done
archive=$(mktemp --suffix=.tar)
cleanup() { rm -f "$archive"; [ "${KEEP:-}" = 1 ] || kind delete cluster --name "$cluster"; }
trap cleanup EXIT

# The same image build as the containerd tier's; its tag is the manifest's.
image=$(bash hack/build-image.sh --save "$archive")
kind create cluster --name "$cluster" --config deploy/kind-config.yaml --wait 0s
kind load image-archive --name "$cluster" "$archive"
kubectl apply -f deploy/pontoon.yaml
kubectl -n kube-system rollout status ds/pontoon --timeout=180s
kubectl wait --for=condition=Ready nodes --all --timeout=180s
kubectl -n kube-system wait --for=condition=Ready pod -l k8s-app=kube-dns --timeout=180s

# Two pods per node (anti-affinity spreads them), a service in front of them.
kubectl create deployment web --image=registry.k8s.io/e2e-test-images/agnhost:2.52 --replicas=6 -- /agnhost netexec --http-port=8080
kubectl rollout status deployment/web --timeout=180s
kubectl expose deployment web --port=80 --target-port=8080
kubectl run client --image=registry.k8s.io/e2e-test-images/agnhost:2.52 --restart=Never -- pause
kubectl wait --for=condition=Ready pod/client --timeout=120s

fail=0
for ip in $(kubectl get pods -l app=web -o jsonpath='{.items[*].status.podIP}'); do
  node=$(kubectl get pods -l app=web -o jsonpath="{.items[?(@.status.podIP=='$ip')].spec.nodeName}")
  if kubectl exec client -- /agnhost connect --timeout=5s "$ip:8080" >/dev/null; then
    echo "ok   client -> pod $ip on $node"
  else
    echo "FAIL client -> pod $ip on $node"; fail=1
  fi
  # The pod must see the client's own address (no NAT between pods).
  seen=$(kubectl exec client -- curl -s "http://$ip:8080/clientip" 2>/dev/null | cut -d: -f1 || true)
  want=$(kubectl get pod client -o jsonpath='{.status.podIP}')
  [ "$seen" = "$want" ] || { echo "FAIL pod $ip saw $seen, not $want"; fail=1; }
done
kubectl exec client -- /agnhost connect --timeout=5s web.default.svc.cluster.local:80 >/dev/null \
  && echo "ok   client -> service web" || { echo "FAIL client -> service"; fail=1; }
kubectl exec client -- /agnhost connect --timeout=5s kubernetes.default.svc.cluster.local:443 >/dev/null \
  && echo "ok   client -> API server service" || { echo "FAIL client -> API server"; fail=1; }

if [ -n "${FOCUS:-}" ] && command -v e2e.test >/dev/null; then
  e2e.test --kubeconfig "$HOME/.kube/config" --provider=local --ginkgo.focus="$FOCUS" \
    --ginkgo.skip='Feature|Disruptive|Serial|Slow' || fail=1
fi
exit "$fail"
