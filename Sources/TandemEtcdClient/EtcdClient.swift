/// TandemEtcdClient — a small etcd v3 client over gRPC on NIOHTTP2, for Tandem's own
/// registry and for real etcd clusters. Used by the sidecar (registration, discovery) and the
/// CLI. It speaks the same wire format as etcdctl: h2c, `application/grpc`, protobuf.
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import SwiftProtobuf
import TandemCore
import TandemEtcdAPI
import TandemHTTP2

/// A failed call: the gRPC status code and message (etcd's text, e.g. "etcdserver: requested
/// lease not found"), or a transport failure reported as `unavailable`.
public struct EtcdClientError: Error, CustomStringConvertible, Sendable {
    public var code: Int
    public var message: String
    public init(code: Int, message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "etcd error \(code): \(message)" }
    public static func unavailable(_ m: String) -> EtcdClientError { .init(code: 14, message: m) }
    public var isLeaseNotFound: Bool { message.contains("requested lease not found") }
}

/// A registry member's client address (`host:port` or `http://host:port`).
public typealias EtcdEndpoint = HostPort

extension HostPort {
    /// Comma-separated endpoints; each needs a real port.
    public static func parseList(_ s: String) throws -> [EtcdEndpoint] {
        let parts = s.split(separator: ",").map(String.init).filter { !$0.isEmpty }
        var out: [EtcdEndpoint] = []
        for p in parts {
            guard let e = EtcdEndpoint(p), e.port > 0 else {
                throw EtcdClientError(
                    code: 3, message: "bad registry endpoint \"\(p)\": expected host:port or http://host:port")
            }
            out.append(e)
        }
        guard !out.isEmpty else { throw EtcdClientError(code: 3, message: "no registry endpoints given") }
        return out
    }
}

/// A connection to an etcd-compatible cluster. Calls go to the current endpoint; a member that
/// cannot be connected to is skipped for the next one within the same call, and after a
/// transport failure mid-call the next call goes to the next endpoint.
/// All mutable state is confined to `loop`.
public final class EtcdClient: @unchecked Sendable {
    public let endpoints: [EtcdEndpoint]
    public let loop: any EventLoop
    /// Deadline for unary calls.
    public var callTimeout: TimeAmount = .seconds(5)
    public var connectTimeout: TimeAmount = .seconds(2)
    /// Bound on one response message.
    public static let maxMessageBytes = 16 << 20
    /// The `token` metadata of every call (an etcd auth token from `authenticate`, or a
    /// Tandem service token for the registry); nil sends none. Set before the first call.
    public var authToken: @Sendable () -> String? = { nil }

    private var current = 0
    private var connection: EventLoopFuture<Connection>?
    /// Which connection `connection` is, so that an old one's close or GOAWAY cannot drop a
    /// newer one.
    private var connectionNumber = 0

    struct Connection: Sendable {
        let channel: any Channel
        let mux: NIOLoopBound<NIOHTTP2Handler.StreamMultiplexer>
    }

    public init(endpoints: [EtcdEndpoint], loop: any EventLoop) {
        precondition(!endpoints.isEmpty)
        self.endpoints = endpoints
        self.loop = loop
    }

    public var currentEndpoint: EtcdEndpoint { endpoints[current % endpoints.count] }

