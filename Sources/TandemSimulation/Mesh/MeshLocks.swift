import TandemCore
import TandemRaft
import TandemReplica
import TandemStore
import TandemTraffic

/// Clients contending for a distributed lock through the mesh's registry, each running the
/// real `LockRecipe` (etcd's `concurrency.Mutex`: a key under the lock prefix with the
/// session lease, ownership by lowest create revision, each waiter watching its
/// predecessor). Checked: mutual exclusion — two clients never hold a lock at once while the
/// older holder's key still exists — and, when a holder's session expired under it, that the
/// next holder's fencing token (its key's create revision) is larger.
public struct LockWorkload: Equatable, Sendable {
    public var name: String
    public var clients = 3
    public var holdMs: Int64 = 100
    public var thinkMs: Int64 = 50
    public var ttlS: Int64 = 5
    public var startMs: Int64 = 0
    public init(name: String) { self.name = name }
}

final class LockClient {
    let workload: Int
    let name: String
    var lease: Int64 = 0
    var leaseSerial: Int64 = 0
    var recipe: LockRecipe?
    var call = 0
    /// What the outstanding call asks for (re-sent on a timeout).
    var op: LockOp?
    var token: Int64 = 0
    var holding = false
    init(workload: Int, name: String) {
        self.workload = workload
        self.name = name
    }
}

enum LockOp {
    case grant(Int64, ttl: Int64)
    case txn(TxnRequest)
    case read(RangeRequest)
    case waitForDelete(key: Bytes, revision: Int64)
    case unlock(DeleteRangeRequest)
}

enum LockReply {
    case granted
    case txn(TxnResponse)
    case range(RangeResponse)
    case deleted
    case unlocked
    case failed
}

extension MeshWorld {
    func startLocks() {
        guard let reg = registry else { return }
        for (w, l) in scenario.locks.enumerated() {
            for k in 1...l.clients {
                reg.lockClients.append(LockClient(workload: w, name: "lock-\(l.name)-\(k)"))
                schedule(.milliseconds(l.startMs), .registry(.lockNext(client: reg.lockClients.count - 1)))
            }
        }
    }

