import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import TandemCore
import TandemHTTP2
import TandemLua
import TandemTraffic

/// Looks at a connection's first bytes: the HTTP/2 prior-knowledge preface selects h2c (gRPC),
/// anything else HTTP/1.1. Then it configures the pipeline and removes itself.
final class ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    private var buffered: ByteBuffer?
    private let http1: @Sendable (any Channel) -> EventLoopFuture<Void>
    private let http2: @Sendable (any Channel) -> EventLoopFuture<Void>

    init(
        http1: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>,
        http2: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) {
        self.http1 = http1
        self.http2 = http2
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        if buffered == nil { buffered = b } else { buffered!.writeBuffer(&b) }
        let bytes = buffered!.readableBytesView
        let n = min(bytes.count, Self.preface.count)
        let isH2Prefix = bytes.prefix(n).elementsEqual(Self.preface.prefix(n))
        if isH2Prefix && n < Self.preface.count { return }  // need more bytes to decide
        let configure = isH2Prefix ? http2 : http1
        let data = buffered!
        buffered = nil
        let channel = context.channel
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        configure(channel).whenComplete { result in
            switch result {
            case .success:
                bound.value.fireChannelRead(NIOAny(data))
                bound.value.pipeline.syncOperations.removeHandler(context: bound.value, promise: nil)
            case .failure:
                channel.close(promise: nil)
            }
        }
    }
}

/// One downstream HTTP/2 stream (through NIO's HTTP/2 → HTTP/1 codec, so trailers arrive as
/// `.end(trailers)`). Bodies stream in both directions; nothing is buffered beyond a bound.
final class H2ProxyHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let ctx: ProxyContext
    let side: ProxySide
    let pools: H2Pools
    private var exchange: StreamExchange?
    private var traceRNG = Trace.seeded()

    func newTraceparent() -> String { Trace.newTraceparent(&traceRNG) }

    let fixedCluster: String?

    init(ctx: ProxyContext, side: ProxySide, pools: H2Pools, fixedCluster: String? = nil) {
        self.ctx = ctx
        self.side = side
        self.pools = pools
        self.fixedCluster = fixedCluster
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            let ex = StreamExchange(handler: self, context: context, head: h)
            exchange = ex
            ex.start()
        case .body(let b):
            exchange?.downstreamBody(b)
        case .end(let t):
            exchange?.downstreamEnd(t)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        exchange?.downstreamClosed()
        exchange = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        exchange?.downstreamClosed()
        context.close(promise: nil)
    }
}

/// A streaming request/response through the proxy over HTTP/2 (gRPC's four modes): the
/// request head goes upstream as soon as an endpoint is chosen, body frames and trailers
/// follow as they arrive, and the response streams back with its trailers. Only failures
/// before the upstream stream exists (connect failures) are retried: a streamed body
/// cannot be replayed.
final class StreamExchange: UpstreamDelegate, @unchecked Sendable {
    unowned let handler: H2ProxyHandler
    let context: ChannelHandlerContext
    let ctx: ProxyContext
    var head: HTTPRequestHead
    let startedAt: Nanos
    private var route: Route?
    private var cluster = ""
    /// The cluster's slot in the traffic state once admitted (no hash of its name per call).
    private var clusterSlot: Int?
    private var endpoint: Endpoint?
    /// Attempts and their retry decisions (TandemTraffic). Created with an empty body: before
    /// the upstream stream opens nothing has been sent, and what waits in `pending` is bounded.
    private var retry: RetryState?
    private var tried: [String] { retry?.tried ?? [] }
    private var admitted = false
    private var upstream: (any Channel)?
    /// Set when the upstream hop is HTTP/1.1 (an HTTP/1.1 app behind the inbound side).
    private var http1: UpstreamConnection?
    /// Request parts received before the upstream stream is open (bounded).
    private var pending: [HTTPClientRequestPart] = []
    private var pendingBytes = 0
    private var requestEnded = false
    /// on_request waits for the request's end (a `request_body` policy).
    private var awaitingBody = false
    private var responded = false
    private var finished = false
    private var status = 0
    private var grpcStatus: Int?
    private var tandemError: String?
    private var timer: Scheduled<Void>?
    private var attemptStart: Nanos = 0
    /// The request's run through its route's Lua policies (nil without any).
    private var policy: PolicyRun?
    /// Outbound: this route attaches a proof of possession.
    private var proof = false
    private var host = ""

