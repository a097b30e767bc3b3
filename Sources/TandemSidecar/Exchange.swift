import NIOCore
import NIOHTTP1
import TandemCore
import TandemTraffic

/// One request through the proxy: route, admit, pick an endpoint, send, retry, stream the
/// response back, and feed every outcome to the traffic cores. Confined to the downstream
/// connection's event loop.
/// Event-loop confined: every method runs on `context.eventLoop`.
final class Exchange: UpstreamDelegate, @unchecked Sendable {
    unowned let handler: HTTPProxyHandler
    let context: ChannelHandlerContext
    let ctx: ProxyContext
    let side: ProxySide
    var head: HTTPRequestHead
    let body: ByteBuffer?
    let startedAt: Nanos

    private var host = ""
    private var path = ""
    private var route: Route?
    private var cluster = ""
    private var retry: RetryState?
    private var admitted = false
    private var endpoint: Endpoint?
    private var attemptStart: Nanos = 0
    private var conn: UpstreamConnection?
    private var attemptTimer: Scheduled<Void>?
    private var overallTimer: Scheduled<Void>?
    private var staleRetried = false
    /// The response head went downstream; from here on, failures can only abort.
    private var responded = false
    private var finished = false
    private var status = 0
    private var tandemError: String?
    private var upstreamPaused = false

    init(handler: HTTPProxyHandler, context: ChannelHandlerContext, head: HTTPRequestHead, body: ByteBuffer?) {
        self.handler = handler
        self.context = context
        self.ctx = handler.ctx
        self.side = handler.side
        self.head = head
        self.body = body
        self.startedAt = nowNanos()
    }

    private var loop: any EventLoop { context.eventLoop }
    private var keepAlive: Bool { head.isKeepAlive && !ctx.isDraining }

    // MARK: start

    func start() {
        ctx.inFlight.withLockedValue { $0 += 1 }
        switch ProxyRouting.resolve(
            ctx: ctx, side: side, head: &head, now: startedAt, fixedCluster: handler.fixedCluster)
        {
        case .failure(let a):
            answer(a)
            return
        case .success(let r):
            route = r.route
            host = r.host
            path = r.path
            cluster = r.route.cluster
        }
        ProxyRouting.whenClusterKnown(ctx: ctx, cluster: cluster, loop: loop) { self.admit() }
    }

    private func admit() {
        guard !finished, let route else { return }
        let now = nowNanos()
        if let refused = ProxyRouting.admit(ctx: ctx, cluster: cluster, now: now) {
            answer(refused)
            return
        }
        admitted = true
        retry = RetryState(
            policy: route.retry, method: head.method.rawValue, bodyBytes: body?.readableBytes ?? 0, start: startedAt,
            timeout: route.timeout)
        if let deadline = retry?.deadline {
            overallTimer = loop.scheduleTask(in: .nanoseconds(max(0, deadline - now))) { [weak self] in
                self?.overallTimeout()
            }
        }
        attempt()
    }

    // MARK: attempts

    private func attempt() {
        guard !finished, var retry else { return }
        let now = nowNanos()
        let hashKey: String?
        if case .ringHash(let header) = ctx.brain.withCluster(cluster, { c, _ in c.config.balancer }) {
            hashKey = head.headers.first(name: header)
        } else {
            hashKey = nil
        }
        let tried = retry.tried
        guard
            let ep = ctx.brain.withCluster(
                cluster, { c, rng in c.choose(now: now, avoid: tried, hashKey: hashKey, rng: &rng) })
        else {
            let registered = ctx.brain.withCluster(cluster) { c, _ in c.endpoints.count }
            let why =
                registered == 0
                ? "no instance of \"\(cluster)\" is registered"
                : "no healthy endpoint for \"\(cluster)\" (\(registered) registered)"
            answer(LocalAnswer(.noHealthyEndpoint, message: why))
            return
        }
        retry.attemptStarted(endpoint: ep.id)
        self.retry = retry
        endpoint = ep
        attemptStart = now
        staleRetried = false
        ctx.brain.withCluster(cluster) { c, _ in c.attemptStarted(ep) }
        ctx.metrics.inc("tandem_upstream_attempts_total", [("side", side.rawValue), ("cluster", cluster)])
        if let t = retry.attemptTimeout(now: now) {
            attemptTimer = loop.scheduleTask(in: .nanoseconds(t)) { [weak self] in self?.attemptTimedOut() }
        }
        connectAndSend(ep)
    }