    private func connect() -> EventLoopFuture<Connection> {
        loop.preconditionInEventLoop()
        if let c = connection { return c }
        let ep = currentEndpoint
        connectionNumber += 1
        let number = connectionNumber
        let f = ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeSucceededVoidFuture()
            }
            .connect(host: ep.host, port: ep.port)
            .flatMap { ch -> EventLoopFuture<Connection> in
                // A member that sends GOAWAY (shutting down, or refusing this connection)
                // takes no new calls on it: later calls connect again, to the next member.
                HTTP2Connections.configure(
                    ch, mode: .client,
                    onGoAway: { [weak self] in self?.dropConnection(number, advance: true) },
                    inbound: { $0.close() }
                ).map {
                    Connection(channel: ch, mux: NIOLoopBound($0, eventLoop: ch.eventLoop))
                }
            }
        connection = f
        f.whenComplete { [weak self] r in
            guard let self else { return }
            switch r {
            case .failure: self.dropConnection(number, advance: true)
            case .success(let conn):
                conn.channel.closeFuture.whenComplete { _ in self.dropConnection(number, advance: false) }
            }
        }
        return f
    }

    /// Could not connect to any endpoint: nothing was sent.
    struct ConnectFailure: Error, CustomStringConvertible {
        let description: String
    }

    /// Connects to the current endpoint or, failing that, to each next one in turn (a failed
    /// connect moves `current` on): nothing has been sent yet, so another member may take the
    /// call. clientv3 does the same through its balancer.
    private func connectAny(left: Int, failures: [String] = []) -> EventLoopFuture<Connection> {
        let ep = currentEndpoint
        return connect().flatMapError { error in
            let failures = failures + ["\(ep): \(error)"]
            guard left > 1 else {
                return self.loop.makeFailedFuture(ConnectFailure(description: failures.joined(separator: "; ")))
            }
            return self.connectAny(left: left - 1, failures: failures)
        }
    }

    /// Maps a call's failure to the client's error. A transport failure after the connection
    /// was made moves the next call to another member; a failed connect already has.
    private func callFailure(_ error: any Error) -> EtcdClientError {
        if let c = error as? ConnectFailure { return .unavailable(c.description) }
        if let e = error as? EtcdClientError {
            if e.code == 14 { failover() }
            return e
        }
        let e = EtcdClientError.unavailable("\(currentEndpoint): \(error)")
        failover()
        return e
    }

    /// Forgets connection `number` if it is still the current one.
    private func dropConnection(_ number: Int, advance: Bool) {
        loop.preconditionInEventLoop()
        guard number == connectionNumber, connection != nil else { return }
        connection = nil
        if advance { current = (current + 1) % endpoints.count }
    }

    /// Moves to the next endpoint (after an error that says this member cannot serve).
    public func failover() {
        loop.execute {
            if let c = self.connection { c.whenSuccess { $0.channel.close(promise: nil) } }
            self.connection = nil
            self.current = (self.current + 1) % self.endpoints.count
        }
    }

    static func requestHeaders(path: String, authority: String, token: String? = nil) -> HPACKHeaders {
        var h: HPACKHeaders = [
            ":method": "POST", ":scheme": "http", ":path": path, ":authority": authority,
            "content-type": "application/grpc", "te": "trailers", "user-agent": "tandem-etcd-client",
        ]
        if let token { h.add(name: "token", value: token) }
        return h
    }

    /// Logs in the etcd way (Auth/Authenticate) and sends the token with every later call.
    public func authenticate(user: String, password: String) -> EventLoopFuture<Void> {
        var req = Etcdserverpb_AuthenticateRequest()
        req.name = user
        req.password = password
        return unary("/etcdserverpb.Auth/Authenticate", req, as: Etcdserverpb_AuthenticateResponse.self).map { r in
            let token = r.token
            self.authToken = { token }
        }
    }

    /// One unary call; the response is decoded as `Resp`.
    public func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ request: Req, as: Resp.Type = Resp.self
    ) -> EventLoopFuture<Resp> {
        let payload: [UInt8]
        do { payload = try request.serializedBytes() } catch { return loop.makeFailedFuture(error) }
        return unaryBytes(path, payload).flatMapThrowing { bytes in try Resp(serializedBytes: bytes) }
    }

    /// One unary call with an already encoded request; the response message's bytes.
    /// (Also how the sidecar speaks grpc.health.v1 to apps, with hand-encoded messages.)
    public func unaryBytes(_ path: String, _ payload: [UInt8]) -> EventLoopFuture<[UInt8]> {
        loop.flatSubmit {
            self.connectAny(left: self.endpoints.count).flatMap { conn -> EventLoopFuture<[UInt8]> in
                let promise = self.loop.makePromise(of: [UInt8].self)
                let authority = self.currentEndpoint.description
                let timeout = self.callTimeout
                let token = self.authToken()
                // A stream that cannot be created (the connection is going away) never runs
                // the initializer: fail the call here, or nothing would.
                let created = self.loop.makePromise(of: (any Channel).self)
                created.futureResult.whenFailure { promise.fail($0) }
                conn.mux.value.createStreamChannel(promise: created) { stream in
                    let handler = UnaryCallHandler(promise: promise)
                    return stream.pipeline.addHandler(handler).map {
                        handler.start(
                            context: stream,
                            headers: Self.requestHeaders(path: path, authority: authority, token: token),
                            message: payload, timeout: timeout)
                    }
                }
                return promise.futureResult
            }.flatMapErrorThrowing { error in throw self.callFailure(error) }
        }
    }

    /// Opens a bidirectional stream (Watch, LeaseKeepAlive). `onMessage` gets each response;
    /// `onClose` runs once with nil (clean end) or the error.
    public func openStream(
        _ path: String, onMessage: @escaping @Sendable ([UInt8]) -> Void,
        onClose: @escaping @Sendable (EtcdClientError?) -> Void
    ) -> EventLoopFuture<EtcdStream> {
        loop.flatSubmit {
            self.connectAny(left: self.endpoints.count).flatMap { conn -> EventLoopFuture<EtcdStream> in
                let promise = self.loop.makePromise(of: EtcdStream.self)
                let authority = self.currentEndpoint.description
                let token = self.authToken()
                let created = self.loop.makePromise(of: (any Channel).self)
                created.futureResult.whenFailure { promise.fail($0) }
                conn.mux.value.createStreamChannel(promise: created) { stream in
                    let handler = StreamCallHandler(onMessage: onMessage, onClose: onClose)
                    return stream.pipeline.addHandler(handler).map {
                        handler.start(
                            stream, headers: Self.requestHeaders(path: path, authority: authority, token: token))
                        promise.succeed(EtcdStream(channel: stream))
                    }
                }
                return promise.futureResult
            }.flatMapErrorThrowing { error in
                let e = self.callFailure(error)
                throw e.code == 14 ? e : EtcdClientError.unavailable("\(error)")
            }
        }
    }

    public func close() {
        loop.execute {
            self.connection?.whenSuccess { $0.channel.close(promise: nil) }
            self.connection = nil
        }
    }
}

