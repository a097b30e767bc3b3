import ArgumentParser
import Foundation
import TandemConfig
import TandemLua

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Author Lua policies offline: check, run once, run their cases, emit editor definitions.",
        subcommands: [PolicyCheck.self, PolicyRun.self, PolicyTest.self, PolicyDefs.self])
}

struct PolicyCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Compile policies in the sandbox and check their shape and config schemas.",
        discussion: "With a cases file next to a policy (NAME.cases.lua), its configs are validated too.")

    @Argument(help: "Policy files or directories.") var paths: [String]

    func run() throws {
        var failed = 0
        for path in paths {
            let files: [String]
            do { files = try PolicyTesting.policyFiles(path) } catch {
                print("\(error)")
                failed += 1
                continue
            }
            for file in files {
                do {
                    let source = try readPolicy(file)
                    let vm = try PolicyVM(services: offlineServices(), seed: 1)
                    let name = try vm.check(file: file, source: source)
                    // Configs the cases use must satisfy the schema.
                    let cases = PolicyTesting.casesFile(for: file)
                    if let text = try? String(contentsOfFile: cases, encoding: .utf8) {
                        let spec = try LuaConfig.evaluate(source: text, chunkName: cases)
                        try vm.load(id: 1, file: file, source: source, config: spec["config"], path: "\(cases): config")
                    }
                    print("ok    \(file) (\(name))")
                } catch {
                    print("FAIL  \(file): \(describe(error))")
                    failed += 1
                }
            }
        }
        if failed > 0 { throw ExitCode(1) }
    }
}

struct PolicyRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a policy's hooks once on the real engine and print the decision as JSON.",
        discussion: """
            on_request runs first; without a decision and with --status, on_response runs on that
            answer; then on_log. Exit 0 for a decision (including "continue"), 1 for a policy error.
            """)

    @Argument(help: "The policy file.") var file: String
    @Option(help: "The policy's config, as JSON.") var args: String?
    @Option(help: "Request method.") var method = "GET"
    @Option(help: "Request path, with an optional ?query.") var path = "/"
    @Option(name: .customLong("header"), help: "A request header 'Name: value' (repeatable).") var headers: [String] =
        []
    @Option(help: "Request body (given to req:body()).") var body: String?
    @Option(help: "The verified calling service.") var caller: String?
    @Option(help: "Verified end-user claims, as a JSON object.") var claims: String?
    @Option(help: "Run on_response with this status (the upstream's answer).") var status: Int?
    @Option(name: .customLong("response-header"), help: "A response header 'Name: value' (repeatable).")
    var responseHeaders: [String] = []

    func run() throws {
        let source = try readPolicy(file)
        let vm = try PolicyVM(services: offlineServices(), seed: 1)
        let config = try args.map { try luaValue(json: $0, what: "--args") }
        do {
            try vm.load(id: 1, file: file, source: source, config: config, path: "--args")
        } catch {
            emit(["error": ["reason": error.reason.rawValue, "message": error.message]])
            throw ExitCode(1)
        }
        let parts = path.split(separator: "?", maxSplits: 1)
        let ex = PolicyExchange(
            method: method, path: String(parts.first ?? "/"), query: parts.count > 1 ? String(parts[1]) : "",
            remoteAddress: "127.0.0.1:40000", route: "cli", side: "inbound", headers: try headers.map(parseHeader),
            requestID: "cli-request")
        ex.caller = caller
        ex.body = body.map { Array($0.utf8) }
        if let claims, case .table(let t) = try luaValue(json: claims, what: "--claims") {
            for (k, v) in t { if case .string(let s) = k { ex.claims[s] = v } }
        }
        var outcome = vm.onRequest(1, ex)
        var hook = "on_request"
        if case .proceed = outcome, let status {
            ex.status = status
            ex.responseHeaders = try responseHeaders.map(parseHeader)
            outcome = vm.onResponse(1, ex)
            hook = "on_response"
        }
        var out: [String: Any] = ["hook": hook]
        switch outcome {
        case .proceed:
            out["decision"] = "continue"
            out["request"] = [
                "method": ex.method, "path": ex.path, "query": ex.query,
                "headers": ex.headers.map { [$0.name, $0.value] },
            ]
            var routing: [String: Any] = [:]
            if let u = ex.upstream { routing["upstream"] = u }
            if let t = ex.timeoutMs { routing["timeout_ms"] = t }
            if let r = ex.retries { routing["retries"] = r }
            if !routing.isEmpty { out["routing"] = routing }
            if status != nil { out["response_headers"] = ex.responseHeaders.map { [$0.name, $0.value] } }
        case .decision(let d):
            out["decision"] = d.kind
            out["status"] = d.status
            out["headers"] = d.headers.map { [$0.name, $0.value] }
            out["body"] = String(decoding: d.body, as: UTF8.self)
        case .failed(let f):
            out["error"] = ["reason": f.reason.rawValue, "message": f.message]
            emit(out)
            throw ExitCode(1)
        }
        if case .failed(let f) = vm.onLog(1, ex) {
            out["error"] = ["hook": "on_log", "reason": f.reason.rawValue, "message": f.message]
            emit(out)
            throw ExitCode(1)
        }
        emit(out)
    }
}

