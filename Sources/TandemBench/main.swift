// Micro-benchmarks of the pure registry cores. A shell: it reads the clock, the cores don't.
// Run with `make bench` (release build); results go to bench/RESULTS.md by hand, with the
// command and the machine.
import Foundation
import TandemCore
import TandemRaft
import TandemSimulation
import TandemStore

func measure(_ name: String, ops: Int, unit: String, _ body: () -> Void) {
    let clock = ContinuousClock()
    body()  // warm-up
    var best = Duration.seconds(1_000)
    for _ in 0..<3 {
        let t = clock.measure(body)
        if t < best { best = t }
    }
    let secs = Double(best.components.seconds) + Double(best.components.attoseconds) / 1e18
    let rate = Int((Double(ops) / secs).rounded())
    let padded = name + String(repeating: " ", count: max(1, 58 - name.count))
    let r = String(rate)
    let ms = Int((secs * 1000).rounded())
    print(
        padded + String(repeating: " ", count: max(0, 10 - r.count)) + r + " \(unit)/s  (best of 3: \(ops) in \(ms) ms)"
    )
}

// `TandemBench identity`: tokens and proofs of possession.
if CommandLine.arguments.dropFirst().first == "identity" {
    try identityBenchmarks()
    exit(0)
}

// `TandemBench registry MODE …`: a load client for Tandem's registry or etcd (bench/registry).
if CommandLine.arguments.dropFirst().first == "registry" {
    do {
        try registryBenchmarks(Array(CommandLine.arguments.dropFirst(2)))
    } catch {
        FileHandle.standardError.write(Data("TandemBench: \(error)\n".utf8))
        exit(2)
    }
    exit(0)
}

// `TandemBench policies`: only the Lua policy hooks.
if CommandLine.arguments.dropFirst().first == "policies" {
    try policyBenchmarks()
    exit(0)
}

// MARK: Raft: a 3-node cluster in memory, every message delivered, every Ready persisted.

struct MemCluster {
    var nodes: [RaftNode]
    var inbox: [Message] = []
    /// What each node "persisted": like etcd's MemoryStorage, entries are copied in.
    var stored: [[Entry]] = [[], [], []]
    var hardStates: [HardState] = Array(repeating: HardState(), count: 3)

    init() {
        var rng = SeededRandom(seed: 1)
        nodes = (1...3).map { id in
            var c = RaftConfig(id: NodeID(id))
            c.maxInflightMessages = 256
            return RaftNode(config: c, initialConf: ConfState(voters: [1, 2, 3]), random: rng.fork())
        }
        nodes[0].step(Message(kind: .timeoutNow, to: 1, term: 0))
        settle()
    }

    mutating func settle() {
        repeat {
            for i in nodes.indices {
                while nodes[i].hasReady {
                    let rd = nodes[i].ready()
                    if let hs = rd.hardState { hardStates[i] = hs }
                    if let first = rd.entries.first {
                        while let last = stored[i].last, last.index >= first.index { stored[i].removeLast() }
                        stored[i].append(contentsOf: rd.entries)
                    }
                    inbox.append(contentsOf: rd.messages)
                    nodes[i].advance(rd)
                }
            }
            let batch = inbox
            inbox = []
            for m in batch { nodes[Int(m.to) - 1].step(m) }
        } while !inbox.isEmpty || nodes.contains { $0.hasReady }
    }
}

let payload = Bytes(repeating: 0x5A, count: 128)
let raftEntries = 200_000
measure("raft: 3-node cluster, 128 B entries, batches of 100", ops: raftEntries, unit: "entries") {
    var c = MemCluster()
    for _ in 0..<(raftEntries / 100) {
        for _ in 0..<100 { try! c.nodes[0].propose(payload) }
        c.settle()
    }
    precondition(c.nodes[2].commitIndex >= UInt64(raftEntries))
}
measure("raft: 3-node cluster, 128 B entries, one at a time", ops: 20_000, unit: "entries") {
    var c = MemCluster()
    for _ in 0..<20_000 {
        try! c.nodes[0].propose(payload)
        c.settle()
    }
}

