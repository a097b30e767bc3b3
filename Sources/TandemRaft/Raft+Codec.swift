import TandemCore

// Binary encodings of Raft's values, for the WAL, snapshots and the peer transport.

extension ConfChange {
    public func encoded() -> Bytes {
        var w = ByteWriter()
        w.u8(kind.rawValue)
        w.varint(node)
        w.blob(context)
        return w.bytes
    }

    public init(decoding bytes: Bytes) throws(CodecError) {
        var r = ByteReader(bytes)
        let tag = try r.u8()
        guard let k = Kind(rawValue: tag) else { throw .badTag(what: "conf change", tag: UInt64(tag), offset: 0) }
        kind = k
        node = try r.varint()
        context = try r.blob()
    }
}

extension ConfState {
    public func encode(into w: inout ByteWriter) {
        w.varint(UInt64(voters.count))
        for v in voters.sorted() { w.varint(v) }
        w.varint(UInt64(learners.count))
        for l in learners.sorted() { w.varint(l) }
    }

    public init(from r: inout ByteReader) throws(CodecError) {
        var v = Set<NodeID>()
        for _ in 0..<(try r.count()) { v.insert(try r.varint()) }
        var l = Set<NodeID>()
        for _ in 0..<(try r.count()) { l.insert(try r.varint()) }
        self.init(voters: v, learners: l)
    }
}

extension Entry {
    public func encode(into w: inout ByteWriter) {
        w.varint(term)
        w.varint(index)
        w.u8(kind.rawValue)
        w.blob(data)
    }

    public init(from r: inout ByteReader) throws(CodecError) {
        term = try r.varint()
        index = try r.varint()
        let at = r.offset
        let tag = try r.u8()
        guard let k = EntryKind(rawValue: tag) else { throw .badTag(what: "entry kind", tag: UInt64(tag), offset: at) }
        kind = k
        data = try r.blob()
    }
}

extension HardState {
    public func encode(into w: inout ByteWriter) {
        w.varint(term)
        w.varint(vote)
        w.varint(commit)
    }

    public init(from r: inout ByteReader) throws(CodecError) {
        self.init(term: try r.varint(), vote: try r.varint(), commit: try r.varint())
    }
}

extension SnapshotMetadata {
    public func encode(into w: inout ByteWriter) {
        w.varint(index)
        w.varint(term)
        conf.encode(into: &w)
    }

    public init(from r: inout ByteReader) throws(CodecError) {
        let i = try r.varint()
        let t = try r.varint()
        self.init(index: i, term: t, conf: try ConfState(from: &r))
    }
}

extension Snapshot {
    public func encode(into w: inout ByteWriter) {
        metadata.encode(into: &w)
        w.blob(data)
    }

    public init(from r: inout ByteReader) throws(CodecError) {
        let m = try SnapshotMetadata(from: &r)
        self.init(metadata: m, data: try r.blob())
    }
}

extension Message {
    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 64 + entries.reduce(0) { $0 + $1.size })
        w.u8(kind.rawValue)
        w.varint(from)
        w.varint(to)
        w.varint(term)
        w.varint(logTerm)
        w.varint(index)
        w.varint(commit)
        w.bool(reject)
        w.varint(rejectHint)
        w.blob(context)
        w.varint(UInt64(entries.count))
        for e in entries { e.encode(into: &w) }
        w.bool(snapshot != nil)
        snapshot?.encode(into: &w)
        return w.bytes
    }

    public init(decoding bytes: Bytes) throws(CodecError) {
        var r = ByteReader(bytes)
        let tag = try r.u8()
        guard let k = MessageKind(rawValue: tag) else {
            throw .badTag(what: "message kind", tag: UInt64(tag), offset: 0)
        }
        self.init(kind: k)
        from = try r.varint()
        to = try r.varint()
        term = try r.varint()
        logTerm = try r.varint()
        index = try r.varint()
        commit = try r.varint()
        reject = try r.bool()
        rejectHint = try r.varint()
        context = try r.blob()
        let n = try r.count(minElementBytes: 4)
        entries.reserveCapacity(n)
        for _ in 0..<n { entries.append(try Entry(from: &r)) }
        if try r.bool() { snapshot = try Snapshot(from: &r) }
    }
}
