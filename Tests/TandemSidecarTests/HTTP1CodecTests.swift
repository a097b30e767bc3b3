import NIOCore
import NIOEmbedded
import NIOHTTP1
import TandemCore
import Testing

@testable import TandemSidecar

/// What the parser made of a byte stream: the heads, the body bytes and the endings, in order.
private struct Parsed: Equatable {
    var events: [String] = []
    var body = ""

    static func of(
        _ chunks: [String], head: Bool = false, maxHeaderBytes: Int = 64 * 1024
    ) throws(UpstreamProtocolError) -> (Parsed, HTTP1ResponseParser) {
        var p = HTTP1ResponseParser(maxHeaderBytes: maxHeaderBytes)
        p.answersHead = head
        var out = Parsed()
        var buffer = ByteBuffer()
        for chunk in chunks {
            buffer.writeString(chunk)
            while let e = try p.next(&buffer) {
                switch e {
                case .head(let u):
                    let h = u.head
                    let fields = h.headers.map { "\($0.name)=\($0.value)" }.joined(separator: ",")
                    out.events.append("head \(h.status.code) 1.\(h.version.minor) [\(fields)]")
                case .body(let b):
                    out.body += String(buffer: b)
                case .end(let t):
                    out.events.append(
                        "end"
                            + (t.map { " [" + $0.map { "\($0.name)=\($0.value)" }.joined(separator: ",") + "]" } ?? ""))
                }
            }
            buffer.discardReadBytes()
        }
        return (out, p)
    }

    /// The same stream split at every byte boundary, and byte by byte, parses the same.
    static func everySplit(_ raw: String, head: Bool = false) throws(UpstreamProtocolError) -> Parsed {
        let whole = try of([raw], head: head).0
        let bytes = Array(raw.utf8)
        for cut in 1..<bytes.count {
            let a = String(decoding: bytes[..<cut], as: UTF8.self)
            let b = String(decoding: bytes[cut...], as: UTF8.self)
            #expect(try of([a, b], head: head).0 == whole, "split at \(cut)")
        }
        #expect(try of(bytes.map { String(UnicodeScalar($0)) }, head: head).0 == whole, "byte by byte")
        return whole
    }
}

private func parseError(_ raw: String, head: Bool = false, maxHeaderBytes: Int = 64 * 1024) -> String? {
    do {
        _ = try Parsed.of([raw], head: head, maxHeaderBytes: maxHeaderBytes)
        return nil
    } catch {
        return error.message
    }
}

/// The HTTP/1.1 codec (RFC 9112): the upstream response parser and request encoder, the
/// handler that joins them on an upstream connection, and the client-facing response encoder.
@Suite struct HTTP1CodecTests {
    /// The byte classes the parsers test per byte, against their definitions.
    /// One pass over a request's fields drops the hop-by-hop ones and finds the fields the
    /// proxy sets itself (in any case), leaving the rest in order.
    @Test func oneScanStripsHopByHopFieldsAndFindsTheProxysOwn() {
        var h = HTTPHeaders([
            ("Connection", "keep-alive"), ("TraceParent", "00-1-2-01"), ("Keep-Alive", "5"), ("Content-Length", "0"),
            ("host", "a"), ("Transfer-Encoding", "chunked"),
        ])
        let found = stripHopByHop(&h)
        #expect(found.traceparent && found.contentLength && !found.timeout)
        #expect(h.map(\.name) == ["TraceParent", "Content-Length", "host"])
        var t = HTTPHeaders([("TANDEM-TIMEOUT-MS", "5"), ("te", "trailers"), ("x-traceparent", "1")])
        let other = stripHopByHop(&t)
        #expect(other.timeout && !other.traceparent && !other.contentLength)
        #expect(t.map(\.name) == ["TANDEM-TIMEOUT-MS", "x-traceparent"])
    }

