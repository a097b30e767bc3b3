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
        let ex = policyExchange(req, route: "inbound", side: "inbound", remote: instances[req.sidecar].id)
        if identity != nil { ex.caller = caller }
        switch requestPolicies(vm, chain, ex) {
        case .proceed: break
        case .decision(let d):
            return finishPolicies(vm, chain, ex, status: d.status, reason: nil, respond: false)
        case .failed:
            return finishPolicies(vm, chain, ex, status: 500, reason: LocalReason.policyError.rawValue, respond: false)
        }
        inboundExchanges[j] = (ex, chain)
        return nil
    }

    /// on_response of the inbound policies (last first) on the app's answer, then on_log.
    func inboundResponse(job j: Int, instance i: Int, status: Int) -> Int {
        guard let (ex, chain) = inboundExchanges.removeValue(forKey: j), let vm = sidecars[i].vm else { return status }
        return finishPolicies(vm, chain, ex, status: status, reason: nil, respond: true)
    }
}
