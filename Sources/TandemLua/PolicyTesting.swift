import Foundation
import Synchronization

/// `tandem policy test`: runs a policy's cases (a Lua file next to it, `NAME.cases.lua`) on
/// the real engine with a virtual clock, so rate limits and TTLs are testable offline.
///
/// A cases file returns `{ config = {...}, cases = { {...}, ... } }`; each case has `name`,
/// optional `config` (overrides), `advance_ms` (virtual time before it), `repeat` (run the
/// request n times; expectations apply to the last), `request`
/// (`method, path, query, headers, body, remote_addr, caller, claims, params, route, side`),
/// optional `response` (`status, headers, reason, body`: the upstream's or the sidecar's
/// answer, given to `on_response`) and `expect`:
/// `decision` (continue | respond | deny | redirect | error), `status`, `body`, `body_contains`,
/// `headers` (of the decision, or of the response after on_response), `request_headers`
/// (after on_request; `false` = absent), `path`, `query`, `method`, `upstream`, `timeout_ms`,
/// `retries`, `error` (a substring of the failure), `logs` (substrings, in order; `{}`: none), `metrics`
/// (substrings of /metrics lines).
public enum PolicyTesting {
    public struct CaseResult: Sendable, Equatable {
        public var policy: String
        public var name: String
        public var failures: [String]
        public var passed: Bool { failures.isEmpty }
        public init(policy: String, name: String, failures: [String]) {
            self.policy = policy
            self.name = name
            self.failures = failures
        }
    }

    public struct FileError: Error, CustomStringConvertible {
        public var description: String
    }

    /// The cases file for a policy file: `x.lua` → `x.cases.lua`.
    public static func casesFile(for policy: String) -> String {
        (policy.hasSuffix(".lua") ? String(policy.dropLast(4)) : policy) + ".cases.lua"
    }

