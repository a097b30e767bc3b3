import Foundation
import TandemConfig
import TandemCore
import TandemIdentity
import TandemTraffic
import Testing

@testable import TandemLua
@testable import TandemSimulation

/// The example scenarios in examples/scenarios, read as `tandem sim` reads them.
enum Scenarios {
    static let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("examples/scenarios")

    static func load(_ name: String, environment: [String: String] = [:]) throws -> MeshScenario {
        let path = dir.appendingPathComponent(name).path
        let source = try String(contentsOfFile: path, encoding: .utf8)
        return try ScenarioFile.load(
            source: source, file: path, environment: environment,
            readFile: { try? String(contentsOfFile: $0, encoding: .utf8) })
    }

    static func parse(_ source: String) throws(ScenarioFile.Error) -> MeshScenario {
        try ScenarioFile.load(source: source, file: "inline.lua", readFile: { _ in nil })
    }
}

@Suite("Mesh simulation: real traffic cores and Lua policies on virtual time")
struct MeshSimulationTests {
    @Test("determinism: the same seed gives the same trace hash and numbers; another seed another hash")
    func determinism() throws {
        let s = try Scenarios.load("canary.lua")
        let a = MeshSimulation.run(s, seed: 11)
        let b = MeshSimulation.run(s, seed: 11)
        let c = MeshSimulation.run(s, seed: 12)
        #expect(a.traceHash == b.traceHash)
        #expect(a.events == b.events)
        #expect(a.json == b.json)
        #expect(a.traceHash != c.traceHash)
        #expect(a.totalRequests > 10_000)
    }

    @Test("retry budget: amplification stays under the bound; without a budget the checker reports the storm")
    func retryBudget() throws {
        let good = MeshSimulation.run(try Scenarios.load("retry-storm.lua"), seed: 1)
        #expect(good.violations == [])
        let withBudget = try #require(good.route("web->users"))
        #expect(withBudget.amplification <= 1.25)
        #expect(good.retryBudgetExhausted["users", default: 0] > 0)

        let broken = MeshSimulation.run(try Scenarios.load("retry-storm.lua", environment: ["BUDGET": "off"]), seed: 1)
        let storm = try #require(broken.route("web->users"))
        #expect(!broken.passed)
        #expect(broken.violations.contains { $0.contains("retry amplification") })
        #expect(storm.amplification > withBudget.amplification + 0.3)
        #expect(storm.successRate < withBudget.successRate)
    }

    @Test("outlier detection: the slow instance is ejected; with ejection switched off the checker says so")
    func ejection() throws {
        let r = MeshSimulation.run(try Scenarios.load("slow-instance.lua"), seed: 3)
        #expect(r.violations == [])
        #expect((r.timeToEject["users-2"] ?? .max) <= 2_000)

        var s = try Scenarios.load("slow-instance.lua")
        let i = try #require(s.services.firstIndex { $0.name == "orders" })
        s.services[i].sidecar.clusters["users"]?.outlier.consecutive5xx = nil
        let broken = MeshSimulation.run(s, seed: 3)
        #expect(broken.violations.contains { $0.contains("users-2: never ejected") })
    }

    @Test("breaker and fallback policy: trips are counted, fallbacks keep success; no breaker fails the check")
    func breaker() throws {
        let r = MeshSimulation.run(try Scenarios.load("breaker-fallback.lua"), seed: 5)
        #expect(r.violations == [])
        let route = try #require(r.route("shop->recommendations"))
        #expect(route.local["circuit-open", default: 0] > 0)
        #expect(r.policyDecisions > 0)

        var s = try Scenarios.load("breaker-fallback.lua")
        let i = try #require(s.services.firstIndex { $0.name == "shop" })
        s.services[i].sidecar.clusters["recommendations"]?.breaker.consecutiveFailures = nil
        let broken = MeshSimulation.run(s, seed: 5)
        #expect(broken.violations.contains { $0.contains("breaker trips 0 < 2") })
    }

