-- users' own sidecar protects it: a rate limit per calling service, and an inbound policy.
--
-- users' sidecar config limits each calling service to 50 requests a second per instance
-- (`rate_limit.per = "caller"`, the caller known from its verified service token), and runs
-- the shipped policies/maintenance.lua in front of the app with only /user allowed. orders
-- sends 150/s to two users instances: a third to a half is answered 429 by users' sidecar
-- (quick 429s make an instance look fast to peak-EWMA balancing, so it gets more than its
-- share). admin's 20/s has its own bucket and all passes. web asks for /reports, which the
-- maintenance policy answers 503 without the app — until web's breaker opens.
return {
  name = "inbound rate limit per caller and an inbound policy",
  duration_s = 30,
  identity = true,
  services = {
    orders = { instances = 2 },
    admin = { instances = 1 },
    web = { instances = 1 },
    users = {
      instances = 2, latency_ms = { p50 = 4, p99 = 20 },
      sidecar = { inbound = {
        rate_limit = { rps = 50, per = "caller" },
        policies = { { file = "../../policies/maintenance.lua", config = { allow_paths = { "/user" } } } },
      } },
    },
  },
  workload = {
    { from = "orders", to = "users", path = "/user/1", rps = 150 },
    { from = "admin", to = "users", path = "/user/3", rps = 20 },
    { from = "web", to = "users", path = "/reports", rps = 5 },
  },
  expect = {
    { route = "orders->users", success_rate = 0.5, success_rate_max = 0.75 },
    { route = "admin->users", success_rate = 1 },
    { route = "web->users", success_rate_max = 0, requests_min = 100 },
  },
}
