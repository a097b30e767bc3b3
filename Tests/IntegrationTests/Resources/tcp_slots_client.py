#!/usr/bin/env python3
"""Checks a TCP local upstream port whose cluster allows one connection.

Holds a first connection open (an HTTP request on it proves it reached the app), opens a
second (the sidecar must close it: no slot), closes the first, then connects until a new
connection is served again (bounded). Prints one line per step. Usage: tcp_slots_client.py PORT
"""
import socket
import sys
import time

port = int(sys.argv[1])
REQ = b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n"


def status(s):
    s.sendall(REQ)
    data = s.recv(65536)
    return data.split(b"\r\n")[0].decode() if data else "closed"


first = socket.create_connection(("127.0.0.1", port), timeout=10)
print("first", status(first), flush=True)
second = socket.create_connection(("127.0.0.1", port), timeout=10)
try:
    print("second", status(second), flush=True)
except (ConnectionResetError, BrokenPipeError):
    print("second closed", flush=True)
first.close()
for _ in range(200):  # the slot frees once the sidecar sees the first connection close
    third = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        answer = status(third)
    except (ConnectionResetError, BrokenPipeError):
        answer = "closed"
    if answer != "closed":
        print("third", answer, flush=True)
        break
    third.close()
    time.sleep(0.05)
else:
    print("third never served", flush=True)
