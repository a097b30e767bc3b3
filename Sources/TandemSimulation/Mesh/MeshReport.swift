import TandemCore
import TandemTraffic

/// What callers of one service saw, keyed `caller->callee` (the host they asked for).
public struct RouteStats: Sendable {
    public var key: String
    public var requests = 0
    public var succeeded = 0
    /// Attempts sent upstream (first tries and retries).
    public var attempts = 0
    public var retries = 0
    public var budgetExhausted = 0
    public var statuses: [Int: Int] = [:]
    /// Answers the caller's sidecar made itself, by `tandem-error` reason.
    public var local: [String: Int] = [:]
    /// Requests by the cluster they were sent to (a policy may pick another than the host).
    public var clusters: [String: Int] = [:]
    var latencies: [Int32] = []  // microseconds

    init(key: String) { self.key = key }

    mutating func record(status: Int, local reason: LocalReason?, latency: Nanos, cluster: String) {
        requests += 1
        if !cluster.isEmpty { clusters[cluster, default: 0] += 1 }
        if (200..<400).contains(status) { succeeded += 1 }
        statuses[status, default: 0] += 1
        if let reason { local[reason.rawValue, default: 0] += 1 }
        latencies.append(Int32(clamping: latency / 1000))
    }

    public var successRate: Double { requests == 0 ? 1 : Double(succeeded) / Double(requests) }
    /// Attempts per request that reached the balancer (1 = no retries).
    public var amplification: Double {
        let admitted = requests - (local["circuit-open"] ?? 0) - (local["overflow"] ?? 0) - (local["rate-limited"] ?? 0)
        return admitted <= 0 ? 1 : Double(attempts) / Double(admitted)
    }

    /// Latency quantile in milliseconds (nearest rank).
    public func latencyMs(_ q: Double) -> Double {
        guard !latencies.isEmpty else { return 0 }
        let sorted = latencies.sorted()
        let rank = min(sorted.count - 1, max(0, Int((q * Double(sorted.count)).rounded(.up)) - 1))
        return Double(sorted[rank]) / 1000
    }
}

public struct BreakerKey: Hashable, Sendable {
    public var sidecar: Int
    public var cluster: String
}

/// The outcome of one run: per-route numbers, fault and resilience counters, checker
/// verdicts, and the trace hash that identifies the run.
public struct MeshReport: Sendable {
    public var scenario: String
    public var seed: UInt64
    public var traceHash: UInt64 = 0
    public var events = 0
    public var virtualMs: Int64 = 0
    public var routes: [RouteStats] = []
    /// Outlier ejections per cluster, across all callers.
    public var ejections: [String: Int] = [:]
    /// Milliseconds from the last fault on an instance to its first ejection by any caller.
    public var timeToEject: [String: Int64] = [:]
    public var breakerTripsBySidecar: [BreakerKey: Int] = [:]
    public var retryBudgetExhausted: [String: Int] = [:]
    public var crashes = 0
    public var deploys = 0
    public var partitions = 0
    public var leaseExpiries = 0
    public var queueOverflows = 0
    public var policyDecisions = 0
    public var policyErrors = 0
    public var policyErrorSamples: [String] = []
    /// Arrivals the load generator could not send (no caller instance up, or over the bound).
    public var dropped = 0
    /// Requests that died with their caller's process.
    public var lostWithCaller = 0
    /// Requests still in flight when the run ended.
    public var unfinished = 0
    public var violations: [String] = []
    public var traceLines: [String] = []
    // The registry, when the scenario runs one.
    public var registryNodes = 0
    public var registryCrashes = 0
    public var registryCalls = 0
    public var registryCallsFailed = 0
    public var reRegistrations = 0
    public var watchReconnects = 0
    public var watchEvents = 0
    public var stormLeases = 0
    public var stormKeysLeft = 0
    public var registryLeaderlessMs: Int64 = 0
    public var lockAcquisitions = 0
    public var lockLost = 0
    /// Holders whose session expired under them; the next holder's fencing token was larger.
    public var lockStaleHolders = 0
    /// Service tokens issued, and inbound refusals by reason (missing-token, forbidden, …).
    /// Registry application clients: answered, timed out (unknown outcome), refused.
    public var kvOK = 0
    public var kvUnknown = 0
    public var kvRefused = 0
    /// Connections the callees' sidecars closed at accept (over `max_connections`).
    public var connectionsRefused = 0
    /// Requests the callees' inbound rate limits answered 429.
    public var inboundRateLimited = 0
    public var tokensIssued = 0
    public var proofsSigned = 0
    public var identityRefusals: [String: Int] = [:]
    public var passed: Bool { violations.isEmpty }

