/// State policies share across requests and event loops — pure value types fed the time
/// (`now` in milliseconds), so the simulator and `tandem policy test` run them on a virtual clock.
/// `PolicyServices` wraps them in a lock for the VMs of a sidecar.

/// A value in a shared dict (OpenResty's `ngx.shared.DICT` holds the same three kinds).
public enum SharedValue: Equatable, Sendable {
    case string(String)
    case number(Double)
    case bool(Bool)
}

/// One shared dict: bounded entries, least recently used evicted first, per-entry TTL.
/// `set`/`add`/`incr` report `forcible` when they evicted a live entry to make room.
public struct SharedDict: Sendable {
    public private(set) var capacity: Int
    private struct Node: Sendable {
        var key: String
        var value: SharedValue
        var expiresAt: Int64?  // ms; nil = no TTL
        var prev: Int
        var next: Int
    }
    private var nodes: [Node] = []
    private var free: [Int] = []
    private var index: [String: Int] = [:]
    private var head = -1  // most recently used
    private var tail = -1  // least recently used

    public init(capacity: Int) { self.capacity = max(1, capacity) }

    public var count: Int { index.count }

    /// Raises the capacity (a reloaded policy declaring more); entries are kept.
    public mutating func grow(to newCapacity: Int) { capacity = max(capacity, newCapacity) }

    private mutating func unlink(_ i: Int) {
        let (p, n) = (nodes[i].prev, nodes[i].next)
        if p >= 0 { nodes[p].next = n } else { head = n }
        if n >= 0 { nodes[n].prev = p } else { tail = p }
    }
    private mutating func pushFront(_ i: Int) {
        nodes[i].prev = -1
        nodes[i].next = head
        if head >= 0 { nodes[head].prev = i }
        head = i
        if tail < 0 { tail = i }
    }
    private mutating func remove(_ i: Int) {
        unlink(i)
        index[nodes[i].key] = nil
        free.append(i)
    }

    /// The live entry for `key` (expired entries are dropped on the way), marked recently used.
    private mutating func live(_ key: String, now: Int64) -> Int? {
        guard let i = index[key] else { return nil }
        if let e = nodes[i].expiresAt, e <= now {
            remove(i)
            return nil
        }
        unlink(i)
        pushFront(i)
        return i
    }

    public mutating func get(_ key: String, now: Int64) -> SharedValue? {
        live(key, now: now).map { nodes[$0].value }
    }

    /// Remaining TTL in ms: nil when absent, -1 when it never expires.
    public mutating func ttl(_ key: String, now: Int64) -> Int64? {
        guard let i = live(key, now: now) else { return nil }
        return nodes[i].expiresAt.map { $0 - now } ?? -1
    }

    /// Stores `value`; `ttlMs` ≤ 0 or nil means no expiry. Returns whether a live entry was evicted.
    @discardableResult
    public mutating func set(_ key: String, _ value: SharedValue, ttlMs: Int64?, now: Int64) -> Bool {
        let expiry = ttlMs.flatMap { $0 > 0 ? now + $0 : nil }
        if let i = live(key, now: now) {
            nodes[i].value = value
            nodes[i].expiresAt = expiry
            return false
        }
        var forcible = false
        if index.count >= capacity {
            // Expired entries go first; otherwise the least recently used.
            var victim = tail
            var j = tail
            while j >= 0 {
                if let e = nodes[j].expiresAt, e <= now {
                    victim = j
                    break
                }
                j = nodes[j].prev
            }
            if nodes[victim].expiresAt.map({ $0 > now }) ?? true { forcible = true }
            remove(victim)
        }
        let node = Node(key: key, value: value, expiresAt: expiry, prev: -1, next: -1)
        let i: Int
        if let f = free.popLast() {
            nodes[f] = node
            i = f
        } else {
            nodes.append(node)
            i = nodes.count - 1
        }
        index[key] = i
        pushFront(i)
        return forcible
    }

    public enum AddResult: Equatable, Sendable {
        case stored(forcible: Bool)
        case exists
    }

