import TandemCore
import TandemRaft

/// A Raft node's durable state: WAL segments (`wal-<seq>.log`) and snapshot files
/// (`snap-<index>.snap`) in one directory.
///
/// WAL record: `[u32 payload length][u32 CRC-32C of type+payload][u8 type][payload]`.
/// Each segment starts with the hard state and latest snapshot marker, so older segments
/// can be deleted once a snapshot covers them. `save` writes one batch and issues one
/// fsync (group commit); nothing counts as persisted before that fsync returns.
public final class DurableLog {
    public struct Options: Sendable {
        /// A new segment starts once the current one reaches this size.
        public var segmentBytes = 64 << 20
        /// Snapshot files kept besides the newest.
        public var retainedSnapshots = 1
        public init() {}
    }

    public struct Recovered: Sendable {
        public var hardState = HardState()
        public var snapshot: Snapshot?
        public var entries: [Entry] = []
        /// Human-readable notes on what recovery did (e.g. a truncated torn tail).
        public var notes: [String] = []
    }

    enum RecordType: UInt8 {
        case entry = 1
        case hardState = 2
        case snapshotMarker = 3
    }

    static let headerBytes = 9
    /// A record larger than this is treated as corrupt (its length prefix cannot be right).
    static let maxRecordBytes = 256 << 20

    public let options: Options
    private let fs: any FileSystem
    private var segments: [(name: String, seq: UInt64, maxIndex: UInt64)] = []
    private var currentSize = 0
    private var hardState = HardState()
    private var snapshotIndex: UInt64 = 0
    private var snapshotTerm: UInt64 = 0
    /// Counters for tests and metrics.
    public private(set) var syncs = 0
    public private(set) var bytesWritten = 0

    /// Opens (recovering) or creates the log in `fs`.
    public init(fs: any FileSystem, options: Options = Options()) {
        self.fs = fs
        self.options = options
    }

    // MARK: - Recovery

    /// Reads everything back. A torn or corrupt tail of the newest segment is truncated (and
    /// noted); corruption anywhere else throws an error naming the file and offset.
    public func recover() throws -> Recovered {
        var out = Recovered()
        let names = try fs.list()
        for n in names where n.hasSuffix(".tmp") {
            try fs.remove(n)
            out.notes.append("storage: removed incomplete temporary file \(n)")
        }
        let snaps = names.filter { $0.hasPrefix("snap-") && $0.hasSuffix(".snap") }.sorted()
        if let newest = snaps.last {
            let s = try Self.decodeSnapshotFile(try fs.read(newest), name: newest)
            out.snapshot = s
            snapshotIndex = s.metadata.index
            snapshotTerm = s.metadata.term
        }
        let wals = names.filter { $0.hasPrefix("wal-") && $0.hasSuffix(".log") }.sorted()
        var ents: [Entry] = []
        for (k, name) in wals.enumerated() {
            let isLast = k == wals.count - 1
            let bytes = try fs.read(name)
            var off = 0
            var maxIndex: UInt64 = 0
            while off < bytes.count {
                guard let (type, payload, next) = Self.parseRecord(bytes, at: off) else {
                    if isLast && !Self.hasValidRecord(bytes, after: off) {
                        try fs.truncate(name, to: off)
                        try fs.sync(name)
                        out.notes.append(
                            "wal: truncated torn tail of \(name) at offset \(off) (\(bytes.count - off) bytes dropped)")
                        break
                    }
                    throw StorageError(
                        "wal: corrupt record in \(name) at offset \(off)"
                            + (isLast ? " with valid records after it" : "")
                            + "; refusing to start (data after this point would be lost)")
                }
                var r = ByteReader(payload)
                do {
                    switch type {
                    case .entry:
                        let e = try Entry(from: &r)
                        maxIndex = max(maxIndex, e.index)
                        try Self.place(e, into: &ents, after: snapshotIndex, file: name, offset: off)
                    case .hardState:
                        out.hardState = try HardState(from: &r)
                    case .snapshotMarker:
                        break
                    }
                } catch let e as CodecError {
                    throw StorageError("wal: undecodable record in \(name) at offset \(off): \(e)")
                }
                off = next
            }
            segments.append((name, Self.seq(of: name), maxIndex))
            if isLast { currentSize = min(off, bytes.count) }
        }
        out.entries = ents
        hardState = out.hardState
        if out.hardState.commit > (ents.last?.index ?? snapshotIndex) {
            throw StorageError(
                "wal: hard state commit \(out.hardState.commit) is beyond the last recovered entry "
                    + "\(ents.last?.index ?? snapshotIndex); the log lost acknowledged entries")
        }
        if segments.isEmpty { try startSegment(seq: 1) }
        return out
    }

