import TandemCore
import Testing

@testable import TandemStore

func b(_ s: String) -> Bytes { Array(s.utf8) }

extension MVCCStore {
    @discardableResult
    mutating func put(_ k: String, _ v: String, lease: Int64 = 0) -> StoreResult {
        apply(.put(PutRequest(key: b(k), value: b(v), lease: lease))).result
    }

    func get(_ k: String, rev: Int64 = 0) throws -> KeyValue? {
        var q = RangeRequest(key: b(k))
        q.revision = rev
        return try range(q).kvs.first
    }
}

@Suite("MVCC key-value store (etcd v3 semantics)")
struct MVCCTests {
    @Test("revisions: one per write; create/mod revision and version per key; reads do not bump")
    func revisions() throws {
        var s = MVCCStore()
        #expect(s.revision == 1)
        s.put("a", "1")
        s.put("a", "2")
        s.put("b", "x")
        let a = try #require(try s.get("a"))
        #expect(a.createRevision == 2 && a.modRevision == 3 && a.version == 2 && a.value == b("2"))
        #expect(s.revision == 4)
        _ = try s.range(.prefix(b("")))
        #expect(s.revision == 4)
    }

    @Test("delete ends a generation: the next put starts at version 1 with a new create revision")
    func generations() throws {
        var s = MVCCStore()
        s.put("k", "1")
        let (r, ev) = s.apply(.deleteRange(DeleteRangeRequest(key: b("k"))))
        guard case .deleteRange(let d) = r else { Issue.record("expected delete"); return }
        #expect(d.deleted == 1)
        #expect(ev.first?.kind == .delete && ev.first?.kv.modRevision == 3)
        #expect(try s.get("k") == nil)
        s.put("k", "2")
        let k = try #require(try s.get("k"))
        #expect(k.version == 1 && k.createRevision == 4)
        // Deleting nothing makes no revision.
        let before = s.revision
        s.apply(.deleteRange(DeleteRangeRequest(key: b("missing"))))
        #expect(s.revision == before)
    }

    @Test("range: prefix, from-key (\\0), limit with more and count, revision, keys_only, count_only")
    func ranges() throws {
        var s = MVCCStore()
        for k in ["a", "b1", "b2", "b3", "c"] { s.put(k, "v-" + k) }
        var q = RangeRequest.prefix(b("b"))
        #expect(try s.range(q).kvs.map(\.key) == [b("b1"), b("b2"), b("b3")])
        q.limit = 2
        let r = try s.range(q)
        #expect(r.kvs.count == 2 && r.more && r.count == 3)
        var from = RangeRequest(key: b("b2"), rangeEnd: [0])
        #expect(try s.range(from).kvs.map(\.key) == [b("b2"), b("b3"), b("c")])
        from.keysOnly = true
        #expect(try s.range(from).kvs.allSatisfy { $0.value.isEmpty })
        from.countOnly = true
        let c = try s.range(from)
        #expect(c.kvs.isEmpty && c.count == 3)
        // count covers the whole range even where results stop being built (past limit+1).
        var big = RangeRequest(key: b("a"), rangeEnd: [0])
        big.limit = 1
        let br = try s.range(big)
        #expect(br.kvs.map(\.key) == [b("a")] && br.more && br.count == 5)
        var all = RangeRequest(key: [0], rangeEnd: [0])
        all.revision = 3
        #expect(try s.range(all).kvs.map(\.key) == [b("a"), b("b1")])
    }

    @Test("range: sort by target and order, min/max mod and create revision filters")
    func sortAndFilters() throws {
        var s = MVCCStore()
        s.put("x", "3")
        s.put("y", "1")
        s.put("z", "2")
        s.put("x", "9")
        var q = RangeRequest.prefix(b(""))
        q.sortTarget = .value
        q.sortOrder = .descend
        #expect(try s.range(q).kvs.map(\.key) == [b("x"), b("z"), b("y")])
        q.sortTarget = .mod
        q.sortOrder = .ascend
        #expect(try s.range(q).kvs.map(\.key) == [b("y"), b("z"), b("x")])
        var f = RangeRequest.prefix(b(""))
        f.minModRevision = 4
        #expect(try s.range(f).kvs.map(\.key) == [b("x"), b("z")])
        f = RangeRequest.prefix(b(""))
        f.maxCreateRevision = 3
        #expect(try s.range(f).kvs.map(\.key) == [b("x"), b("y")])
    }

