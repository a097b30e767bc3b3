/// TandemRaft — Raft consensus as a pure state machine.
///
/// Owns: elections (pre-vote, check-quorum), log replication with flow control, commit,
/// ReadIndex, snapshots, single-server membership changes and leadership transfer.
/// Imports only TandemCore and swift-collections. It never does I/O, reads a clock, sleeps
/// or draws unseeded randomness: time is `tick()`, randomness is a `SeededRandom` passed in,
/// and every effect is handed to the shell in a `Ready` value.
import TandemCore

public enum EntryKind: UInt8, Sendable {
    case normal = 0
    case confChange = 1
}

public struct Entry: Equatable, Sendable {
    public var term: UInt64
    public var index: UInt64
    public var kind: EntryKind
    public var data: Bytes

    public init(term: UInt64, index: UInt64, kind: EntryKind = .normal, data: Bytes = []) {
        self.term = term
        self.index = index
        self.kind = kind
        self.data = data
    }

    /// Bytes this entry costs in size-bounded batches.
    public var size: Int { data.count + 24 }
}

/// The state that must be on stable storage before any message that depends on it is sent.
public struct HardState: Equatable, Sendable {
    public var term: UInt64
    public var vote: NodeID
    public var commit: UInt64
    public init(term: UInt64 = 0, vote: NodeID = 0, commit: UInt64 = 0) {
        self.term = term
        self.vote = vote
        self.commit = commit
    }
}

public struct ConfState: Equatable, Sendable {
    public var voters: Set<NodeID>
    public var learners: Set<NodeID>
    public init(voters: Set<NodeID> = [], learners: Set<NodeID> = []) {
        self.voters = voters
        self.learners = learners
    }
    public var members: Set<NodeID> { voters.union(learners) }
}

/// One-server-at-a-time membership change (Ongaro's thesis §4.1).
public struct ConfChange: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case addVoter = 0
        /// Adds a non-voting member that receives the log (thesis §4.2.1).
        case addLearner = 1
        case remove = 2
        /// Turns a caught-up learner into a voter.
        case promote = 3
    }
    public var kind: Kind
    public var node: NodeID
    /// Opaque to Raft: the shell puts the member's peer address here.
    public var context: Bytes
    public init(_ kind: Kind, node: NodeID, context: Bytes = []) {
        self.kind = kind
        self.node = node
        self.context = context
    }
}

public struct SnapshotMetadata: Equatable, Sendable {
    public var index: UInt64
    public var term: UInt64
    public var conf: ConfState
    public init(index: UInt64, term: UInt64, conf: ConfState) {
        self.index = index
        self.term = term
        self.conf = conf
    }
}

public struct Snapshot: Equatable, Sendable {
    public var metadata: SnapshotMetadata
    /// The state machine's own serialization at `metadata.index`.
    public var data: Bytes
    public init(metadata: SnapshotMetadata, data: Bytes) {
        self.metadata = metadata
        self.data = data
    }
}

public enum MessageKind: UInt8, Sendable, CaseIterable {
    case propose = 0
    case append = 1
    case appendResponse = 2
    case vote = 3
    case voteResponse = 4
    case preVote = 5
    case preVoteResponse = 6
    case heartbeat = 7
    case heartbeatResponse = 8
    case snapshot = 9
    case timeoutNow = 10
    case readIndex = 11
    case readIndexResponse = 12
    case transferLeader = 13
}

/// A message between Raft nodes. Fields not used by a kind stay zero.
public struct Message: Equatable, Sendable {
    public var kind: MessageKind
    public var from: NodeID
    public var to: NodeID
    public var term: UInt64
    /// For append: term of the entry at `index`; for votes: the candidate's last log term;
    /// for a rejected append response: the term hint for fast backtracking.
    public var logTerm: UInt64
    public var index: UInt64
    public var entries: [Entry]
    public var commit: UInt64
    public var reject: Bool
    public var rejectHint: UInt64
    public var snapshot: Snapshot?
    /// ReadIndex request context, or `Message.transferContext` on a forced vote.
    public var context: Bytes