    /// Policy files under `path` (a file, or every `*.lua` in a directory tree except cases files
    /// and `*.d.lua` definitions).
    public static func policyFiles(_ path: String) throws(FileError) -> [String] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw FileError(description: "\(path): no such file or directory")
        }
        if !isDir.boolValue { return [path] }
        let files = (FileManager.default.enumerator(atPath: path)?.allObjects as? [String]) ?? []
        return files.filter { $0.hasSuffix(".lua") && !$0.hasSuffix(".cases.lua") && !$0.hasSuffix(".d.lua") }
            .sorted().map { (path as NSString).appendingPathComponent($0) }
    }

    /// Runs every case of one policy file. A missing cases file, or one that does not load, is
    /// one failing result.
    public static func run(policyFile: String, limits: PolicyLimits = PolicyLimits()) -> [CaseResult] {
        let display = policyFile
        guard let source = try? String(contentsOfFile: policyFile, encoding: .utf8) else {
            return [CaseResult(policy: display, name: "(load)", failures: ["cannot read \(policyFile)"])]
        }
        let casesPath = casesFile(for: policyFile)
        guard let casesSource = try? String(contentsOfFile: casesPath, encoding: .utf8) else {
            return [CaseResult(policy: display, name: "(cases)", failures: ["no cases file \(casesPath)"])]
        }
        let spec: LuaValue
        do {
            spec = try LuaConfig.evaluate(source: casesSource, chunkName: casesPath)
        } catch {
            return [CaseResult(policy: display, name: "(cases)", failures: [error.message])]
        }
        guard let cases = spec["cases"]?.array, !cases.isEmpty else {
            return [CaseResult(policy: display, name: "(cases)", failures: ["\(casesPath): cases: expected a list"])]
        }
        let clock = VirtualClock()
        let logs = Mutex<[PolicyLogLine]>([])
        let services = PolicyServices(clock: { clock.now }, sink: { l in logs.withLock { $0.append(l) } })
        let vm: PolicyVM
        do {
            vm = try PolicyVM(limits: limits, services: services, seed: 1)
        } catch {
            return [CaseResult(policy: display, name: "(vm)", failures: [error.description])]
        }
        var results: [CaseResult] = []
        var loadedConfig: LuaValue?
        var policyName = display
        for (i, c) in cases.enumerated() {
            let name = c["name"]?.stringValue ?? "case \(i + 1)"
            var failures: [String] = []
            let config = merge(spec["config"], c["config"])
            if loadedConfig != config {
                do {
                    policyName = try vm.load(
                        id: 1, file: policyFile, source: source, config: config, path: "\(casesPath): config")
                    loadedConfig = config
                } catch {
                    if let want = c["expect"]?["error"]?.stringValue, error.message.contains(want) {
                        results.append(CaseResult(policy: policyName, name: name, failures: []))
                    } else {
                        results.append(CaseResult(policy: policyName, name: name, failures: ["load: \(error.message)"]))
                    }
                    loadedConfig = nil
                    continue
                }
            }
            clock.advance(Int64(c["advance_ms"]?.numberValue ?? 0))
            let times = max(1, Int(c["repeat"]?.numberValue ?? 1))
            let logsBefore = logs.withLock { $0.count }
            var outcome = PolicyOutcome.proceed
            var ex = exchange(c["request"] ?? .table([:]))
            for _ in 0..<times {
                ex = exchange(c["request"] ?? .table([:]))
                outcome = runExchange(vm, ex, response: c["response"])
            }
            let expect = c["expect"] ?? .table([:])
            check(expect, outcome, ex, &failures)
            let newLogs = logs.withLock { Array($0.dropFirst(logsBefore)) }
            if let wanted = expect["logs"]?.array {
                if wanted.isEmpty && !newLogs.isEmpty {  // `logs = {}`: no line at all
                    failures.append("logs: expected none, got \(newLogs.map { $0.message })")
                }
                var rest = newLogs[...]
                for w in wanted.compactMap(\.stringValue) {
                    guard
                        let j = rest.firstIndex(where: {
                            "\($0.level.name) \($0.message) \($0.fieldsJSON ?? "")".contains(w)
                        })
                    else {
                        failures.append("logs: no line containing \"\(w)\" (got \(newLogs.map { $0.message }))")
                        break
                    }
                    rest = rest[(j + 1)...]
                }
            }
            if let wanted = expect["metrics"]?.array {
                let text = services.prometheus()
                for w in wanted.compactMap(\.stringValue) where !text.contains(w) {
                    failures.append("metrics: no line containing \"\(w)\"")
                }
            }
            results.append(CaseResult(policy: policyName, name: name, failures: failures))
        }
        return results
    }

    /// on_request, then (without a decision and with a `response`) on_response, then on_log.
    static func runExchange(_ vm: PolicyVM, _ ex: PolicyExchange, response: LuaValue?) -> PolicyOutcome {
        defer { vm.end(ex) }
        var outcome = vm.onRequest(1, ex)
        if case .proceed = outcome, let r = response {
            ex.status = Int(r["status"]?.numberValue ?? 200)
            ex.reason = r["reason"]?.stringValue
            ex.responseHeaders = headers(r["headers"])
            ex.responseBody = r["body"]?.stringValue.map { Array($0.utf8) }
            ex.durationMs = r["duration_ms"]?.numberValue ?? 0
            ex.upstreamEndpoint = r["upstream"]?.stringValue
            ex.attempts = Int(r["attempts"]?.numberValue ?? 1)
            outcome = vm.onResponse(1, ex)
        } else if case .decision(let d) = outcome {
            ex.status = d.status
        }
        if case .failed = outcome { return outcome }
        _ = vm.onLog(1, ex)
        return outcome
    }

    static func exchange(_ r: LuaValue) -> PolicyExchange {
        let ex = PolicyExchange(
            method: r["method"]?.stringValue ?? "GET", path: r["path"]?.stringValue ?? "/",
            query: r["query"]?.stringValue ?? "", authority: r["authority"]?.stringValue ?? "",
            remoteAddress: r["remote_addr"]?.stringValue ?? "127.0.0.1:40000",
            route: r["route"]?.stringValue ?? "test", side: r["side"]?.stringValue ?? "inbound",
            headers: headers(r["headers"]), requestID: r["id"]?.stringValue ?? "test-request")
        ex.caller = r["caller"]?.stringValue
        ex.body = r["body"]?.stringValue.map { Array($0.utf8) }
        if case .table(let t)? = r["claims"] {
            for (k, v) in t { if case .string(let s) = k { ex.claims[s] = v } }
        }
        if case .table(let t)? = r["params"] {
            for (k, v) in t { if case .string(let s) = k, let v = v.stringValue { ex.params[s] = v } }
        }
        return ex
    }

    /// `{ ["x-a"] = "1", ["x-b"] = { "1", "2" } }` → pairs (sorted by name for repeatability).
    static func headers(_ v: LuaValue?) -> [(name: String, value: String)] {
        guard case .table(let t)? = v else { return [] }
        var out: [(name: String, value: String)] = []
        for (k, value) in t.sorted(by: { $0.key.description < $1.key.description }) {
            if let list = value.array, case .table = value {
                for item in list { out.append((k.description, item.stringValue ?? "")) }
            } else {
                out.append((k.description, value.stringValue ?? ""))
            }
        }
        return out
    }

    static func merge(_ base: LuaValue?, _ over: LuaValue?) -> LuaValue {
        guard case .table(var t) = base ?? .table([:]) else { return over ?? .table([:]) }
        if case .table(let o)? = over { for (k, v) in o { t[k] = v } }
        return .table(t)
    }

    static func check(_ e: LuaValue, _ outcome: PolicyOutcome, _ ex: PolicyExchange, _ failures: inout [String]) {
        let got: String
        switch outcome {
        case .proceed: got = "continue"
        case .decision(let d): got = d.kind
        case .failed: got = "error"
        }
        let want = e["decision"]?.stringValue ?? (e["error"] != nil ? "error" : nil)
        if let want, want != got {
            var detail = ""
            if case .failed(let f) = outcome { detail = " (\(f.reason.rawValue): \(f.message))" }
            if case .decision(let d) = outcome { detail = " (status \(d.status))" }
            failures.append("decision: expected \(want), got \(got)\(detail)")
        }
        if case .failed(let f) = outcome {
            if let w = e["error"]?.stringValue, !f.message.contains(w) && f.reason.rawValue != w {
                failures.append("error: expected \"\(w)\" in \"\(f.message)\"")
            }
            if want == nil { failures.append("unexpected error: \(f.reason.rawValue): \(f.message)") }
        }
        var decisionHeaders: [(name: String, value: String)] = ex.responseHeaders
        var status = ex.status
        var body = ex.responseBody ?? []
        if case .decision(let d) = outcome {
            decisionHeaders = d.headers
            status = d.status
            body = d.body
        }
        if let s = e["status"]?.numberValue, Int(s) != status {
            failures.append("status: expected \(Int(s)), got \(status)")
        }
        let text = String(decoding: body, as: UTF8.self)
        if let b = e["body"]?.stringValue, b != text {
            failures.append("body: expected \(b.debugDescription), got \(text.debugDescription)")
        }
        if let b = e["body_contains"]?.stringValue, !text.contains(b) {
            failures.append("body: expected it to contain \(b.debugDescription), got \(text.debugDescription)")
        }
        compareHeaders("headers", e["headers"], decisionHeaders, &failures)
        compareHeaders("request_headers", e["request_headers"], ex.headers, &failures)
        for (key, actual) in [
            ("path", ex.path), ("query", ex.query), ("method", ex.method), ("upstream", ex.upstream ?? ""),
        ] {
            if let w = e[key]?.stringValue, w != actual {
                failures.append("\(key): expected \(w.debugDescription), got \(actual.debugDescription)")
            }
        }
        if case .table(let t)? = e["subset"] {  // exactly these pairs ({} : no subset chosen)
            var want: [String: String] = [:]
            for (k, v) in t { want[k.description] = v.stringValue ?? "" }
            let got = ex.subset ?? [:]
            if want != got {
                let show = { (d: [String: String]) in
                    "{" + d.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ", ") + "}"
                }
                failures.append("subset: expected \(show(want)), got \(show(got))")
            }
        }
        if let w = e["timeout_ms"]?.numberValue, Int(w) != ex.timeoutMs {
            failures.append("timeout_ms: expected \(Int(w)), got \(ex.timeoutMs.map(String.init) ?? "none")")
        }
        if let w = e["retries"]?.numberValue, Int(w) != ex.retries {
            failures.append("retries: expected \(Int(w)), got \(ex.retries.map(String.init) ?? "none")")
        }
    }

    static func compareHeaders(
        _ label: String, _ want: LuaValue?, _ got: [(name: String, value: String)], _ failures: inout [String]
    ) {
        guard case .table(let t)? = want else { return }
        for (k, v) in t {
            let name = k.description.lowercased()
            let actual = got.first { $0.name.lowercased() == name }?.value
            if case .bool(false) = v {
                if let actual { failures.append("\(label).\(name): expected absent, got \(actual.debugDescription)") }
            } else if case .bool(true) = v {
                if actual == nil { failures.append("\(label).\(name): expected present") }
            } else if let w = v.stringValue, w != actual {
                failures.append(
                    "\(label).\(name): expected \(w.debugDescription), got \(actual?.debugDescription ?? "absent")")
            }
        }
    }

    /// The pass/fail table `tandem policy test` prints.
    public static func table(_ results: [CaseResult]) -> String {
        let w = min(28, results.map(\.policy.count).max() ?? 6)
        var out = "POLICY".padding(toLength: w, withPad: " ", startingAt: 0) + "  RESULT  CASE\n"
        for r in results {
            out += String(r.policy.prefix(w)).padding(toLength: w, withPad: " ", startingAt: 0)
            out += r.passed ? "  pass    " : "  FAIL    "
            out += r.name + "\n"
            for f in r.failures { out += String(repeating: " ", count: w + 10) + "- " + f + "\n" }
        }
        let failed = results.filter { !$0.passed }.count
        out += "\(results.count - failed) passed, \(failed) failed\n"
        return out
    }
}

/// Epoch ms that only moves when told (the start is fixed so runs repeat exactly).
final class VirtualClock: Sendable {
    private let ms = Mutex<Int64>(1_767_225_600_000)  // 2026-01-01T00:00:00Z
    func advance(_ d: Int64) { ms.withLock { $0 += max(0, d) } }
    var now: Int64 { ms.withLock { $0 } }
}

extension LuaValue {
    public var stringValue: String? {
        switch self {
        case .string(let s): return s
        case .number(let d): return format(d)
        case .bool(let b): return b ? "true" : "false"
        default: return nil
        }
    }
    public var numberValue: Double? {
        switch self {
        case .number(let d): return d
        case .string(let s): return Double(s)
        default: return nil
        }
    }
}

extension Error {
    var message: String {
        if let e = self as? LuaConfigError { return e.message }
        if let e = self as? PolicyFailure { return e.message }
        return "\(self)"
    }
}
