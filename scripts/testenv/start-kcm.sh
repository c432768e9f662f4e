#!/usr/bin/env bash
# Starts kube-controller-manager alone, for an apiserver that start-kube.sh (NO_KCM=1) already started
# with the same $RUN (it reads $RUN/kubeconfig and $RUN/certs). Runs the Job controller, the garbage
# collector, the service-account and token controllers, among others. Writes $RUN/kcm.pid and
# $RUN/kcm.log; waits until its /healthz on KCM_PORT answers. stop-kube.sh stops it too.
set -euo pipefail
RUN=${RUN:-/tmp/kube-run}
BIN_DIR=${BIN_DIR:-$HOME/.cache/kube-from-debian/bin}
KCM_PORT=${KCM_PORT:-10257}
[ -f "$RUN/kubeconfig" ] || { echo "no $RUN/kubeconfig: start the apiserver first (start-kube.sh)" >&2; exit 2; }
if [ -f "$RUN/kcm.pid" ] && kill -0 "$(cat "$RUN/kcm.pid")" 2>/dev/null; then
  echo "kube-controller-manager already running (pid $(cat "$RUN/kcm.pid"))"; exit 0
fi
"$BIN_DIR/kube-controller-manager" --kubeconfig "$RUN/kubeconfig" \
  --authentication-kubeconfig "$RUN/kubeconfig" --authorization-kubeconfig "$RUN/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --port 0 --leader-elect=false \
  --service-account-private-key-file "$RUN/certs/sa.key" --root-ca-file "$RUN/certs/apiserver.crt" \
  --use-service-account-credentials=false \
  --controllers '*,-nodeipam,-nodelifecycle,-service,-route,-cloud-node-lifecycle' >"$RUN/kcm.log" 2>&1 &
echo $! > "$RUN/kcm.pid"
pid=$(cat "$RUN/kcm.pid")
for i in $(seq 1 300); do
  if curl -sk "https://127.0.0.1:$KCM_PORT/healthz" 2>/dev/null | grep -qx ok; then
    echo "kube-controller-manager up (pid $pid, port $KCM_PORT)"; exit 0
  fi
  kill -0 "$pid" 2>/dev/null || { echo "kube-controller-manager exited; see $RUN/kcm.log" >&2; tail -5 "$RUN/kcm.log" >&2; exit 1; }
  sleep 0.1
done
echo "kube-controller-manager not healthy after 30 s; see $RUN/kcm.log" >&2
exit 1
