#!/usr/bin/env bash
# Lua policies: the per-hook cost on the real engine (TandemBench policies), and what a
# typical policy chain costs a sidecar in throughput — side by side with nginx running the
# same logic in its Lua module (OpenResty's lua-nginx-module, unpacked under bench/nginx-lua,
# never installed: Debian's libnginx-mod-http-lua removes libluajit-5.1-dev).
#
# The chain: a tenant gate (x-tenant must be in a set, else 403) and a rate limit keyed by the
# tenant (Tandem: policies/rate-limit.lua's token bucket in a shared store; nginx: a counter in
# ngx.shared.DICT via incr), with limits far above the load so every request passes. Each
# target proxies one HTTP/1.1 hop to an nginx backend answering 1 KiB; wrk -t2 -c64.
#
# Needs: wrk nginx (apt-get install -y wrk nginx) and network access once, for apt-get download.
# Usage: bench/policy/run.sh        (env DURATION=10 seconds per run, ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
TANDEM=.build/release/tandem
dev/build-release.sh tandem TandemBench
for t in wrk nginx; do command -v $t >/dev/null || { echo "missing $t: apt-get install -y wrk nginx" >&2; exit 1; }; done

echo "== per hook call (TandemBench policies, release) =="
.build/release/TandemBench policies
echo

