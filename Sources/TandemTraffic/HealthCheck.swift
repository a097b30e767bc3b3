import TandemCore

/// Active health checking settings (the seed's table: every 10 s, 1 s timeout, unhealthy after
/// 3 failures, healthy again after 2 successes), jittered so checks do not align.
public struct HealthCheckConfig: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// GET this path; 200–399 passes.
        case http(path: String)
        /// A TCP connect that succeeds passes.
        case tcp
        /// grpc.health.v1.Health/Check returning SERVING passes.
        case grpc(service: String)
    }

    public var kind: Kind = .http(path: "/health")
    public var interval: Nanos = .seconds(10)
    public var timeout: Nanos = .seconds(1)
    public var unhealthyThreshold = 3
    public var healthyThreshold = 2
    /// Each interval is stretched by up to this percentage at random.
    public var intervalJitterPercent = 10
    public init(kind: Kind = .http(path: "/health")) { self.kind = kind }
}

/// One target's health as the checker sees it.
public struct HealthState: Equatable, Sendable {
    public enum Status: String, Sendable { case unknown, healthy, unhealthy }
    public private(set) var status: Status = .unknown
    private var successes = 0
    private var failures = 0
    public private(set) var lastError: String? = nil
    /// Checks recorded, and whether any passed.
    public private(set) var checks = 0
    public private(set) var hasPassed = false

    public init() {}

    /// Feeds one check result. The first success marks an unknown target healthy at once
    /// (so a fresh instance takes traffic without waiting for `healthyThreshold` intervals);
    /// an unknown or healthy target turns unhealthy after `unhealthyThreshold` failures in a row.
    /// Returns true when the status changed.
    @discardableResult
    public mutating func record(passed: Bool, error: String? = nil, config: HealthCheckConfig) -> Bool {
        let before = status
        checks += 1
        if passed {
            hasPassed = true
            failures = 0
            successes += 1
            lastError = nil
            if status == .unknown || (status == .unhealthy && successes >= config.healthyThreshold) {
                status = .healthy
            }
        } else {
            successes = 0
            failures += 1
            lastError = error
            if status != .unhealthy && failures >= config.unhealthyThreshold { status = .unhealthy }
        }
        return status != before
    }

    public var isRoutable: Bool { status != .unhealthy }
}

extension HealthCheckConfig {
    /// The delay before the next check: the interval plus up to `intervalJitterPercent`.
    public func nextDelay(rng: inout SeededRandom) -> Nanos {
        let jitterMax = interval / 100 * Nanos(intervalJitterPercent)
        guard jitterMax > 0 else { return interval }
        return interval + Nanos(rng.next() % UInt64(jitterMax))
    }

    /// The start-up pace of a sidecar's own app: checked every 200 ms until it first passes (so
    /// it registers soon after it listens), for at most 300 checks (a minute).
    public static let startupPace: Nanos = .milliseconds(200)
    public static let startupChecks = 300

    /// The delay before the app's next check: the start-up pace while it has never passed (and
    /// the start-up checks last), else the jittered interval — healthy or not, as Envoy and
    /// Consul check, so an app that is down or never starts is not probed five times a second.
    public func nextAppDelay(after state: HealthState, rng: inout SeededRandom) -> Nanos {
        if !state.hasPassed && state.checks < Self.startupChecks { return min(Self.startupPace, interval) }
        return nextDelay(rng: &rng)
    }
}

/// A token bucket: up to `maxTokens`, `tokensPerFill` added every `fillInterval` (Envoy's
/// local rate limit shape). Requests that find it empty are answered 429.
public struct TokenBucket: Sendable {
    public struct Config: Equatable, Sendable {
        public var maxTokens: Int
        public var tokensPerFill: Int
        public var fillInterval: Nanos
        public init(maxTokens: Int, tokensPerFill: Int = 1, fillInterval: Nanos) {
            self.maxTokens = max(1, maxTokens)
            self.tokensPerFill = max(1, tokensPerFill)
            self.fillInterval = max(1, fillInterval)
        }
        /// `rps` requests per second with a burst of `burst` (default: one second's worth).
        public static func perSecond(_ rps: Int, burst: Int? = nil) -> Config {
            let r = max(1, rps)
            return Config(maxTokens: burst ?? r, tokensPerFill: 1, fillInterval: max(1, 1_000_000_000 / Nanos(r)))
        }
    }

    public let config: Config
    public private(set) var tokens: Int
    private var lastFill: Nanos?

    public init(_ config: Config) {
        self.config = config
        self.tokens = config.maxTokens
    }

    public mutating func tryTake(now: Nanos) -> Bool {
        if let last = lastFill {
            let fills = (now - last) / config.fillInterval
            if fills > 0 {
                let add = fills > Nanos(config.maxTokens) ? config.maxTokens : Int(fills) * config.tokensPerFill
                tokens = min(config.maxTokens, tokens + add)
                lastFill = last + fills * config.fillInterval
            }
        } else {
            lastFill = now
        }
        guard tokens > 0 else { return false }
        tokens -= 1
        return true
    }
}

/// Token buckets keyed by caller (per-caller fairness), bounded: the least recently used key
/// is dropped beyond `maxKeys`.
public struct KeyedRateLimiter: Sendable {
    public let config: TokenBucket.Config
    public let maxKeys: Int
    private var buckets: [String: (bucket: TokenBucket, lastUse: Nanos)] = [:]

    public init(_ config: TokenBucket.Config, maxKeys: Int = 10_000) {
        self.config = config
        self.maxKeys = max(1, maxKeys)
    }

    private var nextSweep: Nanos = 0

    /// A bucket unused this long has refilled completely: forgetting it changes nothing.
    var refillTime: Nanos {
        config.fillInterval * Nanos((config.maxTokens + config.tokensPerFill - 1) / max(1, config.tokensPerFill))
    }

    public mutating func tryTake(key: String, now: Nanos) -> Bool {
        var entry = buckets[key] ?? (TokenBucket(config), now)
        let ok = entry.bucket.tryTake(now: now)
        entry.lastUse = now
        buckets[key] = entry
        if buckets.count > maxKeys { evict(now: now, keep: key) }
        return ok
    }

    /// At most `maxKeys` buckets. Full buckets (idle for a refill time) go first, in one
    /// sweep at most every half refill time (so a flood of new keys costs O(1) per key, not a
    /// scan each); when every bucket is busy, an arbitrary other one goes (its key may burst
    /// once more — the bound on memory wins).
    private mutating func evict(now: Nanos, keep: String) {
        if now >= nextSweep {
            nextSweep = now + max(1, refillTime / 2)
            let refill = refillTime
            buckets = buckets.filter { $0.key == keep || now - $0.value.lastUse < refill }
        }
        while buckets.count > maxKeys, let victim = buckets.keys.first(where: { $0 != keep }) {
            buckets.removeValue(forKey: victim)
        }
    }

    public var keyCount: Int { buckets.count }
}