    init(handler: H2ProxyHandler, context: ChannelHandlerContext, head: HTTPRequestHead) {
        self.handler = handler
        self.context = context
        self.ctx = handler.ctx
        self.head = head
        self.startedAt = nowNanos()
    }

    private var loop: any EventLoop { context.eventLoop }
    private var isGRPC: Bool { head.headers.first(name: "content-type")?.hasPrefix("application/grpc") == true }

    func start() {
        ctx.inFlight.wrappingIncrement(ordering: .relaxed)
        switch ProxyRouting.resolve(
            ctx: ctx, side: handler.side, head: &head, now: startedAt, fixedCluster: handler.fixedCluster,
            remote: { self.context.channel.parent?.remoteAddress?.ipAddress })
        {
        case .failure(let a):
            answer(a)
            return
        case .success(let r):
            route = r.route
            cluster = r.route.cluster
            head.uri = r.path
            proof = r.proof
            host = r.host
        }
        if handler.side == .inbound, let gate = ctx.gate {
            // HTTP/2 bodies stream: a proof cannot cover them.
            let c = gate.check(head: &head, pathAndQuery: head.uri, body: nil, bodyStreams: true, loop: loop)
            InboundGate.settle(c, refuse: { self.answer($0) }, proceed: { self.proceed($0) })
        } else {
            proceed(InboundWho())
        }
    }

    /// After the inbound checks: policies, then the cluster and (outbound, with identity) a token.
    private func proceed(_ who: InboundWho) {
        guard !finished, let r = route else { return }
        if let refused = ProxyRouting.limitByCaller(ctx: ctx, route: r, caller: who.caller, now: nowNanos()) {
            return answer(refused)
        }
        for (name, value) in who.headers { head.headers.replaceOrAdd(name: name, value: value) }
        if ctx.policies?.isActive == true {
            let peer = context.channel.parent?.remoteAddress
            var cache: SidecarPolicies.ConnectionCache?
            policy = PolicyRun.start(
                ctx: ctx, loop: loop, route: r, side: handler.side, head: head, path: head.uri, host: host,
                remote: peer.map { "\($0.ipAddress ?? ""):\($0.port ?? 0)" } ?? "", cache: &cache)
        }
        if let p = policy {
            p.ex.caller = who.caller
            if let claims = who.claims { p.ex.claims = claims.mapValues(LuaValue.init) }
            if p.wantsRequestBody && !requestEnded && pendingBytes <= ctx.limits.streamBodyAfterBytes {
                // A policy reads the body: on_request runs once the request ends (or passes
                // the bound, then without it). Nothing goes upstream before.
                awaitingBody = true
                return
            }
        }
        runPolicies()
    }

    /// The request body held for `request_body` policies, or nil (it streams past the bound).
    private var heldBody: [UInt8]? {
        guard requestEnded, pendingBytes <= ctx.limits.streamBodyAfterBytes else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(pendingBytes)
        for case .body(.byteBuffer(let b)) in pending { out += b.readableBytesView }
        return out
    }

    /// on_request of the route's policies, then the cluster and the attempt.
    private func runPolicies() {
        guard !finished else { return }
        if let p = policy {
            if p.wantsRequestBody { p.ex.body = heldBody }
            var path = head.uri
            switch p.begin(head: &head, path: &path, route: &route, cluster: &cluster) {
            case .answer(let d): return answerWithPolicy(d)
            case .failed(let a): return answer(a)
            case .proceed: break
            }
        }
        ProxyRouting.whenReady(ctx: ctx, side: handler.side, cluster: cluster, loop: loop) { refused in
            if let refused { return self.answer(refused) }
            self.admit()
        }
    }

    /// Runs `body` on this exchange's cluster state (by slot once admitted).
    private func withCluster<T>(_ body: (inout ClusterState, inout SeededRandom) -> T) -> T {
        if let clusterSlot { return ctx.brain.withCluster(slot: clusterSlot, body) }
        return ctx.brain.withCluster(cluster, body)
    }

