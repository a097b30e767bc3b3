import Foundation
import Synchronization
import Testing

@testable import TandemLua

/// With a wall-clock limit, calls run without LuaJIT's count hook until the watchdog finds one
/// in the same call at two looks. Each test has its own watchdog without a thread and looks
/// itself, so which call gets the hook does not depend on timing.
@Suite struct PolicyWatchdogTests {
    static let benign = #"return { name = "ok", on_request = function() return tandem.respond(200, "fine") end }"#

    func watchedVM(_ watchdog: PolicyWatchdog, instructions: Int = 10_000_000) throws -> PolicyVM {
        var limits = PolicyLimits()
        limits.instructions = instructions
        limits.timeMs = 600_000  // the instruction budget stops the loops below
        let services = PolicyServices(clock: { 1_700_000_000_000 }, sink: { _ in })
        let vm = try PolicyVM(limits: limits, services: services, seed: 1, watchdog: watchdog)
        try vm.load(id: 1, file: "ok.lua", source: Self.benign)
        return vm
    }

    @Test func callsRunWithoutTheCountHookUnlessThereIsNoWallClock() throws {
        let watchdog = PolicyWatchdog(thread: false)
        let vm = try watchedVM(watchdog)
        for _ in 0..<100 {
            guard case .decision(let d) = vm.onRequest(1, request()) else {
                Issue.record("no decision")
                return
            }
            #expect(d.status == 200)
            #expect(!vm.countHookInstalled)
        }
        // The simulator's VMs (no wall clock) keep the hook for their whole life.
        var limits = PolicyLimits()
        limits.timeMs = 0
        let deterministic = try makeVM(limits: limits)
        try deterministic.load(id: 1, file: "ok.lua", source: Self.benign)
        #expect(deterministic.countHookInstalled)
        _ = deterministic.onRequest(1, request())
        #expect(deterministic.countHookInstalled)
    }

    /// Runs policy 2's on_request on another thread while this one looks, until it returns
    /// (or, if the watchdog never stops it, until a bound far above what stopping takes: a
    /// failure instead of a hang).
    func runWatched(_ vm: PolicyVM, _ watchdog: PolicyWatchdog) -> PolicyOutcome? {
        let result = Mutex<PolicyOutcome?>(nil)
        let done = Atomic<Bool>(false)
        let thread = Thread {
            let outcome = vm.onRequest(2, request())
            result.withLock { $0 = outcome }
            done.store(true, ordering: .sequentiallyConsistent)
        }
        thread.start()
        var looks = 0
        while !done.load(ordering: .sequentiallyConsistent) {
            guard looks < 50_000_000 else {
                Issue.record("the call was not stopped after \(looks) looks")
                return nil
            }
            watchdog.look()
            looks += 1
        }
        #expect(looks >= 2)
        return result.withLock { $0 }
    }

    @Test func aRunawayCallGetsTheHookAndTheNextCallsRunWithout() throws {
        let watchdog = PolicyWatchdog(thread: false)
        let vm = try watchedVM(watchdog, instructions: 2_000_000)
        for body in [
            "while true do end",
            "while true do pcall(function() while true do end end) end",
        ] {
            try vm.load(
                id: 2, file: "loop.lua",
                source: "return { name = \"loop\", on_request = function()\n\(body)\nend }")
            guard case .failed(let f) = runWatched(vm, watchdog) else {
                Issue.record("\(body): not stopped")
                return
            }
            #expect(f.reason == .instructions, "\(f)")
            #expect(f.message.contains("loop.lua:2: policy-limit: instruction budget exhausted"), "\(f.message)")
            // A look may have armed the hook as the call ended; the next call takes it off.
            guard case .decision(let d) = vm.onRequest(1, request()) else {
                Issue.record("the VM stopped serving")
                return
            }
            #expect(d.status == 200)
            #expect(!vm.countHookInstalled)
        }
    }

    @Test func aCallStartingWhileTheWatchdogIsParkedWakesIt() throws {
        let watchdog = PolicyWatchdog(thread: false)
        let vm = try watchedVM(watchdog)
        watchdog.isParked = true
        _ = vm.onRequest(1, request())
        #expect(!watchdog.isParked)
    }
}
