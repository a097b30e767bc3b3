import TandemCore

/// Everything a cluster's traffic decisions need, in one value: its endpoints with their
/// active-health and outlier state, the balancer, the breakers and the retry budget.
public struct ClusterConfig: Equatable, Sendable {
    public var name: String
    public var balancer: BalancerKind = .peakEWMA
    public var limits = ConcurrencyLimits()
    public var breaker = FailureBreaker.Config()
    public var outlier = OutlierDetector.Config()
    public var retryBudget = RetryBudget.Config()
    public var healthCheck: HealthCheckConfig? = nil
    /// Below this percentage of routable endpoints, balance across all of them (Envoy's
    /// panic threshold, 50 %), so a wave of ejections cannot take a whole cluster down.
    public var panicThresholdPercent = 50
    /// Prefer endpoints in this zone when any is routable.
    public var localZone: String? = nil
    public var connectTimeout: Nanos = .seconds(5)
    public init(name: String) { self.name = name }
}

public struct ClusterState: Sendable {
    public var config: ClusterConfig
    public private(set) var endpoints: [Endpoint] = []
    public private(set) var health: [String: HealthState] = [:] {
        didSet { unroutableByHealth = health.values.contains { !$0.isRoutable } }
    }
    /// Whether any endpoint fails its active checks (else routing looks none up).
    private var unroutableByHealth = false
    public var balancer: Balancer
    public var breaker: FailureBreaker
    public var gate: ConcurrencyGate
    public var outlier: OutlierDetector
    public var budget: RetryBudget

    public init(_ config: ClusterConfig) {
        self.config = config
        balancer = Balancer(config.balancer)
        breaker = FailureBreaker(config.breaker)
        gate = ConcurrencyGate(config.limits)
        outlier = OutlierDetector(config.outlier)
        budget = RetryBudget(config.retryBudget)
    }

    /// Replaces the endpoint set (from discovery); keeps the state of endpoints that stay.
    public mutating func setEndpoints(_ eps: [Endpoint]) {
        endpoints = eps.sorted { $0.id < $1.id }
        let ids = Set(eps.map(\.id))
        health = health.filter { ids.contains($0.key) }
        balancer.retain(ids)
        outlier.retain(ids)
    }

    public mutating func recordHealth(_ id: String, passed: Bool, error: String? = nil) -> Bool {
        guard let hc = config.healthCheck, endpoints.contains(where: { $0.id == id }) else { return false }
        var h = health[id] ?? HealthState()
        let changed = h.record(passed: passed, error: error, config: hc)
        health[id] = h
        return changed
    }

    /// Routable: registered as passing, not failing active checks, not ejected.
    public func isRoutable(_ ep: Endpoint, now: Nanos) -> Bool {
        ep.passing && (!unroutableByHealth || health[ep.id]?.isRoutable ?? true) && !outlier.isEjected(ep.id, now: now)
    }

    /// Picks an endpoint for an attempt, preferring ones not in `avoid`. With a `subset`, only
    /// endpoints whose metadata has all its pairs; the panic threshold applies within it.
    public mutating func choose(
        now: Nanos, avoid: [String] = [], hashKey: String? = nil, subset: [String: String] = [:],
        rng: inout SeededRandom
    )
        -> Endpoint?
    {
        if outlier.isDue(now: now) { _ = outlier.evaluate(hosts: endpoints.map(\.id), now: now) }
        let candidates =
            subset.isEmpty
            ? endpoints : endpoints.filter { ep in subset.allSatisfy { ep.metadata[$0.key] == $0.value } }
        guard !candidates.isEmpty else { return nil }
        // The common case, without building candidate lists: all routable, no zone
        // preference, nothing to avoid.
        if avoid.isEmpty, config.localZone == nil, candidates.allSatisfy({ isRoutable($0, now: now) }) {
            return balancer.pick(candidates, hashKey: hashKey, now: now, rng: &rng)
        }
        var routable = candidates.filter { isRoutable($0, now: now) }
        if routable.count * 100 < candidates.count * config.panicThresholdPercent {
            // Panic: too few look healthy; spread over those registered as passing (or all).
            let passing = candidates.filter(\.passing)
            routable = passing.isEmpty ? candidates : passing
        }
        if let zone = config.localZone {
            let local = routable.filter { $0.zone == zone }
            if !local.isEmpty { routable = local }
        }
        if !avoid.isEmpty {
            let fresh = routable.filter { !avoid.contains($0.id) }
            if !fresh.isEmpty { routable = fresh }
        }
        return balancer.pick(routable, hashKey: hashKey, now: now, rng: &rng)
    }

    /// Admission for a new request: the failure breaker and the request gate.
    public mutating func admit(now: Nanos) -> LocalReason? {
        guard breaker.allow(now: now) else { return .circuitOpen }
        guard gate.tryStartRequest() else { return .overflow }
        budget.recordRequest(now: now)
        return nil
    }

    public mutating func attemptStarted(_ endpoint: Endpoint) { balancer.attemptStarted(endpoint.id) }

    /// Feeds an attempt's outcome to the balancer and outlier detection.
    public mutating func attemptFinished(_ endpoint: Endpoint, _ outcome: AttemptOutcome, latency: Nanos, now: Nanos) {
        balancer.attemptFinished(endpoint.id, latency: latency, failed: outcome.isFailure, now: now)
        outlier.record(endpoint.id, outcome, hostCount: endpoints.count, now: now)
    }

    /// Decides after an attempt, for every proxy (HTTP/1.1, HTTP/2, TCP): the outcome goes to
    /// the balancer and outlier detection, the max_retries slot the request's previous retry
    /// held is released, then the retry policy and budget decide. A retry over max_retries
    /// outstanding is not made: the upstream's answer stands, or 503 `overflow` without one.
    public mutating func afterAttempt(
        _ ep: Endpoint, _ outcome: AttemptOutcome, latency: Nanos, now: Nanos, retry: inout RetryState,
        rng: inout SeededRandom
    ) -> RetryState.Next {
        attemptFinished(ep, outcome, latency: latency, now: now)
        if retry.holdsRetrySlot {
            gate.finishRetry()
            retry.holdsRetrySlot = false
        }
        let next = retry.after(outcome, now: now, budget: &budget, rng: &rng)
        guard case .retry = next else { return next }
        guard gate.tryStartRetry() else { return outcome.status == nil ? .giveUp(.overflow) : .finish }
        retry.holdsRetrySlot = true
        return next
    }

    /// Feeds the final outcome of an admitted request to the breaker and releases its slots
    /// (its request slot, and the retry slot its last retry still holds).
    public mutating func requestFinished(failed: Bool, latency: Nanos, now: Nanos, retry: RetryState? = nil) {
        gate.finishRequest()
        if retry?.holdsRetrySlot == true { gate.finishRetry() }
        breaker.record(failed: failed, latency: latency, now: now)
    }
}
