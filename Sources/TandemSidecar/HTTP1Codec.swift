import NIOCore
import NIOHTTP1
import TandemCore

#if canImport(Glibc)
import Glibc
#endif

/// A response from an upstream that breaks HTTP/1.1 (RFC 9112): the connection is closed and
/// the attempt counts as a reset.
struct UpstreamProtocolError: Error, CustomStringConvertible, Equatable {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { "upstream protocol error: \(message)" }
}

/// Parses the responses of one upstream HTTP/1.1 connection (RFC 9112), strictly: status line,
/// header fields, and the body framed by the request and the response (no body for HEAD, 1xx,
/// 204 and 304; chunked, with extensions and trailers; content-length; or until the connection
/// closes). The head it returns leaves out hop-by-hop fields but a 101's `upgrade` (it names the
/// new protocol): the parser has read what they say about this connection. Heads stay bytes
/// (`UpstreamHead`); body parts are slices of the input (no copy). Informational answers other
/// than 101 are skipped; after a 101 every further byte belongs to the new protocol (`leftover`).
///
/// Replaces NIO's `HTTPResponseDecoder` on the proxy's upstream connections: it runs once per
/// response on the hot path, and NIO's decoder sits behind a generic `ByteToMessageHandler`
/// that needs run-time metadata lookups and dynamic casts for every part.
struct HTTP1ResponseParser {
    enum Event {
        case head(UpstreamHead)
        case body(ByteBuffer)
        case end(HTTPHeaders?)
    }

    /// Bound on a response's header block, and on its trailer block.
    let maxHeaderBytes: Int
    /// Bound on a chunk-size line (with its extensions).
    static let maxChunkLineBytes = 4096

    private enum State {
        case head
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd
        case trailers
        case untilClose
        /// After a 101: the bytes are the new protocol's.
        case upgraded
    }
    private var state = State.head
    /// Bytes of an incomplete block already searched for its end (not searched again).
    private var scanned = 0
    /// The response now being read answers a HEAD request (set before each request is sent).
    var answersHead = false
    /// The connection can carry another request after this response.
    private(set) var keepAlive = true
    var upgraded: Bool {
        if case .upgraded = state { return true }
        return false
    }
    /// The body ends when the connection closes.
    var readsUntilClose: Bool {
        if case .untilClose = state { return true }
        return false
    }

    init(maxHeaderBytes: Int) { self.maxHeaderBytes = maxHeaderBytes }

