#!/usr/bin/env python3
"""A test app for the proxy's edge cases (standard library only).

GET /hold        waits until POST /release (GET /held: how many wait)
GET /health      200, or 503 after POST /admin/health with body 0 (1 heals it)
GET /slow?ms=N   answers after N ms (SLOW_MS in the environment delays every request)
GET /big?bytes=N a body of N bytes ("x" repeated), with content-length (&split_ms=M: the
                 head is sent alone, the body M ms later)
GET /headers[/…] the request's target and headers as JSON (what reached the app)
GET /chunked     "hello world" in chunks with extensions, and a trailer (x-checksum)
GET /unframed    "until close": no length, no chunks, the connection closes after it
HEAD /…          the head GET /big would have (content-length from ?bytes=, default 1000)
POST /upload     reads the body (content-length or chunked) and answers its size and sha256
Upgrade: tandem-echo (with Connection: upgrade) switches protocols with 101, then echoes
                 every byte it receives upper-cased, until the client closes; on /greet the
                 101 and "WELCOME" go out in one write.
Usage: edge_app.py PORT
"""
import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SLOW_MS = int(os.environ.get("SLOW_MS", "0"))
HEALTHY = True  # GET /health answers 200 or 503; POST /admin/health with 1 or 0 changes it
RELEASE = threading.Event()  # GET /hold waits for POST /release
HELD = [0]
HELD_LOCK = threading.Lock()
NAME = os.environ.get("INSTANCE", "edge")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-instance", NAME)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if SLOW_MS:
            time.sleep(SLOW_MS / 1000)
        url = urlparse(self.path)
        args = parse_qs(url.query)
        connection = [t.strip().lower() for t in self.headers.get("connection", "").split(",")]
        if "upgrade" in connection and self.headers.get("upgrade", "").lower() == "tandem-echo":
            return self.echo()
        if url.path == "/hold":
            with HELD_LOCK:
                HELD[0] += 1
            RELEASE.wait(30)
            with HELD_LOCK:
                HELD[0] -= 1
            return self.answer(200, b"released\n")
        if url.path == "/held":
            return self.answer(200, str(HELD[0]).encode())
        if url.path == "/health":
            return self.answer(200 if HEALTHY else 503, b"ok\n" if HEALTHY else b"sick\n")
        if url.path == "/slow":
            time.sleep(int(args.get("ms", ["1000"])[0]) / 1000)
            return self.answer(200, b"slow done\n")
        if url.path == "/headers" or url.path.startswith("/headers/"):
            seen = {"target": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                    "names": [k.lower() for k in self.headers.keys()]}
            return self.answer(200, json.dumps(seen).encode(), "application/json")
        if url.path == "/chunked":
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("trailer", "x-checksum")
            self.end_headers()
            for part in (b"hello", b" ", b"world"):
                self.wfile.write(b"%x;part=1\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\nx-checksum: 42\r\n\r\n")
            return
        if url.path == "/advertise":  # a 200 that offers other protocols (as some servers do)
            self.send_response(200)
            self.send_header("upgrade", "h2c")
            self.send_header("connection", "upgrade, keep-alive")
            self.send_header("keep-alive", "timeout=5")
            self.send_header("x-kept", "1")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            return
        if url.path == "/unframed":
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            self.wfile.write(b"until ")
            self.wfile.flush()
            self.wfile.write(b"close")
            self.close_connection = True
            return
        if url.path == "/big":
            body = b"x" * int(args.get("bytes", ["0"])[0])
            if "split_ms" in args:  # the head goes out alone, the body after a pause
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(int(args["split_ms"][0]) / 1000)
                self.wfile.write(body)
                return
            return self.answer(200, body)
        self.answer(200, b"edge " + NAME.encode() + b"\n")

    def do_HEAD(self):
        args = parse_qs(urlparse(self.path).query)
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", args.get("bytes", ["1000"])[0])
        self.end_headers()

    def do_POST(self):
        global HEALTHY
        if self.path == "/release":
            RELEASE.set()
            return self.answer(200, b"released\n")
        if self.path == "/admin/health":
            HEALTHY = self.rfile.read(int(self.headers.get("content-length", "0"))).strip() == b"1"
            return self.answer(200, b"healthy\n" if HEALTHY else b"sick\n")
        h = hashlib.sha256()
        n = 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    h.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("content-length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        self.answer(200, f"{n} {h.hexdigest()}\n".encode())

    def echo(self):
        if self.path == "/greet":  # the 101 and a first message in one write
            self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\n"
                             b"upgrade: tandem-echo\r\n\r\nWELCOME")
        else:
            self.send_response(101)
            self.send_header("connection", "Upgrade")
            self.send_header("upgrade", "tandem-echo")
            self.end_headers()
        self.wfile.flush()
        while True:
            data = self.rfile.read1(65536)  # bytes already buffered after the request come first
            if not data:
                break
            self.wfile.write(data.upper())
            self.wfile.flush()
        self.close_connection = True


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
