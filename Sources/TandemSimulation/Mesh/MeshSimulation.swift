import HeapModule
import TandemConfig
import TandemCore
import TandemLua
import TandemTraffic

/// A whole mesh in one thread on virtual time: services and their instances, a sidecar per
/// instance running the real TandemTraffic cores (route table, balancer, retry policy and
/// budget, concurrency gate, failure breaker, outlier detection, active health checks, rate
/// limits) and the real Lua policies (TandemLua, on the virtual clock), discovery with
/// registration leases, a network with delay, loss, partitions and clogs, and a timeline of
/// faults. One seed decides everything; the same seed gives the same event trace hash.
///
/// What is modelled rather than run: service instances (latency distributions, errors,
/// capacity, calls to other services) and the registry, whose observable behaviour here is
/// registration, deregistration on a clean stop, lease expiry after a crash, and a watch delay.
/// The registry's own cores are simulated by `RegistrySimulation`.
public enum MeshSimulation {
    public struct Options: Sendable {
        public var seed: UInt64
        /// Keep the first lines of the event trace in the report (for debugging a seed).
        public var traceLines = 0
        /// Bound on requests in flight across the mesh; arrivals beyond it are counted as
        /// dropped by the load generator (an open-loop load far over capacity stays bounded).
        public var maxInFlight = 1_000_000
        public init(seed: UInt64) { self.seed = seed }
    }

    /// A simulated sidecar's policy VM: under the instruction budget alone, since a wall-clock
    /// limit would make a run depend on the machine (and have the real watchdog thread arm its
    /// count hook).
    static func policyVM(clockMs: @escaping @Sendable () -> Int64, seed: UInt64) throws(PolicyFailure) -> PolicyVM {
        var limits = PolicyLimits()
        limits.timeMs = 0
        return try PolicyVM(limits: limits, services: PolicyServices(clock: clockMs, sink: { _ in }), seed: seed)
    }

    public static func run(_ scenario: MeshScenario, options: Options) -> MeshReport {
        let world = MeshWorld(scenario, options)
        return world.run()
    }

    public static func run(_ scenario: MeshScenario, seed: UInt64) -> MeshReport {
        run(scenario, options: Options(seed: seed))
    }
}

/// The virtual clock the Lua policies read (`tandem.now()`), in milliseconds.
final class SimClock: @unchecked Sendable {
    var nowMs: Int64 = 0
}

enum MeshEvent {
    case arrival(workload: Int)
    case clientSend(workload: Int, client: Int)
    case attempt(req: Int)
    case deliver(job: Int)
    case attemptFailed(req: Int, attempt: Int, AttemptOutcome)
    case serviceDone(job: Int)
    case response(req: Int, attempt: Int, status: Int)
    case attemptTimeout(req: Int, attempt: Int)
    case deadline(req: Int)
    case probeRound(sidecar: Int, cluster: String)
    case probeResult(sidecar: Int, cluster: String, endpoint: String, passed: Bool)
    case fault(Int)
    case discovery(service: Int)
    case leaseExpiry(inst: Int, generation: Int)
    case started(inst: Int, generation: Int)
    case deployStep(service: Int, index: Int, stepMs: Int64)
    case stopAccepting(inst: Int, generation: Int)
    case drainDeadline(inst: Int, generation: Int)
    case registry(RegEvent)
}

struct MeshScheduled: Comparable {
    var time: Nanos
    var seq: UInt64
    var event: MeshEvent
    static func < (a: Self, b: Self) -> Bool { a.time != b.time ? a.time < b.time : a.seq < b.seq }
    static func == (a: Self, b: Self) -> Bool { a.time == b.time && a.seq == b.seq }
}

final class SimInstance {
    enum State { case up, starting, down, draining }
    let id: String
    let service: Int
    var state: State = .up
    var generation = 0
    /// Registered in the registry, and passing.
    var registered = true
    /// Its inbound listener is open (closed once a drain's grace has passed).
    var accepting = true
    var slowFactor = 1.0
    var hung = false
    var errorRate: Double
    var errorStatus: Int
    var busy = 0
    var queue: [Int] = []
    var queueHead = 0
    var jobs: Set<Int> = []
    var lastFaultAt: Nanos = 0
    var firstEjectionAfterFault: Nanos? = nil
    var ejectedByFault = false
    init(id: String, service: Int, behavior: ServiceBehavior) {
        self.id = id
        self.service = service
        errorRate = behavior.errorRate
        errorStatus = behavior.errorStatus
    }
    var queued: Int { queue.count - queueHead }
}

/// A request arriving at an instance (one attempt of a caller's request).
struct SimJob {
    var req: Int
    var attempt: Int
    var inst: Int
    /// The proof of possession this attempt carries (made for `inst`).
    var proof: String?
    var status = 200
    var nextCall = 0
    var started = false
}

final class SimSidecar {
    let inst: Int
    let service: Int
    let config: SidecarConfig
    let table: RouteTable
    var clusters: [String: ClusterState] = [:]
    var limiters: [String: TokenBucket] = [:]
    var rng: SeededRandom
    var probing: Set<String> = []
    var tripsSeen: [String: Int] = [:]
    var inboundBucket: TokenBucket?
    var inboundKeyed: KeyedRateLimiter?
    var vm: PolicyVM?
    var policyIDs: [String: [(id: Int, failOpen: Bool)]] = [:]
    init(inst: Int, service: Int, config: SidecarConfig, rng: SeededRandom) {
        self.inst = inst
        self.service = service
        self.config = config
        self.table = RouteTable(config.routes)
        self.rng = rng
    }
}

