import Synchronization

/// One line a policy logged (`tandem.log.*`), with the policy's name.
public struct PolicyLogLine: Sendable, Equatable {
    public enum Level: Int, Sendable, Comparable {
        case debug = 0, info, warn, error
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        public var name: String { ["debug", "info", "warn", "error"][rawValue] }
    }
    public var policy: String
    public var level: Level
    public var message: String
    public var fieldsJSON: String?
}

/// Why a policy call did not produce a decision or "continue".
public enum PolicyFailureReason: String, Sendable, CaseIterable {
    case error  // a runtime error, including a bad return value
    case instructions  // the instruction budget
    case timeout  // the wall-clock budget
    case memory  // the VM's memory cap
}

/// Counts per policy, for /metrics: calls, errors by reason, decisions by kind.
public struct PolicyCounters: Sendable, Equatable {
    public var invocations = 0
    public var errors: [PolicyFailureReason: Int] = [:]
    public var decisions: [String: Int] = [:]
    public var logsDropped = 0
}

/// What the VMs of one sidecar (or one test run) share: the clock, shared dicts, rate
/// limiters, declared metrics, counters and the log sink. Thread-safe: VMs on different event
/// loops call it concurrently; each operation holds the lock for a dictionary update.
public final class PolicyServices: Sendable {
    /// Epoch milliseconds; virtual in tests and the simulator.
    public let clock: @Sendable () -> Int64
    private let sink: @Sendable (PolicyLogLine) -> Void
    /// Log lines per policy per second before lines are dropped (and counted).
    public let logLinesPerSecond: Int
    public static let maxSharedDicts = 64
    public static let maxDictCapacity = 1_000_000

    struct State: ~Copyable {
        var dicts: [SharedDict] = []
        var dictIDs: [String: Int] = [:]
        var limiters = PolicyLimiters()
        var metrics = PolicyMetricRegistry()
        var counters: [(String, PolicyCounters)] = []
        var slots: [String: Int] = [:]
        var slotObjects: [Slot] = []
        var logWindows: [String: (second: Int64, lines: Int)] = [:]
    }
    let state = Mutex(State())

    public init(
        clock: @escaping @Sendable () -> Int64, logLinesPerSecond: Int = 100,
        sink: @escaping @Sendable (PolicyLogLine) -> Void
    ) {
        self.clock = clock
        self.sink = sink
        self.logLinesPerSecond = logLinesPerSecond
    }

    public func log(_ line: PolicyLogLine, now: Int64) {
        let allowed = state.withLock { s -> Bool in
            let second = now / 1000
            var w = s.logWindows[line.policy] ?? (second, 0)
            if w.second != second { w = (second, 0) }
            w.lines += 1
            s.logWindows[line.policy] = w
            if w.lines > logLinesPerSecond {
                if let i = s.slots[line.policy] { s.counters[i].1.logsDropped += 1 }
                return false
            }
            return true
        }
        if allowed { sink(line) }
    }

    /// A policy's counters: hook calls counted without a lock, the rest under it.
    final class Slot: Sendable {
        let index: Int
        let invocations = Atomic<Int>(0)
        init(index: Int) { self.index = index }
    }

    /// The counters' slot for a policy name (VMs resolve it once, at load).
    func slot(for policy: String) -> Slot {
        state.withLock { s in
            if let i = s.slots[policy] { return s.slotObjects[i] }
            s.slots[policy] = s.counters.count
            s.counters.append((policy, PolicyCounters()))
            s.slotObjects.append(Slot(index: s.counters.count - 1))
            return s.slotObjects[s.counters.count - 1]
        }
    }

    /// One hook call, and its decision or failure (the common call takes no lock).
    func count(slot: Slot, decision: String? = nil, failure: PolicyFailureReason? = nil) {
        slot.invocations.add(1, ordering: .relaxed)
        guard decision != nil || failure != nil else { return }
        state.withLock { s in
            if let decision { s.counters[slot.index].1.decisions[decision, default: 0] += 1 }
            if let failure { s.counters[slot.index].1.errors[failure, default: 0] += 1 }
        }
    }

    public var counters: [String: PolicyCounters] {
        state.withLock { s in
            var out: [String: PolicyCounters] = [:]
            for (i, (name, c)) in s.counters.enumerated() {
                var c = c
                c.invocations = s.slotObjects[i].invocations.load(ordering: .relaxed)
                out[name] = c
            }
            return out
        }
    }
    public var metrics: PolicyMetricRegistry { state.withLock { $0.metrics } }

    // MARK: shared dicts

