import HeapModule
import TandemCore
import TandemRaft
import TandemReplica
import TandemStorage
import TandemStore

/// A Raft registry cluster, its clients and a seeded fault schedule, run on virtual time.
public enum RegistrySimulation {
    public struct Options: Sendable {
        public var seed: UInt64
        public var nodes = 3
        /// Length of the phase with client load and faults.
        public var durationMs: UInt64 = 3_000
        /// After healing: time allowed for the final reads that check nothing was lost.
        public var quietMs: UInt64 = 3_000
        public var tickMs: UInt64 = 10
        public var electionTicks = 10
        public var minDelayMs: UInt64 = 1
        public var maxDelayMs: UInt64 = 10
        public var lossRate = 0.02
        public var duplicateRate = 0.02
        public var clients = 4
        public var keys = 3
        public var opTimeoutMs: UInt64 = 300
        /// Random faults (crashes, partitions, clogged links) every `faultEveryMs`.
        public var randomFaults = true
        public var faultEveryMs: UInt64 = 250
        /// Relative clock rates of nodes differ by up to this fraction (clock skew).
        public var maxClockSkew = 0.05
        public var snapshotEvery: UInt64 = 40
        public var catchUpEntries: UInt64 = 8
        public var segmentBytes = 2_048
        /// Scripted faults, in addition to random ones.
        public var timeline: [ScriptedFault] = []
        /// Membership churn (3+ nodes): replace a voter by a new member that joins as a
        /// learner, catches up (usually by snapshot) and is promoted; and leadership transfers.
        public var membershipChanges = true
        /// Record a human-readable event log in the report (for explaining a failing seed).
        public var recordTrace = false
        /// Make one node's disk fail at its Nth mutating operation (crash-point tests).
        public var crashPoint: (node: NodeID, operation: Int)?

        public init(seed: UInt64) { self.seed = seed }

        /// The command that replays this run.
        public var replayCommand: String {
            "tandem sim-registry --seed \(seed) --nodes \(nodes) --duration-ms \(durationMs)"
                + (timeline.isEmpty && randomFaults ? "" : " --leader-crash")
        }
    }

    public enum ScriptedFault: Sendable {
        /// Crash whichever node leads at `atMs`; restart it `downMs` later.
        case crashLeader(atMs: UInt64, downMs: UInt64)
        /// Isolate whichever node leads at `atMs` from everyone for `forMs`.
        case isolateLeader(atMs: UInt64, forMs: UInt64)
    }

    public struct Report: Sendable {
        public var seed: UInt64
        public var nodes: Int
        public var traceHash: UInt64 = 0
        public var violations: [String] = []
        public var virtualMs: UInt64 = 0
        public var events = 0
        public var opsOK = 0
        public var opsFailed = 0
        public var opsUnknown = 0
        public var writesAcked = 0
        public var readsServed = 0
        public var termsWithLeader = 0
        public var crashes = 0
        public var partitions = 0
        public var pauses = 0
        public var snapshotsInstalled = 0
        public var snapshotsTaken = 0
        /// Voters replaced (removed, then a new member added as learner and promoted).
        public var membersReplaced = 0
        /// Proposals skipped because their request id was already applied (all members).
        public var duplicatesSkipped = 0
        public var leadershipTransfers = 0
        public var tornTailsTruncated = 0
        public var maxCommitIndex: UInt64 = 0
        public var finalReads = 0
        /// For scripted leader crashes: virtual ms from the crash to the next leader.
        public var failoverMs: [UInt64] = []
        public var history: [RegisterOp] = []
        /// Mutating disk operations per node (the crash points a run went through).
        public var diskOperations: [NodeID: Int] = [:]
        /// With `recordTrace`: one line per notable event, prefixed by virtual time.
        public var traceLines: [String] = []
        public var firstLeader: NodeID = 0
        public var passed: Bool { violations.isEmpty }
    }

    public static func run(_ options: Options) -> Report {
        let w = World(options)
        return w.run()
    }
}

// MARK: - The world

private struct Scheduled: Comparable {
    var time: UInt64
    var seq: UInt64
    var event: SimEvent
    static func < (a: Scheduled, b: Scheduled) -> Bool { (a.time, a.seq) < (b.time, b.seq) }
    static func == (a: Scheduled, b: Scheduled) -> Bool { a.time == b.time && a.seq == b.seq }
}

