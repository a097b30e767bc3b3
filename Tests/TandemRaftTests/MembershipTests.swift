import TandemCore
import Testing

@testable import TandemRaft

@Suite("Raft membership, snapshots, reads and transfer (paper §6, §7, §8; thesis §3.10, §4, §6.4)")
struct MembershipTests {
    /// A cluster of voters 1–3 plus a node 4 that knows the cluster but is not in it yet.
    func clusterWithSpare() -> TestCluster {
        var c = TestCluster(voters: [1, 2, 3])
        var rng = SeededRandom(seed: 44)
        c.nodes[4] = RaftNode(config: RaftConfig(id: 4), initialConf: ConfState(voters: [1, 2, 3]), random: rng.fork())
        c.persisted[4] = (HardState(), nil, [])
        c.applied[4] = []
        return c
    }

    @Test("§6 / thesis §4.2.1: a learner receives the log but neither votes nor counts for commit")
    func learner() throws {
        var c = clusterWithSpare()
        c.elect(1)
        try c[1].proposeConfChange(ConfChange(.addLearner, node: 4))
        c.stabilize()
        #expect(c[1].conf.learners == [4])
        try c.propose(1, "to-learner")
        #expect(c.appliedData(4) == ["to-learner"])
        // Learners never campaign.
        for _ in 0..<100 { c[4].tick() }
        #expect(c[4].role == .follower)
        // With two voters down, the learner's ack cannot make a quorum.
        c.down = [2, 3]
        try c[1].propose(Array("needs-quorum".utf8))
        c.stabilize()
        #expect(!c.appliedData(1).contains("needs-quorum"))
    }

    @Test("thesis §4.2.1: a learner is promoted only once it has caught up")
    func promote() throws {
        var c = clusterWithSpare()
        c.elect(1)
        try c[1].proposeConfChange(ConfChange(.addLearner, node: 4))
        c.stabilize()
        // Cut the learner off, let the log move on, then try to promote it.
        c.down.insert(4)
        for k in 0..<3 { try c.propose(1, "x\(k)") }
        #expect(throws: ProposalError.learnerNotReady(4)) { try c[1].proposeConfChange(ConfChange(.promote, node: 4)) }
        c.down.remove(4)
        c.tickAll(2)
        try c[1].proposeConfChange(ConfChange(.promote, node: 4))
        c.stabilize()
        #expect(c[1].conf.voters == [1, 2, 3, 4])
        #expect(c[4].conf.voters == [1, 2, 3, 4])
    }

