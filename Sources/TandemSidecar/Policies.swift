import Atomics
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic

/// The sidecar's policy runtime: one VM per event loop holding every configured policy, the
/// services they share, and the chains per route. A config change compiles the new set in every
/// VM (on its own loop) and only then swaps the chains; on any error the old set stays.
final class SidecarPolicies: @unchecked Sendable {
    struct Entry: Sendable {
        var id: Int
        var name: String
        var failOpen: Bool
    }
    /// A route's policies in order, defined under `key` in every VM (one call into the VM runs
    /// a phase of the whole chain), with what their hooks need from the request path (known
    /// once they loaded, so no request asks the VM per policy).
    struct Chain: Sendable {
        var key = 0
        var entries: [Entry] = []
        var request = false
        var response = false
        var responseBody = false
        var requestBody = false
        var log = false
    }
    struct Chains: Sendable {
        var routes: [String: Chain] = [:]
        var inbound = Chain()
        var specs: [String: [PolicySpec]] = [:]
        var inboundSpecs: [PolicySpec] = []
        var isEmpty: Bool { routes.isEmpty && inbound.entries.isEmpty }
    }

    let services: PolicyServices
    let limits: PolicyLimits
    private let loops: [any EventLoop]
    /// Created on first use of policies, one per loop, then never replaced.
    private let vms = NIOLockedValueBox<[ObjectIdentifier: PolicyVM]>([:])
    private let chains = NIOLockedValueBox(Chains())
    private let nextID = NIOLockedValueBox(1)
    private let log: @Sendable (String) -> Void
    /// Grace before the previous version's policies leave the VMs (requests that started under
    /// them still run their response and log hooks).
    static let retireAfter: TimeAmount = .seconds(30)

    init(loops: [any EventLoop], limits: PolicyLimits = PolicyLimits(), log: @escaping @Sendable (String) -> Void) {
        self.loops = loops
        self.limits = limits
        self.log = log
        services = PolicyServices(
            clock: {
                var ts = timespec()
                clock_gettime(CLOCK_REALTIME, &ts)
                return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
            },
            sink: { line in
                log(
                    "policy \(line.policy) \(line.level.name): \(line.message)\(line.fieldsJSON.map { " " + $0 } ?? "")"
                )
            })
    }

    /// Fast check on the request path: are there policies at all?
    private let active = NIOLockedValueBox(false)
    var isActive: Bool { active.withLockedValue { $0 } }

    func chain(route: String?) -> Chain {
        chains.withLockedValue { c in route.map { c.routes[$0] ?? Chain() } ?? c.inbound }
    }

    /// Bumped when the chains change: every `ConnectionCache` is then stale.
    private let stamp = ManagedAtomic<Int>(0)
    /// Whether any policy is installed (a sidecar without any skips even the cache).
    private let anyInstalled = ManagedAtomic(false)

    /// What one downstream connection keeps between its requests: the last route's chain and
    /// its loop's VM, valid until an install changes the chains. A request on a kept-alive
    /// connection then takes none of the policies' locks (three, shared by every loop).
    struct ConnectionCache {
        fileprivate var stamp: Int
        fileprivate var route: String?
        fileprivate var chain: Chain
        fileprivate var vm: PolicyVM?
    }

    /// The chain of `route` (nil: the inbound side's) and the loop's VM; nil when no policy
    /// applies.
    func lookup(route: String?, loop: any EventLoop, cache: inout ConnectionCache?) -> (Chain, PolicyVM)? {
        guard anyInstalled.load(ordering: .relaxed) else { return nil }
        let now = stamp.load(ordering: .acquiring)
        // Fields read in place (binding the whole cache would retain all it holds).
        if cache?.stamp == now, cache?.route == route {
            guard let vm = cache?.vm else { return nil }
            return (cache!.chain, vm)
        }
        let chain = self.chain(route: route)
        let vm = chain.entries.isEmpty ? nil : vm(for: loop)
        cache = ConnectionCache(stamp: now, route: route, chain: chain, vm: vm)
        guard !chain.entries.isEmpty, let vm else { return nil }
        return (chain, vm)
    }

    func vm(for loop: any EventLoop) -> PolicyVM? {
        vms.withLockedValue { $0[ObjectIdentifier(loop)] }
    }

    /// Whether `config` would change the installed policies.
    func differs(from config: SidecarConfig) -> Bool {
        chains.withLockedValue { $0.specs != config.routePolicies || $0.inboundSpecs != config.inboundPolicies }
    }