    /// The next event from `buffer` (its reader index moves past what was used), or nil when
    /// more bytes are needed; the caller keeps the unread bytes and calls again with them
    /// followed by the next read.
    mutating func next(_ buffer: inout ByteBuffer) throws(UpstreamProtocolError) -> Event? {
        while true {
            if pendingEnd {
                pendingEnd = false
                return .end(nil)
            }
            switch state {
            case .head:
                guard let end = try blockEnd(buffer, limit: maxHeaderBytes, what: "response header block") else {
                    return nil
                }
                let block = buffer.readSlice(length: end)!
                scanned = 0
                let head = try parseHead(block)
                let code = head.status.code
                if code >= 100 && code < 200 && code != 101 { continue }  // informational: the answer follows
                return .head(head)
            case .fixed(let remaining):
                guard buffer.readableBytes > 0 else { return nil }
                let n = min(remaining, buffer.readableBytes)
                let part = buffer.readSlice(length: n)!
                if n == remaining {
                    state = .head
                    pendingEnd = true
                } else {
                    state = .fixed(remaining: remaining - n)
                }
                return .body(part)
            case .chunkSize:
                guard let end = try lineEnd(buffer, limit: Self.maxChunkLineBytes, what: "chunk-size line") else {
                    return nil
                }
                let line = buffer.readSlice(length: end)!
                let size = try Self.chunkSize(line)
                state = size == 0 ? .trailers : .chunkData(remaining: size)
            case .chunkData(let remaining):
                guard buffer.readableBytes > 0 else { return nil }
                let n = min(remaining, buffer.readableBytes)
                let part = buffer.readSlice(length: n)!
                state = n == remaining ? .chunkDataEnd : .chunkData(remaining: remaining - n)
                return .body(part)
            case .chunkDataEnd:
                guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
                if first == UInt8(ascii: "\n") {
                    buffer.moveReaderIndex(forwardBy: 1)
                } else if first == UInt8(ascii: "\r") {
                    guard let second = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self) else { return nil }
                    guard second == UInt8(ascii: "\n") else {
                        throw UpstreamProtocolError("chunk data not followed by CRLF")
                    }
                    buffer.moveReaderIndex(forwardBy: 2)
                } else {
                    throw UpstreamProtocolError("chunk data longer than its chunk size")
                }
                state = .chunkSize
            case .trailers:
                guard let end = try blockEnd(buffer, limit: maxHeaderBytes, what: "trailer block", fromLineStart: true)
                else { return nil }
                let block = buffer.readSlice(length: end)!
                scanned = 0
                state = .head
                var framing = Framing()
                try Self.parseFields(block, keepUpgrade: false, framing: &framing)
                let trailers = UpstreamHead.headers(block, keepUpgrade: false)
                return .end(trailers.isEmpty ? nil : trailers)
            case .untilClose:
                guard buffer.readableBytes > 0 else { return nil }
                return .body(buffer.readSlice(length: buffer.readableBytes)!)
            case .upgraded:
                return nil
            }
        }
    }

    /// The message ended with what was returned last (a body without more bytes to come):
    /// the next call returns `.end(nil)`.
    private var pendingEnd = false

    /// The end of a body read until the connection closed: the connection went away.
    mutating func closed() -> Bool {
        guard readsUntilClose else { return false }
        state = .head
        return true
    }

    // MARK: blocks and lines

    /// The length of the header block at the start of `buffer`, through its empty line; nil
    /// when it is not complete yet (and within `limit`). `fromLineStart`: the buffer starts at
    /// a line's start, so an empty line may be the very first one (trailers).
    private mutating func blockEnd(
        _ buffer: ByteBuffer, limit: Int, what: String, fromLineStart: Bool = false
    ) throws(UpstreamProtocolError) -> Int? {
        let found: Int? = buffer.withUnsafeReadableBytes { b in
            let n = b.count
            if fromLineStart {
                if n >= 1 && b[0] == UInt8(ascii: "\n") { return 1 }
                if n >= 2 && b[0] == UInt8(ascii: "\r") && b[1] == UInt8(ascii: "\n") { return 2 }
            }
            var i = max(scanned, 1)
            while i < n {
                // An LF that ends an empty line: the one before it is LF, or CR after an LF.
                let lf = index(of: UInt8(ascii: "\n"), b, i, n)
                guard lf < n else { return nil }
                if b[lf - 1] == UInt8(ascii: "\n") { return lf + 1 }
                if b[lf - 1] == UInt8(ascii: "\r") && lf >= 2 && b[lf - 2] == UInt8(ascii: "\n") { return lf + 1 }
                i = lf + 1
            }
            return nil
        }
        if let found {
            guard found <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
            return found
        }
        guard buffer.readableBytes <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
        scanned = buffer.readableBytes
        return nil
    }

    /// The length of the line at the start of `buffer` through its LF, or nil.
    private func lineEnd(_ buffer: ByteBuffer, limit: Int, what: String) throws(UpstreamProtocolError) -> Int? {
        let found: Int? = buffer.withUnsafeReadableBytes { b in
            let lf = index(of: UInt8(ascii: "\n"), b, 0, b.count)
            return lf < b.count ? lf + 1 : nil
        }
        if let found {
            guard found <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
            return found
        }
        guard buffer.readableBytes <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
        return nil
    }

    // MARK: head

    private mutating func parseHead(_ block: ByteBuffer) throws(UpstreamProtocolError) -> UpstreamHead {
        let (version, code, fieldsStart): (HTTPVersion, Int, Int) = try block.withUnsafeReadableBytes {
            b throws(UpstreamProtocolError) in
            // "HTTP/1.x SP 3DIGIT SP reason-phrase CRLF" (the reason may be empty).
            guard b.count >= 12, b[0] == 72, b[1] == 84, b[2] == 84, b[3] == 80, b[4] == 47, b[5] == 49,
                b[6] == 46, b[7] == 48 || b[7] == 49, b[8] == 32
            else { throw UpstreamProtocolError("invalid status line") }
            var code = 0
            for i in 9..<12 {
                guard b[i] >= 48 && b[i] <= 57 else { throw UpstreamProtocolError("invalid status code") }
                code = code * 10 + Int(b[i] - 48)
            }
            guard code >= 100 else { throw UpstreamProtocolError("invalid status code \(code)") }
            let lf = index(of: UInt8(ascii: "\n"), b, 0, b.count)
            guard lf < b.count else { throw UpstreamProtocolError("invalid status line") }
            if lf > 12 && b[12] != 32 && !(lf == 13 && b[12] == 13) {
                throw UpstreamProtocolError("invalid status line")
            }
            for i in 12..<lf where b[i] < 32 && b[i] != 9 && !(i == lf - 1 && b[i] == 13) {
                throw UpstreamProtocolError("invalid character in the reason phrase")
            }
            return (HTTPVersion(major: 1, minor: Int(b[7] - 48)), code, lf + 1)
        }
        var rest = block
        rest.moveReaderIndex(forwardBy: fieldsStart)
        var framing = Framing()
        try Self.parseFields(rest, keepUpgrade: code == 101, framing: &framing)

        // Framing and persistence (RFC 9112 §6.3, §9.3).
        let contentLength = framing.contentLength
        let chunked = framing.chunked
        let transferEncoding = framing.transferEncoding
        var close = framing.close || (version.minor == 0 && !framing.keepAlive)
        let head = UpstreamHead(
            version: version, code: code, fields: rest, keepsUpgrade: code == 101,
            contentLength: framing.contentLength, grpcStatus: framing.grpcStatus, sizes: framing.sizes)
        let noBody = answersHead || (code >= 100 && code < 200) || code == 204 || code == 304
        if code == 101 {
            keepAlive = false
            state = .upgraded
            pendingEnd = true
        } else if code < 200 {
            state = .head
        } else if noBody {
            pendingEnd = true
            state = .head
        } else if transferEncoding {
            // A length alongside a coding may be an attempt at response splitting: the coding
            // frames this body, and the connection is not used again (RFC 9112 §6.3).
            if contentLength != nil { close = true }
            if chunked {
                state = .chunkSize
            } else {
                state = .untilClose
                close = true
            }
        } else if let n = contentLength {
            if n == 0 {
                pendingEnd = true
                state = .head
            } else {
                state = .fixed(remaining: n)
            }
        } else {
            state = .untilClose
            close = true
        }
        if close { keepAlive = false }
        return head
    }

    /// What a head's fields say about its body and its connection.
    struct Framing {
        var contentLength: Int?
        var transferEncoding = false
        /// The final transfer coding is chunked.
        var chunked = false
        /// `connection: close` / `connection: keep-alive`.
        var close = false
        var keepAlive = false
        /// The first `grpc-status` field, when it is a number.
        var grpcStatus: Int?
        var sawGRPCStatus = false
        /// The end-to-end fields' sizes.
        var sizes = FieldSizes()
    }

    /// Checks the header (or trailer) field lines up to the empty line that ends `block`, and
    /// reads the framing fields and counts the end-to-end ones as they go by.
    private static func parseFields(
        _ block: ByteBuffer, keepUpgrade: Bool, framing: inout Framing
    ) throws(UpstreamProtocolError) {
        try block.withUnsafeReadableBytes { b throws(UpstreamProtocolError) in
            try forEachFieldLine(b) { start, colon, vs, ve throws(UpstreamProtocolError) in
                let first = b[start]
                if first == 32 || first == 9 {
                    throw UpstreamProtocolError("obsolete line folding in a header field")
                }
                for i in start..<colon where !HTTPToken.isTokenByte(b[i]) {
                    throw UpstreamProtocolError("invalid header field name")
                }
                guard colon < vs, colon > start else { throw UpstreamProtocolError("invalid header field") }
                guard isFieldValue(b, vs, ve) else {
                    throw UpstreamProtocolError("invalid character in a header field value")
                }
                var kind: FieldSizes.Kind?
                switch colon - start {
                case 10 where lowerEquals(b, start, colon, "connection"):
                    forEachElement(b, vs, ve) { s, e in
                        if lowerEquals(b, s, e, "close") { framing.close = true }
                        if lowerEquals(b, s, e, "keep-alive") { framing.keepAlive = true }
                    }
                case 11 where !framing.sawGRPCStatus && lowerEquals(b, start, colon, "grpc-status"):
                    framing.sawGRPCStatus = true
                    framing.grpcStatus = Int(
                        String(decoding: UnsafeRawBufferPointer(rebasing: b[vs..<ve]), as: UTF8.self))
                case 14 where lowerEquals(b, start, colon, "content-length"):
                    kind = .length
                    try forEachElement(b, vs, ve) { s, e throws(UpstreamProtocolError) in
                        var value = 0
                        for i in s..<e {
                            guard b[i] >= 48 && b[i] <= 57, e - s <= 18 else {
                                value = -1
                                break
                            }
                            value = value * 10 + Int(b[i] - 48)
                        }
                        guard e > s, value >= 0 else {
                            let text = String(decoding: UnsafeRawBufferPointer(rebasing: b[vs..<ve]), as: UTF8.self)
                            throw UpstreamProtocolError("invalid content-length \"\(text)\"")
                        }
                        if let seen = framing.contentLength, seen != value {
                            throw UpstreamProtocolError("conflicting content-length values")
                        }
                        framing.contentLength = value
                    }
                case 17 where lowerEquals(b, start, colon, "transfer-encoding"):
                    // Only the final coding decides (earlier fields list earlier codings).
                    kind = .coding
                    framing.transferEncoding = true
                    framing.chunked = finalCodingIsChunked(b, vs, ve)
                default: break
                }
                if UpstreamHead.isEndToEnd(b, start, colon, keepUpgrade: keepUpgrade) {
                    framing.sizes.add(colon - start + ve - vs + 4, kind)
                }
            }
        }
    }

    /// A chunk-size line: hex digits, optional `;extensions`, CRLF (RFC 9112 §7.1).
    private static func chunkSize(_ line: ByteBuffer) throws(UpstreamProtocolError) -> Int {
        try line.withUnsafeReadableBytes { b throws(UpstreamProtocolError) in
            var size = 0
            var digits = 0
            var i = 0
            while i < b.count {
                let c = b[i]
                let v: Int
                switch c {
                case 48...57: v = Int(c - 48)
                case 65...70: v = Int(c - 55)
                case 97...102: v = Int(c - 87)
                default: v = -1
                }
                if v < 0 { break }
                digits += 1
                guard digits <= 15 else { throw UpstreamProtocolError("chunk size too large") }
                size = size * 16 + v
                i += 1
            }
            guard digits > 0 else { throw UpstreamProtocolError("invalid chunk size") }
            while i < b.count && (b[i] == 32 || b[i] == 9) { i += 1 }
            guard i < b.count else { throw UpstreamProtocolError("invalid chunk size") }
            switch b[i] {
            case UInt8(ascii: ";"):
                for j in i..<b.count where b[j] < 32 && b[j] != 9 && !(j >= b.count - 2 && (b[j] == 13 || b[j] == 10)) {
                    throw UpstreamProtocolError("invalid chunk extension")
                }
            case 13:
                guard i + 2 == b.count, b[i + 1] == 10 else { throw UpstreamProtocolError("invalid chunk size") }
            case 10:
                guard i + 1 == b.count else { throw UpstreamProtocolError("invalid chunk size") }
            default:
                throw UpstreamProtocolError("invalid chunk size")
            }
            return size
        }
    }

}

