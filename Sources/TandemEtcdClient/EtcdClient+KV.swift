import Foundation
import NIOCore
import TandemEtcdAPI

/// A key-value pair as the client returns it.
public struct EtcdKV: Sendable, Equatable {
    public var key: String
    public var value: [UInt8]
    public var modRevision: Int64
    public var lease: Int64
    public var valueString: String { String(decoding: value, as: UTF8.self) }
}

/// The smallest key greater than every key with `prefix` (etcd's `GetPrefixRangeEnd`).
public func prefixRangeEnd(_ prefix: [UInt8]) -> [UInt8] {
    var end = prefix
    while let last = end.last {
        if last < 0xFF {
            end[end.count - 1] = last + 1
            return end
        }
        end.removeLast()
    }
    return [0]  // all keys
}

extension EtcdClient {
    public func put(_ key: String, _ value: [UInt8], lease: Int64 = 0) -> EventLoopFuture<Int64> {
        var r = Etcdserverpb_PutRequest()
        r.key = Data(key.utf8)
        r.value = Data(value)
        r.lease = lease
        return unary("/etcdserverpb.KV/Put", r, as: Etcdserverpb_PutResponse.self).map { $0.header.revision }
    }

    /// Keys with this prefix (or exactly `key` when `prefix` is false); returns the pairs and
    /// the store revision they were read at.
    public func get(
        _ key: String, prefix: Bool = false, serializable: Bool = false
    ) -> EventLoopFuture<
        (kvs: [EtcdKV], revision: Int64)
    > {
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(key.utf8)
        if prefix { r.rangeEnd = Data(prefixRangeEnd(Array(key.utf8))) }
        r.serializable = serializable
        return unary("/etcdserverpb.KV/Range", r, as: Etcdserverpb_RangeResponse.self).map { resp in
            (resp.kvs.map(EtcdKV.init), resp.header.revision)
        }
    }

    public func delete(_ key: String, prefix: Bool = false) -> EventLoopFuture<Int64> {
        var r = Etcdserverpb_DeleteRangeRequest()
        r.key = Data(key.utf8)
        if prefix { r.rangeEnd = Data(prefixRangeEnd(Array(key.utf8))) }
        return unary("/etcdserverpb.KV/DeleteRange", r, as: Etcdserverpb_DeleteRangeResponse.self).map(\.deleted)
    }

    public func grantLease(ttl: Int64) -> EventLoopFuture<(id: Int64, ttl: Int64)> {
        var r = Etcdserverpb_LeaseGrantRequest()
        r.ttl = ttl
        return unary("/etcdserverpb.Lease/LeaseGrant", r, as: Etcdserverpb_LeaseGrantResponse.self)
            .flatMapThrowing { resp in
                if !resp.error.isEmpty { throw EtcdClientError(code: 2, message: resp.error) }
                return (resp.id, resp.ttl)
            }
    }

    public func revokeLease(_ id: Int64) -> EventLoopFuture<Void> {
        var r = Etcdserverpb_LeaseRevokeRequest()
        r.id = id
        return unary("/etcdserverpb.Lease/LeaseRevoke", r, as: Etcdserverpb_LeaseRevokeResponse.self).map { _ in }
    }

    /// Whether a member answers a Maintenance/Status call.
    public func status() -> EventLoopFuture<Etcdserverpb_StatusResponse> {
        unary("/etcdserverpb.Maintenance/Status", Etcdserverpb_StatusRequest(), as: Etcdserverpb_StatusResponse.self)
    }
}

extension EtcdKV {
    init(_ kv: Mvccpb_KeyValue) {
        key = String(decoding: kv.key, as: UTF8.self)
        value = Array(kv.value)
        modRevision = kv.modRevision
        lease = kv.lease
    }
}
