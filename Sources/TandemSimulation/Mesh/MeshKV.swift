import TandemCore
import TandemRaft
import TandemReplica
import TandemStore
import TandemTraffic

/// Application clients of the mesh's registry: reads (ReadIndex), puts and compare-and-swap
/// txns on a few keys, each answered, refused (not the leader: definitely not done) or timed
/// out (maybe done). Their history is checked for linearizability with the same checker as
/// `tandem sim-registry`.
public struct KVWorkload: Equatable, Sendable {
    public var clients = 3
    public var keys = 3
    public var thinkMs: Int64 = 20
    public var startMs: Int64 = 0
    public init() {}
}

final class KVClient {
    let name: String
    var member: NodeID = 1
    var call = 0
    var current: (input: RegisterOp.Input, key: Bytes, at: Nanos)?
    init(name: String) { self.name = name }
}

enum KVReply {
    case refused(hint: NodeID)
    case value(Bytes?)
    case ok
    case cas(Bool)
}

extension MeshWorld {
    func startKV() {
        guard let reg = registry, let kv = scenario.kv else { return }
        for k in 1...kv.clients {
            reg.kvClients.append(KVClient(name: "kv-client-\(k)"))
            schedule(.milliseconds(kv.startMs) + Nanos(k), .registry(.kvNext(client: k - 1)))
        }
    }

    func kvNext(_ c: Int) {
        guard let reg = registry, let kv = scenario.kv else { return }
        let client = reg.kvClients[c]
        let key = Array("/app/k\(rng.next() % UInt64(kv.keys))".utf8)
        reg.kvWrites += 1
        let value = Array("v\(reg.kvWrites)".utf8)
        let input: RegisterOp.Input
        switch rng.next() % 10 {
        case 0..<4: input = .read
        case 4..<7: input = .write(value)
        default:
            // One of the last few values written: some succeed, some fail.
            let back = min(reg.kvWrites - 1, 1 + Int(rng.next() % 3))
            input = .cas(expected: Array("v\(reg.kvWrites - back)".utf8), new: value)
        }
        client.call += 1
        client.current = (input, key, now)
        kvSend(c)
        schedule(.milliseconds(reg.spec.requestTimeoutMs), .registry(.kvTimeout(client: c, call: client.call)))
    }

    func kvSend(_ c: Int) {
        guard let reg = registry else { return }
        let client = reg.kvClients[c]
        if reg.spec.defectLocalReads, case .read? = client.current?.input {
            // With local reads a client may as well spread its reads over every member.
            client.member = reg.ids[Int(rng.next() % UInt64(reg.ids.count))]
        }
        if let d = delay(from: client.name, "kv", to: "registry-\(client.member)", "registry") {
            schedule(d, .registry(.kvArrive(client: c, call: client.call, member: client.member)))
        }
    }

    func kvArrive(_ c: Int, _ call: Int, _ member: NodeID) {
        guard let reg = registry, let m = reg.members[member], let r = m.replica else { return }
        let client = reg.kvClients[c]
        guard client.call == call, let cur = client.current else { return }
        if reg.spec.defectLocalReads, case .read = cur.input {
            return kvAnswer(
                c, call, .value((try? r.store.range(RangeRequest(key: cur.key)))?.kvs.first?.value), from: m)
        }
        guard r.isLeader else { return kvAnswer(c, call, .refused(hint: r.raft.leader), from: m) }
        reg.nextRequest += 1
        let id = reg.nextRequest
        switch cur.input {
        case .read:
            let ctx = readContext(id)
            guard (try? r.read(context: ctx)) != nil else { return kvAnswer(c, call, .refused(hint: 0), from: m) }
            reg.waitingReads[ctx] = .kv(client: c, call: call)
        case .write(let v):
            guard (try? r.propose(.put(PutRequest(key: cur.key, value: v)), requestID: id)) != nil else {
                return kvAnswer(c, call, .refused(hint: 0), from: m)
            }
            reg.waiting[id] = .kv(client: c, call: call)
        case .cas(let expected, let new):
            let txn = TxnRequest(
                compare: [Compare(key: cur.key, .equal, .value(expected))],
                success: [.put(PutRequest(key: cur.key, value: new))])
            guard (try? r.propose(.txn(txn), requestID: id)) != nil else {
                return kvAnswer(c, call, .refused(hint: 0), from: m)
            }
            reg.waiting[id] = .kv(client: c, call: call)
        }
        pumpMember(m)
    }