    init(scenario: String, seed: UInt64) {
        self.scenario = scenario
        self.seed = seed
    }

    public var totalRequests: Int { routes.reduce(0) { $0 + $1.requests } }

    public func route(_ key: String) -> RouteStats? { routes.first { $0.key == key } }

    /// Trips of the callee's breakers in the caller service's sidecars.
    public func breakerTrips(_ key: String, instancesOf caller: [Int]) -> Int {
        let callee = Self.callee(key)
        return breakerTripsBySidecar.filter { caller.contains($0.key.sidecar) && $0.key.cluster == callee }
            .reduce(0) { $0 + $1.value }
    }

    static func callee(_ key: String) -> String {
        guard let r = key.range(of: "->") else { return key }
        return String(key[r.upperBound...])
    }

    var callerInstances: [String: [Int]] = [:]

    mutating func check(_ assertions: [MeshAssertion]) {
        for a in assertions {
            let stats = route(a.subject)
            let callee = Self.callee(a.subject)
            func fmt(_ x: Double) -> String {
                let r = (x * 1000).rounded() / 1000
                return "\(r)"
            }
            switch a.check {
            case .successRateMin(let min):
                let got = stats?.successRate ?? 0
                if stats == nil || got < min {
                    violations.append("\(a.subject): success rate \(fmt(got)) < \(fmt(min))")
                }
            case .successRateMax(let max):
                let got = stats?.successRate ?? 0
                if stats == nil || got > max {
                    violations.append("\(a.subject): success rate \(fmt(got)) > \(fmt(max))")
                }
            case .latencyMaxMs(let q, let max):
                let got = stats?.latencyMs(q) ?? 0
                if got > max {
                    violations.append("\(a.subject): p\(Int(q * 100)) latency \(fmt(got)) ms > \(fmt(max)) ms")
                }
            case .amplificationMax(let max):
                let got = stats?.amplification ?? 1
                if got > max {
                    violations.append("\(a.subject): retry amplification \(fmt(got)) > \(fmt(max))")
                }
            case .breakerTripsMin(let min):
                let got = breakerTrips(a.subject, instancesOf: callerInstances[a.subject] ?? [])
                if got < min { violations.append("\(a.subject): breaker trips \(got) < \(min)") }
            case .breakerTripsMax(let max):
                let got = breakerTrips(a.subject, instancesOf: callerInstances[a.subject] ?? [])
                if got > max { violations.append("\(a.subject): breaker trips \(got) > \(max)") }
            case .ejectionsMin(let min):
                let got = ejections[callee] ?? 0
                if got < min { violations.append("\(a.subject): outlier ejections of \(callee) \(got) < \(min)") }
            case .ejectedWithinMs(let max):
                if let got = timeToEject[a.subject] {
                    if got > max { violations.append("\(a.subject): ejected after \(got) ms > \(max) ms") }
                } else {
                    violations.append("\(a.subject): never ejected after its fault (expected within \(max) ms)")
                }
            case .clusterShare(let cluster, let min, let max):
                let n = stats?.clusters[cluster] ?? 0
                let got = Double(n) / Double(Swift.max(1, stats?.requests ?? 0))
                if got < min || got > max {
                    violations.append(
                        "\(a.subject): share sent to \(cluster) \(fmt(got)) outside [\(fmt(min)), \(fmt(max))]")
                }
            case .requestsMin(let min):
                let got = stats?.requests ?? 0
                if got < min { violations.append("\(a.subject): \(got) requests < \(min)") }
            }
        }
    }

    // MARK: rendering

    public var hashHex: String {
        let h = String(traceHash, radix: 16)
        return String(repeating: "0", count: 16 - h.count) + h
    }

