import TandemCore

/// How a route matches the request path.
public enum PathMatch: Equatable, Sendable {
    /// The whole path, exactly.
    case exact(String)
    /// A path prefix on segment boundaries or not (Envoy `prefix` semantics: plain string prefix).
    case prefix(String)
    /// Segments with `:name` parameters and a trailing `*` (Gin-style), e.g. `/user/:id`.
    case template(String)

    /// Parses the config syntax: `"/a/b"` exact, `"/a/*"` or `"/a/"`+`prefix` handled by callers,
    /// any `:` segment makes a template.
    public static func parse(_ path: String) -> PathMatch {
        if path.split(separator: "/").contains(where: { $0.hasPrefix(":") }) { return .template(path) }
        if path.hasSuffix("/*") {
            let base = String(path.dropLast())
            return base.contains("*") ? .template(path) : .prefix(base)
        }
        if path == "*" || path == "/*" { return .prefix("/") }
        return .exact(path)
    }
}

/// What a route matches on. Empty fields match anything.
public struct RouteMatch: Equatable, Sendable {
    /// Host (authority without port), lowercased; nil matches any host.
    public var host: String?
    public var path: PathMatch
    /// Upper-case methods; empty = any.
    public var methods: [String]
    /// Header name (lowercase) → required exact value; nil value = header must be present.
    public var headers: [String: String?]

    public init(
        host: String? = nil, path: PathMatch = .prefix("/"), methods: [String] = [], headers: [String: String?] = [:]
    ) {
        self.host = host?.lowercased()
        self.path = path
        self.methods = methods.map { $0.uppercased() }
        self.headers = Dictionary(uniqueKeysWithValues: headers.map { ($0.key.lowercased(), $0.value) })
    }
}

/// A route: a match, the cluster it sends to, and the policies that apply on it.
///
/// A value with its fields in one shared box (copy on write): a request's route is copied
/// several times on its way through the proxy, and a copy of the fields themselves (a dozen
/// strings, arrays and dictionaries) cost ~300 instructions each time; now a copy is a
/// reference count, and the first change to a shared copy copies the fields once.
public struct Route: Equatable, Sendable {
    private struct Fields: Equatable {
        var name: String
        var match: RouteMatch
        var cluster: String
        var timeout: Nanos?
        var retry: RetryPolicy
        var rateLimit: TokenBucket.Config?
        var policies: [String]
        var compression: CompressionPolicy?
        var rateLimitKey: RateLimitKey?
        var subset: [String: String] = [:]
    }

    private var box: CopyOnWrite<Fields>

    public var name: String {
        get { box.value.name }
        set { box.value.name = newValue }
    }
    public var match: RouteMatch {
        get { box.value.match }
        set { box.value.match = newValue }
    }
    public var cluster: String {
        get { box.value.cluster }
        set { box.value.cluster = newValue }
    }
    /// Overall deadline including every retry; nil = none.
    public var timeout: Nanos? {
        get { box.value.timeout }
        set { box.value.timeout = newValue }
    }
    public var retry: RetryPolicy {
        get { box.value.retry }
        set { box.value.retry = newValue }
    }
    /// Requests per second allowed on this route (token bucket); nil = unlimited.
    public var rateLimit: TokenBucket.Config? {
        get { box.value.rateLimit }
        set { box.value.rateLimit = newValue }
    }
    /// Names of Lua policies attached to this route, in order.
    public var policies: [String] {
        get { box.value.policies }
        set { box.value.policies = newValue }
    }
    /// Responses compressed with gzip when the client accepts it; nil = never.
    public var compression: CompressionPolicy? {
        get { box.value.compression }
        set { box.value.compression = newValue }
    }
    /// Whose requests share a `rateLimit` bucket; nil = one bucket for the route.
    public var rateLimitKey: RateLimitKey? {
        get { box.value.rateLimitKey }
        set { box.value.rateLimitKey = newValue }
    }
    /// Only endpoints whose registered metadata has every one of these pairs (Envoy's
    /// `metadata_match` with subset load balancing): `{ version = "v2" }` for a canary.
    /// Empty: every endpoint. No endpoint in the subset: 503 `no-healthy-endpoint`.
    public var subset: [String: String] {
        get { box.value.subset }
        set { box.value.subset = newValue }
    }