/// The sending side of a client stream.
public struct EtcdStream: Sendable {
    let channel: any Channel

    public func send<M: SwiftProtobuf.Message>(_ message: M) {
        guard let bytes = try? message.serializedBytes() as [UInt8] else { return }
        let ch = channel
        ch.eventLoop.execute {
            var buf = ch.allocator.buffer(capacity: bytes.count + 5)
            buf.writeInteger(UInt8(0))
            buf.writeInteger(UInt32(bytes.count))
            buf.writeBytes(bytes)
            ch.writeAndFlush(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(buf))), promise: nil)
        }
    }

    /// Ends the stream from our side and closes it.
    public func cancel() { channel.close(promise: nil) }
}

/// gRPC message framing shared by the handlers.
struct GRPCFramer {
    var buffer: ByteBuffer?

    mutating func append(_ b: ByteBuffer) {
        var b = b
        if buffer == nil { buffer = b } else { buffer!.writeBuffer(&b) }
    }

    mutating func next() throws -> [UInt8]? {
        guard var b = buffer, b.readableBytes >= 5,
            let flag: UInt8 = b.getInteger(at: b.readerIndex),
            let len: UInt32 = b.getInteger(at: b.readerIndex + 1)
        else { return nil }
        if flag != 0 { throw EtcdClientError(code: 12, message: "compressed response messages are not supported") }
        if Int(len) > EtcdClient.maxMessageBytes {
            throw EtcdClientError(code: 8, message: "response message of \(len) bytes exceeds the client limit")
        }
        guard b.readableBytes >= 5 + Int(len) else { return nil }
        b.moveReaderIndex(forwardBy: 5)
        let msg = b.readBytes(length: Int(len))!
        buffer = b.readableBytes > 0 ? b : nil
        return msg
    }

