import NIOCore
import NIOEmbedded
import TandemConfig
import Testing

@testable import TandemSidecar

/// A connection keeps the chain of its last route between requests; an install of new
/// policies makes every kept chain stale, so the next request on a kept-alive connection runs
/// the new ones.
@Suite struct PolicyCacheTests {
    private func config(_ header: String) -> SidecarConfig {
        var c = SidecarConfig(service: "orders", instance: "orders-1", appPort: 1)
        let source = """
            return { name = "mark", on_request = function(req) req:set_header("x-mark", "\(header)") end }
            """
        c.routePolicies = [
            "users": [
                PolicySpec(
                    file: "mark.lua", source: source, config: nil, failOpen: false, path: "routes[1].policies[1]",
                    name: "mark")
            ]
        ]
        return c
    }

    @Test func aKeptChainIsDroppedWhenPoliciesChange() throws {
        let loop = EmbeddedEventLoop()
        let policies = SidecarPolicies(loops: [loop], log: { _ in })
        var cache: SidecarPolicies.ConnectionCache?
        #expect(policies.lookup(route: "users", loop: loop, cache: &cache) == nil)  // nothing installed yet

        let first = policies.install(config("1"))
        loop.run()
        try first.wait()
        let (a, vmA) = try #require(policies.lookup(route: "users", loop: loop, cache: &cache))
        #expect(policies.lookup(route: "orders", loop: loop, cache: &cache) == nil)  // no policy on that route
        let (again, _) = try #require(policies.lookup(route: "users", loop: loop, cache: &cache))
        #expect(again.key == a.key)

        let second = policies.install(config("2"))
        loop.run()
        try second.wait()
        let (b, vmB) = try #require(policies.lookup(route: "users", loop: loop, cache: &cache))
        #expect(b.key != a.key && b.key == policies.chain(route: "users").key)
        #expect(vmA === vmB)
    }
}
