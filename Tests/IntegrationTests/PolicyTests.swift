import Foundation
import Testing

let policiesDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("../../policies").standardized.path

/// Lua policies on real traffic: the shipped library in a real sidecar in front of a real app,
/// a hostile policy that must not take the sidecar down, the degradation fallback on the
/// sidecar's own answers, and hot reload of a policy file.
@Suite(.serialized) struct PolicyTests {
    @Test func libraryPoliciesRunOnRealTraffic() throws {
        let (app, port) = try startEdgeApp()
        let (client, dir) = try configuredClient(
            """
            local P = "\(policiesDir)/"
            return { routes = { { name = "edge", host = "edge", cluster = "edge", policies = {
              P .. "request-id.lua",
              { file = P .. "rate-limit.lua", config = { by = "route", rate = 0.001, burst = 3 } },
              P .. "response-time.lua",
              { file = P .. "header-rewrite.lua", config = { request = { set = { ["x-env"] = "test" }, remove = { "cookie" } },
                                                            response = { remove = { "x-instance" } } } },
            } } } }
            """, extra: ["--endpoints", "edge=127.0.0.1:\(port)"])
        for i in 1...3 {
            let r = try curl(["-H", "Host: edge", "-H", "Cookie: secret=1", "http://\(client.outbound)/headers?n=\(i)"])
            #expect(r.status == 200)
            let seen = try JSONSerialization.jsonObject(with: r.body) as? [String: Any]
            let headers = seen?["headers"] as? [String: String] ?? [:]
            // request-id set an id the app saw and the client got back; header-rewrite ran both ways.
            let id = try #require(r.head["x-request-id"])
            #expect(id.count == 16 && headers["x-request-id"] == id, "\(r.head) \(headers)")
            #expect(headers["x-env"] == "test" && headers["cookie"] == nil, "\(headers)")
            #expect(r.head["x-instance"] == nil)
            #expect(r.head["x-response-time"]?.hasSuffix("ms") == true)
            #expect(r.head["x-ratelimit-remaining"] == String(3 - i))
        }
        // The fourth in the burst window is refused by the rate-limit policy.
        let limited = try curl(["-H", "Host: edge", "http://\(client.outbound)/headers"])
        #expect(limited.status == 429 && limited.head["tandem-error"] == "rate-limited", "\(limited.head)")
        #expect(limited.head["retry-after"] != nil)
        let metrics = try http("http://\(client.admin)/metrics").body
        // Hook calls: rate-limit has on_request (4) and on_response (3 answers from upstream).
        #expect(metrics.contains(#"tandem_policy_invocations_total{policy="rate-limit"} 7"#), "\(metrics)")
        #expect(metrics.contains(#"tandem_policy_decisions_total{policy="rate-limit",decision="respond"} 1"#))
        withExtendedLifetime((app, client, dir)) {}
    }

