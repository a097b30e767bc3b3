import TandemConfig
import TandemCore
import TandemIdentity
import TandemTraffic
import Testing

@testable import TandemSidecar

@Suite struct ConfigFileTests {
    let base = SidecarConfig(service: "orders", instance: "o-1", appPort: 8081)

    @Test func theDocumentedExampleLoads() throws {
        let c = try ConfigFile.load(
            source: """
                return {
                  routes = {
                    { name = "user", host = "users", path = "/user/:id", methods = { "GET" }, cluster = "users",
                      timeout_ms = 2000, rate_limit = { rps = 100, burst = 200 },
                      retry = { attempts = 2, retry_on = "5xx,reset", per_try_timeout_ms = 500 } },
                    { name = "canary", host = "users", prefix = "/user", headers = { ["x-canary"] = "1" },
                      cluster = "users-canary" },
                  },
                  clusters = {
                    users = { balancer = "round_robin", connect_timeout_ms = 1000,
                              breaker = { consecutive_failures = 5, error_ratio = 0.5, open_ms = 5000 },
                              outlier = { consecutive_5xx = 5, ejection_ms = 30000, max_ejection_percent = 10 },
                              retry_budget = { ratio = 0.2, min_per_second = 10 } },
                  },
                  endpoints = { users = { "127.0.0.1:8080", "127.0.0.1:8082" } },
                  upstreams = { users = 9001, db = { port = 9002, protocol = "tcp" } },
                }
                """, name: "orders.lua", base: base)
        #expect(c.routes.count == 2)
        let r = c.routes[0]
        #expect(r.match == RouteMatch(host: "users", path: .template("/user/:id"), methods: ["GET"]))
        #expect(r.timeout == .milliseconds(2000))
        #expect(r.retry.numRetries == 2 && r.retry.retryOn == [.fiveXX, .reset])
        #expect(r.retry.perTryTimeout == .milliseconds(500))
        #expect(r.rateLimit == .perSecond(100, burst: 200))
        #expect(c.routes[1].match.headers == ["x-canary": "1"])
        let users = c.clusters["users"]!
        #expect(users.balancer == .roundRobin)
        #expect(users.breaker.errorRatio == 0.5 && users.breaker.baseOpen == .seconds(5))
        #expect(users.outlier.baseEjectionTime == .seconds(30))
        #expect(c.staticEndpoints["users"]?.map(\.address) == ["127.0.0.1:8080", "127.0.0.1:8082"])
        #expect(c.localUpstreams["users"] == LocalUpstream(port: 9001))
        #expect(c.localUpstreams["db"] == LocalUpstream(port: 9002, proto: .tcp))
    }