    private static func place(
        _ e: Entry, into ents: inout [Entry], after snap: UInt64, file: String, offset: Int
    )
        throws
    {
        if e.index <= snap { return }
        let expected = (ents.last?.index ?? snap) + 1
        if e.index < expected {
            // A later record overwrites a conflicting suffix (Raft §5.3).
            ents.removeLast(Int(expected - e.index))
        } else if e.index > expected {
            throw StorageError(
                "wal: gap in \(file) at offset \(offset): entry \(e.index) follows \(expected - 1)")
        }
        ents.append(e)
    }

    static func parseRecord(_ b: Bytes, at off: Int) -> (RecordType, Bytes, Int)? {
        guard b.count - off >= headerBytes else { return nil }
        var r = ByteReader(b, offset: off)
        guard let len = try? r.u32(), let crc = try? r.u32() else { return nil }
        let n = Int(len)
        guard n <= maxRecordBytes, b.count - off - 8 >= n + 1 else { return nil }
        let body = b[(off + 8)..<(off + 9 + n)]
        guard CRC32C.checksum(body) == crc, let type = RecordType(rawValue: body.first!) else { return nil }
        return (type, Array(body.dropFirst()), off + 9 + n)
    }

    static func hasValidRecord(_ b: Bytes, after off: Int) -> Bool {
        var o = off + 1
        while o + headerBytes <= b.count {
            if parseRecord(b, at: o) != nil { return true }
            o += 1
        }
        return false
    }

    private static func seq(of name: String) -> UInt64 {
        UInt64(name.dropFirst(4).dropLast(4), radix: 16) ?? 0
    }

    private static func segmentName(_ seq: UInt64) -> String {
        let hex = String(seq, radix: 16)
        return "wal-" + String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".log"
    }

    private static func snapshotName(_ index: UInt64) -> String {
        let hex = String(index, radix: 16)
        return "snap-" + String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".snap"
    }

    // MARK: - Writing

    static func record(_ type: RecordType, _ payload: Bytes, into w: inout ByteWriter) {
        var body = Bytes()
        body.reserveCapacity(payload.count + 1)
        body.append(type.rawValue)
        body.append(contentsOf: payload)
        w.u32(UInt32(payload.count))
        w.u32(CRC32C.checksum(body))
        w.raw(body)
    }

    /// Persists a Ready's hard state and entries with one fsync.
    public func save(hardState hs: HardState?, entries: [Entry]) throws {
        guard hs != nil || !entries.isEmpty else { return }
        precondition(!segments.isEmpty, "DurableLog.save before recover()")
        var w = ByteWriter(capacity: 64 + entries.reduce(0) { $0 + $1.size })
        for e in entries {
            var p = ByteWriter(capacity: e.size)
            e.encode(into: &p)
            Self.record(.entry, p.bytes, into: &w)
        }
        if let hs {
            var p = ByteWriter()
            hs.encode(into: &p)
            Self.record(.hardState, p.bytes, into: &w)
            hardState = hs
        }
        let cur = segments[segments.count - 1]
        try fs.append(cur.name, w.bytes)
        try fs.sync(cur.name)
        syncs += 1
        bytesWritten += w.bytes.count
        currentSize += w.bytes.count
        if let last = entries.last { segments[segments.count - 1].maxIndex = max(cur.maxIndex, last.index) }
        if currentSize >= options.segmentBytes { try startSegment(seq: cur.seq + 1) }
    }

