import ArgumentParser
import Dispatch
import Foundation
import NIOCore
import NIOPosix
import TandemConfig
import TandemCore
import TandemEtcdAPI
import TandemEtcdClient
import TandemRegistryServer
import TandemSidecar
import TandemTraffic

/// Flags shared by `tandem run` and `tandem sidecar`.
struct SidecarOptions: ParsableArguments {
    @Option(help: "Service name this instance registers as.") var service: String
    @Option(help: "Port the app listens on (on --app-host).") var appPort: Int
    @Option(help: "Host the app listens on.") var appHost = "127.0.0.1"
    @Option(help: "What the app speaks: http (HTTP/1.1), h2c or grpc (HTTP/2 without TLS).") var appProtocol = "http"
    @Option(help: "Inbound listener HOST:PORT, the address registered for this instance (port 0: any free port).")
    var inbound = "127.0.0.1:0"
    @Option(help: "Outbound listener HOST:PORT the app calls other services through (HTTP_PROXY points here).")
    var outbound = "127.0.0.1:0"
    @Option(help: "Admin listener HOST:PORT (/ready /live /metrics /clusters /routes, POST /drain).")
    var admin = "127.0.0.1:0"
    @Option(
        help: """
            Registry endpoints (Tandem or etcd), comma-separated host:port. Default: 127.0.0.1:2379 if it answers, \
            otherwise an embedded single-node registry there. 'none': static endpoints only.
            """)
    var registry: String?
    @Option(help: "Data directory of the embedded registry (used only when this sidecar hosts it).")
    var registryDataDir = "tandem.registry"
    @OptionGroup(title: "Service identity (docs/security.md)") var join: JoinTokenOptions
    @Option(help: "Instance id (default: SERVICE-PID-RANDOM).") var instance: String?
    @Option(help: "Address other sidecars use to reach the inbound listener (default: its host).")
    var advertise: String?
    @Option(help: "Zone, for zone-aware balancing.") var zone: String?
    @Option(
        name: .customLong("meta"),
        help: ArgumentHelp(
            "Instance metadata, registered with it (repeatable); routes and policies pick endpoint subsets by it.",
            valueName: "key=value"))
    var meta: [String] = []
    @Option(
        name: .customLong("endpoints"), help: "Static endpoints for a service: NAME=HOST:PORT[,HOST:PORT] (repeatable)."
    )
    var endpoints: [String] = []
    @Option(
        name: .customLong("upstream"),
        help: "A local port for one service, any protocol: NAME=PORT (HTTP/1.1 or gRPC) or NAME=PORT/tcp (repeatable).")
    var upstreams: [String] = []
    @Option(help: "HTTP path of the app's health check; without it the check is a TCP connect.")
    var healthPath: String?
    @Option(help: "Check the app with grpc.health.v1.Health/Check for this service name ('' = the whole server).")
    var healthGrpc: String?
    @Option(help: "Seconds between health checks.") var healthInterval: Int64 = 10
    @Option(help: "Health check timeout in milliseconds.") var healthTimeoutMs: Int64 = 1000
    @Option(help: "Failures before the app is marked critical.") var unhealthyThreshold = 3
    @Option(help: "Successes before a critical app is passing again.") var healthyThreshold = 2
    @Option(help: "Registration lease TTL in seconds.") var leaseTtl: Int64 = 10
    @Option(help: "Balancer: peak_ewma, least_request, round_robin, random, ring_hash:HEADER.") var balancer =
        "peak_ewma"
    @Option(help: "Retries per outbound request (default policy: connect-failure, refused-stream, reset, 503).")
    var retries = 1
    @Option(help: "Outbound route timeout in milliseconds, retries included.") var timeoutMs: Int64 = 15_000
    @Option(help: "Consecutive failed requests to a service that open its circuit breaker (0: off).")
    var breakerFailures = 5
    @Option(help: "First open period of a tripped breaker in ms (doubles per repeated trip, up to 60 s).")
    var breakerOpenMs: Int64 = 5000
    @Option(
        name: .customLong("consecutive-5xx"),
        help: "Consecutive 5xx from one instance that eject it (outlier detection; 0: off).")
    var consecutive5xx = 5
    @Option(help: "Base ejection time in ms (× times ejected, capped at 300 s).") var ejectionTimeMs: Int64 = 30_000
    @Option(help: "Seconds to wait for in-flight requests when draining.") var drainTimeout: Int64 = 10
    @Option(help: "Milliseconds between deregistering and closing the inbound listener.") var drainGraceMs: Int64 = 1000
    @Flag(help: "Print a JSON access log line per request on stdout.") var accessLog = false
    @Option(help: "Largest request body accepted, in bytes (413 beyond). Default: no limit; bodies stream.")
    var maxBodyBytes: Int?
    @Option(help: "Lua config file (routes, clusters, upstreams); re-read when it changes.") var config: String?

