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

/// Three members on simulated disks, messages delivered by hand, each with `sendEarly` set.
@Suite("RegistryReplica: a leader's messages leave before its fsync, nobody else's do")
struct SendEarlyTests {
    final class Member {
        let disk = SimDisk(random: SeededRandom(seed: 3))
        let replica: RegistryReplica
        /// Messages the hook was given, with the disk's operation count at that moment.
        var early: [(messages: [Message], diskOps: Int)] = []
        init(_ id: NodeID) throws {
            var o = RegistryReplica.Options(id: id)
            o.tickMs = 100
            replica = try RegistryReplica(
                options: o, initialConf: ConfState(voters: [1, 2, 3]), fs: disk, random: SeededRandom(seed: id))
            replica.sendEarly = { [unowned self] in early.append(($0, disk.operations)) }
        }
    }

    @Test("the leader's appends go out before the write that makes them durable; a follower's acks only after")
    func leaderSendsBeforeItsFsync() throws {
        let m = try [1, 2, 3].map { try Member(NodeID($0)) }
        var inFlight: [Message] = []
        func round() throws {
            for x in m {
                let before = x.early.count
                let out = try x.replica.process(now: 0)
                inFlight += out.messages
                inFlight += x.early[before...].flatMap(\.messages)
                if x.replica.raft.role != .leader {
                    #expect(x.early.count == before, "member \(x.replica.id) is not the leader")
                }
            }
            let now = inFlight
            inFlight = []
            for msg in now { m[Int(msg.to) - 1].replica.step(msg) }
        }
        m[0].replica.step(Message(kind: .timeoutNow, to: 1, term: m[0].replica.raft.term))
        for _ in 0..<10 { try round() }
        #expect(m[0].replica.isLeader)
        let opsBefore = m[0].disk.operations
        let hooked = m[0].early.count
        try m[0].replica.propose(.put(PutRequest(key: Array("k".utf8), value: [1])), requestID: 7)
        let out = try m[0].replica.process(now: 0)
        // The append carrying the new entry was handed over before the leader wrote it.
        let sent = try #require(
            m[0].early.dropFirst(hooked).first { $0.messages.contains { $0.kind == .append && !$0.entries.isEmpty } })
        #expect(sent.diskOps == opsBefore)
        #expect(m[0].disk.operations > opsBefore)
        #expect(out.messages.isEmpty)
        #expect(out.applied.isEmpty)  // not committed: the followers have not acknowledged yet
        inFlight = m[0].early.dropFirst(hooked).flatMap(\.messages)
        for msg in inFlight { m[Int(msg.to) - 1].replica.step(msg) }
        inFlight = []
        var applied: [UInt64] = []
        for _ in 0..<10 {
            for x in m {
                let before = x.early.count
                let o = try x.replica.process(now: 0)
                inFlight += o.messages + x.early[before...].flatMap(\.messages)
                if x === m[0] { applied += o.applied.map(\.requestID) }
            }
            let now = inFlight
            inFlight = []
            for msg in now { m[Int(msg.to) - 1].replica.step(msg) }
        }
        #expect(applied == [7])
        #expect(m[1].replica.store.revision == m[0].replica.store.revision)
    }
}
