/// TandemConfig — what a sidecar is told: its settings as values (`SidecarConfig`) and the
/// reader of its Lua config file (`ConfigFile`). No I/O beyond reading the files the config
/// names, no NIO: the sidecar (TandemSidecar) and the mesh simulator (TandemSimulation) read
/// the same files through it.
import TandemCore
import TandemIdentity
import TandemLua
import TandemTraffic

/// A policy attached to a route (or to the inbound side) by the config: the file's text, its
/// arguments, and whether a failing policy lets the request through (`fail_open`).
public struct PolicySpec: Sendable, Equatable {
    public var file: String
    public var source: String
    public var config: LuaValue?
    public var failOpen: Bool
    /// Where the config names it, for errors: `routes[2].policies[1]`.
    public var path: String
    public var name: String
    public init(file: String, source: String, config: LuaValue?, failOpen: Bool, path: String, name: String) {
        self.file = file
        self.source = source
        self.config = config
        self.failOpen = failOpen
        self.path = path
        self.name = name
    }
}

/// Bounds on what one sidecar accepts; each has a clear answer when hit.
public struct SidecarLimits: Sendable, Equatable {
    /// Request header block (431 beyond).
    public var maxHeaderBytes = 64 * 1024
    /// Request body size, however it is sent (413 beyond); nil = no limit (Envoy's default:
    /// bodies stream through).
    public var maxBodyBytes: Int? = nil
    /// HTTP/1.1 request bodies up to this are buffered whole (so they can be retried, the
    /// replay bound of Linkerd and Envoy); larger ones stream upstream as they arrive, with
    /// backpressure, and are not retried. Also how much is queued before the upstream is
    /// connected before reading pauses.
    public var streamBodyAfterBytes = 64 * 1024
    /// HTTP/2: request body held before the upstream stream opens (413 beyond).
    public var maxBufferedBodyBytes = 8 << 20
    /// A client must finish sending request headers within this (slowloris).
    public var headerReadTimeout: Nanos = .seconds(10)
    /// Idle keep-alive connections are closed after this.
    public var idleTimeout: Nanos = .seconds(60)
    /// Downstream connections per listener; more are closed at accept.
    public var maxConnections = 4096
    /// Upstream clusters (services) one sidecar will discover and track; requests for more
    /// are answered 503 `overflow`, so calls to random host names cannot grow memory.
    public var maxClusters = 1024
    /// Idle upstream connections kept per endpoint per event loop. As high as Envoy's default
    /// max_connections (the cluster's connection slots bound them first), so a burst of
    /// concurrent requests finds its connections again instead of reconnecting (a cap of 32
    /// made 44 % of requests open a connection at 256 concurrent clients).
    public var maxIdlePerEndpoint = 1024
    /// Upstream connections idle this long are closed (HAProxy's pool-purge-delay idea), so
    /// the idle pool shrinks back after a burst.
    public var upstreamIdleTimeout: Nanos = .seconds(30)
    /// HTTP/1.1 requests a client may pipeline ahead of the one being answered; the connection
    /// stops reading while this many wait (or `streamBodyAfterBytes` of their bodies), and
    /// resumes as they are answered (in order).
    public var maxPipelinedRequests = 16
    public init() {}
}

/// A sidecar's identity settings. Identity is on when it has a join token (flag, file or
/// `TANDEM_JOIN_TOKEN`); the config file's `identity` table adjusts the rest.
public struct IdentitySettings: Sendable, Equatable {
    /// The mesh's bootstrap secret for the registry's token service. Never logged.
    public var joinToken: String?
    /// `iss` that tokens must carry: `tandem://<mesh>`.
    public var issuer = "tandem://tandem"
    /// Inbound treatment of tokens; nil = `require` with a join token, `off` without.
    public var mode: IdentityMode?
    /// Proof of possession on every request: attached to every outbound request, required on
    /// every inbound one. nil = the mesh's setting (`tandem registry --identity-proof`).
    public var proof: Bool?
    /// Which proofs this sidecar attaches: MAC proofs for callee instances that publish a
    /// proof key (signed ones for the others), or always signed ones.
    public var proofKind: ProofKind = .mac
    /// What an inbound route without an `allow` list admits; nil = the mesh's setting
    /// (`tandem registry --identity-default`), allow if it has none.
    public var defaultAccess: DefaultAccess?
    /// Lifetime asked of the registry (it caps it); refreshed at two thirds of it.
    public var tokenTTL: Int64 = 300
    public var limits = IdentityLimits()
    public init() {}

