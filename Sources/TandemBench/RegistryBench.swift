// `TandemBench registry MODE --endpoints A,B,C …`: a load client for any etcd v3 server —
// Tandem's registry or etcd itself — so both are measured by the same client in the same run
// (bench/registry/run.sh). A shell: it reads the clock and kills processes; nothing here is a
// core.
//
// Modes:
//   put          closed-loop puts (random keys in --key-space, --val-size bytes)
//   range        closed-loop reads of one key, linearizable or --serializable
//   watch        put→event latency: one writer, one watcher on another member
//   failover     puts for --seconds; after --kill-after seconds SIGKILL the leader (its PID
//                from --pids, in endpoint order) and measure how long until writes resume
import Foundation
import NIOCore
import NIOPosix
import TandemCore
import TandemEtcdAPI
import TandemEtcdClient

struct RegistryBenchOptions {
    var mode = ""
    var endpoints: [EtcdEndpoint] = []
    var clients = 1
    var conns = 1
    var total = 1000
    var keySpace = 100_000
    var valSize = 256
    var serializable = false
    var seconds = 8.0
    var killAfter = 2.0
    var pids: [Int32] = []

    init(_ args: [String]) throws {
        var it = args.makeIterator()
        guard let mode = it.next() else { throw BenchUsage("registry: give a mode: put, range, watch or failover") }
        self.mode = mode
        func value(_ flag: String) throws -> String {
            guard let v = it.next() else { throw BenchUsage("registry: \(flag) needs a value") }
            return v
        }
        func int(_ flag: String) throws -> Int {
            let v = try value(flag)
            guard let n = Int(v), n > 0 else {
                throw BenchUsage("registry: \(flag) wants a positive integer, got \(v)")
            }
            return n
        }
        func seconds(_ flag: String) throws -> Double {
            let v = try value(flag)
            guard let d = Double(v), d > 0 else { throw BenchUsage("registry: \(flag) wants seconds, got \(v)") }
            return d
        }
        while let flag = it.next() {
            switch flag {
            case "--endpoints":
                endpoints = try value(flag).split(separator: ",").map { s in
                    guard let e = EtcdEndpoint(String(s)) else {
                        throw BenchUsage("registry: bad endpoint \(s) (want host:port)")
                    }
                    return e
                }
            case "--clients": clients = try int(flag)
            case "--conns": conns = try int(flag)
            case "--total": total = try int(flag)
            case "--key-space": keySpace = try int(flag)
            case "--val-size": valSize = try int(flag)
            case "--serializable": serializable = true
            case "--seconds": self.seconds = try seconds(flag)
            case "--kill-after": killAfter = try seconds(flag)
            case "--pids":
                pids = try value(flag).split(separator: ",").map { s in
                    guard let p = Int32(s) else { throw BenchUsage("registry: bad pid \(s)") }
                    return p
                }
            default: throw BenchUsage("registry: unknown flag \(flag)")
            }
        }
        guard !endpoints.isEmpty else { throw BenchUsage("registry: --endpoints is required") }
        conns = min(conns, clients)
    }
}

struct BenchUsage: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

private func nowNanos() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

/// One closed-loop client: issues its next request when the previous one completes, until it
/// has done `quota` or the deadline passed. Touched only on its connection's event loop.
private final class LoadWorker: @unchecked Sendable {
    let client: EtcdClient
    let op: (EtcdClient, inout UInt64) -> EventLoopFuture<Void>
    var quota: Int
    var deadline: UInt64
    var rng: UInt64
    /// (start, end) of each acknowledged request, in nanoseconds of uptime.
    var done: [(UInt64, UInt64)] = []
    var errors = 0
    var lastError = ""
    let finished: EventLoopPromise<Void>

    init(
        client: EtcdClient, seed: UInt64, quota: Int, deadline: UInt64,
        op: @escaping (EtcdClient, inout UInt64) -> EventLoopFuture<Void>
    ) {
        self.client = client
        self.op = op
        self.quota = quota
        self.deadline = deadline
        self.rng = seed
        self.finished = client.loop.makePromise()
        done.reserveCapacity(quota == .max ? 1 << 16 : quota)
    }

    func next() {
        let start = nowNanos()
        guard done.count + errors < quota, start < deadline else {
            finished.succeed(())
            return
        }
        op(client, &rng).whenComplete { result in
            switch result {
            case .success: self.done.append((start, nowNanos()))
            case .failure(let e):
                self.errors += 1
                self.lastError = "\(e)"
            }
            self.next()
        }
    }
}

/// xorshift64*: the bench's key choice; seeded per client so runs are repeatable.
private func nextRandom(_ s: inout UInt64) -> UInt64 {
    s ^= s >> 12
    s ^= s << 25
    s ^= s >> 27
    return s &* 2_685_821_657_736_338_717
}

private func percentile(_ sorted: [UInt64], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let i = min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)
    return Double(sorted[max(0, i)]) / 1e6
}

