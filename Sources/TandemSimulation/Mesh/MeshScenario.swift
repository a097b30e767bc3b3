import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic

/// A latency distribution given by quantiles: a fixed value, or `{ p50 =, p90 =, p99 =, max = }`
/// in milliseconds. Sampling interpolates linearly between the quantiles given (0 → the
/// smallest, 1 → `max`, default 2 × p99), so the sampled p50 and p99 are the configured ones.
public struct LatencyDistribution: Equatable, Sendable {
    /// (quantile, nanoseconds), increasing in both.
    public var points: [(q: Double, value: Nanos)]

    public static func fixed(_ ms: Double) -> LatencyDistribution {
        LatencyDistribution(points: [(0, Nanos(ms * 1e6)), (1, Nanos(ms * 1e6))])
    }

    public init(points: [(q: Double, value: Nanos)]) { self.points = points }

    /// From p50/p90/p99/max in milliseconds (any may be nil; p50 is required).
    public init(p50: Double, p90: Double? = nil, p99: Double? = nil, max: Double? = nil) {
        var pts: [(Double, Nanos)] = [(0, Nanos(p50 * 0.5e6)), (0.5, Nanos(p50 * 1e6))]
        if let p90 { pts.append((0.9, Nanos(p90 * 1e6))) }
        if let p99 { pts.append((0.99, Nanos(p99 * 1e6))) }
        let top = max ?? (p99 ?? p90 ?? p50) * (p99 == nil && p90 == nil ? 1.5 : 2)
        pts.append((1, Nanos(top * 1e6)))
        points = pts
    }

    public func sample(_ rng: inout SeededRandom) -> Nanos {
        let u = Double(rng.next() >> 11) / Double(1 << 53)
        var prev = points[0]
        for p in points.dropFirst() {
            if u <= p.q {
                let span = p.q - prev.q
                let f = span > 0 ? (u - prev.q) / span : 1
                return prev.value + Nanos(Double(p.value - prev.value) * f)
            }
            prev = p
        }
        return points.last!.value
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.points.elementsEqual(b.points) { $0.q == $1.q && $0.value == $1.value }
    }
}

/// How a simulated service's instances behave: service time, errors, capacity, and the calls
/// each request makes to other services (through the instance's own sidecar) before answering.
public struct ServiceBehavior: Equatable, Sendable {
    public var latency = LatencyDistribution(p50: 5, p99: 20)
    /// Probability that a request is answered with `errorStatus`.
    public var errorRate = 0.0
    public var errorStatus = 503
    /// Requests processed at once per instance; more wait in a queue. nil = unbounded.
    public var concurrency: Int? = nil
    /// Requests waiting per instance; beyond it the instance answers 503 at once.
    public var queueLimit = 1_000
    /// Calls made in order for each request; a failed call fails the request with
    /// `dependencyFailureStatus`.
    public var calls: [Call] = []
    public var dependencyFailureStatus = 502
    /// Time from process start to serving and passing health checks.
    public var startupMs: Int64 = 500

    public struct Call: Equatable, Sendable {
        public var service: String
        public var method = "GET"
        public var path = "/"
        public init(service: String, method: String = "GET", path: String = "/") {
            self.service = service
            self.method = method
            self.path = path
        }
    }

    public init() {}
}

/// A service in the scenario: its instances, their behaviour, and the sidecar config every
/// instance's sidecar runs (the same Lua config files real sidecars read).
public struct ServiceSpec: Sendable {
    public var name: String
    public var instances = 1
    public var behavior = ServiceBehavior()
    public var sidecar: SidecarConfig
    public init(name: String, sidecar: SidecarConfig) {
        self.name = name
        self.sidecar = sidecar
    }
}

/// Load offered to a route: open-loop (a Poisson arrival rate) or closed-loop clients that
/// send, wait for the answer, think, and send again.
public struct Workload: Equatable, Sendable {
    public enum Shape: Equatable, Sendable {
        case open(rps: Double)
        case closed(clients: Int, thinkMs: Double)
    }
    /// The calling service: requests leave through its instances' sidecars (round robin).
    public var from: String
    /// Host of the request: a service name, or a route's host.
    public var to: String
    public var method = "GET"
    public var path = "/"
    public var headers: [(String, String)] = []
    public var shape: Shape
    public var startMs: Int64 = 0
    public var endMs: Int64? = nil
    public init(from: String, to: String, shape: Shape) {
        self.from = from
        self.to = to
        self.shape = shape
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.from == b.from && a.to == b.to && a.method == b.method && a.path == b.path && a.shape == b.shape
            && a.startMs == b.startMs && a.endMs == b.endMs
            && a.headers.elementsEqual(b.headers, by: { $0.0 == $1.0 && $0.1 == $1.1 })
    }
}

