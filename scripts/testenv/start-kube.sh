#!/usr/bin/env bash
# Starts etcd + kube-apiserver (+ kube-controller-manager via start-kcm.sh unless NO_KCM=1) on loopback.
# Writes PIDs, logs and a kubeconfig under $RUN. Two token users: admin (system:masters) and
# alice (group "devs", no rights until RBAC grants some). Ready in about 4 s.
# There is no scheduler and no kubelet: Pods are created but never run.
# Ports come from PORT (apiserver), ETCD_PORT, ETCD_PEER_PORT and KCM_PORT, so two control planes with
# different ports and different $RUN dirs never collide. Stop with stop-kube.sh (same $RUN).
# NO_KCM=1: etcd + apiserver only; apply CRDs, then start the controller manager with start-kcm.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${RUN:-/tmp/kube-run}
BIN_DIR=${BIN_DIR:-$HOME/.cache/kube-from-debian/bin}
ETCD=${ETCD:-/usr/bin/etcd}
PORT=${PORT:-16443}
ETCD_PORT=${ETCD_PORT:-12379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-12380}
KCM_PORT=${KCM_PORT:-10257}
for b in "$BIN_DIR/kube-apiserver" "$BIN_DIR/kube-controller-manager" "$ETCD"; do
  [ -x "$b" ] || { echo "missing $b (run build-kube.sh)" >&2; exit 2; }
done
mkdir -p "$RUN"/etcd-data "$RUN"/certs
[ -f "$RUN/certs/sa.key" ] || openssl genrsa -out "$RUN/certs/sa.key" 2048 2>/dev/null
. "$HERE/admin-access.sh"
write_admin_access "$RUN/tokens.csv" "$RUN/kubeconfig" "https://127.0.0.1:$PORT" "$RUN/certs/apiserver.crt"
echo "$PORT $ETCD_PORT $ETCD_PEER_PORT $KCM_PORT" > "$RUN/ports"
"$ETCD" --name test --data-dir "$RUN/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "test=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync >"$RUN/etcd.log" 2>&1 &
echo $! > "$RUN/etcd.pid"
"$BIN_DIR/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --secure-port "$PORT" --cert-dir "$RUN/certs" \
  --token-auth-file "$RUN/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$RUN/certs/sa.key" --service-account-signing-key-file "$RUN/certs/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
  --disable-admission-plugins ServiceAccount >"$RUN/apiserver.log" 2>&1 &
echo $! > "$RUN/apiserver.pid"
for i in $(seq 1 600); do
  if curl -sk -H "Authorization: Bearer admin-token" "https://127.0.0.1:$PORT/readyz" 2>/dev/null | grep -qx ok; then
    break
  fi
  for f in etcd apiserver; do
    kill -0 "$(cat "$RUN/$f.pid")" 2>/dev/null || {
      echo "$f exited (port in use?); see $RUN/$f.log" >&2; tail -5 "$RUN/$f.log" >&2; exit 1; }
  done
  [ "$i" = 600 ] && { echo "apiserver not ready; see $RUN/apiserver.log" >&2; exit 1; }
  sleep 0.1
done
if [ "${NO_KCM:-0}" != 1 ]; then
  # Apply CRDs before this starts where garbage collection of their objects matters:
  # the collector picks up CRDs created later only after ~40 s. (NO_KCM=1, then start-kcm.sh.)
  RUN="$RUN" BIN_DIR="$BIN_DIR" KCM_PORT="$KCM_PORT" "$HERE/start-kcm.sh"
fi
echo "KUBECONFIG=$RUN/kubeconfig"
