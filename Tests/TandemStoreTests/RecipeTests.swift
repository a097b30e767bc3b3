import TandemCore
import Testing

@testable import TandemStore

/// Drives lock recipes against a real store, synchronously, like a client would.
struct RecipeDriver {
    var store = MVCCStore()
    var hub = WatchHub()
    /// Watches waiting for a delete: watch id → client index.
    var waiting: [Int64: Int] = [:]
    var locks: [LockRecipe] = []
    var outcome: [Int: LockRecipe.Step] = [:]
    var watchesOpened = 0

    mutating func apply(_ c: StoreCommand) -> StoreResult {
        let (r, ev) = store.apply(c)
        hub.publish(revision: store.revision, events: ev, store: store)
        return r
    }

    mutating func run(_ client: Int, _ step: LockRecipe.Step) {
        var step = step
        while true {
            switch step {
            case .send(let txn):
                guard case .txn(let r) = apply(.txn(txn)) else { fatalError("txn failed") }
                step = locks[client].handle(txn: r)
            case .range(let q):
                step = locks[client].handle(range: try! store.range(q))
            case .waitForDelete(let key, let rev):
                var w = WatchRequest(key: key, startRevision: rev)
                w.filterNoPut = true
                let id = try! hub.create(w, store: store)
                watchesOpened += 1
                waiting[id] = client
                return
            case .acquired, .lost:
                outcome[client] = step
                return
            }
        }
    }

    /// Delivers watch events; a waiter whose predecessor was deleted looks again.
    mutating func pump() {
        var progressed = true
        while progressed {
            progressed = false
            for r in hub.take(store: store) where !r.events.isEmpty {
                guard let c = waiting.removeValue(forKey: r.watchID) else { continue }
                hub.cancel(r.watchID, store: store)
                run(c, locks[c].predecessorDeleted())
                progressed = true
            }
        }
    }
}

@Suite("Recipes: registration, lock and election (etcd concurrency semantics)")
struct RecipeTests {
    @Test("registration: instances live under /tandem/services/<service>/ and vanish with their lease")
    func registration() throws {
        var s = MVCCStore()
        s.apply(.leaseGrant(id: 10, ttl: 5))
        s.apply(
            .put(ServiceRegistry.register(service: "users", instance: "i-1", value: b("{\"port\":8080}"), lease: 10)))
        s.apply(.put(ServiceRegistry.register(service: "users", instance: "i-2", value: b("{}"), lease: 10)))
        s.apply(.put(ServiceRegistry.register(service: "usersx", instance: "i-9", value: b("{}"), lease: 0)))
        let found = try s.range(ServiceRegistry.instances(of: "users")).kvs.map { $0.key.utf8String }
        #expect(found == ["/tandem/services/users/i-1", "/tandem/services/users/i-2"])
        s.apply(.leaseRevoke(id: 10))
        #expect(try s.range(ServiceRegistry.instances(of: "users")).kvs.isEmpty)
    }

