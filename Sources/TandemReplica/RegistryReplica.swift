/// TandemReplica — one registry member: the Ready loop that glues TandemRaft, TandemStore
/// and TandemStorage together.
///
/// Owns: the order of effects (persist, then send, then apply, then advance), snapshot
/// triggering, ReadIndex bookkeeping, and the leader's lease clock. It reaches the disk
/// only through `FileSystem` and time only through `now` arguments, so the simulator and
/// the real server run this same code. It sends nothing itself: messages are returned.
import TandemCore
import TandemRaft
import TandemStorage
import TandemStore

public final class RegistryReplica {
    public struct Options: Sendable {
        public var raft: RaftConfig
        public var storage = DurableLog.Options()
        public var store = MVCCStore.Limits()
        public var lessor = Lessor.Limits()
        /// Take a snapshot (and release WAL segments) every this many applied entries.
        public var snapshotEvery: UInt64 = 10_000
        /// Entries kept in memory behind a snapshot for followers to catch up from (etcd: 5,000).
        public var catchUpEntries: UInt64 = 5_000
        /// Milliseconds per Raft tick, to turn an election timeout into lease time.
        public var tickMs: Int64 = 100
        /// Reads waiting for their ReadIndex to be applied.
        public var maxPendingReads = 10_000

        public init(id: NodeID) { raft = RaftConfig(id: id) }
    }

    /// What one round of processing produced for the shell to carry out.
    public struct Output: Sendable {
        public var messages: [Message] = []
        /// Proposals applied on this member, with their results.
        public var applied: [(requestID: UInt64, result: StoreResult)] = []
        /// Read contexts whose ReadIndex is now applied: serve them from `store`.
        public var readsReady: [Bytes] = []
        /// Every applied revision's events, for watches.
        public var events: [(revision: Int64, events: [Event])] = []
        public var roleChanged = false
        /// Position and digest of every entry applied, for checkers and audits.
        public var appliedEntries: [(index: UInt64, term: UInt64, digest: UInt64)] = []
        /// Set when a snapshot from the leader replaced the state machine (its index and size).
        public var installedSnapshot: UInt64?
        public var installedSnapshotBytes = 0
        /// Membership changes applied, in log order (`raft.conf` already reflects them).
        public var confChanges: [ConfChange] = []
    }

    public enum ReplicaError: Error, CustomStringConvertible {
        case tooManyPendingReads(limit: Int)
        case proposal(ProposalError)
        public var description: String {
            switch self {
            case .tooManyPendingReads(let l): return "too many pending linearizable reads (limit maxPendingReads=\(l))"
            case .proposal(let p): return p.description
            }
        }
    }

    public let options: Options
    public private(set) var raft: RaftNode
    public private(set) var store: MVCCStore
    public private(set) var lessor: Lessor
    public let log: DurableLog
    public let recoveryNotes: [String]
    private var lastSnapshotIndex: UInt64
    private var pendingReads: [(context: Bytes, index: UInt64?)] = []
    private var lastRole: RaftRole = .follower
    /// Proposals applied a second time (same request id) and skipped.
    public private(set) var duplicatesSkipped = 0
    /// Snapshots this member wrote (not counting ones received from the leader).
    public private(set) var snapshotsTaken = 0

    /// Opens the member's storage (recovering what is there) and starts its Raft node.
    public init(options: Options, initialConf: ConfState, fs: any FileSystem, random: SeededRandom) throws {
        self.options = options
        log = DurableLog(fs: fs, options: options.storage)
        let rec = try log.recover()
        recoveryNotes = rec.notes
        raft = RaftNode(
            config: options.raft, initialConf: initialConf, random: random, hardState: rec.hardState,
            snapshot: rec.snapshot, entries: rec.entries)
        if let s = rec.snapshot {
            store = try MVCCStore(snapshot: s.data, limits: options.store)
        } else {
            store = MVCCStore(limits: options.store)
        }
        lessor = Lessor(limits: options.lessor)
        lastSnapshotIndex = rec.snapshot?.metadata.index ?? 0
    }

    public var id: NodeID { raft.id }
    public var isLeader: Bool { raft.role == .leader }

    // MARK: - Inputs

