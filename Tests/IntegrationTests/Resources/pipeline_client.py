#!/usr/bin/env python3
"""Pipelines HTTP/1.1 requests: writes them all at once on one connection, then reads the
answers in order and prints one line per answer: its status and the target the app saw.

Requests: GET /headers/<i> for i in 0..N-1, with a POST /upload (body "pipelined-<i>") every
fifth, so bodies travel among the pipelined heads.
Usage: pipeline_client.py HOST:PORT SERVICE N
"""
import json
import socket
import sys

addr, service, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = addr.rsplit(":", 1)
out = bytearray()
for i in range(count):
    if i % 5 == 4:
        body = b"pipelined-%d" % i
        out += b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (service.encode(), len(body), body)
    else:
        out += b"GET /headers/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, service.encode())
s = socket.create_connection((host, int(port)), timeout=20)
s.sendall(bytes(out))
f = s.makefile("rb")
for i in range(count):
    status = f.readline().decode().strip()
    length = 0
    while True:
        line = f.readline().decode()
        if line in ("\r\n", ""):
            break
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = f.read(length)
    if body.startswith(b"{") and b'"target"' in body:
        seen = json.loads(body)["target"]
    else:
        seen = body.decode().strip()
    print(status, seen, flush=True)