    /// The human report `tandem sim` prints.
    public func text(replay: String? = nil) -> String {
        var out =
            "scenario \"\(scenario)\" seed \(seed): \(virtualMs / 1000) s virtual, \(events) events, trace \(hashHex)\n"
        let header = ["route", "requests", "success", "p50 ms", "p99 ms", "attempts", "amplif.", "local answers"]
        var rows: [[String]] = []
        for r in routes {
            let locals = r.local.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            rows.append([
                r.key, "\(r.requests)", pct(r.successRate), ms(r.latencyMs(0.5)), ms(r.latencyMs(0.99)),
                "\(r.attempts)",
                String(format2(r.amplification)), locals.isEmpty ? "-" : locals,
            ])
        }
        out += table(header, rows)
        for r in routes
        where r.clusters.count > 1 || (r.clusters.count == 1 && r.clusters.keys.first != Self.callee(r.key)) {
            out += "  \(r.key) sent to: "
            out +=
                r.clusters.sorted { $0.key < $1.key }.map {
                    "\($0.key) \($0.value) (\(pct(Double($0.value) / Double(max(1, r.requests)))))"
                }
                .joined(separator: ", ") + "\n"
        }
        var facts: [String] = []
        let trips = breakerTripsBySidecar.values.reduce(0, +)
        facts.append("breaker trips \(trips)")
        facts.append("ejections \(ejections.values.reduce(0, +))")
        if !timeToEject.isEmpty {
            facts.append(
                "time to eject "
                    + timeToEject.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value) ms" }.joined(separator: ", "))
        }
        let budget = retryBudgetExhausted.values.reduce(0, +)
        if budget > 0 { facts.append("retry budget exhausted \(budget)") }
        if crashes > 0 { facts.append("crashes \(crashes)") }
        if deploys > 0 { facts.append("deploys \(deploys)") }
        if partitions > 0 { facts.append("partitions \(partitions)") }
        if leaseExpiries > 0 { facts.append("lease expiries \(leaseExpiries)") }
        if queueOverflows > 0 { facts.append("queue overflows \(queueOverflows)") }
        if policyDecisions > 0 { facts.append("policy decisions \(policyDecisions)") }
        if policyErrors > 0 { facts.append("policy errors \(policyErrors)") }
        if dropped > 0 { facts.append("arrivals dropped \(dropped)") }
        if inboundRateLimited > 0 { facts.append("inbound rate-limited \(inboundRateLimited)") }
        if connectionsRefused > 0 { facts.append("connections over max_connections \(connectionsRefused)") }
        if tokensIssued > 0 {
            let refused = identityRefusals.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            facts.append(
                "identity: \(tokensIssued) tokens issued, \(proofsSigned) proofs signed, refused "
                    + (refused.isEmpty ? "none" : refused.joined(separator: ", ")))
        }
        if lostWithCaller > 0 { facts.append("requests lost with their caller \(lostWithCaller)") }
        out += facts.joined(separator: "; ") + "\n"
        if registryNodes > 0 {
            var r =
                "registry: \(registryNodes) members, \(registryCrashes) crashes, no leader for \(registryLeaderlessMs) ms; "
            r +=
                "\(registryCalls) registration calls (\(registryCallsFailed) failed or retried), \(reRegistrations) re-registrations; "
            r += "\(watchEvents) watch events, \(watchReconnects) watch reconnects"
            if stormLeases > 0 { r += "; lease storm: \(stormLeases) leases, \(stormKeysLeft) keys left" }
            if kvOK + kvUnknown > 0 {
                r +=
                    "; kv clients: \(kvOK) answered, \(kvUnknown) unknown, \(kvRefused) refused (history linearizable unless reported)"
            }
            if lockAcquisitions > 0 {
                r +=
                    "; locks: \(lockAcquisitions) acquisitions, \(lockLost) lost, \(lockStaleHolders) stale holders fenced"
            }
            out += r + "\n"
        }
        for s in policyErrorSamples { out += "  policy error: \(s)\n" }
        for l in traceLines { out += "  \(l)\n" }
        if violations.isEmpty {
            out += "PASS\n"
        } else {
            for v in violations { out += "VIOLATION \(v)\n" }
            out += "FAIL (seed \(seed))\n"
            if let replay { out += "replay: \(replay)\n" }
        }
        return out
    }

