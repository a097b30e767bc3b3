import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTPCompression
import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic

enum ProxySide: String, Sendable { case inbound, outbound }

/// What the proxy handlers share: the traffic brain, pools, metrics and sidecar-wide flags.
final class ProxyContext: Sendable {
    let brain: TrafficBrain
    let pools: UpstreamPools
    let metrics: SidecarMetrics
    let limits: SidecarLimits
    let service: String
    /// Read on every request: atomics, not locks.
    let draining = ManagedAtomic(false)
    let inFlight = ManagedAtomic(0)
    /// Open byte streams (upgrade tunnels, TCP-proxy connections): a drain waits for them too.
    let openTunnels = ManagedAtomic(0)

    /// Counts `channel` as an open tunnel until it closes.
    func trackTunnel(_ channel: any Channel) {
        openTunnels.wrappingIncrement(ordering: .relaxed)
        channel.closeFuture.whenComplete { [self] _ in openTunnels.wrappingDecrement(ordering: .relaxed) }
    }
    /// Resolves when the cluster's endpoints are known (first discovery load, or at once).
    let ensureCluster: @Sendable (String) -> EventLoopFuture<Void>?
    let accessLog: (@Sendable (String) -> Void)?
    let inboundTimeout: Nanos?
    /// The app speaks HTTP/2 (h2c/gRPC): inbound HTTP/2 streams go to it as HTTP/2.
    let appSpeaksH2: Bool
    /// Lua policies (per-loop VMs and per-route chains); nil in handler tests.
    let policies: SidecarPolicies?
    /// Inbound credentials (service identity, end-user JWT); nil in handler tests.
    let gate: InboundGate?
    /// Outbound tokens and proofs; nil without a join token.
    var identity: SidecarIdentity? { gate?.identity }

