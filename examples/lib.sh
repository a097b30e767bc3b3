# Shared by the examples' run.sh scripts (sourced, not run). Each example starts real processes
# on 127.0.0.1, checks what it shows with `check`, and exits non-zero if any check failed —
# `make examples` (part of `make test`) runs them all, so the examples cannot rot.
#   TANDEM   the tandem binary (default: .build/debug/tandem; `make examples` builds it)
#   QUIET=1  print only the checks' results
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=${TANDEM:-.build/debug/tandem}
[ -x "$T" ] || { echo "no tandem binary at $T: run 'swift build' (or 'make build') first" >&2; exit 1; }
# Debian's python3: the examples use its packages (python3-grpcio, python3-etcd3, python3-jwt).
PY=/usr/bin/python3
W=$(mktemp -d /tmp/tandem-example.XXXX)
PIDS=()
FAILED=0
CHECKS=0
# Stops every background process (SIGTERM) and waits for it. They must stop cleanly:
# SwiftNIO logs "ERROR: …" for work handed to an event loop already shut down (a crash in a
# future NIO), so such a line in any log fails the example.
stop_all() {
  local p
  [ "${STOPPED:-0}" = 1 ] && return 0
  STOPPED=1
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  if grep -q "^ERROR: " "$W"/*.log 2>/dev/null; then
    echo "   FAIL processes stopped cleanly: $(grep -l "^ERROR: " "$W"/*.log | xargs -n1 basename | tr '\n' ' ')logged: $(grep -h "^ERROR: " "$W"/*.log | sort -u | head -2)"
    FAILED=1
  fi
}
cleanup() {
  local rc=$? f
  if [ "$rc" != 0 ] && [ "$FAILED" = 0 ]; then echo "FAIL: exited early with status $rc" >&2; FAILED=1; fi
  stop_all
  if [ "$FAILED" != 0 ] || [ "${KEEP_LOGS:-0}" = 1 ]; then
    echo "logs kept in $W:"; for f in "$W"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
  else rm -rf "$W"; fi
  [ "$FAILED" = 0 ] || exit 1
}
trap cleanup EXIT
trap 'echo "FAIL: status $? from: $BASH_COMMAND (${BASH_SOURCE[0]}:$LINENO)" >&2' ERR

say() { [ "${QUIET:-0}" = 1 ] || echo "$@"; }
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Polls a condition (a readiness probe, not a timing assumption). Fails the example at once if
# a background process in PIDS has exited, and after 30 s as a hang guard.
wait_for() {
  local _ p
  for _ in $(seq 300); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    for p in "${PIDS[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "FAIL: process $p exited while waiting for: $1" >&2; FAILED=1; exit 1; }
    done
    sleep 0.1
  done
  echo "FAIL: timed out waiting for: $1" >&2; FAILED=1; exit 1
}
# Waits for a background process to exit on its own, and forgets it; its exit status.
reap() {
  local pid=$1 rc=0 kept=() p
  wait "$pid" 2>/dev/null || rc=$?
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
  PIDS=("${kept[@]+"${kept[@]}"}")
  return $rc
}
# Stops a background process (SIGTERM by default), waits for it, and forgets it. Its exit
# status, except that dying of the signal sent counts as 0.
stop() {
  local rc=0
  kill -"${2:-TERM}" "$1" 2>/dev/null || true
  reap "$1" || rc=$?
  [ "$rc" = $((128 + $(kill -l "${2:-TERM}"))) ] && rc=0
  return $rc
}
# A sidecar's listeners, from its start line in its log.
inbound_of() { grep -o "inbound [0-9.:]*" "$W/$1.log" | head -1 | cut -d' ' -f2; }
outbound_of() { grep -o "outbound [0-9.:]*" "$W/$1.log" | head -1 | cut -d' ' -f2; }
admin_of() { grep -o "admin http://[0-9.:]*" "$W/$1.log" | head -1 | cut -d' ' -f2; }
# The sum of a Prometheus metric's samples whose line starts with $2, from a sidecar's admin.
metric() { curl -s "$(admin_of "$1")/metrics" | awk -v m="$2" 'index($0, m)==1 {s+=$NF} END {print s+0}'; }
# check "what" ACTUAL OP EXPECTED — OP: = (equal), ~ (contains), >= (integers).
check() {
  local what=$1 actual=$2 op=$3 expected=$4 ok=0
  CHECKS=$((CHECKS + 1))
  case $op in
    =) [ "$actual" = "$expected" ] && ok=1 ;;
    '~') [[ "$actual" == *"$expected"* ]] && ok=1 ;;
    '>=') [ "$actual" -ge "$expected" ] 2>/dev/null && ok=1 ;;
    *) echo "check: unknown operator $op" >&2; exit 2 ;;
  esac
  if [ $ok = 1 ]; then echo "   ok   $what"
  else echo "   FAIL $what: expected $op $expected, got: $actual"; FAILED=1; fi
}
# Ends the example: stops its processes (checking they stop cleanly); exit status 1 if any
# check failed.
finish() {
  stop_all
  CHECKS=$((CHECKS + 1))
  if [ "$FAILED" = 0 ]; then echo "$1: $CHECKS checks passed"; else echo "$1: FAILED" >&2; exit 1; fi
}
