import NIOCore
import NIOHTTP1
import TandemConfig
import TandemTraffic

/// Routing shared by the HTTP/1.1 and HTTP/2 exchanges: target host and path (absolute-form
/// or Host/:authority), the route (configured, or the implicit one per service name), the
/// cluster bound and the route's rate limit.
enum ProxyRouting {
    /// " in subset version=v2" for a route's endpoint subset (empty without one), for answers.
    static func describe(_ subset: [String: String]) -> String {
        subset.isEmpty
            ? ""
            : " in subset " + subset.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    }

    struct Resolved {
        var route: Route
        var host: String
        var path: String
        /// Outbound: the route attaches a proof of possession.
        var proof = false
    }

    /// `fixedCluster`: the request came in on a local upstream port dedicated to one service.
    static func resolve(
        ctx: ProxyContext, side: ProxySide, head: inout HTTPRequestHead, now: Nanos, fixedCluster: String? = nil,
        knownCluster: String? = nil, remote: () -> String? = { nil }
    ) -> Result<Resolved, LocalAnswer> {
        var host: String
        var path: String
        let uri = head.uri
        if uri.utf8.first == UInt8(ascii: "/") {
            // Origin form, the usual case (no prefix comparisons).
            host = head.headers.first(name: "host") ?? ""
            path = uri
        } else if uri.hasPrefix("http://") {
            let rest = head.uri.dropFirst(7)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            host = String(rest[..<slash])
            path = slash == rest.endIndex ? "/" : String(rest[slash...])
            head.headers.replaceOrAdd(name: "host", value: host)
        } else if head.uri.hasPrefix("https://") {
            return .failure(
                LocalAnswer(.badRequest, message: "https:// targets cannot be proxied in plain HTTP; call http://"))
        } else {
            host = head.headers.first(name: "host") ?? ""
            path = head.uri
        }
        let route: Route
        var proof = false
        switch side {
        case .inbound:
            var r = Route(
                name: "inbound", match: RouteMatch(), cluster: ProxyContext.localCluster, timeout: ctx.inboundTimeout)
            r.retry.retryOn = [.connectFailure]
            (r.compression, r.rateLimit, r.rateLimitKey) = ctx.brain.with {
                ($0.config.inboundCompression, $0.config.inboundRateLimit, $0.config.inboundRateLimitKey)
            }
            if let hint = head.headers.first(name: "tandem-timeout-ms").flatMap(Int64.init), hint > 0 {
                r.timeout = min(r.timeout ?? .milliseconds(hint), .milliseconds(hint))
            }
            route = r
        case .outbound:
            var req = RequestHead(method: head.method.rawValue, host: host, path: path)
            if fixedCluster != nil, host.isEmpty || !isServiceName(req.host) {
                host = fixedCluster!
                head.headers.replaceOrAdd(name: "host", value: host)
            }
            guard fixedCluster != nil || !req.host.isEmpty else {
                return .failure(LocalAnswer(.badRequest, message: "request has no Host header and no absolute URI"))
            }
            let maxClusters = ctx.limits.maxClusters
            let headers = head.headers
            // One lock for the route table, the defaults and the cluster bound.
            let found = ctx.brain.with { s -> Result<(Route, Bool), LocalAnswer> in
                var r: Route
                if let name = fixedCluster {
                    r = Route(
                        name: "upstream:\(name)", match: RouteMatch(), cluster: name,
                        timeout: s.config.defaultTimeout, retry: s.config.defaultRetry)
                    r.compression = s.config.defaultCompression
                } else {
                    if s.routes.matchesHeaders { req.headers = headers.map { ($0.name, $0.value) } }
                    if let found = s.config.outboundRoute(req, table: s.routes) {
                        r = found
                    } else {
                        return .failure(
                            LocalAnswer(
                                .noRoute,
                                message: "no route for host \"\(req.host)\"; call a service by name, e.g. http://users/"
                            ))
                    }
                }
                // A known cluster is tracked already (skips its name's hash).
                guard
                    r.cluster == knownCluster || s.clusterSlots.index(forKey: r.cluster) != nil
                        || s.clusterSlots.count < maxClusters
                else {
                    return .failure(
                        LocalAnswer(.overflow, message: "this sidecar already tracks \(maxClusters) upstream services"))
                }
                return .success((r, s.config.proofRoutes.contains(r.name)))
            }
            switch found {
            case .success(let (r, p)):
                route = r
                proof = p
            case .failure(let a): return .failure(a)
            }
        }
        var key: String?
        switch route.rateLimitKey {
        case nil: key = nil
        case .remoteAddress?: key = remote()
        case .header(let name)?: key = head.headers.first(name: name)
        case .caller?:
            // Known only once the inbound gate has verified the token: `limitByCaller`.
            return .success(Resolved(route: route, host: host, path: path, proof: proof))
        }
        if let refused = take(ctx: ctx, route: route, key: key, now: now) { return .failure(refused) }
        return .success(Resolved(route: route, host: host, path: path, proof: proof))
    }

