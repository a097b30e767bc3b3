import NIOCore
import NIOEmbedded
import TandemConfig
import TandemTraffic
import Testing

@testable import TandemSidecar

/// The upstream idle pool on an embedded loop: the most recently used connection is taken
/// first, and the sweep closes the ones idle since before its cutoff (oldest first).
@Suite struct UpstreamPoolTests {
    private let loop = EmbeddedEventLoop()

    /// A pool on the embedded loop, keeping up to 8 idle connections per endpoint.
    private func makePool() -> UpstreamPool {
        let config = SidecarConfig(service: "orders", instance: "orders-1", appPort: 1)
        let brain = TrafficBrain(config: config, seed: 1)
        return UpstreamPool(
            loop: loop, maxIdlePerEndpoint: 8, idleTimeout: .seconds(30), slots: ConnectionSlots(brain: brain))
    }

    /// A connected embedded channel to 127.0.0.1:`port`, as the pool holds one.
    private func connection(_ port: Int) throws -> UpstreamConnection {
        let ch = EmbeddedChannel(loop: loop)
        try ch.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: port)).wait()
        return UpstreamConnection(
            channel: ch, key: .init(host: "127.0.0.1", port: port), cluster: "users", handler: UpstreamHandler())
    }

    @Test func theSweepClosesConnectionsIdleSinceBeforeTheCutoff() throws {
        let pool = makePool()
        var conns: [UpstreamConnection] = []
        for _ in 0..<3 {
            let c = try connection(9000)
            pool.release(c)
            conns.append(c)
        }
        #expect(pool.idleCount == 3)
        // Idle since 100, 200, 300 (in the order they went back).
        for (i, c) in conns.enumerated() { c.idleSince = .uptimeNanoseconds(UInt64(i + 1) * 100) }
        pool.closeIdle(before: .uptimeNanoseconds(250))
        #expect(pool.idleCount == 1)
        #expect(conns.map(\.channel.isActive) == [false, false, true])
        #expect(pool.takeIdle(host: "127.0.0.1", port: 9000) === conns[2])
        pool.closeIdle(before: .uptimeNanoseconds(1000))  // nothing idle left to close
        #expect(pool.idleCount == 0 && conns[2].channel.isActive)
    }

    /// Each endpoint keeps its own list while requests alternate between them (the pool keeps
    /// the last list it used, by key), and a list the sweep dropped is not used again: a
    /// connection released afterwards is counted, found and swept.
    @Test func listsStayPerEndpointAndADroppedOneIsNotReused() throws {
        let pool = makePool()
        let a = try connection(9000), b = try connection(9001)
        pool.release(a)
        pool.release(b)
        #expect(pool.takeIdle(host: "127.0.0.1", port: 9000) === a)
        #expect(pool.takeIdle(host: "127.0.0.1", port: 9000) == nil)
        #expect(pool.takeIdle(host: "127.0.0.1", port: 9001) === b)

        let old = try connection(9000)
        pool.release(old)
        old.idleSince = .uptimeNanoseconds(100)
        pool.closeIdle(before: .uptimeNanoseconds(200))  // 9000's list is empty and dropped
        #expect(pool.idleCount == 0 && !old.channel.isActive)
        let next = try connection(9000)
        pool.release(next)
        #expect(pool.idleCount == 1)
        next.idleSince = .uptimeNanoseconds(300)
        pool.closeIdle(before: .uptimeNanoseconds(400))
        #expect(pool.idleCount == 0 && !next.channel.isActive)
    }
}