    @Test("put: prev_kv, ignore_value and ignore_lease, and their errors")
    func putOptions() throws {
        var s = MVCCStore()
        s.apply(.leaseGrant(id: 7, ttl: 10))
        s.put("k", "v1", lease: 7)
        var p = PutRequest(key: b("k"), value: b("v2"))
        p.prevKV = true
        p.ignoreLease = true
        guard case .put(let r) = s.apply(.put(p)).result else { Issue.record("put failed"); return }
        #expect(r.prevKV?.value == b("v1"))
        #expect(try s.get("k")?.lease == 7)
        var iv = PutRequest(key: b("k"), value: [])
        iv.ignoreValue = true
        s.apply(.put(iv))
        #expect(try s.get("k")?.value == b("v2"))
        var missing = PutRequest(key: b("nope"), value: [])
        missing.ignoreValue = true
        #expect(s.apply(.put(missing)).result == .failed(.keyNotFound))
        #expect(s.put("q", "v", lease: 99) == .failed(.leaseNotFound))
        #expect(StoreError.leaseNotFound.message == "etcdserver: requested lease not found")
    }

    @Test("txn: compare on value, version, create and mod revision, lease; success and failure branches")
    func txn() throws {
        var s = MVCCStore()
        s.put("k", "v")
        let t = TxnRequest(
            compare: [
                Compare(key: b("k"), .equal, .value(b("v"))), Compare(key: b("k"), .equal, .version(1)),
                Compare(key: b("k"), .greater, .createRevision(1)), Compare(key: b("k"), .less, .modRevision(3)),
                Compare(key: b("k"), .equal, .lease(0)),
            ],
            success: [.put(PutRequest(key: b("k"), value: b("w"))), .range(RangeRequest(key: b("k")))],
            failure: [.range(RangeRequest(key: b("k")))])
        guard case .txn(let r) = s.apply(.txn(t)).result else { Issue.record("txn failed"); return }
        #expect(r.succeeded)
        // Reads inside a txn see its own earlier writes, at the txn's revision.
        guard case .range(let rr) = r.responses[1] else { Issue.record("range"); return }
        #expect(rr.kvs.first?.value == b("w"))
        #expect(r.revision == 3 && rr.revision == 3)
        guard case .txn(let again) = s.apply(.txn(t)).result else { Issue.record("txn failed"); return }
        #expect(!again.succeeded)
        // A value comparison against a missing key is false (etcd).
        let missing = TxnRequest(compare: [Compare(key: b("none"), .notEqual, .value(b("x")))])
        guard case .txn(let m) = s.apply(.txn(missing)).result else { Issue.record("txn"); return }
        #expect(!m.succeeded)
    }

    @Test("txn: one revision for the whole txn; events in op order")
    func txnAtomicRevision() {
        var s = MVCCStore()
        let t = TxnRequest(success: [
            .put(PutRequest(key: b("a"), value: b("1"))), .put(PutRequest(key: b("b"), value: b("2"))),
        ])
        let (_, events) = s.apply(.txn(t))
        #expect(s.revision == 2)
        #expect(events.map(\.kv.key) == [b("a"), b("b")])
        #expect(events.allSatisfy { $0.kv.modRevision == 2 })
    }

    @Test("txn limits: more than 128 ops and a key written twice are refused with etcd's messages")
    func txnLimits() {
        var s = MVCCStore()
        let many = TxnRequest(success: (0..<129).map { .put(PutRequest(key: b("k\($0)"), value: [])) })
        #expect(s.apply(.txn(many)).result == .failed(.tooManyOps(limit: 128)))
        #expect(StoreError.tooManyOps(limit: 128).message == "etcdserver: too many operations in txn request")
        let dup = TxnRequest(success: [
            .put(PutRequest(key: b("k"), value: [])), .deleteRange(DeleteRangeRequest(key: b("a"), rangeEnd: b("z"))),
        ])
        #expect(s.apply(.txn(dup)).result == .failed(.duplicateKey))
        #expect(StoreError.duplicateKey.message == "etcdserver: duplicate key given in txn request")
        #expect(s.revision == 1)
    }

