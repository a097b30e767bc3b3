import DequeModule
import TandemCore

/// One Raft peer as a value type. Feed it `tick()`, `step(_:)`, `propose(_:)`,
/// `readIndex(context:)`, membership changes and leadership transfers; take its effects
/// from `ready()` and acknowledge them with `advance(_:)`.
///
/// Section references are to the Raft paper (§5, §7) and Ongaro's thesis (§3.10
/// leadership transfer, §4 membership, §6.4 ReadIndex, §9.6 pre-vote and check-quorum).
public struct RaftNode: Sendable {
    public let id: NodeID
    public private(set) var config: RaftConfig
    public private(set) var term: UInt64 = 0
    public private(set) var vote: NodeID = 0
    public private(set) var role: RaftRole = .follower
    public private(set) var leader: NodeID = 0
    public private(set) var conf: ConfState
    /// A TimeoutNow arrived while a committed membership change was not applied yet: campaign
    /// once it is (cleared by a new term).
    private var campaignOnApply = false

    var log: RaftLog
    private var rng: SeededRandom
    private var progress: [NodeID: Progress] = [:]
    private var votes: [NodeID: Bool] = [:]
    private var messages: [Message] = []
    private var readStates: [ReadState] = []
    private var electionElapsed = 0
    private var heartbeatElapsed = 0
    private var randomizedElectionTimeout = 0
    /// Index of the last membership change proposed; no new one until it is applied.
    private var pendingConfIndex: UInt64 = 0
    private var leadTransferee: NodeID = 0
    private var uncommittedBytes = 0
    private var persistedHardState: HardState
    /// ReadIndex (§6.4): requests waiting for a heartbeat quorum, in arrival order.
    private var pendingReads = Deque<PendingRead>()
    /// Reads that arrived before this leader committed an entry of its own term.
    private var readsBeforeCommit: [(from: NodeID, context: Bytes)] = []
    /// A Ready was handed out and not yet acknowledged.
    private var readyOutstanding = false

    private struct PendingRead {
        var from: NodeID
        var context: Bytes
        var index: UInt64
        var acks: Set<NodeID>
    }

    /// Starts a node. For a new cluster pass the initial voters; after a restart pass what
    /// storage recovered (the snapshot's membership then wins over `initialConf`).
    public init(
        config: RaftConfig, initialConf: ConfState, random: SeededRandom,
        hardState: HardState = HardState(), snapshot: Snapshot? = nil, entries: [Entry] = []
    ) {
        precondition(config.electionTicks > config.heartbeatTicks, "electionTicks must exceed heartbeatTicks")
        id = config.id
        self.config = config
        rng = random
        conf = snapshot?.metadata.conf ?? initialConf
        log = RaftLog(snapshot: snapshot, entries: entries, commit: hardState.commit)
        term = hardState.term
        vote = hardState.vote
        persistedHardState = HardState(term: hardState.term, vote: hardState.vote, commit: log.committed)
        // Membership changes already in the log count from the moment they are appended
        // for the purpose of refusing a second one (§4.1).
        pendingConfIndex = log.lastIndex
        resetRandomizedElectionTimeout()
    }

    // MARK: - Queries

    public var commitIndex: UInt64 { log.committed }
    public var appliedIndex: UInt64 { log.applied }
    public var lastIndex: UInt64 { log.lastIndex }
    public var lastTerm: UInt64 { log.lastTerm }
    public var firstIndex: UInt64 { log.firstIndex }
    public var hardState: HardState { HardState(term: term, vote: vote, commit: log.committed) }
    public var isLearner: Bool { conf.learners.contains(id) }
    /// Whether this node may campaign: a voter in the current membership.
    public var isPromotable: Bool { conf.voters.contains(id) }
    public var leadershipTransferee: NodeID { leadTransferee }
    public func term(at index: UInt64) -> UInt64? { log.term(index) }
    public func entry(at index: UInt64) -> Entry? { log.entry(index) }
    /// Match index the leader tracks for `peer` (for tests, status and promotion checks).
    public func matchIndex(of peer: NodeID) -> UInt64? { progress[peer]?.match }