    private func connectAndSend(_ ep: Endpoint) {
        let connectTimeout = ctx.brain.withCluster(cluster) { c, _ in c.config.connectTimeout }
        let pool = ctx.pools.pool(for: loop)
        pool.acquire(host: ep.host, port: ep.port, connectTimeout: .nanoseconds(connectTimeout)).whenComplete { r in
            switch r {
            case .failure:
                self.attemptFailed(.connectFailure)
            case .success(let c):
                guard !self.finished, self.endpoint == ep else {
                    pool.release(c)
                    return
                }
                self.conn = c
                c.handler.delegate = self
                self.send(on: c)
            }
        }
    }

    private func send(on c: UpstreamConnection) {
        var h = HTTPRequestHead(version: .http1_1, method: head.method, uri: path)
        for (name, value) in head.headers where !hopByHop.contains(name.lowercased()) {
            h.headers.add(name: name, value: value)
        }
        if h.headers["traceparent"].isEmpty { h.headers.add(name: "traceparent", value: handler.newTraceparent()) }
        h.headers.remove(name: "content-length")
        let len = body?.readableBytes ?? 0
        if len > 0 || [.POST, .PUT, .PATCH].contains(head.method) {
            h.headers.add(name: "content-length", value: String(len))
        }
        if side == .outbound, let deadline = retry?.deadline {
            h.headers.replaceOrAdd(
                name: "tandem-timeout-ms", value: String(max(1, (deadline - nowNanos()) / 1_000_000)))
        }
        if let n = retry?.attempts, n > 1 { h.headers.replaceOrAdd(name: "tandem-attempt", value: String(n)) }
        c.channel.write(HTTPClientRequestPart.head(h), promise: nil)
        if let body, body.readableBytes > 0 {
            c.channel.write(HTTPClientRequestPart.body(.byteBuffer(body)), promise: nil)
        }
        c.channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
    }

    private func attemptTimedOut() {
        guard !finished, !responded else { return }
        if let c = conn {
            c.handler.delegate = nil
            c.handler.reusable = false
            c.channel.close(promise: nil)
            conn = nil
        }
        attemptFailed(.timeout)
    }

    private func overallTimeout() {
        guard !finished else { return }
        if responded {
            abort()  // the response started; all we can do is cut it
            return
        }
        if let c = conn {
            c.handler.delegate = nil
            c.channel.close(promise: nil)
            conn = nil
        }
        attemptTimer?.cancel()
        if let ep = endpoint {
            let now = nowNanos()
            let latency = now - attemptStart
            ctx.brain.withCluster(cluster) { c, _ in c.attemptFinished(ep, .timeout, latency: latency, now: now) }
        }
        answer(LocalAnswer(.timeout, message: "upstream \"\(cluster)\" did not answer within the route timeout"))
    }

    /// A failure before any response header: retry, or answer locally.
    private func attemptFailed(_ outcome: AttemptOutcome) {
        guard !finished else { return }
        attemptTimer?.cancel()
        let stale = conn.map { $0.uses > 0 } ?? false
        conn = nil
        guard let ep = endpoint else { return }
        // A pooled connection the upstream had closed: resend once on a fresh one, as HTTP
        // clients do for idempotent requests (RFC 9112 §9.3.1). Not an attempt, not a failure.
        if outcome == .reset, stale, !staleRetried, retry?.replayable == true {
            staleRetried = true
            connectAndSend(ep)
            return
        }
        decide(outcome, endpoint: ep)
    }

