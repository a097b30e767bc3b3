import TandemCore
import TandemRaft
import TandemReplica
import TandemStore
import TandemTraffic

/// The registry inside a mesh run: real `RegistryReplica`s (TandemRaft + TandemStore +
/// TandemStorage on a `SimDisk`) on the mesh's clock and network. Each instance's sidecar
/// registers through it (a lease, a key under `/tandem/services/<service>/`, keep-alives at a
/// third of the TTL, a revoke on a clean stop) and watches the prefix through one member,
/// reconnecting elsewhere when that member dies or is cut off; its endpoints are what its
/// watch has seen. Checkers: watch order (revisions strictly increasing, no revision of the
/// prefix skipped on a live stream), lease safety (no lease expires while it is being kept
/// alive), and lease liveness (a lease nobody keeps alive is revoked).
final class MeshRegistry {
    let spec: RegistrySpec
    var members: [NodeID: RegMember] = [:]
    var ids: [NodeID]
    var agents: [RegAgent]
    var watchers: [RegWatcher]
    /// Revisions that changed something under the services prefix, in order.
    var prefixRevisions: [Int64] = []
    var nextRequest: UInt64 = 0
    /// Clients' proposals waiting for their entry to apply, by request id, and their
    /// linearizable reads waiting for the read index, by read context.
    var waiting: [UInt64: RegWaiter] = [:]
    var waitingReads: [Bytes: RegWaiter] = [:]
    /// Per lease: its TTL, when it was last renewed (or granted), and whether its owner revoked it.
    var leases: [Int64: (ttl: Int64, lastRenew: Nanos, revokedByOwner: Bool, storm: Bool)] = [:]
    var stormKeysLeft = 0
    var stormExpiresAt: Nanos?
    var checkedRevision: Int64 = 0
    // Lock clients (MeshLocks.swift).
    var lockClients: [LockClient] = []
    var lockHolders: [String: (client: Int, token: Int64)] = [:]
    var lockWatches: [(client: Int, call: Int, member: NodeID, key: Bytes)] = []
    // Application clients (MeshKV.swift).
    var kvClients: [KVClient] = []
    var kvHistory: [RegisterOp] = []
    var kvWrites = 0
    /// Events under the services prefix per revision, for the watch atomicity check.
    var prefixEventCounts: [Int64: Int] = [:]
    var leaderless: Nanos = 0
    var lastTickAt: Nanos = 0

    static let servicesPrefix = Array("/tandem/services/".utf8)

    init(spec: RegistrySpec, instances: Int, rng: inout SeededRandom) {
        self.spec = spec
        ids = (1...UInt64(spec.nodes)).map { $0 }
        agents = Array(repeating: RegAgent(), count: instances)
        watchers = (0..<instances).map { RegWatcher(member: UInt64($0 % spec.nodes) + 1) }
        for id in ids {
            let m = RegMember(id: id, disk: SimDisk(random: rng.fork()))
            if spec.clockSkew > 0 {
                m.clockRate = 1 + (Double(rng.next() % 2001) / 1000 - 1) * spec.clockSkew
            }
            members[id] = m
        }
    }
}

public struct RegistrySpec: Equatable, Sendable {
    public var nodes = 3
    public var tickMs: Int64 = 100
    public var electionTicks = 10
    /// Each member's clock runs at 1 ± up to this rate (ticks and lease clocks alike).
    public var clockSkew = 0.0
    /// A client gives up on a member after this and tries the next.
    public var requestTimeoutMs: Int64 = 1_000
    /// A broken watch reconnects after this.
    public var reconnectMs: Int64 = 1_000
    /// Deliberate defects, for showing that the checkers catch them (never set by scenario
    /// files): watch batches that may overtake each other on one stream, and members that
    /// acknowledge keep-alives they cannot renew (only the leader's lessor can).
    public var defectUnorderedWatchStreams = false
    public var defectFollowersAckKeepAlives = false
    /// Lock clients that take the lock as soon as their key is written, without waiting for
    /// their turn.
    public var defectLockWithoutWaiting = false
    /// Members that answer application reads from their own store, leader or not, without a
    /// ReadIndex round (what a "serializable" read is — asked for as linearizable).
    public var defectLocalReads = false
    public init() {}
}

