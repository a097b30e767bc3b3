import Foundation
import TandemCore
import TandemRaft
import TandemStore
import Testing

@testable import TandemEtcdAPI

private func d(_ s: String) -> Data { Data(s.utf8) }
private func b(_ s: String) -> Bytes { Array(s.utf8) }

@Suite("etcd v3 wire API: field numbers, conversions, errors")
struct EtcdAPITests {
    @Test("wire format: field numbers match etcd 3.4 (checked against hand-encoded bytes)")
    func fieldNumbers() throws {
        var put = Etcdserverpb_PutRequest()
        put.key = d("a")
        put.value = d("b")
        put.lease = 5
        put.prevKv = true
        // key=1 (0x0a), value=2 (0x12), lease=3 (0x18), prev_kv=4 (0x20).
        #expect(Array(try put.serializedBytes() as [UInt8]) == [0x0A, 1, 0x61, 0x12, 1, 0x62, 0x18, 5, 0x20, 1])
        var c = Etcdserverpb_Compare()
        c.target = .value
        c.value = d("x")
        c.rangeEnd = d("z")
        // target=2 (0x10 3), value=7 (0x3a), range_end=64: tag (64<<3)|2 = 514 = varint 0x82 0x04.
        #expect(Array(try c.serializedBytes() as [UInt8]) == [0x10, 3, 0x3A, 1, 0x78, 0x82, 0x04, 1, 0x7A])
        var w = Etcdserverpb_WatchResponse()
        w.watchID = 2
        w.events = [Mvccpb_Event()]
        // watch_id=2 (0x10), events=11: tag (11<<3)|2 = 0x5a.
        #expect(Array(try w.serializedBytes() as [UInt8]) == [0x10, 2, 0x5A, 0])
        var q = Etcdserverpb_RangeRequest()
        q.maxCreateRevision = 1
        // max_create_revision=13: tag 13<<3 = 0x68.
        #expect(Array(try q.serializedBytes() as [UInt8]) == [0x68, 1])
        var g = Etcdserverpb_LeaseTimeToLiveResponse()
        g.grantedTtl = 60
        g.keys = [d("k")]
        // grantedTTL=4 (0x20), keys=5 (0x2a).
        #expect(Array(try g.serializedBytes() as [UInt8]) == [0x20, 60, 0x2A, 1, 0x6B])
    }

