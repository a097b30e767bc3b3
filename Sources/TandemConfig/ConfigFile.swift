import Foundation
import TandemCore
import TandemIdentity
import TandemLua
import TandemTraffic

/// The sidecar's Lua config file: it returns a table of routes, clusters, static endpoints
/// and local upstream ports.
///
/// ```lua
/// return {
///   service = "orders",                                   -- optional: must match --service
///   listen = { inbound = "127.0.0.1:15001", outbound = "127.0.0.1:15002", admin = "127.0.0.1:15000" },
///   routes = {
///     { name = "user", host = "users", path = "/user/:id", methods = { "GET" }, cluster = "users",
///       timeout_ms = 2000, rate_limit = { rps = 100, burst = 200 },
///       retry = { attempts = 2, retry_on = "5xx,reset", per_try_timeout_ms = 500 } },
///   },
///   clusters = {
///     users = { balancer = "round_robin", connect_timeout_ms = 1000,
///               breaker = { consecutive_failures = 5, error_ratio = 0.5, open_ms = 5000 },
///               outlier = { consecutive_5xx = 5, ejection_ms = 30000, max_ejection_percent = 10 },
///               retry_budget = { ratio = 0.2, min_per_second = 10 } },
///   },
///   endpoints = { users = { "127.0.0.1:8080" } },        -- static, used when discovery has none
///   upstreams = { users = 9001, db = { port = 9002, protocol = "tcp" } },  -- local listeners
///   inbound = { policies = { "policies/request-id.lua" } },
/// }
/// ```
/// A route's `policies` list names Lua policy files (relative to the config file) with their
/// arguments: `{ "policies/cors.lua", { file = "policies/rate-limit.lua", config = { rate = 10 },
/// fail_open = true } }`. Each is compiled in the sandbox and its arguments are validated
/// against the policy's schema when the config loads; an error names the key path.
/// ```lua
/// ```
/// Unknown keys are errors (a typo must not silently disable a setting); every error names
/// the path of the offending value.
public enum ConfigFile {
    public struct Error: Swift.Error, Equatable, CustomStringConvertible {
        public var message: String
        public init(_ m: String) { message = m }
        public var description: String { message }
    }

    /// Evaluates `source` and applies it over `base` (the flags).
    public static func load(
        source: String, name: String, base: SidecarConfig, environment: [String: String] = [:]
    )
        throws(Error) -> SidecarConfig
    {
        let value: LuaValue
        do {
            value = try LuaConfig.evaluate(source: source, chunkName: name, environment: environment)
        } catch {
            throw Error(error.message)
        }
        return try apply(value, to: base, file: name)
    }

