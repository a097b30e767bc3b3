import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import TandemCore
import Testing

/// Tandem's HTTP/2 endpoints against a peer that behaves as grpc-go does on the wire.
@Suite struct HTTP2PeerTests {
    /// grpc-go (etcdctl, clientv3, any Go service) sends a flow-control (BDP) PING with nearly
    /// every message it reads. NIOHTTP2 allows 200 control frames per 30 s by default, so the
    /// registry answered a Go client's 201st call-and-ping with GOAWAY ENHANCE_YOUR_CALM
    /// (seen with `etcdctl make-mirror`: a reconnect every 200 puts).
    @Test func theRegistryKeepsAGoClientsConnection() throws {
        let reg = try RegistryUnderTest()
        try callAndPing(reg.endpoint, times: 300)
        withExtendedLifetime(reg) {}
    }

    /// The same through a sidecar to Debian's etcd (a grpc-go server): the sidecar's listener
    /// gets the client's PINGs, its upstream connection gets etcd's. Each side used to end
    /// its connection after 200; a call then on the upstream connection was lost.
    @Test func aSidecarKeepsGoPeersConnectionsOnBothSides() throws {
        let etcd = try RealEtcd()
        let (sidecar, local) = try sidecarInFront(of: etcd.endpoint)
        try callAndPing(local, times: 300)
        withExtendedLifetime((etcd, sidecar)) {}
    }

    /// etcd's keepalive enforcement (`--grpc-keepalive-min-time`, grpc-go's rules): a client
    /// that PINGs with no call open and no data in between gets three strikes, then GOAWAY
    /// ENHANCE_YOUR_CALM "too_many_pings" and the connection ends. (The test above is the
    /// other half: PINGs that follow data are never counted.)
    @Test func theRegistryEndsAConnectionThatPingsTooOften() throws {
        let reg = try RegistryUnderTest()
        let client = try GoLikeClient(reg.endpoint)
        defer { client.close() }
        #expect(try client.call("/etcdserverpb.KV/Range", GoLikeClient.rangeRequest) == "0")
        for _ in 0..<3 { try client.ping() }  // the first resets after the call's data; two strikes
        #expect(try client.goAways().isEmpty)
        try client.ping()  // the third strike (acked by NIOHTTP2 before the policy sees it)
        try client.waitClosed()
        #expect(try client.goAways() == [.enhanceYourCalm])
        #expect(try client.goAwayData() == ["too_many_pings"])
        withExtendedLifetime(reg) {}
    }

    /// gRPC clients cancel calls with RST_STREAM (a deadline passed, the caller gave up). A busy
    /// app whose deadlines expire sends many; NIOHTTP2's rapid-reset allowance (200 per 30 s)
    /// made the registry and the sidecar end such a client's connection — and every call on it.
    @Test func cancelledCallsDoNotCostTheConnection() throws {
        let reg = try RegistryUnderTest()
        let (sidecar, local) = try sidecarInFront(of: reg.endpoint)
        for endpoint in [reg.endpoint, local] {
            let client = try GoLikeClient(endpoint)
            defer { client.close() }
            for _ in 0..<300 { try client.cancelledCall("/etcdserverpb.Watch/Watch") }
            #expect(try client.call("/etcdserverpb.KV/Range", GoLikeClient.rangeRequest) == "0", "\(endpoint)")
            #expect(try client.goAways() == [], "\(endpoint)")
        }
        withExtendedLifetime((reg, sidecar)) {}
    }

