import DequeModule
import TandemCore

/// The replicated key-value state: every version of every key since the last compaction,
/// the lease table, and the event log that watches catch up from.
public struct MVCCStore: Sendable {
    public struct Limits: Sendable {
        /// etcd's limit on operations in each of a txn's compare/success/failure lists.
        public var maxTxnOps = 128
        /// Leases are granted at least this TTL, in seconds (etcd: 1.5 × election timeout).
        public var minLeaseTTL: Int64 = 2
        /// etcd's MaxLeaseTTL.
        public var maxLeaseTTL: Int64 = 9_000_000_000
        /// Request ids remembered for exactly-once apply; a duplicate older than this many
        /// requests would apply again.
        public var maxRememberedRequests = 100_000
        public init() {}
    }

    struct Version: Sendable {
        var modRevision: Int64
        var createRevision: Int64
        var version: Int64
        var value: Bytes
        var lease: Int64
        var tombstone: Bool
    }

    struct RevisionEvents: Sendable {
        var revision: Int64
        var events: [Event]
    }

    /// One key and every version of it since the last compaction, oldest first.
    struct KeyEntry: Sendable {
        var key: Bytes
        var versions: [Version]
    }

    struct LeaseEntry: Sendable {
        var grantedTTL: Int64
        var checkpointedTTL: Int64
        var keys: Set<Bytes>
    }

    public let limits: Limits
    /// The store revision: 1 for an empty store, +1 for each write that changed something.
    public private(set) var revision: Int64 = 1
    public private(set) var compactRevision: Int64 = 0
    /// Keys in byte order with their versions (including keys whose latest version is a
    /// tombstone). A sorted array: scans walk contiguous memory and never hash.
    private(set) var index = KeyIndex()
    private(set) var leases: [Int64: LeaseEntry] = [:]
    /// Events of each revision from `compactRevision` on, for watch catch-up.
    private(set) var eventLog = Deque<RevisionEvents>()
    /// Ids of recently applied requests, oldest first (Raft thesis §6.3: the state machine
    /// filters duplicates, e.g. a forwarded proposal the network delivered twice).
    private(set) var recentRequests = Deque<UInt64>()
    private var recentRequestSet = Set<UInt64>()
    /// Members' published attributes by member id (`StoreCommand.memberAttributes`): replicated
    /// and snapshotted, but outside the key space (no revision, no events).
    public private(set) var memberRecords: [UInt64: Bytes] = [:]
    /// Alarms raised and not yet lifted (`StoreCommand.alarm`), bounded like `memberRecords`
    /// (two kinds per member).
    public private(set) var alarms: Set<StoreAlarm> = []
    /// A NOSPACE alarm is up: Put, Txn with puts and LeaseGrant are refused (`StoreError.noSpace`).
    public var noSpace: Bool { alarms.contains { $0.kind == .noSpace } }
    /// Bound on `memberRecords` (a cluster has a handful of members; ids of removed members
    /// could otherwise accumulate).
    public static let maxMemberRecords = 64

    public init(limits: Limits = Limits()) { self.limits = limits }

    /// A membership change was applied (Raft conf-change entries, not store commands): an
    /// added member that has not published its attributes yet is listed with what the change
    /// carried (its peer URLs); a removed member's record and alarms go. Deterministic, so
    /// every replica (and every snapshot) agrees on who the members are and where they listen.
    public mutating func memberChanged(_ id: UInt64, added record: Bytes?) {
        guard let record else {
            memberRecords[id] = nil
            alarms = alarms.filter { $0.memberID != id }
            return
        }
        guard memberRecords[id] == nil, memberRecords.count < Self.maxMemberRecords else { return }
        memberRecords[id] = record
    }