    private func admit() {
        guard !finished, let route else { return }
        let now = nowNanos()
        if let refused = ProxyRouting.admit(ctx: ctx, cluster: cluster, slot: &clusterSlot, now: now) {
            answer(refused)
            return
        }
        admitted = true
        retry = RetryState(
            policy: route.retry, method: head.method.rawValue, bodyBytes: 0, start: startedAt, timeout: nil)
        // gRPC carries its own deadline (grpc-timeout, passed through); a long-lived stream
        // must not be cut by the default route timeout, so only an explicit one applies.
        let timeout: Nanos? = isGRPC ? nil : route.timeout
        if let timeout {
            timer = loop.scheduleTask(in: .nanoseconds(timeout)) { [weak self] in self?.timedOut() }
        }
        attempt()
    }

    private func attempt() {
        guard !finished else { return }
        let now = nowNanos()
        let avoid = tried
        let subset = route?.subset ?? [:]
        guard
            let ep = withCluster({ c, rng in c.choose(now: now, avoid: avoid, subset: subset, rng: &rng) })
        else {
            answer(
                LocalAnswer(
                    .noHealthyEndpoint,
                    message: "no healthy endpoint for \"\(cluster)\"\(ProxyRouting.describe(subset))"))
            return
        }
        endpoint = ep
        retry?.attemptStarted(endpoint: ep.id)
        attemptStart = now
        withCluster { c, _ in c.attemptStarted(ep) }
        ctx.metrics.inc("tandem_upstream_attempts_total", [("side", handler.side.rawValue), ("cluster", cluster)])
        let connectTimeout = withCluster { c, _ in c.config.connectTimeout }
        if handler.side == .inbound && !ctx.appSpeaksH2 {
            // An HTTP/1.1 app: the stream continues over a pooled HTTP/1.1 connection.
            let pool = ctx.pools.pool(for: loop)
            pool.acquire(
                host: ep.host, port: ep.port, cluster: cluster, connectTimeout: .nanoseconds(connectTimeout),
                brain: ctx.brain
            ).whenComplete { r in
                switch r {
                case .success(let c):
                    guard !self.finished else {
                        pool.release(c)
                        return
                    }
                    self.http1 = c
                    c.handler.delegate = self
                    self.upstreamOpened(c.channel)
                case .failure(let e): self.openFailed(e, ep)
                }
            }
            return
        }
        handler.pools.pool(for: loop).openStream(
            host: ep.host, port: ep.port, connectTimeout: .nanoseconds(connectTimeout), exchange: self,
            cluster: cluster, brain: ctx.brain, slots: ctx.pools.slots
        )
        .whenComplete { r in
            switch r {
            case .success(let stream): self.upstreamOpened(stream)
            case .failure(let e): self.openFailed(e, ep)
            }
        }
    }

    /// No connection slot (the cluster has max_connections open) is an overflow, answered at
    /// once — not a connect failure the endpoint would be blamed for.
    private func openFailed(_ error: any Error, _ ep: Endpoint) {
        guard error is UpstreamPool.NoConnectionSlot else { return connectFailed(ep) }
        guard !finished else { return }
        answer(LocalAnswer(.overflow, message: "\"\(cluster)\" has max_connections open"))
    }

    private func connectFailed(_ ep: Endpoint) {
        guard !finished, var retry else { return }
        let now = nowNanos()
        let latency = now - attemptStart
        let next = withCluster { c, rng in
            c.afterAttempt(ep, .connectFailure, latency: latency, now: now, retry: &retry, rng: &rng)
        }
        self.retry = retry
        switch next {
        case .retry(let after):
            ctx.metrics.inc("tandem_retries_total", [("side", handler.side.rawValue), ("cluster", cluster)])
            loop.scheduleTask(in: .nanoseconds(after)) { [weak self] in self?.attempt() }
        case .giveUp(let reason):
            if reason == .retryBudgetExhausted {
                ctx.metrics.inc("tandem_retry_budget_exhausted_total", [("cluster", cluster)])
            }
            answer(LocalAnswer(reason, message: "\(reason.defaultMessage) (\"\(cluster)\": connect failure)"))
        case .finish:
            answer(
                LocalAnswer(.upstreamConnectFailure, message: "could not connect to \"\(cluster)\" at \(ep.address)"))
        }
    }

