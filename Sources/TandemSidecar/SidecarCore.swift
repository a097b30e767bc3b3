import NIOCore
import TandemConfig
import TandemCore
import TandemTraffic

#if canImport(Glibc)
import Glibc
#endif

/// The monotonic clock the shell feeds to the cores.
@inline(__always) func nowNanos() -> Nanos { Nanos(NIODeadline.now().uptimeNanoseconds) }

/// Shared traffic state of one sidecar: the route table and every cluster's TandemTraffic
/// state, behind one lock (decisions are short; bytes never move under it).
final class TrafficBrain: Sendable {
    struct State {
        var routes: RouteTable
        /// Every cluster's state, at a slot it keeps for the sidecar's life (a cluster is never
        /// removed; a reload replaces its state in place), so an exchange that knows the slot
        /// reaches it without hashing the name again.
        var clusterStates: [ClusterState] = []
        var clusterSlots: [String: Int] = [:]
        var rng: SeededRandom
        var limiters: [String: TokenBucket] = [:]
        var keyedLimiters: [String: KeyedRateLimiter] = [:]
        var config: SidecarConfig
    }

    let state: SpinningLockedBox<State>

    init(config: SidecarConfig, seed: UInt64) {
        state = SpinningLockedBox(
            State(routes: RouteTable(config.routes), rng: SeededRandom(seed: seed), config: config))
    }

    func with<T>(_ body: (inout State) -> T) -> T { state.withLockedValue(body) }

    /// The cluster's slot; its state is made from config on first use.
    static func ensureCluster(_ s: inout State, _ name: String) -> Int {
        if let i = s.clusterSlots[name] { return i }
        var c = ClusterState(s.config.clusterConfig(name))
        if let eps = s.config.staticEndpoints[name] { c.setEndpoints(eps) }
        s.clusterStates.append(c)
        s.clusterSlots[name] = s.clusterStates.count - 1
        return s.clusterStates.count - 1
    }

    /// Runs `body` on the cluster's state in place (a copy out and back would copy its arrays
    /// and dictionaries on every call).
    func withCluster<T>(_ name: String, _ body: (inout ClusterState, inout SeededRandom) -> T) -> T {
        state.withLockedValue { s in body(&s.clusterStates[Self.ensureCluster(&s, name)], &s.rng) }
    }

    /// The same by the cluster's slot (from `withCluster(_:slot:_:)`), without the name's hash.
    func withCluster<T>(slot: Int, _ body: (inout ClusterState, inout SeededRandom) -> T) -> T {
        state.withLockedValue { s in body(&s.clusterStates[slot], &s.rng) }
    }

    /// `withCluster` that also returns the cluster's slot, for the calls that follow.
    func withCluster<T>(_ name: String, slot: inout Int?, _ body: (inout ClusterState, inout SeededRandom) -> T) -> T {
        state.withLockedValue { s in
            let i = Self.ensureCluster(&s, name)
            slot = i
            return body(&s.clusterStates[i], &s.rng)
        }
    }

    /// Installs discovered endpoints; static ones stand in while discovery has none.
    func setDiscovered(_ name: String, _ eps: [Endpoint]) {
        state.withLockedValue { s in
            let i = Self.ensureCluster(&s, name)
            let fallback = s.config.staticEndpoints[name] ?? []
            s.clusterStates[i].setEndpoints(eps.isEmpty ? fallback : eps)
        }
    }

    /// Swaps in a new route table and cluster settings atomically, keeping endpoint state.
    func reconfigure(_ config: SidecarConfig) {
        state.withLockedValue { s in
            s.config = config
            s.routes = RouteTable(config.routes)
            s.limiters = [:]
            s.keyedLimiters = [:]
            for (name, i) in s.clusterSlots {
                let cfg = config.clusterConfig(name)
                if cfg == s.clusterStates[i].config { continue }  // unchanged: keep breaker, ejections, load
                var c = ClusterState(cfg)
                c.setEndpoints(s.clusterStates[i].endpoints)
                s.clusterStates[i] = c
            }
        }
    }

    /// Buckets per key and route: at most this many callers are tracked (LRU-ish, see
    /// `KeyedRateLimiter`).
    static let maxRateLimitKeys = 10_000

    /// A token from the route's bucket, or from the bucket of `key` when the route limits
    /// per caller.
    func takeToken(route: Route, key: String?, now: Nanos) -> Bool {
        guard let rl = route.rateLimit else { return true }
        if route.rateLimitKey != nil {
            return state.withLockedValue { s in
                var k = s.keyedLimiters[route.name] ?? KeyedRateLimiter(rl, maxKeys: Self.maxRateLimitKeys)
                s.keyedLimiters[route.name] = nil  // modify in place (no copy of its dictionary)
                let ok = k.tryTake(key: key ?? "", now: now)
                s.keyedLimiters[route.name] = k
                return ok
            }
        }
        return state.withLockedValue { s in
            var b = s.limiters[route.name] ?? TokenBucket(rl)
            let ok = b.tryTake(now: now)
            s.limiters[route.name] = b
            return ok
        }
    }
}

extension TrafficBrain.State {
    /// Every cluster's state by name (a copy, for views).
    var clusters: [String: ClusterState] {
        clusterSlots.mapValues { clusterStates[$0] }
    }
}

/// A value behind a mutex that spins briefly before it sleeps (glibc's adaptive mutex). The
/// traffic state is taken by every event loop several times per request for well under a
/// microsecond each time; with a plain mutex a loop that finds it taken sleeps in the kernel
/// and the holder pays a wake-up system call, which cost more than the work under the lock.
final class SpinningLockedBox<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        var attributes = pthread_mutexattr_t()
        pthread_mutexattr_init(&attributes)
        pthread_mutexattr_settype(&attributes, Int32(PTHREAD_MUTEX_ADAPTIVE_NP))
        let rc = pthread_mutex_init(mutex, &attributes)
        pthread_mutexattr_destroy(&attributes)
        precondition(rc == 0, "pthread_mutex_init: \(rc)")
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    func withLockedValue<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