    @Test func theResponseCacheServesHotGetsAndStreamsLargeAnswers() throws {
        let (app, port) = try startEdgeApp()
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "edge", host = "edge", cluster = "edge",
              policies = { { file = "\(policiesDir)/response-cache.lua", config = { ttl = 60 } } } } } }
            """, extra: ["--endpoints", "edge=127.0.0.1:\(port)"])
        let first = try curl(["-H", "Host: edge", "http://\(client.outbound)/big?bytes=1000"])
        #expect(first.status == 200 && first.head["x-cache"] == "miss" && first.body.count == 1000, "\(first.head)")
        let second = try curl(["-H", "Host: edge", "http://\(client.outbound)/big?bytes=1000"])
        #expect(second.status == 200 && second.head["x-cache"] == "hit", "\(second.head)")
        #expect(second.body == first.body && second.head["x-instance"] == nil)
        // Over the 64 KiB buffer: streamed through whole, not stored.
        for _ in 0..<2 {
            let big = try curl(["-H", "Host: edge", "http://\(client.outbound)/big?bytes=300000"])
            #expect(big.status == 200 && big.body.count == 300_000 && big.head["x-cache"] == "miss", "\(big.head)")
        }
        withExtendedLifetime((app, client, dir)) {}
    }

    /// gRPC through policies: all four modes pass a chain that runs every hook, and a policy
    /// refusing one method answers it as a gRPC status the client understands.
    @Test func policiesRunOnGRPCCallsAndDenialsBecomeGRPCStatuses() throws {
        let reg = try RegistryUnderTest()
        let port = try freePort()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port,
            app: ["/usr/bin/python3", grpcService, "server", String(port)], extra: ["--app-protocol", "grpc"])
        let dir0 = try TempDirectory()
        let guardFile = dir0.url.appendingPathComponent("no-fail.lua").path
        try """
        return { name = "no-fail",
          on_request = function(req, ctx)
            ctx.path = req.path
            if req.path:find("/Fail", 1, true) then return tandem.deny(403, "Fail is not allowed here") end
          end,
          on_response = function(res, ctx) res:set_header("x-policy", "seen") end,
          on_log = function(txn, ctx)
            tandem.log.info("grpc call", { path = ctx.path, status = txn.status, policy = txn:header("x-policy"),
              ctype = txn:header("content-type") })
          end }
        """.write(toFile: guardFile, atomically: true, encoding: .utf8)
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "users", host = "users", cluster = "users", policies = {
              "\(guardFile)", "\(policiesDir)/request-id.lua" } } } }
            """, extra: ["--endpoints", "users=\(users.inbound)"])
        let c = try Child("/usr/bin/python3", [grpcService, "client", client.outbound, "users"])
        let lines = c.readUntil { $0.hasPrefix("{") }
        let obj = try JSONSerialization.jsonObject(with: Data((lines.last ?? "").utf8)) as? [String: Any] ?? [:]
        #expect((obj["unary"] as? [String: Any])?["name"] as? String == "Alice", "\(lines)")
        #expect((obj["unary_trailers"] as? [String: String])?["x-served-by"] == "user-service")
        #expect((obj["client_stream"] as? [String: Any])?["received"] as? Int == 5)
        #expect(obj["bidi"] as? [String] == ["hi", "there", "!"])
        let err = obj["error"] as? [String: Any] ?? [:]
        #expect(err["code"] as? String == "PERMISSION_DENIED", "\(err)")
        #expect(err["details"] as? String == "Fail is not allowed here")
        #expect((err["trailers"] as? [String: String])?["tandem-error"] == "policy-denied")
        let log = client.child.readUntil { $0.contains("grpc call") && $0.contains("Fail") }
        #expect(log.last?.contains(#""status":403"#) == true, "\(log.suffix(3))")
        // on_log reads the answer as on_response left it.
        let unary = log.first { $0.contains("grpc call") && $0.contains("GetUser") }
        #expect(unary?.contains(#""policy":"seen""#) == true, "\(log.suffix(6))")
        #expect(unary?.contains(#""ctype":"application/grpc""#) == true, "\(log.suffix(6))")
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_policy_decisions_total{policy="no-fail",decision="deny"} 1"#), "\(metrics)")
        withExtendedLifetime((reg, users, client, dir, dir0)) {}
    }

    /// HTTP/2 request bodies stream, so a policy sees them only when it says `request_body =
    /// true`: the sidecar then holds the request until its end (64 KiB at most) before
    /// on_request, and forwards it whole afterwards.
    @Test func aRequestBodyPolicySeesHTTP2Bodies() throws {
        let (app, appPort) = try startEdgeApp()
        let users = try SidecarUnderTest(
            service: "users", registry: "none", appPort: appPort, app: nil, waitForRegistration: false)
        let dir0 = try TempDirectory()
        let gate = dir0.url.appendingPathComponent("body-gate.lua").path
        try """
        return { name = "body-gate", request_body = true,
          on_request = function(req, ctx)
            local b = req:body()
            if b == nil then return tandem.deny(413, "body not held") end
            if b:find("forbidden", 1, true) then return tandem.deny(403, "the body says forbidden") end
            ctx.length = #b
          end,
          on_response = function(res, ctx) res:set_header("x-policy-body-length", tostring(ctx.length)) end }
        """.write(toFile: gate, atomically: true, encoding: .utf8)
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "users", host = "users", cluster = "users", policies = { "\(gate)" } } } }
            """, extra: ["--endpoints", "users=\(users.inbound)"])
        func post(_ body: String) throws -> (status: Int, head: [String: String], body: String) {
            let file = dir.url.appendingPathComponent("body").path
            try body.write(toFile: file, atomically: true, encoding: .utf8)
            let r = try curl([
                "--http2-prior-knowledge", "-H", "Host: users", "--data-binary", "@\(file)",
                "http://\(client.outbound)/upload",
            ])
            return (r.status, r.head, String(decoding: r.body, as: UTF8.self))
        }
        let ok = try post("hello, users")
        // The app got the whole body (its size and digest), the policy had read it.
        #expect(ok.status == 200 && ok.body.hasPrefix("12 "), "\(ok)")
        #expect(ok.head["x-policy-body-length"] == "12", "\(ok.head)")
        let denied = try post("this is forbidden")
        #expect(denied.status == 403 && denied.head["tandem-error"] == "policy-denied", "\(denied)")
        // Past the bound the body streams and the policy sees none.
        let large = try post(String(repeating: "x", count: 100_000))
        #expect(large.status == 413 && large.body.contains("body not held"), "\(large)")
        withExtendedLifetime((app, users, client, dir, dir0)) {}
    }

    @Test func aHostilePolicyIsStoppedAndTheSidecarKeepsServing() throws {
        let (app, port) = try startEdgeApp()
        let dir0 = try TempDirectory()
        let hostile = dir0.url.appendingPathComponent("spin.lua").path
        try #"return { name = "spin", on_request = function() local ok = pcall(function() while true do end end) end }"#
            .write(toFile: hostile, atomically: true, encoding: .utf8)
        let bomb = dir0.url.appendingPathComponent("bomb.lua").path
        try #"return { name = "bomb", on_request = function() local s = ("x"):rep(1e8) end }"#
            .write(toFile: bomb, atomically: true, encoding: .utf8)
        // A chain whose fail-open policies fail in each phase: the others still run (on_request
        // in order, on_response last first).
        var chain: [String] = []
        for (name, source) in [
            ("stamp", #"return { name = "stamp", on_response = function(res) res:set_header("x-stamp", "1") end }"#),
            ("tag", #"return { name = "tag", on_request = function(req) req:set_header("x-after", "1") end }"#),
            ("late", #"return { name = "late", on_response = function() error("late") end }"#),
        ] {
            let file = dir0.url.appendingPathComponent("\(name).lua").path
            try source.write(toFile: file, atomically: true, encoding: .utf8)
            chain.append(file)
        }
        let (client, dir) = try configuredClient(
            """
            return { routes = {
              { name = "spin", host = "edge", path = "/spin", cluster = "edge", policies = { "\(hostile)" } },
              { name = "bomb", host = "edge", path = "/bomb", cluster = "edge", policies = { "\(bomb)" } },
              { name = "open", host = "edge", path = "/open", cluster = "edge",
                policies = { { file = "\(hostile)", fail_open = true } } },
              { name = "chain", host = "edge", path = "/headers/chain", cluster = "edge",
                policies = { "\(chain[0])", { file = "\(hostile)", fail_open = true }, "\(chain[1])",
                             { file = "\(chain[2])", fail_open = true } } },
              { name = "fine", host = "edge", cluster = "edge" },
            } }
            """, extra: ["--endpoints", "edge=127.0.0.1:\(port)"])
        for _ in 0..<3 {
            let spin = try http("http://\(client.outbound)/spin", host: "edge")
            #expect(spin.status == 500 && spin.headers["tandem-error"] == "policy-error", "\(spin)")
            // Whichever budget runs out first (instructions or wall clock) stops it.
            #expect(
                spin.body.contains("policy spin failed (instructions)")
                    || spin.body.contains("policy spin failed (timeout)"),
                "\(spin.body)")
            let boom = try http("http://\(client.outbound)/bomb", host: "edge")
            #expect(boom.status == 500 && boom.body.contains("policy bomb failed (memory)"), "\(boom)")
            // fail_open: the error is logged and counted, the request goes through.
            #expect(try http("http://\(client.outbound)/open", host: "edge").status == 200)
            let chained = try http("http://\(client.outbound)/headers/chain", host: "edge")
            #expect(chained.status == 200 && chained.body.contains(#""x-after": "1""#), "\(chained)")
            #expect(chained.headers["x-stamp"] == "1", "\(chained)")
            #expect(try http("http://\(client.outbound)/", host: "edge").status == 200)
        }
        let metrics = try http("http://\(client.admin)/metrics").body
        func count(_ reason: String) -> Int {
            Int(metric(metrics, "tandem_policy_errors_total{policy=\"spin\",reason=\"\(reason)\"}") ?? 0)
        }
        #expect(count("instructions") + count("timeout") == 9, "\(metrics)")
        #expect(metrics.contains(#"tandem_policy_errors_total{policy="late",reason="error"} 3"#), "\(metrics)")
        #expect(metrics.contains(#"tandem_policy_errors_total{policy="bomb",reason="memory"} 3"#))
        let log = client.child.readUntil { $0.contains("policy error on route bomb") }
        #expect(log.last?.contains("memory limit") == true, "\(log.suffix(3))")
        withExtendedLifetime((app, client, dir, dir0)) {}
    }

    @Test func theFallbackPolicyAnswersWhenTheUpstreamIsDown() throws {
        let dead = try freePort()  // nothing listens here
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "users", host = "users", cluster = "users",
              retry = { attempts = 0 }, policies = { "\(policiesDir)/fallback.lua" } } } }
            """, extra: ["--endpoints", "users=127.0.0.1:\(dead)"])
        let r = try http("http://\(client.outbound)/user/1", host: "users")
        #expect(r.status == 200, "\(r)")
        #expect(r.headers["x-fallback"] == "upstream-connect-failure")
        #expect(r.body == #"{"code":0,"message":"degraded","data":null}"#)
        withExtendedLifetime((client, dir)) {}
    }

    /// Regression: header edits an on_response hook made to the sidecar's own answer (here 503,
    /// the upstream refused the connection) were dropped unless the hook returned a decision.
    /// A policy cannot make the answer lie about its length either.
    @Test func headerEditsOnALocalAnswerGoOutOverHTTP1AndHTTP2() throws {
        let dead = try freePort()  // nothing listens here
        let dir0 = try TempDirectory()
        let mark = dir0.url.appendingPathComponent("mark.lua").path
        try """
        return { name = "mark", on_response = function(res)
          res:set_header("x-seen", res.status .. " " .. (res.reason or "-"))
          res:set_header("content-length", "1")
          res:remove_header("content-type")
        end }
        """.write(toFile: mark, atomically: true, encoding: .utf8)
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "users", host = "users", cluster = "users",
              retry = { attempts = 0 }, policies = { "\(mark)" } } } }
            """, extra: ["--endpoints", "users=127.0.0.1:\(dead)"])
        for version in [["--http1.1"], ["--http2-prior-knowledge"]] {
            let r = try curl(version + ["-H", "Host: users", "http://\(client.outbound)/user/1"])
            let body = String(decoding: r.body, as: UTF8.self)
            #expect(r.status == 503 && r.head["tandem-error"] == "upstream-connect-failure", "\(version) \(r.head)")
            #expect(r.head["x-seen"] == "503 upstream-connect-failure", "\(version) \(r.head)")
            #expect(r.head["content-type"] == nil, "\(version) \(r.head)")
            #expect(r.head["content-length"] == String(r.body.count) && body.contains("\"code\""), "\(version) \(r)")
        }
        withExtendedLifetime((client, dir, dir0)) {}
    }

    /// Regression (found by the mesh simulator's breaker-fallback scenario): a fallback that
    /// replaced a failed answer made the breaker count a success, so behind a fallback policy
    /// the breaker never opened and every request still went to the dead upstream.
    @Test func theBreakerStillCountsFailuresAFallbackHides() throws {
        let dead = try freePort()  // nothing listens here
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "users", host = "users", cluster = "users",
              retry = { attempts = 0 }, policies = { "\(policiesDir)/fallback.lua" } } },
              clusters = { users = { breaker = { consecutive_failures = 2, open_ms = 60000 } } } }
            """, extra: ["--endpoints", "users=127.0.0.1:\(dead)"])
        let answers = try (1...3).map { _ in try http("http://\(client.outbound)/user/1", host: "users") }
        #expect(answers.map(\.status) == [200, 200, 200])
        #expect(
            answers.map { $0.headers["x-fallback"] } == [
                "upstream-connect-failure", "upstream-connect-failure", "circuit-open",
            ])
        withExtendedLifetime((client, dir)) {}
    }

    @Test func aChangedPolicyFileIsReloadedAndABrokenOneRejected() throws {
        let (app, port) = try startEdgeApp()
        let dir0 = try TempDirectory()
        let file = dir0.url.appendingPathComponent("version.lua").path
        func write(_ v: String) throws {
            try """
            return { name = "version", on_response = function(res) res:set_header("x-policy-version", "\(v)") end }
            """.write(toFile: file, atomically: true, encoding: .utf8)
        }
        try write("1")
        let (client, dir) = try configuredClient(
            """
            return { routes = { { name = "edge", host = "edge", cluster = "edge", policies = { "\(file)" } } } }
            """, extra: ["--endpoints", "edge=127.0.0.1:\(port)"])
        #expect(try http("http://\(client.outbound)/", host: "edge").headers["x-policy-version"] == "1")
        try write("2")
        let applied = client.child.readUntil { $0.contains("config applied after a change in \(file)") }
        #expect(applied.last?.contains("config applied") == true, "\(applied.suffix(3))")
        #expect(try http("http://\(client.outbound)/", host: "edge").headers["x-policy-version"] == "2")
        // A broken version: rejected with its error, version 2 keeps serving.
        try "return { name = \"version\", on_response = function(res) res:set_header( end }"
            .write(toFile: file, atomically: true, encoding: .utf8)
        let rejected = client.child.readUntil { $0.contains("config change rejected") }
        #expect(rejected.last?.contains("version.lua:1: unexpected symbol") == true, "\(rejected.suffix(3))")
        #expect(try http("http://\(client.outbound)/", host: "edge").headers["x-policy-version"] == "2")
        withExtendedLifetime((app, client, dir, dir0)) {}
    }

    @Test func aBadPolicyArgumentStopsTheSidecarAtStartWithTheKeyPath() throws {
        let dir = try TempDirectory()
        let cfg = dir.url.appendingPathComponent("bad.lua").path
        try """
        return { routes = { { name = "edge", host = "edge", cluster = "edge", policies = {
          { file = "\(policiesDir)/rate-limit.lua", config = { rate = "fast" } } } } } }
        """.write(toFile: cfg, atomically: true, encoding: .utf8)
        let c = try Child(
            tandemBinary(), ["sidecar", "--service", "x", "--app-port", "1", "--registry", "none", "--config", cfg])
        let out = c.readUntil { _ in false }.joined(separator: "\n")
        c.process.waitUntilExit()
        #expect(c.process.terminationStatus != 0)
        #expect(
            out.contains("routes[1].policies[1].config.rate: expected a number, found the string \"fast\""), "\(out)")
    }
}

