import TandemCore

/// A write to the replicated store, as carried in a Raft entry.
public enum StoreCommand: Equatable, Sendable {
    case put(PutRequest)
    case deleteRange(DeleteRangeRequest)
    case txn(TxnRequest)
    case compact(revision: Int64)
    case leaseGrant(id: Int64, ttl: Int64)
    case leaseRevoke(id: Int64)
    /// Remaining TTLs the leader recorded, so a new leader does not restart them (etcd #9888).
    case leaseCheckpoint([LeaseCheckpoint])
    /// A member's published attributes (name, URLs), kept outside the key space like etcd's
    /// membership bucket: no revision, no watch event, invisible to Range.
    case memberAttributes(id: UInt64, record: Bytes)
    /// Raises (`activate`) or lifts an alarm: replicated, and sticky until lifted (etcd's
    /// AlarmRequest through raft). No revision, no watch event.
    case alarm(StoreAlarm, activate: Bool)
}

/// An alarm raised for a member (etcd's AlarmMember). While a `noSpace` alarm is up, the store
/// refuses what takes space — Put, a Txn with puts, LeaseGrant — as etcd's capped applier does.
public struct StoreAlarm: Hashable, Comparable, Sendable {
    /// etcd's AlarmType numbers.
    public enum Kind: UInt8, Sendable, Comparable {
        case noSpace = 1
        case corrupt = 2
        public static func < (a: Kind, b: Kind) -> Bool { a.rawValue < b.rawValue }
    }
    public var memberID: UInt64
    public var kind: Kind
    public init(memberID: UInt64, kind: Kind) {
        self.memberID = memberID
        self.kind = kind
    }
    public static func < (a: StoreAlarm, b: StoreAlarm) -> Bool { (a.memberID, a.kind) < (b.memberID, b.kind) }
}

public struct LeaseCheckpoint: Equatable, Sendable {
    public var id: Int64
    public var remainingTTL: Int64
    public init(id: Int64, remainingTTL: Int64) {
        self.id = id
        self.remainingTTL = remainingTTL
    }
}

/// What applying a command produced.
public enum StoreResult: Equatable, Sendable {
    case put(PutResponse)
    case deleteRange(DeleteRangeResponse)
    case txn(TxnResponse)
    case compact(revision: Int64)
    case leaseGrant(id: Int64, ttl: Int64, revision: Int64)
    case leaseRevoke(revision: Int64)
    case leaseCheckpoint
    case memberAttributes
    /// Whether the alarm set changed (raising a raised alarm, or lifting one not raised, does not).
    case alarm(changed: Bool)
    case failed(StoreError)
}

/// A proposal: the shell's request id (to find the waiting client on apply) and the command.
public struct StoreProposal: Equatable, Sendable {
    public var requestID: UInt64
    public var command: StoreCommand
    public init(requestID: UInt64, command: StoreCommand) {
        self.requestID = requestID
        self.command = command
    }
}

// MARK: - Encoding

extension StoreProposal {
    public func encoded() -> Bytes {
        var w = ByteWriter()
        w.varint(requestID)
        command.encode(into: &w)
        return w.bytes
    }

    public init(decoding bytes: Bytes) throws(CodecError) {
        var r = ByteReader(bytes)
        requestID = try r.varint()
        command = try StoreCommand(from: &r)
    }
}

extension StoreCommand {
    func encode(into w: inout ByteWriter) {
        switch self {
        case .put(let p):
            w.u8(0)
            p.encode(into: &w)
        case .deleteRange(let d):
            w.u8(1)
            d.encode(into: &w)
        case .txn(let t):
            w.u8(2)
            t.encode(into: &w)
        case .compact(let rev):
            w.u8(3)
            w.zigzag(rev)
        case .leaseGrant(let id, let ttl):
            w.u8(4)
            w.zigzag(id)
            w.zigzag(ttl)
        case .leaseRevoke(let id):
            w.u8(5)
            w.zigzag(id)
        case .leaseCheckpoint(let cps):
            w.u8(6)
            w.varint(UInt64(cps.count))
            for c in cps {
                w.zigzag(c.id)
                w.zigzag(c.remainingTTL)
            }
        case .memberAttributes(let id, let record):
            w.u8(7)
            w.varint(id)
            w.blob(record)
        case .alarm(let a, let activate):
            w.u8(8)
            w.varint(a.memberID)
            w.u8(a.kind.rawValue)
            w.bool(activate)
        }
    }

    init(from r: inout ByteReader) throws(CodecError) {
        let at = r.offset
        switch try r.u8() {
        case 0: self = .put(try PutRequest(from: &r))
        case 1: self = .deleteRange(try DeleteRangeRequest(from: &r))
        case 2: self = .txn(try TxnRequest(from: &r, depth: 0))
        case 3: self = .compact(revision: try r.zigzag())
        case 4: self = .leaseGrant(id: try r.zigzag(), ttl: try r.zigzag())
        case 5: self = .leaseRevoke(id: try r.zigzag())
        case 6:
            var cps: [LeaseCheckpoint] = []
            for _ in 0..<(try r.count(minElementBytes: 2)) {
                cps.append(LeaseCheckpoint(id: try r.zigzag(), remainingTTL: try r.zigzag()))
            }
            self = .leaseCheckpoint(cps)
        case 7: self = .memberAttributes(id: try r.varint(), record: try r.blob())
        case 8:
            let member = try r.varint()
            let kindAt = r.offset
            let raw = try r.u8()
            guard let kind = StoreAlarm.Kind(rawValue: raw) else {
                throw .badTag(what: "alarm kind", tag: UInt64(raw), offset: kindAt)
            }
            self = .alarm(StoreAlarm(memberID: member, kind: kind), activate: try r.bool())
        case let t: throw .badTag(what: "store command", tag: UInt64(t), offset: at)
        }
    }
}

