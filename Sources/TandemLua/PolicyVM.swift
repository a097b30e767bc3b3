import CLuaJIT
import Foundation
import TandemCore

/// Bounds of one policy VM. Every call into policy code runs under `instructions` and
/// `timeMs`; the VM as a whole under `memoryBytes`; the C pattern matcher under the pattern
/// bounds (hooks cannot interrupt it).
public struct PolicyLimits: Sendable, Equatable {
    public var memoryBytes = 32 << 20
    public var instructions = 10_000_000
    /// 0 = no wall-clock limit (the simulator, where only the deterministic budget applies).
    public var timeMs = 50
    public var patternSteps: Double = 5e7
    public var patternSubjectBytes = 1 << 20
    public var patternBytes = 256
    /// Header fields a request or an answer may carry after a policy's changes (each value is
    /// at most 16 KiB), and header changes one answer may collect: a hook adding headers in a
    /// loop stops with an error here instead of growing the host's memory.
    public var headerFields = 256
    public init() {}
}

/// One request as policies see it: read and changed by `on_request`, its answer by
/// `on_response`, and summarised for `on_log`. The sidecar fills it and applies the changes.
public final class PolicyExchange {
    public var method: String
    public var path: String
    public var query: String
    public var authority: String
    public var remoteAddress: String
    public var route: String
    public var side: String
    public var caller: String?
    public var requestID: String
    public var headers: [(name: String, value: String)]
    public var params: [String: String] = [:]
    /// Verified end-user claims, as JSON values (issue: identity).
    public var claims: [String: LuaValue] = [:]
    public var body: [UInt8]?
    /// Routing overrides a policy set.
    public var upstream: String?
    /// Endpoint metadata the request's endpoint must have (`req:set_subset`); nil: the route's.
    public var subset: [String: String]?
    public var timeoutMs: Int?
    public var retries: Int?
    public var requestChanged = false

    public var status = 0
    /// The sidecar's reason for a local answer (circuit-open, timeout, …), nil for the upstream's.
    public var reason: String?
    /// The answer's head fields as the hooks see them. Made on first use from
    /// `responseHeaderSource` (with the edits made so far), so an answer whose headers no hook
    /// reads is never copied.
    public var responseHeaders: [(name: String, value: String)] {
        get {
            if let h = heldResponseHeaders { return h }
            var h = responseHeaderSource?() ?? []
            responseHeaderSource = nil
            for e in responseEdits { e.apply(to: &h) }
            heldResponseHeaders = h
            return h
        }
        set {
            heldResponseHeaders = newValue
            responseHeaderSource = nil
        }
    }
    private var heldResponseHeaders: [(name: String, value: String)]?
    /// Where `responseHeaders` come from when first read (the host keeps its own header type
    /// until then).
    public var responseHeaderSource: (() -> [(name: String, value: String)])?
    public var responseBody: [UInt8]?
    /// The endpoint that answered as `host:port`, made when a hook reads it (the host sets
    /// `upstreamHost` and `upstreamPort`; a tool may set the text whole).
    public var upstreamEndpoint: String? {
        get { upstreamHost.map { h in upstreamPort.map { "\(h):\($0)" } ?? h } }
        set {
            upstreamHost = newValue
            upstreamPort = nil
        }
    }
    public var upstreamHost: String?
    public var upstreamPort: Int?
    public var attempts = 0
    public var durationMs: Double = 0
    /// The on_response header changes in order, so the host can apply them to the answer's own
    /// head in place (`responseHeaders` holds their result for the hooks to read).
    public var responseEdits: [HeaderEdit] = []
    public var responseChanged: Bool { !responseEdits.isEmpty }

    /// One `set_header` (`replace`: drop the name's values first; a nil value only drops), or
    /// `add_header`.
    public struct HeaderEdit: Sendable {
        public var name: String
        public var value: String?
        public var replace: Bool

        public init(name: String, value: String?, replace: Bool) {
            self.name = name
            self.value = value
            self.replace = replace
        }

        /// Whether this edit's name is `field` (ASCII case-insensitively).
        public func names(_ field: UnsafeRawBufferPointer) -> Bool {
            name.utf8.count == field.count && PolicyVM.sameName(name, field)
        }

        func apply(to list: inout [(name: String, value: String)]) {
            if replace { list.removeAll { PolicyVM.sameName($0.name, name) } }
            if let value { list.append((name, value)) }
        }
    }

    /// A hook's `set_header`/`add_header`/`remove_header` on the answer. A replacing edit
    /// makes the earlier edits of its name moot, so a hook setting one header in a loop keeps
    /// one edit.
    func editResponse(_ edit: HeaderEdit) {
        if heldResponseHeaders != nil { edit.apply(to: &heldResponseHeaders!) }
        if edit.replace && !responseEdits.isEmpty { responseEdits.removeAll { PolicyVM.sameName($0.name, edit.name) } }
        responseEdits.append(edit)
    }

    var generation: Double = 0

    public init(
        method: String, path: String, query: String = "", authority: String = "", remoteAddress: String = "",
        route: String = "", side: String = "outbound", headers: [(name: String, value: String)] = [],
        requestID: String = ""
    ) {
        self.method = method
        self.path = path
        self.query = query
        self.authority = authority
        self.remoteAddress = remoteAddress
        self.route = route
        self.side = side
        self.headers = headers
        self.requestID = requestID
    }
}

/// What a policy decided to answer instead of (or in place of) the upstream.
public struct PolicyDecision: Equatable, Sendable {
    public var kind: String  // respond | deny | redirect
    public var status: Int
    public var body: [UInt8]
    public var headers: [(name: String, value: String)]
    public init(kind: String, status: Int, body: [UInt8], headers: [(name: String, value: String)]) {
        self.kind = kind
        self.status = status
        self.body = body
        self.headers = headers
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.kind == b.kind && a.status == b.status && a.body == b.body
            && a.headers.elementsEqual(b.headers, by: { $0.name == $1.name && $0.value == $1.value })
    }
}

public struct PolicyFailure: Error, Equatable, Sendable, CustomStringConvertible {
    public var policy: String
    public var reason: PolicyFailureReason
    public var message: String
    public var description: String { "policy \(policy): \(reason.rawValue): \(message)" }
}

public enum PolicyOutcome: Equatable, Sendable {
    case proceed
    case decision(PolicyDecision)
    case failed(PolicyFailure)
}

