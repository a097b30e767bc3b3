import Glibc
import NIOCore
import NIOPosix
import TandemCore
import TandemEtcdAPI
import TandemRaft
import TandemReplica
import TandemStorage
import TandemStore

/// One registry member's raft loop: a single-threaded event loop that owns the replica.
/// Every method must run on `loop`; callers hop there with `loop.execute`.
public final class RegistryNode: @unchecked Sendable {
    public struct Config: Sendable {
        public var id: NodeID = 1
        public var name = "default"
        public var dataDir = "tandem.registry"
        public var peers: [NodeID: String] = [:]
        public var clientURLs: [String] = []
        public var peerURLs: [String] = []
        public var heartbeatMs: Int64 = 100
        public var electionMs: Int64 = 1_000
        public var snapshotCount: UInt64 = 100_000
        /// Entries kept behind a snapshot for slow followers (etcd 3.5's
        /// --experimental-snapshot-catchup-entries).
        public var snapshotCatchUpEntries: UInt64 = 5_000
        /// Member names by id (from --initial-cluster), for MemberList.
        public var names: [NodeID: String] = [:]
        /// etcd's --strict-reconfig-check: refuse membership changes that would leave fewer
        /// started voting members than the quorum (`ReconfigCheck`).
        public var strictReconfigCheck = true
        /// A proposal or linearizable read not answered within this time fails.
        public var requestTimeoutMs: Int64 = 7_000
        /// etcd's auto-compaction (run by the leader); nil = off.
        public var autoCompaction: AutoCompactor.Mode? = nil
        /// How often the compactor looks (default: etcd's — a tenth of the retention, or 5 min).
        public var autoCompactionCheckMs: Int64? = nil
        /// Where the member reports what it does on its own (auto-compaction).
        public var log: @Sendable (String) -> Void = { _ in }
        /// A member that joined a running cluster (`--initial-cluster-state existing`) takes
        /// the cluster's id and membership from it instead of deriving them from `peers`.
        public var clusterID: UInt64? = nil
        public var initialConf: ConfState? = nil
        /// Called (on the raft loop) once this member has applied its own removal: etcd stops
        /// such a member, and so does `tandem registry`.
        public var onRemoved: @Sendable () -> Void = {}
        public init() {}
    }

    public private(set) var config: Config
    public let loop: any EventLoop
    let clusterID: UInt64
    var replica: RegistryReplica
    private var pendingWrites:
        [UInt64: (deadline: Int64, command: StoreCommand, done: (Result<StoreResult, EtcdStatus>) -> Void)] = [:]
    /// The leader this member last knew (to notice a change).
    private var knownLeader: NodeID = 0
    private var pendingReads: [Bytes: (deadline: Int64, done: (Result<Void, EtcdStatus>) -> Void)] = [:]
    private var watchStreams: [Int: WatchStream] = [:]
    private var nextStream = 1
    private var nextRequest: UInt64
    private var tickTask: RepeatedTask?
    /// Set by the server for multi-member clusters.
    var transport: PeerTransport?
    /// The token service (always present; it refuses to issue without join tokens).
    var identity: RegistryIdentity?
    /// Client auth of the etcd API (nil: off).
    var auth: RegistryAuth?
    /// Who is making the request being handled (set by `authorize` for the synchronous part
    /// of a handler on this loop; nil with auth off).
    var caller: RegistryAuth.Principal?

    /// Methods anyone may call with auth on: login, the token service (join-token auth), health
    /// and cluster metadata.
    static let openMethods: Set<String> = [
        "/etcdserverpb.Auth/Authenticate", "/tandem.identity.v1.Identity/Issue", "/tandem.identity.v1.Identity/Rotate",
        "/grpc.health.v1.Health/Check", "/etcdserverpb.Maintenance/Status", "/etcdserverpb.Cluster/MemberList",
    ]
    /// Methods only a principal who may write every key may call.
    static let rootMethods: Set<String> = [
        "/etcdserverpb.KV/Compact", "/etcdserverpb.Maintenance/Alarm", "/etcdserverpb.Cluster/MemberAdd",
        "/etcdserverpb.Cluster/MemberRemove", "/etcdserverpb.Cluster/MemberPromote",
    ]