    private var quorum: Int { conf.voters.count / 2 + 1 }

    // MARK: - Inputs

    /// Advances logical time by one tick.
    public mutating func tick() {
        if role == .leader { tickLeader() } else { tickElection() }
    }

    /// Proposes `data` for the log. On a follower the proposal is forwarded to the leader;
    /// the caller learns of success only when the entry is applied.
    public mutating func propose(_ data: Bytes) throws(ProposalError) {
        try proposeLocal(Entry(term: 0, index: 0, kind: .normal, data: data))
    }

    public mutating func proposeConfChange(_ cc: ConfChange) throws(ProposalError) {
        try proposeLocal(Entry(term: 0, index: 0, kind: .confChange, data: cc.encoded()))
    }

    /// Asks for a linearizable read point (§6.4). The answer arrives as a `ReadState`
    /// with the same `context` (which must be unique per request) in a later `Ready`.
    public mutating func readIndex(context: Bytes) throws(ProposalError) {
        switch role {
        case .leader:
            handleReadIndex(from: id, context: context)
        default:
            guard leader != 0 else { throw .noLeader }
            send(Message(kind: .readIndex, to: leader, context: context))
        }
    }

    /// Hands leadership to `target` (thesis §3.10). On a follower the request is forwarded.
    public mutating func transferLeadership(to target: NodeID) {
        if role == .leader {
            handleTransferLeader(target)
        } else if leader != 0 {
            send(Message(kind: .transferLeader, to: leader, index: target))
        }
    }

    /// The shell could not deliver to `peer`: stop pipelining and probe.
    public mutating func reportUnreachable(_ peer: NodeID) {
        guard role == .leader, var pr = progress[peer] else { return }
        if pr.state == .replicate { pr.becomeProbe() }
        progress[peer] = pr
    }

    /// The shell finished (or failed) streaming a snapshot to `peer`.
    public mutating func reportSnapshot(_ peer: NodeID, succeeded: Bool) {
        guard role == .leader, var pr = progress[peer], case .snapshot = pr.state else { return }
        pr.becomeProbe()
        // After a success, wait for the follower's append response before sending more.
        pr.probeSent = succeeded
        progress[peer] = pr
    }

    /// Records `snapshot`, which the state machine produced at `snapshot.metadata.index`
    /// (applied), and discards log entries before it except the last `keepingEntries`.
    /// The snapshot is sent to followers that lag behind the remaining log (§7).
    public mutating func compact(_ snapshot: Snapshot, keepingEntries: UInt64 = 0) {
        log.compact(snapshot, keeping: keepingEntries)
    }

    /// The latest snapshot held for sending, if any.
    public var snapshot: Snapshot? { log.snapshot }

    // MARK: - Ready / advance

    public var hasReady: Bool {
        !messages.isEmpty || !readStates.isEmpty || log.pendingSnapshot != nil
            || log.stable < log.lastIndex || hardState != persistedHardState
            || log.committed > log.applied
    }

    public mutating func ready() -> Ready {
        precondition(!readyOutstanding, "ready() called again before advance(): node \(id), term \(term), role \(role)")
        readyOutstanding = true
        var rd = Ready(role: role, leader: leader)
        let hs = hardState
        if hs != persistedHardState { rd.hardState = hs }
        rd.snapshot = log.pendingSnapshot
        rd.entries = log.unstableEntries
        if log.committed > log.applied {
            rd.committedEntries = log.slice(
                from: log.applied + 1, through: log.committed, maxBytes: config.maxCommittedBytesPerReady)
        }
        rd.messages = messages
        rd.readStates = readStates
        messages = []
        readStates = []
        return rd
    }

