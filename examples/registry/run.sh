#!/usr/bin/env bash
# The seed's chapter 4 on Tandem's registry, with etcd's own tools and clients:
#   4.1 a 3-member cluster started with etcd's command line (`etcd …` → `tandem registry …`)
#   4.2 a service's config stored in the registry and watched (Python's etcd3 client), and the
#       seed's Go code with Go's clientv3 (config watch, lease registration, lock, election)
#   4.3 a service registered with health checks (interval/timeout/threshold) and deregistered
#       automatically — on a clean exit at once, after a crash when its lease expires
#   4.4 a distributed lock and a leader election with failover, with `tandem lock/elect` and
#       `etcdctl lock/elect` contending on the same keys; then the registry's own Raft leader dies
source "$(dirname "$0")/../lib.sh"
C1=$(free_port); C2=$(free_port); C3=$(free_port); P1=$(free_port); P2=$(free_port); P3=$(free_port)
E=127.0.0.1:$C1,127.0.0.1:$C2,127.0.0.1:$C3
CLUSTER="infra1=http://127.0.0.1:$P1,infra2=http://127.0.0.1:$P2,infra3=http://127.0.0.1:$P3"
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$E" "$@"; }
declare -A MEMBER
say "== 4.1 three members, started with etcd's flags =="
for i in 1 2 3; do
  c=C$i; p=P$i
  $T registry --name infra$i --data-dir "$W/infra$i" \
    --listen-client-urls http://127.0.0.1:${!c} --advertise-client-urls http://127.0.0.1:${!c} \
    --listen-peer-urls http://127.0.0.1:${!p} --initial-advertise-peer-urls http://127.0.0.1:${!p} \
    --initial-cluster "$CLUSTER" --initial-cluster-state new > "$W/infra$i.log" 2>&1 &
  PIDS+=($!); MEMBER[infra$i]=$!
done
say "   tandem registry --name infra1 --data-dir … --listen-client-urls http://127.0.0.1:$C1 \\"
say "     --listen-peer-urls http://127.0.0.1:$P1 --initial-cluster $CLUSTER   (and infra2, infra3)"
wait_for "ctl endpoint health"
say "$(ctl member list | sed 's/^/   /')"
check "etcdctl member list shows three started members" "$(ctl member list | grep -c started)" = 3
check "all three agree on one leader" "$(ctl endpoint status -w json | $PY -c 'import json,sys; print(len({s["Status"]["leader"] for s in json.load(sys.stdin)}))')" = 1

say "== 4.2 configuration in the registry, watched by a service =="
ctl put /config/users/app_config '{"max_conns": 100}' > /dev/null
$PY examples/registry/config_watch.py "127.0.0.1:$C2" /config/users/app_config > "$W/watch.log" 2>&1 &
PIDS+=($!); WATCH=$!
wait_for "grep -q 'config: ' $W/watch.log"
ctl put /config/users/app_config '{"max_conns": 200}' > /dev/null
$T kv put --endpoints "$E" /config/users/app_config '{"max_conns": 300}' > /dev/null
ctl del /config/users/app_config > /dev/null
wait_for "grep -q deleted $W/watch.log"
stop "$WATCH"
say "$(sed 's/^/   /' "$W/watch.log")"
check "the watcher saw the value at start and every change in order" \
  "$(grep -o 'config: [^(]*' "$W/watch.log" | tr '\n' '|')" = \
  'config: {"max_conns": 100} |config: {"max_conns": 200} |config: {"max_conns": 300} |config: deleted |'

say "== 4.2–4.4 the seed's own Go client: go.etcd.io/etcd/clientv3 (etcd 3.4, Debian's sources) =="
# Built offline in GOPATH mode from golang-etcd-server-dev; the seed's Get + Watch verbatim, then
# a lease-held registration, a lock and an election, each checked by the program itself.
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="${GOCACHE:-$PWD/.build/gocache}" \
  go build -o "$W/seed_client" examples/registry/seed_client.go
go_rc=0; "$W/seed_client" "$E" > "$W/go.log" 2>&1 || go_rc=$?
say "$(sed 's/^/   /' "$W/go.log")"
check "Go's clientv3 against Tandem: config watch, lease registration, lock, election — every check ok" \
  "$go_rc/$(grep -c '^ok' "$W/go.log")" = "0/14"

say "== 4.3 registration with health checks (interval 1 s, timeout 1000 ms, unhealthy after 3, healthy after 2) =="
U=$(free_port)
$T run --service users --app-port "$U" --registry "$E" --health-path /health --health-interval 1 \
  --health-timeout-ms 1000 --unhealthy-threshold 3 --healthy-threshold 2 --lease-ttl 3 \
  -- $PY examples/users-orders/users.py "$U" > "$W/users-1.log" 2>&1 &
PIDS+=($!); USERS1=$!
wait_for "grep -q registered $W/users-1.log"
say "   $($T services --endpoints "$E" users)"
check "registered and passing once its health check passed" "$($T services --endpoints "$E" users)" '~' passing
curl -s -X POST --data down "http://127.0.0.1:$U/admin/health" > /dev/null
wait_for "$T services --endpoints $E users | grep -q critical"
say "   /health answers 503: $($T services --endpoints "$E" users)"
check "three failed checks mark it critical" "$($T services --endpoints "$E" users)" '~' critical
curl -s -X POST --data up "http://127.0.0.1:$U/admin/health" > /dev/null
wait_for "$T services --endpoints $E users | grep -q passing"
check "two passing checks bring it back" "$($T services --endpoints "$E" users)" '~' passing
stop "$USERS1" TERM
check "SIGTERM: deregistered before exiting" "$(ctl get --prefix /tandem/services/users/ --keys-only | grep -c . || true)" = 0
U=$(free_port)
$T run --service users --app-port "$U" --registry "$E" --health-path /health --health-interval 1 --lease-ttl 3 \
  -- $PY examples/users-orders/users.py "$U" > "$W/users-2.log" 2>&1 &
