import TandemCore

/// Conditions that make an attempt retriable (Envoy's `retry_on` names).
public struct RetryOn: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Any 5xx, plus resets, connect failures, refused streams and per-try timeouts.
    public static let fiveXX = RetryOn(rawValue: 1 << 0)
    /// 502, 503, 504, plus resets, connect failures and refused streams.
    public static let gatewayError = RetryOn(rawValue: 1 << 1)
    public static let reset = RetryOn(rawValue: 1 << 2)
    public static let connectFailure = RetryOn(rawValue: 1 << 3)
    public static let refusedStream = RetryOn(rawValue: 1 << 4)
    /// The statuses in `RetryPolicy.retriableStatusCodes`.
    public static let retriableStatusCodes = RetryOn(rawValue: 1 << 5)
    public static let grpcCancelled = RetryOn(rawValue: 1 << 6)
    public static let grpcDeadlineExceeded = RetryOn(rawValue: 1 << 7)
    public static let grpcResourceExhausted = RetryOn(rawValue: 1 << 8)
    public static let grpcUnavailable = RetryOn(rawValue: 1 << 9)
    public static let grpcInternal = RetryOn(rawValue: 1 << 10)
    /// Per-try timeout (Envoy folds it into `5xx`; named separately for `retry_on` lists).
    public static let perTryTimeout = RetryOn(rawValue: 1 << 11)

    static let names: [(String, RetryOn)] = [
        ("5xx", .fiveXX), ("gateway-error", .gatewayError), ("reset", .reset), ("connect-failure", .connectFailure),
        ("refused-stream", .refusedStream), ("retriable-status-codes", .retriableStatusCodes),
        ("cancelled", .grpcCancelled), ("deadline-exceeded", .grpcDeadlineExceeded),
        ("resource-exhausted", .grpcResourceExhausted), ("unavailable", .grpcUnavailable), ("internal", .grpcInternal),
        ("per-try-timeout", .perTryTimeout),
    ]

    /// Parses a comma-separated list such as `"5xx,reset"`; throws naming the unknown entry.
    public static func parse(_ s: String) throws(TrafficConfigError) -> RetryOn {
        var out: RetryOn = []
        for part in s.split(separator: ",").map({ $0.trimmingWhitespace() }) where !part.isEmpty {
            guard let hit = names.first(where: { $0.0 == part }) else {
                throw TrafficConfigError(
                    "unknown retry_on condition \"\(part)\"; expected one of \(names.map(\.0).joined(separator: ", "))")
            }
            out.insert(hit.1)
        }
        return out
    }
}

/// A config value that cannot be used; the message names what and why.
public struct TrafficConfigError: Error, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Substring {
    func trimmingWhitespace() -> String {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}

/// A route's retry policy. Defaults are safe: retries only what the upstream cannot have
/// processed or what it says is transient, once, on idempotent methods, within the budget.
public struct RetryPolicy: Equatable, Sendable {
    public var retryOn: RetryOn = [.connectFailure, .refusedStream, .reset, .retriableStatusCodes]
    public var retriableStatusCodes: Set<Int> = [503]
    /// Retries after the first attempt (Linkerd and Envoy: 1).
    public var numRetries = 1
    public var perTryTimeout: Nanos? = nil
    /// Full-jitter exponential backoff: attempt n waits uniform [0, min(max, base·2^(n-1))).
    public var backoffBase: Nanos = .milliseconds(25)
    public var backoffMax: Nanos = .milliseconds(250)
    /// Retry POST/PATCH and other non-idempotent methods too.
    public var retryNonIdempotent = false
    /// Request bodies up to this size are kept for replay; larger ones are never retried
    /// (Linkerd: 64 KiB).
    public var maxReplayBytes = 64 * 1024
    /// Prefer an endpoint not tried yet for this request.
    public var preferOtherHost = true

    public init() {}

    public static let idempotentMethods: Set<String> = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]

    /// Whether this outcome is one of the configured retry conditions.
    public func isRetriable(_ outcome: AttemptOutcome) -> Bool {
        switch outcome {
        case .connectFailure:
            return !retryOn.isDisjoint(with: [.connectFailure, .fiveXX, .gatewayError])
        case .reset:
            return !retryOn.isDisjoint(with: [.reset, .fiveXX, .gatewayError])
        case .refusedStream:
            return !retryOn.isDisjoint(with: [.refusedStream, .fiveXX, .gatewayError])
        case .timeout:
            return !retryOn.isDisjoint(with: [.perTryTimeout, .fiveXX])
        case .response(let status, let grpc):
            if retryOn.contains(.fiveXX) && status >= 500 { return true }
            if retryOn.contains(.gatewayError) && (status == 502 || status == 503 || status == 504) { return true }
            if retryOn.contains(.retriableStatusCodes) && retriableStatusCodes.contains(status) { return true }
            if let grpc {
                if grpc == 1 && retryOn.contains(.grpcCancelled) { return true }
                if grpc == 4 && retryOn.contains(.grpcDeadlineExceeded) { return true }
                if grpc == 8 && retryOn.contains(.grpcResourceExhausted) { return true }
                if grpc == 14 && retryOn.contains(.grpcUnavailable) { return true }
                if grpc == 13 && retryOn.contains(.grpcInternal) { return true }
            }
            return false
        }
    }

    /// Backoff before retry number `retry` (1-based), full jitter.
    public func backoff(retry: Int, rng: inout SeededRandom) -> Nanos {
        let shift = min(max(retry - 1, 0), 30)
        let ceiling = min(backoffMax, backoffBase << Nanos(shift))
        guard ceiling > 0 else { return 0 }
        return Nanos(rng.next() % UInt64(ceiling))
    }
}