    @Test(arguments: [
        (
            "return { routs = {} }",
            "c.lua: routs: unknown setting; expected one of clusters, defaults, endpoints, identity, inbound, listen, routes, service, upstreams"
        ),
        ("return { routes = { { host = 'users' } } }", "c.lua: routes[1]: cluster is required"),
        (
            "return { routes = { { cluster = 'u', retry = { retry_on = '5xx,often' } } } }",
            "c.lua: routes[1].retry.retry_on: unknown retry_on condition \"often\"; expected one of 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, unavailable, internal, per-try-timeout"
        ),
        (
            "return { clusters = { users = { balancer = 'fastest' } } }",
            "c.lua: clusters.users.balancer: unknown \"fastest\"; expected peak_ewma, least_request, round_robin, random or ring_hash:HEADER"
        ),
        (
            "return { routes = { { cluster = 'u', timeout_ms = -1 } } }",
            "c.lua: routes[1].timeout_ms: expected an integer in 1…2147483647, got number(-1.0)"
        ),
        ("return { endpoints = { users = { 'nowhere' } } }", "c.lua: endpoints.users[1]: expected \"host:port\""),
        (
            "return { upstreams = { db = { port = 1, protocol = 'udp' } } }",
            "c.lua: upstreams.db.protocol: expected \"http\" or \"tcp\", got \"udp\""
        ),
        ("return 42", "c.lua: must return a table, got number"),
        (
            "return { routes = { { name = 'a', cluster = 'x' }, { name = 'a', cluster = 'y' } } }",
            "c.lua: routes: two routes are named \"a\""
        ),
        (
            "return { routes = { { cluster = 'u', compression = 'yes' } } }",
            "c.lua: routes[1].compression: expected true, false or a table { min_bytes, content_types }"
        ),
        (
            "return { inbound = { compression = { content_types = {} } } }",
            "c.lua: inbound.compression.content_types: expected a non-empty list of media types"
        ),
        (
            "return { routes = { { cluster = 'u', rate_limit = { rps = 5, per = 'user' } } } }",
            "c.lua: routes[1].rate_limit.per: expected \"remote_address\", \"caller\" or \"header:NAME\", got \"user\""
        ),
        (
            "return { clusters = { u = { health_check = { path = '/h', tcp = true } } } }",
            "c.lua: clusters.u.health_check: give one of path, tcp or grpc, not path and tcp"
        ),
        (
            "return { clusters = { u = { health_check = { path = 'health' } } } }",
            "c.lua: clusters.u.health_check.path: must start with /"
        ),
        (
            "return { inbound = { allow = { 'orders' } } }",
            "c.lua: inbound route \"inbound\" has allow/deny rules or requires a proof, but identity is off; give the sidecar a join token (--join-token-file or TANDEM_JOIN_TOKEN)"
        ),
        (
            "return { identity = { mode = 'require' } }",
            "c.lua: identity.mode: \"require\" needs a join token (--join-token-file or TANDEM_JOIN_TOKEN)"
        ),
        (
            "return { identity = { mode = 'strict' } }",
            "c.lua: identity.mode: expected \"require\", \"permissive\" or \"off\", got \"strict\""
        ),
        (
            "return { identity = { proof_kind = 'rsa' } }",
            "c.lua: identity.proof_kind: expected \"mac\" or \"signature\", got \"rsa\""
        ),
        (
            "return { inbound = { routes = { { path = '/me', jwt = { hmac_secret_file = 's', algorithms = { 'none' } } } } } }",
            "c.lua: inbound.routes[1].jwt.algorithms: \"none\" is never accepted"
        ),
        (
            "return { inbound = { routes = { { path = '/me', jwt = { algorithms = { 'RS256' } } } } } }",
            "c.lua: inbound.routes[1].jwt: asymmetric algorithms need jwks_file, jwks_registry_key or pem"
        ),
        (
            "return { inbound = { routes = { { path = '/me', jwt = { from = { 'body' }, pem = { file = 'k', alg = 'RS256' } } } } } }",
            "c.lua: inbound.routes[1].jwt.from[1]: expected \"bearer\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got \"body\""
        ),
        (
            "return { routes = { { cluster = 'u', rate_limit = { rps = 5, per = 'caller' } } } }",
            "c.lua: routes[1].rate_limit.per: \"caller\" keys inbound rate limits (inbound.rate_limit); outbound, the caller is this sidecar"
        ),
        (
            "return { inbound = { rate_limit = { max_tokens = 2, per = 'caller' } } }",
            "c.lua: inbound.rate_limit.fill_interval_ms: expected an integer in 1…2147483647, got nil"
        ),
        (
            "return { inbound = { routes = { { path = '/a', alow = { 'x' } } } } }",
            "c.lua: inbound.routes[1].alow: unknown setting; expected one of allow, deny, headers, host, jwt, methods, name, path, prefix, proof"
        ),
    ])
    func mistakesAreNamedPrecisely(source: String, message: String) {
        #expect(throws: ConfigFile.Error(message)) { try ConfigFile.load(source: source, name: "c.lua", base: base) }
    }

