import NIOCore
import NIOHTTP1
import TandemTraffic

/// Routing shared by the HTTP/1.1 and HTTP/2 exchanges: target host and path (absolute-form
/// or Host/:authority), the route (configured, or the implicit one per service name), the
/// cluster bound and the route's rate limit.
enum ProxyRouting {
    struct Resolved {
        var route: Route
        var host: String
        var path: String
    }

    /// `fixedCluster`: the request came in on a local upstream port dedicated to one service.
    static func resolve(
        ctx: ProxyContext, side: ProxySide, head: inout HTTPRequestHead, now: Nanos, fixedCluster: String? = nil
    ) -> Result<Resolved, LocalAnswer> {
        var host: String
        var path: String
        if head.uri.hasPrefix("http://") {
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
        let req = RequestHead(
            method: head.method.rawValue, host: host, path: path,
            headers: Array(head.headers.map { ($0.name, $0.value) }))
        let route: Route
        switch side {
        case .inbound:
            var r = Route(
                name: "inbound", match: RouteMatch(), cluster: ProxyContext.localCluster, timeout: ctx.inboundTimeout)
            r.retry.retryOn = [.connectFailure]
            if let hint = head.headers.first(name: "tandem-timeout-ms").flatMap(Int64.init), hint > 0 {
                r.timeout = min(r.timeout ?? .milliseconds(hint), .milliseconds(hint))
            }
            route = r
        case .outbound where fixedCluster != nil:
            let name = fixedCluster!
            let (retry, timeout) = ctx.brain.with { ($0.config.defaultRetry, $0.config.defaultTimeout) }
            route = Route(name: "upstream:\(name)", match: RouteMatch(), cluster: name, timeout: timeout, retry: retry)
            if host.isEmpty || !isServiceName(RequestHead(method: "GET", host: host, path: "/").host) {
                host = name
                head.headers.replaceOrAdd(name: "host", value: name)
            }
        case .outbound:
            guard !req.host.isEmpty else {
                return .failure(LocalAnswer(.badRequest, message: "request has no Host header and no absolute URI"))
            }
            if let d = ctx.brain.with({ $0.routes.route(req) }) {
                route = d.route
            } else if isServiceName(req.host) {
                let (retry, timeout) = ctx.brain.with { ($0.config.defaultRetry, $0.config.defaultTimeout) }
                route = Route(
                    name: "service:\(req.host)", match: RouteMatch(host: req.host), cluster: req.host, timeout: timeout,
                    retry: retry)
            } else {
                return .failure(
                    LocalAnswer(
                        .noRoute,
                        message: "no route for host \"\(req.host)\"; call a service by name, e.g. http://users/"))
            }
        }
        let maxClusters = ctx.limits.maxClusters
        let known = ctx.brain.with { $0.clusters[route.cluster] != nil || $0.clusters.count < maxClusters }
        guard known else {
            return .failure(
                LocalAnswer(.overflow, message: "this sidecar already tracks \(maxClusters) upstream services"))
        }
        guard ctx.brain.takeToken(route: route, now: now) else {
            return .failure(LocalAnswer(.rateLimited, message: "rate limit of route \"\(route.name)\" exceeded"))
        }
        return .success(Resolved(route: route, host: host, path: path))
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

    /// Admission of a new request by the cluster's breaker and concurrency gate.
    static func admit(ctx: ProxyContext, cluster: String, now: Nanos) -> LocalAnswer? {
        guard let reason = ctx.brain.withCluster(cluster, { c, _ in c.admit(now: now) }) else { return nil }
        return LocalAnswer(reason, message: reason == .circuitOpen ? "circuit breaker for \"\(cluster)\" is open" : nil)
    }

    static func isServiceName(_ host: String) -> Bool {
        if host.isEmpty || host == "localhost" { return false }
        if host.allSatisfy({ $0.isNumber || $0 == "." }) { return false }  // IPv4 literal
        if host.hasPrefix("[") { return false }
        return true
    }
}
