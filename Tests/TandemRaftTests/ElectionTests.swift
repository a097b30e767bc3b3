import TandemCore
import Testing

@testable import TandemRaft

@Suite("Raft elections (§5.1, §5.2, §5.4.1, thesis §9.6)")
struct ElectionTests {
    @Test("§5.2: a single voter elects itself and commits its empty entry")
    func singleNode() {
        var c = TestCluster(voters: [1])
        c.electByTimeout(1)
        #expect(c[1].role == .leader)
        #expect(c[1].term == 1)
        #expect(c[1].commitIndex == 1)
    }

    @Test("§5.2: three voters elect exactly one leader, and the others follow it")
    func threeNodes() {
        var c = TestCluster(voters: [1, 2, 3])
        c.electByTimeout(1)
        #expect(c[1].role == .leader)
        #expect(c[2].role == .follower && c[2].leader == 1)
        #expect(c[3].role == .follower && c[3].leader == 1)
        #expect(c[2].term == c[1].term)
    }

    @Test("§5.2: election timeouts are randomized in [electionTicks, 2*electionTicks)")
    func randomizedTimeouts() {
        var seen = Set<Int>()
        for seed in 1...40 {
            var n = RaftNode(
                config: RaftConfig(id: 1), initialConf: ConfState(voters: [1, 2, 3]),
                random: SeededRandom(seed: UInt64(seed)))
            var ticks = 0
            while n.role == .follower && ticks < 100 {
                n.tick()
                ticks += 1
            }
            #expect(ticks >= 10 && ticks < 20)
            seen.insert(ticks)
        }
        #expect(seen.count > 3)
    }

    @Test("§5.2: a node grants at most one vote per term")
    func oneVotePerTerm() {
        var c = TestCluster(voters: [1, 2, 3]) { $0.preVote = false }
        c[3].step(Message(kind: .vote, from: 1, to: 3, term: 1, logTerm: 0, index: 0))
        c[3].step(Message(kind: .vote, from: 2, to: 3, term: 1, logTerm: 0, index: 0))
        c.process()
        let replies = c.sent.filter { $0.kind == .voteResponse && $0.from == 3 }
        #expect(replies.count == 2)
        #expect(replies[0].to == 1 && !replies[0].reject)
        #expect(replies[1].to == 2 && replies[1].reject)
        #expect(c[3].vote == 1)
    }

    @Test("§5.4.1: a voter denies its vote to a candidate whose log is less up-to-date")
    func electionRestriction() throws {
        var c = TestCluster(voters: [1, 2, 3]) {
            $0.preVote = false
            $0.checkQuorum = false  // no leader lease: node 3 must judge the candidate's log
        }
        c.elect(1)
        try c.propose(1, "x")
        // Node 3's log now ends at (term 1, index 2). A candidate with an empty log loses.
        c[3].step(Message(kind: .vote, from: 2, to: 3, term: 5, logTerm: 0, index: 0))
        c.process()
        let r = c.sent.last { $0.kind == .voteResponse && $0.from == 3 }
        #expect(r?.reject == true)
        // A candidate with a longer log of the same term wins it.
        c[3].step(Message(kind: .vote, from: 2, to: 3, term: 6, logTerm: 1, index: 9))
        c.process()
        #expect(c.sent.last { $0.kind == .voteResponse && $0.from == 3 }?.reject == false)
    }

    @Test("§5.1: a message from a stale term is rejected and tells its sender the new term")
    func staleTerm() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c.elect(1)
        c[2].step(Message(kind: .heartbeat, from: 1, to: 2, term: 3))
        c.sent.removeAll()
        c[2].step(Message(kind: .append, from: 3, to: 2, term: 2, index: 0))
        c.process()
        #expect(c[2].leader == 1)
        #expect(c[2].term == 3)
        // The stale sender learns the newer term from the response.
        let reply = c.sent.first { $0.from == 2 && $0.to == 3 }
        #expect(reply?.kind == .appendResponse && reply?.term == 3)
    }

    @Test("§5.1: a leader that sees a higher term steps down")
    func higherTermDeposes() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c[1].step(Message(kind: .appendResponse, from: 2, to: 1, term: c[1].term + 3, index: 0))
        #expect(c[1].role == .follower)
        #expect(c[1].term == 4)
    }

    @Test("thesis §9.6 pre-vote: a partitioned node rejoining does not raise terms or depose the leader")
    func preVoteProtectsLeader() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        let term = c[1].term
        c.down.insert(3)
        for _ in 0..<100 { c[3].tick() }
        // Node 3 keeps pre-voting in isolation; its term never moves.
        #expect(c[3].term == term)
        #expect(c[3].role == .preCandidate)
        c.inbox.removeAll()
        c.down.remove(3)
        c.tickAll(3)
        #expect(c[1].role == .leader)
        #expect(c[1].term == term)
        #expect(c[3].leader == 1)
    }

    @Test("thesis §9.6 without pre-vote: the same rejoin would disrupt (control for the test above)")
    func withoutPreVoteRejoinDisrupts() {
        var c = TestCluster(voters: [1, 2, 3]) {
            $0.preVote = false
            $0.checkQuorum = false
        }
        c.elect(1)
        let term = c[1].term
        c.down.insert(3)
        for _ in 0..<100 { c[3].tick() }
        #expect(c[3].term > term + 3)
        c.inbox.removeAll()
        c.down.remove(3)
        c.tickAll(3)
        #expect(c[1].term > term)
    }

    @Test("check-quorum: a leader without contact from a quorum for an election timeout steps down")
    func checkQuorum() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        c.down = [2, 3]
        for _ in 0..<(2 * c[1].config.electionTicks) { c.tick(1) }
        #expect(c[1].role == .follower)
        #expect(c[1].leader == 0)
    }

    @Test("check-quorum: a follower in contact with its leader ignores vote requests (leader lease)")
    func ignoresVotesInLease() {
        var c = TestCluster(voters: [1, 2, 3])
        c.elect(1)
        let term = c[2].term
        c[2].step(Message(kind: .vote, from: 3, to: 2, term: term + 1, logTerm: 9, index: 9))
        #expect(c[2].term == term)
        #expect(c[2].leader == 1)
    }
}
