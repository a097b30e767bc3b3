import TandemCore
import TandemRaft

/// A synchronous in-memory cluster for Raft tests: messages are queued and delivered on
/// demand; a filter can drop them. Storage is a plain in-memory copy of what Ready asked
/// to persist, so a node can be "restarted" from it.
struct TestCluster {
    var nodes: [NodeID: RaftNode] = [:]
    var persisted: [NodeID: (hs: HardState, snap: Snapshot?, entries: [Entry])] = [:]
    var applied: [NodeID: [Entry]] = [:]
    var readStates: [NodeID: [ReadState]] = [:]
    var inbox: [Message] = []
    var down = Set<NodeID>()
    /// Return false to drop a message.
    var filter: (Message) -> Bool = { _ in true }
    var sent: [Message] = []

    init(voters: [NodeID], learners: [NodeID] = [], seed: UInt64 = 1, configure: (inout RaftConfig) -> Void = { _ in })
    {
        var rng = SeededRandom(seed: seed)
        for id in voters + learners {
            var c = RaftConfig(id: id)
            configure(&c)
            nodes[id] = RaftNode(
                config: c, initialConf: ConfState(voters: Set(voters), learners: Set(learners)), random: rng.fork())
            persisted[id] = (HardState(), nil, [])
            applied[id] = []
        }
    }

    subscript(_ id: NodeID) -> RaftNode {
        get { nodes[id]! }
        set { nodes[id] = newValue }
    }

    /// Handles every node's Ready: persist, queue messages, apply, advance.
    mutating func process() {
        for id in nodes.keys.sorted() where !down.contains(id) {
            while nodes[id]!.hasReady {
                let rd = nodes[id]!.ready()
                var p = persisted[id]!
                if let hs = rd.hardState { p.hs = hs }
                if let s = rd.snapshot {
                    p.snap = s
                    p.entries = []
                    applied[id] = []
                }
                if let first = rd.entries.first {
                    p.entries.removeAll { $0.index >= first.index }
                    p.entries.append(contentsOf: rd.entries)
                }
                persisted[id] = p
                for m in rd.messages {
                    sent.append(m)
                    if filter(m) { inbox.append(m) }
                }
                applied[id]!.append(contentsOf: rd.committedEntries)
                readStates[id, default: []].append(contentsOf: rd.readStates)
                nodes[id]!.advance(rd)
            }
        }
    }

    /// Delivers queued messages until the cluster is quiet.
    mutating func stabilize(maxRounds: Int = 1_000) {
        process()
        var rounds = 0
        while !inbox.isEmpty && rounds < maxRounds {
            let batch = inbox
            inbox = []
            for m in batch where !down.contains(m.to) && nodes[m.to] != nil { nodes[m.to]!.step(m) }
            process()
            rounds += 1
        }
    }

    mutating func tick(_ id: NodeID, times: Int = 1) {
        for _ in 0..<times { nodes[id]!.tick() }
        process()
    }

    /// Makes `id` leader the way a leadership transfer does (thesis §3.10): it campaigns at
    /// once and its vote requests may override followers' leader leases.
    mutating func elect(_ id: NodeID) {
        nodes[id]!.step(Message(kind: .timeoutNow, from: 0, to: id, term: nodes[id]!.term))
        stabilize()
    }

    /// Lets `id` win an ordinary election by timing out first.
    mutating func electByTimeout(_ id: NodeID) {
        for _ in 0..<(nodes[id]!.config.electionTicks * 2) where nodes[id]!.role != .leader {
            nodes[id]!.tick()
            stabilize()
        }
    }

    mutating func tickAll(_ times: Int) {
        for _ in 0..<times {
            for id in nodes.keys.sorted() where !down.contains(id) { nodes[id]!.tick() }
            stabilize()
        }
    }

    mutating func propose(_ id: NodeID, _ s: String) throws {
        try nodes[id]!.propose(Array(s.utf8))
        stabilize()
    }

    func appliedData(_ id: NodeID) -> [String] {
        applied[id]!.filter { $0.kind == .normal && !$0.data.isEmpty }.map { $0.data.utf8String }
    }

    /// Restarts `id` from what it persisted (losing everything in memory).
    mutating func restart(_ id: NodeID, seed: UInt64 = 99) {
        let p = persisted[id]!
        let old = nodes[id]!
        nodes[id] = RaftNode(
            config: old.config, initialConf: old.conf, random: SeededRandom(seed: seed), hardState: p.hs,
            snapshot: p.snap, entries: p.entries)
        applied[id] = []
        down.remove(id)
    }
}
