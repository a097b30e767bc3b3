/// TandemTraffic — the sidecar's decisions as pure values: routes, balancers, retries, budgets,
/// breakers, outlier detection, health checks and rate limits.
///
/// Nothing here reads a clock, sleeps, draws unseeded randomness or does I/O. Time arrives as
/// `now` (nanoseconds on the caller's monotonic clock), randomness as a `SeededRandom`, so
/// the NIO sidecar and the simulator run the same code. See docs/SIDECAR.md.
import TandemCore

/// Nanoseconds on a monotonic clock owned by the caller (real or virtual).
public typealias Nanos = Int64

extension Nanos {
    public static func milliseconds(_ ms: Int64) -> Nanos { ms * 1_000_000 }
    public static func seconds(_ s: Int64) -> Nanos { s * 1_000_000_000 }
}

/// One upstream instance of a cluster: where to send, and what it says about itself.
///
/// A value type whose fields sit in a copy-on-write box: an exchange hands its endpoint on
/// several times per request, and a copy of the fields themselves is a retain per string and
/// dictionary (five) plus the outlined copy; a copy of the box is one retain.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    private struct Fields: Hashable {
        var id: String
        var host: String
        var port: Int
        var zone: String?
        var weight: Int
        var passing: Bool
        var metadata: [String: String]
        var proofKey: String?
    }

    private var box: CopyOnWrite<Fields>

    /// Unique within the cluster: the registry's instance id, or "host:port" for static ones.
    public var id: String {
        get { box.value.id }
        set { box.value.id = newValue }
    }
    public var host: String {
        get { box.value.host }
        set { box.value.host = newValue }
    }
    public var port: Int {
        get { box.value.port }
        set { box.value.port = newValue }
    }
    public var zone: String? {
        get { box.value.zone }
        set { box.value.zone = newValue }
    }
    public var weight: Int {
        get { box.value.weight }
        set { box.value.weight = newValue }
    }
    /// Whether the instance registered itself as passing its own health check.
    public var passing: Bool {
        get { box.value.passing }
        set { box.value.passing = newValue }
    }
    public var metadata: [String: String] {
        get { box.value.metadata }
        set { box.value.metadata = newValue }
    }
    /// The instance sidecar's proof key (base64url X25519), for MAC proofs of possession.
    public var proofKey: String? {
        get { box.value.proofKey }
        set { box.value.proofKey = newValue }
    }

    public init(
        id: String, host: String, port: Int, zone: String? = nil, weight: Int = 1, passing: Bool = true,
        metadata: [String: String] = [:], proofKey: String? = nil
    ) {
        box = CopyOnWrite(
            Fields(
                id: id, host: host, port: port, zone: zone, weight: max(1, weight), passing: passing,
                metadata: metadata, proofKey: proofKey))
    }

    public func hash(into hasher: inout Hasher) { box.value.hash(into: &hasher) }

    public var address: String { "\(host):\(port)" }
    public var description: String { "\(id)@\(address)" }
}

/// How one attempt ended, as the proxy saw it.
public enum AttemptOutcome: Equatable, Sendable {
    /// An HTTP response arrived; `grpcStatus` from headers (trailers-only) when present.
    case response(status: Int, grpcStatus: Int? = nil)
    /// The connection could not be established (refused, unreachable, connect timeout).
    case connectFailure
    /// The connection or stream broke before a complete response header arrived.
    case reset
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    case refusedStream
    /// The per-try timeout fired before the response header arrived.
    case timeout

    /// A failure for breakers and outlier detection: 5xx or any local-origin failure.
    public var isFailure: Bool {
        switch self {
        case .response(let status, let grpc):
            if status >= 500 { return true }
            if let grpc { return [4, 8, 13, 14].contains(grpc) }  // deadline, exhausted, internal, unavailable
            return false
        default: return true
        }
    }

    /// 502/503/504 or a local-origin failure (Envoy's "gateway failure").
    public var isGatewayFailure: Bool {
        switch self {
        case .response(let status, _): return status == 502 || status == 503 || status == 504
        default: return true
        }
    }

