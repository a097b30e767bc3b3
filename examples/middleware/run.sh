#!/usr/bin/env bash
# The seed's middleware chain as Lua (examples/middleware/users.lua): request logging,
# X-Response-Time, input cleaning, response header injection, a hot-GET cache — plus gzip for
# large responses — in front of the users service, which implements none of it.
source "$(dirname "$0")/../lib.sh"
P=$(free_port); IN=$(free_port)
$T run --service users --app-port "$P" --inbound "127.0.0.1:$IN" --registry none \
  --config examples/middleware/users.lua -- $PY examples/users-orders/users.py "$P" > "$W/users.log" 2>&1 &
PIDS+=($!)
wait_for "curl -sf http://127.0.0.1:$IN/user"
hdr() { echo "$1" | tr -d '\r' | awk -F': ' -v h="$2" 'tolower($1)==h {print $2}'; }

say "== request id, X-Response-Time and injected response headers =="
h=$(curl -s -D - -o /dev/null "http://127.0.0.1:$IN/user/1")
say "   x-request-id $(hdr "$h" x-request-id), x-response-time $(hdr "$h" x-response-time), x-powered-by $(hdr "$h" x-powered-by)"
check "x-request-id minted" "$([ -n "$(hdr "$h" x-request-id)" ] && echo yes)" = yes
check "X-Response-Time stamped" "$(hdr "$h" x-response-time)" '~' ms
check "x-powered-by injected" "$(hdr "$h" x-powered-by)" = tandem
check "the app's server header removed" "$(hdr "$h" server)" = ""
h=$(curl -s -D - -o /dev/null -H "x-request-id: trace-42" "http://127.0.0.1:$IN/user/2")
check "a caller's request id is kept" "$(hdr "$h" x-request-id)" = trace-42

say "== input cleaning =="
r=$(curl -s "http://127.0.0.1:$IN/users?limit=%20%202%20&debug=1&q=al%00ice")
say "   GET /users?limit=%20%202%20&debug=1&q=al%00ice -> the app saw: $(echo "$r" | $PY -c 'import json,sys; print(json.load(sys.stdin)["data"]["query"])')"
check "args trimmed, stripped and allow-listed before the app" \
  "$(echo "$r" | $PY -c 'import json,sys; print(json.load(sys.stdin)["data"]["query"])')" = "limit=2&q=alice"
r=$(curl -s -w ' (%{http_code})' "http://127.0.0.1:$IN/users?q=$(printf 'x%.0s' $(seq 100))")
say "   an over-long argument: $r"
check "an over-long argument is refused 400" "$r" '~' '(400)'

say "== gzip for large responses =="
big=$(curl -s -D - -o "$W/big.gz" -H 'accept-encoding: gzip' "http://127.0.0.1:$IN/users?limit=200")
small=$(curl -s -D - -o /dev/null -H 'accept-encoding: gzip' "http://127.0.0.1:$IN/user/1")
plain=$(curl -s "http://127.0.0.1:$IN/users?limit=200" | wc -c)
say "   /users?limit=200: $plain bytes, $(wc -c < "$W/big.gz") gzipped; /user/1 (small) not compressed"
check "a large JSON answer is gzipped" "$(hdr "$big" content-encoding)" = gzip
check "and decodes to the full list" "$(gzip -dc "$W/big.gz" | $PY -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["users"]))')" = 200
check "a small one is not" "$(hdr "$small" content-encoding)" = ""

say "== hot-GET cache =="
a=$(curl -s -D - -o /dev/null "http://127.0.0.1:$IN/users?limit=3")
b=$(curl -s -D - -o /dev/null "http://127.0.0.1:$IN/users?limit=3")
say "   GET /users?limit=3 twice: x-cache $(hdr "$a" x-cache), then $(hdr "$b" x-cache)"
check "the first is a miss" "$(hdr "$a" x-cache)" = miss
check "the second identical GET is served from the cache" "$(hdr "$b" x-cache)" = hit
c=$(curl -s -D - -o /dev/null -X POST -H 'content-type: application/json' --data '{"name":"Zed"}' "http://127.0.0.1:$IN/user")
check "a POST is never cached" "$(hdr "$c" x-cache)" = ""

say "== request logging (the sidecar's log) =="
wait_for "grep -q 'POST /user -> 200' $W/users.log"
say "$(grep -- '-> ' "$W/users.log" | tail -3 | sed 's/^/   /')"
check "one line per request, with status and time" "$(grep -c -- ' -> ' "$W/users.log")" '>=' 10
check "health checks are not logged" "$(grep -c -- 'GET /health ->' "$W/users.log" || true)" = 0
finish "examples/middleware"