    func validate() throws {
        for (flag, v) in [("--inbound", inbound), ("--outbound", outbound), ("--admin", admin)] where HostPort(v) == nil
        {
            throw ValidationError("\(flag): expected HOST:PORT, got '\(v)'")
        }
        guard (1...65535).contains(appPort) else { throw ValidationError("--app-port must be 1…65535") }
        guard SidecarConfig.AppProtocol(rawValue: appProtocol) != nil else {
            throw ValidationError("--app-protocol must be http, h2c or grpc")
        }
        guard !service.isEmpty,
            service.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." })
        else { throw ValidationError("--service: letters, digits, '-', '_' and '.' only") }
        guard BalancerKind.parse(balancer) != nil else { throw ValidationError("--balancer: unknown '\(balancer)'") }
        if let m = maxBodyBytes, m < 0 { throw ValidationError("--max-body-bytes: must be ≥ 0, got \(m)") }
        guard healthGrpc == nil || healthPath == nil else {
            throw ValidationError("give --health-path or --health-grpc, not both")
        }
        guard breakerOpenMs > 0, ejectionTimeMs > 0, retries >= 0, timeoutMs > 0 else {
            throw ValidationError("--breaker-open-ms, --ejection-time-ms and --timeout-ms must be > 0; --retries ≥ 0")
        }
        _ = try staticEndpoints()
        _ = try localUpstreams()
    }

    func staticEndpoints() throws -> [String: [Endpoint]] {
        var out: [String: [Endpoint]] = [:]
        for u in endpoints {
            let kv = u.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, !kv[0].isEmpty else {
                throw ValidationError("--endpoints: expected NAME=HOST:PORT, got '\(u)'")
            }
            for a in kv[1].split(separator: ",") {
                guard let hp = HostPort(String(a)), hp.port > 0 else {
                    throw ValidationError("--endpoints \(kv[0]): bad address '\(a)'")
                }
                out[kv[0], default: []].append(Endpoint(id: hp.description, host: hp.host, port: hp.port))
            }
        }
        return out
    }

    func localUpstreams() throws -> [String: LocalUpstream] {
        var out: [String: LocalUpstream] = [:]
        for u in upstreams {
            let kv = u.split(separator: "=", maxSplits: 1).map(String.init)
            let spec = kv.count == 2 ? kv[1].split(separator: "/").map(String.init) : []
            guard kv.count == 2, !kv[0].isEmpty, let port = spec.first.flatMap({ Int($0) }), (1...65535).contains(port),
                spec.count == 1 || (spec.count == 2 && (spec[1] == "tcp" || spec[1] == "http"))
            else { throw ValidationError("--upstream: expected NAME=PORT or NAME=PORT/tcp, got '\(u)'") }
            out[kv[0]] = LocalUpstream(port: port, proto: spec.count == 2 && spec[1] == "tcp" ? .tcp : .http)
        }
        return out
    }

