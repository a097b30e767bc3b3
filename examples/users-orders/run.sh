#!/usr/bin/env bash
# make demo (and the users-orders example): a small mesh on this machine, doing real work.
#   users ×2 (Python, one of them flaky) and orders (Python) each run next to a Tandem sidecar
#   (`tandem run`); the first sidecar hosts the embedded registry on 127.0.0.1:2379. orders
#   calls http://users/... through its sidecar: discovery, balancing, retries, ejection and
#   the circuit breaker all show up below, then everything drains and deregisters. Every
#   sidecar has the mesh's join token: orders' calls carry a service token, and users admits
#   only orders (examples/users-orders/users.lua).
source "$(dirname "$0")/../lib.sh"

if curl -s -o /dev/null --max-time 1 http://127.0.0.1:2379/ 2>/dev/null; then
  echo "note: something already listens on 127.0.0.1:2379; the sidecars will use it as their registry"
fi
U1=$(free_port); U2=$(free_port); O=$(free_port); OIN=$(free_port)
# The mesh's join token: the embedded registry issues service tokens to sidecars that have it.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/join"
JOIN=(--join-token-file "$W/join")
echo "== 1. start: users ×2 and orders, each next to a sidecar (the first hosts the registry) =="
$T run --service users --app-port $U1 --health-path /health --health-interval 1 --registry-data-dir "$W/registry" \
  "${JOIN[@]}" --config examples/users-orders/users.lua \
  -- $PY examples/users-orders/users.py $U1 > "$W/users-1.log" 2>&1 & PIDS+=($!)
wait_for "grep -q registered $W/users-1.log"
FAIL_RATE=0.3 $T run --service users --app-port $U2 --health-path /health --health-interval 1 \
  "${JOIN[@]}" --config examples/users-orders/users.lua \
  -- $PY examples/users-orders/users.py $U2 > "$W/users-2.log" 2>&1 & PIDS+=($!)
$T run --service orders --app-port $O --inbound 127.0.0.1:$OIN --config examples/users-orders/orders.lua "${JOIN[@]}" \
  -- $PY examples/users-orders/orders.py $O > "$W/orders.log" 2>&1 & PIDS+=($!)
wait_for "grep -q registered $W/users-2.log && grep -q registered $W/orders.log"
grep -m1 "hosting an embedded" "$W/users-1.log" | sed 's/^/   /'
for n in users-1 users-2 orders; do
  printf "   %-8s inbound %-21s admin %s (/metrics /clusters /routes)\n" "$n" "$(inbound_of $n)" "$(admin_of $n)"
done
echo "   registry (etcd v3 API on 127.0.0.1:2379):"
if command -v etcdctl >/dev/null; then
  ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:2379 get --prefix /tandem/services/ --keys-only | grep . | sed 's/^/     /'
fi

