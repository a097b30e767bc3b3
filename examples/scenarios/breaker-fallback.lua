-- Circuit breaking and degradation (the seed's chapter 5: 熔断 and 降级).
--
-- shop calls recommendations, which fails every request from 10 s to 25 s. shop's sidecar
-- trips its breaker after five consecutive failures and answers locally (503
-- circuit-open) while it is open, probing again after 5 s; the shipped
-- policies/fallback.lua turns those answers (and any 5xx) into a degraded 200 with a fixed
-- body. shop's callers keep getting answers; recommendations is not hammered while down.
return {
  name = "circuit breaking with a fallback answer",
  duration_s = 40,
  services = {
    shop = {
      instances = 2,
      sidecar = {
        routes = {
          { name = "recs", host = "recommendations", path = "/*", cluster = "recommendations", timeout_ms = 500,
            policies = { { file = "../../policies/fallback.lua" } } },
        },
        clusters = {
          recommendations = { breaker = { consecutive_failures = 5, open_ms = 5000 }, outlier = { consecutive_5xx = 1000 } },
        },
      },
    },
    recommendations = { instances = 2, latency_ms = { p50 = 8, p99 = 30 } },
  },
  workload = {
    { from = "shop", to = "recommendations", path = "/for/42", rps = 200 },
  },
  timeline = {
    { at_s = 10, errors = "recommendations-1", rate = 1, status = 503 },
    { at_s = 10, errors = "recommendations-2", rate = 1, status = 503 },
    { at_s = 25, recover = "recommendations-1" },
    { at_s = 25, recover = "recommendations-2" },
  },
  expect = {
    { route = "shop->recommendations", success_rate = 0.999, breaker_trips_min = 2, requests_min = 7000 },
  },
}