    mutating func restore(
        revision: Int64, compactRevision: Int64, history: [Bytes: [Version]], leases: [Int64: LeaseEntry],
        eventLog: Deque<RevisionEvents>, memberRecords: [UInt64: Bytes] = [:], alarms: Set<StoreAlarm> = []
    ) {
        self.memberRecords = memberRecords
        self.alarms = alarms
        self.revision = revision
        self.compactRevision = compactRevision
        self.leases = leases
        self.eventLog = eventLog
        index = KeyIndex(
            sorted: history.map { KeyEntry(key: $0.key, versions: $0.value) }.sorted {
                Bytes.lexicographicLess($0.key, $1.key)
            })
        approximateBytes = history.reduce(0) { sum, h in sum + h.value.reduce(0) { $0 + Self.cost(h.key, $1) } }
    }

    public var keyCount: Int { index.count }

    /// Bytes the store holds: key, value and a fixed overhead for every version kept since
    /// the last compaction. The backend quota compares this (etcd compares its database
    /// file; this one shrinks when old versions are compacted away). Kept up to date on
    /// every change, recomputed on restore.
    public private(set) var approximateBytes = 0
    public static let versionOverhead = 64
    static func cost(_ k: Bytes, _ v: Version) -> Int { k.count + v.value.count + versionOverhead }

    /// etcd's backend quota check, made before proposing: whether `command` could take the
    /// store past `quota` bytes (every put it may make counted as a new version).
    public func wouldExceed(quota: Int64, with command: StoreCommand) -> Bool {
        Int64(approximateBytes + Self.bytesWritten(command) + Self.versionOverhead) > quota
    }

    /// The most a command can add: its puts' keys and values plus one version each (a txn
    /// counts the larger of its branches, nested txns included).
    /// What a NOSPACE alarm refuses: Put, a Txn that may put, LeaseGrant.
    static func takesSpace(_ command: StoreCommand) -> Bool {
        if case .leaseGrant = command { return true }
        return bytesWritten(command) > 0
    }

    public static func bytesWritten(_ command: StoreCommand) -> Int {
        func ops(_ list: [RequestOp]) -> Int {
            list.reduce(0) { sum, op in
                switch op {
                case .put(let p): return sum + p.key.count + p.value.count + versionOverhead
                case .txn(let t): return sum + max(ops(t.success), ops(t.failure))
                default: return sum
                }
            }
        }
        switch command {
        case .put(let p): return p.key.count + p.value.count + versionOverhead
        case .txn(let t): return max(ops(t.success), ops(t.failure))
        default: return 0
        }
    }

    // MARK: - Apply

    /// Applies a client's command exactly once: returns nil, changing nothing, if a command
    /// with the same non-zero `requestID` was applied recently. Id 0 is never deduplicated.
    @discardableResult
    public mutating func apply(_ command: StoreCommand, requestID: UInt64) -> (result: StoreResult, events: [Event])? {
        if requestID != 0 {
            guard recentRequestSet.insert(requestID).inserted else { return nil }
            recentRequests.append(requestID)
            if recentRequests.count > limits.maxRememberedRequests {
                recentRequestSet.remove(recentRequests.removeFirst())
            }
        }
        return apply(command)
    }

    mutating func restoreRequests(_ ids: [UInt64]) {
        recentRequests = Deque(ids.suffix(limits.maxRememberedRequests))
        recentRequestSet = Set(recentRequests)
    }

