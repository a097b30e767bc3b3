import Foundation
import NIOCore
import TandemEtcdAPI

/// etcd's clientv3 `concurrency` recipes — a session lease, `Mutex` and `Election` — with the
/// same key layout (`<name>/<lease id in hex>`) and the same order (by create revision), so
/// `tandem lock`/`tandem elect` and `etcdctl lock`/`etcdctl elect` (or any clientv3 program)
/// contend for the same locks and elections, against Tandem's registry or a real etcd.
public final class EtcdSession: @unchecked Sendable {
    public let client: EtcdClient
    public let lease: Int64
    public let ttl: Int64
    private var stream: EtcdStream?
    private var timer: RepeatedTask?
    /// Completes when the lease is gone (expired, revoked, or the keep-alive stream failed).
    public let lost: EventLoopFuture<Void>
    private let lostPromise: EventLoopPromise<Void>

    private init(client: EtcdClient, lease: Int64, ttl: Int64) {
        self.client = client
        self.lease = lease
        self.ttl = ttl
        lostPromise = client.loop.makePromise()
        lost = lostPromise.futureResult
    }

    /// Grants a lease (clientv3's default TTL: 60 s) and keeps it alive at a third of its TTL.
    public static func start(client: EtcdClient, ttl: Int64 = 60) -> EventLoopFuture<EtcdSession> {
        client.grantLease(ttl: ttl).flatMap { (id, granted) in
            let s = EtcdSession(client: client, lease: id, ttl: granted)
            return client.openStream(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                onMessage: { bytes in
                    if let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes), r.ttl <= 0 {
                        s.lostPromise.succeed(())
                    }
                },
                onClose: { _ in s.lostPromise.succeed(()) }
            ).map { stream in
                s.stream = stream
                let keep: Etcdserverpb_LeaseKeepAliveRequest = {
                    var k = Etcdserverpb_LeaseKeepAliveRequest()
                    k.id = id
                    return k
                }()
                let period = TimeAmount.milliseconds(max(500, granted * 1000 / 3))
                s.timer = client.loop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
                    stream.send(keep)
                }
                return s
            }
        }
    }

    /// Stops the keep-alives and revokes the lease: every key it holds goes.
    public func close() -> EventLoopFuture<Void> {
        timer?.cancel()
        stream?.cancel()
        return client.revokeLease(lease).always { _ in self.lostPromise.succeed(()) }
    }

    /// `<prefix><lease id in hex>`: this session's key under a lock or election prefix.
    func key(under prefix: String) -> String { prefix + String(UInt64(bitPattern: lease), radix: 16) }
}

extension EtcdClient {
    /// A transaction: `compare` → `success` ops, else `failure` ops.
    public func txn(
        _ compare: [Etcdserverpb_Compare], success: [Etcdserverpb_RequestOp], failure: [Etcdserverpb_RequestOp]
    ) -> EventLoopFuture<Etcdserverpb_TxnResponse> {
        var r = Etcdserverpb_TxnRequest()
        r.compare = compare
        r.success = success
        r.failure = failure
        return unary("/etcdserverpb.KV/Txn", r, as: Etcdserverpb_TxnResponse.self)
    }

    /// Waits until `key` (or any key under it, with `prefix`) changes after `revision`.
    public func waitChange(_ key: String, prefix: Bool = false, after revision: Int64) -> EventLoopFuture<Void> {
        watchUntil(key, prefix: prefix, after: revision) { _ in true }
    }

    /// Waits until `key` is deleted, watching from `revision` on.
    func waitDelete(_ key: String, after revision: Int64) -> EventLoopFuture<Void> {
        watchUntil(key, prefix: false, after: revision) { $0.type == .delete }
    }

    /// Watches `key` from `revision + 1` until an event satisfies `done`.
    private func watchUntil(
        _ key: String, prefix: Bool, after revision: Int64, _ isDone: @escaping @Sendable (Mvccpb_Event) -> Bool
    ) -> EventLoopFuture<Void> {
        let done = loop.makePromise(of: Void.self)
        openStream(
            "/etcdserverpb.Watch/Watch",
            onMessage: { bytes in
                guard let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                if r.events.contains(where: isDone) { done.succeed(()) }
                if r.canceled { done.fail(EtcdClientError.unavailable("watch on \(key) canceled: \(r.cancelReason)")) }
            },
            onClose: { e in done.fail(e ?? EtcdClientError.unavailable("watch on \(key) closed")) }
        ).whenComplete { result in
            switch result {
            case .success(let stream):
                var create = Etcdserverpb_WatchCreateRequest()
                create.key = Data(key.utf8)
                if prefix { create.rangeEnd = Data(prefixRangeEnd(Array(key.utf8))) }
                create.startRevision = revision + 1
                var req = Etcdserverpb_WatchRequest()
                req.createRequest = create
                stream.send(req)
                done.futureResult.whenComplete { _ in stream.cancel() }
            case .failure(let e):
                done.fail(e)
            }
        }
        return done.futureResult
    }

