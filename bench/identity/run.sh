#!/usr/bin/env bash
# Identity: the per-request cost of token verification and proofs of possession on one core
# (TandemBench identity), and the throughput of the two-sidecar mesh path with no auth, with
# service tokens, with tokens + MAC proofs (the default proof kind) and with tokens + signed
# (Ed25519) proofs — measured in one run on this machine.
#
# Each mesh path: wrk → caller sidecar (outbound) → callee sidecar (inbound) → nginx answering
# 1 KiB; discovery and tokens from a `tandem registry` with a join token. wrk -t2 -c64.
# Needs: wrk nginx (apt-get install -y wrk nginx).
# Usage: bench/identity/run.sh        (env DURATION=10 seconds per run)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
TANDEM=.build/release/tandem
dev/build-release.sh tandem TandemBench
for t in wrk nginx; do command -v $t >/dev/null || { echo "missing $t: apt-get install -y wrk nginx" >&2; exit 1; }; done

echo "== per request, one core (TandemBench identity, release) =="
.build/release/TandemBench identity
echo

W=$(mktemp -d /tmp/tandem-identity-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
BACKEND=19300 REG=19301 REG_PEER=19302
source bench/common.sh
backend_nginx "$W/backend" $BACKEND
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/join"
echo 'return { identity = { proof = true } }' > "$W/proof.lua"
echo 'return { identity = { proof = true, proof_kind = "signature" } }' > "$W/signed.lua"
nginx -c "$W/backend/nginx.conf" & PIDS+=($!)
$TANDEM registry --data-dir "$W/reg" --listen-client-urls http://127.0.0.1:$REG \
  --listen-peer-urls http://127.0.0.1:$REG_PEER --join-token-file "$W/join" > "$W/reg.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "serving clients" "$W/reg.log" && break; sleep 0.1; done

sidecar() { # $1 service, $2 extra flags...
  local name=$1; shift
  $TANDEM sidecar --service "$name" --registry 127.0.0.1:$REG --health-interval 1 "$@" > "$W/$name.log" 2>&1 &
  PIDS+=($!)
}
# Callees in front of the backend, and one caller each (on fixed outbound ports).
sidecar plain --app-port $BACKEND
sidecar users --app-port $BACKEND --join-token-file "$W/join"
sidecar secure --app-port $BACKEND --join-token-file "$W/join" --config "$W/proof.lua" --admin 127.0.0.1:19320
sidecar c-plain --app-port 1 --outbound 127.0.0.1:19310
sidecar c-token --app-port 1 --outbound 127.0.0.1:19311 --join-token-file "$W/join"
sidecar c-proof --app-port 1 --outbound 127.0.0.1:19312 --join-token-file "$W/join" --config "$W/proof.lua"
sidecar c-signed --app-port 1 --outbound 127.0.0.1:19313 --join-token-file "$W/join" --config "$W/signed.lua"
for pair in 19310:plain 19311:users 19312:secure 19313:secure; do
  port=${pair%%:*} host=${pair##*:}
  for _ in $(seq 200); do curl -fs -o /dev/null -H "Host: $host" "http://127.0.0.1:$port/" && break; sleep 0.1; done
  curl -fs -o /dev/null -H "Host: $host" "http://127.0.0.1:$port/" || { echo "$host never answered" >&2; cat "$W"/*.log >&2; exit 1; }
done

printf "| mesh path (2 sidecars) | req/s | p50 | p99 | vs no auth |\n|---|---|---|---|---|\n"
base=""
for pair in 19310:plain:"no auth" 19311:users:"service tokens" 19312:secure:"tokens + MAC proofs" \
  19313:secure:"tokens + signed proofs"; do
  IFS=: read -r port host label <<< "$pair"
  out=$(wrk -t2 -c64 -d${DURATION}s --latency -H "Host: $host" "http://127.0.0.1:$port/")
  rps=$(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}')
  [ -z "$base" ] && base=$rps
  errs=$(echo "$out" | grep -E "Non-2xx|Socket errors" | tr '\n' ' ' || true)
  printf "| %s | %s | %s | %s | %s |%s\n" "$label" "$rps" "$(echo "$out" | awk '$1=="50%"{print $2}')" \
    "$(echo "$out" | awk '$1=="99%"{print $2}')" "$(awk -v a=$rps -v b=$base 'BEGIN{printf "%+.0f%%", (a/b-1)*100}')" \
    "${errs:+ $errs}"
done
# Which proofs the callee checked, by kind (the MAC row must show MACs, the signed row signatures).
echo "callee 'secure' checked: $(curl -fs http://127.0.0.1:19320/identity | grep -o '"proofs_verified":{[^}]*}')"
