#!/usr/bin/python3
"""Issues an HS256 end-user token with PyJWT (Debian's python3-jwt) — what a login service
would hand out. usage: issue_token.py SECRET_FILE SUB NAME [TTL_SECONDS] [ISSUER] [SCOPE]
A negative TTL gives a token that has already expired."""
import sys
import time

import jwt

secret = open(sys.argv[1], "rb").read().strip()
now = int(time.time())
ttl = int(sys.argv[4]) if len(sys.argv) > 4 else 300
claims = {"iss": sys.argv[5] if len(sys.argv) > 5 else "tandem-example", "aud": "users",
          "sub": sys.argv[2], "name": sys.argv[3], "iat": now, "exp": now + ttl}
if len(sys.argv) > 6:
    claims["scope"] = sys.argv[6]
print(jwt.encode(claims, secret, algorithm="HS256"))
