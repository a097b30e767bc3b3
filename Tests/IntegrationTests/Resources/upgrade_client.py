#!/usr/bin/env python3
"""Upgrades a connection through a proxy and talks over it.

Sends an Upgrade: tandem-echo request with the first message in the same write (bytes that
follow the request head before the 101 must not be lost), prints the status line, then the
echo of each message. Usage: upgrade_client.py HOST:PORT SERVICE MESSAGE...
With the single message "-", the messages are the lines of stdin, each sent and echoed as it
arrives; the connection closes at the end of input. UPGRADE_PATH=/greet: the app sends a first
message with its 101 (printed as "greeting ...").
"""
import os
import socket
import sys

host, port = sys.argv[1].rsplit(":", 1)
service, args = sys.argv[2], sys.argv[3:]
messages = (line.rstrip("\n") for line in sys.stdin) if args == ["-"] else iter(args)
first = next(messages)
s = socket.create_connection((host, int(port)), timeout=10)
path = os.environ.get("UPGRADE_PATH", "/chat")
request = (
    f"GET {path} HTTP/1.1\r\nHost: {service}\r\nConnection: Upgrade\r\nUpgrade: tandem-echo\r\n\r\n"
).encode()
s.sendall(request + first.encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
head, _, rest = buf.partition(b"\r\n\r\n")
print("status", head.split(b"\r\n")[0].decode(), flush=True)
headers = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")[1:] if b":" in l}
print("upgrade", headers.get(b"upgrade", b"").decode(), flush=True)


def receive(label, want):
    """Prints the next `want` bytes from the tunnel (fewer if it closes first)."""
    global rest
    while len(rest) < want:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    print(label, rest[:want].decode(), flush=True)
    rest = rest[want:]


if path == "/greet":  # the app's first message came with its 101
    receive("greeting", len("WELCOME"))
receive("echo", len(first))
for m in messages:
    s.sendall(m.encode())
    receive("echo", len(m))
s.close()
