import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Receives one upstream response. Called on the connection's event loop.
protocol UpstreamDelegate: AnyObject {
    func upstreamHead(_ head: HTTPResponseHead)
    func upstreamBody(_ body: ByteBuffer)
    func upstreamEnd(_ trailers: HTTPHeaders?)
    /// The connection failed or closed before the response ended.
    func upstreamFailed(_ error: any Error)
    /// The end of one read burst: flush what was forwarded (one write syscall per burst).
    func upstreamReadComplete()
    /// The connection can take more writes again (or cannot): streamed request bodies.
    func upstreamWritabilityChanged(_ writable: Bool)
}

extension UpstreamDelegate {
    func upstreamReadComplete() {}
    func upstreamWritabilityChanged(_ writable: Bool) {}
}

/// An HTTP/1.1 connection to one endpoint, reused for sequential requests.
/// Loop-confined (its channel's event loop).
final class UpstreamConnection: @unchecked Sendable {
    let channel: any Channel
    let key: UpstreamPool.Key
    let cluster: String
    let handler: UpstreamHandler
    /// Requests already completed on this connection (0 = fresh).
    var uses = 0
    /// When it last went back to the idle pool.
    var idleSince = NIODeadline.uptimeNanoseconds(0)

    init(channel: any Channel, key: UpstreamPool.Key, cluster: String, handler: UpstreamHandler) {
        self.channel = channel
        self.key = key
        self.cluster = cluster
        self.handler = handler
    }
}

final class UpstreamHandler: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart

    weak var delegate: (any UpstreamDelegate)?
    /// Set when the upstream says `connection: close` or the response cannot be reused.
    var reusable = true

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            if h.status.code < 200 && h.status.code != 101 { return }  // 100-continue etc.: we sent the body already
            reusable = h.isKeepAlive
            delegate?.upstreamHead(h)
        case .body(let b):
            delegate?.upstreamBody(b)
        case .end(let t):
            let d = delegate
            delegate = nil
            d?.upstreamEnd(t)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        delegate?.upstreamReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        delegate?.upstreamWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        reusable = false
        let d = delegate
        delegate = nil
        d?.upstreamFailed(ChannelError.ioOnClosedChannel)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        reusable = false
        let d = delegate
        delegate = nil
        d?.upstreamFailed(error)
        context.close(promise: nil)
    }
}

/// Idle upstream connections of one event loop, per endpoint. Loop-confined.
final class UpstreamPool: @unchecked Sendable {
    let loop: any EventLoop
    let maxIdlePerEndpoint: Int
    let idleTimeout: TimeAmount
    struct Key: Hashable {
        var host: String
        var port: Int
    }
    /// Per endpoint, oldest first: requests take the most recently used (warm) connection, so
    /// the ones a burst left behind age at the front until the sweep closes them.
    private var idle: [Key: [UpstreamConnection]] = [:]
    private var sweep: RepeatedTask?

    let slots: ConnectionSlots
    /// Told the cluster of every connection this pool opens (a metric).
    let opened: @Sendable (String) -> Void

    init(
        loop: any EventLoop, maxIdlePerEndpoint: Int, idleTimeout: TimeAmount, slots: ConnectionSlots,
        opened: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.loop = loop
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
        self.idleTimeout = idleTimeout
        self.slots = slots
        self.opened = opened
    }

    /// Starts closing connections idle longer than `idleTimeout` (checked four times per timeout).
    func startSweeping() {
        let every = TimeAmount.nanoseconds(max(idleTimeout.nanoseconds / 4, 10_000_000))
        sweep = loop.scheduleRepeatedTask(initialDelay: every, delay: every) { [weak self] _ in
            guard let self else { return }
            self.closeIdle(before: .now() - self.idleTimeout)
        }
    }

    /// Closes the idle connections that went idle before `cutoff`.
    func closeIdle(before cutoff: NIODeadline) {
        for (key, list) in idle {
            let stale = list.prefix { $0.idleSince < cutoff }
            guard !stale.isEmpty else { continue }
            for c in stale { c.channel.close(promise: nil) }
            if stale.count == list.count { idle[key] = nil } else { idle[key]!.removeFirst(stale.count) }
        }
    }

    /// Idle connections in the pool (all endpoints).
    var idleCount: Int { idle.values.reduce(0) { $0 + $1.count } }

