import TandemCore

public struct WatchRequest: Equatable, Sendable {
    public var key: Bytes
    public var rangeEnd: Bytes = []
    /// 0: from the next revision. Otherwise the first revision to report.
    public var startRevision: Int64 = 0
    public var prevKV = false
    public var filterNoPut = false
    public var filterNoDelete = false
    public var progressNotify = false
    /// Client-chosen id (etcd 3.4+); 0 lets the hub choose.
    public var watchID: Int64 = 0

    public init(key: Bytes, rangeEnd: Bytes = [], startRevision: Int64 = 0) {
        self.key = key
        self.rangeEnd = rangeEnd
        self.startRevision = startRevision
    }
}

public struct WatchResponse: Equatable, Sendable {
    public var watchID: Int64
    /// Header revision: the store revision when the response was produced.
    public var revision: Int64
    public var created = false
    public var canceled = false
    public var cancelReason = ""
    public var compactRevision: Int64 = 0
    public var events: [Event] = []

    public init(
        watchID: Int64, revision: Int64, created: Bool = false, canceled: Bool = false, cancelReason: String = "",
        compactRevision: Int64 = 0, events: [Event] = []
    ) {
        self.watchID = watchID
        self.revision = revision
        self.created = created
        self.canceled = canceled
        self.cancelReason = cancelReason
        self.compactRevision = compactRevision
        self.events = events
    }
}

public enum WatchError: Error, Equatable, CustomStringConvertible {
    case tooManyWatchers(limit: Int)
    case duplicateID(Int64)

    public var description: String {
        switch self {
        case .tooManyWatchers(let l): return "tandem: too many watchers on this stream (limit maxWatchers=\(l))"
        case .duplicateID(let id): return "etcdserver: watch ID \(id) already exists"
        }
    }
}

/// The watchers of one node (or one client stream). Fed every applied revision's events by
/// `publish`, it hands out responses with `take`: ordered, unique, without gaps, and never
/// splitting one revision across responses. A watcher whose undelivered backlog passes
/// `maxBacklogEvents` is cancelled with a reason naming the revision to resume from.
public struct WatchHub: Sendable {
    public struct Limits: Sendable {
        public var maxWatchers = 10_000
        public var maxBacklogEvents = 10_000
        public var maxEventsPerResponse = 1_000
        /// Revisions read from history per catch-up step of one watcher.
        public var catchUpRevisions = 1_000
        public init() {}
    }

    enum SyncState: Equatable {
        case unsynced(next: Int64)
        case synced
    }

    struct Watcher {
        var request: WatchRequest
        var state: SyncState
        var pending: [Event] = []
        var sentSinceProgress = false
    }

    public let limits: Limits
    private var watchers: [Int64: Watcher] = [:]
    private var nextID: Int64 = 1
    /// Control responses (created, canceled, progress) in the order they happened.
    private var outbox: [WatchResponse] = []
    private var progressRequested = false

    public init(limits: Limits = Limits()) { self.limits = limits }

    public var count: Int { watchers.count }
    public var ids: [Int64] { watchers.keys.sorted() }

    /// Creates a watcher; its `created` response is queued before any of its events.
    @discardableResult
    public mutating func create(_ req: WatchRequest, store: MVCCStore) throws(WatchError) -> Int64 {
        guard watchers.count < limits.maxWatchers else { throw .tooManyWatchers(limit: limits.maxWatchers) }
        var r = req
        if r.key.isEmpty { r.key = [0] }
        let id: Int64
        if r.watchID > 0 {
            guard watchers[r.watchID] == nil else { throw .duplicateID(r.watchID) }
            id = r.watchID
        } else {
            while watchers[nextID] != nil { nextID += 1 }
            id = nextID
            nextID += 1
        }
        r.watchID = id
        // From "now" the watcher is live at once; any other start catches up from history
        // (or waits for the store to reach a future start revision).
        let w = Watcher(request: r, state: r.startRevision == 0 ? .synced : .unsynced(next: r.startRevision))
        watchers[id] = w
        outbox.append(WatchResponse(watchID: id, revision: store.revision, created: true))
        return id
    }

    /// Answers a create that could not be honoured the way etcd does: created, then canceled.
    public mutating func refuse(watchID: Int64, reason: String, store: MVCCStore) {
        outbox.append(WatchResponse(watchID: watchID, revision: store.revision, created: true))
        outbox.append(WatchResponse(watchID: watchID, revision: store.revision, canceled: true, cancelReason: reason))
    }

    public mutating func cancel(_ id: Int64, store: MVCCStore, reason: String = "") {
        guard watchers.removeValue(forKey: id) != nil else { return }
        outbox.append(WatchResponse(watchID: id, revision: store.revision, canceled: true, cancelReason: reason))
    }