    public static func apply(_ v: LuaValue, to base: SidecarConfig, file: String) throws(Error) -> SidecarConfig {
        guard case .table = v else { throw Error("\(file): must return a table, got \(v.typeName)") }
        var c = base
        let r = Reader(file: file, validator: PolicyValidator())
        try r.keys(v, "", ConfigSchema.record("config"))
        if let sv = v["service"] {
            let name = try r.string(sv, "service")
            guard name == base.service else {
                throw Error("\(file): service: the file is for \"\(name)\" but this sidecar is \"\(base.service)\"")
            }
        }
        if let l = v["listen"] {
            try r.keys(l, "listen", ConfigSchema.record("listen"))
            for (key, set) in [
                ("inbound", { (c: inout SidecarConfig, h: HostPort) in c.inbound = h }),
                ("outbound", { (c: inout SidecarConfig, h: HostPort) in c.outbound = h }),
                ("admin", { (c: inout SidecarConfig, h: HostPort) in c.admin = h }),
            ] {
                guard let x = l[key] else { continue }
                let text = try r.string(x, "listen.\(key)")
                guard let hp = HostPort(text) else {
                    throw r.fail("listen.\(key)", "expected \"host:port\", got \"\(text)\"")
                }
                set(&c, hp)
            }
        }
        // Defaults first: the file's routes and clusters inherit them.
        if let d = v["defaults"] {
            try r.keys(d, "defaults", ConfigSchema.record("defaults"))
            if let z = d["compression"] { c.defaultCompression = try r.compression(z, "defaults.compression") }
            if let retry = d["retry"] { c.defaultRetry = try r.retry(retry, "defaults.retry", base: base.defaultRetry) }
            if let t = d["timeout_ms"] {
                c.defaultTimeout = .milliseconds(Int64(try r.int(t, "defaults.timeout_ms", min: 1)))
            }
            if let cl = d["cluster"] {
                c.defaultCluster = try r.cluster(cl, "defaults.cluster", name: "default", base: base.defaultCluster)
            }
        }
        if let id = v["identity"] {
            try r.keys(id, "identity", ConfigSchema.record("identity"))
            if let m = id["mode"] {
                let text = try r.string(m, "identity.mode")
                guard let mode = IdentityMode(rawValue: text) else {
                    throw r.fail("identity.mode", "expected \"require\", \"permissive\" or \"off\", got \"\(text)\"")
                }
                c.identity.mode = mode
            }
            if let p = id["proof"] { c.identity.proof = try r.bool(p, "identity.proof") }
            if let k = id["proof_kind"] {
                let text = try r.string(k, "identity.proof_kind")
                guard let kind = ProofKind(rawValue: text) else {
                    throw r.fail("identity.proof_kind", "expected \"mac\" or \"signature\", got \"\(text)\"")
                }
                c.identity.proofKind = kind
            }
            if let d = id["default"] {
                let text = try r.string(d, "identity.default")
                guard let access = DefaultAccess(rawValue: text) else {
                    throw r.fail("identity.default", "expected \"allow\" or \"deny\", got \"\(text)\"")
                }
                c.identity.defaultAccess = access
            }
            if let t = id["token_ttl_s"] {
                c.identity.tokenTTL = Int64(try r.int(t, "identity.token_ttl_s", min: 10, max: 3600))
            }
        }
        if let inb = v["inbound"] {
            try r.keys(inb, "inbound", ConfigSchema.record("inbound"))
            c.inboundDefault = try r.inboundRoute(inb, "inbound", name: "inbound", match: RouteMatch())
            if let routes = inb["routes"] {
                guard let list = routes.array else { throw r.fail("inbound.routes", "expected a list of route tables") }
                c.inboundRoutes = []
                for (i, item) in list.enumerated() {
                    let p = "inbound.routes[\(i + 1)]"
                    try r.keys(item, p, ConfigSchema.record("inbound_route"))
                    let name = try item["name"].map { (x) throws(Error) in try r.string(x, "\(p).name") } ?? p
                    c.inboundRoutes.append(try r.inboundRoute(item, p, name: name, match: try r.match(item, p)))
                }
                var seen = Set<String>()
                for route in c.inboundRoutes where !seen.insert(route.name).inserted {
                    throw Error("\(file): inbound.routes: two routes are named \"\(route.name)\"")
                }
            }
            if let p = inb["policies"] { c.inboundPolicies = try r.policies(p, "inbound.policies") }
            if let z = inb["compression"] { c.inboundCompression = try r.compression(z, "inbound.compression") }
            if let rl = inb["rate_limit"] {
                let (limit, key) = try r.rateLimit(rl, "inbound.rate_limit")
                if key == .caller && c.identity.effectiveMode == .off {
                    throw r.fail("inbound.rate_limit.per", "\"caller\" needs identity (a join token)")
                }
                c.inboundRateLimit = limit
                c.inboundRateLimitKey = key
            }
        }
        if let routes = v["routes"] {
            guard let list = routes.array else { throw Error("\(file): routes: expected a list of route tables") }
            c.routes = []
            c.routePolicies = [:]
            for (i, item) in list.enumerated() {
                let route = try r.route(item, "routes[\(i + 1)]", base: c)
                c.routes.append(route)
                if let p = item["proof"], try r.bool(p, "routes[\(i + 1)].proof") { c.proofRoutes.insert(route.name) }
                if let p = item["policies"] {
                    c.routePolicies[route.name] = try r.policies(p, "routes[\(i + 1)].policies")
                }
                if route.rateLimitKey == .caller {
                    throw r.fail(
                        "routes[\(i + 1)].rate_limit.per",
                        "\"caller\" keys inbound rate limits (inbound.rate_limit); outbound, the caller is this sidecar"
                    )
                }
            }
            var seen = Set<String>()
            for route in c.routes where !seen.insert(route.name).inserted {
                throw Error("\(file): routes: two routes are named \"\(route.name)\"")
            }
        }
        if let clusters = v["clusters"] {
            guard case .table(let t) = clusters else { throw Error("\(file): clusters: expected a table by name") }
            for (key, value) in t {
                guard case .string(let name) = key else { throw Error("\(file): clusters: keys must be names") }
                c.clusters[name] = try r.cluster(value, "clusters.\(name)", name: name, base: c.defaultCluster)
            }
        }
        if let ups = v["upstreams"] {
            guard case .table(let t) = ups else { throw Error("\(file): upstreams: expected a table by name") }
            c.localUpstreams = [:]
            for (key, value) in t {
                guard case .string(let name) = key else {
                    throw Error("\(file): upstreams: keys must be service names")
                }
                let path = "upstreams.\(name)"
                switch value {
                case .number:
                    c.localUpstreams[name] = LocalUpstream(port: try r.int(value, path, min: 1, max: 65535))
                case .table:
                    try r.keys(value, path, ConfigSchema.record("upstream"))
                    var u = LocalUpstream(port: try r.int(value["port"] ?? .nil, "\(path).port", min: 1, max: 65535))
                    if let p = value["protocol"] {
                        let s = try r.string(p, "\(path).protocol")
                        guard let proto = LocalUpstream.Kind(rawValue: s) else {
                            throw Error("\(file): \(path).protocol: expected \"http\" or \"tcp\", got \"\(s)\"")
                        }
                        u.proto = proto
                    }
                    if let h = value["host"] { u.host = try r.string(h, "\(path).host") }
                    c.localUpstreams[name] = u
                default:
                    throw Error("\(file): \(path): expected a port number or { port = N, protocol = \"tcp\" }")
                }
            }
            var ports = Set<Int>()
            for (name, u) in c.localUpstreams where !ports.insert(u.port).inserted {
                throw Error("\(file): upstreams.\(name): port \(u.port) is used twice")
            }
        }
        if let eps = v["endpoints"] {
            guard case .table(let t) = eps else { throw Error("\(file): endpoints: expected a table by name") }
            for (key, value) in t {
                guard case .string(let name) = key, let list = value.array else {
                    throw Error("\(file): endpoints.\(key): expected a list of \"host:port\" strings")
                }
                var eps: [Endpoint] = []
                for (i, a) in list.enumerated() {
                    guard case .string(let s) = a, let hp = HostPort(s), hp.port > 0 else {
                        throw Error("\(file): endpoints.\(name)[\(i + 1)]: expected \"host:port\"")
                    }
                    eps.append(Endpoint(id: hp.description, host: hp.host, port: hp.port))
                }
                c.staticEndpoints[name] = eps
            }
        }
        for route in c.routes where route.cluster.isEmpty {
            throw Error("\(file): route \"\(route.name)\" names no cluster")
        }
        if let m = c.identity.mode, m != .off, c.identity.joinToken == nil {
            throw Error(
                "\(file): identity.mode: \"\(m.rawValue)\" needs a join token (--join-token-file or TANDEM_JOIN_TOKEN)")
        }
        // Allow rules and proofs need verified callers.
        if c.identity.effectiveMode == .off {
            for route in [c.inboundDefault] + c.inboundRoutes
            where route.access != AccessRule() || route.proof == true {
                throw Error(
                    "\(file): inbound route \"\(route.name)\" has allow/deny rules or requires a proof, but identity is off; give the sidecar a join token (--join-token-file or TANDEM_JOIN_TOKEN)"
                )
            }
        }
        return c
    }