    public init(
        name: String, match: RouteMatch, cluster: String, timeout: Nanos? = .seconds(15), retry: RetryPolicy = .init(),
        rateLimit: TokenBucket.Config? = nil, policies: [String] = []
    ) {
        box = CopyOnWrite(
            Fields(
                name: name, match: match, cluster: cluster, timeout: timeout, retry: retry, rateLimit: rateLimit,
                policies: policies, compression: nil, rateLimitKey: nil))
    }

}

/// The request facts a route decision needs.
public struct RequestHead: Sendable {
    public var method: String
    public var host: String
    public var path: String
    public var headers: [(String, String)]

    public init(method: String, host: String, path: String, headers: [(String, String)] = []) {
        // Methods come uppercase and hosts lowercase: then no new string is made.
        self.method = Self.allBytes(method) { $0 < 0x80 && !($0 >= 97 && $0 <= 122) } ? method : method.uppercased()
        // Authority without port, lowercased.
        // (Searched as bytes: a Character search walks grapheme clusters, 2.5k instructions per
        // request for the host alone.)
        var h = Self.allBytes(host) { $0 < 0x80 && !($0 >= 65 && $0 <= 90) } ? host : host.lowercased()
        if h.utf8.last != UInt8(ascii: "]"), let colon = h.utf8.lastIndex(of: UInt8(ascii: ":")) {
            h = String(h[..<colon])
        }
        self.host = h
        // Path without query.
        if let q = path.utf8.firstIndex(of: UInt8(ascii: "?")) {
            self.path = String(path[..<q])
        } else {
            self.path = path
        }
        self.headers = headers
    }

    /// Whether every byte of `s` passes `ok`, read in place (walking a `String.UTF8View` costs
    /// tens of instructions a byte); false for a string not stored as UTF-8.
    private static func allBytes(_ s: String, _ ok: (UInt8) -> Bool) -> Bool {
        s.utf8.withContiguousStorageIfAvailable { bytes in
            for b in bytes where !ok(b) { return false }
            return true
        } ?? false
    }

    public func header(_ name: String) -> String? {
        let lower = name.lowercased()
        return headers.first(where: { $0.0.lowercased() == lower })?.1
    }
}

/// The result of routing: the route and the template parameters it captured.
public struct RouteDecision: Sendable {
    public var route: Route
    public var params: [String: String]
}

/// Routes sorted most specific first; the first that matches wins.
///
/// Specificity, highest first: a named host over any host; exact path over template over
/// prefix (a longer template or prefix is more specific); more header matches; a method list.
/// Ties keep configuration order.
public struct RouteTable: Sendable {
    public private(set) var routes: [Route]
    /// Whether any route looks at request headers (if none does, callers need not pass them).
    public let matchesHeaders: Bool

    public init(_ routes: [Route]) {
        matchesHeaders = routes.contains { !$0.match.headers.isEmpty }
        let indexed = routes.enumerated().map {
            (idx: $0.offset, route: $0.element, score: Self.specificity($0.element.match))
        }
        self.routes = indexed.sorted { a, b in
            a.score != b.score ? a.score.lexicographicallyPrecedes(b.score, by: >) : a.idx < b.idx
        }.map(\.route)
    }

    static func specificity(_ m: RouteMatch) -> [Int] {
        let hostScore = m.host == nil ? 0 : 1
        let pathScore: [Int]
        switch m.path {
        case .exact(let p): pathScore = [3, p.count]
        case .template(let p):
            let segments = p.split(separator: "/")
            let literal = segments.filter { !$0.hasPrefix(":") && $0 != "*" }.count
            pathScore = [2, segments.count * 100 + literal]
        case .prefix(let p): pathScore = [1, p.count]
        }
        return [hostScore] + pathScore + [m.headers.count, m.methods.isEmpty ? 0 : 1]
    }

