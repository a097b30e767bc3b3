import TandemCore
import TandemEtcdAPI
import TandemRaft
import Testing

@Suite("InitialMembership: a joining member's answer, the saved file, MemberAdd's checks")
struct InitialMembershipTests {
    /// What a member answers a members query with (as RegistryNode.membersJSON builds it).
    let answer = InitialMembership(
        clusterID: 0xABC, memberID: 1,
        members: [
            .init(
                id: 1, name: "r1", peerURLs: ["http://10.0.0.1:2380"], clientURLs: ["http://10.0.0.1:2379"],
                learner: false),
            .init(id: 2, name: "r2", peerURLs: ["http://10.0.0.2:2380"], learner: false),
            .init(id: 0x77, name: "", peerURLs: ["http://10.0.0.4:2380"], learner: true),
        ])

    @Test("a joiner finds itself by its peer URL (host:port, trailing slash or not), not by the answerer's id")
    func joinerFindsItself() throws {
        let j = try InitialMembership(json: answer.encoded, peerURL: "http://10.0.0.4:2380/")
        #expect(j.memberID == 0x77 && j.clusterID == 0xABC)
        #expect(j.conf == ConfState(voters: [1, 2], learners: [0x77]))
        #expect(j.peers == [1: "http://10.0.0.1:2380", 2: "http://10.0.0.2:2380", 0x77: "http://10.0.0.4:2380"])
        #expect(j.members[0].clientURLs == ["http://10.0.0.1:2379"])
    }

    @Test("a joiner not added first is refused with the command to run")
    func notAddedFirst() {
        #expect {
            try InitialMembership(json: answer.encoded, peerURL: "http://10.0.0.9:2380")
        } throws: { e in
            "\(e)".contains("10.0.0.9:2380 is not in the cluster")
                && "\(e)".contains("etcdctl member add NAME --peer-urls=http://10.0.0.9:2380")
        }
    }

    @Test("the saved file names its member; a file that does not, or garbage, is refused")
    func savedFile() throws {
        let saved = try InitialMembership(json: answer.encoded, peerURL: nil)
        #expect(saved == answer)
        var stranger = answer
        stranger.memberID = 99
        #expect(throws: InitialMembership.Refusal.self) { try InitialMembership(json: stranger.encoded, peerURL: nil) }
        #expect(throws: InitialMembership.Refusal.self) { try InitialMembership(json: Array("{}".utf8), peerURL: nil) }
    }

    @Test("a new cluster's membership and id come from --initial-cluster alone")
    func newCluster() {
        let peers: [NodeID: String] = [5: "http://a:2380", 6: "http://b:2380"]
        let m = InitialMembership(newCluster: peers, names: [5: "a", 6: "b"], memberID: 6)
        #expect(m.conf == ConfState(voters: [5, 6]) && m.memberID == 6)
        #expect(m.clusterID == InitialMembership.clusterID(peers: peers))
        #expect(m.clusterID != InitialMembership.clusterID(peers: [5: "http://a:2380"]))
    }

    @Test("MemberAdd: etcd's errors for bad or taken peer URLs; ids never 0 or taken")
    func memberAddChecks() {
        let members = [["http://10.0.0.1:2380"], ["http://10.0.0.2:2380"]]
        #expect(InitialMembership.refusal(adding: [], members: members) == .memberBadURLs)
        #expect(InitialMembership.refusal(adding: ["https://10.0.0.3:2380"], members: members) == .memberBadURLs)
        #expect(InitialMembership.refusal(adding: ["http://10.0.0.3"], members: members) == .memberBadURLs)
        #expect(InitialMembership.refusal(adding: ["http://10.0.0.2:2380/"], members: members) == .peerURLExists)
        #expect(InitialMembership.refusal(adding: ["http://10.0.0.3:2380"], members: members) == nil)
        let urls = ["http://10.0.0.3:2380"]
        let id = InitialMembership.newMemberID(peerURLs: urls, clusterID: 1, salt: [7], taken: [])
        #expect(id != 0)
        #expect(InitialMembership.newMemberID(peerURLs: urls, clusterID: 1, salt: [7], taken: [id]) == id &+ 1)
        #expect(InitialMembership.newMemberID(peerURLs: urls, clusterID: 1, salt: [8], taken: []) != id)
    }
}

/// etcd's --strict-reconfig-check, case by case as etcd's RaftCluster decides them.
@Suite struct ReconfigCheckTests {
    @Test func addingAVoterNeedsTheStartedMembersToMakeTheNewQuorum() {
        #expect(ReconfigCheck.refusalToAddVoter(started: [true]) == nil)  // 1 → 2: allowed (restore)
        #expect(ReconfigCheck.refusalToAddVoter(started: [true, false]) == .notEnoughStartedMembers)  // 1 of 3
        #expect(ReconfigCheck.refusalToAddVoter(started: [true, true, true]) == nil)  // 3 of 4
        #expect(ReconfigCheck.refusalToAddVoter(started: [true, true, true, false]) == nil)  // 3 of 5
        #expect(
            ReconfigCheck.refusalToAddVoter(started: [true, true, true, false, false]) == .notEnoughStartedMembers)
    }

    @Test func promotingALearnerCountsItAsStarted() {
        #expect(ReconfigCheck.refusalToPromote(started: [true]) == nil)  // 2 of 2
        #expect(ReconfigCheck.refusalToPromote(started: [true, false, false]) == .notEnoughStartedMembers)  // 2 of 4
        #expect(ReconfigCheck.refusalToPromote(started: [true, true, false]) == nil)  // 3 of 4
    }

    @Test func removingAVoterLeavesAStartedQuorumOfTheOthers() {
        let voters: [(id: NodeID, started: Bool)] = [(1, true), (2, true), (3, false)]
        #expect(ReconfigCheck.refusalToRemove(3, voters: voters) == nil)  // the one that never started
        #expect(ReconfigCheck.refusalToRemove(1, voters: voters) == .notEnoughStartedMembers)  // 1 of 2 left
        #expect(ReconfigCheck.refusalToRemove(1, voters: [(1, true), (2, true)]) == nil)
    }
}
