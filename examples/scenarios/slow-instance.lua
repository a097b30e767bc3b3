-- A slow instance ejected by outlier detection.
--
-- orders calls users (three instances) at 500 requests a second with a 100 ms per-try
-- timeout and one retry. At 10 s users-2 turns fifty times slower. Its attempts time out;
-- each is retried on another instance, so callers barely notice; after five consecutive
-- failures (Envoy's consecutive_5xx default) every orders sidecar ejects users-2 for 30 s,
-- and the timeouts stop. At 40 s it is fast again and comes back after its ejection.
return {
  name = "slow instance ejected by outlier detection",
  duration_s = 60,
  services = {
    orders = {
      instances = 2,
      sidecar = {
        routes = {
          { name = "users", host = "users", path = "/*", cluster = "users", timeout_ms = 1000,
            retry = { attempts = 1, retry_on = "5xx,reset,connect-failure,per-try-timeout", per_try_timeout_ms = 100 } },
        },
        clusters = { users = { balancer = "round_robin", outlier = { consecutive_5xx = 5, ejection_ms = 30000 } } },
      },
    },
    users = { instances = 3, latency_ms = { p50 = 4, p99 = 20 } },
  },
  workload = {
    { from = "orders", to = "users", path = "/user/7", rps = 500 },
  },
  timeline = {
    { at_s = 10, slow = "users-2", factor = 50 },
    { at_s = 40, recover = "users-2" },
  },
  expect = {
    { instance = "users-2", ejected_within_ms = 2000 },
    { route = "orders->users", success_rate = 0.999, p99_ms = 150, ejections_min = 2, requests_min = 25000 },
  },
}