    public var effectiveMode: IdentityMode { mode ?? (joinToken == nil ? .off : .require) }
    /// Whether outbound requests carry tokens.
    public var sendsTokens: Bool { joinToken != nil }
}

/// An inbound route: which requests it matches and what it requires of them.
public struct InboundRoute: Sendable, Equatable {
    public var name: String
    public var match: RouteMatch
    public var access = AccessRule()
    /// Requires a proof of possession; nil = the mesh-wide `identity.proof`.
    public var proof: Bool?
    /// End-user JWT verification; nil = none.
    public var jwt: JWTRule?
    public init(name: String, match: RouteMatch) {
        self.name = name
        self.match = match
    }
}

/// End-user JWT verification on an inbound route (the seed's JWT middleware, done with
/// jwt-kit): where the token is read, which keys and algorithms verify it, which issuers and
/// audiences are accepted, and which claims go to the app as headers.
public struct JWTRule: Sendable, Equatable {
    public enum Source: Sendable, Equatable {
        case bearer
        case header(String)
        case cookie(String)
        case query(String)
    }
    /// JWKS documents (files, or registry keys watched) and PEM public keys with the algorithm
    /// each is for; HMAC secrets (files) for HS256.
    public var jwksFiles: [String] = []
    public var registryJWKS: [String] = []
    public var pemKeys: [(file: String, alg: String)] = []
    public var hmacSecretFiles: [String] = []
    public var issuers: [String] = []
    public var audiences: [String] = []
    /// Accepted `alg` values (never `none`).
    public var algorithms: [String] = ["RS256", "ES256", "EdDSA"]
    public var from: [Source] = [.bearer]
    public var skew: Int64 = 30
    /// claim → header forwarded to the app (e.g. `sub` → `x-user-id`).
    public var forwardClaims: [(claim: String, header: String)] = []
    /// A request without a token is refused (false: passes without claims).
    public var required = true
    /// Keep the token on the request to the app (Envoy's `forward`; default: stripped).
    public var forwardToken = false
    public init() {}

    public static func == (a: JWTRule, b: JWTRule) -> Bool {
        a.jwksFiles == b.jwksFiles && a.registryJWKS == b.registryJWKS
            && a.pemKeys.map { "\($0.file)|\($0.alg)" } == b.pemKeys.map { "\($0.file)|\($0.alg)" }
            && a.hmacSecretFiles == b.hmacSecretFiles && a.issuers == b.issuers && a.audiences == b.audiences
            && a.algorithms == b.algorithms && a.from == b.from && a.skew == b.skew
            && a.forwardClaims.map { "\($0.claim)|\($0.header)" } == b.forwardClaims.map { "\($0.claim)|\($0.header)" }
            && a.required == b.required && a.forwardToken == b.forwardToken
    }
}

/// A local listener dedicated to one upstream service.
public struct LocalUpstream: Sendable, Equatable {
    public enum Kind: String, Sendable { case http, tcp }
    public var host = "127.0.0.1"
    public var port: Int
    public var proto: Kind = .http
    public init(port: Int, proto: Kind = .http, host: String = "127.0.0.1") {
        self.port = port
        self.proto = proto
        self.host = host
    }
}