final class RegMember {
    let id: NodeID
    let disk: SimDisk
    var replica: RegistryReplica?
    /// How fast this member's clock runs against the simulation's.
    var clockRate = 1.0
    var name: String { "registry-\(id)" }
    init(id: NodeID, disk: SimDisk) {
        self.id = id
        self.disk = disk
    }
}

/// An instance's registration client (the sidecar's `ServiceRegistration`).
struct RegAgent {
    enum Step: Equatable { case register, keepAlive, revoke }
    var generation = -1
    var lease: Int64 = 0
    var leaseSerial: Int64 = 0
    var member: NodeID = 1
    var registered = false
    /// The current call: its number, so a late answer to an abandoned one is ignored.
    var call = 0
    var busy = false
}

/// A sidecar's watch on the services prefix, through one member.
struct RegWatcher {
    var member: NodeID
    var connected = true
    var lastRevision: Int64 = 0
    /// Instances per service as this watch has seen them.
    var view: [String: Set<String>] = [:]
    /// After a reconnect the next delivery may skip revisions the re-list covered.
    var relisted = true
    var reconnectScheduled = false
    /// Which connection this is: deliveries for an earlier one are dropped.
    var epoch = 0
    /// A stream is ordered (TCP): a batch never arrives before the one sent ahead of it.
    var lastArrival: Nanos = 0
    init(member: NodeID) { self.member = member }
}

/// Who waits for a proposal to apply or a read to be ready: a registration agent, a lock
/// client or an application client, at one of its calls.
enum RegWaiter {
    case agent(inst: Int, generation: Int, call: Int, step: RegAgent.Step)
    case lock(client: Int, call: Int)
    case kv(client: Int, call: Int)
}

enum RegEvent {
    case tick(NodeID)
    case deliver(Bytes, to: NodeID)
    case restart(NodeID)
    case agentCall(inst: Int, generation: Int, call: Int, step: RegAgent.Step, to: NodeID)
    case agentAnswer(inst: Int, generation: Int, call: Int, step: RegAgent.Step, ok: Bool, hint: NodeID)
    case agentTimeout(inst: Int, generation: Int, call: Int, step: RegAgent.Step)
    case agentRetry(inst: Int, generation: Int, step: RegAgent.Step)
    case keepAliveDue(inst: Int, generation: Int)
    case watchDeliver(sidecar: Int, epoch: Int, revision: Int64, events: [Event])
    case watchReconnect(sidecar: Int)
    case storm(count: Int, ttl: Int64)
    case healRegistry
    case lockNext(client: Int)
    case lockArrive(client: Int, call: Int, member: NodeID)
    case lockReply(client: Int, call: Int, LockReply)
    case lockRetry(client: Int, call: Int)
    case lockRelease(client: Int)
    case lockKeepAlive(client: Int, lease: Int64)
    case kvNext(client: Int)
    case kvArrive(client: Int, call: Int, member: NodeID)
    case kvReply(client: Int, call: Int, KVReply, from: NodeID)
    case kvTimeout(client: Int, call: Int)
}

extension MeshWorld {
    // MARK: members

    func startRegistry() {
        guard let reg = registry else { return }
        for id in reg.ids { startMember(id) }
        for i in instances.indices { agentStart(i) }
        startLocks()
        startKV()
    }

    func startMember(_ id: NodeID) {
        guard let reg = registry, let m = reg.members[id] else { return }
        var opts = RegistryReplica.Options(id: id)
        opts.raft.electionTicks = reg.spec.electionTicks
        opts.raft.heartbeatTicks = 1
        opts.tickMs = reg.spec.tickMs
        opts.snapshotEvery = 2_000
        opts.catchUpEntries = 500
        do {
            m.replica = try RegistryReplica(
                options: opts, initialConf: ConfState(voters: Set(reg.ids)), fs: m.disk, random: rng.fork())
            pumpMember(m)
        } catch {
            report.violations.append("registry: member \(id) could not start: \(error)")
        }
        schedule(tickInterval(m), .registry(.tick(id)))
    }

    func crashMember(_ id: NodeID, downMs: Int64) {
        guard let reg = registry, let m = reg.members[id], m.replica != nil else { return }
        traceLine("\(m.name): crashed")
        report.registryCrashes += 1
        m.replica = nil
        m.disk.crash()
        for w in reg.watchers.indices where reg.watchers[w].member == id { breakWatch(w) }
        lockWatchesBroken(on: id)
        schedule(.milliseconds(downMs), .registry(.restart(id)))
    }