final class SimRequest {
    enum Origin {
        case workload(Int, client: Int?)
        case call(job: Int)
    }
    let id: Int
    let sidecar: Int
    let origin: Origin
    let start: Nanos
    let stat: Int
    var method: String
    var host: String
    var path: String
    var headers: [(String, String)]
    var cluster = ""
    var route: Route?
    var retry: RetryState?
    var attempt = 0
    var endpoint: Endpoint?
    var attemptStart: Nanos = 0
    var admitted = false
    var finished = false
    var exchange: PolicyExchange?
    var chain: [(id: Int, failOpen: Bool)] = []
    /// on_request answered (or failed closed): on_response does not run, on_log does.
    var policiesAnswered = false
    /// The service token the caller's sidecar attached (identity on), and its proof.
    var token: String?
    init(
        id: Int, sidecar: Int, origin: Origin, start: Nanos, stat: Int, method: String, host: String, path: String,
        headers: [(String, String)]
    ) {
        self.id = id
        self.sidecar = sidecar
        self.origin = origin
        self.start = start
        self.stat = stat
        self.method = method
        self.host = host
        self.path = path
        self.headers = headers
    }
}

final class MeshWorld {
    let scenario: MeshScenario
    let options: MeshSimulation.Options
    var now: Nanos = 0
    var queue = Heap<MeshScheduled>()
    var seq: UInt64 = 0
    var rng: SeededRandom
    var trace = TraceHash()
    var traceLines: [String] = []
    let clock = SimClock()

    var serviceIndex: [String: Int] = [:]
    var instances: [SimInstance] = []
    var instanceIndex: [String: Int] = [:]
    var serviceInstances: [[Int]] = []
    var sidecars: [SimSidecar] = []
    var requests: [Int: SimRequest] = [:]
    var nextRequest = 0
    var jobs: [Int: SimJob] = [:]
    var nextJob = 0
    var roundRobin: [Int] = []
    var stats: [RouteStats] = []
    var statIndex: [String: Int] = [:]
    var blocked: Set<Link> = []
    var clogged: [Link: Nanos] = [:]
    var loss: Double
    var discoveryPending: Set<Int> = []
    var report: MeshReport
    var inFlight = 0
    var policyErrors: [String] = []
    /// The registry cluster, when the scenario has one (else discovery is modelled).
    var registry: MeshRegistry?
    var identity: MeshIdentity?
    /// Inbound policy exchanges of jobs at the app, for their on_response.
    var inboundExchanges: [Int: (PolicyExchange, [(id: Int, failOpen: Bool)])] = [:]
    var registryBlocked: Set<RegLink> = []

    struct Link: Hashable {
        var from: String
        var to: String
    }

    init(_ scenario: MeshScenario, _ options: MeshSimulation.Options) {
        self.scenario = scenario
        self.options = options
        rng = SeededRandom(seed: options.seed)
        loss = scenario.network.loss
        report = MeshReport(scenario: scenario.name, seed: options.seed)
        for (si, svc) in scenario.services.enumerated() {
            serviceIndex[svc.name] = si
            var ids: [Int] = []
            for n in 1...svc.instances {
                let inst = SimInstance(id: "\(svc.name)-\(n)", service: si, behavior: svc.behavior)
                instanceIndex[inst.id] = instances.count
                ids.append(instances.count)
                instances.append(inst)
                var cfg = svc.sidecar
                cfg.instance = inst.id
                sidecars.append(SimSidecar(inst: ids.last!, service: si, config: cfg, rng: rng.fork()))
            }
            serviceInstances.append(ids)
        }
        roundRobin = Array(repeating: 0, count: scenario.services.count)
        if let spec = scenario.identity {
            identity = MeshIdentity(spec: spec, services: scenario.services, instances: instances.count, rng: &rng)
        }
        if let spec = scenario.registry {
            registry = MeshRegistry(spec: spec, instances: instances.count, rng: &rng)
            for inst in instances { inst.registered = false }
        }
    }

    // MARK: the loop

    func schedule(_ delay: Nanos, _ e: MeshEvent) {
        seq += 1
        queue.insert(MeshScheduled(time: now + max(0, delay), seq: seq, event: e))
    }

    func run() -> MeshReport {
        let end = Nanos.milliseconds(scenario.durationMs)
        for (i, w) in scenario.workloads.enumerated() {
            let start = Nanos.milliseconds(w.startMs)
            switch w.shape {
            case .open: schedule(start, .arrival(workload: i))
            case .closed(let clients, _):
                for c in 0..<clients { schedule(start, .clientSend(workload: i, client: c)) }
            }
        }
        for (i, f) in scenario.timeline.enumerated() { schedule(.milliseconds(f.atMs), .fault(i)) }
        startRegistry()
        while let next = queue.popMin() {
            if next.time > end { break }
            now = next.time
            clock.nowMs = now / 1_000_000
            report.events += 1
            handle(next.event)
        }
        now = end
        finish()
        return report
    }

    func note(_ kind: UInt64, _ a: Int = 0, _ b: Int = 0, _ c: Int = 0) {
        trace.mix(UInt64(bitPattern: now), kind, UInt64(bitPattern: Int64(a)), UInt64(bitPattern: Int64(b)))
        if c != 0 { trace.mix(UInt64(bitPattern: Int64(c))) }
    }

    func traceLine(_ s: @autoclosure () -> String) {
        guard traceLines.count < options.traceLines else { return }
        traceLines.append("\(Double(now / 1000) / 1000) ms \(s())")
    }

