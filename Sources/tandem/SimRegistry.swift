import ArgumentParser
import TandemSimulation

struct SimRegistry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sim-registry",
        abstract: "Run the registry (Raft + MVCC store + WAL) in the deterministic simulator.",
        discussion: """
            Runs real TandemRaft, TandemStore and TandemStorage code on virtual time with a
            seeded network (delay, loss, duplication, reordering, partitions), crashes that
            lose unsynced writes, and clients whose history is checked for linearizability.
            A failing seed is printed with the command that replays it.
            """)

    @Option(help: "Seed to run.") var seed: UInt64?
    @Option(help: "Inclusive range of seeds, e.g. 1..500.") var seeds: String?
    @Option(help: "Registry members (1, 3 or 5).") var nodes = 3
    @Option(help: "Milliseconds of faults and load (virtual time).") var durationMs: UInt64 = 3_000
    @Flag(help: "No random faults; crash the leader once (the demo scenario).") var leaderCrash = false
    @Flag(help: "Print one line per seed.") var verbose = false
    @Flag(help: "No membership churn or leadership transfers.") var noMembershipChanges = false
    @Flag(help: "Print the event log of the run (with --seed).") var trace = false

    func validate() throws {
        if seed != nil && seeds != nil { throw ValidationError("give --seed or --seeds, not both") }
        if let s = seeds, parseRange(s) == nil { throw ValidationError("--seeds takes A..B with A ≤ B, got '\(s)'") }
        if ![1, 3, 5, 7].contains(nodes) { throw ValidationError("--nodes must be 1, 3, 5 or 7") }
    }

    func parseRange(_ s: String) -> ClosedRange<UInt64>? { SeedRange.parse(s) }

    func options(_ seed: UInt64) -> RegistrySimulation.Options {
        var o = RegistrySimulation.Options(seed: seed)
        o.nodes = nodes
        o.durationMs = durationMs
        o.membershipChanges = !noMembershipChanges
        o.recordTrace = trace
        if leaderCrash {
            o.randomFaults = false
            o.lossRate = 0
            o.duplicateRate = 0
            o.timeline = [.crashLeader(atMs: durationMs / 3, downMs: durationMs / 3)]
        }
        return o
    }

    func run() throws {
        let range = seeds.flatMap(parseRange) ?? (seed ?? 1)...(seed ?? 1)
        var failed: [UInt64] = []
        var totals = (ok: 0, unknown: 0, crashes: 0, partitions: 0, snaps: 0, torn: 0)
        for s in range {
            let r = RegistrySimulation.run(options(s))
            totals.ok += r.opsOK
            totals.unknown += r.opsUnknown
            totals.crashes += r.crashes
            totals.partitions += r.partitions
            totals.snaps += r.snapshotsInstalled
            totals.torn += r.tornTailsTruncated
            if trace { for line in r.traceLines { print(line) } }
            if range.count == 1 {
                print(Self.describe(r))
            } else if verbose || !r.passed {
                print(
                    "seed \(s): \(r.passed ? "ok" : "FAILED") trace=\(hex(r.traceHash)) ops=\(r.opsOK) "
                        + "unknown=\(r.opsUnknown) crashes=\(r.crashes) commit=\(r.maxCommitIndex)")
            }
            if !r.passed {
                failed.append(s)
                for v in r.violations { print("  violation: \(v)") }
                print("  replay: \(options(s).replayCommand)")
            }
        }
        if range.count > 1 {
            print(
                "\(range.count) seeds, \(range.count - failed.count) passed, \(failed.count) failed "
                    + "(\(totals.ok) client ops checked, \(totals.unknown) indeterminate, \(totals.crashes) crashes, "
                    + "\(totals.partitions) partitions, \(totals.snaps) snapshots installed, "
                    + "\(totals.torn) torn WAL tails truncated)")
        }
        if !failed.isEmpty { throw ExitCode(1) }
    }

    static func describe(_ r: RegistrySimulation.Report) -> String {
        var lines = [
            "registry simulation: seed \(r.seed), \(r.nodes) nodes, \(r.virtualMs) ms virtual, \(r.events) events",
            "  trace hash        \(hex(r.traceHash))",
            "  client ops        \(r.opsOK) ok (\(r.writesAcked) writes, \(r.readsServed) linearizable reads), "
                + "\(r.opsFailed) refused, \(r.opsUnknown) indeterminate",
            "  faults            \(n(r.crashes, "crash", "crashes")), \(n(r.partitions, "partition")), "
                + "\(n(r.pauses, "process pause")), \(n(r.tornTailsTruncated, "torn WAL tail")) truncated on recovery",
            "  raft              \(r.termsWithLeader) terms with a leader, commit index \(r.maxCommitIndex), "
                + "\(n(r.snapshotsInstalled, "snapshot")) installed",
            "  membership        \(n(r.membersReplaced, "voter")) replaced, \(n(r.leadershipTransfers, "leadership transfer"))",
        ]
        if !r.failoverMs.isEmpty {
            lines.append(
                "  failover          new leader \(r.failoverMs.map { "\($0) ms" }.joined(separator: ", ")) after the leader crashed"
            )
        }
        lines.append(
            "  final reads       \(r.finalReads) of \(RegistrySimulation.Options(seed: r.seed).keys) keys after healing"
                + (r.passed ? " (every acknowledged write still there)" : ""))
        lines.append(
            "  checkers          election safety, log matching, leader completeness, state machine safety, "
                + "linearizability: \(r.passed ? "all passed" : "\(r.violations.count) VIOLATIONS")")
        return lines.joined(separator: "\n")
    }
}

/// "1 crash", "2 crashes".
func n(_ count: Int, _ one: String, _ many: String? = nil) -> String {
    "\(count) " + (count == 1 ? one : (many ?? one + "s"))
}

func hex(_ v: UInt64) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 16 - s.count) + s
}
