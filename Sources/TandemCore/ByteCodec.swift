/// A small, explicit binary codec: little-endian fixed integers, LEB128 varints and
/// length-prefixed byte strings. Used for Raft entries, store commands, WAL records and
/// snapshots. Decoding untrusted bytes never traps: it throws `CodecError`.
public struct ByteWriter: Sendable {
    public private(set) var bytes: Bytes

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }

    public mutating func u32(_ v: UInt32) {
        for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) }
    }

    public mutating func u64(_ v: UInt64) {
        for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }

    public mutating func varint(_ v: UInt64) {
        var x = v
        while x >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: x) | 0x80)
            x >>= 7
        }
        bytes.append(UInt8(x))
    }

    /// Signed values are zig-zag encoded so small negatives stay short.
    public mutating func zigzag(_ v: Int64) { varint(UInt64(bitPattern: (v << 1) ^ (v >> 63))) }

    public mutating func blob(_ b: Bytes) {
        varint(UInt64(b.count))
        bytes.append(contentsOf: b)
    }

    public mutating func string(_ s: String) { blob(Bytes(s.utf8)) }

    public mutating func raw(_ b: Bytes) { bytes.append(contentsOf: b) }
}

public enum CodecError: Error, Equatable, CustomStringConvertible {
    case truncated(needed: Int, offset: Int)
    case varintOverflow(offset: Int)
    case badTag(what: String, tag: UInt64, offset: Int)
    case tooLarge(what: String, size: UInt64, limit: Int)

    public var description: String {
        switch self {
        case .truncated(let n, let o): return "truncated input: needed \(n) more bytes at offset \(o)"
        case .varintOverflow(let o): return "varint overflows 64 bits at offset \(o)"
        case .badTag(let w, let t, let o): return "unknown \(w) tag \(t) at offset \(o)"
        case .tooLarge(let w, let s, let l): return "\(w) of \(s) bytes exceeds the limit of \(l)"
        }
    }
}

public struct ByteReader {
    public let bytes: Bytes
    public private(set) var offset: Int
    /// The largest byte string a reader accepts; guards against corrupt length prefixes.
    public static let maxBlobBytes = 512 << 20

    public init(_ bytes: Bytes, offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    public var isAtEnd: Bool { offset >= bytes.count }
    public var remaining: Int { bytes.count - offset }

    private func need(_ n: Int) throws(CodecError) {
        if remaining < n { throw .truncated(needed: n - remaining, offset: offset) }
    }

    public mutating func u8() throws(CodecError) -> UInt8 {
        try need(1)
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func bool() throws(CodecError) -> Bool { try u8() != 0 }

    public mutating func u32() throws(CodecError) -> UInt32 {
        try need(4)
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
        offset += 4
        return v
    }

    public mutating func u64() throws(CodecError) -> UInt64 {
        try need(8)
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        offset += 8
        return v
    }

    public mutating func varint() throws(CodecError) -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        let start = offset
        while true {
            let b = try u8()
            if shift == 63 && b > 1 { throw .varintOverflow(offset: start) }
            result |= UInt64(b & 0x7F) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
            if shift > 63 { throw .varintOverflow(offset: start) }
        }
    }

    public mutating func zigzag() throws(CodecError) -> Int64 {
        let u = try varint()
        return Int64(bitPattern: (u >> 1) ^ (0 &- (u & 1)))
    }

    public mutating func int() throws(CodecError) -> Int {
        let v = try varint()
        guard v <= UInt64(Int.max) else { throw .tooLarge(what: "integer", size: v, limit: Int.max) }
        return Int(v)
    }

    public mutating func blob() throws(CodecError) -> Bytes {
        let n = try varint()
        guard n <= UInt64(Self.maxBlobBytes) else {
            throw .tooLarge(what: "byte string", size: n, limit: Self.maxBlobBytes)
        }
        try need(Int(n))
        defer { offset += Int(n) }
        return Array(bytes[offset..<offset + Int(n)])
    }

    public mutating func string() throws(CodecError) -> String { try blob().utf8String }

    /// Reads a count prefix and refuses counts that cannot fit in what is left.
    public mutating func count(minElementBytes: Int = 1) throws(CodecError) -> Int {
        let n = try varint()
        guard n <= UInt64(remaining / Swift.max(minElementBytes, 1)) else {
            throw .tooLarge(what: "element count", size: n, limit: remaining)
        }
        return Int(n)
    }
}