    @Test("a simulated sidecar's policies run on the instruction budget alone, the count hook always armed")
    func simulatedPoliciesHaveNoWallClock() throws {
        let vm = try MeshSimulation.policyVM(clockMs: { 0 }, seed: 1)
        #expect(vm.limits.timeMs == 0)
        try vm.load(id: 1, file: "p.lua", source: #"return { name = "p", on_request = function() end }"#)
        _ = vm.onRequest(
            1, PolicyExchange(method: "GET", path: "/", authority: "a", remoteAddress: "r", route: "r", headers: []))
        #expect(vm.countHookInstalled)
    }

    @Test("canary policy: about a tenth of requests plus the flagged ones reach the canary; 0 % is caught")
    func canary() throws {
        let r = MeshSimulation.run(try Scenarios.load("canary.lua"), seed: 2)
        #expect(r.violations == [])
        let route = try #require(r.route("web->users"))
        let share = Double(route.clusters["users-canary", default: 0]) / Double(route.requests)
        #expect(share > 0.10 && share < 0.20)

        var s = try Scenarios.load("canary.lua")
        let i = try #require(s.services.firstIndex { $0.name == "web" })
        var spec = try #require(s.services[i].sidecar.routePolicies["users"]?.first)
        spec.config = .table([.string("cluster"): .string("users-canary"), .string("percent"): .number(0)])
        s.services[i].sidecar.routePolicies["users"] = [spec]
        s.workloads.removeLast()  // no flagged requests either
        let broken = MeshSimulation.run(s, seed: 2)
        #expect(broken.violations.contains { $0.contains("share sent to users-canary 0.0") })
    }

    @Test("a clean rolling deploy loses nothing; a crash without retries is seen by the success-rate check")
    func deployAndCrash() throws {
        let r = MeshSimulation.run(try Scenarios.load("deploy.lua"), seed: 4)
        #expect(r.violations == [])
        #expect(r.deploys == 1 && r.crashes == 1 && r.leaseExpiries == 1)
        #expect(r.route("api->users")?.succeeded == r.route("api->users")?.requests)

        var s = try Scenarios.load("deploy.lua")
        let i = try #require(s.services.firstIndex { $0.name == "api" })
        s.services[i].sidecar.routes[0].retry.numRetries = 0
        let broken = MeshSimulation.run(s, seed: 4)
        #expect(broken.violations.contains { $0.contains("api->users: success rate") })
        #expect((broken.route("api->users")?.local["upstream-connect-failure"] ?? 0) > 0)
    }

    @Test("partitions: connects across a cut (both ways or one way) fail and are retried on the other side")
    func partitions() throws {
        let s = try Scenarios.parse(
            """
            return {
              duration_s = 20,
              services = {
                a = { instances = 1, sidecar = { routes = { { name = "b", host = "b", path = "/*", cluster = "b",
                      timeout_ms = 1000, retry = { attempts = 2, retry_on = "connect-failure,reset" } } },
                      clusters = { b = { balancer = "round_robin", connect_timeout_ms = 200,
                                         outlier = { consecutive_5xx = 1000 }, retry_budget = { ratio = 1 } } } } },
                b = { instances = 2 },
                c = { instances = 1, sidecar = { clusters = { b = { balancer = "round_robin",
                      outlier = { consecutive_5xx = 1000 }, retry_budget = { ratio = 1 } } } } },
              },
              workload = { { from = "a", to = "b", rps = 100 }, { from = "c", to = "b", rps = 100 } },
              timeline = { { at_s = 5, partition = { "a", "b-1" } }, { at_s = 5, partition = { "b-2", "c" }, one_way = true },
                           { at_s = 15, heal = true } },
              expect = { { route = "a->b", success_rate = 0.99 }, { route = "c->b", success_rate = 0.99 } },
            }
            """)
        let r = MeshSimulation.run(s, seed: 9)
        #expect(r.violations == [])
        #expect(r.partitions == 2)
        let ab = try #require(r.route("a->b"))
        let cb = try #require(r.route("c->b"))
        // Every request during the cut that picked the far instance needed a second attempt
        // (round-robin-ish balancing: about half of 10 s × 100/s).
        #expect(ab.attempts - ab.requests > 200)
        #expect(cb.attempts - cb.requests > 200)
        // Each of a's retried requests waited for the 200 ms connect timeout.
        #expect(ab.latencyMs(0.99) >= 200)
    }

    @Test("registry in the mesh: leader killed during a deploy, minority partition, lease storm — checkers hold")
    func registryScenarios() throws {
        let deploy = MeshSimulation.run(try Scenarios.load("registry-leader-deploy.lua"), seed: 2)
        #expect(deploy.violations == [])
        #expect(deploy.registryCrashes == 1 && deploy.deploys == 1)
        #expect(deploy.watchReconnects > 0)

        let minority = MeshSimulation.run(try Scenarios.load("registry-minority.lua"), seed: 2)
        #expect(minority.violations == [])
        // users-2's lease ran out on the majority's leader while the old leader was cut off.
        #expect(minority.leaseExpiries == 1)

        let storm = MeshSimulation.run(try Scenarios.load("lease-storm.lua"), seed: 2)
        #expect(storm.violations == [])
        #expect(storm.stormLeases == 10_000 && storm.stormKeysLeft == 0)

        let again = MeshSimulation.run(try Scenarios.load("registry-leader-deploy.lua"), seed: 2)
        #expect(again.traceHash == deploy.traceHash)
    }

    @Test("registry checkers catch deliberate defects: reordered watch streams, followers acking keep-alives")
    func registryCheckersFail() throws {
        // A defect shows only when the run exercises it: look over a few seeds.
        func violations(_ s: MeshScenario) -> [String] {
            (UInt64(1)...6).flatMap { MeshSimulation.run(s, seed: $0).violations }
        }
        var s = try Scenarios.load("registry-leader-deploy.lua")
        s.registry?.defectUnorderedWatchStreams = true
        #expect(violations(s).contains { $0.hasPrefix("watch order:") || $0.hasPrefix("watch gap:") })

        s = try Scenarios.load("registry-leader-deploy.lua")
        s.registry?.defectFollowersAckKeepAlives = true
        #expect(violations(s).contains { $0.hasPrefix("lease safety:") })

        s = try Scenarios.load("locks.lua")
        s.registry?.defectLockWithoutWaiting = true
        let greedy = MeshSimulation.run(s, seed: 1)
        #expect(greedy.violations.contains { $0.hasPrefix("lock mutual exclusion:") })
    }

    @Test("registry chaos: linearizable application history, watches, leases and locks under many faults")
    func registryChaos() throws {
        let s = try Scenarios.load("registry-chaos.lua")
        for seed: UInt64 in 1...3 {
            let r = MeshSimulation.run(s, seed: seed)
            #expect(r.violations == [], "seed \(seed)")
            #expect(r.kvOK > 500 && r.lockAcquisitions > 50, "seed \(seed)")
            #expect(r.registryCrashes == 2, "seed \(seed)")
        }
        // Reads answered from any member's own store are caught by the linearizability check.
        var broken = s
        broken.registry?.defectLocalReads = true
        var found = false
        for seed: UInt64 in 1...6 where !found {
            found = MeshSimulation.run(broken, seed: seed).violations.contains { $0.hasPrefix("linearizability:") }
        }
        #expect(found)
    }

    @Test("locks: the real lock recipe through a registry that loses its leader keeps mutual exclusion")
    func locks() throws {
        for seed: UInt64 in 1...3 {
            let r = MeshSimulation.run(try Scenarios.load("locks.lua"), seed: seed)
            #expect(r.violations == [], "seed \(seed)")
            #expect(r.lockAcquisitions > 200, "seed \(seed)")
        }
    }

    @Test("identity: real tokens verified by the callee's inbound gate; only orders passes users' allow rule")
    func identity() throws {
        let r = MeshSimulation.run(try Scenarios.load("identity.lua"), seed: 3)
        #expect(r.violations == [])
        let web = try #require(r.route("web->users"))
        #expect(r.identityRefusals == ["forbidden": web.requests])
        // 4 caller sidecars, tokens of 45 s renewed at 30 s, over 90 s: 3 each; a proof per request.
        #expect(r.tokensIssued == 12)
        #expect(r.proofsSigned == r.routes.reduce(0) { $0 + $1.attempts })

        // Without the allow rule the checker sees web get through.
        var s = try Scenarios.load("identity.lua")
        let i = try #require(s.services.firstIndex { $0.name == "users" })
        s.services[i].sidecar.inboundDefault.access = AccessRule()
        let open = MeshSimulation.run(s, seed: 3)
        #expect(open.violations.contains { $0.hasPrefix("web->users: success rate 1.0 > 0.0") })

        // Callers replaying one proof: the callee's replay cache refuses all but the first.
        s = try Scenarios.load("identity.lua")
        s.identity?.defectReuseProofs = true
        let replayed = MeshSimulation.run(s, seed: 3)
        #expect(replayed.violations.contains { $0.hasPrefix("orders->users: success rate") })
        #expect(replayed.identityRefusals["replayed-proof", default: 0] > 100)

        // A retry carries a fresh proof: with one users instance answering 10 % 503s, retries
        // go back to the instance that saw the first proof (each attempt used to reuse the
        // request's proof, and the retry was refused as replayed-proof). Both proof kinds.
        for kind in [ProofKind.mac, .signature] {
            s = try Scenarios.load("identity.lua")
            let u = try #require(s.services.firstIndex { $0.name == "users" })
            s.services[u].instances = 1
            s.services[u].behavior.errorRate = 0.1
            for o in s.services.indices { s.services[o].sidecar.identity.proofKind = kind }
            let retried = MeshSimulation.run(s, seed: 3)
            let orders = try #require(retried.route("orders->users"))
            #expect(orders.retries > 100, "\(kind)")
            #expect(retried.identityRefusals["replayed-proof", default: 0] == 0, "\(kind)")
            #expect(retried.proofsSigned == retried.routes.reduce(0) { $0 + $1.attempts }, "\(kind)")
        }
    }

    @Test("inbound side: per-caller rate limit and an inbound policy answer before the app")
    func inbound() throws {
        let r = MeshSimulation.run(try Scenarios.load("inbound.lua"), seed: 4)
        #expect(r.violations == [])
        let orders = try #require(r.route("orders->users"))
        #expect(orders.statuses[429, default: 0] == r.inboundRateLimited)
        #expect(r.route("admin->users")?.statuses[429] == nil)
        #expect(r.route("web->users")?.statuses.keys.sorted() == [503])

        // One bucket for everyone instead of one per caller: admin is limited too.
        var s = try Scenarios.load("inbound.lua")
        let i = try #require(s.services.firstIndex { $0.name == "users" })
        s.services[i].sidecar.inboundRateLimitKey = nil
        let shared = MeshSimulation.run(s, seed: 4)
        #expect(shared.violations.contains { $0.hasPrefix("admin->users: success rate") })
    }

    @Test("active health checks take a hung instance out of rotation; closed-loop clients see it")
    func healthChecks() throws {
        func scenario(healthCheck: Bool) throws -> MeshScenario {
            let hc =
                healthCheck
                ? "health_check = { path = \"/health\", interval_ms = 1000, timeout_ms = 200, unhealthy_threshold = 2, healthy_threshold = 2 },"
                : ""
            return try Scenarios.parse(
                """
                return {
                  duration_s = 40,
                  services = {
                    web = { instances = 1, sidecar = {
                      routes = { { name = "users", host = "users", path = "/*", cluster = "users", timeout_ms = 500,
                                   retry = { attempts = 0 } } },
                      clusters = { users = { \(hc) balancer = "round_robin", outlier = { consecutive_5xx = 1000000 } } } } },
                    users = { instances = 3 },
                  },
                  workload = { { from = "web", to = "users", path = "/", clients = 10, think_ms = 10 } },
                  timeline = { { at_s = 10, hang = "users-2" }, { at_s = 25, recover = "users-2" } },
                }
                """)
        }
        let with = MeshSimulation.run(try scenario(healthCheck: true), seed: 6)
        let without = MeshSimulation.run(try scenario(healthCheck: false), seed: 6)
        let timeoutsWith = with.route("web->users")?.local["timeout", default: 0] ?? 0
        let timeoutsWithout = without.route("web->users")?.local["timeout", default: 0] ?? 0
        // Without checks, a third of the closed-loop calls wait out the 500 ms timeout for 15 s;
        // with them, only until two probes have failed (about 2 s).
        #expect(timeoutsWithout > 100)
        #expect(timeoutsWith * 3 < timeoutsWithout)
        #expect(with.route("web->users")!.requests > without.route("web->users")!.requests)
    }

    @Test("scenario files: unknown keys, instances and services are errors naming the path")
    func scenarioErrors() {
        func error(_ src: String) -> String {
            do {
                _ = try Scenarios.parse(src)
                return "no error"
            } catch {
                return error.message
            }
        }
        #expect(error("return { services = { a = { instance = 2 } } }").contains("services.a.instance: unknown key"))
        #expect(
            error("return { services = { a = {} }, timeline = { { at_s = 1, crash = \"a-2\" } } }")
                .contains("timeline[1].crash: unknown instance \"a-2\""))
        #expect(
            error("return { services = { a = {} }, workload = { { from = \"x\", to = \"a\", rps = 1 } } }")
                .contains("workload[1].from: unknown service \"x\""))
        #expect(
            error("return { services = { a = {} }, workload = { { from = \"a\", to = \"a\" } } }")
                .contains("give either rps (open loop) or clients (closed loop)"))
        #expect(
            error("return { services = { a = { sidecar = { clusters = { b = { balancer = \"fastest\" } } } } } }")
                .contains("unknown \"fastest\""))
        #expect(error("return { services = { a = {} }, expect = { { route = \"a\" } } }").contains("caller->callee"))
        #expect(error("return { services = {} }").contains("services: a table of services"))
        #expect(
            error("return { services = { a = { instances = 0 } } }")
                .contains("services.a.instances: must be a whole number from 1 to 1000, got 0"))
        #expect(
            error("return { services = { a = {} }, timeline = { { at_s = 1, registry_crash = \"boss\" } } }")
                .contains("\"leader\" or a member name such as \"registry-2\""))
        #expect(error("return { registry = { nodes = 4 }, services = { a = {} } }").contains("1, 3, 5 or 7 members"))
    }

    @Test("latency distributions sample the quantiles they are given")
    func latencyQuantiles() {
        var rng = SeededRandom(seed: 1)
        let d = LatencyDistribution(p50: 10, p99: 100)
        var xs = (0..<100_000).map { _ in d.sample(&rng) }
        xs.sort()
        let p50 = Double(xs[50_000]) / 1e6
        let p99 = Double(xs[99_000]) / 1e6
        #expect(abs(p50 - 10) < 0.5)
        #expect(abs(p99 - 100) < 5)
        #expect(abs(naturalLog(10) - 2.302_585_092_994) < 1e-9)
    }
}