    /// Compiles `config`'s policies in every loop's VM, then swaps the chains. Completes with
    /// the first error (the running set stays).
    func install(_ config: SidecarConfig) -> EventLoopFuture<Void> {
        let loop = loops[0]
        guard differs(from: config) else { return loop.makeSucceededVoidFuture() }
        var next = Chains()
        next.specs = config.routePolicies
        next.inboundSpecs = config.inboundPolicies
        var load: [(Int, PolicySpec)] = []
        func newID() -> Int {
            nextID.withLockedValue { n -> Int in
                defer { n += 1 }
                return n
            }
        }
        func chain(_ specs: [PolicySpec]) -> Chain {
            Chain(
                key: specs.isEmpty ? 0 : newID(),
                entries: specs.map { s in
                    let id = newID()
                    load.append((id, s))
                    return Entry(id: id, name: s.name, failOpen: s.failOpen)
                })
        }
        for (route, specs) in config.routePolicies where !specs.isEmpty { next.routes[route] = chain(specs) }
        next.inbound = chain(config.inboundPolicies)
        let limits = self.limits
        let services = self.services
        let newChains = (Array(next.routes.values) + [next.inbound]).filter { $0.key != 0 }
        let (toLoad, installed, defined) = (load, next, newChains.map { ($0.key, $0.entries.map(\.id)) })
        let loads = loops.map { l in
            l.submit { [self] () throws -> Void in
                let vm = try vms.withLockedValue { v -> PolicyVM in
                    if let vm = v[ObjectIdentifier(l)] { return vm }
                    let vm = try PolicyVM(limits: limits, services: services, seed: UInt64.random(in: 1...UInt64.max))
                    v[ObjectIdentifier(l)] = vm
                    return vm
                }
                for (id, s) in toLoad {
                    do {
                        try vm.load(id: id, file: s.file, source: s.source, config: s.config, path: "\(s.path).config")
                    } catch {
                        for (done, _) in toLoad { vm.unload(id: done) }
                        throw error
                    }
                }
                for (key, ids) in defined { vm.defineChain(key, ids) }
            }
        }
        return EventLoopFuture.whenAllSucceed(loads, on: loop).map { [self] _ in
            // Every VM loaded the same sources: the first loop's VM (this is its loop) answers
            // for all.
            var installed = installed
            if let vm = vm(for: loop) {
                func flag(_ c: inout Chain) {
                    c.request = c.entries.contains { vm.hasRequestHook($0.id) }
                    c.response = c.entries.contains { vm.hasResponseHook($0.id) }
                    c.responseBody = c.entries.contains { vm.wantsResponseBody($0.id) }
                    c.requestBody = c.entries.contains { vm.wantsRequestBody($0.id) }
                    c.log = c.entries.contains { vm.hasLogHook($0.id) }
                }
                for route in Array(installed.routes.keys) { flag(&installed.routes[route]!) }
                flag(&installed.inbound)
            }
            let old = chains.withLockedValue { c -> (ids: [Int], chains: [Int]) in
                let all = Array(c.routes.values) + [c.inbound]
                c = installed
                return (all.flatMap(\.entries).map(\.id), all.map(\.key).filter { $0 != 0 })
            }
            active.withLockedValue { $0 = !installed.isEmpty }
            anyInstalled.store(!installed.isEmpty, ordering: .relaxed)
            stamp.wrappingIncrement(ordering: .releasing)
            retire(old.ids, chains: old.chains, after: Self.retireAfter)
        }.flatMapError { [self] error in
            // Loops that compiled the new set before another failed drop it again.
            retire(toLoad.map(\.0), chains: defined.map(\.0), after: .zero)
            return loop.makeFailedFuture(error)
        }
    }

    private func retire(_ ids: [Int], chains keys: [Int], after delay: TimeAmount) {
        guard !ids.isEmpty || !keys.isEmpty else { return }
        for l in loops {
            l.scheduleTask(in: delay) { [self] in
                guard let vm = vm(for: l) else { return }
                for key in keys { vm.dropChain(key) }
                for id in ids { vm.unload(id: id) }
            }
        }
    }

    func report(_ f: PolicyFailure, route: String) {
        log("policy error on route \(route): \(f.description)")
    }
}

