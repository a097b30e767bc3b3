import NIOConcurrencyHelpers
import TandemCore
import TandemTraffic

/// Prometheus counters and histograms, rendered in the text exposition format.
/// Names follow Linkerd/Envoy habits with a `tandem_` prefix.
public final class SidecarMetrics: Sendable {
    /// Latency buckets in milliseconds.
    static let buckets: [Double] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]

    struct Histogram {
        var counts = [UInt64](repeating: 0, count: SidecarMetrics.buckets.count)
        var sum: Double = 0
        var count: UInt64 = 0
        mutating func observe(_ ms: Double) {
            // Cumulative buckets: every bound at or above the value counts it.
            var i = SidecarMetrics.buckets.count - 1
            while i >= 0, ms <= SidecarMetrics.buckets[i] {
                counts[i] += 1
                i -= 1
            }
            sum += ms
            count += 1
        }
    }

    /// The per-request series, keyed by value (no label string is built per request).
    struct RequestKey: Hashable {
        var side: String
        var route: String
        var cluster: String
        var status: Int
    }
    struct RouteKey: Hashable {
        var side: String
        var route: String
    }
    struct ClusterKey: Hashable {
        var side: String
        var cluster: String
    }

    struct State {
        var counters: [String: [String: UInt64]] = [:]  // name → labels → value
        var histograms: [String: [String: Histogram]] = [:]
        var requests: [RequestKey: UInt64] = [:]
        var durations: [RouteKey: Histogram] = [:]
        var attempts: [ClusterKey: UInt64] = [:]

        /// The per-request series folded into the generic ones (for rendering and queries).
        func merged() -> State {
            var s = self
            for (k, v) in requests {
                let l = SidecarMetrics.labels([
                    ("side", k.side), ("route", k.route), ("cluster", k.cluster), ("status", String(k.status)),
                ])
                s.counters["tandem_requests_total", default: [:]][l, default: 0] += v
            }
            for (k, v) in attempts {
                let l = SidecarMetrics.labels([("side", k.side), ("cluster", k.cluster)])
                s.counters["tandem_upstream_attempts_total", default: [:]][l, default: 0] += v
            }
            for (k, h) in durations {
                s.histograms["tandem_request_duration_ms", default: [:]][
                    SidecarMetrics.labels([("side", k.side), ("route", k.route)])] = h
            }
            s.requests = [:]
            s.attempts = [:]
            s.durations = [:]
            return s
        }
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    /// The storage key of a label set: names and raw values joined by NUL bytes (quoting is
    /// done once at render time, not on every request).
    static func labels(_ pairs: [(String, String)]) -> String {
        var key = ""
        for (i, (name, value)) in pairs.enumerated() {
            if i > 0 { key += "\u{0}" }
            key += name
            key += "\u{0}"
            key += value
        }
        return key
    }

    /// `name="value",…` from a storage key.
    static func render(labels key: String) -> String {
        guard !key.isEmpty else { return "" }
        let parts = key.split(separator: "\u{0}", omittingEmptySubsequences: false)
        var out: [String] = []
        var i = 0
        while i + 1 < parts.count {
            out.append("\(parts[i])=\(JSON.quote(String(parts[i + 1])))")
            i += 2
        }
        return out.joined(separator: ",")
    }

    public func inc(_ name: String, _ labels: [(String, String)] = [], by n: UInt64 = 1) {
        let l = Self.labels(labels)
        state.withLockedValue { $0.counters[name, default: [:]][l, default: 0] += n }
    }

    public func observe(_ name: String, _ labels: [(String, String)], ms: Double) {
        let l = Self.labels(labels)
        state.withLockedValue { $0.histograms[name, default: [:]][l, default: Histogram()].observe(ms) }
    }

    /// One finished request: its count by status, its duration and its upstream attempts,
    /// under one lock.
    func request(side: String, route: String, cluster: String, status: Int, ms: Double, attempts: Int) {
        state.withLockedValue { s in
            s.requests[RequestKey(side: side, route: route, cluster: cluster, status: status), default: 0] += 1
            s.durations[RouteKey(side: side, route: route), default: Histogram()].observe(ms)
            if attempts > 0 { s.attempts[ClusterKey(side: side, cluster: cluster), default: 0] += UInt64(attempts) }
        }
    }

    public func counter(_ name: String, _ labels: [(String, String)] = []) -> UInt64 {
        let l = Self.labels(labels)
        return state.withLockedValue { $0.merged() }.counters[name]?[l] ?? 0
    }

    /// Sum of a counter over all label sets.
    public func total(_ name: String) -> UInt64 {
        state.withLockedValue { $0.merged() }.counters[name]?.values.reduce(0, +) ?? 0
    }

    /// The exposition text; `gauges` are appended as given (name, labels, value).
    public func render(gauges: [(String, [(String, String)], Double)]) -> String {
        let s = state.withLockedValue { $0 }.merged()
        var out = ""
        for name in s.counters.keys.sorted() {
            out += "# TYPE \(name) counter\n"
            for (key, v) in s.counters[name]!.sorted(by: { $0.key < $1.key }) {
                let l = Self.render(labels: key)
                out += l.isEmpty ? "\(name) \(v)\n" : "\(name){\(l)} \(v)\n"
            }
        }
        for name in s.histograms.keys.sorted() {
            out += "# TYPE \(name) histogram\n"
            for (key, h) in s.histograms[name]!.sorted(by: { $0.key < $1.key }) {
                let l = Self.render(labels: key)
                let sep = l.isEmpty ? "" : ","
                for (i, b) in Self.buckets.enumerated() {
                    out += "\(name)_bucket{\(l)\(sep)le=\"\(Int(b))\"} \(h.counts[i])\n"
                }
                out += "\(name)_bucket{\(l)\(sep)le=\"+Inf\"} \(h.count)\n"
                out += "\(name)_sum{\(l)} \(h.sum)\n"
                out += "\(name)_count{\(l)} \(h.count)\n"
            }
        }
        var seen = Set<String>()
        for (name, labels, value) in gauges {
            if seen.insert(name).inserted { out += "# TYPE \(name) gauge\n" }
            let l = Self.render(labels: Self.labels(labels))
            out += l.isEmpty ? "\(name) \(value)\n" : "\(name){\(l)} \(value)\n"
        }
        return out
    }
}