/// Calls `body(start, colon, valueStart, valueEnd)` for each field line of `b` up to the empty
/// line that ends the block (or the end of `b`): the name is `b[start..<colon]`, the value
/// `b[valueStart..<valueEnd]` without the spaces and tabs around it. A line without a colon
/// has `colon == valueStart` (the parser refuses it; later readers see checked blocks only).
@inline(__always)
func forEachFieldLine<E: Error>(
    _ b: UnsafeRawBufferPointer, _ body: (Int, Int, Int, Int) throws(E) -> Void
) throws(E) {
    var start = 0
    let n = b.count
    while start < n {
        let lf = index(of: UInt8(ascii: "\n"), b, start, n)
        var end = lf
        if end > start && b[end - 1] == UInt8(ascii: "\r") { end -= 1 }
        if end == start { return }  // the empty line
        let colon = index(of: UInt8(ascii: ":"), b, start, end)
        var vs = colon < end ? colon + 1 : end
        var ve = end
        while vs < ve && (b[vs] == 32 || b[vs] == 9) { vs += 1 }
        while ve > vs && (b[ve - 1] == 32 || b[ve - 1] == 9) { ve -= 1 }
        try body(start, colon, vs, ve)
        start = lf + 1
    }
}

/// A response head as an upstream sent it, kept as bytes: its status, what its fields said
/// about the body, and its checked field lines. A proxied answer is written from the bytes
/// (`HTTP1ResponseEncoder.head(status:fields:version:close:method:allocator:)`); the fields become
/// `HTTPHeaders` only for a reader that needs them (`head`: policies, compression, HTTP/2
/// clients). Most answers so skip two strings per field, the field list and the head's storage.
struct UpstreamHead {
    /// The upstream's HTTP version.
    let version: HTTPVersion
    let code: Int
    /// The field lines, through the empty line that ends them.
    let fields: ByteBuffer
    /// A 101's `upgrade` field is kept: it names the tunnel's protocol.
    let keepsUpgrade: Bool
    /// The content-length the fields gave.
    let contentLength: Int?
    /// The first `grpc-status` field, when it is a number.
    let grpcStatus: Int?
    /// What the end-to-end fields take written out (counted as they were checked).
    let sizes: FieldSizes