    func sidecarConfig() throws -> SidecarConfig {
        var rnd = SystemRandomNumberGenerator()
        let id = instance ?? "\(service)-\(getpid())-\(String(rnd.next() % 0xFFFF, radix: 16))"
        var c = SidecarConfig(service: service, instance: id, appPort: appPort)
        c.appHost = appHost
        c.appProtocol = SidecarConfig.AppProtocol(rawValue: appProtocol)!
        c.inbound = HostPort(inbound)!
        c.outbound = HostPort(outbound)!
        c.admin = HostPort(admin)!
        c.advertiseHost = advertise
        c.zone = zone
        for m in meta {
            guard let eq = m.firstIndex(of: "="), eq != m.startIndex else {
                throw ValidationError("--meta: expected key=value, got '\(m)'")
            }
            c.metadata[String(m[..<eq])] = String(m[m.index(after: eq)...])
        }
        c.staticEndpoints = try staticEndpoints()
        c.localUpstreams = try localUpstreams()
        var hc = HealthCheckConfig(
            kind: healthGrpc.map { .grpc(service: $0) } ?? healthPath.map { .http(path: $0) } ?? .tcp)
        hc.interval = .seconds(healthInterval)
        hc.timeout = .milliseconds(healthTimeoutMs)
        hc.unhealthyThreshold = unhealthyThreshold
        hc.healthyThreshold = healthyThreshold
        c.appHealth = hc
        c.leaseTTL = leaseTtl
        c.defaultCluster.balancer = BalancerKind.parse(balancer)!
        c.defaultCluster.localZone = zone
        c.defaultCluster.breaker.consecutiveFailures = breakerFailures > 0 ? breakerFailures : nil
        c.defaultCluster.breaker.baseOpen = .milliseconds(breakerOpenMs)
        c.defaultCluster.outlier.consecutive5xx = consecutive5xx > 0 ? consecutive5xx : nil
        c.defaultCluster.outlier.baseEjectionTime = .milliseconds(ejectionTimeMs)
        c.drainTimeout = .seconds(drainTimeout)
        c.drainGrace = .milliseconds(drainGraceMs)
        c.accessLog = accessLog
        c.limits.maxBodyBytes = maxBodyBytes
        var retry = RetryPolicy()
        retry.numRetries = retries
        c.defaultRetry = retry
        c.defaultTimeout = .milliseconds(timeoutMs)
        c.identity.joinToken = try join.sidecarToken()
        c.identity.issuer = join.issuer
        return c
    }

    /// The flags' config with the --config file applied (fails with the file's precise error).
    func loadConfig() throws -> (base: SidecarConfig, effective: SidecarConfig) {
        let base = try sidecarConfig()
        guard let path = config else { return (base, base) }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw RuntimeError("--config: cannot read \(path)")
        }
        do {
            return (
                base,
                try ConfigFile.load(
                    source: text, name: path, base: base, environment: ProcessInfo.processInfo.environment)
            )
        } catch {
            throw RuntimeError("--config: \(error)")
        }
    }

    /// Builds and starts the sidecar, watching the config file when one is given.
    func startSidecar(log: @escaping @Sendable (String) -> Void) throws -> (Sidecar, RegistryServer?) {
        let (base, effective) = try loadConfig()
        let (endpoints, embedded) = try RegistryResolver.resolve(self, log: log)
        let sidecar = Sidecar(config: effective, registry: endpoints, log: log)
        try sidecar.start()
        sidecar.watchConfig(path: config, base: base, environment: ProcessInfo.processInfo.environment)
        return (sidecar, embedded)
    }
}

/// Connects to the registry given, or finds/hosts the default one.
enum RegistryResolver {
    static func resolve(
        _ opt: SidecarOptions, log: @escaping @Sendable (String) -> Void
    ) throws -> (
        [EtcdEndpoint]?, RegistryServer?
    ) {
        if opt.registry == "none" { return (nil, nil) }
        if let r = opt.registry { return (try EtcdEndpoint.parseList(r), nil) }
        let def = EtcdEndpoint(host: "127.0.0.1", port: 2379)
        if answers(def) {
            log("using the registry at \(def)")
            return ([def], nil)
        }
        do {
            var identity = RegistryIdentity.Config()
            identity.joinTokens = try opt.join.tokens()
            identity.issuer = opt.join.issuer
            let server = try startEmbedded(
                dataDir: opt.registryDataDir, host: def.host, port: def.port, identity: identity)
            log("no registry answered at \(def); hosting an embedded one there (data in \(opt.registryDataDir))")
            return ([def], server)
        } catch {
            // Another sidecar may have won the race for the port.
            if answers(def) { return ([def], nil) }
            throw RuntimeError("no registry at \(def) and cannot host one: \(error)")
        }
    }

    static func answers(_ ep: EtcdEndpoint) -> Bool {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let client = EtcdClient(endpoints: [ep], loop: group.next())
        client.callTimeout = .seconds(1)
        client.connectTimeout = .milliseconds(500)
        defer { client.close() }
        return (try? client.status().wait()) != nil
    }