    /// Acknowledges that the shell persisted, sent and applied everything in `rd`.
    public mutating func advance(_ rd: Ready) {
        precondition(readyOutstanding, "advance() without a ready(): node \(id), term \(term), role \(role)")
        readyOutstanding = false
        if let hs = rd.hardState { persistedHardState = hs }
        if let s = rd.snapshot {
            if log.pendingSnapshot?.metadata.index == s.metadata.index { log.pendingSnapshot = nil }
            log.stable = max(log.stable, s.metadata.index)
            log.applied = max(log.applied, s.metadata.index)
        }
        if let last = rd.entries.last { log.stableTo(index: last.index, term: last.term) }
        for e in rd.committedEntries where e.index > log.applied {
            log.applied = e.index
            if e.kind == .confChange, let cc = try? ConfChange(decoding: e.data) {
                applyConfChange(cc)
            }
        }
        if campaignOnApply && !hasUnappliedConfChange() {
            campaignOnApply = false
            if role != .leader { campaign(transfer: true, preVote: false) }
        }
        if role == .leader {
            // The leader counts itself only for entries that are durable on its own disk.
            if var me = progress[id], me.maybeUpdate(log.stable) {
                progress[id] = me
                if maybeCommit() { broadcastAppend() }
            }
            uncommittedBytes = log.bytes(from: log.committed + 1)
        }
    }

    // MARK: - Step

    public mutating func step(_ m: Message) {
        guard m.to == id || m.to == 0 else { return }
        // §5.1: terms. Forwarded proposals and reads carry term 0 and are treated as local.
        if m.term > term && m.term != 0 {
            if m.kind == .vote || m.kind == .preVote {
                let forced = m.context == Message.transferContext
                // §9.6 / check-quorum: a node that heard from a leader within the minimum
                // election timeout ignores votes, so a partitioned node cannot disrupt.
                let inLease = config.checkQuorum && leader != 0 && electionElapsed < config.electionTicks
                if !forced && inLease { return }
            }
            switch m.kind {
            case .preVote:
                break  // never change term because of a pre-vote
            case .preVoteResponse where !m.reject:
                break  // our own term moves when the pre-vote succeeds
            case .append, .heartbeat, .snapshot:
                becomeFollower(term: m.term, leader: m.from)
            default:
                becomeFollower(term: m.term, leader: 0)
            }
        } else if m.term < term && m.term != 0 {
            if (config.checkQuorum || config.preVote) && (m.kind == .heartbeat || m.kind == .append) {
                // Tell a stale leader about the new term so it steps down (§9.6).
                send(Message(kind: .appendResponse, to: m.from))
            } else if m.kind == .preVote {
                send(Message(kind: .preVoteResponse, to: m.from, term: term, reject: true))
            }
            return
        }

        switch m.kind {
        case .vote, .preVote:
            handleVoteRequest(m)
            return
        default:
            break
        }
        switch role {
        case .leader: stepLeader(m)
        case .candidate, .preCandidate: stepCandidate(m)
        case .follower: stepFollower(m)
        }
    }

    private mutating func handleVoteRequest(_ m: Message) {
        // §5.2, §5.4.1: one vote per term, only for an up-to-date log.
        let canVote =
            vote == m.from || (vote == 0 && leader == 0) || (m.kind == .preVote && m.term > term)
        let respKind: MessageKind = m.kind == .vote ? .voteResponse : .preVoteResponse
        if canVote && log.isUpToDate(lastIndex: m.index, term: m.logTerm) {
            send(Message(kind: respKind, to: m.from, term: m.term))
            if m.kind == .vote {
                electionElapsed = 0
                vote = m.from
            }
        } else {
            send(Message(kind: respKind, to: m.from, term: term, reject: true))
        }
    }

    private mutating func stepLeader(_ m: Message) {
        switch m.kind {
        case .propose:
            if let e = m.entries.first { try? appendProposal(e) }
        case .readIndex:
            handleReadIndex(from: m.from, context: m.context)
        case .transferLeader:
            handleTransferLeader(m.index)
        case .appendResponse:
            handleAppendResponse(m)
        case .heartbeatResponse:
            handleHeartbeatResponse(m)
        default:
            break
        }
    }

