import Foundation
import SwiftProtobuf
import TandemCore
import TandemStore

// Wire messages → store requests. Untrusted input: unknown enum values and over-deep txns
// are refused with InvalidArgument, never trapped on.

extension RangeRequest {
    /// The request and whether it asked for a serializable (local, possibly stale) read.
    public static func from(_ pb: Etcdserverpb_RangeRequest) throws(EtcdStatus) -> (RangeRequest, serializable: Bool) {
        var q = RangeRequest(key: Array(pb.key), rangeEnd: Array(pb.rangeEnd))
        q.limit = pb.limit
        q.revision = pb.revision
        guard let order = SortOrder(rawValue: pb.sortOrder.rawValue),
            let target = SortTarget(rawValue: pb.sortTarget.rawValue)
        else { throw EtcdStatus(.invalidArgument, "etcdserver: invalid sort option") }
        q.sortOrder = order
        q.sortTarget = target
        q.keysOnly = pb.keysOnly
        q.countOnly = pb.countOnly
        q.minModRevision = pb.minModRevision
        q.maxModRevision = pb.maxModRevision
        q.minCreateRevision = pb.minCreateRevision
        q.maxCreateRevision = pb.maxCreateRevision
        return (q, pb.serializable)
    }
}

extension PutRequest {
    public init(_ pb: Etcdserverpb_PutRequest) {
        self.init(key: Array(pb.key), value: Array(pb.value), lease: pb.lease)
        prevKV = pb.prevKv
        ignoreValue = pb.ignoreValue
        ignoreLease = pb.ignoreLease
    }
}

extension DeleteRangeRequest {
    public init(_ pb: Etcdserverpb_DeleteRangeRequest) {
        self.init(key: Array(pb.key), rangeEnd: Array(pb.rangeEnd))
        prevKV = pb.prevKv
    }
}

extension Compare {
    public static func from(_ pb: Etcdserverpb_Compare) throws(EtcdStatus) -> Compare {
        guard let result = Compare.Result(rawValue: pb.result.rawValue) else {
            throw EtcdStatus(.invalidArgument, "etcdserver: invalid compare result")
        }
        let target: Compare.Target
        switch pb.target {
        case .version: target = .version(pb.version)
        case .create: target = .createRevision(pb.createRevision)
        case .mod: target = .modRevision(pb.modRevision)
        case .value: target = .value(Array(pb.value))
        case .lease: target = .lease(pb.lease)
        case .UNRECOGNIZED: throw EtcdStatus(.invalidArgument, "etcdserver: invalid compare target")
        }
        return Compare(key: Array(pb.key), rangeEnd: Array(pb.rangeEnd), result, target)
    }
}

extension TxnRequest {
    public static func from(
        _ pb: Etcdserverpb_TxnRequest, limits: EtcdLimits = EtcdLimits(), depth: Int = 0
    )
        throws(EtcdStatus) -> TxnRequest
    {
        guard depth <= limits.maxTxnDepth else {
            throw EtcdStatus(.invalidArgument, "tandem: txn nested deeper than maxTxnDepth=\(limits.maxTxnDepth)")
        }
        var t = TxnRequest()
        for c in pb.compare { t.compare.append(try Compare.from(c)) }
        for op in pb.success { t.success.append(try RequestOp.from(op, limits: limits, depth: depth)) }
        for op in pb.failure { t.failure.append(try RequestOp.from(op, limits: limits, depth: depth)) }
        return t
    }
}

extension RequestOp {
    static func from(_ pb: Etcdserverpb_RequestOp, limits: EtcdLimits, depth: Int) throws(EtcdStatus) -> RequestOp {
        switch pb.request {
        case .requestRange(let r): return .range(try RangeRequest.from(r).0)
        case .requestPut(let p): return .put(PutRequest(p))
        case .requestDeleteRange(let d): return .deleteRange(DeleteRangeRequest(d))
        case .requestTxn(let t): return .txn(try TxnRequest.from(t, limits: limits, depth: depth + 1))
        case nil: throw EtcdStatus(.invalidArgument, "etcdserver: empty operation in txn request")
        }
    }
}

