#!/usr/bin/env bash
# The seed's load-test table (chapter 2.5) for the users service: concurrency 50/100/200, QPS
# and P99, measured with wrk against the app directly, through its sidecar (one hop), and
# through two sidecars (the mesh path: the caller's outbound → users' inbound → app), side by
# side in one run on this machine.
#   DURATION=10 (seconds per cell)  CONCURRENCY="50 100 200"  THREADS=2
# The users service is the seed's, in Python's standard library (a thread per connection), so
# the app itself is the bottleneck; the column to read is what the sidecars add to it.
# For the proxy alone against HAProxy and nginx, see bench/sidecar/run.sh.
source "$(dirname "$0")/../lib.sh"
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
DURATION=${DURATION:-10}; CONCURRENCY=${CONCURRENCY:-50 100 200}; THREADS=${THREADS:-2}
U=$(free_port); IN=$(free_port); OUT=$(free_port)
$T run --service users --app-port "$U" --inbound "127.0.0.1:$IN" --health-path /health --health-interval 1 \
  --registry-data-dir "$W/registry" -- $PY examples/users-orders/users.py "$U" > "$W/users.log" 2>&1 &
PIDS+=($!)
wait_for "grep -q registered $W/users.log"
$T sidecar --service loadgen --app-port "$(free_port)" --outbound "127.0.0.1:$OUT" > "$W/loadgen.log" 2>&1 &
PIDS+=($!)
wait_for "[ \$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: users' http://127.0.0.1:$OUT/user) = 200 ]"

# wrk: "Requests/sec", the 99% latency, and errors: non-2xx answers and connect/read/write
# errors (a request over wrk's 10 s timeout counts too).
measure() {
  local c=$1 url=$2 host=$3 out
  out=$(wrk -t"$THREADS" -c"$c" -d"${DURATION}s" --timeout 10s --latency -H "Host: $host" "$url")
  echo "$out" > "$W/wrk-$c-$host-$(echo "$url" | tr -c 'a-z0-9' _).txt"
  local qps p99 non2xx sock
  qps=$(echo "$out" | awk '/^Requests\/sec/ {printf "%d", $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  sock=$(echo "$out" | awk '/Socket errors/ {gsub(",", ""); print $4+$6+$8+$10}')  # connect read write timeout
  echo "$qps $p99 $(( ${non2xx:-0} + ${sock:-0} ))"
}
echo "GET /user, ${DURATION}s per cell, wrk -t$THREADS, $(nproc) CPUs:"
printf "%-12s | %-24s | %-24s | %-24s\n" concurrency "direct: QPS / P99" "1 sidecar: QPS / P99" "2 sidecars: QPS / P99"
printf -- "-------------+--------------------------+--------------------------+-------------------------\n"
errors=0; rows=0
for c in $CONCURRENCY; do
  read -r q1 l1 e1 < <(measure "$c" "http://127.0.0.1:$U/user" "127.0.0.1:$U")
  read -r q2 l2 e2 < <(measure "$c" "http://127.0.0.1:$IN/user" users)
  read -r q3 l3 e3 < <(measure "$c" "http://127.0.0.1:$OUT/user" users)
  printf "%-12s | %8s / %-13s | %8s / %-13s | %8s / %-13s\n" "$c" "$q1" "$l1" "$q2" "$l2" "$q3" "$l3"
  errors=$((errors + e2 + e3)); rows=$((rows + 1))
  for q in "$q1" "$q2" "$q3"; do [ "${q:-0}" -gt 0 ] || errors=$((errors + 1)); done
done
check "every cell measured (QPS > 0)" "$rows" = "$(echo $CONCURRENCY | wc -w)"
check "no errors or non-2xx answers through the sidecars" "$errors" = 0
finish "examples/load-test"