    /// The member's own clock, in milliseconds (skewed by its rate).
    func clockMs(_ m: RegMember) -> Int64 { Int64((Double(now) * m.clockRate / 1e6).rounded(.down)) }

    /// Real time between two of the member's ticks.
    func tickInterval(_ m: RegMember) -> Nanos {
        guard let reg = registry else { return .milliseconds(100) }
        return Nanos((Double(Nanos.milliseconds(reg.spec.tickMs)) / m.clockRate).rounded())
    }

    func leaderID() -> NodeID? {
        registry?.ids.first { registry?.members[$0]?.replica?.isLeader == true }
    }

    func handleRegistry(_ e: RegEvent) {
        guard let reg = registry else { return }
        switch e {
        case .tick(let id):
            guard let m = reg.members[id], let r = m.replica else { return }
            note(30, Int(id))
            r.tick(now: clockMs(m))
            pumpMember(m)
            schedule(tickInterval(m), .registry(.tick(id)))
            if r.raft.leader == 0 {
                // etcd's require-leader watches: a member that has lost its leader ends them,
                // and the clients reconnect to a member that has one.
                for w in reg.watchers.indices where reg.watchers[w].member == id && reg.watchers[w].connected {
                    breakWatch(w)
                }
                lockWatchesBroken(on: id)
            }
            if id == reg.ids.first(where: { reg.members[$0]?.replica != nil }) {
                if leaderID() == nil { reg.leaderless += now - reg.lastTickAt }
                reg.lastTickAt = now
            }
        case .deliver(let bytes, let to):
            guard let m = reg.members[to], let r = m.replica, let msg = try? Message(decoding: bytes) else { return }
            note(31, Int(to), Int(msg.kind.rawValue))
            r.step(msg)
            pumpMember(m)
        case .restart(let id):
            guard reg.members[id]?.replica == nil else { return }
            traceLine("registry-\(id): restarted")
            startMember(id)
        case .agentCall(let i, let gen, let call, let step, let to):
            note(32, i, call)
            agentCallArrives(i, gen, call, step, to)
        case .agentAnswer(let i, let gen, let call, let step, let ok, let hint):
            note(33, i, call, ok ? 1 : 0)
            agentAnswer(i, gen, call, step, ok: ok, hint: hint)
        case .agentTimeout(let i, let gen, let call, let step):
            guard reg.agents[i].generation == gen, reg.agents[i].call == call, reg.agents[i].busy else { return }
            note(34, i, call)
            report.registryCallsFailed += 1
            reg.agents[i].busy = false
            reg.agents[i].member = nextMember(after: reg.agents[i].member)
            agentSend(i, step)
        case .agentRetry(let i, let gen, let step):
            guard reg.agents[i].generation == gen, !reg.agents[i].busy, instances[i].state != .down else { return }
            note(37, i)
            agentSend(i, step)
        case .keepAliveDue(let i, let gen):
            guard reg.agents[i].generation == gen, reg.agents[i].registered, !reg.agents[i].busy else {
                if reg.agents[i].generation == gen, reg.agents[i].registered {
                    schedule(keepAliveInterval(i), .registry(.keepAliveDue(inst: i, generation: gen)))
                }
                return
            }
            agentSend(i, .keepAlive)
            schedule(keepAliveInterval(i), .registry(.keepAliveDue(inst: i, generation: gen)))
        case .watchDeliver(let s, let epoch, let revision, let events):
            note(35, s, Int(revision))
            watchDeliver(s, epoch, revision, events)
        case .watchReconnect(let s):
            reg.watchers[s].reconnectScheduled = false
            note(36, s)
            reconnectWatch(s)
        case .storm(let count, let ttl):
            leaseStorm(count: count, ttl: ttl)
        case .healRegistry:
            registryBlocked = []
        case .lockNext(let c):
            note(40, c)
            lockNext(c)
        case .lockArrive(let c, let call, let member):
            note(41, c, call)
            lockArrive(c, call, member)
        case .lockReply(let c, let call, let reply):
            note(42, c, call)
            lockReply(c, call, reply)
        case .lockRetry(let c, let call):
            note(43, c, call)
            lockRetry(c, call)
        case .lockRelease(let c):
            note(44, c)
            lockRelease(c)
        case .lockKeepAlive(let c, let lease):
            note(45, c)
            lockKeepAlive(c, lease)
        case .kvNext(let c):
            note(50, c)
            kvNext(c)
        case .kvArrive(let c, let call, let member):
            note(51, c, call)
            kvArrive(c, call, member)
        case .kvReply(let c, let call, let reply, let from):
            note(52, c, call)
            kvReply(c, call, reply, from: from)
        case .kvTimeout(let c, let call):
            note(53, c, call)
            kvTimeout(c, call)
        }
    }

