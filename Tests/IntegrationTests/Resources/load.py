#!/usr/bin/env python3
"""A small HTTP/1.1 load client for the sidecar tests: keep-alive connections, N requests,
a progress line every --progress requests, then one 'result {json}' line.

usage: load.py --target HOST:PORT --host users --path /user/1 --count 1000 [--concurrency 4]
"""
import argparse
import http.client
import json
import sys
import threading

p = argparse.ArgumentParser()
p.add_argument("--target", required=True)
p.add_argument("--host", required=True)
p.add_argument("--path", default="/user/1")
p.add_argument("--count", type=int, default=1000)
p.add_argument("--concurrency", type=int, default=4)
p.add_argument("--progress", type=int, default=100)
a = p.parse_args()
host, port = a.target.rsplit(":", 1)

lock = threading.Lock()
state = {"next": 0, "done": 0, "ok": 0, "statuses": {}, "errors": {}, "instances": {}}


def worker():
    conn = None
    while True:
        with lock:
            if state["next"] >= a.count:
                break
            state["next"] += 1
        status, err, inst = None, None, None
        for _ in range(2):  # one reconnect if the pooled connection was closed by the peer
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request("GET", a.path, headers={"Host": a.host})
                r = conn.getresponse()
                r.read()
                status, inst = r.status, r.getheader("x-instance") or r.getheader("x-users-instance")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                # A keep-alive connection the server closed while idle: safe to resend once.
                conn = None
                err = type(e).__name__
            except Exception as e:  # noqa: BLE001
                conn = None
                err = type(e).__name__
                break
        with lock:
            state["done"] += 1
            if status is not None:
                state["statuses"][str(status)] = state["statuses"].get(str(status), 0) + 1
                if status == 200:
                    state["ok"] += 1
                if inst:
                    state["instances"][inst] = state["instances"].get(inst, 0) + 1
            else:
                state["errors"][err] = state["errors"].get(err, 0) + 1
            if state["done"] % a.progress == 0:
                print(f"progress {state['done']}", flush=True)


threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("result " + json.dumps(state), flush=True)