    init(
        brain: TrafficBrain, pools: UpstreamPools, metrics: SidecarMetrics, limits: SidecarLimits, service: String,
        inboundTimeout: Nanos?, appSpeaksH2: Bool = false, accessLog: (@Sendable (String) -> Void)?,
        policies: SidecarPolicies? = nil, gate: InboundGate? = nil,
        ensureCluster: @escaping @Sendable (String) -> EventLoopFuture<Void>?
    ) {
        self.policies = policies
        self.gate = gate
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

    var isDraining: Bool { draining.load(ordering: .relaxed) }

    /// The name of the cluster the inbound side forwards to (the local app).
    static let localCluster = "local"
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), lowercase.
private let hopByHopNames: [StaticString] = [
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect",
]
let hopByHopStrings = hopByHopNames.map { "\($0)" }
let hopByHop = Set(hopByHopStrings)

/// The index in `hopByHopNames` of the field name `b[from..<to]`, compared ASCII
/// case-insensitively without allocating (this runs for every header of every message).
func hopByHopIndex(_ b: UnsafeRawBufferPointer, _ from: Int, _ to: Int) -> Int? {
    // By length first: most names match none of the lengths.
    switch to - from {
    case 2: return lowerEquals(b, from, to, "te") ? 3 : nil
    case 6: return lowerEquals(b, from, to, "expect") ? 7 : nil
    case 7: return lowerEquals(b, from, to, "trailer") ? 4 : lowerEquals(b, from, to, "upgrade") ? 6 : nil
    case 10: return lowerEquals(b, from, to, "connection") ? 0 : lowerEquals(b, from, to, "keep-alive") ? 1 : nil
    case 16: return lowerEquals(b, from, to, "proxy-connection") ? 2 : nil
    case 17: return lowerEquals(b, from, to, "transfer-encoding") ? 5 : nil
    default: return nil
    }
}

private func hopByHopIndex(_ name: String) -> Int? {
    withBytes(name) { hopByHopIndex($0, 0, $0.count) }
}

func isHopByHop(_ name: String) -> Bool { hopByHopIndex(name) != nil }

extension HTTPHeaders {
    /// `remove(name:)` that costs a scan when the name is absent: NIO's rewrites the list
    /// (copying it when shared) whether or not anything matches.
    mutating func removeIfPresent(_ name: String) {
        if contains(name: name) { remove(name: name) }
    }
}

/// The fields a proxy sets on a request itself, as found among the request's own.
struct ProxySetFields {
    var traceparent = false
    var timeout = false
    var contentLength = false
}

/// Removes hop-by-hop fields in place (no copy when there are none) and, in the same pass,
/// notes which of the fields the proxy sets itself the request brought.
@discardableResult
func stripHopByHop(_ headers: inout HTTPHeaders) -> ProxySetFields {
    var present: UInt32 = 0
    var found = ProxySetFields()
    for (name, _) in headers {
        withBytes(name) { b in
            if let k = hopByHopIndex(b, 0, b.count) {
                present |= 1 << k
                return
            }
            switch b.count {
            case 11 where lowerEquals(b, 0, 11, "traceparent"): found.traceparent = true
            case 14 where lowerEquals(b, 0, 14, "content-length"): found.contentLength = true
            case 17 where lowerEquals(b, 0, 17, "tandem-timeout-ms"): found.timeout = true
            default: break
            }
        }
    }
    guard present != 0 else { return found }
    for (k, name) in hopByHopStrings.enumerated() where present & (1 << k) != 0 { headers.remove(name: name) }
    return found
}

/// One downstream HTTP/1.1 connection. Requests are handled one at a time, in order: parts of
/// requests a client pipelines behind the one being answered wait in `backlog` (bounded by
/// `maxPipelinedRequests` and `streamBodyAfterBytes` of bodies, then reading pauses). The handler keeps reading while a response is
/// pending — NIO's pipelining assistance stops reading for every request and starts again after
/// its response, two `epoll_ctl` calls per request on a keep-alive connection.
final class HTTPProxyHandler: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    let ctx: ProxyContext
    let side: ProxySide
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    private var bodyBytes = 0
    /// The exchange whose request body is still arriving (streamed upstream part by part).
    private var streaming: Exchange?
    private var exchange: Exchange?
    private(set) var context: ChannelHandlerContext?
    /// Before a request: the header-read deadline; between requests: the idle deadline.
    private var idleDeadline: Nanos = 0
    /// The connection's one timer: when it is armed for, and the task.
    private var wakeAt: Nanos?
    private var wakeTask: Scheduled<Void>?
    /// This loop's upstream pool (looked up once per connection).
    private(set) lazy var pool: UpstreamPool = ctx.pools.pool(for: context!.eventLoop)
    /// The cluster whose endpoints were last seen known (skips the discovery check).
    var knownCluster: String? {
        didSet { if knownCluster != oldValue { knownClusterSlot = nil } }
    }
    /// `knownCluster`'s slot in the traffic state once a request was admitted to it (slots are
    /// never reused: requests to it skip hashing its name).
    var knownClusterSlot: Int?
    /// The client's address as policies see it (`ip:port`), made once per connection.
    private var remoteText: String?
    func remoteAddressText(_ channel: any Channel) -> String {
        if let t = remoteText { return t }
        let t = channel.remoteAddress.map { "\($0.ipAddress ?? ""):\($0.port ?? 0)" } ?? ""
        remoteText = t
        return t
    }
    /// The metric series of this connection's last finished request: the next one with the
    /// same side, route, cluster and status counts without a lookup.
    private var lastSeries: SidecarMetrics.RequestSeries?
    func series(_ key: SidecarMetrics.RequestKey) -> SidecarMetrics.RequestSeries {
        if let s = lastSeries, s.key == key { return s }
        let s = ctx.metrics.series(key)
        lastSeries = s
        return s
    }
    /// The pipeline has a gzip compressor in front of this handler (see `compressor()`).
    var compresses = false

