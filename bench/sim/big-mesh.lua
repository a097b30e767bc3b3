-- The simulator's speed target (issue 7): 20 services × 3 instances, a 5-member registry,
-- 10 virtual minutes, about a million requests, with faults. Run: bench/sim/run.sh
--
-- gateway calls four front services; each front service calls two of the backends; the
-- backends answer. Every hop goes through the caller's sidecar (routes, retries, budgets,
-- breakers, outlier detection, peak-EWMA balancing). Faults: crashes and restarts, a slow
-- instance, a hung one, an error burst, a partition, and a rolling deploy.
local services = {}
local fronts = { "web", "mobile", "partners", "admin" }
local backends = {}
for i = 1, 15 do backends[i] = "svc" .. i end

services.gateway = {
  instances = 3,
  sidecar = { defaults = { retry = { attempts = 1, retry_on = "5xx,reset,connect-failure,per-try-timeout",
                                     per_try_timeout_ms = 300 } } },
}
for i, name in ipairs(fronts) do
  local a, b = backends[(i * 3) % 15 + 1], backends[(i * 7) % 15 + 1]
  services[name] = {
    instances = 3, latency_ms = { p50 = 2, p99 = 10 },
    calls = { { service = a, path = "/a" }, { service = b, path = "/b" } },
  }
end
for _, name in ipairs(backends) do
  services[name] = { instances = 3, latency_ms = { p50 = 3, p99 = 25 }, errors = 0.001 }
end

local workload = {}
for _, name in ipairs(fronts) do
  workload[#workload + 1] = { from = "gateway", to = name, path = "/", rps = 420, start_s = 3 }
end

return {
  name = "big mesh: 20 services × 3 instances, 10 minutes",
  duration_s = 600,
  registry = { nodes = 5 },
  services = services,
  workload = workload,
  timeline = {
    { at_s = 60, crash = "svc4-1" }, { at_s = 90, restart = "svc4-1" },
    { at_s = 120, slow = "svc7-2", factor = 20 }, { at_s = 240, recover = "svc7-2" },
    { at_s = 200, hang = "svc13-3" }, { at_s = 260, recover = "svc13-3" },
    { at_s = 300, errors = "svc10-1", rate = 0.5 }, { at_s = 330, recover = "svc10-1" },
    { at_s = 360, partition = { "mobile", "svc15-2" } }, { at_s = 380, heal = true },
    { at_s = 420, deploy = "svc8", step_s = 10 },
    { at_s = 500, loss = 0.001 },
    { at_s = 450, registry_crash = "leader", down_s = 20 },
    { at_s = 520, registry_minority = true, for_s = 30 },
  },
  expect = {
    { route = "gateway->web", requests_min = 200000 },
  },
}
