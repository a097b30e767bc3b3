import NIOCore
import NIOHTTP1
import TandemCore

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
/// closes). Body parts are slices of the input (no copy). Informational answers other than 101
/// are skipped; after a 101 every further byte belongs to the new protocol (`leftover`).
///
/// Replaces NIO's `HTTPResponseDecoder` on the proxy's upstream connections: it runs once per
/// response on the hot path, and NIO's decoder sits behind a generic `ByteToMessageHandler`
/// that needs run-time metadata lookups and dynamic casts for every part.
struct HTTP1ResponseParser {
    enum Event {
        case head(HTTPResponseHead)
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
    /// A response is being read (its head may still be arriving).
    var inResponse: Bool {
        if case .head = state { return scanned > 0 }
        return true
    }
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
                var fields: [(String, String)] = []
                try Self.parseFields(block, into: &fields)
                return .end(fields.isEmpty ? nil : HTTPHeaders(fields))
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
                if b[i] == UInt8(ascii: "\n") {
                    if b[i - 1] == UInt8(ascii: "\n") { return i + 1 }
                    if b[i - 1] == UInt8(ascii: "\r") && i >= 2 && b[i - 2] == UInt8(ascii: "\n") { return i + 1 }
                }
                i += 1
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
            b.firstIndex(of: UInt8(ascii: "\n")).map { $0 + 1 }
        }
        if let found {
            guard found <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
            return found
        }
        guard buffer.readableBytes <= limit else { throw UpstreamProtocolError("\(what) exceeds \(limit) bytes") }
        return nil
    }

    // MARK: head

    private mutating func parseHead(_ block: ByteBuffer) throws(UpstreamProtocolError) -> HTTPResponseHead {
        var fields: [(String, String)] = []
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
            guard let lf = b.firstIndex(of: UInt8(ascii: "\n")) else {
                throw UpstreamProtocolError("invalid status line")
            }
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
        try Self.parseFields(rest, into: &fields)

        // Framing and persistence (RFC 9112 §6.3, §9.3).
        var contentLength: Int?
        var chunked = false
        var transferEncoding = false
        var close = version.minor == 0
        for (name, value) in fields {
            switch name.utf8.count {
            case 10 where asciiEqualsLower(name.utf8, "connection"):
                for token in value.utf8.split(separator: UInt8(ascii: ",")) {
                    let t = trimmedOWS(token)
                    if asciiEqualsLower(t, "close") { close = true }
                    if asciiEqualsLower(t, "keep-alive") && version.minor == 0 { close = false }
                }
            case 14 where asciiEqualsLower(name.utf8, "content-length"):
                for token in value.utf8.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
                    let t = trimmedOWS(token)
                    guard !t.isEmpty, t.count <= 18, t.allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
                        throw UpstreamProtocolError("invalid content-length \"\(value)\"")
                    }
                    let n = t.reduce(0) { $0 * 10 + Int($1 - 48) }
                    if let seen = contentLength, seen != n {
                        throw UpstreamProtocolError("conflicting content-length values")
                    }
                    contentLength = n
                }
            case 17 where asciiEqualsLower(name.utf8, "transfer-encoding"):
                transferEncoding = true
                // Only the final coding decides (earlier fields list earlier codings).
                chunked = finalCodingIsChunked(value)
            default: break
            }
        }
        let head = HTTPResponseHead(
            version: version, status: HTTPResponseStatus(statusCode: code), headers: HTTPHeaders(fields))
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

    /// Header (or trailer) fields, one per line, up to the empty line that ends `block`.
    private static func parseFields(
        _ block: ByteBuffer, into fields: inout [(String, String)]
    )
        throws(UpstreamProtocolError)
    {
        try block.withUnsafeReadableBytes { b throws(UpstreamProtocolError) in
            var start = 0
            let n = b.count
            while start < n {
                var lf = start
                while lf < n && b[lf] != UInt8(ascii: "\n") { lf += 1 }
                var end = lf
                if end > start && b[end - 1] == UInt8(ascii: "\r") { end -= 1 }
                if end == start { return }  // the empty line
                let first = b[start]
                if first == 32 || first == 9 {
                    throw UpstreamProtocolError("obsolete line folding in a header field")
                }
                var colon = start
                while colon < end && b[colon] != UInt8(ascii: ":") {
                    guard HTTPToken.isTokenByte(b[colon]) else {
                        throw UpstreamProtocolError("invalid header field name")
                    }
                    colon += 1
                }
                guard colon < end, colon > start else { throw UpstreamProtocolError("invalid header field") }
                var vs = colon + 1
                var ve = end
                while vs < ve && (b[vs] == 32 || b[vs] == 9) { vs += 1 }
                while ve > vs && (b[ve - 1] == 32 || b[ve - 1] == 9) { ve -= 1 }
                for i in vs..<ve where (b[i] < 32 && b[i] != 9) || b[i] == 127 {
                    throw UpstreamProtocolError("invalid character in a header field value")
                }
                let name = String(decoding: UnsafeRawBufferPointer(rebasing: b[start..<colon]), as: UTF8.self)
                let value = String(decoding: UnsafeRawBufferPointer(rebasing: b[vs..<ve]), as: UTF8.self)
                fields.append((name, value))
                start = lf + 1
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

/// `s` without leading and trailing spaces and tabs (HTTP's OWS).
private func trimmedOWS(_ s: Substring.UTF8View) -> Substring.UTF8View {
    var s = s
    while let f = s.first, f == 32 || f == 9 { s = s.dropFirst() }
    while let l = s.last, l == 32 || l == 9 { s = s.dropLast() }
    return s
}

/// Whether `s` is `lower` (all lowercase) compared ASCII case-insensitively.
private func asciiEqualsLower<S: Sequence<UInt8>>(_ s: S, _ lower: StaticString) -> Bool {
    var i = 0
    let n = lower.utf8CodeUnitCount
    let p = lower.utf8Start
    for c in s {
        guard i < n else { return false }
        let l = c >= 65 && c <= 90 ? c + 32 : c
        guard l == p[i] else { return false }
        i += 1
    }
    return i == n
}

/// Whether a transfer-encoding value's final coding is chunked.
private func finalCodingIsChunked(_ value: String) -> Bool {
    value.utf8.split(separator: UInt8(ascii: ",")).last.map { asciiEqualsLower(trimmedOWS($0), "chunked") } ?? false
}

/// Writes HTTP/1.1 requests for an upstream connection (RFC 9112): the head in one buffer, the
/// body as given or chunked. The head's framing fields are the caller's (Exchange sets them);
/// a head with neither content-length nor transfer-encoding whose method carries a body gets
/// `transfer-encoding: chunked`, as NIO's encoder does.
struct HTTP1RequestEncoder {
    /// The current request's body goes chunked.
    private(set) var chunked = false

    mutating func head(_ head: HTTPRequestHead, allocator: ByteBufferAllocator) -> ByteBuffer {
        var length = head.method.rawValue.utf8.count + head.uri.utf8.count + 14
        var hasLength = false
        var hasCoding = false
        chunked = false
        for (name, value) in head.headers {
            length += name.utf8.count + value.utf8.count + 4
            switch name.utf8.count {
            case 14 where asciiEqualsLower(name.utf8, "content-length"):
                hasLength = true
            case 17 where asciiEqualsLower(name.utf8, "transfer-encoding"):
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
            length += 28
        }
        var buf = allocator.buffer(capacity: length)
        buf.writeString(head.method.rawValue)
        buf.writeInteger(UInt8(ascii: " "))
        buf.writeString(head.uri)
        buf.writeStaticString(" HTTP/1.1\r\n")
        Self.write(head.headers, to: &buf)
        if addChunked { buf.writeStaticString("transfer-encoding: chunked\r\n") }
        buf.writeStaticString("\r\n")
        return buf
    }

    /// The line before a chunk of `count` bytes.
    static func chunkPrefix(_ count: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buf = allocator.buffer(capacity: 18)
        buf.writeString(String(count, radix: 16))
        buf.writeStaticString("\r\n")
        return buf
    }

    /// The bytes that end the request (nil unless chunked): the last chunk and the trailers.
    func end(_ trailers: HTTPHeaders?, allocator: ByteBufferAllocator) -> ByteBuffer? {
        guard chunked else { return nil }
        var buf = allocator.buffer(capacity: 5)
        buf.writeStaticString("0\r\n")
        if let trailers { Self.write(trailers, to: &buf) }
        buf.writeStaticString("\r\n")
        return buf
    }

    private static func write(_ fields: HTTPHeaders, to buf: inout ByteBuffer) {
        for (name, value) in fields {
            buf.writeString(name)
            buf.writeStaticString(": ")
            buf.writeString(value)
            buf.writeStaticString("\r\n")
        }
    }
}