    func nextMember(after id: NodeID) -> NodeID {
        guard let reg = registry, let i = reg.ids.firstIndex(of: id) else { return registry?.ids.first ?? 1 }
        return reg.ids[(i + 1) % reg.ids.count]
    }

    /// Runs the member's Ready loop and carries out its output.
    func pumpMember(_ m: RegMember) {
        guard let reg = registry, let r = m.replica else { return }
        let out: RegistryReplica.Output
        do {
            out = try r.process(now: clockMs(m))
        } catch {
            crashMember(m.id, downMs: 200)
            return
        }
        for msg in out.messages {
            guard !registryBlocked.contains(RegLink(a: msg.from, b: msg.to)),
                let d = delay(from: m.name, "registry", to: "registry-\(msg.to)", "registry")
            else { continue }
            let bytes = msg.encoded()
            schedule(d, .registry(.deliver(bytes, to: msg.to)))
            if scenario.network.duplicate > 0, uniform() < scenario.network.duplicate,
                let again = delay(from: m.name, "registry", to: "registry-\(msg.to)", "registry")
            {
                schedule(again, .registry(.deliver(bytes, to: msg.to)))
            }
        }
        for (reqID, result) in out.applied {
            guard let w = reg.waiting.removeValue(forKey: reqID) else { continue }
            switch w {
            case .agent(let i, let gen, let call, let step):
                var ok = true
                if case .failed = result { ok = false }
                reply(i, gen, call, step, ok: ok, hint: m.id, from: m)
            case .lock(let c, let call): lockApplied(c, call, result, from: m)
            case .kv(let c, let call): kvApplied(c, call, result, from: m)
            }
        }
        for ctx in out.readsReady {
            guard let w = reg.waitingReads.removeValue(forKey: ctx) else { continue }
            switch w {
            case .agent: break
            case .lock(let c, let call): lockRead(c, call, store: r.store, from: m)
            case .kv(let c, let call): kvRead(c, call, store: r.store, from: m)
            }
        }
        lockWatchEvents(m, out)
        for (revision, events) in out.events {
            if revision > reg.checkedRevision {
                // Every member applies the same revisions; the first to apply one checks it.
                reg.checkedRevision = revision
                checkLeases(events, store: r.store)
            }
            let mine = events.filter { $0.kv.key.starts(with: MeshRegistry.servicesPrefix) }
            guard !mine.isEmpty else { continue }
            if revision > (reg.prefixRevisions.last ?? 0) {
                reg.prefixRevisions.append(revision)
                reg.prefixEventCounts[revision] = mine.count
            }
            for w in reg.watchers.indices where reg.watchers[w].member == m.id && reg.watchers[w].connected {
                let sidecarInst = w
                guard instances[sidecarInst].state != .down else { continue }
                guard let d = delay(from: m.name, "registry", to: instances[sidecarInst].id, serviceName(sidecarInst))
                else {
                    breakWatch(w)
                    continue
                }
                var arrival = now + d + .milliseconds(scenario.network.watchDelayMs)
                if !reg.spec.defectUnorderedWatchStreams { arrival = max(arrival, reg.watchers[w].lastArrival) }
                reg.watchers[w].lastArrival = arrival
                schedule(
                    arrival - now,
                    .registry(.watchDeliver(sidecar: w, epoch: reg.watchers[w].epoch, revision: revision, events: mine))
                )
            }
        }
    }

    /// The context of a linearizable read: its request id's bytes.
    func readContext(_ id: UInt64) -> Bytes { withUnsafeBytes(of: id.littleEndian) { Array($0) } }

    func serviceName(_ inst: Int) -> String { scenario.services[instances[inst].service].name }

    // MARK: registration agents