    public init(
        kind: MessageKind, from: NodeID = 0, to: NodeID = 0, term: UInt64 = 0, logTerm: UInt64 = 0,
        index: UInt64 = 0, entries: [Entry] = [], commit: UInt64 = 0, reject: Bool = false,
        rejectHint: UInt64 = 0, snapshot: Snapshot? = nil, context: Bytes = []
    ) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
        self.logTerm = logTerm
        self.index = index
        self.entries = entries
        self.commit = commit
        self.reject = reject
        self.rejectHint = rejectHint
        self.snapshot = snapshot
        self.context = context
    }

    /// Marks a vote request sent because of a leadership transfer: it may disrupt a lease.
    public static let transferContext: Bytes = Array("tandem-transfer".utf8)
}

/// The answer to a ReadIndex request: once the state machine has applied `index`, a read
/// served locally is linearizable (thesis §6.4).
public struct ReadState: Equatable, Sendable {
    public var index: UInt64
    public var context: Bytes
}

public enum RaftRole: String, Sendable {
    case follower
    case preCandidate = "pre-candidate"
    case candidate
    case leader
}

/// Everything the shell must do, in order: (1) persist `hardState`, `entries` and
/// `snapshot` durably (one fsync), (2) send `messages`, (3) apply `snapshot` then
/// `committedEntries` to the state machine, (4) call `advance(ready)`.
public struct Ready: Sendable {
    public var hardState: HardState?
    public var entries: [Entry] = []
    public var snapshot: Snapshot?
    public var committedEntries: [Entry] = []
    public var messages: [Message] = []
    public var readStates: [ReadState] = []
    public var role: RaftRole
    public var leader: NodeID

    /// Whether step (1) needs an fsync.
    public var mustSync: Bool { hardState != nil || !entries.isEmpty || snapshot != nil }
}

public enum ProposalError: Error, Equatable, CustomStringConvertible {
    case noLeader
    case notLeader(leader: NodeID)
    case leadershipTransferInProgress
    case confChangeInProgress
    case uncommittedLogFull(limit: Int)
    case invalidConfChange(String)
    case learnerNotReady(NodeID)
    case notMember

    public var description: String {
        switch self {
        case .noLeader: return "no leader"
        case .notLeader(let l): return "not the leader (leader is \(l))"
        case .leadershipTransferInProgress: return "leadership transfer in progress"
        case .confChangeInProgress: return "a membership change is still being applied"
        case .uncommittedLogFull(let l):
            return "uncommitted log exceeds its limit of \(l) bytes (maxUncommittedBytes)"
        case .invalidConfChange(let s): return "invalid membership change: \(s)"
        case .learnerNotReady(let n): return "learner \(n) has not caught up with the leader"
        case .notMember: return "this node is not a member of the cluster"
        }
    }
}

public struct RaftConfig: Sendable {
    public var id: NodeID
    /// Ticks without hearing from a leader before a follower campaigns; randomized to
    /// [electionTicks, 2*electionTicks) (§5.2).
    public var electionTicks: Int = 10
    public var heartbeatTicks: Int = 1
    public var preVote: Bool = true
    public var checkQuorum: Bool = true
    /// Upper bound on bytes of entries in one append message.
    public var maxBytesPerMessage: Int = 1 << 20
    /// Bounded pipelining window: append messages in flight to one follower.
    public var maxInflightMessages: Int = 256
    /// Proposals are refused once this many bytes are appended but not committed.
    public var maxUncommittedBytes: Int = 64 << 20
    /// Upper bound on bytes of committed entries handed out in one Ready.
    public var maxCommittedBytesPerReady: Int = 16 << 20

    public init(id: NodeID) { self.id = id }
}