struct PolicyTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "test",
        abstract: "Run each policy's cases (NAME.cases.lua next to NAME.lua) on the real engine, virtual clock.")

    @Argument(help: "Policy files or directories (default: policies).") var paths: [String] = ["policies"]

    func run() throws {
        var results: [PolicyTesting.CaseResult] = []
        for path in paths {
            do {
                for file in try PolicyTesting.policyFiles(path) { results += PolicyTesting.run(policyFile: file) }
            } catch {
                results.append(.init(policy: path, name: "(files)", failures: ["\(error)"]))
            }
        }
        print(PolicyTesting.table(results), terminator: "")
        if results.isEmpty || results.contains(where: { !$0.passed }) { throw ExitCode(1) }
    }
}

struct PolicyDefs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "defs",
        abstract: "Print the LuaLS definition file (---@meta): the tandem policy API and the config file's schema.")

    func run() throws { print(luaDefinitions(), terminator: "") }
}

/// policies/tandem.d.lua: the policy API, then the config file's classes.
func luaDefinitions() -> String { PolicyAPI.luaLSDefinitions() + ConfigSchema.luaLSDefinitions() }

func readPolicy(_ file: String) throws -> String {
    do { return try String(contentsOfFile: file, encoding: .utf8) } catch {
        throw ValidationError("cannot read \(file): \(error.localizedDescription)")
    }
}

func offlineServices() -> PolicyServices {
    PolicyServices(
        clock: { Int64(Date().timeIntervalSince1970 * 1000) },
        sink: { line in
            FileHandle.standardError.write(
                Data("[\(line.level.name)] \(line.policy): \(line.message) \(line.fieldsJSON ?? "")\n".utf8))
        })
}

func parseHeader(_ s: String) throws -> (name: String, value: String) {
    guard let c = s.firstIndex(of: ":"), c != s.startIndex else {
        throw ValidationError("a header is 'Name: value', got '\(s)'")
    }
    return (
        String(s[..<c]).trimmingCharacters(in: .whitespaces),
        String(s[s.index(after: c)...]).trimmingCharacters(in: .whitespaces)
    )
}

func luaValue(json: String, what: String) throws -> LuaValue {
    do { return try JSONDecoder().decode(JSONLua.self, from: Data(json.utf8)).value } catch {
        throw ValidationError("\(what): not valid JSON")
    }
}

/// JSON as a LuaValue (arrays become sequences); JSONDecoder keeps booleans and numbers apart.
struct JSONLua: Decodable {
    var value: LuaValue
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            value = .nil
        } else if let b = try? c.decode(Bool.self) {
            value = .bool(b)
        } else if let d = try? c.decode(Double.self) {
            value = .number(d)
        } else if let s = try? c.decode(String.self) {
            value = .string(s)
        } else if let l = try? c.decode([JSONLua].self) {
            var t: [LuaKey: LuaValue] = [:]
            for (i, v) in l.enumerated() { t[.index(i + 1)] = v.value }
            value = .table(t)
        } else {
            let d = try c.decode([String: JSONLua].self)
            var t: [LuaKey: LuaValue] = [:]
            for (k, v) in d { t[.string(k)] = v.value }
            value = .table(t)
        }
    }
}

func describe(_ error: any Error) -> String {
    if let f = error as? PolicyFailure { return "\(f.reason.rawValue): \(f.message)" }
    if let e = error as? LuaConfigError { return e.message }
    return "\(error)"
}

func emit(_ object: [String: Any]) {
    let data =
        (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]))
        ?? Data("{}".utf8)
    print(String(decoding: data, as: UTF8.self))
}
