/// CRC-32C (Castagnoli), the checksum of WAL records and snapshot files.
public enum CRC32C {
    private static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    public static func checksum<C: Collection>(_ bytes: C, seed: UInt32 = 0) -> UInt32
    where C.Element == UInt8 {
        var crc = ~seed
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return ~crc
    }
}

/// FNV-1a, 64-bit: a cheap, stable hash for simulation traces (not for security).
public struct FNV1a: Sendable {
    public private(set) var value: UInt64 = 0xCBF2_9CE4_8422_2325
    public init() {}
    public mutating func add(byte: UInt8) {
        value = (value ^ UInt64(byte)) &* 0x0000_0100_0000_01B3
    }
    public mutating func add(_ x: UInt64) {
        var v = x
        for _ in 0..<8 {
            add(byte: UInt8(truncatingIfNeeded: v))
            v >>= 8
        }
    }
    public mutating func add(_ bytes: Bytes) {
        add(UInt64(bytes.count))
        for b in bytes { add(byte: b) }
    }
    public mutating func add(_ s: String) { add(Bytes(s.utf8)) }
}
