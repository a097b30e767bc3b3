import TandemCore
import Testing

@testable import TandemStore

@Suite("Leases, lessor and watches")
struct LeaseWatchTests {
    @Test("lease: grant clamps to the minimum TTL; revoke deletes every attached key in one revision")
    func grantRevoke() throws {
        var s = MVCCStore()
        #expect(s.apply(.leaseGrant(id: 1, ttl: 1)).result == .leaseGrant(id: 1, ttl: 2, revision: 1))
        #expect(s.apply(.leaseGrant(id: 1, ttl: 5)).result == .failed(.leaseExists))
        #expect(s.apply(.leaseGrant(id: 2, ttl: 9_000_000_001)).result == .failed(.leaseTTLTooLarge))
        s.put("a", "1", lease: 1)
        s.put("b", "1", lease: 1)
        s.put("c", "1")
        #expect(s.lease(1)?.keys == [b("a"), b("b")])
        let before = s.revision
        let (r, events) = s.apply(.leaseRevoke(id: 1))
        #expect(r == .leaseRevoke(revision: before + 1))
        #expect(events.count == 2 && events.allSatisfy { $0.kind == .delete && $0.kv.modRevision == before + 1 })
        #expect(try s.get("a") == nil && s.get("c") != nil)
        #expect(s.apply(.leaseRevoke(id: 1)).result == .failed(.leaseNotFound))
    }

    @Test("lease: re-putting a key under another lease moves it")
    func moveLease() {
        var s = MVCCStore()
        s.apply(.leaseGrant(id: 1, ttl: 10))
        s.apply(.leaseGrant(id: 2, ttl: 10))
        s.put("k", "v", lease: 1)
        s.put("k", "v", lease: 2)
        #expect(s.lease(1)?.keys == [])
        #expect(s.lease(2)?.keys == [b("k")])
        s.apply(.leaseRevoke(id: 1))
        #expect((try? s.get("k")) != nil)
    }

    @Test("lessor: keep-alive extends; expiry is reported only on the leader")
    func lessorBasics() {
        var l = Lessor()
        l.granted(id: 1, ttl: 5, now: 0)
        #expect(l.count == 0)  // not primary: nothing tracked
        l.promote(now: 0, extendMs: 0, leases: [LeaseInfo(id: 1, grantedTTL: 5, checkpointedTTL: 0, keys: [])])
        #expect(l.expired(now: 4_000).isEmpty)
        #expect(l.renew(id: 1, now: 4_000) == 5)
        #expect(l.remainingSeconds(id: 1, now: 4_001) == 5)  // 4,999 ms rounds up, as etcd reports
        #expect(l.remainingSeconds(id: 42, now: 4_001) == -1)
        #expect(l.expired(now: 8_999).isEmpty)
        #expect(l.expired(now: 9_000) == [1])
        // Proposed once; not again until the retry interval passes.
        #expect(l.expired(now: 9_100).isEmpty)
        #expect(l.expired(now: 12_000) == [1])
        #expect(l.renew(id: 1, now: 12_000) == nil)
        l.demote()
        #expect(l.expired(now: 99_000).isEmpty)
    }

    @Test("lessor (etcd #9888): a new leader resumes from the checkpointed TTL, not the full TTL")
    func checkpointedPromotion() {
        var l = Lessor()
        let info = LeaseInfo(id: 1, grantedTTL: 3_600, checkpointedTTL: 60, keys: [])
        l.promote(now: 0, extendMs: 1_000, leases: [info])
        #expect(l.remainingMs(id: 1, now: 0) == 61_000)
        var full = Lessor()
        full.promote(
            now: 0, extendMs: 1_000, leases: [LeaseInfo(id: 1, grantedTTL: 3_600, checkpointedTTL: 0, keys: [])])
        #expect(full.remainingMs(id: 1, now: 0) == 3_601_000)
    }

