-- The registry under a storm of faults while the mesh runs on top of it.
--
-- A 5-member registry with skewed clocks (5 %) and duplicated peer messages (2 %). Three
-- application clients read, put and compare-and-swap three keys; three lock clients contend
-- for a lock; every instance registers and every sidecar watches. Faults: the leader
-- crashes, a follower's disk fails mid-write (losing what it had not synced), a one-way cut
-- between two members, the leader isolated from the others, a minority partition. Checked:
-- the application history is linearizable, watches are ordered, atomic and gap-free, no
-- lease expires while kept alive, lock holders never overlap — and the callers lose nothing.
return {
  name = "registry chaos under a live mesh",
  duration_s = 45,
  registry = { nodes = 5, clock_skew = 0.05 },
  network = { duplicate = 0.02 },
  services = {
    web = { instances = 2, sidecar = { routes = { { name = "users", host = "users", path = "/*", cluster = "users",
              retry = { attempts = 2, retry_on = "5xx,reset,connect-failure" } } } } },
    users = { instances = 3, latency_ms = { p50 = 4, p99 = 20 } },
  },
  workload = { { from = "web", to = "users", path = "/user/2", rps = 100, start_s = 4 } },
  kv = { clients = 3, keys = 3, think_ms = 50, start_s = 3 },
  locks = { { name = "reports", clients = 3, hold_ms = 50, think_ms = 100, ttl_s = 5, start_s = 3 } },
  timeline = {
    { at_s = 10, registry_crash = "leader", down_s = 3 },
    { at_s = 18, registry_disk_fault = "registry-2" },
    { at_s = 24, partition = { "registry-3", "registry-4" }, one_way = true },
    { at_s = 30, heal = true },
    { at_s = 32, registry_isolate = "leader", for_s = 4 },
    { at_s = 38, registry_minority = true, for_s = 5 },
  },
  expect = {
    { route = "web->users", success_rate = 0.999, requests_min = 3500 },
  },
}
