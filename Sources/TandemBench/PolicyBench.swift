import TandemLua

/// Per-hook cost of Lua policies on the real engine (one VM, as one event loop runs it):
/// an empty hook, a typical policy (a header check and a shared-dict incr), and the chain the
/// sidecar benchmark uses (tenant gate + token-bucket rate limit). Then the first two again on
/// a VM without a wall-clock limit (the simulator's), whose count hook is armed for every call
/// where the sidecar's is armed by the watchdog only for a long call.
func policyBenchmarks() throws {
    try policyBenchmarks(limits: PolicyLimits(), label: "")
    var deterministic = PolicyLimits()
    deterministic.timeMs = 0
    try policyBenchmarks(limits: deterministic, label: " [count hook always armed]", only: ["empty", "header check"])
}

private func policyBenchmarks(limits: PolicyLimits, label: String, only cases: [String]? = nil) throws {
    let services = PolicyServices(clock: { 1_767_225_600_000 }, sink: { _ in })
    let vm = try PolicyVM(limits: limits, services: services, seed: 1)
    try vm.load(id: 1, file: "noop.lua", source: #"return { name = "noop", on_request = function() end }"#)
    try vm.load(
        id: 2, file: "typical.lua",
        source: """
            return { name = "typical", shared = { hits = { capacity = 10000 } },
              on_request = function(req)
                local t = req:header("x-tenant")
                if t ~= "acme" then return tandem.deny(403, "unknown tenant") end
                tandem.shared.hits:incr(t, 1, 0)
              end }
            """)
    try vm.load(
        id: 3, file: "gate.lua",
        source: """
            return { name = "gate", config = { tenants = { type = "set", of = "string", required = true } },
              on_request = function(req, ctx, cfg)
                if not cfg.tenants[req:header("x-tenant") or ""] then return tandem.deny(403, "unknown tenant") end
              end }
            """, config: .table([.string("tenants"): .table([.index(1): .string("acme")])]))
    try vm.load(
        id: 4, file: "rate-limit.lua",
        source: """
            return { name = "rl", on_request = function(req)
              local ok = tandem.limit.token_bucket(req:header("x-tenant"), 1e9, 1e9)
              if not ok then return tandem.respond(429) end end }
            """)
    try vm.load(
        id: 5, file: "headers.lua",
        source: """
            return { name = "headers", on_request = function(req)
              for _ = 1, 10 do local t = req:header("x-tenant") end end }
            """)
    // The sidecar runs a route's policies as one chain: one call into the VM per phase.
    vm.defineChain(100, [3, 4])
    let ex = PolicyExchange(
        method: "GET", path: "/user/1", authority: "users", remoteAddress: "127.0.0.1:5000", route: "users",
        headers: [
            ("host", "users"), ("user-agent", "wrk"), ("accept", "*/*"), ("x-tenant", "acme"),
            ("x-request-id", "0123456789abcdef"),
        ])
    let n = 200_000
    let only = CommandLine.arguments.count > 2 ? CommandLine.arguments[2] : nil
    for (name, ids) in [
        ("empty on_request", [1]), ("header check + shared-dict incr", [2]),
        ("tenant gate + token bucket (2 policies)", [3, 4]), ("10 × req:header (host-call cost)", [5]),
    ] {
        if let only, !name.hasPrefix(only) { continue }
        if let cases, !cases.contains(where: { name.hasPrefix($0) }) { continue }
        measure("policy hook: \(name)\(label)", ops: n, unit: "calls") {
            for _ in 0..<n {
                for id in ids { precondition(vm.onRequest(id, ex) == .proceed) }
            }
        }
    }
    if cases != nil { return }
    if only == nil || "tenant gate + token bucket (one chain)".hasPrefix(only!) {
        measure("policy hook: tenant gate + token bucket (one chain)", ops: n, unit: "calls") {
            for _ in 0..<n { precondition(vm.onRequest(chain: 100, from: 0, ex).outcome == .proceed) }
        }
    }
    vm.end(ex)
    // As the proxy runs them: a new exchange per request (its own ctx table and request
    // userdata in the VM), ended after its hooks — the calls above reuse one exchange.
    let headers = ex.headers
    for (name, ids) in [("header check + shared-dict incr", [2]), ("tenant gate + token bucket (2 policies)", [3, 4])] {
        if let only, !name.hasPrefix(only) { continue }
        measure("policy request (new exchange): \(name)", ops: n, unit: "requests") {
            for _ in 0..<n {
                let fresh = PolicyExchange(
                    method: "GET", path: "/user/1", authority: "users", remoteAddress: "127.0.0.1:5000",
                    route: "users", headers: headers)
                for id in ids { precondition(vm.onRequest(id, fresh) == .proceed) }
                vm.end(fresh)
            }
        }
    }
    if only == nil || "tenant gate + token bucket (one chain)".hasPrefix(only!) {
        measure("policy request (new exchange): tenant gate + token bucket (one chain)", ops: n, unit: "requests") {
            for _ in 0..<n {
                let fresh = PolicyExchange(
                    method: "GET", path: "/user/1", authority: "users", remoteAddress: "127.0.0.1:5000",
                    route: "users", headers: headers)
                precondition(vm.onRequest(chain: 100, from: 0, fresh).outcome == .proceed)
                vm.end(fresh)
            }
        }
    }
    print("VM heap after the runs: \(vm.memoryBytes / 1024) KiB (peak \(vm.peakMemoryBytes / 1024) KiB)")
}
