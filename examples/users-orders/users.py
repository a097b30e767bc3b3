#!/usr/bin/env python3
"""The seed's user service (chapters 1-2), in Python's standard library.

GET /user -> {"id":1,"name":"Alice"}; GET /user/<id>; POST /user with validation, answered
in the {code, message, data} envelope; GET /health. Test knobs (environment):
FAIL_RATE=0.2 answers that share of /user requests with 503 (POST /admin/fail-rate with a
number changes it while running); INSTANCE names the instance (default: TANDEM_INSTANCE).
"""
import json
import os
import random
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USERS = {1: {"id": 1, "name": "Alice"}, 2: {"id": 2, "name": "Bob"}}
FAIL_RATE = float(os.environ.get("FAIL_RATE", "0"))  # changed at run time by POST /admin/fail-rate
INSTANCE = os.environ.get("INSTANCE", os.environ.get("TANDEM_INSTANCE", "users"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-instance", INSTANCE)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            return self.send_json(200, {"status": "ok"})
        if path.startswith("/user") and FAIL_RATE > 0 and random.random() < FAIL_RATE:
            return self.send_json(503, {"code": 503, "message": "injected failure"})
        if path == "/user":
            return self.send_json(200, USERS[1])
        if path.startswith("/user/"):
            try:
                uid = int(path[len("/user/"):])
            except ValueError:
                return self.send_json(400, {"code": 400, "message": "id must be a number", "data": None})
            user = USERS.get(uid)
            if user is None:
                return self.send_json(404, {"code": 404, "message": "user not found", "data": None})
            return self.send_json(200, user)
        if path == "/echo-headers":
            return self.send_json(200, {k.lower(): v for k, v in self.headers.items()})
        self.send_json(404, {"code": 404, "message": "not found", "data": None})

    do_HEAD = do_GET

    def do_POST(self):
        global FAIL_RATE
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length) if length else b""
        if self.path == "/admin/fail-rate":
            FAIL_RATE = float(raw or b"0")
            return self.send_json(200, {"fail_rate": FAIL_RATE})
        if self.path.split("?")[0] != "/user":
            return self.send_json(404, {"code": 404, "message": "not found", "data": None})
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return self.send_json(400, {"code": 400, "message": "body must be JSON", "data": None})
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name.strip():
            return self.send_json(400, {"code": 400, "message": "name is required", "data": None})
        uid = max(USERS) + 1
        USERS[uid] = {"id": uid, "name": name.strip()}
        self.send_json(200, {"code": 0, "message": "ok", "data": USERS[uid]})


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop exits 0
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