    /// The oldest (or, with `newest`, the newest) key under `prefix` by create revision —
    /// clientv3's WithFirstCreate / WithLastCreate — optionally among those created at or
    /// before `maxCreate`.
    static func byCreate(_ prefix: String, newest: Bool = false, maxCreate: Int64 = 0) -> Etcdserverpb_RangeRequest {
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(prefix.utf8)
        r.rangeEnd = Data(prefixRangeEnd(Array(prefix.utf8)))
        r.sortTarget = .create
        r.sortOrder = newest ? .descend : .ascend
        r.limit = 1
        r.maxCreateRevision = maxCreate
        return r
    }

    /// clientv3's `waitDeletes`: until no key under `prefix` has a create revision ≤ `maxCreate`
    /// (each time, wait for the newest such key to go).
    func waitDeletes(_ prefix: String, maxCreate: Int64) -> EventLoopFuture<Void> {
        let r = Self.byCreate(prefix, newest: true, maxCreate: maxCreate)
        return unary("/etcdserverpb.KV/Range", r, as: Etcdserverpb_RangeResponse.self).flatMap { resp in
            guard let last = resp.kvs.first else { return self.loop.makeSucceededVoidFuture() }
            let key = String(decoding: last.key, as: UTF8.self)
            return self.waitDelete(key, after: resp.header.revision).flatMap {
                self.waitDeletes(prefix, maxCreate: maxCreate)
            }
        }
    }

    /// Puts `value` at this session's key under `prefix` unless it exists; returns the key,
    /// its create revision, and the create revision of the oldest key under the prefix.
    fileprivate func claim(
        _ prefix: String, value: [UInt8], session: EtcdSession
    ) -> EventLoopFuture<
        (key: String, createRevision: Int64, ownerRevision: Int64?)
    > {
        let key = session.key(under: prefix)
        var cmp = Etcdserverpb_Compare()
        cmp.key = Data(key.utf8)
        cmp.target = .create
        cmp.result = .equal
        cmp.createRevision = 0
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = Data(value)
        put.lease = session.lease
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(key.utf8)
        let owner = Self.byCreate(prefix)
        func op(_ build: (inout Etcdserverpb_RequestOp) -> Void) -> Etcdserverpb_RequestOp {
            var o = Etcdserverpb_RequestOp()
            build(&o)
            return o
        }
        return txn(
            [cmp], success: [op { $0.requestPut = put }, op { $0.requestRange = owner }],
            failure: [op { $0.requestRange = get }, op { $0.requestRange = owner }]
        ).map { resp in
            var rev = resp.header.revision
            if !resp.succeeded, let kv = resp.responses.first?.responseRange.kvs.first { rev = kv.createRevision }
            let ownerRev = resp.responses.count > 1 ? resp.responses[1].responseRange.kvs.first?.createRevision : nil
            return (key, rev, ownerRev)
        }
    }

    /// clientv3 `Mutex.Lock`: returns the lock key once this session holds `name`.
    public func lock(_ name: String, session: EtcdSession) -> EventLoopFuture<String> {
        let prefix = name.hasSuffix("/") ? name : name + "/"
        return claim(prefix, value: [], session: session).flatMap { claim in
            if claim.ownerRevision == nil || claim.ownerRevision == claim.createRevision {
                return self.loop.makeSucceededFuture(claim.key)
            }
            return self.waitDeletes(prefix, maxCreate: claim.createRevision - 1).map { claim.key }
        }
    }

    /// clientv3 `Election.Campaign`: returns the leader key once this session leads `name`
    /// with `value` (a campaign already under way with another value is re-proclaimed).
    public func campaign(_ name: String, value: [UInt8], session: EtcdSession) -> EventLoopFuture<String> {
        let prefix = name.hasSuffix("/") ? name : name + "/"
        return claim(prefix, value: value, session: session).flatMap { claim in
            self.put(claim.key, value, lease: session.lease).flatMap { _ in
                self.waitDeletes(prefix, maxCreate: claim.createRevision - 1).map { claim.key }
            }
        }
    }

    /// The current leader of `name` (the oldest key under it), if any.
    public func leader(_ name: String) -> EventLoopFuture<EtcdKV?> {
        let prefix = name.hasSuffix("/") ? name : name + "/"
        return unary("/etcdserverpb.KV/Range", Self.byCreate(prefix), as: Etcdserverpb_RangeResponse.self).map {
            $0.kvs.first.map(EtcdKV.init)
        }
    }
}