    /// A sidecar with no registry whose local upstream port leads to the gRPC server at
    /// `server`; the address to call it on.
    /// An upstream shutting down gracefully sends GOAWAY: the call it is serving finishes, and
    /// the sidecar opens a new connection for the next ones. (Without the GOAWAY hook a stream
    /// on the old one is refused by NIOHTTP2: the call is retried, its message re-sent, on a
    /// new connection — one retry spent, which the metrics show.)
    @Test func anUpstreamsGracefulGoAwayMovesNewCallsToANewConnection() throws {
        let upstream = try QuiescingUpstream()
        defer { upstream.stop() }
        let (sidecar, local) = try sidecarInFront(of: upstream.endpoint)
        let client = try GoLikeClient(local)
        defer { client.close() }
        for _ in 0..<3 { #expect(try client.call("/t.T/Call", []) == "0") }
        // A call the upstream holds, then its GOAWAY; the held call still completes.
        let held = client.callFuture("/t.T/Hold", [])
        try upstream.holdArrived.futureResult.wait()
        try upstream.goAwayAndSync()
        upstream.releaseHeld()
        #expect(try held.wait() == "0")
        for _ in 0..<3 { #expect(try client.call("/t.T/Call", []) == "0") }
        // Four calls on the first connection (the held one included), three on a second,
        // and no attempt was spent on the connection going away.
        #expect(try upstream.servedPerConnection() == [4, 3])
        let metrics = try http("http://\(sidecar.admin)/metrics").body
        #expect(!metrics.contains("tandem_retries_total"), "\(metrics)")
        withExtendedLifetime(sidecar) {}
    }

    func sidecarInFront(of server: String) throws -> (SidecarUnderTest, String) {
        let local = try freePort()
        let sidecar = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: ["--endpoints", "etcd=\(server)", "--upstream", "etcd=\(local)"], waitForRegistration: false)
        return (sidecar, "127.0.0.1:\(local)")
    }

    /// `times` unary KV/Range calls on one connection, each followed by a PING whose ack is
    /// awaited (grpc-go's pattern); every call must answer grpc-status 0 and the server must
    /// never send GOAWAY.
    func callAndPing(_ endpoint: String, times: Int) throws {
        let client = try GoLikeClient(endpoint)
        defer { client.close() }
        var statuses: [String: Int] = [:]
        for _ in 0..<times {
            statuses[try client.call("/etcdserverpb.KV/Range", GoLikeClient.rangeRequest), default: 0] += 1
            try client.ping()
        }
        #expect(statuses == ["0": times])
        #expect(try client.goAways() == [])
    }
}

/// A gRPC client on NIOHTTP2 that behaves like grpc-go on the wire: one connection, and a
/// PING after each response. Its own control-frame allowance is unbounded (grpc-go has none),
/// so only the server can end the connection.
final class GoLikeClient: Sendable {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let channel: any Channel
    let mux: NIOLoopBound<NIOHTTP2Handler.StreamMultiplexer>
    let root: NIOLoopBound<RootFrames>
    let authority: String

    /// A RangeRequest for the key "/k" (field 1, bytes), encoded by hand.
    static let rangeRequest: [UInt8] = [0x0a, 0x02, 0x2f, 0x6b]

