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
}

extension UpstreamDelegate {
    func upstreamReadComplete() {}
}

/// An HTTP/1.1 connection to one endpoint, reused for sequential requests.
/// Loop-confined (its channel's event loop).
final class UpstreamConnection: @unchecked Sendable {
    let channel: any Channel
    let key: String
    let handler: UpstreamHandler
    /// Requests already completed on this connection (0 = fresh).
    var uses = 0

    init(channel: any Channel, key: String, handler: UpstreamHandler) {
        self.channel = channel
        self.key = key
        self.handler = handler
    }
}

final class UpstreamHandler: ChannelInboundHandler, @unchecked Sendable {
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
    private var idle: [String: [UpstreamConnection]] = [:]

    init(loop: any EventLoop, maxIdlePerEndpoint: Int) {
        self.loop = loop
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
    }

    /// A live idle connection to `host:port`, or a new one.
    func acquire(host: String, port: Int, connectTimeout: TimeAmount) -> EventLoopFuture<UpstreamConnection> {
        loop.preconditionInEventLoop()
        let key = "\(host):\(port)"
        while var list = idle[key], let conn = list.popLast() {
            idle[key] = list
            if conn.channel.isActive && conn.handler.reusable { return loop.makeSucceededFuture(conn) }
            conn.channel.close(promise: nil)
        }
        let handler = UpstreamHandler()
        return ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port)
            .map { UpstreamConnection(channel: $0, key: key, handler: handler) }
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
        var list = idle[conn.key] ?? []
        if list.count >= maxIdlePerEndpoint {
            conn.channel.close(promise: nil)
            return
        }
        list.append(conn)
        idle[conn.key] = list
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