public struct SidecarConfig: Sendable {
    public var service: String
    public var instance: String
    /// The app's port on `appHost`.
    public var appHost = "127.0.0.1"
    public var appPort: Int
    public var inbound = HostPort(host: "127.0.0.1", port: 0)
    public var outbound = HostPort(host: "127.0.0.1", port: 0)
    public var admin = HostPort(host: "127.0.0.1", port: 0)
    /// What the app speaks on its port: HTTP/1.1, or HTTP/2 without TLS (h2c: gRPC servers).
    /// HTTP/2 requests for an HTTP/1.1 app are translated; outbound, the protocol of each
    /// request is kept on the next hop.
    public enum AppProtocol: String, Sendable { case http, h2c, grpc }
    public var appProtocol: AppProtocol = .http
    /// The address other sidecars reach the inbound listener at (default: its bound host).
    public var advertiseHost: String? = nil
    public var zone: String? = nil
    public var metadata: [String: String] = [:]
    /// Outbound routes; a request that matches none goes to the cluster named by its host.
    public var routes: [Route] = []
    /// Per-cluster settings; a cluster not listed gets `defaultCluster` with its name.
    public var clusters: [String: ClusterConfig] = [:]
    public var defaultCluster = ClusterConfig(name: "default")
    /// Endpoints used when discovery has none (or no registry is configured).
    public var staticEndpoints: [String: [Endpoint]] = [:]
    /// Per-upstream local listeners: the app reaches `users` on 127.0.0.1:9001 without naming
    /// it, in any protocol. `http` sniffs HTTP/1.1 or h2c (gRPC); `tcp` proxies bytes.
    public var localUpstreams: [String: LocalUpstream] = [:]
    /// Retry policy and timeout of the implicit per-service routes (requests matching no route).
    public var defaultRetry = RetryPolicy()
    public var defaultTimeout: Nanos? = .seconds(15)
    /// Response compression of the implicit routes and the default of configured ones.
    public var defaultCompression: CompressionPolicy? = nil
    /// Compression of the app's responses on the inbound side.
    public var inboundCompression: CompressionPolicy? = nil
    /// Rate limit of requests to the app (per caller with a key); 429 beyond.
    public var inboundRateLimit: TokenBucket.Config? = nil
    public var inboundRateLimitKey: RateLimitKey? = nil
    /// Lua policies per outbound route name, in the order they run.
    public var routePolicies: [String: [PolicySpec]] = [:]
    /// Lua policies on every inbound request (in front of the app).
    public var inboundPolicies: [PolicySpec] = []
    /// Service identity (docs/security.md): tokens out, verification and allow rules in.
    public var identity = IdentitySettings()
    /// Inbound routes: per-path allow rules, proof and end-user JWT requirements. A request
    /// matching none gets `inboundDefault`.
    public var inboundRoutes: [InboundRoute] = []
    public var inboundDefault = InboundRoute(name: "inbound", match: RouteMatch())
    /// Outbound routes that attach a proof of possession to every request (besides all of
    /// them when `identity.proof` is on).
    public var proofRoutes: Set<String> = []
    /// Whether any response may be compressed (new connections then get a compressor).
    public var usesCompression: Bool {
        defaultCompression != nil || inboundCompression != nil || routes.contains { $0.compression != nil }
    }
    /// Inbound requests are cut after this (or the caller's remaining deadline, if shorter).
    public var inboundTimeout: Nanos? = .seconds(60)
    /// How the sidecar checks its app; registration says "passing" only after it passes.
    public var appHealth = HealthCheckConfig(kind: .tcp)
    /// Registration lease TTL in seconds.
    public var leaseTTL: Int64 = 10
    public var limits = SidecarLimits()
    /// After deregistering, keep serving this long so peers see the change before we stop.
    public var drainGrace: Nanos = .seconds(1)
    /// Bound on waiting for in-flight requests during a drain.
    public var drainTimeout: Nanos = .seconds(10)
    public var accessLog = false
    /// Seed for the sidecar's random choices (balancer, jitter); nil = from the system.
    public var seed: UInt64? = nil

    public init(service: String, instance: String, appPort: Int) {
        self.service = service
        self.instance = instance
        self.appPort = appPort
    }

    public func clusterConfig(_ name: String) -> ClusterConfig {
        if let c = clusters[name] { return c }
        var c = defaultCluster
        c.name = name
        return c
    }
}

extension SidecarConfig {
    /// The outbound route of a request: the first configured route that matches, else the
    /// implicit route of the service its host names (with the default retry policy, timeout
    /// and compression); nil when the host names no service. `table` is `RouteTable(routes)`,
    /// built once by the caller.
    public func outboundRoute(_ req: RequestHead, table: RouteTable) -> Route? {
        if let d = table.route(req) { return d.route }
        guard Self.isServiceName(req.host) else { return nil }
        var r = Route(
            name: "service:\(req.host)", match: RouteMatch(host: req.host), cluster: req.host,
            timeout: defaultTimeout, retry: defaultRetry)
        r.compression = defaultCompression
        return r
    }

    /// Whether a host names a service (not an IP literal, not localhost).
    public static func isServiceName(_ host: String) -> Bool {
        if host.isEmpty || host == "localhost" { return false }
        if host.allSatisfy({ $0.isNumber || $0 == "." }) { return false }  // IPv4 literal
        if host.hasPrefix("[") { return false }
        return true
    }
}