private enum SimEvent {
    case tick(NodeID)
    case deliver(Bytes, to: NodeID)
    case request(ClientRequest, to: NodeID)
    case response(ClientResponse)
    case clientTimeout(client: Int, seq: UInt64)
    case clientNext(client: Int)
    case randomFault
    case scripted(Int)
    case restart(NodeID)
    case healLinks
    case heal
    case churnStep
}

private struct ClientRequest {
    var client: Int
    var seq: UInt64
    var key: Bytes
    var input: RegisterOp.Input
    /// A read after healing that checks no acknowledged write was lost.
    var isFinal = false
    var requestID: UInt64 { UInt64(client) << 32 | seq }
}

private struct ClientResponse {
    var client: Int
    var seq: UInt64
    /// nil: definitely not executed (e.g. not the leader).
    var output: RegisterOp.Output?
    var leaderHint: NodeID
}

private final class Member {
    let id: NodeID
    let disk: SimDisk
    var replica: RegistryReplica?
    var pendingWrites: [UInt64: ClientRequest] = [:]
    var pendingReads: [Bytes: ClientRequest] = [:]
    /// Ticks are stretched or shrunk by this factor: a skewed clock.
    let clockRate: Double
    var incarnation = 0
    /// A paused process (GC pause, VM stall) handles nothing until then; its clock stops.
    var pausedUntil: UInt64 = 0
    /// The membership this member was started with (the cluster it joins).
    let initialConf: ConfState
    var lastConf = ConfState()
    init(id: NodeID, disk: SimDisk, clockRate: Double, initialConf: ConfState) {
        self.id = id
        self.disk = disk
        self.clockRate = clockRate
        self.initialConf = initialConf
    }
}

private struct Client {
    var seq: UInt64 = 0
    var current: (req: ClientRequest, call: UInt64)?
    var leaderHint: NodeID = 0
    var finalKeysLeft: [Bytes]?
}

private final class World {
    let o: RegistrySimulation.Options
    var rng: SeededRandom
    var now: UInt64 = 0
    var queue = Heap<Scheduled>()
    var seq: UInt64 = 0
    var members: [NodeID: Member] = [:]
    /// Members currently running as part of the cluster (changes with membership churn).
    var ids: [NodeID]
    /// Removed members: never restarted.
    var decommissioned = Set<NodeID>()
    /// A voter replacement in progress: `old` leaves, `new` joins as learner, then is promoted.
    var churn: (old: NodeID, new: NodeID, added: Bool)?
    var nextMemberID: NodeID = 100
    var clients: [Client]
    var blocked = Set<UInt64>()
    var clogged: [UInt64: UInt64] = [:]
    var trace = FNV1a()
    var report: RegistrySimulation.Report
    var leadersByTerm: [UInt64: NodeID] = [:]
    var appliedAt: [UInt64: (term: UInt64, digest: UInt64)] = [:]
    var maxApplied: UInt64 = 0
    var healed = false
    var crashWatch: UInt64?  // time of a scripted leader crash awaiting a new leader
    var crashedLeaderTerm: UInt64 = 0
    var writeValue: UInt64 = 0

    init(_ o: RegistrySimulation.Options) {
        self.o = o
        rng = SeededRandom(seed: o.seed)
        ids = (1...UInt64(o.nodes)).map { $0 }
        clients = Array(repeating: Client(), count: o.clients)
        report = RegistrySimulation.Report(seed: o.seed, nodes: o.nodes)
        for id in ids { addMember(id, initialConf: ConfState(voters: Set(ids))) }
        if let cp = o.crashPoint { members[cp.node]?.disk.crashAtOperation = cp.operation }
    }

    func addMember(_ id: NodeID, initialConf: ConfState) {
        let skew = 1.0 + (Double(rng.next() % 2001) / 1000.0 - 1.0) * o.maxClockSkew
        members[id] = Member(id: id, disk: SimDisk(random: rng.fork()), clockRate: skew, initialConf: initialConf)
    }

    func note(_ line: @autoclosure () -> String) {
        if o.recordTrace { report.traceLines.append("\(now) ms  \(line())") }
    }

