import Foundation
import TandemCore
import TandemIdentity
import TandemTraffic

/// The sidecar config file's schema: every table the file may contain, every key, its type,
/// default and meaning. One source for three things, so they cannot drift apart:
/// - `ConfigFile` accepts exactly these keys (an unknown key is an error naming the allowed ones);
/// - `docs/config.md` is generated from it (`tandem docs config`; a test fails if stale);
/// - a test loads every key's example through `ConfigFile`, so each documented key works.
/// Defaults are read from the default values of the types the sidecar uses.
public enum ConfigSchema {
    public struct Field: Sendable {
        public let name: String
        /// What the value is, for people: "integer (ms)", "list of strings", a record's title.
        public let type: String
        public let defaultValue: String
        public let doc: String
        /// A Lua expression the key accepts (used by the reference and by the test that loads it).
        public let example: String
        /// The record this key's value is (or holds), if any.
        public let record: String?
        /// Other `key = value` pairs the example needs next to it (the test's context).
        public let with: String

        init(
            _ name: String, _ type: String, _ defaultValue: String = "—", _ doc: String, example: String,
            record: String? = nil, with: String = ""
        ) {
            self.name = name
            self.type = type
            self.defaultValue = defaultValue
            self.doc = doc
            self.example = example
            self.record = record
            self.with = with
        }
    }

    public struct Record: Sendable {
        public let name: String
        public let title: String
        public let doc: String
        /// A config file with `%s` where one `key = value` of this record goes (the test's context).
        public let context: String
        public let fields: [Field]
        public var keys: Set<String> { Set(fields.map(\.name)) }
    }

    public static func record(_ name: String) -> Record {
        guard let r = records.first(where: { $0.name == name }) else { preconditionFailure("no record \(name)") }
        return r
    }

    static func ms(_ n: Nanos?) -> String { n.map { "\($0 / 1_000_000)" } ?? "none" }
    static func opt(_ n: Int?) -> String { n.map { "\($0)" } ?? "off" }
    static func opt(_ d: Double?) -> String { d.map { "\($0)" } ?? "off" }

    static let sidecar = SidecarConfig(service: "users", instance: "users-1", appPort: 8080)
    static let cluster = ClusterConfig(name: "default")
    static let retry = RetryPolicy()
    static let health = HealthCheckConfig()
    static let compression = CompressionPolicy()
    static let jwt = JWTRule()

