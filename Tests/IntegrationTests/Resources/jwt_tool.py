#!/usr/bin/env python3
"""Forges and signs JWTs for the identity tests with PyJWT (Debian's python3-jwt), an
implementation independent of Tandem's.

jwt_tool.py rsa-key DIR                      writes DIR/rsa.pem (private) and DIR/rsa.pub.pem
jwt_tool.py rs256 DIR CLAIMS_JSON            a token signed with DIR/rsa.pem (kid "k1")
jwt_tool.py jwks DIR                         the JWKS document of DIR/rsa.pub.pem (kid "k1")
jwt_tool.py hs-confusion DIR CLAIMS_JSON     HS256 keyed with the bytes of DIR/rsa.pub.pem
jwt_tool.py eddsa SEED_B64URL KID CLAIMS_JSON [TYP]   EdDSA with a raw 32-byte seed
jwt_tool.py none KID CLAIMS_JSON [TYP]       alg "none", empty signature
jwt_tool.py hs-with KEY KID CLAIMS_JSON [TYP] HS256 keyed with the string KEY
Claims: "exp": "+N" / "-N" are seconds from now; "iat": "now".
"""
import base64
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def claims(text):
    c = json.loads(text)
    now = int(time.time())
    for k, v in list(c.items()):
        if v == "now":
            c[k] = now
        elif isinstance(v, str) and v[:1] in "+-" and v[1:].isdigit():
            c[k] = now + int(v)
    return c


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def main():
    cmd = sys.argv[1]
    if cmd == "rsa-key":
        d = sys.argv[2]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        open(d + "/rsa.pem", "wb").write(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        open(d + "/rsa.pub.pem", "wb").write(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        print(d + "/rsa.pub.pem")
    elif cmd == "rs256":
        d = sys.argv[2]
        print(jwt.encode(claims(sys.argv[3]), open(d + "/rsa.pem", "rb").read(), algorithm="RS256",
                         headers={"kid": "k1"}))
    elif cmd == "jwks":
        d = sys.argv[2]
        pub = serialization.load_pem_public_key(open(d + "/rsa.pub.pem", "rb").read())
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))
        jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
        print(json.dumps({"keys": [jwk]}))
    elif cmd == "hs-confusion":
        d = sys.argv[2]
        pub = open(d + "/rsa.pub.pem", "rb").read()
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        payload = b64(json.dumps(claims(sys.argv[3])).encode())
        import hashlib
        import hmac
        sig = hmac.new(pub, (header + "." + payload).encode(), hashlib.sha256).digest()
        print(header + "." + payload + "." + b64(sig))
    elif cmd == "eddsa":
        seed = base64.urlsafe_b64decode(sys.argv[2] + "=" * (-len(sys.argv[2]) % 4))
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        typ = sys.argv[5] if len(sys.argv) > 5 else "tandem-id+jwt"
        print(jwt.encode(claims(sys.argv[4]), key, algorithm="EdDSA", headers={"kid": sys.argv[3], "typ": typ}))
    elif cmd == "none":
        typ = sys.argv[4] if len(sys.argv) > 4 else "tandem-id+jwt"
        header = b64(json.dumps({"alg": "none", "kid": sys.argv[2], "typ": typ}).encode())
        print(header + "." + b64(json.dumps(claims(sys.argv[3])).encode()) + ".")
    elif cmd == "hs-with":
        typ = sys.argv[5] if len(sys.argv) > 5 else "tandem-id+jwt"
        header = b64(json.dumps({"alg": "HS256", "kid": sys.argv[3], "typ": typ}).encode())
        payload = b64(json.dumps(claims(sys.argv[4])).encode())
        import hashlib
        import hmac
        sig = hmac.new(sys.argv[2].encode(), (header + "." + payload).encode(), hashlib.sha256).digest()
        print(header + "." + payload + "." + b64(sig))
    else:
        sys.exit("unknown command " + cmd)


main()
