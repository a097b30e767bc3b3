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
    /// A membership change asked of a follower, forwarded to the leader (which alone can
    /// validate it, e.g. whether a learner has caught up), and the leader's answer once it is
    /// applied or refused (`code` 0: done).
    case confChange(requestID: UInt64, from: NodeID, ConfChange)
    case confChangeDone(requestID: UInt64, code: Int, message: String)
    /// A member starting with `--initial-cluster-state existing` asks a peer who the members
    /// are; the answer (`members`, JSON: cluster id and members) comes back on the same
    /// connection.
    case membersQuery
    case members(Bytes)
    /// The answer to a raft message from a member this one has seen removed: etcd's
    /// "the member has been permanently removed from the cluster"; the removed member stops.
    case removed(member: NodeID)
    /// A piece of a large frame (a snapshot): the receiver joins the pieces in order and
    /// reads the frame once `last` arrives. Pieces go out one at a time, so the leader's
    /// heartbeats and appends travel between them instead of queueing behind the whole
    /// snapshot (or being dropped while it fills the write buffer).
    case chunk(last: Bool, Bytes)

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
        case .confChange(let id, let from, let cc):
            w.u8(5)
            w.varint(id)
            w.varint(from)
            w.blob(cc.encoded())
        case .confChangeDone(let id, let code, let message):
            w.u8(6)
            w.varint(id)
            w.varint(UInt64(max(0, code)))
            w.string(message)
        case .membersQuery:
            w.u8(7)
        case .members(let json):
            w.u8(8)
            w.blob(json)
        case .removed(let id):
            w.u8(9)
            w.varint(id)
        case .chunk(let last, let bytes):
            w.u8(10)
            w.u8(last ? 1 : 0)
            w.blob(bytes)
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
        case 5:
            self = .confChange(requestID: try r.varint(), from: try r.varint(), try ConfChange(decoding: try r.blob()))
        case 6:
            self = .confChangeDone(
                requestID: try r.varint(), code: Int(clamping: try r.varint()), message: try r.string())
        case 7: self = .membersQuery
        case 8: self = .members(try r.blob())
        case 9: self = .removed(member: try r.varint())
        case 10: self = .chunk(last: try r.u8() == 1, try r.blob())
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

/// Answers a frame on the connection it came in on (a members query).
typealias PeerReply = @Sendable (PeerFrame) -> Void
typealias PeerDeliver = @Sendable (PeerFrame, @escaping PeerReply) -> Void

final class PeerInboundHandler: ChannelInboundHandler {
    typealias InboundIn = [UInt8]
    let deliver: PeerDeliver
    /// The pieces of a chunked frame received so far (bounded by `maxFrameBytes`).
    private var partial: [UInt8] = []
    init(deliver: @escaping PeerDeliver) { self.deliver = deliver }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // A peer that sends garbage is disconnected; Raft treats it as message loss.
        guard var frame = try? PeerFrame(decoding: unwrapInboundIn(data)) else {
            context.close(promise: nil)
            return
        }
        if case .chunk(let last, let bytes) = frame {
            guard partial.count + bytes.count <= PeerTransport.maxFrameBytes else {
                context.close(promise: nil)
                return
            }
            partial += bytes
            guard last else { return }
            defer { partial = [] }
            guard let whole = try? PeerFrame(decoding: partial) else {
                context.close(promise: nil)
                return
            }
            frame = whole
        }
        let channel = context.channel
        deliver(frame) { answer in
            channel.writeAndFlush(PeerTransport.frame(answer.encoded(), channel), promise: nil)
        }
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
    /// Frames larger than this (snapshots) travel in pieces of this size, one write at a time.
    static let chunkBytes = 256 << 10

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
        /// No longer a member: no reconnects.
        var removed = false
        /// Pieces of a large frame still to send, one write at a time (`chunkInFlight`);
        /// `chunksStarted` once the first went out (the rest must follow on that connection).
        var chunks: [[UInt8]] = []
        var chunkInFlight = false
        var chunksStarted = false
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
    private var binding = false
    /// Where to listen for peers and who gets their frames (on the raft loop).
    private let listenHost: String
    private let listenPort: Int
    private let deliver: PeerDeliver
    /// Called on the raft loop when a peer could not be reached (Raft then probes).
    var onUnreachable: (NodeID) -> Void = { _ in }