    /// Declares a dict (a policy's `shared` table); the largest declared capacity wins.
    func declareDict(_ name: String, capacity: Int) -> String? {
        guard capacity >= 1, capacity <= Self.maxDictCapacity else {
            return "shared.\(name): capacity must be 1…\(Self.maxDictCapacity)"
        }
        return state.withLock { s -> String? in
            if let i = s.dictIDs[name] {
                s.dicts[i].grow(to: capacity)
                return nil
            }
            guard s.dicts.count < Self.maxSharedDicts else { return "more than \(Self.maxSharedDicts) shared dicts" }
            s.dictIDs[name] = s.dicts.count
            s.dicts.append(SharedDict(capacity: capacity))
            return nil
        }
    }

    /// A declared dict's id (policies resolve it once per dict).
    func dictID(_ name: String) -> Int? { state.withLock { $0.dictIDs[name] } }

    func withDict<R>(_ id: Int, _ body: (inout SharedDict) -> R) -> R? {
        state.withLock { s -> R? in
            guard s.dicts.indices.contains(id) else { return nil }
            return body(&s.dicts[id])
        }
    }

    // MARK: limiters and metrics

    func tokenBucket(
        _ key: PolicyLimiters.Key, rate: Double, burst: Double, now: Int64
    ) -> (
        ok: Bool, retryAfterMs: Int64, remaining: Int
    ) {
        state.withLock { $0.limiters.tokenBucket(key, rate: rate, burst: burst, now: now) }
    }

    func window(
        _ key: PolicyLimiters.Key, limit: Int, seconds: Double, now: Int64
    ) -> (
        ok: Bool, remaining: Int, resetSeconds: Double
    ) {
        state.withLock { $0.limiters.window(key, limit: limit, seconds: seconds, now: now) }
    }

    func declareMetric(
        policy: String, kind: String, name: String, labels: [String], buckets: [Double]
    )
        -> Result<Int, PolicyMetricRegistry.DeclareError>
    {
        state.withLock { $0.metrics.declare(policy: policy, kind: kind, name: name, labels: labels, buckets: buckets) }
    }

    func record(metric id: Int, _ value: Double, labels: [String]) {
        state.withLock { $0.metrics.record(id, value, labels: labels) }
    }

    /// Prometheus text for the policies' own metrics and the built-in counters.
    public func prometheus() -> String {
        let metrics = state.withLock { $0.metrics }
        let counters = self.counters
        var out = ""
        func esc(_ s: String) -> String {
            s.replacingOccurrences("\\", "\\\\").replacingOccurrences("\"", "\\\"").replacingOccurrences("\n", "\\n")
        }
        if !counters.isEmpty {
            out += "# TYPE tandem_policy_invocations_total counter\n"
            for (p, c) in counters.sorted(by: { $0.key < $1.key }) {
                out += "tandem_policy_invocations_total{policy=\"\(esc(p))\"} \(c.invocations)\n"
            }
            out += "# TYPE tandem_policy_errors_total counter\n"
            for (p, c) in counters.sorted(by: { $0.key < $1.key }) {
                for r in PolicyFailureReason.allCases {
                    out +=
                        "tandem_policy_errors_total{policy=\"\(esc(p))\",reason=\"\(r.rawValue)\"} \(c.errors[r] ?? 0)\n"
                }
            }
            out += "# TYPE tandem_policy_decisions_total counter\n"
            for (p, c) in counters.sorted(by: { $0.key < $1.key }) {
                for (k, n) in c.decisions.sorted(by: { $0.key < $1.key }) {
                    out += "tandem_policy_decisions_total{policy=\"\(esc(p))\",decision=\"\(k)\"} \(n)\n"
                }
            }
        }
        for m in metrics.metrics {
            let name = "tandem_policy_" + m.name
            out += "# TYPE \(name) \(m.kind)\n"
            for (values, s) in m.series.sorted(by: { $0.key.joined(separator: ",") < $1.key.joined(separator: ",") }) {
                var labels = "policy=\"\(esc(m.policy))\""
                for (k, v) in zip(m.labels, values) { labels += ",\(k)=\"\(esc(v))\"" }
                if m.kind == "counter" {
                    out += "\(name){\(labels)} \(format(s.value))\n"
                } else {
                    for (i, b) in m.buckets.enumerated() {
                        out += "\(name)_bucket{\(labels),le=\"\(format(b))\"} \(s.counts[i])\n"
                    }
                    out += "\(name)_bucket{\(labels),le=\"+Inf\"} \(s.count)\n"
                    out += "\(name)_sum{\(labels)} \(format(s.sum))\n\(name)_count{\(labels)} \(s.count)\n"
                }
            }
        }
        if metrics.droppedSamples > 0 {
            out += "# TYPE tandem_policy_metric_samples_dropped_total counter\n"
            out += "tandem_policy_metric_samples_dropped_total \(metrics.droppedSamples)\n"
        }
        return out
    }
}

func format(_ d: Double) -> String {
    d == d.rounded() && abs(d) < 1e15 ? String(Int64(d)) : String(d)
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String {
        guard contains(a) else { return self }
        return split(separator: a, omittingEmptySubsequences: false).joined(separator: b)
    }
}
