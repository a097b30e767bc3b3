-- Five clients contend for one lock while the registry loses its leader and a member is
-- cut off.
--
-- Each client runs Tandem's lock recipe (etcd's concurrency.Mutex, as `tandem lock` and
-- `etcdctl lock` do): a key under /locks/jobs with its session lease, ownership by the lowest
-- create revision, each waiter watching only its predecessor. They hold the lock for 100 ms,
-- think for 50 ms, and start again. Checked by the simulator: two clients never hold the lock
-- at once while the older holder's key exists; when a holder's session expires under it, the
-- next holder's fencing token is larger.
return {
  name = "lock contention through registry faults",
  duration_s = 40,
  registry = { nodes = 3 },
  services = { app = { instances = 1 } },
  locks = {
    { name = "jobs", clients = 5, hold_ms = 100, think_ms = 50, ttl_s = 5, start_s = 3 },
  },
  timeline = {
    { at_s = 12, registry_crash = "leader", down_s = 4 },
    { at_s = 25, registry_isolate = "registry-2", for_s = 5 },
  },
}
