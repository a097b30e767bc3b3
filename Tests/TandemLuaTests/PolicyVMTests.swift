import Foundation
import Synchronization
import Testing

@testable import TandemLua

/// A virtual clock for the services (epoch ms).
final class TestClock: Sendable {
    let ms = Mutex<Int64>(1_700_000_000_000)
    func advance(_ d: Int64) { ms.withLock { $0 += d } }
    var now: Int64 { ms.withLock { $0 } }
}

final class LogCollector: Sendable {
    let lines = Mutex<[PolicyLogLine]>([])
    func append(_ l: PolicyLogLine) { lines.withLock { $0.append(l) } }
    var all: [PolicyLogLine] { lines.withLock { $0 } }
}

func makeVM(
    limits: PolicyLimits = PolicyLimits(), clock: TestClock = TestClock(), logs: LogCollector = LogCollector()
)
    throws -> PolicyVM
{
    let services = PolicyServices(clock: { clock.now }, sink: { logs.append($0) })
    return try PolicyVM(limits: limits, services: services, seed: 42)
}

func request(
    _ method: String = "GET", _ path: String = "/", headers: [(String, String)] = [], query: String = ""
)
    -> PolicyExchange
{
    PolicyExchange(
        method: method, path: path, query: query, authority: "users", remoteAddress: "10.0.0.7:5555",
        route: "users", headers: headers.map { (name: $0.0, value: $0.1) })
}

/// A decision's body as text (any other outcome described), for expectations.
func decisionBody(_ o: PolicyOutcome) -> String {
    guard case .decision(let d) = o else { return "\(o)" }
    return String(decoding: d.body, as: UTF8.self)
}

@Suite struct PolicyVMTests {
    @Test func aPolicyReadsAndRewritesTheRequestAndAnswers() throws {
        let vm = try makeVM()
        let name = try vm.load(
            id: 1, file: "gate.lua",
            source: """
                return {
                  name = "gate",
                  config = { header = { type = "string", default = "x-tenant" },
                             tenants = { type = "set", of = "string", required = true } },
                  on_request = function(req, ctx, cfg)
                    local t = req:header(cfg.header)
                    if not cfg.tenants[t] then return tandem.deny(403, "unknown tenant " .. tostring(t)) end
                    req:set_header("x-tenant-checked", "yes")
                    req:remove_header("cookie")
                    req:set_path("/v2" .. req.path)
                    req:set_upstream("users-" .. t)
                    ctx.tenant = t
                  end,
                  on_response = function(res, ctx)
                    res:set_header("x-tenant", ctx.tenant)
                    if res.status == 503 then return tandem.respond(200, { fallback = true }, { ["x-degraded"] = "1" }) end
                  end,
                }
                """, config: .table([.string("tenants"): .table([.index(1): .string("acme")])]))
        #expect(name == "gate")

        let ok = request(
            headers: [("X-Tenant", "acme"), ("Cookie", "a=b"), ("Accept", "*/*")])
        #expect(vm.onRequest(1, ok) == .proceed)
        #expect(ok.path == "/v2/")
        #expect(ok.upstream == "users-acme")
        #expect(ok.headers.map(\.name) == ["X-Tenant", "Accept", "x-tenant-checked"])
        ok.status = 503
        ok.reason = "circuit-open"
        guard case .decision(let d) = vm.onResponse(1, ok) else { Issue.record("no fallback"); return }
        #expect(d.status == 200 && String(decoding: d.body, as: UTF8.self) == #"{"fallback":true}"#)
        #expect(d.headers.first?.name == "x-degraded")
        #expect(ok.responseHeaders.first { $0.name == "x-tenant" }?.value == "acme")
        vm.end(ok)

        let denied = request(headers: [("x-tenant", "evil")])
        guard case .decision(let no) = vm.onRequest(1, denied) else { Issue.record("not denied"); return }
        #expect(no.kind == "deny" && no.status == 403)
        #expect(String(decoding: no.body, as: UTF8.self) == #"{"code":403,"message":"unknown tenant evil"}"#)
    }