extension LuaValue {
    /// A JSON value as policies read it (end-user claims): arrays become sequences.
    init(_ j: JSONValue) {
        switch j {
        case .null: self = .nil
        case .bool(let b): self = .bool(b)
        case .number(let n): self = .number(n)
        case .string(let s): self = .string(s)
        case .array(let a):
            self = .table(Dictionary(uniqueKeysWithValues: a.enumerated().map { (LuaKey.index($0 + 1), LuaValue($1)) }))
        case .object(let o):
            self = .table(Dictionary(uniqueKeysWithValues: o.map { (LuaKey.string($0), LuaValue($1)) }))
        }
    }
}

extension PolicyExchange {
    /// The request as policies see it (the path split from its query).
    convenience init(head: HTTPRequestHead, path: String, host: String, route: String, side: ProxySide, remote: String)
    {
        let q = path.utf8.firstIndex(of: UInt8(ascii: "?"))
        self.init(
            method: head.method.rawValue, path: q.map { String(path[..<$0]) } ?? path,
            query: q.map { String(path[path.utf8.index(after: $0)...]) } ?? "", authority: host,
            remoteAddress: remote,
            route: route, side: side.rawValue, headers: head.headers.map { (name: $0.name, value: $0.value) },
            requestID: head.headers.first(name: "x-request-id") ?? "")
    }

    var target: String { query.isEmpty ? path : path + "?" + query }
}

extension PolicyDecision {
    /// The response head (content-length set; `tandem-error: policy-denied` on a deny).
    func responseHead(version: HTTPVersion, keepAlive: Bool) -> HTTPResponseHead {
        var h = HTTPHeaders()
        for (k, v) in headers where !isHopByHop(k) && k.lowercased() != "content-length" { h.add(name: k, value: v) }
        if !h.contains(name: "content-type") && !body.isEmpty {
            h.add(
                name: "content-type",
                value: kind == "deny" || body.first == UInt8(ascii: "{") ? "application/json" : "text/plain")
        }
        if kind == "deny" { h.replaceOrAdd(name: "tandem-error", value: "policy-denied") }
        h.add(name: "content-length", value: String(body.count))
        if !keepAlive { h.add(name: "connection", value: "close") }
        return HTTPResponseHead(version: version, status: HTTPResponseStatus(statusCode: status), headers: h)
    }
}

/// An answer's fields with on_response's edits applied as they are written (what
/// `PolicyRun.apply` does to `HTTPHeaders`): the fields of every replaced name left out, the
/// additions after the rest, in order.
struct EditedFields<Base: FieldBytes>: FieldBytes {
    let base: Base
    let edits: [PolicyExchange.HeaderEdit]

    func forEachField(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void) {
        if edits.isEmpty { return base.forEachField(body) }
        // Edits are read in place through the array's buffer: iterating the array
        // (`contains(where:)`, `for e in`) copies each edit out, and even reading by index
        // retained the array once per field.
        edits.withUnsafeBufferPointer { edits in
            base.forEachField { name, value in
                for i in edits.indices where edits[i].replace && edits[i].names(name) { return }
                body(name, value)
            }
            for i in edits.indices where edits[i].value != nil {
                withBytes(edits[i].name) { n in withBytes(edits[i].value!) { body(n, $0) } }
            }
        }
    }

    /// Without an edit of a framing field the base's framing holds, and the edits' sizes added
    /// to the base's bound the whole (a replacing edit may drop fields): no walk of the base.
    var sizes: FieldSizes {
        if edits.isEmpty { return base.sizes }
        var sizes = base.sizes
        for i in edits.indices {
            if withBytes(edits[i].name, FieldSizes.kind) != nil { return FieldSizes(walking: self) }
            if edits[i].replace { sizes.exact = false }
            if let v = edits[i].value { sizes.all += edits[i].name.utf8.count + v.utf8.count + 4 }
        }
        return sizes
    }
}

/// One request's run through its route's policies, on its event loop — shared by the
/// HTTP/1.1 and HTTP/2 (gRPC) exchanges.
final class PolicyRun {
    let vm: PolicyVM
    let chain: SidecarPolicies.Chain
    let ex: PolicyExchange
    private unowned let policies: SidecarPolicies
    private var responseRan = false

