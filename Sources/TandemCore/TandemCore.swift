/// TandemCore — the vocabulary every Tandem module shares.
///
/// Owns: identifiers, byte strings, the seeded random source, the binary codec used for
/// Raft entries and WAL records, and checksums. Imports only the standard library; it must
/// never read a clock, touch a file or draw an unseeded random number, because every pure
/// core (TandemRaft, TandemStore, TandemTraffic) builds on it and must stay deterministic.

/// Raw bytes: keys, values, Raft entry payloads.
public typealias Bytes = [UInt8]

/// A member of a Raft group. 0 means "none".
public typealias NodeID = UInt64

extension Array where Element == UInt8 {
    /// The UTF-8 bytes of a string.
    @inlinable public init(utf8 string: String) { self = Array(string.utf8) }

    /// Decodes as UTF-8, replacing invalid sequences; for logs and reports.
    public var utf8String: String { String(decoding: self, as: UTF8.self) }

    /// Byte-wise lexicographic order, the order etcd sorts keys in.
    @inlinable public static func lexicographicLess(_ a: Bytes, _ b: Bytes) -> Bool {
        let n = Swift.min(a.count, b.count)
        var i = 0
        while i < n {
            let x = a[i]
            let y = b[i]
            if x != y { return x < y }
            i += 1
        }
        return a.count < b.count
    }
}
