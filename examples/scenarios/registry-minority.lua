-- A minority of the registry is cut off, and an instance crashes meanwhile.
--
-- 5 registry members. At 10 s the leader and one follower are cut off from the other three
-- for 15 s (clients still reach all five). The majority elects a new leader; the old one can
-- no longer commit anything. At 12 s users-2 crashes: its lease must expire on the majority's
-- leader and its key go, and the sidecars watching through the cut-off members (which lose
-- their leader, so their watches end: etcd's require-leader) reconnect to the majority to
-- see it. The callers' retries and outlier detection cover the gap.
return {
  name = "minority partition of the registry",
  duration_s = 45,
  -- Members' clocks run up to 5 % fast or slow; 2 % of their messages arrive twice.
  registry = { nodes = 5, clock_skew = 0.05 },
  network = { duplicate = 0.02 },
  services = {
    web = { instances = 3, sidecar = { routes = { { name = "users", host = "users", path = "/*", cluster = "users",
              retry = { attempts = 2, retry_on = "5xx,reset,connect-failure" } } } } },
    users = { instances = 3, latency_ms = { p50 = 4, p99 = 20 } },
  },
  workload = {
    { from = "web", to = "users", path = "/user/9", rps = 300, start_s = 4 },
  },
  timeline = {
    { at_s = 10, registry_minority = true, for_s = 15 },
    { at_s = 12, crash = "users-2" },
    { at_s = 30, restart = "users-2" },
  },
  expect = {
    { route = "web->users", success_rate = 0.999, requests_min = 10000 },
  },
}
