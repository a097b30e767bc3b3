import DequeModule
import TandemCore

/// Snapshot format: revisions, each key's last version below the compacted revision, the event
/// log above it (from which the rest of each key's history is rebuilt), the leases, and the
/// ids of recently applied requests, (format 2) the members' published attributes, and
/// (format 3) the alarms raised.
extension MVCCStore {
    static let snapshotFormat: UInt8 = 3

    public func snapshot() -> Bytes {
        var w = ByteWriter(capacity: 1 << 12)
        w.u8(Self.snapshotFormat)
        w.zigzag(revision)
        w.zigzag(compactRevision)
        var base: [(Bytes, Version)] = []
        for e in index.entries {
            if let v = e.versions.last(where: { $0.modRevision < compactRevision }) { base.append((e.key, v)) }
        }
        w.varint(UInt64(base.count))
        for (k, v) in base {
            w.blob(k)
            Self.encode(v, &w)
        }
        w.varint(UInt64(eventLog.count))
        for re in eventLog {
            w.zigzag(re.revision)
            w.varint(UInt64(re.events.count))
            for e in re.events {
                w.u8(e.kind.rawValue)
                Self.encode(e.kv, &w)
                w.bool(e.prevKV != nil)
                if let p = e.prevKV { Self.encode(p, &w) }
            }
        }
        w.varint(UInt64(leases.count))
        for id in leases.keys.sorted() {
            let l = leases[id]!
            w.zigzag(id)
            w.zigzag(l.grantedTTL)
            w.zigzag(l.checkpointedTTL)
        }
        w.varint(UInt64(recentRequests.count))
        for id in recentRequests { w.varint(id) }
        w.varint(UInt64(memberRecords.count))
        for id in memberRecords.keys.sorted() {
            w.varint(id)
            w.blob(memberRecords[id]!)
        }
        w.varint(UInt64(alarms.count))
        for a in alarms.sorted() {
            w.varint(a.memberID)
            w.u8(a.kind.rawValue)
        }
        return w.bytes
    }

    public init(snapshot bytes: Bytes, limits: Limits = Limits()) throws(CodecError) {
        self.init(limits: limits)
        var r = ByteReader(bytes)
        let fmt = try r.u8()
        guard (1...Self.snapshotFormat).contains(fmt) else {
            throw .badTag(what: "store snapshot format", tag: UInt64(fmt), offset: 0)
        }
        let rev = try r.zigzag()
        let compactRev = try r.zigzag()
        var hist: [Bytes: [Version]] = [:]
        for _ in 0..<(try r.count(minElementBytes: 6)) {
            let k = try r.blob()
            hist[k] = [try Self.decodeVersion(&r)]
        }
        var log = Deque<RevisionEvents>()
        for _ in 0..<(try r.count(minElementBytes: 3)) {
            let er = try r.zigzag()
            var events: [Event] = []
            for _ in 0..<(try r.count(minElementBytes: 6)) {
                let at = r.offset
                guard let kind = Event.Kind(rawValue: try r.u8()) else {
                    throw .badTag(what: "event kind", tag: 0, offset: at)
                }
                let kv = try Self.decodeKV(&r)
                let prev: KeyValue? = try r.bool() ? try Self.decodeKV(&r) : nil
                events.append(Event(kind: kind, kv: kv, prevKV: prev))
                let v = Version(
                    modRevision: er, createRevision: kv.createRevision, version: kv.version, value: kv.value,
                    lease: kv.lease, tombstone: kind == .delete)
                hist[kv.key, default: []].append(v)
            }
            log.append(RevisionEvents(revision: er, events: events))
        }
        var ls: [Int64: LeaseEntry] = [:]
        for _ in 0..<(try r.count(minElementBytes: 3)) {
            let id = try r.zigzag()
            ls[id] = LeaseEntry(grantedTTL: try r.zigzag(), checkpointedTTL: try r.zigzag(), keys: [])
        }
        // Lease attachments follow from each key's live version.
        for (k, h) in hist {
            if let v = h.last, !v.tombstone, v.lease != 0 { ls[v.lease]?.keys.insert(k) }
        }
        var requests: [UInt64] = []
        for _ in 0..<(try r.count()) { requests.append(try r.varint()) }
        var members: [UInt64: Bytes] = [:]
        if fmt >= 2 {  // format 1 (before member records) ends here
            for _ in 0..<(try r.count(minElementBytes: 2)) { members[try r.varint()] = try r.blob() }
        }
        var alarms: Set<StoreAlarm> = []
        if fmt >= 3 {  // format 2 (before alarms) ends here
            for _ in 0..<(try r.count(minElementBytes: 2)) {
                let member = try r.varint()
                let at = r.offset
                let raw = try r.u8()
                guard let kind = StoreAlarm.Kind(rawValue: raw) else {
                    throw .badTag(what: "alarm kind", tag: UInt64(raw), offset: at)
                }
                alarms.insert(StoreAlarm(memberID: member, kind: kind))
            }
        }
        restore(
            revision: rev, compactRevision: compactRev, history: hist, leases: ls, eventLog: log,
            memberRecords: members, alarms: alarms)
        restoreRequests(requests)
    }

    private static func encode(_ v: Version, _ w: inout ByteWriter) {
        w.zigzag(v.modRevision)
        w.zigzag(v.createRevision)
        w.zigzag(v.version)
        w.blob(v.value)
        w.zigzag(v.lease)
        w.bool(v.tombstone)
    }

    private static func decodeVersion(_ r: inout ByteReader) throws(CodecError) -> Version {
        Version(
            modRevision: try r.zigzag(), createRevision: try r.zigzag(), version: try r.zigzag(),
            value: try r.blob(), lease: try r.zigzag(), tombstone: try r.bool())
    }

    private static func encode(_ kv: KeyValue, _ w: inout ByteWriter) {
        w.blob(kv.key)
        w.zigzag(kv.createRevision)
        w.zigzag(kv.modRevision)
        w.zigzag(kv.version)
        w.blob(kv.value)
        w.zigzag(kv.lease)
    }

    private static func decodeKV(_ r: inout ByteReader) throws(CodecError) -> KeyValue {
        KeyValue(
            key: try r.blob(), createRevision: try r.zigzag(), modRevision: try r.zigzag(), version: try r.zigzag(),
            value: try r.blob(), lease: try r.zigzag())
    }
}