    public func route(_ req: RequestHead) -> RouteDecision? {
        for route in routes {
            if let params = Self.matches(route.match, req) { return RouteDecision(route: route, params: params) }
        }
        return nil
    }

    static func matches(_ m: RouteMatch, _ req: RequestHead) -> [String: String]? {
        if let host = m.host, host != req.host { return nil }
        if !m.methods.isEmpty && !m.methods.contains(req.method) { return nil }
        for (name, value) in m.headers {
            guard let actual = req.header(name) else { return nil }
            if let value, value != actual { return nil }
        }
        switch m.path {
        case .exact(let p): return p == req.path ? [:] : nil
        case .prefix(let p): return req.path.hasPrefix(p) ? [:] : nil
        case .template(let t): return matchTemplate(t, req.path)
        }
    }

    public static func matchTemplate(_ template: String, _ path: String) -> [String: String]? {
        let t = template.split(separator: "/", omittingEmptySubsequences: true)
        let p = path.split(separator: "/", omittingEmptySubsequences: true)
        var params: [String: String] = [:]
        var i = 0
        while i < t.count {
            let seg = t[i]
            if seg == "*" || seg.hasPrefix("*") {
                let rest = p.count > i ? p[i...].joined(separator: "/") : ""
                if seg.count > 1 { params[String(seg.dropFirst())] = rest }
                return params
            }
            guard i < p.count else { return nil }
            if seg.hasPrefix(":") {
                params[String(seg.dropFirst())] = String(p[i])
            } else if seg != p[i] {
                return nil
            }
            i += 1
        }
        return i == p.count ? params : nil
    }
}

/// Response compression for a route (Envoy's compressor filter knobs and defaults): which
/// responses are worth compressing. Whether the client accepts gzip is the shell's business.
public struct CompressionPolicy: Equatable, Sendable {
    /// Bodies shorter than this (when the length is known) are sent as they are.
    public var minBytes = 30
    /// Content types compressed, by prefix of the media type (Envoy's default list).
    public var contentTypes = [
        "application/javascript", "application/json", "application/xhtml+xml", "image/svg+xml", "text/css",
        "text/html", "text/plain", "text/xml",
    ]

    public init() {}

    /// Whether a response with these facts should be compressed: a status that carries a body,
    /// a listed content type, no encoding already, no `Cache-Control: no-transform`, and a body
    /// of at least `minBytes` (or of unknown length, streamed).
    public func shouldCompress(
        status: Int, method: String, contentType: String?, contentLength: Int?, contentEncoding: String?,
        cacheControl: String?
    ) -> Bool {
        guard status >= 200, status != 204, status != 304, method != "HEAD" else { return false }
        if let e = contentEncoding, !e.isEmpty, e.lowercased() != "identity" { return false }
        if let cc = cacheControl?.lowercased(), cc.contains("no-transform") { return false }
        if let n = contentLength, n < minBytes { return false }
        guard let type = contentType?.lowercased() else { return false }
        let media = String(type.prefix { $0 != ";" }.filter { $0 != " " && $0 != "\t" })
        return contentTypes.contains { media.hasPrefix($0.lowercased()) }
    }
}

/// Whose requests share a rate-limit bucket (Envoy's local rate limit descriptors, Kong's
/// `limit_by`): the client's address, or the value of a request header (requests without it
/// share one bucket). Buckets per key are bounded (`KeyedRateLimiter`).
public enum RateLimitKey: Equatable, Sendable {
    case remoteAddress
    case header(String)
    /// The caller service verified by its identity token (inbound only; anonymous callers
    /// share one bucket).
    case caller

    /// `remote_address`, `caller` or `header:NAME`.
    public static func parse(_ s: String) -> RateLimitKey? {
        if s == "remote_address" { return .remoteAddress }
        if s == "caller" { return .caller }
        if s.hasPrefix("header:"), s.count > 7 { return .header(String(s.dropFirst(7)).lowercased()) }
        return nil
    }
}
