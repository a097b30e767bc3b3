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
    let handler: UpstreamHandler
    /// Requests already completed on this connection (0 = fresh).
    var uses = 0

    init(channel: any Channel, key: UpstreamPool.Key, handler: UpstreamHandler) {
        self.channel = channel
        self.key = key
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
    struct Key: Hashable {
        var host: String
        var port: Int
    }
    private var idle: [Key: [UpstreamConnection]] = [:]

    init(loop: any EventLoop, maxIdlePerEndpoint: Int) {
        self.loop = loop
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
    }

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

    /// A live idle connection to `host:port`, or a new one.
    func acquire(host: String, port: Int, connectTimeout: TimeAmount) -> EventLoopFuture<UpstreamConnection> {
        loop.preconditionInEventLoop()
        if let c = takeIdle(host: host, port: port) { return loop.makeSucceededFuture(c) }
        return connect(host: host, port: port, connectTimeout: connectTimeout)
    }

    /// A new connection to `host:port`.
    func connect(host: String, port: Int, connectTimeout: TimeAmount) -> EventLoopFuture<UpstreamConnection> {
        let key = Key(host: host, port: port)
        let handler = UpstreamHandler()
        return ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    // Bytes after a 101 response belong to the upgraded protocol: forwarded, not dropped.
                    try ch.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .forwardBytes)
                    try ch.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port)
            .map { UpstreamConnection(channel: $0, key: key, handler: handler) }
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
        guard conn.channel.isActive, conn.handler.reusable else {
            conn.channel.close(promise: nil)
            return
        }
        if idle[conn.key, default: []].count >= maxIdlePerEndpoint {
            conn.channel.close(promise: nil)
            return
        }
        idle[conn.key, default: []].append(conn)
    }

    func closeAll() {
        for list in idle.values { for c in list { c.channel.close(promise: nil) } }
        idle = [:]
    }
}

/// One pool per event loop.
final class UpstreamPools: Sendable {
    private let pools = NIOLockedValueBox<[ObjectIdentifier: NIOLoopBound<UpstreamPool>]>([:])
    let maxIdlePerEndpoint: Int

    init(maxIdlePerEndpoint: Int) { self.maxIdlePerEndpoint = maxIdlePerEndpoint }

    func pool(for loop: any EventLoop) -> UpstreamPool {
        let id = ObjectIdentifier(loop)
        let bound = pools.withLockedValue { p -> NIOLoopBound<UpstreamPool> in
            if let b = p[id] { return b }
            let b = NIOLoopBound(UpstreamPool(loop: loop, maxIdlePerEndpoint: maxIdlePerEndpoint), eventLoop: loop)
            p[id] = b
            return b
        }
        return bound.value
    }

    func closeAll() {
        let all = pools.withLockedValue { Array($0.values) }
        for b in all { b.eventLoop.execute { b.value.closeAll() } }
    }
}