    @Test("txn: a failing op rolls back the txn's earlier writes")
    func txnRollback() throws {
        var s = MVCCStore()
        let t = TxnRequest(success: [
            .put(PutRequest(key: b("a"), value: b("1"))), .put(PutRequest(key: b("b"), value: b("2"), lease: 42)),
        ])
        #expect(s.apply(.txn(t)).result == .failed(.leaseNotFound))
        #expect(try s.get("a") == nil)
        #expect(s.revision == 1)
        #expect(s.keyCount == 0)
    }

    @Test("compaction: reads below it fail as compacted, above current as future; latest values survive")
    func compaction() throws {
        var s = MVCCStore()
        s.put("a", "1")  // rev 2
        s.put("a", "2")  // rev 3
        s.put("b", "1")  // rev 4
        s.apply(.deleteRange(DeleteRangeRequest(key: b("b"))))  // rev 5
        #expect(s.apply(.compact(revision: 4)).result == .compact(revision: 5))
        #expect(throws: StoreError.compacted) { try s.get("a", rev: 2) }
        #expect(try s.get("a", rev: 4)?.value == b("2"))
        #expect(try s.get("b", rev: 4)?.value == b("1"))
        #expect(throws: StoreError.futureRevision) { try s.get("a", rev: 6) }
        #expect(s.apply(.compact(revision: 3)).result == .failed(.compacted))
        #expect(s.apply(.compact(revision: 9)).result == .failed(.futureRevision))
        #expect(StoreError.compacted.message == "etcdserver: mvcc: required revision has been compacted")
        // A tombstone exactly at the compacted revision stays, so reads at 5 are right.
        s.apply(.compact(revision: 5))
        #expect(try s.get("b", rev: 5) == nil)
        #expect(s.keyCount == 2)
        s.put("c", "1")
        s.apply(.compact(revision: 6))
        #expect(s.keyCount == 2)  // a, c: b's generation is gone for good
    }

    @Test("snapshot: restoring gives the same reads at every retained revision, and the same future")
    func snapshotRoundTrip() throws {
        var s = MVCCStore()
        s.apply(.leaseGrant(id: 5, ttl: 30))
        for i in 0..<20 { s.put("k\(i % 4)", "v\(i)", lease: i % 3 == 0 ? 5 : 0) }
        s.apply(.deleteRange(DeleteRangeRequest(key: b("k1"))))
        s.apply(.compact(revision: 8))
        var r = try MVCCStore(snapshot: s.snapshot())
        for rev in Int64(8)...s.revision {
            var q = RangeRequest.prefix(b("k"))
            q.revision = rev
            #expect(try r.range(q) == s.range(q))
        }
        #expect(r.lease(5) == s.lease(5))
        #expect(r.compactRevision == 8)
        s.put("new", "x")
        r.put("new", "x")
        #expect(try r.range(.prefix(b(""))) == s.range(.prefix(b(""))))
        #expect(r.snapshot() == s.snapshot())
        #expect(throws: CodecError.self) { try MVCCStore(snapshot: [1, 2, 3]) }
    }

