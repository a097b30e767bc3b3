-- A rolling deploy nobody notices.
--
-- api calls users at 300 requests a second while users is redeployed one instance every
-- 5 s. Each instance stops the way `tandem run` stops on SIGTERM: it deregisters, keeps
-- serving for the drain grace (1 s) while the change reaches every caller's watch, closes
-- its listener, finishes what it has in flight, exits, starts again and registers once
-- up. No request fails. The crash of users-3 at 40 s is not clean: its registration
-- stays until the lease expires (10 s) and the callers' retries and outlier detection
-- carry the load meanwhile.
return {
  name = "rolling deploy with drain, then a crash",
  duration_s = 60,
  services = {
    api = {
      instances = 2,
      sidecar = {
        routes = {
          { name = "users", host = "users", path = "/*", cluster = "users",
            retry = { attempts = 2, retry_on = "5xx,reset,connect-failure" } },
        },
      },
    },
    users = { instances = 3, latency_ms = { p50 = 5, p99 = 30 }, startup_ms = 800 },
  },
  workload = {
    { from = "api", to = "users", path = "/user/3", rps = 300, end_s = 38 },
    { from = "api", to = "users", path = "/user/4", rps = 300, start_s = 39 },
  },
  timeline = {
    { at_s = 5, deploy = "users", step_s = 5 },
    { at_s = 40, crash = "users-3" },
  },
  expect = {
    { route = "api->users", success_rate = 1, requests_min = 15000 },
  },
}