    @Test func identityRoutesAndJWTLoadWithAJoinToken() throws {
        var b = base
        b.identity.joinToken = "0123456789abcdef0123"
        let c = try ConfigFile.load(
            source: """
                return {
                  identity = { default = "deny", proof = true, token_ttl_s = 120, proof_kind = "signature" },
                  routes = { { name = "pay", host = "billing", cluster = "billing", proof = true } },
                  inbound = {
                    allow = { "web" },
                    routes = {
                      { name = "admin", prefix = "/admin/", methods = { "POST" }, allow = { "ops" }, deny = { "web" }, proof = false },
                      { name = "me", path = "/me", jwt = { hmac_secret_file = "/etc/secret", issuers = "https://idp",
                        from = { "cookie:session", "bearer" }, forward_claims = { sub = "X-User" }, required = false } },
                    },
                  },
                }
                """, name: "c.lua", base: b)
        #expect(c.identity.effectiveMode == .require && c.identity.defaultAccess == .deny && c.identity.proof == true)
        #expect(c.identity.tokenTTL == 120 && c.proofRoutes == ["pay"] && c.identity.proofKind == .signature)
        #expect(base.identity.proofKind == .mac)
        #expect(c.inboundDefault.access.allow == ["web"])
        #expect(c.inboundRoutes.map(\.name) == ["admin", "me"])
        #expect(
            c.inboundRoutes[0].access == AccessRule(allow: ["ops"], deny: ["web"]) && c.inboundRoutes[0].proof == false)
        #expect(c.inboundRoutes[0].match.methods == ["POST"] && c.inboundRoutes[0].match.path == .prefix("/admin/"))
        let jwt = try #require(c.inboundRoutes[1].jwt)
        #expect(jwt.algorithms == ["HS256"] && jwt.hmacSecretFiles == ["/etc/secret"] && jwt.issuers == ["https://idp"])
        #expect(jwt.from == [.cookie("session"), .bearer] && !jwt.required)
        #expect(jwt.forwardClaims.map(\.header) == ["x-user"])
    }

    @Test func serviceAndListenersCanBeInTheFile() throws {
        let c = try ConfigFile.load(
            source: """
                return { service = "orders",
                         listen = { inbound = "127.0.0.1:15001", outbound = "0.0.0.0:15002", admin = "127.0.0.1:15000" } }
                """, name: "c.lua", base: base)
        #expect(c.inbound == HostPort(host: "127.0.0.1", port: 15001))
        #expect(c.outbound == HostPort(host: "0.0.0.0", port: 15002))
        #expect(c.admin == HostPort(host: "127.0.0.1", port: 15000))
        #expect(throws: ConfigFile.Error("c.lua: service: the file is for \"users\" but this sidecar is \"orders\"")) {
            try ConfigFile.load(source: "return { service = 'users' }", name: "c.lua", base: base)
        }
        #expect(throws: ConfigFile.Error("c.lua: listen.admin: expected \"host:port\", got \"nowhere\"")) {
            try ConfigFile.load(source: "return { listen = { admin = 'nowhere' } }", name: "c.lua", base: base)
        }
    }

    @Test func theFilesDefaultsApplyToItsOwnRoutesAndCompressionIsPerRoute() throws {
        let c = try ConfigFile.load(
            source: """
                return {
                  defaults = { timeout_ms = 700, compression = { min_bytes = 512 } },
                  inbound = { compression = true },
                  routes = {
                    { name = "a", host = "a", cluster = "a" },
                    { name = "b", host = "b", cluster = "b", compression = false, timeout_ms = 50 },
                    { name = "c", host = "c", cluster = "c", compression = { content_types = { "text/" } } },
                  },
                }
                """, name: "c.lua", base: base)
        #expect(c.routes[0].timeout == .milliseconds(700))  // defaults come before routes, whatever the order
        #expect(c.routes[0].compression?.minBytes == 512)
        #expect(c.routes[1].compression == nil && c.routes[1].timeout == .milliseconds(50))
        #expect(c.routes[2].compression?.contentTypes == ["text/"] && c.routes[2].compression?.minBytes == 30)
        #expect(c.inboundCompression == CompressionPolicy())
        #expect(c.usesCompression)
        #expect(!base.usesCompression)
    }

    @Test func clustersCanCheckTheirEndpointsActively() throws {
        let c = try ConfigFile.load(
            source: """
                return { clusters = {
                  a = { health_check = { path = "/healthz", interval_ms = 2000, unhealthy_threshold = 5 } },
                  b = { health_check = { tcp = true } },
                  c = { health_check = { grpc = "users.UserService" } },
                } }
                """, name: "c.lua", base: base)
        var a = HealthCheckConfig(kind: .http(path: "/healthz"))
        a.interval = .milliseconds(2000)
        a.unhealthyThreshold = 5
        #expect(c.clusters["a"]?.healthCheck == a)
        #expect(c.clusters["b"]?.healthCheck == HealthCheckConfig(kind: .tcp))  // the seed's 10 s / 1 s / 3 / 2
        #expect(c.clusters["c"]?.healthCheck?.kind == .grpc(service: "users.UserService"))
    }
}
