# Sourced by every script here: the defaults, each overridable from the environment.
# start-node.sh records the values it used in $WORK/node.env; later scripts with the same $WORK read them.
# FedFM's copy of ../shared/testenv/node (a verified recipe for a real node on a machine with no registry),
# adapted to the test harness (tests/cluster/node.py): the Kubernetes build is shared with
# scripts/testenv/build-kube.sh (same source tree, Go cache and bin folder), images are cached in
# ~/.cache/fedfm-images, and the harness passes $WORK and free ports.
NODE_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${WORK:=$HOME/.cache/kube-node/work}"       # one node's state; keep the path short (unix sockets)
[ -f "$WORK/node.env" ] && . "$WORK/node.env"
: "${KUBE_CACHE:=$HOME/.cache/kube-from-debian}"  # Go build (source, GOCACHE); shared with build-kube.sh
: "${BIN_DIR:=$KUBE_CACHE/bin}"                # kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl
: "${IMAGE_CACHE:=$HOME/.cache/fedfm-images}"   # image tarballs, named by content hash
# containerd's images and snapshots, kept from one node to the next: an image loaded once is not loaded
# (unpacked: gigabytes) again, nor deleted with $WORK. One node per machine uses it at a time.
: "${CONTAINERD_ROOT:=$IMAGE_CACHE/containerd}"
: "${NODE_NAME:=testnode}"
: "${NODE_IP:=$(hostname -I | awk '{print $1}')}"
: "${API_PORT:=16643}" "${ETCD_PORT:=12479}" "${ETCD_PEER_PORT:=12480}"
: "${KCM_PORT:=10357}" "${SCHED_PORT:=10359}" "${KUBELET_PORT:=10250}" "${KUBELET_HEALTHZ_PORT:=10248}"
: "${APISERVER_BIND:=0.0.0.0}"                 # 0.0.0.0 so that pods reach it at $NODE_IP
: "${POD_CIDR:=10.244.0.0/24}" "${SERVICE_CIDR:=10.0.0.0/24}" "${SERVICE_IP:=10.0.0.1}"
: "${CNI_BRIDGE:=knode0}"
: "${PAUSE_IMAGE:=localhost/pause:3.4-local}"
: "${BASE_IMAGE:=localhost/debian-base:bookworm}" "${BASE_SUITE:=bookworm}" "${BASE_INCLUDE:=python3-venv}"
: "${DEBIAN_MIRROR:=http://deb.debian.org/debian}"
if [ -z "${KUBELET_MAX_OPEN_FILES:-}" ]; then  # the kubelet raises its nofile limit to this; <= hard limit
  KUBELET_MAX_OPEN_FILES=$(ulimit -Hn)
  if [ "$KUBELET_MAX_OPEN_FILES" = unlimited ] || [ "$KUBELET_MAX_OPEN_FILES" -gt 1000000 ]; then
    KUBELET_MAX_OPEN_FILES=1000000
  fi
fi
export WORK KUBE_CACHE BIN_DIR IMAGE_CACHE CONTAINERD_ROOT NODE_NAME NODE_IP API_PORT ETCD_PORT ETCD_PEER_PORT KCM_PORT \
  SCHED_PORT KUBELET_PORT KUBELET_HEALTHZ_PORT APISERVER_BIND POD_CIDR SERVICE_CIDR SERVICE_IP CNI_BRIDGE \
  PAUSE_IMAGE BASE_IMAGE BASE_SUITE BASE_INCLUDE DEBIAN_MIRROR KUBELET_MAX_OPEN_FILES
export KUBECONFIG=$WORK/kubeconfig PATH=$BIN_DIR:$PATH
export CONTAINERS_CONF=$WORK/podman/containers.conf CONTAINERS_STORAGE_CONF=$WORK/podman/storage.conf
kubectl() { command kubectl --cache-dir "$WORK/kubectl-cache" "$@"; }  # not ~/.kube/cache
export -f kubectl
SOCK=$WORK/containerd/containerd.sock
CTR=(ctr -a "$SOCK" -n k8s.io)
# pods reach the apiserver at the in-cluster address $SERVICE_IP:443 through this rule (there is no kube-proxy)
DNAT_RULE=(PREROUTING -d "$SERVICE_IP/32" -p tcp --dport 443 -m comment --comment "kube-node $WORK"
           -j DNAT --to-destination "$NODE_IP:$API_PORT")

# the host's kernel tunables the kubelet changes at its start (start-node.sh saves them, stop-node.sh restores)
KUBELET_SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

render() { # render TEMPLATE OUT: substitute ${VARS} from the list above
  envsubst '${WORK} ${CONTAINERD_ROOT} ${NODE_IP} ${NODE_NAME} ${KUBELET_PORT} ${KUBELET_HEALTHZ_PORT} ${KUBELET_MAX_OPEN_FILES}
            ${POD_CIDR} ${CNI_BRIDGE} ${PAUSE_IMAGE}' <"$1" >"$2"
}
podman_conf() { # podman's config and store under $WORK/podman
  [ -f "$CONTAINERS_CONF" ] && return 0
  mkdir -p "$WORK/podman/tmp" "$WORK/podman/net" "$WORK/tmp" "$WORK/log"
  render "$NODE_HERE/conf/containers.conf.in" "$CONTAINERS_CONF"
  render "$NODE_HERE/conf/storage.conf.in" "$CONTAINERS_STORAGE_CONF"
}
