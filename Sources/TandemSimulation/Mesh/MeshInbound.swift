import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic

/// The callee's inbound side after the identity gate, before the app: the inbound rate limit
/// (one bucket, or one per caller service, address or header value — `rate_limit.per`) and
/// the inbound Lua policies (`inbound = { policies = … }`), whose `on_request` may answer
/// instead of the app and whose `on_response` sees (and may replace) the app's answer.
extension MeshWorld {
    /// nil: on to the app; otherwise the status the inbound sidecar answers with.
    func inboundSide(job j: Int, instance i: Int, req: SimRequest) -> Int? {
        let sc = sidecars[i]
        let cfg = sc.config
        let caller = scenario.services[sidecars[req.sidecar].service].name
        if let rl = cfg.inboundRateLimit {
            let ok: Bool
            if let keyKind = cfg.inboundRateLimitKey {
                let key: String
                switch keyKind {
                case .caller: key = identity != nil ? caller : "-"
                case .remoteAddress: key = instances[req.sidecar].id
                case .header(let h): key = req.headers.first { $0.0 == h }?.1 ?? ""
                }
                var k = sc.inboundKeyed ?? KeyedRateLimiter(rl, maxKeys: 10_000)
                ok = k.tryTake(key: key, now: now)
                sc.inboundKeyed = k
            } else {
                var b = sc.inboundBucket ?? TokenBucket(rl)
                ok = b.tryTake(now: now)
                sc.inboundBucket = b
            }
            if !ok {
                report.inboundRateLimited += 1
                return LocalReason.rateLimited.status
            }
        }
        guard !cfg.inboundPolicies.isEmpty else { return nil }
        let chain = policies(sc, route: "\u{0}inbound", specs: cfg.inboundPolicies)
        guard let vm = sc.vm, !chain.isEmpty else { return 500 }
        let q = req.path.firstIndex(of: "?")
        let ex = PolicyExchange(
            method: req.method, path: q.map { String(req.path[..<$0]) } ?? req.path,
            query: q.map { String(req.path[req.path.index(after: $0)...]) } ?? "", authority: req.host,
            remoteAddress: instances[req.sidecar].id, route: "inbound", side: "inbound",
            headers: req.headers.map { (name: $0.0, value: $0.1) }, requestID: "\(req.id)")
        if identity != nil { ex.caller = caller }
        for p in chain {
            switch vm.onRequest(p.id, ex) {
            case .proceed: continue
            case .decision(let d):
                report.policyDecisions += 1
                vm.end(ex)
                return d.status
            case .failed(let f):
                policyFailed(f)
                if p.failOpen { continue }
                vm.end(ex)
                return 500
            }
        }
        inboundExchanges[j] = (ex, chain)
        return nil
    }

    /// on_response of the inbound policies (last first) on the app's answer, then on_log.
    func inboundResponse(job j: Int, instance i: Int, status: Int) -> Int {
        guard let (ex, chain) = inboundExchanges.removeValue(forKey: j), let vm = sidecars[i].vm else { return status }
        var status = status
        ex.status = status
        for p in chain.reversed() {
            switch vm.onResponse(p.id, ex) {
            case .proceed: continue
            case .decision(let d):
                report.policyDecisions += 1
                status = d.status
            case .failed(let f):
                policyFailed(f)
                if !p.failOpen { status = 500 }
            }
            if status != ex.status { break }
        }
        for p in chain { if case .failed(let f) = vm.onLog(p.id, ex) { policyFailed(f) } }
        vm.end(ex)
        return status
    }
}