    /// Applies one committed command. Deterministic: the same commands give the same state.
    /// Returns the result and the events of the new revision (empty when nothing changed).
    @discardableResult
    public mutating func apply(_ command: StoreCommand) -> (result: StoreResult, events: [Event]) {
        // etcd's capped applier: under a NOSPACE alarm, what takes space is refused — also
        // commands proposed before the alarm was raised, so every member refuses the same ones.
        if noSpace, Self.takesSpace(command) { return (.failed(.noSpace), []) }
        var tx = WriteTxn(base: revision)
        let result: StoreResult
        switch command {
        case .put(let p):
            do {
                result = .put(try put(p, &tx))
            } catch {
                return (.failed(error), [])
            }
        case .deleteRange(let d):
            result = .deleteRange(deleteRange(d, &tx))
        case .txn(let t):
            do {
                try validate(t)
                result = .txn(try txn(t, &tx))
            } catch {
                rollback(tx)
                return (.failed(error), [])
            }
        case .compact(let rev):
            if rev <= compactRevision { return (.failed(.compacted), []) }
            if rev > revision { return (.failed(.futureRevision), []) }
            compact(rev)
            return (.compact(revision: revision), [])
        case .leaseGrant(let id, let ttl):
            if leases[id] != nil { return (.failed(.leaseExists), []) }
            if ttl > limits.maxLeaseTTL { return (.failed(.leaseTTLTooLarge), []) }
            let t = max(ttl, limits.minLeaseTTL)
            leases[id] = LeaseEntry(grantedTTL: t, checkpointedTTL: 0, keys: [])
            return (.leaseGrant(id: id, ttl: t, revision: revision), [])
        case .leaseRevoke(let id):
            guard let l = leases[id] else { return (.failed(.leaseNotFound), []) }
            // All keys of the lease go in one revision, as one atomic delete.
            for k in l.keys.sorted(by: Bytes.lexicographicLess) { _ = deleteKey(k, &tx) }
            leases[id] = nil
            result = .leaseRevoke(revision: tx.changed ? tx.base + 1 : revision)
        case .leaseCheckpoint(let cps):
            for c in cps where leases[c.id] != nil { leases[c.id]!.checkpointedTTL = c.remainingTTL }
            return (.leaseCheckpoint, [])
        case .memberAttributes(let id, let record):
            guard memberRecords[id] != nil || memberRecords.count < Self.maxMemberRecords else {
                return (.failed(.tooManyMembers), [])
            }
            memberRecords[id] = record
            return (.memberAttributes, [])
        case .alarm(let a, let activate):
            if !activate { return (.alarm(changed: alarms.remove(a) != nil), []) }
            guard alarms.contains(a) || alarms.count < 2 * Self.maxMemberRecords else {
                return (.failed(.tooManyMembers), [])
            }
            return (.alarm(changed: alarms.insert(a).inserted), [])
        }
        if tx.changed {
            revision = tx.base + 1
            eventLog.append(RevisionEvents(revision: revision, events: tx.events))
        }
        return (result, tx.events)
    }

    /// One write transaction: every change lands at `base + 1`.
    struct WriteTxn {
        let base: Int64
        var events: [Event] = []
        var changedKeys: [Bytes] = []
        var changed: Bool { !events.isEmpty }
        /// Reads inside a write txn see its own earlier writes.
        var readRevision: Int64 { changed ? base + 1 : base }
    }

    private mutating func put(_ p: PutRequest, _ tx: inout WriteTxn) throws(StoreError) -> PutResponse {
        if p.key.isEmpty { throw .emptyKey }
        let rev = tx.base + 1
        let prev = latest(p.key, at: tx.readRevision)
        var value = p.value
        var lease = p.lease
        if p.ignoreValue || p.ignoreLease {
            guard let prev else { throw .keyNotFound }
            if p.ignoreValue { value = prev.value }
            if p.ignoreLease { lease = prev.lease }
        }
        if lease != 0 && leases[lease] == nil { throw .leaseNotFound }
        let v = Version(
            modRevision: rev, createRevision: prev?.createRevision ?? rev, version: (prev?.version ?? 0) + 1,
            value: value, lease: lease, tombstone: false)
        if let prev, prev.lease != 0, prev.lease != lease { leases[prev.lease]?.keys.remove(p.key) }
        if lease != 0 { leases[lease]!.keys.insert(p.key) }
        append(v, to: p.key, &tx)
        let kv = keyValue(p.key, v)
        let prevKV = prev.map { keyValue(p.key, $0) }
        tx.events.append(Event(kind: .put, kv: kv, prevKV: prevKV))
        return PutResponse(revision: rev, prevKV: p.prevKV ? prevKV : nil)
    }

