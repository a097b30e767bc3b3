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

    /// A cell of the per-request series, mutated only under the metrics lock.
    final class HistogramCell: @unchecked Sendable { var histogram = Histogram() }
    final class CounterCell: @unchecked Sendable { var value: UInt64 = 0 }

    /// The series one finished request counts in: its (side, route, cluster, status) counter,
    /// its route's duration histogram and its cluster's attempts. Looked up once by a
    /// connection and kept (`HTTPProxyHandler.series`): a request then counts without a
    /// dictionary lookup. Mutated only under the metrics lock.
    final class RequestSeries: @unchecked Sendable {
        let key: RequestKey
        fileprivate var requests: UInt64 = 0
        fileprivate let duration: HistogramCell
        fileprivate let attempts: CounterCell
        fileprivate init(key: RequestKey, duration: HistogramCell, attempts: CounterCell) {
            self.key = key
            self.duration = duration
            self.attempts = attempts
        }
    }

    struct State {
        var counters: [String: [String: UInt64]] = [:]  // name → labels → value
        var histograms: [String: [String: Histogram]] = [:]
        var requests: [RequestKey: RequestSeries] = [:]
        var durations: [RouteKey: HistogramCell] = [:]
        var attempts: [ClusterKey: CounterCell] = [:]

        /// The per-request series folded into the generic ones, as values (for rendering and
        /// queries). Call under the lock: the cells are shared.
        func merged() -> State {
            var s = State(counters: counters, histograms: histograms)
            for (k, series) in requests where series.requests > 0 {
                let l = SidecarMetrics.labels([
                    ("side", k.side), ("route", k.route), ("cluster", k.cluster), ("status", String(k.status)),
                ])
                s.counters["tandem_requests_total", default: [:]][l, default: 0] += series.requests
            }
            for (k, cell) in attempts where cell.value > 0 {
                let l = SidecarMetrics.labels([("side", k.side), ("cluster", k.cluster)])
                s.counters["tandem_upstream_attempts_total", default: [:]][l, default: 0] += cell.value
            }
            for (k, cell) in durations where cell.histogram.count > 0 {
                s.histograms["tandem_request_duration_ms", default: [:]][
                    SidecarMetrics.labels([("side", k.side), ("route", k.route)])] = cell.histogram
            }
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

    /// The series for `key` (made on first use).
    func series(_ key: RequestKey) -> RequestSeries {
        state.withLockedValue { s in
            if let found = s.requests[key] { return found }
            let route = RouteKey(side: key.side, route: key.route)
            let cluster = ClusterKey(side: key.side, cluster: key.cluster)
            let duration = s.durations[route] ?? HistogramCell()
            let attempts = s.attempts[cluster] ?? CounterCell()
            s.durations[route] = duration
            s.attempts[cluster] = attempts
            let made = RequestSeries(key: key, duration: duration, attempts: attempts)
            s.requests[key] = made
            return made
        }
    }

    /// One finished request: its count by status, its duration and its upstream attempts,
    /// under one lock, without lookups.
    func request(_ series: RequestSeries, ms: Double, attempts: Int) {
        state.withLockedValue { _ in
            series.requests += 1
            series.duration.histogram.observe(ms)
            if attempts > 0 { series.attempts.value += UInt64(attempts) }
        }
    }

    /// The same, looking the series up.
    func request(side: String, route: String, cluster: String, status: Int, ms: Double, attempts: Int) {
        request(
            series(RequestKey(side: side, route: route, cluster: cluster, status: status)), ms: ms, attempts: attempts)
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
        let s = state.withLockedValue { $0.merged() }
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