    /// The eight-bytes-at-a-time value check agrees with the byte rule for every byte value at
    /// every position of values up to 20 bytes, and next to high (obs-text) bytes.
    @Test func fieldValuesAreCheckedAsByteByByte() {
        func byByte(_ v: [UInt8]) -> Bool { !v.contains { ($0 < 32 && $0 != 9) || $0 == 127 } }
        for length in 1...20 {
            for at in 0..<length {
                for c in 0...255 {
                    for fill: UInt8 in [UInt8(ascii: "a"), 0x80, 0xff] {
                        var v = [UInt8](repeating: fill, count: length)
                        v[at] = UInt8(c)
                        let fast = v.withUnsafeBytes { isFieldValue($0, 0, length) }
                        if fast != byByte(v) {
                            Issue.record("byte \(c) at \(at) of \(length) (fill \(fill)): \(fast)")
                            return
                        }
                    }
                }
            }
        }
        let text = Array("x-a: Mon, 30 Nov 2026 00:00:00 GMT".utf8)
        #expect(text.withUnsafeBytes { isFieldValue($0, 5, text.count) })
        #expect(text.withUnsafeBytes { isFieldValue($0, 3, 3) })
    }

    @Test func tokenBytesAndHopByHopNamesAreRecognised() {
        let tchar = Set("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".utf8)
        for c in 0...255 { #expect(HTTPToken.isTokenByte(UInt8(c)) == tchar.contains(UInt8(c)), "byte \(c)") }
        func index(_ s: String) -> Int? { withBytes(s) { hopByHopIndex($0, 0, $0.count) } }
        for (k, name) in hopByHopStrings.enumerated() {
            #expect(index(name) == k && index(name.uppercased()) == k, "\(name)")
        }
        for name in ["tex", "trailers", "upgrades", "content-type", "x-connection", "keep_alive", "expected", ""] {
            #expect(index(name) == nil, "\(name)")
        }
    }

    @Test func aContentLengthBodyIsReadExactlyAtEverySplit() throws {
        let p = try Parsed.everySplit(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world")
        #expect(p.events == ["head 200 1.1 [Content-Type=text/plain,Content-Length=11]", "end"])
        #expect(p.body == "hello world")
    }

    @Test func chunkedBodiesWithExtensionsAndTrailersAtEverySplit() throws {
        let raw =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=\"a b\"\r\nhello\r\n6\r\n world\r\n"
            + "0\r\nx-checksum: abc\r\nx-more:  two \r\n\r\n"
        let p = try Parsed.everySplit(raw)
        #expect(p.events == ["head 200 1.1 []", "end [x-checksum=abc,x-more=two]"])
        #expect(p.body == "hello world")
        // Bare LF line endings (RFC 9112 §2.2 lets a recipient accept them), no trailers.
        let lf = try Parsed.everySplit("HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n3\nabc\n0\n\n")
        #expect(lf.events == ["head 200 1.1 []", "end"])
        #expect(lf.body == "abc")
    }

    @Test func answersWithoutABodyEndAtTheirHead() throws {
        // HEAD: the length describes the GET answer; no body follows, the next response does.
        let (h, _) = try Parsed.of(
            ["HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"], head: true)
        #expect(h.events == ["head 200 1.1 [content-length=1000]", "end"])
        #expect(h.body.isEmpty)
        for status in ["204 No Content", "304 Not Modified"] {
            let (p, _) = try Parsed.of(["HTTP/1.1 \(status)\r\ncontent-length: 5\r\n\r\n"])
            #expect(p.events.count == 2 && p.events[1] == "end" && p.body.isEmpty, "\(status)")
        }
        let (zero, _) = try Parsed.of(["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])
        #expect(zero.events == ["head 200 1.1 [content-length=0]", "end"])
    }

    @Test func informationalAnswersAreSkippedAndTwoResponsesFollowEachOther() throws {
        let p = try Parsed.everySplit(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                + "HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
                + "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        #expect(p.events == ["head 201 1.1 [content-length=2]", "end", "head 404 1.1 [content-length=0]", "end"])
        #expect(p.body == "ok")
    }

    @Test func aSwitchLeavesTheNewProtocolsBytesUnread() throws {
        var p = HTTP1ResponseParser(maxHeaderBytes: 1024)
        var b = ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nupgrade: tandem-echo\r\n\r\nHELLO")
        guard case .head(let u) = try p.next(&b) else { Issue.record("no head"); return }
        let h = u.head
        #expect(h.status == .switchingProtocols)
        #expect(h.headers["upgrade"] == ["tandem-echo"])
        guard case .end(nil) = try p.next(&b) else { Issue.record("no end"); return }
        #expect(try p.next(&b) == nil)
        #expect(p.upgraded && !p.keepAlive)
        #expect(String(buffer: b) == "HELLO")
    }

    @Test func aBodyWithoutLengthRunsUntilTheConnectionCloses() throws {
        var (p, parser) = try Parsed.of(["HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of ", "this"])
        #expect(p.events == ["head 200 1.1 [content-type=text/plain]"])
        #expect(p.body == "all of this")
        #expect(!parser.keepAlive && parser.readsUntilClose)
        let ended = parser.closed()
        #expect(ended && !parser.readsUntilClose)
        // A coding that is not chunked last: also until close.
        (p, parser) = try Parsed.of(["HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzz"])
        #expect(p.body == "zz" && parser.readsUntilClose)
        // A length alongside a chunked coding: the coding frames it, the connection is not reused.
        (p, parser) = try Parsed.of([
            "HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
        ])
        #expect(p.body == "a" && p.events.last == "end" && !parser.keepAlive)
    }

    @Test func persistenceFollowsVersionAndConnection() throws {
        let cases: [(String, Bool)] = [
            ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true),
            ("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n", true),
        ]
        for (raw, keep) in cases {
            let (_, parser) = try Parsed.of([raw])
            #expect(parser.keepAlive == keep, "\(raw)")
        }
        // Fields about this connection are read, not handed on (only a 101's upgrade is: it names
        // the new protocol).
        let (p, _) = try Parsed.of([
            "HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x\r\n"
                + "Proxy-Connection: close\r\nUpgrade: h2c\r\nx-kept: 1\r\ncontent-length: 0\r\n\r\n"
        ])
        #expect(p.events == ["head 200 1.1 [x-kept=1,content-length=0]", "end"])
    }

    @Test func malformedResponsesAreErrorsThatSayWhat() {
        #expect(parseError("HTTP/2.0 200 OK\r\n\r\n") == "invalid status line")
        #expect(parseError("HTTP/1.1 2x0 OK\r\n\r\n") == "invalid status code")
        #expect(parseError("HTTP/1.1 099 Odd\r\n\r\n") == "invalid status code 99")
        #expect(parseError("HTTP/1.1 200OK\r\n\r\n") == "invalid status line")
        #expect(parseError("HTTP/1.1 200 OK\r\ncontent-length: 12a\r\n\r\n") == "invalid content-length \"12a\"")
        #expect(parseError("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n") == "invalid content-length \"-1\"")
        #expect(
            parseError("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n")
                == "conflicting content-length values")
        #expect(parseError("HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n") == "conflicting content-length values")
        #expect(parseError("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nabc") == nil)
        #expect(parseError("HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n") == "obsolete line folding in a header field")
        #expect(parseError("HTTP/1.1 200 OK\r\nx-a : 1\r\n\r\n") == "invalid header field name")
        #expect(parseError("HTTP/1.1 200 OK\r\nno colon\r\n\r\n") == "invalid header field name")
        #expect(parseError("HTTP/1.1 200 OK\r\n: empty\r\n\r\n") == "invalid header field")
        #expect(parseError("HTTP/1.1 200 OK\r\nx-a: a\u{0}b\r\n\r\n") == "invalid character in a header field value")
        #expect(
            parseError("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
                == "invalid chunk size")
        #expect(
            parseError("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1000000000000000\r\n")
                == "chunk size too large")
        #expect(
            parseError("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n")
                == "chunk data longer than its chunk size")
        #expect(
            parseError("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\rx")
                == "chunk data not followed by CRLF")
        // The header block's bound holds whether or not its end has arrived.
        let big = "HTTP/1.1 200 OK\r\nx-big: " + String(repeating: "a", count: 200)
        #expect(parseError(big, maxHeaderBytes: 128) == "response header block exceeds 128 bytes")
        #expect(parseError(big + "\r\n\r\n", maxHeaderBytes: 128) == "response header block exceeds 128 bytes")
        #expect(parseError(big + "\r\n\r\n", maxHeaderBytes: 1024) == nil)
    }