    private static func take(ctx: ProxyContext, route: Route, key: String?, now: Nanos) -> LocalAnswer? {
        guard ctx.brain.takeToken(route: route, key: key, now: now) else {
            let who = route.rateLimitKey == nil ? "" : " for this caller"
            return LocalAnswer(.rateLimited, message: "rate limit of route \"\(route.name)\" exceeded\(who)")
        }
        return nil
    }

    /// The rate limit keyed by the verified caller service, after the inbound gate (anonymous
    /// callers share the bucket "-").
    static func limitByCaller(ctx: ProxyContext, route: Route?, caller: String?, now: Nanos) -> LocalAnswer? {
        guard let route, route.rateLimitKey == .caller else { return nil }
        return take(ctx: ctx, route: route, key: caller ?? "-", now: now)
    }

    /// Runs `then` on `loop` once the cluster's endpoints are known (its first discovery
    /// answer, bounded), or at once when there is nothing to wait for.
    static func whenClusterKnown(
        ctx: ProxyContext, cluster: String, loop: any EventLoop, _ then: @escaping @Sendable () -> Void
    ) {
        if let wait = ctx.ensureCluster(cluster) {
            wait.hop(to: loop).whenComplete { _ in then() }
        } else {
            then()
        }
    }

    /// `whenClusterKnown`, and on the outbound side with identity, until a token for the
    /// cluster is held; `then` gets nil, or the answer to give instead.
    static func whenReady(
        ctx: ProxyContext, side: ProxySide, cluster: String, loop: any EventLoop,
        _ then: @escaping @Sendable (LocalAnswer?) -> Void
    ) {
        @Sendable func token() {
            guard side == .outbound, let id = ctx.identity, let wait = id.whenToken(for: cluster, loop: loop) else {
                return then(nil)
            }
            wait.whenComplete { r in
                switch r {
                case .success: then(nil)
                case .failure(let e):
                    then(e as? LocalAnswer ?? SidecarIdentity.unavailable(cluster, "\(e)"))
                }
            }
        }
        if let wait = ctx.ensureCluster(cluster) {
            wait.hop(to: loop).whenComplete { _ in token() }
        } else {
            token()
        }
    }

    /// Admission of a new request by the cluster's breaker and concurrency gate.
    /// `slot`: the cluster's slot when known, else set to it (for the exchange's later calls).
    static func admit(ctx: ProxyContext, cluster: String, slot: inout Int?, now: Nanos) -> LocalAnswer? {
        let refused =
            if let known = slot {
                ctx.brain.withCluster(slot: known) { c, _ in c.admit(now: now) }
            } else {
                ctx.brain.withCluster(cluster, slot: &slot) { c, _ in c.admit(now: now) }
            }
        guard let reason = refused else { return nil }
        return LocalAnswer(reason, message: reason == .circuitOpen ? "circuit breaker for \"\(cluster)\" is open" : nil)
    }

    static func isServiceName(_ host: String) -> Bool { SidecarConfig.isServiceName(host) }
}
