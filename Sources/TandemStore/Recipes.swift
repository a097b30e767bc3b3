import TandemCore

/// Service registration keys: `/tandem/services/<service>/<instance>` under a lease.
public enum ServiceRegistry {
    public static let root: Bytes = Array("/tandem/services/".utf8)

    public static func key(service: String, instance: String) -> Bytes {
        root + Array("\(service)/\(instance)".utf8)
    }

    /// Registers (or refreshes) an instance under `lease`.
    public static func register(service: String, instance: String, value: Bytes, lease: Int64) -> PutRequest {
        PutRequest(key: key(service: service, instance: instance), value: value, lease: lease)
    }

    /// Every instance of `service`.
    public static func instances(of service: String) -> RangeRequest {
        .prefix(root + Array("\(service)/".utf8))
    }
}

/// A distributed lock with etcd's `concurrency.Mutex` semantics, as a client-side state
/// machine: it says which request to send next and interprets each response. Each waiter
/// watches only its predecessor (no thundering herd), and after waiting it re-checks its
/// own key, returning `.lost` if the session lease expired meanwhile (the fix etcd got in
/// 3.5, commit b14c7cd44). The key's create revision is the fencing token.
public struct LockRecipe: Sendable {
    public enum Step: Equatable, Sendable {
        case send(TxnRequest)
        case range(RangeRequest)
        /// Watch `key` from `revision` until it is deleted, then call `predecessorDeleted()`.
        case waitForDelete(key: Bytes, revision: Int64)
        case acquired(fencingToken: Int64)
        case lost(reason: String)
    }

    enum State: Equatable { case idle, acquiring, waiting, rechecking, held, lost }

    public let prefix: Bytes
    public let lease: Int64
    public let myKey: Bytes
    public private(set) var myRevision: Int64 = 0
    private var state: State = .idle

    public init(prefix: String, lease: Int64) {
        var p = Array(prefix.utf8)
        if p.last != UInt8(ascii: "/") { p.append(UInt8(ascii: "/")) }
        self.prefix = p
        self.lease = lease
        myKey = p + Array(String(lease, radix: 16).utf8)
    }

    var ownerQuery: RangeRequest {
        var q = RangeRequest.prefix(prefix)
        q.sortTarget = .create
        q.sortOrder = .ascend
        q.limit = 1
        return q
    }

    public mutating func start() -> Step {
        precondition(state == .idle, "lock recipe started twice (state \(state))")
        state = .acquiring
        var get = RangeRequest(key: myKey)
        get.limit = 1
        return .send(
            TxnRequest(
                compare: [Compare(key: myKey, .equal, .createRevision(0))],
                success: [.put(PutRequest(key: myKey, value: [], lease: lease)), .range(ownerQuery)],
                failure: [.range(get), .range(ownerQuery)]))
    }

    public mutating func handle(txn r: TxnResponse) -> Step {
        precondition(state == .acquiring, "unexpected txn response in state \(state)")
        if r.succeeded {
            myRevision = r.revision
        } else if case .range(let mine) = r.responses.first, let kv = mine.kvs.first {
            myRevision = kv.createRevision
        } else {
            state = .lost
            return .lost(reason: "lock key vanished")
        }
        if case .range(let owner) = r.responses.last, owner.kvs.first?.createRevision == myRevision {
            state = .held
            return .acquired(fencingToken: myRevision)
        }
        state = .waiting
        return .range(predecessorQuery)
    }

    /// The newest key created before ours.
    var predecessorQuery: RangeRequest {
        var q = RangeRequest.prefix(prefix)
        q.sortTarget = .create
        q.sortOrder = .descend
        q.limit = 1
        q.maxCreateRevision = myRevision - 1
        return q
    }

    public mutating func handle(range r: RangeResponse) -> Step {
        switch state {
        case .waiting:
            if let pred = r.kvs.first { return .waitForDelete(key: pred.key, revision: r.revision + 1) }
            // No predecessor left: make sure our own key still exists before claiming.
            state = .rechecking
            return .range(RangeRequest(key: myKey))
        case .rechecking:
            guard let kv = r.kvs.first, kv.createRevision == myRevision else {
                state = .lost
                return .lost(reason: "session expired while waiting: lock key \(myKey.utf8String) is gone")
            }
            state = .held
            return .acquired(fencingToken: myRevision)
        default:
            preconditionFailure("unexpected range response in state \(state)")
        }
    }

    /// The watched predecessor was deleted: look again (there may be another).
    public mutating func predecessorDeleted() -> Step {
        precondition(state == .waiting, "predecessor deletion in state \(state)")
        return .range(predecessorQuery)
    }

    public func unlock() -> DeleteRangeRequest { DeleteRangeRequest(key: myKey) }
}

/// Leader election with etcd's `concurrency.Election` semantics: campaign is a lock whose
/// key holds the leader's value; proclaim and resign are guarded by the key's create
/// revision so a deposed leader cannot overwrite its successor.
public struct ElectionRecipe: Sendable {
    public private(set) var lock: LockRecipe
    public let value: Bytes

    public init(prefix: String, lease: Int64, value: Bytes) {
        lock = LockRecipe(prefix: prefix, lease: lease)
        self.value = value
    }

    public mutating func campaign() -> LockRecipe.Step {
        var step = lock.start()
        if case .send(var txn) = step, case .put(var p) = txn.success[0] {
            p.value = value
            txn.success[0] = .put(p)
            step = .send(txn)
        }
        return step
    }

    public mutating func handle(txn r: TxnResponse) -> LockRecipe.Step { lock.handle(txn: r) }
    public mutating func handle(range r: RangeResponse) -> LockRecipe.Step { lock.handle(range: r) }
    public mutating func predecessorDeleted() -> LockRecipe.Step { lock.predecessorDeleted() }

    public func proclaim(_ v: Bytes) -> TxnRequest {
        TxnRequest(
            compare: [Compare(key: lock.myKey, .equal, .createRevision(lock.myRevision))],
            success: [.put(PutRequest(key: lock.myKey, value: v, lease: lock.lease))])
    }

    public func resign() -> TxnRequest {
        TxnRequest(
            compare: [Compare(key: lock.myKey, .equal, .createRevision(lock.myRevision))],
            success: [.deleteRange(DeleteRangeRequest(key: lock.myKey))])
    }

    /// The current leader: the oldest key under the prefix.
    public static func leaderQuery(prefix: String) -> RangeRequest {
        var p = Array(prefix.utf8)
        if p.last != UInt8(ascii: "/") { p.append(UInt8(ascii: "/")) }
        var q = RangeRequest.prefix(p)
        q.sortTarget = .create
        q.sortOrder = .ascend
        q.limit = 1
        return q
    }
}
