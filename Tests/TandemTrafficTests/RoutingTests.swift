import TandemCore
import Testing

@testable import TandemTraffic

@Suite struct RouteTableTests {
    /// A route is a value even though its fields sit in one shared box: changing a copy leaves
    /// the original as it was, and equal fields are equal routes.
    @Test func routesKeepValueSemantics() {
        let original = Route(name: "r", match: RouteMatch(host: "users"), cluster: "users", rateLimit: nil)
        var copy = original
        #expect(copy == original)
        copy.cluster = "users-canary"
        copy.retry.numRetries = 7
        copy.subset = ["version": "v2"]
        #expect(original.cluster == "users" && original.retry.numRetries != 7 && original.subset.isEmpty)
        #expect(copy.cluster == "users-canary" && copy.retry.numRetries == 7 && copy.subset == ["version": "v2"])
        #expect(copy != original)
        var back = copy
        back.cluster = "users"
        back.retry = original.retry
        back.subset = [:]
        #expect(back == original && copy.cluster == "users-canary")
    }

    /// Endpoints keep their fields in a shared box too: a copy changed alone, equal and
    /// hashed by their fields whether or not they share it.
    @Test func endpointsKeepValueSemantics() {
        let original = Endpoint(id: "a", host: "10.0.0.1", port: 80, zone: "z1", metadata: ["version": "v1"])
        var copy = original
        #expect(copy == original && copy.hashValue == original.hashValue)
        copy.port = 81
        copy.metadata["version"] = "v2"
        copy.proofKey = "k"
        #expect(original.port == 80 && original.metadata == ["version": "v1"] && original.proofKey == nil)
        #expect(copy.port == 81 && copy.metadata == ["version": "v2"] && copy.proofKey == "k" && copy != original)
        let twin = Endpoint(id: "a", host: "10.0.0.1", port: 80, zone: "z1", metadata: ["version": "v1"])
        #expect(twin == original && Set([original, twin, copy]).count == 2)
        #expect(Endpoint(id: "w", host: "h", port: 1, weight: 0).weight == 1)
    }

    /// A request's method is matched uppercase, its host lowercase and without a port, its
    /// path without the query — whether or not they came that way.
    @Test func requestHeadsAreNormalised() {
        for (method, host, path, want) in [
            ("GET", "users", "/a", "GET users /a"), ("get", "Users:8080", "/a?b=1", "GET users /a"),
            ("PoSt", "USERS", "/", "POST users /"), ("DELETE", "[::1]:80", "/x", "DELETE [::1] /x"),
            ("GET", "[::1]", "/", "GET [::1] /"), ("GET", "ÜSERS.example", "/", "GET üsers.example /"),
        ] {
            let h = RequestHead(method: method, host: host, path: path)
            #expect("\(h.method) \(h.host) \(h.path)" == want)
        }
    }

    let table = RouteTable([
        Route(name: "catch-all", match: RouteMatch(path: .prefix("/")), cluster: "default"),
        Route(name: "users-prefix", match: RouteMatch(host: "users", path: .prefix("/user")), cluster: "users"),
        Route(name: "user-by-id", match: RouteMatch(host: "users", path: .template("/user/:id")), cluster: "users"),
        Route(name: "user-me", match: RouteMatch(host: "users", path: .exact("/user/me")), cluster: "users-me"),
        Route(
            name: "canary", match: RouteMatch(host: "users", path: .prefix("/user"), headers: ["x-canary": "1"]),
            cluster: "users-canary"),
        Route(name: "posts", match: RouteMatch(host: "users", path: .prefix("/user"), methods: ["POST"]), cluster: "w"),
        Route(name: "files", match: RouteMatch(path: .template("/files/*rest")), cluster: "files"),
    ])

    func route(_ method: String, _ host: String, _ path: String, _ headers: [(String, String)] = []) -> RouteDecision? {
        table.route(RequestHead(method: method, host: host, path: path, headers: headers))
    }

    @Test func theRequestHeadKeepsTheHostWithoutPortAndThePathWithoutQuery() {
        let cases: [(String, String, String, String)] = [
            ("Users:8080", "/a?b?c", "users", "/a"), ("[::1]:8080", "/", "[::1]", "/"), ("[::1]", "/x?", "[::1]", "/x"),
            ("users", "/plain", "users", "/plain"), ("CAFÉ.example:443", "/é?q=1", "café.example", "/é"),
        ]
        for (host, path, wantHost, wantPath) in cases {
            let h = RequestHead(method: "get", host: host, path: path)
            #expect(h.host == wantHost && h.path == wantPath && h.method == "GET", "\(host) \(path)")
        }
    }

    @Test func mostSpecificWins() {
        #expect(route("GET", "users", "/user/me")?.route.name == "user-me")
        #expect(route("GET", "users:8080", "/user/7")?.route.name == "user-by-id")
        #expect(route("GET", "users", "/user/7")?.params == ["id": "7"])
        #expect(route("GET", "USERS", "/users/list")?.route.name == "users-prefix")
        #expect(route("GET", "users", "/users/list", [("X-Canary", "1")])?.route.name == "canary")
        #expect(route("POST", "users", "/users")?.route.name == "posts")
        #expect(route("GET", "orders", "/user/7")?.route.name == "catch-all")
        #expect(route("GET", "users", "/user/7?x=1")?.route.name == "user-by-id")
    }