echo
echo "== 2. 300 calls to orders, which calls users by name (users-2 answers 30% of calls with 503) =="
ok=0; declare -A by
for i in $(seq 300); do
  out=$(curl -s -D - -o /dev/null "http://127.0.0.1:$OIN/order/1")
  code=$(head -1 <<<"$out" | awk '{print $2}')
  inst=$(echo "$out" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-users-instance"{print $2}')
  [ "$code" = "200" ] && ok=$((ok+1))
  by[${inst:-none}]=$(( ${by[${inst:-none}]:-0} + 1 ))
done
echo "   succeeded: $ok/300"
check "retries hid users-2's failures from orders' callers (at least 295 of 300)" "$ok" '>=' 295
for k in "${!by[@]}"; do echo "   served by $k: ${by[$k]}"; done
echo "   retries by the orders sidecar: $(metric orders 'tandem_retries_total')   (budget: ≤ 20% + 10/s)"
echo "   ejections of flaky instances:   $(metric orders 'tandem_cluster_outlier_ejections')"
check "orders' sidecar retried" "$(metric orders 'tandem_retries_total')" '>=' 1
check "both users instances served" "${#by[@]}" '>=' 2

echo
echo "== 2a. the seed's users API, called by name through orders' sidecar (as orders.py does) =="
# HTTP_PROXY-style: absolute-form requests to orders' outbound listener carry orders' token.
via=(-s -w ' (%{http_code})' -x "http://$(outbound_of orders)")
r=$(curl "${via[@]}" http://users/user); echo "   GET /user:           $r"
check "GET /user answers Alice" "$r" '~' '{"id": 1, "name": "Alice"} (200)'
r=$(curl "${via[@]}" http://users/user/2); echo "   GET /user/2:         $r"
check "GET /user/:id" "$r" '~' '"name": "Bob"'
r=$(curl "${via[@]}" -X POST -H 'content-type: application/json' --data '{"name":""}' http://users/user)
echo "   POST /user {name:\"\"}: $r"
check "POST /user validates its input, in the envelope" "$r" '~' '{"code": 400, "message": "name is required", "data": null} (400)'
r=$(curl "${via[@]}" -X POST -H 'content-type: application/json' --data '{"name":"Carol"}' http://users/user)
echo "   POST /user {Carol}:  $r"
check "POST /user answers {code, message, data}" "$r" '~' '"code": 0, "message": "ok", "data": {"id": 3, "name": "Carol"}'

echo
echo "== 2b. Lua policies on orders' inbound side (examples/users-orders/orders.lua) =="
hdr=$(curl -s -D - -o /dev/null "http://127.0.0.1:$OIN/order/2" | tr -d '\r')
echo "   GET /order/2: x-request-id $(echo "$hdr" | awk -F': ' 'tolower($1)=="x-request-id"{print $2}'), x-response-time $(echo "$hdr" | awk -F': ' 'tolower($1)=="x-response-time"{print $2}')"
m=$(curl -s -w " (%{http_code}, retry-after %header{retry-after})" "http://127.0.0.1:$OIN/reports")
echo "   GET /reports: $m   <- answered by policies/maintenance.lua"
check "x-request-id and x-response-time stamped by Lua" "$(echo "$hdr" | grep -ci '^x-re\(quest-id\|sponse-time\):')" = 2
check "the maintenance policy answered /reports" "$m" '~' "(503, retry-after 120)"
echo "   policy hook calls so far: $(metric orders 'tandem_policy_invocations_total')"

echo
echo "== 2c. identity without mTLS: users admits only orders (examples/users-orders/users.lua) =="
UIN=$(grep -o "inbound [0-9.:]*" "$W/users-1.log" | head -1 | cut -d' ' -f2)
r=$(curl -s -w " (%{http_code})" "http://$UIN/user/1")
echo "   GET users/user/1 with no token:        $r"
check "no token: 401" "$r" '~' "(401)"
web=$($T identity issue --service web --audience users --join-token-file "$W/join")
r=$(curl -s -w " (%{http_code})" -H "tandem-identity: $web" "http://$UIN/user/1")
echo "   ... with a valid token of service web: $r"
check "another service's valid token: 403" "$r" '~' "(403)"
admitted=$(metric users-1 'tandem_requests_total{side="inbound"')
echo "   orders' calls carry its token: users-1 admitted $admitted requests, refused $(metric users-1 'tandem_identity_refused_total')"

echo
echo "== 3. users-1 fails every call too: ejection, then the circuit breaker opens =="
curl -s -X POST --data 1 "http://127.0.0.1:$U1/admin/fail-rate" > /dev/null
curl -s -X POST --data 1 "http://127.0.0.1:$U2/admin/fail-rate" > /dev/null
for i in $(seq 12); do
  out=$(curl -s -w "\n%{http_code}" "http://127.0.0.1:$OIN/order/1")
  r=$(echo "$out" | tail -1)
  e=$(head -1 <<<"$out" | $PY -c 'import json,sys; d=json.load(sys.stdin); print(d.get("tandem-error") or d.get("message"))')
  printf "   call %2d: orders answered %s (%s)\n" "$i" "$r" "$e"
done
check "the breaker opened (orders answered circuit-open)" "$(metric orders tandem_cluster_breaker_trips)" '>=' 1
echo "   breaker state: $(curl -s "$(admin_of orders)/clusters" | $PY -c 'import json,sys; print([c["breaker"] for c in json.load(sys.stdin)["clusters"] if c["name"]=="users"][0])')"
curl -s -X POST --data 0 "http://127.0.0.1:$U1/admin/fail-rate" > /dev/null
curl -s -X POST --data 0 "http://127.0.0.1:$U2/admin/fail-rate" > /dev/null
wait_for "[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$OIN/order/1) = 200 ]"
echo "   users recovered: the breaker let a probe through and closed; calls succeed again"
check "calls succeed again" "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$OIN/order/1")" = 200

echo
echo "== 4. clean shutdown: SIGTERM drains each sidecar, deregisters it, stops its app =="
stop "${PIDS[1]}" && echo "   users-2 exited 0 after draining"
if command -v etcdctl >/dev/null; then
  left=$(ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:2379 get --prefix /tandem/services/ --keys-only | grep -c .)
  echo "   still registered: $left"
  check "users-2 deregistered on its way out" "$left" = 2
fi
echo
echo "Admin endpoints while it runs: /ready /live /metrics /clusters /routes /identity on each sidecar's admin port."
echo "Logs of this run were in $W (removed on exit)."
finish "examples/users-orders"