    func handle(_ e: MeshEvent) {
        switch e {
        case .arrival(let w):
            note(1, w)
            let wl = scenario.workloads[w]
            if let endMs = wl.endMs, now >= .milliseconds(endMs) { return }
            guard case .open(let rps) = wl.shape else { return }
            // Poisson arrivals: exponential gaps.
            schedule(Nanos(exponential(mean: 1e9 / rps)), .arrival(workload: w))
            send(workload: w, client: nil)
        case .clientSend(let w, let c):
            note(2, w, c)
            let wl = scenario.workloads[w]
            if let endMs = wl.endMs, now >= .milliseconds(endMs) { return }
            send(workload: w, client: c)
        case .attempt(let r):
            note(3, r)
            if let req = requests[r], !req.finished { attempt(req) }
        case .deliver(let j):
            note(4, j)
            deliver(j)
        case .attemptFailed(let r, let a, let outcome):
            note(5, r, a, outcome.code)
            guard let req = requests[r], !req.finished, req.attempt == a, req.endpoint != nil else { return }
            decide(req, outcome)
        case .serviceDone(let j):
            note(6, j)
            serviceDone(j)
        case .response(let r, let a, let status):
            note(7, r, a, status)
            guard let req = requests[r], !req.finished, req.attempt == a, req.endpoint != nil else { return }
            decide(req, .response(status: status))
        case .attemptTimeout(let r, let a):
            note(8, r, a)
            guard let req = requests[r], !req.finished, req.attempt == a, req.endpoint != nil else { return }
            decide(req, .timeout)
        case .deadline(let r):
            note(9, r)
            guard let req = requests[r], !req.finished else { return }
            overallTimeout(req)
        case .probeRound(let s, let cluster):
            note(10, s)
            probeRound(sidecars[s], cluster)
        case .probeResult(let s, let cluster, let ep, let passed):
            note(11, s, passed ? 1 : 0)
            let sc = sidecars[s]
            guard instances[sc.inst].state != .down, sc.clusters.index(forKey: cluster) != nil else { return }
            _ = sc.clusters[cluster]!.recordHealth(ep, passed: passed)
        case .fault(let i):
            note(12, i)
            apply(scenario.timeline[i].fault)
        case .discovery(let s):
            note(13, s)
            discoveryPending.remove(s)
            pushEndpoints(service: s)
        case .leaseExpiry(let i, let gen):
            note(14, i, gen)
            let inst = instances[i]
            guard inst.generation == gen, inst.state == .down, inst.registered else { return }
            inst.registered = false
            report.leaseExpiries += 1
            traceLine("\(inst.id): lease expired, deregistered")
            discoveryChanged(inst.service)
        case .started(let i, let gen):
            note(15, i, gen)
            let inst = instances[i]
            guard inst.generation == gen, inst.state == .starting else { return }
            inst.state = .up
            if registry != nil {
                traceLine("\(inst.id): started; registering")
                agentStart(i)
                reconnectWatch(i)
            } else {
                inst.registered = true
                traceLine("\(inst.id): started and registered")
                discoveryChanged(inst.service)
            }
        case .deployStep(let s, let index, let step):
            note(16, s, index)
            let ids = serviceInstances[s]
            guard index < ids.count else { return }
            stopForDeploy(ids[index])
            schedule(.milliseconds(step), .deployStep(service: s, index: index + 1, stepMs: step))
        case .stopAccepting(let i, let gen):
            note(17, i, gen)
            let inst = instances[i]
            guard inst.generation == gen, inst.state == .draining else { return }
            inst.accepting = false
            if inst.jobs.isEmpty { exitAndRestart(i) }
        case .drainDeadline(let i, let gen):
            note(18, i, gen)
            let inst = instances[i]
            guard inst.generation == gen, inst.state == .draining else { return }
            exitAndRestart(i)
        case .registry(let e):
            handleRegistry(e)
        }
    }

    // MARK: randomness

    func uniform() -> Double { Double(rng.next() >> 11) / Double(1 << 53) }

    func exponential(mean: Double) -> Double { -naturalLog(1 - uniform()) * mean }

    func networkDelay(from: Int, to: Int) -> Nanos? {
        let a = instances[from]
        let b = instances[to]
        return delay(
            from: a.id, scenario.services[a.service].name, to: b.id, scenario.services[b.service].name)
    }

    /// One-way delay of a packet between two processes (by name and service), or nil when a
    /// partition drops it.
    func delay(from a: String, _ sa: String, to b: String, _ sb: String) -> Nanos? {
        if !blocked.isEmpty {
            for l in [Link(from: a, to: b), Link(from: sa, to: sb), Link(from: a, to: sb), Link(from: sa, to: b)]
            where blocked.contains(l) { return nil }
        }
        let n = scenario.network
        var d = Nanos((n.minDelayMs + (n.maxDelayMs - n.minDelayMs) * uniform()) * 1e6)
        if !clogged.isEmpty {
            for l in [Link(from: a, to: b), Link(from: sa, to: sb), Link(from: a, to: sb), Link(from: sa, to: b)] {
                if let extra = clogged[l] { d += extra }
            }
        }
        if loss > 0 {
            // Each lost segment costs a retransmission timeout (Linux's minimum RTO, 200 ms).
            while uniform() < loss { d += .milliseconds(200) }
        }
        return d
    }

    // MARK: load

    func send(workload w: Int, client: Int?) {
        let wl = scenario.workloads[w]
        guard inFlight < options.maxInFlight else {
            report.dropped += 1
            if let client { schedule(.milliseconds(1), .clientSend(workload: w, client: client)) }
            return
        }
        let s = serviceIndex[wl.from]!
        let ids = serviceInstances[s]
        var pick: Int?
        for k in 0..<ids.count {
            let i = ids[(roundRobin[s] + k) % ids.count]
            if instances[i].state == .up || instances[i].state == .draining {
                pick = i
                roundRobin[s] = (roundRobin[s] + k + 1) % ids.count
                break
            }
        }
        guard let caller = pick else {
            report.dropped += 1
            if let client { schedule(.milliseconds(100), .clientSend(workload: w, client: client)) }
            return
        }
        startRequest(
            sidecar: caller, origin: .workload(w, client: client), method: wl.method, host: wl.to, path: wl.path,
            headers: wl.headers)
    }