    struct Reader {
        let file: String
        let validator: PolicyValidator

        /// `{ "file.lua", { file = "x.lua", config = {...}, fail_open = true } }`: each file read
        /// (relative to the config file's directory), compiled in the sandbox, its arguments
        /// validated against its schema.
        func policies(_ v: LuaValue, _ path: String) throws(Error) -> [PolicySpec] {
            guard let list = v.array else {
                throw fail(path, "expected a list of policy files or { file = ... } tables")
            }
            var out: [PolicySpec] = []
            for (i, item) in list.enumerated() {
                let p = "\(path)[\(i + 1)]"
                var spec = PolicySpec(file: "", source: "", config: nil, failOpen: false, path: p, name: "")
                switch item {
                case .string(let f): spec.file = f
                case .table:
                    try keys(item, p, ConfigSchema.record("policy"))
                    spec.file = try string(item["file"] ?? .nil, "\(p).file")
                    spec.config = item["config"]
                    if let fo = item["fail_open"] {
                        guard case .bool(let b) = fo else { throw fail("\(p).fail_open", "expected true or false") }
                        spec.failOpen = b
                    }
                default: throw fail(p, "expected a policy file name or { file = ... }")
                }
                let resolved =
                    spec.file.hasPrefix("/") ? spec.file : (baseDirectory as NSString).appendingPathComponent(spec.file)
                guard let source = try? String(contentsOfFile: resolved, encoding: .utf8) else {
                    throw fail(p, "cannot read policy file \(resolved)")
                }
                spec.file = resolved
                spec.source = source
                do {
                    spec.name = try validator.validate(spec)
                } catch {
                    throw Error(
                        "\(file): \(error.reason == .error ? "" : error.reason.rawValue + ": ")\(error.message)")
                }
                out.append(spec)
            }
            return out
        }

        /// Policy paths are relative to the config file's directory (the working directory for
        /// a config stored in the registry).
        var baseDirectory: String {
            FileManager.default.fileExists(atPath: file)
                ? (file as NSString).deletingLastPathComponent : FileManager.default.currentDirectoryPath
        }

        func fail(_ path: String, _ m: String) -> Error { Error("\(file): \(path): \(m)") }

