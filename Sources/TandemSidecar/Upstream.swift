import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Receives one upstream response. Called on the connection's event loop.
protocol UpstreamDelegate: AnyObject {
    func upstreamHead(_ head: UpstreamHead)
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

/// The HTTP/1.1 client side of one upstream connection, the only handler in its pipeline:
/// writes requests (`send`, or `HTTPClientRequestPart`s written to the channel) and hands the
/// response's parts straight to the delegate. One handler instead of NIO's encoder, decoder and a
/// consumer: no parts travel the pipeline as `NIOAny`, and the parser knows which request a
/// response answers (HEAD) because it wrote it.
final class UpstreamHandler: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = IOData

    /// The exchange this connection's answer goes to. Strong, and cleared when the answer
    /// ends, the connection fails or the exchange lets go of it: a weak reference would give
    /// every exchange a side table, and each of its retains and releases the slow path.
    var delegate: (any UpstreamDelegate)?
    /// Set when the upstream says `connection: close` or the response cannot be reused.
    var reusable = true
    private var parser: HTTP1ResponseParser
    private var encoder = HTTP1RequestEncoder()
    /// Bytes read but not parsed yet (an incomplete head or chunk-size line), or after a 101
    /// the new protocol's first bytes, taken by the tunnel's maker (`takeUnread`).
    private var unread: ByteBuffer?
    /// A request went out and its response has not ended.
    private var awaiting = false
    private var context: ChannelHandlerContext?