    @Test("lessor: long leases are checkpointed every interval with their remaining TTL")
    func checkpoints() {
        var l = Lessor()
        l.promote(
            now: 0, extendMs: 0,
            leases: [
                LeaseInfo(id: 1, grantedTTL: 3_600, checkpointedTTL: 0, keys: []),
                LeaseInfo(id: 2, grantedTTL: 10, checkpointedTTL: 0, keys: []),
            ])
        #expect(l.checkpoints(now: 100_000).isEmpty)
        #expect(l.checkpoints(now: 300_000) == [LeaseCheckpoint(id: 1, remainingTTL: 3_300)])
        #expect(l.checkpoints(now: 300_001).isEmpty)
    }

    @Test("lessor (etcd #9360): an expiry storm is revoked at most maxRevokesPerSecond")
    func revokeRateLimit() {
        var limits = Lessor.Limits()
        limits.maxRevokesPerSecond = 100
        var l = Lessor(limits: limits)
        let leases = (1...10_000).map { LeaseInfo(id: Int64($0), grantedTTL: 1, checkpointedTTL: 0, keys: []) }
        l.promote(now: 0, extendMs: 0, leases: leases)
        #expect(l.expired(now: 2_000).count == 100)
        #expect(l.expired(now: 2_500).count == 50)
        var total = 150
        var t: Int64 = 2_500
        while total < 10_000 {
            t += 1_000
            total += l.expired(now: t).count
        }
        // 10,000 expiries take about 100 s, never a burst.
        #expect(t >= 100_000)
    }

    @Test("watch: events from the next revision, filtered by key range, one revision never split")
    func watchBasics() throws {
        var s = MVCCStore()
        var hub = WatchHub()
        let id = try hub.create(WatchRequest(key: b("svc/"), rangeEnd: KeyRange.prefixEnd(b("svc/"))), store: s)
        func apply(_ c: StoreCommand) {
            let (_, ev) = s.apply(c)
            hub.publish(revision: s.revision, events: ev, store: s)
        }
        apply(.put(PutRequest(key: b("svc/a"), value: b("1"))))
        apply(.put(PutRequest(key: b("other"), value: b("1"))))
        apply(
            .txn(
                TxnRequest(success: [
                    .put(PutRequest(key: b("svc/b"), value: b("2"))), .deleteRange(DeleteRangeRequest(key: b("svc/a"))),
                ])))
        let out = hub.take(store: s)
        #expect(out.first == WatchResponse(watchID: id, revision: 1, created: true))
        let events = out.dropFirst().flatMap(\.events)
        #expect(events.map(\.kv.key) == [b("svc/a"), b("svc/b"), b("svc/a")])
        #expect(events.map(\.kind) == [.put, .put, .delete])
        #expect(events.map(\.kv.modRevision) == [2, 4, 4])
        #expect(events.allSatisfy { $0.prevKV == nil })
    }

    @Test("watch: from a past revision it replays history with prev_kv; filters drop puts or deletes")
    func watchHistory() throws {
        var s = MVCCStore()
        for i in 1...5 { s.put("k", "v\(i)") }
        s.apply(.deleteRange(DeleteRangeRequest(key: b("k"))))
        var hub = WatchHub()
        var req = WatchRequest(key: b("k"), startRevision: 3)
        req.prevKV = true
        try hub.create(req, store: s)
        var noPut = WatchRequest(key: b("k"), startRevision: 1)
        noPut.filterNoPut = true
        try hub.create(noPut, store: s)
        let out = hub.take(store: s)
        let first = out.filter { $0.watchID == 1 }.flatMap(\.events)
        #expect(first.map(\.kv.modRevision) == [3, 4, 5, 6, 7])
        #expect(first[0].prevKV?.value == b("v1"))
        #expect(first.last?.kind == .delete && first.last?.prevKV?.value == b("v5"))
        #expect(out.filter { $0.watchID == 2 }.flatMap(\.events).map(\.kind) == [.delete])
    }

    @Test("watch: a watch from below the compacted revision is cancelled with compact_revision")
    func watchCompacted() throws {
        var s = MVCCStore()
        for i in 1...5 { s.put("k", "v\(i)") }
        s.apply(.compact(revision: 4))
        var hub = WatchHub()
        try hub.create(WatchRequest(key: b("k"), startRevision: 2), store: s)
        let out = hub.take(store: s)
        #expect(out.last?.canceled == true)
        #expect(out.last?.compactRevision == 4)
        #expect(hub.count == 0)
    }