    public func step(_ m: Message) { raft.step(m) }

    /// One Raft tick at time `now` (ms). On the leader, also proposes lease revocations
    /// and checkpoints that are due.
    public func tick(now: Int64) {
        raft.tick()
        guard raft.role == .leader else { return }
        for id in lessor.expired(now: now) {
            try? raft.propose(StoreProposal(requestID: 0, command: .leaseRevoke(id: id)).encoded())
        }
        let cps = lessor.checkpoints(now: now)
        if !cps.isEmpty {
            try? raft.propose(StoreProposal(requestID: 0, command: .leaseCheckpoint(cps)).encoded())
        }
    }

    public func propose(_ command: StoreCommand, requestID: UInt64) throws(ReplicaError) {
        do {
            try raft.propose(StoreProposal(requestID: requestID, command: command).encoded())
        } catch {
            throw .proposal(error)
        }
    }

    /// Proposes a membership change (one at a time; a learner is promoted once caught up).
    public func proposeConfChange(_ cc: ConfChange) throws(ReplicaError) {
        do {
            try raft.proposeConfChange(cc)
        } catch {
            throw .proposal(error)
        }
    }

    /// The transport could not reach `peer`: Raft stops pipelining to it and probes.
    public func reportUnreachable(_ peer: NodeID) { raft.reportUnreachable(peer) }

    /// Hands leadership to `member` (for rolling restarts and membership changes).
    public func transferLeadership(to member: NodeID) { raft.transferLeadership(to: member) }

    /// Starts a linearizable read; `context` must be unique among pending reads.
    public func read(context: Bytes) throws(ReplicaError) {
        guard pendingReads.count < options.maxPendingReads else {
            throw .tooManyPendingReads(limit: options.maxPendingReads)
        }
        do {
            try raft.readIndex(context: context)
        } catch {
            throw .proposal(error)
        }
        pendingReads.append((context, nil))
    }

    /// Abandons a pending read (its client went away).
    public func cancelRead(context: Bytes) { pendingReads.removeAll { $0.context == context } }

    /// etcd's LeaseTimeToLive: granted TTL, remaining TTL (seconds, from the leader's lease
    /// clock; -1 when this member does not track expiry) and the attached keys.
    public func leaseTimeToLive(_ id: Int64, now: Int64) -> (granted: Int64, remaining: Int64, keys: [Bytes])? {
        guard let l = store.lease(id) else { return nil }
        return (l.grantedTTL, lessor.remainingSeconds(id: id, now: now), l.keys)
    }

    /// Lease keep-alive on the leader; nil if unknown or expired.
    public func renewLease(_ id: Int64, now: Int64) -> Int64? {
        guard raft.role == .leader, store.lease(id) != nil else { return nil }
        return lessor.renew(id: id, now: now)
    }

    // MARK: - The Ready loop