    var status: HTTPResponseStatus { HTTPResponseStatus(statusCode: code) }

    /// The head with its end-to-end fields in `HTTPHeaders`.
    var head: HTTPResponseHead {
        HTTPResponseHead(version: version, status: status, headers: Self.headers(fields, keepUpgrade: keepsUpgrade))
    }

    /// Calls `body(name, value)` for each end-to-end field, in order: hop-by-hop fields are
    /// left out (they were about the upstream connection), a kept `upgrade` aside.
    func forEachField(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void) {
        Self.forEachField(fields, keepUpgrade: keepsUpgrade, body)
    }

    private static func forEachField(
        _ block: ByteBuffer, keepUpgrade: Bool, _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void
    ) {
        block.withUnsafeReadableBytes { b in
            forEachFieldLine(b) { start, colon, vs, ve in
                guard isEndToEnd(b, start, colon, keepUpgrade: keepUpgrade) else { return }
                body(UnsafeRawBufferPointer(rebasing: b[start..<colon]), UnsafeRawBufferPointer(rebasing: b[vs..<ve]))
            }
        }
    }

    /// Whether the field named `b[start..<end]` is handed on: hop-by-hop fields are about the
    /// upstream connection, a 101's `upgrade` aside.
    static func isEndToEnd(_ b: UnsafeRawBufferPointer, _ start: Int, _ end: Int, keepUpgrade: Bool) -> Bool {
        hopByHopIndex(b, start, end) == nil || (keepUpgrade && lowerEquals(b, start, end, "upgrade"))
    }

    /// The end-to-end fields as strings (for policies that read them).
    func fieldPairs() -> [(name: String, value: String)] {
        var pairs: [(name: String, value: String)] = []
        Self.forEachString(fields, keepUpgrade: keepsUpgrade) { pairs.append((name: $0, value: $1)) }
        return pairs
    }

    /// The end-to-end fields of a checked block of field lines.
    static func headers(_ block: ByteBuffer, keepUpgrade: Bool) -> HTTPHeaders {
        var fields: [(String, String)] = []
        forEachString(block, keepUpgrade: keepUpgrade) { fields.append(($0, $1)) }
        return HTTPHeaders(fields)
    }