    static func startEmbedded(
        dataDir: String, host: String, port: Int, identity: RegistryIdentity.Config = .init()
    ) throws -> RegistryServer {
        var cfg = RegistryNode.Config()
        cfg.name = "embedded"
        cfg.dataDir = dataDir
        cfg.id = 1
        cfg.peers = [1: "http://127.0.0.1:2380"]
        cfg.peerURLs = ["http://127.0.0.1:2380"]
        cfg.names = [1: "embedded"]
        let server = try RegistryServer(
            config: cfg, identity: identity, wallClockMs: UInt64(Date().timeIntervalSince1970 * 1000))
        do {
            _ = try server.start(host: host, port: port)
        } catch {
            try? server.shutdown()
            throw error
        }
        let node = server.node
        try node.loop.submit { node.setClientURLs(["http://\(host):\(port)"]) }.wait()
        return server
    }
}

func stderrLog(_ prefix: String) -> @Sendable (String) -> Void {
    { line in
        FileHandle.standardError.write(Data("tandem[\(prefix)]: \(line)\n".utf8))
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run an app next to a sidecar: start the sidecar, start the app, register it, drain on exit.",
        discussion: """
            Example: tandem run --service users --app-port 8080 -- ./users-server
            The app gets TANDEM_SERVICE, TANDEM_INSTANCE, TANDEM_OUTBOUND, TANDEM_ADMIN and HTTP_PROXY
            (so http://users/... reaches the users service through the sidecar). SIGTERM/SIGINT drain:
            deregister, finish in-flight requests, stop the app, exit with its code.
            """)

    @OptionGroup var options: SidecarOptions
    @Option(help: "Seconds the app gets to exit after SIGTERM before SIGKILL.") var appStopTimeout: Int64 = 10
    @Argument(parsing: .captureForPassthrough, help: "The app's command line, after --.") var command: [String] = []

    func validate() throws {
        let cmd = command.first == "--" ? Array(command.dropFirst()) : command
        guard !cmd.isEmpty else { throw ValidationError("give the app's command after --, e.g. -- ./server") }
    }

    func run() throws {
        let cmd = command.first == "--" ? Array(command.dropFirst()) : command
        let log = stderrLog(options.service)
        let (sidecar, embedded) = try options.startSidecar(log: log)
        let sup = try Supervisor(
            sidecar: sidecar, embedded: embedded, command: cmd, stopTimeout: .seconds(appStopTimeout), log: log)
        Foundation.exit(sup.run())
    }
}

struct SidecarCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sidecar",
        abstract: "Run only the sidecar, for an app started elsewhere (same flags as `tandem run`).")

    @OptionGroup var options: SidecarOptions

    func run() throws {
        let log = stderrLog(options.service)
        let (sidecar, embedded) = try options.startSidecar(log: log)
        let sup = try Supervisor(sidecar: sidecar, embedded: embedded, command: nil, stopTimeout: .seconds(0), log: log)
        Foundation.exit(sup.run())
    }
}

/// Supervises the app: env, signals, health/registration, drain, exit code.
final class Supervisor: @unchecked Sendable {
    let sidecar: Sidecar
    let embedded: RegistryServer?
    let command: [String]?
    let environment: [String: String]
    private var app: AppProcess?
    let stopTimeout: TimeAmount
    let log: @Sendable (String) -> Void
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var exitCode: Int32 = 0
    private var stopping = false
    private var signalSources: [any DispatchSourceSignal] = []

    init(
        sidecar: Sidecar, embedded: RegistryServer?, command: [String]?, stopTimeout: TimeAmount,
        log: @escaping @Sendable (String) -> Void
    ) throws {
        self.sidecar = sidecar
        self.embedded = embedded
        self.stopTimeout = stopTimeout
        self.log = log
        if let command {
            var env = ProcessInfo.processInfo.environment
            let out = sidecar.outboundAddress
            env["TANDEM_SERVICE"] = sidecar.config.service
            env["TANDEM_INSTANCE"] = sidecar.config.instance
            env["TANDEM_OUTBOUND"] = out.description
            env["TANDEM_ADMIN"] = sidecar.adminAddress.description
            env["TANDEM_INBOUND"] = sidecar.inboundAddress.description
            env["TANDEM_APP_PORT"] = String(sidecar.config.appPort)
            env["HTTP_PROXY"] = "http://\(out)"
            env["http_proxy"] = "http://\(out)"
            env["NO_PROXY"] = "localhost,127.0.0.1,::1"
            env["no_proxy"] = "localhost,127.0.0.1,::1"
            self.command = command
            self.environment = env
        } else {
            self.command = nil
            self.environment = [:]
        }
    }

