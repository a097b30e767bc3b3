#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: one HTTP/1.1
# hop to an nginx backend answering 1 KiB, for a Tandem sidecar (no policy), the same with
# the policy bench's chain (tenant gate + policies/rate-limit.lua), HAProxy and nginx.
# Instruction counts repeat within a few per cent from run to run, where wall-clock throughput
# on a small VM varies by ±25 %: this is the measure to compare two builds with. It leaves out
# the kernel (about half of a request's CPU here) and cache misses.
#
# Needs: valgrind wrk nginx haproxy binutils (apt-get install -y valgrind wrk nginx haproxy
# binutils). Valgrind 3.19 cannot read the DWARF 5 debug info of Swift binaries, so it runs a
# copy of the release binary without debug info (objcopy --strip-debug; symbols stay).
# Usage: bench/sidecar/instructions.sh        (env DURATION=10 seconds of load per target)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
dev/build-release.sh tandem
for t in valgrind callgrind_control objcopy wrk haproxy nginx; do
  command -v $t >/dev/null || { echo "missing $t: apt-get install -y valgrind wrk nginx haproxy binutils" >&2; exit 1; }
done

W=$(mktemp -d /tmp/tandem-instr.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$W"; }
trap cleanup EXIT
objcopy --strip-debug .build/release/tandem "$W/tandem"

BACKEND=19200 PORT=19201
source bench/common.sh
backend_nginx "$W/backend" $BACKEND
# One process (no master, one thread): the process under valgrind is the one that proxies.
proxy_nginx "$W/nginx" $PORT $BACKEND "master_process off; worker_processes 1;"
haproxy_cfg "$W/haproxy.cfg" $PORT $BACKEND 1
policy_chain "$W"  # $W/policies.lua: the policy bench's tenant gate + rate limit
echo 'return { routes = { { name = "backend", host = "backend", cluster = "backend" } } }' > "$W/route.lua"

nginx -c "$W/backend/nginx.conf" & PIDS+=($!)
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$BACKEND/" && break; sleep 0.1; done

# Starts CMD under callgrind, warms it up, counts DURATION seconds of wrk load, stops it.
measure() {
  local name=$1; shift
  valgrind --tool=callgrind --callgrind-out-file="$W/cg.$name" "$@" > "$W/$name.log" 2>&1 &
  local pid=$!
  PIDS+=($pid)
  local up=""
  for _ in $(seq 600); do
    curl -fs -o /dev/null -H "Host: backend" -H "x-tenant: acme" "http://127.0.0.1:$PORT/" && { up=1; break; }
    sleep 0.2
  done
  [ -n "$up" ] || { echo "$name did not start:" >&2; tail -5 "$W/$name.log" >&2; exit 1; }
  wrk -t1 -c4 -d2s -H "Host: backend" -H "x-tenant: acme" "http://127.0.0.1:$PORT/" > /dev/null  # warm-up
  callgrind_control -z $pid > /dev/null 2>&1
  local out
  out=$(wrk -t1 -c4 -d${DURATION}s -H "Host: backend" -H "x-tenant: acme" "http://127.0.0.1:$PORT/")
  callgrind_control -d $pid > /dev/null 2>&1
  local n ir
  n=$(echo "$out" | awk '/requests in/{print $1}')
  ir=$(grep -h "^summary:" "$W"/cg.$name.* | awk '{print $2}' | sort -n | tail -1)
  kill $pid; wait $pid 2>/dev/null || true
  printf "| %s | %s | %s | %s |\n" "$name" "$n" "$ir" "$(( ir / n ))"
}

echo "| target | requests | instructions | instructions per request |"
echo "|---|---|---|---|"
# The sidecar's app is the backend: its health check passes once and then waits an hour. With
# no app (`--app-port 1`) the check would retry every 200 ms for its first minute (the start-up
# pace), and those failed connects (and their formatted errors) would be counted against the
# requests.
measure tandem "$W/tandem" sidecar --service bench --app-port $BACKEND --registry none --health-interval 3600 \
  --endpoints backend=127.0.0.1:$BACKEND --outbound 127.0.0.1:$PORT --config "$W/route.lua"
measure tandem+policies "$W/tandem" sidecar --service bench --app-port $BACKEND --registry none \
  --health-interval 3600 --endpoints backend=127.0.0.1:$BACKEND --outbound 127.0.0.1:$PORT --config "$W/policies.lua"
measure haproxy haproxy -f "$W/haproxy.cfg" -db
measure nginx nginx -c "$W/nginx/nginx.conf"
