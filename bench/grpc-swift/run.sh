#!/usr/bin/env bash
# grpc-swift-2's own cost per unary call, next to the servers it would have replaced or
# competed with, all loaded by the same grpc-swift-2 client (GRPCSwiftBench load):
#   grpc-swift-2   GRPCServer + NIO HTTP/2 transport answering KV.Range with fixed bytes
#                  (no protobuf, no store: the gRPC stack alone)
#   tandem         `tandem registry` (release), which serves the etcd API on NIOHTTP2 with its
#                  own gRPC framing: a real serializable Range on the store
#   etcd           Debian's etcd 3.4 (grpc-go): the same real serializable Range
# Single members: this measures the gRPC servers, not Raft. Usage: bench/grpc-swift/run.sh
# (SECONDS_PER=5, CONCURRENCY="1 16 64").
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER=${SECONDS_PER:-5}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
dev/build-release.sh tandem >/dev/null
(cd bench/grpc-swift && swift build -c release >/dev/null)
gb=bench/grpc-swift/.build/release/GRPCSwiftBench
root=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$root"; }
trap cleanup EXIT
export ETCDCTL_API=3
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

G=$(free_port); T=$(free_port); E=$(free_port)
$gb serve "$G" > "$root/grpc.log" 2>&1 & pids+=($!)
.build/release/tandem registry --data-dir "$root/tandem" --listen-client-urls "http://127.0.0.1:$T" \
  --listen-peer-urls "http://127.0.0.1:$(free_port)" > "$root/tandem.log" 2>&1 & pids+=($!)
etcd --data-dir "$root/etcd" --listen-client-urls "http://127.0.0.1:$E" --advertise-client-urls "http://127.0.0.1:$E" \
  --listen-peer-urls "http://127.0.0.1:$(free_port)" > "$root/etcd.log" 2>&1 & pids+=($!)
for ep in "$T" "$E"; do
  for _ in $(seq 1 100); do etcdctl --endpoints "127.0.0.1:$ep" put foo bar >/dev/null 2>&1 && break; done
done
for _ in $(seq 1 100); do grep -q serving "$root/grpc.log" && break; sleep 0.1; done

echo "| clients | server | calls/s | p50 | p99 | failed calls |"
echo "|---|---|---|---|---|---|"
for c in $CONCURRENCY; do
  for s in "grpc-swift-2:$G" "tandem:$T" "etcd:$E"; do
    out=$($gb load "127.0.0.1:${s#*:}" "$c" "$SECONDS_PER")
    line=$(grep 'calls=' <<<"$out")
    rate=$(sed 's/.*calls\/s=\([0-9]*\).*/\1/' <<<"$line")
    p50=$(sed 's/.*p50=\([0-9.]*ms\).*/\1/' <<<"$line")
    p99=$(sed 's/.*p99=\([0-9.]*ms\).*/\1/' <<<"$line")
    grep -q 'errors=' <<<"$out" && echo "   ${s%%:*}, $c clients: $(grep 'errors=' <<<"$out")" >&2
    errs=$(grep -o 'errors=[0-9]*' <<<"$out" | cut -d= -f2 || true)
    echo "| $c | ${s%%:*} | $rate | $p50 | $p99 | ${errs:-0} |"
  done
done
