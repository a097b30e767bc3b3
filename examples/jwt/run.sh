#!/usr/bin/env bash
# The seed's JWT middleware (chapter 2.4), done by the sidecar: examples/jwt/users.lua protects
# GET /me and POST /user of the users service with HS256 bearer tokens, and a Lua policy
# (policies/jwt-gate.lua) requires the users:write scope to create users; the app only reads
# the verified claims from headers. Tokens come from examples/jwt/issue_token.py (PyJWT).
source "$(dirname "$0")/../lib.sh"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/other-secret"
P=$(free_port); IN=$(free_port)
say "== 1. the users service behind a sidecar that verifies end-user JWTs (no registry needed) =="
JWT_SECRET_FILE="$W/secret" $T run --service users --app-port "$P" --inbound "127.0.0.1:$IN" --registry none \
  --config examples/jwt/users.lua -- $PY examples/users-orders/users.py "$P" > "$W/users.log" 2>&1 &
PIDS+=($!)
wait_for "curl -sf http://127.0.0.1:$IN/user"
call() { curl -s -w ' (%{http_code})' "$@"; }
token() { $PY examples/jwt/issue_token.py "$@"; }
GOOD=$(token "$W/secret" 2 Bob)

say "== 2. public and protected routes =="
r=$(call "http://127.0.0.1:$IN/user/1"); say "   GET /user/1, no token:          $r"
check "public route needs no token" "$r" '~' '"name": "Alice"'
r=$(call "http://127.0.0.1:$IN/me"); say "   GET /me, no token:              $r"
check "missing token is 401 'missing token'" "$r" '~' '"message":"missing token"'
r=$(call -H "Authorization: Bearer not.a.jwt" "http://127.0.0.1:$IN/me"); say "   GET /me, garbage token:         $r"
check "a malformed token is 401 invalid-token" "$r" '~' '"error":"invalid-token"'
r=$(call -H "Authorization: Bearer $(token "$W/secret" 2 Bob -60)" "http://127.0.0.1:$IN/me")
say "   GET /me, expired token:         $r"
check "an expired token is 401 expired-token" "$r" '~' '"error":"expired-token"'
r=$(call -H "Authorization: Bearer $(token "$W/other-secret" 2 Bob)" "http://127.0.0.1:$IN/me")
say "   GET /me, another secret:        $r"
check "a token signed with another key is 401" "$r" '~' '(401)'
r=$(call -H "Authorization: Bearer $(token "$W/secret" 2 Bob 300 https://evil.example)" "http://127.0.0.1:$IN/me")
say "   GET /me, another issuer:        $r"
check "a token from another issuer is 401" "$r" '~' '(401)'
r=$(call -H "Authorization: Bearer $GOOD" "http://127.0.0.1:$IN/me"); say "   GET /me, valid token for sub 2: $r"
check "a valid token reaches the app, which sees its claims" "$r" '~' '"name": "Bob"'
r=$(call -H "Authorization: Bearer $GOOD" -H "x-user-id: 1" "http://127.0.0.1:$IN/me")
check "a client cannot set x-user-id itself" "$r" '~' '"name": "Bob"'
r=$(call -H "x-user-id: 1" "http://127.0.0.1:$IN/me")
check "... nor get past the gate with it" "$r" '~' '(401)'

say "== 3. POST /user needs a token with the users:write scope (a Lua policy on the claims); the app validates the body =="
r=$(call -X POST -H 'content-type: application/json' --data '{"name":"Eve"}' "http://127.0.0.1:$IN/user")
say "   POST /user, no token:           $r"
check "POST /user without a token is 401" "$r" '~' '(401)'
r=$(call -X POST -H "Authorization: Bearer $GOOD" -H 'content-type: application/json' --data '{"name":"Eve"}' \
  "http://127.0.0.1:$IN/user")
say "   POST /user, token without scope: $r"
check "the Lua gate wants the users:write scope" "$r" '~' '{"code":403,"message":"insufficient scope: needs users:write"} (403)'
WRITER=$(token "$W/secret" 2 Bob 300 tandem-example users:write)
r=$(call -X POST -H "Authorization: Bearer $WRITER" -H 'content-type: application/json' --data '{"name":"Eve"}' \
  "http://127.0.0.1:$IN/user")
say "   POST /user, users:write token:  $r"
check "POST /user with a users:write token creates the user" "$r" '~' '"code": 0, "message": "ok", "data": {"id": 3, "name": "Eve"}'
r=$(call -X POST -H "Authorization: Bearer $WRITER" -H 'content-type: application/json' --data '{"name":" "}' \
  "http://127.0.0.1:$IN/user")
check "the app's own validation still answers 400" "$r" '~' '"message": "name is required"'
say "   refusals counted by reason: $(curl -s "$(admin_of users)/metrics" | grep '^tandem_jwt_refused_total' | tr '\n' ' ')"
check "refusals are counted" "$(metric users tandem_jwt_refused_total)" '>=' 6
finish "examples/jwt"