extension WatchRequest {
    public init(_ pb: Etcdserverpb_WatchCreateRequest) {
        self.init(key: Array(pb.key), rangeEnd: Array(pb.rangeEnd), startRevision: pb.startRevision)
        prevKV = pb.prevKv
        progressNotify = pb.progressNotify
        filterNoPut = pb.filters.contains(.noput)
        filterNoDelete = pb.filters.contains(.nodelete)
        watchID = pb.watchID
    }
}

// Store results → wire messages. `header` carries cluster/member ids and the raft term,
// which the server knows; the revision comes from the result.

extension Mvccpb_KeyValue {
    public init(_ kv: KeyValue) {
        self.init()
        key = Data(kv.key)
        createRevision = kv.createRevision
        modRevision = kv.modRevision
        version = kv.version
        value = Data(kv.value)
        lease = kv.lease
    }
}

extension KeyValue {
    public init(_ pb: Mvccpb_KeyValue) {
        self.init(
            key: Array(pb.key), createRevision: pb.createRevision, modRevision: pb.modRevision, version: pb.version,
            value: Array(pb.value), lease: pb.lease)
    }
}

extension Mvccpb_Event {
    public init(_ e: Event) {
        self.init()
        type = e.kind == .put ? .put : .delete
        kv = Mvccpb_KeyValue(e.kv)
        if let p = e.prevKV { prevKv = Mvccpb_KeyValue(p) }
    }
}

extension Etcdserverpb_ResponseHeader {
    public func with(revision: Int64) -> Etcdserverpb_ResponseHeader {
        var h = self
        h.revision = revision
        return h
    }
}

extension Etcdserverpb_RangeResponse {
    public init(_ r: RangeResponse, header: Etcdserverpb_ResponseHeader) {
        self.init()
        self.header = header.with(revision: r.revision)
        kvs = r.kvs.map(Mvccpb_KeyValue.init)
        more = r.more
        count = r.count
    }
}

extension Etcdserverpb_PutResponse {
    public init(_ r: PutResponse, header: Etcdserverpb_ResponseHeader) {
        self.init()
        self.header = header.with(revision: r.revision)
        if let p = r.prevKV { prevKv = Mvccpb_KeyValue(p) }
    }
}

extension Etcdserverpb_DeleteRangeResponse {
    public init(_ r: DeleteRangeResponse, header: Etcdserverpb_ResponseHeader) {
        self.init()
        self.header = header.with(revision: r.revision)
        deleted = r.deleted
        prevKvs = r.prevKVs.map(Mvccpb_KeyValue.init)
    }
}

extension Etcdserverpb_TxnResponse {
    public init(_ r: TxnResponse, header: Etcdserverpb_ResponseHeader) {
        self.init()
        self.header = header.with(revision: r.revision)
        succeeded = r.succeeded
        responses = r.responses.map { op in
            var o = Etcdserverpb_ResponseOp()
            switch op {
            case .range(let x): o.responseRange = Etcdserverpb_RangeResponse(x, header: header)
            case .put(let x): o.responsePut = Etcdserverpb_PutResponse(x, header: header)
            case .deleteRange(let x): o.responseDeleteRange = Etcdserverpb_DeleteRangeResponse(x, header: header)
            case .txn(let x): o.responseTxn = Etcdserverpb_TxnResponse(x, header: header)
            }
            return o
        }
    }
}

extension Etcdserverpb_WatchResponse {
    public init(_ r: WatchResponse, header: Etcdserverpb_ResponseHeader) {
        self.init()
        self.header = header.with(revision: r.revision)
        watchID = r.watchID
        created = r.created
        canceled = r.canceled
        cancelReason = r.cancelReason
        compactRevision = r.compactRevision
        events = r.events.map(Mvccpb_Event.init)
    }
}