    @Test func requestsAreEncodedWithTheirFraming() {
        let alloc = ByteBufferAllocator()
        var e = HTTP1RequestEncoder()
        var get = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/a?b=1")
        get.headers.add(name: "host", value: "users")
        get.headers.add(name: "x-b", value: "2")
        #expect(String(buffer: e.head(get, allocator: alloc)) == "GET /a?b=1 HTTP/1.1\r\nhost: users\r\nx-b: 2\r\n\r\n")
        #expect(!e.chunked && e.end(nil, allocator: alloc) == nil)

        // A body without a length: chunked, as NIO's encoder does; the end carries trailers.
        let post = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/up")
        #expect(
            String(buffer: e.head(post, allocator: alloc)) == "POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
        #expect(e.chunked)
        #expect(String(buffer: HTTP1RequestEncoder.chunkPrefix(300, allocator: alloc)) == "12c\r\n")
        #expect(String(buffer: e.end(["x-sum": "1"], allocator: alloc)!) == "0\r\nx-sum: 1\r\n\r\n")

        var sized = post
        sized.headers.add(name: "Content-Length", value: "3")
        #expect(String(buffer: e.head(sized, allocator: alloc)) == "POST /up HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
        #expect(!e.chunked)
        var coded = post
        coded.headers.add(name: "Transfer-Encoding", value: "gzip, Chunked")
        _ = e.head(coded, allocator: alloc)
        #expect(e.chunked)
    }