    private mutating func stepCandidate(_ m: Message) {
        switch m.kind {
        case .append:
            becomeFollower(term: m.term, leader: m.from)
            handleAppend(m)
        case .heartbeat:
            becomeFollower(term: m.term, leader: m.from)
            handleHeartbeat(m)
        case .snapshot:
            becomeFollower(term: m.term, leader: m.from)
            handleSnapshot(m)
        case .voteResponse where role == .candidate, .preVoteResponse where role == .preCandidate:
            votes[m.from] = !m.reject
            switch tally() {
            case .won:
                if role == .preCandidate {
                    campaign(transfer: false, preVote: false)
                } else {
                    becomeLeader()
                    broadcastAppend()
                }
            case .lost:
                becomeFollower(term: term, leader: 0)
            case .pending:
                break
            }
        default:
            break
        }
    }

    private mutating func stepFollower(_ m: Message) {
        switch m.kind {
        case .propose:
            if leader != 0 {
                var fwd = m
                fwd.to = leader
                send(fwd)
            }
        case .append:
            electionElapsed = 0
            leader = m.from
            handleAppend(m)
        case .heartbeat:
            electionElapsed = 0
            leader = m.from
            handleHeartbeat(m)
        case .snapshot:
            electionElapsed = 0
            leader = m.from
            handleSnapshot(m)
        case .transferLeader:
            if leader != 0 {
                var fwd = m
                fwd.to = leader
                fwd.term = 0
                send(fwd)
            }
        case .timeoutNow:
            // §3.10: the leader asked us to campaign at once, skipping pre-vote — once this
            // node has applied the membership it would lead (a leader removing itself sends
            // TimeoutNow right behind the commit of its removal).
            if isPromotable {
                if hasUnappliedConfChange() {
                    campaignOnApply = true
                } else {
                    campaign(transfer: true, preVote: false)
                }
            }
        case .readIndex:
            if leader != 0 {
                var fwd = m
                fwd.to = leader
                send(fwd)
            }
        case .readIndexResponse:
            readStates.append(ReadState(index: m.index, context: m.context))
        default:
            break
        }
    }

    // MARK: - Follower handlers

    private mutating func handleAppend(_ m: Message) {
        if m.index < log.committed {
            send(Message(kind: .appendResponse, to: m.from, index: log.committed))
            return
        }
        if let last = log.maybeAppend(index: m.index, logTerm: m.logTerm, commit: m.commit, entries: m.entries) {
            send(Message(kind: .appendResponse, to: m.from, index: last))
        } else {
            // Fast backtracking: hint the leader with our last index whose term is not
            // above the leader's term at the probe point.
            let probe = min(m.index, log.lastIndex)
            let (hintIndex, hintTerm) = log.findConflictByTerm(index: probe, term: m.logTerm)
            send(
                Message(
                    kind: .appendResponse, to: m.from, logTerm: hintTerm, index: m.index, reject: true,
                    rejectHint: hintIndex))
        }
    }

    private mutating func handleHeartbeat(_ m: Message) {
        log.commitTo(min(m.commit, log.lastIndex))
        send(Message(kind: .heartbeatResponse, to: m.from, context: m.context))
    }

    private mutating func handleSnapshot(_ m: Message) {
        guard let s = m.snapshot else { return }
        if restore(s) {
            send(Message(kind: .appendResponse, to: m.from, index: log.lastIndex))
        } else {
            send(Message(kind: .appendResponse, to: m.from, index: log.committed))
        }
    }

    /// §7 InstallSnapshot receiver. Returns false when the snapshot is stale or our log
    /// already contains its last entry (then we only fast-forward the commit index).
    private mutating func restore(_ s: Snapshot) -> Bool {
        let meta = s.metadata
        if meta.index <= log.committed { return false }
        if log.matchTerm(meta.index, meta.term) {
            log.commitTo(meta.index)
            return false
        }
        log.restore(s)
        conf = meta.conf
        pendingConfIndex = 0
        return true
    }