    func schedule(_ delay: UInt64, _ e: SimEvent) {
        seq += 1
        queue.insert(Scheduled(time: now + delay, seq: seq, event: e))
    }

    func link(_ a: UInt64, _ b: UInt64) -> UInt64 { a << 32 | b }

    // MARK: run

    func run() -> RegistrySimulation.Report {
        for id in ids { start(id) }
        for c in 0..<o.clients { schedule(UInt64(c) * 3, .clientNext(client: c)) }
        if o.randomFaults { schedule(o.faultEveryMs, .randomFault) }
        for (k, f) in o.timeline.enumerated() {
            switch f {
            case .crashLeader(let at, _), .isolateLeader(let at, _): schedule(at, .scripted(k))
            }
        }
        schedule(o.durationMs, .heal)
        let end = o.durationMs + o.quietMs
        while let ev = queue.popMin() {
            if ev.time > end { break }
            now = ev.time
            report.events += 1
            handle(ev.event)
            if healed && clients.allSatisfy({ $0.finalKeysLeft?.isEmpty == true && $0.current == nil }) { break }
        }
        finish()
        return report
    }

    func finish() {
        report.virtualMs = now
        report.traceHash = trace.value
        // Operations still outstanding may or may not have happened.
        for c in clients.indices {
            if let cur = clients[c].current { record(cur.req, cur.call, .unknown) }
        }
        if clients.contains(where: { $0.finalKeysLeft?.isEmpty != true }) {
            report.violations.append(
                "liveness: the healed cluster did not serve the final reads within \(o.quietMs) ms")
        }
        switch LinearizabilityChecker.check(report.history) {
        case .linearizable: break
        case .violation(let key, let n):
            report.violations.append("linearizability: history of key \(key) (\(n) operations) is not linearizable")
        case .unknown(let key):
            report.violations.append("linearizability: checker gave up on key \(key) (step bound)")
        }
        report.termsWithLeader = leadersByTerm.count
        report.firstLeader = leadersByTerm.min { $0.key < $1.key }?.value ?? 0
        for id in ids {
            report.diskOperations[id] = members[id]!.disk.operations
            report.snapshotsTaken += members[id]!.replica?.snapshotsTaken ?? 0
            report.duplicatesSkipped += members[id]!.replica?.duplicatesSkipped ?? 0
        }
    }

    /// The node an event is addressed to, if it is one a paused process would not handle.
    func target(_ e: SimEvent) -> NodeID? {
        switch e {
        case .tick(let id), .deliver(_, let id), .request(_, let id): return id
        default: return nil
        }
    }

    func handle(_ e: SimEvent) {
        if let id = target(e), let m = members[id], m.pausedUntil > now {
            // On resume, input from different connections is handled in no particular order.
            seq += 1
            queue.insert(Scheduled(time: m.pausedUntil + rng.next() % 8, seq: seq, event: e))
            return
        }
        switch e {
        case .tick(let id):
            guard let m = members[id], let r = m.replica else { return }
            trace.add(1)
            trace.add(now)
            trace.add(id)
            r.tick(now: Int64(now))
            pump(m)
            schedule(tickInterval(m), .tick(id))
        case .deliver(let bytes, let to):
            guard let m = members[to], let r = m.replica else { return }
            guard let msg = try? Message(decoding: bytes) else {
                report.violations.append("codec: a Raft message failed to decode")
                return
            }
            trace.add(2)
            trace.add(now)
            trace.add(to)
            trace.add(UInt64(msg.kind.rawValue) << 56 | msg.from << 48 | msg.term << 32 | msg.index)
            r.step(msg)
            pump(m)
        case .request(let req, let to):
            serve(req, at: to)
        case .response(let resp):
            complete(resp)
        case .clientTimeout(let c, let s):
            guard let cur = clients[c].current, cur.req.seq == s else { return }
            trace.add(3)
            trace.add(now)
            record(cur.req, cur.call, .unknown)
            clients[c].current = nil
            clients[c].leaderHint = 0
            schedule(1, .clientNext(client: c))
        case .clientNext(let c):
            nextOp(c)
        case .randomFault:
            guard !healed else { return }
            randomFault()
            schedule(o.faultEveryMs / 2 + rng.next() % o.faultEveryMs, .randomFault)
        case .scripted(let k):
            scripted(o.timeline[k])
        case .restart(let id):
            if members[id]?.replica == nil && !decommissioned.contains(id) { start(id) }
        case .churnStep:
            churnStep()
        case .healLinks:
            blocked = []
            clogged = [:]
        case .heal:
            healed = true
            blocked = []
            clogged = [:]
            for id in ids where members[id]!.replica == nil { start(id) }
            let keys = (0..<o.keys).map { Array("k\($0)".utf8) }
            for c in clients.indices { clients[c].finalKeysLeft = c == 0 ? keys : [] }
        }
    }

