import Atomics
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import TandemConfig
import TandemCore
import TandemEtcdClient
import TandemHTTP2
import TandemLua
import TandemTraffic

/// A running sidecar: inbound, outbound and admin listeners, discovery watches, the
/// registration of its instance, and active health checks of the app.
public final class Sidecar: @unchecked Sendable {
    public private(set) var config: SidecarConfig
    public let group: MultiThreadedEventLoopGroup
    let ctx: ProxyContext
    let brain: TrafficBrain
    let metrics: SidecarMetrics
    public let registry: EtcdClient?
    private let lock = NIOLock()
    private var watchers: [String: ServiceWatcher] = [:]
    private var firstLoads: [String: EventLoopFuture<Void>] = [:]
    private var loaded: Set<String> = []
    private var healthRNG: SeededRandom
    private var listeners: [String: any Channel] = [:]
    private var registration: ServiceRegistration?
    private var healthTask: RepeatedTask?
    private var appHealth = HealthState()
    private var ready = false
    public let log: @Sendable (String) -> Void
    /// Bound addresses, filled by `start()`.
    public private(set) var inboundAddress = HostPort(host: "", port: 0)
    public private(set) var outboundAddress = HostPort(host: "", port: 0)
    public private(set) var adminAddress = HostPort(host: "", port: 0)

    public init(
        config: SidecarConfig, registry: [EtcdEndpoint]?, threads: Int = System.coreCount,
        log: @escaping @Sendable (String) -> Void
    ) {
        self.config = config
        self.log = log
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        var seedGen = SystemRandomNumberGenerator()
        brain = TrafficBrain(config: config, seed: config.seed ?? seedGen.next())
        healthRNG = SeededRandom(seed: config.seed.map { $0 &+ 1 } ?? seedGen.next())
        let cfg = Self.effective(config)
        self.config = cfg
        let loop = group.next()
        self.registry = registry.map { EtcdClient(endpoints: $0, loop: loop) }
        let sharedMetrics = SidecarMetrics()
        self.metrics = sharedMetrics
        // One write(2) per line: unbuffered, and whole lines stay whole on a pipe.
        let printLine: @Sendable (String) -> Void = { line in FileHandle.standardOutput.write(Data((line + "\n").utf8))
        }
        let accessLog: (@Sendable (String) -> Void)? = config.accessLog ? printLine : nil
        let back = WeakSidecar()
        policies = SidecarPolicies(loops: Array(group.makeIterator()), log: log)
        let identity =
            cfg.identity.joinToken == nil ? nil : SidecarIdentity(config: cfg, metrics: sharedMetrics, log: log)
        gate = InboundGate(identity: identity, metrics: sharedMetrics)
        if let identity, let registry = self.registry {
            registry.authToken = { identity.registryToken() }
        }
        ctx = ProxyContext(
            brain: brain,
            pools: UpstreamPools(
                maxIdlePerEndpoint: config.limits.maxIdlePerEndpoint,
                idleTimeout: .nanoseconds(config.limits.upstreamIdleTimeout),
                maxHeaderBytes: config.limits.maxHeaderBytes, slots: ConnectionSlots(brain: brain),
                opened: { cluster in
                    sharedMetrics.inc("tandem_upstream_connections_opened_total", [("cluster", cluster)])
                }
            ),
            metrics: sharedMetrics,
            limits: config.limits, service: config.service, inboundTimeout: config.inboundTimeout,
            appSpeaksH2: config.appProtocol != .http, accessLog: accessLog, policies: policies, gate: gate,
            ensureCluster: { name in back.value?.ensureCluster(name) })
        upstreamHealth = UpstreamHealthChecker(
            brain: brain, metrics: sharedMetrics, loop: group.next(),
            seed: config.seed.map { $0 &+ 2 } ?? seedGen.next(), log: log)
        back.value = self
        brain.reconfigure(cfg)
    }

    /// Lua policies: a VM per event loop, chains per route.
    let policies: SidecarPolicies