/// Host operations callable from the prelude. Their Lua names (raw values) are what the
/// prelude's `H.<name>` calls and what the LuaLS definitions describe; their numbers are their
/// positions here.
enum HostOp: String, CaseIterable {
    case loadSource = "load_source", policyName = "policy_name", phase
    case reqField = "req_field", reqHeader = "req_header", reqHeaderAt = "req_header_at"
    case reqSetHeader = "req_set_header", reqAddHeader = "req_add_header", reqQueryArg = "req_query_arg"
    case reqQueryArgsJSON = "req_query_args_json", reqParam = "req_param", reqBody = "req_body", reqSet = "req_set"
    case reqRoute = "req_route", reqClaim = "req_claim"
    case resField = "res_field", resHeader = "res_header", resHeaderAt = "res_header_at"
    case resSetHeader = "res_set_header", resAddHeader = "res_add_header", resBody = "res_body"
    case decide, decideHeader = "decide_header", now, random, randomInt = "random_int", log, base64, url
    case tokenBucket = "token_bucket", window, shared, metricDeclare = "metric_declare", metric

    static let table: [HostOp] = allCases
    var number: Int32 { Int32(Self.table.firstIndex(of: self)! + 1) }
    /// `local OPS = { name = n, … }` for the prelude.
    static var luaTable: String {
        "local OPS = {" + table.map { "\($0.rawValue)=\($0.number)" }.joined(separator: ",") + "}\n"
    }
}

/// A sandboxed LuaJIT VM holding every loaded policy, each in its own environment. Not
/// thread-safe: one per event loop, used only from it (the sidecar), or from one thread.
public final class PolicyVM: @unchecked Sendable {
    public let limits: PolicyLimits
    public let services: PolicyServices
    private let vm: UnsafeMutablePointer<clj_vm>
    private let L: OpaquePointer
    /// Arms the count hook for long calls when there is a wall-clock limit (nil: always armed).
    private let watchdog: PolicyWatchdog?
    private var rng: SeededRandom
    /// What the VM knows of each loaded policy: one lookup per hook call.
    private struct Loaded {
        var name: String
        var hooks: (request: Bool, response: Bool, log: Bool, responseBody: Bool, requestBody: Bool)
        var slot: PolicyServices.Slot
    }
    private var policies: [Int: Loaded] = [:]

    private enum Phase { case idle, load, initialize, request, response, log }
    private var phase = Phase.idle
    private var current: PolicyExchange?
    private var currentPolicy = 0
    /// The chain a call runs (`vm.at` says which of its policies runs now).
    private var currentChain: Chain?
    /// Chains by key: routes' (> 0) and each policy alone (-id).
    private var chains: [Int: Chain] = [:]
    /// A chain's policy ids, and what counting needs of each (kept as loads change them, so a
    /// call looks up the chain once and no policy). A class: a call holds it with one retain
    /// instead of copying its two arrays.
    private final class Chain {
        let ids: [Int]
        var members: [Loaded?]
        init(ids: [Int], members: [Loaded?]) {
            self.ids = ids
            self.members = members
        }
    }
    private func makeChain(_ ids: [Int]) -> Chain { Chain(ids: ids, members: ids.map { policies[$0] }) }
    /// After policy `id` (re)loaded or left: the chains that hold it see its new state.
    private func refreshChains(holding id: Int) {
        for c in chains.values where c.ids.contains(id) { c.members = c.ids.map { policies[$0] } }
    }
    /// The policy whose hook runs now (read from the chain: no lookup by id).
    private var running: Loaded? {
        if let c = currentChain, c.members.indices.contains(Int(vm.pointee.at) - 1) {
            return c.members[Int(vm.pointee.at) - 1]
        }
        return policies[currentPolicy]
    }
    private var decision: PolicyDecision?
    private var pending: (file: String, source: String, config: String, path: String)?
    private var loadingName: String?
    private var loadingHooks = (request: false, response: false, log: false, responseBody: false, requestBody: false)

    /// Whether policy `id` reads response bodies (`response_body = true`: the sidecar buffers
    /// answers for its on_response).
    public func wantsResponseBody(_ id: Int) -> Bool { policies[id]?.hooks.responseBody ?? false }
    /// Whether policy `id` reads request bodies (`request_body = true`: over HTTP/2, where bodies
    /// stream, the sidecar holds the request until its end, up to a bound, before on_request).
    public func wantsRequestBody(_ id: Int) -> Bool { policies[id]?.hooks.requestBody ?? false }
    /// Whether policy `id` has an `on_request` hook.
    public func hasRequestHook(_ id: Int) -> Bool { policies[id]?.hooks.request ?? false }
    /// Whether policy `id` has an `on_response` hook.
    public func hasResponseHook(_ id: Int) -> Bool { policies[id]?.hooks.response ?? false }
    /// Whether policy `id` has an `on_log` hook.
    public func hasLogHook(_ id: Int) -> Bool { policies[id]?.hooks.log ?? false }
    /// `tandem.now()` for the current call: read from the clock on first use, then frozen.
    private var callNow: Int64?
    private var frozenNow: Int64 {
        if let n = callNow { return n }
        let n = services.clock()
        callNow = n
        return n
    }
    /// A request's state in the VM (its ctx and handle) lives at a slot, an array index there,
    /// reused once the request ended. Its generation carries the slot in the low 24 bits and a
    /// sequence number above them, so a handle kept past its request is refused.
    static let slotSpan: Double = 16_777_216
    private var freeSlots: [Int] = []
    private var nextSlot = 1
    private var sequence: Double = 1

    public static let maxPolicies = 10_000

    public convenience init(
        limits: PolicyLimits = PolicyLimits(), services: PolicyServices, seed: UInt64 = 1
    )
        throws(PolicyFailure)
    {
        try self.init(limits: limits, services: services, seed: seed, watchdog: .shared)
    }

