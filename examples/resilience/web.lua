-- The caller's sidecar in the resilience example (the seed's chapter 5): how it calls users.
return {
  routes = {
    { name = "users", host = "users", cluster = "users", timeout_ms = 3000,
      -- Retry gateway errors, resets and slow attempts on another instance, at most twice.
      retry = { attempts = 2, retry_on = "5xx,reset,connect-failure,per-try-timeout", per_try_timeout_ms = 250 },
      -- Degradation (降级): whatever users cannot answer becomes a fixed 200 from Lua.
      policies = { "../../policies/fallback.lua" } },
  },
  clusters = {
    users = {
      balancer = "round_robin",
      -- Retries may add at most 20% to the load (plus 10 a second): no retry storms.
      retry_budget = { ratio = 0.2, min_per_second = 10 },
      -- An instance with 3 failures in a row (5xx or timeouts) is ejected for 30 s (at most half).
      outlier = { consecutive_5xx = 3, ejection_ms = 30000, max_ejection_percent = 50 },
      -- Sentinel-style breaker: over 5 s, at least 10 requests and half of them failing opens
      -- it for 2 s; then a probe decides whether it closes.
      breaker = { error_ratio = 0.5, min_requests = 10, window_ms = 5000, open_ms = 2000, consecutive_failures = 0 },
    },
  },
}
