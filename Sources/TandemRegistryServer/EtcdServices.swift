import Foundation
import NIOConcurrencyHelpers
import NIOCore
import SwiftProtobuf
import TandemCore
import TandemEtcdAPI
import TandemRaft
import TandemStore

/// The etcd v3 methods, by gRPC path, implemented on a `RegistryNode`.
enum EtcdServices {
    static func methods(node: RegistryNode, limits: EtcdLimits) -> [String: GRPCMethod] {
        var m: [String: GRPCMethod] = [:]

        /// Decodes on the network loop, runs `body` on the raft loop, encodes the answer.
        func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
            _ path: String, _ type: Req.Type,
            _ body: @escaping @Sendable (Req, RegistryNode, @escaping (Result<Resp, EtcdStatus>) -> Void) -> Void
        ) {
            m[path] = .unary { bytes, responder in
                let req: Req
                do throws(EtcdStatus) {
                    req = try decodeRequest(Req.self, bytes, limits: limits)
                } catch {
                    responder.finish(error)
                    return
                }
                node.loop.execute {
                    let serializable = (req as? Etcdserverpb_RangeRequest)?.serializable == true
                    if let refused = node.authorize(path, token: responder.authToken, serializable: serializable) {
                        return responder.finish(refused)
                    }
                    defer { node.caller = nil }
                    body(req, node) { result in
                        switch result {
                        case .success(let resp):
                            guard let out = try? resp.serializedBytes() as [UInt8] else {
                                responder.finish(EtcdStatus(.internalError, "tandem: could not encode the response"))
                                return
                            }
                            responder.send(out)
                            responder.finish()
                        case .failure(let e):
                            responder.finish(e)
                        }
                    }
                }
            }
        }

