import Foundation
import Testing

@testable import TandemLua

/// The documented API (PolicyAPI, which generates the LuaLS definitions) against the engine.
@Suite struct PolicyAPITests {
    /// Every function and value in the `tandem` module is documented, and every documented one
    /// exists.
    @Test func theTandemModuleMatchesItsDefinitions() throws {
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "walk.lua",
            source: """
                local out = {}
                local function walk(t, prefix)
                  for k, v in pairs(t) do
                    local p = prefix .. "." .. k
                    if type(v) == "table" and k ~= "null" and k ~= "shared" then walk(v, p) else out[#out + 1] = p end
                  end
                end
                return { name = "walk", on_request = function()
                  walk(tandem, "tandem")
                  table.sort(out)
                  return tandem.respond(200, table.concat(out, "\\n"))
                end }
                """)
        guard case .decision(let d) = vm.onRequest(1, request()) else { Issue.record("no answer"); return }
        let actual = Set(String(decoding: d.body, as: UTF8.self).split(separator: "\n").map(String.init))
        let documented = Set(PolicyAPI.entries.map(\.path).filter { $0.hasPrefix("tandem.") })
        #expect(actual.subtracting(documented).isEmpty, "undocumented: \(actual.subtracting(documented).sorted())")
        #expect(
            documented.subtracting(actual).isEmpty, "documented but missing: \(documented.subtracting(actual).sorted())"
        )
    }

    /// Every documented method of the request, response, transaction, dict and metric objects
    /// is a function on the real object.
    @Test func everyDocumentedMethodExists() throws {
        var checks: [String] = []
        for e in PolicyAPI.entries where e.path.contains(":") {
            let parts = e.path.split(separator: ":")
            let object: String
            switch parts[0] {
            case "Request": object = "req"
            case "Response": object = "res"
            case "Transaction": object = "txn"
            case "SharedDict": object = "tandem.shared.d"
            case "Metric": object = "m"
            default: Issue.record("unknown class in \(e.path)"); continue
            }
            checks.append("if type(\(object).\(parts[1])) ~= 'function' then missing[#missing + 1] = '\(e.path)' end")
        }
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "methods.lua",
            source: """
                local m
                local missing = {}
                return { name = "methods", shared = { d = { capacity = 1 } },
                  init = function() m = tandem.metrics.counter("x") end,
                  on_request = function() end,
                  on_response = function(res)
                    local req, txn = res.request, res
                    \(checks.joined(separator: "\n"))
                    return tandem.respond(200, table.concat(missing, ","))
                  end }
                """)
        let ex = request()
        _ = vm.onRequest(1, ex)
        ex.status = 200
        guard case .decision(let d) = vm.onResponse(1, ex) else { Issue.record("no answer"); return }
        #expect(String(decoding: d.body, as: UTF8.self) == "", "missing methods")
        #expect(checks.count >= 30)
    }

    /// (policies/tandem.d.lua, which adds the config file's classes, is checked in
    /// TandemSidecarTests' ConfigSchemaTests.)
    @Test func theCheckedInDefinitionFileStartsWithThePolicyAPI() throws {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../policies/tandem.d.lua").standardized
        let text = try String(contentsOf: file, encoding: .utf8)
        #expect(text.hasPrefix(PolicyAPI.luaLSDefinitions()), "run: make docs")
    }

    @Test func theLuaAPIReferenceIsCurrent() throws {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../docs/lua-api.md").standardized
        let text = try String(contentsOf: file, encoding: .utf8)
        #expect(text == PolicyAPI.markdownReference(), "run: .build/debug/tandem docs lua > docs/lua-api.md")
    }
}