    /// Stores only if absent (the `add` of a lock or a once-only marker).
    public mutating func add(_ key: String, _ value: SharedValue, ttlMs: Int64?, now: Int64) -> AddResult {
        if live(key, now: now) != nil { return .exists }
        return .stored(forcible: set(key, value, ttlMs: ttlMs, now: now))
    }

    public enum IncrError: Error, Equatable, Sendable {
        case notFound
        case notANumber
    }

    /// Adds `delta`; a missing key starts at `initial` (with `initialTTL`) when given, as
    /// ngx.shared.DICT:incr does.
    public mutating func incr(
        _ key: String, by delta: Double, initial: Double?, initialTTL: Int64?, now: Int64
    )
        -> Result<(value: Double, forcible: Bool), IncrError>
    {
        if let i = live(key, now: now) {
            guard case .number(let n) = nodes[i].value else { return .failure(.notANumber) }
            nodes[i].value = .number(n + delta)
            return .success((n + delta, false))
        }
        guard let initial else { return .failure(.notFound) }
        let forcible = set(key, .number(initial + delta), ttlMs: initialTTL, now: now)
        return .success((initial + delta, forcible))
    }

    public mutating func delete(_ key: String) {
        if let i = index[key] { remove(i) }
    }

    /// Sets a new TTL on a live entry; false if absent.
    public mutating func expire(_ key: String, ttlMs: Int64?, now: Int64) -> Bool {
        guard let i = live(key, now: now) else { return false }
        nodes[i].expiresAt = ttlMs.flatMap { $0 > 0 ? now + $0 : nil }
        return true
    }
}

/// Rate limiters keyed by the policy (its name's counter slot: versions of a policy share
/// them) and the policy's key: token buckets and fixed windows, with a bound on tracked keys
/// (idle keys dropped first; they carry no state worth keeping once full or past their window).
public struct PolicyLimiters: Sendable {
    public struct Key: Hashable, Sendable {
        public var policy: Int
        public var key: String
        public init(policy: Int, key: String) {
            self.policy = policy
            self.key = key
        }
    }
    public let maxKeys: Int
    private var buckets: [Key: (tokens: Double, at: Int64, rate: Double, burst: Double)] = [:]
    private var windows: [Key: (start: Int64, count: Int, seconds: Double)] = [:]

    public init(maxKeys: Int = 100_000) { self.maxKeys = max(1, maxKeys) }

    /// `rate` tokens per second, at most `burst`. Returns whether one was taken, the ms until
    /// one is available, and the tokens left.
    public mutating func tokenBucket(
        _ key: Key, rate: Double, burst: Double, now: Int64
    ) -> (
        ok: Bool, retryAfterMs: Int64, remaining: Int
    ) {
        let rate = max(rate, 1e-9)
        let burst = max(burst, 1)
        func take(_ b: inout (tokens: Double, at: Int64, rate: Double, burst: Double)) -> (Bool, Int64, Int) {
            b.tokens = min(burst, b.tokens + Double(max(0, now - b.at)) * rate / 1000)
            b.at = now
            b.rate = rate
            b.burst = burst
            if b.tokens >= 1 {
                b.tokens -= 1
                return (true, 0, Int(b.tokens))
            }
            return (false, Int64(((1 - b.tokens) * 1000 / rate).rounded(.up)), 0)
        }
        // A known key: one hash lookup, updated in place.
        if let i = buckets.index(forKey: key) { return take(&buckets.values[i]) }
        var b = (tokens: burst, at: now, rate: rate, burst: burst)
        let r = take(&b)
        store(key, b, now: now)
        return r
    }

    private mutating func store(
        _ key: Key, _ b: (tokens: Double, at: Int64, rate: Double, burst: Double), now: Int64
    ) {
        if buckets[key] == nil && buckets.count >= maxKeys {
            // Buckets that have refilled are indistinguishable from new ones.
            buckets = buckets.filter {
                Double(now - $0.value.at) * $0.value.rate / 1000 + $0.value.tokens < $0.value.burst
            }
            if buckets.count >= maxKeys, let k = buckets.min(by: { $0.value.at < $1.value.at })?.key {
                buckets[k] = nil
            }
        }
        buckets[key] = b
    }