    static func status(_ headers: HPACKHeaders) -> EtcdClientError?? {
        guard let s = headers.first(name: "grpc-status"), let code = Int(s) else { return nil }
        if code == 0 { return .some(nil) }
        let msg = headers.first(name: "grpc-message").map(GRPCText.percentDecode) ?? ""
        return .some(EtcdClientError(code: code, message: msg))
    }
}

final class UnaryCallHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    let promise: EventLoopPromise<[UInt8]>
    private var framer = GRPCFramer()
    private var response: [UInt8]?
    private var done = false
    private var timer: Scheduled<Void>?

    init(promise: EventLoopPromise<[UInt8]>) { self.promise = promise }

    func start(context channel: any Channel, headers: HPACKHeaders, message: [UInt8], timeout: TimeAmount) {
        channel.write(HTTP2Frame.FramePayload.headers(.init(headers: headers)), promise: nil)
        var buf = channel.allocator.buffer(capacity: message.count + 5)
        buf.writeInteger(UInt8(0))
        buf.writeInteger(UInt32(message.count))
        buf.writeBytes(message)
        channel.writeAndFlush(
            HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(buf), endStream: true)), promise: nil)
        timer = channel.eventLoop.scheduleTask(in: timeout) { [weak self] in
            self?.fail(EtcdClientError(code: 4, message: "context deadline exceeded"))
            channel.close(promise: nil)
        }
    }

    private func fail(_ e: EtcdClientError) {
        guard !done else { return }
        done = true
        timer?.cancel()
        promise.fail(e)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if let status = GRPCFramer.status(h.headers) {
                guard !done else { return }
                if let err = status {
                    fail(err)
                } else if let r = response {
                    done = true
                    timer?.cancel()
                    promise.succeed(r)
                } else {
                    fail(EtcdClientError(code: 13, message: "unary call ended without a response message"))
                }
                // Trailers end the stream and NIOHTTP2 closes the channel itself; closing it
                // here, while the final frame is still being read, would reset the stream
                // (RST_STREAM CANCEL) — and servers end connections that see many resets.
                if !h.endStream { context.close(promise: nil) }
            }
        case .data(let d):
            guard case .byteBuffer(let b) = d.data else { return }
            framer.append(b)
            do {
                while let m = try framer.next() { response = m }
            } catch let e as EtcdClientError {
                fail(e)
                context.close(promise: nil)
            } catch {}
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(.unavailable("stream closed before the response completed"))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(.unavailable("\(error)"))
        context.close(promise: nil)
    }
}

final class StreamCallHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload

    let onMessage: @Sendable ([UInt8]) -> Void
    let onClose: @Sendable (EtcdClientError?) -> Void
    private var framer = GRPCFramer()
    private var closed = false

    init(onMessage: @escaping @Sendable ([UInt8]) -> Void, onClose: @escaping @Sendable (EtcdClientError?) -> Void) {
        self.onMessage = onMessage
        self.onClose = onClose
    }

    func start(_ channel: any Channel, headers: HPACKHeaders) {
        channel.writeAndFlush(HTTP2Frame.FramePayload.headers(.init(headers: headers)), promise: nil)
    }

    private func close(_ e: EtcdClientError?) {
        guard !closed else { return }
        closed = true
        onClose(e)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if let status = GRPCFramer.status(h.headers) {
                close(status)
                if !h.endStream { context.close(promise: nil) }  // as in UnaryCallHandler
            }
        case .data(let d):
            guard case .byteBuffer(let b) = d.data else { return }
            framer.append(b)
            do {
                while let m = try framer.next() { onMessage(m) }
            } catch let e as EtcdClientError {
                close(e)
                context.close(promise: nil)
            } catch {}
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) { close(.unavailable("stream closed")) }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        close(.unavailable("\(error)"))
        context.close(promise: nil)
    }
}
