import TandemCore

/// Which endpoint-picking algorithm a cluster uses.
public enum BalancerKind: Equatable, Sendable {
    case roundRobin
    /// Power of two choices on in-flight requests (Envoy `LEAST_REQUEST`).
    case leastRequest
    /// Power of two choices on peak-EWMA latency × (in-flight + 1) (Linkerd's default; ours too).
    case peakEWMA
    /// Consistent hashing of a request header's value onto a ring (Envoy `RING_HASH`).
    case ringHash(header: String)
    case random

    public static func parse(_ s: String) -> BalancerKind? {
        switch s.lowercased() {
        case "round_robin", "round-robin", "roundrobin", "rr": return .roundRobin
        case "least_request", "least-request", "p2c": return .leastRequest
        case "peak_ewma", "peak-ewma", "ewma": return .peakEWMA
        case "random": return .random
        default:
            if s.hasPrefix("ring_hash:") || s.hasPrefix("ring-hash:") {
                return .ringHash(header: String(s.dropFirst(10)))
            }
            return nil
        }
    }
}

/// Load the balancer tracks per endpoint.
public struct EndpointLoad: Sendable {
    public var active = 0
    /// Peak-EWMA latency estimate in nanoseconds.
    public var ewma: Double
    public var lastUpdate: Nanos = 0
}

/// Picks endpoints. Keeps per-endpoint load and the hash ring; fed every attempt's start and end.
public struct Balancer: Sendable {
    public var kind: BalancerKind
    /// Decay time of the EWMA (Linkerd: 10 s).
    public var decay: Nanos = .seconds(10)
    /// The estimate an endpoint starts with before any response (Linkerd's default RTT: 30 ms).
    public var defaultRTT: Nanos = .milliseconds(30)
    /// Latency charged for a failure, so a fast-failing endpoint does not attract traffic
    /// (Linkerd's load biaser idea).
    public var failurePenalty: Nanos = .seconds(1)
    /// Virtual nodes per endpoint on the ring (Envoy's minimum ring size is 1024 in total).
    public var ringReplicas = 128

    public private(set) var loads: [String: EndpointLoad] = [:]
    private var cursor = 0
    private var ring: [(hash: UInt64, id: String)] = []
    private var ringMembers: [String] = []

    public init(_ kind: BalancerKind) { self.kind = kind }

    public func load(of id: String) -> EndpointLoad { loads[id] ?? EndpointLoad(ewma: Double(defaultRTT)) }

    /// Chooses among `candidates` (already filtered for health, ejection and exclusion).
    public mutating func pick(
        _ candidates: [Endpoint], hashKey: String?, now: Nanos, rng: inout SeededRandom
    )
        -> Endpoint?
    {
        guard !candidates.isEmpty else { return nil }
        if candidates.count == 1 { return candidates[0] }
        switch kind {
        case .roundRobin:
            cursor = cursor &+ 1
            return candidates[Int(UInt(bitPattern: cursor) % UInt(candidates.count))]
        case .random:
            return candidates[Int(rng.next() % UInt64(candidates.count))]
        case .leastRequest:
            let (a, b) = twoDistinct(candidates.count, &rng)
            return load(of: candidates[b].id).active < load(of: candidates[a].id).active ? candidates[b] : candidates[a]
        case .peakEWMA:
            let (a, b) = twoDistinct(candidates.count, &rng)
            return cost(candidates[b].id, now) < cost(candidates[a].id, now) ? candidates[b] : candidates[a]
        case .ringHash:
            guard let hashKey else { return candidates[Int(rng.next() % UInt64(candidates.count))] }
            return ringPick(candidates, key: hashKey)
        }
    }

    private func twoDistinct(_ n: Int, _ rng: inout SeededRandom) -> (Int, Int) {
        let a = Int(rng.next() % UInt64(n))
        var b = Int(rng.next() % UInt64(n - 1))
        if b >= a { b += 1 }
        return (a, b)
    }

    /// Peak-EWMA cost: the decayed latency estimate times the in-flight count plus one.
    public func cost(_ id: String, _ now: Nanos) -> Double {
        let l = load(of: id)
        return l.ewma * Double(l.active + 1)
    }

    public mutating func attemptStarted(_ id: String) {
        loads[id, default: EndpointLoad(ewma: Double(defaultRTT))].active += 1
    }

    /// Feeds one finished attempt: its latency (or the failure penalty) into the EWMA.
    public mutating func attemptFinished(_ id: String, latency: Nanos, failed: Bool, now: Nanos) {
        let rtt = Double(failed ? max(latency, failurePenalty) : max(latency, 0))
        let decay = Double(decay)
        // Updated in place: one lookup.
        func update(_ l: inout EndpointLoad) {
            l.active = max(0, l.active - 1)
            if rtt > l.ewma {
                l.ewma = rtt  // peak: jump up at once
            } else {
                let dt = Double(max(0, now - l.lastUpdate))
                let w = Math.expNegative(dt / decay)
                l.ewma = l.ewma * w + rtt * (1 - w)
            }
            l.lastUpdate = now
        }
        update(&loads[id, default: EndpointLoad(ewma: Double(defaultRTT))])
    }

    /// Forgets endpoints that left the cluster.
    public mutating func retain(_ ids: Set<String>) {
        loads = loads.filter { ids.contains($0.key) }
    }

    private mutating func ringPick(_ candidates: [Endpoint], key: String) -> Endpoint {
        let ids = candidates.map(\.id).sorted()
        if ids != ringMembers {
            ringMembers = ids
            ring = []
            for ep in candidates {
                for r in 0..<(ringReplicas * ep.weight) {
                    var h = FNV1a()
                    h.add(ep.id)
                    h.add(UInt64(r))
                    ring.append((Math.mix64(h.value), ep.id))
                }
            }
            ring.sort { $0.hash < $1.hash }
        }
        var h = FNV1a()
        h.add(key)
        let target = Math.mix64(h.value)
        var lo = 0
        var hi = ring.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ring[mid].hash < target { lo = mid + 1 } else { hi = mid }
        }
        let id = ring[lo == ring.count ? 0 : lo].id
        return candidates.first(where: { $0.id == id }) ?? candidates[0]
    }
}

/// Small numeric helpers (no Foundation in cores).
public enum Math {
    /// e^(-x) for x ≥ 0, to ~1e-12 relative error.
    public static func expNegative(_ x: Double) -> Double {
        if x <= 0 { return 1 }
        if x > 700 { return 0 }
        // e^-x = 2^(-x/ln2) = 2^-k · 2^-f, k integer, f in [0,1).
        let y = x / 0.693_147_180_559_945_3
        let k = y.rounded(.down)
        let f = y - k
        // 2^-f = e^(-f·ln2), Taylor series on a small argument.
        let z = -f * 0.693_147_180_559_945_3
        var term = 1.0
        var sum = 1.0
        for n in 1...20 {
            term *= z / Double(n)
            sum += term
        }
        return Double(sign: .plus, exponent: -Int(k), significand: sum)
    }

    /// SplitMix64's finalizer: spreads a hash's bits.
    public static func mix64(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