    func run() -> Int32 {
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            src.setEventHandler { [weak self] in self?.stop(reason: sig == SIGTERM ? "SIGTERM" : "SIGINT") }
            src.resume()
            signalSources.append(src)
        }
        // SIGHUP: re-read the config and policy files now.
        signal(SIGHUP, SIG_IGN)
        let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hup.setEventHandler { [weak self] in
            self?.log("SIGHUP: reloading the config and policies")
            self?.sidecar.reloadConfig()
        }
        hup.resume()
        signalSources.append(hup)
        if let command {
            do {
                let a = try AppProcess.spawn(command, environment: environment)
                lock.lock()
                app = a
                lock.unlock()
                log("started app (pid \(a.pid)): \(command.joined(separator: " "))")
                Thread.detachNewThread { [weak self] in
                    let code = a.waitForExit()
                    self?.appExited(code)
                }
            } catch {
                log("cannot start the app: \(error)")
                finish(code: 127)
                return exitCode
            }
        }
        sidecar.startHealthChecks()
        done.wait()
        return exitCode
    }

    private func appExited(_ code: Int32) {
        lock.lock()
        let wasStopping = stopping
        stopping = true
        lock.unlock()
        if wasStopping {
            log("app exited with code \(code)")
            finish(code: code)
            return
        }
        log("app exited on its own with code \(code); draining")
        _ = try? sidecar.drain().wait()
        finish(code: code)
    }

    private func stop(reason: String) {
        lock.lock()
        if stopping {
            lock.unlock()
            return
        }
        stopping = true
        lock.unlock()
        log("\(reason): draining")
        DispatchQueue.global().async {
            _ = try? self.sidecar.drain().wait()
            self.lock.lock()
            let app = self.app
            self.lock.unlock()
            guard let app, app.isRunning else {
                self.finish(code: 0)
                return
            }
            app.signal(SIGTERM)
            let deadline = DispatchTime.now() + .nanoseconds(Int(self.stopTimeout.nanoseconds))
            DispatchQueue.global().asyncAfter(deadline: deadline) {
                if app.isRunning {
                    self.log("app did not exit within \(self.stopTimeout.nanoseconds / 1_000_000_000)s; SIGKILL")
                    app.signal(SIGKILL)
                }
            }
            // appExited() finishes.
        }
    }

    private func finish(code: Int32) {
        lock.lock()
        exitCode = code
        lock.unlock()
        sidecar.shutdown()
        if let embedded { try? embedded.shutdown() }
        done.signal()
    }
}

/// The supervised app, started with posix_spawn so it gets a clean signal mask and default
/// signal dispositions whatever its parent had blocked or ignored (Foundation's Process passes
/// the caller's mask on: an app started from a thread with SIGTERM blocked would never see it).
final class AppProcess: @unchecked Sendable {
    let pid: pid_t
    private let lock = NSLock()
    private var exited = false

    private init(pid: pid_t) { self.pid = pid }

    enum SpawnError: Error, CustomStringConvertible {
        case failed(String, Int32)
        var description: String {
            switch self {
            case .failed(let cmd, let err): return "cannot start \(cmd): \(String(cString: strerror(err)))"
            }
        }
    }

    static func spawn(_ argv: [String], environment: [String: String]) throws -> AppProcess {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], nil, &attr, cArgs, cEnv)
        guard rc == 0 else { throw SpawnError.failed(argv[0], rc) }
        return AppProcess(pid: pid)
    }

    var isRunning: Bool {
        lock.lock()
        defer { lock.unlock() }
        return !exited
    }

    func signal(_ sig: Int32) {
        if isRunning { kill(pid, sig) }
    }

    /// Blocks until the app exits; its exit code, or 128 + the signal that killed it.
    func waitForExit() -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        lock.lock()
        exited = true
        lock.unlock()
        let sig = status & 0x7F
        return sig == 0 ? (status >> 8) & 0xFF : 128 + sig
    }
}