    /// A live idle connection to `host:port`, if there is one (no future on this hot path).
    func takeIdle(host: String, port: Int) -> UpstreamConnection? {
        let key = Key(host: host, port: port)
        guard idle.index(forKey: key) != nil else { return nil }
        while let conn = idle[key]?.popLast() {
            if conn.channel.isActive && conn.handler.reusable { return conn }
            conn.channel.close(promise: nil)
        }
        return nil
    }

    /// A new connection to `host:port` for `cluster`. The caller holds a connection slot of
    /// the cluster (`ConcurrencyGate.tryOpenConnection`); `slots` gets it back when the
    /// connection closes or fails to open.
    func connect(
        host: String, port: Int, cluster: String, connectTimeout: TimeAmount, slots: ConnectionSlots
    ) -> EventLoopFuture<UpstreamConnection> {
        let key = Key(host: host, port: port)
        let handler = UpstreamHandler()
        opened(cluster)
        return ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    // Bytes after a 101 response belong to the upgraded protocol: forwarded, not
                    // dropped. No header validation: the headers were parsed by NIO or are ours.
                    try ch.pipeline.syncOperations.addHTTPClientHandlers(
                        leftOverBytesStrategy: .forwardBytes, enableOutboundHeaderValidation: false)
                    try ch.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port)
            .map { ch in
                ch.closeFuture.whenComplete { _ in slots.closed(cluster) }
                return UpstreamConnection(channel: ch, key: key, cluster: cluster, handler: handler)
            }
            .always { r in if case .failure = r { slots.closed(cluster) } }
    }

    struct NoConnectionSlot: Error {}

    /// An idle connection, or a new one if the cluster has a free slot (no waiting: the
    /// HTTP/2 → HTTP/1.1 path answers 503 overflow at once).
    func acquire(
        host: String, port: Int, cluster: String, connectTimeout: TimeAmount, brain: TrafficBrain
    )
        -> EventLoopFuture<UpstreamConnection>
    {
        if let c = takeIdle(host: host, port: port) { return loop.makeSucceededFuture(c) }
        guard brain.withCluster(cluster, { c, _ in c.gate.tryOpenConnection() }) else {
            return loop.makeFailedFuture(NoConnectionSlot())
        }
        return connect(host: host, port: port, cluster: cluster, connectTimeout: connectTimeout, slots: slots)
    }

    /// Closes one idle connection of `cluster` (its slot goes to a request waiting for one).
    func closeOneIdle(cluster: String) {
        for (key, list) in idle {
            guard let i = list.firstIndex(where: { $0.cluster == cluster }) else { continue }
            idle[key]!.remove(at: i).channel.close(promise: nil)
            return
        }
    }

    /// Turns an HTTP/1.1 connection that answered 101 into a byte tunnel to `partner`: the HTTP
    /// handlers leave, bytes the decoder had read past the 101 go to the tunnel.
    static func tunnel(_ conn: UpstreamConnection, to partner: any Channel) throws {
        let sync = conn.channel.pipeline.syncOperations
        sync.removeHandler(conn.handler, promise: nil)
        try sync.addHandler(TCPGlue(partner: partner))
        // The decoder leaves on a later loop tick, handing its leftover bytes to the glue
        // outside a read burst: flush them when it is gone.
        let removed = conn.channel.eventLoop.makePromise(of: Void.self)
        removed.futureResult.whenComplete { _ in partner.flush() }
        sync.removeHandler(
            context: try sync.context(handlerType: ByteToMessageHandler<HTTPResponseDecoder>.self), promise: removed)
        sync.removeHandler(context: try sync.context(handlerType: HTTPRequestEncoder.self), promise: nil)
        if let c = try? sync.context(handlerType: NIOHTTPRequestHeadersValidator.self) {
            sync.removeHandler(context: c, promise: nil)
        }
    }

    /// Returns a connection after a complete response; closes it if it cannot be reused.
    func release(_ conn: UpstreamConnection) {
        loop.preconditionInEventLoop()
        conn.uses += 1
        conn.handler.delegate = nil
        // A request waits for a slot of this cluster: free this one rather than keep it idle.
        guard conn.channel.isActive, conn.handler.reusable, !slots.hasWaiters(conn.cluster) else {
            conn.channel.close(promise: nil)
            return
        }
        if idle[conn.key, default: []].count >= maxIdlePerEndpoint {
            conn.channel.close(promise: nil)
            return
        }
        conn.idleSince = .now()
        idle[conn.key, default: []].append(conn)
    }

    func closeAll() {
        sweep?.cancel()
        sweep = nil
        for list in idle.values { for c in list { c.channel.close(promise: nil) } }
        idle = [:]
    }
}