    private mutating func deleteRange(_ d: DeleteRangeRequest, _ tx: inout WriteTxn) -> DeleteRangeResponse {
        var deleted: [KeyValue] = []
        // Deleting appends versions but never inserts keys, so positions stay valid.
        for k in index.keys(key: d.key, rangeEnd: d.rangeEnd) {
            if let prev = deleteKey(k, &tx) { deleted.append(prev) }
        }
        return DeleteRangeResponse(
            revision: tx.readRevision, deleted: Int64(deleted.count), prevKVs: d.prevKV ? deleted : [])
    }

    /// Writes a tombstone for `k` if it is live; returns its previous value.
    private mutating func deleteKey(_ k: Bytes, _ tx: inout WriteTxn) -> KeyValue? {
        guard let prev = latest(k, at: tx.readRevision) else { return nil }
        let rev = tx.base + 1
        if prev.lease != 0 { leases[prev.lease]?.keys.remove(k) }
        append(
            Version(modRevision: rev, createRevision: 0, version: 0, value: [], lease: 0, tombstone: true), to: k,
            &tx)
        let prevKV = keyValue(k, prev)
        tx.events.append(
            Event(kind: .delete, kv: KeyValue(key: k, modRevision: rev), prevKV: prevKV))
        return prevKV
    }

    private mutating func append(_ v: Version, to k: Bytes, _ tx: inout WriteTxn) {
        index.append(v, to: k)
        approximateBytes += Self.cost(k, v)
        tx.changedKeys.append(k)
    }

    /// Undoes a failed txn's writes (they all sit at `base + 1`).
    private mutating func rollback(_ tx: WriteTxn) {
        guard tx.changed else { return }
        let rev = tx.base + 1
        var removed = 0
        for k in Set(tx.changedKeys) {
            index.mutate(k) { vs in
                for v in vs where v.modRevision == rev { removed += Self.cost(k, v) }
                vs.removeAll { $0.modRevision == rev }
            }
        }
        approximateBytes -= removed
        // Re-derive lease attachments from the surviving latest versions.
        for k in Set(tx.changedKeys) {
            for l in leases.keys { leases[l]!.keys.remove(k) }
            if let v = latest(k, at: tx.base), v.lease != 0 { leases[v.lease]?.keys.insert(k) }
        }
    }

    // MARK: - Txn

    private func validate(_ t: TxnRequest) throws(StoreError) {
        let maxOps = limits.maxTxnOps
        if t.compare.count > maxOps || t.success.count > maxOps || t.failure.count > maxOps {
            throw .tooManyOps(limit: maxOps)
        }
        for branch in [t.success, t.failure] {
            var puts = Set<Bytes>()
            var deletes: [(Bytes, Bytes)] = []
            try Self.collectWrites(branch, &puts, &deletes)
        }
    }

    /// etcd's rule: a key is written at most once per txn branch (including nested txns).
    private static func collectWrites(
        _ ops: [RequestOp], _ puts: inout Set<Bytes>, _ deletes: inout [(Bytes, Bytes)]
    )
        throws(StoreError)
    {
        for op in ops {
            switch op {
            case .put(let p):
                if !puts.insert(p.key).inserted { throw .duplicateKey }
                for (k, e) in deletes where KeyRange.contains(key: k, rangeEnd: e, p.key) { throw .duplicateKey }
            case .deleteRange(let d):
                for p in puts where KeyRange.contains(key: d.key, rangeEnd: d.rangeEnd, p) { throw .duplicateKey }
                deletes.append((d.key, d.rangeEnd))
            case .txn(let inner):
                var maxDepthPuts = puts
                var maxDepthDeletes = deletes
                try collectWrites(inner.success, &maxDepthPuts, &maxDepthDeletes)
                var failPuts = puts
                var failDeletes = deletes
                try collectWrites(inner.failure, &failPuts, &failDeletes)
                puts.formUnion(maxDepthPuts.union(failPuts))
                deletes = maxDepthDeletes + failDeletes
            case .range:
                break
            }
        }
    }