        /// The keys of a table must be those of its record in `ConfigSchema`.
        func keys(_ v: LuaValue, _ path: String, _ record: ConfigSchema.Record) throws(Error) {
            let allowed = record.keys
            guard case .table(let t) = v else {
                throw fail(path.isEmpty ? "config" : path, "expected a table, got \(v.typeName)")
            }
            for k in t.keys {
                guard case .string(let s) = k, allowed.contains(s) else {
                    throw fail(
                        path.isEmpty ? "\(k)" : "\(path).\(k)",
                        "unknown setting; expected one of \(allowed.sorted().joined(separator: ", "))")
                }
            }
        }

        func string(_ v: LuaValue, _ path: String) throws(Error) -> String {
            guard case .string(let s) = v else { throw fail(path, "expected a string, got \(v.typeName)") }
            return s
        }

        func int(_ v: LuaValue, _ path: String, min: Int = 0, max: Int = Int(Int32.max)) throws(Error) -> Int {
            guard case .number(let d) = v, d == d.rounded(), d >= Double(min), d <= Double(max) else {
                throw fail(path, "expected an integer in \(min)…\(max), got \(v)")
            }
            return Int(d)
        }

        func ratio(_ v: LuaValue, _ path: String) throws(Error) -> Double {
            guard case .number(let d) = v, d >= 0, d <= 1 else {
                throw fail(path, "expected a number in 0…1, got \(v)")
            }
            return d
        }

        func bool(_ v: LuaValue, _ path: String) throws(Error) -> Bool {
            guard case .bool(let b) = v else { throw fail(path, "expected true or false") }
            return b
        }

        /// A list of strings, or one string.
        func strings(_ v: LuaValue, _ path: String) throws(Error) -> [String] {
            if case .string(let s) = v { return [s] }
            guard let list = v.array else { throw fail(path, "expected a string or a list of strings") }
            var out: [String] = []
            for (i, x) in list.enumerated() { out.append(try string(x, "\(path)[\(i + 1)]")) }
            return out
        }

        func serviceNames(_ v: LuaValue, _ path: String) throws(Error) -> Set<String> {
            let names = try strings(v, path)
            if let bad = names.first(where: { !TandemIdentity.isServiceName($0) }) {
                throw fail(path, "\"\(bad)\" is not a service name")
            }
            return Set(names)
        }

        /// `allow`, `deny`, `proof` and `jwt` of an inbound route (or of `inbound` itself).
        func inboundRoute(_ v: LuaValue, _ path: String, name: String, match: RouteMatch) throws(Error) -> InboundRoute
        {
            var route = InboundRoute(name: name, match: match)
            if let a = v["allow"] { route.access.allow = try serviceNames(a, "\(path).allow") }
            if let d = v["deny"] { route.access.deny = try serviceNames(d, "\(path).deny") }
            if let p = v["proof"] { route.proof = try bool(p, "\(path).proof") }
            if let j = v["jwt"] { route.jwt = try jwt(j, "\(path).jwt") }
            return route
        }

        static let jwtAlgorithms: Set<String> = [
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
            "EdDSA",
        ]