    @Test("member records: outside the key space (no revision, no events), kept by snapshots, bounded")
    func memberRecordsStayOutOfTheKeySpace() throws {
        var s = MVCCStore()
        s.put("a", "1")
        let rev = s.revision
        let out = s.apply(.memberAttributes(id: 7, record: b(#"{"name":"r1"}"#)))
        #expect(out.result == .memberAttributes && out.events.isEmpty)
        #expect(s.revision == rev)
        #expect(try s.range(.prefix(b(""))).kvs.count == 1)
        let r = try MVCCStore(snapshot: s.snapshot())
        #expect(r.memberRecords == [7: b(#"{"name":"r1"}"#)])
        // A format-1 snapshot (before member records) still restores, with none.
        var old = s.snapshot()
        old[0] = 1
        var tail = ByteWriter()
        tail.varint(1)
        tail.varint(7)
        tail.blob(b(#"{"name":"r1"}"#))
        tail.varint(0)  // format 3's alarms
        #expect(Array(old.suffix(tail.bytes.count)) == tail.bytes)
        old.removeLast(tail.bytes.count)
        let restored = try MVCCStore(snapshot: old)
        #expect(restored.memberRecords.isEmpty && restored.revision == s.revision)
        for id in 100..<UInt64(100 + MVCCStore.maxMemberRecords) { s.apply(.memberAttributes(id: id, record: [])) }
        #expect(s.apply(.memberAttributes(id: 1, record: [])).result == .failed(.tooManyMembers))
        #expect(s.apply(.memberAttributes(id: 7, record: [])).result == .memberAttributes)  // updates still apply
    }

    @Test(
        "a membership change lists an added member by its peer URLs until it publishes; removal drops it and its alarms"
    )
    func membershipChangesKeepMemberRecords() throws {
        var s = MVCCStore()
        let rev = s.revision
        s.memberChanged(5, added: b(#"{"name":"","peer_urls":["http://10.0.0.5:2380"]}"#))
        #expect(s.memberRecords[5] == b(#"{"name":"","peer_urls":["http://10.0.0.5:2380"]}"#))
        // The member's own record (published once it starts) wins over what its addition carried.
        _ = s.apply(.memberAttributes(id: 5, record: b(#"{"name":"r5"}"#)))
        s.memberChanged(5, added: b(#"{"name":""}"#))
        #expect(s.memberRecords[5] == b(#"{"name":"r5"}"#))
        _ = s.apply(.alarm(StoreAlarm(memberID: 5, kind: .noSpace), activate: true))
        _ = s.apply(.alarm(StoreAlarm(memberID: 6, kind: .noSpace), activate: true))
        var r = try MVCCStore(snapshot: s.snapshot())
        #expect(r.memberRecords[5] == b(#"{"name":"r5"}"#))
        r.memberChanged(5, added: nil)
        #expect(r.memberRecords[5] == nil && r.alarms == [StoreAlarm(memberID: 6, kind: .noSpace)])
        #expect(r.revision == rev)
    }

    @Test("NOSPACE alarm: replicated state, sticky until lifted, refuses what takes space, kept by snapshots")
    func noSpaceAlarmCapsWrites() throws {
        var s = MVCCStore()
        s.put("a", "1")
        let rev = s.revision
        let alarm = StoreAlarm(memberID: 9, kind: .noSpace)
        #expect(s.apply(.alarm(alarm, activate: true)).result == .alarm(changed: true))
        #expect(s.apply(.alarm(alarm, activate: true)).result == .alarm(changed: false))
        #expect(s.revision == rev && s.noSpace)
        // What takes space is refused; reads, deletes, put-free txns and compaction are not.
        #expect(s.apply(.put(PutRequest(key: b("b"), value: b("2")))).result == .failed(.noSpace))
        #expect(s.apply(.leaseGrant(id: 1, ttl: 60)).result == .failed(.noSpace))
        let putTxn = TxnRequest(success: [.put(PutRequest(key: b("b"), value: b("2")))])
        #expect(s.apply(.txn(putTxn)).result == .failed(.noSpace))
        let readTxn = TxnRequest(success: [.range(RangeRequest.prefix(b("")))])
        if case .txn = s.apply(.txn(readTxn)).result {} else { Issue.record("a read-only txn was refused") }
        if case .deleteRange = s.apply(.deleteRange(DeleteRangeRequest(key: b("a")))).result {
        } else {
            Issue.record("a delete was refused")
        }
        #expect(s.apply(.compact(revision: s.revision)).result == .compact(revision: s.revision))
        // Space reclaimed, still refused: sticky. A snapshot keeps it.
        #expect(s.apply(.put(PutRequest(key: b("b"), value: b("2")))).result == .failed(.noSpace))
        var r = try MVCCStore(snapshot: s.snapshot())
        #expect(r.alarms == [alarm])
        #expect(r.apply(.alarm(alarm, activate: false)).result == .alarm(changed: true))
        #expect(r.apply(.alarm(alarm, activate: false)).result == .alarm(changed: false))
        if case .put = r.apply(.put(PutRequest(key: b("b"), value: b("2")))).result {
        } else {
            Issue.record("a put was refused after the alarm was lifted")
        }
        #expect(try MVCCStore(snapshot: r.snapshot()).alarms.isEmpty)
    }

    @Test("commands: every store command round-trips through its Raft encoding")
    func commandCodec() throws {
        var rq = RangeRequest.prefix(b("p"))
        rq.sortOrder = .descend
        rq.limit = 3
        let cmds: [StoreCommand] = [
            .put(PutRequest(key: b("k"), value: b("v"), lease: 3)),
            .deleteRange(DeleteRangeRequest(key: b("a"), rangeEnd: b("b"))),
            .txn(
                TxnRequest(
                    compare: [Compare(key: b("k"), .less, .modRevision(9))],
                    success: [.range(rq), .txn(TxnRequest(success: [.put(PutRequest(key: b("x"), value: []))]))],
                    failure: [.deleteRange(DeleteRangeRequest(key: b("k")))])),
            .compact(revision: 12), .leaseGrant(id: -4, ttl: 60), .leaseRevoke(id: 8),
            .leaseCheckpoint([LeaseCheckpoint(id: 1, remainingTTL: 20)]),
            .memberAttributes(id: 0x8181_1b76_0fa8_5476, record: b(#"{"name":"r1"}"#)),
            .alarm(StoreAlarm(memberID: 0x8181_1b76_0fa8_5476, kind: .noSpace), activate: true),
            .alarm(StoreAlarm(memberID: 3, kind: .corrupt), activate: false),
        ]
        for c in cmds {
            let p = StoreProposal(requestID: 77, command: c)
            #expect(try StoreProposal(decoding: p.encoded()) == p)
        }
        #expect(throws: CodecError.self) { try StoreProposal(decoding: [1, 99]) }
    }
}

@Suite("Exactly-once apply (Raft thesis §6.3)")
struct ExactlyOnceTests {
    @Test("a proposal applied twice (a duplicated forward) takes effect once")
    func duplicateRequest() throws {
        var s = MVCCStore()
        let write = StoreCommand.put(PutRequest(key: b("k"), value: b("v1")))
        #expect(s.apply(write, requestID: 7) != nil)
        s.put("k", "v2")
        // The same request delivered again must not resurrect v1 over v2.
        #expect(s.apply(write, requestID: 7) == nil)
        #expect(try s.get("k")?.value == b("v2"))
        // Internal proposals (id 0) are not deduplicated.
        #expect(s.apply(.compact(revision: 2), requestID: 0) != nil)
    }

    @Test("the memory of applied requests is bounded and survives a snapshot")
    func boundedAndSnapshotted() throws {
        var limits = MVCCStore.Limits()
        limits.maxRememberedRequests = 3
        var s = MVCCStore(limits: limits)
        for id in UInt64(1)...5 { s.apply(.put(PutRequest(key: b("k"), value: b("\(id)"))), requestID: id) }
        // Ids 1 and 2 were forgotten (oldest first); 3...5 are remembered.
        #expect(s.apply(.put(PutRequest(key: b("x"), value: [])), requestID: 5) == nil)
        var r = try MVCCStore(snapshot: s.snapshot(), limits: limits)
        #expect(r.apply(.put(PutRequest(key: b("x"), value: [])), requestID: 4) == nil)
        #expect(r.apply(.put(PutRequest(key: b("x"), value: [])), requestID: 1) != nil)
    }
}

@Suite("The store's size for the backend quota")
struct StoreSizeTests {
    /// The size from scratch: every version kept, key + value + overhead.
    func recomputed(_ s: MVCCStore) -> Int {
        s.index.entries.reduce(0) { sum, e in sum + e.versions.reduce(0) { $0 + MVCCStore.cost(e.key, $1) } }
    }

    @Test("kept up to date through puts, deletes, failed txns and compaction; equal after restore")
    func incrementalSizeMatchesARecount() throws {
        var s = MVCCStore()
        var g = SeededRandom(seed: 42)
        for i in 0..<3_000 {
            let key = "k\(g.next() % 50)"
            switch g.next() % 10 {
            case 0..<6: s.put(key, String(repeating: "v", count: Int(g.next() % 200)))
            case 6..<8: _ = s.apply(.deleteRange(DeleteRangeRequest(key: b(key))))
            case 8:
                // A txn that fails half-way (unknown lease): its first put is rolled back.
                _ = s.apply(
                    .txn(
                        TxnRequest(success: [
                            .put(PutRequest(key: b(key), value: b("tx"))),
                            .put(PutRequest(key: b("x"), value: b("y"), lease: 999)),
                        ])))
            default:
                if i % 7 == 0 { _ = s.apply(.compact(revision: max(1, s.revision - 20))) }
            }
            #expect(s.approximateBytes == recomputed(s), "after op \(i)")
        }
        let restored = try MVCCStore(snapshot: s.snapshot())
        #expect(restored.approximateBytes == recomputed(restored))
        #expect(restored.approximateBytes == s.approximateBytes)
    }

    @Test("the quota check counts what a command could add: puts, the larger txn branch, nothing for deletes")
    func quotaCheck() {
        var s = MVCCStore()
        s.put("a", String(repeating: "x", count: 900))  // 1 + 900 + 64 = 965 bytes held
        let quota: Int64 = 2_000
        let small = StoreCommand.put(PutRequest(key: b("b"), value: Array(repeating: 1, count: 800)))
        let big = StoreCommand.put(PutRequest(key: b("b"), value: Array(repeating: 1, count: 1_000)))
        #expect(!s.wouldExceed(quota: quota, with: small))
        #expect(s.wouldExceed(quota: quota, with: big))
        let txn = StoreCommand.txn(
            TxnRequest(
                success: [.put(PutRequest(key: b("c"), value: [1]))],
                failure: [
                    .txn(TxnRequest(success: [.put(PutRequest(key: b("d"), value: Array(repeating: 1, count: 1_000)))]))
                ]))
        #expect(MVCCStore.bytesWritten(txn) == 1 + 1_000 + MVCCStore.versionOverhead)
        #expect(s.wouldExceed(quota: quota, with: txn))
        #expect(MVCCStore.bytesWritten(.deleteRange(DeleteRangeRequest(key: b("a")))) == 0)
    }

    @Test("deleting and compacting gives the space back")
    func compactionShrinks() {
        var s = MVCCStore()
        for i in 0..<100 { s.put("k\(i)", String(repeating: "x", count: 1000)) }
        let full = s.approximateBytes
        #expect(full >= 100_000)
        for i in 0..<100 { _ = s.apply(.deleteRange(DeleteRangeRequest(key: b("k\(i)")))) }
        #expect(s.approximateBytes > full)  // tombstones are versions too, until compaction
        _ = s.apply(.compact(revision: s.revision))
        // Only the tombstone written at the compacted revision itself stays (etcd keeps it).
        #expect(s.approximateBytes == "k99".utf8.count + MVCCStore.versionOverhead)
    }
}

@Suite("Auto-compaction decisions (etcd's periodic and revision modes)")
struct AutoCompactorTests {
    @Test("revision mode keeps the last N revisions, checked on its interval")
    func revisionMode() {
        var c = AutoCompactor(.revision(keep: 100), checkEveryMs: 1_000)
        #expect(c.tick(now: 0, revision: 50, compacted: 0) == nil)  // nothing old enough
        #expect(c.tick(now: 500, revision: 500, compacted: 0) == nil)  // not time to check yet
        #expect(c.tick(now: 1_000, revision: 500, compacted: 0) == 400)
        #expect(c.tick(now: 2_000, revision: 450, compacted: 400) == nil)  // nothing new to drop
        #expect(c.tick(now: 3_000, revision: 1_000, compacted: 400) == 900)
    }

    @Test("periodic mode compacts to the revision it sampled one retention ago")
    func periodicMode() {
        var c = AutoCompactor(.periodic(retentionMs: 60_000))  // samples every 6 s
        var compactedTo: [Int64] = []
        var compacted: Int64 = 0
        for t in stride(from: Int64(0), through: 180_000, by: 1_000) {
            let revision = 1 + t / 100  // 10 writes a second
            if let r = c.tick(now: t, revision: revision, compacted: compacted) {
                compactedTo.append(r)
                compacted = r
                #expect(revision - r >= 600 && revision - r <= 660, "kept \(revision - r) revisions at \(t) ms")
            }
        }
        #expect(compactedTo.first == 1)  // at 60 s: the revision sampled at 0 s
        #expect(compactedTo.count == 21)  // one per sample from 60 s to 180 s
        c.reset()
        #expect(c.tick(now: 181_000, revision: 2_000, compacted: compacted) == nil)  // a fresh window
    }
}