    /// The answer's headers are made for the hooks only when one reads them: edits made before
    /// that read are in what it sees, edits after it land in the same list, and the edits are
    /// also kept in order for the host to apply to its own head (on_log reads the result).
    @Test func responseHeadersAreMadeOnFirstReadWithTheEditsSoFar() throws {
        let vm = try makeVM()
        _ = try vm.load(
            id: 1, file: "set.lua",
            source: """
                return { name = "set", on_response = function(res)
                  res:set_header("x-a", "1")
                  res:remove_header("server")
                end }
                """, config: .table([:]))
        _ = try vm.load(
            id: 2, file: "read.lua",
            source: """
                return { name = "read",
                  on_response = function(res, ctx)
                    ctx.seen = tostring(res:header("x-a")) .. "," .. tostring(res:header("server"))
                      .. "," .. tostring(res:header("content-type"))
                    if ctx.seen ~= "1,nil,text/plain" then error("on_response saw " .. ctx.seen) end
                    res:add_header("x-b", "2")
                  end,
                  on_log = function(txn, ctx)
                    if txn:header("x-b") ~= "2" or txn:header("x-a") ~= "1" then error("log saw " .. tostring(txn:header("x-b"))) end
                  end }
                """, config: .table([:]))
        let ex = request()
        var made = 0
        ex.responseHeaderSource = {
            made += 1
            return [(name: "Server", value: "nginx"), (name: "Content-Type", value: "text/plain")]
        }
        #expect(vm.onResponse(1, ex) == .proceed)
        #expect(made == 0)  // only edits so far: nothing copied
        #expect(vm.onResponse(2, ex) == .proceed)
        #expect(made == 1)
        #expect(ex.responseHeaders.map(\.name) == ["Content-Type", "x-a", "x-b"])
        #expect(ex.responseEdits.map(\.name) == ["x-a", "server", "x-b"])
        #expect(ex.responseEdits.map(\.replace) == [true, true, false])
        #expect(vm.onLog(2, ex) == .proceed)
        vm.end(ex)
    }

