-- A retry storm held back by budgets.
--
-- web calls users at 2,500 requests a second, retrying timeouts and 5xx (two retries, a
-- 250 ms per-try timeout). At 10 s every users instance turns three times slower: users can
-- now serve about two thirds of the load, its queues grow, attempts time out — and each
-- timeout asks for a retry, which is more load on a service that is already drowning. The
-- retry budget (Linkerd's: retries ≤ 20 % of requests + 10/s) caps the extra load, so
-- attempts per request stay near 1.2 and users recovers as soon as it is fast again.
--
--   tandem sim examples/scenarios/retry-storm.lua
--   BUDGET=off tandem sim examples/scenarios/retry-storm.lua    # no budget: the storm, and a FAIL
return {
  name = "retry storm held back by budgets",
  duration_s = 30,
  services = {
    web = { instances = 2, sidecar = "configs/retry-storm-web.lua" },
    users = { instances = 3, latency_ms = { p50 = 10, p99 = 40 }, concurrency = 32, queue = 2000 },
  },
  workload = {
    { from = "web", to = "users", path = "/user/1", rps = 2500 },
  },
  timeline = {
    { at_s = 10, slow = "users-1", factor = 3 },
    { at_s = 10, slow = "users-2", factor = 3 },
    { at_s = 10, slow = "users-3", factor = 3 },
    { at_s = 20, recover = "users-1" },
    { at_s = 20, recover = "users-2" },
    { at_s = 20, recover = "users-3" },
  },
  expect = {
    { route = "web->users", amplification = 1.25, requests_min = 50000 },
  },
}