    /// Sets `caller` for a call to `method` with `token`, or says why it is refused. A
    /// learner serves only Status and serializable reads of the etcd API (etcd's
    /// `isRPCSupportedForLearner`); `serializable` says the call is such a read.
    func authorize(_ method: String, token: String?, serializable: Bool = false) -> EtcdStatus? {
        caller = nil
        if replica.raft.isLearner && method.hasPrefix("/etcdserverpb.") && !serializable
            && method != "/etcdserverpb.Maintenance/Status"
        {
            return .notSupportedForLearner
        }
        guard let auth, auth.enabled, !Self.openMethods.contains(method) else { return nil }
        switch auth.principal(token, store: replica.store, now: RegistryIdentity.wallClock()) {
        case .failure(let e): return e
        case .success(let p):
            if Self.rootMethods.contains(method) && !auth.isRoot(p) { return .permissionDenied }
            caller = p
            return nil
        }
    }
    /// Keep-alives forwarded to the leader, by request id.
    private var pendingRenews: [UInt64: (deadline: Int64, done: (Int64) -> Void)] = [:]

    final class WatchStream {
        var hub = WatchHub()
        let responder: GRPCResponder
        init(responder: GRPCResponder) { self.responder = responder }
    }

    /// A NOSPACE alarm proposal of this member is in flight (one at a time).
    private var raisingNoSpace = false

    /// Whether `command` is refused for space, as etcd decides before proposing: under a
    /// NOSPACE alarm (replicated, sticky until `alarm disarm`), or because it would take the
    /// store past the backend quota — which raises the alarm for this member.
    func refuseOverQuota(_ command: StoreCommand, quota: Int64) -> Bool {
        if replica.store.noSpace { return true }
        guard replica.store.wouldExceed(quota: quota, with: command) else { return false }
        if !raisingNoSpace {
            raisingNoSpace = true
            propose(.alarm(StoreAlarm(memberID: config.id, kind: .noSpace), activate: true)) { [self] r in
                raisingNoSpace = false
                if case .success(.alarm(changed: true)) = r {
                    config.log("alarm NOSPACE raised: backend quota reached")
                }
            }
        }
        return true
    }

    private lazy var compactor: AutoCompactor? = config.autoCompaction.map {
        AutoCompactor($0, checkEveryMs: config.autoCompactionCheckMs)
    }

    /// The leader compacts history on etcd's auto-compaction schedule.
    private func autoCompact() {
        guard compactor != nil else { return }
        guard replica.isLeader else {
            compactor!.reset()
            return
        }
        let store = replica.store
        guard let target = compactor!.tick(now: now, revision: store.revision, compacted: store.compactRevision)
        else { return }
        let log = config.log
        propose(.compact(revision: target)) { r in
            switch r {
            case .success(.failed(let e)): log("auto-compaction to revision \(target) failed: \(e)")
            case .success: log("auto-compacted to revision \(target)")
            case .failure(let e): log("auto-compaction to revision \(target) failed: \(e)")
            }
        }
    }

    /// Since when (ms) this member has seen no leader; nil while it has one.
    private var leaderlessSince: Int64?

    /// etcd's `monitorLeader`: streams opened with `hasleader` are ended with "etcdserver: no
    /// leader" once the member has had no leader for three election timeouts (a watcher then
    /// reconnects to a member that has one instead of waiting on a partitioned one).
    private func monitorLeader() {
        guard replica.raft.leader == 0 else {
            leaderlessSince = nil
            return
        }
        let since = leaderlessSince ?? now
        leaderlessSince = since
        guard now - since >= 3 * config.electionMs else { return }
        for (id, s) in watchStreams where s.responder.requireLeader {
            s.responder.finish(.noLeader)
            watchStreams[id] = nil
        }
    }