    func tickInterval(_ m: Member) -> UInt64 { max(1, UInt64((Double(o.tickMs) * m.clockRate).rounded())) }

    // MARK: nodes

    func start(_ id: NodeID) {
        let m = members[id]!
        var opts = RegistryReplica.Options(id: id)
        opts.raft.electionTicks = o.electionTicks
        opts.raft.heartbeatTicks = 1
        opts.raft.maxInflightMessages = 16
        opts.raft.maxBytesPerMessage = 4096
        opts.snapshotEvery = o.snapshotEvery
        opts.catchUpEntries = o.catchUpEntries
        opts.storage.segmentBytes = o.segmentBytes
        opts.tickMs = Int64(o.tickMs)
        do {
            let r = try RegistryReplica(
                options: opts, initialConf: m.initialConf, fs: m.disk, random: rng.fork())
            // As the server does: a leader's messages leave before its fsync (which may then
            // crash), so the checkers see that ordering under faults.
            r.sendEarly = { [unowned self] in for msg in $0 { send(msg) } }
            m.replica = r
            m.incarnation += 1
            report.tornTailsTruncated += r.recoveryNotes.filter { $0.contains("torn tail") }.count
            pump(m)
        } catch let c as SimulatedCrash {
            _ = c
            crash(m, restartAfter: 50)
        } catch {
            report.violations.append("recovery: node \(id) could not start: \(error)")
        }
        schedule(tickInterval(m), .tick(id))
    }

    func crash(_ m: Member, restartAfter delay: UInt64) {
        report.snapshotsTaken += m.replica?.snapshotsTaken ?? 0
        report.duplicatesSkipped += m.replica?.duplicatesSkipped ?? 0
        trace.add(4)
        trace.add(now)
        trace.add(m.id)
        note("crash node \(m.id)")
        report.crashes += 1
        m.replica = nil
        m.disk.crash()
        m.pendingWrites = [:]
        m.pendingReads = [:]
        schedule(delay, .restart(m.id))
    }

    /// Runs the member's Ready loop and carries out its output.
    func pump(_ m: Member) {
        guard let r = m.replica else { return }
        let out: RegistryReplica.Output
        do {
            out = try r.process(now: Int64(now))
        } catch {
            crash(m, restartAfter: 20 + rng.next() % 200)
            return
        }
        checkSafety(m, r, out)
        if o.recordTrace {
            if out.roleChanged { note("node \(m.id) is \(r.raft.role) in term \(r.raft.term)") }
            if let s = out.installedSnapshot { note("node \(m.id) installed snapshot at \(s)") }
            if r.raft.conf != m.lastConf {
                note(
                    "node \(m.id) conf voters \(r.raft.conf.voters.sorted()) learners \(r.raft.conf.learners.sorted())")
                m.lastConf = r.raft.conf
            }
        }
        for msg in out.messages { send(msg) }
        for (reqID, result) in out.applied {
            guard let req = m.pendingWrites.removeValue(forKey: reqID) else { continue }
            let output: RegisterOp.Output
            switch result {
            case .put: output = .ok
            case .txn(let t): output = .casResult(t.succeeded)
            default: output = .unknown
            }
            reply(req, from: m.id, output)
        }
        for ctx in out.readsReady {
            guard let req = m.pendingReads.removeValue(forKey: ctx) else { continue }
            let v = (try? r.store.range(RangeRequest(key: req.key)))?.kvs.first?.value
            reply(req, from: m.id, .value(v))
        }
        if out.installedSnapshot != nil { report.snapshotsInstalled += 1 }
    }

