-- Config of the orders sidecar in the demo (tandem run --config orders.lua).
-- Calls to the users service retry once on gateway errors, within the retry budget; the
-- breaker opens after 5 failures in a row; an instance with 3 5xx in a row is ejected.
-- Requests to orders itself pass three Lua policies from policies/ (paths are relative to this
-- file): an id for every request, the seed's X-Response-Time, and a maintenance switch that
-- keeps /order and /health open and answers everything else 503 from Lua.
return {
  -- orders is the edge of this mesh: callers without a service token (curl, browsers) are
  -- admitted as anonymous; its calls to users carry orders' token (users admits only orders).
  identity = { mode = "permissive" },
  inbound = {
    policies = {
      "../../policies/request-id.lua",
      "../../policies/response-time.lua",
      { file = "../../policies/maintenance.lua", config = { allow_paths = { "/order/", "/health" } } },
    },
  },
  routes = {
    { name = "users", host = "users", cluster = "users", timeout_ms = 3000,
      retry = { attempts = 1, retry_on = "gateway-error,connect-failure,reset" } },
  },
  clusters = {
    users = {
      balancer = "round_robin",
      breaker = { consecutive_failures = 5, open_ms = 1000 },
      outlier = { consecutive_5xx = 3, ejection_ms = 5000, max_ejection_percent = 50 },
    },
  },
}