    init(
        loop: any EventLoop, group: any EventLoopGroup, listenHost: String, listenPort: Int,
        deliver: @escaping PeerDeliver
    ) {
        self.loop = loop
        self.group = group
        self.listenHost = listenHost
        self.listenPort = listenPort
        self.deliver = { f, reply in loop.execute { deliver(f, reply) } }
    }

    /// The members to keep connections to (id → address); links to members no longer listed
    /// close, and a member whose address changed is reconnected.
    func setPeers(_ peers: [NodeID: (host: String, port: Int)]) {
        loop.preconditionInEventLoop()
        for (id, link) in links where peers[id].map({ $0.host != link.host || $0.port != link.port }) ?? true {
            link.removed = true
            link.backlog = []
            link.channel?.close(promise: nil)
            links[id] = nil
        }
        for (id, a) in peers where links[id] == nil { links[id] = Link(id: id, host: a.host, port: a.port) }
    }

    var peerIDs: Set<NodeID> { Set(links.keys) }

    private func bootstrap() -> ServerBootstrap {
        let deliver = self.deliver
        return ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: PeerTransport.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(PeerInboundHandler(deliver: deliver))
                }
            }
    }

    /// Listens for peers now (off the raft loop); returns the bound port.
    func listen() throws -> Int {
        let ch = try bootstrap().bind(host: listenHost, port: listenPort).wait()
        try loop.submit { self.listener = ch }.wait()
        return ch.localAddress?.port ?? listenPort
    }

    /// Listens once the cluster has other members (a single member grown by MemberAdd);
    /// on the raft loop, without blocking it. Calls `done` with nil or the failure.
    func ensureListening(_ done: @escaping @Sendable (String?) -> Void) {
        loop.preconditionInEventLoop()
        guard listener == nil else { return done(nil) }
        guard !binding else { return done(nil) }
        binding = true
        let (host, port) = (listenHost, listenPort)
        bootstrap().bind(host: host, port: port).hop(to: loop).whenComplete { [self] r in
            binding = false
            switch r {
            case .success(let ch):
                listener = ch
                done(nil)
            case .failure(let e): done("cannot listen for peers on \(host):\(port): \(e)")
            }
        }
    }
    var listening: Bool { listener != nil }

    func send(_ frame: PeerFrame, to peer: NodeID) {
        loop.preconditionInEventLoop()
        guard let link = links[peer] else { return }
        let bytes = frame.encoded()
        if bytes.count > Self.chunkBytes {
            // At most one large frame queued: a newer one replaces one not yet started (Raft
            // retries a snapshot that does not arrive).
            if link.chunksStarted {
                link.dropped += 1
            } else {
                link.chunks = Self.pieces(bytes)
            }
            if link.channel?.isActive == true { sendChunk(link) } else { connect(link) }
            return
        }
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

    /// `bytes` as `.chunk` frames of at most `chunkBytes` each, encoded.
    static func pieces(_ bytes: [UInt8]) -> [[UInt8]] {
        stride(from: 0, to: bytes.count, by: chunkBytes).map { start in
            let end = min(start + chunkBytes, bytes.count)
            return PeerFrame.chunk(last: end == bytes.count, Array(bytes[start..<end])).encoded()
        }
    }

    /// Writes the next piece of the large frame once the previous one is written; a failed
    /// write (the connection went) drops the rest, and the receiver drops what it had.
    private func sendChunk(_ link: Link) {
        guard !link.chunkInFlight, !link.chunks.isEmpty, let ch = link.channel, ch.isActive else { return }
        link.chunkInFlight = true
        link.chunksStarted = true
        let piece = link.chunks.removeFirst()
        ch.writeAndFlush(Self.frame(piece, ch)).hop(to: loop).whenComplete { [self] r in
            link.chunkInFlight = false
            if case .failure = r { link.chunks = [] }
            if link.chunks.isEmpty { link.chunksStarted = false }
            sendChunk(link)
        }
    }

    /// `[u32 length][frame]`.
    static func frame(_ bytes: [UInt8], _ ch: any Channel) -> ByteBuffer {
        var buf = ch.allocator.buffer(capacity: bytes.count + 4)
        buf.writeInteger(UInt32(bytes.count))
        buf.writeBytes(bytes)
        return buf
    }

    private func connect(_ link: Link) {
        guard !link.removed, !link.connecting, link.channel?.isActive != true else { return }
        link.connecting = true
        let deliver = self.deliver
        ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            // The peer answers on this connection only to say this member was removed.
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: PeerTransport.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(PeerInboundHandler(deliver: deliver))
                }
            }
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
                    if link.removed {
                        ch.close(promise: nil)
                        return
                    }
                    link.channel = ch
                    link.backoffMs = 50
                    let pending = link.backlog
                    link.backlog = []
                    for bytes in pending { ch.write(Self.frame(bytes, ch), promise: nil) }
                    ch.flush()
                    sendChunk(link)
                    ch.closeFuture.hop(to: loop).whenComplete { [self] _ in
                        link.channel = nil
                        // A large frame cut off midway cannot resume on a new connection.
                        if link.chunksStarted {
                            link.chunks = []
                            link.chunksStarted = false
                        }
                        onUnreachable(link.id)
                    }
                case .failure:
                    onUnreachable(link.id)
                    // Retry with backoff while there is something to send.
                    let delay = link.backoffMs
                    link.backoffMs = min(link.backoffMs * 2, 1_000)
                    loop.scheduleTask(in: .milliseconds(delay)) { [self] in
                        if !link.backlog.isEmpty || !link.chunks.isEmpty { connect(link) }
                    }
                }
            }
    }

    func close() {
        listener?.close(promise: nil)
        for l in links.values { l.channel?.close(promise: nil) }
    }
}

