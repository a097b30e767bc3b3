import TandemCore
import TandemLua
import TandemTraffic

/// The policy hooks as the proxy runs them, shared by the outbound route policies and the
/// inbound ones of the simulated sidecars.
extension MeshWorld {
    typealias PolicyChain = [(id: Int, failOpen: Bool)]

    /// The request as policies see it (path split from its query).
    func policyExchange(_ req: SimRequest, route: String, side: String, remote: String) -> PolicyExchange {
        let q = req.path.firstIndex(of: "?")
        return PolicyExchange(
            method: req.method, path: q.map { String(req.path[..<$0]) } ?? req.path,
            query: q.map { String(req.path[req.path.index(after: $0)...]) } ?? "", authority: req.host,
            remoteAddress: remote, route: route, side: side,
            headers: req.headers.map { (name: $0.0, value: $0.1) }, requestID: "\(req.id)")
    }

    /// on_request of each policy in order; a failing fail-open policy is skipped.
    func requestPolicies(_ vm: PolicyVM, _ chain: PolicyChain, _ ex: PolicyExchange) -> PolicyStep {
        for p in chain {
            switch vm.onRequest(p.id, ex) {
            case .proceed: continue
            case .decision(let d):
                report.policyDecisions += 1
                return .decision(d)
            case .failed(let f):
                policyFailed(f)
                if p.failOpen { continue }
                return .failed
            }
        }
        return .proceed
    }

    /// on_response of each policy, last first (`respond` false: the policies answered the
    /// request themselves, so only on_log runs, as in the proxy); a decision or a fail-closed
    /// failure replaces the status. Then on_log with the final status; the exchange ends.
    func finishPolicies(
        _ vm: PolicyVM, _ chain: PolicyChain, _ ex: PolicyExchange, status: Int, reason: String?, respond: Bool
    ) -> Int {
        var status = status
        ex.status = status
        ex.reason = reason
        if respond {
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
        }
        ex.status = status
        for p in chain { if case .failed(let f) = vm.onLog(p.id, ex) { policyFailed(f) } }
        vm.end(ex)
        return status
    }
}
