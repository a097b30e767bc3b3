import TandemCore
import TandemRaft
import TandemReplica
import TandemStore
import Testing

@testable import TandemSimulation

/// One registry member on a simulated disk, driven by hand with an explicit clock.
struct SingleReplica {
    var disk = SimDisk(random: SeededRandom(seed: 9))
    var replica: RegistryReplica
    var now: Int64 = 0
    var results: [UInt64: StoreResult] = [:]

    static func options() -> RegistryReplica.Options {
        var o = RegistryReplica.Options(id: 1)
        o.tickMs = 100
        o.snapshotEvery = 10
        o.catchUpEntries = 2
        return o
    }

    init() throws {
        let o = Self.options()
        replica = try RegistryReplica(
            options: o, initialConf: ConfState(voters: [1]), fs: disk, random: SeededRandom(seed: 1))
        try advance(ms: 3_000)
    }

    mutating func pump() throws {
        let out = try replica.process(now: now)
        for (id, r) in out.applied { results[id] = r }
    }

    /// Moves time forward in 100 ms ticks.
    mutating func advance(ms: Int64) throws {
        for _ in 0..<(ms / 100) {
            now += 100
            replica.tick(now: now)
            try pump()
        }
    }

    mutating func run(_ c: StoreCommand, id: UInt64) throws -> StoreResult? {
        try replica.propose(c, requestID: id)
        try pump()
        return results[id]
    }
}

@Suite("RegistryReplica: the Ready loop with leases on a simulated disk")
struct ReplicaTests {
    @Test("lease expiry is decided by the leader's clock and revoked through Raft, deleting its keys")
    func leaseExpiry() throws {
        var r = try SingleReplica()
        #expect(r.replica.isLeader)
        _ = try r.run(.leaseGrant(id: 5, ttl: 3), id: 1)
        _ = try r.run(.put(PutRequest(key: Array("/tandem/services/users/a".utf8), value: [1], lease: 5)), id: 2)
        let ttl = try #require(r.replica.leaseTimeToLive(5, now: r.now))
        #expect(ttl.granted == 3 && ttl.remaining == 3 && ttl.keys.count == 1)
        try r.advance(ms: 2_000)
        #expect(r.replica.store.lease(5) != nil)
        try r.advance(ms: 1_500)
        #expect(r.replica.store.lease(5) == nil)
        #expect(try r.replica.store.range(.prefix(Array("/tandem/services/".utf8))).kvs.isEmpty)
    }

    @Test("keep-alive holds a lease past its TTL; an unknown lease cannot be kept alive")
    func keepAlive() throws {
        var r = try SingleReplica()
        _ = try r.run(.leaseGrant(id: 6, ttl: 2), id: 1)
        for _ in 0..<10 {
            try r.advance(ms: 1_000)
            #expect(r.replica.renewLease(6, now: r.now) == 2)
        }
        #expect(r.replica.store.lease(6) != nil)
        #expect(r.replica.renewLease(999, now: r.now) == nil)
    }

    @Test("a restarted member recovers its store from snapshot + WAL and resumes lease expiry")
    func restartRecovers() throws {
        var r = try SingleReplica()
        _ = try r.run(.leaseGrant(id: 7, ttl: 5), id: 1)
        for i in 0..<30 {
            _ = try r.run(.put(PutRequest(key: Array("k\(i)".utf8), value: [UInt8(i)])), id: 10 + UInt64(i))
        }
        let revision = r.replica.store.revision
        #expect(r.replica.snapshotsTaken >= 2)
        let again = try RegistryReplica(
            options: SingleReplica.options(), initialConf: ConfState(voters: [1]), fs: r.disk,
            random: SeededRandom(seed: 2))
        r.replica = again
        try r.advance(ms: 3_000)
        #expect(r.replica.store.revision == revision)
        #expect(r.replica.store.lease(7) != nil)
        try r.advance(ms: 8_000)
        #expect(r.replica.store.lease(7) == nil)
    }
}