    init(_ endpoint: String) throws {
        let hp = try #require(HostPort(endpoint))
        authority = endpoint
        let loop = group.next()
        // The pipeline is set up as the connection opens: the server's SETTINGS must not reach
        // a pipeline without its HTTP/2 handler.
        let made = Made()
        channel = try ClientBootstrap(group: loop).channelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                var config = NIOHTTP2Handler.ConnectionConfiguration()
                config.controlFrameRateLimit.maximumCount = .max
                made.mux = try ch.pipeline.syncOperations.configureHTTP2Pipeline(
                    mode: .client, connectionConfiguration: config, streamConfiguration: .init(),
                    inboundStreamInitializer: { $0.close() })
                try ch.pipeline.syncOperations.addHandler(made.root)
            }
        }.connect(host: hp.host, port: hp.port).wait()
        (mux, root) = try loop.submit {
            (NIOLoopBound(made.mux!, eventLoop: loop), NIOLoopBound(made.root, eventLoop: loop))
        }.wait()
    }

    /// What the channel initializer made, touched only on the connection's loop.
    final class Made: @unchecked Sendable {
        var mux: NIOHTTP2Handler.StreamMultiplexer?
        let root = RootFrames()
    }

    /// One unary call; its grpc-status.
    func call(_ path: String, _ message: [UInt8]) throws -> String { try callFuture(path, message).wait() }

    /// One unary call, answered later: its grpc-status.
    func callFuture(_ path: String, _ message: [UInt8]) -> EventLoopFuture<String> {
        let loop = channel.eventLoop
        let authority = self.authority
        return loop.flatSubmit { () -> EventLoopFuture<String> in
            let answer = loop.makePromise(of: String.self)
            let created = loop.makePromise(of: (any Channel).self)
            created.futureResult.whenFailure { answer.fail($0) }
            self.mux.value.createStreamChannel(promise: created) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(CallHandler(answer))
                    let headers: HPACKHeaders = [
                        ":method": "POST", ":scheme": "http", ":path": path, ":authority": authority,
                        "content-type": "application/grpc", "te": "trailers",
                    ]
                    stream.write(HTTP2Frame.FramePayload.headers(.init(headers: headers)), promise: nil)
                    var body = stream.allocator.buffer(capacity: 5 + message.count)
                    body.writeInteger(UInt8(0))
                    body.writeInteger(UInt32(message.count))
                    body.writeBytes(message)
                    stream.writeAndFlush(
                        HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(body), endStream: true)), promise: nil)
                }
            }
            return Self.guarded(answer)
        }
    }

    struct Lost: Error, CustomStringConvertible {
        let what: String
        var description: String { "\(what) got no answer in 30 s" }
    }

    /// A guard so that an exchange the server never answers fails the test instead of hanging
    /// it (not a timing assertion: a healthy answer takes milliseconds).
    static func guarded<T: Sendable>(_ promise: EventLoopPromise<T>, _ what: String = "a call") -> EventLoopFuture<T> {
        let timer = promise.futureResult.eventLoop.scheduleTask(in: .seconds(30)) { promise.fail(Lost(what: what)) }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        return promise.futureResult
    }

    /// Opens a call and cancels it (RST_STREAM CANCEL) before sending its message.
    func cancelledCall(_ path: String) throws {
        let loop = channel.eventLoop
        let authority = self.authority
        try loop.flatSubmit { () -> EventLoopFuture<Void> in
            let created = loop.makePromise(of: (any Channel).self)
            self.mux.value.createStreamChannel(promise: created) { stream in
                stream.eventLoop.makeCompletedFuture {
                    let headers: HPACKHeaders = [
                        ":method": "POST", ":scheme": "http", ":path": path, ":authority": authority,
                        "content-type": "application/grpc", "te": "trailers",
                    ]
                    stream.writeAndFlush(HTTP2Frame.FramePayload.headers(.init(headers: headers)), promise: nil)
                }
            }
            let closed = loop.makePromise(of: Void.self)
            created.futureResult.whenComplete { r in
                switch r {
                // The close reports the reset it sent (StreamClosed, CANCEL): done either way.
                case .success(let stream): stream.close().whenComplete { _ in closed.succeed(()) }
                case .failure(let e): closed.fail(e)
                }
            }
            return Self.guarded(closed, "a cancelled call")
        }.wait()
    }

    /// Sends a PING and waits for its ack.
    func ping() throws {
        try channel.eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
            let acked = self.channel.eventLoop.makePromise(of: Void.self)
            self.root.value.pending.append(acked)
            let ping = HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 7), ack: false))
            self.channel.writeAndFlush(ping, promise: nil)
            return Self.guarded(acked, "a PING")
        }.wait()
    }

    /// The error codes of the GOAWAY frames received.
    func goAways() throws -> [HTTP2ErrorCode] {
        try channel.eventLoop.submit { self.root.value.goAways }.wait()
    }

    /// Their debug data, as text.
    func goAwayData() throws -> [String] {
        try channel.eventLoop.submit { self.root.value.goAwayData }.wait()
    }

    /// Waits until the server has closed the connection.
    func waitClosed() throws {
        let closed = channel.eventLoop.makePromise(of: Void.self)
        channel.closeFuture.cascade(to: closed)
        try Self.guarded(closed, "the connection's close").wait()
    }

    func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }

    /// The connection's own frames: PING acks and GOAWAY.
    final class RootFrames: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame
        var pending: [EventLoopPromise<Void>] = []
        var goAways: [HTTP2ErrorCode] = []
        var goAwayData: [String] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data).payload {
            case .ping(_, ack: true) where !pending.isEmpty: pending.removeFirst().succeed(())
            case .goAway(_, let code, let data):
                goAways.append(code)
                goAwayData.append(data.map { String(buffer: $0) } ?? "")
            default: break
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            for p in pending { p.fail(ChannelError.ioOnClosedChannel) }
            pending = []
            context.fireChannelInactive()
        }
    }

    /// One call's response: its grpc-status, from the trailers (or a trailers-only answer).
    final class CallHandler: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame.FramePayload
        let answer: EventLoopPromise<String>
        var status: String?
        var done = false

        init(_ answer: EventLoopPromise<String>) { self.answer = answer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .headers(let h) = unwrapInboundIn(data) else { return }
            if let s = h.headers.first(name: "grpc-status") { status = s }
            if h.endStream && !done {
                done = true
                answer.succeed(status ?? "no grpc-status")
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            if !done {
                done = true
                answer.fail(ChannelError.ioOnClosedChannel)
            }
            context.fireChannelInactive()
        }
    }
}