private func ms(_ v: Double) -> String { String(format: v < 10 ? "%.2f ms" : "%.1f ms", v) }

func registryBenchmarks(_ args: [String]) throws {
    let o = try RegistryBenchOptions(args)
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    defer { try? group.syncShutdownGracefully() }
    // Connection i starts at endpoint i mod n, so load spreads over the members the way
    // clientv3's round-robin balancer spreads it.
    let clients: [EtcdClient] = (0..<o.conns).map { i in
        let n = o.endpoints.count
        let eps = (0..<n).map { o.endpoints[(i + $0) % n] }
        let c = EtcdClient(endpoints: eps, loop: group.next())
        c.callTimeout = .seconds(10)
        return c
    }
    defer { clients.forEach { $0.close() } }

    switch o.mode {
    case "put":
        let r = try closedLoop(o, clients, randomPut(o))
        report("put", o, r)
    case "range":
        _ = try clients[0].put("bench/read", [UInt8](repeating: 0x61, count: o.valSize)).wait()
        let serializable = o.serializable
        let r = try closedLoop(o, clients) { c, _ in
            c.get("bench/read", serializable: serializable).map { _ in }
        }
        report(o.serializable ? "range (serializable)" : "range (linearizable)", o, r)
    case "watch":
        try watchLatency(o, group: group)
    case "failover":
        try failover(o, clients)
    default:
        throw BenchUsage("registry: unknown mode \(o.mode) (put, range, watch or failover)")
    }
}

/// A put of a `--val-size` value to a random key of `--key-space` (the put and failover runs).
private func randomPut(_ o: RegistryBenchOptions) -> (EtcdClient, inout UInt64) -> EventLoopFuture<Void> {
    let value = [UInt8](repeating: 0x61, count: o.valSize)
    let keySpace = UInt64(o.keySpace)
    return { c, rng in c.put("bench/" + String(nextRandom(&rng) % keySpace), value).map { _ in } }
}

private struct LoadResult {
    var latencies: [UInt64]
    var spans: [(UInt64, UInt64)]
    var errors: Int
    var lastError: String
    var seconds: Double
}

private func closedLoop(
    _ o: RegistryBenchOptions, _ clients: [EtcdClient], deadline: UInt64 = .max,
    duringRun: () throws -> Void = {},
    _ op: @escaping (EtcdClient, inout UInt64) -> EventLoopFuture<Void>
) throws -> LoadResult {
    // Connect every connection first, so the run measures requests, not handshakes.
    for c in clients { _ = try c.status().wait() }
    let perClient = deadline == .max ? max(1, o.total / o.clients) : Int.max
    let workers = (0..<o.clients).map { i in
        LoadWorker(
            client: clients[i % clients.count], seed: UInt64(i + 1) &* 0x9E37_79B9_7F4A_7C15,
            quota: perClient, deadline: deadline, op: op)
    }
    let start = nowNanos()
    for w in workers { w.client.loop.execute { w.next() } }
    try duringRun()
    for w in workers { try w.finished.futureResult.wait() }
    let seconds = Double(nowNanos() - start) / 1e9
    var r = LoadResult(latencies: [], spans: [], errors: 0, lastError: "", seconds: seconds)
    for w in workers {
        // Read each worker's results on its own loop.
        let (spans, errors, last) = try w.client.loop.submit { (w.done, w.errors, w.lastError) }.wait()
        r.spans += spans
        r.errors += errors
        if !last.isEmpty { r.lastError = last }
    }
    r.latencies = r.spans.map { $0.1 - $0.0 }.sorted()
    return r
}

private func report(_ what: String, _ o: RegistryBenchOptions, _ r: LoadResult) {
    let rate = Double(r.latencies.count) / r.seconds
    var line = "\(what): clients \(o.clients), conns \(o.conns): \(Int(rate.rounded())) ops/s, "
    line += "p50 \(ms(percentile(r.latencies, 0.5))), p99 \(ms(percentile(r.latencies, 0.99))), "
    line += "max \(ms(percentile(r.latencies, 1))) — \(r.latencies.count) ok, \(r.errors) errors"
    line += String(format: " in %.2f s", r.seconds)
    print(line)
    if r.errors > 0 { print("  last error: \(r.lastError)") }
}