    // MARK: - Leader handlers

    private mutating func handleAppendResponse(_ m: Message) {
        guard var pr = progress[m.from] else { return }
        pr.recentActive = true
        if m.reject {
            var hint = m.rejectHint
            if m.logTerm > 0 { hint = log.findConflictByTerm(index: m.rejectHint, term: m.logTerm).0 }
            if pr.maybeDecrTo(rejected: m.index, hint: hint) {
                if pr.state == .replicate { pr.becomeProbe() }
                progress[m.from] = pr
                sendAppend(to: m.from, sendIfEmpty: true)
            } else {
                progress[m.from] = pr
            }
            return
        }
        let wasPaused = pr.isPaused
        guard pr.maybeUpdate(m.index) else {
            progress[m.from] = pr
            return
        }
        switch pr.state {
        case .probe:
            pr.becomeReplicate()
        case .snapshot(let pending) where pr.match >= pending:
            pr.becomeProbe()
            pr.becomeReplicate()
        case .replicate:
            pr.freeInflights(upTo: m.index)
        default:
            break
        }
        progress[m.from] = pr
        if maybeCommit() {
            broadcastAppend()
        } else if wasPaused {
            sendAppend(to: m.from, sendIfEmpty: false)
        }
        // Pipelining: keep the window full.
        while sendAppend(to: m.from, sendIfEmpty: false) {}
        if m.from == leadTransferee && progress[m.from]?.match == log.lastIndex {
            send(Message(kind: .timeoutNow, to: m.from))
        }
    }

    private mutating func handleHeartbeatResponse(_ m: Message) {
        guard var pr = progress[m.from] else { return }
        pr.recentActive = true
        pr.probeSent = false
        // A full window may be stuck behind a lost message: free one slot per heartbeat.
        if pr.state == .replicate && pr.inflights.count >= pr.maxInflight { pr.inflights.removeFirst() }
        progress[m.from] = pr
        if pr.match < log.lastIndex { sendAppend(to: m.from, sendIfEmpty: true) }
        if !m.context.isEmpty { ackRead(from: m.from, context: m.context) }
    }

    private mutating func handleReadIndex(from: NodeID, context: Bytes) {
        // §6.4 step 1: a new leader must commit an entry of its own term first.
        guard log.term(log.committed) == term else {
            readsBeforeCommit.append((from, context))
            return
        }
        if conf.voters.count == 1 && conf.voters.contains(id) {
            answerRead(from: from, context: context, index: log.committed)
            return
        }
        pendingReads.append(PendingRead(from: from, context: context, index: log.committed, acks: [id]))
        broadcastHeartbeat(context: context)
    }

    private mutating func ackRead(from: NodeID, context: Bytes) {
        guard let pos = pendingReads.firstIndex(where: { $0.context == context }) else { return }
        guard conf.voters.contains(from) else { return }
        pendingReads[pos].acks.insert(from)
        guard pendingReads[pos].acks.count >= quorum else { return }
        // A quorum confirmed leadership at this point; every earlier request is served too.
        for _ in 0...pos {
            let r = pendingReads.removeFirst()
            answerRead(from: r.from, context: r.context, index: r.index)
        }
    }

    private mutating func answerRead(from: NodeID, context: Bytes, index: UInt64) {
        if from == id || from == 0 {
            readStates.append(ReadState(index: index, context: context))
        } else {
            send(Message(kind: .readIndexResponse, to: from, index: index, context: context))
        }
    }

    private mutating func handleTransferLeader(_ target: NodeID) {
        guard target != id, conf.voters.contains(target), progress[target] != nil else { return }
        if leadTransferee == target { return }
        leadTransferee = target
        electionElapsed = 0
        if progress[target]?.match == log.lastIndex {
            send(Message(kind: .timeoutNow, to: target))
        } else {
            sendAppend(to: target, sendIfEmpty: true)
        }
    }

