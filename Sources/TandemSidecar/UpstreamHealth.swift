import NIOConcurrencyHelpers
import NIOCore
import TandemConfig
import TandemCore
import TandemTraffic

/// Active health checks of upstream endpoints, for every cluster whose config has a
/// `health_check`: each round probes every endpoint at once (HTTP path, TCP connect or the
/// gRPC health protocol), feeds the results to the cluster's state in TandemTraffic (where
/// thresholds decide healthy/unhealthy and the balancer skips unhealthy endpoints), then waits
/// the jittered interval. One round at a time per cluster; a cluster whose check is removed
/// by a config reload stops at its next round.
final class UpstreamHealthChecker: Sendable {
    private struct State {
        var running: Set<String> = []
        var rng: SeededRandom
        var stopped = false
    }

    private let brain: TrafficBrain
    private let metrics: SidecarMetrics
    private let log: @Sendable (String) -> Void
    private let loop: any EventLoop
    private let state: NIOLockedValueBox<State>

    init(
        brain: TrafficBrain, metrics: SidecarMetrics, loop: any EventLoop, seed: UInt64,
        log: @escaping @Sendable (String) -> Void
    ) {
        self.brain = brain
        self.metrics = metrics
        self.loop = loop
        self.log = log
        state = NIOLockedValueBox(State(rng: SeededRandom(seed: seed)))
    }

    /// The clusters that want checks: configured ones, and known ones whose (default) config
    /// has a check.
    func wanted() -> [String] {
        brain.with { s in
            var names = Set(s.config.clusters.filter { $0.value.healthCheck != nil }.map(\.key))
            for (name, c) in s.clusters where c.config.healthCheck != nil { names.insert(name) }
            if s.config.defaultCluster.healthCheck != nil {
                for name in s.config.staticEndpoints.keys where s.config.clusters[name] == nil { names.insert(name) }
            }
            return names.sorted()
        }
    }

    /// Starts rounds for clusters that want checks and have none running.
    func sync() {
        let start = state.withLockedValue { s -> [String] in
            guard !s.stopped else { return [] }
            let new = wanted().filter { !s.running.contains($0) }
            s.running.formUnion(new)
            return new
        }
        for name in start { loop.execute { self.round(name) } }
    }

    func stop() { state.withLockedValue { $0.stopped = true } }

    private func round(_ name: String) {
        let (hc, endpoints) = brain.withCluster(name) { c, _ in (c.config.healthCheck, c.endpoints) }
        guard let hc, !state.withLockedValue({ $0.stopped }) else {
            state.withLockedValue { _ = $0.running.remove(name) }
            return
        }
        let probes = endpoints.map { ep in
            HealthProbe.run(hc.kind, host: ep.host, port: ep.port, timeout: .nanoseconds(hc.timeout), loop: loop)
                .map { (ep, $0) }
        }
        EventLoopFuture.whenAllComplete(probes, on: loop).whenComplete { outcome in
            for case .success(let (ep, r)) in (try? outcome.get()) ?? [] {
                let status = self.brain.withCluster(name) { c, _ -> HealthState.Status? in
                    c.recordHealth(ep.id, passed: r.passed, error: r.error) ? c.health[ep.id]?.status : nil
                }
                self.metrics.inc(
                    "tandem_upstream_health_checks_total", [("cluster", name), ("result", r.passed ? "pass" : "fail")])
                if let status {
                    self.log("upstream \(name) \(ep.address): \(status.rawValue)\(r.error.map { " (\($0))" } ?? "")")
                }
            }
            let delay = self.state.withLockedValue { hc.nextDelay(rng: &$0.rng) }
            self.loop.scheduleTask(in: .nanoseconds(delay)) { self.round(name) }
        }
    }
}
