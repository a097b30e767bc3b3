/// TandemRegistryServer — the registry as a server: gRPC framing on NIOHTTP2, the etcd v3
/// services, and the raft loop that owns a `RegistryReplica`.
///
/// Shell only: every decision is in TandemRaft/TandemStore/TandemReplica. Network I/O runs
/// on NIO event loops; the replica (and its fsyncs) on a dedicated raft loop, so the disk
/// never blocks a network loop.
import NIOCore
import NIOHPACK
import NIOHTTP2
import TandemCore
import TandemEtcdAPI

/// What a method handler uses to answer: send messages, then finish with a status. Safe to
/// use from any thread; it hops to the stream's event loop.
public struct GRPCResponder: Sendable {
    let handler: NIOLoopBound<GRPCStreamHandler>
    /// The client sent `hasleader: true` metadata (clientv3's `WithRequireLeader`): the
    /// stream must fail with "etcdserver: no leader" while this member has no leader.
    public let requireLeader: Bool
    /// The `token` metadata (etcd's auth token, or a Tandem service token for the registry).
    public let authToken: String?

    public func send(_ message: [UInt8]) {
        handler.eventLoop.execute { handler.value.sendMessage(message) }
    }

    public func finish(_ status: EtcdStatus? = nil) {
        handler.eventLoop.execute { handler.value.finish(status) }
    }

    /// Runs `body` when the stream is closed by the client or the connection (for cleanup).
    public func onClose(_ body: @escaping @Sendable () -> Void) {
        handler.eventLoop.execute { handler.value.closeCallbacks.append(body) }
    }
}

/// A method of the router. Unary methods get one request and must finish; streaming
/// methods get every message as it arrives and `end` when the client half-closes.
public enum GRPCMethod: Sendable {
    case unary(@Sendable ([UInt8], GRPCResponder) -> Void)
    case bidi(open: @Sendable (GRPCResponder) -> GRPCStreamSink)
}

/// The receiving side of a streaming call.
public struct GRPCStreamSink: Sendable {
    public var message: @Sendable ([UInt8]) -> Void
    public var end: @Sendable () -> Void
    public init(message: @escaping @Sendable ([UInt8]) -> Void, end: @escaping @Sendable () -> Void) {
        self.message = message
        self.end = end
    }
}