    func stat(_ key: String) -> Int {
        if let i = statIndex[key] { return i }
        statIndex[key] = stats.count
        stats.append(RouteStats(key: key))
        return stats.count - 1
    }

    // MARK: the caller's sidecar: the same steps as the proxy's exchange

    func startRequest(
        sidecar s: Int, origin: SimRequest.Origin, method: String, host: String, path: String,
        headers: [(String, String)]
    ) {
        let sc = sidecars[s]
        let key = "\(scenario.services[sc.service].name)->\(host)"
        nextRequest += 1
        let req = SimRequest(
            id: nextRequest, sidecar: s, origin: origin, start: now, stat: stat(key), method: method, host: host,
            path: path, headers: headers)
        requests[req.id] = req
        inFlight += 1
        var head = RequestHead(method: method, host: host, path: path)
        if sc.table.matchesHeaders { head.headers = headers }
        guard var route = sc.config.outboundRoute(head, table: sc.table) else {
            return answer(req, LocalAnswer(.noRoute).status, local: .noRoute)
        }
        // Lua policies of the route, on the virtual clock.
        if let specs = sc.config.routePolicies[route.name], !specs.isEmpty {
            switch runRequestPolicies(sc, req, route: route, specs: specs) {
            case .proceed:
                if let ex = req.exchange {
                    if let u = ex.upstream { route.cluster = u }
                    if let t = ex.timeoutMs { route.timeout = .milliseconds(Int64(t)) }
                    if let n = ex.retries { route.retry.numRetries = n }
                }
            case .decision(let d):
                return answer(req, d.status, local: d.kind == "deny" ? .policyDenied : nil)
            case .failed:
                return answer(req, 500, local: .policyError)
            }
        }
        req.route = route
        req.cluster = route.cluster
        if identity != nil, let token = serviceToken(sidecar: s, callee: route.cluster) {
            req.token = token
        }
        if let rl = route.rateLimit {
            var b = sc.limiters[route.name] ?? TokenBucket(rl)
            let ok = b.tryTake(now: now)
            sc.limiters[route.name] = b
            guard ok else { return answer(req, 429, local: .rateLimited) }
        }
        ensureCluster(sc, route.cluster)
        let (refused, trips) = withCluster(sc, route.cluster) { c in (c.admit(now: now), c.breaker.trips) }
        noteBreaker(sc, route.cluster, trips)
        if let refused { return answer(req, refused.status, local: refused) }
        req.admitted = true
        req.retry = RetryState(policy: route.retry, method: method, bodyBytes: 0, start: now, timeout: route.timeout)
        if let deadline = req.retry?.deadline { schedule(deadline - now, .deadline(req: req.id)) }
        attempt(req)
    }

    enum PolicyStep {
        case proceed
        case decision(PolicyDecision)
        case failed
    }

    func runRequestPolicies(_ sc: SimSidecar, _ req: SimRequest, route: Route, specs: [PolicySpec]) -> PolicyStep {
        let chain = policies(sc, route: route.name, specs: specs)
        guard !chain.isEmpty, let vm = sc.vm else { return .failed }
        let ex = policyExchange(req, route: route.name, side: "outbound", remote: instances[sc.inst].id)
        if case .template(let t) = route.match.path { ex.params = RouteTable.matchTemplate(t, ex.path) ?? [:] }
        req.exchange = ex
        req.chain = chain
        let step = requestPolicies(vm, chain, ex)
        if case .proceed = step {} else { req.policiesAnswered = true }
        return step
    }

    func policyFailed(_ f: PolicyFailure) {
        report.policyErrors += 1
        if policyErrors.count < 10 { policyErrors.append(f.description) }
    }

    /// The sidecar's VM with the route's policies loaded (once).
    func policies(_ sc: SimSidecar, route: String, specs: [PolicySpec]) -> [(id: Int, failOpen: Bool)] {
        if let ids = sc.policyIDs[route] { return ids }
        if sc.vm == nil {
            let clock = self.clock
            sc.vm = try? MeshSimulation.policyVM(clockMs: { clock.nowMs }, seed: sc.rng.next())
        }
        var ids: [(id: Int, failOpen: Bool)] = []
        for spec in specs {
            let id = sc.policyIDs.values.reduce(0) { $0 + $1.count } + ids.count + 1
            do {
                _ = try sc.vm?.load(id: id, file: spec.file, source: spec.source, config: spec.config, path: spec.path)
                ids.append((id, spec.failOpen))
            } catch {
                policyFailed(error)
            }
        }
        sc.policyIDs[route] = ids
        return ids
    }

    func ensureCluster(_ sc: SimSidecar, _ name: String) {
        guard sc.clusters.index(forKey: name) == nil else { return }
        var c = ClusterState(sc.config.clusterConfig(name))
        c.setEndpoints(endpoints(of: name, for: sc))
        sc.clusters[name] = c
        if c.config.healthCheck != nil, !sc.probing.contains(name) {
            sc.probing.insert(name)
            schedule(0, .probeRound(sidecar: sc.inst, cluster: name))
        }
    }

    func withCluster<T>(_ sc: SimSidecar, _ name: String, _ body: (inout ClusterState) -> T) -> T {
        let i = sc.clusters.index(forKey: name)!
        return body(&sc.clusters.values[i])
    }

