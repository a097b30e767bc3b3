import NIOCore
import NIOPosix
import TandemCore
import TandemEtcdClient
import Testing

/// Tandem's own etcd client (used by the sidecar and the CLI) against a real registry process.
@Suite struct EtcdClientTests {
    /// Hundreds of unary calls, two at a time, on one connection all succeed. The client used
    /// to reset every stream it had already received in full (it closed the stream channel in
    /// the middle of reading the trailers, which NIOHTTP2 turns into RST_STREAM CANCEL); after
    /// 200 resets the server's rapid-reset protection ends the connection, and a call made
    /// while the connection was going away never completed (its stream was never created, and
    /// nothing failed its promise).
    @Test func manyConcurrentCallsOnOneConnection() throws {
        let reg = try RegistryUnderTest()
        try chainsOfPuts(reg.endpoint)
        withExtendedLifetime(reg) {}
    }

    /// The same against Debian's etcd 3.4. grpc-go sends a flow-control (BDP) PING with nearly
    /// every request it reads; NIOHTTP2's default allowance (200 control frames per 30 s) made
    /// the client answer the 201st with GOAWAY ENHANCE_YOUR_CALM and lose the call in flight.
    @Test func manyCallsOnOneConnectionToARealEtcd() throws {
        let etcd = try RealEtcd()
        try chainsOfPuts(etcd.endpoint)
        withExtendedLifetime(etcd) {}
    }

    /// Two chains of 250 puts, each put sent when the previous one of its chain is answered,
    /// all on one client connection; every one must succeed and be readable.
    func chainsOfPuts(_ endpoint: String) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let client = EtcdClient(endpoints: [try #require(HostPort(endpoint))], loop: loop)
        defer { client.close() }
        let perChain = 250
        let chains = 2
        let all = loop.makePromise(of: Void.self)
        // A guard so a lost call fails the test instead of hanging it (not a timing assertion).
        let guardTask = loop.scheduleTask(in: .seconds(60)) { all.fail(LostCall()) }
        let state = ChainState(expected: chains * perChain, all: all)
        for c in 0..<chains {
            loop.execute { state.run(client, chain: c, left: perChain) }
        }
        try all.futureResult.wait()
        guardTask.cancel()
        let (ok, errors) = try loop.submit { (state.ok, state.errors) }.wait()
        #expect(ok == chains * perChain)
        #expect(errors.isEmpty, "\(errors.prefix(3))")
        let (kvs, _) = try client.get("/chain/", prefix: true).wait()
        #expect(kvs.count == chains * perChain)
    }

    struct LostCall: Error {}

    final class ChainState: @unchecked Sendable {
        var ok = 0
        var errors: [String] = []
        let expected: Int
        let all: EventLoopPromise<Void>
        init(expected: Int, all: EventLoopPromise<Void>) {
            self.expected = expected
            self.all = all
        }

        func run(_ client: EtcdClient, chain: Int, left: Int) {
            guard left > 0 else { return }
            client.put("/chain/\(chain)/\(left)", Array("v".utf8)).whenComplete { r in
                switch r {
                case .success: self.ok += 1
                case .failure(let e): self.errors.append("\(e)")
                }
                if self.ok + self.errors.count == self.expected { self.all.succeed(()) }
                self.run(client, chain: chain, left: left - 1)
            }
        }
    }
}