    /// At most `limit` per fixed window of `seconds`. Returns whether allowed, how many remain,
    /// and the seconds until the window resets.
    public mutating func window(
        _ key: Key, limit: Int, seconds: Double, now: Int64
    ) -> (
        ok: Bool, remaining: Int, resetSeconds: Double
    ) {
        let span = Int64(max(seconds, 0.001) * 1000)
        let start = now - now % span
        var w = windows[key] ?? (start, 0, seconds)
        if w.start != start { w = (start, 0, seconds) }
        let ok = w.count < limit
        if ok { w.count += 1 }
        if windows[key] == nil && windows.count >= maxKeys {
            windows = windows.filter { $0.value.start + Int64($0.value.seconds * 1000) > now }
            if windows.count >= maxKeys, let k = windows.min(by: { $0.value.start < $1.value.start })?.key {
                windows[k] = nil
            }
        }
        windows[key] = w
        return (ok, max(0, limit - w.count), Double(start + span - now) / 1000)
    }
}

/// Metrics policies declare in `init`: counters and histograms with a bounded set of label
/// values each (`maxSeries`); samples past the bound are dropped and counted.
public struct PolicyMetricRegistry: Sendable {
    public struct Metric: Sendable {
        public let policy: String
        public let kind: String  // counter | histogram
        public let name: String
        public let labels: [String]
        public let buckets: [Double]
        public var series: [[String]: (value: Double, counts: [Int], sum: Double, count: Int)] = [:]
    }
    public static let maxSeries = 100
    public static let maxMetrics = 1000
    public private(set) var metrics: [Metric] = []
    public private(set) var droppedSamples = 0
    private var byName: [String: Int] = [:]

    public init() {}

    public enum DeclareError: Error, Equatable, Sendable {
        case badName(String)
        case tooMany
        case conflict(String)
    }

    /// Declaring the same metric again (another VM, a reload) returns the same id.
    public mutating func declare(
        policy: String, kind: String, name: String, labels: [String], buckets: [Double]
    )
        -> Result<Int, DeclareError>
    {
        let valid =
            !name.isEmpty && name.utf8.allSatisfy { $0 == 95 || (97...122).contains($0) || (48...57).contains($0) }
        guard valid, labels.allSatisfy({ !$0.isEmpty && $0.utf8.allSatisfy { $0 == 95 || (97...122).contains($0) } })
        else { return .failure(.badName(name)) }
        let key = policy + "/" + name
        if let i = byName[key] {
            let m = metrics[i]
            guard m.kind == kind, m.labels == labels else { return .failure(.conflict(name)) }
            return .success(i)
        }
        guard metrics.count < Self.maxMetrics else { return .failure(.tooMany) }
        let b =
            kind == "histogram"
            ? (buckets.isEmpty ? [5, 10, 25, 50, 100, 250, 500, 1000, 2500] : buckets.sorted()) : []
        metrics.append(Metric(policy: policy, kind: kind, name: name, labels: labels, buckets: b))
        byName[key] = metrics.count - 1
        return .success(metrics.count - 1)
    }

    public mutating func record(_ id: Int, _ value: Double, labels: [String]) {
        guard metrics.indices.contains(id) else { return }
        var m = metrics[id]
        let values = Array(
            (labels + Array(repeating: "", count: max(0, m.labels.count - labels.count))).prefix(m.labels.count))
        if m.series[values] == nil && m.series.count >= Self.maxSeries {
            droppedSamples += 1
            return
        }
        var s = m.series[values] ?? (0, Array(repeating: 0, count: m.buckets.count), 0, 0)
        if m.kind == "counter" {
            s.value += value
        } else {
            for (i, b) in m.buckets.enumerated() where value <= b { s.counts[i] += 1 }
            s.sum += value
            s.count += 1
        }
        m.series[values] = s
        metrics[id] = m
    }
}