    private func startSegment(seq: UInt64) throws {
        let name = Self.segmentName(seq)
        var w = ByteWriter()
        var p = ByteWriter()
        hardState.encode(into: &p)
        Self.record(.hardState, p.bytes, into: &w)
        var m = ByteWriter()
        m.varint(snapshotIndex)
        m.varint(snapshotTerm)
        Self.record(.snapshotMarker, m.bytes, into: &w)
        try fs.write(name, w.bytes)
        try fs.sync(name)
        try fs.syncDirectory()
        segments.append((name, seq, 0))
        currentSize = w.bytes.count
        syncs += 2
    }

    /// Writes a snapshot atomically (temp file, fsync, rename, fsync directory), then drops
    /// WAL segments and older snapshots it makes unnecessary.
    public func saveSnapshot(_ s: Snapshot) throws {
        try Self.writeSnapshotFile(s, to: fs)
        syncs += 2
        try snapshotWritten(s.metadata)
    }

    /// The durable half of `saveSnapshot`, safe to run on another thread with *its own*
    /// `FileSystem` for the same directory: it touches only the snapshot's own files.
    public static func writeSnapshotFile(_ s: Snapshot, to fs: any FileSystem) throws {
        let name = snapshotName(s.metadata.index)
        let tmp = name + ".tmp"
        var p = ByteWriter(capacity: s.data.count + 64)
        s.encode(into: &p)
        var w = ByteWriter(capacity: p.bytes.count + 8)
        w.u32(CRC32C.checksum(p.bytes))
        w.raw(p.bytes)
        try fs.write(tmp, w.bytes)
        try fs.sync(tmp)
        try fs.rename(tmp, name)
        try fs.syncDirectory()
    }

    /// After `writeSnapshotFile` returned: record the snapshot and drop what it covers.
    public func snapshotWritten(_ m: SnapshotMetadata) throws {
        guard m.index > snapshotIndex else { return }
        snapshotIndex = m.index
        snapshotTerm = m.term
        try releaseBefore(snapshotIndex: m.index)
    }

    static func decodeSnapshotFile(_ b: Bytes, name: String) throws -> Snapshot {
        var r = ByteReader(b)
        guard let crc = try? r.u32() else { throw StorageError("snapshot \(name): truncated header") }
        let body = Array(b[4...])
        guard CRC32C.checksum(body) == crc else {
            throw StorageError("snapshot \(name): checksum mismatch at offset 0; refusing to start")
        }
        var br = ByteReader(body)
        do {
            return try Snapshot(from: &br)
        } catch {
            throw StorageError("snapshot \(name): undecodable at offset \(br.offset + 4): \(error)")
        }
    }

    /// Deletes segments whose entries all precede the snapshot (never the current one), and
    /// snapshots older than the retained ones.
    private func releaseBefore(snapshotIndex idx: UInt64) throws {
        // Roll first so the current segment is not holding only old entries forever.
        if segments.count == 1 && segments[0].maxIndex <= idx && segments[0].maxIndex > 0 {
            try startSegment(seq: segments[0].seq + 1)
        }
        var removed = false
        while segments.count > 1 && segments[0].maxIndex <= idx {
            try fs.remove(segments[0].name)
            segments.removeFirst()
            removed = true
        }
        let snaps = try fs.list().filter { $0.hasPrefix("snap-") && $0.hasSuffix(".snap") }.sorted()
        for old in snaps.dropLast(options.retainedSnapshots + 1) {
            try fs.remove(old)
            removed = true
        }
        if removed { try fs.syncDirectory() }
    }

    public var segmentNames: [String] { segments.map(\.name) }
}