    // MARK: - Proposals

    private mutating func proposeLocal(_ e: Entry) throws(ProposalError) {
        switch role {
        case .leader:
            try appendProposal(e)
        default:
            guard leader != 0 else { throw .noLeader }
            if e.kind == .confChange { try validate(confChange: e) }
            send(Message(kind: .propose, to: leader, entries: [e]))
        }
    }

    private func validate(confChange e: Entry) throws(ProposalError) {
        guard let cc = try? ConfChange(decoding: e.data) else {
            throw .invalidConfChange("undecodable change")
        }
        switch cc.kind {
        case .addVoter:
            if conf.voters.contains(cc.node) { throw .invalidConfChange("\(cc.node) is already a voter") }
        case .addLearner:
            if conf.voters.contains(cc.node) { throw .invalidConfChange("\(cc.node) is a voter") }
            if conf.learners.contains(cc.node) { throw .invalidConfChange("\(cc.node) is already a learner") }
        case .remove:
            guard conf.members.contains(cc.node) else { throw .invalidConfChange("\(cc.node) is not a member") }
            if conf.voters == [cc.node] { throw .invalidConfChange("cannot remove the last voter") }
        case .promote:
            guard conf.learners.contains(cc.node) else { throw .invalidConfChange("\(cc.node) is not a learner") }
            if role == .leader {
                // A learner becomes a voter only once it holds the committed log.
                guard let pr = progress[cc.node], pr.match >= log.committed else {
                    throw .learnerNotReady(cc.node)
                }
            }
        }
    }

    private mutating func appendProposal(_ proposed: Entry) throws(ProposalError) {
        guard conf.voters.contains(id) else { throw .notMember }
        if leadTransferee != 0 { throw .leadershipTransferInProgress }
        if proposed.kind == .confChange {
            if pendingConfIndex > log.applied { throw .confChangeInProgress }
            try validate(confChange: proposed)
        }
        if uncommittedBytes > 0 && uncommittedBytes + proposed.size > config.maxUncommittedBytes {
            throw .uncommittedLogFull(limit: config.maxUncommittedBytes)
        }
        var e = proposed
        e.term = term
        e.index = log.lastIndex + 1
        log.append([e])
        uncommittedBytes += e.size
        if e.kind == .confChange { pendingConfIndex = e.index }
        broadcastAppend()
    }

    // MARK: - Membership

    private mutating func applyConfChange(_ cc: ConfChange) {
        switch cc.kind {
        case .addVoter, .promote:
            conf.learners.remove(cc.node)
            conf.voters.insert(cc.node)
        case .addLearner:
            if !conf.voters.contains(cc.node) { conf.learners.insert(cc.node) }
        case .remove:
            conf.voters.remove(cc.node)
            conf.learners.remove(cc.node)
        }
        guard role == .leader else {
            if cc.kind == .remove && cc.node == id { becomeFollower(term: term, leader: leader) }
            return
        }
        if cc.kind == .remove {
            progress[cc.node] = nil
            if cc.node == leadTransferee { leadTransferee = 0 }
            if cc.node == id {
                // A removed leader steps down once the change is applied (thesis §4.2.2) —
                // and hands off at once (TimeoutNow, §3.10) to the most up-to-date voter left
                // (ties to the lowest id), after an append that carries the commit, so the
                // cluster does not sit out an election timeout without a leader.
                let heir = progress.filter { $0.key != id && conf.voters.contains($0.key) }
                    .max { ($0.value.match, $1.key) < ($1.value.match, $0.key) }?.key
                if let heir {
                    sendAppend(to: heir, sendIfEmpty: true)
                    send(Message(kind: .timeoutNow, to: heir))
                }
                becomeFollower(term: term, leader: 0)
                return
            }
        } else if progress[cc.node] == nil {
            var pr = Progress(next: log.lastIndex + 1, maxInflight: config.maxInflightMessages)
            pr.recentActive = true
            progress[cc.node] = pr
            sendAppend(to: cc.node, sendIfEmpty: true)
        }
        // The quorum changed: something may now be committed.
        if maybeCommit() { broadcastAppend() }
    }

