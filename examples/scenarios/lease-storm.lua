-- An expiry storm of 10,000 leases.
--
-- At 5 s, 10,000 clients register through the leader and vanish: 10,000 leases of 5 s, each
-- with a key, never kept alive. The leader's lessor expires them all at once and revokes
-- them through Raft, while the mesh's own registrations keep their leases alive and traffic
-- flows. Checked: every storm key is gone (lease liveness), no service lease expires while
-- kept alive (lease safety), watches stay in order, and callers lose nothing.
return {
  name = "expiry storm of 10,000 leases",
  duration_s = 30,
  registry = { nodes = 3 },
  services = {
    web = { instances = 2 },
    users = { instances = 3, latency_ms = { p50 = 4, p99 = 20 } },
  },
  workload = {
    { from = "web", to = "users", path = "/user/1", rps = 200, start_s = 3 },
  },
  timeline = {
    { at_s = 5, lease_storm = 10000, ttl_s = 5 },
  },
  expect = {
    { route = "web->users", success_rate = 1, requests_min = 5000 },
  },
}