    /// The proxy's own fields follow the head's, numbers written digit by digit; a body
    /// without a length still gets its chunked framing last.
    @Test func addedFieldsAreWrittenAfterTheHeadsOwn() {
        let alloc = ByteBufferAllocator()
        var e = HTTP1RequestEncoder()
        var get = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
        get.headers.add(name: "host", value: "users")
        let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        for (ms, attempt) in [(Int64(0), 2), (9, 10), (10, 99), (1_234_567_890_123, 1_000), (-5, 3)] {
            let added = AddedRequestFields(traceparent: trace, timeoutMs: ms, attempt: attempt)
            #expect(
                String(buffer: e.head(get, added: added, allocator: alloc))
                    == "GET / HTTP/1.1\r\nhost: users\r\ntraceparent: \(trace)\r\ntandem-timeout-ms: \(ms)\r\n"
                    + "tandem-attempt: \(attempt)\r\n\r\n")
        }
        #expect(
            String(buffer: e.head(get, added: AddedRequestFields(timeoutMs: 250), allocator: alloc))
                == "GET / HTTP/1.1\r\nhost: users\r\ntandem-timeout-ms: 250\r\n\r\n")
        let post = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/up")
        #expect(
            String(buffer: e.head(post, added: AddedRequestFields(attempt: 2), allocator: alloc))
                == "POST /up HTTP/1.1\r\ntandem-attempt: 2\r\ntransfer-encoding: chunked\r\n\r\n")
        #expect(e.chunked)
    }

    @Test func responsesAreFramedAsNIOFramesThem() {
        let alloc = ByteBufferAllocator()
        var e = HTTP1ResponseEncoder()
        func head(
            _ status: HTTPResponseStatus, _ fields: [(String, String)], version: HTTPVersion = .http1_1,
            method: HTTPMethod = .GET
        ) -> String {
            String(
                buffer: e.head(
                    HTTPResponseHead(version: version, status: status, headers: HTTPHeaders(fields)), method: method,
                    allocator: alloc))
        }
        #expect(
            head(.ok, [("content-length", "2"), ("x-a", "1")])
                == "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\n")
        #expect(!e.chunked && e.end(nil, allocator: alloc) == nil)
        // No length: chunked on HTTP/1.1 (a coding already there is replaced), as it comes on 1.0.
        #expect(head(.ok, [("Transfer-Encoding", "gzip")]) == "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        #expect(e.chunked)
        #expect(String(buffer: e.end(["x-t": "1"], allocator: alloc)!) == "0\r\nx-t: 1\r\n\r\n")
        #expect(head(.ok, [], version: .http1_0) == "HTTP/1.0 200 OK\r\n\r\n" && !e.chunked)
        // A length wins over a coding; answers without a body lose both.
        #expect(
            head(.created, [("content-length", "0"), ("transfer-encoding", "chunked")])
                == "HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        #expect(head(.noContent, [("Content-Length", "5"), ("x", "y")]) == "HTTP/1.1 204 No Content\r\nx: y\r\n\r\n")
        #expect(head(.notModified, [("transfer-encoding", "chunked")]) == "HTTP/1.1 304 Not Modified\r\n\r\n")
        #expect(
            head(.custom(code: 599, reasonPhrase: "Odd"), [("content-length", "0")]).hasPrefix("HTTP/1.1 599 Odd\r\n"))
        // HEAD: the GET answer's framing fields stay, no body follows (not even a last chunk).
        #expect(head(.ok, [("content-length", "10")], method: .HEAD) == "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        #expect(e.suppressBody)
        #expect(head(.ok, [], method: .HEAD) == "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        #expect(e.suppressBody && !e.chunked && e.end(nil, allocator: alloc) == nil && !e.suppressBody)
        // Only an HTTP/1.0 answer with a body and no length needs the connection's close to end.
        func endsByClose(
            _ version: HTTPVersion, _ status: HTTPResponseStatus, _ fields: [(String, String)], _ m: HTTPMethod = .GET
        ) -> Bool {
            HTTP1ResponseEncoder.endsByClose(
                HTTPResponseHead(version: version, status: status, headers: HTTPHeaders(fields)), method: m)
        }
        #expect(endsByClose(.http1_0, .ok, []))
        #expect(!endsByClose(.http1_0, .ok, [("Content-Length", "3")]))
        #expect(!endsByClose(.http1_1, .ok, []))
        #expect(!endsByClose(.http1_0, .noContent, []) && !endsByClose(.http1_0, .notModified, []))
        #expect(!endsByClose(.http1_0, .ok, [], .HEAD))
    }

    /// An upstream's head written from its bytes is the head written from its `HTTPHeaders`
    /// (what policies, compression and HTTP/2 clients get): framing, dropped hop-by-hop fields,
    /// normalised lines (bare LF, spaces around values), HEAD, HTTP/1.0 clients, a closing answer.
    @Test func anUpstreamHeadWrittenFromItsBytesMatchesItsFields() throws {
        let alloc = ByteBufferAllocator()
        let heads = [
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 00:00:00 GMT\r\nContent-Length: 3\r\n"
                + "Connection: keep-alive\r\n\r\n",
            "HTTP/1.1 200 Fine\nx-a:1\nKeep-Alive: timeout=5\nx-b: \t two words \t\n\n",
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nX-Empty:\r\nTE: trailers\r\n\r\n",
            "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n",
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nx: y\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
            "HTTP/1.1 599 Whatever\r\ncontent-length: 0\r\nUpgrade: h2c\r\nProxy-Connection: x\r\n\r\n",
        ]
        for raw in heads {
            for (version, method, close) in [
                (HTTPVersion.http1_1, HTTPMethod.GET, false), (.http1_1, .GET, true), (.http1_0, .GET, false),
                (.http1_1, .HEAD, false), (.http1_1, .CONNECT, true),
            ] {
                var p = HTTP1ResponseParser(maxHeaderBytes: 4096)
                p.answersHead = method == .HEAD
                var b = ByteBuffer(string: raw)
                guard case .head(let upstream) = try p.next(&b) else {
                    Issue.record("no head in \(raw)")
                    continue
                }
                var expected = upstream.head
                expected.version = version
                if close { expected.headers.add(name: "connection", value: "close") }
                var viaFields = HTTP1ResponseEncoder()
                var viaBytes = HTTP1ResponseEncoder()
                let want = String(buffer: viaFields.head(expected, method: method, allocator: alloc))
                let got = String(
                    buffer: viaBytes.head(
                        status: upstream.status, fields: upstream, version: version, close: close, method: method,
                        allocator: alloc))
                #expect(got == want, "\(raw) for \(method) over 1.\(version.minor)")
                #expect(viaBytes.chunked == viaFields.chunked && viaBytes.suppressBody == viaFields.suppressBody)
                #expect(
                    HTTP1ResponseEncoder.endsByClose(
                        version: version, status: upstream.status, method: method,
                        hasLength: upstream.contentLength != nil)
                        == HTTP1ResponseEncoder.endsByClose(expected, method: method))
            }
        }
        // Spot checks of the above: hop-by-hop fields gone, lines normalised.
        var p = HTTP1ResponseParser(maxHeaderBytes: 4096)
        var b = ByteBuffer(string: heads[1])
        guard case .head(let u) = try p.next(&b) else { return }
        var e = HTTP1ResponseEncoder()
        #expect(
            String(
                buffer: e.head(
                    status: u.status, fields: u, version: .http1_1, close: false, method: .GET, allocator: alloc))
                == "HTTP/1.1 200 OK\r\nx-a: 1\r\nx-b: two words\r\ntransfer-encoding: chunked\r\n\r\n")
    }

    /// The parser reads `grpc-status` as it goes by: the first one, when it is a number.
    @Test func theFirstNumericGRPCStatusIsRead() throws {
        func status(_ fields: String) throws -> Int? {
            var p = HTTP1ResponseParser(maxHeaderBytes: 4096)
            var b = ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + fields + "\r\n")
            guard case .head(let u) = try p.next(&b) else { return -99 }
            #expect(u.grpcStatus == u.head.headers.first(name: "grpc-status").flatMap(Int.init))
            return u.grpcStatus
        }
        #expect(try status("") == nil)
        #expect(try status("Grpc-Status: 14\r\n") == 14)
        #expect(try status("grpc-status: 0\r\ngrpc-status: 3\r\n") == 0)
        #expect(try status("grpc-status: fourteen\r\ngrpc-status: 3\r\n") == nil)
    }

    /// Records what the handler hands its delegate.
    final class Recorder: UpstreamDelegate {
        var events: [String] = []
        func upstreamHead(_ head: UpstreamHead) { events.append("head \(head.code)") }
        func upstreamBody(_ body: ByteBuffer) { events.append("body \(String(buffer: body))") }
        func upstreamEnd(_ trailers: HTTPHeaders?) { events.append("end") }
        func upstreamFailed(_ error: any Error) { events.append("failed \(error)") }
    }

    @Test func theHandlerWritesRequestsAndHandsOnResponses() throws {
        let (channel, handler, r) = try Self.connection()

        // HEAD: the parser knows no body follows because the handler wrote the request.
        handler.send(.head(HTTPRequestHead(version: .http1_1, method: .HEAD, uri: "/")))
        handler.send(.end(nil), flush: true)
        #expect(String(buffer: try channel.readOutbound(as: IOData.self).map(Self.bytes)!) == "HEAD / HTTP/1.1\r\n\r\n")
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n"))
        #expect(r.events == ["head 200", "end"] && handler.reusable && handler.delegate == nil)

        // A chunked request body written through the pipeline (as the HTTP/2 path does).
        handler.delegate = r
        var put = HTTPRequestHead(version: .http1_1, method: .PUT, uri: "/x")
        put.headers.add(name: "transfer-encoding", value: "chunked")
        try channel.writeOutbound(HTTPClientRequestPart.head(put))
        try channel.writeOutbound(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(string: "abc"))))
        try channel.writeOutbound(HTTPClientRequestPart.end(nil))
        var sent = ""
        while let d = try channel.readOutbound(as: IOData.self) { sent += String(buffer: Self.bytes(d)) }
        #expect(sent == "PUT /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        try channel.writeInbound(
            ByteBuffer(string: "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"))
        #expect(r.events.suffix(3) == ["head 200", "body ok", "end"])
        #expect(!handler.reusable)  // the upstream said close
    }

    @Test func bytesNobodyAskedForCloseTheConnection() throws {
        let (channel, handler, _) = try Self.connection()
        handler.delegate = nil
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\n"))
        #expect(!handler.reusable && !channel.isActive)
    }

    @Test func aBrokenResponseFailsTheAttemptAndClosesTheConnection() throws {
        let (channel, handler, r) = try Self.connection()
        handler.send(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")), flush: true)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"))
        #expect(r.events == ["failed upstream protocol error: invalid content-length \"x\""])
        #expect(!handler.reusable && !channel.isActive)
    }

    /// Bytes that arrived behind a 101 are held for the tunnel that replaces the handler.
    @Test func aSwitchHandsItsEarlyBytesToTheTunnel() throws {
        let (channel, handler, r) = try Self.connection()
        handler.send(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws")), flush: true)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\nEARLY"))
        try channel.writeInbound(ByteBuffer(string: " AND LATER"))
        #expect(r.events == ["head 101", "end"])
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)  // held for the tunnel
        #expect(handler.takeUnread().map { String(buffer: $0) } == "EARLY AND LATER")
        #expect(handler.takeUnread() == nil)

        // With no tunnel taking over, what is held after a 101 has the header block's bound.
        let (held, heldHandler, _) = try Self.connection()
        heldHandler.send(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws")), flush: true)
        try held.writeInbound(ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\n\r\n"))
        try held.writeInbound(ByteBuffer(string: String(repeating: "x", count: 1000)))
        #expect(held.isActive)
        try held.writeInbound(ByteBuffer(string: String(repeating: "x", count: 100)))
        #expect(!held.isActive)
    }

    /// As Exchange does: the 101's end makes the connection a tunnel at once, while the bytes
    /// that came in the same read as the 101 are still being handled.
    @Test func earlyBytesInTheSameReadAsThe101ReachATunnelMadeAtItsEnd() throws {
        final class Tunneler: UpstreamDelegate {
            let channel: EmbeddedChannel
            let handler: UpstreamHandler
            init(_ channel: EmbeddedChannel, _ handler: UpstreamHandler) {
                self.channel = channel
                self.handler = handler
            }
            func upstreamHead(_ head: UpstreamHead) {}
            func upstreamBody(_ body: ByteBuffer) {}
            var early: ByteBuffer?
            func upstreamEnd(_ trailers: HTTPHeaders?) {
                early = handler.takeUnread()
                try? channel.pipeline.syncOperations.removeHandler(handler).wait()
            }
            func upstreamFailed(_ error: any Error) {}
        }
        let (channel, handler, _) = try Self.connection()
        let t = Tunneler(channel, handler)
        handler.delegate = t
        handler.send(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws")), flush: true)
        try channel.writeInbound(
            ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\nFIRST FRAME"))
        #expect(t.early.map { String(buffer: $0) } == "FIRST FRAME")
    }

    @Test func aBodyUntilCloseEndsWhenTheConnectionDoes() throws {
        let (channel, handler, r) = try Self.connection()
        handler.send(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")), flush: true)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\nuntil"))
        try channel.close().wait()
        #expect(r.events == ["head 200", "body until", "end"])
        #expect(!handler.reusable)
    }

    /// An upstream connection on an EmbeddedChannel, its handler and a recording delegate.
    private static func connection() throws -> (EmbeddedChannel, UpstreamHandler, Recorder) {
        let channel = EmbeddedChannel()
        let handler = UpstreamHandler(maxHeaderBytes: 1024)
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9000)).wait()
        let r = Recorder()
        handler.delegate = r
        return (channel, handler, r)
    }

    private static func bytes(_ d: IOData) -> ByteBuffer {
        if case .byteBuffer(let b) = d { return b }
        return ByteBuffer()
    }
}
