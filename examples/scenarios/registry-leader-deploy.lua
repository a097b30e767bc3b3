-- The registry's leader is killed during a deploy.
--
-- Discovery here runs through a real 3-member registry (Raft, MVCC store and WAL on a
-- simulated disk). Every instance registers under a lease and keeps it alive; every sidecar
-- watches /tandem/services/ through one member. At 10 s users is redeployed one instance
-- every 4 s; at 13 s the registry leader crashes for 5 s. Deregistrations and registrations
-- in flight fail over to the new leader; watches on the dead member reconnect elsewhere and
-- re-list. Callers lose nothing, and the registry checkers hold: watch streams in order
-- without gaps, no lease expiring while kept alive.
return {
  name = "registry leader killed during a deploy",
  duration_s = 40,
  registry = { nodes = 3, clock_skew = 0.05 },
  services = {
    api = { instances = 2, sidecar = { routes = { { name = "users", host = "users", path = "/*", cluster = "users",
              retry = { attempts = 2, retry_on = "5xx,reset,connect-failure" } } } } },
    users = { instances = 3, latency_ms = { p50 = 5, p99 = 30 }, startup_ms = 800 },
  },
  workload = {
    { from = "api", to = "users", path = "/user/5", rps = 300, start_s = 4 },
  },
  timeline = {
    { at_s = 10, deploy = "users", step_s = 4 },
    { at_s = 13, registry_crash = "leader", down_s = 5 },
  },
  expect = {
    { route = "api->users", success_rate = 0.999, requests_min = 10000 },
  },
}
