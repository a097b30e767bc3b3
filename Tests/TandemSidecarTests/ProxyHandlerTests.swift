import NIOCore
import NIOEmbedded
import NIOHTTP1
import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic
import Testing

@testable import TandemSidecar

/// The proxy's downstream handler on an EmbeddedChannel: every answer it gives without an
/// upstream (limits, bad input, routing, rate limits) is checked byte for byte.
struct ProxyHarness {
    let channel = EmbeddedChannel()
    let ctx: ProxyContext

    /// Counts the reads the handlers ask of the channel (it sits next to the socket end).
    final class ReadCounter: ChannelOutboundHandler, @unchecked Sendable {
        typealias OutboundIn = NIOAny
        var reads = 0
        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }
    let reads = ReadCounter()

    init(
        side: ProxySide = .outbound, routes: [Route] = [], limits: SidecarLimits = SidecarLimits(),
        ensureCluster: @escaping @Sendable (String) -> EventLoopFuture<Void>? = { _ in nil }
    ) throws {
        var config = SidecarConfig(service: "orders", instance: "orders-1", appPort: 1)
        config.routes = routes
        config.limits = limits
        let brain = TrafficBrain(config: config, seed: 1)
        ctx = ProxyContext(
            brain: brain,
            pools: UpstreamPools(
                maxIdlePerEndpoint: 1, idleTimeout: .seconds(30), slots: ConnectionSlots(brain: brain)),
            metrics: SidecarMetrics(), limits: limits,
            service: "orders", inboundTimeout: .seconds(1), accessLog: nil, ensureCluster: ensureCluster)
        var decoder = NIOHTTPDecoderLimitConfiguration()
        decoder.maxHeaderListSize = limits.maxHeaderBytes
        decoder.maxHeaderFieldSize = limits.maxHeaderBytes
        try channel.pipeline.syncOperations.addHandler(reads)
        try HTTPProxyHandler.configure(
            channel.pipeline.syncOperations, proxy: HTTPProxyHandler(ctx: ctx, side: side), compress: false,
            decoderLimits: decoder)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 40000)).wait()
    }

    /// Sends raw request bytes; returns everything the proxy wrote back.
    func send(_ raw: String) throws -> String {
        try channel.writeInbound(ByteBuffer(string: raw))
        var out = ""
        while let b = try channel.readOutbound(as: ByteBuffer.self) { out += String(buffer: b) }
        return out
    }
}

@Suite struct ProxyHandlerTests {
    @Test func aHostThatIsNoServiceGetsAJSONNoRoute() throws {
        let h = try ProxyHarness()
        let out = try h.send("GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(out.contains("tandem-error: no-route\r\n"))
        #expect(out.contains("content-type: application/json\r\n"))
        #expect(
            out.hasSuffix(
                #"{"code":404,"message":"no route for host \"127.0.0.1\"; call a service by name, e.g. http://users/","error":"no-route"}"#
            ))
        #expect(h.channel.isActive)  // keep-alive: the connection stays open
    }

