import Foundation
import Testing

@testable import TandemLua

/// `tandem policy test`'s runner: it must fail when a case fails, when cases are missing, and
/// run time-dependent policies on its virtual clock.
@Suite struct PolicyTestingTests {
    func write(_ files: [String: String]) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("policy-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for (name, text) in files {
            try text.write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
        }
        return dir.path
    }

    @Test func aWrongExpectationFailsWithWhatDiffered() throws {
        let dir = try write([
            "deny.lua": #"return { name = "deny", on_request = function() return tandem.deny(403, "no") end }"#,
            "deny.cases.lua": """
            return { cases = {
              { name = "right", request = {}, expect = { decision = "deny", status = 403 } },
              { name = "wrong", request = {}, expect = { decision = "continue", headers = { ["x-a"] = "1" } } },
            } }
            """,
        ])
        let results = PolicyTesting.run(policyFile: dir + "/deny.lua")
        let passed = results.map(\.passed)
        #expect(passed == [true, false])
        #expect(
            results[1].failures == [
                "decision: expected continue, got deny (status 403)", "headers.x-a: expected \"1\", got absent",
            ])
        #expect(PolicyTesting.table(results).hasSuffix("1 passed, 1 failed\n"))
    }

    /// `logs = {}` means "no line at all"; it used to check nothing.
    @Test func anEmptyLogsListFailsWhenThePolicyLogs() throws {
        let dir = try write([
            "chatty.lua":
                #"return { name = "chatty", on_log = function(txn) tandem.log.info("done " .. txn.status) end }"#,
            "chatty.cases.lua": """
            return { cases = {
              { name = "silent", request = {}, response = { status = 200 }, expect = { logs = {} } },
              { name = "says", request = {}, response = { status = 200 }, expect = { logs = { "done 200" } } },
            } }
            """,
        ])
        let results = PolicyTesting.run(policyFile: dir + "/chatty.lua")
        #expect(results.map(\.passed) == [false, true])
        #expect(results[0].failures == [#"logs: expected none, got ["done 200"]"#])
    }

    @Test func aPolicyWithoutCasesFails() throws {
        let dir = try write(["lonely.lua": #"return { name = "lonely", on_request = function() end }"#])
        let files = try PolicyTesting.policyFiles(dir)
        #expect(files == [dir + "/lonely.lua"])
        let results = PolicyTesting.run(policyFile: files[0])
        #expect(results.count == 1 && !results[0].passed)
        #expect(results[0].failures[0].hasPrefix("no cases file"))
    }

    @Test func timeMovesOnlyWhenACaseSaysSo() throws {
        let dir = try write([
            "ttl.lua": """
            return { name = "ttl", shared = { seen = { capacity = 10 } },
              on_request = function(req)
                local ok = tandem.shared.seen:add(req.path, true, 5)
                if not ok then return tandem.respond(409, "seen") end
              end }
            """,
            "ttl.cases.lua": """
            return { cases = {
              { name = "first", request = { path = "/a" }, expect = { decision = "continue" } },
              { name = "again", request = { path = "/a" }, expect = { status = 409 } },
              { name = "4.9 s later", advance_ms = 4900, request = { path = "/a" }, expect = { status = 409 } },
              { name = "5 s later", advance_ms = 100, request = { path = "/a" }, expect = { decision = "continue" } },
            } }
            """,
        ])
        let results = PolicyTesting.run(policyFile: dir + "/ttl.lua")
        let table = PolicyTesting.table(results)
        #expect(results.filter { !$0.passed }.isEmpty, "\(table)")
    }
}
