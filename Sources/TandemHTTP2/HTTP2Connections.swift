import NIOCore
import NIOHTTP2

/// The HTTP/2 settings of every connection Tandem opens or accepts: the registry's client
/// port, the sidecar's listeners and upstream connections, and Tandem's etcd client. One
/// place, so that a limit found wrong on one side is not left wrong on another.
public enum HTTP2Connections {
    /// Bound on the PING/SETTINGS/PRIORITY frames a peer may send per 30 s before the
    /// connection is ended with GOAWAY ENHANCE_YOUR_CALM. NIOHTTP2's default (200) protects
    /// against floods but breaks gRPC: grpc-go (etcd, etcdctl, clientv3, any Go service)
    /// sends a flow-control (BDP) PING with nearly every message it reads, so a Go client
    /// making more than ~7 calls a second on one connection — or a Go server answering them —
    /// was cut off every 200 calls. 1,000,000 per 30 s still ends a real flood (> 33,000/s).
    public static let maxControlFramesPer30s = 1_000_000

    /// Bound on the RST_STREAM frames a peer may send per 30 s before the connection is ended
    /// (NIOHTTP2's rapid-reset protection, CVE-2023-44487). gRPC clients cancel calls with
    /// RST_STREAM whenever a deadline passes or a caller gives up; at NIOHTTP2's default (200)
    /// a busy app whose deadlines expire (1 % of 1,000 calls/s) lost its connection, and every
    /// call on it, twice a minute. 10,000 per 30 s still ends an attack, which sends thousands
    /// a second.
    public static let maxResetsPer30s = 10_000

    /// NIOHTTP2's defaults, with the control-frame bound above.
    public static var configuration: NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        c.controlFrameRateLimit.maximumCount = maxControlFramesPer30s
        c.controlFrameRateLimit.windowLength = .seconds(30)
        return c
    }

    /// NIOHTTP2's stream defaults, with the reset bound above.
    public static var streamConfiguration: NIOHTTP2Handler.StreamConfiguration {
        var c = NIOHTTP2Handler.StreamConfiguration()
        c.streamResetFrameRateLimit.maximumCount = maxResetsPer30s
        c.streamResetFrameRateLimit.windowLength = .seconds(30)
        return c
    }

    /// Configures `channel` as an HTTP/2 client or server with `configuration`; every stream
    /// the peer opens is set up by `inbound`. `onGoAway` runs (on the channel's loop) when the
    /// peer sends GOAWAY: it will take no new streams on this connection, so a pool must stop
    /// handing it out — the streams already running go on until they end.
    public static func configure(
        _ channel: any Channel, mode: NIOHTTP2Handler.ParserMode,
        onGoAway: (@Sendable () -> Void)? = nil,
        inbound: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) -> EventLoopFuture<NIOHTTP2Handler.StreamMultiplexer> {
        channel.configureHTTP2Pipeline(
            mode: mode, connectionConfiguration: configuration, streamConfiguration: streamConfiguration,
            inboundStreamInitializer: inbound
        ).flatMapThrowing { mux in
            if let onGoAway { try channel.pipeline.syncOperations.addHandler(GoAwayObserver(onGoAway)) }
            return mux
        }
    }
}

/// Sits after the HTTP/2 handler, which passes on the connection's own frames (stream 0).
final class GoAwayObserver: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTP2Frame
    let onGoAway: @Sendable () -> Void

    init(_ onGoAway: @escaping @Sendable () -> Void) { self.onGoAway = onGoAway }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway = unwrapInboundIn(data).payload { onGoAway() }
        context.fireChannelRead(data)
    }
}