    private func decide(_ outcome: AttemptOutcome, endpoint ep: Endpoint) {
        guard var retry else { return }
        let now = nowNanos()
        let latency = now - attemptStart
        let next = ctx.brain.withCluster(cluster) { c, rng -> RetryState.Next in
            c.attemptFinished(ep, outcome, latency: latency, now: now)
            return retry.after(outcome, now: now, budget: &c.budget, rng: &rng)
        }
        self.retry = retry
        switch next {
        case .retry(let after):
            ctx.metrics.inc("tandem_retries_total", [("side", side.rawValue), ("cluster", cluster)])
            if let c = conn {
                // Discard the rest of this response: the connection cannot be reused.
                c.handler.delegate = nil
                c.handler.reusable = false
                c.channel.close(promise: nil)
                conn = nil
            }
            endpoint = nil
            if after > 0 {
                loop.scheduleTask(in: .nanoseconds(after)) { [weak self] in self?.attempt() }
            } else {
                attempt()
            }
        case .giveUp(let reason):
            if reason == .retryBudgetExhausted {
                ctx.metrics.inc("tandem_retry_budget_exhausted_total", [("cluster", cluster)])
            }
            answer(LocalAnswer(reason, message: "\(reason.defaultMessage) (\"\(cluster)\": \(describe(outcome)))"))
        case .finish:
            switch outcome {
            case .response: forwardPendingHead()
            case .connectFailure:
                answer(
                    LocalAnswer(
                        .upstreamConnectFailure, message: "could not connect to \"\(cluster)\" at \(ep.address)"))
            case .timeout:
                answer(
                    LocalAnswer(.timeout, message: "upstream \"\(cluster)\" did not answer within the per-try timeout"))
            case .reset, .refusedStream:
                answer(
                    LocalAnswer(
                        .upstreamReset, message: "upstream \"\(cluster)\" reset the connection before answering"))
            }
        }
    }

    private func describe(_ o: AttemptOutcome) -> String {
        switch o {
        case .response(let s, _): return "status \(s)"
        case .connectFailure: return "connect failure"
        case .reset: return "reset"
        case .refusedStream: return "refused stream"
        case .timeout: return "timeout"
        }
    }

    // MARK: upstream response

    private var pendingHead: HTTPResponseHead?

    func upstreamHead(_ h: HTTPResponseHead) {
        guard !finished, let ep = endpoint else { return }
        attemptTimer?.cancel()
        let grpc = h.headers.first(name: "grpc-status").flatMap(Int.init)
        pendingHead = h
        decide(.response(status: Int(h.status.code), grpcStatus: grpc), endpoint: ep)
    }

    private func forwardPendingHead() {
        guard let h = pendingHead else { return }
        pendingHead = nil
        responded = true
        status = Int(h.status.code)
        var out = HTTPResponseHead(version: head.version, status: h.status)
        for (name, value) in h.headers where !hopByHop.contains(name.lowercased()) {
            out.headers.add(name: name, value: value)
        }
        if !keepAlive { out.headers.add(name: "connection", value: "close") }
        context.write(handler.wrapOutboundOut(.head(out)), promise: nil)
    }

    func upstreamReadComplete() {
        if responded && !finished { context.flush() }
    }

    func upstreamBody(_ b: ByteBuffer) {
        guard !finished, responded else { return }
        context.write(handler.wrapOutboundOut(.body(.byteBuffer(b))), promise: nil)
        if !context.channel.isWritable, let c = conn, !upstreamPaused {
            upstreamPaused = true
            c.channel.setOption(.autoRead, value: false).whenFailure { _ in }
        }
    }

    func downstreamWritabilityChanged(_ writable: Bool) {
        if writable, upstreamPaused, let c = conn {
            upstreamPaused = false
            c.channel.setOption(.autoRead, value: true).whenFailure { _ in }
        }
    }