        unary("/etcdserverpb.KV/Range", Etcdserverpb_RangeRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_RangeResponse, EtcdStatus>) -> Void) in
            let q: RangeRequest
            let serializable: Bool
            do throws(EtcdStatus) {
                (q, serializable) = try RangeRequest.from(pb)
            } catch {
                return done(.failure(error))
            }
            if let auth = n.auth, !auth.allows(n.caller, key: q.key, rangeEnd: q.rangeEnd, write: false) {
                return done(.failure(.permissionDenied))
            }
            let serve = {
                do throws(StoreError) {
                    done(.success(Etcdserverpb_RangeResponse(try n.replica.store.range(q), header: n.header)))
                } catch {
                    done(.failure(EtcdStatus(error)))
                }
            }
            if serializable {
                serve()
            } else {
                n.linearizable { r in
                    if case .failure(let e) = r { done(.failure(e)) } else { serve() }
                }
            }
        }
        unary("/tandem.identity.v1.Identity/Issue", Tandem_Identity_V1_IssueRequest.self) {
            (req, n, done: @escaping (Result<Tandem_Identity_V1_IssueResponse, EtcdStatus>) -> Void) in
            guard let id = n.identity else { return done(.failure(EtcdStatus(.unimplemented, "tandem: no identity"))) }
            done(id.issue(req))
        }
        unary("/tandem.identity.v1.Identity/Rotate", Tandem_Identity_V1_RotateRequest.self) {
            (req, n, done: @escaping (Result<Tandem_Identity_V1_RotateResponse, EtcdStatus>) -> Void) in
            guard let id = n.identity else { return done(.failure(EtcdStatus(.unimplemented, "tandem: no identity"))) }
            id.rotate(req, done)
        }
        // The password hash is checked on a global queue (PBKDF2 is slow by design and must not
        // stall the raft or network loops); the session opens on the raft loop.
        m["/etcdserverpb.Auth/Authenticate"] = .unary { bytes, responder in
            let req: Etcdserverpb_AuthenticateRequest
            do throws(EtcdStatus) {
                req = try decodeRequest(Etcdserverpb_AuthenticateRequest.self, bytes, limits: limits)
            } catch {
                return responder.finish(error)
            }
            guard let auth = node.auth else {
                return responder.finish(EtcdStatus(.failedPrecondition, "etcdserver: authentication is not enabled"))
            }
            DispatchQueue.global().async {
                if let refused = auth.checkPassword(name: req.name, password: req.password) {
                    return responder.finish(refused)
                }
                node.loop.execute {
                    var r = Etcdserverpb_AuthenticateResponse()
                    r.header = node.header
                    r.token = auth.openSession(name: req.name, now: RegistryIdentity.wallClock())
                    if let out = try? r.serializedBytes() as [UInt8] { responder.send(out) }
                    responder.finish()
                }
            }
        }
        unary("/etcdserverpb.KV/Put", Etcdserverpb_PutRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_PutResponse, EtcdStatus>) -> Void) in
            let cmd = StoreCommand.put(PutRequest(pb))
            if n.refuseOverQuota(cmd, quota: limits.quotaBackendBytes) { return done(.failure(.noSpace)) }
            write(n, cmd, done) {
                if case .put(let r) = $0 { return Etcdserverpb_PutResponse(r, header: n.header) } else { return nil }
            }
        }
        unary("/etcdserverpb.KV/DeleteRange", Etcdserverpb_DeleteRangeRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_DeleteRangeResponse, EtcdStatus>) -> Void) in
            write(n, .deleteRange(DeleteRangeRequest(pb)), done) {
                if case .deleteRange(let r) = $0 { return Etcdserverpb_DeleteRangeResponse(r, header: n.header) }
                return nil
            }
        }
        unary("/etcdserverpb.KV/Txn", Etcdserverpb_TxnRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_TxnResponse, EtcdStatus>) -> Void) in
            let t: TxnRequest
            do throws(EtcdStatus) {
                t = try TxnRequest.from(pb, limits: limits)
            } catch {
                return done(.failure(error))
            }
            if MVCCStore.bytesWritten(.txn(t)) > 0, n.refuseOverQuota(.txn(t), quota: limits.quotaBackendBytes) {
                return done(.failure(.noSpace))
            }
            write(n, .txn(t), done) {
                if case .txn(let r) = $0 { return Etcdserverpb_TxnResponse(r, header: n.header) } else { return nil }
            }
        }
        unary("/etcdserverpb.KV/Compact", Etcdserverpb_CompactionRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_CompactionResponse, EtcdStatus>) -> Void) in
            write(n, .compact(revision: pb.revision), done) {
                guard case .compact(let rev) = $0 else { return nil }
                var r = Etcdserverpb_CompactionResponse()
                r.header = n.header.with(revision: rev)
                return r
            }
        }
        unary("/etcdserverpb.Lease/LeaseGrant", Etcdserverpb_LeaseGrantRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_LeaseGrantResponse, EtcdStatus>) -> Void) in
            let id = pb.id != 0 ? pb.id : n.newLeaseID()
            let cmd = StoreCommand.leaseGrant(id: id, ttl: pb.ttl)
            if n.refuseOverQuota(cmd, quota: limits.quotaBackendBytes) { return done(.failure(.noSpace)) }
            write(n, cmd, done) {
                guard case .leaseGrant(let id, let ttl, let rev) = $0 else { return nil }
                var r = Etcdserverpb_LeaseGrantResponse()
                r.header = n.header.with(revision: rev)
                r.id = id
                r.ttl = ttl
                return r
            }
        }
        unary("/etcdserverpb.Lease/LeaseRevoke", Etcdserverpb_LeaseRevokeRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_LeaseRevokeResponse, EtcdStatus>) -> Void) in
            write(n, .leaseRevoke(id: pb.id), done) {
                guard case .leaseRevoke(let rev) = $0 else { return nil }
                var r = Etcdserverpb_LeaseRevokeResponse()
                r.header = n.header.with(revision: rev)
                return r
            }
        }
        unary("/etcdserverpb.Lease/LeaseTimeToLive", Etcdserverpb_LeaseTimeToLiveRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_LeaseTimeToLiveResponse, EtcdStatus>) -> Void) in
            n.linearizable { r in
                if case .failure(let e) = r { return done(.failure(e)) }
                var resp = Etcdserverpb_LeaseTimeToLiveResponse()
                resp.header = n.header
                resp.id = pb.id
                // etcd answers an unknown lease with TTL -1, not an error.
                guard let t = n.replica.leaseTimeToLive(pb.id, now: n.now) else {
                    resp.ttl = -1
                    return done(.success(resp))
                }
                resp.grantedTtl = t.granted
                if pb.keys { resp.keys = t.keys.map { Data($0) } }
                // Only the leader's lease clock knows the remaining time.
                n.leaseRemaining(pb.id) { secs in
                    resp.ttl = secs
                    done(.success(resp))
                }
            }
        }
        unary("/etcdserverpb.Lease/LeaseLeases", Etcdserverpb_LeaseLeasesRequest.self) {
            (_, n, done: @escaping (Result<Etcdserverpb_LeaseLeasesResponse, EtcdStatus>) -> Void) in
            var resp = Etcdserverpb_LeaseLeasesResponse()
            resp.header = n.header
            resp.leases = n.replica.store.leaseIDs.map {
                var s = Etcdserverpb_LeaseStatus()
                s.id = $0
                return s
            }
            done(.success(resp))
        }
        m["/etcdserverpb.Lease/LeaseKeepAlive"] = .bidi(open: { responder in
            node.loop.execute {
                if let refused = node.authorize("/etcdserverpb.Lease/LeaseKeepAlive", token: responder.authToken) {
                    node.caller = nil
                    return responder.finish(refused)
                }
                node.caller = nil
            }
            return GRPCStreamSink(
                message: { bytes in
                    guard let req = try? decodeRequest(Etcdserverpb_LeaseKeepAliveRequest.self, bytes, limits: limits)
                    else { return responder.finish(EtcdStatus(.invalidArgument, "etcdserver: malformed keep-alive")) }
                    node.loop.execute {
                        node.renewLease(req.id) { ttl in
                            var resp = Etcdserverpb_LeaseKeepAliveResponse()
                            resp.header = node.header
                            resp.id = req.id
                            // etcd answers TTL 0 for an unknown or expired lease.
                            resp.ttl = ttl
                            if let out = try? resp.serializedBytes() as [UInt8] { responder.send(out) }
                        }
                    }
                },
                // Through the raft loop, so the answers to earlier messages go out first.
                end: { node.loop.execute { responder.finish() } })
        })
        m["/etcdserverpb.Watch/Watch"] = .bidi(open: { responder in
            let stream = NIOLockedValueBox(0)
            // Who opened the stream: every create is checked against their read permissions.
            let caller = NIOLockedValueBox<RegistryAuth.Principal?>(nil)
            node.loop.execute {
                if let refused = node.authorize("/etcdserverpb.Watch/Watch", token: responder.authToken) {
                    return responder.finish(refused)
                }
                caller.withLockedValue { $0 = node.caller }
                node.caller = nil
                let id = node.openWatchStream(responder)
                stream.withLockedValue { $0 = id }
            }
            responder.onClose { node.loop.execute { node.closeWatchStream(stream.withLockedValue { $0 }) } }
            return GRPCStreamSink(
                message: { bytes in
                    guard let req = try? decodeRequest(Etcdserverpb_WatchRequest.self, bytes, limits: limits) else {
                        return responder.finish(EtcdStatus(.invalidArgument, "etcdserver: malformed watch request"))
                    }
                    node.loop.execute {
                        node.withWatchStream(stream.withLockedValue { $0 }) { hub, store in
                            switch req.requestUnion {
                            case .createRequest(let c)?:
                                let w = WatchRequest(c)
                                if let auth = node.auth,
                                    !auth.allows(
                                        caller.withLockedValue { $0 }, key: w.key, rangeEnd: w.rangeEnd, write: false)
                                {
                                    hub.refuse(
                                        watchID: c.watchID, reason: "etcdserver: permission denied", store: store)
                                    return
                                }
                                do {
                                    try hub.create(w, store: store)
                                } catch {
                                    // etcd answers a refused create with created + canceled.
                                    hub.refuse(watchID: c.watchID, reason: "\(error)", store: store)
                                }
                            case .cancelRequest(let c)?:
                                hub.cancel(c.watchID, store: store)
                            case .progressRequest?:
                                hub.requestProgress()
                            case nil:
                                break
                            }
                        }
                    }
                },
                // Through the raft loop, so the answers to earlier messages go out first.
                end: { node.loop.execute { responder.finish() } })
        })
        unary("/etcdserverpb.Maintenance/Status", Etcdserverpb_StatusRequest.self) {
            (_, n, done: @escaping (Result<Etcdserverpb_StatusResponse, EtcdStatus>) -> Void) in
            var r = Etcdserverpb_StatusResponse()
            r.header = n.header
            r.version = RegistryServer.etcdVersion
            r.leader = n.replica.raft.leader
            r.raftIndex = n.replica.raft.commitIndex
            r.raftTerm = n.replica.raft.term
            r.raftAppliedIndex = n.replica.raft.appliedIndex
            r.isLearner = n.replica.raft.isLearner
            r.dbSize = Int64(n.replica.log.bytesWritten)
            r.dbSizeInUse = Int64(n.replica.store.approximateBytes)
            // etcd lists the alarms raised, as Go's protobuf text of each AlarmMember.
            r.errors = n.replica.store.alarms.sorted().map {
                "memberID:\($0.memberID) alarm:\($0.kind == .noSpace ? "NOSPACE" : "CORRUPT") "
            }
            done(.success(r))
        }
        unary("/etcdserverpb.Maintenance/Alarm", Etcdserverpb_AlarmRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_AlarmResponse, EtcdStatus>) -> Void) in
            // etcd's alarms go through raft: raised on one member, seen and lifted on all.
            func answer(_ alarms: [StoreAlarm]) {
                var r = Etcdserverpb_AlarmResponse()
                r.header = n.header
                r.alarms = alarms.map { a in
                    var m = Etcdserverpb_AlarmMember()
                    m.memberID = a.memberID
                    m.alarm = Etcdserverpb_AlarmType(rawValue: Int(a.kind.rawValue)) ?? .none
                    return m
                }
                done(.success(r))
            }
            // The raised alarms of the type asked for (NONE: every type), as etcd's alarmStore.Get.
            let ofType = n.replica.store.alarms.sorted().filter {
                pb.alarm == .none || Int($0.kind.rawValue) == pb.alarm.rawValue
            }
            // Which a request names: member 0 matches any (etcdctl's `alarm disarm` lifts every
            // alarm it listed, one request each).
            let named = ofType.filter { pb.memberID == 0 || $0.memberID == pb.memberID }
            switch pb.action {
            case .get: return answer(ofType)
            case .activate, .deactivate:
                if let auth = n.auth, !auth.isRoot(n.caller) { return done(.failure(.permissionDenied)) }
                let activate = pb.action == .activate
                let targets: [StoreAlarm]
                if activate {
                    guard let kind = StoreAlarm.Kind(rawValue: UInt8(clamping: pb.alarm.rawValue)), pb.memberID != 0
                    else { return done(.failure(EtcdStatus(.invalidArgument, "etcdserver: bad alarm request"))) }
                    targets = [StoreAlarm(memberID: pb.memberID, kind: kind)]
                } else {
                    targets = named
                }
                guard !targets.isEmpty else { return answer([]) }
                var left = targets.count
                var changed: [StoreAlarm] = []
                var failure: EtcdStatus?
                for a in targets {
                    n.propose(.alarm(a, activate: activate)) { r in
                        switch r {
                        case .success(.alarm(changed: true)): changed.append(a)
                        case .success(.failed(let e)): failure = EtcdStatus(e)
                        case .failure(let e): failure = e
                        default: break
                        }
                        left -= 1
                        if left == 0 {
                            if let failure { done(.failure(failure)) } else { answer(changed.sorted()) }
                        }
                    }
                }
            case .UNRECOGNIZED: done(.failure(EtcdStatus(.invalidArgument, "etcdserver: bad alarm request")))
            }
        }
        unary("/etcdserverpb.Cluster/MemberList", Etcdserverpb_MemberListRequest.self) {
            (_, n, done: @escaping (Result<Etcdserverpb_MemberListResponse, EtcdStatus>) -> Void) in
            var r = Etcdserverpb_MemberListResponse()
            r.header = n.header
            r.members = n.memberList()
            done(.success(r))
        }
        unary("/etcdserverpb.Cluster/MemberAdd", Etcdserverpb_MemberAddRequest.self) {
            (pb, n, done: @escaping (Result<Etcdserverpb_MemberAddResponse, EtcdStatus>) -> Void) in
            n.addMember(peerURLs: pb.peerUrls, learner: pb.isLearner) { r in
                done(
                    r.map { id in
                        var out = Etcdserverpb_MemberAddResponse()
                        out.header = n.header
                        out.members = n.memberList()
                        out.member = out.members.first { $0.id == id } ?? Etcdserverpb_Member()
                        return out
                    })
            }
        }
        /// MemberRemove and MemberPromote: the change, then the members as they now are.
        func change<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message & MembersAnswer>(
            _ path: String, _ type: Req.Type, _: Resp.Type,
            _ apply: @escaping @Sendable (RegistryNode, Req, @escaping (Result<Void, EtcdStatus>) -> Void) -> Void
        ) {
            unary(path, type) { (pb, n, done: @escaping (Result<Resp, EtcdStatus>) -> Void) in
                apply(n, pb) { r in
                    done(
                        r.map {
                            var out = Resp()
                            out.header = n.header
                            out.members = n.memberList()
                            return out
                        })
                }
            }
        }
        change(
            "/etcdserverpb.Cluster/MemberRemove", Etcdserverpb_MemberRemoveRequest.self,
            Etcdserverpb_MemberRemoveResponse.self
        ) { n, pb, done in n.removeMember(pb.id, done) }
        change(
            "/etcdserverpb.Cluster/MemberPromote", Etcdserverpb_MemberPromoteRequest.self,
            Etcdserverpb_MemberPromoteResponse.self
        ) { n, pb, done in n.promoteMember(pb.id, done) }
        // grpc.health.v1.Health/Check → HealthCheckResponse{status: SERVING (1)}, hand-encoded.
        m["/grpc.health.v1.Health/Check"] = .unary { _, responder in
            responder.send([0x08, 0x01])
            responder.finish()
        }
        return m
    }

    /// Proposes a write and maps the applied result (or a store error) to a response.
    static func write<Resp>(
        _ n: RegistryNode, _ cmd: StoreCommand, _ done: @escaping (Result<Resp, EtcdStatus>) -> Void,
        _ convert: @escaping (StoreResult) -> Resp?
    ) {
        // The identity records are the members' own (RegistryIdentity): a client that could
        // write there could publish a key and forge tokens.
        if cmd.touches(RegistryIdentity.reservedPrefix) { return done(.failure(.permissionDenied)) }
        if let auth = n.auth, !auth.allows(n.caller, cmd) { return done(.failure(.permissionDenied)) }
        n.propose(cmd) { r in
            switch r {
            case .success(.failed(let e)): done(.failure(EtcdStatus(e)))
            case .success(let res):
                if let out = convert(res) {
                    done(.success(out))
                } else {
                    done(.failure(EtcdStatus(.internalError, "tandem: unexpected result \(res)")))
                }
            case .failure(let e): done(.failure(e))
            }
        }
    }
}

/// The membership answers that carry the member list after a change.
protocol MembersAnswer {
    var header: Etcdserverpb_ResponseHeader { get set }
    var members: [Etcdserverpb_Member] { get set }
}
extension Etcdserverpb_MemberRemoveResponse: MembersAnswer {}
extension Etcdserverpb_MemberPromoteResponse: MembersAnswer {}