    /// `watchdog`: the process's (`.shared`), or a test's own.
    init(limits: PolicyLimits, services: PolicyServices, seed: UInt64, watchdog: PolicyWatchdog) throws(PolicyFailure) {
        self.limits = limits
        self.services = services
        self.rng = SeededRandom(seed: seed)
        vm = UnsafeMutablePointer<clj_vm>.allocate(capacity: 1)
        vm.initialize(to: clj_vm())
        vm.pointee.limit = limits.memoryBytes
        vm.pointee.pattern_steps = limits.patternSteps
        vm.pointee.pattern_subject = limits.patternSubjectBytes
        vm.pointee.pattern_length = limits.patternBytes
        vm.pointee.dispatch = Bridge.dispatch
        vm.pointee.fields_op = Int32(HostOp.table.firstIndex(of: .reqHeader)! + 1)
        // With a wall-clock limit the count hook is armed only for calls that run long.
        if limits.timeMs > 0 {
            self.watchdog = watchdog
            watchdog.prepare(vm)
        } else {
            self.watchdog = nil
        }
        guard let state = clj_vm_open(vm) else {
            clj_pool_free(vm)
            vm.deallocate()
            throw PolicyFailure(policy: "-", reason: .memory, message: "cannot create a Lua state")
        }
        L = state
        vm.pointee.host = Unmanaged.passUnretained(self).toOpaque()
        clj_arm(vm, Int64(max(limits.instructions, 5_000_000)), 0)
        let status = (HostOp.luaTable + preludeSource).withCString { clj_vm_boot(L, $0) }
        if status != 0 {
            let m = message()
            lua_close(L)
            clj_pool_free(vm)
            free(vm.pointee.buffer)
            clj_fields_free(vm)
            vm.deallocate()
            throw PolicyFailure(policy: "-", reason: .error, message: "policy prelude failed: \(m)")
        }
        self.watchdog?.register(vm, L)
    }

    deinit {
        watchdog?.unregister(vm)
        lua_close(L)
        clj_pool_free(vm)
        free(vm.pointee.buffer)
        clj_fields_free(vm)
        vm.deallocate()
    }

    /// Bytes the VM's Lua heap holds now, and at most so far.
    public var memoryBytes: Int { vm.pointee.used }
    public var peakMemoryBytes: Int { vm.pointee.peak }
    /// Bytes of freed small blocks the VM's allocator keeps for reuse (at most
    /// `pooledBytesLimit`; not part of `memoryBytes`).
    var pooledBytes: Int { vm.pointee.pooled }
    static let pooledBytesLimit = Int(CLJ_POOL_BYTES)
    /// A full garbage collection (tests).
    func collectGarbage() { clj_vm_collect(L) }
    /// Whether the count hook is installed now: always without a wall-clock limit; with one,
    /// only while the watchdog has armed it for a long call.
    var countHookInstalled: Bool { clj_hook_installed(L) != 0 }

    /// The name of a loaded policy.
    public func name(of id: Int) -> String? { policies[id]?.name }

    /// Compiles `source` (text only) in a fresh environment, validates `config` against the
    /// policy's schema (errors name `path`), declares its shared dicts and runs its `init`.
    /// Replaces a policy already loaded under `id` only if all of that succeeds.
    @discardableResult
    public func load(
        id: Int, file: String, source: String, config: LuaValue? = nil, path: String = "config"
    )
        throws(PolicyFailure) -> String
    {
        guard id > 0, policies.count < Self.maxPolicies || policies[id] != nil else {
            throw PolicyFailure(policy: file, reason: .error, message: "more than \(Self.maxPolicies) policies")
        }
        pending = (file, source, config.map { $0.json } ?? "", path)
        loadingName = nil
        phase = .load
        currentPolicy = id
        callNow = nil
        defer {
            pending = nil
            phase = .idle
        }
        // A staging id keeps the old version serving until the new one has loaded.
        let staging = -id
        let r = enter(op: 1, Double(staging), 0)
        if case .failed(var f) = r {
            f.policy = loadingName ?? file
            throw f
        }
        // Swap in: the prelude stored it under `staging`; move it.
        let name = loadingName ?? file
        let replaced = policies[id] != nil
        policies[id] = Loaded(name: name, hooks: loadingHooks, slot: services.slot(for: name))
        _ = enter(op: 7, Double(staging), Double(id))
        chains[-id] = makeChain([id])
        // (A new id is in no chain yet: installs load before they define chains.)
        if replaced { refreshChains(holding: id) }
        return name
    }

    /// Compiles `source` and checks its shape and config schema without a config or `init`
    /// (`tandem policy check`). Returns the policy's name.
    @discardableResult
    public func check(file: String, source: String) throws(PolicyFailure) -> String {
        pending = (file, source, "-check-", "config")
        loadingName = nil
        phase = .load
        callNow = nil
        defer {
            pending = nil
            phase = .idle
            _ = enter(op: 2, -1, 0)
        }
        if case .failed(var f) = enter(op: 1, -1, 0) {
            f.policy = file
            throw f
        }
        return loadingName ?? file
    }

    public func unload(id: Int) {
        _ = enter(op: 2, Double(id), 0)
        policies[id] = nil
        chains[-id] = nil
        refreshChains(holding: id)
    }

    /// A route's policies in order under `key` (> 0), run by one call into the VM per phase
    /// (`onRequest(chain:)`, `onResponse(chain:)`). Policies load first; a key is defined once.
    public func defineChain(_ key: Int, _ ids: [Int]) {
        precondition(key > 0 && chains[key] == nil, "chain \(key) is already defined")
        chains[key] = makeChain(ids)
        for id in ids { _ = enter(op: 8, Double(key), Double(id)) }
    }

    public func dropChain(_ key: Int) {
        guard key > 0, chains.removeValue(forKey: key) != nil else { return }
        _ = enter(op: 9, Double(key), 0)
    }

    /// Runs `on_request` of policy `id` for `ex` (at once `.proceed` when it has none).
    public func onRequest(_ id: Int, _ ex: PolicyExchange) -> PolicyOutcome {
        guard let p = policies[id] else { return missing(id) }
        return p.hooks.request ? onRequest(chain: -id, from: 0, ex).outcome : .proceed
    }
    /// Runs `on_response`: `ex.status` and `ex.responseHeaders` hold the answer (upstream or local).
    public func onResponse(_ id: Int, _ ex: PolicyExchange) -> PolicyOutcome {
        guard let p = policies[id] else { return missing(id) }
        return p.hooks.response ? onResponse(chain: -id, from: 0, ex).outcome : .proceed
    }

