import HeapModule
import TandemCore

/// The leader's lease clock: which leases expire when. Only the leader runs one; expiry is
/// never decided by applying entries, it is *proposed* (`leaseRevoke`) through Raft.
///
/// Times are milliseconds on the shell's monotonic clock, passed in as `now`.
/// - `promote` on becoming leader extends every lease by `extend` (an election timeout),
///   starting from its last checkpointed remaining TTL when it has one, so frequent
///   elections cannot keep leases alive forever (etcd #9888).
/// - `expired` hands out at most `maxRevokesPerSecond` leases per second (token bucket),
///   so an expiry storm cannot flood Raft (etcd #9360).
/// - `checkpoints` yields remaining TTLs to propose for long leases every
///   `checkpointIntervalMs`.
public struct Lessor: Sendable {
    public struct Limits: Sendable {
        public var maxRevokesPerSecond = 1_000
        public var checkpointIntervalMs: Int64 = 300_000
        /// A revocation proposed but not applied is proposed again after this long.
        public var revokeRetryMs: Int64 = 3_000
        public init() {}
    }

    struct Entry {
        var ttl: Int64
        var deadline: Int64
        var revokeProposedAt: Int64?
        var lastCheckpoint: Int64
    }

    /// A deadline in the expiry heap; stale when the lease's deadline has moved since.
    struct Due: Comparable {
        var deadline: Int64
        var id: Int64
        static func < (a: Due, b: Due) -> Bool { (a.deadline, a.id) < (b.deadline, b.id) }
    }

    public let limits: Limits
    public private(set) var isPrimary = false
    private var entries: [Int64: Entry] = [:]
    /// Deadlines, earliest first, with lazy deletion: renewals push, stale items are skipped.
    private var due = Heap<Due>()
    private var tokens: Double = 0
    private var lastRefill: Int64 = 0
    private var lastCheckpointScan: Int64?

    public init(limits: Limits = Limits()) { self.limits = limits }

    public var count: Int { entries.count }

    /// Becomes the expiry authority, arming every lease from the replicated table.
    public mutating func promote(now: Int64, extendMs: Int64, leases: [LeaseInfo]) {
        isPrimary = true
        entries = [:]
        tokens = Double(limits.maxRevokesPerSecond)
        lastRefill = now
        var items: [Due] = []
        for l in leases {
            let remaining = l.checkpointedTTL > 0 ? l.checkpointedTTL : l.grantedTTL
            let d = now + remaining * 1000 + extendMs
            entries[l.id] = Entry(ttl: l.grantedTTL, deadline: d, revokeProposedAt: nil, lastCheckpoint: now)
            items.append(Due(deadline: d, id: l.id))
        }
        due = Heap(items)
    }

    public mutating func demote() {
        isPrimary = false
        entries = [:]
        due = Heap()
    }

    private mutating func schedule(_ id: Int64, at deadline: Int64) {
        entries[id]?.deadline = deadline
        due.insert(Due(deadline: deadline, id: id))
        // Renewals leave stale items behind; rebuild before they dominate the heap.
        if due.count > 4 * entries.count + 1024 {
            due = Heap(entries.map { Due(deadline: $0.value.deadline, id: $0.key) })
        }
    }

    /// A grant was applied.
    public mutating func granted(id: Int64, ttl: Int64, now: Int64) {
        guard isPrimary else { return }
        entries[id] = Entry(ttl: ttl, deadline: now + ttl * 1000, revokeProposedAt: nil, lastCheckpoint: now)
        schedule(id, at: now + ttl * 1000)
    }

    /// A revoke was applied.
    public mutating func revoked(id: Int64) { entries[id] = nil }

    /// Keep-alive. Returns the TTL, or nil if the lease is unknown or already expired.
    public mutating func renew(id: Int64, now: Int64) -> Int64? {
        guard isPrimary, let e = entries[id], e.deadline > now, e.revokeProposedAt == nil else { return nil }
        schedule(id, at: now + e.ttl * 1000)
        return e.ttl
    }

    /// Remaining milliseconds before `id` expires, if tracked.
    public func remainingMs(id: Int64, now: Int64) -> Int64? {
        guard let e = entries[id] else { return nil }
        return max(0, e.deadline - now)
    }

    /// Remaining TTL in whole seconds, rounded up as etcd reports it; -1 when this lessor
    /// does not track `id` (unknown lease, or not the leader).
    public func remainingSeconds(id: Int64, now: Int64) -> Int64 {
        remainingMs(id: id, now: now).map { ($0 + 999) / 1000 } ?? -1
    }

    /// Leases to revoke now, oldest deadline first, limited by the revocation rate.
    public mutating func expired(now: Int64) -> [Int64] {
        guard isPrimary else { return [] }
        let rate = Double(limits.maxRevokesPerSecond)
        tokens = min(rate, tokens + Double(now - lastRefill) * rate / 1000)
        lastRefill = now
        var out: [Int64] = []
        while tokens >= 1, let next = due.min, next.deadline <= now {
            due.removeMin()
            // Skip items made stale by a renewal or a revocation.
            guard let e = entries[next.id], e.deadline == next.deadline else { continue }
            tokens -= 1
            entries[next.id]!.revokeProposedAt = now
            // If the revocation is lost (leader change, dropped proposal), propose it again.
            schedule(next.id, at: now + limits.revokeRetryMs)
            out.append(next.id)
        }
        return out
    }

    /// Remaining TTLs (seconds, rounded up) of leases due for a checkpoint.
    public mutating func checkpoints(now: Int64) -> [LeaseCheckpoint] {
        // Scanning every lease is O(leases): do it a few times per interval, not every tick.
        let scanEvery = max(1_000, limits.checkpointIntervalMs / 10)
        guard isPrimary, lastCheckpointScan.map({ now - $0 >= scanEvery }) ?? true else { return [] }
        lastCheckpointScan = now
        var out: [LeaseCheckpoint] = []
        for id in entries.keys.sorted() {
            let e = entries[id]!
            guard e.ttl * 1000 > limits.checkpointIntervalMs, now - e.lastCheckpoint >= limits.checkpointIntervalMs,
                e.deadline > now, e.revokeProposedAt == nil
            else { continue }
            out.append(LeaseCheckpoint(id: id, remainingTTL: remainingSeconds(id: id, now: now)))
            entries[id]!.lastCheckpoint = now
        }
        return out
    }
}