    func checkSafety(_ m: Member, _ r: RegistryReplica, _ out: RegistryReplica.Output) {
        // Election safety (§5.2): at most one leader per term.
        if r.isLeader {
            let term = r.raft.term
            if let l = leadersByTerm[term], l != m.id {
                report.violations.append("election safety: nodes \(l) and \(m.id) both led term \(term)")
            }
            if leadersByTerm[term] == nil {
                leadersByTerm[term] = m.id
                // Leader completeness (§5.4): a new leader holds every applied entry.
                if r.raft.lastIndex < maxApplied {
                    report.violations.append(
                        "leader completeness: leader \(m.id) of term \(term) ends at \(r.raft.lastIndex), "
                            + "entry \(maxApplied) was already applied")
                }
                var i = max(r.raft.firstIndex, 1)
                while i <= maxApplied {
                    if let t = r.raft.term(at: i), let a = appliedAt[i], a.term != t {
                        report.violations.append(
                            "leader completeness: leader \(m.id) of term \(term) has term \(t) at \(i), applied was \(a.term)"
                        )
                        break
                    }
                    i += 1
                }
                if let at = crashWatch {
                    report.failoverMs.append(now - at)
                    crashWatch = nil
                }
            }
        }
        // State machine safety (§5.4.3) and log matching: one entry per index, everywhere.
        for a in out.appliedEntries {
            if let prev = appliedAt[a.index] {
                if prev.term != a.term || prev.digest != a.digest {
                    report.violations.append(
                        "state machine safety: node \(m.id) applied a different entry at index \(a.index)")
                }
            } else {
                appliedAt[a.index] = (a.term, a.digest)
                maxApplied = max(maxApplied, a.index)
            }
        }
        report.maxCommitIndex = max(report.maxCommitIndex, r.raft.commitIndex)
    }

    // MARK: network

    func delay(_ from: UInt64, _ to: UInt64) -> UInt64 {
        o.minDelayMs + rng.next() % (o.maxDelayMs - o.minDelayMs + 1) + (clogged[link(from, to)] ?? 0)
    }

    func send(_ msg: Message) {
        guard !blocked.contains(link(msg.from, msg.to)) else { return }
        if !healed && rng.chance(o.lossRate) { return }
        let bytes = msg.encoded()
        schedule(delay(msg.from, msg.to), .deliver(bytes, to: msg.to))
        if !healed && rng.chance(o.duplicateRate) { schedule(delay(msg.from, msg.to), .deliver(bytes, to: msg.to)) }
    }

    // MARK: clients

    func nextOp(_ c: Int) {
        guard clients[c].current == nil else { return }
        let key: Bytes
        let input: RegisterOp.Input
        if healed {
            guard var left = clients[c].finalKeysLeft, let k = left.first else { return }
            left.removeFirst()
            clients[c].finalKeysLeft = left
            key = k
            input = .read
        } else {
            key = Array("k\(rng.next() % UInt64(o.keys))".utf8)
            writeValue += 1
            let v = Array("v\(writeValue)".utf8)
            switch rng.next() % 10 {
            case 0..<4: input = .read
            case 4..<7: input = .write(v)
            default:
                // Expect one of the last few values written: some succeed, some fail.
                let back = min(writeValue - 1, 1 + rng.next() % 3)
                input = .cas(expected: Array("v\(writeValue - back)".utf8), new: v)
            }
        }
        clients[c].seq += 1
        let req = ClientRequest(client: c, seq: clients[c].seq, key: key, input: input, isFinal: healed)
        clients[c].current = (req, now)
        // Like etcd clients balancing over endpoints, a quarter of requests go anywhere.
        let spread = rng.chance(0.25)
        let target =
            clients[c].leaderHint != 0 && !spread ? clients[c].leaderHint : ids[Int(rng.next() % UInt64(ids.count))]
        schedule(1 + rng.next() % 3, .request(req, to: target))
        schedule(healed ? o.opTimeoutMs * 3 : o.opTimeoutMs, .clientTimeout(client: c, seq: req.seq))
    }