    func endpoints(of cluster: String, for sc: SimSidecar) -> [Endpoint] {
        guard let s = serviceIndex[cluster] else { return sc.config.staticEndpoints[cluster] ?? [] }
        if let eps = registryEndpoints(cluster, sidecar: sc.inst) {
            return eps.isEmpty ? sc.config.staticEndpoints[cluster] ?? [] : eps
        }
        let eps = serviceInstances[s].compactMap { i -> Endpoint? in
            let inst = instances[i]
            guard inst.registered else { return nil }
            return Endpoint(id: inst.id, host: inst.id, port: 8080)
        }
        return eps.isEmpty ? sc.config.staticEndpoints[cluster] ?? [] : eps
    }

    func attempt(_ req: SimRequest) {
        let sc = sidecars[req.sidecar]
        guard var retry = req.retry else { return }
        let tried = retry.tried
        let before = sc.clusters[req.cluster]!.outlier.ejectionsTotal
        let (picked, registered) = withCluster(sc, req.cluster) { c -> (Endpoint?, Int) in
            guard let ep = c.choose(now: now, avoid: tried, rng: &sc.rng) else { return (nil, c.endpoints.count) }
            c.attemptStarted(ep)
            return (ep, c.endpoints.count)
        }
        noteEjections(sc, req.cluster, before)
        guard let ep = picked else {
            _ = registered
            return answer(req, 503, local: .noHealthyEndpoint)
        }
        retry.attemptStarted(endpoint: ep.id)
        req.retry = retry
        req.attempt += 1
        req.endpoint = ep
        req.attemptStart = now
        stats[req.stat].attempts += 1
        if let t = retry.attemptTimeout(now: now) { schedule(t, .attemptTimeout(req: req.id, attempt: req.attempt)) }
        guard let target = instanceIndex[ep.id] else {
            return schedule(0, .attemptFailed(req: req.id, attempt: req.attempt, .connectFailure))
        }
        let connectTimeout = sc.clusters[req.cluster]!.config.connectTimeout
        guard let there = networkDelay(from: sc.inst, to: target), networkDelay(from: target, to: sc.inst) != nil else {
            // SYN or SYN-ACK dropped: the connect times out.
            return schedule(connectTimeout, .attemptFailed(req: req.id, attempt: req.attempt, .connectFailure))
        }
        nextJob += 1
        var p: String?
        if let token = req.token, let route = req.route {
            p = proof(
                sidecar: req.sidecar, route: route, method: req.method, host: req.host, path: req.path, token: token,
                callee: target)
        }
        jobs[nextJob] = SimJob(req: req.id, attempt: req.attempt, inst: target, proof: p)
        schedule(there, .deliver(job: nextJob))
    }

    func decide(_ req: SimRequest, _ outcome: AttemptOutcome) {
        let sc = sidecars[req.sidecar]
        guard var retry = req.retry, let ep = req.endpoint else { return }
        let latency = now - req.attemptStart
        let before = sc.clusters[req.cluster]!.outlier.ejectionsTotal
        let next = withCluster(sc, req.cluster) { c in
            c.afterAttempt(ep, outcome, latency: latency, now: now, retry: &retry, rng: &sc.rng)
        }
        noteEjections(sc, req.cluster, before)
        req.retry = retry
        req.endpoint = nil
        switch next {
        case .retry(let after):
            stats[req.stat].retries += 1
            schedule(after, .attempt(req: req.id))
        case .giveUp(let reason):
            if reason == .retryBudgetExhausted { stats[req.stat].budgetExhausted += 1 }
            answer(req, reason.status, local: reason)
        case .finish:
            switch outcome {
            case .response(let status, _): answer(req, status, local: nil)
            case .connectFailure: answer(req, 503, local: .upstreamConnectFailure)
            case .timeout: answer(req, 504, local: .timeout)
            case .reset, .refusedStream: answer(req, 503, local: .upstreamReset)
            }
        }
    }

    func overallTimeout(_ req: SimRequest) {
        let sc = sidecars[req.sidecar]
        if let ep = req.endpoint {
            let latency = now - req.attemptStart
            let before = sc.clusters[req.cluster]!.outlier.ejectionsTotal
            withCluster(sc, req.cluster) { c in c.attemptFinished(ep, .timeout, latency: latency, now: now) }
            noteEjections(sc, req.cluster, before)
            req.endpoint = nil
        }
        answer(req, 504, local: .timeout)
    }

    /// The request's answer: on_response policies may replace it; the cluster's breaker and
    /// slots learn the outcome; the origin (a workload client or a calling job) continues.
    func answer(_ req: SimRequest, _ status: Int, local: LocalReason?) {
        guard !req.finished else { return }
        // The breaker learns the answer before on_response may replace it (a fallback must
        // not hide failures from it), as in the proxy.
        let failed = status >= 500
        var status = status
        let sc = sidecars[req.sidecar]
        if let ex = req.exchange, let vm = sc.vm {
            ex.attempts = req.retry?.attempts ?? 0
            ex.durationMs = Double(now - req.start) / 1e6
            status = finishPolicies(
                vm, req.chain, ex, status: status, reason: local?.rawValue, respond: !req.policiesAnswered)
            req.exchange = nil
        }
        req.finished = true
        inFlight -= 1
        let latency = now - req.start
        if req.admitted {
            let trips = withCluster(sc, req.cluster) { c -> Int in
                c.requestFinished(failed: failed || status >= 500, latency: latency, now: now, retry: req.retry)
                return c.breaker.trips
            }
            noteBreaker(sc, req.cluster, trips)
        }
        note(20, req.id, status)
        stats[req.stat].record(status: status, local: local, latency: latency, cluster: req.cluster)
        requests[req.id] = nil
        switch req.origin {
        case .workload(let w, let client?):
            guard case .closed(_, let think) = scenario.workloads[w].shape else { return }
            schedule(Nanos(think * 1e6), .clientSend(workload: w, client: client))
        case .workload: break
        case .call(let j): callFinished(j, status: status)
        }
    }

