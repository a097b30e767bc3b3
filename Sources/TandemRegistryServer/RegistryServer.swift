import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP2
import NIOPosix
import TandemCore
import TandemEtcdAPI
import TandemHTTP2

/// A registry member serving the etcd v3 API over h2c gRPC.
public final class RegistryServer {
    /// The etcd API level reported by Maintenance/Status.
    public static let etcdVersion = "3.4.0"

    public let node: RegistryNode
    private let networkGroup: MultiThreadedEventLoopGroup
    private let raftGroup: MultiThreadedEventLoopGroup
    private var channel: (any Channel)?
    /// Accepted client connections, closed first at shutdown (before the loops go).
    private let clients = NIOLockedValueBox<[ObjectIdentifier: any Channel]>([:])
    public let limits: EtcdLimits

    public init(
        config: RegistryNode.Config, limits: EtcdLimits = EtcdLimits(), identity: RegistryIdentity.Config = .init(),
        authFile: String? = nil, wallClockMs: UInt64
    ) throws {
        let users = try authFile.map { try RegistryAuth.parse($0) } ?? []
        networkGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        raftGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.limits = limits
        let loop = raftGroup.next()
        node = try loop.submit {
            let n = try RegistryNode(config: config, loop: loop, wallClockMs: wallClockMs)
            n.identity = try RegistryIdentity(config: identity, node: n)
            if !users.isEmpty { n.auth = RegistryAuth(users: users, issuer: identity.issuer) }
            return n
        }.wait()
    }

    /// Starts the peer transport: connects to the other members (their addresses come from
    /// `peers`, id → peer URL, and from the membership the member replicates) and listens on
    /// `peerHost:peerPort` — now if `listenNow`, else once the cluster has a second member
    /// (a single member grown with MemberAdd). Returns the bound port when listening now.
    @discardableResult
    public func startPeers(peerHost: String, peerPort: Int, listenNow: Bool) throws -> Int? {
        let node = self.node
        let t = PeerTransport(loop: node.loop, group: networkGroup, listenHost: peerHost, listenPort: peerPort) {
            frame, reply in node.receive(frame, reply: reply)
        }
        try node.loop.submit {
            node.transport = t
            t.onUnreachable = { id in node.replica.reportUnreachable(id) }
        }.wait()
        return listenNow ? try t.listen() : nil
    }

    /// Asks a member's peer listener for the cluster id and member list (JSON), for a member
    /// joining with `--initial-cluster-state existing`.
    public static func queryMembers(peer: HostPort) throws -> Bytes {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        return try PeerTransport.queryMembers(host: peer.host, port: peer.port, group: group)
    }

    /// Binds the client listener (port 0 picks a free port) and starts the member.
    /// Returns the bound port.
    public func start(host: String, port: Int) throws -> Int {
        let node = self.node
        try node.loop.submit {
            node.start()
            node.identity?.start()
        }.wait()
        let methods = EtcdServices.methods(node: node, limits: limits)
        let maxBytes = limits.maxRequestBytes
        let minPing = limits.keepaliveMinTimeNanos
        let ch = try ServerBootstrap(group: networkGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [clients] channel in
                let key = ObjectIdentifier(channel)
                clients.withLockedValue { $0[key] = channel }
                channel.closeFuture.whenComplete { _ in clients.withLockedValue { $0[key] = nil } }
                let pings = NIOLoopBound(PingGuard(minTimeNanos: minPing), eventLoop: channel.eventLoop)
                return HTTP2Connections.configure(channel, mode: .server) { stream in
                    stream.eventLoop.makeCompletedFuture {
                        try stream.pipeline.syncOperations.addHandler(
                            GRPCStreamHandler(methods: methods, maxMessageBytes: maxBytes, pings: pings.value))
                    }
                }.flatMapThrowing { _ in try channel.pipeline.syncOperations.addHandler(pings.value) }
            }
            .bind(host: host, port: port).wait()
        channel = ch
        return ch.localAddress?.port ?? port
    }

    /// Blocks until the listener closes.
    public func wait() throws { try channel?.closeFuture.wait() }

    /// Stops in an order where no loop hands work to one already gone: no new connections,
    /// then every client and peer connection closed (their handlers hop to the raft loop,
    /// still running), then the member stopped, then the raft loop, then the network loop.
    /// (The network loop used to go first: answers the raft loop was still sending then hit
    /// a loop already shut down — NIO's "Cannot schedule tasks on an EventLoop that has
    /// already shut down", logged when the embedded registry's host exited.)
    public func shutdown() throws {
        try channel?.close().wait()
        let node = self.node
        try node.loop.submit { node.transport?.close() }.wait()
        for ch in clients.withLockedValue({ Array($0.values) }) { try? ch.close().wait() }
        try node.loop.submit {
            node.identity?.stop()
            node.stop()
        }.wait()
        try raftGroup.syncShutdownGracefully()
        try networkGroup.syncShutdownGracefully()
    }
}