    /// Feeds the events of one applied revision.
    public mutating func publish(revision: Int64, events: [Event], store: MVCCStore) {
        guard !events.isEmpty else { return }
        for id in watchers.keys.sorted() {
            guard var w = watchers[id], w.state == .synced else { continue }
            let matched = events.filter { Self.matches(w.request, $0) }
            if matched.isEmpty { continue }
            if w.pending.count + matched.count > limits.maxBacklogEvents {
                let resume = w.pending.first?.kv.modRevision ?? revision
                watchers[id] = nil
                outbox.append(
                    WatchResponse(
                        watchID: id, revision: store.revision, canceled: true,
                        cancelReason:
                            "tandem: watcher too slow: backlog exceeded maxBacklogEvents=\(limits.maxBacklogEvents); "
                            + "re-watch from revision \(resume)"))
                continue
            }
            w.pending.append(contentsOf: matched)
            watchers[id] = w
        }
    }

    /// Everything ready to send now, in order.
    public mutating func take(store: MVCCStore) -> [WatchResponse] {
        var out = outbox
        outbox = []
        for id in watchers.keys.sorted() {
            guard var w = watchers[id] else { continue }
            if case .unsynced(let next) = w.state {
                if next < store.compactRevision {
                    watchers[id] = nil
                    out.append(
                        WatchResponse(
                            watchID: id, revision: store.revision, canceled: true,
                            cancelReason: "etcdserver: mvcc: required revision has been compacted",
                            compactRevision: store.compactRevision))
                    continue
                }
                if next <= store.revision {
                    let batch = store.events(from: next, maxRevisions: limits.catchUpRevisions)
                    for re in batch {
                        w.pending.append(contentsOf: re.events.filter { Self.matches(w.request, $0) })
                    }
                    let reached = batch.last?.revision ?? store.revision
                    w.state = reached >= store.revision ? .synced : .unsynced(next: reached + 1)
                } else if next == store.revision + 1 {
                    w.state = .synced
                }
            }
            if !w.pending.isEmpty {
                out.append(contentsOf: responses(id, &w, store.revision))
                w.sentSinceProgress = true
            }
            watchers[id] = w
        }
        if progressRequested && watchers.values.allSatisfy({ $0.state == .synced && $0.pending.isEmpty }) {
            progressRequested = false
            out.append(WatchResponse(watchID: -1, revision: store.revision))
        }
        return out
    }

    /// Splits a watcher's pending events into responses, never splitting a revision.
    private func responses(_ id: Int64, _ w: inout Watcher, _ rev: Int64) -> [WatchResponse] {
        var out: [WatchResponse] = []
        var current: [Event] = []
        var i = 0
        let evs = w.pending.map { e -> Event in
            var e = e
            if !w.request.prevKV { e.prevKV = nil }
            return e
        }
        while i < evs.count {
            var j = i
            while j < evs.count && evs[j].kv.modRevision == evs[i].kv.modRevision { j += 1 }
            if !current.isEmpty && current.count + (j - i) > limits.maxEventsPerResponse {
                out.append(WatchResponse(watchID: id, revision: rev, events: current))
                current = []
            }
            current.append(contentsOf: evs[i..<j])
            i = j
        }
        if !current.isEmpty { out.append(WatchResponse(watchID: id, revision: rev, events: current)) }
        w.pending = []
        return out
    }

    /// Periodic progress notification for watchers that asked for it and saw no events.
    public mutating func progressTick(store: MVCCStore) {
        for id in watchers.keys.sorted() {
            guard var w = watchers[id], w.request.progressNotify, w.state == .synced else { continue }
            if !w.sentSinceProgress && w.pending.isEmpty {
                outbox.append(WatchResponse(watchID: id, revision: store.revision))
            }
            w.sentSinceProgress = false
            watchers[id] = w
        }
    }

    /// etcd's WatchProgressRequest: one response (watch id -1) once every watcher is synced.
    public mutating func requestProgress() { progressRequested = true }

    /// After the store was replaced by a snapshot (a follower catching up), revisions
    /// between `deliveredThrough` (the old store's revision: live watchers have been
    /// published everything up to it) and the snapshot were never applied here, so never
    /// published. Live watchers go back to catching up from the new store's history; a
    /// watcher whose next revision the snapshot compacted away is cancelled, never skipped.
    public mutating func resync(deliveredThrough: Int64) {
        for id in watchers.keys.sorted() where watchers[id]!.state == .synced {
            watchers[id]!.state = .unsynced(next: deliveredThrough + 1)
        }
    }

    static func matches(_ r: WatchRequest, _ e: Event) -> Bool {
        if r.filterNoPut && e.kind == .put { return false }
        if r.filterNoDelete && e.kind == .delete { return false }
        return KeyRange.contains(key: r.key, rangeEnd: r.rangeEnd, e.kv.key)
    }
}
