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
        /// A proposal or linearizable read not answered within this time fails.
        public var requestTimeoutMs: Int64 = 7_000
        /// etcd's auto-compaction (run by the leader); nil = off.
        public var autoCompaction: AutoCompactor.Mode? = nil
        /// How often the compactor looks (default: etcd's — a tenth of the retention, or 5 min).
        public var autoCompactionCheckMs: Int64? = nil
        /// Where the member reports what it does on its own (auto-compaction).
        public var log: @Sendable (String) -> Void = { _ in }
        public init() {}
    }

    public private(set) var config: Config
    public let loop: any EventLoop
    let clusterID: UInt64
    var replica: RegistryReplica
    private var pendingWrites: [UInt64: (deadline: Int64, done: (Result<StoreResult, EtcdStatus>) -> Void)] = [:]
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

    /// Sets `caller` for a call to `method` with `token`, or says why it is refused.
    func authorize(_ method: String, token: String?) -> EtcdStatus? {
        caller = nil
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
        var h = FNV1a()
        for (id, url) in config.peers.sorted(by: { $0.key < $1.key }) {
            h.add(id)
            h.add(url)
        }
        clusterID = h.value
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
            options: o, initialConf: ConfState(voters: Set(config.peers.keys)), fs: fs,
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
        if config.peers.count == 1 {
            replica.step(Message(kind: .timeoutNow, to: config.id, term: replica.raft.term))
        }
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

    func propose(_ command: StoreCommand, _ done: @escaping (Result<StoreResult, EtcdStatus>) -> Void) {
        loop.preconditionInEventLoop()
        guard replica.raft.leader != 0 else { return done(.failure(.noLeader)) }
        nextRequest &+= 1
        let id = nextRequest
        do {
            try replica.propose(command, requestID: id)
        } catch {
            return done(.failure(Self.status(error)))
        }
        pendingWrites[id] = (now + config.requestTimeoutMs, done)
        schedulePump()
    }

    /// Runs `body` once a ReadIndex round says the local store is up to date.
    func linearizable(_ done: @escaping (Result<Void, EtcdStatus>) -> Void) {
        loop.preconditionInEventLoop()
        guard replica.raft.leader != 0 else { return done(.failure(.noLeader)) }
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
        for (id, w) in pendingWrites where w.deadline <= t {
            pendingWrites[id] = nil
            w.done(.failure(.timedOut))
        }
        for (id, r) in pendingRenews where r.deadline <= t {
            pendingRenews[id] = nil
            r.done(0)
        }
        for (ctx, r) in pendingReads where r.deadline <= t {
            pendingReads[ctx] = nil
            replica.cancelRead(context: ctx)
            r.done(.failure(.timedOut))
        }
    }

    // MARK: - Peers

    /// A frame from a peer, on the raft loop.
    func receive(_ frame: PeerFrame) {
        switch frame {
        case .raft(let m):
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
        }
    }

    /// Keep-alive: renewed by the leader's lease clock, forwarded there from a follower.
    /// Answers the TTL, or 0 for an unknown or expired lease (as etcd does).
    func renewLease(_ lease: Int64, _ done: @escaping (Int64) -> Void) {
        if replica.isLeader { return done(replica.renewLease(lease, now: now) ?? 0) }
        let leader = replica.raft.leader
        guard leader != 0, let t = transport else { return done(0) }
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
        guard leader != 0, let t = transport else { return done(-1) }
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
        if let t = transport {
            for m in out.messages { t.send(.raft(m), to: m.to) }
        }
        if let idx = out.installedSnapshot {
            print("tandem registry: installed a snapshot from the leader at index \(idx)")
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
    }
}
