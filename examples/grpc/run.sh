#!/usr/bin/env bash
# The seed's chapter 3: a gRPC UserService with all four call modes, called through two Tandem
# sidecars. The server (examples/grpc/user_service.py) runs behind `tandem run` with a gRPC
# health check; the client runs behind its own `tandem run` and reaches the service on a local
# port (`--upstream users=PORT`) — it knows nothing about the mesh. The embedded registry is
# hosted by the server's sidecar.
source "$(dirname "$0")/../lib.sh"
S=$(free_port); L=$(free_port)
say "== 1. the UserService behind a sidecar (gRPC health check), registered in the embedded registry =="
$T run --service users --app-port "$S" --app-protocol grpc --health-grpc "" --health-interval 1 \
  --registry-data-dir "$W/registry" -- $PY examples/grpc/user_service.py server "$S" > "$W/users.log" 2>&1 &
PIDS+=($!)
wait_for "grep -q registered $W/users.log"
say "   $(grep -o 'registered /tandem/services/[^ ]*' "$W/users.log" | head -1)"

say "== 2. a client behind its own sidecar calls users on a local port: unary, server-, client- and bidi-streaming =="
# HTTP_PROXY is for HTTP/1.1 apps; this client dials the local port directly.
$T run --service web --app-port "$(free_port)" --upstream "users=$L" -- \
  env -u HTTP_PROXY -u http_proxy $PY examples/grpc/user_service.py client "127.0.0.1:$L" "127.0.0.1:$L" \
  > "$W/client.log" 2>&1
out=$(grep '^{' "$W/client.log" | tail -1)
field() { echo "$out" | $PY -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
say "   GetUser(1)                     -> $(field 'd["unary"]')   trailers $(field 'd["unary_trailers"]')"
say "   ListUsers(3), server stream    -> $(field '[u["name"] for u in d["server_stream"]]')"
say "   UploadUsers(5), client stream  -> $(field 'd["client_stream"]')"
say "   ChatStream, bidirectional      -> $(field 'd["bidi"]')"
say "   Fail                           -> $(field 'd["error"]')"
check "unary GetUser answered Alice" "$(field 'd["unary"]["name"]')" = Alice
check "trailers crossed both sidecars" "$(field 'd["unary_trailers"].get("x-served-by")')" = user-service
check "grpc-timeout crossed both sidecars (x-time-remaining)" "$(field '"x-time-remaining" in d["unary_trailers"]')" = True
check "server streaming: three users in order" "$(field '",".join(u["name"] for u in d["server_stream"])')" = Alice,Bob,Carol
check "client streaming: five messages received" "$(field 'd["client_stream"]["received"]')" = 5
check "bidirectional: each message echoed" "$(field '" ".join(d["bidi"])')" = "hi there !"
check "an error keeps its status, message and trailers" \
  "$(field 'd["error"]["code"] + "/" + d["error"]["details"] + "/" + d["error"]["trailers"]["x-served-by"]')" = \
  "NOT_FOUND/no such user/user-service"

say "== 3. the server's health turns NOT_SERVING: its sidecar marks it critical in the registry =="
$PY examples/grpc/user_service.py set-health "127.0.0.1:$S" false > /dev/null
wait_for "$T services --endpoints 127.0.0.1:2379 users | grep -q critical"
check "tandem services shows the instance critical" "$($T services --endpoints 127.0.0.1:2379 users)" '~' critical
$PY examples/grpc/user_service.py set-health "127.0.0.1:$S" true > /dev/null
wait_for "$T services --endpoints 127.0.0.1:2379 users | grep -q passing"
check "and passing again once it serves" "$($T services --endpoints 127.0.0.1:2379 users)" '~' passing
finish "examples/grpc"