    /// Nil when no policy applies to the request's route (nothing is allocated then).
    /// `cache`: the connection's (`SidecarPolicies.lookup`).
    static func start(
        ctx: ProxyContext, loop: any EventLoop, route: Route, side: ProxySide, head: HTTPRequestHead, path: String,
        host: String, remote: @autoclosure () -> String, cache: inout SidecarPolicies.ConnectionCache?
    ) -> PolicyRun? {
        guard let p = ctx.policies,
            let (chain, vm) = p.lookup(route: side == .inbound ? nil : route.name, loop: loop, cache: &cache)
        else { return nil }
        let ex = PolicyExchange(head: head, path: path, host: host, route: route.name, side: side, remote: remote())
        if case .template(let t) = route.match.path { ex.params = RouteTable.matchTemplate(t, ex.path) ?? [:] }
        return PolicyRun(vm: vm, chain: chain, policies: p, ex: ex)
    }

    private init(vm: PolicyVM, chain: SidecarPolicies.Chain, policies: SidecarPolicies, ex: PolicyExchange) {
        self.vm = vm
        self.chain = chain
        self.policies = policies
        self.ex = ex
    }

    var wantsResponseBody: Bool { chain.responseBody }
    var wantsRequestBody: Bool { chain.requestBody }

    enum RequestOutcome {
        case proceed
        case answer(PolicyDecision)
        case failed(LocalAnswer)
    }

    /// on_request of each policy in order (one call into the VM; a fail-open policy's failure
    /// goes on with the next).
    func request() -> RequestOutcome {
        guard chain.request else { return .proceed }
        var start = 0
        while start < chain.entries.count {
            let (at, outcome) = vm.onRequest(chain: chain.key, from: start, ex)
            switch outcome {
            case .proceed: return .proceed
            case .decision(let d): return .answer(d)
            case .failed(let f):
                policies.report(f, route: ex.route)
                guard chain.entries.indices.contains(at), chain.entries[at].failOpen else {
                    return .failed(
                        LocalAnswer(.policyError, message: "policy \(f.policy) failed (\(f.reason.rawValue))"))
                }
                start = at + 1
            }
        }
        return .proceed
    }

    /// on_request, and on `.proceed` its changes applied to the request about to be routed.
    func begin(
        head: inout HTTPRequestHead, path: inout String, route: inout Route?, cluster: inout String
    )
        -> RequestOutcome
    {
        let outcome = request()
        if case .proceed = outcome { apply(head: &head, path: &path, route: &route, cluster: &cluster) }
        return outcome
    }

    /// What on_request changed, applied to the request about to be routed.
    func apply(head: inout HTTPRequestHead, path: inout String, route: inout Route?, cluster: inout String) {
        if ex.requestChanged {
            head.method = HTTPMethod(rawValue: ex.method)
            path = ex.target
            head.uri = path
            var h = HTTPHeaders()
            for (k, v) in ex.headers { h.add(name: k, value: v) }
            head.headers = h
        }
        if let u = ex.upstream {
            cluster = u
            route?.cluster = u
        }
        if let s = ex.subset { route?.subset = s }
        if let t = ex.timeoutMs { route?.timeout = .milliseconds(Int64(t)) }
        if let n = ex.retries { route?.retry.numRetries = n }
    }

    /// on_response of each policy, last first, once per request; a decision (or a failing
    /// fail-closed policy's 500) replaces the answer. Header changes land in `headers`.
    func response(
        status: Int, reason: String?, headers: inout HTTPHeaders, body: [UInt8]?, endpoint: Endpoint?, attempts: Int,
        durationMs: Double
    ) -> PolicyDecision? {
        guard !responseRan else { return nil }
        if let d = respond(
            status: status, reason: reason,
            fields: { [answer = headers] in answer.map { (name: $0.name, value: $0.value) } },
            body: body, endpoint: endpoint, attempts: attempts, durationMs: durationMs)
        {
            return d
        }
        // The source's copy is gone by now, so `headers` is not copied.
        if !ex.responseEdits.isEmpty { Self.apply(ex.responseEdits, to: &headers) }
        return nil
    }

