#!/usr/bin/env bash
# Stops what start-kube.sh / start-kcm.sh started (same $RUN), by PID only. A PID is signalled only
# while its command line still names the binary that was started (no accidents after PID reuse).
# All get SIGTERM at once (about 3 s in all); whatever still runs after 10 s gets SIGKILL.
RUN=${RUN:-/tmp/kube-run}
pids=()
for f in kcm apiserver etcd; do
  [ -f "$RUN/$f.pid" ] || continue
  pid=$(cat "$RUN/$f.pid")
  case $f in kcm) want=kube-controller-manager ;; apiserver) want=kube-apiserver ;; *) want=etcd ;; esac
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$want"; then
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  fi
  rm -f "$RUN/$f.pid"
done
for i in $(seq 1 100); do
  alive=()
  for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  [ ${#alive[@]} = 0 ] && exit 0
  sleep 0.1
done
for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null; done
exit 0