    /// The identity state for `GET /identity` (`{"mode":"off"}` without a join token).
    public func identityJSON() -> String { gate.identity?.json() ?? #"{"mode":"off"}"# }
    /// Inbound credentials: service identity and end-user JWT.
    let gate: InboundGate

    /// Active checks of upstream endpoints (clusters with a `health_check`).
    let upstreamHealth: UpstreamHealthChecker

    /// Starts discovery and active checks for every cluster that configures checks.
    private func startUpstreamChecks() {
        for name in upstreamHealth.wanted() { _ = ensureCluster(name) }
        upstreamHealth.sync()
    }

    /// The config as the brain uses it: the local app added as the static cluster "local"
    /// (no breaker, no ejection; its health comes from the active checks).
    static func effective(_ config: SidecarConfig) -> SidecarConfig {
        var local = ClusterConfig(name: ProxyContext.localCluster)
        local.breaker.consecutiveFailures = nil
        local.outlier.consecutive5xx = nil
        local.outlier.enforceSuccessRate = false
        local.balancer = .roundRobin
        local.connectTimeout = .seconds(1)
        var cfg = config
        cfg.clusters[ProxyContext.localCluster] = local
        cfg.staticEndpoints[ProxyContext.localCluster] = [
            Endpoint(id: "app", host: config.appHost, port: config.appPort)
        ]
        return cfg
    }

    // MARK: config reload

    private var configSource: String?
    private var configTask: RepeatedTask?
    public private(set) var configVersion = 0

    /// Applies a new config atomically: routes and changed clusters are swapped under the
    /// brain's lock; connections and in-flight requests are untouched.
    public func reconfigure(_ new: SidecarConfig) {
        let cfg = Self.effective(new)
        lock.withLock {
            config = cfg
            configVersion += 1
        }
        brain.reconfigure(cfg)
        if lock.withLock({ ready }) { startUpstreamChecks() }
    }

    /// Where registry-stored config lives: `/tandem/config/<service>/sidecar.lua`.
    public var registryConfigKey: String { "/tandem/config/\(config.service)/sidecar.lua" }

    private var configBase: SidecarConfig?
    private var configPath: String?
    private var registryConfig: String?
    private var configEnvironment: [String: String] = [:]
    private var configWatcher: PrefixWatcher?

    /// Keeps the config live from two sources, layered over `base` (the flags): the file at
    /// `path` (re-read every `interval`), then the registry key `registryConfigKey` (watched).
    /// A change is evaluated and applied atomically, or rejected with its precise error while
    /// the running config stays.
    public func watchConfig(
        path: String?, base: SidecarConfig, environment: [String: String], interval: TimeAmount = .seconds(1)
    ) {
        lock.withLock {
            configBase = base
            configPath = path
            configEnvironment = environment
            configSource = path.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) }
        }
        if let path {
            configTask = group.next().scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
                guard let self, let text = try? String(contentsOfFile: path, encoding: .utf8) else { return }
                let changed = self.lock.withLock { () -> Bool in
                    if text == self.configSource { return false }
                    self.configSource = text
                    return true
                }
                if changed {
                    self.applyConfigSources(changed: path)
                } else if let file = self.changedPolicyFile() {
                    self.applyConfigSources(changed: file)
                }
            }
        }
        if let registry {
            let key = registryConfigKey
            let w = PrefixWatcher(client: registry, prefix: key) { [weak self] values in
                guard let self else { return }
                let text = values[key].map { String(decoding: $0, as: UTF8.self) }
                let changed = self.lock.withLock { () -> Bool in
                    if text == self.registryConfig { return false }
                    self.registryConfig = text
                    return true
                }
                if changed { self.applyConfigSources(changed: key) }
            }
            w.log = log
            configWatcher = w
            w.start()
        }
    }

    /// A policy file of the running config whose text changed on disk (policies hot-reload).
    private func changedPolicyFile() -> String? {
        let cfg = lock.withLock { config }
        for spec in cfg.routePolicies.values.flatMap({ $0 }) + cfg.inboundPolicies {
            guard let text = try? String(contentsOfFile: spec.file, encoding: .utf8), text != spec.source else {
                continue
            }
            // Each new text once: a rejected version is not retried every tick.
            let new = lock.withLock { () -> Bool in
                if policyTextsSeen[spec.file] == text { return false }
                policyTextsSeen[spec.file] = text
                return true
            }
            if new { return spec.file }
        }
        return nil
    }
    private var policyTextsSeen: [String: String] = [:]

    /// Re-reads the config and policy files now (SIGHUP).
    public func reloadConfig() {
        let path = lock.withLock { configPath }
        if let path, let text = try? String(contentsOfFile: path, encoding: .utf8) {
            lock.withLock { configSource = text }
        }
        applyConfigSources(changed: "SIGHUP")
    }

    private func applyConfigSources(changed source: String) {
        let (base, path, fileText, regText, env) = lock.withLock {
            (configBase, configPath, configSource, registryConfig, configEnvironment)
        }
        guard var cfg = base else { return }
        do {
            if let path, let fileText {
                cfg = try ConfigFile.load(source: fileText, name: path, base: cfg, environment: env)
            }
            if let regText {
                cfg = try ConfigFile.load(source: regText, name: registryConfigKey, base: cfg, environment: env)
            }
            let running = lock.withLock { config }
            if cfg.inbound != running.inbound || cfg.outbound != running.outbound || cfg.admin != running.admin {
                throw ConfigFile.Error(
                    "listen: the listeners are bound (inbound \(running.inbound), outbound \(running.outbound), admin \(running.admin)); they change only at a restart"
                )
            }
            let applied = cfg
            // Policies compile in every loop's VM first, JWT keys load; the routes change only if
            // they all did.
            policies.install(applied).flatMap { [self] in gate.install(applied, registry: registry, loop: group.next())
            }
            .whenComplete { [self] result in
                switch result {
                case .success:
                    reconfigure(applied)
                    metrics.inc("tandem_config_reloads_total", [("result", "applied")])
                    log(
                        "config applied after a change in \(source): \(applied.routes.count) routes, \(applied.clusters.count) clusters"
                    )
                case .failure(let error):
                    metrics.inc("tandem_config_reloads_total", [("result", "rejected")])
                    log("config change rejected, keeping the running config: \(error)")
                }
            }
        } catch {
            metrics.inc("tandem_config_reloads_total", [("result", "rejected")])
            log("config change rejected, keeping the running config: \(error)")
        }
    }

    /// Lets the proxy context call back into its sidecar without a retain cycle.
    final class WeakSidecar: @unchecked Sendable {
        weak var value: Sidecar?
    }

    // MARK: discovery

    /// Starts watching `name` on first use; returns the first load (bounded wait), or nil when
    /// there is nothing to wait for.
    func ensureCluster(_ name: String) -> EventLoopFuture<Void>? {
        guard name != ProxyContext.localCluster, let registry else { return nil }
        return lock.withLock { () -> EventLoopFuture<Void>? in
            if loaded.contains(name) { return nil }
            if let f = firstLoads[name] { return f }
            let brain = self.brain
            let w = ServiceWatcher(client: registry, service: name) { instances in
                let eps = instances.map { i in
                    Endpoint(
                        id: i.instance, host: i.address, port: i.port, zone: i.zone, passing: i.health == "passing",
                        metadata: i.metadata, proofKey: i.proofKey)
                }
                brain.setDiscovered(name, eps)
            }
            w.log = log
            watchers[name] = w
            // Wait for the first answer at most 2 s; after that, serve with what we have.
            let loop = registry.loop
            let promise = loop.makePromise(of: Void.self)
            w.start().whenComplete { _ in promise.succeed(()) }
            loop.scheduleTask(in: .seconds(2)) { promise.succeed(()) }
            firstLoads[name] = promise.futureResult
            promise.futureResult.whenComplete { _ in
                self.lock.withLock { _ = self.loaded.insert(name) }
                self.upstreamHealth.sync()  // a newly discovered cluster may want active checks
            }
            return promise.futureResult
        }
    }

    // MARK: lifecycle

    /// Binds the listeners. Registration happens in `register()` once the app is healthy.
    public func start() throws {
        // Every loop's VM compiles the policies before the first request can arrive.
        try policies.install(config).wait()
        try gate.install(config, registry: registry, loop: group.next()).wait()
        if let id = gate.identity {
            guard let registry else {
                throw ConfigFile.Error("identity needs a registry (it issues the tokens); this sidecar has none")
            }
            // Inbound requests are verified against the mesh's keys: know them before serving.
            do { try id.start(registry: registry).wait() } catch {
                log("identity: the mesh's signing keys are not known yet (\(error)); retrying in the background")
            }
            log(
                "identity: on as \(config.service) (\(config.identity.effectiveMode.rawValue) inbound, issuer \(config.identity.issuer))"
            )
        }
        let inbound = try listen(config.inbound, side: .inbound)
        let outbound = try listen(config.outbound, side: .outbound)
        let admin = try listenAdmin(config.admin)
        inboundAddress = HostPort(host: config.inbound.host, port: inbound.localAddress?.port ?? 0)
        outboundAddress = HostPort(host: config.outbound.host, port: outbound.localAddress?.port ?? 0)
        adminAddress = HostPort(host: config.admin.host, port: admin.localAddress?.port ?? 0)
        var local: [String: any Channel] = [:]
        for (name, u) in config.localUpstreams.sorted(by: { $0.key < $1.key }) {
            let ch = try listen(
                HostPort(host: u.host, port: u.port), side: .outbound, fixedCluster: name, tcp: u.proto == .tcp)
            local["upstream:\(name)"] = ch
            log("upstream \(name): \(u.proto.rawValue) on \(u.host):\(ch.localAddress?.port ?? u.port)")
        }
        lock.withLock {
            listeners = ["inbound": inbound, "outbound": outbound, "admin": admin].merging(local) { a, _ in a }
            ready = true
        }
        startUpstreamChecks()
        log(
            "sidecar \(config.service)/\(config.instance): inbound \(inboundAddress) → app \(config.appHost):\(config.appPort), outbound \(outboundAddress), admin http://\(adminAddress)"
        )
    }

    private let connections = NIOLockedValueBox<[ObjectIdentifier: any Channel]>([:])
    private let h2Pools = H2Pools()

    private func listen(
        _ addr: HostPort, side: ProxySide, fixedCluster: String? = nil, tcp: Bool = false
    ) throws
        -> any Channel
    {
        let ctx = self.ctx
        let limits = config.limits
        let connections = self.connections
        let h2 = self.h2Pools
        let decoderLimits = {
            var d = NIOHTTPDecoderLimitConfiguration()
            d.maxHeaderListSize = limits.maxHeaderBytes
            d.maxHeaderFieldSize = limits.maxHeaderBytes
            return d
        }()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 32 * 1024, high: 256 * 1024))
            .childChannelInitializer { ch in
                let id = ObjectIdentifier(ch)
                let admitted = connections.withLockedValue { c -> Bool in
                    guard c.count < limits.maxConnections else { return false }
                    c[id] = ch
                    return true
                }
                guard admitted else {
                    ctx.metrics.inc("tandem_connections_rejected_total", [("side", side.rawValue)])
                    return ch.close()
                }
                ch.closeFuture.whenComplete { _ in _ = connections.withLockedValue { $0.removeValue(forKey: id) } }
                if tcp, let cluster = fixedCluster {
                    return ch.setOption(.allowRemoteHalfClosure, value: true).flatMapThrowing {
                        try ch.pipeline.syncOperations.addHandler(TCPProxyHandler(ctx: ctx, cluster: cluster))
                    }
                }
                let sniffer = ProtocolSniffer(
                    http1: { ch in
                        ch.eventLoop.makeCompletedFuture {
                            try HTTPProxyHandler.configure(
                                ch.pipeline.syncOperations,
                                proxy: HTTPProxyHandler(ctx: ctx, side: side, fixedCluster: fixedCluster),
                                compress: ctx.brain.with({ $0.config.usesCompression }), decoderLimits: decoderLimits)
                        }
                    },
                    http2: { ch in
                        HTTP2Connections.configure(ch, mode: .server) { stream in
                            stream.eventLoop.makeCompletedFuture {
                                try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                                try stream.pipeline.syncOperations.addHandler(
                                    H2ProxyHandler(ctx: ctx, side: side, pools: h2, fixedCluster: fixedCluster))
                            }
                        }.map { _ in }
                    })
                return ch.pipeline.addHandler(sniffer)
            }
        return try bindAvoidingAppPort(addr) { try bootstrap.bind(host: $0.host, port: $0.port).wait() }
    }

    private func listenAdmin(_ addr: HostPort) throws -> any Channel {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try ch.pipeline.syncOperations.addHandler(AdminHandler(sidecar: self))
                }
            }
        return try bindAvoidingAppPort(addr) { try bootstrap.bind(host: $0.host, port: $0.port).wait() }
    }

    /// Binds `addr`; given port 0, never to the app's port. The sidecar listens before the app
    /// starts, so the kernel may hand out the very port the app is about to bind — seen in CI:
    /// the outbound listener took it and the app died with "Address already in use". The
    /// unlucky listener stays bound while binding again, so the second port differs.
    func bindAvoidingAppPort(_ addr: HostPort, _ bind: (HostPort) throws -> any Channel) throws -> any Channel {
        try Self.bind(addr, avoiding: config.appPort, bind)
    }

    static func bind(
        _ addr: HostPort, avoiding appPort: Int, _ bind: (HostPort) throws -> any Channel
    ) throws
        -> any Channel
    {
        let first = try bind(addr)
        guard addr.port == 0, first.localAddress?.port == appPort else { return first }
        defer { try? first.close().wait() }
        return try bind(addr)
    }

    // MARK: app health and registration

    /// Checks the app on its own schedule; the first pass registers the instance as passing
    /// (or, without a registry, only flips readiness).
    public func startHealthChecks() {
        scheduleHealthCheck(.zero, loop: group.next())
    }

    private func scheduleHealthCheck(_ delay: TimeAmount, loop: any EventLoop) {
        let hc = config.appHealth
        loop.scheduleTask(in: delay) { [weak self] in
            guard let self, !self.ctx.isDraining else { return }
            self.checkApp(hc, loop: loop).whenComplete { _ in
                let next: TimeAmount = self.lock.withLock {
                    .nanoseconds(hc.nextAppDelay(after: self.appHealth, rng: &self.healthRNG))
                }
                self.scheduleHealthCheck(next, loop: loop)
            }
        }
    }

    /// The app's health as last checked.
    public var appStatus: HealthState.Status { lock.withLock { appHealth.status } }

    private func checkApp(_ hc: HealthCheckConfig, loop: any EventLoop) -> EventLoopFuture<Void> {
        let probe = HealthProbe.run(
            hc.kind, host: config.appHost, port: config.appPort, timeout: .nanoseconds(hc.timeout), loop: loop)
        return probe.map { result in
            let changed = self.lock.withLock {
                self.appHealth.record(passed: result.passed, error: result.error, config: hc)
            }
            self.metrics.inc("tandem_app_health_checks_total", [("result", result.passed ? "pass" : "fail")])
            if changed {
                let status = self.appStatus
                self.log("app health: \(status.rawValue)\(result.error.map { " (\($0))" } ?? "")")
                self.publishHealth(status == .healthy ? "passing" : "critical")
            }
        }
    }

    private func publishHealth(_ health: String) {
        guard let registry else { return }
        let existing = lock.withLock { registration }
        if let existing {
            existing.update { $0.health = health }.whenFailure { e in self.log("health update failed: \(e)") }
            return
        }
        guard health == "passing" else { return }
        let advertise = config.advertiseHost ?? (inboundAddress.host == "0.0.0.0" ? "127.0.0.1" : inboundAddress.host)
        let inst = ServiceInstance(
            service: config.service, instance: config.instance, address: advertise, port: inboundAddress.port,
            protocol: config.appProtocol.rawValue, zone: config.zone, metadata: config.metadata, health: health,
            proofKey: gate.identity?.agreement.x)
        let reg = ServiceRegistration(client: registry, instance: inst, ttl: config.leaseTTL)
        reg.log = log
        lock.withLock { registration = reg }
        reg.start().whenFailure { e in self.log("registration failed: \(e); retrying every second") }
    }

    public var isRegistered: Bool { lock.withLock { registration?.leaseID ?? 0 } > 0 }

    // MARK: drain

    public var isReady: Bool { lock.withLock { ready } && !ctx.isDraining }

    /// Clean shutdown of the inbound side: deregister, wait the grace period so peers see
    /// it, stop accepting, and wait (bounded) for in-flight requests. The outbound listener
    /// keeps serving the app until `shutdown()`.
    public func drain() -> EventLoopFuture<Void> {
        let loop = group.next()
        let already = ctx.draining.exchange(true, ordering: .relaxed)
        if already { return loop.makeSucceededVoidFuture() }
        log("draining: deregistering, then finishing in-flight requests (up to \(config.drainTimeout / 1_000_000) ms)")
        let reg = lock.withLock { registration }
        let deregistered =
            reg?.stop().flatMapErrorThrowing { e in self.log("deregistration failed: \(e) (the lease will expire)") }
            ?? loop.makeSucceededVoidFuture()
        let grace = TimeAmount.nanoseconds(config.drainGrace)
        let timeout = TimeAmount.nanoseconds(config.drainTimeout)
        return deregistered.hop(to: loop).flatMap {
            loop.scheduleTask(in: grace) {}.futureResult
        }.flatMap {
            let inbound = self.lock.withLock { self.listeners.removeValue(forKey: "inbound") }
            return inbound?.close() ?? loop.makeSucceededVoidFuture()
        }.flatMap {
            let (n, t) = (self.ctx.inFlight.load(ordering: .relaxed), self.ctx.openTunnels.load(ordering: .relaxed))
            self.log("drain: inbound listener closed; waiting for \(n) requests and \(t) tunnels")
            return self.waitForInFlight(loop: loop, deadline: .now() + timeout)
        }.map {
            let (n, t) = (self.ctx.inFlight.load(ordering: .relaxed), self.ctx.openTunnels.load(ordering: .relaxed))
            self.log("drain: done with \(n) requests in flight and \(t) tunnels open")
        }
    }

    /// Until no request is in flight and no tunnel (upgrade, TCP proxy) is open, or the
    /// deadline; what is still open then is cut by the shutdown.
    private func waitForInFlight(loop: any EventLoop, deadline: NIODeadline) -> EventLoopFuture<Void> {
        let n = ctx.inFlight.load(ordering: .relaxed)
        let t = ctx.openTunnels.load(ordering: .relaxed)
        if n == 0 && t == 0 { return loop.makeSucceededVoidFuture() }
        if NIODeadline.now() >= deadline {
            log("drain timeout with \(n) requests in flight and \(t) tunnels open")
            return loop.makeSucceededVoidFuture()
        }
        return loop.scheduleTask(in: .milliseconds(20)) {}.futureResult.flatMap {
            self.waitForInFlight(loop: loop, deadline: deadline)
        }
    }

    /// Closes everything. Call `drain()` first for a clean stop.
    public func shutdown() {
        let all = lock.withLock { () -> [any Channel] in
            let l = Array(listeners.values)
            listeners = [:]
            return l
        }
        for ch in all { try? ch.close().wait() }
        for ch in connections.withLockedValue({ Array($0.values) }) { try? ch.close().wait() }
        configTask?.cancel()
        configWatcher?.stop()
        gate.identity?.stop()
        gate.stop()
        upstreamHealth.stop()
        let ws = lock.withLock { Array(watchers.values) }
        for w in ws { w.stop() }
        ctx.pools.closeAll()
        registry?.close()
        try? group.syncShutdownGracefully()
    }

    // MARK: admin views

    func clustersJSON() -> String {
        let now = nowNanos()
        let clusters = brain.with { $0.clusters }
        var parts: [String] = []
        for (name, c) in clusters.sorted(by: { $0.key < $1.key }) {
            let eps = c.endpoints.map { ep -> String in
                let health = c.health[ep.id]?.status.rawValue ?? "unchecked"
                return
                    "{\"id\":\(JSON.quote(ep.id)),\"address\":\(JSON.quote(ep.address)),\"passing\":\(ep.passing),\"health\":\"\(health)\",\"ejected\":\(c.outlier.isEjected(ep.id, now: now)),\"times_ejected\":\(c.outlier.timesEjected(ep.id)),\"active\":\(c.balancer.load(of: ep.id).active),\"proof_key\":\(ep.proofKey.map(JSON.quote) ?? "null")}"
            }
            parts.append(
                "{\"name\":\(JSON.quote(name)),\"breaker\":\"\(c.breaker.stateName)\",\"breaker_trips\":\(c.breaker.trips),\"in_flight\":\(c.gate.requests),\"endpoints\":[\(eps.joined(separator: ","))]}"
            )
        }
        return "{\"clusters\":[\(parts.joined(separator: ","))]}"
    }

    func routesJSON() -> String { "{\"routes\":\(routesArrayJSON())}" }

    func routesArrayJSON() -> String {
        let routes = brain.with { $0.routes.routes }
        let items = routes.map { r -> String in
            let path: String
            switch r.match.path {
            case .exact(let p): path = "exact:\(p)"
            case .prefix(let p): path = "prefix:\(p)"
            case .template(let p): path = "template:\(p)"
            }
            return
                "{\"name\":\(JSON.quote(r.name)),\"host\":\(r.match.host.map(JSON.quote) ?? "null"),\"path\":\(JSON.quote(path)),\"cluster\":\(JSON.quote(r.cluster)),\"retries\":\(r.retry.numRetries)}"
        }
        return "[\(items.joined(separator: ","))]"
    }

    /// The effective config (flags, file and registry layers applied): what `/config` shows.
    func configJSON() -> String {
        let (cfg, version) = lock.withLock { (config, configVersion) }
        func ms(_ n: Nanos?) -> String { n.map { String($0 / 1_000_000) } ?? "null" }
        let clusters = cfg.clusters.sorted(by: { $0.key < $1.key }).map { (name, c) -> String in
            let balancer: String
            switch c.balancer {
            case .roundRobin: balancer = "round_robin"
            case .leastRequest: balancer = "least_request"
            case .peakEWMA: balancer = "peak_ewma"
            case .random: balancer = "random"
            case .ringHash(let h): balancer = "ring_hash:\(h)"
            }
            return "\(JSON.quote(name)):{\"balancer\":\"\(balancer)\",\"connect_timeout_ms\":\(ms(c.connectTimeout))"
                + ",\"max_requests\":\(c.limits.maxRequests)"
                + ",\"breaker\":{\"consecutive_failures\":\(c.breaker.consecutiveFailures.map(String.init) ?? "null"),\"open_ms\":\(ms(c.breaker.baseOpen))}"
                + ",\"outlier\":{\"consecutive_5xx\":\(c.outlier.consecutive5xx.map(String.init) ?? "null"),\"ejection_ms\":\(ms(c.outlier.baseEjectionTime)),\"max_ejection_percent\":\(c.outlier.maxEjectionPercent)}"
                + ",\"retry_budget\":{\"ratio\":\(c.retryBudget.ratio),\"min_per_second\":\(c.retryBudget.minPerSecond)}}"
        }
        let upstreams = cfg.localUpstreams.sorted(by: { $0.key < $1.key }).map {
            "\(JSON.quote($0.key)):{\"port\":\($0.value.port),\"protocol\":\"\($0.value.proto.rawValue)\"}"
        }
        return "{\"service\":\(JSON.quote(cfg.service)),\"instance\":\(JSON.quote(cfg.instance)),\"version\":\(version)"
            + ",\"default_retry\":{\"attempts\":\(cfg.defaultRetry.numRetries)},\"default_timeout_ms\":\(ms(cfg.defaultTimeout))"
            + ",\"routes\":\(routesArrayJSON())"
            + ",\"clusters\":{\(clusters.joined(separator: ","))},\"upstreams\":{\(upstreams.joined(separator: ","))}}"
    }

    func metricsText() -> String {
        let now = nowNanos()
        let clusters = brain.with { $0.clusters }
        var gauges: [(String, [(String, String)], Double)] = []
        gauges.append(("tandem_ready", [], isReady ? 1 : 0))
        gauges.append(("tandem_in_flight_requests", [], Double(ctx.inFlight.load(ordering: .relaxed))))
        gauges.append(("tandem_open_tunnels", [], Double(ctx.openTunnels.load(ordering: .relaxed))))
        for (name, c) in clusters.sorted(by: { $0.key < $1.key }) {
            let routable = c.endpoints.filter { c.isRoutable($0, now: now) }.count
            gauges.append(("tandem_cluster_endpoints", [("cluster", name), ("state", "routable")], Double(routable)))
            gauges.append(
                ("tandem_cluster_endpoints", [("cluster", name), ("state", "total")], Double(c.endpoints.count)))
            gauges.append(("tandem_cluster_breaker_open", [("cluster", name)], c.breaker.stateName == "closed" ? 0 : 1))
            gauges.append(("tandem_cluster_breaker_trips", [("cluster", name)], Double(c.breaker.trips)))
            gauges.append(("tandem_cluster_outlier_ejections", [("cluster", name)], Double(c.outlier.ejectionsTotal)))
            gauges.append(
                ("tandem_cluster_ejected_endpoints", [("cluster", name)], Double(c.outlier.ejectedCount(now: now))))
            gauges.append(("tandem_cluster_overflows", [("cluster", name)], Double(c.gate.overflows)))
            gauges.append(("tandem_cluster_upstream_connections", [("cluster", name)], Double(c.gate.connections)))
            gauges.append(("tandem_cluster_pending_requests", [("cluster", name)], Double(c.gate.pending)))
        }
        return metrics.render(gauges: gauges) + policies.services.prometheus()
    }

    public var metricsSnapshot: SidecarMetrics { metrics }
}