        /// End-user JWT settings; key files are read (and checked) when the sidecar loads them.
        func jwt(_ v: LuaValue, _ path: String) throws(Error) -> JWTRule {
            try keys(v, path, ConfigSchema.record("jwt"))
            var j = JWTRule()
            func file(_ f: String) -> String {
                f.hasPrefix("/") ? f : (baseDirectory as NSString).appendingPathComponent(f)
            }
            if let x = v["jwks_file"] { j.jwksFiles = try strings(x, "\(path).jwks_file").map(file) }
            if let x = v["jwks_registry_key"] { j.registryJWKS = try strings(x, "\(path).jwks_registry_key") }
            if let x = v["hmac_secret_file"] {
                j.hmacSecretFiles = try strings(x, "\(path).hmac_secret_file").map(file)
            }
            if let x = v["pem"] {
                // One `{ file = …, alg = … }` or a list of them.
                let list = x["file"] != nil ? [x] : (x.array ?? [x])
                for (i, item) in list.enumerated() {
                    let p = "\(path).pem[\(i + 1)]"
                    try keys(item, p, ConfigSchema.record("jwt_pem"))
                    let alg = try string(item["alg"] ?? .nil, "\(p).alg")
                    guard Self.jwtAlgorithms.contains(alg), !alg.hasPrefix("HS") else {
                        throw fail(
                            "\(p).alg", "expected an asymmetric algorithm (RS256, ES256, EdDSA, …), got \"\(alg)\"")
                    }
                    j.pemKeys.append((file(try string(item["file"] ?? .nil, "\(p).file")), alg))
                }
            }
            if let x = v["issuers"] { j.issuers = try strings(x, "\(path).issuers") }
            if let x = v["audiences"] { j.audiences = try strings(x, "\(path).audiences") }
            if let x = v["algorithms"] {
                j.algorithms = try strings(x, "\(path).algorithms")
                for a in j.algorithms where !Self.jwtAlgorithms.contains(a) {
                    throw fail(
                        "\(path).algorithms",
                        a.lowercased() == "none" ? "\"none\" is never accepted" : "unknown algorithm \"\(a)\"")
                }
            } else if !j.hmacSecretFiles.isEmpty && j.jwksFiles.isEmpty && j.pemKeys.isEmpty && j.registryJWKS.isEmpty {
                j.algorithms = ["HS256"]
            }
            if let x = v["from"] {
                j.from = []
                for (i, text) in try strings(x, "\(path).from").enumerated() {
                    let parts = text.split(separator: ":", maxSplits: 1).map(String.init)
                    switch (parts.first, parts.count) {
                    case ("bearer", 1): j.from.append(.bearer)
                    case ("header", 2): j.from.append(.header(parts[1].lowercased()))
                    case ("cookie", 2): j.from.append(.cookie(parts[1]))
                    case ("query", 2): j.from.append(.query(parts[1]))
                    default:
                        throw fail(
                            "\(path).from[\(i + 1)]",
                            "expected \"bearer\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got \"\(text)\"")
                    }
                }
            }
            if let x = v["skew_s"] { j.skew = Int64(try int(x, "\(path).skew_s", min: 0, max: 600)) }
            if let x = v["required"] { j.required = try bool(x, "\(path).required") }
            if let x = v["forward_token"] { j.forwardToken = try bool(x, "\(path).forward_token") }
            if let x = v["forward_claims"] {
                guard case .table(let t) = x else {
                    throw fail("\(path).forward_claims", "expected { claim = \"header\" }")
                }
                for (k, h) in t.sorted(by: { "\($0.key)" < "\($1.key)" }) {
                    guard case .string(let claim) = k else {
                        throw fail("\(path).forward_claims", "keys must be claim names")
                    }
                    j.forwardClaims.append((claim, try string(h, "\(path).forward_claims.\(claim)").lowercased()))
                }
            }
            let hmac = j.algorithms.contains { $0.hasPrefix("HS") }
            let asymmetric = j.algorithms.contains { !$0.hasPrefix("HS") }
            if hmac && j.hmacSecretFiles.isEmpty {
                throw fail(path, "HS algorithms need hmac_secret_file")
            }
            if asymmetric && j.jwksFiles.isEmpty && j.pemKeys.isEmpty && j.registryJWKS.isEmpty {
                throw fail(path, "asymmetric algorithms need jwks_file, jwks_registry_key or pem")
            }
            return j
        }

        /// The match part of a route table: host, path or prefix, methods, headers.
        func match(_ v: LuaValue, _ path: String) throws(Error) -> RouteMatch {
            var match = RouteMatch()
            if let h = v["host"] { match.host = try string(h, "\(path).host").lowercased() }
            if let p = v["path"] {
                let s = try string(p, "\(path).path")
                guard s.hasPrefix("/") || s == "*" else { throw fail("\(path).path", "must start with /") }
                match.path = PathMatch.parse(s)
            }
            if let p = v["prefix"] {
                let s = try string(p, "\(path).prefix")
                guard s.hasPrefix("/") else { throw fail("\(path).prefix", "must start with /") }
                match.path = .prefix(s)
            }
            if let m = v["methods"] {
                guard let list = m.array else { throw fail("\(path).methods", "expected a list of strings") }
                var methods: [String] = []
                for (i, x) in list.enumerated() {
                    methods.append(try string(x, "\(path).methods[\(i + 1)]").uppercased())
                }
                match.methods = methods
            }
            if let hs = v["headers"] {
                guard case .table(let t) = hs else { throw fail("\(path).headers", "expected a table name → value") }
                for (k, x) in t {
                    guard case .string(let hname) = k else {
                        throw fail("\(path).headers", "keys must be header names")
                    }
                    switch x {
                    case .bool(true): match.headers[hname.lowercased()] = .some(nil)
                    case .string(let s): match.headers[hname.lowercased()] = .some(s)
                    default: throw fail("\(path).headers.\(hname)", "expected a string (exact value) or true (present)")
                    }
                }
            }
            return match
        }

        func route(_ v: LuaValue, _ path: String, base: SidecarConfig) throws(Error) -> Route {
            try keys(v, path, ConfigSchema.record("route"))
            let name = try v["name"].map { (x) throws(Error) in try string(x, "\(path).name") } ?? path
            let cluster = try v["cluster"].map { (x) throws(Error) in try string(x, "\(path).cluster") } ?? ""
            guard !cluster.isEmpty else { throw fail(path, "cluster is required") }
            let match = try self.match(v, path)
            var route = Route(
                name: name, match: match, cluster: cluster, timeout: base.defaultTimeout, retry: base.defaultRetry)
            if let t = v["timeout_ms"] {
                route.timeout = .milliseconds(Int64(try int(t, "\(path).timeout_ms", min: 1)))
            }
            if let rt = v["retry"] { route.retry = try retry(rt, "\(path).retry", base: base.defaultRetry) }
            if let rl = v["rate_limit"] {
                (route.rateLimit, route.rateLimitKey) = try rateLimit(rl, "\(path).rate_limit")
            }
            route.compression = base.defaultCompression
            if let z = v["compression"] { route.compression = try compression(z, "\(path).compression") }
            if let sub = v["subset"] { route.subset = try metadata(sub, "\(path).subset") }
            return route
        }