/// One pool per event loop.
final class UpstreamPools: Sendable {
    private let pools = NIOLockedValueBox<[ObjectIdentifier: NIOLoopBound<UpstreamPool>]>([:])
    let maxIdlePerEndpoint: Int
    let idleTimeout: TimeAmount
    let slots: ConnectionSlots
    let opened: @Sendable (String) -> Void

    init(
        maxIdlePerEndpoint: Int, idleTimeout: TimeAmount, slots: ConnectionSlots,
        opened: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
        self.idleTimeout = idleTimeout
        self.slots = slots
        self.opened = opened
    }

    /// This loop's pool (call on `loop`).
    func pool(for loop: any EventLoop) -> UpstreamPool {
        let id = ObjectIdentifier(loop)
        let (bound, created) = pools.withLockedValue { p -> (NIOLoopBound<UpstreamPool>, Bool) in
            if let b = p[id] { return (b, false) }
            let pool = UpstreamPool(
                loop: loop, maxIdlePerEndpoint: maxIdlePerEndpoint, idleTimeout: idleTimeout, slots: slots,
                opened: opened)
            let b = NIOLoopBound(pool, eventLoop: loop)
            p[id] = b
            return (b, true)
        }
        if created { bound.value.startSweeping() }
        return bound.value
    }

    func closeAll() {
        let all = pools.withLockedValue { Array($0.values) }
        for b in all { b.eventLoop.execute { b.value.closeAll() } }
    }

    /// Each loop closes one idle connection of `cluster`: idle connections hold slots a
    /// waiting request needs.
    func closeOneIdle(cluster: String) {
        let all = pools.withLockedValue { Array($0.values) }
        for b in all { b.eventLoop.execute { b.value.closeOneIdle(cluster: cluster) } }
    }
}

/// Upstream HTTP/1.1 connection slots per cluster (Envoy's max_connections, counted in the
/// cluster's `ConcurrencyGate`), and the requests waiting for one (max_pending_requests),
/// woken first come, first served on their own event loop when a connection closes.
final class ConnectionSlots: Sendable {
    struct Waiter: Sendable {
        let id: UInt64
        let loop: any EventLoop
        let wake: @Sendable () -> Void
    }

    private let brain: TrafficBrain
    private let waiters = NIOLockedValueBox<(next: UInt64, byCluster: [String: [Waiter]])>((0, [:]))

    init(brain: TrafficBrain) { self.brain = brain }

    /// Queues a request (its pending slot already taken); returns its id for `cancel`.
    func wait(_ cluster: String, loop: any EventLoop, wake: @escaping @Sendable () -> Void) -> UInt64 {
        waiters.withLockedValue { w in
            w.next += 1
            w.byCluster[cluster, default: []].append(Waiter(id: w.next, loop: loop, wake: wake))
            return w.next
        }
    }

    /// Removes a waiter; true if it was still waiting (its pending slot must be given back).
    func cancel(_ cluster: String, id: UInt64) -> Bool {
        waiters.withLockedValue { w in
            guard let i = w.byCluster[cluster]?.firstIndex(where: { $0.id == id }) else { return false }
            w.byCluster[cluster]!.remove(at: i)
            return true
        }
    }

    func hasWaiters(_ cluster: String) -> Bool {
        waiters.withLockedValue { !($0.byCluster[cluster]?.isEmpty ?? true) }
    }

    /// A connection of `cluster` closed (or failed to open): its slot is free; the first
    /// waiter, if any, is woken to try again.
    func closed(_ cluster: String) {
        brain.withCluster(cluster) { c, _ in c.gate.connectionClosed() }
        let next = waiters.withLockedValue { w -> Waiter? in
            guard var list = w.byCluster[cluster], !list.isEmpty else { return nil }
            let first = list.removeFirst()
            w.byCluster[cluster] = list
            return first
        }
        if let next { next.loop.execute { next.wake() } }
    }
}
