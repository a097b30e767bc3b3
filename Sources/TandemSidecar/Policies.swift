import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TandemLua

/// A policy attached to a route (or to the inbound side) by the config: the file's text, its
/// arguments, and whether a failing policy lets the request through (`fail_open`).
public struct PolicySpec: Sendable, Equatable {
    public var file: String
    public var source: String
    public var config: LuaValue?
    public var failOpen: Bool
    /// Where the config names it, for errors: `routes[2].policies[1]`.
    public var path: String
    public var name: String
}

/// The sidecar's policy runtime: one VM per event loop holding every configured policy, the
/// services they share, and the chains per route. A config change compiles the new set in every
/// VM (on its own loop) and only then swaps the chains; on any error the old set stays.
final class SidecarPolicies: @unchecked Sendable {
    struct Entry: Sendable {
        var id: Int
        var name: String
        var failOpen: Bool
    }
    struct Chains: Sendable {
        var routes: [String: [Entry]] = [:]
        var inbound: [Entry] = []
        var specs: [String: [PolicySpec]] = [:]
        var inboundSpecs: [PolicySpec] = []
        var isEmpty: Bool { routes.isEmpty && inbound.isEmpty }
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
            clock: { Int64(Date().timeIntervalSince1970 * 1000) },
            sink: { line in
                log(
                    "policy \(line.policy) \(line.level.name): \(line.message)\(line.fieldsJSON.map { " " + $0 } ?? "")"
                )
            })
    }

    /// Fast check on the request path: are there policies at all?
    private let active = NIOLockedValueBox(false)
    var isActive: Bool { active.withLockedValue { $0 } }

    func chain(route: String?) -> [Entry] {
        chains.withLockedValue { c in route.map { c.routes[$0] ?? [] } ?? c.inbound }
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
        func entries(_ specs: [PolicySpec]) -> [Entry] {
            specs.map { s in
                let id = nextID.withLockedValue { n -> Int in
                    defer { n += 1 }
                    return n
                }
                load.append((id, s))
                return Entry(id: id, name: s.name, failOpen: s.failOpen)
            }
        }
        for (route, specs) in config.routePolicies where !specs.isEmpty { next.routes[route] = entries(specs) }
        next.inbound = entries(config.inboundPolicies)
        let limits = self.limits
        let services = self.services
        let (toLoad, installed) = (load, next)
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
            }
        }
        return EventLoopFuture.whenAllSucceed(loads, on: loop).map { [self] _ in
            let old = chains.withLockedValue { c -> [Int] in
                let ids = (c.routes.values.flatMap { $0 } + c.inbound).map(\.id)
                c = installed
                return ids
            }
            active.withLockedValue { $0 = !installed.isEmpty }
            retire(old)
        }
    }

    private func retire(_ ids: [Int]) {
        guard !ids.isEmpty else { return }
        for l in loops {
            l.scheduleTask(in: Self.retireAfter) { [self] in
                guard let vm = vm(for: l) else { return }
                for id in ids { vm.unload(id: id) }
            }
        }
    }

    func report(_ f: PolicyFailure, route: String) {
        log("policy error on route \(route): \(f.description)")
    }
}

extension PolicyExchange {
    /// The request as policies see it (the path split from its query).
    convenience init(head: HTTPRequestHead, path: String, host: String, route: String, side: ProxySide, remote: String)
    {
        let q = path.firstIndex(of: "?")
        self.init(
            method: head.method.rawValue, path: q.map { String(path[..<$0]) } ?? path,
            query: q.map { String(path[path.index(after: $0)...]) } ?? "", authority: host, remoteAddress: remote,
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