    @Test("lock: mutual exclusion in create-revision order; each waiter watches only its predecessor")
    func lockQueue() {
        var d = RecipeDriver()
        for c in 0..<4 {
            _ = d.apply(.leaseGrant(id: Int64(100 + c), ttl: 60))
            d.locks.append(LockRecipe(prefix: "/locks/job", lease: Int64(100 + c)))
            d.run(c, d.locks[c].start())
        }
        guard case .acquired(let t0) = d.outcome[0] else { Issue.record("first should hold"); return }
        #expect(d.outcome.count == 1)
        #expect(d.watchesOpened == 3)  // no thundering herd: one watch per waiter
        var tokens = [t0]
        for holder in 0..<3 {
            _ = d.apply(.deleteRange(d.locks[holder].unlock()))
            d.pump()
            guard case .acquired(let t) = d.outcome[holder + 1] else {
                Issue.record("client \(holder + 1) should hold after \(holder) unlocked")
                return
            }
            tokens.append(t)
            #expect(
                d.outcome.values.filter { if case .acquired = $0 { return true } else { return false } }.count == holder
                    + 2)
        }
        // Fencing tokens increase with each holder.
        #expect(tokens == tokens.sorted() && Set(tokens).count == 4)
    }

    @Test("lock: a waiter whose session expired while waiting does not claim the lock (etcd 3.5 fix)")
    func lockRecheck() {
        var d = RecipeDriver()
        for c in 0..<2 {
            _ = d.apply(.leaseGrant(id: Int64(200 + c), ttl: 60))
            d.locks.append(LockRecipe(prefix: "/locks/x", lease: Int64(200 + c)))
            d.run(c, d.locks[c].start())
        }
        // The waiter's lease expires (its key is deleted), then the holder unlocks.
        _ = d.apply(.leaseRevoke(id: 201))
        _ = d.apply(.deleteRange(d.locks[0].unlock()))
        d.pump()
        guard case .lost(let why) = d.outcome[1] else {
            Issue.record("expected the waiter to lose, got \(String(describing: d.outcome[1]))")
            return
        }
        #expect(why.contains("session expired"))
    }

    @Test("lock: a crashed holder's lock passes on when its lease is revoked")
    func holderLeaseExpiry() {
        var d = RecipeDriver()
        for c in 0..<2 {
            _ = d.apply(.leaseGrant(id: Int64(300 + c), ttl: 60))
            d.locks.append(LockRecipe(prefix: "/locks/y", lease: Int64(300 + c)))
            d.run(c, d.locks[c].start())
        }
        _ = d.apply(.leaseRevoke(id: 300))
        d.pump()
        guard case .acquired = d.outcome[1] else { Issue.record("waiter should hold"); return }
    }

    @Test("election: the oldest candidate leads; proclaim and resign are guarded by create revision")
    func election() throws {
        var s = MVCCStore()
        s.apply(.leaseGrant(id: 1, ttl: 60))
        s.apply(.leaseGrant(id: 2, ttl: 60))
        var a = ElectionRecipe(prefix: "/election/svc", lease: 1, value: b("a"))
        var bb = ElectionRecipe(prefix: "/election/svc", lease: 2, value: b("b"))
        for e in [0, 1] {
            let step = e == 0 ? a.campaign() : bb.campaign()
            guard case .send(let txn) = step, case .txn(let r) = s.apply(.txn(txn)).result else {
                Issue.record("campaign")
                return
            }
            _ = e == 0 ? a.handle(txn: r) : bb.handle(txn: r)
        }
        let leader = try s.range(ElectionRecipe.leaderQuery(prefix: "/election/svc")).kvs.first
        #expect(leader?.value == b("a"))
        guard case .txn(let p) = s.apply(.txn(a.proclaim(b("a2")))).result else { return }
        #expect(p.succeeded)
        #expect(try s.range(ElectionRecipe.leaderQuery(prefix: "/election/svc")).kvs.first?.value == b("a2"))
        // b is not the leader: its proclaim must not overwrite anything.
        guard case .txn(let bp) = s.apply(.txn(bb.proclaim(b("evil")))).result else { return }
        #expect(bp.succeeded)  // b's own key, guarded by b's revision: it exists, so this only updates b's key
        #expect(try s.range(ElectionRecipe.leaderQuery(prefix: "/election/svc")).kvs.first?.value == b("a2"))
        guard case .txn(let res) = s.apply(.txn(a.resign())).result else { return }
        #expect(res.succeeded)
        #expect(try s.range(ElectionRecipe.leaderQuery(prefix: "/election/svc")).kvs.first?.value == b("evil"))
        // A second resign finds the key gone: the guard fails, nothing else is touched.
        guard case .txn(let res2) = s.apply(.txn(a.resign())).result else { return }
        #expect(!res2.succeeded)
    }
}