    private static func forEachString(_ block: ByteBuffer, keepUpgrade: Bool, _ body: (String, String) -> Void) {
        forEachField(block, keepUpgrade: keepUpgrade) { name, value in
            body(String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
        }
    }
}

/// The index of the first `byte` in `b[from..<to]`, or `to` (memchr: many bytes per step).
@inline(__always)
func index(of byte: UInt8, _ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int) -> Int {
    guard from < to, let base = b.baseAddress, let p = memchr(base + from, Int32(byte), to - from) else { return to }
    return base.distance(to: UnsafeRawPointer(p))
}

/// Whether `b[from..<to]` is a valid field value: no control bytes but tab, no DEL (obs-text
/// bytes from 0x80 up are allowed). Eight bytes per step (the last step overlaps the one
/// before): a word with no byte below 0x20 and none equal to 0x7f passes at once; any other
/// word is checked byte by byte. Values shorter than a word go byte by byte.
@inline(__always)
func isFieldValue(_ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int) -> Bool {
    @inline(__always) func byte(_ c: UInt8) -> Bool { c >= 32 ? c != 127 : c == 9 }
    guard to - from >= 8, let base = b.baseAddress else {
        for i in from..<to where !byte(b[i]) { return false }
        return true
    }
    let ones: UInt64 = 0x0101_0101_0101_0101
    let highs: UInt64 = 0x8080_8080_8080_8080
    var i = from
    while true {
        let at = min(i, to - 8)
        let w = base.loadUnaligned(fromByteOffset: at, as: UInt64.self)
        let below20 = (w &- ones &* 0x20) & ~w & highs
        let x = w ^ (ones &* 0x7f)
        let del = (x &- ones) & ~x & highs
        if below20 | del != 0 {
            for j in at..<at + 8 where !byte(b[j]) { return false }
        }
        if at == to - 8 { return true }
        i += 8
    }
}

/// Whether `b[from..<to]` is `lower` (all lowercase), compared ASCII case-insensitively.
func lowerEquals(_ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int, _ lower: StaticString) -> Bool {
    let n = lower.utf8CodeUnitCount
    guard to - from == n else { return false }
    let p = lower.utf8Start
    var i = 0
    while i < n {
        var c = b[from + i]
        if c >= 65 && c <= 90 { c += 32 }
        if c != p[i] { return false }
        i += 1
    }
    return true
}

/// Whether `s` is `lower` (all lowercase), compared ASCII case-insensitively.
private func asciiEqualsLower(_ s: String, _ lower: StaticString) -> Bool {
    guard s.utf8.count == lower.utf8CodeUnitCount else { return false }
    return withBytes(s) { lowerEquals($0, 0, $0.count, lower) }
}

/// `body` with the UTF-8 bytes of `s` (in place for native strings).
func withBytes<R>(_ s: String, _ body: (UnsafeRawBufferPointer) -> R) -> R {
    if let r = s.utf8.withContiguousStorageIfAvailable({ body(UnsafeRawBufferPointer($0)) }) { return r }
    return Array(s.utf8).withUnsafeBytes(body)
}

/// Calls `body(start, end)` for each comma-separated element of `b[from..<to]`, without the
/// spaces and tabs around it (empty elements too).
private func forEachElement<E: Error>(
    _ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int, _ body: (Int, Int) throws(E) -> Void
) throws(E) {
    var s = from
    while true {
        var e = s
        while e < to && b[e] != UInt8(ascii: ",") { e += 1 }
        var ts = s
        var te = e
        while ts < te && (b[ts] == 32 || b[ts] == 9) { ts += 1 }
        while te > ts && (b[te - 1] == 32 || b[te - 1] == 9) { te -= 1 }
        try body(ts, te)
        if e >= to { return }
        s = e + 1
    }
}

/// Whether the final coding of a transfer-encoding value is chunked.
private func finalCodingIsChunked(_ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int) -> Bool {
    var last = (from, from)
    forEachElement(b, from, to) { s, e in if e > s { last = (s, e) } }
    return lowerEquals(b, last.0, last.1, "chunked")
}

private func finalCodingIsChunked(_ value: String) -> Bool {
    withBytes(value) { finalCodingIsChunked($0, 0, $0.count) }
}

/// Writes HTTP/1.1 requests for an upstream connection (RFC 9112): the head in one buffer, the
/// body as given or chunked. The head's framing fields are the caller's (Exchange sets them);
/// a head with neither content-length nor transfer-encoding whose method carries a body gets
/// `transfer-encoding: chunked`, as NIO's encoder does.
/// Fields the proxy adds to a request as the encoder writes it, after the head's own: the head's
/// field list is not copied to grow by one (NIO's `HTTPHeaders.add` also scans the name per call).
/// The sender makes sure the head does not carry them already.
struct AddedRequestFields {
    /// `traceparent`, made for a request that came without one.
    var traceparent: String?
    /// `tandem-timeout-ms`: what is left of the request's deadline.
    var timeoutMs: Int64?
    /// `tandem-attempt`, from the second attempt on.
    var attempt: Int?

    // Each field's name and separator; a line is that, the value, CRLF.
    private static let traceparentField: StaticString = "traceparent: "
    private static let timeoutField: StaticString = "tandem-timeout-ms: "
    private static let attemptField: StaticString = "tandem-attempt: "

    var length: Int {
        var n = 0
        if let t = traceparent { n += Self.traceparentField.utf8CodeUnitCount + t.utf8.count + 2 }
        if let t = timeoutMs { n += Self.timeoutField.utf8CodeUnitCount + HeadWriter.digits(t) + 2 }
        if let a = attempt { n += Self.attemptField.utf8CodeUnitCount + HeadWriter.digits(Int64(a)) + 2 }
        return n
    }

