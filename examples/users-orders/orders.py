#!/usr/bin/env python3
"""An orders service that calls the users service by name through its Tandem sidecar.

GET /order/<id> fetches http://users/user/<id> (urllib honours HTTP_PROXY, which
`tandem run` points at the sidecar's outbound listener) and answers the order with its user.
"""
import json
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, obj, extra=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            return self.send_json(200, {"status": "ok"})
        if path.startswith("/order/"):
            uid = path[len("/order/"):]
            try:
                with urllib.request.urlopen(f"http://users/user/{uid}", timeout=10) as r:
                    user = json.loads(r.read())
                    instance = r.headers.get("x-instance", "")
                return self.send_json(200, {"order": uid, "user": user}, {"x-users-instance": instance})
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")
                return self.send_json(502, {"code": 502, "message": f"users answered {e.code}", "data": body,
                                            "tandem-error": e.headers.get("tandem-error")})
            except Exception as e:  # noqa: BLE001
                return self.send_json(502, {"code": 502, "message": f"users unreachable: {e}"})
        self.send_json(404, {"code": 404, "message": "not found"})


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024  # listen backlog; the default 5 drops SYNs under load
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