    func keepAliveInterval(_ i: Int) -> Nanos {
        max(.milliseconds(500), .seconds(scenario.services[instances[i].service].sidecar.leaseTTL) / 3)
    }

    /// The instance started: grant a lease and put its key.
    func agentStart(_ i: Int) {
        guard let reg = registry else { return }
        reg.agents[i].generation = instances[i].generation
        reg.agents[i].registered = false
        reg.agents[i].busy = false
        agentSend(i, .register)
    }

    func agentSend(_ i: Int, _ step: RegAgent.Step) {
        // A dead process sends nothing: its keep-alives stop, and its lease runs out.
        guard let reg = registry, instances[i].state != .down else { return }
        var a = reg.agents[i]
        a.call += 1
        a.busy = true
        if step == .register {
            a.leaseSerial += 1
            a.lease = Int64(i + 1) << 24 | a.leaseSerial
        }
        reg.agents[i] = a
        report.registryCalls += 1
        let to = a.member
        if let d = delay(from: instances[i].id, serviceName(i), to: "registry-\(to)", "registry") {
            schedule(d, .registry(.agentCall(inst: i, generation: a.generation, call: a.call, step: step, to: to)))
        }
        schedule(
            .milliseconds(reg.spec.requestTimeoutMs),
            .registry(.agentTimeout(inst: i, generation: a.generation, call: a.call, step: step)))
    }

    func agentCallArrives(_ i: Int, _ gen: Int, _ call: Int, _ step: RegAgent.Step, _ to: NodeID) {
        guard let reg = registry, let m = reg.members[to], let r = m.replica else { return }  // times out
        let a = reg.agents[i]
        if step == .keepAlive, !r.isLeader, reg.spec.defectFollowersAckKeepAlives {
            reg.leases[a.lease]?.lastRenew = now
            return reply(i, gen, call, step, ok: true, hint: m.id, from: m)
        }
        guard r.isLeader else {
            return reply(i, gen, call, step, ok: false, hint: r.raft.leader, from: m)
        }
        let key = Array("/tandem/services/\(serviceName(i))/\(instances[i].id)".utf8)
        switch step {
        case .register:
            let ttl = scenario.services[instances[i].service].sidecar.leaseTTL
            reg.nextRequest += 2
            let grant = reg.nextRequest - 1
            let put = reg.nextRequest
            do {
                try r.propose(.leaseGrant(id: a.lease, ttl: ttl), requestID: grant)
                try r.propose(
                    .put(PutRequest(key: key, value: Array("\(instances[i].id):8080".utf8), lease: a.lease)),
                    requestID: put)
            } catch {
                return reply(i, gen, call, step, ok: false, hint: 0, from: m)
            }
            reg.leases[a.lease] = (ttl, now, false, false)
            reg.waiting[put] = .agent(inst: i, generation: gen, call: call, step: step)
            pumpMember(m)
        case .keepAlive:
            if r.renewLease(a.lease, now: clockMs(m)) != nil {
                reg.leases[a.lease]?.lastRenew = now
                reply(i, gen, call, step, ok: true, hint: m.id, from: m)
            } else {
                // The leader does not know the lease any more: it expired. Register again.
                reply(i, gen, call, .register, ok: false, hint: m.id, from: m)
            }
        case .revoke:
            reg.nextRequest += 1
            reg.leases[a.lease]?.revokedByOwner = true
            do {
                try r.propose(.leaseRevoke(id: a.lease), requestID: reg.nextRequest)
            } catch {
                return reply(i, gen, call, step, ok: false, hint: 0, from: m)
            }
            reg.waiting[reg.nextRequest] = .agent(inst: i, generation: gen, call: call, step: step)
            pumpMember(m)
        }
    }

    func reply(_ i: Int, _ gen: Int, _ call: Int, _ step: RegAgent.Step, ok: Bool, hint: NodeID, from m: RegMember) {
        guard instances[i].state != .down,
            let d = delay(from: m.name, "registry", to: instances[i].id, serviceName(i))
        else { return }
        schedule(d, .registry(.agentAnswer(inst: i, generation: gen, call: call, step: step, ok: ok, hint: hint)))
    }