    func noteBreaker(_ sc: SimSidecar, _ cluster: String, _ trips: Int) {
        let before = sc.tripsSeen[cluster] ?? 0
        guard trips > before else { return }
        sc.tripsSeen[cluster] = trips
        report.breakerTripsBySidecar[BreakerKey(sidecar: sc.inst, cluster: cluster), default: 0] += trips - before
        traceLine("\(instances[sc.inst].id): breaker for \(cluster) opened")
    }

    func noteEjections(_ sc: SimSidecar, _ cluster: String, _ before: Int) {
        let c = sc.clusters[cluster]!
        guard c.outlier.ejectionsTotal != before else { return }
        report.ejections[cluster, default: 0] += c.outlier.ejectionsTotal - before
        for ep in c.endpoints where c.outlier.isEjected(ep.id, now: now) {
            guard let i = instanceIndex[ep.id] else { continue }
            let inst = instances[i]
            if inst.firstEjectionAfterFault == nil, inst.ejectedByFault {
                inst.firstEjectionAfterFault = now
                traceLine("\(instances[sc.inst].id) ejected \(ep.id)")
            }
        }
    }

    // MARK: instances

    func deliver(_ j: Int) {
        guard let job = jobs[j] else { return }
        let inst = instances[job.inst]
        guard inst.state == .up || inst.state == .draining, inst.accepting else {
            // Nothing listens: the kernel answers RST.
            jobs[j] = nil
            return reply(job, delayFrom: job.inst, .connectFailure)
        }
        // The callee's sidecar closes connections over its limit at accept: the caller sees a
        // reset. (This also bounds the jobs a hung app can hold.)
        if inst.jobs.count >= sidecars[job.inst].config.limits.maxConnections {
            jobs[j] = nil
            report.connectionsRefused += 1
            return reply(job, delayFrom: job.inst, .reset)
        }
        let spec = scenario.services[inst.service].behavior
        if identity != nil, let req = requests[job.req],
            let refused = inboundGate(
                instance: job.inst, method: req.method, host: req.host, path: req.path, token: req.token,
                proof: job.proof)
        {
            // The inbound sidecar answers; the app never sees the request.
            jobs[j] = nil
            return reply(job, delayFrom: job.inst, status: refused)
        }
        if let req = requests[job.req], let answered = inboundSide(job: j, instance: job.inst, req: req) {
            jobs[j] = nil
            return reply(job, delayFrom: job.inst, status: answered)
        }
        inst.jobs.insert(j)
        if let cap = spec.concurrency, inst.busy >= cap {
            guard inst.queued < spec.queueLimit else {
                inst.jobs.remove(j)
                jobs[j] = nil
                report.queueOverflows += 1
                return reply(job, delayFrom: job.inst, status: 503)
            }
            inst.queue.append(j)
            return
        }
        startJob(j)
    }

    func startJob(_ j: Int) {
        guard var job = jobs[j] else { return }
        let inst = instances[job.inst]
        inst.busy += 1
        job.started = true
        let spec = scenario.services[inst.service].behavior
        if inst.errorRate > 0, uniform() < inst.errorRate { job.status = inst.errorStatus }
        jobs[j] = job
        if inst.hung { return }  // accepted, never answered
        let t = Double(spec.latency.sample(&rng)) * inst.slowFactor
        schedule(Nanos(t), .serviceDone(job: j))
    }

    func serviceDone(_ j: Int) {
        guard let job = jobs[j] else { return }
        let inst = instances[job.inst]
        if inst.hung { return }
        let calls = scenario.services[inst.service].behavior.calls
        if job.status < 400, job.nextCall < calls.count {
            return makeCall(j)
        }
        finishJob(j, status: job.status)
    }

    /// The app calls the next service through its own sidecar.
    func makeCall(_ j: Int) {
        guard var job = jobs[j] else { return }
        let call = scenario.services[instances[job.inst].service].behavior.calls[job.nextCall]
        job.nextCall += 1
        jobs[j] = job
        startRequest(
            sidecar: job.inst, origin: .call(job: j), method: call.method, host: call.service, path: call.path,
            headers: [])
    }

    func callFinished(_ j: Int, status: Int) {
        guard let job = jobs[j], instances[job.inst].state != .down else { return }
        let inst = instances[job.inst]
        if status >= 500 || status == 429 {
            return finishJob(j, status: scenario.services[inst.service].behavior.dependencyFailureStatus)
        }
        serviceDone(j)
    }

    func finishJob(_ j: Int, status: Int) {
        guard let job = jobs.removeValue(forKey: j) else { return }
        let inst = instances[job.inst]
        inst.jobs.remove(j)
        if job.started { inst.busy -= 1 }
        reply(job, delayFrom: job.inst, status: inboundResponse(job: j, instance: job.inst, status: status))
        // Next in the queue.
        while inst.queued > 0, inst.busy < (scenario.services[inst.service].behavior.concurrency ?? .max) {
            let next = inst.queue[inst.queueHead]
            inst.queueHead += 1
            if inst.queueHead > 1024, inst.queueHead * 2 > inst.queue.count {
                inst.queue.removeFirst(inst.queueHead)
                inst.queueHead = 0
            }
            if jobs[next] != nil { startJob(next) }
        }
        if inst.state == .draining, !inst.accepting, inst.jobs.isEmpty { exitAndRestart(job.inst) }
    }

    func reply(_ job: SimJob, delayFrom inst: Int, status: Int) {
        guard let req = requests[job.req], let back = networkDelay(from: inst, to: req.sidecar) else { return }
        schedule(back, .response(req: job.req, attempt: job.attempt, status: status))
    }

