#!/usr/bin/env bash
# The seed's chapter 5, live: three users instances and a caller whose sidecar
# (examples/resilience/web.lua) retries within a budget, ejects a slow instance, and opens a
# Sentinel-style error-ratio breaker whose answers a Lua policy turns into a degraded 200.
# Each behaviour then runs as a `tandem sim` scenario: the same cores on virtual time, at scale.
source "$(dirname "$0")/../lib.sh"
OUT=$(free_port); declare -a UP
for i in 1 2 3; do
  UP[$i]=$(free_port)
  $T run --service users --instance users-$i --app-port "${UP[$i]}" --health-path /health --health-interval 1 \
    ${REG_FLAGS:---registry-data-dir $W/registry} -- $PY examples/users-orders/users.py "${UP[$i]}" > "$W/users-$i.log" 2>&1 &
  PIDS+=($!)
  wait_for "grep -q registered $W/users-$i.log"
done
$T sidecar --service web --app-port "$(free_port)" --outbound "127.0.0.1:$OUT" --config examples/resilience/web.lua \
  > "$W/web.log" 2>&1 &
PIDS+=($!)
wait_for "grep -q admin $W/web.log"
admin=$(admin_of web)
wait_for "curl -s http://127.0.0.1:$OUT/user/1 -H 'Host: users' | grep -q Alice"
wait_for "[ \$(curl -s $admin/clusters | grep -o '\"passing\":true' | wc -l) = 3 ]"
knob() { curl -s -X POST --data "$3" "http://127.0.0.1:${UP[$1]}/admin/$2" > /dev/null; }
# N calls to users through the web sidecar; prints "ok degraded" counts and the x-fallback reasons seen.
calls() {
  local n=$1 ok=0 degraded=0 reasons="" i out
  for i in $(seq "$n"); do
    out=$(curl -s -D - "http://127.0.0.1:$OUT/user/1" -H 'Host: users' | tr -d '\r')
    case $out in
      *'"degraded"'*) degraded=$((degraded + 1)); reasons="$reasons $(echo "$out" | awk -F': ' 'tolower($1)=="x-fallback" {print $2}')";;
      'HTTP/1.1 200'*) ok=$((ok + 1));;
    esac
  done
  echo "$ok $degraded$(echo "$reasons" | tr ' ' '\n' | grep . | sort | uniq -c | awk '{printf " %s×%s", $2, $1}')"
}
cluster() { curl -s "$admin/clusters" | $PY -c "import json,sys; c=[c for c in json.load(sys.stdin)['clusters'] if c['name']=='users'][0]; print(eval(sys.argv[1]))" "$1"; }

sim() { $T sim "examples/scenarios/$1.lua" --seed 1 > "$W/sim-$1.txt"; tail -2 "$W/sim-$1.txt" | head -1; }
# users-2 first: with max_ejection_percent = 50, once one of three is ejected no other can be.
say "== 1. a slow instance is ejected: users-2 takes 1 s (per-try timeout 250 ms) =="
knob 2 delay 1
read -r ok deg _ < <(calls 30)
say "   30 calls: $ok answered, $deg degraded; users-2 ejected: $(cluster '[e["ejected"] for e in c["endpoints"] if e["id"]=="users-2"][0]')"
check "every call answered by a fast instance" "$ok" = 30
check "users-2 is ejected" "$(cluster '[e["ejected"] for e in c["endpoints"] if e["id"]=="users-2"][0]')" = True
knob 2 delay 0
check "sim: slow instance ejected (examples/scenarios/slow-instance.lua)" "$(sim slow-instance)" = PASS

say "== 2. retries within a budget: users-3 fails half its calls =="
knob 3 fail-rate 0.5
before=$(metric web tandem_retries_total)
read -r ok deg _ < <(calls 60)
retries=$(( $(metric web tandem_retries_total) - before ))
say "   60 calls: $ok answered by users, $deg degraded; $retries retries, budget refusals $(metric web tandem_retry_budget_exhausted_total)"
check "retries hid users-3's failures" "$ok" = 60
check "the sidecar retried" "$retries" '>=' 1
knob 3 fail-rate 0
check "sim: a retry storm held back by the budget (examples/scenarios/retry-storm.lua)" "$(sim retry-storm)" = PASS
say "        $(grep 'retry budget' "$W/sim-retry-storm.txt")"

say "== 3. users fails everywhere: the breaker opens, Lua serves the fallback =="
for i in 1 2 3; do knob $i fail-rate 1; done
read -r ok deg reasons < <(calls 40)
say "   40 calls: $ok answered by users, $deg degraded (x-fallback:$reasons); breaker $(cluster 'c["breaker"]'), trips $(cluster 'c["breaker_trips"]')"
check "every caller still got an answer (the fallback)" "$deg" = 40
check "the breaker opened" "$(cluster 'c["breaker_trips"]')" '>=' 1
check "while open, answers come from the sidecar (circuit-open), not users" "$reasons" '~' circuit-open
for i in 1 2 3; do knob $i fail-rate 0; done
wait_for "curl -s http://127.0.0.1:$OUT/user/1 -H 'Host: users' | grep -q Alice"
check "users recovered: a probe closed the breaker" "$(cluster 'c["breaker"]')" = closed
check "sim: breaker and fallback (examples/scenarios/breaker-fallback.lua)" "$(sim breaker-fallback)" = PASS
finish "examples/resilience"
