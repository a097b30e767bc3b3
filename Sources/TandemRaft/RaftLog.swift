import TandemCore

/// The in-memory Raft log: a snapshot prefix, then entries. `stable` tracks what the shell
/// has confirmed durable; `committed` and `applied` follow §5.3.
struct RaftLog {
    /// Index and term of the last entry covered by the latest snapshot.
    private(set) var offset: UInt64 = 0
    private(set) var offsetTerm: UInt64 = 0
    private(set) var entries: [Entry] = []
    /// Latest snapshot, kept to send to lagging followers (§7).
    var snapshot: Snapshot?
    /// A snapshot received from the leader, not yet handed to the shell.
    var pendingSnapshot: Snapshot?
    var committed: UInt64 = 0
    var applied: UInt64 = 0
    /// Last index known to be on stable storage.
    var stable: UInt64 = 0

    var firstIndex: UInt64 { offset + 1 }
    var lastIndex: UInt64 { offset + UInt64(entries.count) }
    var lastTerm: UInt64 { term(lastIndex) ?? 0 }

    /// Term of the entry at `i`; nil when compacted away or not yet in the log.
    func term(_ i: UInt64) -> UInt64? {
        if i == offset { return offsetTerm }
        if i < offset || i > lastIndex { return nil }
        return entries[Int(i - offset - 1)].term
    }

    func matchTerm(_ i: UInt64, _ t: UInt64) -> Bool { term(i) == t }

    /// §5.4.1: the candidate's log is at least as up-to-date as ours.
    func isUpToDate(lastIndex li: UInt64, term t: UInt64) -> Bool {
        t > lastTerm || (t == lastTerm && li >= lastIndex)
    }

    func entry(_ i: UInt64) -> Entry? {
        guard i > offset, i <= lastIndex else { return nil }
        return entries[Int(i - offset - 1)]
    }

    /// Entries from `lo` through at most `hi`, bounded by `maxBytes` (at least one entry).
    func slice(from lo: UInt64, through hi: UInt64, maxBytes: Int) -> [Entry] {
        guard lo > offset, lo <= hi, lo <= lastIndex else { return [] }
        let end = min(hi, lastIndex)
        var out: [Entry] = []
        var bytes = 0
        var i = lo
        while i <= end {
            let e = entries[Int(i - offset - 1)]
            if !out.isEmpty && bytes + e.size > maxBytes { break }
            bytes += e.size
            out.append(e)
            i += 1
        }
        return out
    }

    /// §5.3 AppendEntries receiver rules 2–5. Returns the new last index on success.
    mutating func maybeAppend(
        index: UInt64, logTerm: UInt64, commit: UInt64, entries ents: [Entry]
    )
        -> UInt64?
    {
        guard matchTerm(index, logTerm) else { return nil }
        let lastNew = index + UInt64(ents.count)
        if let ci = findConflict(ents) {
            precondition(ci > committed, "conflict at \(ci) with committed entry \(committed)")
            append(Array(ents[Int(ci - index - 1)...]))
        }
        commitTo(min(commit, lastNew))
        return lastNew
    }

    /// First index whose term differs from ours, or that we do not have yet.
    func findConflict(_ ents: [Entry]) -> UInt64? {
        for e in ents where !matchTerm(e.index, e.term) {
            // An entry below our snapshot is committed and therefore matches (§5.4).
            if e.index <= offset { continue }
            return e.index
        }
        return nil
    }

    /// Bytes of the entries from `lo` to the end of the log.
    func bytes(from lo: UInt64) -> Int {
        guard lo <= lastIndex else { return 0 }
        var total = 0
        for e in entries[Int(max(lo, offset + 1) - offset - 1)...] { total += e.size }
        return total
    }

    /// Appends, truncating any suffix that conflicts (§5.3 rule 3).
    mutating func append(_ ents: [Entry]) {
        guard let first = ents.first else { return }
        precondition(first.index > committed, "append at \(first.index) would rewrite committed \(committed)")
        let keep = Int(first.index - offset - 1)
        if keep < entries.count { entries.removeSubrange(keep...) }
        precondition(first.index == lastIndex + 1, "gap: append at \(first.index) after \(lastIndex)")
        entries.append(contentsOf: ents)
        stable = min(stable, first.index - 1)
    }

    mutating func commitTo(_ c: UInt64) {
        if c > committed {
            precondition(c <= lastIndex, "commit \(c) beyond last index \(lastIndex)")
            committed = c
        }
    }

    /// Largest index ≤ `index` whose term is ≤ `t`: the fast-backtracking probe (§5.3, the
    /// optimization the paper sketches and etcd implements).
    func findConflictByTerm(index: UInt64, term t: UInt64) -> (UInt64, UInt64) {
        var i = index
        while true {
            guard let tt = term(i) else { return (i, 0) }
            if tt <= t || i == 0 { return (i, tt) }
            i -= 1
        }
    }

    var unstableEntries: [Entry] {
        stable >= lastIndex ? [] : Array(entries[Int(max(stable, offset) - offset)...])
    }

    mutating func stableTo(index: UInt64, term t: UInt64) {
        if matchTerm(index, t) && index > stable { stable = index }
    }

    /// Replaces the log with a snapshot (§7, InstallSnapshot receiver rules 6–8).
    mutating func restore(_ s: Snapshot) {
        offset = s.metadata.index
        offsetTerm = s.metadata.term
        entries = []
        committed = s.metadata.index
        snapshot = s
        pendingSnapshot = s
    }

    /// Keeps `s` (at an applied index) to send to lagging followers and discards entries
    /// up to `keeping` entries before it, so slightly lagging followers still catch up
    /// from the log instead of needing the snapshot.
    mutating func compact(_ s: Snapshot, keeping: UInt64) {
        let i = s.metadata.index
        precondition(i <= applied, "compact to \(i) beyond applied \(applied)")
        guard let t = term(i) else { return }
        precondition(t == s.metadata.term, "snapshot term \(s.metadata.term) != log term \(t) at \(i)")
        snapshot = s
        let cut = i > keeping ? i - keeping : 0
        guard cut > offset, let ct = term(cut) else { return }
        entries.removeFirst(Int(cut - offset))
        offset = cut
        offsetTerm = ct
    }

    /// Rebuilds the log after a restart from what storage recovered.
    init(snapshot s: Snapshot?, entries ents: [Entry], commit: UInt64) {
        if let s {
            offset = s.metadata.index
            offsetTerm = s.metadata.term
            snapshot = s
        }
        entries = ents.filter { $0.index > offset }
        for (k, e) in entries.enumerated() {
            precondition(e.index == offset + 1 + UInt64(k), "recovered log has a gap at \(e.index)")
        }
        stable = lastIndex
        applied = offset
        committed = min(max(commit, offset), lastIndex)
    }
}