    func reply(_ job: SimJob, delayFrom inst: Int, _ outcome: AttemptOutcome) {
        guard let req = requests[job.req], let back = networkDelay(from: inst, to: req.sidecar) else { return }
        schedule(back, .attemptFailed(req: job.req, attempt: job.attempt, outcome))
    }

    /// The process dies: its connections are reset, its sidecar's requests vanish with it,
    /// its registration stays until the lease expires.
    func kill(_ i: Int) {
        let inst = instances[i]
        for j in inst.jobs.sorted() {
            inboundExchanges[j] = nil
            guard let job = jobs.removeValue(forKey: j) else { continue }
            reply(job, delayFrom: i, .reset)
        }
        inst.jobs = []
        inst.queue = []
        inst.queueHead = 0
        inst.busy = 0
        inst.state = .down
        if let reg = registry {
            reg.watchers[i].connected = false
            reg.watchers[i].epoch += 1
        }
        // The sidecar's own outbound requests die with the process.
        for (id, req) in requests.sorted(by: { $0.key < $1.key }) where req.sidecar == i {
            req.finished = true
            req.exchange.map { sidecars[i].vm?.end($0) }
            requests[id] = nil
            inFlight -= 1
            report.lostWithCaller += 1
        }
        // A new process starts with a fresh sidecar: no breaker, ejection or budget state.
        let old = sidecars[i]
        for (name, c) in old.clusters { report.retryBudgetExhausted[name, default: 0] += c.budget.exhaustedCount }
        sidecars[i] = SimSidecar(inst: i, service: old.service, config: old.config, rng: old.rng)
    }

    func apply(_ f: MeshFault) {
        traceLine("fault: \(f)")
        switch f {
        case .crash(let id):
            let i = instanceIndex[id]!
            faultHit(i)
            guard instances[i].state != .down else { return }
            traceLine("\(id): crashed")
            report.crashes += 1
            kill(i)
            if registry == nil {
                let ttl = scenario.services[instances[i].service].sidecar.leaseTTL
                schedule(.seconds(ttl), .leaseExpiry(inst: i, generation: instances[i].generation))
            }
        case .restart(let id):
            let i = instanceIndex[id]!
            guard instances[i].state == .down else { return }
            start(i)
        case .slow(let id, let factor):
            let i = instanceIndex[id]!
            faultHit(i)
            instances[i].slowFactor = factor
        case .hang(let id):
            let i = instanceIndex[id]!
            faultHit(i)
            instances[i].hung = true
        case .errors(let id, let rate, let status):
            let i = instanceIndex[id]!
            faultHit(i)
            instances[i].errorRate = rate
            instances[i].errorStatus = status
        case .recover(let id):
            let i = instanceIndex[id]!
            let inst = instances[i]
            let b = scenario.services[inst.service].behavior
            inst.slowFactor = 1
            inst.errorRate = b.errorRate
            inst.errorStatus = b.errorStatus
            if inst.hung {
                inst.hung = false
                // Requests it sat on are answered now.
                for j in inst.jobs.sorted() where jobs[j]?.started == true {
                    schedule(Nanos(Double(b.latency.sample(&rng))), .serviceDone(job: j))
                }
            }
            inst.ejectedByFault = false
        case .deploy(let svc, let step):
            report.deploys += 1
            schedule(0, .deployStep(service: serviceIndex[svc]!, index: 0, stepMs: step))
        case .partition(let a, let b, let oneWay):
            report.partitions += 1
            blocked.insert(Link(from: a, to: b))
            if !oneWay { blocked.insert(Link(from: b, to: a)) }
            for id in [a, b] { if let i = instanceIndex[id] { faultHit(i) } }
        case .clog(let a, let b, let ms):
            clogged[Link(from: a, to: b)] = Nanos(ms * 1e6)
            clogged[Link(from: b, to: a)] = Nanos(ms * 1e6)
        case .heal:
            blocked = []
            clogged = [:]
        case .loss(let rate):
            loss = rate
        case .registryCrash(let who, let downMs):
            if let id = registryMember(who) { crashMember(id, downMs: downMs) }
        case .registryIsolate(let who, let forMs):
            guard let reg = registry, let id = registryMember(who) else { return }
            isolate([id], among: reg.ids, forMs: forMs)
        case .registryMinority(let forMs):
            guard let reg = registry else { return }
            // The leader and as many others as keep it a minority.
            let leader = leaderID() ?? reg.ids[0]
            let minority = [leader] + reg.ids.filter { $0 != leader }.prefix(max(0, (reg.ids.count - 1) / 2 - 1))
            isolate(Array(minority), among: reg.ids, forMs: forMs)
        case .leaseStorm(let count, let ttl):
            schedule(0, .registry(.storm(count: count, ttl: ttl)))
        case .registryDiskFault(let who):
            guard let id = registryMember(who), let m = registry?.members[id], m.replica != nil else { return }
            traceLine("\(m.name): its disk will fail within 8 operations")
            m.disk.crashAtOperation = m.disk.operations + 1 + Int(rng.next() % 8)
        }
    }

    /// "leader" (the current one, if any) or `registry-N`.
    func registryMember(_ who: String) -> NodeID? {
        if who == "leader" { return leaderID() }
        guard who.hasPrefix("registry-"), let n = UInt64(who.dropFirst(9)), registry?.members[n] != nil else {
            return nil
        }
        return n
    }

    /// Cuts `side` off from the other registry members (clients still reach both sides).
    func isolate(_ side: [NodeID], among all: [NodeID], forMs: Int64) {
        report.partitions += 1
        traceLine("registry: \(side.map { "registry-\($0)" }) cut off from the other members")
        for a in side {
            for b in all where !side.contains(b) {
                registryBlocked.insert(RegLink(a: a, b: b))
                registryBlocked.insert(RegLink(a: b, b: a))
            }
        }
        schedule(.milliseconds(forMs), .registry(.healRegistry))
    }