// MARK: MVCC

let keys = (0..<100_000).map { Array("/tandem/services/users/instance-\($0)".utf8) }
measure("mvcc: put 100,000 new keys (64 B values)", ops: keys.count, unit: "puts") {
    var s = MVCCStore()
    let v = Bytes(repeating: 1, count: 64)
    for k in keys { _ = s.apply(.put(PutRequest(key: k, value: v))) }
}
// Keys in a shuffled order, like etcdctl check perf's random keys: inserts land anywhere.
var shuffleRNG = SeededRandom(seed: 3)
let shuffled = keys.shuffled(using: &shuffleRNG)
measure("mvcc: put 100,000 new keys in random order", ops: shuffled.count, unit: "puts") {
    var s = MVCCStore()
    let v = Bytes(repeating: 1, count: 64)
    for k in shuffled { s.apply(.put(PutRequest(key: k, value: v))) }
}
var loaded = MVCCStore()
for k in keys { _ = loaded.apply(.put(PutRequest(key: k, value: Bytes(repeating: 1, count: 64)))) }
measure("mvcc: update 1,000 hot keys, 100,000 puts", ops: 100_000, unit: "puts") {
    var s = loaded
    for i in 0..<100_000 { _ = s.apply(.put(PutRequest(key: keys[i % 1_000], value: payload))) }
}
measure("mvcc: get one key (100,000-key store)", ops: 200_000, unit: "reads") {
    for i in 0..<200_000 { _ = try! loaded.range(RangeRequest(key: keys[(i &* 7919) % keys.count])) }
}
// 1,000 services × 100 instances: a prefix range returns one service's 100 instances.
func pad(_ n: Int, _ w: Int) -> String { String(repeating: "0", count: max(0, w - String(n).count)) + String(n) }
var services = MVCCStore()
for svc in 0..<1_000 {
    for inst in 0..<100 {
        let k = Array("/tandem/services/svc-\(pad(svc, 4))/inst-\(pad(inst, 3))".utf8)
        services.apply(.put(PutRequest(key: k, value: Bytes(repeating: 1, count: 64))))
    }
}
measure("mvcc: prefix range, one service's 100 instances (100k keys)", ops: 20_000, unit: "ranges") {
    for i in 0..<20_000 {
        let r = try! services.range(.prefix(Array("/tandem/services/svc-\(pad((i * 37) % 1_000, 4))/".utf8)))
        precondition(r.kvs.count == 100)
    }
}
measure("mvcc: from-key range, limit 100, counting to the end (100k)", ops: 2_000, unit: "ranges") {
    for i in 0..<2_000 {
        var q = RangeRequest(key: keys[(i * 131) % 99_000], rangeEnd: [0])
        q.limit = 100
        _ = try! loaded.range(q)
    }
}

// MARK: Watch fan-out

measure("watch: 1,000 watchers on one prefix, 2,000 puts", ops: 2_000_000, unit: "events delivered") {
    var s = MVCCStore()
    var hub = WatchHub()
    for _ in 0..<1_000 {
        _ = try! hub.create(WatchRequest(key: Array("/cfg/".utf8), rangeEnd: Array("/cfg0".utf8)), store: s)
    }
    _ = hub.take(store: s)
    var delivered = 0
    for i in 0..<2_000 {
        let (_, ev) = s.apply(.put(PutRequest(key: Array("/cfg/key\(i % 10)".utf8), value: payload)))
        hub.publish(revision: s.revision, events: ev, store: s)
        if i % 10 == 9 { delivered += hub.take(store: s).reduce(0) { $0 + $1.events.count } }
    }
    precondition(delivered == 2_000_000)
}

// MARK: Whole-registry simulation

measure("simulation: 3-node registry, 3 s virtual with faults", ops: 20, unit: "seeds") {
    for seed in UInt64(1)...20 { precondition(RegistrySimulation.run(.init(seed: seed)).passed) }
}