    func write(_ w: inout HeadWriter) {
        if let t = traceparent {
            w.put(Self.traceparentField)
            w.put(t)
            w.put("\r\n")
        }
        if let t = timeoutMs {
            w.put(Self.timeoutField)
            w.decimal(t)
            w.put("\r\n")
        }
        if let a = attempt {
            w.put(Self.attemptField)
            w.decimal(Int64(a))
            w.put("\r\n")
        }
    }
}

struct HTTP1RequestEncoder {
    /// The current request's body goes chunked.
    private(set) var chunked = false

    mutating func head(
        _ head: HTTPRequestHead, added: AddedRequestFields = AddedRequestFields(), allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        let method = head.method.rawValue
        var length = method.utf8.count + 1 + head.uri.utf8.count + 11 + 2 + added.length
        var hasLength = false
        var hasCoding = false
        chunked = false
        for (name, value) in head.headers {
            length += name.utf8.count + value.utf8.count + 4
            switch name.utf8.count {
            case 14 where asciiEqualsLower(name, "content-length"):
                hasLength = true
            case 17 where asciiEqualsLower(name, "transfer-encoding"):
                hasCoding = true
                chunked = finalCodingIsChunked(value)
            default: break
            }
        }
        let addChunked: Bool
        switch head.method {
        case .POST, .PUT, .PATCH: addChunked = !hasLength && !hasCoding
        default: addChunked = false
        }
        if addChunked {
            chunked = true
            length += chunkedField.utf8CodeUnitCount
        }
        return HeadWriter.buffer(length: length, allocator: allocator) { w in
            w.put(method)
            w.put(UInt8(ascii: " "))
            w.put(head.uri)
            w.put(" HTTP/1.1\r\n")
            for (name, value) in head.headers { w.field(name, value) }
            added.write(&w)
            if addChunked { w.put(chunkedField) }
            w.put("\r\n")
        }
    }

    /// The line before a chunk of `count` bytes.
    static func chunkPrefix(_ count: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buf = allocator.buffer(capacity: 18)
        writeChunkPrefix(count, to: &buf)
        return buf
    }

    /// A chunk's size line: hex digits and CRLF.
    static func writeChunkPrefix(_ count: Int, to buf: inout ByteBuffer) {
        buf.writeString(String(count, radix: 16))
        buf.writeStaticString("\r\n")
    }

    /// The bytes that end the request (nil unless chunked): the last chunk and the trailers.
    func end(_ trailers: HTTPHeaders?, allocator: ByteBufferAllocator) -> ByteBuffer? {
        chunked ? Self.lastChunk(trailers, allocator: allocator) : nil
    }

    /// The last chunk of a chunked body, with trailers.
    static func lastChunk(_ trailers: HTTPHeaders?, allocator: ByteBufferAllocator) -> ByteBuffer {
        let fields = trailers ?? [:]
        var length = 5
        for (name, value) in fields { length += name.utf8.count + value.utf8.count + 4 }
        return HeadWriter.buffer(length: length, allocator: allocator) { w in
            w.put("0\r\n")
            for (name, value) in fields { w.field(name, value) }
            w.put("\r\n")
        }
    }
}

private let chunkedField: StaticString = "transfer-encoding: chunked\r\n"
private let closeField: StaticString = "connection: close\r\n"

/// Header fields as bytes, for the encoders.
protocol FieldBytes {
    /// Calls `body(name, value)` for each field, in order.
    func forEachField(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void)
    /// What the fields take written out.
    var sizes: FieldSizes { get }
}

extension FieldBytes {
    var sizes: FieldSizes { FieldSizes(walking: self) }
}

/// The bytes header fields take written as `name: value` CRLF, and which of them are framing
/// fields (a head is written into memory reserved at that length).
struct FieldSizes {
    var all = 0
    /// False: `all` is an upper bound (fields that an edit drops are still counted); the head
    /// is written into the reserved memory and may end short of it. The framing fields'
    /// flags and sizes are exact either way.
    var exact = true
    var hasLength = false
    var lengthFields = 0
    var hasCoding = false
    var codingFields = 0

    init() {}

    /// Exact: every field counted.
    init<F: FieldBytes>(walking fields: F) {
        fields.forEachField { count($0, $1) }
    }

    /// A framing field: content-length or transfer-encoding.
    enum Kind { case length, coding }

    static func kind(_ name: UnsafeRawBufferPointer) -> Kind? {
        switch name.count {
        case 14 where lowerEquals(name, 0, 14, "content-length"): .length
        case 17 where lowerEquals(name, 0, 17, "transfer-encoding"): .coding
        default: nil
        }
    }

    mutating func count(_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        add(name.count + value.count + 4, Self.kind(name))
    }

    /// A field of `n` bytes written (`name: value` CRLF), of `kind` (nil: not a framing field).
    mutating func add(_ n: Int, _ kind: Kind?) {
        all += n
        switch kind {
        case .length?:
            hasLength = true
            lengthFields += n
        case .coding?:
            hasCoding = true
            codingFields += n
        case nil: break
        }
    }
}

extension HTTPHeaders: FieldBytes {
    func forEachField(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void) {
        for (name, value) in self { withBytes(name) { n in withBytes(value) { v in body(n, v) } } }
    }
}

extension UpstreamHead: FieldBytes {}

/// Writes a message head into memory reserved for it in one go: the length is counted first,
/// then every piece is copied in place (ByteBuffer's own writes check capacity and uniqueness
/// on every call, about 180 instructions for each of a head's 30–40 pieces).
struct HeadWriter {
    private let base: UnsafeMutableRawPointer
    private let capacity: Int
    private(set) var count = 0