PIDS+=($!); USERS2=$!
wait_for "grep -q registered $W/users-2.log"
app=$(grep -o 'started app (pid [0-9]*' "$W/users-2.log" | grep -o '[0-9]*$')
stop "$USERS2" KILL; kill -KILL "$app" 2>/dev/null || true   # the host "crashes"
say "   killed the sidecar and its app with SIGKILL; still listed: $(ctl get --prefix /tandem/services/users/ --keys-only | grep -c . || true)"
wait_for "[ \$(ctl get --prefix /tandem/services/users/ --keys-only | grep -c .) = 0 ]"
check "... then its lease (TTL 3 s) expires and it is gone" \
  "$(ctl get --prefix /tandem/services/users/ --keys-only | grep -c . || true)" = 0

say "== 4.4 a lock shared by tandem lock and etcdctl lock =="
mkfifo "$W/release"
$T lock --endpoints "$E" jobs -- sh -c "echo 'tandem holds jobs' >> $W/order; read _ < $W/release; echo 'tandem releases' >> $W/order" \
  > "$W/lock-a.log" 2>&1 &
PIDS+=($!); LOCK_A=$!
wait_for "grep -q 'tandem holds' $W/order"
ctl lock jobs -- sh -c "echo 'etcdctl holds jobs' >> $W/order" > "$W/lock-b.log" 2>&1 &
PIDS+=($!); LOCK_B=$!
wait_for "[ \$(ctl get --prefix jobs/ --keys-only | grep -c .) = 2 ]"   # etcdctl is queued behind tandem
check "while tandem holds it, etcdctl waits" "$(cat "$W/order" | tr '\n' '|')" = 'tandem holds jobs|'
echo go > "$W/release"
reap "$LOCK_A" && reap "$LOCK_B"
say "$(sed 's/^/   /' "$W/order")"
check "etcdctl got it only after tandem released it" "$(cat "$W/order" | tr '\n' '|')" = \
  'tandem holds jobs|tandem releases|etcdctl holds jobs|'
$T lock --endpoints "$E" --ttl 2 jobs > "$W/lock-c.log" 2>&1 &
PIDS+=($!); LOCK_C=$!
wait_for "grep -q jobs/ $W/lock-c.log"
stop "$LOCK_C" KILL   # dies holding the lock
ctl lock jobs -- echo "etcdctl took the lock of a dead holder" > "$W/lock-d.log" 2>&1
check "a dead holder's lock is released when its session lease expires" "$(cat "$W/lock-d.log")" '~' "dead holder"

say "== 4.4 leader election with failover =="
$T elect --endpoints "$E" --listen scheduler > "$W/observer.log" 2>&1 &
PIDS+=($!); OBSERVER=$!
$T elect --endpoints "$E" --ttl 2 scheduler node-a > "$W/node-a.log" 2>&1 &
PIDS+=($!); NODE_A=$!
wait_for "grep -q node-a $W/node-a.log"
ctl elect scheduler node-b > "$W/node-b.log" 2>&1 &
PIDS+=($!); NODE_B=$!
wait_for "grep -q node-a $W/observer.log"
check "node-a (tandem elect) leads; node-b (etcdctl elect) waits" "$(cat "$W/node-b.log")" = ""
stop "$NODE_A" KILL   # the leader crashes: no resignation
wait_for "grep -q node-b $W/node-b.log"
wait_for "grep -q node-b $W/observer.log"
say "   observer (tandem elect --listen): $(grep -o 'node-[ab]' "$W/observer.log" | tr '\n' ' ')"
check "after node-a's lease expired, node-b leads" "$(grep -o 'node-[ab]' "$W/observer.log" | tr '\n' ' ')" = "node-a node-b "
stop "$NODE_B"; stop "$OBSERVER"

say "== the registry's own leader crashes =="
lid=$(ctl endpoint status -w json | $PY -c 'import json,sys; print({s["Status"]["leader"] for s in json.load(sys.stdin)}.pop())')
name=$(ctl member list -w json | $PY -c 'import json,sys; print([m["name"] for m in json.load(sys.stdin)["members"] if m["ID"]=='"$lid"'][0])')
leader=127.0.0.1:$(eval echo \$C${name#infra})
say "   killing $name ($leader), the Raft leader, with SIGKILL"
stop "${MEMBER[$name]}" KILL
left=$(echo "$E" | tr ',' '\n' | grep -v "^$leader$" | paste -sd,)
wait_for "ETCDCTL_API=3 etcdctl --endpoints $left put /after-failover ok"
check "the two survivors elected a new leader and take writes" \
  "$(ETCDCTL_API=3 etcdctl --endpoints "$left" get /after-failover --print-value-only)" = ok
newleader=$(ETCDCTL_API=3 etcdctl --endpoints "$left" endpoint status -w json | $PY -c 'import json,sys; print({s["Status"]["leader"] for s in json.load(sys.stdin)}.pop())')
check "the new leader is another member" "$([ "$newleader" != "$lid" ] && echo yes)" = yes
check "clients given all three endpoints carry on (tandem kv get)" \
  "$($T kv get --endpoints "$E" /after-failover)" = "/after-failover
ok"
finish "examples/registry"