    /// Runs Ready rounds until Raft has nothing left: persist (one fsync per round), send,
    /// apply, advance. Throws only if storage fails; the member must then stop.
    public func process(now: Int64) throws -> Output {
        var out = Output()
        while raft.hasReady {
            let rd = raft.ready()
            // A leader's messages may leave before its own write (Raft thesis §10.2.1: it
            // appends in parallel with its followers, and counts itself for commit only once
            // durable) — so with `sendEarly` they do, and the fsyncs overlap. Everyone else
            // sends only what is persisted (a vote, an acknowledged entry).
            let early = rd.role == .leader ? sendEarly : nil
            if let early, !rd.messages.isEmpty { early(rd.messages) }
            // 1. Persist: snapshot first, then entries and hard state in one fsync.
            if let s = rd.snapshot { try log.saveSnapshot(s) }
            try log.save(hardState: rd.hardState, entries: rd.entries)
            // 2. Send (the shell delivers them after we return).
            if early == nil { out.messages.append(contentsOf: rd.messages) }
            // 3. Apply.
            if let s = rd.snapshot {
                store = try MVCCStore(snapshot: s.data, limits: options.store)
                lastSnapshotIndex = s.metadata.index
            }
            if let s = rd.snapshot {
                out.installedSnapshot = s.metadata.index
                out.installedSnapshotBytes = s.data.count
            }
            for e in rd.committedEntries {
                var h = FNV1a()
                h.add(byte: e.kind.rawValue)
                h.add(e.data)
                out.appliedEntries.append((e.index, e.term, h.value))
            }
            for e in rd.committedEntries where e.kind == .confChange {
                guard let cc = try? ConfChange(decoding: e.data) else { continue }
                switch cc.kind {
                case .addVoter, .addLearner: if !cc.context.isEmpty { store.memberChanged(cc.node, added: cc.context) }
                case .remove: store.memberChanged(cc.node, added: nil)
                case .promote: break
                }
                out.confChanges.append(cc)
            }
            for e in rd.committedEntries where e.kind == .normal && !e.data.isEmpty {
                guard let p = try? StoreProposal(decoding: e.data) else { continue }
                let before = store.revision
                guard let (result, events) = store.apply(p.command, requestID: p.requestID) else {
                    duplicatesSkipped += 1
                    continue
                }
                switch result {
                case .leaseGrant(let id, let ttl, _): lessor.granted(id: id, ttl: ttl, now: now)
                case .leaseRevoke: if case .leaseRevoke(let id) = p.command { lessor.revoked(id: id) }
                default: break
                }
                if p.requestID != 0 { out.applied.append((p.requestID, result)) }
                if store.revision != before { out.events.append((store.revision, events)) }
            }
            for rs in rd.readStates {
                if let i = pendingReads.firstIndex(where: { $0.context == rs.context && $0.index == nil }) {
                    pendingReads[i].index = rs.index
                }
            }
            // 4. Advance.
            raft.advance(rd)
            if rd.role != lastRole {
                out.roleChanged = true
                if rd.role == .leader {
                    lessor.promote(
                        now: now, extendMs: Int64(options.raft.electionTicks) * options.tickMs,
                        leases: store.leaseIDs.compactMap { store.lease($0) })
                } else if lastRole == .leader {
                    lessor.demote()
                }
                lastRole = rd.role
            }
            try maybeSnapshot()
        }
        let applied = raft.appliedIndex
        var still: [(context: Bytes, index: UInt64?)] = []
        for r in pendingReads {
            if let i = r.index, i <= applied { out.readsReady.append(r.context) } else { still.append(r) }
        }
        pendingReads = still
        return out
    }

    /// When set, a leader's messages of each round are handed here before that round's
    /// fsync instead of being returned in `Output.messages` (the shell sends them at once).
    public var sendEarly: (([Message]) -> Void)?

    /// When set, snapshots are taken off the caller's thread: the replica hands over a copy
    /// of the store (copy-on-write, so O(1) here) with the metadata; the shell encodes and
    /// writes it elsewhere and calls `snapshotPersisted` (or `snapshotFailed`) back on the
    /// replica's thread. When nil (the simulator), snapshots are written inline.
    public var snapshotter: ((MVCCStore, SnapshotMetadata) -> Void)?
    private var snapshotInFlight = false

    private func maybeSnapshot() throws {
        let applied = raft.appliedIndex
        guard !snapshotInFlight, applied >= lastSnapshotIndex + options.snapshotEvery,
            let term = raft.term(at: applied)
        else { return }
        let meta = SnapshotMetadata(index: applied, term: term, conf: raft.conf)
        if let snapshotter {
            snapshotInFlight = true
            snapshotter(store, meta)
            return
        }
        let s = Snapshot(metadata: meta, data: store.snapshot())
        try log.saveSnapshot(s)
        try snapshotPersisted(s)
    }

    /// A snapshot (from `snapshotter`, or written inline) is durable: release the WAL it
    /// covers and compact the Raft log, keeping `catchUpEntries` behind it.
    public func snapshotPersisted(_ s: Snapshot) throws {
        snapshotInFlight = false
        try log.snapshotWritten(s.metadata)
        guard s.metadata.index > raft.snapshot?.metadata.index ?? 0 else { return }
        raft.compact(s, keepingEntries: options.catchUpEntries)
        lastSnapshotIndex = s.metadata.index
        snapshotsTaken += 1
    }

    /// The background snapshot failed; the next Ready round tries again.
    public func snapshotFailed() { snapshotInFlight = false }
}