/// Hands the first frame a peer answers to a promise (the members query of a joining member).
private final class PeerAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = [UInt8]
    let answer: EventLoopPromise<PeerFrame>
    init(answer: EventLoopPromise<PeerFrame>) { self.answer = answer }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            answer.succeed(try PeerFrame(decoding: unwrapInboundIn(data)))
        } catch {
            answer.fail(error)
        }
        context.close(promise: nil)
    }
    func channelInactive(context: ChannelHandlerContext) {
        answer.fail(StorageLikeError("the peer closed the connection without answering"))
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        answer.fail(error)
        context.close(promise: nil)
    }
}

extension PeerTransport {
    /// Asks the member listening for peers at `host:port` for the member list (blocking; for
    /// a member starting with `--initial-cluster-state existing`, before it serves anything).
    static func queryMembers(
        host: String, port: Int, group: any EventLoopGroup, timeoutMs: Int64 = 3_000
    ) throws
        -> Bytes
    {
        let loop = group.next()
        let answer = loop.makePromise(of: PeerFrame.self)
        let connected = ClientBootstrap(group: loop)
            .connectTimeout(.milliseconds(timeoutMs))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: PeerTransport.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(PeerAnswerHandler(answer: answer))
                }
            }
            .connect(host: host, port: port)
        let ch: any Channel
        do { ch = try connected.wait() } catch {
            answer.fail(error)
            throw error
        }
        let timer = loop.scheduleTask(in: .milliseconds(timeoutMs)) {
            answer.fail(StorageLikeError("no answer in \(timeoutMs) ms"))
            ch.close(promise: nil)
        }
        ch.writeAndFlush(frame(PeerFrame.membersQuery.encoded(), ch), promise: nil)
        defer { timer.cancel() }
        guard case .members(let json) = try answer.futureResult.wait() else {
            throw StorageLikeError("the peer answered something other than the member list")
        }
        return json
    }
}
