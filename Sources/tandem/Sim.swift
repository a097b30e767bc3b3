import ArgumentParser
import Foundation
import TandemSimulation

struct Sim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sim",
        abstract: "Run a mesh scenario (a Lua file) on virtual time, deterministically, and check it.",
        discussion: """
            The scenario names services, their instances and behaviour, the sidecar config each
            one runs (the same files `tandem run --config` reads), the load, a timeline of faults
            and what must hold (docs/simulation.md). The real traffic cores and Lua policies run
            on a simulated clock and network; one seed decides every random choice, so a seed
            replays the same run, bit for bit (the trace hash says so). A violated expectation
            exits 1 and prints the seed and the command that replays it.
            """)

    @Argument(help: "Scenario file (Lua).") var file: String
    @Option(help: "Seed to run (default 1).") var seed: UInt64?
    @Option(help: "Inclusive range of seeds, e.g. 1..20: one line per seed, then a summary.") var seeds: String?
    @Flag(help: "Print the report as JSON (one object per seed).") var json = false
    @Option(help: "Print the first N trace lines (faults, ejections, breaker trips).") var trace = 0

    func validate() throws {
        if seed != nil && seeds != nil { throw ValidationError("give --seed or --seeds, not both") }
        if let s = seeds, SeedRange.parse(s) == nil {
            throw ValidationError("--seeds takes A..B with A ≤ B, got '\(s)'")
        }
    }

    func run() throws {
        guard let source = try? String(contentsOfFile: file, encoding: .utf8) else {
            FileHandle.standardError.write(Data("tandem sim: cannot read scenario file \(file)\n".utf8))
            throw ExitCode(2)
        }
        let scenario: MeshScenario
        do {
            scenario = try ScenarioFile.load(
                source: source, file: file, environment: ProcessInfo.processInfo.environment,
                readFile: { try? String(contentsOfFile: $0, encoding: .utf8) })
        } catch {
            FileHandle.standardError.write(Data("tandem sim: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let range = seeds.flatMap(SeedRange.parse) ?? (seed ?? 1)...(seed ?? 1)
        var failed: [UInt64] = []
        for s in range {
            var o = MeshSimulation.Options(seed: s)
            o.traceLines = trace
            let started = DispatchTime.now().uptimeNanoseconds
            let r = MeshSimulation.run(scenario, options: o)
            let wallMs = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e6
            if !r.passed { failed.append(s) }
            let replay = "tandem sim \(file) --seed \(s)"
            if json {
                print(r.json)
            } else if range.count == 1 {
                print(r.text(replay: replay), terminator: "")
                print("(\(r.totalRequests) requests in \(Int(wallMs)) ms of wall time)")
            } else {
                let verdict = r.passed ? "ok" : "FAIL: " + r.violations.joined(separator: "; ")
                print("seed \(s): trace \(r.hashHex), \(r.totalRequests) requests, \(Int(wallMs)) ms — \(verdict)")
                if !r.passed { print("  replay: \(replay)") }
            }
        }
        if range.count > 1 && !json {
            print("\(range.count - failed.count)/\(range.count) seeds passed")
        }
        if !failed.isEmpty { throw ExitCode(1) }
    }
}

enum SeedRange {
    static func parse(_ s: String) -> ClosedRange<UInt64>? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: true)
        guard s.contains(".."), parts.count == 2, let a = UInt64(parts[0]), let b = UInt64(parts[1]), a <= b else {
            return nil
        }
        return a...b
    }
}
