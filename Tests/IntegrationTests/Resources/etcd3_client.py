"""Drives a registry with Python's etcd3 client (Debian python3-etcd3), a library we did not
write. Prints one line per check: 'ok NAME' or 'FAIL NAME: detail'; exits 1 on any failure."""
import sys

import etcd3

host, port = sys.argv[1].rsplit(":", 1)
c = etcd3.client(host=host, port=int(port), timeout=10)
failures = 0


def check(name, cond, detail=""):
    global failures
    print(("ok " if cond else "FAIL ") + name + ("" if cond else ": " + detail), flush=True)
    if not cond:
        failures += 1


c.put("/py/a", "1")
c.put("/py/b", "2")
value, meta = c.get("/py/a")
check("put-get", value == b"1" and meta.key == b"/py/a", repr(value))
check("get-prefix", [v for v, _ in c.get_prefix("/py/")] == [b"1", b"2"])

# Watch from the revision of the first put: history first, then a live write.
events, cancel = c.watch_prefix("/py/", start_revision=meta.mod_revision)
c.put("/py/c", "3")
seen = []
for ev in events:
    seen.append((type(ev).__name__, ev.key, ev.value))
    if ev.key == b"/py/c":
        break
cancel()
check("watch", seen == [("PutEvent", b"/py/a", b"1"), ("PutEvent", b"/py/b", b"2"), ("PutEvent", b"/py/c", b"3")],
      repr(seen))

lease = c.lease(60)
c.put("/py/leased", "x", lease=lease)
check("lease-ttl", 0 < lease.remaining_ttl <= 60 and lease.granted_ttl == 60, repr(lease.remaining_ttl))
check("lease-keys", lease.keys == [b"/py/leased"], repr(lease.keys))
refreshed = lease.refresh()[0]
check("lease-refresh", refreshed.TTL == 60, repr(refreshed))
lease.revoke()
check("lease-revoke", c.get("/py/leased")[0] is None)

ok, _ = c.transaction(
    compare=[c.transactions.value("/py/a") == "1"],
    success=[c.transactions.put("/py/a", "11")],
    failure=[])
check("txn", ok and c.get("/py/a")[0] == b"11")

# python-etcd3 0.12's Lock.acquire breaks when it has to *wait* with Debian's tenacity (its
# wait callback has tenacity's old signature: TypeError). So contention is checked through
# the lock's key and the same compare-and-create transaction the library uses.
lock = c.lock("pylock", ttl=30)
check("lock-acquire", lock.acquire(timeout=5) and lock.is_acquired())
holder, _ = c.get("/locks/pylock")
check("lock-key", holder == lock.uuid, repr(holder))
taken, _ = c.transaction(
    compare=[c.transactions.create("/locks/pylock") == 0],
    success=[c.transactions.put("/locks/pylock", "intruder")],
    failure=[])
check("lock-exclusive", not taken and c.get("/locks/pylock")[0] == lock.uuid)
lock.release()
other = c.lock("pylock", ttl=30)
check("lock-handover", other.acquire(timeout=5) and c.get("/locks/pylock")[0] == other.uuid)
other.release()

c.delete_prefix("/py/")
check("delete-prefix", list(c.get_prefix("/py/")) == [])
members = list(c.members)
check("members", len(members) == 1 and members[0].name == "default", repr(members))
sys.exit(1 if failures else 0)