    private mutating func txn(_ t: TxnRequest, _ tx: inout WriteTxn) throws(StoreError) -> TxnResponse {
        let ok = t.compare.allSatisfy { evaluate($0, at: tx.readRevision) }
        var responses: [ResponseOp] = []
        for op in ok ? t.success : t.failure {
            switch op {
            case .range(var q):
                if q.revision == 0 { q.revision = tx.readRevision }
                responses.append(.range(try rangeAt(q, current: tx.readRevision)))
            case .put(let p):
                responses.append(.put(try put(p, &tx)))
            case .deleteRange(let d):
                responses.append(.deleteRange(deleteRange(d, &tx)))
            case .txn(let inner):
                responses.append(.txn(try txn(inner, &tx)))
            }
        }
        // Every response in a txn carries the txn's final revision.
        let rev = tx.readRevision
        return TxnResponse(revision: rev, succeeded: ok, responses: responses.map { Self.stamp($0, rev) })
    }

    private static func stamp(_ r: ResponseOp, _ rev: Int64) -> ResponseOp {
        switch r {
        case .range(var x):
            x.revision = rev
            return .range(x)
        case .put(var x):
            x.revision = rev
            return .put(x)
        case .deleteRange(var x):
            x.revision = rev
            return .deleteRange(x)
        case .txn(var x):
            x.revision = rev
            x.responses = x.responses.map { stamp($0, rev) }
            return .txn(x)
        }
    }

    private func evaluate(_ c: Compare, at rev: Int64) -> Bool {
        let ks = c.rangeEnd.isEmpty ? [c.key] : index.keys(key: c.key, rangeEnd: c.rangeEnd)
        if !c.rangeEnd.isEmpty && ks.isEmpty { return true }
        for k in ks {
            let v = latest(k, at: rev)
            let ord: Int
            switch c.target {
            case .value(let want):
                // etcd: a value comparison against a missing key is false.
                guard let v else { return false }
                ord = v.value == want ? 0 : (Bytes.lexicographicLess(v.value, want) ? -1 : 1)
            case .version(let n): ord = Self.cmp(v?.version ?? 0, n)
            case .createRevision(let n): ord = Self.cmp(v?.createRevision ?? 0, n)
            case .modRevision(let n): ord = Self.cmp(v?.modRevision ?? 0, n)
            case .lease(let n): ord = Self.cmp(v?.lease ?? 0, n)
            }
            let pass: Bool
            switch c.result {
            case .equal: pass = ord == 0
            case .notEqual: pass = ord != 0
            case .greater: pass = ord > 0
            case .less: pass = ord < 0
            }
            if !pass { return false }
        }
        return true
    }

    private static func cmp(_ a: Int64, _ b: Int64) -> Int { a == b ? 0 : (a < b ? -1 : 1) }

    // MARK: - Reads

    /// A read at `q.revision` (0 = current). Reads never change the store.
    public func range(_ q: RangeRequest) throws(StoreError) -> RangeResponse {
        try rangeAt(q, current: revision)
    }