    func agentAnswer(_ i: Int, _ gen: Int, _ call: Int, _ step: RegAgent.Step, ok: Bool, hint: NodeID) {
        guard let reg = registry, reg.agents[i].generation == gen, reg.agents[i].call == call, reg.agents[i].busy
        else { return }
        reg.agents[i].busy = false
        if ok {
            switch step {
            case .register:
                if !reg.agents[i].registered {
                    reg.agents[i].registered = true
                    traceLine("\(instances[i].id): registered (lease \(reg.agents[i].lease))")
                    schedule(keepAliveInterval(i), .registry(.keepAliveDue(inst: i, generation: gen)))
                }
            case .keepAlive, .revoke: break
            }
            return
        }
        report.registryCallsFailed += 1
        if step == .register, reg.agents[i].registered {
            // A keep-alive found the lease gone: register again under a new lease.
            reg.agents[i].registered = false
            report.reRegistrations += 1
        }
        if hint != 0 && hint != reg.agents[i].member {
            reg.agents[i].member = hint
        } else if hint == 0 || reg.members[hint]?.replica?.isLeader != true {
            reg.agents[i].member = nextMember(after: reg.agents[i].member)
        }
        schedule(.milliseconds(100), .registry(.agentRetry(inst: i, generation: gen, step: step)))
    }

    /// The instance stops cleanly: revoke its lease (its key goes with it).
    func agentStop(_ i: Int) {
        guard let reg = registry, reg.agents[i].generation == instances[i].generation else { return }
        reg.agents[i].registered = false
        agentSend(i, .revoke)
    }

    // MARK: watches

    func breakWatch(_ w: Int) {
        guard let reg = registry, reg.watchers[w].connected else { return }
        reg.watchers[w].connected = false
        reg.watchers[w].epoch += 1
        report.watchReconnects += 1
        if !reg.watchers[w].reconnectScheduled {
            reg.watchers[w].reconnectScheduled = true
            schedule(.milliseconds(reg.spec.reconnectMs), .registry(.watchReconnect(sidecar: w)))
        }
    }

    /// Reconnects to the next live, reachable member that has caught up with what this watch
    /// has seen, and re-lists the prefix there.
    func reconnectWatch(_ w: Int) {
        guard let reg = registry, !reg.watchers[w].connected, instances[w].state != .down else { return }
        var candidate = reg.watchers[w].member
        for _ in reg.ids {
            candidate = nextMember(after: candidate)
            guard let m = reg.members[candidate], let r = m.replica, r.raft.leader != 0,
                r.store.revision >= reg.watchers[w].lastRevision,
                delay(from: instances[w].id, serviceName(w), to: m.name, "registry") != nil
            else { continue }
            var view: [String: Set<String>] = [:]
            if let kvs = try? r.store.range(.prefix(MeshRegistry.servicesPrefix)).kvs {
                for kv in kvs { add(kv.key, to: &view) }
            }
            reg.watchers[w].member = candidate
            reg.watchers[w].connected = true
            reg.watchers[w].view = view
            reg.watchers[w].lastRevision = r.store.revision
            reg.watchers[w].relisted = true
            refreshEndpoints(w)
            return
        }
        reg.watchers[w].reconnectScheduled = true
        schedule(.milliseconds(reg.spec.reconnectMs), .registry(.watchReconnect(sidecar: w)))
    }

    func add(_ key: Bytes, to view: inout [String: Set<String>]) {
        let parts = key.utf8String.split(separator: "/")
        guard parts.count == 4 else { return }
        view[String(parts[2]), default: []].insert(String(parts[3]))
    }

    func watchDeliver(_ w: Int, _ epoch: Int, _ revision: Int64, _ events: [Event]) {
        guard let reg = registry, reg.watchers[w].epoch == epoch, reg.watchers[w].connected,
            instances[w].state != .down
        else { return }
        let last = reg.watchers[w].lastRevision
        if revision <= last {
            if !reg.watchers[w].relisted || revision < last {
                report.violations.append(
                    "watch order: \(instances[w].id)'s watch got revision \(revision) after \(last)")
            }
            return
        }
        if !reg.watchers[w].relisted {
            // Every revision that touched the prefix between the last one seen and this one.
            let skipped = reg.prefixRevisions.filter { $0 > last && $0 < revision }
            if !skipped.isEmpty {
                report.violations.append(
                    "watch gap: \(instances[w].id)'s watch skipped revisions \(skipped.prefix(3)) on a live stream")
            }
        }
        if let n = reg.prefixEventCounts[revision], n != events.count {
            report.violations.append(
                "watch atomicity: \(instances[w].id)'s watch got \(events.count) of the \(n) events of revision \(revision)"
            )
        }
        reg.watchers[w].relisted = false
        reg.watchers[w].lastRevision = revision
        report.watchEvents += events.count
        for e in events {
            let parts = e.kv.key.utf8String.split(separator: "/")
            guard parts.count == 4 else { continue }
            if e.kind == .put {
                reg.watchers[w].view[String(parts[2]), default: []].insert(String(parts[3]))
            } else {
                reg.watchers[w].view[String(parts[2])]?.remove(String(parts[3]))
            }
        }
        refreshEndpoints(w)
    }

