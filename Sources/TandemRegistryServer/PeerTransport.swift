import NIOCore
import NIOPosix
import TandemCore
import TandemRaft

/// What travels between members: Raft messages, and lease keep-alives forwarded to the
/// leader (only the leader's lease clock may renew) with their answers.
enum PeerFrame: Sendable {
    case raft(Message)
    case leaseRenew(requestID: UInt64, from: NodeID, lease: Int64)
    case leaseRenewed(requestID: UInt64, ttl: Int64)
    /// Remaining TTL (seconds) of a lease, asked of the leader; -1 when unknown there.
    case leaseRemaining(requestID: UInt64, from: NodeID, lease: Int64)
    case leaseRemainingIs(requestID: UInt64, seconds: Int64)

    func encoded() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case .raft(let m):
            w.u8(0)
            w.raw(m.encoded())
        case .leaseRenew(let id, let from, let lease):
            w.u8(1)
            w.varint(id)
            w.varint(from)
            w.zigzag(lease)
        case .leaseRenewed(let id, let ttl):
            w.u8(2)
            w.varint(id)
            w.zigzag(ttl)
        case .leaseRemaining(let id, let from, let lease):
            w.u8(3)
            w.varint(id)
            w.varint(from)
            w.zigzag(lease)
        case .leaseRemainingIs(let id, let secs):
            w.u8(4)
            w.varint(id)
            w.zigzag(secs)
        }
        return w.bytes
    }

    init(decoding b: [UInt8]) throws(CodecError) {
        var r = ByteReader(b)
        switch try r.u8() {
        case 0: self = .raft(try Message(decoding: Array(b[1...])))
        case 1: self = .leaseRenew(requestID: try r.varint(), from: try r.varint(), lease: try r.zigzag())
        case 2: self = .leaseRenewed(requestID: try r.varint(), ttl: try r.zigzag())
        case 3: self = .leaseRemaining(requestID: try r.varint(), from: try r.varint(), lease: try r.zigzag())
        case 4: self = .leaseRemainingIs(requestID: try r.varint(), seconds: try r.zigzag())
        case let t: throw .badTag(what: "peer frame", tag: UInt64(t), offset: 0)
        }
    }
}

/// `[u32 length][frame]` on a TCP stream; frames above `maxFrameBytes` close the connection.
final class PeerFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = [UInt8]
    let maxFrameBytes: Int
    init(maxFrameBytes: Int) { self.maxFrameBytes = maxFrameBytes }

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let len: UInt32 = buffer.getInteger(at: buffer.readerIndex) else { return .needMoreData }
        guard Int(len) <= maxFrameBytes else {
            throw StorageLikeError("peer frame of \(len) bytes exceeds maxFrameBytes=\(maxFrameBytes)")
        }
        guard buffer.readableBytes >= 4 + Int(len) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        context.fireChannelRead(wrapInboundOut(buffer.readBytes(length: Int(len))!))
        return .continue
    }
}

struct StorageLikeError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

final class PeerInboundHandler: ChannelInboundHandler {
    typealias InboundIn = [UInt8]
    let deliver: @Sendable (PeerFrame) -> Void
    init(deliver: @escaping @Sendable (PeerFrame) -> Void) { self.deliver = deliver }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // A peer that sends garbage is disconnected; Raft treats it as message loss.
        guard let frame = try? PeerFrame(decoding: unwrapInboundIn(data)) else {
            context.close(promise: nil)
            return
        }
        deliver(frame)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// Outbound connections to every peer (one TCP stream each way), with reconnect and a
/// bounded backlog. All state lives on the raft loop.
final class PeerTransport: @unchecked Sendable {
    /// Frames buffered per peer while it is unreachable; older ones are dropped (Raft resends).
    static let maxBacklogFrames = 1_024
    static let maxFrameBytes = 512 << 20
    /// Bytes queued to one peer before frames are dropped (Raft resends what is lost).
    static let writeBufferHighBytes = 16 << 20
    static let writeBufferLowBytes = 8 << 20

