#!/usr/bin/env bash
# One HTTP/1.1 hop, measured in one run on this machine:
#   direct (wrk → backend), one Tandem sidecar, HAProxy, nginx, and two Tandem sidecars
#   (the mesh path: client sidecar outbound → server sidecar inbound → backend).
# The backend is an nginx instance answering 1 KiB. For each target: saturation (wrk -t2 -c64)
# requests/s with p50/p99 and the proxy processes' CPU per request, latency at ~1,000
# requests/s (wrk -c10 with a 10 ms pause per connection) with their CPU per 1,000 requests,
# and RSS idle and peak.
#
# Needs: wrk haproxy nginx (apt-get install -y wrk haproxy nginx). Never install
# libnginx-mod-http-lua: it removes libluajit-5.1-dev (docs/ARCHITECTURE.md).
# Usage: bench/sidecar/run.sh        (env DURATION=10 seconds per run)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
TANDEM=.build/release/tandem
# The build users deploy (dev/build-release.sh): release, Swift runtime and Foundation linked
# statically (about 6 MB less resident memory than shared libraries, measured 20.7 vs 26.3 MB idle).
dev/build-release.sh tandem
for t in wrk haproxy nginx; do command -v $t >/dev/null || { echo "missing $t: apt-get install -y wrk haproxy nginx" >&2; exit 1; }; done

W=$(mktemp -d /tmp/tandem-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT

BACKEND=19100 NGINX=19101 HAPROXY=19102 ONE=19103 TWO_OUT=19104 TWO_IN=19105

source bench/common.sh
backend_nginx "$W/nginx-backend" $BACKEND
proxy_nginx "$W/nginx-proxy" $NGINX $BACKEND
haproxy_cfg "$W/haproxy.cfg" $HAPROXY $BACKEND 2

nginx -c "$W/nginx-backend/nginx.conf" & PIDS+=($!); BACKEND_PID=$!
nginx -c "$W/nginx-proxy/nginx.conf" & PIDS+=($!); NGINX_PID=$!
haproxy -f "$W/haproxy.cfg" -db > "$W/haproxy.log" 2>&1 & PIDS+=($!); HAPROXY_PID=$!
$TANDEM sidecar --service bench --app-port 1 --registry none --health-interval 3600 \
  --endpoints backend=127.0.0.1:$BACKEND --outbound 127.0.0.1:$ONE > "$W/one.log" 2>&1 & PIDS+=($!); ONE_PID=$!
$TANDEM sidecar --service backend --app-port $BACKEND --registry none --health-interval 3600 \
  --inbound 127.0.0.1:$TWO_IN > "$W/two-server.log" 2>&1 & PIDS+=($!); TWO_SERVER_PID=$!
$TANDEM sidecar --service client --app-port 1 --registry none --health-interval 3600 \
  --endpoints backend=127.0.0.1:$TWO_IN --outbound 127.0.0.1:$TWO_OUT > "$W/two-client.log" 2>&1 & PIDS+=($!); TWO_CLIENT_PID=$!

# Wait until every target answers (bounded).
for port in $BACKEND $NGINX $HAPROXY $ONE $TWO_OUT; do
  for _ in $(seq 100); do curl -fs -o /dev/null -H "Host: backend" "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
# nginx's master forks workers: measure the whole process group.
pids_of() { case $1 in
  nginx) m=$(pgrep -f "nginx-proxy/nginx.conf" | head -1); echo "$m $(pgrep -P "$m" | tr '\n' ' ')";;
  haproxy) echo $HAPROXY_PID;;
  one) echo $ONE_PID;;
  two) echo "$TWO_CLIENT_PID $TWO_SERVER_PID";;
  direct) echo "";; esac; }
rss_kb() { local t=0; for p in $1; do t=$((t + $(awk '/VmRSS/{print $2}' /proc/$p/status))); done; echo $t; }
hwm_kb() { local t=0; for p in $1; do t=$((t + $(awk '/VmHWM/{print $2}' /proc/$p/status))); done; echo $t; }
HZ=$(getconf CLK_TCK)

printf "| target | sat. req/s | sat. p50 | sat. p99 | sat. CPU µs/req | ~1k rps: req/s | p50 | p99 | CPU s per 1k req | RSS idle | RSS peak |\n"
printf "|---|---|---|---|---|---|---|---|---|---|---|\n"
for target in direct one haproxy nginx two; do
  case $target in
    direct) port=$BACKEND;; one) port=$ONE;; haproxy) port=$HAPROXY;; nginx) port=$NGINX;; two) port=$TWO_OUT;;
  esac
  pids=$(pids_of $target)
  idle=$( [ -n "$pids" ] && echo "$(( $(rss_kb "$pids") / 1024 )) MB" || echo "-")
  s0=$( [ -n "$pids" ] && cpu_ticks "$pids" || echo 0)
  sat=$(wrk -t2 -c64 -d${DURATION}s --latency -H "Host: backend" "http://127.0.0.1:$port/")
  c0=$( [ -n "$pids" ] && cpu_ticks "$pids" || echo 0)
  fixed=$(wrk -t2 -c10 -d${DURATION}s --latency -s bench/sidecar/pace.lua -H "Host: backend" "http://127.0.0.1:$port/")
  c1=$( [ -n "$pids" ] && cpu_ticks "$pids" || echo 0)
  peak=$( [ -n "$pids" ] && echo "$(( $(hwm_kb "$pids") / 1024 )) MB" || echo "-")
  rps() { echo "$1" | awk '/Requests\/sec/{printf "%d", $2}'; }
  pct() { echo "$1" | awk -v p="$2" '$1==p{print $2}'; }
  fixed_total=$(echo "$fixed" | awk '/requests in/{print $1}')
  cpu=$( [ -n "$pids" ] && awk -v d=$((c1 - c0)) -v hz=$HZ -v n=$fixed_total 'BEGIN{printf "%.3f", d/hz/(n/1000)}' || echo "-")
  # The proxy's own CPU per request at saturation: steadier than req/s on a shared machine,
  # where wrk and the backend compete with the proxy for the same cores.
  sat_total=$(echo "$sat" | awk '/requests in/{print $1}')
  satcpu=$( [ -n "$pids" ] && awk -v d=$((c0 - s0)) -v hz=$HZ -v n=$sat_total 'BEGIN{printf "%.1f", d/hz*1e6/n}' || echo "-")
  errs=$(echo "$sat$fixed" | grep -E "Non-2xx|Socket errors" | tr '\n' ' ' || true)
  printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |%s\n" "$target" "$(rps "$sat")" "$(pct "$sat" 50%)" \
    "$(pct "$sat" 99%)" "$satcpu" "$(rps "$fixed")" "$(pct "$fixed" 50%)" "$(pct "$fixed" 99%)" "$cpu" "$idle" "$peak" "${errs:+ $errs}"
done
