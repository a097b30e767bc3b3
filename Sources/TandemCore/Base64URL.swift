/// base64url without padding (RFC 4648 §5), as JOSE uses it. Strict: decoding refuses
/// padding, characters outside the alphabet, a length of 1 mod 4 and non-zero trailing bits,
/// so one value has exactly one encoding (a token cannot be altered without changing bytes
/// the signature covers).
public enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    private static let values: [UInt8] = {
        var t = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in alphabet.enumerated() { t[Int(c)] = UInt8(i) }
        return t
    }()

    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count * 4 + 2) / 3)
        var it = bytes.makeIterator()
        while let a = it.next() {
            let b = it.next()
            let c = b == nil ? nil : it.next()
            out.append(alphabet[Int(a >> 2)])
            out.append(alphabet[Int((a & 0x03) << 4 | (b ?? 0) >> 4)])
            guard let b else { break }
            out.append(alphabet[Int((b & 0x0F) << 2 | (c ?? 0) >> 6)])
            guard let c else { break }
            out.append(alphabet[Int(c & 0x3F)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func encode(_ s: String) -> String { encode(Array(s.utf8)) }

    /// nil for anything that is not canonical unpadded base64url.
    public static func decode(_ text: some Collection<UInt8>) -> [UInt8]? {
        // Contiguous bytes (arrays, native strings and their slices) decode without a generic
        // iterator — the difference is most of a MAC proof check.
        if let r = text.withContiguousStorageIfAvailable({ decode(buffer: $0) }) { return r }
        return Array(text).withUnsafeBufferPointer { decode(buffer: $0) }
    }

    private static func decode(buffer text: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        let n = text.count
        if n % 4 == 1 { return nil }
        return values.withUnsafeBufferPointer { values -> [UInt8]? in
            var failed = false
            let out = [UInt8](unsafeUninitializedCapacity: n * 3 / 4) { out, count in
                var acc: UInt32 = 0
                var bits: UInt32 = 0
                var k = 0
                for c in text {
                    let v = values[Int(c)]
                    if v == 0xFF {
                        failed = true
                        break
                    }
                    acc = acc << 6 | UInt32(v)
                    bits += 6
                    if bits >= 8 {
                        bits -= 8
                        out[k] = UInt8(truncatingIfNeeded: acc >> bits)
                        k += 1
                    }
                }
                // Leftover bits must be zero (canonical form).
                if bits > 0, acc & ((1 << bits) - 1) != 0 { failed = true }
                count = k
            }
            return failed ? nil : out
        }
    }

    public static func decode(_ s: Substring) -> [UInt8]? { decode(s.utf8) }
    public static func decode(_ s: String) -> [UInt8]? { decode(s.utf8) }
}