LUA=$ROOT/bench/nginx-lua
if [ ! -f "$LUA/lib/x86_64-linux-gnu/libpcre.so.3" ]; then
  mkdir -p "$LUA/debs"
  (cd "$LUA/debs" && apt-get download libnginx-mod-http-lua libnginx-mod-http-ndk libluajit2-5.1-2 lua-resty-core \
    lua-resty-lrucache libpcre3 2>/dev/null)
  for d in "$LUA"/debs/*.deb; do dpkg-deb -x "$d" "$LUA"; done
fi

W=$(mktemp -d /tmp/tandem-policy-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
BACKEND=19200 NONE=19201 POLICY=19202 NGINX=19203 NGINX_LUA=19204

source bench/common.sh
backend_nginx "$W/backend" $BACKEND
proxy_nginx "$W/nginx" $NGINX $BACKEND
proxy_nginx "$W/nginx-lua" $NGINX_LUA $BACKEND \
  "load_module $LUA/usr/lib/nginx/modules/ndk_http_module.so; load_module $LUA/usr/lib/nginx/modules/ngx_http_lua_module.so; worker_processes 2;" \
  "lua_package_path \"$LUA/usr/share/lua/5.1/?.lua;;\"; lua_shared_dict limits 10m;" '
  access_by_lua_block {
    local tenants = { acme = true, globex = true }
    local t = ngx.req.get_headers()["x-tenant"]
    if not tenants[t or ""] then return ngx.exit(403) end
    local n = ngx.shared.limits:incr("t:" .. t .. ":" .. math.floor(ngx.now()), 1, 0, 2)
    if n > 1000000000 then return ngx.exit(429) end
  }'

policy_chain "$W"  # $W/policies.lua: the tenant gate + policies/rate-limit.lua

nginx -c "$W/backend/nginx.conf" & PIDS+=($!)
nginx -c "$W/nginx/nginx.conf" & PIDS+=($!); NGINX_PID=$!
LD_LIBRARY_PATH=$LUA/usr/lib/x86_64-linux-gnu:$LUA/lib/x86_64-linux-gnu nginx -c "$W/nginx-lua/nginx.conf" & PIDS+=($!); NGINX_LUA_PID=$!
$TANDEM sidecar --service bench --app-port 1 --registry none --health-interval 3600 \
  --endpoints backend=127.0.0.1:$BACKEND --outbound 127.0.0.1:$NONE > "$W/none.log" 2>&1 & PIDS+=($!); NONE_PID=$!
$TANDEM sidecar --service bench2 --app-port 1 --registry none --health-interval 3600 --config "$W/policies.lua" \
  --endpoints backend=127.0.0.1:$BACKEND --outbound 127.0.0.1:$POLICY > "$W/policy.log" 2>&1 & PIDS+=($!); POLICY_PID=$!
for port in $BACKEND $NONE $POLICY $NGINX $NGINX_LUA; do
  for _ in $(seq 100); do curl -fs -o /dev/null -H "Host: backend" -H "x-tenant: acme" "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
# The chains must really run: an unknown tenant is refused by both.
for port in $POLICY $NGINX_LUA; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: backend" -H "x-tenant: initech" "http://127.0.0.1:$port/")
  [ "$code" = 403 ] || { echo "port $port answered $code for an unknown tenant, not 403" >&2; exit 1; }
done

# ROUNDS rounds, each running the four targets back to back: the cost is read within a round
# (a host whose speed drifts between runs moves both of a pair alike), and the median of the
# rounds' costs is reported. Beside req/s, the proxy's own CPU per request (its processes'
# utime + stime over the run): steadier than req/s where wrk and the backend share the cores.
ROUNDS=${ROUNDS:-3}
HZ=$(getconf CLK_TCK)
procs() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ' || true)"; }  # a proxy and its workers
declare -A RPS CPU
printf "| round | target | req/s | p50 | p99 | CPU µs/req | non-2xx |\n|---|---|---|---|---|---|---|\n"
for round in $(seq "$ROUNDS"); do
  for target in tandem tandem+policies nginx nginx+lua; do
    case $target in
      tandem) port=$NONE pid=$NONE_PID;; tandem+policies) port=$POLICY pid=$POLICY_PID;;
      nginx) port=$NGINX pid=$NGINX_PID;; nginx+lua) port=$NGINX_LUA pid=$NGINX_LUA_PID;;
    esac
    t0=$(cpu_ticks "$(procs $pid)")
    out=$(wrk -t2 -c64 -d${DURATION}s --latency -H "Host: backend" -H "x-tenant: acme" "http://127.0.0.1:$port/")
    t1=$(cpu_ticks "$(procs $pid)")
    rps=$(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}')
    n=$(echo "$out" | awk '/requests in/{print $1}')
    cpu=$(awk -v d=$((t1 - t0)) -v hz=$HZ -v n="$n" 'BEGIN{printf "%.1f", d/hz*1e6/n}')
    p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
    bad=$(echo "$out" | awk '/Non-2xx/{print $NF}')
    printf "| %s | %s | %s | %s | %s | %s | %s |\n" "$round" "$target" "$rps" "$p50" "$p99" "$cpu" "${bad:-0}"
    RPS[$round,$target]=$rps CPU[$round,$target]=$cpu
  done
done
echo
printf "| round | tandem: req/s cost | CPU/req added | nginx: req/s cost | CPU/req added |\n|---|---|---|---|---|\n"
ct=() cc=() nt=() nc=()
change() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%+.1f", (b/a-1)*100}'; }
for round in $(seq "$ROUNDS"); do
  ct+=("$(change "${RPS[$round,tandem]}" "${RPS[$round,tandem+policies]}")")
  cc+=("$(change "${CPU[$round,tandem]}" "${CPU[$round,tandem+policies]}")")
  nt+=("$(change "${RPS[$round,nginx]}" "${RPS[$round,nginx+lua]}")")
  nc+=("$(change "${CPU[$round,nginx]}" "${CPU[$round,nginx+lua]}")")
  printf "| %s | %s %% | %s %% | %s %% | %s %% |\n" "$round" "${ct[-1]}" "${cc[-1]}" "${nt[-1]}" "${nc[-1]}"
done
median() { printf "%s\n" "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
printf "| median | %+.1f %% | %+.1f %% | %+.1f %% | %+.1f %% |\n" "$(median "${ct[@]}")" "$(median "${cc[@]}")" "$(median "${nt[@]}")" \
  "$(median "${nc[@]}")"
