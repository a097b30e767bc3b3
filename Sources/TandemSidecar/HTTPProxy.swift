import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TandemCore
import TandemTraffic

enum ProxySide: String, Sendable { case inbound, outbound }

/// What the proxy handlers share: the traffic brain, pools, metrics and sidecar-wide flags.
final class ProxyContext: Sendable {
    let brain: TrafficBrain
    let pools: UpstreamPools
    let metrics: SidecarMetrics
    let limits: SidecarLimits
    let service: String
    let draining = NIOLockedValueBox(false)
    let inFlight = NIOLockedValueBox(0)
    /// Resolves when the cluster's endpoints are known (first discovery load, or at once).
    let ensureCluster: @Sendable (String) -> EventLoopFuture<Void>?
    let accessLog: (@Sendable (String) -> Void)?
    let inboundTimeout: Nanos?
    /// The app speaks HTTP/2 (h2c/gRPC): inbound HTTP/2 streams go to it as HTTP/2.
    let appSpeaksH2: Bool

    init(
        brain: TrafficBrain, pools: UpstreamPools, metrics: SidecarMetrics, limits: SidecarLimits, service: String,
        inboundTimeout: Nanos?, appSpeaksH2: Bool = false, accessLog: (@Sendable (String) -> Void)?,
        ensureCluster: @escaping @Sendable (String) -> EventLoopFuture<Void>?
    ) {
        self.brain = brain
        self.pools = pools
        self.metrics = metrics
        self.limits = limits
        self.service = service
        self.inboundTimeout = inboundTimeout
        self.appSpeaksH2 = appSpeaksH2
        self.accessLog = accessLog
        self.ensureCluster = ensureCluster
    }

    var isDraining: Bool { draining.withLockedValue { $0 } }

    /// The name of the cluster the inbound side forwards to (the local app).
    static let localCluster = "local"
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
let hopByHop: Set<String> = [
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect",
]

/// One downstream HTTP/1.1 connection. Requests are handled one at a time (NIO's pipelining
/// assistance holds later ones back until the current response ends).
final class HTTPProxyHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let ctx: ProxyContext
    let side: ProxySide
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    private var exchange: Exchange?
    private var timer: Scheduled<Void>?
    private(set) var context: ChannelHandlerContext?
    private var served = 0
    private var traceRNG = Trace.seeded()

    func newTraceparent() -> String { Trace.newTraceparent(&traceRNG) }

    /// Set on a local upstream port: every request goes to this cluster.
    let fixedCluster: String?

    init(ctx: ProxyContext, side: ProxySide, fixedCluster: String? = nil) {
        self.ctx = ctx
        self.side = side
        self.fixedCluster = fixedCluster
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        armTimer(context.eventLoop, ctx.limits.headerReadTimeout)
    }

    private func armTimer(_ loop: any EventLoop, _ t: TimeAmount) {
        timer?.cancel()
        timer = loop.scheduleTask(in: t) { [weak self] in
            guard let self, self.exchange == nil, self.head == nil else { return }
            self.context?.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(var h):
            timer?.cancel()
            if h.headers["expect"].contains(where: { $0.lowercased() == "100-continue" }) {
                // We buffer the body, so we ask for it ourselves.
                h.headers.remove(name: "expect")
                context.writeAndFlush(
                    wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .continue))), promise: nil)
            }
            head = h
            body = nil
            bodyTooLarge = false
            if let len = h.headers.first(name: "content-length").flatMap(Int.init), len > ctx.limits.maxBodyBytes {
                bodyTooLarge = true
            }
        case .body(var b):
            guard !bodyTooLarge else { return }
            if (body?.readableBytes ?? 0) + b.readableBytes > ctx.limits.maxBodyBytes {
                bodyTooLarge = true
                body = nil
                return
            }
            if body == nil { body = b } else { body!.writeBuffer(&b) }
        case .end:
            guard let h = head else { return }
            head = nil
            if bodyTooLarge {
                localAnswer(
                    context,
                    LocalAnswer(.bodyTooLarge, message: "request body exceeds \(ctx.limits.maxBodyBytes) bytes"),
                    keepAlive: false, request: h)
                return
            }
            let ex = Exchange(handler: self, context: context, head: h, body: body)
            body = nil
            exchange = ex
            ex.start()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.downstreamWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        exchange?.downstreamClosed()
        exchange = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let e = error as? HTTPParserError, exchange == nil {
            let answer: LocalAnswer
            switch e {
            case .headerOverflow:
                answer = LocalAnswer(
                    .headersTooLarge, message: "request header block exceeds \(ctx.limits.maxHeaderBytes) bytes")
            default:
                answer = LocalAnswer(.badRequest, message: "malformed HTTP request: \(e)")
            }
            ctx.metrics.inc(
                "tandem_local_answers_total", [("side", side.rawValue), ("reason", answer.reason.rawValue)])
            writeLocal(context, answer, version: .http1_1, keepAlive: false)
            return
        }
        context.close(promise: nil)
    }

    /// Writes a local answer (JSON body, `tandem-error`) and counts it.
    func localAnswer(_ context: ChannelHandlerContext, _ a: LocalAnswer, keepAlive: Bool, request: HTTPRequestHead) {
        exchange = nil  // the request is over: the idle timer must see the connection as idle
        ctx.metrics.inc("tandem_local_answers_total", [("side", side.rawValue), ("reason", a.reason.rawValue)])
        writeLocal(context, a, version: request.version, keepAlive: keepAlive)
        if keepAlive { armTimer(context.eventLoop, ctx.limits.idleTimeout) }
    }

    private func writeLocal(_ context: ChannelHandlerContext, _ a: LocalAnswer, version: HTTPVersion, keepAlive: Bool) {
        let body = a.jsonBody
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "application/json")
        headers.add(name: "content-length", value: String(body.utf8.count))
        headers.add(name: "tandem-error", value: a.reason.rawValue)
        if !keepAlive { headers.add(name: "connection", value: "close") }
        let status = HTTPResponseStatus(statusCode: a.status)
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
        var buf = context.channel.allocator.buffer(capacity: body.utf8.count)
        buf.writeString(body)
        context.write(wrapOutboundOut(.body(.byteBuffer(buf))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    /// Called by the exchange when the response has been written completely.
    func exchangeDone(keepAlive: Bool) {
        exchange = nil
        served += 1
        guard let context else { return }
        if !keepAlive {
            context.close(promise: nil)
        } else {
            armTimer(context.eventLoop, ctx.limits.idleTimeout)
        }
    }
}