    private func rangeAt(_ q: RangeRequest, current: Int64) throws(StoreError) -> RangeResponse {
        let rev = q.revision <= 0 ? current : q.revision
        if rev > current { throw .futureRevision }
        if rev < compactRevision { throw .compacted }
        var kvs: [KeyValue] = []
        var count: Int64 = 0
        var order = q.sortOrder
        if order == .none && q.sortTarget != .key { order = .ascend }
        // Without sorting, results past limit+1 are only counted, never built.
        let build = order == .none && q.limit > 0 ? Int(q.limit) + 1 : Int.max
        index.forEach(key: q.key, rangeEnd: q.rangeEnd) { e in
            guard let v = Self.latest(e.versions, at: rev) else { return true }
            count += 1
            if kvs.count >= build || q.countOnly { return true }
            if q.minModRevision > 0 && v.modRevision < q.minModRevision { return true }
            if q.maxModRevision > 0 && v.modRevision > q.maxModRevision { return true }
            if q.minCreateRevision > 0 && v.createRevision < q.minCreateRevision { return true }
            if q.maxCreateRevision > 0 && v.createRevision > q.maxCreateRevision { return true }
            var kv = keyValue(e.key, v)
            if q.keysOnly { kv.value = [] }
            kvs.append(kv)
            return true
        }
        if order != .none {
            let asc: (KeyValue, KeyValue) -> Bool
            switch q.sortTarget {
            case .key: asc = { Bytes.lexicographicLess($0.key, $1.key) }
            case .version: asc = { $0.version < $1.version }
            case .create: asc = { $0.createRevision < $1.createRevision }
            case .mod: asc = { $0.modRevision < $1.modRevision }
            case .value: asc = { Bytes.lexicographicLess($0.value, $1.value) }
            }
            // Stable: ties keep key order, as etcd's sort.Stable does.
            let indexed = kvs.enumerated().map { ($0.offset, $0.element) }
            kvs = indexed.sorted { a, b in
                if asc(a.1, b.1) { return order == .ascend }
                if asc(b.1, a.1) { return order == .descend }
                return a.0 < b.0
            }.map(\.1)
        }
        var more = false
        if q.limit > 0 && kvs.count > Int(q.limit) {
            kvs.removeSubrange(Int(q.limit)...)
            more = true
        }
        if q.countOnly { kvs = [] }
        return RangeResponse(revision: current, kvs: kvs, more: more, count: count)
    }

    /// The live version of `k` at `rev`, or nil if absent or deleted then.
    private func latest(_ k: Bytes, at rev: Int64) -> Version? {
        guard let e = index.find(k) else { return nil }
        return Self.latest(e.versions, at: rev)
    }

    private static func latest(_ h: [Version], at rev: Int64) -> Version? {
        var i = h.count - 1
        while i >= 0 {
            if h[i].modRevision <= rev { return h[i].tombstone ? nil : h[i] }
            i -= 1
        }
        return nil
    }

    private func keyValue(_ k: Bytes, _ v: Version) -> KeyValue {
        KeyValue(
            key: k, createRevision: v.createRevision, modRevision: v.modRevision, version: v.version, value: v.value,
            lease: v.lease)
    }

    // MARK: - Compaction

    /// Drops versions superseded at or below `rev`, keeping each key's latest version as of
    /// `rev` (and a tombstone exactly at `rev`, so reads at `rev` stay correct).
    private mutating func compact(_ rev: Int64) {
        var dropped = 0
        index.compact { k, h in
            guard let last = h.lastIndex(where: { $0.modRevision <= rev }) else { return }
            var drop = last
            if h[last].tombstone && h[last].modRevision < rev { drop = last + 1 }
            for v in h.prefix(drop) { dropped += Self.cost(k, v) }
            if drop > 0 { h.removeFirst(drop) }
        }
        approximateBytes -= dropped
        while let first = eventLog.first, first.revision < rev { eventLog.removeFirst() }
        compactRevision = rev
    }

    // MARK: - Watch support

    /// Events of revisions ≥ `from`, at most `maxRevisions` of them, oldest first.
    func events(from: Int64, maxRevisions: Int) -> ArraySlice<RevisionEvents> {
        guard let first = eventLog.first, from <= revision else { return [] }
        let start = max(0, Int(from - first.revision))
        // Revisions without changes are absent, so search when the log is not dense.
        var lo = min(start, eventLog.count)
        while lo > 0 && eventLog[lo - 1].revision >= from { lo -= 1 }
        while lo < eventLog.count && eventLog[lo].revision < from { lo += 1 }
        let hi = min(eventLog.count, lo + maxRevisions)
        return Array(eventLog[lo..<hi])[...]
    }

    // MARK: - Leases

    public func lease(_ id: Int64) -> LeaseInfo? {
        guard let l = leases[id] else { return nil }
        return LeaseInfo(
            id: id, grantedTTL: l.grantedTTL, checkpointedTTL: l.checkpointedTTL,
            keys: l.keys.sorted(by: Bytes.lexicographicLess))
    }

    public var leaseIDs: [Int64] { leases.keys.sorted() }
}