    /// A buffer of `length` bytes, written by `body`: exactly those, or (`exact` false, the
    /// length a bound) at most those.
    static func buffer(
        length: Int, exact: Bool = true, allocator: ByteBufferAllocator, _ body: (inout HeadWriter) -> Void
    ) -> ByteBuffer {
        var buf = allocator.buffer(capacity: length)
        buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
            var w = HeadWriter(base: raw.baseAddress!, capacity: length)
            body(&w)
            precondition(exact ? w.count == length : w.count <= length, "head of \(w.count) bytes counted as \(length)")
            return w.count
        }
        return buf
    }

    private init(base: UnsafeMutableRawPointer, capacity: Int) {
        self.base = base
        self.capacity = capacity
    }

    mutating func put(_ s: String) {
        let n = s.utf8.count
        precondition(count + n <= capacity, "head longer than counted")
        let copied: Void? = s.utf8.withContiguousStorageIfAvailable { u in
            if n > 0 { (base + count).copyMemory(from: u.baseAddress!, byteCount: n) }
        }
        if copied == nil {
            var i = count
            for c in s.utf8 {
                base.storeBytes(of: c, toByteOffset: i, as: UInt8.self)
                i += 1
            }
        }
        count += n
    }

    mutating func put(_ s: StaticString) {
        let n = s.utf8CodeUnitCount
        precondition(count + n <= capacity, "head longer than counted")
        (base + count).copyMemory(from: s.utf8Start, byteCount: n)
        count += n
    }

    mutating func put(_ b: UInt8) {
        precondition(count < capacity, "head longer than counted")
        base.storeBytes(of: b, toByteOffset: count, as: UInt8.self)
        count += 1
    }

    /// `name: value` CRLF (4 bytes besides the name and the value).
    mutating func field(_ name: String, _ value: String) {
        put(name)
        put(": ")
        put(value)
        put("\r\n")
    }

    mutating func field(_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        put(name)
        put(": ")
        put(value)
        put("\r\n")
    }

    mutating func put(_ b: UnsafeRawBufferPointer) {
        let n = b.count
        precondition(count + n <= capacity, "head longer than counted")
        if n > 0 { (base + count).copyMemory(from: b.baseAddress!, byteCount: n) }
        count += n
    }

    /// The decimal digits of `v` (`digits(v)` bytes).
    mutating func decimal(_ v: Int64) {
        if v < 0 {
            put(UInt8(ascii: "-"))
            decimal(UInt64(v.magnitude))
        } else {
            decimal(UInt64(v))
        }
    }

    private mutating func decimal(_ v: UInt64) {
        let n = Self.digits(v)
        precondition(count + n <= capacity, "head longer than counted")
        var v = v
        for i in stride(from: count + n - 1, through: count, by: -1) {
            base.storeBytes(of: UInt8(ascii: "0") + UInt8(v % 10), toByteOffset: i, as: UInt8.self)
            v /= 10
        }
        count += n
    }

    /// How many bytes `decimal(v)` writes.
    static func digits(_ v: Int64) -> Int { v < 0 ? 1 + digits(UInt64(v.magnitude)) : digits(UInt64(v)) }

    private static func digits(_ v: UInt64) -> Int {
        var n = 1
        var v = v
        while v >= 10 {
            v /= 10
            n += 1
        }
        return n
    }
}

/// Writes HTTP/1.x responses to a client (RFC 9112), framed as NIO's `HTTPResponseEncoder`
/// frames them: no framing fields on answers that cannot have a body (1xx, 204, 304, CONNECT);
/// a content-length stands (a transfer-encoding next to it goes); otherwise HTTP/1.1 answers go
/// chunked and HTTP/1.0 ones run until the connection closes. An answer to HEAD keeps its
/// framing fields but carries no body (RFC 9110 §9.3.2).
struct HTTP1ResponseEncoder {
    /// The current answer's body goes chunked.
    private(set) var chunked = false
    /// The current answer has no body whatever is written (HEAD, CONNECT).
    private(set) var suppressBody = false

    /// `method`: the method of the request being answered.
    mutating func head(_ head: HTTPResponseHead, method: HTTPMethod, allocator: ByteBufferAllocator) -> ByteBuffer {
        encode(
            version: head.version, status: head.status, fields: head.headers, close: false, method: method,
            allocator: allocator)
    }

    /// An answer over HTTP `version` with `fields` (an upstream's, copied from its bytes);
    /// `close` adds `connection: close`.
    mutating func head<F: FieldBytes>(
        status: HTTPResponseStatus, fields: F, version: HTTPVersion, close: Bool, method: HTTPMethod,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        encode(version: version, status: status, fields: fields, close: close, method: method, allocator: allocator)
    }

