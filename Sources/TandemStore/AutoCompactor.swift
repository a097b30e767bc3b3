/// etcd's auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`) as a
/// decision fed time and revisions: the leader asks it on every tick which revision to
/// compact to, if any. Pure: the shell proposes the compaction.
///
/// - `periodic(retentionMs)`: keep the history of the last `retentionMs`. A sample of the
///   revision is taken every `checkEveryMs` (a tenth of the retention by default, as etcd's
///   periodic compactor does); the newest sample at least `retentionMs` old is compacted to.
/// - `revision(keep)`: keep the last `keep` revisions, checked every `checkEveryMs` (etcd: 5 min).
public struct AutoCompactor: Sendable {
    public enum Mode: Sendable, Equatable {
        case periodic(retentionMs: Int64)
        case revision(keep: Int64)
    }

    public let mode: Mode
    public let checkEveryMs: Int64
    private var samples: [(at: Int64, revision: Int64)] = []
    private var nextCheck: Int64?
    private var lastTarget: Int64 = 0

    public init(_ mode: Mode, checkEveryMs: Int64? = nil) {
        self.mode = mode
        switch mode {
        case .periodic(let r): self.checkEveryMs = max(1, checkEveryMs ?? max(1_000, r / 10))
        case .revision: self.checkEveryMs = max(1, checkEveryMs ?? 300_000)
        }
    }

    /// The revision to compact to now, or nil. `compacted`: the store's compacted revision.
    public mutating func tick(now: Int64, revision: Int64, compacted: Int64) -> Int64? {
        if let next = nextCheck, now < next { return nil }
        nextCheck = now + checkEveryMs
        let target: Int64?
        switch mode {
        case .revision(let keep):
            target = revision - keep
        case .periodic(let retention):
            samples.append((now, revision))
            var old: Int64?
            while let first = samples.first, now - first.at >= retention {
                old = first.revision
                samples.removeFirst()
            }
            target = old
        }
        guard let t = target, t > max(compacted, lastTarget), t <= revision else { return nil }
        lastTarget = t
        return t
    }

    /// Leadership moved away: start sampling afresh when it comes back (etcd pauses too).
    public mutating func reset() {
        samples = []
        nextCheck = nil
    }
}