    func upstreamEnd(_ trailers: HTTPHeaders?) {
        guard !finished else { return }
        if !responded {
            // A retried attempt's response finishing: nothing to forward.
            return
        }
        if let c = conn {
            conn = nil
            if upstreamPaused { c.channel.setOption(.autoRead, value: true).whenFailure { _ in } }
            ctx.pools.pool(for: loop).release(c)
        }
        let done = context.writeAndFlush(handler.wrapOutboundOut(.end(trailers)))
        _ = done
        complete(failed: status >= 500)
    }

    func upstreamFailed(_ error: any Error) {
        guard !finished else { return }
        if responded {
            abort()
            return
        }
        attemptFailed(.reset)
    }

    // MARK: endings

    /// Answers locally (before any upstream response went out).
    private func answer(_ a: LocalAnswer) {
        guard !finished else { return }
        status = a.status
        tandemError = a.reason.rawValue
        let keep = keepAlive
        complete(failed: a.status >= 500, local: true)
        handler.localAnswer(context, a, keepAlive: keep, request: head)
    }

    /// The downstream client went away.
    func downstreamClosed() {
        guard !finished else { return }
        if let c = conn {
            c.handler.delegate = nil
            c.channel.close(promise: nil)
            conn = nil
        }
        status = 499
        tandemError = "client-closed"
        complete(failed: false, notifyHandler: false)
    }

    /// The response was cut midway (upstream broke after the head went out).
    private func abort() {
        if let c = conn {
            c.handler.delegate = nil
            c.channel.close(promise: nil)
            conn = nil
        }
        tandemError = "upstream-reset"
        complete(failed: true, notifyHandler: false)
        context.close(promise: nil)
    }

    private func complete(failed: Bool, local: Bool = false, notifyHandler: Bool = true) {
        guard !finished else { return }
        finished = true
        attemptTimer?.cancel()
        overallTimer?.cancel()
        let now = nowNanos()
        let latency = now - startedAt
        if admitted {
            ctx.brain.withCluster(cluster) { c, _ in c.requestFinished(failed: failed, latency: latency, now: now) }
        }
        ctx.inFlight.withLockedValue { $0 -= 1 }
        let routeName = route?.name ?? "none"
        ctx.metrics.inc(
            "tandem_requests_total",
            [("side", side.rawValue), ("route", routeName), ("cluster", cluster), ("status", String(status))])
        ctx.metrics.observe(
            "tandem_request_duration_ms", [("side", side.rawValue), ("route", routeName)], ms: Double(latency) / 1e6)
        if let log = ctx.accessLog {
            var line = "{\"side\":\"\(side.rawValue)\",\"method\":\(JSON.quote(head.method.rawValue))"
            line += ",\"host\":\(JSON.quote(host)),\"path\":\(JSON.quote(path)),\"route\":\(JSON.quote(routeName))"
            line += ",\"cluster\":\(JSON.quote(cluster)),\"endpoint\":\(JSON.quote(endpoint?.address ?? ""))"
            line += ",\"status\":\(status),\"attempts\":\(retry?.attempts ?? 0)"
            line += ",\"duration_ms\":\(Double(latency / 1000) / 1000)"
            line += ",\"tandem_error\":\(tandemError.map(JSON.quote) ?? "null")"
            line += ",\"traceparent\":\(JSON.quote(head.headers.first(name: "traceparent") ?? ""))}"
            log(line)
        }
        if notifyHandler && !local { handler.exchangeDone(keepAlive: keepAlive) }
    }
}

/// W3C trace context ids. Random, from a generator seeded once from the system per
/// connection (a getrandom call per id would cost three syscalls per request).
enum Trace {
    static func newTraceparent(_ g: inout SeededRandom) -> String {
        func hex(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: 16 - s.count) + s
        }
        return "00-\(hex(g.next() | 1))\(hex(g.next()))-\(hex(g.next() | 1))-01"
    }

    static func seeded() -> SeededRandom {
        var sys = SystemRandomNumberGenerator()
        return SeededRandom(seed: sys.next())
    }
}