    @Test("conversion: an etcdctl-style txn (compares, nested txn, ranges) becomes the store's txn")
    func txnConversion() throws {
        var cmp = Etcdserverpb_Compare()
        cmp.key = d("k")
        cmp.result = .notEqual
        cmp.target = .mod
        cmp.modRevision = 3
        var put = Etcdserverpb_RequestOp()
        put.requestPut.key = d("k")
        put.requestPut.value = d("v")
        var inner = Etcdserverpb_RequestOp()
        inner.requestTxn.success = [put]
        var get = Etcdserverpb_RequestOp()
        get.requestRange.key = d("a")
        get.requestRange.rangeEnd = d("b")
        get.requestRange.sortOrder = .descend
        var pb = Etcdserverpb_TxnRequest()
        pb.compare = [cmp]
        pb.success = [inner, get]
        let t = try TxnRequest.from(pb)
        var rq = RangeRequest(key: b("a"), rangeEnd: b("b"))
        rq.sortOrder = .descend
        #expect(
            t
                == TxnRequest(
                    compare: [Compare(key: b("k"), .notEqual, .modRevision(3))],
                    success: [.txn(TxnRequest(success: [.put(PutRequest(key: b("k"), value: b("v")))])), .range(rq)]))
        // Applied to a store and converted back, headers carry the txn's revision.
        var s = MVCCStore()
        guard case .txn(let r) = s.apply(.txn(t)).result else {
            Issue.record("txn failed")
            return
        }
        var header = Etcdserverpb_ResponseHeader()
        header.clusterID = 7
        let resp = Etcdserverpb_TxnResponse(r, header: header)
        #expect(resp.succeeded && resp.header.revision == 2 && resp.header.clusterID == 7)
        #expect(resp.responses[0].responseTxn.responses[0].responsePut.header.revision == 2)
    }

    @Test("conversion: watch create filters and events with prev_kv")
    func watchConversion() {
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = d("/svc/")
        c.rangeEnd = d("/svc0")
        c.filters = [.noput]
        c.prevKv = true
        c.startRevision = 9
        let w = WatchRequest(c)
        #expect(w.filterNoPut && !w.filterNoDelete && w.prevKV && w.startRevision == 9)
        let e = Event(
            kind: .delete, kv: KeyValue(key: b("/svc/a"), modRevision: 12),
            prevKV: KeyValue(key: b("/svc/a"), value: b("x")))
        let pb = Etcdserverpb_WatchResponse(WatchResponse(watchID: 3, revision: 12, events: [e]), header: .init())
        #expect(pb.events[0].type == .delete && pb.events[0].prevKv.value == d("x") && pb.header.revision == 12)
    }

    @Test("errors: etcd's gRPC codes and exact texts for store errors")
    func statusMapping() {
        #expect(
            EtcdStatus(.compacted) == EtcdStatus(.outOfRange, "etcdserver: mvcc: required revision has been compacted"))
        #expect(EtcdStatus(.leaseNotFound).code == .notFound)
        #expect(
            EtcdStatus(.tooManyOps(limit: 128))
                == EtcdStatus(.invalidArgument, "etcdserver: too many operations in txn request"))
        #expect(EtcdStatus(.duplicateKey).code == .invalidArgument)
        #expect(EtcdStatus.noLeader == EtcdStatus(.unavailable, "etcdserver: no leader"))
        // Raft refusals keep their meaning instead of all becoming "no leader".
        #expect(EtcdStatus(ProposalError.noLeader) == .noLeader)
        #expect(EtcdStatus(ProposalError.notLeader(leader: 2)) == .noLeader)
        #expect(
            EtcdStatus(ProposalError.uncommittedLogFull(limit: 1))
                == EtcdStatus(.resourceExhausted, "etcdserver: too many requests"))
        #expect(
            EtcdStatus(ProposalError.leadershipTransferInProgress)
                == EtcdStatus(.unavailable, "etcdserver: leader changed"))
        #expect(EtcdStatus(ProposalError.learnerNotReady(4)).code == .failedPrecondition)
    }

    @Test("bad input: oversized, malformed, unknown enums and deep nesting get InvalidArgument")
    func badInput() throws {
        var limits = EtcdLimits()
        limits.maxRequestBytes = 8
        #expect(throws: EtcdStatus.requestTooLarge) {
            _ = try decodeRequest(Etcdserverpb_PutRequest.self, Array(repeating: 0, count: 9), limits: limits)
        }
        #expect(throws: EtcdStatus.self) { _ = try decodeRequest(Etcdserverpb_PutRequest.self, [0x0A, 9, 1]) }
        var c = Etcdserverpb_Compare()
        c.target = .UNRECOGNIZED(9)
        #expect(throws: EtcdStatus.self) { _ = try Compare.from(c) }
        var deep = Etcdserverpb_TxnRequest()
        for _ in 0..<10 {
            var op = Etcdserverpb_RequestOp()
            op.requestTxn = deep
            deep = Etcdserverpb_TxnRequest()
            deep.success = [op]
        }
        #expect(throws: EtcdStatus.self) { _ = try TxnRequest.from(deep) }
        var empty = Etcdserverpb_TxnRequest()
        empty.success = [Etcdserverpb_RequestOp()]
        #expect(throws: EtcdStatus(.invalidArgument, "etcdserver: empty operation in txn request")) {
            _ = try TxnRequest.from(empty)
        }
    }
}
