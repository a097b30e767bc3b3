-- A canary rollout steered by a Lua policy.
--
-- web's route to users runs the shipped policies/canary.lua: requests with `x-canary: 1`
-- and 10 % of the rest go to the cluster users-canary (one instance of the new version).
-- The policy runs in the simulator exactly as in the sidecar: the same file, the same
-- LuaJIT sandbox, its random choices seeded, its clock the virtual one. The new version
-- has a bug that fails 2 % of its requests; retries hide most of it, and the report shows
-- how much reached the canary.
return {
  name = "canary rollout steered by a Lua policy",
  duration_s = 30,
  services = {
    web = {
      instances = 2,
      sidecar = {
        routes = {
          { name = "users", host = "users", path = "/*", cluster = "users",
            retry = { attempts = 1, retry_on = "5xx" },
            policies = { { file = "../../policies/canary.lua", config = { cluster = "users-canary", percent = 10 } } } },
        },
      },
    },
    users = { instances = 3, latency_ms = { p50 = 5, p99 = 25 } },
    ["users-canary"] = { instances = 1, latency_ms = { p50 = 6, p99 = 30 }, errors = 0.02, error_status = 500 },
  },
  workload = {
    { from = "web", to = "users", path = "/user/1", rps = 400 },
    { from = "web", to = "users", path = "/user/2", rps = 20, headers = { ["x-canary"] = "1" } },
  },
  expect = {
    { route = "web->users", success_rate = 0.999, cluster_share = { cluster = "users-canary", min = 0.10, max = 0.20 } },
  },
}