    func faultHit(_ i: Int) {
        let inst = instances[i]
        inst.lastFaultAt = now
        inst.firstEjectionAfterFault = nil
        inst.ejectedByFault = true
    }

    func start(_ i: Int) {
        let inst = instances[i]
        inst.generation += 1
        inst.state = .starting
        inst.accepting = true
        inst.slowFactor = 1
        inst.hung = false
        let b = scenario.services[inst.service].behavior
        inst.errorRate = b.errorRate
        inst.errorStatus = b.errorStatus
        schedule(.milliseconds(b.startupMs), .started(inst: i, generation: inst.generation))
    }

    /// `tandem run`'s clean stop: deregister, keep serving for the drain grace, stop
    /// accepting, finish in-flight requests (bounded), exit; the deploy then starts it again.
    func stopForDeploy(_ i: Int) {
        let inst = instances[i]
        guard inst.state == .up else { return }
        let cfg = scenario.services[inst.service].sidecar
        inst.registered = false
        inst.state = .draining
        traceLine("\(inst.id): deploy: deregistered, draining")
        if registry != nil { agentStop(i) } else { discoveryChanged(inst.service) }
        schedule(cfg.drainGrace, .stopAccepting(inst: i, generation: inst.generation))
        schedule(cfg.drainGrace + cfg.drainTimeout, .drainDeadline(inst: i, generation: inst.generation))
    }

    func exitAndRestart(_ i: Int) {
        kill(i)
        start(i)
    }

    // MARK: discovery and health

    func discoveryChanged(_ s: Int) {
        guard !discoveryPending.contains(s) else { return }
        discoveryPending.insert(s)
        schedule(.milliseconds(scenario.network.watchDelayMs), .discovery(service: s))
    }

    func pushEndpoints(service s: Int) {
        let name = scenario.services[s].name
        for sc in sidecars where sc.clusters.index(forKey: name) != nil {
            let eps = endpoints(of: name, for: sc)
            withCluster(sc, name) { c in c.setEndpoints(eps) }
        }
    }

    func probeRound(_ sc: SimSidecar, _ cluster: String) {
        guard sidecars[sc.inst] === sc, instances[sc.inst].state != .down,
            let c = sc.clusters[cluster], let hc = c.config.healthCheck
        else { return }
        for ep in c.endpoints {
            guard let i = instanceIndex[ep.id] else { continue }
            let inst = instances[i]
            let result: (Nanos, Bool)
            if let there = networkDelay(from: sc.inst, to: i), let back = networkDelay(from: i, to: sc.inst) {
                switch inst.state {
                case .down, .starting: result = (there + back, false)  // refused
                case .up, .draining:
                    result = inst.hung ? (hc.timeout, false) : (there + back, inst.errorRate < 1)
                }
            } else {
                result = (hc.timeout, false)
            }
            schedule(
                min(result.0, hc.timeout),
                .probeResult(sidecar: sc.inst, cluster: cluster, endpoint: ep.id, passed: result.1))
        }
        schedule(hc.nextDelay(rng: &sc.rng), .probeRound(sidecar: sc.inst, cluster: cluster))
    }

    // MARK: the end

    func finish() {
        report.virtualMs = scenario.durationMs
        report.traceHash = trace.value
        report.traceLines = traceLines
        report.policyErrorSamples = policyErrors
        report.unfinished = inFlight
        for sc in sidecars {
            for (name, c) in sc.clusters {
                report.retryBudgetExhausted[name, default: 0] += c.budget.exhaustedCount
            }
        }
        report.routes = stats.sorted { $0.key < $1.key }
        for r in stats {
            let caller = String(r.key[..<r.key.range(of: "->")!.lowerBound])
            report.callerInstances[r.key] = serviceIndex[caller].map { serviceInstances[$0] } ?? []
        }
        for a in scenario.assertions where report.callerInstances[a.subject] == nil {
            if let r = a.subject.range(of: "->"), let s = serviceIndex[String(a.subject[..<r.lowerBound])] {
                report.callerInstances[a.subject] = serviceInstances[s]
            }
        }
        for inst in instances where inst.firstEjectionAfterFault != nil {
            report.timeToEject[inst.id] = (inst.firstEjectionAfterFault! - inst.lastFaultAt) / 1_000_000
        }
        finishRegistry()
        report.check(scenario.assertions)
    }
}

extension AttemptOutcome {
    var code: Int {
        switch self {
        case .response(let s, _): return s
        case .connectFailure: return 1
        case .reset: return 2
        case .refusedStream: return 3
        case .timeout: return 4
        }
    }
}

/// FNV-1a over 64-bit words: the event trace's fingerprint.
struct TraceHash {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    mutating func mix(_ words: UInt64...) {
        for w in words {
            var x = w
            for _ in 0..<8 {
                value ^= x & 0xff
                value = value &* 0x100_0000_01b3
                x >>= 8
            }
        }
    }
}

/// ln(x) for x > 0 without libm: x = m·2^e with m in [1, 2), ln m = 2·atanh((m−1)/(m+1)).
func naturalLog(_ x: Double) -> Double {
    guard x > 0 else { return -.infinity }
    let e = Double(x.exponent)
    let m = x.significand
    let z = (m - 1) / (m + 1)
    let z2 = z * z
    var term = z
    var sum = 0.0
    var k = 1.0
    while k < 60 {
        sum += term / k
        term *= z2
        k += 2
    }
    return 2 * sum + e * 0.693_147_180_559_945_3
}
