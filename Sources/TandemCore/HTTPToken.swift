/// HTTP's token syntax (RFC 9110 §5.6.2): what header field names are made of.
public enum HTTPToken {
    /// Whether `c` is a `tchar`: ALPHA, DIGIT or one of ``!#$%&'*+-.^_`|~`` (one bit test; this
    /// runs for every byte of every field name).
    @inlinable public static func isTokenByte(_ c: UInt8) -> Bool {
        c < 64 ? (low >> UInt64(c)) & 1 == 1 : c < 128 ? (high >> UInt64(c - 64)) & 1 == 1 : false
    }

    /// The `tchar` bits for bytes 0–63 and 64–127.
    @usableFromInline static let low: UInt64 = 0x03ff_6cfa_0000_0000
    @usableFromInline static let high: UInt64 = 0x57ff_ffff_c7ff_fffe
}