/// An h2c gRPC-shaped upstream that can quiesce like a server shutting down gracefully: GOAWAY
/// (last stream id = max, NO_ERROR) on every connection, which stays open for running streams.
/// Counts calls per connection. Loop-confined state; the test thread reaches it by `submit`.
final class QuiescingUpstream: @unchecked Sendable {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let loop: any EventLoop
    private var server: (any Channel)?
    private var connections: [any Channel] = []
    private var served: [Int] = []
    private var heldStream: (any Channel)?
    private var pingAcked: EventLoopPromise<Void>?
    /// Completed once a call to `/t.T/Hold` has arrived.
    let holdArrived: EventLoopPromise<Void>

    init() throws {
        loop = group.next()
        holdArrived = loop.makePromise()
        server = try ServerBootstrap(group: loop).childChannelInitializer { [self] ch in
            ch.eventLoop.makeCompletedFuture {
                let index = connections.count
                connections.append(ch)
                served.append(0)
                _ = try ch.pipeline.syncOperations.configureHTTP2Pipeline(
                    mode: .server, connectionConfiguration: .init(), streamConfiguration: .init(),
                    inboundStreamInitializer: { stream in
                        stream.eventLoop.makeCompletedFuture {
                            try stream.pipeline.syncOperations.addHandler(Answer(self, connection: index))
                        }
                    })
                try ch.pipeline.syncOperations.addHandler(PingAcks(self))
            }
        }.bind(host: "127.0.0.1", port: 0).wait()
    }

    var endpoint: String { "127.0.0.1:\(server!.localAddress!.port!)" }

    func servedPerConnection() throws -> [Int] { try loop.submit { self.served }.wait() }

    /// GOAWAY on every connection, then a PING whose ack says the peer has read the GOAWAY
    /// (frames are handled in order).
    func goAwayAndSync() throws {
        try loop.flatSubmit { () -> EventLoopFuture<Void> in
            let acked = self.loop.makePromise(of: Void.self)
            self.pingAcked = acked
            for c in self.connections {
                c.write(
                    HTTP2Frame(
                        streamID: .rootStream,
                        payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil)),
                    promise: nil)
                c.writeAndFlush(
                    HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 42), ack: false)),
                    promise: nil)
            }
            return GoLikeClient.guarded(acked, "the PING after GOAWAY")
        }.wait()
    }

    func releaseHeld() {
        loop.execute {
            if let s = self.heldStream { Answer.respond(on: s) }
            self.heldStream = nil
        }
    }

    func stop() {
        try? server?.close().wait()
        try? group.syncShutdownGracefully()
    }

    final class PingAcks: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTP2Frame
        let upstream: QuiescingUpstream
        init(_ u: QuiescingUpstream) { upstream = u }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .ping(_, ack: true) = unwrapInboundIn(data).payload {
                upstream.pingAcked?.succeed(())
                upstream.pingAcked = nil
            }
        }
    }

    /// Answers a call once its request has ended: 200, an empty gRPC message, grpc-status 0.
    final class Answer: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTP2Frame.FramePayload
        let upstream: QuiescingUpstream
        let connection: Int
        var path = ""
        init(_ u: QuiescingUpstream, connection: Int) {
            upstream = u
            self.connection = connection
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let ended: Bool
            switch unwrapInboundIn(data) {
            case .headers(let h):
                path = h.headers.first(name: ":path") ?? ""
                ended = h.endStream
            case .data(let d): ended = d.endStream
            default: ended = false
            }
            guard ended else { return }
            upstream.served[connection] += 1
            if path == "/t.T/Hold" {
                upstream.heldStream = context.channel
                upstream.holdArrived.succeed(())
            } else {
                Self.respond(on: context.channel)
            }
        }

        static func respond(on stream: any Channel) {
            let head: HPACKHeaders = [":status": "200", "content-type": "application/grpc"]
            stream.write(HTTP2Frame.FramePayload.headers(.init(headers: head)), promise: nil)
            var body = stream.allocator.buffer(capacity: 5)
            body.writeBytes([0, 0, 0, 0, 0])
            stream.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(body))), promise: nil)
            stream.writeAndFlush(
                HTTP2Frame.FramePayload.headers(.init(headers: ["grpc-status": "0"], endStream: true)), promise: nil)
        }
    }
}