    private func upstreamOpened(_ stream: any Channel) {
        guard !finished else {
            stream.close(promise: nil)
            return
        }
        upstream = stream
        var h = HTTPRequestHead(version: .http1_1, method: head.method, uri: head.uri)
        for (name, value) in head.headers {
            let lower = name.lowercased()
            if lower == "te" && value.lowercased() == "trailers" {
                h.headers.add(name: name, value: value)  // gRPC needs it end to end
            } else if !hopByHop.contains(lower) {
                h.headers.add(name: name, value: value)
            }
        }
        if h.headers["traceparent"].isEmpty { h.headers.add(name: "traceparent", value: handler.newTraceparent()) }
        if handler.side == .outbound, let id = ctx.identity {
            id.attach(
                to: &h.headers, audience: cluster, routeProof: proof, method: h.method.rawValue,
                authority: h.headers.first(name: "host") ?? cluster, pathAndQuery: h.uri, body: nil,
                callee: endpoint)
        }
        if http1 != nil {
            h.headers.removeIfPresent("te")
            if h.headers["content-length"].isEmpty { h.headers.add(name: "transfer-encoding", value: "chunked") }
        }
        // Taken out before writing: a refused stream (below) puts them back for the retry.
        let sent = pending
        pending = []
        pendingBytes = 0
        if http1 == nil {
            // NIOHTTP2 refuses a stream's first frame when the connection is going away
            // (GOAWAY read after the stream was made): the write fails, nothing closes the
            // stream, and the call would wait forever. Nothing reached the upstream: retry.
            let written = stream.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenFailure { [weak self] _ in self?.streamRefused(stream, unsent: sent) }
            stream.write(HTTPClientRequestPart.head(h), promise: written)
        } else {
            stream.write(HTTPClientRequestPart.head(h), promise: nil)
        }
        for part in sent { stream.write(part, promise: nil) }
        stream.flush()
    }

    // MARK: downstream → upstream

    func downstreamBody(_ b: ByteBuffer) {
        guard !finished else { return }
        if let up = upstream {
            up.writeAndFlush(HTTPClientRequestPart.body(.byteBuffer(b)), promise: nil)
        } else {
            pendingBytes += b.readableBytes
            if pendingBytes > ctx.limits.maxBufferedBodyBytes {
                answer(
                    LocalAnswer(
                        .bodyTooLarge,
                        message:
                            "request body exceeds \(ctx.limits.maxBufferedBodyBytes) bytes before the upstream answered"
                    ))
                return
            }
            pending.append(.body(.byteBuffer(b)))
            if awaitingBody && pendingBytes > ctx.limits.streamBodyAfterBytes {
                awaitingBody = false
                runPolicies()
            }
        }
    }

    func downstreamEnd(_ trailers: HTTPHeaders?) {
        guard !finished else { return }
        requestEnded = true
        if let up = upstream {
            up.writeAndFlush(HTTPClientRequestPart.end(trailers), promise: nil)
        } else {
            pending.append(.end(trailers))
            if awaitingBody {
                awaitingBody = false
                runPolicies()
            }
        }
    }

    // MARK: upstream → downstream

    /// A gRPC trailers-only response's metadata, re-sent downstream as trailers.
    private var trailersOnly: HTTPHeaders?

    /// An HTTP/1.1 upstream's head.
    func upstreamHead(_ upstream: UpstreamHead) { upstreamHead(upstream.head) }

