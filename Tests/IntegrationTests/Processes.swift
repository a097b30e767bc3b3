import Foundation
import Testing

/// The `tandem` binary built next to this test bundle.
func tandemBinary() -> String {
    let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    return bundle.appendingPathComponent("tandem").path
}

/// A fresh temporary directory, removed at deinit.
final class TempDirectory {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("tandem-it-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: url) }
}

/// A child process whose stdout is read line by line; killed by PID at deinit.
final class Child {
    let process = Process()
    private let out = Pipe()
    private let input = Pipe()
    private var pending = Data()

    init(_ executable: String, _ args: [String], environment: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        process.standardOutput = out
        process.standardError = out
        process.standardInput = input
        try process.run()
    }

    /// Blocks until the next line (nil at end of output).
    func readLine() -> String? {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[pending.startIndex..<nl], as: UTF8.self)
                pending = Data(pending[(nl + 1)...])
                return line
            }
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty {
                if pending.isEmpty { return nil }
                defer { pending = Data() }
                return String(decoding: pending, as: UTF8.self)
            }
            pending.append(chunk)
        }
    }

    /// Reads lines until one satisfies `match`; returns every line read.
    /// A hang guard, not a timing assertion: if no line matches within `giveUpAfter` seconds the
    /// child is killed, its output ends and the caller's check fails instead of blocking the run.
    func readUntil(giveUpAfter seconds: Double = 120, _ match: (String) -> Bool) -> [String] {
        let pid = process.processIdentifier
        let guardKill = DispatchWorkItem { kill(pid, SIGKILL) }
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: guardKill)
        defer { guardKill.cancel() }
        var lines: [String] = []
        while let l = readLine() {
            lines.append(l)
            if match(l) { break }
        }
        return lines
    }

    func closeStdin() { try? input.fileHandleForWriting.close() }

    /// Writes a line to the child's stdin.
    func send(_ line: String) { input.fileHandleForWriting.write(Data((line + "\n").utf8)) }

    func stop() {
        guard process.isRunning else { return }
        let pid = process.processIdentifier
        kill(pid, SIGKILL)
        // Reap it here rather than in `waitUntilExit`: when two children die at once their
        // SIGCHLDs coalesce, Foundation can miss one, and waitUntilExit then waits forever on a
        // zombie (seen: a test run hung in this deinit). waitpid on our own child returns once
        // it is dead, or at once (ECHILD) if Foundation already reaped it.
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
    }

    deinit { stop() }
}

/// A registry under test: one member (`members: 1`) or a 3-member cluster, on ephemeral
/// ports with its own data directories. `endpoint` lists every member (etcdctl balances).
final class RegistryUnderTest {
    let dir: TempDirectory
    let child: Child?
    let cluster: ClusterUnderTest?
    let endpoint: String

    init(members: Int, extra: [String] = []) throws {
        if members > 1 {
            let c = try ClusterUnderTest(members: members, extra: extra)
            _ = try c.leader()
            cluster = c
            dir = c.dir
            child = nil
            endpoint = c.endpoints
            return
        }
        cluster = nil
        let dir = try TempDirectory()
        self.dir = dir
        let child = try Child(
            tandemBinary(),
            ["registry", "--data-dir", dir.url.path, "--listen-client-urls", "http://127.0.0.1:0"] + extra)
        self.child = child
        let lines = child.readUntil { $0.contains("serving clients on") }
        guard let last = lines.last, let port = last.split(separator: ":").last, Int(port) != nil else {
            throw TestFailure("registry did not start: \(lines)")
        }
        endpoint = "127.0.0.1:\(port)"
        if extra.contains("--join-token-file") {
            // Tokens are issued once the signing key (and before it the mesh settings) is committed.
            let more = child.readUntil { $0.contains("identity: signing key") && $0.contains("published") }
            guard more.last?.contains("published") == true else { throw TestFailure("no signing key: \(more)") }
        }
    }

    convenience init() throws { try self.init(members: 1) }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Runs etcdctl (v3 API) against `endpoint`; returns exit status and combined output.
@discardableResult
func etcdctl(_ endpoint: String, _ args: [String], stdin: String? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/etcdctl")
    p.arguments = ["--endpoints", endpoint] + args
    p.environment = ["ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"]
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    let inPipe = Pipe()
    p.standardInput = inPipe
    try p.run()
    if let stdin { inPipe.fileHandleForWriting.write(Data(stdin.utf8)) }
    try inPipe.fileHandleForWriting.close()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// An etcdctl that keeps running (watch, lock, elect, keep-alive).
func etcdctlChild(_ endpoint: String, _ args: [String]) throws -> Child {
    try Child("/usr/bin/etcdctl", ["--endpoints", endpoint] + args)
}