    // MARK: - Replication

    /// Sends the next append (or a snapshot) to `to`. Returns whether a message was sent.
    @discardableResult
    private mutating func sendAppend(to: NodeID, sendIfEmpty: Bool) -> Bool {
        guard to != id, var pr = progress[to], !pr.isPaused else { return false }
        let prevIndex = pr.next - 1
        guard let prevTerm = log.term(prevIndex) else {
            // §7: the entries are compacted away; send the snapshot instead.
            guard pr.recentActive, let snap = log.snapshot else { return false }
            send(Message(kind: .snapshot, to: to, snapshot: snap))
            pr.becomeSnapshot(snap.metadata.index)
            progress[to] = pr
            return true
        }
        let ents = log.slice(from: pr.next, through: log.lastIndex, maxBytes: config.maxBytesPerMessage)
        if ents.isEmpty && !sendIfEmpty { return false }
        send(
            Message(
                kind: .append, to: to, logTerm: prevTerm, index: prevIndex, entries: ents,
                commit: log.committed))
        if let last = ents.last {
            switch pr.state {
            case .replicate:
                pr.next = last.index + 1
                pr.inflights.append(last.index)
            case .probe:
                pr.probeSent = true
            case .snapshot:
                break
            }
        }
        progress[to] = pr
        return true
    }

    private mutating func broadcastAppend() {
        for peer in progress.keys.sorted() where peer != id { sendAppend(to: peer, sendIfEmpty: true) }
    }

    private mutating func broadcastHeartbeat(context: Bytes = []) {
        let ctx = context.isEmpty ? (pendingReads.last?.context ?? []) : context
        for peer in progress.keys.sorted() where peer != id {
            let pr = progress[peer]!
            // Never tell a follower to commit beyond what it is known to hold.
            send(Message(kind: .heartbeat, to: peer, commit: min(pr.match, log.committed), context: ctx))
        }
    }

    /// §5.3/§5.4.2: commit the highest index held by a quorum of voters, but only if it
    /// was created in the current term.
    private mutating func maybeCommit() -> Bool {
        let matches = conf.voters.map { progress[$0]?.match ?? 0 }.sorted(by: >)
        guard matches.count >= quorum else { return false }
        let candidate = matches[quorum - 1]
        guard candidate > log.committed, log.term(candidate) == term else { return false }
        log.commitTo(candidate)
        // Reads that waited for the first commit of this term can proceed now (§6.4).
        if !readsBeforeCommit.isEmpty {
            let waiting = readsBeforeCommit
            readsBeforeCommit = []
            for r in waiting { handleReadIndex(from: r.from, context: r.context) }
        }
        return true
    }

    // MARK: - Elections

    private enum VoteResult { case won, lost, pending }

    private func tally() -> VoteResult {
        var granted = 0
        var rejected = 0
        for v in conf.voters {
            switch votes[v] {
            case true?: granted += 1
            case false?: rejected += 1
            case nil: break
            }
        }
        if granted >= quorum { return .won }
        if rejected > conf.voters.count - quorum { return .lost }
        return .pending
    }

    private mutating func tickElection() {
        electionElapsed += 1
        guard isPromotable, electionElapsed >= randomizedElectionTimeout else { return }
        electionElapsed = 0
        campaign(transfer: false, preVote: config.preVote)
    }

