-- The sidecar config of `web` in retry-storm.lua: the same file `tandem run --config` reads.
-- BUDGET=off swaps the retry budget for one that never says no (to show what it prevents).
local budget = { ratio = 0.2, min_per_second = 10 }
if env.BUDGET == "off" then budget = { ratio = 1, min_per_second = 1000000 } end
return {
  routes = {
    { name = "users", host = "users", path = "/*", cluster = "users", timeout_ms = 2000,
      retry = { attempts = 2, retry_on = "5xx,reset,connect-failure,per-try-timeout", per_try_timeout_ms = 250 } },
  },
  clusters = {
    users = {
      balancer = "least_request",
      -- This scenario is about retries: the breaker stays out of it.
      breaker = { consecutive_failures = 1000000 },
      retry_budget = budget,
    },
  },
}
