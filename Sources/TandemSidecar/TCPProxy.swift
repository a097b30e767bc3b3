import NIOCore
import NIOPosix
import TandemTraffic

/// Plain TCP on a local upstream port (`NAME=PORT/tcp`): each accepted connection gets an
/// endpoint from the cluster's balancer (connect failures retried on another endpoint within
/// the budget), then bytes flow both ways with backpressure and half-close.
final class TCPProxyHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let ctx: ProxyContext
    let cluster: String
    private var context: ChannelHandlerContext?
    private var peer: (any Channel)?
    private var pending: [ByteBuffer] = []
    private var pendingBytes = 0
    /// Connect attempts and their retry decisions (TandemTraffic): only connect failures are
    /// retried, within the cluster's budget and the default policy's attempts.
    private var retry: RetryState?
    private var admitted = false
    private var closed = false
    private var startedAt: Nanos = 0

    init(ctx: ProxyContext, cluster: String) {
        self.ctx = ctx
        self.cluster = cluster
    }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        startedAt = nowNanos()
        ctx.metrics.inc("tandem_tcp_connections_total", [("cluster", cluster)])
        let go = { [self] in
            let now = nowNanos()
            if let reason = ctx.brain.withCluster(cluster, { c, _ in c.admit(now: now) }) {
                ctx.metrics.inc("tandem_local_answers_total", [("side", "tcp"), ("reason", reason.rawValue)])
                context.close(promise: nil)
                return
            }
            admitted = true
            let policy = ctx.brain.with { $0.config.defaultRetry }
            retry = RetryState(policy: policy, method: "CONNECT", bodyBytes: 0, start: now, timeout: nil)
            connect()
        }
        if let wait = ctx.ensureCluster(cluster) {
            let bound = NIOLoopBound(go, eventLoop: context.eventLoop)
            wait.hop(to: context.eventLoop).whenComplete { _ in bound.value() }
        } else {
            go()
        }
        context.fireChannelActive()
    }

    private func connect() {
        guard let context, !closed else { return }
        let now = nowNanos()
        let avoid = retry?.tried ?? []
        guard let ep = ctx.brain.withCluster(cluster, { c, rng in c.choose(now: now, avoid: avoid, rng: &rng) }) else {
            ctx.metrics.inc("tandem_local_answers_total", [("side", "tcp"), ("reason", "no-healthy-endpoint")])
            context.close(promise: nil)
            return
        }
        // One of the cluster's max_connections slots per upstream connection; none free: the
        // client's connection is closed at once (a TCP proxy has no request to queue).
        let (opened, timeout) = ctx.brain.withCluster(cluster) { c, _ -> (Bool, Nanos) in
            guard c.gate.tryOpenConnection() else { return (false, 0) }
            c.attemptStarted(ep)
            return (true, c.config.connectTimeout)
        }
        guard opened else {
            ctx.metrics.inc("tandem_local_answers_total", [("side", "tcp"), ("reason", "overflow")])
            context.close(promise: nil)
            return
        }
        retry?.attemptStarted(endpoint: ep.id)
        let slots = ctx.pools.slots
        let cluster = self.cluster
        let glue = TCPGlue(partner: context.channel)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .connectTimeout(.nanoseconds(timeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(glue) }
            }
            .connect(host: ep.host, port: ep.port)
            .whenComplete { r in
                let me = bound.value
                let t = nowNanos()
                switch r {
                case .success(let ch):
                    ch.closeFuture.whenComplete { _ in slots.closed(cluster) }
                    if var state = me.retry {
                        // A connected attempt ends the retrying (and frees a max_retries slot).
                        _ = me.ctx.brain.withCluster(me.cluster) { c, rng in
                            c.afterAttempt(
                                ep, .response(status: 200), latency: t - now, now: t, retry: &state, rng: &rng)
                        }
                        me.retry = state
                    }
                    me.connected(ch)
                case .failure:
                    slots.closed(cluster)
                    guard var state = me.retry else { return }
                    let next = me.ctx.brain.withCluster(me.cluster) { c, rng in
                        c.afterAttempt(ep, .connectFailure, latency: t - now, now: t, retry: &state, rng: &rng)
                    }
                    me.retry = state
                    switch next {
                    case .retry(let after):
                        me.ctx.metrics.inc("tandem_retries_total", [("side", "tcp"), ("cluster", me.cluster)])
                        me.context?.eventLoop.scheduleTask(in: .nanoseconds(after)) { bound.value.connect() }
                    case .giveUp(let reason):
                        me.ctx.metrics.inc(
                            "tandem_local_answers_total", [("side", "tcp"), ("reason", reason.rawValue)])
                        me.context?.close(promise: nil)
                    case .finish:
                        me.ctx.metrics.inc(
                            "tandem_local_answers_total", [("side", "tcp"), ("reason", "upstream-connect-failure")])
                        me.context?.close(promise: nil)
                    }
                }
            }
    }

    private func connected(_ ch: any Channel) {
        guard !closed else {
            ch.close(promise: nil)
            return
        }
        peer = ch
        ctx.trackTunnel(ch)
        for b in pending { ch.write(b, promise: nil) }
        pending = []
        pendingBytes = 0
        ch.flush()
        ch.closeFuture.whenComplete { [weak self] _ in
            guard let self else { return }
            self.context?.eventLoop.execute { self.context?.close(promise: nil) }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let b = unwrapInboundIn(data)
        if let peer {
            peer.write(b, promise: nil)
        } else {
            pendingBytes += b.readableBytes
            guard pendingBytes <= 1 << 20 else {  // bound what a client may send before the upstream connects
                context.close(promise: nil)
                return
            }
            pending.append(b)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        peer?.flush()
        if let peer, !peer.isWritable { context.channel.setOption(.autoRead, value: false).whenFailure { _ in } }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { peer?.setOption(.autoRead, value: true).whenFailure { _ in } }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            peer?.close(mode: .output, promise: nil)  // half-close: the client finished sending
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        peer?.close(promise: nil)
        if admitted {
            let now = nowNanos()
            let latency = now - startedAt
            let retry = self.retry
            ctx.brain.withCluster(cluster) { c, _ in
                c.requestFinished(failed: false, latency: latency, now: now, retry: retry)
            }
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// The upstream side of a TCP proxy connection: writes what it reads to the client, with
/// backpressure both ways and half-close.
final class TCPGlue: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let partner: any Channel

    init(partner: any Channel) { self.partner = partner }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        partner.write(unwrapInboundIn(data), promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner.flush()
        // The client side resumes us when it becomes writable (TCPProxyHandler).
        if !partner.isWritable { context.channel.setOption(.autoRead, value: false).whenFailure { _ in } }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner.setOption(.autoRead, value: true).whenFailure { _ in } }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { partner.close(mode: .output, promise: nil) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        partner.close(promise: nil)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