    /// A connection keeps the metric series of its last request: a request with another
    /// status on the same connection still counts in its own series, and the route's
    /// histogram counts both.
    @Test func requestsCountInTheirOwnSeriesOnOneConnection() throws {
        let h = try ProxyHarness()
        _ = try h.send("GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        _ = try h.send("GET https://users/ HTTP/1.1\r\nHost: users\r\n\r\n")
        _ = try h.send("GET /y HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        func count(_ status: String) -> UInt64 {
            h.ctx.metrics.counter(
                "tandem_requests_total", [("side", "outbound"), ("route", "none"), ("cluster", ""), ("status", status)])
        }
        #expect(count("404") == 2 && count("400") == 1)
        let text = h.ctx.metrics.render(gauges: [])
        #expect(text.contains(#"tandem_request_duration_ms_count{side="outbound",route="none"} 3"#), "\(text)")
    }

    /// An answer to HEAD says what GET would get but carries no body, so the next request on
    /// the connection is not misread as one.
    @Test func aLocalAnswerToHEADHasNoBody() throws {
        let h = try ProxyHarness()
        let head = try h.send("HEAD /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        #expect(head.hasPrefix("HTTP/1.1 404 Not Found\r\n") && head.contains("content-length: "))
        #expect(head.hasSuffix("\r\n\r\n"), "\(head)")
        let get = try h.send("GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        #expect(get.hasPrefix("HTTP/1.1 404 Not Found\r\n") && get.hasSuffix("}"))
    }

    /// Requests pipelined behind one whose answer is pending wait, and are answered in order
    /// once it is (here the first waits for its cluster's first discovery load).
    @Test func pipelinedRequestsAreAnsweredInOrder() throws {
        let loaded = EmbeddedEventLoop().makePromise(of: Void.self)
        let h = try ProxyHarness(ensureCluster: { $0 == "payments" ? loaded.futureResult : nil })
        let out = try h.send(
            "GET http://payments/a HTTP/1.1\r\nHost: payments\r\n\r\n"
                + "GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                + "POST http://payments/c HTTP/1.1\r\nHost: payments\r\nContent-Length: 3\r\n\r\nabc")
        #expect(out == "")  // the first is not answered yet; the others wait behind it
        loaded.succeed()
        var answers = ""
        while let b = try h.channel.readOutbound(as: ByteBuffer.self) { answers += String(buffer: b) }
        // Each answer's status line (a body ends without a line break).
        let statuses = answers.components(separatedBy: "HTTP/1.1 ").dropFirst().map { $0.prefix(3) }
        #expect(statuses == ["503", "404", "503"], "\(answers)")
        #expect(answers.contains(#"no route for host \"127.0.0.1\""#))
        #expect(h.channel.isActive)
    }

    /// With `maxPipelinedRequests` waiting, the connection stops reading until they are answered.
    @Test func aFullBacklogHoldsReadsUntilItDrains() throws {
        var limits = SidecarLimits()
        limits.maxPipelinedRequests = 2
        let loaded = EmbeddedEventLoop().makePromise(of: Void.self)
        let h = try ProxyHarness(limits: limits, ensureCluster: { _ in loaded.futureResult })
        _ = try h.send("GET http://payments/a HTTP/1.1\r\nHost: payments\r\n\r\n")
        h.channel.read()
        #expect(h.reads.reads == 1)  // one request waiting for its answer: reading goes on
        _ = try h.send(String(repeating: "GET http://payments/b HTTP/1.1\r\nHost: payments\r\n\r\n", count: 2))
        h.channel.read()
        #expect(h.reads.reads == 1)  // two behind it: held
        loaded.succeed()
        #expect(h.reads.reads == 2)  // answered: the held read goes out
        var answers = ""
        while let b = try h.channel.readOutbound(as: ByteBuffer.self) { answers += String(buffer: b) }
        #expect(answers.components(separatedBy: "HTTP/1.1 503 ").count == 4)
    }

    /// A pipelined request's body counts too: past `streamBodyAfterBytes` waiting, reading stops
    /// (a large body behind a pending request must not fill memory).
    @Test func aPipelinedBodyHoldsReadsPastTheByteBound() throws {
        var limits = SidecarLimits()
        limits.streamBodyAfterBytes = 16
        let loaded = EmbeddedEventLoop().makePromise(of: Void.self)
        let h = try ProxyHarness(limits: limits, ensureCluster: { _ in loaded.futureResult })
        let post = "POST http://payments/b HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\n0123456789"
        _ = try h.send("GET http://payments/a HTTP/1.1\r\nHost: payments\r\n\r\n" + post)
        h.channel.read()
        #expect(h.reads.reads == 1)  // one request and 10 body bytes waiting: reading goes on
        _ = try h.send(post)
        h.channel.read()
        #expect(h.reads.reads == 1)  // 20 body bytes waiting: held
        loaded.succeed()
        #expect(h.reads.reads == 2)
        var answers = ""
        while let b = try h.channel.readOutbound(as: ByteBuffer.self) { answers += String(buffer: b) }
        #expect(answers.components(separatedBy: "HTTP/1.1 503 ").count == 4)
        #expect(h.channel.isActive)
    }

    /// Regression: after a local answer the connection still counted as busy, so the idle
    /// timeout never closed it (one leaked connection per client that got a 404 or 503).
    @Test func idleConnectionsCloseAfterALocalAnswer() throws {
        let h = try ProxyHarness()
        _ = try h.send("GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        #expect(h.channel.isActive)
        h.channel.embeddedEventLoop.advanceTime(by: .nanoseconds(h.ctx.limits.idleTimeout) + .seconds(1))
        #expect(!h.channel.isActive)
    }

    @Test func slowHeadersAreCutAfterTheHeaderReadTimeout() throws {
        let h = try ProxyHarness()
        try h.channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: us"))
        h.channel.embeddedEventLoop.advanceTime(by: .nanoseconds(h.ctx.limits.headerReadTimeout) + .seconds(1))
        #expect(!h.channel.isActive)
    }

    @Test func aServiceWithoutInstancesIsA503NamingIt() throws {
        let h = try ProxyHarness()
        let out = try h.send("GET http://payments/charge HTTP/1.1\r\nHost: payments\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 503 Service Unavailable\r\n"))
        #expect(out.contains("tandem-error: no-healthy-endpoint"))
        #expect(out.contains(#"no instance of \"payments\" is registered"#))
    }

    /// A connection remembers its last cluster's slot: requests that alternate between two
    /// clusters on one connection each reach their own cluster's state (here its breaker).
    @Test func requestsToTwoClustersOnOneConnectionReachTheirOwnState() throws {
        let h = try ProxyHarness()
        h.ctx.brain.withCluster("payments") { c, _ in
            for _ in 0..<5 { _ = c.breaker.record(failed: true, latency: 0, now: 0) }
        }
        for service in ["billing", "billing", "payments", "payments", "billing", "payments"] {
            let out = try h.send("GET http://\(service)/x HTTP/1.1\r\nHost: \(service)\r\n\r\n")
            let reason = service == "payments" ? "circuit-open" : "no-healthy-endpoint"
            #expect(out.contains("tandem-error: \(reason)"), "\(service): \(out)")
        }
    }

    @Test func oversizedBodiesAre413AndCloseTheConnection() throws {
        var limits = SidecarLimits()
        limits.maxBodyBytes = 16
        let h = try ProxyHarness(limits: limits)
        let out = try h.send(
            "POST /user HTTP/1.1\r\nHost: users\r\nContent-Length: 40\r\n\r\n" + String(repeating: "x", count: 40))
        #expect(out.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n"))
        #expect(out.contains("tandem-error: body-too-large"))
        #expect(out.contains("connection: close"))
        #expect(out.contains("request body exceeds 16 bytes"))
        #expect(!h.channel.isActive)
        // Chunked bodies are counted as they arrive.
        let h2 = try ProxyHarness(limits: limits)
        let chunked = try h2.send(
            "POST /user HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n"
                + String(repeating: "y", count: 20)
                + "\r\n0\r\n\r\n")
        #expect(chunked.hasPrefix("HTTP/1.1 413"))
    }

    /// Regression: a client that waits for 100 Continue was told to go on, then refused after
    /// sending the whole body.
    @Test func anOversizedBodyAnnouncedWithExpectIsRefusedBeforeItIsSent() throws {
        var limits = SidecarLimits()
        limits.maxBodyBytes = 16
        let h = try ProxyHarness(limits: limits)
        let out = try h.send("PUT /user HTTP/1.1\r\nHost: users\r\nContent-Length: 40\r\nExpect: 100-continue\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n"), "\(out)")
        #expect(!out.contains("100 Continue"))
        #expect(!h.channel.isActive)
    }

    @Test func oversizedHeaderBlocksAre431() throws {
        var limits = SidecarLimits()
        limits.maxHeaderBytes = 1024
        let h = try ProxyHarness(limits: limits)
        let out = try h.send("GET / HTTP/1.1\r\nHost: users\r\nX-Big: \(String(repeating: "a", count: 4096))\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        #expect(out.contains("tandem-error: headers-too-large"))
    }

    @Test func garbageIsA400() throws {
        let h = try ProxyHarness()
        let out = try h.send("THIS IS NOT HTTP\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
        #expect(out.contains("tandem-error: bad-request"))
    }

    @Test func routeRateLimitsAnswer429() throws {
        var route = Route(name: "limited", match: RouteMatch(host: "127.0.0.9"), cluster: "nowhere")
        route.rateLimit = TokenBucket.Config(maxTokens: 1, tokensPerFill: 1, fillInterval: .seconds(3600))
        let h = try ProxyHarness(routes: [route])
        let first = try h.send("GET / HTTP/1.1\r\nHost: 127.0.0.9\r\n\r\n")
        #expect(first.hasPrefix("HTTP/1.1 503"))  // admitted, but the cluster has no endpoint
        let second = try h.send("GET / HTTP/1.1\r\nHost: 127.0.0.9\r\n\r\n")
        #expect(second.hasPrefix("HTTP/1.1 429 Too Many Requests\r\n"))
        #expect(second.contains("tandem-error: rate-limited"))
        #expect(
            h.ctx.metrics.counter("tandem_local_answers_total", [("side", "outbound"), ("reason", "rate-limited")]) == 1
        )
    }

    @Test func perCallerRateLimitsKeepABucketPerHeaderValueOrAddress() throws {
        var route = Route(name: "limited", match: RouteMatch(host: "127.0.0.9"), cluster: "nowhere")
        route.rateLimit = TokenBucket.Config(maxTokens: 1, tokensPerFill: 1, fillInterval: .seconds(3600))
        route.rateLimitKey = .header("x-user")
        let h = try ProxyHarness(routes: [route])
        func status(_ user: String?) throws -> String {
            let extra = user.map { "x-user: \($0)\r\n" } ?? ""
            let out = try h.send("GET / HTTP/1.1\r\nHost: 127.0.0.9\r\n\(extra)\r\n")
            return String(out.prefix(12).suffix(3))
        }
        #expect(try status("alice") == "503")  // admitted (no endpoint behind the route)
        #expect(try status("bob") == "503")  // another caller, another bucket
        #expect(try status("alice") == "429")
        #expect(try status(nil) == "503")  // requests without the header share one bucket
        #expect(try status(nil) == "429")
        var byAddress = route
        byAddress.rateLimitKey = .remoteAddress
        let h2 = try ProxyHarness(routes: [byAddress])
        let first = try h2.send("GET / HTTP/1.1\r\nHost: 127.0.0.9\r\n\r\n")
        let second = try h2.send("GET / HTTP/1.1\r\nHost: 127.0.0.9\r\nx-user: carol\r\n\r\n")
        #expect(first.hasPrefix("HTTP/1.1 503") && second.hasPrefix("HTTP/1.1 429"))
        #expect(second.contains("exceeded for this caller"))
    }

    @Test func expectContinueIsAnsweredByTheProxy() throws {
        let h = try ProxyHarness()
        let head = try h.send(
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        #expect(head == "HTTP/1.1 100 Continue\r\n\r\n")
        let rest = try h.send("hi")
        #expect(rest.hasPrefix("HTTP/1.1 404"))
    }

    /// An answer's head and a small body leave in one write (one trip through NIO's write
    /// queue); a large body follows its head as a write of its own, and a head flushed alone
    /// (100 Continue above, or a flush from behind the proxy) is not held back.
    @Test func aHeadAndASmallBodyLeaveInOneWrite() throws {
        let h = try ProxyHarness()
        func buffers() throws -> [String] {
            var out: [String] = []
            while let b = try h.channel.readOutbound(as: ByteBuffer.self) { out.append(String(buffer: b)) }
            return out
        }
        try h.channel.writeInbound(ByteBuffer(string: "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        let local = try buffers()
        #expect(local.count == 1 && local[0].hasPrefix("HTTP/1.1 404") && local[0].hasSuffix("}"), "\(local)")

        func answer(length: Int?, body: Int) throws -> [String] {
            var head = HTTPResponseHead(version: .http1_1, status: .ok)
            if let length { head.headers.add(name: "content-length", value: String(length)) }
            h.channel.write(HTTPServerResponsePart.head(head), promise: nil)
            h.channel.write(
                HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(repeating: UInt8(ascii: "b"), count: body))),
                promise: nil)
            h.channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: nil)
            return try buffers()
        }
        let small = try answer(length: 100, body: 100)
        #expect(small.count == 1 && small[0].hasSuffix("\r\n\r\n" + String(repeating: "b", count: 100)))
        let large = try answer(length: 20_000, body: 20_000)
        #expect(large.count == 2 && large[0].hasSuffix("\r\n\r\n") && large[1].utf8.count == 20_000)
        let chunked = try answer(length: nil, body: 3)
        #expect(chunked.count == 2, "\(chunked)")
        #expect(chunked.first?.hasSuffix("transfer-encoding: chunked\r\n\r\n3\r\nbbb\r\n") == true)
        #expect(chunked.last == "0\r\n\r\n")

        h.channel.write(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok)), promise: nil)
        h.channel.flush()
        let flushed = try buffers()
        #expect(flushed.count == 1 && flushed[0].hasPrefix("HTTP/1.1 200 OK\r\n"))
    }

    /// on_response's edits on an answer's own head: a replaced name loses every value (in any
    /// case), a removed absent name changes nothing, additions follow in order.
    @Test func responseHeaderEditsApplyInOrder() {
        var h = HTTPHeaders([("Server", "nginx"), ("x-a", "1"), ("content-type", "t"), ("X-A", "2")])
        PolicyRun.apply(
            [
                .init(name: "x-a", value: "new", replace: true), .init(name: "server", value: nil, replace: true),
                .init(name: "x-b", value: "1", replace: false), .init(name: "x-b", value: "2", replace: false),
                .init(name: "x-gone", value: nil, replace: true),
            ], to: &h)
        #expect(h.map { "\($0.name)=\($0.value)" } == ["content-type=t", "x-a=new", "x-b=1", "x-b=2"])
    }

    /// The same edits written with an upstream's head straight from its bytes give the bytes
    /// the edited `HTTPHeaders` give, framing included (a policy may drop or set the length).
    @Test func responseHeaderEditsOnTheUpstreamsBytesMatchTheEditedFields() throws {
        let alloc = ByteBufferAllocator()
        let raw =
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nx-a: 1\r\nContent-Length: 5\r\ncontent-type: t\r\nX-A: 2\r\n"
            + "Connection: keep-alive\r\n\r\n"
        let edits: [[PolicyExchange.HeaderEdit]] = [
            [],
            [
                .init(name: "x-a", value: "new", replace: true), .init(name: "server", value: nil, replace: true),
                .init(name: "x-b", value: "1", replace: false), .init(name: "x-b", value: "2", replace: false),
            ],
            [.init(name: "content-length", value: nil, replace: true)],
            [.init(name: "CONTENT-LENGTH", value: "7", replace: true), .init(name: "x-n", value: "", replace: false)],
        ]
        for list in edits {
            var p = HTTP1ResponseParser(maxHeaderBytes: 4096)
            var b = ByteBuffer(string: raw)
            guard case .head(let upstream) = try p.next(&b) else {
                Issue.record("no head")
                return
            }
            var expected = upstream.head
            PolicyRun.apply(list, to: &expected.headers)
            // The sizes the head is reserved with: the framing exact, the whole exact or a bound.
            let sized = EditedFields(base: upstream, edits: list).sizes
            let walked = FieldSizes(walking: EditedFields(base: upstream, edits: list))
            #expect(sized.hasLength == walked.hasLength && sized.lengthFields == walked.lengthFields)
            #expect(sized.hasCoding == walked.hasCoding && sized.codingFields == walked.codingFields)
            #expect(sized.exact ? sized.all == walked.all : sized.all > walked.all, "\(list.map(\.name))")
            // Bounded only when an edit replaces and none names a framing field (the second list).
            #expect(sized.exact == (list.count != 4), "\(list.map(\.name))")
            var viaHeaders = HTTP1ResponseEncoder()
            var viaBytes = HTTP1ResponseEncoder()
            let want = String(buffer: viaHeaders.head(expected, method: .GET, allocator: alloc))
            let fields = EditedFields(base: upstream, edits: list)
            let got = String(
                buffer: viaBytes.head(
                    status: upstream.status, fields: fields, version: .http1_1, close: false, method: .GET,
                    allocator: alloc))
            #expect(got == want, "\(list.map(\.name))")
            #expect(viaBytes.chunked == viaHeaders.chunked)
            #expect(fields.sizes.hasLength == expected.headers.contains(name: "content-length"))
        }
    }

    @Test func httpsTargetsAreRefusedClearly() throws {
        let h = try ProxyHarness()
        let out = try h.send("GET https://users/x HTTP/1.1\r\nHost: users\r\n\r\n")
        #expect(out.hasPrefix("HTTP/1.1 400"))
        #expect(out.contains("https:// targets cannot be proxied"))
    }

    @Test func metricsRenderAsPrometheusText() {
        let m = SidecarMetrics()
        m.inc("tandem_requests_total", [("route", "a\"b")])
        m.observe("tandem_request_duration_ms", [("route", "a")], ms: 3)
        let text = m.render(gauges: [("tandem_ready", [], 1)])
        #expect(text.contains(#"tandem_requests_total{route="a\"b"} 1"#))
        #expect(text.contains(#"tandem_request_duration_ms_bucket{route="a",le="5"} 1"#))
        #expect(text.contains(#"tandem_request_duration_ms_bucket{route="a",le="2"} 0"#))
        #expect(text.contains("tandem_ready 1"))
    }
}

@Suite struct ListenerPortTests {
    /// An ephemeral listener that lands on the app's port is replaced (the app, started after
    /// the sidecar, would fail with "Address already in use"); the unlucky one is closed.
    @Test func anEphemeralListenerNeverTakesTheAppsPort() throws {
        var handedOut: [EmbeddedChannel] = []
        let ports = [8080, 40001]
        let ch = try Sidecar.bind(HostPort(host: "127.0.0.1", port: 0), avoiding: 8080) { _ in
            let c = EmbeddedChannel()
            c.localAddress = try SocketAddress(ipAddress: "127.0.0.1", port: ports[handedOut.count])
            try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()  // active, as a bound listener is
            handedOut.append(c)
            return c
        }
        #expect(ch.localAddress?.port == 40001)
        #expect(handedOut.count == 2)
        #expect(!handedOut[0].isActive && handedOut[1].isActive)
        // A fixed port is the user's choice: bound once, as asked.
        var calls = 0
        let fixed = try Sidecar.bind(HostPort(host: "127.0.0.1", port: 8080), avoiding: 8080) { _ in
            calls += 1
            let c = EmbeddedChannel()
            c.localAddress = try SocketAddress(ipAddress: "127.0.0.1", port: 8080)
            return c
        }
        #expect(calls == 1 && fixed.localAddress?.port == 8080)
    }
}