    private mutating func encode<F: FieldBytes>(
        version: HTTPVersion, status: HTTPResponseStatus, fields: F, close: Bool, method: HTTPMethod,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        let code = Int(status.code)
        if !(code >= 100 && code < 200 && code != 101) {
            suppressBody = method == .HEAD || method == .CONNECT
        }
        let sizes = fields.sizes
        let (hasLength, hasCoding) = (sizes.hasLength, sizes.hasCoding)
        var dropLength = false
        var dropCoding = false
        if !status.mayHaveResponseBody || method == .CONNECT {
            (dropLength, dropCoding, chunked) = (hasLength, hasCoding, false)
        } else if hasLength {
            (dropCoding, chunked) = (hasCoding, false)
        } else if version.major == 1 && version.minor >= 1 {
            (dropCoding, chunked) = (hasCoding, true)
        } else {
            chunked = false
        }
        let addChunked = chunked
        if suppressBody { chunked = false }

        let versionText: StaticString = version.major == 1 && version.minor == 0 ? "HTTP/1.0 " : "HTTP/1.1 "
        let threeDigits = code >= 100 && code <= 999
        let codeText = threeDigits ? "" : String(code)
        let reason = status.reasonPhrase
        var length =
            versionText.utf8CodeUnitCount + (threeDigits ? 3 : codeText.utf8.count) + 1 + reason.utf8.count + 4
        if addChunked { length += chunkedField.utf8CodeUnitCount }
        if close { length += closeField.utf8CodeUnitCount }
        length += sizes.all - (dropLength ? sizes.lengthFields : 0) - (dropCoding ? sizes.codingFields : 0)
        return HeadWriter.buffer(length: length, exact: sizes.exact, allocator: allocator) { w in
            w.put(versionText)
            if threeDigits {
                w.put(UInt8(48 + code / 100))
                w.put(UInt8(48 + code / 10 % 10))
                w.put(UInt8(48 + code % 10))
            } else {
                w.put(codeText)
            }
            w.put(UInt8(ascii: " "))
            w.put(reason)
            w.put("\r\n")
            fields.forEachField { name, value in
                if dropLength || dropCoding, let kind = FieldSizes.kind(name),
                    kind == .length ? dropLength : dropCoding
                {
                    return
                }
                w.field(name, value)
            }
            if close { w.put(closeField) }
            if addChunked { w.put(chunkedField) }
            w.put("\r\n")
        }
    }

    /// Whether only the connection's close can end this answer's body: HTTP/1.0 (no chunks),
    /// a body allowed, and no length. The connection must not be kept after it.
    static func endsByClose(_ head: HTTPResponseHead, method: HTTPMethod) -> Bool {
        endsByClose(
            version: head.version, status: head.status, method: method,
            hasLength: head.headers.contains { asciiEqualsLower($0.name, "content-length") })
    }

    static func endsByClose(
        version: HTTPVersion, status: HTTPResponseStatus, method: HTTPMethod, hasLength: @autoclosure () -> Bool
    ) -> Bool {
        version.major == 1 && version.minor == 0 && status.mayHaveResponseBody && method != .HEAD
            && method != .CONNECT && !hasLength()
    }

    /// The bytes that end the answer (nil unless chunked): the last chunk and the trailers.
    mutating func end(_ trailers: HTTPHeaders?, allocator: ByteBufferAllocator) -> ByteBuffer? {
        defer { suppressBody = false }
        guard chunked else { return nil }
        chunked = false
        return HTTP1RequestEncoder.lastChunk(trailers, allocator: allocator)
    }
}

/// Writes encoded HTTP/1.1 message parts to the next outbound handler (the socket's end).
enum HTTP1Writer {
    /// One body part: as it is, or as one chunk (an empty part writes nothing).
    static func body(
        _ data: IOData, chunked: Bool, _ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?
    ) {
        guard chunked else {
            context.write(NIOAny(data), promise: promise)
            return
        }
        guard data.readableBytes > 0 else {
            promise?.succeed()
            return
        }
        context.write(
            NIOAny(
                IOData.byteBuffer(
                    HTTP1RequestEncoder.chunkPrefix(data.readableBytes, allocator: context.channel.allocator))),
            promise: nil)
        context.write(NIOAny(data), promise: nil)
        context.write(NIOAny(IOData.byteBuffer(crlf)), promise: promise)
    }

    /// One body part appended to `buffer` (a head about to go out with it), as it is or as
    /// one chunk.
    static func append(_ data: ByteBuffer, chunked: Bool, to buffer: inout ByteBuffer) {
        var data = data
        guard chunked else {
            buffer.writeBuffer(&data)
            return
        }
        guard data.readableBytes > 0 else { return }
        HTTP1RequestEncoder.writeChunkPrefix(data.readableBytes, to: &buffer)
        buffer.writeBuffer(&data)
        buffer.writeStaticString("\r\n")
    }

    /// The end of a message: `last` (the last chunk), or nothing but the promise's turn.
    static func end(_ last: ByteBuffer?, _ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        if let last {
            context.write(NIOAny(IOData.byteBuffer(last)), promise: promise)
        } else if let promise {
            context.write(NIOAny(IOData.byteBuffer(empty)), promise: promise)
        }
    }

    private static let crlf = ByteBuffer(string: "\r\n")
    private static let empty = ByteBuffer()
}