    public var status: Int? {
        if case .response(let status, _) = self { return status }
        return nil
    }
}

/// Why the sidecar answered a request itself. Each has a status, a `code` for the JSON body
/// and the value of the `tandem-error` header.
public enum LocalReason: String, Sendable, CaseIterable {
    case noRoute = "no-route"
    case noHealthyEndpoint = "no-healthy-endpoint"
    case circuitOpen = "circuit-open"
    case overflow = "overflow"
    case timeout = "timeout"
    case retryBudgetExhausted = "retry-budget-exhausted"
    case upstreamConnectFailure = "upstream-connect-failure"
    case upstreamReset = "upstream-reset"
    case rateLimited = "rate-limited"
    case headersTooLarge = "headers-too-large"
    case bodyTooLarge = "body-too-large"
    case badRequest = "bad-request"
    case policyDenied = "policy-denied"
    case policyError = "policy-error"
    case draining = "draining"
    case unauthenticated = "unauthenticated"
    case forbidden = "forbidden"

    public var status: Int {
        switch self {
        case .noRoute: return 404
        // Envoy answers 503 for connect failures and resets before headers.
        case .noHealthyEndpoint, .circuitOpen, .overflow, .draining, .upstreamConnectFailure, .upstreamReset:
            return 503
        case .timeout: return 504
        case .retryBudgetExhausted: return 503
        case .rateLimited: return 429
        case .headersTooLarge: return 431
        case .bodyTooLarge: return 413
        case .badRequest: return 400
        case .policyDenied, .forbidden: return 403
        case .policyError: return 500
        case .unauthenticated: return 401
        }
    }

    public var defaultMessage: String {
        switch self {
        case .noRoute: return "no route matches this request"
        case .noHealthyEndpoint: return "no healthy endpoint for the upstream cluster"
        case .circuitOpen: return "circuit breaker is open for the upstream cluster"
        case .overflow: return "upstream cluster concurrency limit reached"
        case .timeout: return "upstream request timed out"
        case .retryBudgetExhausted: return "upstream failed and the retry budget is exhausted"
        case .upstreamConnectFailure: return "could not connect to the upstream"
        case .upstreamReset: return "upstream connection reset before a response"
        case .rateLimited: return "rate limit exceeded"
        case .headersTooLarge: return "request header block too large"
        case .bodyTooLarge: return "request body too large"
        case .badRequest: return "malformed request"
        case .policyDenied: return "denied by policy"
        case .policyError: return "policy error"
        case .draining: return "sidecar is draining"
        case .unauthenticated: return "missing or invalid credentials"
        case .forbidden: return "caller is not allowed"
        }
    }
}

/// A response the sidecar produces itself: status, `tandem-error` and a JSON body.
public struct LocalAnswer: Error, Equatable, Sendable {
    public var reason: LocalReason
    public var status: Int
    public var message: String
    /// A finer reason than `reason` for `tandem-error` and the body (e.g. `expired-token` for
    /// an `unauthenticated` answer).
    public var detail: String?
    /// Response headers besides `tandem-error` (e.g. the callee's current proof key with a
    /// `stale-proof-key` refusal, so the caller can make a new proof at once).
    public var headers: [String: String] = [:]

    public init(
        _ reason: LocalReason, message: String? = nil, status: Int? = nil, detail: String? = nil,
        headers: [String: String] = [:]
    ) {
        self.reason = reason
        self.status = status ?? reason.status
        self.message = message ?? reason.defaultMessage
        self.detail = detail
        self.headers = headers
    }

    /// What `tandem-error` says.
    public var errorCode: String { detail ?? reason.rawValue }

    /// `{"code":<status>,"message":"…","error":"<reason>"}`
    public var jsonBody: String {
        "{\"code\":\(status),\"message\":\(JSON.quote(message)),\"error\":\(JSON.quote(errorCode))}"
    }
}