        /// Endpoint metadata pairs, `{ version = "v2" }`: string keys, string (or integer) values.
        func metadata(_ v: LuaValue, _ path: String) throws(Error) -> [String: String] {
            guard case .table(let t) = v else { throw fail(path, "expected a table like { version = \"v2\" }") }
            var out: [String: String] = [:]
            for (key, value) in t {
                guard case .string(let k) = key, !k.isEmpty else {
                    throw fail(path, "keys are metadata names (strings), got \(key)")
                }
                switch value {
                case .string(let s): out[k] = s
                case .number(let d) where d.rounded() == d && abs(d) < 1e15: out[k] = String(Int64(d))
                default: throw fail("\(path).\(k)", "expected a string, got \(value)")
                }
            }
            return out
        }

        /// Active checks of a cluster's endpoints: `{ path = "/health" }` (HTTP), `{ tcp = true }`,
        /// or `{ grpc = "service" }`, with the seed's defaults (10 s, 1 s, 3 failures, 2 passes).
        func healthCheck(_ v: LuaValue, _ path: String) throws(Error) -> HealthCheckConfig {
            try keys(v, path, ConfigSchema.record("health_check"))
            var hc = HealthCheckConfig()
            let kinds = ["path", "tcp", "grpc"].filter { v[$0] != nil }
            guard kinds.count <= 1 else {
                throw fail(path, "give one of path, tcp or grpc, not \(kinds.joined(separator: " and "))")
            }
            if let p = v["path"] {
                let s = try string(p, "\(path).path")
                guard s.hasPrefix("/") else { throw fail("\(path).path", "must start with /") }
                hc.kind = .http(path: s)
            }
            if let t = v["tcp"] {
                guard case .bool(true) = t else { throw fail("\(path).tcp", "expected true") }
                hc.kind = .tcp
            }
            if let g = v["grpc"] { hc.kind = .grpc(service: try string(g, "\(path).grpc")) }
            if let x = v["interval_ms"] {
                hc.interval = .milliseconds(Int64(try int(x, "\(path).interval_ms", min: 10)))
            }
            if let x = v["timeout_ms"] { hc.timeout = .milliseconds(Int64(try int(x, "\(path).timeout_ms", min: 1))) }
            if let x = v["unhealthy_threshold"] {
                hc.unhealthyThreshold = try int(x, "\(path).unhealthy_threshold", min: 1, max: 100)
            }
            if let x = v["healthy_threshold"] {
                hc.healthyThreshold = try int(x, "\(path).healthy_threshold", min: 1, max: 100)
            }
            if let x = v["jitter_percent"] { hc.intervalJitterPercent = try int(x, "\(path).jitter_percent", max: 100) }
            return hc
        }

        /// `rate_limit = { rps = N, burst = M, per = "remote_address" | "header:NAME" }`.
        func rateLimit(_ rl: LuaValue, _ path: String) throws(Error) -> (TokenBucket.Config, RateLimitKey?) {
            try keys(rl, path, ConfigSchema.record("rate_limit"))
            var limit: TokenBucket.Config
            let envoyKeys = ["max_tokens", "tokens_per_fill", "fill_interval_ms"].filter { rl[$0] != nil }
            if rl["rps"] != nil || rl["burst"] != nil, let k = envoyKeys.first {
                throw fail(
                    "\(path).\(k)", "give rps and burst, or max_tokens, tokens_per_fill and fill_interval_ms, not both")
            }
            if rl["rps"] == nil, let m = rl["max_tokens"] {
                // Envoy's local rate limit knobs: a bucket of max_tokens, refilled by
                // tokens_per_fill every fill_interval_ms.
                limit = TokenBucket.Config(
                    maxTokens: try int(m, "\(path).max_tokens", min: 1),
                    tokensPerFill: try rl["tokens_per_fill"].map { (x) throws(Error) in
                        try int(x, "\(path).tokens_per_fill", min: 1)
                    } ?? 1,
                    fillInterval: .milliseconds(
                        Int64(try int(rl["fill_interval_ms"] ?? .nil, "\(path).fill_interval_ms", min: 1))))
            } else {
                let rps = try int(rl["rps"] ?? .nil, "\(path).rps", min: 1)
                let burst = try rl["burst"].map { (x) throws(Error) in try int(x, "\(path).burst", min: 1) }
                limit = .perSecond(rps, burst: burst)
            }
            var key: RateLimitKey?
            if let p = rl["per"] {
                let s = try string(p, "\(path).per")
                guard let k = RateLimitKey.parse(s) else {
                    throw fail(
                        "\(path).per", "expected \"remote_address\", \"caller\" or \"header:NAME\", got \"\(s)\"")
                }
                key = k
            }
            return (limit, key)
        }