    /// Touched only on the raft loop (NIO callbacks hop there first).
    final class Link: @unchecked Sendable {
        let id: NodeID
        let host: String
        let port: Int
        var channel: (any Channel)?
        var connecting = false
        var backlog: [[UInt8]] = []
        var backoffMs: Int64 = 50
        var dropped = 0
        init(id: NodeID, host: String, port: Int) {
            self.id = id
            self.host = host
            self.port = port
        }
    }

    let loop: any EventLoop
    let group: any EventLoopGroup
    private var links: [NodeID: Link] = [:]
    private var listener: (any Channel)?
    /// Called on the raft loop when a peer could not be reached (Raft then probes).
    var onUnreachable: (NodeID) -> Void = { _ in }

    init(loop: any EventLoop, group: any EventLoopGroup, peers: [NodeID: (host: String, port: Int)]) {
        self.loop = loop
        self.group = group
        for (id, a) in peers { links[id] = Link(id: id, host: a.host, port: a.port) }
    }

    /// Listens for peers; every frame is handed to `deliver` on the raft loop.
    func listen(host: String, port: Int, deliver: @escaping @Sendable (PeerFrame) -> Void) throws -> Int {
        let loop = self.loop
        let ch = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: PeerTransport.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(
                        PeerInboundHandler(deliver: { f in loop.execute { deliver(f) } }))
                }
            }
            .bind(host: host, port: port).wait()
        listener = ch
        return ch.localAddress?.port ?? port
    }

    func send(_ frame: PeerFrame, to peer: NodeID) {
        loop.preconditionInEventLoop()
        guard let link = links[peer] else { return }
        let bytes = frame.encoded()
        if let ch = link.channel, ch.isActive {
            // Past NIO's write-buffer watermark the peer is not keeping up: drop, Raft resends.
            guard ch.isWritable else {
                link.dropped += 1
                return
            }
            ch.writeAndFlush(Self.frame(bytes, ch), promise: nil)
            return
        }
        link.backlog.append(bytes)
        if link.backlog.count > Self.maxBacklogFrames {
            link.backlog.removeFirst(link.backlog.count - Self.maxBacklogFrames)
            link.dropped += 1
        }
        connect(link)
    }

    /// `[u32 length][frame]`.
    private static func frame(_ bytes: [UInt8], _ ch: any Channel) -> ByteBuffer {
        var buf = ch.allocator.buffer(capacity: bytes.count + 4)
        buf.writeInteger(UInt32(bytes.count))
        buf.writeBytes(bytes)
        return buf
    }

    private func connect(_ link: Link) {
        guard !link.connecting, link.channel?.isActive != true else { return }
        link.connecting = true
        ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            // NIO's default high watermark (64 KiB) is far below a loaded leader's appends:
            // dropping past it lost heartbeats too and caused elections under load.
            .channelOption(
                .writeBufferWaterMark,
                value: .init(low: Self.writeBufferLowBytes, high: Self.writeBufferHighBytes)
            )
            .connectTimeout(.seconds(1))
            .connect(host: link.host, port: link.port)
            .hop(to: loop)
            .whenComplete { [self] result in
                link.connecting = false
                switch result {
                case .success(let ch):
                    link.channel = ch
                    link.backoffMs = 50
                    let pending = link.backlog
                    link.backlog = []
                    for bytes in pending { ch.write(Self.frame(bytes, ch), promise: nil) }
                    ch.flush()
                    ch.closeFuture.hop(to: loop).whenComplete { [self] _ in
                        link.channel = nil
                        onUnreachable(link.id)
                    }
                case .failure:
                    onUnreachable(link.id)
                    // Retry with backoff while there is something to send.
                    let delay = link.backoffMs
                    link.backoffMs = min(link.backoffMs * 2, 1_000)
                    loop.scheduleTask(in: .milliseconds(delay)) { [self] in
                        if !link.backlog.isEmpty { connect(link) }
                    }
                }
            }
    }

    func close() {
        listener?.close(promise: nil)
        for l in links.values { l.channel?.close(promise: nil) }
    }
}