    @Test("watch: a slow watcher past its backlog bound is cancelled with the revision to resume from")
    func slowWatcher() throws {
        var s = MVCCStore()
        var limits = WatchHub.Limits()
        limits.maxBacklogEvents = 10
        var hub = WatchHub(limits: limits)
        try hub.create(WatchRequest(key: b("k")), store: s)
        _ = hub.take(store: s)
        for i in 1...11 {
            let (_, ev) = s.apply(.put(PutRequest(key: b("k"), value: b("\(i)"))))
            hub.publish(revision: s.revision, events: ev, store: s)
        }
        let out = hub.take(store: s)
        #expect(out.count == 1 && out[0].canceled)
        #expect(out[0].cancelReason.contains("maxBacklogEvents=10"))
        #expect(out[0].cancelReason.contains("re-watch from revision 2"))
    }

    @Test("watch: catch-up is batched, in order, with no duplicates or gaps, then switches to live")
    func catchUpThenLive() throws {
        var s = MVCCStore()
        for i in 1...50 { s.put("k\(i % 5)", "\(i)") }
        var limits = WatchHub.Limits()
        limits.catchUpRevisions = 7
        limits.maxEventsPerResponse = 4
        var hub = WatchHub(limits: limits)
        try hub.create(WatchRequest(key: [0], rangeEnd: [0], startRevision: 1), store: s)
        var revs: [Int64] = []
        for round in 0..<20 {
            if round == 3 {
                let (_, ev) = s.apply(.put(PutRequest(key: b("late"), value: [])))
                hub.publish(revision: s.revision, events: ev, store: s)
            }
            for r in hub.take(store: s) {
                #expect(r.events.count <= 4)
                revs += r.events.map(\.kv.modRevision)
            }
        }
        #expect(revs == Array(2...52))
    }

    @Test("watch: after a snapshot install skips revisions, live watchers catch up with no gap")
    func resyncAfterSnapshot() throws {
        // A follower's store at revision 3 with a live watcher that has seen everything.
        var follower = MVCCStore()
        follower.put("k", "1")
        follower.put("k", "2")
        var hub = WatchHub()
        try hub.create(WatchRequest(key: b("k")), store: follower)
        _ = hub.take(store: follower)
        // The leader moved on to revision 6; the follower installs its snapshot.
        var leader = follower
        for v in ["3", "4", "5"] { leader.put("k", v) }
        let restored = try MVCCStore(snapshot: leader.snapshot())
        hub.resync(deliveredThrough: follower.revision)
        let events = hub.take(store: restored).flatMap(\.events)
        #expect(events.map(\.kv.modRevision) == [4, 5, 6])
        #expect(events.map { $0.kv.value.utf8String } == ["3", "4", "5"])
        // Without the resync the watcher would stay live and these three would be lost.
        var stale = WatchHub()
        try stale.create(WatchRequest(key: b("k")), store: follower)
        _ = stale.take(store: follower)
        #expect(stale.take(store: restored).flatMap(\.events).isEmpty)
    }

    @Test("watch: progress notifications and WatchProgressRequest")
    func progress() throws {
        let s = MVCCStore()
        var hub = WatchHub()
        var r = WatchRequest(key: b("k"))
        r.progressNotify = true
        try hub.create(r, store: s)
        _ = hub.take(store: s)
        hub.progressTick(store: s)
        #expect(hub.take(store: s) == [WatchResponse(watchID: 1, revision: 1)])
        hub.requestProgress()
        #expect(hub.take(store: s) == [WatchResponse(watchID: -1, revision: 1)])
    }

    @Test("watch limits: watcher count bound and duplicate client ids give clear errors")
    func watchLimits() throws {
        let s = MVCCStore()
        var limits = WatchHub.Limits()
        limits.maxWatchers = 1
        var hub = WatchHub(limits: limits)
        var r = WatchRequest(key: b("k"))
        r.watchID = 5
        try hub.create(r, store: s)
        #expect(throws: WatchError.tooManyWatchers(limit: 1)) { try hub.create(WatchRequest(key: b("x")), store: s) }
        var big = WatchHub()
        try big.create(r, store: s)
        #expect(throws: WatchError.duplicateID(5)) { try big.create(r, store: s) }
    }
}