        /// `compression = true | false | { min_bytes = N, content_types = { "text/", … } }`.
        func compression(_ v: LuaValue, _ path: String) throws(Error) -> CompressionPolicy? {
            switch v {
            case .bool(let on): return on ? CompressionPolicy() : nil
            case .table:
                try keys(v, path, ConfigSchema.record("compression"))
                var p = CompressionPolicy()
                if let m = v["min_bytes"] { p.minBytes = try int(m, "\(path).min_bytes", min: 0) }
                if let t = v["content_types"] {
                    guard let list = t.array, !list.isEmpty else {
                        throw fail("\(path).content_types", "expected a non-empty list of media types")
                    }
                    var types: [String] = []
                    for (i, x) in list.enumerated() {
                        types.append(try string(x, "\(path).content_types[\(i + 1)]").lowercased())
                    }
                    p.contentTypes = types
                }
                return p
            default:
                throw fail(path, "expected true, false or a table { min_bytes, content_types }")
            }
        }

        func retry(_ v: LuaValue, _ path: String, base: RetryPolicy) throws(Error) -> RetryPolicy {
            try keys(v, path, ConfigSchema.record("retry"))
            var p = base
            if let a = v["attempts"] { p.numRetries = try int(a, "\(path).attempts", min: 0, max: 10) }
            if let on = v["retry_on"] {
                do {
                    p.retryOn = try RetryOn.parse(try string(on, "\(path).retry_on"))
                } catch let e as TrafficConfigError {
                    throw fail("\(path).retry_on", e.message)
                } catch let e as Error {
                    throw e
                } catch {
                    throw fail("\(path).retry_on", "\(error)")
                }
            }
            if let codes = v["retriable_status_codes"] {
                guard let list = codes.array else { throw fail("\(path).retriable_status_codes", "expected a list") }
                var set = Set<Int>()
                for (i, x) in list.enumerated() {
                    set.insert(try int(x, "\(path).retriable_status_codes[\(i + 1)]", min: 100, max: 599))
                }
                p.retriableStatusCodes = set
                p.retryOn.insert(.retriableStatusCodes)
            }
            if let t = v["per_try_timeout_ms"] {
                p.perTryTimeout = .milliseconds(Int64(try int(t, "\(path).per_try_timeout_ms", min: 1)))
            }
            if let t = v["backoff_base_ms"] {
                p.backoffBase = .milliseconds(Int64(try int(t, "\(path).backoff_base_ms", min: 1)))
            }
            if let t = v["backoff_max_ms"] {
                p.backoffMax = .milliseconds(Int64(try int(t, "\(path).backoff_max_ms", min: 1)))
            }
            if let b = v["non_idempotent"] {
                guard case .bool(let x) = b else { throw fail("\(path).non_idempotent", "expected true or false") }
                p.retryNonIdempotent = x
            }
            if let m = v["max_replay_bytes"] { p.maxReplayBytes = try int(m, "\(path).max_replay_bytes", min: 0) }
            guard p.backoffMax >= p.backoffBase else { throw fail(path, "backoff_max_ms must be ≥ backoff_base_ms") }
            return p
        }