    func serve(_ req: ClientRequest, at id: NodeID) {
        note("client \(req.client) sends \(req.input) on \(req.key.utf8String) to node \(id)")
        guard let m = members[id], let r = m.replica else {
            return  // the client times out
        }
        trace.add(5)
        trace.add(now)
        trace.add(req.requestID)
        switch req.input {
        case .read:
            let ctx = withUnsafeBytes(of: req.requestID.littleEndian) { Array($0) }
            do {
                try r.read(context: ctx)
                m.pendingReads[ctx] = req
            } catch {
                refuse(req, r)
                return
            }
        case .write(let v):
            do {
                try r.propose(.put(PutRequest(key: req.key, value: v)), requestID: req.requestID)
                m.pendingWrites[req.requestID] = req
            } catch {
                refuse(req, r)
                return
            }
        case .cas(let exp, let new):
            let txn = TxnRequest(
                compare: [Compare(key: req.key, .equal, .value(exp))],
                success: [.put(PutRequest(key: req.key, value: new))])
            do {
                try r.propose(.txn(txn), requestID: req.requestID)
                m.pendingWrites[req.requestID] = req
            } catch {
                refuse(req, r)
                return
            }
        }
        pump(m)
    }

    func refuse(_ req: ClientRequest, _ r: RegistryReplica) {
        let resp = ClientResponse(client: req.client, seq: req.seq, output: nil, leaderHint: r.raft.leader)
        schedule(1 + rng.next() % 3, .response(resp))
    }

    func reply(_ req: ClientRequest, from: NodeID, _ out: RegisterOp.Output) {
        let resp = ClientResponse(client: req.client, seq: req.seq, output: out, leaderHint: from)
        schedule(1 + rng.next() % 3, .response(resp))
    }

    func complete(_ resp: ClientResponse) {
        let c = resp.client
        guard let cur = clients[c].current, cur.req.seq == resp.seq else { return }
        trace.add(6)
        trace.add(now)
        clients[c].current = nil
        if let out = resp.output {
            record(cur.req, cur.call, out, ret: now)
            clients[c].leaderHint = resp.leaderHint
            if cur.req.isFinal { report.finalReads += 1 }
        } else {
            report.opsFailed += 1
            clients[c].leaderHint = resp.leaderHint
            if cur.req.isFinal {
                // Retry the final read of this key.
                clients[c].finalKeysLeft?.insert(cur.req.key, at: 0)
            }
        }
        schedule(healed ? 5 : rng.next() % 10, .clientNext(client: c))
    }

    func record(_ req: ClientRequest, _ call: UInt64, _ out: RegisterOp.Output, ret: UInt64 = .max) {
        note("client \(req.client) \(req.key.utf8String) \(req.input) -> \(out) (called at \(call))")
        if out == .unknown {
            report.opsUnknown += 1
            if case .read = req.input {
                if req.isFinal { clients[req.client].finalKeysLeft?.insert(req.key, at: 0) }
                return  // a read with no answer has no effect on the history
            }
        } else {
            report.opsOK += 1
            if case .read = req.input { report.readsServed += 1 } else { report.writesAcked += 1 }
        }
        report.history.append(
            RegisterOp(client: req.client, key: req.key, input: req.input, output: out, call: call, ret: ret))
    }

    // MARK: faults

