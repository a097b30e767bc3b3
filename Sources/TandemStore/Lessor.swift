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

    public let limits: Limits
    public private(set) var isPrimary = false
    private var entries: [Int64: Entry] = [:]
    private var tokens: Double = 0
    private var lastRefill: Int64 = 0

    public init(limits: Limits = Limits()) { self.limits = limits }

    public var count: Int { entries.count }

    /// Becomes the expiry authority, arming every lease from the replicated table.
    public mutating func promote(now: Int64, extendMs: Int64, leases: [LeaseInfo]) {
        isPrimary = true
        entries = [:]
        tokens = Double(limits.maxRevokesPerSecond)
        lastRefill = now
        for l in leases {
            let remaining = l.checkpointedTTL > 0 ? l.checkpointedTTL : l.grantedTTL
            entries[l.id] = Entry(
                ttl: l.grantedTTL, deadline: now + remaining * 1000 + extendMs, revokeProposedAt: nil, lastCheckpoint: now)
        }
    }

    public mutating func demote() {
        isPrimary = false
        entries = [:]
    }

    /// A grant was applied.
    public mutating func granted(id: Int64, ttl: Int64, now: Int64) {
        guard isPrimary else { return }
        entries[id] = Entry(ttl: ttl, deadline: now + ttl * 1000, revokeProposedAt: nil, lastCheckpoint: now)
    }

    /// A revoke was applied.
    public mutating func revoked(id: Int64) { entries[id] = nil }

    /// Keep-alive. Returns the TTL, or nil if the lease is unknown or already expired.
    public mutating func renew(id: Int64, now: Int64) -> Int64? {
        guard isPrimary, var e = entries[id], e.deadline > now, e.revokeProposedAt == nil else { return nil }
        e.deadline = now + e.ttl * 1000
        entries[id] = e
        return e.ttl
    }

    /// Remaining milliseconds before `id` expires, if tracked.
    public func remainingMs(id: Int64, now: Int64) -> Int64? {
        guard let e = entries[id] else { return nil }
        return max(0, e.deadline - now)
    }

    /// Leases to revoke now, oldest deadline first, limited by the revocation rate.
    public mutating func expired(now: Int64) -> [Int64] {
        guard isPrimary else { return [] }
        let rate = Double(limits.maxRevokesPerSecond)
        tokens = min(rate, tokens + Double(now - lastRefill) * rate / 1000)
        lastRefill = now
        let due = entries.filter { id, e in
            e.deadline <= now && (e.revokeProposedAt.map { now - $0 >= limits.revokeRetryMs } ?? true)
        }.sorted { ($0.value.deadline, $0.key) < ($1.value.deadline, $1.key) }
        var out: [Int64] = []
        for (id, _) in due {
            guard tokens >= 1 else { break }
            tokens -= 1
            entries[id]!.revokeProposedAt = now
            out.append(id)
        }
        return out
    }

    /// Remaining TTLs (seconds, rounded up) of leases due for a checkpoint.
    public mutating func checkpoints(now: Int64) -> [LeaseCheckpoint] {
        guard isPrimary else { return [] }
        var out: [LeaseCheckpoint] = []
        for id in entries.keys.sorted() {
            let e = entries[id]!
            guard e.ttl * 1000 > limits.checkpointIntervalMs, now - e.lastCheckpoint >= limits.checkpointIntervalMs,
                e.deadline > now
            else { continue }
            out.append(LeaseCheckpoint(id: id, remainingTTL: (e.deadline - now + 999) / 1000))
            entries[id]!.lastCheckpoint = now
        }
        return out
    }
}
