import Foundation
import Testing

@testable import TandemLua

/// `req:header` reads the request's fields from the VM's C-side copy of the request whose
/// on_request runs; anything that copy cannot answer (another request, a changed request)
/// goes to the host, which gives the same answers and refuses handles kept past their hook.
@Suite struct RequestFieldTests {
    @Test func headerReadsAnswerForTheRequestAndFollowItsEdits() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "h.lua",
            source: """
                return { name = "h", on_request = function(req, ctx)
                  local out = {}
                  out[#out + 1] = req:header("X-Tenant") or "nil"
                  out[#out + 1] = req:header("x-missing") or "nil"
                  out[#out + 1] = table.concat(req:header_values("x-multi"), ",")
                  out[#out + 1] = req:header("x-empty") == "" and "empty" or "?"
                  req:set_header("x-tenant", "changed")
                  out[#out + 1] = req:header("x-tenant")
                  req:add_header("x-multi", "c")
                  out[#out + 1] = table.concat(req:header_values("X-MULTI"), ",")
                  req:remove_header("x-multi")
                  out[#out + 1] = tostring(req:header("x-multi"))
                  return tandem.respond(200, table.concat(out, "|"))
                end }
                """)
        let ex = request(headers: [
            ("x-tenant", "acme"), ("X-Multi", "a"), ("x-tenantx", "no"), ("x-multi", "b"), ("x-empty", ""),
        ])
        #expect(decisionBody(vm.onRequest(1, ex)) == "acme|nil|a,b|empty|changed|a,b,c|nil")
    }

    /// The host may change an exchange's fields between two calls: the next on_request reads
    /// them as they are then.
    @Test func fieldsChangedByTheHostBetweenCallsAreSeen() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "t.lua",
            source:
                #"return { name = "t", on_request = function(req) return tandem.respond(200, req:header("x-t") or "nil") end }"#
        )
        let ex = request(headers: [("x-t", "one")])
        #expect(decisionBody(vm.onRequest(1, ex)) == "one")
        ex.headers = [(name: "x-t", value: "two")]
        #expect(decisionBody(vm.onRequest(1, ex)) == "two")
    }

    /// Two requests on one VM, interleaved: each hook reads its own request, and a handle kept
    /// from another request is refused (it is not read from the copy of the running one).
    @Test func interleavedRequestsReadTheirOwnFieldsAndAKeptHandleIsRefused() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "k.lua",
            source: """
                local kept
                return { name = "k",
                  on_request = function(req, ctx)
                    if req:header("x-keep") then kept = req return end
                    local ok, err = pcall(kept.header, kept, "x-keep")
                    ctx.stale = tostring(ok) .. ":" .. tostring(err)
                  end,
                  on_response = function(res, ctx)
                    res:set_header("x-seen", (res.request:header("x-id") or "nil") .. "/" .. (ctx.stale or "-"))
                  end }
                """)
        let a = request(headers: [("x-keep", "1"), ("x-id", "A")])
        let b = request(headers: [("x-id", "B")])
        #expect(vm.onRequest(1, a) == .proceed)
        #expect(vm.onRequest(1, b) == .proceed)
        a.status = 200
        b.status = 200
        #expect(vm.onResponse(1, a) == .proceed)
        #expect(vm.onResponse(1, b) == .proceed)
        let seenA = a.responseHeaders.first { $0.name == "x-seen" }?.value
        let seenB = b.responseHeaders.first { $0.name == "x-seen" }?.value ?? ""
        #expect(seenA == "A/-")
        #expect(seenB.hasPrefix("B/false:") && seenB.contains("outside the hook"), "\(seenB)")
    }
}