    /// Runs `on_request` of chain `key`'s policies in order from position `start`, in one call
    /// into the VM (each hook under its own budget). `at`: the position of the policy that
    /// decided or failed, or the chain's length when all let the request through.
    public func onRequest(chain key: Int, from start: Int, _ ex: PolicyExchange) -> (at: Int, outcome: PolicyOutcome) {
        run(chain: key, op: 3, from: start, ex, .request)
    }
    /// Runs `on_response` of chain `key`'s policies backwards (last first) from position
    /// `start`. `at`: the position of the policy that decided or failed, or -1.
    public func onResponse(chain key: Int, from start: Int, _ ex: PolicyExchange) -> (at: Int, outcome: PolicyOutcome) {
        run(chain: key, op: 4, from: start, ex, .response)
    }
    /// Runs `on_log` after the exchange completed (read-only).
    public func onLog(_ id: Int, _ ex: PolicyExchange) -> PolicyOutcome {
        guard let p = policies[id] else { return missing(id) }
        return p.hooks.log ? call(5, id, p, ex, .log) : .proceed
    }
    /// Forgets the exchange's `ctx`; call once after its last hook. Batched: the ids wait
    /// here (at most `endBatch`) and leave the VM in one call.
    public func end(_ ex: PolicyExchange) {
        guard ex.generation != 0 else { return }
        if vm.pointee.fields_generation == ex.generation { clj_fields_reset(vm, 0) }
        pendingEnds.append(ex.generation)
        ex.generation = 0
        if pendingEnds.count >= Self.endBatch { flushEnds() }
    }

    /// Requests whose ctx is still held, waiting for the next batch.
    public static let endBatch = Int(CLJ_MAX_ENDED)
    private var pendingEnds: [Double] = []

    private func begin(_ ex: PolicyExchange) {
        let slot: Int
        if let s = freeSlots.popLast() {
            slot = s
        } else {
            // One per request in flight on this loop, plus the ended ones waiting for a batch.
            precondition(Double(nextSlot) < Self.slotSpan, "more than 16M policy requests in flight on one loop")
            slot = nextSlot
            nextSlot += 1
        }
        ex.generation = sequence * Self.slotSpan + Double(slot)
        sequence = sequence < 536_870_912 ? sequence + 1 : 1  // 2^29: generations stay exact doubles
    }

    /// The request's header fields, copied to the VM's C side: `req:header` reads them there
    /// (no host call) while they hold this request (a hook's edit drops them).
    private func copyFields(_ ex: PolicyExchange) {
        clj_fields_reset(vm, ex.generation)
        for f in ex.headers {
            var (name, value) = f
            let added = name.withUTF8 { n in
                value.withUTF8 { v in
                    n.withMemoryRebound(to: CChar.self) { n in
                        v.withMemoryRebound(to: CChar.self) { v in
                            clj_fields_add(vm, n.baseAddress, n.count, v.baseAddress, v.count)
                        }
                    }
                }
            }
            if added != 0 { return }  // out of memory: no view, reads take the host call
        }
    }

    private func flushEnds() {
        guard !pendingEnds.isEmpty else { return }
        // The generations go in the VM's C-side array (the prelude reads them with ended(i)).
        let n = pendingEnds.count
        withUnsafeMutableBytes(of: &vm.pointee.ended) { raw in
            let slots = raw.bindMemory(to: Double.self)
            precondition(n <= slots.count, "more ended requests than the VM's batch holds")
            for (i, g) in pendingEnds.enumerated() { slots[i] = g }
        }
        vm.pointee.nended = Int32(n)
        // A slot is reused only once the VM has dropped what it held (else it stays out).
        if case .proceed = enter(op: 6, Double(n), 0) {
            // The low 24 bits, as integers: `truncatingRemainder` is libm's fmod (~200
            // instructions of long division for these magnitudes).
            for g in pendingEnds { freeSlots.append(Int(g) & (Int(Self.slotSpan) - 1)) }
        }
        vm.pointee.nended = 0
        pendingEnds.removeAll(keepingCapacity: true)
    }

    private func missing(_ id: Int) -> PolicyOutcome {
        .failed(PolicyFailure(policy: "#\(id)", reason: .error, message: "no such policy"))
    }

    private func run(
        chain key: Int, op: Int32, from start: Int, _ ex: PolicyExchange, _ p: Phase
    )
        -> (at: Int, outcome: PolicyOutcome)
    {
        let forward = p == .request
        guard let chain = chains[key], chain.ids.indices.contains(start) else {
            return (start, .failed(PolicyFailure(policy: "#\(key)", reason: .error, message: "no such chain")))
        }
        let ids = chain.ids
        var outcome = calling(ex, p, chain: chain) { enter(op: op, Double(key), ex.generation, Double(start + 1)) }
        // The prelude names the hook that decided (its second result) or was running (next_hook).
        var at: Int
        switch outcome {
        case .proceed: at = forward ? ids.count : -1
        case .decision: at = Int(clj_vm_number(L, 2)) - 1
        case .failed: at = Int(vm.pointee.at) - 1
        }
        // A failure before any hook started (none named) is the first one's.
        if case .proceed = outcome {} else if !ids.indices.contains(at) { at = start }
        // Counted per policy: the ones the request passed, then the one that decided or failed.
        var i = start
        while i != at {
            if let l = chain.members[i], forward ? l.hooks.request : l.hooks.response { services.count(slot: l.slot) }
            i += forward ? 1 : -1
        }
        guard ids.indices.contains(at), let l = chain.members[at] else { return (at, outcome) }
        switch outcome {
        case .proceed: break
        case .decision(let d): services.count(slot: l.slot, decision: d.kind)
        case .failed(var f):
            f.policy = l.name
            outcome = .failed(f)
            services.count(slot: l.slot, failure: f.reason)
        }
        return (at, outcome)
    }

    /// Runs `body` (a call into the VM) with the state host calls read: the exchange, the
    /// phase, and the policy or chain that runs.
    private func calling(
        _ ex: PolicyExchange, _ p: Phase, chain: Chain? = nil, policy: Int = 0, _ body: () -> PolicyOutcome
    ) -> PolicyOutcome {
        if ex.generation == 0 { begin(ex) }
        // Copied at every on_request call: the host may have changed `ex.headers` since.
        if p == .request { copyFields(ex) }
        current = ex
        phase = p
        currentChain = chain
        currentPolicy = policy
        decision = nil
        callNow = nil
        defer {
            current = nil
            currentChain = nil
            phase = .idle
        }
        return body()
    }

    private func call(_ op: Int32, _ id: Int, _ loaded: Loaded, _ ex: PolicyExchange, _ p: Phase) -> PolicyOutcome {
        var outcome = calling(ex, p, policy: id) { enter(op: op, Double(id), ex.generation) }
        switch outcome {
        case .proceed:
            services.count(slot: loaded.slot)
        case .decision(let d):
            if p == .log {
                outcome = .proceed
                services.count(slot: loaded.slot)
            } else {
                services.count(slot: loaded.slot, decision: d.kind)
            }
        case .failed(var f):
            f.policy = loaded.name
            outcome = .failed(f)
            services.count(slot: loaded.slot, failure: f.reason)
        }
        return outcome
    }