        func cluster(_ v: LuaValue, _ path: String, name: String, base: ClusterConfig) throws(Error) -> ClusterConfig {
            try keys(v, path, ConfigSchema.record("cluster"))
            var c = base
            c.name = name
            if let b = v["balancer"] {
                let s = try string(b, "\(path).balancer")
                guard let k = BalancerKind.parse(s) else {
                    throw fail(
                        "\(path).balancer",
                        "unknown \"\(s)\"; expected peak_ewma, least_request, round_robin, random or ring_hash:HEADER")
                }
                c.balancer = k
            }
            if let t = v["connect_timeout_ms"] {
                c.connectTimeout = .milliseconds(Int64(try int(t, "\(path).connect_timeout_ms", min: 1)))
            }
            if let z = v["zone"] { c.localZone = try string(z, "\(path).zone") }
            if let h = v["health_check"] { c.healthCheck = try healthCheck(h, "\(path).health_check") }
            if let b = v["breaker"] {
                try keys(b, "\(path).breaker", ConfigSchema.record("breaker"))
                if let x = b["consecutive_failures"] {
                    let n = try int(x, "\(path).breaker.consecutive_failures")
                    c.breaker.consecutiveFailures = n > 0 ? n : nil
                }
                if let x = b["error_ratio"] { c.breaker.errorRatio = try ratio(x, "\(path).breaker.error_ratio") }
                if let x = b["slow_call_ratio"] {
                    c.breaker.slowCallRatio = try ratio(x, "\(path).breaker.slow_call_ratio")
                }
                if let x = b["slow_call_ms"] {
                    c.breaker.slowCall = .milliseconds(Int64(try int(x, "\(path).breaker.slow_call_ms", min: 1)))
                }
                if let x = b["min_requests"] {
                    c.breaker.minRequests = try int(x, "\(path).breaker.min_requests", min: 1)
                }
                if let x = b["window_ms"] {
                    c.breaker.window = .milliseconds(Int64(try int(x, "\(path).breaker.window_ms", min: 1)))
                }
                if let x = b["open_ms"] {
                    c.breaker.baseOpen = .milliseconds(Int64(try int(x, "\(path).breaker.open_ms", min: 1)))
                }
                if let x = b["max_open_ms"] {
                    c.breaker.maxOpen = .milliseconds(Int64(try int(x, "\(path).breaker.max_open_ms", min: 1)))
                }
                if let x = b["half_open_probes"] {
                    c.breaker.halfOpenProbes = try int(x, "\(path).breaker.half_open_probes", min: 1)
                }
            }
            if let o = v["outlier"] {
                try keys(o, "\(path).outlier", ConfigSchema.record("outlier"))
                if let x = o["consecutive_5xx"] {
                    let n = try int(x, "\(path).outlier.consecutive_5xx")
                    c.outlier.consecutive5xx = n > 0 ? n : nil
                }
                if let x = o["consecutive_gateway_failure"] {
                    let n = try int(x, "\(path).outlier.consecutive_gateway_failure")
                    c.outlier.consecutiveGatewayFailure = n > 0 ? n : nil
                }
                if let x = o["ejection_ms"] {
                    c.outlier.baseEjectionTime = .milliseconds(Int64(try int(x, "\(path).outlier.ejection_ms", min: 1)))
                }
                if let x = o["max_ejection_ms"] {
                    c.outlier.maxEjectionTime = .milliseconds(
                        Int64(try int(x, "\(path).outlier.max_ejection_ms", min: 1)))
                }
                if let x = o["max_ejection_percent"] {
                    c.outlier.maxEjectionPercent = try int(x, "\(path).outlier.max_ejection_percent", max: 100)
                }
                if let x = o["interval_ms"] {
                    c.outlier.interval = .milliseconds(Int64(try int(x, "\(path).outlier.interval_ms", min: 1)))
                }
                if let x = o["success_rate"] {
                    guard case .bool(let on) = x else {
                        throw fail("\(path).outlier.success_rate", "expected true or false")
                    }
                    c.outlier.enforceSuccessRate = on
                }
                if let x = o["failure_percentage_threshold"] {
                    c.outlier.failurePercentageThreshold = try int(
                        x, "\(path).outlier.failure_percentage_threshold", max: 100)
                }
            }
            if let b = v["retry_budget"] {
                try keys(b, "\(path).retry_budget", ConfigSchema.record("retry_budget"))
                var cfg = c.retryBudget
                if let x = b["ratio"] { cfg.ratio = try ratio(x, "\(path).retry_budget.ratio") }
                if let x = b["min_per_second"] { cfg.minPerSecond = try int(x, "\(path).retry_budget.min_per_second") }
                if let x = b["ttl_ms"] {
                    cfg.ttl = .milliseconds(Int64(try int(x, "\(path).retry_budget.ttl_ms", min: 100)))
                }
                c.retryBudget = cfg
            }
            if let l = v["limits"] {
                try keys(l, "\(path).limits", ConfigSchema.record("limits"))
                if let x = l["max_requests"] {
                    c.limits.maxRequests = try int(x, "\(path).limits.max_requests", min: 1)
                }
                if let x = l["max_connections"] {
                    c.limits.maxConnections = try int(x, "\(path).limits.max_connections", min: 1)
                }
                if let x = l["max_pending_requests"] {
                    c.limits.maxPendingRequests = try int(x, "\(path).limits.max_pending_requests")
                }
                if let x = l["max_retries"] { c.limits.maxRetries = try int(x, "\(path).limits.max_retries") }
            }
            return c
        }
    }
}

/// Compiles policies and validates their arguments at config load, in a VM of its own.
final class PolicyValidator {
    private var vm: PolicyVM?

    func validate(_ spec: PolicySpec) throws(PolicyFailure) -> String {
        if vm == nil {
            vm = try PolicyVM(services: PolicyServices(clock: { 0 }, sink: { _ in }), seed: 1)
        }
        return try vm!.load(
            id: 1, file: spec.file, source: spec.source, config: spec.config, path: "\(spec.path).config")
    }
}
