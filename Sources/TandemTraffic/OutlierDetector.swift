/// Envoy-style outlier detection for one cluster: consecutive 5xx, consecutive gateway
/// failures, success-rate (mean − factor·stdev) and failure-percentage ejection; ejection time
/// = base × times ejected, capped; never more than `maxEjectionPercent` (at least one host).
public struct OutlierDetector: Sendable {
    public struct Config: Equatable, Sendable {
        public var consecutive5xx: Int? = 5
        public var consecutiveGatewayFailure: Int? = nil  // Envoy: enforcing 0 % by default
        public var interval: Nanos = .seconds(10)
        public var baseEjectionTime: Nanos = .seconds(30)
        public var maxEjectionTime: Nanos = .seconds(300)
        public var maxEjectionPercent = 10
        public var successRateMinimumHosts = 5
        public var successRateRequestVolume = 100
        /// 1900 = 1.9 standard deviations (Envoy's unit).
        public var successRateStdevFactor = 1900
        public var enforceSuccessRate = true
        public var failurePercentageThreshold: Int? = nil  // Envoy: 85, enforcing 0 % by default
        public var failurePercentageMinimumHosts = 5
        public var failurePercentageRequestVolume = 50
        public init() {}
    }

    struct HostStats: Sendable {
        var consecutive5xx = 0
        var consecutiveGateway = 0
        var successes = 0
        var failures = 0
        var timesEjected = 0
        var ejectedUntil: Nanos? = nil
    }

    public let config: Config
    private var hosts: [String: HostStats] = [:]
    /// No host is ejected at or after this moment (the latest ejection's end): the routing
    /// check on every request needs no lookup while nobody is ejected.
    private var ejectionsEnd: Nanos = .min
    public private(set) var nextEvaluation: Nanos? = nil
    public private(set) var ejectionsTotal = 0

    public init(_ config: Config = .init()) { self.config = config }

    public func isEjected(_ id: String, now: Nanos) -> Bool {
        guard now < ejectionsEnd, let until = hosts[id]?.ejectedUntil else { return false }
        return now < until
    }

    public func timesEjected(_ id: String) -> Int { hosts[id]?.timesEjected ?? 0 }

    public func ejectedCount(now: Nanos) -> Int {
        hosts.values.filter { ($0.ejectedUntil ?? Nanos.min) > now }.count
    }

    /// Feeds one attempt's outcome. Returns true if it ejected `id`.
    @discardableResult
    public mutating func record(_ id: String, _ outcome: AttemptOutcome, hostCount: Int, now: Nanos) -> Bool {
        if nextEvaluation == nil { nextEvaluation = now + config.interval }
        // Updated in place: one lookup.
        func count(_ h: inout HostStats) -> HostStats {
            if outcome.isFailure {
                h.failures += 1
                let is5xx = (outcome.status ?? 500) >= 500
                h.consecutive5xx = is5xx ? h.consecutive5xx + 1 : 0
            } else {
                h.successes += 1
                h.consecutive5xx = 0
            }
            h.consecutiveGateway = outcome.isGatewayFailure ? h.consecutiveGateway + 1 : 0
            return h
        }
        let h = count(&hosts[id, default: HostStats()])
        var eject = false
        if let n = config.consecutive5xx, h.consecutive5xx >= n { eject = true }
        if let n = config.consecutiveGatewayFailure, h.consecutiveGateway >= n { eject = true }
        if eject && !isEjected(id, now: now) { return self.eject(id, hostCount: hostCount, now: now) }
        return false
    }

    private func ejectionAllowed(hostCount: Int, now: Nanos) -> Bool {
        let ejected = ejectedCount(now: now)
        let cap = max(1, hostCount * config.maxEjectionPercent / 100)
        return ejected < cap
    }

    private mutating func eject(_ id: String, hostCount: Int, now: Nanos) -> Bool {
        guard ejectionAllowed(hostCount: hostCount, now: now) else { return false }
        var h = hosts[id] ?? HostStats()
        h.timesEjected += 1
        let time = min(config.maxEjectionTime, config.baseEjectionTime * Nanos(h.timesEjected))
        h.ejectedUntil = now + time
        ejectionsEnd = max(ejectionsEnd, now + time)
        h.consecutive5xx = 0
        h.consecutiveGateway = 0
        hosts[id] = h
        ejectionsTotal += 1
        return true
    }

    /// Runs the interval sweep when due: success-rate and failure-percentage ejection over the
    /// counts since the last sweep; hosts that stay healthy for an interval after an ejection
    /// slowly earn back (times ejected decreases). Returns the ids ejected by this sweep.
    /// Whether `evaluate` would do anything now (lets callers skip building its host list).
    public func isDue(now: Nanos) -> Bool {
        guard let due = nextEvaluation else { return false }
        return now >= due
    }

    public mutating func evaluate(hosts ids: [String], now: Nanos) -> [String] {
        guard let due = nextEvaluation, now >= due else { return [] }
        nextEvaluation = now + config.interval
        var ejected: [String] = []
        let volumeOK = ids.filter { id in
            let h = hosts[id] ?? HostStats()
            return h.successes + h.failures >= config.successRateRequestVolume && !isEjected(id, now: now)
        }
        if config.enforceSuccessRate && volumeOK.count >= config.successRateMinimumHosts {
            let rates = volumeOK.map { id -> Double in
                let h = hosts[id]!
                return Double(h.successes) / Double(h.successes + h.failures)
            }
            let mean = rates.reduce(0, +) / Double(rates.count)
            let variance = rates.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(rates.count)
            let threshold = mean - Double(config.successRateStdevFactor) / 1000 * variance.squareRoot()
            for (id, rate) in zip(volumeOK, rates) where rate < threshold {
                if eject(id, hostCount: ids.count, now: now) { ejected.append(id) }
            }
        }
        if let pct = config.failurePercentageThreshold {
            let candidates = ids.filter { id in
                let h = hosts[id] ?? HostStats()
                return h.successes + h.failures >= config.failurePercentageRequestVolume && !isEjected(id, now: now)
            }
            if candidates.count >= config.failurePercentageMinimumHosts {
                for id in candidates {
                    let h = hosts[id]!
                    if h.failures * 100 / (h.successes + h.failures) >= pct,
                        eject(id, hostCount: ids.count, now: now)
                    {
                        ejected.append(id)
                    }
                }
            }
        }
        for id in ids {
            guard var h = hosts[id] else { continue }
            if let until = h.ejectedUntil, until <= now {
                h.ejectedUntil = nil
                if h.failures == 0 && h.timesEjected > 0 { h.timesEjected -= 1 }
            } else if h.ejectedUntil == nil, h.failures == 0, h.timesEjected > 0 {
                h.timesEjected -= 1
            }
            h.successes = 0
            h.failures = 0
            hosts[id] = h
        }
        return ejected
    }

    public mutating func retain(_ ids: Set<String>) {
        hosts = hosts.filter { ids.contains($0.key) }
    }
}