    /// `response` for an answer whose fields the hooks read from `fields` (called only when
    /// one does); their edits stay in `ex.responseEdits` for the caller to write with the head
    /// (`EditedFields`).
    func respond(
        status: Int, reason: String?, fields: () -> [(name: String, value: String)], body: [UInt8]?,
        endpoint: Endpoint?, attempts: Int, durationMs: Double
    ) -> PolicyDecision? {
        guard !responseRan else { return nil }
        responseRan = true
        ex.status = status
        ex.reason = reason
        ex.responseBody = body
        ex.upstreamHost = endpoint?.host
        ex.upstreamPort = endpoint?.port
        ex.attempts = attempts
        ex.durationMs = durationMs
        // The hooks read the fields during this call only (on_log hooks get them made now,
        // before the caller writes the head and lets go of the answer): the source does not
        // outlive it, so what the caller's closure captures (the upstream's head) stays on its
        // stack; `withoutActuallyEscaping` boxes only a 32-byte thunk on the heap.
        return withoutActuallyEscaping(fields) { fields in
            ex.responseHeaderSource = fields
            defer {
                if logs { _ = ex.responseHeaders }
                ex.responseHeaderSource = nil
            }
            return runResponseHooks()
        }
    }

    private func runResponseHooks() -> PolicyDecision? {
        var start = chain.response ? chain.entries.count - 1 : -1
        while start >= 0 {
            let (at, outcome) = vm.onResponse(chain: chain.key, from: start, ex)
            switch outcome {
            case .proceed: return nil
            case .decision(let d): return d
            case .failed(let f):
                policies.report(f, route: ex.route)
                guard chain.entries.indices.contains(at), chain.entries[at].failOpen else {
                    let a = LocalAnswer(.policyError, message: "policy \(f.policy) failed (\(f.reason.rawValue))")
                    return PolicyDecision(
                        kind: "error", status: a.status, body: Array(a.jsonBody.utf8),
                        headers: [("content-type", "application/json"), ("tandem-error", a.reason.rawValue)])
                }
                start = at - 1
            }
        }
        return nil
    }

    /// on_response's header edits, in order, on the answer's head: removals in place,
    /// additions appended as one block (the names were checked as tokens when set, so
    /// `HTTPHeaders.add`'s own per-name scan is not paid again). No addition is removed by a
    /// later edit: one that replaces a name dropped the earlier edits of that name
    /// (`PolicyExchange.editResponse`).
    static func apply(_ edits: [PolicyExchange.HeaderEdit], to headers: inout HTTPHeaders) {
        var added: [(String, String)] = []
        for e in edits {
            if e.replace { headers.removeIfPresent(e.name) }
            if let v = e.value { added.append((e.name, v)) }
        }
        if !added.isEmpty { headers.add(contentsOf: HTTPHeaders(added)) }
    }

    private var logs: Bool { chain.log }

    /// on_log of each policy; then the request's ctx is dropped.
    func log(status: Int, reason: String?, endpoint: Endpoint?, attempts: Int, durationMs: Double) {
        if logs {
            ex.status = status
            ex.reason = reason
            ex.upstreamHost = endpoint?.host
            ex.upstreamPort = endpoint?.port
            ex.attempts = attempts
            ex.durationMs = durationMs
            for e in chain.entries {
                if case .failed(let f) = vm.onLog(e.id, ex) { policies.report(f, route: ex.route) }
            }
        }
        vm.end(ex)
    }
}

extension PolicyDecision {
    /// The `tandem-error` a decision's answer carries (nil for a plain respond/redirect).
    var tandemError: String? {
        kind == "deny" ? LocalReason.policyDenied.rawValue : kind == "error" ? LocalReason.policyError.rawValue : nil
    }

    /// A gRPC status for a decision on a gRPC call: the policy's own `grpc-status` header, else
    /// one mapped from the HTTP status (403 → PERMISSION_DENIED, 429 → RESOURCE_EXHAUSTED, …).
    var grpcStatus: Int {
        if let s = headers.first(where: { $0.name.lowercased() == "grpc-status" }).flatMap({ Int($0.value) }) {
            return s
        }
        switch status {
        case 200..<300: return 0
        case 400: return 3
        case 401: return 16
        case 403: return 7
        case 404: return 12
        case 409: return 10
        case 429: return 8
        case 499: return 1
        case 501: return 12
        case 503, 502: return 14
        case 504: return 4
        case 500: return 13
        default: return 2
        }
    }

    /// The message a gRPC client sees: the `message` of a JSON body, else the body's text.
    var grpcMessage: String {
        let text = String(decoding: body.prefix(1024), as: UTF8.self)
        if let r = text.range(of: "\"message\":\""), let end = text[r.upperBound...].firstIndex(of: "\"") {
            return String(text[r.upperBound..<end])
        }
        return text
    }
}