    @Test func templatesCaptureAndWildcardsTakeTheRest() {
        #expect(route("GET", "x", "/files/a/b/c")?.params == ["rest": "a/b/c"])
        #expect(RouteTable.matchTemplate("/user/:id", "/user/7/extra") == nil)
        #expect(RouteTable.matchTemplate("/user/:id/posts/:post", "/user/1/posts/2") == ["id": "1", "post": "2"])
        #expect(PathMatch.parse("/user/:id") == .template("/user/:id"))
        #expect(PathMatch.parse("/api/*") == .prefix("/api/"))
        #expect(PathMatch.parse("/health") == .exact("/health"))
    }

    @Test func noRouteWhenNothingMatches() {
        let t = RouteTable([Route(name: "a", match: RouteMatch(host: "a", path: .exact("/")), cluster: "a")])
        #expect(t.route(RequestHead(method: "GET", host: "b", path: "/")) == nil)
    }

    @Test func localAnswersCarryStatusReasonAndJSON() {
        let a = LocalAnswer(.noHealthyEndpoint, message: "no healthy endpoint for \"users\"")
        #expect(a.status == 503)
        #expect(
            a.jsonBody == #"{"code":503,"message":"no healthy endpoint for \"users\"","error":"no-healthy-endpoint"}"#)
        #expect(LocalAnswer(.rateLimited).status == 429)
        #expect(LocalAnswer(.headersTooLarge).status == 431)
    }
}

@Suite struct BalancerTests {
    let eps = (1...4).map { Endpoint(id: "e\($0)", host: "127.0.0.1", port: 9000 + $0) }

    @Test func roundRobinCyclesEvenly() {
        var b = Balancer(.roundRobin)
        var rng = SeededRandom(seed: 1)
        var counts: [String: Int] = [:]
        for _ in 0..<400 { counts[b.pick(eps, hashKey: nil, now: 0, rng: &rng)!.id, default: 0] += 1 }
        #expect(counts.values.allSatisfy { $0 == 100 })
    }

    @Test func leastRequestAvoidsTheBusyEndpoint() {
        var b = Balancer(.leastRequest)
        var rng = SeededRandom(seed: 2)
        for _ in 0..<50 { b.attemptStarted("e1") }
        var e1 = 0
        for _ in 0..<1000 where b.pick(eps, hashKey: nil, now: 0, rng: &rng)!.id == "e1" { e1 += 1 }
        #expect(e1 == 0)  // e1 always loses a comparison against any idle endpoint
    }

    @Test func peakEWMAShiftsTrafficAwayFromASlowEndpoint() {
        var b = Balancer(.peakEWMA)
        var rng = SeededRandom(seed: 3)
        var now: Nanos = 0
        var counts: [String: Int] = [:]
        for _ in 0..<4000 {
            now += .milliseconds(1)
            let ep = b.pick(eps, hashKey: nil, now: now, rng: &rng)!
            counts[ep.id, default: 0] += 1
            b.attemptStarted(ep.id)
            let latency: Nanos = ep.id == "e4" ? .milliseconds(200) : .milliseconds(5)
            b.attemptFinished(ep.id, latency: latency, failed: false, now: now)
        }
        #expect(counts["e4", default: 0] < 4000 / 20)  // well under its fair 25 %
        #expect(counts["e1", default: 0] > 4000 / 4)
    }

    @Test func ringHashIsStickyAndMovesLittleWhenAnEndpointLeaves() {
        var b = Balancer(.ringHash(header: "x-user"))
        var rng = SeededRandom(seed: 4)
        let keys = (0..<1000).map { "user-\($0)" }
        let before = keys.map { b.pick(eps, hashKey: $0, now: 0, rng: &rng)!.id }
        let again = keys.map { b.pick(eps, hashKey: $0, now: 0, rng: &rng)!.id }
        #expect(before == again)
        let fewer = Array(eps.dropLast())
        let after = keys.map { b.pick(fewer, hashKey: $0, now: 0, rng: &rng)!.id }
        var moved = 0
        for (x, y) in zip(before, after) where x != y {
            moved += 1
            #expect(x == "e4")  // only keys of the departed endpoint move
        }
        let perEndpoint = Dictionary(grouping: before, by: { $0 }).mapValues(\.count)
        #expect(perEndpoint.values.allSatisfy { $0 > 150 && $0 < 350 })
        #expect(moved == perEndpoint["e4"])
    }

    @Test func expNegativeMatchesKnownValues() {
        #expect(abs(Math.expNegative(1) - 0.367_879_441_171_442_3) < 1e-12)
        #expect(abs(Math.expNegative(10) - 4.539_992_976_248_485e-5) < 1e-15)
        #expect(Math.expNegative(0) == 1)
    }
}
