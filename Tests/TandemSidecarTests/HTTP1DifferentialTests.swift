import NIOCore
import NIOEmbedded
import NIOHTTP1
import TandemCore
import Testing

@testable import TandemSidecar

/// The upstream response parser against NIO's llhttp-based decoder, which it replaced: seeded
/// random responses (every framing, mixed-case names, extensions, trailers, HEAD, 1xx, several
/// on one connection) cut at random points must come out the same from both.
@Suite struct HTTP1DifferentialTests {
    /// One response as bytes, and whether it answers a HEAD request.
    struct Case {
        var bytes: String
        var head: Bool
    }

    static func randomResponse(_ g: inout SeededRandom) -> Case {
        let statuses = [200, 201, 204, 206, 301, 304, 404, 500, 503]
        let status = statuses[Int(g.next() % UInt64(statuses.count))]
        let head = g.next() % 6 == 0
        var lines = ["HTTP/1.1 \(status) \(HTTPResponseStatus(statusCode: status).reasonPhrase)"]
        if g.next() % 4 == 0 { lines.insert("HTTP/1.1 100 Continue\r\n", at: 0) }
        let names = ["Content-Type", "x-request-id", "Cache-Control", "X-Mixed-Case", "date", "Vary", "set-cookie"]
        for _ in 0..<Int(g.next() % 6) {
            let name = names[Int(g.next() % UInt64(names.count))]
            let value = String(repeating: "v", count: Int(g.next() % 40)) + "\(g.next() % 1000)"
            lines.append("\(name):\(g.next() % 2 == 0 ? " " : "")\(value)")
        }
        let noBody = head || status == 204 || status == 304
        let body = String(repeating: "b", count: Int(g.next() % 300))
        var payload = ""
        if noBody {
            if g.next() % 2 == 0 { lines.append("Content-Length: \(g.next() % 500)") }
        } else if g.next() % 2 == 0 {
            lines.append("Content-Length: \(body.utf8.count)")
            payload = body
        } else {
            lines.append("Transfer-Encoding: chunked")
            var rest = Substring(body)
            while !rest.isEmpty {
                let n = min(rest.count, 1 + Int(g.next() % 100))
                let ext = g.next() % 3 == 0 ? ";name=value" : ""
                payload += String(n, radix: 16, uppercase: g.next() % 2 == 0) + ext + "\r\n" + rest.prefix(n) + "\r\n"
                rest = rest.dropFirst(n)
            }
            payload += "0\r\n"
            if g.next() % 3 == 0 { payload += "x-checksum: \(g.next() % 100000)\r\n" }
            payload += "\r\n"
        }
        return Case(bytes: lines.joined(separator: "\r\n") + "\r\n\r\n" + payload, head: head)
    }

    /// "head STATUS [name=value,…]", "body …", "end [trailers]" — bodies joined, hop-by-hop
    /// fields left out (the parser reads them itself and does not hand them on).
    static func describe(_ parts: [HTTPClientResponsePart]) -> [String] {
        var out: [String] = []
        var body = ""
        for p in parts {
            switch p {
            case .head(let h):
                let fields = h.headers.filter { !isHopByHop($0.name) }.map { "\($0.name)=\($0.value)" }
                out.append("head \(h.status.code) [\(fields.joined(separator: ","))]")
            case .body(var b):
                body += b.readString(length: b.readableBytes) ?? ""
            case .end(let t):
                if !body.isEmpty { out.append("body \(body)") }
                body = ""
                out.append("end [" + (t ?? [:]).map { "\($0.name)=\($0.value)" }.joined(separator: ",") + "]")
            }
        }
        return out
    }

    /// NIO's decoder: the requests written through its pipeline (so it knows HEAD), the bytes in `cuts`.
    static func nio(_ cases: [Case], _ cuts: [String]) throws -> [HTTPClientResponsePart] {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHTTPClientHandlers()
        for c in cases {
            try channel.writeOutbound(
                HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: c.head ? .HEAD : .GET, uri: "/")))
            try channel.writeOutbound(HTTPClientRequestPart.end(nil))
        }
        while try channel.readOutbound(as: ByteBuffer.self) != nil {}
        for cut in cuts { try channel.writeInbound(ByteBuffer(string: cut)) }
        var parts: [HTTPClientResponsePart] = []
        while let p = try channel.readInbound(as: HTTPClientResponsePart.self) { parts.append(p) }
        return parts
    }

    /// Ours, one response at a time as the handler feeds it (HEAD set before each).
    static func ours(_ cases: [Case], _ cuts: [String]) throws -> [HTTPClientResponsePart] {
        var p = HTTP1ResponseParser(maxHeaderBytes: 64 * 1024)
        var parts: [HTTPClientResponsePart] = []
        var buffer = ByteBuffer()
        var index = 0
        p.answersHead = cases.first?.head ?? false
        for cut in cuts {
            buffer.writeString(cut)
            while let e = try p.next(&buffer) {
                switch e {
                case .head(let h): parts.append(.head(h.head))
                case .body(let b): parts.append(.body(b))
                case .end(let t):
                    parts.append(.end(t))
                    index += 1
                    if index < cases.count { p.answersHead = cases[index].head }
                }
            }
            buffer.discardReadBytes()
        }
        return parts
    }

    @Test(arguments: 0..<200) func theParserAgreesWithLlhttp(seed: Int) throws {
        var g = SeededRandom(seed: UInt64(seed) &+ 9)
        let cases = (0..<(1 + Int(g.next() % 3))).map { _ in Self.randomResponse(&g) }
        let stream = Array(cases.map(\.bytes).joined().utf8)
        var cuts: [String] = []
        var at = 0
        while at < stream.count {
            let n = min(stream.count - at, 1 + Int(g.next() % 64))
            cuts.append(String(decoding: stream[at..<(at + n)], as: UTF8.self))
            at += n
        }
        let expected = Self.describe(try Self.nio(cases, cuts))
        let got = Self.describe(try Self.ours(cases, cuts))
        #expect(got == expected, "seed \(seed): \(cases.map(\.bytes))")
        #expect(expected.filter { $0.hasPrefix("end") }.count == cases.count)
    }
}