/// Linkerd-style retry budget: over a sliding window (`ttl`), retries may be at most
/// `ratio` × requests plus `minPerSecond` × ttl. Shared by all routes of a cluster, so retries
/// can never multiply load by more than (1 + ratio) once traffic exceeds the floor.
public struct RetryBudget: Sendable {
    public struct Config: Equatable, Sendable {
        public var ratio: Double = 0.2
        public var minPerSecond: Int = 10
        public var ttl: Nanos = .seconds(10)
        public init(ratio: Double = 0.2, minPerSecond: Int = 10, ttl: Nanos = .seconds(10)) {
            self.ratio = ratio
            self.minPerSecond = minPerSecond
            self.ttl = ttl
        }
    }

    public let config: Config
    /// Ten buckets across the window.
    private var requests: [Int]
    private var retries: [Int]
    private var bucketStart: [Nanos]
    private let buckets = 10
    public private(set) var exhaustedCount = 0

    public init(_ config: Config = .init()) {
        self.config = config
        requests = Array(repeating: 0, count: buckets)
        retries = Array(repeating: 0, count: buckets)
        bucketStart = Array(repeating: Nanos.min, count: buckets)
    }

    private var bucketWidth: Nanos { max(1, config.ttl / Nanos(buckets)) }

    private mutating func bucket(_ now: Nanos) -> Int {
        let slot = now / bucketWidth
        let i = Int(((slot % Nanos(buckets)) + Nanos(buckets)) % Nanos(buckets))
        let start = slot * bucketWidth
        if bucketStart[i] != start {
            bucketStart[i] = start
            requests[i] = 0
            retries[i] = 0
        }
        return i
    }

    private func windowSums(_ now: Nanos) -> (requests: Int, retries: Int) {
        var rq = 0
        var rt = 0
        for i in 0..<buckets where bucketStart[i] != Nanos.min && now - bucketStart[i] < config.ttl {
            rq += requests[i]
            rt += retries[i]
        }
        return (rq, rt)
    }

    /// Counts an original request (not a retry).
    public mutating func recordRequest(now: Nanos) {
        requests[bucket(now)] += 1
    }

    /// Asks to spend one retry; true (and counted) if the budget allows it.
    public mutating func tryRetry(now: Nanos) -> Bool {
        let i = bucket(now)
        let (rq, rt) = windowSums(now)
        let floor = Double(config.minPerSecond) * Double(config.ttl) / 1e9
        let allowed = Double(rq) * config.ratio + floor
        if Double(rt) + 1 > allowed {
            exhaustedCount += 1
            return false
        }
        retries[i] += 1
        return true
    }

    public func inWindow(now: Nanos) -> (requests: Int, retries: Int) { windowSums(now) }
}

/// One request's attempt state: deadline, attempts so far, endpoints tried, and what to do
/// after each attempt's outcome.
public struct RetryState: Sendable {
    public enum Next: Equatable, Sendable {
        /// Give the client this outcome (success or non-retriable failure).
        case finish
        /// Wait this long, then try again (avoiding `tried` endpoints when possible).
        case retry(after: Nanos)
        /// Stop and answer locally.
        case giveUp(LocalReason)
    }

    public let policy: RetryPolicy
    public let deadline: Nanos?
    /// The method may be retried and the body fits the replay buffer.
    public let replayable: Bool
    /// The body fits the replay buffer (needed for any retry, even of a connect failure).
    public let bodyFits: Bool
    public private(set) var attempts = 0
    public private(set) var tried: [String] = []
    /// This request's retry holds one of the cluster's max_retries slots (see
    /// `ClusterState.afterAttempt`).
    public internal(set) var holdsRetrySlot = false

    /// `bodyBytes`: the buffered request body's size, or nil when it is streamed (never replayed).
    public init(policy: RetryPolicy, method: String, bodyBytes: Int?, start: Nanos, timeout: Nanos?) {
        self.policy = policy
        self.deadline = timeout.map { start + $0 }
        let methodOK = policy.retryNonIdempotent || RetryPolicy.idempotentMethods.contains(method.uppercased())
        let bodyOK = bodyBytes.map { $0 <= policy.maxReplayBytes } ?? false
        self.bodyFits = bodyOK
        self.replayable = methodOK && bodyOK
    }

    /// The timeout for the next attempt: the per-try timeout, cut to the overall deadline.
    public func attemptTimeout(now: Nanos) -> Nanos? {
        let remaining = deadline.map { max(0, $0 - now) }
        switch (policy.perTryTimeout, remaining) {
        case (nil, nil): return nil
        case (let t?, nil): return t
        case (nil, let r?): return r
        case (let t?, let r?): return min(t, r)
        }
    }

    public mutating func attemptStarted(endpoint: String) {
        attempts += 1
        tried.append(endpoint)
    }

    /// Decides after an attempt. Connect failures and refused streams never reached the app,
    /// so they are retried even for non-idempotent methods (the body must still be replayable).
    public mutating func after(
        _ outcome: AttemptOutcome, now: Nanos, budget: inout RetryBudget, rng: inout SeededRandom
    ) -> Next {
        let retriable = policy.isRetriable(outcome)
        guard retriable else { return .finish }
        let neverProcessed = outcome == .connectFailure || outcome == .refusedStream
        let canReplay = replayable || (neverProcessed && bodyFits)
        guard canReplay, attempts <= policy.numRetries else { return .finish }
        if let deadline, now >= deadline { return .finish }
        guard budget.tryRetry(now: now) else {
            // Keep the upstream's own answer when there is one; otherwise say why.
            return outcome.status == nil ? .giveUp(.retryBudgetExhausted) : .finish
        }
        var wait = policy.backoff(retry: attempts, rng: &rng)
        if let deadline { wait = min(wait, max(0, deadline - now)) }
        return .retry(after: wait)
    }
}