    /// The names hooks set are kept as strings and reused by their exact bytes: names that
    /// differ in case or share a prefix stay apart, and a name set on every request reads the
    /// same each time, also past the number of names kept.
    @Test func headerNamesSetByHooksKeepTheirExactBytes() throws {
        let vm = try makeVM()
        _ = try vm.load(
            id: 1, file: "names.lua",
            source: """
                return { name = "names", on_response = function(res)
                  res:set_header("x-ratelimit-remaining", 7)
                  res:add_header("X-RateLimit-Remaining", "8")
                  res:add_header("x-ratelimit-remaining-", "9")
                  for i = 1, 40 do res:add_header("x-n" .. i, i) end
                end }
                """, config: .table([:]))
        for _ in 0..<3 {
            let ex = request()
            #expect(vm.onResponse(1, ex) == .proceed)
            let names = ex.responseEdits.map(\.name)
            #expect(
                names == ["x-ratelimit-remaining", "X-RateLimit-Remaining", "x-ratelimit-remaining-"]
                    + (1...40).map { "x-n\($0)" })
            #expect(ex.responseEdits.map { $0.value ?? "-" } == ["7", "8", "9"] + (1...40).map { "\($0)" })
            vm.end(ex)
        }
    }

    @Test func configIsValidatedAgainstThePolicySchemaWithTheKeyPath() throws {
        let vm = try makeVM()
        let source = """
            return { name = "p", config = { rps = { type = "number", between = { 1, 100 } },
                                            mode = { type = "string", one_of = { "a", "b" } } },
                     on_request = function() end }
            """
        #expect(
            throws: PolicyFailure(
                policy: "p", reason: .error,
                message: "routes[3].policies[1].config.rps: expected a value between 1 and 100, found 500")
        ) {
            try vm.load(
                id: 1, file: "p.lua", source: source, config: .table([.string("rps"): .number(500)]),
                path: "routes[3].policies[1].config")
        }
        #expect(
            throws: PolicyFailure(
                policy: "p", reason: .error, message: "cfg.mode: expected one of a, b, found the string \"c\"")
        ) {
            try vm.load(
                id: 1, file: "p.lua", source: source, config: .table([.string("mode"): .string("c")]), path: "cfg")
        }
        #expect(
            throws: PolicyFailure(
                policy: "p", reason: .error, message: "cfg.burst: unknown key (this policy takes: mode, rps)")
        ) {
            try vm.load(
                id: 1, file: "p.lua", source: source, config: .table([.string("burst"): .number(1)]), path: "cfg")
        }
        // A syntax error names file:line.
        #expect(
            throws: PolicyFailure(
                policy: "bad.lua", reason: .error, message: "bad.lua:2: unexpected symbol near '<eof>'")
        ) {
            try vm.load(id: 2, file: "bad.lua", source: "return {\n")
        }
    }

    @Test func aFailedReloadKeepsTheLastGoodVersion() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: #"return { name = "p", on_request = function() return tandem.respond(200, "v1") end }"#)
        #expect(throws: PolicyFailure.self) {
            try vm.load(id: 1, file: "p.lua", source: #"return { name = "p", on_request = 5 }"#)
        }
        guard case .decision(let d) = vm.onRequest(1, request()) else { Issue.record("policy lost"); return }
        #expect(String(decoding: d.body, as: UTF8.self) == "v1")
        try vm.load(
            id: 1, file: "p.lua",
            source: #"return { name = "p", on_request = function() return tandem.respond(200, "v2") end }"#)
        guard case .decision(let d2) = vm.onRequest(1, request()) else { Issue.record("no v2"); return }
        #expect(String(decoding: d2.body, as: UTF8.self) == "v2")
    }

    @Test func sharedDictsAndRateLimitsRunOnTheVirtualClock() throws {
        let clock = TestClock()
        let services = PolicyServices(clock: { clock.now }, sink: { _ in })
        // Two VMs (two event loops) share the dict and the limiter.
        let a = try PolicyVM(services: services, seed: 1)
        let b = try PolicyVM(services: services, seed: 2)
        let source = """
            return {
              name = "count", shared = { hits = { capacity = 100 } },
              on_request = function(req)
                local n = tandem.shared.hits:incr(req.path, 1, 0, 2)
                local ok, retry = tandem.limit.token_bucket("all", 1, 2)
                if not ok then return tandem.respond(429, "retry in " .. retry) end
                return tandem.respond(200, tostring(n))
              end,
            }
            """
        try a.load(id: 1, file: "c.lua", source: source)
        try b.load(id: 1, file: "c.lua", source: source)
        func body(_ vm: PolicyVM) -> String {
            guard case .decision(let d) = vm.onRequest(1, request("GET", "/x")) else { return "?" }
            return "\(d.status) " + String(decoding: d.body, as: UTF8.self)
        }
        #expect(body(a) == "200 1")
        #expect(body(b) == "200 2")
        #expect(body(a) == "429 retry in 1000")
        clock.advance(1000)
        #expect(body(b) == "200 4")
        clock.advance(2000)  // the counter's 2 s TTL (set on creation) has passed; the bucket refilled
        #expect(body(a) == "200 1")
    }

    @Test func hooksSeeTheirOwnCtxAndStaleHandlesFail() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: """
                local kept
                return { name = "p",
                  on_request = function(req, ctx)
                    if kept then return tandem.respond(200, tostring(pcall(function() return kept:header("a") end))) end
                    kept = req
                    ctx.seen = req.method
                  end,
                  on_log = function(txn, ctx) tandem.log.info("done", { method = ctx.seen, status = txn.status }) end }
                """)
        let logs = LogCollector()
        _ = logs
        let first = request("POST", "/")
        #expect(vm.onRequest(1, first) == .proceed)
        first.status = 201
        #expect(vm.onLog(1, first) == .proceed)
        vm.end(first)
        guard case .decision(let d) = vm.onRequest(1, request()) else { Issue.record("no answer"); return }
        #expect(String(decoding: d.body, as: UTF8.self) == "false")
    }

    /// Each request's ctx leaves the VM after `end` (in batches): 20,000 requests that each
    /// park 1 KiB in ctx leave the heap where a few hundred would.
    @Test func ctxIsDroppedAfterTheRequestEnds() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source:
                #"return { name = "p", on_request = function(req, ctx) ctx.blob = string.rep("x", 1024) .. req.path end }"#
        )
        for i in 0..<20_000 {
            let ex = request("GET", "/\(i)")
            #expect(vm.onRequest(1, ex) == .proceed)
            vm.end(ex)
        }
        // 20,000 × 1 KiB kept would be over 20 MiB; the batch bound is 64 requests.
        #expect(vm.peakMemoryBytes < 4 << 20, "peak \(vm.peakMemoryBytes)")
    }

    @Test func logsCarryThePolicyNameAndFields() throws {
        let logs = LogCollector()
        let vm = try makeVM(logs: logs)
        try vm.load(
            id: 1, file: "p.lua",
            source:
                #"return { name = "audit", on_log = function(txn, ctx) tandem.log.warn("done", { status = txn.status }) end }"#
        )
        let ex = request()
        ex.status = 204
        #expect(vm.onLog(1, ex) == .proceed)
        #expect(
            logs.all == [PolicyLogLine(policy: "audit", level: .warn, message: "done", fieldsJSON: #"{"status":204}"#)])
    }

    @Test func metricsAreDeclaredInInitAndRenderedForPrometheus() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: """
                local denied
                return { name = "m",
                  init = function() denied = tandem.metrics.counter("denied_total", { "tenant" }) end,
                  on_request = function(req) denied:inc(1, req:header("x-tenant") or "none") end }
                """)
        _ = vm.onRequest(1, request(headers: [("x-tenant", "acme")]))
        _ = vm.onRequest(1, request(headers: [("x-tenant", "acme")]))
        _ = vm.onRequest(1, request())
        let text = vm.services.prometheus()
        #expect(text.contains(#"tandem_policy_denied_total{policy="m",tenant="acme"} 2"#), "\(text)")
        #expect(text.contains(#"tandem_policy_denied_total{policy="m",tenant="none"} 1"#))
        #expect(text.contains(#"tandem_policy_invocations_total{policy="m"} 3"#))
    }

    @Test func jsonBase64AndURLHelpers() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: #"""
                return { name = "u", on_request = function(req)
                  local t = tandem.json.decode('{"a":[1,2,{"b":"x\\u00e9"}],"n":null,"t":true}')
                  assert(t.a[3].b == "xé" and t.n == tandem.json.null and t.t == true)
                  assert(tandem.base64.decode(tandem.base64.encode("hi there")) == "hi there")
                  assert(tandem.base64.url_decode("aGk_") == "hi?")
                  assert(tandem.url.unescape(tandem.url.escape("a b/c")) == "a b/c")
                  assert(req:query_arg("q") == "a b" and req:query_args().n == "1")
                  return tandem.respond(200, tandem.json.encode({ list = { 1, 2 }, s = "q\"",
                    f = { 0.1, 1.332, 1 / 3, 2 ^ 60, -2.5e-8 } }))
                end }
                """#)
        guard case .decision(let d) = vm.onRequest(1, request(query: "q=a+b&n=1")) else {
            Issue.record("\(vm.onRequest(1, request(query: "q=a+b&n=1")))")
            return
        }
        // Numbers in their shortest exact form (they were printed with 17 digits: 0.10000000000000001).
        #expect(
            String(decoding: d.body, as: UTF8.self)
                == #"{"f":[0.1,1.332,0.3333333333333333,1.152921504606847e+18,-2.5e-08],"list":[1,2],"s":"q\""}"#)
    }

    @Test func requestAndResponseBodyDeclarationsAreReadAndChecked() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "b.lua",
            source: #"return { name = "b", request_body = true, on_request = function(req) end }"#)
        try vm.load(id: 2, file: "c.lua", source: #"return { name = "c", on_request = function(req) end }"#)
        #expect(vm.wantsRequestBody(1) && !vm.wantsResponseBody(1))
        #expect(!vm.wantsRequestBody(2))
        #expect {
            try vm.load(
                id: 3, file: "d.lua",
                source: #"return { name = "d", request_body = "yes", on_request = function() end }"#)
        } throws: { "\($0)".contains("d.lua: request_body: expected true or false") }
    }

    @Test func headerInjectionIsRefused() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: #"return { name = "p", on_request = function(req) req:set_header("x-a", "1\r\nx-evil: 1") end }"#)
        guard case .failed(let f) = vm.onRequest(1, request()) else { Issue.record("accepted"); return }
        #expect(f.message.contains("invalid value for header x-a"), "\(f)")
    }
}

@Test func theEmbeddedPreludeIsTheCheckedInLuaFile() throws {
    let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Sources/TandemLua/lua/prelude.lua").standardized
    let text = try String(contentsOf: file, encoding: .utf8)
    #expect(preludeSource + "\n" == text, "run dev/gen-prelude.sh")
}