/// Something that happens at a point of virtual time.
public enum MeshFault: Equatable, Sendable {
    /// The instance's process dies: connections refused, in-flight requests reset, its
    /// registration stays until its lease expires.
    case crash(instance: String)
    /// A crashed instance starts again (registers once started).
    case restart(instance: String)
    /// Service time × factor (1 = normal).
    case slow(instance: String, factor: Double)
    /// Accepts requests and never answers (until `recover`).
    case hang(instance: String)
    /// Answers this fraction of requests with `status`.
    case errors(instance: String, rate: Double, status: Int)
    /// Back to the service's configured behaviour.
    case recover(instance: String)
    /// Rolling restart: each instance in turn deregisters, drains, stops, starts, registers.
    case deploy(service: String, stepMs: Int64)
    /// No packets between the two sides (services or instances); one-way drops only a → b.
    case partition(a: String, b: String, oneWay: Bool)
    /// Extra one-way delay on packets between the two sides.
    case clog(a: String, b: String, delayMs: Double)
    /// Every partition and clog removed.
    case heal
    /// Packet loss across the mesh (each lost packet costs a TCP retransmission, 200 ms).
    case loss(rate: Double)
    /// A registry member ("leader" or `registry-N`) crashes, losing unsynced writes, and
    /// restarts after `downMs`.
    case registryCrash(member: String, downMs: Int64)
    /// A registry member is cut off from the other members (not from clients) for a while.
    case registryIsolate(member: String, forMs: Int64)
    /// The leader and as many others as stay a minority are cut off from the majority.
    case registryMinority(forMs: Int64)
    /// `count` leases granted at once and never kept alive, each with a key.
    case leaseStorm(count: Int, ttlS: Int64)
    /// The member's disk fails at one of its next few operations (mid-append, before an
    /// fsync, mid-snapshot …): the process dies, losing what was not synced, and restarts.
    case registryDiskFault(member: String)
}

public struct TimedFault: Equatable, Sendable {
    public var atMs: Int64
    public var fault: MeshFault
    public init(atMs: Int64, _ fault: MeshFault) {
        self.atMs = atMs
        self.fault = fault
    }
}

/// A property the run must have; checked on the report.
public struct MeshAssertion: Equatable, Sendable {
    public enum Check: Equatable, Sendable {
        /// Share of requests answered 2xx/3xx, at least / at most.
        case successRateMin(Double)
        case successRateMax(Double)
        /// Latency quantile (0.5, 0.99 …) of all requests, in ms, at most.
        case latencyMaxMs(quantile: Double, ms: Double)
        /// Attempts per admitted request, at most.
        case amplificationMax(Double)
        /// Breaker trips across the caller's sidecars, at least / at most.
        case breakerTripsMin(Int)
        case breakerTripsMax(Int)
        /// Outlier ejections of the callee's instances, at least.
        case ejectionsMin(Int)
        /// The instance was ejected by some caller within this long of the last fault on it.
        case ejectedWithinMs(Int64)
        /// Share of the requests sent to this cluster, within [min, max].
        case clusterShare(cluster: String, min: Double, max: Double)
        /// Requests answered, at least (guards against a scenario that sends nothing).
        case requestsMin(Int)
    }
    /// `from -> to` for route checks, or an instance id for `ejectedWithinMs`.
    public var subject: String
    public var check: Check
    public init(subject: String, _ check: Check) {
        self.subject = subject
        self.check = check
    }
}

public struct NetworkSpec: Equatable, Sendable {
    /// One-way delay, uniform in [min, max] milliseconds.
    public var minDelayMs = 0.2
    public var maxDelayMs = 1.0
    public var loss = 0.0
    /// Share of registry peer messages delivered twice (raft's messages travel over their own
    /// transport; proxied requests ride TCP and are never duplicated).
    public var duplicate = 0.0
    /// Time for discovery changes (registrations, lease expiry) to reach the sidecars' watches.
    public var watchDelayMs: Int64 = 50
    public init() {}
}

/// A whole scenario: what `tandem sim FILE` runs.
public struct MeshScenario: Sendable {
    public var name = "scenario"
    public var durationMs: Int64 = 60_000
    public var network = NetworkSpec()
    public var services: [ServiceSpec] = []
    public var workloads: [Workload] = []
    public var timeline: [TimedFault] = []
    public var assertions: [MeshAssertion] = []
    /// A registry cluster for discovery; nil = discovery modelled (registrations seen by every
    /// sidecar after the watch delay, leases expiring on time).
    public var registry: RegistrySpec? = nil
    /// Lock contention through the registry (needs `registry`).
    public var locks: [LockWorkload] = []
    /// Application reads, puts and txns on the registry, checked for linearizability.
    public var kv: KVWorkload? = nil
    /// Service identity: tokens out, verification and allow rules in (MeshIdentity.swift).
    public var identity: IdentitySpec? = nil
    public init() {}
}