    private mutating func tickLeader() {
        heartbeatElapsed += 1
        electionElapsed += 1
        if electionElapsed >= config.electionTicks {
            electionElapsed = 0
            if config.checkQuorum {
                // §9.6 check-quorum: step down without recent contact from a quorum.
                var active = 0
                for v in conf.voters where v == id || progress[v]?.recentActive == true { active += 1 }
                for peer in Array(progress.keys) where peer != id {
                    progress[peer]!.recentActive = false
                    // Retry a snapshot that has gone unanswered for a whole round.
                    if case .snapshot = progress[peer]!.state {
                        if progress[peer]!.snapshotStale {
                            progress[peer]!.becomeProbe()
                        } else {
                            progress[peer]!.snapshotStale = true
                        }
                    }
                }
                if active < quorum {
                    becomeFollower(term: term, leader: 0)
                    return
                }
            }
            // §3.10: a transfer that did not finish within an election timeout is aborted.
            leadTransferee = 0
        }
        if heartbeatElapsed >= config.heartbeatTicks {
            heartbeatElapsed = 0
            broadcastHeartbeat()
        }
    }

    private func hasUnappliedConfChange() -> Bool {
        guard log.committed > log.applied else { return false }
        var i = log.applied + 1
        while i <= log.committed {
            if log.entry(i)?.kind == .confChange { return true }
            i += 1
        }
        return false
    }

    private mutating func campaign(transfer: Bool, preVote: Bool) {
        guard isPromotable else { return }
        // A node must know its final membership before it can lead it.
        if hasUnappliedConfChange() { return }
        let voteTerm: UInt64
        let kind: MessageKind
        if preVote {
            becomePreCandidate()
            voteTerm = term + 1
            kind = .preVote
        } else {
            becomeCandidate()
            voteTerm = term
            kind = .vote
        }
        votes[id] = true
        if tally() == .won {
            if preVote {
                campaign(transfer: transfer, preVote: false)
            } else {
                becomeLeader()
            }
            return
        }
        for peer in conf.voters.sorted() where peer != id {
            send(
                Message(
                    kind: kind, to: peer, term: voteTerm, logTerm: log.lastTerm, index: log.lastIndex,
                    context: transfer ? Message.transferContext : []))
        }
    }

    private mutating func reset(term newTerm: UInt64) {
        if term != newTerm {
            term = newTerm
            vote = 0
            campaignOnApply = false
        }
        leader = 0
        electionElapsed = 0
        heartbeatElapsed = 0
        resetRandomizedElectionTimeout()
        leadTransferee = 0
        votes = [:]
        progress = [:]
        pendingReads = []
        readsBeforeCommit = []
        uncommittedBytes = 0
    }

    private mutating func resetRandomizedElectionTimeout() {
        randomizedElectionTimeout = config.electionTicks + Int(rng.next() % UInt64(config.electionTicks))
    }

    private mutating func becomeFollower(term newTerm: UInt64, leader newLeader: NodeID) {
        reset(term: newTerm)
        role = .follower
        leader = newLeader
    }

    private mutating func becomePreCandidate() {
        precondition(role != .leader, "leader cannot become pre-candidate")
        // Pre-vote changes neither term nor vote (thesis §9.6).
        votes = [:]
        role = .preCandidate
        leader = 0
        electionElapsed = 0
    }

    private mutating func becomeCandidate() {
        precondition(role != .leader, "leader cannot become candidate")
        reset(term: term + 1)
        vote = id
        role = .candidate
    }

    private mutating func becomeLeader() {
        precondition(role == .candidate, "only a candidate can become leader, role is \(role)")
        reset(term: term)
        role = .leader
        leader = id
        for peer in conf.members {
            var pr = Progress(next: log.lastIndex + 1, maxInflight: config.maxInflightMessages)
            pr.recentActive = true
            if peer == id { pr.match = log.stable }
            progress[peer] = pr
        }
        // Membership changes still in the uncommitted log block new ones.
        pendingConfIndex = log.lastIndex
        // §5.4.2 / §8: commit an entry of this term so earlier ones commit and reads work.
        let e = Entry(term: term, index: log.lastIndex + 1)
        log.append([e])
        uncommittedBytes = e.size
    }

    private mutating func send(_ m: Message) {
        var m = m
        m.from = id
        if m.term == 0 && m.kind != .propose && m.kind != .readIndex && m.kind != .transferLeader {
            m.term = term
        }
        messages.append(m)
    }
}
