/// Envoy's concurrency thresholds per cluster, with Envoy's defaults. A request over
/// `maxRequests` is answered 503 `overflow` at once; one that needs a new upstream connection
/// while `maxConnections` are open waits as pending (at most `maxPendingRequests`, 503
/// `overflow` beyond) until one closes; a retry over `maxRetries` outstanding is not made.
/// `maxRetries` nil: the retry budget governs alone (Envoy: a retry budget overrides
/// max_retries).
public struct ConcurrencyLimits: Equatable, Sendable {
    public var maxConnections = 1024
    public var maxPendingRequests = 1024
    public var maxRequests = 1024
    public var maxRetries: Int? = nil
    public init() {}
}

/// In-flight counters checked against `ConcurrencyLimits`.
public struct ConcurrencyGate: Sendable {
    public var limits: ConcurrencyLimits
    public private(set) var requests = 0
    public private(set) var retries = 0
    public private(set) var connections = 0
    public private(set) var pending = 0
    public private(set) var overflows = 0

    public init(_ limits: ConcurrencyLimits = .init()) { self.limits = limits }

    public mutating func tryStartRequest() -> Bool {
        guard requests < limits.maxRequests else {
            overflows += 1
            return false
        }
        requests += 1
        return true
    }

    public mutating func finishRequest() { requests = max(0, requests - 1) }

    public mutating func tryStartRetry() -> Bool {
        if let max = limits.maxRetries, retries >= max {
            overflows += 1
            return false
        }
        retries += 1
        return true
    }

    public mutating func finishRetry() { retries = max(0, retries - 1) }

    /// A new upstream connection may be opened (it is counted until `connectionClosed`).
    public mutating func tryOpenConnection() -> Bool {
        guard connections < limits.maxConnections else { return false }
        connections += 1
        return true
    }

    public mutating func connectionClosed() { connections = max(0, connections - 1) }

    /// A request may wait for a connection slot.
    public mutating func tryStartPending() -> Bool {
        guard pending < limits.maxPendingRequests else {
            overflows += 1
            return false
        }
        pending += 1
        return true
    }

    public mutating func finishPending() { pending = max(0, pending - 1) }
}

/// A failure breaker: closed → open → half-open probes → closed; the open time grows with
/// repeated trips (Linkerd's failure accrual backoff), capped.
///
/// Trip conditions (any that is configured): consecutive failures (Linkerd 7, Dapr 5);
/// error ratio and slow-call ratio over a rolling window with a minimum request count
/// (Sentinel / resilience4j).
public struct FailureBreaker: Sendable {
    public struct Config: Equatable, Sendable {
        public var consecutiveFailures: Int? = 5
        /// Trip when failures / requests ≥ this over `window` (with ≥ `minRequests`).
        public var errorRatio: Double? = nil
        /// Trip when slow calls / requests ≥ this, a call being slow above `slowCall`.
        public var slowCallRatio: Double? = nil
        public var slowCall: Nanos = .seconds(1)
        public var minRequests = 20
        public var window: Nanos = .seconds(10)
        /// First open period; doubles per consecutive trip up to `maxOpen`.
        public var baseOpen: Nanos = .seconds(5)
        public var maxOpen: Nanos = .seconds(60)
        /// Probes allowed concurrently while half-open; that many successes close it.
        public var halfOpenProbes = 1
        public init() {}
    }

    public enum State: Equatable, Sendable {
        case closed
        case open(until: Nanos)
        case halfOpen
    }

    public let config: Config
    public private(set) var state: State = .closed
    public private(set) var trips = 0
    private var consecutiveTrips = 0
    private var consecutive = 0
    private var probesInFlight = 0
    private var probeSuccesses = 0
    /// (time, failed, slow) per call within the window; bounded by `maxSamples`.
    private var samples: [(Nanos, Bool, Bool)] = []
    private var sampleHead = 0
    public static let maxSamples = 4096

    public init(_ config: Config = .init()) { self.config = config }

    public var stateName: String {
        switch state {
        case .closed: return "closed"
        case .open: return "open"
        case .halfOpen: return "half_open"
        }
    }

    /// May a request go through now? Moves open → half-open when the open period ends.
    public mutating func allow(now: Nanos) -> Bool {
        switch state {
        case .closed: return true
        case .open(let until):
            guard now >= until else { return false }
            state = .halfOpen
            probesInFlight = 0
            probeSuccesses = 0
            fallthrough
        case .halfOpen:
            guard probesInFlight < config.halfOpenProbes else { return false }
            probesInFlight += 1
            return true
        }
    }

    /// Feeds a finished call. Returns true when this call changed the state.
    @discardableResult
    public mutating func record(failed: Bool, latency: Nanos, now: Nanos) -> Bool {
        let slow = latency >= config.slowCall
        switch state {
        case .halfOpen:
            probesInFlight = max(0, probesInFlight - 1)
            if failed || (config.slowCallRatio != nil && slow) {
                trip(now)
                return true
            }
            probeSuccesses += 1
            if probeSuccesses >= config.halfOpenProbes {
                state = .closed
                consecutiveTrips = 0
                consecutive = 0
                samples.removeAll(keepingCapacity: true)
                sampleHead = 0
                return true
            }
            return false
        case .open:
            return false  // a call admitted before the trip finishing late
        case .closed:
            consecutive = failed ? consecutive + 1 : 0
            if let n = config.consecutiveFailures, consecutive >= n {
                trip(now)
                return true
            }
            guard config.errorRatio != nil || config.slowCallRatio != nil else { return false }
            if samples.count - sampleHead >= Self.maxSamples { sampleHead += 1 }
            samples.append((now, failed, slow))
            while sampleHead < samples.count && now - samples[sampleHead].0 > config.window { sampleHead += 1 }
            if sampleHead > 1024 {
                samples.removeFirst(sampleHead)
                sampleHead = 0
            }
            let n = samples.count - sampleHead
            guard n >= config.minRequests else { return false }
            var failures = 0
            var slows = 0
            for i in sampleHead..<samples.count {
                if samples[i].1 { failures += 1 }
                if samples[i].2 { slows += 1 }
            }
            if let r = config.errorRatio, Double(failures) / Double(n) >= r {
                trip(now)
                return true
            }
            if let r = config.slowCallRatio, Double(slows) / Double(n) >= r {
                trip(now)
                return true
            }
            return false
        }
    }

    private mutating func trip(_ now: Nanos) {
        let shift = min(consecutiveTrips, 20)
        let open = min(config.maxOpen, config.baseOpen << Nanos(shift))
        consecutiveTrips += 1
        trips += 1
        state = .open(until: now + open)
        consecutive = 0
        probesInFlight = 0
        samples.removeAll(keepingCapacity: true)
        sampleHead = 0
    }
}