    func upstreamHead(_ h: HTTPResponseHead) {
        guard !finished else { return }
        responded = true
        status = Int(h.status.code)
        var out = HTTPResponseHead(version: head.version, status: h.status)
        if let g = h.headers.first(name: "grpc-status").flatMap(Int.init) {
            // Trailers-only (an error with no messages): NIO's HTTP/1-style codec would send it
            // as HEADERS + an empty DATA frame, which gRPC clients reject; send headers, then
            // the status and metadata as trailers.
            grpcStatus = g
            var t = HTTPHeaders()
            for (name, value) in h.headers where !isHopByHop(name) {
                switch name.lowercased() {
                case "content-type": out.headers.add(name: name, value: value)
                case "content-length": break
                default: t.add(name: name, value: value)
                }
            }
            trailersOnly = t
        } else {
            for (name, value) in h.headers where !isHopByHop(name) {
                out.headers.add(name: name, value: value)
            }
        }
        if let p = policy,
            let d = p.response(
                status: status, reason: nil, headers: &out.headers, body: nil, endpoint: endpoint,
                attempts: tried.count, durationMs: Double(nowNanos() - startedAt) / 1e6)
        {
            // The upstream's answer is replaced: its stream is reset, the decision goes out. The
            // attempt itself ended with the upstream's status.
            if let ep = endpoint {
                let now = nowNanos()
                let outcome = AttemptOutcome.response(status: status, grpcStatus: grpcStatus)
                withCluster { c, _ in
                    c.attemptFinished(ep, outcome, latency: now - attemptStart, now: now)
                }
            }
            responded = false
            trailersOnly = nil
            let upstreamFailed = grpcStatus.map { [4, 8, 13, 14].contains($0) } ?? (status >= 500)
            grpcStatus = nil
            answerWithPolicy(d, upstreamFailed: upstreamFailed)
            return
        }
        context.writeAndFlush(handler.wrapOutboundOut(.head(out)), promise: nil)
    }

