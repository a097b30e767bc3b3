import Atomics
import NIOCore
import NIOHTTP1
import TandemCore
import TandemIdentity
import TandemLua
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
    /// The cluster's slot in the traffic state once admitted (no hash of its name per call).
    private var clusterSlot: Int?
    private var retry: RetryState?
    /// `retry`'s deadline and attempts, kept beside it: reading them through the optional
    /// copies the whole state (its policy and tried list) each time.
    private var deadline: Nanos?
    private var attempts = 0
    private var admitted = false
    private var endpoint: Endpoint?
    private var attemptStart: Nanos = 0
    private var conn: UpstreamConnection?
    /// When the current attempt times out (before its response head). The connection's one
    /// timer wakes the exchange (`checkDeadlines`); no timer is scheduled per request.
    private var attemptDeadline: Nanos?
    /// Counts sends, so a connect finishing late for an abandoned send is recognised.
    private var sendSeq = 0
    private var staleRetried = false
    /// This attempt was sent again with the proof key the callee named (`stale-proof-key`).
    private var keyRefreshed = false
    /// The response head went downstream; from here on, failures can only abort.
    private var responded = false
    private var finished = false
    private var status = 0
    private var tandemError: String?
    private var upstreamPaused = false
    /// The request's run through its route's Lua policies (nil without any).
    private var policy: PolicyRun?
    /// Outbound: this route attaches a proof of possession.
    private var proof = false

    /// The request body streams: `body` is nil, parts arrive through `downstreamBody` and
    /// wait in `queued` until the head is on an upstream connection.
    let streaming: Bool
    private var queued: [ByteBuffer] = []
    private var queuedBytes = 0
    /// The whole request body has arrived (always, when buffered).
    private var bodyEnded: Bool
    /// The request head went out on the current upstream connection.
    private var headSent = false
    /// Downstream reading is paused until the upstream can take more.
    private var downstreamPaused = false

    init(
        handler: HTTPProxyHandler, context: ChannelHandlerContext, head: HTTPRequestHead, body: ByteBuffer?,
        streaming: Bool
    ) {
        self.handler = handler
        self.context = context
        self.ctx = handler.ctx
        self.side = handler.side
        self.head = head
        self.clientKeepAlive = head.isKeepAlive
        let wantsUpgrade = head.headers["connection"].contains { v in
            v.split(separator: ",").contains { $0.trimmingCharacters(in: .whitespaces).lowercased() == "upgrade" }
        }
        self.upgrade = wantsUpgrade ? head.headers.first(name: "upgrade") : nil
        self.streaming = streaming
        self.bodyEnded = !streaming
        if streaming {
            self.body = nil
            if let body {
                queued = [body]
                queuedBytes = body.readableBytes
            }
        } else {
            self.body = body
        }
        self.startedAt = Nanos(context.eventLoop.now.uptimeNanoseconds)
    }

    private var loop: any EventLoop { context.eventLoop }
    /// The loop's clock (virtual on an EmbeddedEventLoop, so handler tests control time).
    private func clock() -> Nanos { Nanos(context.eventLoop.now.uptimeNanoseconds) }
    /// Whether the client wants the connection kept (read before hop-by-hop fields go).
    private let clientKeepAlive: Bool
    /// The protocol the client asks to switch to (`Upgrade`, with `Connection: upgrade`).
    /// After such a request NIO's decoder stops parsing the connection, so unless the upstream
    /// answers 101 (and the connection becomes a tunnel) it closes after the response.
    private let upgrade: String?
    /// (A request whose body is still arriving when its answer ends leaves the connection
    /// unusable: the rest of the body would be read as the next request.)
    private var keepAlive: Bool {
        clientKeepAlive && upgrade == nil && bodyEnded && !ctx.isDraining && !closeDelimited
    }
    /// The answer goes to an HTTP/1.0 client without a length (1.0 has no chunks): only the
    /// connection's close can tell the client where it ends.
    private var closeDelimited = false

    // MARK: start

    func start() {
        ctx.inFlight.wrappingIncrement(ordering: .relaxed)
        switch ProxyRouting.resolve(
            ctx: ctx, side: side, head: &head, now: startedAt, fixedCluster: handler.fixedCluster,
            knownCluster: handler.knownCluster, remote: { self.context.channel.remoteAddress?.ipAddress })
        {
        case .failure(let a):
            answer(a)
            return
        case .success(let r):
            route = r.route
            host = r.host
            path = r.path
            cluster = r.route.cluster
            proof = r.proof
        }
        if side == .inbound, let gate = ctx.gate {
            let c = gate.check(head: &head, pathAndQuery: path, body: body, bodyStreams: streaming, loop: loop)
            InboundGate.settle(c, refuse: { self.answer($0) }, proceed: { self.proceed($0) })
        } else {
            proceed(InboundWho())
        }
    }

    /// After the inbound checks: policies, then the cluster and (outbound, with identity) a token.
    private func proceed(_ who: InboundWho) {
        guard !finished else { return }
        if let refused = ProxyRouting.limitByCaller(ctx: ctx, route: route, caller: who.caller, now: clock()) {
            return answer(refused)
        }
        for (name, value) in who.headers { head.headers.replaceOrAdd(name: name, value: value) }
        if let r = route, ctx.policies != nil {
            policy = PolicyRun.start(
                ctx: ctx, loop: loop, route: r, side: side, head: head, path: path, host: host,
                remote: handler.remoteAddressText(context.channel), cache: &handler.policyCache)
            if let p = policy {
                p.ex.caller = who.caller
                if let claims = who.claims { p.ex.claims = claims.mapValues(LuaValue.init) }
                if !streaming, let body { p.ex.body = Array(body.readableBytesView) }
                switch p.begin(head: &head, path: &path, route: &route, cluster: &cluster) {
                case .answer(let d): return answerWithPolicy(d)
                case .failed(let a): return answer(a)
                case .proceed: break
                }
            }
        }
        let needsToken = side == .outbound && ctx.identity.map { $0.token(for: cluster) == nil } == true
        if handler.knownCluster == cluster && !needsToken {
            clusterSlot = handler.knownClusterSlot
            admit()
        } else {
            let cluster = cluster
            ProxyRouting.whenReady(ctx: ctx, side: side, cluster: cluster, loop: loop) { refused in
                if let refused { return self.answer(refused) }
                self.handler.knownCluster = cluster
                self.admit()
            }
        }
    }

    // MARK: policies

    /// Answers with a policy's decision instead of (or in place of) the upstream.
    /// `upstreamFailed`: the answer it replaces was a failure (a 5xx, or the sidecar's own 5xx
    /// answer); the breaker counts it as one even when a fallback hides it from the client, or
    /// a fallback policy would keep the breaker from ever opening.
    private func answerWithPolicy(_ d: PolicyDecision, upstreamFailed: Bool = false) {
        guard !finished else { return }
        status = d.status
        tandemError = d.tandemError
        let keep = keepAlive
        complete(failed: upstreamFailed || d.kind == "error", local: true)
        handler.policyAnswer(context, d, keepAlive: keep, request: head)
    }

    // MARK: deadlines

    /// The earliest moment this exchange must be looked at again.
    var nextDeadline: Nanos? {
        guard !finished else { return nil }
        switch (responded ? nil : attemptDeadline, deadline) {
        case (let a?, let o?): return min(a, o)
        case (let a?, nil): return a
        case (nil, let o?): return o
        case (nil, nil): return nil
        }
    }

    /// Called by the connection's timer: fires whichever timeout is due.
    func checkDeadlines(now: Nanos) {
        guard !finished else { return }
        if let o = deadline, now >= o {
            overallTimeout()
        } else if !responded, let a = attemptDeadline, now >= a {
            attemptTimedOut()
        }
    }

    /// Runs `body` on this exchange's cluster state (by slot once admitted).
    private func withCluster<T>(_ body: (inout ClusterState, inout SeededRandom) -> T) -> T {
        if let clusterSlot { return ctx.brain.withCluster(slot: clusterSlot, body) }
        return ctx.brain.withCluster(cluster, body)
    }

    private func admit() {
        guard !finished, let route else { return }
        let now = clock()
        if let refused = ProxyRouting.admit(ctx: ctx, cluster: cluster, slot: &clusterSlot, now: now) {
            answer(refused)
            return
        }
        if handler.knownCluster == cluster { handler.knownClusterSlot = clusterSlot }
        admitted = true
        let retry = RetryState(
            policy: route.retry, method: head.method.rawValue, bodyBytes: streaming ? nil : body?.readableBytes ?? 0,
            start: startedAt,
            timeout: route.timeout)
        deadline = retry.deadline
        self.retry = retry
        if let deadline { handler.wake(at: deadline) }
        attempt()
    }

    // MARK: attempts

    private func attempt() {
        guard !finished, retry != nil else { return }
        let now = clock()
        let tried = retry!.tried
        let headers = head.headers
        let subset = route?.subset ?? [:]
        // One lock: the balancer's choice, its bookkeeping and the connect timeout.
        let (picked, registered, connectTimeout) = withCluster {
            c, rng -> (Endpoint?, Int, Nanos) in
            var hashKey: String?
            if case .ringHash(let header) = c.config.balancer { hashKey = headers.first(name: header) }
            guard let ep = c.choose(now: now, avoid: tried, hashKey: hashKey, subset: subset, rng: &rng) else {
                return (nil, c.endpoints.count, 0)
            }
            c.attemptStarted(ep)
            return (ep, c.endpoints.count, c.config.connectTimeout)
        }
        guard let ep = picked else {
            let why =
                registered == 0
                ? "no instance of \"\(cluster)\" is registered"
                : "no healthy endpoint for \"\(cluster)\"\(ProxyRouting.describe(subset)) (\(registered) registered)"
            answer(LocalAnswer(.noHealthyEndpoint, message: why))
            return
        }
        retry!.attemptStarted(endpoint: ep.id)  // in place: the tried list is not copied to grow
        attempts = retry!.attempts
        endpoint = ep
        attemptStart = now
        staleRetried = false
        keyRefreshed = false
        if let t = retry!.attemptTimeout(now: now) {
            attemptDeadline = now + t
            handler.wake(at: now + t)
        } else {
            attemptDeadline = nil
        }
        self.connectTimeout = connectTimeout
        connectAndSend(ep)
    }

    private var connectTimeout: Nanos = 0

    private func connectAndSend(_ ep: Endpoint) {
        let pool = handler.pool
        sendSeq += 1
        if let c = pool.takeIdle(host: ep.host, port: ep.port) {
            use(c)
            return
        }
        // A new connection needs one of the cluster's max_connections slots; without one the
        // request waits as pending (max_pending_requests), or overflows.
        let (opened, queued) = withCluster { c, _ -> (Bool, Bool) in
            c.gate.tryOpenConnection() ? (true, false) : (false, c.gate.tryStartPending())
        }
        guard opened else {
            guard queued else {
                answer(
                    LocalAnswer(
                        .overflow,
                        message: "\"\(cluster)\" has max_connections open and max_pending_requests waiting"))
                return
            }
            let slots = pool.slots
            pendingID = slots.wait(cluster, loop: loop) { [weak self] in self?.slotFreed() }
            ctx.pools.closeOneIdle(cluster: cluster)
            return
        }
        let seq = sendSeq
        pool.connect(
            host: ep.host, port: ep.port, cluster: cluster, connectTimeout: .nanoseconds(connectTimeout),
            slots: pool.slots
        ).whenComplete { r in
            guard !self.finished, self.sendSeq == seq else {
                if case .success(let c) = r { pool.release(c) }
                return
            }
            switch r {
            case .failure: self.attemptFailed(.connectFailure)
            case .success(let c): self.use(c)
            }
        }
    }

    /// Waiting for a connection slot (max_connections): the waiter's id.
    private var pendingID: UInt64?

    /// A connection of the cluster closed: try again (the slot may be taken by then: wait again).
    private func slotFreed() {
        guard pendingID != nil else { return }
        pendingID = nil
        withCluster { c, _ in c.gate.finishPending() }
        guard !finished, let ep = endpoint else { return }
        connectAndSend(ep)
    }

    /// Leaves the queue of requests waiting for a slot (timeout, client gone, answered).
    private func cancelPending() {
        guard let id = pendingID else { return }
        pendingID = nil
        if handler.pool.slots.cancel(cluster, id: id) {
            withCluster { c, _ in c.gate.finishPending() }
        }
    }

    private func use(_ c: UpstreamConnection) {
        conn = c
        c.handler.delegate = self
        send(on: c)
    }

    /// The request as it goes upstream, prepared once in place (no header copy per attempt):
    /// hop-by-hop fields removed, origin-form target, content-length set, traceparent added.
    private var prepared = false

    private func prepareHead() {
        prepared = true
        head.uri = path
        let found = stripHopByHop(&head.headers)
        if let upgrade {
            head.headers.add(name: "connection", value: "upgrade")
            head.headers.add(name: "upgrade", value: upgrade)
        }
        if !found.traceparent { madeTraceparent = handler.newTraceparent() }
        // Sent per attempt (AddedRequestFields): a caller's own value would go out twice.
        if side == .outbound, deadline != nil, found.timeout {
            head.headers.remove(name: "tandem-timeout-ms")
        }
        if streaming {
            // The client's content-length stands; without one the body goes chunked.
            if !found.contentLength {
                head.headers.add(name: "transfer-encoding", value: "chunked")
            }
            return
        }
        let len = body?.readableBytes ?? 0
        switch head.method {
        case .POST, .PUT, .PATCH: head.headers.replaceOrAdd(name: "content-length", value: String(len))
        default:
            if len > 0 {
                head.headers.replaceOrAdd(name: "content-length", value: String(len))
            } else if found.contentLength {
                head.headers.remove(name: "content-length")
            }
        }
    }

    private func send(on c: UpstreamConnection) {
        if !prepared { prepareHead() }
        if side == .outbound, let id = ctx.identity {
            // Per attempt: a retry carries a fresh proof (its nonce must be new).
            id.attach(
                to: &head.headers, audience: cluster, routeProof: proof, method: head.method.rawValue,
                authority: head.headers.first(name: "host") ?? cluster, pathAndQuery: head.uri,
                body: streaming ? nil : body, callee: endpoint)
        }
        var added = AddedRequestFields(traceparent: madeTraceparent)
        if side == .outbound, let deadline {
            added.timeoutMs = max(1, (deadline - clock()) / 1_000_000)
        }
        if attempts > 1 {
            head.headers.removeIfPresent("tandem-attempt")
            added.attempt = attempts
        }
        let version = head.version
        head.version = .http1_1
        let up = c.handler
        up.sendHead(head, added: added)
        head.version = version
        if let body, body.readableBytes > 0 { up.send(.body(.byteBuffer(body))) }
        if streaming {
            headSent = true
            for part in queued { up.send(.body(.byteBuffer(part))) }
            queued = []
            queuedBytes = 0
            if bodyEnded {
                up.send(.end(nil), flush: true)
            } else {
                c.channel.flush()
                c.channel.isWritable ? resumeDownstream() : pauseDownstream()
            }
            return
        }
        up.send(.end(nil), flush: true)
    }

    // MARK: streamed request body

    /// A part of a streamed request body from the client.
    func downstreamBody(_ b: ByteBuffer) {
        guard !finished else { return }
        if let c = conn, headSent {
            c.handler.send(.body(.byteBuffer(b)), flush: true)
            if !c.channel.isWritable { pauseDownstream() }
        } else {
            queued.append(b)
            queuedBytes += b.readableBytes
            if queuedBytes > ctx.limits.streamBodyAfterBytes { pauseDownstream() }
        }
    }

    /// The streamed request body is complete.
    func downstreamEnd() {
        bodyEnded = true
        guard !finished, let c = conn, headSent else { return }
        c.handler.send(.end(nil), flush: true)
    }

    /// The streamed body passed `maxBodyBytes`: 413 if nothing was answered yet, else cut.
    func downstreamBodyTooLarge(_ max: Int) {
        guard !finished else { return }
        dropConnection()
        if responded {
            abort()
        } else {
            answer(LocalAnswer(.bodyTooLarge, message: "request body exceeds \(max) bytes"))
        }
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        if writable { resumeDownstream() }
    }

    private func pauseDownstream() {
        guard !downstreamPaused else { return }
        downstreamPaused = true
        context.channel.setOption(.autoRead, value: false).whenFailure { _ in }
    }

    private func resumeDownstream() {
        guard downstreamPaused else { return }
        downstreamPaused = false
        context.channel.setOption(.autoRead, value: true).whenFailure { _ in }
    }

    private func attemptTimedOut() {
        guard !finished, !responded else { return }
        cancelPending()
        dropConnection()
        attemptFailed(.timeout)
    }

    private func overallTimeout() {
        guard !finished else { return }
        if responded {
            abort()  // the response started; all we can do is cut it
            return
        }
        dropConnection()
        attemptDeadline = nil
        if let ep = endpoint {
            let now = clock()
            let latency = now - attemptStart
            withCluster { c, _ in c.attemptFinished(ep, .timeout, latency: latency, now: now) }
        }
        answer(LocalAnswer(.timeout, message: "upstream \"\(cluster)\" did not answer within the route timeout"))
    }

    /// A failure before any response header: retry, or answer locally.
    private func attemptFailed(_ outcome: AttemptOutcome) {
        guard !finished else { return }
        attemptDeadline = nil
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
        guard retry != nil else { return }
        let now = clock()
        let latency = now - attemptStart
        let next = withCluster { c, rng in
            c.afterAttempt(ep, outcome, latency: latency, now: now, retry: &self.retry!, rng: &rng)
        }
        attempts = retry!.attempts
        switch next {
        case .retry(let after):
            ctx.metrics.inc("tandem_retries_total", [("side", side.rawValue), ("cluster", cluster)])
            dropConnection()
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

    private var pendingHead: UpstreamHead?
    /// The traceparent made for a request that came without one (written with each attempt's
    /// head, named in the access log).
    private var madeTraceparent: String?

    func upstreamHead(_ h: UpstreamHead) {
        guard !finished, let ep = endpoint else { return }
        if h.code == 401, side == .outbound, !keyRefreshed, retry?.bodyFits == true,
            case let fields = h.head.headers,
            fields.first(name: "tandem-error") == IdentityError.Reason.staleProofKey.rawValue,
            let fresh = fields.first(name: SidecarIdentity.proofKeyHeader),
            ctx.identity?.learn(calleeKey: fresh, for: ep) == true
        {
            // The instance's proof key changed (it restarted) and discovery has not caught up:
            // the request never reached its app, so it goes again, once, with a proof for the
            // key the instance named. Not an attempt, not a failure.
            keyRefreshed = true
            dropConnection()
            connectAndSend(ep)
            return
        }
        attemptDeadline = nil
        pendingHead = h
        decide(.response(status: h.code, grpcStatus: h.grpcStatus), endpoint: ep)
    }

    /// A policy reads response bodies: the answer is held (up to the limit) until it ends, so
    /// on_response sees it whole. Past the limit it streams and the body is nil for policies.
    private var bufferingResponse = false
    private var responseBuffer: ByteBuffer?

    private func forwardPendingHead() {
        guard let upstream = pendingHead else { return }
        if !bufferingResponse, responseBuffer == nil, let p = policy, upstream.code != 101, p.wantsResponseBody,
            upstream.contentLength.map({ $0 <= ctx.limits.streamBodyAfterBytes }) ?? true
        {
            bufferingResponse = true
            responded = true  // committed to this answer: a failure from here aborts
            responseBuffer = context.channel.allocator.buffer(capacity: 0)
            return
        }
        pendingHead = nil
        responded = true
        status = upstream.code
        guard !handler.compresses, status != 101 else { return forwardAsHeaders(upstream) }
        // The fields go from the upstream's bytes to the client's, with the policies' edits;
        // they become strings only for a hook that reads them.
        var edits: [PolicyExchange.HeaderEdit] = []
        if let p = policy {
            if let d = p.respond(
                status: status, reason: nil, fields: { upstream.fieldPairs() },
                body: bufferingResponse ? responseBuffer.map { Array($0.readableBytesView) } : nil,
                endpoint: endpoint, attempts: attempts, durationMs: Double(clock() - startedAt) / 1e6)
            {
                return replaceAnswer(d)
            }
            edits = p.ex.responseEdits
        }
        let fields = EditedFields(base: upstream, edits: edits)
        if HTTP1ResponseEncoder.endsByClose(
            version: head.version, status: upstream.status, method: head.method, hasLength: fields.sizes.hasLength)
        {
            closeDelimited = true
        }
        handler.outHead(status: upstream.status, fields: fields, version: head.version, close: !keepAlive)
    }

    /// The upstream's answer is replaced by a policy's decision: the rest of it is dropped
    /// with its connection.
    private func replaceAnswer(_ d: PolicyDecision) {
        dropConnection()
        responded = false
        answerWithPolicy(d, upstreamFailed: status >= 500)
    }

    /// The head as `HTTPHeaders`, for the compressor and for a switch of protocols.
    private func forwardAsHeaders(_ upstream: UpstreamHead) {
        // `out` is the head's only copy: edits below do not copy it.
        var out = upstream.head
        out.version = head.version
        let switchingTo = status == 101 && upgrade != nil ? out.headers.first(name: "upgrade") : nil
        // No hop-by-hop fields: the upstream parser left them out (a 101's `upgrade` aside).
        if status == 101 { out.headers.remove(name: "upgrade") }  // re-added below when switching
        if let p = policy, switchingTo == nil,
            let d = p.response(
                status: status, reason: nil, headers: &out.headers,
                body: bufferingResponse ? responseBuffer.map { Array($0.readableBytesView) } : nil,
                endpoint: endpoint, attempts: attempts,
                durationMs: Double(clock() - startedAt) / 1e6)
        {
            return replaceAnswer(d)
        }
        if handler.compresses { markForCompression(&out) }
        if HTTP1ResponseEncoder.endsByClose(out, method: head.method) { closeDelimited = true }
        if let switchingTo {
            out.headers.add(name: "connection", value: "upgrade")
            out.headers.add(name: "upgrade", value: switchingTo)
        } else if !keepAlive {
            out.headers.add(name: "connection", value: "close")
        }
        handler.out(.head(out))
    }

    /// Asks the connection's compressor to gzip this response when the route's policy says
    /// it is worth it (the client's Accept-Encoding is the compressor's call).
    private func markForCompression(_ out: inout HTTPResponseHead) {
        out.headers.remove(name: HTTPProxyHandler.compressMarker)  // never the upstream's say
        // HTTP/1.0 has no chunked encoding to send a body whose compressed length is not known yet.
        guard let policy = route?.compression, head.version.major > 1 || head.version.minor >= 1 else { return }
        let h = out.headers
        guard
            policy.shouldCompress(
                status: Int(out.status.code), method: head.method.rawValue, contentType: h.first(name: "content-type"),
                contentLength: h.first(name: "content-length").flatMap(Int.init),
                contentEncoding: h.first(name: "content-encoding"), cacheControl: h.first(name: "cache-control"))
        else { return }
        out.headers.add(name: HTTPProxyHandler.compressMarker, value: "1")
        if !h["vary"].contains(where: { $0.lowercased().contains("accept-encoding") }) {
            out.headers.add(name: "vary", value: "accept-encoding")
        }
    }

    func upstreamReadComplete() {
        if responded && !finished { handler.flushOut() }
    }

    /// Ends buffering: on_response runs (with the body when `whole`), then the head and what
    /// was held go out. False when a policy answered instead.
    private func releaseBufferedResponse(whole: Bool) -> Bool {
        if !whole { bufferingResponse = false }
        forwardPendingHead()
        bufferingResponse = false
        guard !finished else { return false }
        if let held = responseBuffer, held.readableBytes > 0 {
            handler.out(.body(.byteBuffer(held)))
        }
        responseBuffer = nil
        return true
    }

    func upstreamBody(_ b: ByteBuffer) {
        guard !finished, responded else { return }
        if bufferingResponse {
            var b = b
            responseBuffer?.writeBuffer(&b)
            if (responseBuffer?.readableBytes ?? 0) > ctx.limits.streamBodyAfterBytes {
                _ = releaseBufferedResponse(whole: false)
            }
            return
        }
        handler.out(.body(.byteBuffer(b)))
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
        if status == 101, upgrade != nil, let c = conn {
            tunnel(c)
            return
        }
        if bufferingResponse {
            guard releaseBufferedResponse(whole: true) else { return }
        }
        if let c = conn {
            conn = nil
            if upstreamPaused { c.channel.setOption(.autoRead, value: true).whenFailure { _ in } }
            if bodyEnded {
                handler.pool.release(c)
            } else {
                // Answered before the request body ended: this connection is mid-request.
                c.handler.reusable = false
                c.channel.close(promise: nil)
            }
        }
        resumeDownstream()
        handler.out(.end(trailers), flush: true)  // no future per request
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

    /// The upstream switched protocols: the 101 has gone out; both connections become one
    /// byte tunnel (WebSocket and other upgrades), outside the request's accounting from here.
    private func tunnel(_ c: UpstreamConnection) {
        conn = nil
        handler.out(.end(nil), flush: true)
        complete(failed: false, notifyHandler: false)
        if upstreamPaused { c.channel.setOption(.autoRead, value: true).whenFailure { _ in } }
        ctx.metrics.inc("tandem_upgrades_total", [("side", side.rawValue), ("protocol", upgrade ?? "")])
        do {
            // Bytes that came with the 101 go to the client once neither connection has HTTP
            // handlers left to misread them.
            let early = try UpstreamPool.tunnel(c, to: context.channel)
            try handler.tunnel(to: c.channel)
            if let early, early.readableBytes > 0 { context.channel.writeAndFlush(early, promise: nil) }
            ctx.trackTunnel(c.channel)
        } catch {
            c.channel.close(promise: nil)
            context.close(promise: nil)
        }
    }

    // MARK: endings

    /// Closes the current upstream connection mid-exchange (its response is abandoned), so it
    /// is never reused and reports nothing more to this exchange.
    private func dropConnection() {
        guard let c = conn else { return }
        conn = nil
        c.handler.delegate = nil
        c.handler.reusable = false
        c.channel.close(promise: nil)
    }

    /// Answers locally (before any upstream response went out).
    private func answer(_ a: LocalAnswer) {
        guard !finished else { return }
        var edited: HTTPHeaders?
        if let p = policy, a.reason != .policyError {
            // on_response sees the sidecar's own answers too: a policy can serve a fallback, or
            // only edit the answer's headers (they go out as edited).
            let body = Array(a.jsonBody.utf8)
            var h = a.jsonHeaders(bodyBytes: body.count)
            if let d = p.response(
                status: a.status, reason: a.reason.rawValue, headers: &h, body: body,
                endpoint: endpoint, attempts: attempts,
                durationMs: Double(clock() - startedAt) / 1e6)
            {
                answerWithPolicy(d, upstreamFailed: a.status >= 500)
                return
            }
            edited = LocalAnswer.framed(h, bodyBytes: body.count)
        }
        status = a.status
        tandemError = a.errorCode
        let keep = keepAlive
        complete(failed: a.status >= 500, local: true)
        handler.localAnswer(context, a, headers: edited, keepAlive: keep, request: head)
    }

    /// The downstream client went away.
    func downstreamClosed() {
        guard !finished else { return }
        dropConnection()
        status = 499
        tandemError = "client-closed"
        complete(failed: false, notifyHandler: false)
    }

    /// The response was cut midway (upstream broke after the head went out).
    private func abort() {
        dropConnection()
        tandemError = "upstream-reset"
        complete(failed: true, notifyHandler: false)
        context.close(promise: nil)
    }

    private func complete(failed: Bool, local: Bool = false, notifyHandler: Bool = true) {
        guard !finished else { return }
        finished = true
        attemptDeadline = nil
        cancelPending()
        let now = clock()
        let latency = now - startedAt
        if admitted {
            let retry = self.retry
            withCluster { c, _ in
                c.requestFinished(failed: failed, latency: latency, now: now, retry: retry)
            }
        }
        ctx.inFlight.wrappingDecrement(ordering: .relaxed)
        let routeName = route?.name ?? "none"
        ctx.metrics.request(
            handler.series(
                SidecarMetrics.RequestKey(side: side.rawValue, route: routeName, cluster: cluster, status: status)),
            ms: Double(latency) / 1e6, attempts: attempts)
        if let p = policy {
            policy = nil
            p.log(
                status: status, reason: tandemError, endpoint: endpoint, attempts: attempts,
                durationMs: Double(latency) / 1e6)
        }
        if let log = ctx.accessLog {
            var line = "{\"side\":\"\(side.rawValue)\",\"method\":\(JSON.quote(head.method.rawValue))"
            line += ",\"host\":\(JSON.quote(host)),\"path\":\(JSON.quote(path)),\"route\":\(JSON.quote(routeName))"
            line += ",\"cluster\":\(JSON.quote(cluster)),\"endpoint\":\(JSON.quote(endpoint?.address ?? ""))"
            line += ",\"status\":\(status),\"attempts\":\(attempts)"
            line += ",\"duration_ms\":\(Double(latency / 1000) / 1000)"
            line += ",\"tandem_error\":\(tandemError.map(JSON.quote) ?? "null")"
            line += ",\"traceparent\":\(JSON.quote(madeTraceparent ?? head.headers.first(name: "traceparent") ?? ""))}"
            log(line)
        }
        if notifyHandler && !local { handler.exchangeDone(keepAlive: keepAlive) }
    }
}

/// W3C trace context ids. Random, from a generator seeded once from the system per
/// connection (a getrandom call per id would cost three syscalls per request).
enum Trace {
    /// `00-<32 hex trace id>-<16 hex parent id>-01`, written in place (55 bytes).
    static func newTraceparent(_ g: inout SeededRandom) -> String {
        let words = (g.next() | 1, g.next(), g.next() | 1)
        return String(unsafeUninitializedCapacity: 55) { buf in
            let digits: StaticString = "0123456789abcdef"
            var i = 0
            func put(_ b: UInt8) {
                buf[i] = b
                i += 1
            }
            func hex(_ v: UInt64) {
                var shift: UInt64 = 60
                while true {
                    put(digits.utf8Start[Int((v >> shift) & 0xF)])
                    if shift == 0 { break }
                    shift -= 4
                }
            }
            put(UInt8(ascii: "0"))
            put(UInt8(ascii: "0"))
            put(UInt8(ascii: "-"))
            hex(words.0)
            hex(words.1)
            put(UInt8(ascii: "-"))
            hex(words.2)
            put(UInt8(ascii: "-"))
            put(UInt8(ascii: "0"))
            put(UInt8(ascii: "1"))
            return i
        }
    }

    static func seeded() -> SeededRandom {
        var sys = SystemRandomNumberGenerator()
        return SeededRandom(seed: sys.next())
    }
}