extension PutRequest {
    func encode(into w: inout ByteWriter) {
        w.blob(key)
        w.blob(value)
        w.zigzag(lease)
        w.u8((prevKV ? 1 : 0) | (ignoreValue ? 2 : 0) | (ignoreLease ? 4 : 0))
    }

    init(from r: inout ByteReader) throws(CodecError) {
        let k = try r.blob()
        let v = try r.blob()
        self.init(key: k, value: v, lease: try r.zigzag())
        let flags = try r.u8()
        prevKV = flags & 1 != 0
        ignoreValue = flags & 2 != 0
        ignoreLease = flags & 4 != 0
    }
}

extension DeleteRangeRequest {
    func encode(into w: inout ByteWriter) {
        w.blob(key)
        w.blob(rangeEnd)
        w.bool(prevKV)
    }

    init(from r: inout ByteReader) throws(CodecError) {
        let k = try r.blob()
        self.init(key: k, rangeEnd: try r.blob())
        prevKV = try r.bool()
    }
}

extension RangeRequest {
    func encode(into w: inout ByteWriter) {
        w.blob(key)
        w.blob(rangeEnd)
        w.zigzag(limit)
        w.zigzag(revision)
        w.u8(UInt8(sortOrder.rawValue))
        w.u8(UInt8(sortTarget.rawValue))
        w.u8((keysOnly ? 1 : 0) | (countOnly ? 2 : 0))
        for v in [minModRevision, maxModRevision, minCreateRevision, maxCreateRevision] { w.zigzag(v) }
    }

    init(from r: inout ByteReader) throws(CodecError) {
        let k = try r.blob()
        self.init(key: k, rangeEnd: try r.blob())
        limit = try r.zigzag()
        revision = try r.zigzag()
        let at = r.offset
        guard let so = SortOrder(rawValue: Int(try r.u8())), let st = SortTarget(rawValue: Int(try r.u8())) else {
            throw .badTag(what: "sort", tag: 0, offset: at)
        }
        sortOrder = so
        sortTarget = st
        let flags = try r.u8()
        keysOnly = flags & 1 != 0
        countOnly = flags & 2 != 0
        minModRevision = try r.zigzag()
        maxModRevision = try r.zigzag()
        minCreateRevision = try r.zigzag()
        maxCreateRevision = try r.zigzag()
    }
}

extension TxnRequest {
    /// Nesting deeper than this is refused when decoding (etcd allows nested txns).
    static let maxDepth = 8

    func encode(into w: inout ByteWriter) {
        w.varint(UInt64(compare.count))
        for c in compare {
            w.blob(c.key)
            w.blob(c.rangeEnd)
            w.u8(UInt8(c.result.rawValue))
            switch c.target {
            case .version(let v):
                w.u8(0)
                w.zigzag(v)
            case .createRevision(let v):
                w.u8(1)
                w.zigzag(v)
            case .modRevision(let v):
                w.u8(2)
                w.zigzag(v)
            case .value(let b):
                w.u8(3)
                w.blob(b)
            case .lease(let v):
                w.u8(4)
                w.zigzag(v)
            }
        }
        for ops in [success, failure] {
            w.varint(UInt64(ops.count))
            for op in ops {
                switch op {
                case .range(let q):
                    w.u8(0)
                    q.encode(into: &w)
                case .put(let p):
                    w.u8(1)
                    p.encode(into: &w)
                case .deleteRange(let d):
                    w.u8(2)
                    d.encode(into: &w)
                case .txn(let t):
                    w.u8(3)
                    t.encode(into: &w)
                }
            }
        }
    }

    init(from r: inout ByteReader, depth: Int) throws(CodecError) {
        guard depth <= Self.maxDepth else {
            throw .tooLarge(what: "txn nesting", size: UInt64(depth), limit: Self.maxDepth)
        }
        self.init()
        for _ in 0..<(try r.count(minElementBytes: 4)) {
            let k = try r.blob()
            let e = try r.blob()
            let at = r.offset
            guard let res = Compare.Result(rawValue: Int(try r.u8())) else {
                throw .badTag(what: "compare result", tag: 0, offset: at)
            }
            let target: Compare.Target
            switch try r.u8() {
            case 0: target = .version(try r.zigzag())
            case 1: target = .createRevision(try r.zigzag())
            case 2: target = .modRevision(try r.zigzag())
            case 3: target = .value(try r.blob())
            case 4: target = .lease(try r.zigzag())
            case let t: throw .badTag(what: "compare target", tag: UInt64(t), offset: at)
            }
            compare.append(Compare(key: k, rangeEnd: e, res, target))
        }
        for branch in 0..<2 {
            var ops: [RequestOp] = []
            for _ in 0..<(try r.count(minElementBytes: 2)) {
                let at = r.offset
                switch try r.u8() {
                case 0: ops.append(.range(try RangeRequest(from: &r)))
                case 1: ops.append(.put(try PutRequest(from: &r)))
                case 2: ops.append(.deleteRange(try DeleteRangeRequest(from: &r)))
                case 3: ops.append(.txn(try TxnRequest(from: &r, depth: depth + 1)))
                case let t: throw .badTag(what: "txn op", tag: UInt64(t), offset: at)
                }
            }
            if branch == 0 { success = ops } else { failure = ops }
        }
    }
}
