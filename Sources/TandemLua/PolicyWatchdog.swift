import CLuaJIT
import Foundation

/// Arms the count hook of a policy VM whose call runs past one tick (docs/LUA.md, "Limits").
///
/// A count hook costs every bytecode LuaJIT's hook dispatch (about 8 instructions each, ~11 % of
/// a typical policy call), although almost every call ends long before any limit. VMs with a
/// wall-clock limit therefore run without one: this thread looks at them every `tick`, and a
/// VM found in the same call at two looks in a row (running for one to two ticks) gets the
/// count hook, which then enforces the deadline (counted from the call's start) and the
/// instruction budget (counted from then on) exactly as an always-armed hook does. The VM's
/// thread removes the hook when the call returns.
///
/// With no call for `idleTicks` looks, the thread parks until a call starts (the VM wakes it),
/// so an idle sidecar has no periodic wake-up here.
///
/// Every VM of the process shares `shared`. Tests make their own without a thread and call
/// `look()` themselves, so which call gets the hook does not depend on timing.
final class PolicyWatchdog: @unchecked Sendable {
    static let shared = PolicyWatchdog(thread: true)
    /// One look per tick: a runaway call gets its hook 5–10 ms after it started, well inside
    /// the default 50 ms time budget.
    static let tickNs = 5_000_000
    static let idleTicks = 20

    private struct Watched {
        let vm: UnsafeMutablePointer<clj_vm>
        let L: OpaquePointer
        var lastCalls: UInt64
        var sawInCall: Bool
    }

    /// Guards `watched`, `running` and every lua_sethook on a watched VM (C side, `watch_lock`).
    let lock: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    /// Shared with the VMs (their `parked`): 1 while the thread waits for a call to start.
    let parked: UnsafeMutablePointer<Int32>
    private var watched: [Watched] = []
    private let startsThread: Bool
    private var running = false

    init(thread: Bool) {
        startsThread = thread
        lock = .allocate(capacity: 1)
        pthread_mutex_init(lock, nil)
        condition = .allocate(capacity: 1)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
        parked = .allocate(capacity: 1)
        parked.initialize(to: 0)
    }

    /// Sets up `vm` to be watched; call before `clj_vm_open`.
    func prepare(_ vm: UnsafeMutablePointer<clj_vm>) {
        vm.pointee.watched = 1
        vm.pointee.parked = parked
        vm.pointee.watch_lock = lock
        vm.pointee.wake = { Unmanaged<PolicyWatchdog>.fromOpaque($0!).takeUnretainedValue().wake() }
        vm.pointee.wake_context = Unmanaged.passUnretained(self).toOpaque()
    }

    func register(_ vm: UnsafeMutablePointer<clj_vm>, _ L: OpaquePointer) {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        watched.append(Watched(vm: vm, L: L, lastCalls: clj_watch_calls(vm), sawInCall: false))
        if startsThread && !running {
            running = true
            Thread { [self] in run() }.start()
        }
    }

    /// After this returns the watchdog no longer touches `vm` (close the state afterwards).
    func unregister(_ vm: UnsafeMutablePointer<clj_vm>) {
        pthread_mutex_lock(lock)
        watched.removeAll { $0.vm == vm }
        pthread_mutex_unlock(lock)
    }

    /// Whether the watchdog waits for a call to start; tests set it.
    var isParked: Bool {
        get { clj_watch_parked(parked) != 0 }
        set { clj_watch_set_parked(parked, newValue ? 1 : 0) }
    }

    /// Called by a VM's thread when a call starts while the watchdog is parked.
    private func wake() {
        pthread_mutex_lock(lock)
        clj_watch_set_parked(parked, 0)
        pthread_cond_signal(condition)
        pthread_mutex_unlock(lock)
    }

    private func run() {
        clj_name_thread("policy-watchdog")
        pthread_mutex_lock(lock)
        var idle = 0
        while true {
            var deadline = timespec()
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            let ns = Int(deadline.tv_nsec) + Self.tickNs
            deadline.tv_sec += ns / 1_000_000_000
            deadline.tv_nsec = ns % 1_000_000_000
            // Waits out the tick (a wake only ends a park, below).
            while pthread_cond_timedwait(condition, lock, &deadline) == 0 {}
            idle = lookLocked() ? 0 : idle + 1
            guard idle >= Self.idleTicks else { continue }
            // Park: announce it, then look again (a VM announces its call, then reads `parked`):
            // either the look sees a call, or that call sees `parked` and wakes the thread.
            clj_watch_set_parked(parked, 1)
            if lookLocked() {
                clj_watch_set_parked(parked, 0)
                idle = 0
                continue
            }
            while parked.pointee != 0 { pthread_cond_wait(condition, lock) }
            idle = 0
        }
    }

    /// One look at every VM: arms the hook of a VM still in the call it was in at the last
    /// look. Whether any VM made or is making a call since the last look.
    @discardableResult
    func look() -> Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return lookLocked()
    }

    private func lookLocked() -> Bool {
        var busy = false
        for i in watched.indices {
            let vm = watched[i].vm
            let calls = clj_watch_calls(vm)
            let inCall = clj_watch_in_call(vm) != 0
            if inCall && watched[i].sawInCall && calls == watched[i].lastCalls && clj_watch_armed(vm) == 0 {
                clj_watch_arm(watched[i].L, vm)
            }
            if inCall || calls != watched[i].lastCalls { busy = true }
            watched[i].lastCalls = calls
            watched[i].sawInCall = inCall
        }
        return busy
    }
}