    /// The header by which an exchange asks the compressor to gzip one response; the
    /// compressor removes it, so it never leaves the sidecar.
    static let compressMarker = "tandem-compress"

    /// NIO's response compressor (gzip/deflate by the request's Accept-Encoding), told per
    /// response by the marker header whether the route wants that response compressed.
    /// A response it compresses loses the upstream's content-length here: a flush before the
    /// body arrives (the upstream sent its head alone) makes NIO's compressor send the head as
    /// it is, and the client would wait for bytes that never come. Without a length the encoder
    /// sends the body chunked; a response buffered whole gets its compressed length.
    static func compressor() -> HTTPResponseCompressor {
        HTTPResponseCompressor(responseCompressionPredicate: { head, acceptsCompression in
            guard head.headers.contains(name: compressMarker) else { return .doNotCompress }
            head.headers.remove(name: compressMarker)
            if acceptsCompression { head.headers.remove(name: "content-length") }
            return .compressIfPossible
        })
    }
    /// Sets up a downstream HTTP/1.1 connection's pipeline, ending in `proxy` (the sidecar's
    /// listeners and the handler tests use this one setup).
    /// NIO's request decoder (llhttp) with `.forwardBytes`: the bytes a client sends after an
    /// Upgrade request are kept for the tunnel (`tunnel`), not dropped. No pipelining
    /// assistance: this handler orders pipelined requests itself. Responses are encoded by the
    /// proxy itself (`HTTP1ResponseEncoder`, no response part crosses the pipeline) unless the
    /// listener compresses: NIO's compressor works on response parts, so then NIO's server
    /// pipeline (its encoder, paired with the decoder for HEAD answers) sits in between.
    /// No outbound header validation: every header written was parsed by a validating decoder
    /// (llhttp, HPACK, `HTTP1ResponseParser`) or is one of ours.
    static func configure(
        _ sync: ChannelPipeline.SynchronousOperations, proxy: HTTPProxyHandler, compress: Bool,
        decoderLimits: NIOHTTPDecoderLimitConfiguration
    ) throws {
        if compress {
            try sync.configureHTTPServerPipeline(
                withPipeliningAssistance: false, withServerUpgrade: (upgraders: [], completionHandler: { _ in }),
                withErrorHandling: false, withOutboundHeaderValidation: false, withEncoderConfiguration: .init(),
                withDecoderLimitConfiguration: decoderLimits)
            try sync.addHandler(compressor())
            proxy.compresses = true
        } else {
            try sync.addHandler(
                ByteToMessageHandler(
                    HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, limitConfiguration: decoderLimits)))
        }
        try sync.addHandler(proxy)
    }

    /// Encodes responses when no compressor sits in front (`configure`).
    private var encoder = HTTP1ResponseEncoder()
    /// The method of the request being answered (an answer to HEAD has no body).
    private var answering = HTTPMethod.GET

    /// Writes one part of a response to the client (flushing when asked).
    func out(_ part: HTTPServerResponsePart, flush: Bool = false, promise: EventLoopPromise<Void>? = nil) {
        guard let context else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        if compresses {
            context.write(wrapOutboundOut(part), promise: promise)
        } else {
            encode(part, context, promise: promise)
        }
        if flush { flushOut() }
    }

    /// An answer's head written from field bytes (the connection compresses nothing).
    func outHead<F: FieldBytes>(status: HTTPResponseStatus, fields: F, version: HTTPVersion, close: Bool) {
        guard let context else { return }
        precondition(!compresses, "a compressing connection's heads go through its compressor")
        releaseHeldHead(context)
        heldHead = encoder.head(
            status: status, fields: fields, version: version, close: close, method: answering,
            allocator: context.channel.allocator)
    }

    /// A flush from behind this handler sends a held head too.
    func flush(context: ChannelHandlerContext) {
        releaseHeldHead(context)
        context.flush()
    }

    /// Sends what was written so far (a held head included).
    func flushOut() {
        guard let context else { return }
        releaseHeldHead(context)
        context.flush()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if compresses {
            context.write(data, promise: promise)
        } else {
            encode(unwrapOutboundIn(data), context, promise: promise)
        }
    }

    private func encode(
        _ part: HTTPServerResponsePart, _ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?
    ) {
        switch part {
        case .head(let head):
            releaseHeldHead(context)
            let bytes = encoder.head(head, method: answering, allocator: context.channel.allocator)
            if promise == nil {
                heldHead = bytes
            } else {
                context.write(NIOAny(IOData.byteBuffer(bytes)), promise: promise)
            }
        case .body(let data):
            if encoder.suppressBody {
                promise?.succeed()
            } else if heldHead != nil, case .byteBuffer(let b) = data, b.readableBytes <= Self.coalescedBodyBytes {
                var h = heldHead.take()!
                HTTP1Writer.append(b, chunked: encoder.chunked, to: &h)
                context.write(NIOAny(IOData.byteBuffer(h)), promise: promise)
            } else {
                releaseHeldHead(context)
                HTTP1Writer.body(data, chunked: encoder.chunked, context, promise: promise)
            }
        case .end(let trailers):
            let last = encoder.end(trailers, allocator: context.channel.allocator)
            if var h = heldHead.take() {
                if var last { h.writeBuffer(&last) }
                context.write(NIOAny(IOData.byteBuffer(h)), promise: promise)
            } else {
                HTTP1Writer.end(last, context, promise: promise)
            }
        }
    }

    /// An encoded response head not written yet: a small body part that follows is copied
    /// behind it and both go out as one write (one trip through the pipeline and NIO's write
    /// queue instead of two, each costing more than the copy). Written before anything else
    /// and on a flush.
    private var heldHead: ByteBuffer?
    /// Body parts up to this size are copied behind a held head.
    static let coalescedBodyBytes = 16 * 1024

    private func releaseHeldHead(_ context: ChannelHandlerContext) {
        if let h = heldHead.take() { context.write(NIOAny(IOData.byteBuffer(h)), promise: nil) }
    }

    /// The policies this connection's last request ran under (`SidecarPolicies.lookup`).
    var policyCache: SidecarPolicies.ConnectionCache?

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
        idle(for: ctx.limits.headerReadTimeout)
    }

    /// The connection is idle (or awaits its first request head) for at most `t`.
    private func idle(for t: Nanos) {
        guard let loop = context?.eventLoop else { return }
        idleDeadline = Nanos(loop.now.uptimeNanoseconds) + t
        wake(at: idleDeadline)
    }

    /// Asks for a wake-up at `deadline`. One NIO timer per connection, only ever moved earlier;
    /// a wake-up finding nothing due re-arms for the next deadline. So a busy keep-alive
    /// connection schedules about one timer per timeout period, not two or three per request.
    func wake(at deadline: Nanos) {
        if let w = wakeAt, w <= deadline { return }
        guard let loop = context?.eventLoop else { return }
        wakeTask?.cancel()
        wakeAt = deadline
        // A strong capture (the task is cancelled when the connection goes): a weak one would
        // give the handler a side table, and every retain and release of it the slow path.
        wakeTask = loop.scheduleTask(deadline: .uptimeNanoseconds(UInt64(max(0, deadline)))) { self.wokeUp() }
    }

    private func wokeUp() {
        wakeAt = nil
        wakeTask = nil
        guard let loop = context?.eventLoop else { return }
        let now = Nanos(loop.now.uptimeNanoseconds)
        if let ex = exchange {
            ex.checkDeadlines(now: now)
            if let ex = exchange {
                if let d = ex.nextDeadline { wake(at: d) }
                return
            }
        }
        guard head == nil else { return }  // reading a request body: no idle timeout
        if now >= idleDeadline {
            context?.close(promise: nil)
        } else {
            wake(at: idleDeadline)
        }
    }

    /// What arrived for requests behind the one being answered, in order.
    private enum Pending {
        case part(HTTPServerRequestPart)
        case error(any Error)
    }
    private var backlog = CircularBuffer<Pending>()
    private var backlogRequests = 0
    /// Body bytes in the backlog: a request pipelined with a large body must not fill memory.
    private var backlogBytes = 0
    /// Reading stops while this many requests, or `streamBodyAfterBytes` of their bodies, wait.
    private var backlogFull: Bool {
        backlogRequests >= ctx.limits.maxPipelinedRequests || backlogBytes >= ctx.limits.streamBodyAfterBytes
    }
    /// A read the channel asked for while the backlog was full; issued when it has room.
    private var readHeld = false
    private var deliveringBacklog = false

    /// The current request has arrived whole and its answer is pending: what arrives now
    /// belongs to later requests.
    private var awaitingAnswer: Bool { exchange != nil && streaming == nil }

    func read(context: ChannelHandlerContext) {
        if backlogFull {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        if awaitingAnswer || !backlog.isEmpty {
            backlog.append(.part(part))
            switch part {
            case .head: backlogRequests += 1
            case .body(let b): backlogBytes += b.readableBytes
            case .end: break
            }
            return
        }
        handle(part, context)
    }

    /// Hands the backlog's requests to the handler one by one, each once the one before it has
    /// been answered. Not re-entered: an answer given while delivering continues this loop.
    private func deliverBacklog() {
        guard !deliveringBacklog, let context else { return }
        deliveringBacklog = true
        defer { deliveringBacklog = false }
        while !awaitingAnswer, context.channel.isActive, let next = backlog.popFirst() {
            switch next {
            case .part(let part):
                switch part {
                case .head: backlogRequests -= 1
                case .body(let b): backlogBytes -= b.readableBytes
                case .end: break
                }
                handle(part, context)
            case .error(let e):
                failed(context, e)
            }
        }
        if readHeld, !backlogFull {
            readHeld = false
            context.read()
        }
    }

    private func handle(_ part: HTTPServerRequestPart, _ context: ChannelHandlerContext) {
        switch part {
        case .head(var h):
            answering = h.method
            let length = h.headers.first(name: "content-length").flatMap(Int.init)
            let tooLarge = ctx.limits.maxBodyBytes.map { max in length.map { $0 > max } ?? false } ?? false
            if h.headers["expect"].contains(where: { $0.lowercased() == "100-continue" }) {
                h.headers.remove(name: "expect")
                if tooLarge {
                    // The client waits before sending the body: refuse it now (RFC 9110 §10.1.1).
                    localAnswer(
                        context,
                        LocalAnswer(
                            .bodyTooLarge, message: "request body exceeds \(ctx.limits.maxBodyBytes ?? 0) bytes"),
                        keepAlive: false, request: h)
                    return
                }
                // We read the body ourselves (buffered or streamed), so we ask for it at once.
                out(.head(HTTPResponseHead(version: h.version, status: .continue)), flush: true)
            }
            head = h
            body = nil
            bodyBytes = 0
            bodyTooLarge = tooLarge  // without Expect, the body is read and dropped, then 413
            if !tooLarge, let length, length > ctx.limits.streamBodyAfterBytes {
                startStreaming(context)
            }
        case .body(var b):
            bodyBytes += b.readableBytes
            if let ex = streaming {
                if let max = ctx.limits.maxBodyBytes, bodyBytes > max {
                    ex.downstreamBodyTooLarge(max)
                } else {
                    ex.downstreamBody(b)
                }
                return
            }
            guard head != nil, !bodyTooLarge else { return }  // no request (an early answer) or over the cap
            if let max = ctx.limits.maxBodyBytes, bodyBytes > max {
                bodyTooLarge = true
                body = nil
                return
            }
            if body == nil { body = b } else { body!.writeBuffer(&b) }
            if bodyBytes > ctx.limits.streamBodyAfterBytes { startStreaming(context) }
        case .end:
            if let ex = streaming {
                streaming = nil
                ex.downstreamEnd()
                return
            }
            guard let h = head else { return }
            head = nil
            if bodyTooLarge {
                localAnswer(
                    context,
                    LocalAnswer(.bodyTooLarge, message: "request body exceeds \(ctx.limits.maxBodyBytes ?? 0) bytes"),
                    keepAlive: false, request: h)
                return
            }
            let ex = Exchange(handler: self, context: context, head: h, body: body, streaming: false)
            body = nil
            exchange = ex
            ex.start()
        }
    }

    /// The body is too large to hold: the exchange starts now with what arrived, and the rest
    /// streams upstream as it comes.
    private func startStreaming(_ context: ChannelHandlerContext) {
        guard let h = head else { return }
        head = nil
        let ex = Exchange(handler: self, context: context, head: h, body: body, streaming: true)
        body = nil
        exchange = ex
        streaming = ex
        ex.start()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.downstreamWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        wakeTask?.cancel()
        wakeTask = nil
        exchange?.downstreamClosed()
        exchange = nil
        streaming = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is HTTPParserError, awaitingAnswer || !backlog.isEmpty {
            // A later request is malformed: it is answered in its turn (the decoder has stopped).
            backlog.append(.error(error))
            return
        }
        failed(context, error)
    }

    private func failed(_ context: ChannelHandlerContext, _ error: any Error) {
        if let e = error as? HTTPParserError, exchange == nil {
            answering = .GET
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
            writeLocal(context, answer, headers: nil, version: .http1_1, keepAlive: false)
            return
        }
        context.close(promise: nil)
    }

    /// Writes a local answer (JSON body, `tandem-error`) and counts it.
    /// `headers`: the answer's head fields as a policy's on_response left them (default: its own).
    func localAnswer(
        _ context: ChannelHandlerContext, _ a: LocalAnswer, headers: HTTPHeaders? = nil, keepAlive: Bool,
        request: HTTPRequestHead
    ) {
        exchange = nil  // the request is over: the idle timer must see the connection as idle
        streaming = nil
        ctx.metrics.inc("tandem_local_answers_total", [("side", side.rawValue), ("reason", a.reason.rawValue)])
        writeLocal(context, a, headers: headers, version: request.version, keepAlive: keepAlive)
        if keepAlive {
            idle(for: ctx.limits.idleTimeout)
            deliverBacklog()
        }
    }

    /// Writes a policy's answer (tandem.respond/deny/redirect) and counts it.
    func policyAnswer(
        _ context: ChannelHandlerContext, _ d: PolicyDecision, keepAlive: Bool, request: HTTPRequestHead
    ) {
        exchange = nil
        streaming = nil
        ctx.metrics.inc("tandem_policy_answers_total", [("side", side.rawValue), ("decision", d.kind)])
        out(.head(d.responseHead(version: request.version, keepAlive: keepAlive)))
        if !d.body.isEmpty {
            var buf = context.channel.allocator.buffer(capacity: d.body.count)
            buf.writeBytes(d.body)
            out(.body(.byteBuffer(buf)))
        }
        endAnswer(keepAlive: keepAlive)
        if keepAlive {
            idle(for: ctx.limits.idleTimeout)
            deliverBacklog()
        }
    }

    /// Ends an answer of the handler's own; closes the connection once it is written unless
    /// the connection is kept.
    private func endAnswer(keepAlive: Bool) {
        guard !keepAlive, let context else { return out(.end(nil), flush: true) }
        let done = context.eventLoop.makePromise(of: Void.self)
        out(.end(nil), flush: true, promise: done)
        let channel = context.channel
        done.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }

    private func writeLocal(
        _ context: ChannelHandlerContext, _ a: LocalAnswer, headers edited: HTTPHeaders?, version: HTTPVersion,
        keepAlive: Bool
    ) {
        let body = a.jsonBody
        var headers = edited ?? a.jsonHeaders(bodyBytes: body.utf8.count)
        if !keepAlive { headers.add(name: "connection", value: "close") }
        let status = HTTPResponseStatus(statusCode: a.status)
        out(.head(HTTPResponseHead(version: version, status: status, headers: headers)))
        var buf = context.channel.allocator.buffer(capacity: body.utf8.count)
        buf.writeString(body)
        out(.body(.byteBuffer(buf)))
        endAnswer(keepAlive: keepAlive)
    }

    /// After a 101: the HTTP handlers leave this connection and bytes flow to and from `peer`
    /// (the upstream connection, already a tunnel). Bytes the decoder read past the request
    /// are forwarded, not lost.
    func tunnel(to peer: any Channel) throws {
        exchange = nil
        wakeTask?.cancel()
        wakeTask = nil
        guard let context else { return }
        let sync = context.pipeline.syncOperations
        // Inbound handlers after the decoder go first, so its leftover bytes reach the glue.
        for type in [HTTPServerPipelineHandler.self, HTTPServerUpgradeHandler.self, HTTPResponseCompressor.self]
            as [any ChannelHandler.Type]
        {
            if let c = try? Self.context(sync, type) { sync.removeHandler(context: c, promise: nil) }
        }
        sync.removeHandler(context: context, promise: nil)
        try sync.addHandler(TCPGlue(partner: peer))
        // The decoder leaves on a later loop tick, handing its leftover bytes to the glue
        // outside a read burst: flush them when it is gone.
        let removed = context.eventLoop.makePromise(of: Void.self)
        removed.futureResult.whenComplete { _ in peer.flush() }
        sync.removeHandler(
            context: try sync.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self), promise: removed)
        if let c = try? sync.context(handlerType: NIOHTTPResponseHeadersValidator.self) {
            sync.removeHandler(context: c, promise: nil)
        }
        if let c = try? sync.context(handlerType: HTTPResponseEncoder.self) {
            sync.removeHandler(context: c, promise: nil)
        }
    }

    private static func context(
        _ sync: ChannelPipeline.SynchronousOperations, _ type: any ChannelHandler.Type
    ) throws -> ChannelHandlerContext {
        func open<H: ChannelHandler>(_ t: H.Type) throws -> ChannelHandlerContext { try sync.context(handlerType: t) }
        return try open(type)
    }

    /// Called by the exchange when the response has been written completely.
    func exchangeDone(keepAlive: Bool) {
        exchange = nil
        streaming = nil
        served += 1
        guard let context else { return }
        if !keepAlive {
            context.close(promise: nil)
        } else {
            idle(for: ctx.limits.idleTimeout)
            deliverBacklog()
        }
    }
}

extension LocalAnswer {
    /// `tandem-error` and the answer's own headers (sorted, so the bytes are stable): what every
    /// local answer carries, in its head (JSON) or its trailers (gRPC).
    func addMarks(to headers: inout HTTPHeaders) {
        headers.add(name: "tandem-error", value: errorCode)
        for (name, value) in self.headers.sorted(by: { $0.key < $1.key }) { headers.add(name: name, value: value) }
    }

    /// The head fields of a local answer with its JSON body, over HTTP/1.1 or HTTP/2.
    func jsonHeaders(bodyBytes: Int) -> HTTPHeaders {
        var h = HTTPHeaders()
        h.add(name: "content-type", value: "application/json")
        h.add(name: "content-length", value: String(bodyBytes))
        addMarks(to: &h)
        return h
    }

    /// A local answer's head fields after a policy edited them: the body is still the answer's
    /// own, so its framing is the sidecar's to say (a policy cannot make it lie about its length).
    static func framed(_ edited: HTTPHeaders, bodyBytes: Int) -> HTTPHeaders {
        var h = edited
        h.remove(name: "transfer-encoding")
        h.replaceOrAdd(name: "content-length", value: String(bodyBytes))
        return h
    }
}
