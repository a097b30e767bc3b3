import TandemCore
import TandemRaft

/// Who a member is and which cluster it belongs to, fixed when it first starts: the cluster
/// id, its own member id and the members then — from --initial-cluster for a new cluster, or
/// asked of the running cluster when joining one (`--initial-cluster-state existing`; the id
/// was given by MemberAdd). Kept in the data directory (`member.json`): later starts use it
/// and ignore the --initial-cluster flags (as etcd ignores them once it has a data dir), so
/// a member restarted with a --initial-cluster that lists members added since still starts
/// from the membership its log begins with; later changes come from the log itself.
public struct InitialMembership: Equatable, Sendable {
    public struct Member: Equatable, Sendable {
        public var id: NodeID
        public var name: String
        public var peerURLs: [String]
        public var clientURLs: [String] = []
        public var learner: Bool
        public init(id: NodeID, name: String, peerURLs: [String], clientURLs: [String] = [], learner: Bool) {
            self.id = id
            self.name = name
            self.peerURLs = peerURLs
            self.clientURLs = clientURLs
            self.learner = learner
        }
    }
    public var clusterID: UInt64
    public var memberID: NodeID
    public var members: [Member]

    public static let fileName = "member.json"

    public init(clusterID: UInt64, memberID: NodeID, members: [Member]) {
        self.clusterID = clusterID
        self.memberID = memberID
        self.members = members
    }

    public struct Refusal: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// Reads a members answer and finds this member in it by its peer URL — or, with no
    /// peer URL, reads the saved file (which names this member).
    public init(json: Bytes, peerURL: String?) throws(Refusal) {
        guard let v = try? JSONValue.parse(json), let cid = v["cluster_id"]?.string.flatMap({ UInt64($0, radix: 16) }),
            let list = v["members"]?.array
        else { throw Refusal(description: "the members answer is not what a member sends") }
        clusterID = cid
        members = try list.map { m throws(Refusal) in
            guard let id = m["id"]?.string.flatMap({ UInt64($0, radix: 16) }), id != 0 else {
                throw Refusal(description: "a member without an id in the members answer")
            }
            let learner: Bool = if case .bool(true) = m["learner"] { true } else { false }
            return Member(
                id: id, name: m["name"]?.string ?? "", peerURLs: m["peer_urls"]?.array?.compactMap(\.string) ?? [],
                clientURLs: m["client_urls"]?.array?.compactMap(\.string) ?? [], learner: learner)
        }
        guard let peerURL else {
            guard let id = v["member_id"]?.string.flatMap({ UInt64($0, radix: 16) }),
                members.contains(where: { $0.id == id })
            else { throw Refusal(description: "\(Self.fileName) does not name this member") }
            memberID = id
            return
        }
        let mine = HostPort(peerURL)
        guard let me = members.first(where: { $0.peerURLs.contains { HostPort($0) == mine } }) else {
            let known = members.map {
                "\($0.name.isEmpty ? "(unstarted)" : $0.name)=\($0.peerURLs.joined(separator: "|"))"
            }
            throw Refusal(
                description:
                    "this member's peer URL \(peerURL) is not in the cluster (members: \(known.joined(separator: ", "))); add it first: etcdctl member add NAME --peer-urls=\(peerURL)"
            )
        }
        memberID = me.id
    }

    public var conf: ConfState {
        ConfState(
            voters: Set(members.filter { !$0.learner }.map(\.id)), learners: Set(members.filter(\.learner).map(\.id)))
    }

    /// Peer URL by member id (the first of each member's).
    public var peers: [NodeID: String] {
        Dictionary(members.compactMap { m in m.peerURLs.first.map { (m.id, $0) } }, uniquingKeysWith: { a, _ in a })
    }

