/// grpc-go's server keepalive enforcement, which etcd sets with `--grpc-keepalive-min-time`
/// (5 s) and PermitWithoutStream off. A client may PING any number of times if the server has
/// sent it headers or data since its previous PING (grpc-go's flow-control PINGs follow the
/// data they measure); otherwise at most once per `minTimeNanos` while it has calls open, and
/// once per 2 h with none. A PING sooner than that is a strike; the third strike ends the
/// connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (grpc-go clients then double
/// their keepalive interval). A value: the shell feeds it PINGs, sends and the time.
public struct PingEnforcement: Sendable {
    /// grpc-go's `maxPingStrikes`: the connection ends at the strike after this many.
    public static let maxStrikes = 2
    /// grpc-go's `defaultPingTimeout`: the allowed PING interval with no call open.
    public static let idleIntervalNanos: Int64 = 2 * 3_600 * 1_000_000_000
    /// The GOAWAY's debug data, which grpc-go clients recognise.
    public static let goAwayDebugData = "too_many_pings"
    /// etcd's default `--grpc-keepalive-min-time`.
    public static let defaultMinTimeNanos: Int64 = 5_000_000_000

    public let minTimeNanos: Int64
    private var lastPingAt: Int64?
    private var strikes = 0
    private var sentSincePing = false

    public init(minTimeNanos: Int64 = defaultMinTimeNanos) { self.minTimeNanos = minTimeNanos }

    /// The server sent headers or data on this connection.
    public mutating func sent() { sentSincePing = true }

    /// A PING (not an ack) arrived at `now` with `openCalls` calls open; true when the
    /// connection must end.
    public mutating func pingReceived(now: Int64, openCalls: Int) -> Bool {
        defer { lastPingAt = now }
        if sentSincePing {
            sentSincePing = false
            strikes = 0
            return false
        }
        let allowed = openCalls > 0 ? minTimeNanos : Self.idleIntervalNanos
        if let last = lastPingAt, now - last < allowed { strikes += 1 }
        return strikes > Self.maxStrikes
    }
}