    init(maxHeaderBytes: Int = 64 * 1024) {
        parser = HTTP1ResponseParser(maxHeaderBytes: maxHeaderBytes)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// The bytes the upstream sent after its 101 (the new protocol's first), taken out: the
    /// tunnel's maker writes them on once neither connection has HTTP handlers left to misread
    /// them (`UpstreamPool.tunnel`).
    func takeUnread() -> ByteBuffer? {
        defer { unread = nil }
        return parser.upgraded ? unread : nil
    }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    // MARK: requests

    /// Writes one part of a request (flushing when asked) without a trip through the pipeline.
    func send(_ part: HTTPClientRequestPart, flush: Bool = false) {
        guard let context else { return }
        write(part, context, promise: nil)
        if flush { context.flush() }
    }

    /// Writes a request's head with the fields the proxy adds (`AddedRequestFields`).
    func sendHead(_ head: HTTPRequestHead, added: AddedRequestFields) {
        guard let context else { return }
        writeHead(head, added: added, context, promise: nil)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        write(unwrapOutboundIn(data), context, promise: promise)
    }

    private func writeHead(
        _ head: HTTPRequestHead, added: AddedRequestFields, _ context: ChannelHandlerContext,
        promise: EventLoopPromise<Void>?
    ) {
        parser.answersHead = head.method == .HEAD
        awaiting = true
        let bytes = encoder.head(head, added: added, allocator: context.channel.allocator)
        context.write(wrapOutboundOut(.byteBuffer(bytes)), promise: promise)
    }

    private func write(
        _ part: HTTPClientRequestPart, _ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?
    ) {
        let allocator = context.channel.allocator
        switch part {
        case .head(let head):
            writeHead(head, added: AddedRequestFields(), context, promise: promise)
        case .body(let data):
            HTTP1Writer.body(data, chunked: encoder.chunked, context, promise: promise)
        case .end(let trailers):
            HTTP1Writer.end(encoder.end(trailers, allocator: allocator), context, promise: promise)
        }
    }

    // MARK: responses

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if var before = unread {
            unread = nil
            before.writeBuffer(&bytes)
            bytes = before
        }
        guard !parser.upgraded else {
            // Held for a tunnel that normally takes over within the 101's own read; bounded like
            // a header block, in case none ever does.
            unread = bytes
            if bytes.readableBytes > parser.maxHeaderBytes {
                failed(
                    context,
                    UpstreamProtocolError("more than \(parser.maxHeaderBytes) bytes after a 101 with no tunnel"))
            }
            return
        }
        guard awaiting else {
            if bytes.readableBytes > 0 {
                failed(context, UpstreamProtocolError("bytes sent with no request outstanding"))
            }
            return
        }
        do {
            while let event = try parser.next(&bytes) {
                switch event {
                case .head(let h):
                    if !parser.keepAlive { reusable = false }
                    delegate?.upstreamHead(h)
                case .body(let b):
                    delegate?.upstreamBody(b)
                case .end(let t):
                    awaiting = false
                    if !parser.keepAlive { reusable = false }
                    if parser.upgraded {
                        // The rest is the new protocol's. Kept before the delegate hears of the
                        // end: it makes the connection a tunnel at once and takes them.
                        if bytes.readableBytes > 0 { unread = bytes }
                        let d = delegate
                        delegate = nil
                        d?.upstreamEnd(t)
                        return
                    }
                    let d = delegate
                    delegate = nil
                    d?.upstreamEnd(t)
                    // The delegate may have sent the next request on this connection already.
                    if !awaiting {
                        if bytes.readableBytes > 0 {
                            failed(context, UpstreamProtocolError("bytes sent after the response"))
                        }
                        return
                    }
                }
            }
        } catch {
            failed(context, error)
            return
        }
        if bytes.readableBytes > 0 { unread = bytes }
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
        if parser.closed() {
            // A body delimited by the connection's end is complete.
            awaiting = false
            d?.upstreamEnd(nil)
        } else {
            d?.upstreamFailed(ChannelError.ioOnClosedChannel)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failed(context, error)
    }

    private func failed(_ context: ChannelHandlerContext, _ error: any Error) {
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
    /// Bound on an upstream response's header block.
    let maxHeaderBytes: Int
    struct Key: Hashable {
        var host: String
        var port: Int
    }
    /// Per endpoint, oldest first: requests take the most recently used (warm) connection, so
    /// the ones a burst left behind age at the front until the sweep closes them.
    private var idle: [Key: IdleList] = [:]
    final class IdleList {
        var conns: [UpstreamConnection] = []
    }
    /// The list last used, by key: a loop's requests mostly go to the endpoint the previous one
    /// went to, and comparing its host and port costs less than hashing them (twice a request).
    private var last: (key: Key, list: IdleList)?

    /// The idle list of `key`, made if `create` and missing.
    private func list(_ key: Key, create: Bool) -> IdleList? {
        if let l = last, l.key == key { return l.list }
        let list: IdleList
        if let found = idle[key] {
            list = found
        } else {
            guard create else { return nil }
            list = IdleList()
            idle[key] = list
        }
        last = (key, list)
        return list
    }

    /// Drops `key`'s list once it is empty (and the cache of it).
    private func dropIfEmpty(_ key: Key, _ list: IdleList) {
        guard list.conns.isEmpty else { return }
        idle[key] = nil
        if last?.list === list { last = nil }
    }
    private var sweep: RepeatedTask?

    let slots: ConnectionSlots
    /// Told the cluster of every connection this pool opens (a metric).
    let opened: @Sendable (String) -> Void

    init(
        loop: any EventLoop, maxIdlePerEndpoint: Int, idleTimeout: TimeAmount, maxHeaderBytes: Int = 64 * 1024,
        slots: ConnectionSlots, opened: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.loop = loop
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
        self.idleTimeout = idleTimeout
        self.maxHeaderBytes = maxHeaderBytes
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
            let stale = list.conns.prefix { $0.idleSince < cutoff }
            guard !stale.isEmpty else { continue }
            for c in stale { c.channel.close(promise: nil) }
            list.conns.removeFirst(stale.count)
            dropIfEmpty(key, list)
        }
    }

    /// Idle connections in the pool (all endpoints).
    var idleCount: Int { idle.values.reduce(0) { $0 + $1.conns.count } }

    /// A live idle connection to `host:port`, if there is one (no future on this hot path).
    func takeIdle(host: String, port: Int) -> UpstreamConnection? {
        guard let list = list(Key(host: host, port: port), create: false) else { return nil }
        while let conn = list.conns.popLast() {
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
        let handler = UpstreamHandler(maxHeaderBytes: maxHeaderBytes)
        opened(cluster)
        return ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    // No header validation on the way out: the headers were parsed by a decoder
                    // that validates them (llhttp, HPACK, this handler) or are ours.
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
            guard let i = list.conns.firstIndex(where: { $0.cluster == cluster }) else { continue }
            list.conns.remove(at: i).channel.close(promise: nil)
            dropIfEmpty(key, list)
            return
        }
    }

    /// Turns an HTTP/1.1 connection that answered 101 into a byte tunnel to `partner`: the HTTP
    /// handler leaves. Returns the bytes it had read past the 101, for the caller to write to
    /// `partner` once that is a tunnel too (its HTTP handler would take them for a response part).
    static func tunnel(_ conn: UpstreamConnection, to partner: any Channel) throws -> ByteBuffer? {
        let early = conn.handler.takeUnread()
        let sync = conn.channel.pipeline.syncOperations
        try sync.addHandler(TCPGlue(partner: partner))
        sync.removeHandler(conn.handler, promise: nil)
        return early
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
        conn.idleSince = .now()
        let list = list(conn.key, create: true)!
        guard list.conns.count < maxIdlePerEndpoint else { return conn.channel.close(promise: nil) }
        list.conns.append(conn)
    }

    func closeAll() {
        sweep?.cancel()
        sweep = nil
        for list in idle.values { for c in list.conns { c.channel.close(promise: nil) } }
        idle = [:]
        last = nil
    }
}

/// One pool per event loop.
final class UpstreamPools: Sendable {
    private let pools = NIOLockedValueBox<[ObjectIdentifier: NIOLoopBound<UpstreamPool>]>([:])
    let maxIdlePerEndpoint: Int
    let idleTimeout: TimeAmount
    let maxHeaderBytes: Int
    let slots: ConnectionSlots
    let opened: @Sendable (String) -> Void

    init(
        maxIdlePerEndpoint: Int, idleTimeout: TimeAmount, maxHeaderBytes: Int = 64 * 1024, slots: ConnectionSlots,
        opened: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
        self.idleTimeout = idleTimeout
        self.maxHeaderBytes = maxHeaderBytes
        self.slots = slots
        self.opened = opened
    }

    /// This loop's pool (call on `loop`).
    func pool(for loop: any EventLoop) -> UpstreamPool {
        let id = ObjectIdentifier(loop)
        let (bound, created) = pools.withLockedValue { p -> (NIOLoopBound<UpstreamPool>, Bool) in
            if let b = p[id] { return (b, false) }
            let pool = UpstreamPool(
                loop: loop, maxIdlePerEndpoint: maxIdlePerEndpoint, idleTimeout: idleTimeout,
                maxHeaderBytes: maxHeaderBytes, slots: slots, opened: opened)
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
