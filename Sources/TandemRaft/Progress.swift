import DequeModule
import TandemCore

/// The leader's view of one follower's log (etcd's tracker.Progress).
struct Progress {
    enum State: Equatable {
        /// One append at a time until the follower's match is found.
        case probe
        /// Optimistic pipelining, bounded by `inflights`.
        case replicate
        /// A snapshot at this index is on its way.
        case snapshot(pending: UInt64)
    }

    var match: UInt64 = 0
    var next: UInt64
    var state: State = .probe
    var probeSent = false
    var recentActive = false
    /// Set at one check-quorum round while a snapshot is pending; the next round retries.
    var snapshotStale = false
    /// Last index of each append in flight, oldest first.
    var inflights = Deque<UInt64>()
    let maxInflight: Int

    init(next: UInt64, maxInflight: Int) {
        self.next = next
        self.maxInflight = maxInflight
    }

    var isPaused: Bool {
        switch state {
        case .probe: return probeSent
        case .replicate: return inflights.count >= maxInflight
        case .snapshot: return true
        }
    }

    mutating func becomeProbe() {
        if case .snapshot(let pending) = state {
            next = max(match + 1, pending + 1)
        } else {
            next = match + 1
        }
        state = .probe
        probeSent = false
        inflights.removeAll()
    }

    mutating func becomeReplicate() {
        state = .replicate
        next = match + 1
        inflights.removeAll()
    }

    mutating func becomeSnapshot(_ index: UInt64) {
        state = .snapshot(pending: index)
        snapshotStale = false
        inflights.removeAll()
    }

    /// An accepted append response up to `n`. Returns whether `match` moved.
    mutating func maybeUpdate(_ n: UInt64) -> Bool {
        var updated = false
        if match < n {
            match = n
            updated = true
            probeSent = false
        }
        next = max(next, n + 1)
        return updated
    }

    /// A rejection of the append at `rejected`; `hint` is the follower's best guess of
    /// the last matching index. Returns false for a stale rejection.
    mutating func maybeDecrTo(rejected: UInt64, hint: UInt64) -> Bool {
        if state == .replicate {
            if rejected <= match { return false }
            next = match + 1
            return true
        }
        if next == 0 || next - 1 != rejected { return false }
        next = max(min(rejected, hint + 1), match + 1)
        probeSent = false
        return true
    }

    mutating func freeInflights(upTo index: UInt64) {
        while let first = inflights.first, first <= index { inflights.removeFirst() }
    }
}