    /// entry(op, a, b) under the per-call limits; classifies a failure.
    private func enter(op: Int32, _ a: Double, _ b: Double, _ c: Double = 0) -> PolicyOutcome {
        clj_arm(vm, Int64(limits.instructions), Int64(limits.timeMs) * 1_000_000)
        let status = clj_vm_enter(L, vm, op, a, b, c)
        if status == 0 {
            return clj_vm_number(L, 1) == 1 ? .decision(decision ?? emptyDecision) : .proceed
        }
        let text = message()
        let reason: PolicyFailureReason
        switch Int32(vm.pointee.tripped) {
        case Int32(CLJ_LIMIT_INSTRUCTIONS): reason = .instructions
        case Int32(CLJ_LIMIT_TIME): reason = .timeout
        default: reason = (status == LUA_ERRMEM || vm.pointee.refused != 0) ? .memory : .error
        }
        if reason == .memory {
            clj_vm_collect(L)
        }
        let m = reason == .memory ? "memory limit of \(limits.memoryBytes) bytes reached (\(text))" : text
        return .failed(PolicyFailure(policy: "", reason: reason, message: m))
    }

    private var emptyDecision: PolicyDecision { PolicyDecision(kind: "respond", status: 500, body: [], headers: []) }

    private func message() -> String {
        var len = 0
        guard let p = clj_vm_string(L, -1, &len) else {
            return "error object is a \(String(cString: lua_typename(L, lua_type(L, -1))))"
        }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self)
    }

    // MARK: host calls

    fileprivate func dispatch(_ opNumber: Int32, _ args: UnsafePointer<clj_arg>?, _ n: Int) -> Int32 {
        let i = Int(opNumber) - 1
        guard i >= 0, i < HostOp.table.count else { return fail("unknown host operation") }
        let a = Args(base: args, count: n)
        do {
            try run(HostOp.table[i], a)
            return 0
        } catch let e as HostError {
            return fail(e.message)
        } catch {
            return fail("\(error)")
        }
    }

    private struct HostError: Error {
        var message: String
        init(_ m: String) { message = m }
    }

    private struct Args {
        let base: UnsafePointer<clj_arg>?
        let count: Int
        func type(_ i: Int) -> Int32 { i < count ? base![i].type : Int32(CLJ_NIL) }
        func isNil(_ i: Int) -> Bool { type(i) == Int32(CLJ_NIL) }
        func string(_ i: Int) -> String? {
            guard i < count, base![i].type == Int32(CLJ_STRING), let p = base![i].string else { return nil }
            return String(decoding: UnsafeRawBufferPointer(start: p, count: base![i].length), as: UTF8.self)
        }
        /// The argument's bytes in place (valid during the host call).
        func raw(_ i: Int) -> UnsafeRawBufferPointer? {
            guard i < count, base![i].type == Int32(CLJ_STRING), let p = base![i].string else { return nil }
            return UnsafeRawBufferPointer(start: p, count: base![i].length)
        }
        func bytes(_ i: Int) -> [UInt8]? {
            guard i < count, base![i].type == Int32(CLJ_STRING), let p = base![i].string else { return nil }
            return Array(UnsafeRawBufferPointer(start: p, count: base![i].length))
        }
        func number(_ i: Int) -> Double? {
            i < count && base![i].type == Int32(CLJ_NUMBER) ? base![i].number : nil
        }
        func bool(_ i: Int) -> Bool { i < count && base![i].type == Int32(CLJ_BOOL) && base![i].number != 0 }
        func need(_ i: Int, _ what: String) throws -> String {
            guard let s = string(i) else { throw HostError("\(what): expected a string") }
            return s
        }
        func needNumber(_ i: Int, _ what: String) throws -> Double {
            guard let d = number(i) else { throw HostError("\(what): expected a number") }
            return d
        }
    }

    private func fail(_ m: String) -> Int32 {
        vm.pointee.nresults = 0
        vm.pointee.buffer_used = 0
        put(m)
        return 1
    }

    private func put(_ s: String) {
        var s = s
        s.withUTF8 { b in
            b.withMemoryRebound(to: CChar.self) { _ = clj_result_string(vm, $0.baseAddress, $0.count) }
        }
    }
    private func put(_ b: [UInt8]) {
        b.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { _ = clj_result_string(vm, $0.baseAddress, $0.count) }
        }
    }
    private func put(_ d: Double) { clj_result_number(vm, d) }
    private func put(_ b: Bool) { clj_result_bool(vm, b ? 1 : 0) }
    private func putNil() { clj_result_nil(vm) }
    private func put(_ v: LuaValue?) {
        switch v {
        case .string(let s): put(s)
        case .number(let d): put(d)
        case .bool(let b): put(b)
        case .table(let t): put(LuaValue.table(t).json); put(true)
        case .nil, .none: putNil()
        }
    }

    /// The exchange a request/response handle refers to; a handle kept past its request fails.
    private func exchange(_ a: Args) throws -> PolicyExchange {
        guard let ex = current, let g = a.number(0), g == ex.generation else {
            throw HostError("a request object was used outside the hook that received it")
        }
        return ex
    }

    private func requirePhase(_ p: Phase, _ what: String) throws {
        guard phase == p else {
            let name: String
            switch p {
            case .request: name = "on_request"
            case .response: name = "on_response"
            case .initialize: name = "init"
            default: name = "\(p)"
            }
            throw HostError("\(what) is only allowed in \(name)")
        }
    }

    private func run(_ op: HostOp, _ a: Args) throws {
        switch op {
        case .loadSource:
            guard phase == .load, let p = pending else { throw HostError("load_source outside a load") }
            put(p.file)
            put(p.source)
            put(p.config)
            put(p.path)
        case .policyName:
            loadingName = a.string(0)
            loadingHooks = (a.bool(1), a.bool(2), a.bool(3), a.bool(4), a.bool(5))
        case .phase:
            if phase == .load || phase == .initialize { phase = a.string(0) == "init" ? .initialize : .load }
        case .reqField:
            let ex = try exchange(a)
            switch a.string(1) ?? "" {
            case "method": put(ex.method)
            case "path": put(ex.path)
            case "query": put(ex.query)
            case "authority": put(ex.authority)
            case "remote_addr": put(ex.remoteAddress)
            case "route": put(ex.route)
            case "side": put(ex.side)
            case "id": put(ex.requestID)
            case "caller": if let c = ex.caller { put(c) } else { putNil() }
            default: putNil()
            }
        case .reqHeader, .resHeader:
            // The hottest call: the name is compared as the argument's bytes, the list walked by
            // index (no String made, no element copied).
            let ex = try exchange(a)
            guard let name = a.raw(1) else { throw HostError("header name: expected a string") }
            var nth = Int(a.number(2) ?? 1)
            let list = op == .reqHeader ? ex.headers : ex.responseHeaders
            for i in list.indices where Self.sameName(list[i].name, name) {
                nth -= 1
                if nth == 0 {
                    put(list[i].value)
                    return
                }
            }
            putNil()
        case .reqHeaderAt, .resHeaderAt:
            let ex = try exchange(a)
            let list = op == .reqHeaderAt ? ex.headers : ex.responseHeaders
            let i = Int(a.number(1) ?? 0) - 1
            if list.indices.contains(i) {
                put(list[i].name.lowercased())
                put(list[i].value)
            } else {
                putNil()
            }
        case .reqSetHeader, .reqAddHeader, .resSetHeader, .resAddHeader:
            let ex = try exchange(a)
            let onRequest = op == .reqSetHeader || op == .reqAddHeader
            try requirePhase(
                onRequest ? .request : .response, onRequest ? "changing request headers" : "changing response headers")
            guard let rawName = a.raw(1) else { throw HostError("header name: expected a string") }
            let value: String?
            if let n = a.number(2) {
                try Self.checkHeader(rawName, nil)  // a number's text is digits, '-', '.', 'e', '+'
                value = Self.numberText(n)
            } else {
                let rawValue = a.raw(2)
                try Self.checkHeader(rawName, rawValue)
                value = rawValue.map { String(decoding: $0, as: UTF8.self) }
            }
            let name = headerName(rawName)
            let replace = op == .reqSetHeader || op == .resSetHeader
            if !replace && value == nil { throw HostError("add_header: expected a value") }
            // Edited in place: a copy of the list would be copied again on write.
            let max = limits.headerFields
            if onRequest {
                if vm.pointee.fields_generation == ex.generation { clj_fields_reset(vm, 0) }
                if replace { ex.headers.removeAll { Self.sameName($0.name, name) } }
                if value != nil && ex.headers.count >= max {
                    throw HostError("too many request header fields (the limit is \(max))")
                }
                if let value { ex.headers.append((name, value)) }
                ex.requestChanged = true
            } else {
                ex.editResponse(PolicyExchange.HeaderEdit(name: name, value: value, replace: replace))
                if ex.responseEdits.count > max {
                    throw HostError("too many response header changes (the limit is \(max))")
                }
            }
        case .reqQueryArg:
            let ex = try exchange(a)
            let name = try a.need(1, "query argument name")
            if let v = Self.queryArgs(ex.query).first(where: { $0.0 == name }) { put(v.1) } else { putNil() }
        case .reqQueryArgsJSON:
            let ex = try exchange(a)
            var t: [LuaKey: LuaValue] = [:]
            for (k, v) in Self.queryArgs(ex.query) where t[.string(k)] == nil { t[.string(k)] = .string(v) }
            put(LuaValue.table(t).json)
        case .reqParam:
            let ex = try exchange(a)
            if let v = ex.params[try a.need(1, "param name")] { put(v) } else { putNil() }
        case .reqBody:
            let ex = try exchange(a)
            if let b = ex.body { put(b) } else { putNil() }
        case .resBody:
            let ex = try exchange(a)
            if let b = ex.responseBody { put(b) } else { putNil() }
        case .reqSet:
            let ex = try exchange(a)
            try requirePhase(.request, "changing the request")
            let field = try a.need(1, "field")
            let value = try a.need(2, field)
            switch field {
            case "path":
                guard value.hasPrefix("/"), !value.contains(where: { $0 == " " || $0 == "?" || $0.isNewline }) else {
                    throw HostError("set_path: a path starts with / and has no spaces, '?' or line breaks")
                }
                ex.path = value
            case "query":
                guard !value.contains(where: { $0 == " " || $0.isNewline || $0 == "#" }) else {
                    throw HostError("set_query: no spaces, '#' or line breaks")
                }
                ex.query = value.hasPrefix("?") ? String(value.dropFirst()) : value
            case "method":
                guard !value.isEmpty, value.utf8.allSatisfy({ (65...90).contains($0) }) else {
                    throw HostError("set_method: expected an upper-case method like GET")
                }
                ex.method = value
            default: throw HostError("cannot set \(field)")
            }
            ex.requestChanged = true
        case .reqRoute:
            let ex = try exchange(a)
            try requirePhase(.request, "routing")
            switch a.string(1) ?? "" {
            case "upstream": ex.upstream = try a.need(2, "set_upstream")
            case "subset": ex.subset = try Self.subset(try a.need(2, "set_subset"))
            case "timeout_ms":
                let ms = try a.needNumber(2, "set_timeout")
                guard ms >= 1, ms <= 3_600_000 else { throw HostError("set_timeout: 1…3600000 ms") }
                ex.timeoutMs = Int(ms)
            case "retries":
                let n = try a.needNumber(2, "set_retries")
                guard n >= 0, n <= 10 else { throw HostError("set_retries: 0…10") }
                ex.retries = Int(n)
            default: throw HostError("unknown routing field")
            }
        case .reqClaim:
            let ex = try exchange(a)
            put(ex.claims[try a.need(1, "claim name")])
        case .resField:
            let ex = try exchange(a)
            guard phase == .response || phase == .log else { throw HostError("the response is not known yet") }
            switch a.string(1) ?? "" {
            case "status": put(Double(ex.status))
            case "reason": if let r = ex.reason { put(r) } else { putNil() }
            case "upstream": if let u = ex.upstreamEndpoint { put(u) } else { putNil() }
            case "attempts": put(Double(ex.attempts))
            case "duration_ms": put(ex.durationMs)
            default: putNil()
            }
        case .decide:
            guard phase == .request || phase == .response else {
                throw HostError("decisions are for on_request and on_response")
            }
            decision = PolicyDecision(
                kind: a.string(0) ?? "respond", status: Int(a.number(1) ?? 500), body: a.bytes(2) ?? [], headers: [])
        case .decideHeader:
            guard let name = a.raw(0) else { throw HostError("header name: expected a string") }
            guard let value = a.raw(1) else { throw HostError("header value: expected a string") }
            try Self.checkHeader(name, value)
            decision?.headers.append((String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)))
        case .now:
            put(Double(frozenNow))
        case .random:
            put(Double(rng.next() >> 11) / Double(1 << 53))
        case .randomInt:
            let lo = try a.needNumber(0, "random_int"), hi = try a.needNumber(1, "random_int")
            guard lo <= hi, lo.rounded() == lo, hi.rounded() == hi, hi - lo < 1e15 else {
                throw HostError("random_int: expected integers a <= b")
            }
            put(lo + Double(rng.next() % UInt64(hi - lo + 1)))
        case .log:
            let level = PolicyLogLine.Level(rawValue: Int(a.number(1) ?? 1)) ?? .info
            let name = running?.name ?? loadingName ?? "?"
            services.log(
                PolicyLogLine(policy: name, level: level, message: a.string(2) ?? "", fieldsJSON: a.string(3)),
                now: frozenNow)
        case .base64:
            let s = a.bytes(0) ?? []
            if a.bool(1) {
                var text = String(decoding: s, as: UTF8.self)
                if a.bool(2) {
                    text = text.replacingOccurrences("-", "+").replacingOccurrences("_", "/")
                }
                while text.utf8.count % 4 != 0 { text += "=" }
                guard let d = Data(base64Encoded: text) else { putNil(); return }
                put([UInt8](d))
            } else {
                put(Data(s).base64EncodedString())
            }
        case .url:
            let s = a.string(0) ?? ""
            if a.bool(1) {
                if let d = s.replacingOccurrences("+", " ").removingPercentEncoding { put(d) } else { putNil() }
            } else {
                put(s.addingPercentEncoding(withAllowedCharacters: Self.unreserved) ?? s)
            }
        case .tokenBucket:
            let key = PolicyLimiters.Key(policy: running?.slot.index ?? -1, key: try a.need(1, "key"))
            let r = services.tokenBucket(
                key, rate: try a.needNumber(2, "rate"), burst: try a.needNumber(3, "burst"), now: frozenNow)
            put(r.ok)
            put(Double(r.retryAfterMs))
            put(Double(r.remaining))
        case .window:
            let key = PolicyLimiters.Key(policy: running?.slot.index ?? -1, key: try a.need(1, "key"))
            let limit = try a.needNumber(2, "limit"), seconds = try a.needNumber(3, "seconds")
            let r = services.window(key, limit: Int(limit), seconds: seconds, now: frozenNow)
            put(r.ok)
            put(Double(r.remaining))
            put(r.resetSeconds)
        case .shared:
            try shared(a)
        case .metricDeclare:
            try requirePhase(.initialize, "declaring a metric")
            let policy = running?.name ?? loadingName ?? "?"
            let labels = (a.string(3) ?? "").split(separator: ",").map(String.init)
            let buckets = (a.string(4) ?? "").split(separator: ",").compactMap { Double($0) }
            switch services.declareMetric(
                policy: policy, kind: try a.need(1, "kind"), name: try a.need(2, "metric name"), labels: labels,
                buckets: buckets)
            {
            case .success(let id): put(Double(id))
            case .failure(.badName(let n)):
                throw HostError("metric \"\(n)\": names and labels are lower-case letters, digits and _")
            case .failure(.conflict(let n)): throw HostError("metric \"\(n)\" is already declared with other labels")
            case .failure(.tooMany): throw HostError("too many metrics")
            }
        case .metric:
            guard phase != .initialize else { throw HostError("metrics are recorded in hooks, not init") }
            var labels: [String] = []
            for i in 2..<max(2, a.count) { labels.append(a.string(i) ?? a.number(i).map { format($0) } ?? "") }
            services.record(metric: Int(try a.needNumber(0, "metric")), try a.needNumber(1, "value"), labels: labels)
        }
    }

    /// Header names hooks have set, kept as strings: a policy sets the same few names on every
    /// request, and a name over 15 bytes would otherwise be a heap string each time.
    private var headerNames: [String] = []
    static let headerNamesKept = 32

    /// `raw` (a checked token) as a string: one of `headerNames` with the same bytes, or new
    /// (and kept while there is room).
    private func headerName(_ raw: UnsafeRawBufferPointer) -> String {
        for i in headerNames.indices {
            let same =
                headerNames[i].utf8.withContiguousStorageIfAvailable {
                    $0.count == raw.count && ($0.isEmpty || memcmp($0.baseAddress!, raw.baseAddress!, raw.count) == 0)
                } ?? false
            if same { return headerNames[i] }
        }
        let name = String(decoding: raw, as: UTF8.self)
        if headerNames.count < Self.headerNamesKept { headerNames.append(name) }
        return name
    }

    private static let sharedOps = ["", "get", "set", "add", "incr", "delete", "ttl", "expire"]

    /// `shared(name, 0)` → the dict's id or nil; `shared(name, -1, capacity)` declares it;
    /// `shared(id, op, key, …)` with op 1 get, 2 set, 3 add, 4 incr, 5 delete, 6 ttl, 7 expire.
    private func shared(_ a: Args) throws {
        let code = Int(a.number(1) ?? 0)
        if let name = a.string(0) {
            if code == 0 {
                if let id = services.dictID(name) { put(Double(id)) } else { putNil() }
            } else if let e = services.declareDict(name, capacity: Int(a.number(2) ?? 0)) {
                throw HostError(e)
            }
            return
        }
        let dict = Int(try a.needNumber(0, "dict"))
        guard code >= 1, code < Self.sharedOps.count else { throw HostError("unknown shared dict operation") }
        let op = Self.sharedOps[code]
        let key = try a.need(2, "key")
        guard key.utf8.count <= 65_535 else { throw HostError("shared dict keys are at most 65535 bytes") }
        func value(_ i: Int) throws -> SharedValue {
            if let s = a.string(i) {
                guard s.utf8.count <= 1 << 20 else { throw HostError("shared dict values are at most 1 MiB") }
                return .string(s)
            }
            if let d = a.number(i) { return .number(d) }
            if a.type(i) == Int32(CLJ_BOOL) { return .bool(a.bool(i)) }
            throw HostError("shared dict values are strings, numbers or booleans")
        }
        func ttl(_ i: Int) -> Int64? { a.number(i).map { Int64($0 * 1000) } }
        let now = frozenNow
        switch op {
        case "get":
            let v = services.withDict(dict) { $0.get(key, now: now) } ?? nil
            switch v {
            case .string(let s): put(s)
            case .number(let d): put(d)
            case .bool(let b): put(b)
            case nil: putNil()
            }
        case "set":
            let v = try value(3)
            let forcible = services.withDict(dict) { $0.set(key, v, ttlMs: ttl(4), now: now) } ?? false
            put(true)
            putNil()
            put(forcible)
        case "add":
            let v = try value(3)
            switch services.withDict(dict, { $0.add(key, v, ttlMs: ttl(4), now: now) }) {
            case .stored(let forcible)?:
                put(true)
                putNil()
                put(forcible)
            default:
                put(false)
                put("exists")
                put(false)
            }
        case "incr":
            let delta = a.number(3) ?? 1
            let r = services.withDict(dict) {
                $0.incr(key, by: delta, initial: a.number(4), initialTTL: ttl(5), now: now)
            }
            switch r {
            case .success(let (v, forcible))?:
                put(v)
                putNil()
                put(forcible)
            case .failure(.notANumber)?:
                putNil()
                put("not a number")
            default:
                putNil()
                put("not found")
            }
        case "delete":
            _ = services.withDict(dict) { $0.delete(key) }
        case "ttl":
            if let t = services.withDict(dict, { $0.ttl(key, now: now) }) ?? nil {
                put(t < 0 ? 0 : Double(t) / 1000)
            } else {
                putNil()
                put("not found")
            }
        case "expire":
            put(services.withDict(dict) { $0.expire(key, ttlMs: ttl(3), now: now) } ?? false)
        default:
            throw HostError("unknown shared dict operation \(op)")
        }
    }

    /// ASCII case-insensitive equality of header names, without allocating.
    static func sameName(_ a: String, _ b: String) -> Bool {
        var b = b
        return b.withUTF8 { sameName(a, UnsafeRawBufferPointer($0)) }
    }

    /// The same against raw bytes (a host call's argument), reading `a` in place when it is a
    /// native string.
    static func sameName(_ a: String, _ y: UnsafeRawBufferPointer) -> Bool {
        func equal(_ x: UnsafeBufferPointer<UInt8>) -> Bool {
            guard x.count == y.count else { return false }
            for i in 0..<x.count {
                let (p, q) = (x[i], y[i])
                if p != q && !(p | 0x20 == q | 0x20 && (p | 0x20) >= 97 && (p | 0x20) <= 122) { return false }
            }
            return true
        }
        if let r = a.utf8.withContiguousStorageIfAvailable(equal) { return r }
        return Array(a.utf8).withUnsafeBufferPointer(equal)
    }

    static let unreserved = CharacterSet(
        charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

    /// `req:set_subset`'s table (as JSON): string keys to string values, at most 16 pairs.
    static func subset(_ json: String) throws -> [String: String] {
        let parsed = try? JSONValue.parse(Array(json.utf8))
        if parsed?.array?.isEmpty == true { return [:] }  // `{}`: no subset
        guard let object = parsed?.object, object.count <= 16 else {
            throw HostError("set_subset: expected a table of at most 16 metadata pairs like { version = \"v2\" }")
        }
        return try object.mapValues { v in
            if let s = v.string { return s }
            if let n = v.number { return n.rounded() == n && abs(n) < 1e15 ? String(Int64(n)) : String(n) }
            throw HostError("set_subset: metadata values are strings or numbers")
        }
    }

    /// An integer below 10^14 as Lua's `tostring` writes it (the prelude sends other numbers
    /// as text: `%.14g` rounding is LuaJIT's own).
    static func numberText(_ d: Double) -> String {
        if d == 0 { return d.sign == .minus ? "-0" : "0" }
        guard d == d.rounded(.towardZero), abs(d) < 1e14 else { return String(format: "%.14g", d) }
        // An integer's digits written out here: `String(Int64)` costs several hundred
        // instructions, and a hook setting a count header does this on every request.
        var v = Int64(d).magnitude
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 16) { buf in
            var i = buf.count
            repeat {
                i -= 1
                buf[i] = UInt8(ascii: "0") + UInt8(v % 10)
                v /= 10
            } while v > 0
            if d < 0 {
                i -= 1
                buf[i] = UInt8(ascii: "-")
            }
            return String(decoding: UnsafeBufferPointer(rebasing: buf[i...]), as: UTF8.self)
        }
    }

    /// A header field a policy sets: a token name of at most 256 bytes; a value of at most
    /// 16 KiB without CR, LF or NUL. Checked on the argument's bytes, before any String is made.
    static func checkHeader(_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer?) throws {
        guard !name.isEmpty, name.count <= 256, name.allSatisfy(HTTPToken.isTokenByte) else {
            throw HostError("invalid header name \"\(String(decoding: name.prefix(64), as: UTF8.self))\"")
        }
        if let value, value.count > 16_384 || value.contains(where: { $0 == 13 || $0 == 10 || $0 == 0 }) {
            throw HostError(
                "invalid value for header \(String(decoding: name, as: UTF8.self)): no CR, LF or NUL, at most 16384 bytes"
            )
        }
    }

    /// `a=1&b=x%20y` → [("a","1"), ("b","x y")] (+ as space, percent-decoded).
    static func queryArgs(_ query: String) -> [(String, String)] {
        query.split(separator: "&").map { part in
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func dec(_ s: Substring) -> String {
                let t = String(s).replacingOccurrences("+", " ")
                return t.removingPercentEncoding ?? t
            }
            return (dec(kv[0]), kv.count > 1 ? dec(kv[1]) : "")
        }
    }
}

private enum Bridge {
    static let dispatch: clj_dispatch_fn = { host, op, args, n, _ in
        let me = Unmanaged<PolicyVM>.fromOpaque(host!).takeUnretainedValue()
        return me.dispatch(op, args, Int(n))
    }
}

extension LuaValue {
    /// JSON text (sequences as arrays, other tables as objects with sorted keys).
    public var json: String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .nil: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let d): out += d.isFinite ? format(d) : "null"
        case .string(let s): out += JSON.quote(s)
        case .table(let t):
            if let a = array, !a.isEmpty {
                out += "["
                for (i, v) in a.enumerated() {
                    if i > 0 { out += "," }
                    v.write(into: &out)
                }
                out += "]"
            } else {
                out += "{"
                for (i, (k, v)) in t.sorted(by: { $0.key.description < $1.key.description }).enumerated() {
                    if i > 0 { out += "," }
                    switch k {
                    case .string(let s): out += JSON.quote(s)
                    case .index(let i): out += JSON.quote(String(i))
                    }
                    out += ":"
                    v.write(into: &out)
                }
                out += "}"
            }
        }
    }

}
