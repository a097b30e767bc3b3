#!/usr/bin/env python3
"""The seed's user service (chapters 1-2), in Python's standard library.

GET /user -> {"id":1,"name":"Alice"}; GET /user/<id>; GET /users?limit=N; POST /user with validation, answered
in the {code, message, data} envelope; GET /me (the user named by a verified JWT, see
examples/jwt); GET /health. Test knobs (environment):
FAIL_RATE=0.2 answers that share of /user requests with 503 (POST /admin/fail-rate with a
number changes it while running; POST /admin/delay with seconds slows /user answers;
POST /admin/health "down"/"up" fails the health check);
INSTANCE names the instance (default: TANDEM_INSTANCE).
"""
import json
import os
import random
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USERS = {1: {"id": 1, "name": "Alice"}, 2: {"id": 2, "name": "Bob"}}
FAIL_RATE = float(os.environ.get("FAIL_RATE", "0"))  # changed at run time by POST /admin/fail-rate
DELAY = 0.0  # POST /admin/delay with seconds slows every /user answer by that much
HEALTHY = True  # POST /admin/health with "down" makes GET /health answer 503, "up" undoes it
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
            if not HEALTHY:
                return self.send_json(503, {"status": "down"})
            return self.send_json(200, {"status": "ok"})
        if path.startswith("/user") and DELAY > 0:
            time.sleep(DELAY)
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
        if path == "/users":
            # A list large enough to be worth compressing; echoes the query it was given (to
            # show what a cleaning policy in front of it changed).
            query = self.path.partition("?")[2]
            args = dict(p.partition("=")[::2] for p in query.split("&") if p)
            try:
                limit = int(args.get("limit", "20"))
            except ValueError:
                return self.send_json(400, {"code": 400, "message": "limit must be a number", "data": None})
            users = [{"id": i, "name": f"user-{i}", "email": f"user-{i}@example.com"} for i in range(1, limit + 1)]
            return self.send_json(200, {"code": 0, "message": "ok", "data": {"query": query, "users": users}})
        if path == "/me":
            # Behind a sidecar that verifies end-user JWTs (examples/jwt): the verified `sub`
            # claim arrives as x-user-id; a client cannot set it (the sidecar strips it first).
            sub = self.headers.get("x-user-id")
            user = USERS.get(int(sub)) if sub and sub.isdigit() else None
            if user is None:
                return self.send_json(401, {"code": 401, "message": "no verified user", "data": None})
            return self.send_json(200, {"code": 0, "message": "ok", "data": user})
        if path == "/echo-headers":
            return self.send_json(200, {k.lower(): v for k, v in self.headers.items()})
        self.send_json(404, {"code": 404, "message": "not found", "data": None})

    do_HEAD = do_GET

    def do_POST(self):
        global FAIL_RATE, HEALTHY, DELAY
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length) if length else b""
        if self.path == "/admin/delay":
            DELAY = float(raw or b"0")
            return self.send_json(200, {"delay": DELAY})
        if self.path == "/admin/health":
            HEALTHY = raw.strip() != b"down"
            return self.send_json(200, {"healthy": HEALTHY})
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
    ThreadingHTTPServer.request_queue_size = 1024  # listen backlog; the default 5 drops SYNs under load
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