    /// The sidecar's clusters take what its watch now says.
    func refreshEndpoints(_ w: Int) {
        let sc = sidecars[w]
        for name in sc.clusters.keys.sorted() {
            let eps = endpoints(of: name, for: sc)
            withCluster(sc, name) { c in c.setEndpoints(eps) }
        }
    }

    func registryEndpoints(_ service: String, sidecar w: Int) -> [Endpoint]? {
        guard let reg = registry else { return nil }
        let ids = reg.watchers[w].view[service] ?? []
        return ids.sorted().map { Endpoint(id: $0, host: $0, port: 8080) }
    }

    // MARK: leases

    /// Lease safety: a key deleted by its lease's expiry must not have been kept alive within
    /// its TTL. Liveness for the storm: its keys must go.
    func checkLeases(_ events: [Event], store: MVCCStore) {
        guard let reg = registry else { return }
        for e in events where e.kind == .delete {
            let lease = e.prevKV?.lease ?? e.kv.lease
            // A key deleted while its lease lives was deleted explicitly (an unlock).
            guard lease != 0, let l = reg.leases[lease], store.lease(lease) == nil else { continue }
            if l.storm {
                reg.stormKeysLeft -= 1
                reg.leases[lease] = nil
            }
            if !l.revokedByOwner, now - l.lastRenew < .seconds(l.ttl) {
                report.violations.append(
                    "lease safety: lease \(lease) expired \((now - l.lastRenew) / 1_000_000) ms after its last keep-alive (TTL \(l.ttl) s)"
                )
            }
            if !l.storm {
                reg.leases[lease] = nil
                if !l.revokedByOwner {
                    report.leaseExpiries += 1
                    traceLine("registry: lease of \(e.kv.key.utf8String) expired; key deleted")
                }
            }
        }
    }

    /// 10,000 clients that register and vanish: leases granted at once, never kept alive.
    func leaseStorm(count: Int, ttl: Int64) {
        guard let reg = registry else { return }
        guard let id = leaderID(), let m = reg.members[id], let r = m.replica else {
            schedule(.milliseconds(200), .registry(.storm(count: count, ttl: ttl)))
            return
        }
        traceLine("lease storm: \(count) leases of \(ttl) s granted through \(m.name)")
        for k in 0..<count {
            let lease = Int64(1) << 40 | Int64(k + 1)
            reg.nextRequest += 1
            try? r.propose(.leaseGrant(id: lease, ttl: ttl), requestID: 0)
            try? r.propose(.put(PutRequest(key: Array("/storm/\(k)".utf8), value: [1], lease: lease)), requestID: 0)
            reg.leases[lease] = (ttl, now, false, true)
        }
        reg.stormKeysLeft += count
        reg.stormExpiresAt = now + .seconds(ttl)
        report.stormLeases += count
        pumpMember(m)
    }

    func finishRegistry() {
        guard let reg = registry else { return }
        report.registryNodes = reg.ids.count
        finishKV()
        report.registryLeaderlessMs = reg.leaderless / 1_000_000
        if let at = reg.stormExpiresAt,
            now > at + .seconds(10 + 2 * Int64(reg.spec.electionTicks) * reg.spec.tickMs / 1000),
            reg.stormKeysLeft > 0
        {
            report.violations.append(
                "lease liveness: \(reg.stormKeysLeft) storm keys still present \((now - at) / 1_000_000_000) s after their leases' TTL"
            )
        }
        report.stormKeysLeft = reg.stormKeysLeft
    }
}

struct RegLink: Hashable {
    var a: NodeID
    var b: NodeID
}