    @Test("thesis §4.1: one membership change at a time")
    func oneAtATime() throws {
        var c = clusterWithSpare()
        c.elect(1)
        c.down = [2, 3]  // the first change cannot commit
        try c[1].proposeConfChange(ConfChange(.addLearner, node: 4))
        #expect(throws: ProposalError.confChangeInProgress) {
            try c[1].proposeConfChange(ConfChange(.remove, node: 3))
        }
    }

    @Test("thesis §4.1: adding a voter grows the quorum; removing one shrinks it")
    func addAndRemoveVoter() throws {
        var c = clusterWithSpare()
        c.elect(1)
        try c[1].proposeConfChange(ConfChange(.addVoter, node: 4))
        c.stabilize()
        #expect(c[1].conf.voters == [1, 2, 3, 4])
        // Four voters: quorum is three; two down means no commit.
        c.down = [3, 4]
        try c[1].propose(Array("blocked".utf8))
        c.stabilize()
        #expect(!c.appliedData(1).contains("blocked"))
        c.down = []
        c.tickAll(2)
        #expect(c.appliedData(1).contains("blocked"))
        try c[1].proposeConfChange(ConfChange(.remove, node: 4))
        c.stabilize()
        try c[1].proposeConfChange(ConfChange(.remove, node: 3))
        c.stabilize()
        #expect(c[1].conf.voters == [1, 2])
        #expect(throws: ProposalError.invalidConfChange("3 is not a member")) {
            try c[1].proposeConfChange(ConfChange(.remove, node: 3))
        }
    }

    @Test("thesis §4.2.2: a leader that removes itself steps down once the change applies and hands off at once")
    func removeLeader() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c[1].proposeConfChange(ConfChange(.remove, node: 1))
        c.stabilize()
        #expect(c[1].role == .follower)
        #expect(!c[1].isPromotable)
        // No tick has passed: the handoff (TimeoutNow), not an election timeout, made the leader.
        #expect(c[2].role == .leader || c[3].role == .leader)
        #expect(c[2].conf.voters == [2, 3] && c[3].conf.voters == [2, 3])
        c.down.insert(1)
        try c.propose(c[2].role == .leader ? 2 : 3, "after-removal")
        #expect(c.appliedData(2).contains("after-removal") && c.appliedData(3).contains("after-removal"))
    }

    @Test("§7: a follower behind the leader's compacted log catches up by InstallSnapshot")
    func installSnapshot() throws {
        var c = clusterWithSpare()
        c.elect(1)
        for k in 0..<10 { try c.propose(1, "s\(k)") }
        let applied = c[1].appliedIndex
        let snap = Snapshot(
            metadata: SnapshotMetadata(index: applied, term: c[1].term(at: applied)!, conf: c[1].conf),
            data: Array("state-at-\(applied)".utf8))
        c[1].compact(snap)
        #expect(c[1].firstIndex == applied + 1)
        // Node 4 joins with an empty log: the entries it needs are gone, so it gets the snapshot.
        try c[1].proposeConfChange(ConfChange(.addLearner, node: 4))
        c.stabilize()
        c.tickAll(3)
        #expect(c.sent.contains { $0.kind == .snapshot && $0.to == 4 })
        #expect(c.persisted[4]!.snap?.data == snap.data)
        #expect(c[4].commitIndex == c[1].commitIndex)
        try c.propose(1, "after")
        #expect(c.appliedData(4).last == "after")
    }

    @Test("§7: compaction keeps the requested number of entries for slightly lagging followers")
    func compactKeepsCatchUpEntries() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        for k in 0..<10 { try c.propose(1, "k\(k)") }
        let a = c[1].appliedIndex
        let snap = Snapshot(metadata: SnapshotMetadata(index: a, term: c[1].term(at: a)!, conf: c[1].conf), data: [])
        c[1].compact(snap, keepingEntries: 4)
        #expect(c[1].firstIndex == a - 3)
        #expect(c[1].snapshot?.metadata.index == a)
    }

    @Test("§8, thesis §6.4 ReadIndex: a read is answered after a heartbeat round confirms leadership")
    func readIndex() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c.propose(1, "w")
        try c[1].readIndex(context: [1])
        c.process()
        // Nothing yet: the leader must hear from a quorum first.
        #expect(c.readStates[1, default: []].isEmpty)
        c.stabilize()
        #expect(c.readStates[1] == [ReadState(index: c[1].commitIndex, context: [1])])
    }

    @Test("§8, thesis §6.4 ReadIndex: a leader cut off from the quorum never answers a read")
    func readIndexPartitioned() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c.down = [2, 3]
        try c[1].readIndex(context: [2])
        c.stabilize()
        for _ in 0..<5 { c.tick(1) }
        #expect(c.readStates[1, default: []].isEmpty)
    }

    @Test("§8, thesis §6.4 ReadIndex: a new leader answers only after committing an entry of its term")
    func readIndexWaitsForTermCommit() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.filter = { !($0.kind == .appendResponse) }
        c.elect(1)
        try c[1].readIndex(context: [3])
        c.stabilize()
        #expect(c.readStates[1, default: []].isEmpty)
        c.filter = { _ in true }
        c.tickAll(2)
        #expect(c.readStates[1]?.first?.context == [3])
        #expect(c.readStates[1]!.first!.index >= 1)
    }

    @Test("§8, thesis §6.4 ReadIndex: a follower's read is forwarded and answered through the leader")
    func followerRead() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c.propose(1, "v")
        try c[3].readIndex(context: [7])
        c.stabilize()
        #expect(c.readStates[3] == [ReadState(index: c[1].commitIndex, context: [7])])
    }

    @Test("thesis §3.10: leadership moves to a caught-up follower on request")
    func transfer() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        try c.propose(1, "before")
        c[1].transferLeadership(to: 3)
        c.stabilize()
        #expect(c[3].role == .leader)
        #expect(c[1].role == .follower && c[1].leader == 3)
        try c.propose(3, "after")
        #expect(c.appliedData(1) == ["before", "after"])
    }

    @Test("thesis §3.10: a lagging target is caught up first; proposals wait during the transfer")
    func transferToLaggingFollower() throws {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c.down.insert(3)
        for k in 0..<5 { try c.propose(1, "m\(k)") }
        c[1].transferLeadership(to: 3)
        #expect(c[1].leadershipTransferee == 3)
        #expect(throws: ProposalError.leadershipTransferInProgress) { try c[1].propose([1]) }
        c.down.remove(3)
        c.inbox.removeAll()
        c.tickAll(1)
        #expect(c[3].role == .leader)
        #expect(c[3].lastIndex >= 7)
    }

    @Test("thesis §3.10: a transfer that cannot finish is aborted after an election timeout")
    func transferAborts() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c.down.insert(3)
        c[1].transferLeadership(to: 3)
        for _ in 0..<c[1].config.electionTicks { c.tick(1) }
        c.stabilize()
        #expect(c[1].leadershipTransferee == 0)
        #expect(c[1].role == .leader)
    }
}
