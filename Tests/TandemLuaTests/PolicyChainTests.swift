import Foundation
import Testing

@testable import TandemLua

/// A route's policies run as one chain: one call into the VM per phase, each hook under its own
/// budget, and every host call, count and failure attributed to the policy that ran.
@Suite struct PolicyChainTests {
    private func text(_ o: PolicyOutcome) -> String {
        guard case .decision(let d) = o else { return "\(o)" }
        return "\(d.status) " + decisionBody(o)
    }

    @Test func aChainRunsInOrderUntilADecisionAndCountsEachPolicy() throws {
        let logs = LogCollector()
        let vm = try makeVM(logs: logs)
        try vm.load(
            id: 1, file: "a.lua",
            source: """
                return { name = "a",
                  on_request = function(req, ctx) ctx.trail = "a" end,
                  on_response = function(res) res:add_header("x-trail", "a") end }
                """)
        try vm.load(id: 2, file: "b.lua", source: #"return { name = "b", on_log = function() end }"#)
        try vm.load(
            id: 3, file: "c.lua",
            source: """
                return { name = "c",
                  on_request = function(req, ctx)
                    ctx.trail = ctx.trail .. "c"
                    if req:header("x-stop") then return tandem.respond(418, ctx.trail) end
                  end,
                  on_response = function(res) res:add_header("x-trail", "c") end }
                """)
        try vm.load(
            id: 4, file: "d.lua", source: #"return { name = "d", on_request = function() tandem.log.info("ran") end }"#)
        vm.defineChain(7, [1, 2, 3, 4])

        let stopped = request(headers: [("x-stop", "1")])
        let first = vm.onRequest(chain: 7, from: 0, stopped)
        #expect(first.at == 2)
        #expect(text(first.outcome) == "418 ac")
        #expect(logs.all.isEmpty, "d runs after the decision")

        let passed = request()
        let second = vm.onRequest(chain: 7, from: 0, passed)
        #expect(second.at == 4)
        #expect(second.outcome == .proceed)
        #expect(logs.all.map(\.policy) == ["d"])

        // Answers go through on_response last policy first.
        passed.status = 200
        let answer = vm.onResponse(chain: 7, from: 3, passed)
        #expect(answer.at == -1)
        #expect(answer.outcome == .proceed)
        #expect(passed.responseHeaders.filter { $0.name == "x-trail" }.map(\.value) == ["c", "a"])

        let counters = vm.services.counters
        #expect(counters["a"]?.invocations == 3)
        #expect(counters["b"]?.invocations == 0)
        #expect(counters["c"]?.invocations == 3)
        #expect(counters["c"]?.decisions == ["respond": 1])
        #expect(counters["d"]?.invocations == 1)
    }

    /// A failing hook is named by its position, so the sidecar can go on after it when the
    /// route lets that policy fail open; the request's ctx carries over.
    @Test func aFailureNamesItsPolicyAndTheChainGoesOnFromTheNext() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "a.lua", source: #"return { name = "a", on_request = function(_, ctx) ctx.n = 1 end }"#)
        try vm.load(id: 2, file: "b.lua", source: #"return { name = "b", on_request = function() error("boom") end }"#)
        try vm.load(
            id: 3, file: "c.lua",
            source:
                #"return { name = "c", on_request = function(_, ctx) return tandem.respond(200, tostring(ctx.n)) end }"#
        )
        vm.defineChain(1, [1, 2, 3])
        let ex = request()
        let failed = vm.onRequest(chain: 1, from: 0, ex)
        #expect(failed.at == 1)
        guard case .failed(let f) = failed.outcome else {
            Issue.record("expected a failure, got \(failed.outcome)")
            return
        }
        #expect(f.policy == "b")
        #expect(f.message.contains("b.lua:1: boom"))
        let rest = vm.onRequest(chain: 1, from: 2, ex)
        #expect(rest.at == 2)
        #expect(text(rest.outcome) == "200 1")
        #expect(vm.services.counters["b"]?.errors == [.error: 1])
    }

    /// Every hook of a chain gets the whole per-call budget: two hooks that each use most of it
    /// pass; a third that loops is stopped and blamed.
    @Test func eachHookOfAChainHasItsOwnBudget() throws {
        var limits = PolicyLimits()
        limits.instructions = 200_000
        limits.timeMs = 0
        let vm = try makeVM(limits: limits)
        let busy = """
            return { name = "%@", on_request = function(_, ctx)
              local x = 0
              for i = 1, 60000 do x = x + i end
              ctx.done = (ctx.done or 0) + 1
            end }
            """
        try vm.load(id: 1, file: "x.lua", source: busy.replacingOccurrences(of: "%@", with: "x"))
        try vm.load(id: 2, file: "y.lua", source: busy.replacingOccurrences(of: "%@", with: "y"))
        try vm.load(
            id: 3, file: "z.lua",
            source: """
                return { name = "z", on_request = function(_, ctx)
                  if ctx.done == 2 then while true do end end
                end }
                """)
        vm.defineChain(1, [1, 2])
        vm.defineChain(2, [1, 2, 3])
        let two = vm.onRequest(chain: 1, from: 0, request())
        #expect(two.outcome == .proceed)
        let three = vm.onRequest(chain: 2, from: 0, request())
        #expect(three.at == 2)
        guard case .failed(let f) = three.outcome else {
            Issue.record("expected the loop to be stopped, got \(three.outcome)")
            return
        }
        #expect(f.policy == "z")
        #expect(f.reason == .instructions)
    }

    /// Host calls made during a chain act for the policy running: its limiter keys and its
    /// log lines.
    @Test func hostCallsActForThePolicyThatRuns() throws {
        let logs = LogCollector()
        let vm = try makeVM(logs: logs)
        let limited = """
            return { name = "%@", on_request = function()
              local ok = tandem.limit.token_bucket("k", 1, 1)
              tandem.log.info(ok and "allowed" or "limited")
              if not ok then return tandem.respond(429) end
            end }
            """
        try vm.load(id: 1, file: "p.lua", source: limited.replacingOccurrences(of: "%@", with: "p"))
        try vm.load(id: 2, file: "q.lua", source: limited.replacingOccurrences(of: "%@", with: "q"))
        vm.defineChain(3, [1, 2])
        #expect(vm.onRequest(chain: 3, from: 0, request()).outcome == .proceed)
        #expect(logs.all.map { "\($0.policy) \($0.message)" } == ["p allowed", "q allowed"])
        let again = vm.onRequest(chain: 3, from: 0, request())
        #expect(again.at == 0)
        #expect(text(again.outcome) == "429 ")
    }

    @Test func aDroppedChainIsRefusedAndItsPoliciesStay() throws {
        let vm = try makeVM()
        try vm.load(id: 1, file: "a.lua", source: #"return { name = "a", on_request = function() end }"#)
        vm.defineChain(5, [1])
        #expect(vm.onRequest(chain: 5, from: 0, request()).outcome == .proceed)
        vm.dropChain(5)
        guard case .failed(let f) = vm.onRequest(chain: 5, from: 0, request()).outcome else {
            Issue.record("a dropped chain ran")
            return
        }
        #expect(f.message == "no such chain")
        #expect(vm.onRequest(1, request()) == .proceed)
    }

    /// Requests' state lives at slots the VM reuses once a request ended: a request never sees
    /// another's ctx, across many batches of ends.
    @Test func aReusedSlotStartsWithAFreshCtx() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: """
                return { name = "p", on_request = function(req, ctx)
                  if ctx.path then return tandem.respond(500, "ctx of " .. ctx.path) end
                  ctx.path = req.path
                end }
                """)
        for i in 0..<(PolicyVM.endBatch * 5) {
            let ex = request("GET", "/\(i)")
            #expect(vm.onRequest(1, ex) == .proceed)
            vm.end(ex)
        }
    }

    /// A number set as a header value reads as Lua's tostring writes it (the host formats it).
    @Test func numericHeaderValuesReadAsTostringWritesThem() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "n.lua",
            source: """
                local values = { 42, -7, 0, -0.0, 1.5, 1/3, 1e20, 123456789012345, 99999999999999, -1e-7, 1/0, -1/0 }
                return { name = "n", on_request = function(req)
                  for i, v in ipairs(values) do
                    req:set_header("n" .. i, v)
                    req:add_header("t" .. i, tostring(v))
                  end
                end }
                """)
        let ex = request()
        #expect(vm.onRequest(1, ex) == .proceed)
        let numbers = ex.headers.filter { $0.name.hasPrefix("n") }.map(\.value)
        let texts = ex.headers.filter { $0.name.hasPrefix("t") }.map(\.value)
        #expect(numbers.count == 12)
        #expect(numbers == texts)
    }

    /// A policy reloaded in place under its id counts under its new name in the chains that
    /// hold it.
    @Test func aPolicyReloadedInPlaceCountsUnderItsNewName() throws {
        let vm = try makeVM()
        try vm.load(id: 1, file: "a.lua", source: #"return { name = "a", on_request = function() end }"#)
        vm.defineChain(7, [1])
        #expect(vm.onRequest(chain: 7, from: 0, request()).outcome == .proceed)
        try vm.load(id: 1, file: "b.lua", source: #"return { name = "b", on_request = function() end }"#)
        #expect(vm.onRequest(chain: 7, from: 0, request()).outcome == .proceed)
        #expect(vm.services.counters["a"]?.invocations == 1)
        #expect(vm.services.counters["b"]?.invocations == 1)
    }
}