/// One HTTP/2 stream carrying one gRPC call (h2c, as etcdctl and clientv3 speak it).
final class GRPCStreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private let methods: [String: GRPCMethod]
    private let maxMessageBytes: Int
    private var context: ChannelHandlerContext?
    private var buffer: ByteBuffer?
    private var method: GRPCMethod?
    private var sink: GRPCStreamSink?
    private var unaryRequest: [UInt8]?
    private var headersSent = false
    private var finished = false
    private var requireLeader = false
    private var authToken: String?
    var closeCallbacks: [@Sendable () -> Void] = []
    /// The connection's PING policing: told of open calls and of what this stream sends.
    private let pings: PingGuard?
    private var counted = false

    init(methods: [String: GRPCMethod], maxMessageBytes: Int, pings: PingGuard? = nil) {
        self.methods = methods
        self.maxMessageBytes = maxMessageBytes
        self.pings = pings
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        pings?.openCalls += 1
        counted = true
    }

    func channelInactive(context: ChannelHandlerContext) {
        if counted {
            counted = false
            pings?.openCalls -= 1
        }
        finished = true
        for c in closeCallbacks { c() }
        closeCallbacks = []
        sink?.end()
        sink = nil
        context.fireChannelInactive()
    }

    private var responder: GRPCResponder {
        GRPCResponder(
            handler: NIOLoopBound(self, eventLoop: context!.eventLoop), requireLeader: requireLeader,
            authToken: authToken)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if method == nil {
                let path = h.headers.first(name: ":path") ?? ""
                guard let m = methods[path] else {
                    finish(EtcdStatus(.unimplemented, "unknown method \(path)"))
                    return
                }
                method = m
                requireLeader = h.headers.first(name: "hasleader") == "true"
                authToken = h.headers.first(name: "token")
                if case .bidi(let open) = m { sink = open(responder) }
            }
            if h.endStream { endOfRequest() }
        case .data(let d):
            guard case .byteBuffer(var bytes) = d.data else { return }
            if buffer == nil { buffer = bytes } else { buffer!.writeBuffer(&bytes) }
            drainMessages()
            if d.endStream { endOfRequest() }
        default:
            break
        }
    }

    /// Splits the buffer into gRPC messages: [compressed flag][u32 length][message].
    private func drainMessages() {
        while var b = buffer, b.readableBytes >= 5 {
            guard let flag: UInt8 = b.getInteger(at: b.readerIndex),
                let len: UInt32 = b.getInteger(at: b.readerIndex + 1)
            else { return }
            if flag != 0 {
                finish(EtcdStatus(.unimplemented, "compressed gRPC messages are not supported"))
                return
            }
            if Int(len) > maxMessageBytes {
                finish(.requestTooLarge)
                return
            }
            guard b.readableBytes >= 5 + Int(len) else { return }
            b.moveReaderIndex(forwardBy: 5)
            let msg = b.readBytes(length: Int(len))!
            buffer = b.readableBytes > 0 ? b : nil
            deliver(msg)
            if finished { return }
        }
    }

    private func deliver(_ msg: [UInt8]) {
        switch method {
        case .unary?:
            if unaryRequest != nil {
                finish(EtcdStatus(.invalidArgument, "unary call carried more than one message"))
            } else {
                unaryRequest = msg
            }
        case .bidi?:
            sink?.message(msg)
        case nil:
            break
        }
    }

    private func endOfRequest() {
        switch method {
        case .unary(let call)?:
            guard let req = unaryRequest else {
                finish(EtcdStatus(.invalidArgument, "unary call without a request message"))
                return
            }
            call(req, responder)
        case .bidi?:
            sink?.end()
            sink = nil
        case nil:
            break
        }
    }

    private func sendHeaders() {
        guard !headersSent, let context else { return }
        headersSent = true
        let h: HPACKHeaders = [":status": "200", "content-type": "application/grpc"]
        context.write(wrapOutboundOut(.headers(.init(headers: h))), promise: nil)
    }

    func sendMessage(_ message: [UInt8]) {
        guard !finished, let context else { return }
        sendHeaders()
        var out = context.channel.allocator.buffer(capacity: message.count + 5)
        out.writeInteger(UInt8(0))
        out.writeInteger(UInt32(message.count))
        out.writeBytes(message)
        pings?.policy.sent()
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(out)))), promise: nil)
    }

    func finish(_ status: EtcdStatus?) {
        guard !finished, let context else { return }
        finished = true
        var trailers: HPACKHeaders = [:]
        if !headersSent {
            // Trailers-only response.
            trailers.add(name: ":status", value: "200")
            trailers.add(name: "content-type", value: "application/grpc")
            headersSent = true
        }
        trailers.add(name: "grpc-status", value: String(status?.code.rawValue ?? 0))
        if let s = status { trailers.add(name: "grpc-message", value: GRPCText.percentEncode(s.message)) }
        pings?.policy.sent()
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: trailers, endStream: true))), promise: nil)
    }
}

/// One client connection's PING policing (etcd's `--grpc-keepalive-min-time`; the rules are
/// PingEnforcement's). Sits after the HTTP/2 handler, which acks every PING and passes the
/// connection's own frames on; the connection's streams run on the same event loop.
final class PingGuard: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame
    var policy: PingEnforcement
    var openCalls = 0
    private var ended = false

    init(minTimeNanos: Int64) { policy = PingEnforcement(minTimeNanos: minTimeNanos) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if case .ping(_, ack: false) = frame.payload, !ended,
            policy.pingReceived(now: Int64(NIODeadline.now().uptimeNanoseconds), openCalls: openCalls)
        {
            ended = true
            let goAway = HTTP2Frame(
                streamID: .rootStream,
                payload: .goAway(
                    lastStreamID: .maxID, errorCode: .enhanceYourCalm,
                    opaqueData: context.channel.allocator.buffer(string: PingEnforcement.goAwayDebugData)))
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(goAway)).whenComplete { _ in channel.close(promise: nil) }
            return
        }
        context.fireChannelRead(data)
    }
}