    func randomFault() {
        trace.add(7)
        trace.add(now)
        switch rng.next() % 10 {
        case 0..<2:
            let id = ids[Int(rng.next() % UInt64(ids.count))]
            if let m = members[id], m.replica != nil { crash(m, restartAfter: 50 + rng.next() % 600) }
        case 2:
            // Crash inside the write path: at one of the node's next few disk operations
            // (between a WAL append and its fsync, mid-snapshot, mid-segment roll...).
            let id = ids[Int(rng.next() % UInt64(ids.count))]
            if let m = members[id], m.replica != nil {
                m.disk.crashAtOperation = m.disk.operations + 1 + Int(rng.next() % 8)
            }
        case 3..<5:
            // Symmetric partition into two sides.
            var side = Set<NodeID>()
            for id in ids where rng.chance(0.5) { side.insert(id) }
            for a in ids {
                for b in ids where side.contains(a) != side.contains(b) { blocked.insert(link(a, b)) }
            }
            report.partitions += 1
            schedule(100 + rng.next() % 600, .healLinks)
        case 5:
            // One-way partition.
            let a = ids[Int(rng.next() % UInt64(ids.count))]
            let b = ids[Int(rng.next() % UInt64(ids.count))]
            if a != b { blocked.insert(link(a, b)) }
            report.partitions += 1
            schedule(100 + rng.next() % 600, .healLinks)
        case 7, 8:
            // A process pause longer than an election timeout: the classic way a leader
            // that trusts its lease serves stale reads. Half of them hit the leader.
            let leader = ids.first { members[$0]!.replica?.isLeader == true }
            let id = leader.flatMap { rng.chance(0.5) ? $0 : nil } ?? ids[Int(rng.next() % UInt64(ids.count))]
            members[id]!.pausedUntil = now + o.tickMs * UInt64(o.electionTicks) * (1 + rng.next() % 4)
            report.pauses += 1
        case 6:
            // A clogged link: much slower, still delivering.
            let a = ids[Int(rng.next() % UInt64(ids.count))]
            let b = ids[Int(rng.next() % UInt64(ids.count))]
            clogged[link(a, b)] = 20 + rng.next() % 80
            schedule(100 + rng.next() % 600, .healLinks)
        default:
            guard o.membershipChanges, ids.count >= 3,
                let leader = ids.first(where: { members[$0]!.replica?.isLeader == true })
            else { return }
            let others = ids.filter { $0 != leader }
            let other = others[Int(rng.next() % UInt64(others.count))]
            if churn == nil && rng.chance(0.5) {
                churn = (old: other, new: nextMemberID, added: false)
                nextMemberID += 1
                schedule(1, .churnStep)
            } else {
                members[leader]!.replica!.transferLeadership(to: other)
                report.leadershipTransfers += 1
                pump(members[leader]!)
            }
        }
    }

    /// One step of replacing a voter, driven through the current leader, retried until done.
    func churnStep() {
        guard let c = churn else { return }
        defer { if churn != nil { schedule(30, .churnStep) } }
        guard let lid = ids.first(where: { members[$0]!.replica?.isLeader == true }),
            let leader = members[lid]!.replica
        else { return }
        let conf = leader.raft.conf
        if !c.added {
            if conf.members.contains(c.old) {
                if lid == c.old {
                    // Step aside first: a leader removing itself works, but this keeps it simple.
                    let others = ids.filter { $0 != lid && conf.voters.contains($0) }
                    if let t = others.first { leader.transferLeadership(to: t) }
                } else {
                    try? leader.proposeConfChange(ConfChange(.remove, node: c.old))
                }
                pump(members[lid]!)
                return
            }
            // Removed: retire the old member for good and start the new one, empty.
            note("node \(c.old) retired; node \(c.new) starts empty")
            decommissioned.insert(c.old)
            if let m = members[c.old], let r = m.replica {
                report.snapshotsTaken += r.snapshotsTaken
                report.duplicatesSkipped += r.duplicatesSkipped
                m.replica = nil
                m.pendingReads = [:]
                m.pendingWrites = [:]
            }
            ids.removeAll { $0 == c.old }
            addMember(c.new, initialConf: ConfState(voters: conf.voters))
            ids.append(c.new)
            start(c.new)
            churn = (c.old, c.new, true)
            return
        }
        if conf.voters.contains(c.new) {
            report.membersReplaced += 1
            churn = nil
            return
        }
        if conf.learners.contains(c.new) {
            // Promote only a learner that holds the committed log (TandemRaft checks too).
            if (leader.raft.matchIndex(of: c.new) ?? 0) >= leader.raft.commitIndex {
                try? leader.proposeConfChange(ConfChange(.promote, node: c.new))
            }
        } else {
            try? leader.proposeConfChange(ConfChange(.addLearner, node: c.new))
        }
        pump(members[lid]!)
    }

    func scripted(_ f: RegistrySimulation.ScriptedFault) {
        guard let leader = ids.first(where: { members[$0]!.replica?.isLeader == true }) else { return }
        switch f {
        case .crashLeader(_, let down):
            crashWatch = now
            crash(members[leader]!, restartAfter: down)
        case .isolateLeader(_, let forMs):
            for b in ids where b != leader {
                blocked.insert(link(leader, b))
                blocked.insert(link(b, leader))
            }
            report.partitions += 1
            schedule(forMs, .healLinks)
        }
    }
}