@Suite struct SubsetRoutingTests {
    /// `tandem run --meta` registers instance metadata; a route's `subset` sends only to the
    /// endpoints that have it, a policy's `req:set_subset` changes it per request (a canary by
    /// query argument here), and a subset with no endpoint is answered 503
    /// no-healthy-endpoint, naming it.
    @Test func routesAndPoliciesPickEndpointsByMetadata() throws {
        let reg = try RegistryUnderTest()
        let v1 = try startUsers(1, registry: reg.endpoint, extra: ["--meta", "version=v1", "--instance", "users-v1"])
        let v2 = try startUsers(1, registry: reg.endpoint, extra: ["--meta", "version=v2", "--instance", "users-v2"])
        let dir = try TempDirectory()
        let policy = dir.url.appendingPathComponent("pick.lua").path
        try """
        return { name = "pick",
          on_request = function(req, ctx)
            local v = req:query_arg("v")
            if v == "any" then req:set_subset({}) elseif v then req:set_subset({ version = "v" .. v }) end
          end }
        """.write(toFile: policy, atomically: true, encoding: .utf8)
        let config = dir.url.appendingPathComponent("client.lua").path
        try """
        return { clusters = { users = { balancer = "round_robin" } },
          routes = { { name = "users", host = "users", cluster = "users", subset = { version = "v1" },
            policies = { "\(policy)" } } } }
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let client = try startClient(registry: reg.endpoint, extra: ["--config", config])
        func instance(_ query: String) throws -> String {
            let r = try http("http://\(client.outbound)/user/1\(query)", host: "users")
            return r.status == 200
                ? r.headers["x-instance"] ?? "none" : "\(r.status) \(r.headers["tandem-error"] ?? "")"
        }
        // Both instances discovered (the policy's canary reaches v2) before counting.
        #expect(try eventually { try instance("?v=2") == "users-v2" })
        let routeDefault = try (0..<10).map { _ in try instance("") }
        #expect(routeDefault == Array(repeating: "users-v1", count: 10))
        let canary = try (0..<10).map { _ in try instance("?v=2") }
        #expect(canary == Array(repeating: "users-v2", count: 10))
        let any = Set(try (0..<20).map { _ in try instance("?v=any") })
        #expect(any == ["users-v1", "users-v2"])
        let none = try http("http://\(client.outbound)/user/1?v=9", host: "users")
        #expect(none.status == 503 && none.headers["tandem-error"] == "no-healthy-endpoint", "\(none)")
        #expect(none.body.contains("in subset version=v9"), "\(none.body)")
        // The registered metadata, as operators see it.
        let listed = try tandem(["services", "users", "--endpoints", reg.endpoint])
        #expect(listed.status == 0)
        let rows = listed.output.split(separator: "\n").filter { $0.hasPrefix("users ") }
        #expect(
            rows.count == 2
                && rows.allSatisfy { $0.hasSuffix("passing   version=v\($0.contains("users-v1") ? 1 : 2)") },
            "\(listed.output)")
        withExtendedLifetime((reg, v1, v2, client, dir)) {}
    }
}