    func lockNext(_ c: Int) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        let l = scenario.locks[client.workload]
        if client.lease == 0 {
            client.leaseSerial += 1
            client.lease = Int64(2) << 40 | Int64(c + 1) << 20 | client.leaseSerial
            return lockSend(c, .grant(client.lease, ttl: l.ttlS))
        }
        var recipe = LockRecipe(prefix: "/locks/\(l.name)", lease: client.lease)
        let step = recipe.start()
        client.recipe = recipe
        lockStep(c, step)
    }

    func lockStep(_ c: Int, _ step: LockRecipe.Step) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        let l = scenario.locks[client.workload]
        switch step {
        case .send(let txn): lockSend(c, .txn(txn))
        case .range(let q): lockSend(c, .read(q))
        case .waitForDelete(let key, let revision): lockSend(c, .waitForDelete(key: key, revision: revision))
        case .acquired(let token):
            report.lockAcquisitions += 1
            if let h = reg.lockHolders[l.name], h.client != c {
                let olderKeyAlive = leaderStoreHas(reg.lockClients[h.client].recipe?.myKey)
                if olderKeyAlive {
                    report.violations.append(
                        "lock mutual exclusion: \(client.name) acquired \"\(l.name)\" (token \(token)) while \(reg.lockClients[h.client].name) holds it (token \(h.token))"
                    )
                } else if token <= h.token {
                    report.violations.append(
                        "lock fencing: \(client.name)'s token \(token) is not above the expired holder's \(h.token)")
                } else {
                    report.lockStaleHolders += 1
                }
            }
            reg.lockHolders[l.name] = (c, token)
            client.token = token
            client.holding = true
            schedule(.milliseconds(l.holdMs), .registry(.lockRelease(client: c)))
        case .lost:
            report.lockLost += 1
            client.lease = 0
            client.recipe = nil
            schedule(.milliseconds(l.thinkMs), .registry(.lockNext(client: c)))
        }
    }

    func lockRelease(_ c: Int) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        let l = scenario.locks[client.workload]
        guard client.holding, let recipe = client.recipe else { return }
        client.holding = false
        if reg.lockHolders[l.name]?.client == c { reg.lockHolders[l.name] = nil }
        lockSend(c, .unlock(recipe.unlock()))
    }

    func leaderStoreHas(_ key: Bytes?) -> Bool {
        guard let key, let id = leaderID(), let r = registry?.members[id]?.replica else { return true }
        return (try? r.store.range(RangeRequest(key: key)))?.kvs.isEmpty == false
    }

    func lockSend(_ c: Int, _ op: LockOp) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        client.call += 1
        client.op = op
        guard let to = leaderID(), let d = delay(from: client.name, "locks", to: "registry-\(to)", "registry") else {
            schedule(.milliseconds(200), .registry(.lockRetry(client: c, call: client.call)))
            return
        }
        schedule(d, .registry(.lockArrive(client: c, call: client.call, member: to)))
        if case .waitForDelete = op { return }  // a watch waits as long as it takes
        schedule(.milliseconds(reg.spec.requestTimeoutMs), .registry(.lockRetry(client: c, call: client.call)))
    }

    func lockArrive(_ c: Int, _ call: Int, _ member: NodeID) {
        guard let reg = registry, let m = reg.members[member], let r = m.replica else { return }
        let client = reg.lockClients[c]
        guard client.call == call, let op = client.op else { return }
        guard r.isLeader else { return lockAnswer(c, call, .failed, from: m) }
        reg.nextRequest += 1
        let id = reg.nextRequest
        switch op {
        case .grant(let lease, let ttl):
            guard (try? r.propose(.leaseGrant(id: lease, ttl: ttl), requestID: id)) != nil else {
                return lockAnswer(c, call, .failed, from: m)
            }
            reg.leases[lease] = (ttl, now, false, false)
            reg.waiting[id] = .lock(client: c, call: call)
        case .txn(let txn):
            guard (try? r.propose(.txn(txn), requestID: id)) != nil else {
                return lockAnswer(c, call, .failed, from: m)
            }
            reg.waiting[id] = .lock(client: c, call: call)
        case .unlock(let del):
            guard (try? r.propose(.deleteRange(del), requestID: id)) != nil else {
                return lockAnswer(c, call, .failed, from: m)
            }
            reg.waiting[id] = .lock(client: c, call: call)
        case .read:
            let ctx = readContext(id)
            guard (try? r.read(context: ctx)) != nil else { return lockAnswer(c, call, .failed, from: m) }
            reg.waitingReads[ctx] = .lock(client: c, call: call)
        case .waitForDelete(let key, let revision):
            // Already gone (at or after the revision asked for): answer now.
            let gone = (try? r.store.range(RangeRequest(key: key)))?.kvs.isEmpty ?? false
            if gone && r.store.revision >= revision - 1 { return lockAnswer(c, call, .deleted, from: m) }
            reg.lockWatches.append((c, call, member, key))
        }
        pumpMember(m)
    }

    /// A proposal of lock client `c` applied (called by `pumpMember`).
    func lockApplied(_ c: Int, _ call: Int, _ result: StoreResult, from m: RegMember) {
        switch result {
        case .txn(let t): lockAnswer(c, call, .txn(t), from: m)
        case .leaseGrant: lockAnswer(c, call, .granted, from: m)
        case .deleteRange: lockAnswer(c, call, .unlocked, from: m)
        default: lockAnswer(c, call, .failed, from: m)
        }
    }

    /// A linearizable read of lock client `c` is ready on `m` (called by `pumpMember`).
    func lockRead(_ c: Int, _ call: Int, store: MVCCStore, from m: RegMember) {
        guard let q = lockReadQuery(c), let resp = try? store.range(q) else {
            return lockAnswer(c, call, .failed, from: m)
        }
        lockAnswer(c, call, .range(resp), from: m)
    }

    /// Deletions the member applied that end lock clients' waits for their predecessor.
    func lockWatchEvents(_ m: RegMember, _ out: RegistryReplica.Output) {
        guard let reg = registry else { return }
        guard !reg.lockWatches.isEmpty else { return }
        for (_, events) in out.events {
            for e in events where e.kind == .delete {
                for (k, w) in reg.lockWatches.enumerated().reversed() where w.member == m.id && w.key == e.kv.key {
                    reg.lockWatches.remove(at: k)
                    lockAnswer(w.client, w.call, .deleted, from: m)
                }
            }
        }
    }

    func lockReadQuery(_ c: Int) -> RangeRequest? {
        guard let reg = registry, case .read(let q)? = reg.lockClients[c].op else { return nil }
        return q
    }

    func lockAnswer(_ c: Int, _ call: Int, _ reply: LockReply, from m: RegMember) {
        guard let reg = registry, let d = delay(from: m.name, "registry", to: reg.lockClients[c].name, "locks") else {
            return
        }
        schedule(d, .registry(.lockReply(client: c, call: call, reply)))
    }

    func lockReply(_ c: Int, _ call: Int, _ reply: LockReply) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        guard client.call == call else { return }
        let l = scenario.locks[client.workload]
        switch reply {
        case .failed:
            schedule(.milliseconds(100), .registry(.lockRetry(client: c, call: call)))
        case .granted:
            client.op = nil
            schedule(0, .registry(.lockKeepAlive(client: c, lease: client.lease)))
            lockNext(c)
        case .txn(let t):
            client.op = nil
            guard var recipe = client.recipe else { return }
            if reg.spec.defectLockWithoutWaiting { return lockStep(c, .acquired(fencingToken: t.revision)) }
            let step = recipe.handle(txn: t)
            client.recipe = recipe
            lockStep(c, step)
        case .range(let resp):
            client.op = nil
            guard var recipe = client.recipe else { return }
            let step = recipe.handle(range: resp)
            client.recipe = recipe
            lockStep(c, step)
        case .deleted:
            client.op = nil
            guard var recipe = client.recipe else { return }
            let step = recipe.predecessorDeleted()
            client.recipe = recipe
            lockStep(c, step)
        case .unlocked:
            client.op = nil
            client.recipe = nil
            schedule(.milliseconds(l.thinkMs), .registry(.lockNext(client: c)))
        }
    }

    /// A call went unanswered (or was refused): send it again, to whoever leads now.
    func lockRetry(_ c: Int, _ call: Int) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        guard client.call == call, let op = client.op else { return }
        if case .waitForDelete = op {
            // The watch's member died or lost leadership: look at the predecessor again.
            client.op = nil
            guard var recipe = client.recipe else { return }
            let step = recipe.predecessorDeleted()
            client.recipe = recipe
            return lockStep(c, step)
        }
        lockSend(c, op)
    }

    func lockKeepAlive(_ c: Int, _ lease: Int64) {
        guard let reg = registry else { return }
        let client = reg.lockClients[c]
        guard client.lease == lease else { return }
        let l = scenario.locks[client.workload]
        if let id = leaderID(), let m = reg.members[id], let r = m.replica,
            delay(from: client.name, "locks", to: "registry-\(id)", "registry") != nil
        {
            if r.renewLease(lease, now: clockMs(m)) != nil {
                reg.leases[lease]?.lastRenew = now
            } else if r.store.lease(lease) == nil {
                // The session expired: a new one for the next attempt.
                client.lease = 0
            }
        }
        schedule(max(.milliseconds(300), .seconds(l.ttlS) / 3), .registry(.lockKeepAlive(client: c, lease: lease)))
    }

    /// Watches on a member that crashed or lost its leader end; their clients look again.
    func lockWatchesBroken(on member: NodeID) {
        guard let reg = registry, !reg.lockWatches.isEmpty else { return }
        for (k, w) in reg.lockWatches.enumerated().reversed() where w.member == member {
            reg.lockWatches.remove(at: k)
            schedule(.milliseconds(reg.spec.reconnectMs), .registry(.lockRetry(client: w.client, call: w.call)))
        }
    }
}
