/// TandemStore — the registry's replicated state machine, with etcd v3 semantics.
///
/// Owns: the MVCC key-value index (revisions, versions, ranges, txns, compaction), the lease
/// table, watch fan-out, the leader's lease clock, and the lock/election/registration
/// recipes. Applied only from committed Raft entries, deterministically; imports only
/// TandemCore and swift-collections. No clock (time is a `now` parameter), no I/O.
import TandemCore

public struct KeyValue: Equatable, Sendable {
    public var key: Bytes
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    public var value: Bytes
    public var lease: Int64

    public init(
        key: Bytes, createRevision: Int64 = 0, modRevision: Int64 = 0, version: Int64 = 0, value: Bytes = [],
        lease: Int64 = 0
    ) {
        self.key = key
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.value = value
        self.lease = lease
    }
}

public struct Event: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case put = 0
        case delete = 1
    }
    public var kind: Kind
    /// For a delete: the key with `modRevision` = the revision of the delete.
    public var kv: KeyValue
    public var prevKV: KeyValue?

    public init(kind: Kind, kv: KeyValue, prevKV: KeyValue? = nil) {
        self.kind = kind
        self.kv = kv
        self.prevKV = prevKV
    }
}

public enum SortOrder: Int, Sendable { case none = 0, ascend = 1, descend = 2 }
public enum SortTarget: Int, Sendable { case key = 0, version = 1, create = 2, mod = 3, value = 4 }

public struct RangeRequest: Equatable, Sendable {
    public var key: Bytes
    /// Empty: the single key. `[0]`: every key ≥ key. Otherwise the half-open [key, rangeEnd).
    public var rangeEnd: Bytes = []
    public var limit: Int64 = 0
    public var revision: Int64 = 0
    public var sortOrder: SortOrder = .none
    public var sortTarget: SortTarget = .key
    public var keysOnly = false
    public var countOnly = false
    public var minModRevision: Int64 = 0
    public var maxModRevision: Int64 = 0
    public var minCreateRevision: Int64 = 0
    public var maxCreateRevision: Int64 = 0

    public init(key: Bytes, rangeEnd: Bytes = []) {
        self.key = key
        self.rangeEnd = rangeEnd
    }

    /// Every key with this prefix (etcd's `clientv3.WithPrefix`).
    public static func prefix(_ p: Bytes) -> RangeRequest { RangeRequest(key: p, rangeEnd: KeyRange.prefixEnd(p)) }
}

public struct RangeResponse: Equatable, Sendable {
    public var revision: Int64
    public var kvs: [KeyValue]
    public var more: Bool
    public var count: Int64
}

public struct PutRequest: Equatable, Sendable {
    public var key: Bytes
    public var value: Bytes
    public var lease: Int64 = 0
    public var prevKV = false
    public var ignoreValue = false
    public var ignoreLease = false
    public init(key: Bytes, value: Bytes, lease: Int64 = 0) {
        self.key = key
        self.value = value
        self.lease = lease
    }
}

public struct PutResponse: Equatable, Sendable {
    public var revision: Int64
    public var prevKV: KeyValue?
}

public struct DeleteRangeRequest: Equatable, Sendable {
    public var key: Bytes
    public var rangeEnd: Bytes = []
    public var prevKV = false
    public init(key: Bytes, rangeEnd: Bytes = []) {
        self.key = key
        self.rangeEnd = rangeEnd
    }
}

public struct DeleteRangeResponse: Equatable, Sendable {
    public var revision: Int64
    public var deleted: Int64
    public var prevKVs: [KeyValue]
}

public struct Compare: Equatable, Sendable {
    public enum Result: Int, Sendable { case equal = 0, greater = 1, less = 2, notEqual = 3 }
    public enum Target: Equatable, Sendable {
        case version(Int64)
        case createRevision(Int64)
        case modRevision(Int64)
        case value(Bytes)
        case lease(Int64)
    }
    public var key: Bytes
    public var rangeEnd: Bytes = []
    public var result: Result
    public var target: Target
    public init(key: Bytes, rangeEnd: Bytes = [], _ result: Result, _ target: Target) {
        self.key = key
        self.rangeEnd = rangeEnd
        self.result = result
        self.target = target
    }
}

public indirect enum RequestOp: Equatable, Sendable {
    case range(RangeRequest)
    case put(PutRequest)
    case deleteRange(DeleteRangeRequest)
    case txn(TxnRequest)
}

public indirect enum ResponseOp: Equatable, Sendable {
    case range(RangeResponse)
    case put(PutResponse)
    case deleteRange(DeleteRangeResponse)
    case txn(TxnResponse)
}

public struct TxnRequest: Equatable, Sendable {
    public var compare: [Compare]
    public var success: [RequestOp]
    public var failure: [RequestOp]
    public init(compare: [Compare] = [], success: [RequestOp] = [], failure: [RequestOp] = []) {
        self.compare = compare
        self.success = success
        self.failure = failure
    }
}

public struct TxnResponse: Equatable, Sendable {
    public var revision: Int64
    public var succeeded: Bool
    public var responses: [ResponseOp]
}

public struct LeaseInfo: Equatable, Sendable {
    public var id: Int64
    /// TTL the lease was granted with, in seconds.
    public var grantedTTL: Int64
    /// Remaining TTL last checkpointed through Raft (0 when never checkpointed).
    public var checkpointedTTL: Int64
    public var keys: [Bytes]
}

/// Errors the store answers with; `message` is etcd's exact text, which clients match on.
public enum StoreError: Error, Equatable, CustomStringConvertible {
    case compacted
    case futureRevision
    case leaseNotFound
    case leaseExists
    case leaseTTLTooLarge
    case keyNotFound
    case tooManyOps(limit: Int)
    case duplicateKey
    case emptyKey
    case tooManyMembers
    /// A NOSPACE alarm is up: writes that take space are refused until it is lifted.
    case noSpace

    public var message: String {
        switch self {
        case .compacted: return "etcdserver: mvcc: required revision has been compacted"
        case .futureRevision: return "etcdserver: mvcc: required revision is a future revision"
        case .leaseNotFound: return "etcdserver: requested lease not found"
        case .leaseExists: return "etcdserver: lease already exists"
        case .leaseTTLTooLarge: return "etcdserver: too large lease TTL"
        case .keyNotFound: return "etcdserver: key not found"
        case .tooManyOps: return "etcdserver: too many operations in txn request"
        case .duplicateKey: return "etcdserver: duplicate key given in txn request"
        case .emptyKey: return "etcdserver: key is not provided"
        case .tooManyMembers: return "tandem: too many member records (\(MVCCStore.maxMemberRecords))"
        case .noSpace: return "etcdserver: mvcc: database space exceeded"
        }
    }

    public var description: String { message }
}

/// Key-range helpers with etcd's conventions.
public enum KeyRange {
    /// The smallest key greater than every key with prefix `p`; `[0]` when none exists.
    public static func prefixEnd(_ p: Bytes) -> Bytes {
        var end = p
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]
    }

    /// Whether `k` lies in the range `key`/`rangeEnd` (etcd's encoding).
    @inlinable public static func contains(key: Bytes, rangeEnd: Bytes, _ k: Bytes) -> Bool {
        if rangeEnd.isEmpty { return k == key }
        if Bytes.lexicographicLess(k, key) { return false }
        if rangeEnd == [0] { return true }
        return Bytes.lexicographicLess(k, rangeEnd)
    }
}