    public var encoded: Bytes {
        let list = members.map { m -> JSONValue in
            .object([
                "id": .string(String(m.id, radix: 16)), "name": .string(m.name),
                "peer_urls": .array(m.peerURLs.map(JSONValue.string)),
                "client_urls": .array(m.clientURLs.map(JSONValue.string)), "learner": .bool(m.learner),
            ])
        }
        return Array(
            JSONValue.object([
                "cluster_id": .string(String(clusterID, radix: 16)), "member_id": .string(String(memberID, radix: 16)),
                "members": .array(list),
            ]).encoded.utf8)
    }

    /// A new cluster's membership from --initial-cluster (member ids by name).
    public init(newCluster peers: [NodeID: String], names: [NodeID: String], memberID: NodeID) {
        clusterID = Self.clusterID(peers: peers)
        self.memberID = memberID
        members = peers.keys.sorted().map {
            Member(id: $0, name: names[$0] ?? "", peerURLs: [peers[$0]!], learner: false)
        }
    }

    /// A new cluster's id, from its initial members and their peer URLs.
    public static func clusterID(peers: [NodeID: String]) -> UInt64 {
        var h = FNV1a()
        for (id, url) in peers.sorted(by: { $0.key < $1.key }) {
            h.add(id)
            h.add(url)
        }
        return h.value
    }

    /// etcd's MemberAdd checks: http URLs with a host and port, none already a member's
    /// (compared as host:port, so `http://h:1/` and `http://h:1` are the same).
    public static func refusal(adding peerURLs: [String], members: [[String]]) -> EtcdStatus? {
        guard !peerURLs.isEmpty, peerURLs.allSatisfy({ $0.hasPrefix("http://") && HostPort($0) != nil }) else {
            return .memberBadURLs
        }
        let taken = Set(members.joined().compactMap(HostPort.init))
        return peerURLs.contains { HostPort($0).map(taken.contains) ?? false } ? .peerURLExists : nil
    }

    /// An id for a member MemberAdd adds: drawn from its peer URLs, the cluster and `salt`
    /// (the caller's time and a counter, as etcd mixes in the time), never 0 and never one
    /// in `taken`.
    public static func newMemberID(peerURLs: [String], clusterID: UInt64, salt: [UInt64], taken: Set<NodeID>) -> NodeID
    {
        var h = FNV1a()
        for u in peerURLs.sorted() { h.add(u) }
        h.add(clusterID)
        for s in salt { h.add(s) }
        var id = h.value
        while id == 0 || taken.contains(id) { id &+= 1 }
        return id
    }
}

/// etcd's `--strict-reconfig-check` (on by default in etcd 3.4): a membership change is refused
/// when the started voting members would be fewer than the quorum after it — adding voters that
/// never start would otherwise take the quorum away and stall every write. "Started" is
/// etcd's: the member has a name (it published its attributes, or --initial-cluster named it).
/// etcd's RaftCluster.IsReadyToAddVotingMember / IsReadyToPromoteMember /
/// IsReadyToRemoveVotingMember, on the voting members' started flags.
public enum ReconfigCheck {
    /// Adding a voter (learners are not checked).
    public static func refusalToAddVoter(started voters: [Bool]) -> EtcdStatus? {
        let members = voters.count + 1
        let started = voters.filter { $0 }.count
        // Adding a second member to a one-member cluster (restoring from a backup) is allowed.
        if started == 1 && members == 2 { return nil }
        return started < members / 2 + 1 ? .notEnoughStartedMembers : nil
    }

    /// Promoting a learner, which counts as started and as a member of the new quorum.
    public static func refusalToPromote(started voters: [Bool]) -> EtcdStatus? {
        let members = voters.count + 1
        let started = voters.filter { $0 }.count + 1
        return started < members / 2 + 1 ? .notEnoughStartedMembers : nil
    }

    /// Removing voter `id`: the others that have started must still make a quorum of the others.
    public static func refusalToRemove(_ id: NodeID, voters: [(id: NodeID, started: Bool)]) -> EtcdStatus? {
        let others = voters.filter { $0.id != id }
        return others.filter(\.started).count < others.count / 2 + 1 ? .notEnoughStartedMembers : nil
    }
}