    /// Milliseconds on the monotonic clock (the shell reads clocks; the cores never do).
    var now: Int64 { Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000) }

    public init(config: Config, loop: any EventLoop, wallClockMs: UInt64) throws {
        self.config = config
        self.loop = loop
        clusterID = config.clusterID ?? InitialMembership.clusterID(peers: config.peers)
        // Request ids unique across members and restarts (etcd's idutil): member id in the top
        // 16 bits, then the start time in ms, then a counter.
        nextRequest = (config.id & 0xFFFF) << 48 | ((wallClockMs & 0xFF_FFFF_FFFF) << 8)
        var o = RegistryReplica.Options(id: config.id)
        o.raft.heartbeatTicks = 1
        o.raft.electionTicks = max(2, Int(config.electionMs / max(1, config.heartbeatMs)))
        o.tickMs = config.heartbeatMs
        o.snapshotEvery = config.snapshotCount
        o.catchUpEntries = config.snapshotCatchUpEntries
        let fs = try PosixFileSystem(directory: config.dataDir)
        replica = try RegistryReplica(
            options: o, initialConf: config.initialConf ?? ConfState(voters: Set(config.peers.keys)), fs: fs,
            random: SeededRandom(seed: wallClockMs ^ config.id))
    }

    /// Encodes and writes snapshots, so the raft loop never stalls on them.
    private let snapshotPool = NIOThreadPool(numberOfThreads: 1)

    /// Snapshots are encoded and fsynced on `snapshotPool` from a copy-on-write copy of the
    /// store; only the WAL release and Raft compaction come back to the raft loop.
    private func installSnapshotter() {
        snapshotPool.start()
        let dir = config.dataDir
        let loop = self.loop
        replica.snapshotter = { [self] store, meta in
            snapshotPool.submit { state in
                guard state == .active else { return }
                let s = Snapshot(metadata: meta, data: store.snapshot())
                do {
                    try DurableLog.writeSnapshotFile(s, to: try PosixFileSystem(directory: dir))
                    loop.execute {
                        do { try self.replica.snapshotPersisted(s) } catch {
                            fatalError("registry: storage failure after a snapshot, stopping: \(error)")
                        }
                    }
                } catch {
                    print("tandem registry: snapshot at \(meta.index) failed, will retry: \(error)")
                    fflush(nil)
                    loop.execute { self.replica.snapshotFailed() }
                }
            }
        }
    }

    public var recoveryNotes: [String] { replica.recoveryNotes }

    public func setClientURLs(_ urls: [String]) { config.clientURLs = urls }

    /// Starts ticking. With a single voter it campaigns at once instead of waiting out an
    /// election timeout.
    public func start() {
        loop.preconditionInEventLoop()
        installSnapshotter()
        replica.sendEarly = { [self] messages in
            guard let t = transport else { return }
            for m in messages { t.send(.raft(m), to: m.to) }
        }
        if replica.raft.conf.voters == [config.id] {
            replica.step(Message(kind: .timeoutNow, to: config.id, term: replica.raft.term))
        }
        syncPeers()
        pump()
        tickTask = loop.scheduleRepeatedTask(
            initialDelay: .milliseconds(config.heartbeatMs), delay: .milliseconds(config.heartbeatMs)
        ) { [self] _ in
            replica.tick(now: now)
            expireRequests()
            pump()
            monitorLeader()
            autoCompact()
            publishMember()
        }
    }

    // MARK: - Member records

    /// Each member publishes its name and URLs through Raft (as etcd publishes member
    /// attributes), so MemberList on any member shows every member's client URLs (clientv3's
    /// endpoint sync reads them). Kept outside the key space (`StoreCommand.memberAttributes`):
    /// publishing moves no revision and no client can write it.
    private var memberPublished = false
    private var memberPublishing = false

    struct MemberRecord: Equatable {
        var name: String
        var clientURLs: [String]
        var peerURLs: [String]

        var encoded: Bytes {
            Array(
                JSONValue.object([
                    "name": .string(name), "client_urls": .array(clientURLs.map(JSONValue.string)),
                    "peer_urls": .array(peerURLs.map(JSONValue.string)),
                ]).encoded.utf8)
        }

        init(name: String, clientURLs: [String], peerURLs: [String]) {
            self.name = name
            self.clientURLs = clientURLs
            self.peerURLs = peerURLs
        }

        init?(_ bytes: Bytes) {
            guard let v = try? JSONValue.parse(bytes), let name = v["name"]?.string else { return nil }
            self.name = name
            clientURLs = v["client_urls"]?.array?.compactMap(\.string) ?? []
            peerURLs = v["peer_urls"]?.array?.compactMap(\.string) ?? []
        }
    }

    /// The published record of a member, from the local state machine.
    func memberRecord(_ id: NodeID) -> MemberRecord? {
        replica.store.memberRecords[id].flatMap(MemberRecord.init)
    }

    private func publishMember() {
        guard !memberPublished, !memberPublishing, replica.raft.leader != 0 else { return }
        let mine = MemberRecord(name: config.name, clientURLs: config.clientURLs, peerURLs: config.peerURLs)
        if memberRecord(config.id) == mine {
            memberPublished = true
            return
        }
        memberPublishing = true
        propose(.memberAttributes(id: config.id, record: mine.encoded)) { [self] r in
            memberPublishing = false
            if case .success(.memberAttributes) = r { memberPublished = true }
        }
    }

    public func stop() {
        tickTask?.cancel()
        try? snapshotPool.syncShutdownGracefully()
    }

    var header: Etcdserverpb_ResponseHeader {
        var h = Etcdserverpb_ResponseHeader()
        h.clusterID = clusterID
        h.memberID = config.id
        h.raftTerm = replica.raft.term
        h.revision = replica.store.revision
        return h
    }

    // MARK: - Requests

    /// Requests that arrived while this member knew no leader (an election is under way),
    /// run again once it knows one — as etcd holds proposals and reads while leaderless
    /// instead of failing them — or failed with "request timed out" at their deadline.
    private var awaitingLeader: [(deadline: Int64, retry: () -> Void, fail: (EtcdStatus) -> Void)] = []
    /// Bound on `awaitingLeader`; past it, a request fails at once with "no leader".
    static let maxAwaitingLeader = 10_000

    private func awaitLeader(_ fail: @escaping (EtcdStatus) -> Void, retry: @escaping () -> Void) {
        guard awaitingLeader.count < Self.maxAwaitingLeader, !removed else { return fail(.noLeader) }
        awaitingLeader.append((now + config.requestTimeoutMs, retry, fail))
    }

    /// Runs the requests held for a leader once there is one. When the leader changed,
    /// proposals and reads forwarded to the old one may have been dropped with it (a leader
    /// that stepped down, e.g. removed from the cluster): they are sent again — a proposal
    /// applied twice is skipped by its request id (the store filters duplicates).
    private func releaseAwaitingLeader() {
        let leader = replica.raft.leader
        if leader != 0 && leader != knownLeader {
            if knownLeader != 0 {
                for (id, w) in pendingWrites.sorted(by: { $0.key < $1.key }) {
                    try? replica.propose(w.command, requestID: id)
                }
                for ctx in pendingReads.keys {
                    replica.cancelRead(context: ctx)
                    try? replica.read(context: ctx)
                }
                if !pendingWrites.isEmpty || !pendingReads.isEmpty { schedulePump() }
            }
            knownLeader = leader
        }
        guard leader != 0, !awaitingLeader.isEmpty else { return }
        let held = awaitingLeader
        awaitingLeader = []
        for w in held { w.retry() }
    }

    func propose(_ command: StoreCommand, _ done: @escaping (Result<StoreResult, EtcdStatus>) -> Void) {
        loop.preconditionInEventLoop()
        guard replica.raft.leader != 0 else {
            return awaitLeader({ done(.failure($0)) }) { [self] in propose(command, done) }
        }
        nextRequest &+= 1
        let id = nextRequest
        do {
            try replica.propose(command, requestID: id)
        } catch {
            return done(.failure(Self.status(error)))
        }
        pendingWrites[id] = (now + config.requestTimeoutMs, command, done)
        schedulePump()
    }

    /// Runs `body` once a ReadIndex round says the local store is up to date.
    func linearizable(_ done: @escaping (Result<Void, EtcdStatus>) -> Void) {
        loop.preconditionInEventLoop()
        guard replica.raft.leader != 0 else {
            return awaitLeader({ done(.failure($0)) }) { [self] in linearizable(done) }
        }
        nextRequest &+= 1
        let ctx = withUnsafeBytes(of: nextRequest.littleEndian) { Array($0) }
        do {
            try replica.read(context: ctx)
        } catch {
            return done(.failure(Self.status(error)))
        }
        pendingReads[ctx] = (now + config.requestTimeoutMs, done)
        schedulePump()
    }

    /// What a client is told when the replica refuses a request.
    static func status(_ e: RegistryReplica.ReplicaError) -> EtcdStatus {
        switch e {
        case .proposal(let p): return EtcdStatus(p)
        case .tooManyPendingReads: return .tooManyRequests
        }
    }

    func newLeaseID() -> Int64 {
        nextRequest &+= 1
        return Int64(bitPattern: nextRequest & 0x7FFF_FFFF_FFFF_FFFF)
    }

    private func expireRequests() {
        let t = now
        if awaitingLeader.contains(where: { $0.deadline <= t }) {
            let late = awaitingLeader.filter { $0.deadline <= t }
            awaitingLeader.removeAll { $0.deadline <= t }
            for w in late { w.fail(.timedOut) }
        }
        for (id, w) in pendingWrites where w.deadline <= t {
            pendingWrites[id] = nil
            w.done(.failure(.timedOut))
        }
        for (id, r) in pendingRenews where r.deadline <= t {
            pendingRenews[id] = nil
            r.done(0)
        }
        for (key, ws) in pendingConf {
            let (late, waiting) = (ws.filter { $0.deadline <= t }, ws.filter { $0.deadline > t })
            pendingConf[key] = waiting.isEmpty ? nil : waiting
            for w in late { w.done(.failure(.timedOut)) }
        }
        for (id, key) in forwardedConf where pendingConf[key] == nil { forwardedConf[id] = nil }
        for (ctx, r) in pendingReads where r.deadline <= t {
            pendingReads[ctx] = nil
            replica.cancelRead(context: ctx)
            r.done(.failure(.timedOut))
        }
    }

    // MARK: - Peers

    /// A frame from a peer, on the raft loop; `reply` answers on the connection it came on.
    func receive(_ frame: PeerFrame, reply: @escaping PeerReply) {
        switch frame {
        case .raft(let m):
            if removedMembers.contains(m.from) { return reply(.removed(member: m.from)) }
            replica.step(m)
            schedulePump()
        case .leaseRenew(let id, let from, let lease):
            let ttl = replica.renewLease(lease, now: now) ?? 0
            transport?.send(.leaseRenewed(requestID: id, ttl: ttl), to: from)
        case .leaseRenewed(let id, let ttl):
            pendingRenews.removeValue(forKey: id)?.done(ttl)
        case .leaseRemaining(let id, let from, let lease):
            let secs = replica.lessor.remainingSeconds(id: lease, now: now)
            transport?.send(.leaseRemainingIs(requestID: id, seconds: secs), to: from)
        case .leaseRemainingIs(let id, let secs):
            pendingRenews.removeValue(forKey: id)?.done(secs)
        case .confChange(let id, let from, let cc):
            changeMembership(cc) { [self] r in
                let failure: EtcdStatus? = if case .failure(let e) = r { e } else { nil }
                transport?.send(
                    .confChangeDone(requestID: id, code: failure?.code.rawValue ?? 0, message: failure?.message ?? ""),
                    to: from)
            }
        case .confChangeDone(let id, let code, let message):
            // Success is reported once this member applies the change (so the answer lists
            // the members as they now are); a refusal is reported at once.
            guard let key = forwardedConf.removeValue(forKey: id), code != 0 else { return }
            let e = EtcdStatus(EtcdStatus.Code(rawValue: code) ?? .unavailable, message)
            for w in pendingConf.removeValue(forKey: key) ?? [] { w.done(.failure(e)) }
        case .membersQuery:
            reply(.members(membersJSON()))
        case .members, .chunk:
            break  // answers and pieces are consumed by the transport
        case .removed(let id):
            guard id == config.id else { return }
            stopRemoved()
        }
    }

    /// Keep-alive: renewed by the leader's lease clock, forwarded there from a follower.
    /// Answers the TTL, or 0 for an unknown or expired lease (as etcd does).
    func renewLease(_ lease: Int64, _ done: @escaping (Int64) -> Void) {
        if replica.isLeader { return done(replica.renewLease(lease, now: now) ?? 0) }
        let leader = replica.raft.leader
        guard leader != 0 else { return awaitLeader({ _ in done(0) }) { [self] in renewLease(lease, done) } }
        guard let t = transport else { return done(0) }
        nextRequest &+= 1
        pendingRenews[nextRequest] = (now + config.requestTimeoutMs, done)
        t.send(.leaseRenew(requestID: nextRequest, from: config.id, lease: lease), to: leader)
    }

    /// Remaining TTL in seconds from the leader's lease clock (asked of the leader from a
    /// follower); -1 when unknown.
    func leaseRemaining(_ lease: Int64, _ done: @escaping (Int64) -> Void) {
        if replica.isLeader {
            return done(replica.lessor.remainingSeconds(id: lease, now: now))
        }
        let leader = replica.raft.leader
        guard leader != 0 else { return awaitLeader({ _ in done(-1) }) { [self] in leaseRemaining(lease, done) } }
        guard let t = transport else { return done(-1) }
        nextRequest &+= 1
        pendingRenews[nextRequest] = (now + config.requestTimeoutMs, done)
        t.send(.leaseRemaining(requestID: nextRequest, from: config.id, lease: lease), to: leader)
    }

    // MARK: - Watches

    /// A new Watch stream; -1 (and the stream ended with "etcdserver: no leader") when it
    /// requires a leader and this member has none.
    func openWatchStream(_ responder: GRPCResponder) -> Int {
        if responder.requireLeader && replica.raft.leader == 0 {
            responder.finish(.noLeader)
            return -1
        }
        let id = nextStream
        nextStream += 1
        watchStreams[id] = WatchStream(responder: responder)
        return id
    }

    func closeWatchStream(_ id: Int) { watchStreams[id] = nil }

    func withWatchStream(_ id: Int, _ body: (inout WatchHub, MVCCStore) -> Void) {
        guard let s = watchStreams[id] else { return }
        body(&s.hub, replica.store)
        flush(s)
    }

    private func flush(_ s: WatchStream) {
        for r in s.hub.take(store: replica.store) {
            if let bytes = try? Etcdserverpb_WatchResponse(r, header: header).serializedBytes() as [UInt8] {
                s.responder.send(bytes)
            }
        }
    }

    // MARK: - The Ready loop

    private var pumpScheduled = false

    /// Group commit: instead of one Ready (and one fsync) per request, run the Ready loop
    /// once after every task already queued on the raft loop — all the proposals, reads and
    /// peer messages that arrived meanwhile (e.g. during the previous fsync) share a round.
    func schedulePump() {
        guard !pumpScheduled else { return }
        pumpScheduled = true
        loop.execute { [self] in
            pumpScheduled = false
            pump()
        }
    }

    func pump() {
        loop.preconditionInEventLoop()
        let out: RegistryReplica.Output
        let revisionBefore = replica.store.revision
        do {
            out = try replica.process(now: now)
        } catch {
            // Storage failed: a member that cannot persist must not go on (etcd panics too).
            fatalError("registry: storage failure, stopping: \(error)")
        }
        // A removed member may never hear of its removal through Raft (the leader stops
        // replicating to it): tell it before its link goes.
        for cc in out.confChanges where cc.kind == .remove && cc.node != config.id {
            transport?.send(.removed(member: cc.node), to: cc.node)
        }
        if !out.confChanges.isEmpty || out.installedSnapshot != nil { syncPeers() }
        if let t = transport {
            for m in out.messages { t.send(.raft(m), to: m.to) }
        }
        for cc in out.confChanges {
            for w in pendingConf.removeValue(forKey: ConfKey(cc)) ?? [] { w.done(.success(())) }
            config.log("membership: \(Self.describe(cc)) applied; members now \(replica.raft.conf.members.count)")
            if cc.kind == .remove {
                if cc.node == config.id {
                    stopRemoved()
                } else if removedMembers.count < Self.maxRemovedRemembered {
                    removedMembers.insert(cc.node)
                }
            }
        }
        if let idx = out.installedSnapshot {
            print(
                "tandem registry: installed a snapshot from the leader at index \(idx) (\(out.installedSnapshotBytes / 1024) KiB)"
            )
            fflush(nil)
        }
        if out.roleChanged {
            print("tandem registry: \(replica.raft.role) in term \(replica.raft.term)")
            fflush(nil)
        }
        for (id, result) in out.applied {
            guard let w = pendingWrites.removeValue(forKey: id) else { continue }
            w.done(.success(result))
        }
        for ctx in out.readsReady {
            guard let r = pendingReads.removeValue(forKey: ctx) else { continue }
            r.done(.success(()))
        }
        if out.installedSnapshot != nil {
            for s in watchStreams.values {
                s.hub.resync(deliveredThrough: revisionBefore)
                flush(s)
            }
        }
        if !out.events.isEmpty {
            for s in watchStreams.values {
                for (rev, evs) in out.events { s.hub.publish(revision: rev, events: evs, store: replica.store) }
                flush(s)
            }
        }
        releaseAwaitingLeader()
    }

    // MARK: - Membership changes

    struct ConfKey: Hashable {
        var kind: UInt8
        var node: NodeID
        init(_ cc: ConfChange) {
            kind = cc.kind.rawValue
            node = cc.node
        }
    }
    /// Callers waiting for a membership change to be applied here, by change.
    private var pendingConf: [ConfKey: [(deadline: Int64, done: (Result<Void, EtcdStatus>) -> Void)]] = [:]
    /// Bound on callers waiting for membership changes (they are one at a time in Raft).
    static let maxPendingConf = 1_024
    /// Changes forwarded to the leader, by request id.
    private var forwardedConf: [UInt64: ConfKey] = [:]
    private var removed = false
    /// Members whose removal this member applied (since it started): their raft messages are
    /// answered with `.removed`, so a removed member that missed its removal stops too.
    private var removedMembers: Set<NodeID> = []
    /// Bound on `removedMembers` (past it, a removed member that missed its removal keeps
    /// probing with pre-votes, which the cluster ignores, instead of being told to stop).
    static let maxRemovedRemembered = 1_024

    private func stopRemoved() {
        guard !removed else { return }
        removed = true
        // The request that removed this member (if it came here) is answered: it is done.
        for w in pendingConf.removeValue(forKey: ConfKey(ConfChange(.remove, node: config.id))) ?? [] {
            w.done(.success(()))
        }
        config.log("this member was removed from the cluster; stopping")
        config.onRemoved()
    }

    static func describe(_ cc: ConfChange) -> String {
        let what = ["add voter", "add learner", "remove", "promote"][Int(cc.kind.rawValue)]
        return "\(what) \(String(cc.node, radix: 16))"
    }

    /// Proposes a membership change (on the leader, which alone can validate it; a follower
    /// forwards it there) and calls `done` once this member has applied it.
    func changeMembership(_ cc: ConfChange, _ done: @escaping (Result<Void, EtcdStatus>) -> Void) {
        loop.preconditionInEventLoop()
        let leader = replica.raft.leader
        guard leader != 0 else {
            return awaitLeader({ done(.failure($0)) }) { [self] in changeMembership(cc, done) }
        }
        let key = ConfKey(cc)
        guard pendingConf.values.reduce(0, { $0 + $1.count }) < Self.maxPendingConf else {
            return done(.failure(.tooManyRequests))
        }
        if replica.isLeader {
            do { try replica.proposeConfChange(cc) } catch { return done(.failure(Self.status(error))) }
            schedulePump()
        } else {
            guard let t = transport else { return done(.failure(.noLeader)) }
            nextRequest &+= 1
            forwardedConf[nextRequest] = key
            t.send(.confChange(requestID: nextRequest, from: config.id, cc), to: leader)
        }
        pendingConf[key, default: []].append((now + config.requestTimeoutMs, done))
    }

    /// etcd's MemberAdd: a new member (a learner if asked) known by its peer URLs, with an id
    /// drawn from them and the time (as etcd does); answers the id.
    func addMember(peerURLs: [String], learner: Bool, _ done: @escaping (Result<NodeID, EtcdStatus>) -> Void) {
        let members = memberList()
        if let refusal = InitialMembership.refusal(adding: peerURLs, members: members.map(\.peerUrls)) {
            return done(.failure(refusal))
        }
        guard transport != nil else {
            return done(
                .failure(
                    EtcdStatus(
                        .failedPrecondition,
                        "tandem: this registry runs inside another process without a peer listener; run `tandem registry` to grow a cluster"
                    )))
        }
        if !learner, config.strictReconfigCheck,
            let refusal = ReconfigCheck.refusalToAddVoter(started: votersStarted().map(\.started))
        {
            return done(.failure(refusal))
        }
        let id = InitialMembership.newMemberID(
            peerURLs: peerURLs, clusterID: clusterID,
            salt: [UInt64(bitPattern: RegistryIdentity.wallClock()), nextRequest],
            taken: Set(members.map(\.id)).union(replica.store.memberRecords.keys))
        let record = MemberRecord(name: "", clientURLs: [], peerURLs: peerURLs).encoded
        changeMembership(ConfChange(learner ? .addLearner : .addVoter, node: id, context: record)) { r in
            done(r.map { id })
        }
    }

    /// etcd's MemberRemove and MemberPromote, with etcd's errors for an unknown member or a
    /// promotion of a voter.
    func removeMember(_ id: NodeID, _ done: @escaping (Result<Void, EtcdStatus>) -> Void) {
        guard replica.raft.conf.members.contains(id) else { return done(.failure(.memberNotFound)) }
        if config.strictReconfigCheck, !replica.raft.conf.learners.contains(id),
            let refusal = ReconfigCheck.refusalToRemove(id, voters: votersStarted())
        {
            return done(.failure(refusal))
        }
        changeMembership(ConfChange(.remove, node: id), done)
    }

    /// The voting members and whether each has started (has a name, as etcd counts it).
    func votersStarted() -> [(id: NodeID, started: Bool)] {
        memberList().filter { !$0.isLearner }.map { ($0.id, !$0.name.isEmpty) }
    }

    func promoteMember(_ id: NodeID, _ done: @escaping (Result<Void, EtcdStatus>) -> Void) {
        let conf = replica.raft.conf
        guard conf.members.contains(id) else { return done(.failure(.memberNotFound)) }
        guard conf.learners.contains(id) else { return done(.failure(.memberNotLearner)) }
        if config.strictReconfigCheck,
            let refusal = ReconfigCheck.refusalToPromote(started: votersStarted().map(\.started))
        {
            return done(.failure(refusal))
        }
        changeMembership(ConfChange(.promote, node: id), done)
    }

    /// Where member `id` listens for peers: what it published, what its addition carried, or
    /// what --initial-cluster says.
    func peerURL(_ id: NodeID) -> String? { memberRecord(id)?.peerURLs.first ?? config.peers[id] }

    /// Keeps a connection to every other member (and listens for peers once there are any).
    func syncPeers() {
        guard let t = transport else { return }
        var want: [NodeID: (host: String, port: Int)] = [:]
        for id in replica.raft.conf.members where id != config.id {
            if let a = peerURL(id).flatMap(HostPort.init) { want[id] = (a.host, a.port) }
        }
        t.setPeers(want)
        if !want.isEmpty {
            let log = config.log
            t.ensureListening { error in if let error { log(error) } }
        }
    }

    /// Every member as MemberList reports it: its published record, else what its addition
    /// carried or --initial-cluster says (etcd, too, lists a member that has not started with
    /// no name and no client URLs).
    func memberList() -> [Etcdserverpb_Member] {
        let conf = replica.raft.conf
        return conf.members.sorted().map { id in
            var mem = Etcdserverpb_Member()
            mem.id = id
            mem.isLearner = conf.learners.contains(id)
            if id == config.id {
                mem.name = config.name
                mem.clientUrls = config.clientURLs
                mem.peerUrls = config.peerURLs
            } else if let rec = memberRecord(id) {
                mem.name = rec.name
                mem.clientUrls = rec.clientURLs
                mem.peerUrls = rec.peerURLs
            } else if let url = config.peers[id] {
                mem.name = config.names[id] ?? ""
                mem.peerUrls = [url]
            }
            return mem
        }
    }

    /// The answer to a joining member's members query: the cluster id and the member list.
    func membersJSON() -> Bytes {
        InitialMembership(
            clusterID: clusterID, memberID: config.id,
            members: memberList().map {
                .init(id: $0.id, name: $0.name, peerURLs: $0.peerUrls, clientURLs: $0.clientUrls, learner: $0.isLearner)
            }
        ).encoded
    }
}