    /// Answers with a policy's decision: for a gRPC call as a gRPC status (trailers-only form),
    /// otherwise as the decision's HTTP answer.
    /// `upstreamFailed`: the replaced answer was a failure, which the breaker still counts
    /// (see the HTTP/1.1 exchange).
    private func answerWithPolicy(_ d: PolicyDecision, upstreamFailed: Bool = false) {
        guard !finished else { return }
        upstream?.close(promise: nil)
        upstream = nil
        status = d.status
        tandemError = d.tandemError
        ctx.metrics.inc("tandem_policy_answers_total", [("side", handler.side.rawValue), ("decision", d.kind)])
        if isGRPC {
            var h = HTTPHeaders()
            h.add(name: "content-type", value: "application/grpc")
            var t = HTTPHeaders()
            grpcStatus = d.grpcStatus
            t.add(name: "grpc-status", value: String(d.grpcStatus))
            if d.grpcStatus != 0 { t.add(name: "grpc-message", value: GRPCText.percentEncode(d.grpcMessage)) }
            if let e = d.tandemError { t.add(name: "tandem-error", value: e) }
            for (k, v) in d.headers
            where !isHopByHop(k)
                && !["grpc-status", "grpc-message", "content-type", "content-length"].contains(k.lowercased())
            {
                t.add(name: k, value: v)
            }
            complete(failed: upstreamFailed || d.kind == "error")
            context.write(
                handler.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: h))),
                promise: nil)
            context.writeAndFlush(handler.wrapOutboundOut(.end(t)), promise: nil)
            return
        }
        var out = d.responseHead(version: head.version, keepAlive: true)
        out.headers.removeIfPresent("connection")
        complete(failed: upstreamFailed || d.kind == "error")
        context.write(handler.wrapOutboundOut(.head(out)), promise: nil)
        if !d.body.isEmpty {
            context.write(handler.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: d.body)))), promise: nil)
        }
        context.writeAndFlush(handler.wrapOutboundOut(.end(nil)), promise: nil)
    }

    func upstreamBody(_ b: ByteBuffer) {
        guard !finished, responded else { return }
        context.writeAndFlush(handler.wrapOutboundOut(.body(.byteBuffer(b))), promise: nil)
    }

    func upstreamEnd(_ upstreamTrailers: HTTPHeaders?) {
        guard !finished else { return }
        let trailers = upstreamTrailers ?? trailersOnly
        if let g = trailers?.first(name: "grpc-status").flatMap(Int.init) { grpcStatus = g }
        upstream = nil
        if let c = http1 {
            http1 = nil
            ctx.pools.pool(for: loop).release(c)
        }
        defer {
            // Written after the bookkeeping: ending the stream closes it, and its close must
            // not be mistaken for the client going away.
            context.writeAndFlush(handler.wrapOutboundOut(.end(trailers)), promise: nil)
        }
        let failed: Bool
        if let g = grpcStatus { failed = [4, 8, 13, 14].contains(g) } else { failed = status >= 500 }
        if let ep = endpoint {
            let now = nowNanos()
            let outcome = AttemptOutcome.response(status: failed && status < 500 ? 503 : status, grpcStatus: grpcStatus)
            withCluster { c, _ in
                c.attemptFinished(ep, outcome, latency: now - attemptStart, now: now)
            }
        }
        complete(failed: failed)
    }

    func upstreamFailed(_ error: any Error) { upstreamFailed() }

    /// An upstream stream ended or failed before its response ended; ignored when it is no
    /// longer this exchange's (a refused stream, already retried).
    func upstreamFailed(stream: any Channel) {
        guard upstream === stream else { return }
        upstreamFailed()
    }

    /// The upstream stream's request head could not be sent: the stream never opened (as a
    /// REFUSED_STREAM), so the attempt fails like a connect failure and may be retried, with
    /// the request parts it was given (`unsent`) ahead of any that arrived since. Its
    /// connection is going away: the pool stops handing it out.
    private func streamRefused(_ stream: any Channel, unsent: [HTTPClientRequestPart]) {
        guard !finished, upstream === stream, let ep = endpoint else { return }
        upstream = nil
        handler.pools.pool(for: loop).goingAway(stream)
        stream.close(promise: nil)
        pending = unsent + pending
        pendingBytes = pending.reduce(0) { n, part in
            if case .body(.byteBuffer(let b)) = part { return n + b.readableBytes }
            return n
        }
        connectFailed(ep)
    }

    func upstreamFailed() {
        guard !finished else { return }
        upstream = nil
        http1 = nil
        if let ep = endpoint {
            let now = nowNanos()
            withCluster { c, _ in
                c.attemptFinished(ep, .reset, latency: now - attemptStart, now: now)
            }
        }
        if responded {
            tandemError = "upstream-reset"
            complete(failed: true)
            context.close(promise: nil)  // resets the downstream stream
        } else {
            answer(LocalAnswer(.upstreamReset, message: "upstream \"\(cluster)\" reset the stream before answering"))
        }
    }

    // MARK: endings

    private func timedOut() {
        guard !finished else { return }
        upstream?.close(promise: nil)
        upstream = nil
        if responded {
            tandemError = "timeout"
            complete(failed: true)
            context.close(promise: nil)
        } else {
            answer(LocalAnswer(.timeout, message: "upstream \"\(cluster)\" did not answer within the route timeout"))
        }
    }

    func downstreamClosed() {
        guard !finished else { return }
        upstream?.close(promise: nil)
        upstream = nil
        status = 499
        tandemError = "client-closed"
        complete(failed: false)
    }

    /// A local answer; for gRPC requests also as gRPC status in trailers-only form, so gRPC
    /// clients see UNAVAILABLE/DEADLINE_EXCEEDED/… with the message.
    private func answer(_ a: LocalAnswer) {
        guard !finished else { return }
        let body = a.jsonBody
        // What a policy's on_response sees and may edit: for gRPC the answer's marks (sent as
        // trailers), otherwise the JSON answer's head fields.
        var headers: HTTPHeaders
        if isGRPC {
            headers = HTTPHeaders()
            a.addMarks(to: &headers)
        } else {
            headers = a.jsonHeaders(bodyBytes: body.utf8.count)
        }
        if let p = policy, a.reason != .policyError {
            // on_response sees the sidecar's own answers too: a policy can serve a fallback, or
            // only edit the answer's headers (they go out as edited).
            if let d = p.response(
                status: a.status, reason: a.reason.rawValue, headers: &headers, body: Array(body.utf8),
                endpoint: endpoint, attempts: tried.count, durationMs: Double(nowNanos() - startedAt) / 1e6)
            {
                answerWithPolicy(d, upstreamFailed: a.status >= 500)
                return
            }
            if !isGRPC { headers = LocalAnswer.framed(headers, bodyBytes: body.utf8.count) }
        }
        upstream?.close(promise: nil)
        upstream = nil
        status = a.status
        tandemError = a.errorCode
        ctx.metrics.inc("tandem_local_answers_total", [("side", handler.side.rawValue), ("reason", a.reason.rawValue)])
        if isGRPC {
            var h = HTTPHeaders()
            h.add(name: "content-type", value: "application/grpc")
            headers.replaceOrAdd(name: "grpc-status", value: String(Self.grpcCode(a)))
            headers.replaceOrAdd(name: "grpc-message", value: GRPCText.percentEncode(a.message))
            complete(failed: a.status >= 500)
            context.write(
                handler.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: h))),
                promise: nil)
            context.writeAndFlush(handler.wrapOutboundOut(.end(headers)), promise: nil)
            return
        } else {
            context.write(
                handler.wrapOutboundOut(
                    .head(
                        HTTPResponseHead(version: head.version, status: .init(statusCode: a.status), headers: headers))),
                promise: nil)
            complete(failed: a.status >= 500)
            context.write(handler.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(handler.wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    /// gRPC status codes for local answers (grpc/doc/statuscodes.md; HTTP→gRPC mapping).
    static func grpcCode(_ a: LocalAnswer) -> Int {
        switch a.reason {
        case .timeout: return 4  // DEADLINE_EXCEEDED
        case .rateLimited, .overflow: return 8  // RESOURCE_EXHAUSTED
        case .unauthenticated: return 16
        case .forbidden, .policyDenied: return 7
        case .noRoute: return 12  // UNIMPLEMENTED
        case .badRequest, .headersTooLarge, .bodyTooLarge: return 3  // INVALID_ARGUMENT... body too large: 8 in gRPC
        case .policyError: return 13
        default: return 14  // UNAVAILABLE
        }
    }

    private func complete(failed: Bool) {
        guard !finished else { return }
        finished = true
        timer?.cancel()
        let now = nowNanos()
        let latency = now - startedAt
        if admitted {
            let retry = self.retry
            withCluster { c, _ in
                c.requestFinished(failed: failed, latency: latency, now: now, retry: retry)
            }
        }
        ctx.inFlight.wrappingDecrement(ordering: .relaxed)
        let routeName = route?.name ?? "none"
        var labels = [
            ("side", handler.side.rawValue), ("route", routeName), ("cluster", cluster), ("status", String(status)),
        ]
        if let g = grpcStatus { labels.append(("grpc_status", String(g))) }
        ctx.metrics.inc("tandem_requests_total", labels)
        ctx.metrics.observe(
            "tandem_request_duration_ms", [("side", handler.side.rawValue), ("route", routeName)],
            ms: Double(latency) / 1e6)
        if let p = policy {
            policy = nil
            p.log(
                status: status, reason: tandemError, endpoint: endpoint, attempts: tried.count,
                durationMs: Double(latency) / 1e6)
        }
        if let log = ctx.accessLog {
            var line =
                "{\"side\":\"\(handler.side.rawValue)\",\"protocol\":\"h2\",\"method\":\(JSON.quote(head.method.rawValue))"
            line +=
                ",\"path\":\(JSON.quote(head.uri)),\"route\":\(JSON.quote(routeName)),\"cluster\":\(JSON.quote(cluster))"
            line += ",\"endpoint\":\(JSON.quote(endpoint?.address ?? "")),\"status\":\(status)"
            line += ",\"grpc_status\":\(grpcStatus.map(String.init) ?? "null"),\"attempts\":\(tried.count)"
            line +=
                ",\"duration_ms\":\(Double(latency / 1000) / 1000),\"tandem_error\":\(tandemError.map(JSON.quote) ?? "null")}"
            log(line)
        }
    }
}

/// Receives one upstream stream's response parts (after NIO's HTTP/2 → HTTP/1 client codec).
final class H2UpstreamStreamHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    weak var exchange: StreamExchange?
    private var ended = false

    init(exchange: StreamExchange) { self.exchange = exchange }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            if h.status.code < 200 { return }
            exchange?.upstreamHead(h)
        case .body(let b): exchange?.upstreamBody(b)
        case .end(let t):
            ended = true
            exchange?.upstreamEnd(t)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !ended { exchange?.upstreamFailed(stream: context.channel) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !ended { exchange?.upstreamFailed(stream: context.channel) }
        ended = true
        context.close(promise: nil)
    }
}

/// HTTP/2 upstream connections of one event loop: one multiplexed connection per endpoint.
/// They close with their event loop group (Sidecar.shutdown).
final class H2Pool: @unchecked Sendable {
    let loop: any EventLoop
    private var connections:
        [String: (number: Int, mux: EventLoopFuture<NIOLoopBound<NIOHTTP2Handler.StreamMultiplexer>>)] =
            [:]
    private var opened = 0
    /// Open connections by channel: their key and number (to forget one going away).
    private var byChannel: [ObjectIdentifier: (key: String, number: Int)] = [:]

    init(loop: any EventLoop) { self.loop = loop }

    /// A stream to `host:port`, on its connection or a new one. A new connection takes one of
    /// `cluster`'s max_connections slots (Envoy counts HTTP/2 connections too), given back to
    /// `slots` when it closes or fails to open; without a free slot: `NoConnectionSlot`.
    func openStream(
        host: String, port: Int, connectTimeout: TimeAmount, exchange: StreamExchange, cluster: String,
        brain: TrafficBrain, slots: ConnectionSlots
    ) -> EventLoopFuture<any Channel> {
        loop.preconditionInEventLoop()
        let key = "\(host):\(port)"
        let conn: EventLoopFuture<NIOLoopBound<NIOHTTP2Handler.StreamMultiplexer>>
        if let c = connections[key] {
            conn = c.mux
        } else {
            guard brain.withCluster(cluster, { c, _ in c.gate.tryOpenConnection() }) else {
                return loop.makeFailedFuture(UpstreamPool.NoConnectionSlot())
            }
            let loop = self.loop
            opened += 1
            let number = opened
            // Forgets this connection (if it is still the one for `key`): a later stream
            // opens a new one. An old connection's close must not drop its successor.
            let forget: @Sendable () -> Void = {
                if self.connections[key]?.number == number { self.connections.removeValue(forKey: key) }
            }
            let connected = ClientBootstrap(group: loop)
                .connectTimeout(connectTimeout)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .connect(host: host, port: port)
            connected.whenFailure { _ in slots.closed(cluster) }
            conn = connected.flatMap { ch in
                let id = ObjectIdentifier(ch)
                self.byChannel[id] = (key, number)
                ch.closeFuture.whenComplete { _ in
                    forget()
                    self.byChannel[id] = nil
                    slots.closed(cluster)
                }
                // After GOAWAY (the upstream is shutting down gracefully, or refuses more
                // streams) the running streams finish here and new ones go to a new
                // connection. An upstream does not open streams to us (no server push).
                return HTTP2Connections.configure(ch, mode: .client, onGoAway: forget, inbound: { $0.close() }).map {
                    NIOLoopBound($0, eventLoop: loop)
                }
            }
            connections[key] = (number, conn)
            conn.whenFailure { _ in forget() }
        }
        return conn.flatMap { mux in
            let promise = self.loop.makePromise(of: (any Channel).self)
            // A stream that cannot be created (the connection is going away) never runs the
            // initializer: fail the attempt here, or the exchange would never be answered.
            let created = self.loop.makePromise(of: (any Channel).self)
            created.futureResult.whenFailure { promise.fail($0) }
            mux.value.createStreamChannel(promise: created) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(
                        HTTP2FramePayloadToHTTP1ClientCodec(httpProtocol: .http))
                    try stream.pipeline.syncOperations.addHandler(H2UpstreamStreamHandler(exchange: exchange))
                    promise.succeed(stream)
                }
            }
            return promise.futureResult
        }
    }
}

extension H2Pool {
    /// A stream of this connection was refused (the connection is going away, and its GOAWAY
    /// was not seen first): new streams go to a new connection.
    func goingAway(_ stream: any Channel) {
        loop.preconditionInEventLoop()
        guard let parent = stream.parent, let e = byChannel[ObjectIdentifier(parent)] else { return }
        if connections[e.key]?.number == e.number { connections.removeValue(forKey: e.key) }
    }
}

final class H2Pools: Sendable {
    private let pools = NIOLockedValueBox<[ObjectIdentifier: NIOLoopBound<H2Pool>]>([:])

    func pool(for loop: any EventLoop) -> H2Pool {
        let id = ObjectIdentifier(loop)
        return pools.withLockedValue { p -> NIOLoopBound<H2Pool> in
            if let b = p[id] { return b }
            let b = NIOLoopBound(H2Pool(loop: loop), eventLoop: loop)
            p[id] = b
            return b
        }.value
    }
}