    /// A proposal of client `c` applied (called by `pumpMember`).
    func kvApplied(_ c: Int, _ call: Int, _ result: StoreResult, from m: RegMember) {
        switch result {
        case .put: kvAnswer(c, call, .ok, from: m)
        case .txn(let t): kvAnswer(c, call, .cas(t.succeeded), from: m)
        default: kvAnswer(c, call, .refused(hint: 0), from: m)
        }
    }

    /// A linearizable read of client `c` is ready on `m` (called by `pumpMember`).
    func kvRead(_ c: Int, _ call: Int, store: MVCCStore, from m: RegMember) {
        guard let cur = registry?.kvClients[c].current else { return }
        kvAnswer(c, call, .value((try? store.range(RangeRequest(key: cur.key)))?.kvs.first?.value), from: m)
    }

    func kvAnswer(_ c: Int, _ call: Int, _ reply: KVReply, from m: RegMember) {
        guard let reg = registry, let d = delay(from: m.name, "registry", to: reg.kvClients[c].name, "kv") else {
            return
        }
        schedule(d, .registry(.kvReply(client: c, call: call, reply, from: m.id)))
    }

    func kvReply(_ c: Int, _ call: Int, _ reply: KVReply, from member: NodeID) {
        guard let reg = registry, let kv = scenario.kv else { return }
        let client = reg.kvClients[c]
        guard client.call == call, let cur = client.current else { return }
        let output: RegisterOp.Output
        switch reply {
        case .refused(let hint):
            // Definitely not done: try whoever leads (or the next member) and go on.
            client.member = hint != 0 && hint != member ? hint : nextMember(after: member)
            report.kvRefused += 1
            client.current = nil
            schedule(.milliseconds(kv.thinkMs), .registry(.kvNext(client: c)))
            return
        case .value(let v): output = .value(v)
        case .ok: output = .ok
        case .cas(let ok): output = .casResult(ok)
        }
        client.member = member
        kvRecord(c, cur, output)
        client.current = nil
        schedule(.milliseconds(kv.thinkMs), .registry(.kvNext(client: c)))
    }

    func kvTimeout(_ c: Int, _ call: Int) {
        guard let reg = registry, let kv = scenario.kv else { return }
        let client = reg.kvClients[c]
        guard client.call == call, let cur = client.current else { return }
        kvRecord(c, cur, .unknown)
        client.current = nil
        client.member = nextMember(after: client.member)
        schedule(.milliseconds(kv.thinkMs), .registry(.kvNext(client: c)))
    }

    func kvRecord(_ c: Int, _ cur: (input: RegisterOp.Input, key: Bytes, at: Nanos), _ out: RegisterOp.Output) {
        guard let reg = registry else { return }
        if out == .unknown {
            report.kvUnknown += 1
            if case .read = cur.input { return }  // a read with no answer has no effect
        } else {
            report.kvOK += 1
        }
        reg.kvHistory.append(
            RegisterOp(
                client: c, key: cur.key, input: cur.input, output: out, call: UInt64(cur.at / 1000),
                ret: out == .unknown ? .max : UInt64(now / 1000)))
    }

    func finishKV() {
        guard let reg = registry, !reg.kvClients.isEmpty else { return }
        for (c, client) in reg.kvClients.enumerated() {
            if let cur = client.current { kvRecord(c, cur, .unknown) }
        }
        switch LinearizabilityChecker.check(reg.kvHistory) {
        case .linearizable: break
        case .violation(let key, let n):
            report.violations.append("linearizability: history of key \(key) (\(n) operations) is not linearizable")
        case .unknown(let key):
            report.violations.append("linearizability: checker gave up on key \(key) (step bound)")
        }
    }
}