    static let matchFields: [Field] = [
        .init("name", "string", "its position", "The route's name (metrics, logs, policies).", example: #""user""#),
        .init(
            "host", "string", "any", "Match the Host / :authority (case-insensitive, port ignored).",
            example: #""users""#),
        .init(
            "path", "string", "any",
            "Match the path: exact (`/user`), template (`/user/:id`, `:name` segments), or prefix (`/api/*`).",
            example: #""/user/:id""#),
        .init("prefix", "string", "—", "Match a plain path prefix (Envoy's `prefix`).", example: #""/api/""#),
        .init("methods", "list of strings", "any", "Match these methods.", example: #"{ "GET", "HEAD" }"#),
        .init(
            "headers", "table name → string or true", "—", "Match header values exactly, or presence with `true`.",
            example: #"{ ["x-canary"] = "1", ["x-debug"] = true }"#),
    ]

    static let accessFields: [Field] = [
        .init(
            "allow", "list of service names", "everyone (or none: `identity.default`)",
            "Only these calling services (verified by their identity tokens) may use the route; 403 otherwise.",
            example: #"{ "orders", "billing" }"#),
        .init(
            "deny", "list of service names", "—", "These calling services are refused (403), even if allowed.",
            example: #"{ "batch" }"#),
        .init(
            "proof", "boolean", "false (or the mesh setting)",
            "Require a proof of possession on every request (docs/security.md).", example: "true"),
        .init(
            "jwt", "table", "—", "Verify an end-user JWT before the app (see *End-user JWT*).",
            example: #"{ hmac_secret_file = "secret.txt", algorithms = { "HS256" } }"#, record: "jwt"),
    ]

    public static let records: [Record] = [
        Record(
            name: "config", title: "The file",
            doc:
                "The config file is Lua that returns one table; `env` holds the environment. Every key is optional. Command-line flags give the starting values; the file overrides them. It is re-read when it changes; a bad new version is refused and the running one stays.",
            context: "return { %s }",
            fields: [
                .init(
                    "service", "string", "the --service flag",
                    "If given, must equal --service (a guard against using another service's file).",
                    example: #""users""#),
                .init(
                    "listen", "table", "—", "Listener addresses.", example: #"{ admin = "127.0.0.1:15000" }"#,
                    record: "listen"),
                .init(
                    "routes", "list of routes", "[]",
                    "Outbound routes, most specific match wins; a request matching none goes to the service its host names.",
                    example: #"{ { name = "users", host = "users", cluster = "users" } }"#, record: "route"),
                .init(
                    "clusters", "table name → cluster", "{}",
                    "Per-upstream-service settings; a service not listed gets `defaults.cluster`.",
                    example: #"{ users = { balancer = "round_robin" } }"#, record: "cluster"),
                .init(
                    "endpoints", "table name → list of \"host:port\"", "{}",
                    "Static endpoints, used when discovery has none for that service.",
                    example: #"{ users = { "127.0.0.1:8080" } }"#),
                .init(
                    "upstreams", "table name → port or upstream", "{}",
                    "Local listeners per upstream service, any protocol: the app dials 127.0.0.1:PORT.",
                    example: #"{ users = 9001, db = { port = 9002, protocol = "tcp" } }"#, record: "upstream"),
                .init(
                    "defaults", "table", "—", "Defaults for routes and clusters.", example: "{ timeout_ms = 5000 }",
                    record: "defaults"),
                .init(
                    "inbound", "table", "—", "The inbound side (requests to the app).",
                    example: #"{ policies = { "policies/request-id.lua" } }"#, record: "inbound"),
                .init(
                    "identity", "table", "—", "Service identity (needs a join token).",
                    example: #"{ mode = "permissive" }"#, record: "identity"),
            ]),
        Record(
            name: "listen", title: "listen", doc: "Listener addresses (\"host:port\"; port 0 picks a free one).",
            context: "return { listen = { %s } }",
            fields: [
                .init(
                    "inbound", "\"host:port\"", "\(sidecar.inbound)",
                    "The inbound listener, the address registered for this instance.",
                    example: #""127.0.0.1:15001""#),
                .init(
                    "outbound", "\"host:port\"", "\(sidecar.outbound)",
                    "The outbound listener the app calls through (HTTP_PROXY points here).",
                    example: #""127.0.0.1:15002""#),
                .init(
                    "admin", "\"host:port\"", "\(sidecar.admin)",
                    "The admin listener: /ready /live /metrics /clusters /routes /identity, POST /drain.",
                    example: #""127.0.0.1:15000""#),
            ]),
        Record(
            name: "defaults", title: "defaults",
            doc: "Defaults inherited by routes (and by requests matching no route) and by clusters not listed.",
            context: "return { defaults = { %s } }",
            fields: [
                .init(
                    "retry", "retry", "see *retry*", "The retry policy of routes that set none.",
                    example: "{ attempts = 2 }", record: "retry"),
                .init(
                    "timeout_ms", "integer (ms)", ms(sidecar.defaultTimeout),
                    "Whole-request timeout, retries included.", example: "5000"),
                .init(
                    "cluster", "cluster", "see *cluster*", "Settings of every cluster not listed in `clusters`.",
                    example: "{ connect_timeout_ms = 1000 }", record: "cluster"),
                .init(
                    "compression", "compression", "off", "Response compression of routes that set none.",
                    example: "true", record: "compression"),
            ]),
        Record(
            name: "route", title: "routes[i]",
            doc:
                "An outbound route: what it matches, where it goes, and how. `cluster` is required. The most specific match wins (exact path over template over prefix, then more conditions).",
            context: #"return { routes = { { cluster = "users", %s } } }"#,
            fields: matchFields + [
                .init("cluster", "string", "required", "The upstream service.", example: #""users""#),
                .init(
                    "timeout_ms", "integer (ms)", "defaults.timeout_ms",
                    "Whole-request timeout, retries included; a caller's shorter grpc-timeout wins.",
                    example: "2000"),
                .init(
                    "retry", "retry", "defaults.retry", "This route's retry policy.",
                    example: #"{ attempts = 2, retry_on = "5xx,reset" }"#, record: "retry"),
                .init(
                    "rate_limit", "rate_limit", "none", "A local token bucket; 429 beyond.",
                    example: "{ rps = 100, burst = 200 }", record: "rate_limit"),
                .init(
                    "compression", "compression", "defaults.compression", "Compress this route's answers.",
                    example: "{ min_bytes = 1024 }", record: "compression"),
                .init(
                    "policies", "list of policies", "[]", "Lua policies, in the order they run (see *policies*).",
                    example: #"{ "policies/request-id.lua" }"#, record: "policy"),
                .init(
                    "proof", "boolean", "false (or the mesh setting)",
                    "Attach a proof of possession to every request of this route.", example: "true"),
                .init(
                    "subset", "table name → string", "{} (every endpoint)",
                    "Only endpoints registered with all these metadata pairs (`tandem run --meta version=v2`); Envoy's metadata_match. None in the subset: 503 no-healthy-endpoint. A policy may change it per request (`req:set_subset`).",
                    example: #"{ version = "v2" }"#),
            ]),
        Record(
            name: "retry", title: "retry",
            doc:
                "When and how often to retry (Envoy's and Linkerd's knobs). Retries stay within the cluster's `retry_budget`; only idempotent methods unless `non_idempotent`.",
            context: #"return { routes = { { cluster = "users", retry = { %s } } } }"#,
            fields: [
                .init(
                    "attempts", "integer 0–10", "\(retry.numRetries)", "Retries after the first attempt.",
                    example: "2"),
                .init(
                    "retry_on", "comma-separated string", "connect-failure,refused-stream,reset,retriable-status-codes",
                    "Conditions: 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-status-codes, per-try-timeout (Envoy's names).",
                    example: #""5xx,reset,per-try-timeout""#),
                .init(
                    "retriable_status_codes", "list of integers", "\(retry.retriableStatusCodes.sorted())",
                    "Statuses retried under retriable-status-codes (adds that condition).", example: "{ 503, 429 }"),
                .init(
                    "per_try_timeout_ms", "integer (ms)", ms(retry.perTryTimeout),
                    "Timeout of each attempt (a slow attempt is retried under per-try-timeout).", example: "250"),
                .init(
                    "backoff_base_ms", "integer (ms)", ms(retry.backoffBase),
                    "Full-jitter exponential backoff: attempt n waits up to base·2^(n-1).", example: "50"),
                .init(
                    "backoff_max_ms", "integer (ms)", ms(retry.backoffMax), "The backoff's cap (≥ base).",
                    example: "500"),
                .init(
                    "non_idempotent", "boolean", "\(retry.retryNonIdempotent)", "Retry POST, PATCH and the like too.",
                    example: "true"),
                .init(
                    "max_replay_bytes", "integer (bytes)", "\(retry.maxReplayBytes)",
                    "Request bodies up to this size are kept for a retry; larger ones are never retried.",
                    example: "131072"),
            ]),
        Record(
            name: "rate_limit", title: "rate_limit",
            doc:
                "A local token bucket: `rps` + `burst`, or Envoy's `max_tokens` + `tokens_per_fill` + `fill_interval_ms`. Over it: 429 with `tandem-error: rate-limited`.",
            context: #"return { routes = { { cluster = "users", rate_limit = { %s } } } }"#,
            fields: [
                .init("rps", "integer", "required (or max_tokens)", "Tokens added per second.", example: "100"),
                .init("burst", "integer", "rps", "Bucket size.", example: "200", with: "rps = 100"),
                .init(
                    "per", "string", "one bucket",
                    "A bucket per `remote_address`, per `header:NAME` value, or (inbound only) per verified `caller`.",
                    example: #""header:x-api-key""#, with: "rps = 100"),
                .init(
                    "max_tokens", "integer", "—", "Envoy's bucket size (instead of rps and burst).", example: "50",
                    with: "fill_interval_ms = 100"),
                .init(
                    "tokens_per_fill", "integer", "1", "Envoy: tokens per fill.", example: "5",
                    with: "max_tokens = 50, fill_interval_ms = 100"),
                .init(
                    "fill_interval_ms", "integer (ms)", "required with max_tokens", "Envoy: the fill interval.",
                    example: "100", with: "max_tokens = 50"),
            ]),
        Record(
            name: "compression", title: "compression",
            doc:
                "gzip for answers the client accepts gzip for: `true`, `false`, or a table. Only listed content types, bodies of at least `min_bytes`, nothing already encoded or marked no-transform.",
            context: #"return { routes = { { cluster = "users", compression = { %s } } } }"#,
            fields: [
                .init(
                    "min_bytes", "integer (bytes)", "\(compression.minBytes)", "Smaller bodies are sent as they are.",
                    example: "1024"),
                .init(
                    "content_types", "list of strings", compression.contentTypes.joined(separator: ", "),
                    "Media types (prefixes) worth compressing.", example: #"{ "application/json", "text/" }"#),
            ]),
        Record(
            name: "cluster", title: "clusters.NAME",
            doc: "How one upstream service is called: balancing, connection limits, breaker, outlier detection.",
            context: "return { clusters = { users = { %s } } }",
            fields: [
                .init(
                    "balancer", "string", "peak_ewma",
                    "peak_ewma, least_request (power of two choices), round_robin, random, or ring_hash:HEADER (consistent hashing).",
                    example: #""ring_hash:x-user-id""#),
                .init(
                    "connect_timeout_ms", "integer (ms)", ms(cluster.connectTimeout),
                    "Connect timeout to an endpoint.", example: "1000"),
                .init(
                    "zone", "string", "the --zone flag", "Prefer endpoints in this zone while any is routable.",
                    example: #""eu-1""#),
                .init(
                    "breaker", "breaker", "see *breaker*", "The circuit breaker.",
                    example: "{ consecutive_failures = 7 }", record: "breaker"),
                .init(
                    "outlier", "outlier", "see *outlier*", "Outlier detection (ejection of bad endpoints).",
                    example: "{ consecutive_5xx = 3 }", record: "outlier"),
                .init(
                    "retry_budget", "retry_budget", "see *retry_budget*", "The bound on retries to this service.",
                    example: "{ ratio = 0.1 }", record: "retry_budget"),
                .init(
                    "limits", "limits", "see *limits*", "Concurrency limits (Envoy's circuit-breaker thresholds).",
                    example: "{ max_requests = 100 }", record: "limits"),
                .init(
                    "health_check", "health_check", "none (passive only)", "Active health checks of the endpoints.",
                    example: #"{ path = "/health" }"#, record: "health_check"),
            ]),
        Record(
            name: "breaker", title: "clusters.NAME.breaker",
            doc:
                "Closed → open → half-open probes → closed. Trips on consecutive failures (Linkerd, Dapr) and/or an error or slow-call ratio over a window (Sentinel, resilience4j). While open the sidecar answers 503 `circuit-open` at once; the open time doubles per repeated trip.",
            context: "return { clusters = { users = { breaker = { %s } } } }",
            fields: [
                .init(
                    "consecutive_failures", "integer (0 = off)", opt(cluster.breaker.consecutiveFailures),
                    "Failed requests in a row that open it.", example: "7"),
                .init(
                    "error_ratio", "number 0–1", opt(cluster.breaker.errorRatio),
                    "Open when failures / requests reach this over `window_ms`.", example: "0.5"),
                .init(
                    "slow_call_ratio", "number 0–1", opt(cluster.breaker.slowCallRatio),
                    "Open when slow calls / requests reach this over `window_ms`.", example: "0.8"),
                .init(
                    "slow_call_ms", "integer (ms)", ms(cluster.breaker.slowCall), "A call slower than this is slow.",
                    example: "500"),
                .init(
                    "min_requests", "integer", "\(cluster.breaker.minRequests)",
                    "Ratios are judged only with at least this many requests in the window.", example: "10"),
                .init(
                    "window_ms", "integer (ms)", ms(cluster.breaker.window), "The rolling window of the ratios.",
                    example: "5000"),
                .init(
                    "open_ms", "integer (ms)", ms(cluster.breaker.baseOpen), "The first open period.",
                    example: "2000"),
                .init(
                    "max_open_ms", "integer (ms)", ms(cluster.breaker.maxOpen), "The longest open period.",
                    example: "30000"),
                .init(
                    "half_open_probes", "integer", "\(cluster.breaker.halfOpenProbes)",
                    "Probes let through while half-open; that many successes close it.", example: "2"),
            ]),
        Record(
            name: "outlier", title: "clusters.NAME.outlier",
            doc:
                "Envoy's outlier detection: an endpoint is ejected for `ejection_ms` × times ejected (capped), never more than `max_ejection_percent` of the cluster (at least one).",
            context: "return { clusters = { users = { outlier = { %s } } } }",
            fields: [
                .init(
                    "consecutive_5xx", "integer (0 = off)", opt(cluster.outlier.consecutive5xx),
                    "5xx answers (and timeouts, resets) in a row that eject an endpoint.", example: "3"),
                .init(
                    "consecutive_gateway_failure", "integer (0 = off)", opt(cluster.outlier.consecutiveGatewayFailure),
                    "502/503/504 and connection failures in a row that eject it.", example: "3"),
                .init(
                    "ejection_ms", "integer (ms)", ms(cluster.outlier.baseEjectionTime), "Base ejection time.",
                    example: "10000"),
                .init(
                    "max_ejection_ms", "integer (ms)", ms(cluster.outlier.maxEjectionTime), "Longest ejection.",
                    example: "120000"),
                .init(
                    "max_ejection_percent", "integer 0–100", "\(cluster.outlier.maxEjectionPercent)",
                    "Most of the cluster that may be ejected at once (at least one endpoint).", example: "50"),
                .init(
                    "interval_ms", "integer (ms)", ms(cluster.outlier.interval),
                    "How often success rates are evaluated.", example: "5000"),
                .init(
                    "success_rate", "boolean", "\(cluster.outlier.enforceSuccessRate)",
                    "Eject endpoints whose success rate is below mean − 1.9 σ (with ≥ 5 endpoints, 100 requests each).",
                    example: "false"),
                .init(
                    "failure_percentage_threshold", "integer 0–100", opt(cluster.outlier.failurePercentageThreshold),
                    "Eject endpoints failing at least this percentage (with ≥ 5 endpoints, 50 requests each).",
                    example: "85"),
            ]),
        Record(
            name: "retry_budget", title: "clusters.NAME.retry_budget",
            doc:
                "Linkerd's retry budget: retries to this service may add at most `ratio` × requests plus `min_per_second` × ttl over the last ttl; beyond it a retry is not made (`tandem_retry_budget_exhausted_total`). No retry storms.",
            context: "return { clusters = { users = { retry_budget = { %s } } } }",
            fields: [
                .init(
                    "ratio", "number 0–1", "\(cluster.retryBudget.ratio)", "Retries per request, at most.",
                    example: "0.1"),
                .init(
                    "min_per_second", "integer", "\(cluster.retryBudget.minPerSecond)",
                    "Retries allowed per second whatever the traffic.", example: "5"),
                .init(
                    "ttl_ms", "integer (ms)", ms(cluster.retryBudget.ttl), "The window requests are counted over.",
                    example: "5000"),
            ]),
        Record(
            name: "limits", title: "clusters.NAME.limits",
            doc: "Concurrency limits per cluster (Envoy's circuit-breaker thresholds); beyond them: 503 `overflow`.",
            context: "return { clusters = { users = { limits = { %s } } } }",
            fields: [
                .init(
                    "max_requests", "integer", "\(cluster.limits.maxRequests)", "Requests in flight.", example: "100"),
                .init(
                    "max_connections", "integer", "\(cluster.limits.maxConnections)", "Upstream connections.",
                    example: "100"),
                .init(
                    "max_pending_requests", "integer", "\(cluster.limits.maxPendingRequests)",
                    "Requests waiting for a connection.", example: "50"),
                .init(
                    "max_retries", "integer", opt(cluster.limits.maxRetries),
                    "Retries in flight (off: the retry budget governs alone).", example: "3"),
            ]),
        Record(
            name: "health_check", title: "clusters.NAME.health_check",
            doc:
                "Active checks of each endpoint, by HTTP path, TCP connect or gRPC health (one of them), with the seed's defaults; failing endpoints are not balanced to.",
            context: "return { clusters = { users = { health_check = { %s } } } }",
            fields: [
                .init("path", "string", "/health", "GET this path; 200–399 passes.", example: #""/ready""#),
                .init("tcp", "true", "—", "A TCP connect passes.", example: "true"),
                .init(
                    "grpc", "string", "—",
                    "grpc.health.v1.Health/Check of this service ('' = the server) must be SERVING.",
                    example: #""users""#),
                .init(
                    "interval_ms", "integer (ms)", ms(health.interval), "Between checks.", example: "5000"),
                .init("timeout_ms", "integer (ms)", ms(health.timeout), "Of one check.", example: "500"),
                .init(
                    "unhealthy_threshold", "integer", "\(health.unhealthyThreshold)", "Failures to mark it unhealthy.",
                    example: "2"),
                .init(
                    "healthy_threshold", "integer", "\(health.healthyThreshold)",
                    "Passes to mark it healthy again.", example: "1"),
                .init(
                    "jitter_percent", "integer 0–100", "\(health.intervalJitterPercent)",
                    "Each interval is stretched by up to this much at random.", example: "20"),
            ]),
        Record(
            name: "upstream", title: "upstreams.NAME",
            doc:
                "A local listener for one upstream service: a port number, or a table. `http` sniffs HTTP/1.1 or h2c (gRPC) and applies routes; `tcp` proxies bytes.",
            context: "return { upstreams = { users = { port = 19001, %s } } }",
            fields: [
                .init("port", "integer", "required", "The local port.", example: "19002"),
                .init("protocol", "\"http\" or \"tcp\"", "http", "What is spoken on it.", example: #""tcp""#),
                .init("host", "string", "127.0.0.1", "The address to listen on.", example: #""127.0.0.1""#),
            ]),
        Record(
            name: "inbound", title: "inbound",
            doc:
                "Requests to the app. `allow`, `deny`, `proof` and `jwt` here apply to every inbound request that matches no `inbound.routes` entry.",
            context: "return { inbound = { %s } }",
            fields: accessFields + [
                .init(
                    "policies", "list of policies", "[]", "Lua policies run on every request to the app.",
                    example: #"{ "policies/response-time.lua" }"#, record: "policy"),
                .init(
                    "rate_limit", "rate_limit", "none", "A token bucket in front of the app (per caller with `per`).",
                    example: "{ rps = 50 }", record: "rate_limit"),
                .init(
                    "compression", "compression", "off", "Compress the app's answers.", example: "true",
                    record: "compression"),
                .init(
                    "routes", "list of inbound routes", "[]", "Per-path rules (first match wins).",
                    example: #"{ { path = "/admin/*", allow = { "ops" } } }"#, record: "inbound_route"),
            ]),
        Record(
            name: "inbound_route", title: "inbound.routes[i]",
            doc: "Per-path access rules in front of the app.",
            context: "return { inbound = { routes = { { %s } } } }",
            fields: matchFields + accessFields),
        Record(
            name: "jwt", title: "End-user JWT (`jwt = { … }`)",
            doc:
                "Verified with jwt-kit. The token's `alg` must be listed and be the algorithm of the key that verifies it; `exp` is required; `none` is never accepted. Missing token: 401 `missing-token`; expired: `expired-token`; otherwise `invalid-token` with the reason.",
            context: #"return { inbound = { jwt = { jwks_file = "jwks.json", %s } } }"#,
            fields: [
                .init(
                    "jwks_file", "string or list", "—", "JWKS file(s), relative to the config file.",
                    example: #""idp.jwks.json""#),
                .init(
                    "jwks_registry_key", "string or list", "—", "A registry key holding a JWKS, watched.",
                    example: #""/tandem/jwks/idp""#),
                .init(
                    "pem", "{ file, alg } or a list", "—", "Public keys in PEM with their algorithm (asymmetric).",
                    example: #"{ file = "idp.pub.pem", alg = "RS256" }"#, record: "jwt_pem"),
                .init(
                    "hmac_secret_file", "string or list", "—", "Shared secrets for HS256/384/512.",
                    example: #""secret.txt""#),
                .init(
                    "issuers", "string or list", "any", "Accepted `iss` values.", example: #"{ "https://idp.example" }"#
                ),
                .init("audiences", "string or list", "any", "Accepted `aud` values.", example: #"{ "shop" }"#),
                .init(
                    "algorithms", "list of strings",
                    jwt.algorithms.joined(separator: ", ") + " (HS256 with only a secret)",
                    "Accepted algorithms.", example: #"{ "RS256", "ES256" }"#),
                .init(
                    "from", "string or list", "bearer",
                    "Where the token is: bearer (Authorization), header:NAME, cookie:NAME, query:NAME.",
                    example: #"{ "bearer", "cookie:session" }"#),
                .init(
                    "skew_s", "integer 0–600", "\(jwt.skew)", "Clock skew allowed on exp/nbf/iat.", example: "60"),
                .init(
                    "forward_claims", "table claim → header", "{}",
                    "Claims passed to the app as headers (removed from incoming requests first).",
                    example: #"{ sub = "x-user-id" }"#),
                .init(
                    "required", "boolean", "\(jwt.required)", "Without a token: 401 (true) or pass without claims.",
                    example: "false"),
                .init(
                    "forward_token", "boolean", "\(jwt.forwardToken)", "Keep the token on the request to the app.",
                    example: "true"),
            ]),
        Record(
            name: "jwt_pem", title: "jwt.pem",
            doc: "One PEM public key.",
            context: #"return { inbound = { jwt = { pem = { file = "k.pem", alg = "ES256", %s } } } }"#,
            fields: [
                .init("file", "string", "required", "The PEM file, relative to the config file.", example: #""k.pem""#),
                .init(
                    "alg", "string", "required", "RS256/384/512, PS256/384/512, ES256/384/512 or EdDSA.",
                    example: #""ES256""#),
            ]),
        Record(
            name: "policy", title: "policies",
            doc:
                "A list of Lua policy files (relative to the config file), each a file name or a table. Each is compiled in the sandbox and its `config` validated against the policy's schema when the file loads (docs/LUA.md).",
            context: #"return { inbound = { policies = { { file = "policies/request-id.lua", %s } } } }"#,
            fields: [
                .init("file", "string", "required", "The policy file.", example: #""policies/response-time.lua""#),
                .init(
                    "config", "table", "the schema's defaults", "The policy's arguments.",
                    example: #"{ header = "x-trace" }"#),
                .init(
                    "fail_open", "boolean", "false",
                    "On a policy error, pass the request on instead of answering 500 `policy-error`.",
                    example: "true"),
            ]),
        Record(
            name: "identity", title: "identity",
            doc:
                "Service identity without mTLS (docs/security.md). The join token comes from --join-token-file or TANDEM_JOIN_TOKEN, never from this file.",
            context: "return { identity = { %s } }",
            fields: [
                .init(
                    "mode", "\"require\", \"permissive\" or \"off\"", "require with a join token, else off",
                    "`permissive` admits callers without a token as anonymous (routes with `allow` still refuse them).",
                    example: #""permissive""#),
                .init(
                    "proof", "boolean", "the mesh setting", "Attach and require proofs of possession on every request.",
                    example: "true"),
                .init(
                    "proof_kind", "\"mac\" or \"signature\"", "\"mac\"",
                    "Proofs this sidecar attaches: an HMAC under a key agreed with the callee instance's published proof key (a few µs; signed proofs for callees that publish none), or always an Ed25519 signature (~30 µs to sign, ~110 µs to check). Inbound sidecars accept both.",
                    example: #""signature""#),
                .init(
                    "default", "\"allow\" or \"deny\"", "the mesh setting (allow)",
                    "Inbound routes without `allow`: everyone, or nobody.", example: #""deny""#),
                .init(
                    "token_ttl_s", "integer 10–3600", "\(sidecar.identity.tokenTTL)",
                    "Lifetime of the tokens this sidecar asks for.", example: "120"),
            ]),
    ]

    /// docs/config.md.
    public static func markdown() -> String {
        var out = """
            # Sidecar config reference

            Generated by `tandem docs config` from TandemConfig's `ConfigSchema`, the same table
            the config reader takes its keys from; do not edit (a test fails if this file is stale).
            Defaults are those of `tandem run` without flags; flags such as `--retries`,
            `--timeout-ms` or `--breaker-failures` change them. Unknown keys are errors that name the
            allowed ones; every error names the path of the offending value.

            ```lua
            -- orders.lua: tandem run --service orders --app-port 8081 --config orders.lua -- ./orders
            return {
              routes = {
                { name = "users", host = "users", cluster = "users", timeout_ms = 3000,
                  retry = { attempts = 2, retry_on = "gateway-error,reset", per_try_timeout_ms = 500 },
                  policies = { "policies/fallback.lua" } },
              },
              clusters = {
                users = { balancer = "round_robin",
                          breaker = { error_ratio = 0.5, min_requests = 10, window_ms = 5000 },
                          outlier = { consecutive_5xx = 3, max_ejection_percent = 50 } },
              },
              inbound = { policies = { "policies/request-id.lua" }, allow = { "web" } },
            }
            ```

            """
        for r in records {
            out +=
                "\n## \(r.title)\n\n\(r.doc)\n\n| key | type | default | meaning | example |\n|---|---|---|---|---|\n"
            for f in r.fields {
                let type = f.record.map { "\(f.type) (*\(record($0).title)*)" } ?? f.type
                out +=
                    "| `\(f.name)` | \(cell(type)) | \(cell(f.defaultValue)) | \(cell(f.doc)) | `\(cell(f.example))` |\n"
            }
        }
        return out
    }

    /// The LuaLS type of a field, from its type text and record; nil if unknown (a test
    /// requires every field to have one).
    public static func luaType(_ f: Field) -> String? {
        func cls(_ r: String) -> String { "tandem.config.\(r)" }
        let t = f.type
        if let r = f.record {
            switch true {
            case t.hasPrefix("list of policies"): return "(string|\(cls(r)))[]"
            case t.hasPrefix("list of"): return "\(cls(r))[]"
            case t == "table name → port or upstream": return "table<string, integer|\(cls(r))>"
            case t.hasPrefix("table name →"): return "table<string, \(cls(r))>"
            case t.hasPrefix("{ file, alg } or a list"): return "\(cls(r))|\(cls(r))[]"
            case r == "compression": return "boolean|\(cls(r))"
            default: return cls(r)
            }
        }
        if t.hasPrefix("integer") { return "integer" }
        if t.hasPrefix("number") { return "number" }
        if t == "boolean" || t == "true" { return t }
        if t.hasPrefix("\"") && t.contains(" or ") {
            // "require", "permissive" or "off" → a union of string literals.
            let parts = t.split(separator: "\"", omittingEmptySubsequences: false)
            let lits = parts.indices.filter { $0 % 2 == 1 }.map { "\"\(parts[$0])\"" }
            return lits.count > 1 ? lits.joined(separator: "|") : "string"
        }
        switch t {
        case "string", "comma-separated string", "\"host:port\"": return "string"
        case "string or list": return "string|string[]"
        case "list of strings", "list of service names": return "string[]"
        case "list of integers": return "integer[]"
        case "table name → string or true": return "table<string, string|true>"
        case "table claim → header", "table name → string": return "table<string, string>"
        case "table name → list of \"host:port\"": return "table<string, string[]>"
        case "table": return "table"
        default: return nil
        }
    }

    /// LuaLS classes for the config file (`---@type tandem.config.config` on the returned table),
    /// appended to the policy API's definitions by `tandem policy defs`.
    public static func luaLSDefinitions() -> String {
        var out = "\n-- The sidecar config file (docs/config.md), generated from TandemConfig's ConfigSchema.\n"
        for r in records {
            out += "\n---\(r.title): \(r.doc.split(separator: ".").first.map(String.init) ?? r.title).\n"
            out += "---@class tandem.config.\(r.name)\n"
            for f in r.fields {
                let required = f.defaultValue == "required"
                let def = f.defaultValue == "—" || required ? "" : " (default: \(f.defaultValue))"
                out += "---@field \(f.name)\(required ? "" : "?") \(luaType(f) ?? "any") \(f.doc)\(def)\n"
            }
        }
        return out
    }

    static func cell(_ s: String) -> String { s.replacingOccurrences(of: "|", with: "\\|") }
}
