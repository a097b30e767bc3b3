import TandemCore
import Testing

@testable import TandemSimulation

@Suite("Registry simulation: Raft + store + WAL on virtual time")
struct RegistrySimulationTests {
    @Test("determinism: the same seed gives the same trace hash and history, bit for bit")
    func determinism() {
        let a = RegistrySimulation.run(.init(seed: 4242))
        let b = RegistrySimulation.run(.init(seed: 4242))
        let c = RegistrySimulation.run(.init(seed: 4243))
        #expect(a.traceHash == b.traceHash)
        #expect(a.history == b.history)
        #expect(a.events == b.events)
        #expect(a.traceHash != c.traceHash)
    }

    /// 560 seeds in all across the chunks below (3- and 5-node clusters, and single nodes).
    static let chunks: [(nodes: Int, seeds: ClosedRange<UInt64>)] = [
        (3, 1...100), (3, 101...200), (3, 201...300), (3, 301...400), (5, 1...80), (5, 81...160),
    ]

    @Test(
        "sweep: random seeds with loss, duplication, reordering, partitions, pauses, crashes and membership churn",
        arguments: 0..<6)
    func sweep(chunk: Int) {
        let (nodes, seeds) = Self.chunks[chunk]
        var checkedOps = 0
        var replaced = 0
        var transfers = 0
        for seed in seeds {
            var o = RegistrySimulation.Options(seed: seed)
            o.nodes = nodes
            let r = RegistrySimulation.run(o)
            checkedOps += r.history.count
            replaced += r.membersReplaced
            transfers += r.leadershipTransfers
            #expect(r.violations.isEmpty, "seed \(seed) failed: \(r.violations); replay: \(o.replayCommand)")
            #expect(r.finalReads >= o.keys, "seed \(seed): final reads incomplete; replay: \(o.replayCommand)")
        }
        // The sweep must exercise something: ops were checked, members replaced, leaders moved.
        #expect(checkedOps > seeds.count * 50)
        #expect(replaced > 5 && transfers > 5)
    }

    @Test("regression: a forwarded proposal duplicated by the network is applied once (5 nodes, seed 40)")
    func duplicatedForward() {
        var o = RegistrySimulation.Options(seed: 40)
        o.nodes = 5
        let r = RegistrySimulation.run(o)
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.duplicatesSkipped > 0)
    }

    @Test("sweep: single-node registry with crashes mid-write")
    func singleNode() {
        var crashes = 0
        for seed in UInt64(1)...60 {
            var o = RegistrySimulation.Options(seed: seed)
            o.nodes = 1
            let r = RegistrySimulation.run(o)
            crashes += r.crashes
            #expect(r.violations.isEmpty, "seed \(seed): \(r.violations); replay: \(o.replayCommand)")
        }
        #expect(crashes > 60)
    }

    /// A short run with frequent snapshots and small WAL segments, so that the write path
    /// includes WAL appends, fsyncs, segment rolls, snapshot files and releases.
    static func crashPointOptions(nodes: Int, seed: UInt64) -> RegistrySimulation.Options {
        var o = RegistrySimulation.Options(seed: seed)
        o.nodes = nodes
        o.randomFaults = false
        o.lossRate = 0
        o.duplicateRate = 0
        o.durationMs = 400
        o.quietMs = 2_000
        o.clients = 3
        o.snapshotEvery = 8
        o.catchUpEntries = 2
        o.segmentBytes = 512
        return o
    }

    @Test("crash at every point of a single node's write path: no acknowledged write is lost")
    func crashEveryPointSingleNode() {
        let base = Self.crashPointOptions(nodes: 1, seed: 7)
        let clean = RegistrySimulation.run(base)
        #expect(clean.passed)
        #expect(clean.snapshotsTaken >= 5)  // so crash points fall inside snapshot writes too
        let points = clean.diskOperations[1]!
        #expect(points > 100)
        var torn = 0
        for p in 1...points {
            var o = base
            o.crashPoint = (node: 1, operation: p)
            let r = RegistrySimulation.run(o)
            #expect(r.crashes >= 1, "crash point \(p) was never reached")
            #expect(r.violations.isEmpty, "crash at disk operation \(p): \(r.violations)")
            #expect(r.finalReads == o.keys, "crash at disk operation \(p): final reads \(r.finalReads)")
            torn += r.tornTailsTruncated
        }
        #expect(torn > 0)
    }

    @Test("crash at every point of the leader's write path in a 3-node cluster")
    func crashEveryPointLeader() {
        let base = Self.crashPointOptions(nodes: 3, seed: 11)
        let clean = RegistrySimulation.run(base)
        #expect(clean.passed)
        let leader = clean.firstLeader
        #expect(leader != 0)
        let points = clean.diskOperations[leader]!
        #expect(points > 50)
        for p in 1...points {
            var o = base
            o.crashPoint = (node: leader, operation: p)
            let r = RegistrySimulation.run(o)
            #expect(r.crashes >= 1, "crash point \(p) was never reached")
            #expect(r.violations.isEmpty, "crash of node \(leader) at disk operation \(p): \(r.violations)")
        }
    }

    @Test("a scripted leader crash: a new leader is elected and the run stays linearizable")
    func leaderCrash() {
        var o = RegistrySimulation.Options(seed: 3)
        o.randomFaults = false
        o.timeline = [.crashLeader(atMs: 1_000, downMs: 1_000)]
        let r = RegistrySimulation.run(o)
        #expect(r.passed)
        #expect(r.failoverMs.count == 1)
        #expect(r.termsWithLeader >= 2)
        #expect(r.replayCommandMentionsSeed)
    }
}

extension RegistrySimulation.Report {
    var replayCommandMentionsSeed: Bool {
        RegistrySimulation.Options(seed: seed).replayCommand.contains("--seed \(seed)")
    }
}