/// Put→event latency: a watcher on the last endpoint, a writer on the first, one put at a time.
private func watchLatency(_ o: RegistryBenchOptions, group: MultiThreadedEventLoopGroup) throws {
    let loop = group.next()
    let writer = EtcdClient(endpoints: [o.endpoints[0]], loop: loop)
    let watcher = EtcdClient(endpoints: [o.endpoints[o.endpoints.count - 1]], loop: loop)
    defer {
        writer.close()
        watcher.close()
    }
    let prefix = "bench/watch/"
    let state = WatchState(loop: loop, expected: o.total)
    let created = loop.makePromise(of: Void.self)
    let stream = try watcher.openStream(
        "/etcdserverpb.Watch/Watch",
        onMessage: { bytes in
            guard let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
            let now = nowNanos()
            loop.execute {
                if r.created { created.succeed(()) }
                for e in r.events { state.received(key: String(decoding: e.kv.key, as: UTF8.self), at: now) }
            }
        },
        onClose: { e in
            loop.execute {
                created.fail(e ?? BenchUsage("watch closed"))
                state.all.fail(e ?? BenchUsage("watch closed"))
            }
        }
    ).wait()
    var create = Etcdserverpb_WatchCreateRequest()
    create.key = Data(prefix.utf8)
    create.rangeEnd = Data(prefixRangeEnd(Array(prefix.utf8)))
    var req = Etcdserverpb_WatchRequest()
    req.createRequest = create
    stream.send(req)
    try created.futureResult.wait()
    state.value = [UInt8](repeating: 0x61, count: o.valSize)
    loop.execute { state.put(0, writer: writer, prefix: prefix) }
    let timeout = loop.scheduleTask(in: .seconds(60)) { state.all.fail(BenchUsage("watch: events missing after 60 s")) }
    try state.all.futureResult.wait()
    timeout.cancel()
    stream.cancel()
    let lat = try loop.submit { state.latencies.sorted() }.wait()
    print(
        "watch: put on \(o.endpoints[0]) → event on \(o.endpoints[o.endpoints.count - 1]): "
            + "p50 \(ms(percentile(lat, 0.5))), p99 \(ms(percentile(lat, 0.99))), max \(ms(percentile(lat, 1))) "
            + "— \(lat.count) events, one put at a time")
}

private final class WatchState: @unchecked Sendable {
    var sent: [String: UInt64] = [:]
    var latencies: [UInt64] = []
    let expected: Int
    let all: EventLoopPromise<Void>
    var value: [UInt8] = []

    init(loop: any EventLoop, expected: Int) {
        self.expected = expected
        all = loop.makePromise()
    }

    /// Puts key `i`, and the next one once it is acknowledged.
    func put(_ i: Int, writer: EtcdClient, prefix: String) {
        guard i < expected else { return }
        let key = prefix + String(i)
        sent[key] = nowNanos()
        writer.put(key, value).whenComplete { r in
            if case .failure(let e) = r { self.all.fail(e) }
            self.put(i + 1, writer: writer, prefix: prefix)
        }
    }

    func received(key: String, at t: UInt64) {
        guard let s = sent.removeValue(forKey: key) else { return }
        latencies.append(t - s)
        if latencies.count == expected { all.succeed(()) }
    }
}

/// Writes under load, the leader SIGKILLed mid-run: how long until an acknowledged write that
/// was sent after the kill, and the longest stretch with no write acknowledged at all.
private func failover(_ o: RegistryBenchOptions, _ clients: [EtcdClient]) throws {
    guard o.pids.count == o.endpoints.count else {
        throw BenchUsage("registry failover: --pids needs one PID per endpoint, in endpoint order")
    }
    let start = nowNanos()
    let deadline = start + UInt64(o.seconds * 1e9)
    var killedAt: UInt64 = 0
    var victim = ""
    let r = try closedLoop(
        o, clients, deadline: deadline,
        duringRun: {
            Thread.sleep(forTimeInterval: o.killAfter)
            // The leader, as every member reports it; kill the member whose id it is.
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            defer { try? group.syncShutdownGracefully() }
            var leaderIndex: Int?
            for (i, ep) in o.endpoints.enumerated() {
                let c = EtcdClient(endpoints: [ep], loop: group.next())
                defer { c.close() }
                guard let s = try? c.status().wait() else { continue }
                if s.leader == s.header.memberID { leaderIndex = i }
            }
            guard let i = leaderIndex else { throw BenchUsage("registry failover: no member says it leads") }
            killedAt = nowNanos()
            guard kill(o.pids[i], SIGKILL) == 0 else {
                throw BenchUsage(
                    "registry failover: cannot kill PID \(o.pids[i]) (\(String(cString: strerror(errno))))")
            }
            victim = o.endpoints[i].description
        },
        randomPut(o))
    let spans = r.spans.sorted { $0.1 < $1.1 }
    let resumed = spans.first { $0.0 >= killedAt }.map { Double($0.1 - killedAt) / 1e6 }
    var gap: UInt64 = 0
    var previous = start
    for s in spans {
        gap = max(gap, s.1 - previous)
        previous = s.1
    }
    let before = spans.filter { $0.1 < killedAt }.count
    print(
        "failover: leader \(victim) killed after \(o.killAfter) s of puts (clients \(o.clients)); "
            + "first write sent after the kill acknowledged \(resumed.map(ms) ?? "never") after it; "
            + "longest stretch with no acknowledged write \(ms(Double(gap) / 1e6)); "
            + "\(before) writes before, \(spans.count - before) after, \(r.errors) errors")
    if r.errors > 0 { print("  last error: \(r.lastError)") }
}