    public var json: String {
        var routesJSON: [String] = []
        for r in routes {
            let locals = r.local.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\($0.value)" }
            let statuses = r.statuses.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\($0.value)" }
            routesJSON.append(
                "{\"route\":\(JSON.quote(r.key)),\"requests\":\(r.requests),\"succeeded\":\(r.succeeded)"
                    + ",\"success_rate\":\(format4(r.successRate)),\"p50_ms\":\(r.latencyMs(0.5))"
                    + ",\"p99_ms\":\(r.latencyMs(0.99)),\"attempts\":\(r.attempts),\"retries\":\(r.retries)"
                    + ",\"amplification\":\(format4(r.amplification)),\"statuses\":{\(statuses.joined(separator: ","))}"
                    + ",\"clusters\":{\(r.clusters.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\($0.value)" }.joined(separator: ","))}"
                    + ",\"local\":{\(locals.joined(separator: ","))}}")
        }
        let tte = timeToEject.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\($0.value)" }
        let ej = ejections.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\($0.value)" }
        return "{\"scenario\":\(JSON.quote(scenario)),\"seed\":\(seed),\"trace\":\"\(hashHex)\",\"events\":\(events)"
            + ",\"virtual_ms\":\(virtualMs),\"passed\":\(passed),\"routes\":[\(routesJSON.joined(separator: ","))]"
            + ",\"breaker_trips\":\(breakerTripsBySidecar.values.reduce(0, +)),\"ejections\":{\(ej.joined(separator: ","))}"
            + ",\"time_to_eject_ms\":{\(tte.joined(separator: ","))},\"crashes\":\(crashes),\"deploys\":\(deploys)"
            + ",\"lease_expiries\":\(leaseExpiries),\"policy_decisions\":\(policyDecisions)"
            + ",\"policy_errors\":\(policyErrors),\"dropped\":\(dropped),\"tokens_issued\":\(tokensIssued)"
            + ",\"identity_refusals\":{\(identityRefusals.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\($0.value)" }.joined(separator: ","))}"
            + ",\"registry\":{\"members\":\(registryNodes),\"crashes\":\(registryCrashes),\"leaderless_ms\":\(registryLeaderlessMs)"
            + ",\"calls\":\(registryCalls),\"calls_failed\":\(registryCallsFailed),\"reregistrations\":\(reRegistrations)"
            + ",\"watch_events\":\(watchEvents),\"watch_reconnects\":\(watchReconnects),\"storm_leases\":\(stormLeases)"
            + ",\"storm_keys_left\":\(stormKeysLeft),\"lock_acquisitions\":\(lockAcquisitions)"
            + ",\"locks_lost\":\(lockLost),\"lock_stale_holders\":\(lockStaleHolders)}"
            + ",\"violations\":[\(violations.map { JSON.quote($0) }.joined(separator: ","))]}"
    }
}

func pct(_ x: Double) -> String { "\(format2(x * 100))%" }
func ms(_ x: Double) -> String { format2(x) }
func format2(_ x: Double) -> String { fixed(x, 2) }
func format4(_ x: Double) -> String { fixed(x, 4) }

/// `x` with `digits` decimals, without Foundation's String(format:).
func fixed(_ x: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let n = Int64((abs(x) * scale).rounded())
    let whole = n / Int64(scale)
    var frac = String(n % Int64(scale))
    while frac.count < digits { frac = "0" + frac }
    return (x < 0 && n != 0 ? "-" : "") + "\(whole)" + (digits > 0 ? ".\(frac)" : "")
}

func table(_ header: [String], _ rows: [[String]]) -> String {
    var widths = header.map(\.count)
    for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String]) -> String {
        var s = ""
        for (i, c) in cells.enumerated() {
            let pad = String(repeating: " ", count: widths[i] - c.count)
            s += i == cells.count - 1 ? c : i == 0 ? c + pad : pad + c
            if i < cells.count - 1 { s += "  " }
        }
        return s + "\n"
    }
    return ([line(header)] + rows.map(line)).joined()
}
