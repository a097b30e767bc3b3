import TandemCore
import Testing

@testable import TandemRaft

@Suite("Raft log replication and commit (§5.3, §5.4.2, §5.4.3)")
struct ReplicationTests {
    @Test("§5.3: a proposal is replicated to every node and applied in order")
    func replicateAndApply() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        for s in ["a", "b", "c"] { try c.propose(1, s) }
        for id: NodeID in [1, 2, 3] { #expect(c.appliedData(id) == ["a", "b", "c"]) }
        #expect(c[2].commitIndex == c[1].lastIndex)
    }

    @Test("§5.3: a follower forwards proposals to the leader")
    func followerForwards() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c.propose(3, "via-follower")
        #expect(c.appliedData(1) == ["via-follower"])
    }

    @Test("§5.3: without a leader a proposal is refused, not silently dropped")
    func noLeader() {
        var c = TestCluster(voters: [1, 2, 3])
        #expect(throws: ProposalError.noLeader) { try c.propose(2, "x") }
    }

    @Test("§5.3: a follower's conflicting suffix is replaced by the leader's entries")
    func conflictingSuffixTruncated() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c.propose(1, "committed")
        // Node 1 appends entries nobody else receives, then loses leadership.
        c.filter = { $0.from != 1 }
        for s in ["lost-1", "lost-2", "lost-3"] { try c[1].propose(Array(s.utf8)) }
        c.stabilize()
        c.filter = { _ in true }
        c.down.insert(1)
        c.elect(2)
        try c.propose(2, "new")
        c.down.remove(1)
        c.tickAll(3)
        #expect(c.appliedData(1) == ["committed", "new"])
        #expect(c[1].lastIndex == c[2].lastIndex)
        for i in 1...c[2].lastIndex { #expect(c[1].term(at: i) == c[2].term(at: i)) }
    }

    @Test("§5.3 fast backtracking: a follower with a long divergent suffix is found in one round trip")
    func fastBacktracking() throws {
        // Leader-to-be 2 holds (1,1) then nine entries of term 2; node 3 holds fifty of term 1.
        var c = TestCluster(voters: [1, 2, 3])
        let good = [Entry(term: 1, index: 1)] + (2...10).map { Entry(term: 2, index: UInt64($0)) }
        let stale = (1...50).map { Entry(term: 1, index: UInt64($0), data: Array("old".utf8)) }
        for (id, ents, t) in [(NodeID(1), good, UInt64(2)), (2, good, 2), (3, stale, 1)] {
            c.nodes[id] = RaftNode(
                config: c[id].config, initialConf: c[id].conf, random: SeededRandom(seed: id),
                hardState: HardState(term: t, vote: 0, commit: 1), entries: ents)
        }
        c.elect(2)
        #expect(c[2].role == .leader)
        let rejections = c.sent.filter { $0.kind == .appendResponse && $0.from == 3 && $0.reject }
        // One rejection carrying a term hint is enough; stepping back one entry at a time needs 9.
        #expect(rejections.count == 1)
        #expect(c[3].lastIndex == c[2].lastIndex)
        for i in 1...c[2].lastIndex { #expect(c[3].term(at: i) == c[2].term(at: i)) }
    }

    @Test("§5.4.2: a leader never commits an entry of an earlier term by counting replicas")
    func figure8() throws {
        // Node 1 restarts holding (1,1),(2,2) with term 2; it becomes leader of term 3.
        var c = TestCluster(voters: [1, 2, 3]) { $0.preVote = false }
        let old = [Entry(term: 1, index: 1), Entry(term: 2, index: 2, data: Array("old".utf8))]
        c.nodes[1] = RaftNode(
            config: c[1].config, initialConf: c[1].conf, random: SeededRandom(seed: 3),
            hardState: HardState(term: 2, vote: 1, commit: 1), entries: old)
        c.filter = { !($0.kind == .append && $0.from == 1) }
        c.elect(1)
        #expect(c[1].role == .leader && c[1].term == 3)
        // Node 2 acknowledges index 2 (the term-2 entry) but not the term-3 entry at 3.
        c[1].step(Message(kind: .appendResponse, from: 2, to: 1, term: 3, index: 2))
        c.process()
        // A majority holds index 2, yet it is from term 2: it must stay uncommitted.
        #expect(c[1].commitIndex == 1)
        c[1].step(Message(kind: .appendResponse, from: 2, to: 1, term: 3, index: 3))
        c.process()
        // Committing the term-3 entry commits index 2 indirectly (§5.4.2).
        #expect(c[1].commitIndex == 3)
    }

    @Test("§5.4.3 state machine safety: every node applies the same entry at each index")
    func stateMachineSafety() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        for k in 0..<10 { try c.propose(1, "e\(k)") }
        c.down.insert(1)
        c.elect(2)
        for k in 10..<15 { try c.propose(2, "e\(k)") }
        c.down.remove(1)
        c.tickAll(3)
        let reference = c.applied[2]!.map { [$0.index, $0.term] }
        #expect(c.applied[1]!.map { [$0.index, $0.term] } == reference)
        #expect(c.applied[3]!.map { [$0.index, $0.term] } == reference)
        #expect(c.appliedData(1) == (0..<15).map { "e\($0)" })
    }

    @Test("pipelining: appends in flight to one follower are bounded by maxInflightMessages")
    func inflightWindow() throws {
        var c = TestCluster(voters: [1, 2]) { $0.maxInflightMessages = 4 }
        c.elect(1)
        // Follower 2 stops answering; the leader keeps proposing.
        c.filter = { !($0.from == 2) }
        c.sent.removeAll()
        for k in 0..<20 { try c[1].propose(Array("p\(k)".utf8)) }
        c.process()
        let appends = c.sent.filter { $0.kind == .append && $0.to == 2 && !$0.entries.isEmpty }
        #expect(appends.count == 4)
    }

    @Test("batching: one append carries at most maxBytesPerMessage of entries")
    func batching() throws {
        var c = TestCluster(voters: [1, 2]) { $0.maxBytesPerMessage = 200 }
        c.elect(1)
        c.down.insert(2)
        for _ in 0..<10 { try c[1].propose(Bytes(repeating: 7, count: 50)) }
        c.process()
        c.down.remove(2)
        c.inbox.removeAll()
        c.sent.removeAll()
        c.tickAll(3)
        let appends = c.sent.filter { $0.kind == .append && $0.to == 2 && !$0.entries.isEmpty }
        #expect(appends.count >= 3)
        for a in appends where a.entries.count > 1 { #expect(a.entries.reduce(0) { $0 + $1.size } <= 200) }
        #expect(c.appliedData(2).count == 10)
    }

    @Test("bounded: proposals beyond maxUncommittedBytes are refused with the limit's name")
    func uncommittedLimit() throws {
        var c = TestCluster(voters: [1, 2, 3]) { $0.maxUncommittedBytes = 300 }
        c.elect(1)
        c.down = [2, 3]
        var refused: ProposalError?
        for _ in 0..<20 {
            do { try c[1].propose(Bytes(repeating: 1, count: 50)) } catch {
                refused = error
                break
            }
        }
        #expect(refused == .uncommittedLogFull(limit: 300))
        #expect(refused?.description.contains("maxUncommittedBytes") == true)
    }

    @Test("restart: a node rebuilt from its persisted state keeps its log, term and vote")
    func restartFromPersisted() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        for k in 0..<5 { try c.propose(1, "r\(k)") }
        let term = c[2].term
        let last = c[2].lastIndex
        c.restart(2)
        #expect(c[2].term == term)
        #expect(c[2].lastIndex == last)
        c.tickAll(2)
        #expect(c.appliedData(2) == (0..<5).map { "r\($0)" })
    }

    @Test("codec: messages round-trip, and garbage is rejected with an error, not a trap")
    func codec() {
        let m = Message(
            kind: .snapshot, from: 1, to: 2, term: 7, logTerm: 6, index: 5,
            entries: [Entry(term: 6, index: 5, data: [1, 2])],
            commit: 4, reject: true, rejectHint: 3,
            snapshot: Snapshot(
                metadata: SnapshotMetadata(index: 9, term: 6, conf: ConfState(voters: [1, 2], learners: [3])), data: [9]
            ),
            context: [4])
        #expect((try? Message(decoding: m.encoded())) == m)
        #expect(throws: CodecError.self) { try Message(decoding: [200, 1, 2]) }
        #expect(throws: CodecError.self) { try Message(decoding: Array(m.encoded().dropLast(3))) }
    }
}
