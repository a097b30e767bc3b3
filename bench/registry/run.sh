#!/usr/bin/env bash
# Tandem vs etcd 3.4 on this machine, in one run: a 3-member etcd cluster (Debian
# etcd-server) and a 3-member tandem registry (release build), one after the other, each
# loaded by the same clients:
#   BENCH=matrix (default): `TandemBench registry` — puts at 1, 16 and 256 clients (p50/p99),
#     linearizable and serializable reads, put→watch-event latency, and leader failover
#     (SIGKILL under load: time until writes resume). A fresh cluster for each row group.
#   BENCH=checkperf: `etcdctl check perf --load=$LOAD` for each of $LOADS (s, m, l or xl).
# Both fsync their WAL before acknowledging (etcd's default; Tandem always).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOADS=${LOADS:-"m l"}
SCALE=${SCALE:-1}   # multiplies the request counts (0.1 for a quick look)
SYSTEMS=${SYSTEMS:-"etcd tandem"}
for p in etcd-server etcd-client; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p"; }
done
BENCH=${BENCH:-matrix}
swift build -c release --product tandem >/dev/null
swift build -c release --product TandemBench >/dev/null
tb=.build/release/TandemBench
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
  eps=127.0.0.1:32371,127.0.0.1:32372,127.0.0.1:32373
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
  eps=127.0.0.1:32471,127.0.0.1:32472,127.0.0.1:32473
}

stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$root/etcd" "$root/tandem"
  pids=()
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(etcd --version | head -1); tandem $(git rev-parse --short HEAD)"
n() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 1 ? 1 : v) }'; }

matrix() {
  local sys=$1
  echo "== $sys: 3 members, TandemBench registry (same client for both)"
  "start_$sys"
  $tb registry put --endpoints "$eps" --clients 1 --conns 1 --total "$(n 2000)"
  $tb registry put --endpoints "$eps" --clients 16 --conns 16 --total "$(n 20000)"
  $tb registry put --endpoints "$eps" --clients 256 --conns 32 --total "$(n 100000)"
  $tb registry range --endpoints "$eps" --clients 16 --conns 16 --total "$(n 100000)"
  $tb registry range --endpoints "$eps" --clients 16 --conns 16 --total "$(n 200000)" --serializable
  $tb registry watch --endpoints "$eps" --total "$(n 2000)"
  stop_all
  "start_$sys"
  $tb registry failover --endpoints "$eps" --pids "$(IFS=,; echo "${pids[*]}")" --clients 16 --conns 16 \
    --seconds 8 --kill-after 3
  stop_all
}

if [ "$BENCH" = matrix ]; then
  for sys in $SYSTEMS; do matrix "$sys"; done
  exit 0
fi
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
