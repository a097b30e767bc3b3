#!/usr/bin/env bash
# Tandem vs etcd 3.4 on this machine, in one run: a 3-member etcd cluster (Debian
# etcd-server) and a 3-member tandem registry (release build), one after the other, each
# loaded by the same client: `etcdctl check perf --load=$LOAD` (s, m, l or xl).
# Both fsync their WAL before acknowledging (etcd's default; Tandem always).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOADS=${LOADS:-"m l"}
SYSTEMS=${SYSTEMS:-"etcd tandem"}
for p in etcd-server etcd-client; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p"; }
done
[ -x .build/release/tandem ] || swift build -c release --product tandem
root=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$root"; }
trap cleanup EXIT
export ETCDCTL_API=3

wait_healthy() {
  for _ in $(seq 1 100); do
    if etcdctl --endpoints "$1" endpoint health >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "cluster at $1 did not become healthy" >&2; exit 1
}

start_etcd() {
  local cluster="e1=http://127.0.0.1:32381,e2=http://127.0.0.1:32382,e3=http://127.0.0.1:32383"
  for i in 1 2 3; do
    etcd --name e$i --data-dir "$root/etcd/e$i" \
      --listen-client-urls http://127.0.0.1:3237$i --advertise-client-urls http://127.0.0.1:3237$i \
      --listen-peer-urls http://127.0.0.1:3238$i --initial-advertise-peer-urls http://127.0.0.1:3238$i \
      --initial-cluster "$cluster" --initial-cluster-state new 2>"$root/etcd-e$i.log" &
    pids+=($!)
  done
  wait_healthy 127.0.0.1:32371,127.0.0.1:32372,127.0.0.1:32373
}

start_tandem() {
  local cluster="t1=http://127.0.0.1:32481,t2=http://127.0.0.1:32482,t3=http://127.0.0.1:32483"
  for i in 1 2 3; do
    .build/release/tandem registry --name t$i --data-dir "$root/tandem/t$i" \
      --listen-client-urls http://127.0.0.1:3247$i --listen-peer-urls http://127.0.0.1:3248$i \
      --initial-cluster "$cluster" ${TANDEM_FLAGS:-} >"$root/tandem-t$i.log" 2>&1 &
    pids+=($!)
  done
  wait_healthy 127.0.0.1:32471,127.0.0.1:32472,127.0.0.1:32473
}

stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(etcd --version | head -1); tandem $(git rev-parse --short HEAD)"
for load in $LOADS; do
  if [[ " $SYSTEMS " == *" etcd "* ]]; then
    echo "== etcdctl check perf --load=$load: etcd 3-member cluster"
    start_etcd
    etcdctl --endpoints 127.0.0.1:32371,127.0.0.1:32372,127.0.0.1:32373 check perf --load="$load" 2>&1 \
      | tr '\r' '\n' | grep -vE "^\s*[0-9]+ / [0-9]+|^\s*$" || true
    stop_all
  fi
  if [[ " $SYSTEMS " == *" tandem "* ]]; then
    echo "== etcdctl check perf --load=$load: tandem 3-member cluster"
    start_tandem
    etcdctl --endpoints 127.0.0.1:32471,127.0.0.1:32472,127.0.0.1:32473 check perf --load="$load" 2>&1 \
      | tr '\r' '\n' | grep -vE "^\s*[0-9]+ / [0-9]+|^\s*$" || true
    stop_all
  fi
done
