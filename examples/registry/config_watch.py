#!/usr/bin/python3
"""The seed's chapter 4.2 — a service reading its configuration from the registry and
following every change — with Python's etcd3 client (Debian's python3-etcd3), as the seed does
with Go's clientv3: Get once, then Watch from the revision after that read, so no change made
in between is missed.

usage: config_watch.py HOST:PORT KEY
Prints `config: VALUE (revision N)` at start and after every change, `config: deleted` on a
delete."""
import sys

import etcd3

host, port = sys.argv[1].rsplit(":", 1)
key = sys.argv[2]
c = etcd3.client(host=host, port=int(port), timeout=10)
resp = c.get_response(key)
value = resp.kvs[0].value.decode() if resp.kvs else "(unset)"
print(f"config: {value} (revision {resp.header.revision})", flush=True)
events, cancel = c.watch(key, start_revision=resp.header.revision + 1)
for ev in events:
    if isinstance(ev, etcd3.events.DeleteEvent):
        print(f"config: deleted (revision {ev.mod_revision})", flush=True)
    else:
        print(f"config: {ev.value.decode()} (revision {ev.mod_revision})", flush=True)
