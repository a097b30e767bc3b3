import TandemConfig
import TandemCore
import TandemIdentity
import TandemLua
import TandemTraffic

/// Reads a scenario written in Lua (see docs/simulation.md). Unknown keys are errors and every
/// error names the path of the offending value, as in sidecar config files. Sidecar configs
/// are read by `ConfigFile`, the sidecar's own reader.
public enum ScenarioFile {
    public struct Error: Swift.Error, Equatable, CustomStringConvertible {
        public var message: String
        public init(_ m: String) { message = m }
        public var description: String { message }
    }

    /// Bounds on what a scenario may ask for, so a typo cannot ask for a billion instances.
    public static let maxServices = 1_000
    public static let maxInstances = 1_000
    public static let maxDurationMs: Int64 = 24 * 3600 * 1000

    /// `readFile` returns a file's text (sidecar configs named by path, relative to the
    /// scenario's directory), or nil when it cannot be read.
    public static func load(
        source: String, file: String, environment: [String: String] = [:], readFile: (String) -> String?
    ) throws(Error) -> MeshScenario {
        let value: LuaValue
        do {
            value = try LuaConfig.evaluate(source: source, chunkName: file, environment: environment)
        } catch {
            throw Error(error.message)
        }
        return try parse(value, file: file, environment: environment, readFile: readFile)
    }

    public static func parse(
        _ v: LuaValue, file: String, environment: [String: String] = [:], readFile: (String) -> String?
    ) throws(Error) -> MeshScenario {
        let r = Reader(file: file, environment: environment)
        guard case .table = v else { throw Error("\(file): must return a table, got \(v.typeName)") }
        try r.keys(
            v, "",
            allowed: [
                "name", "duration_s", "duration_ms", "network", "services", "workload", "timeline", "expect",
                "registry", "locks", "identity", "kv",
            ])
        var s = MeshScenario()
        if let x = v["name"] { s.name = try r.string(x, "name") }
        if let x = v["duration_s"] { s.durationMs = Int64(try r.number(x, "duration_s", min: 0.001) * 1000) }
        if let x = v["duration_ms"] { s.durationMs = Int64(try r.number(x, "duration_ms", min: 1)) }
        guard s.durationMs <= maxDurationMs else { throw r.fail("duration_s", "at most 24 hours of virtual time") }
        if let n = v["network"] { s.network = try r.network(n) }
        if let g = v["registry"] { s.registry = try r.registry(g) }
        if let i = v["identity"] { s.identity = try r.identity(i) }
        if let k = v["kv"] {
            guard s.registry != nil else {
                throw r.fail("kv", "kv clients need a registry: add registry = { nodes = 3 }")
            }
            s.kv = try r.kv(k)
        }
        if let l = v["locks"] {
            guard s.registry != nil else {
                throw r.fail("locks", "locks need a registry: add registry = { nodes = 3 }")
            }
            guard let list = l.array else { throw r.fail("locks", "a list of { name =, clients = }") }
            for (i, item) in list.enumerated() { s.locks.append(try r.lock(item, "locks[\(i + 1)]")) }
        }

        guard case .table(let services)? = v["services"], !services.isEmpty else {
            throw r.fail("services", "a table of services by name is required, e.g. { users = { instances = 3 } }")
        }
        guard services.count <= maxServices else { throw r.fail("services", "at most \(maxServices) services") }
        for (key, sv) in services.sorted(by: { $0.key.description < $1.key.description }) {
            guard case .string(let name) = key, SidecarConfig.isServiceName(name), !name.contains("->") else {
                throw r.fail("services", "service names are strings such as \"users\", got \(key)")
            }
            s.services.append(
                try r.service(sv, "services.\(name)", name: name, identity: s.identity != nil, readFile: readFile))
        }
        let names = Set(s.services.map(\.name))
        for svc in s.services {
            for call in svc.behavior.calls where !names.contains(call.service) {
                throw r.fail("services.\(svc.name).calls", "calls unknown service \"\(call.service)\"")
            }
        }
        if let w = v["workload"] {
            guard let list = w.array else { throw r.fail("workload", "must be a list of workloads") }
            for (i, item) in list.enumerated() {
                let wl = try r.workload(item, "workload[\(i + 1)]")
                guard names.contains(wl.from) else {
                    throw r.fail("workload[\(i + 1)].from", "unknown service \"\(wl.from)\"")
                }
                s.workloads.append(wl)
            }
        }
        let instances = Set(s.services.flatMap { svc in (1...svc.instances).map { "\(svc.name)-\($0)" } })
        // Partitions and clogs may name the registry (all members) or one member.
        let registryNames: Set<String> =
            s.registry.map { g in Set(["registry"] + (1...g.nodes).map { "registry-\($0)" }) } ?? []
        if let t = v["timeline"] {
            guard let list = t.array else { throw r.fail("timeline", "must be a list of { at_s = …, <fault> }") }
            for (i, item) in list.enumerated() {
                let f = try r.fault(
                    item, "timeline[\(i + 1)]", services: names, instances: instances, registryNames: registryNames)
                s.timeline.append(f)
            }
            s.timeline = s.timeline.enumerated().sorted { ($0.element.atMs, $0.offset) < ($1.element.atMs, $1.offset) }
                .map(\.element)
        }
        if let e = v["expect"] {
            guard let list = e.array else { throw r.fail("expect", "must be a list of expectations") }
            for (i, item) in list.enumerated() {
                s.assertions += try r.expectations(item, "expect[\(i + 1)]", services: names, instances: instances)
            }
        }
        return s
    }

    struct Reader {
        let file: String
        let environment: [String: String]

        func fail(_ path: String, _ m: String) -> Error { Error("\(file): \(path): \(m)") }

        func keys(_ v: LuaValue, _ path: String, allowed: Set<String>) throws(Error) {
            guard case .table(let t) = v else { throw fail(path.isEmpty ? "(top)" : path, "must be a table") }
            for k in t.keys {
                guard case .string(let s) = k, allowed.contains(s) else {
                    throw fail(
                        path.isEmpty ? "\(k)" : "\(path).\(k)",
                        "unknown key; expected one of \(allowed.sorted().joined(separator: ", "))")
                }
            }
        }

        func string(_ v: LuaValue, _ path: String) throws(Error) -> String {
            guard case .string(let s) = v else { throw fail(path, "must be a string, got \(v.typeName)") }
            return s
        }

        func number(_ v: LuaValue, _ path: String, min: Double = 0, max: Double = 1e15) throws(Error) -> Double {
            guard case .number(let n) = v, n.isFinite else { throw fail(path, "must be a number, got \(v.typeName)") }
            guard n >= min, n <= max else { throw fail(path, "must be between \(min) and \(max), got \(n)") }
            return n
        }

        func int(_ v: LuaValue, _ path: String, min: Int = 0, max: Int = Int(Int32.max)) throws(Error) -> Int {
            guard case .number(let n) = v, n.isFinite else { throw fail(path, "must be a number, got \(v.typeName)") }
            guard n == n.rounded(), n >= Double(min), n <= Double(max) else {
                let shown = n == n.rounded() && abs(n) < 1e15 ? "\(Int(n))" : "\(n)"
                throw fail(path, "must be a whole number from \(min) to \(max), got \(shown)")
            }
            return Int(n)
        }

        /// `at_s` or `at_ms` (and the like): milliseconds.
        func millis(_ v: LuaValue, _ path: String, seconds: String, millis: String) throws(Error) -> Int64? {
            if let x = v[seconds] { return Int64((try number(x, "\(path).\(seconds)") * 1000).rounded()) }
            if let x = v[millis] { return Int64(try number(x, "\(path).\(millis)")) }
            return nil
        }

        func network(_ v: LuaValue) throws(Error) -> NetworkSpec {
            try keys(v, "network", allowed: ["delay_ms", "loss", "duplicate", "watch_delay_ms"])
            var n = NetworkSpec()
            if let d = v["delay_ms"] {
                if case .number = d {
                    n.minDelayMs = try number(d, "network.delay_ms", max: 60_000)
                    n.maxDelayMs = n.minDelayMs
                } else if let pair = d.array, pair.count == 2 {
                    n.minDelayMs = try number(pair[0], "network.delay_ms[1]", max: 60_000)
                    n.maxDelayMs = try number(pair[1], "network.delay_ms[2]", min: n.minDelayMs, max: 60_000)
                } else {
                    throw fail("network.delay_ms", "a number or { min, max } in milliseconds")
                }
            }
            if let x = v["loss"] { n.loss = try number(x, "network.loss", max: 0.5) }
            if let x = v["duplicate"] { n.duplicate = try number(x, "network.duplicate", max: 0.5) }
            if let x = v["watch_delay_ms"] { n.watchDelayMs = Int64(try number(x, "network.watch_delay_ms")) }
            return n
        }

        func registry(_ v: LuaValue) throws(Error) -> RegistrySpec {
            try keys(v, "registry", allowed: ["nodes", "tick_ms", "election_ticks", "clock_skew"])
            var g = RegistrySpec()
            if let x = v["nodes"] {
                g.nodes = try int(x, "registry.nodes", min: 1, max: 7)
                guard g.nodes % 2 == 1 else { throw fail("registry.nodes", "1, 3, 5 or 7 members") }
            }
            if let x = v["tick_ms"] { g.tickMs = Int64(try int(x, "registry.tick_ms", min: 1, max: 10_000)) }
            if let x = v["election_ticks"] {
                g.electionTicks = try int(x, "registry.election_ticks", min: 2, max: 1_000)
            }
            if let x = v["clock_skew"] { g.clockSkew = try number(x, "registry.clock_skew", max: 0.2) }
            return g
        }

        func lock(_ v: LuaValue, _ path: String) throws(Error) -> LockWorkload {
            try keys(v, path, allowed: ["name", "clients", "hold_ms", "think_ms", "ttl_s", "start_s", "start_ms"])
            guard let n = v["name"] else { throw fail(path, "needs name") }
            var l = LockWorkload(name: try string(n, "\(path).name"))
            if let x = v["clients"] { l.clients = try int(x, "\(path).clients", min: 1, max: 10_000) }
            if let x = v["hold_ms"] { l.holdMs = Int64(try int(x, "\(path).hold_ms", max: 3_600_000)) }
            if let x = v["think_ms"] { l.thinkMs = Int64(try int(x, "\(path).think_ms", max: 3_600_000)) }
            if let x = v["ttl_s"] { l.ttlS = Int64(try int(x, "\(path).ttl_s", min: 1, max: 86_400)) }
            if let s = try millis(v, path, seconds: "start_s", millis: "start_ms") { l.startMs = s }
            return l
        }

        func latency(_ v: LuaValue, _ path: String) throws(Error) -> LatencyDistribution {
            if case .number = v { return .fixed(try number(v, path, max: 3_600_000)) }
            try keys(v, path, allowed: ["p50", "p90", "p99", "max"])
            guard let p50v = v["p50"] else { throw fail(path, "needs p50 (milliseconds)") }
            let p50 = try number(p50v, "\(path).p50", max: 3_600_000)
            var last = p50
            func q(_ k: String) throws(Error) -> Double? {
                guard let x = v[k] else { return nil }
                let n = try number(x, "\(path).\(k)", min: last, max: 3_600_000)
                last = n
                return n
            }
            let p90 = try q("p90")
            let p99 = try q("p99")
            let mx = try q("max")
            return LatencyDistribution(p50: p50, p90: p90, p99: p99, max: mx)
        }

        func kv(_ v: LuaValue) throws(Error) -> KVWorkload {
            try keys(v, "kv", allowed: ["clients", "keys", "think_ms", "start_s", "start_ms"])
            var k = KVWorkload()
            if let x = v["clients"] { k.clients = try int(x, "kv.clients", min: 1, max: 1_000) }
            if let x = v["keys"] { k.keys = try int(x, "kv.keys", min: 1, max: 1_000) }
            if let x = v["think_ms"] { k.thinkMs = Int64(try int(x, "kv.think_ms", max: 3_600_000)) }
            if let s = try millis(v, "kv", seconds: "start_s", millis: "start_ms") { k.startMs = s }
            return k
        }

        func identity(_ v: LuaValue) throws(Error) -> IdentitySpec {
            var spec = IdentitySpec()
            if case .bool(true) = v { return spec }
            try keys(v, "identity", allowed: ["mesh", "default", "proof"])
            if let x = v["proof"] {
                guard case .bool(let b) = x else { throw fail("identity.proof", "true or false") }
                spec.proof = b
            }
            if let x = v["mesh"] { spec.mesh = try string(x, "identity.mesh") }
            if let x = v["default"] {
                let d = try string(x, "identity.default")
                guard let a = DefaultAccess(rawValue: d) else {
                    throw fail("identity.default", "allow or deny, got \"\(d)\"")
                }
                spec.defaultAccess = a
            }
            return spec
        }

        func service(
            _ v: LuaValue, _ path: String, name: String, identity: Bool, readFile: (String) -> String?
        ) throws(Error)
            -> ServiceSpec
        {
            try keys(
                v, path,
                allowed: [
                    "instances", "sidecar", "latency_ms", "errors", "error_status", "concurrency", "queue", "calls",
                    "dependency_failure_status", "startup_ms",
                ])
            var base = SidecarConfig(service: name, instance: "\(name)-1", appPort: 8080)
            base.seed = 1
            // Identity on: every sidecar has the mesh's join token (allow rules need one).
            if identity { base.identity.joinToken = "simulated" }
            var spec = ServiceSpec(name: name, sidecar: base)
            if let x = v["instances"] { spec.instances = try int(x, "\(path).instances", min: 1, max: maxInstances) }
            if let sc = v["sidecar"] {
                do {
                    switch sc {
                    case .string(let rel):
                        let full = Self.resolve(rel, against: file)
                        guard let text = readFile(full) else { throw fail("\(path).sidecar", "cannot read \(full)") }
                        spec.sidecar = try ConfigFile.load(
                            source: text, name: full, base: base, environment: environment)
                    case .table:
                        spec.sidecar = try ConfigFile.apply(sc, to: base, file: file)
                    default:
                        throw fail("\(path).sidecar", "a config file name or an inline config table")
                    }
                } catch let e as ConfigFile.Error {
                    throw Error(e.message)
                } catch let e as Error {
                    throw e
                } catch {
                    throw Error("\(error)")
                }
            }
            var b = ServiceBehavior()
            if let x = v["latency_ms"] { b.latency = try latency(x, "\(path).latency_ms") }
            if let x = v["errors"] { b.errorRate = try number(x, "\(path).errors", max: 1) }
            if let x = v["error_status"] { b.errorStatus = try int(x, "\(path).error_status", min: 100, max: 599) }
            if let x = v["concurrency"] { b.concurrency = try int(x, "\(path).concurrency", min: 1, max: 1_000_000) }
            if let x = v["queue"] { b.queueLimit = try int(x, "\(path).queue", max: 1_000_000) }
            if let x = v["startup_ms"] { b.startupMs = Int64(try int(x, "\(path).startup_ms", max: 3_600_000)) }
            if let x = v["dependency_failure_status"] {
                b.dependencyFailureStatus = try int(x, "\(path).dependency_failure_status", min: 100, max: 599)
            }
            if let c = v["calls"] {
                guard let list = c.array else { throw fail("\(path).calls", "a list of { service =, path = }") }
                for (i, item) in list.enumerated() {
                    let p = "\(path).calls[\(i + 1)]"
                    try keys(item, p, allowed: ["service", "path", "method"])
                    guard let s = item["service"] else { throw fail(p, "needs service") }
                    var call = ServiceBehavior.Call(service: try string(s, "\(p).service"))
                    if let x = item["path"] { call.path = try string(x, "\(p).path") }
                    if let x = item["method"] { call.method = try string(x, "\(p).method").uppercased() }
                    b.calls.append(call)
                }
            }
            spec.behavior = b
            return spec
        }

        func workload(_ v: LuaValue, _ path: String) throws(Error) -> Workload {
            try keys(
                v, path,
                allowed: [
                    "from", "to", "method", "path", "headers", "rps", "clients", "think_ms", "start_s", "start_ms",
                    "end_s", "end_ms",
                ])
            guard let f = v["from"], let t = v["to"] else { throw fail(path, "needs from and to") }
            let shape: Workload.Shape
            switch (v["rps"], v["clients"]) {
            case (let r?, nil): shape = .open(rps: try number(r, "\(path).rps", min: 0.001, max: 10_000_000))
            case (nil, let c?):
                let think = try v["think_ms"].map { (x) throws(Error) in try number(x, "\(path).think_ms") } ?? 0
                shape = .closed(clients: try int(c, "\(path).clients", min: 1, max: 100_000), thinkMs: think)
            default: throw fail(path, "give either rps (open loop) or clients (closed loop)")
            }
            var w = Workload(from: try string(f, "\(path).from"), to: try string(t, "\(path).to"), shape: shape)
            if let x = v["method"] { w.method = try string(x, "\(path).method").uppercased() }
            if let x = v["path"] { w.path = try string(x, "\(path).path") }
            if let h = v["headers"] {
                guard case .table(let tbl) = h else { throw fail("\(path).headers", "a table of name = value") }
                for (k, hv) in tbl.sorted(by: { $0.key.description < $1.key.description }) {
                    w.headers.append((k.description.lowercased(), try string(hv, "\(path).headers.\(k)")))
                }
            }
            if let s = try millis(v, path, seconds: "start_s", millis: "start_ms") { w.startMs = s }
            w.endMs = try millis(v, path, seconds: "end_s", millis: "end_ms")
            return w
        }

        func fault(
            _ v: LuaValue, _ path: String, services: Set<String>, instances: Set<String>,
            registryNames: Set<String> = []
        ) throws(Error)
            -> TimedFault
        {
            guard let at = try millis(v, path, seconds: "at_s", millis: "at_ms") else {
                throw fail(path, "needs at_s (or at_ms)")
            }
            func instance(_ k: String) throws(Error) -> String {
                let id = try string(v[k]!, "\(path).\(k)")
                guard instances.contains(id) else {
                    throw fail(
                        "\(path).\(k)", "unknown instance \"\(id)\" (instances are named service-1, service-2, …)")
                }
                return id
            }
            func side(_ x: LuaValue, _ p: String) throws(Error) -> String {
                let s = try string(x, p)
                guard services.contains(s) || instances.contains(s) || registryNames.contains(s) else {
                    throw fail(p, "unknown service, instance or registry member \"\(s)\"")
                }
                return s
            }
            func pair(_ k: String) throws(Error) -> (String, String) {
                guard let list = v[k]?.array, list.count == 2 else {
                    throw fail("\(path).\(k)", "a pair { \"a\", \"b\" } of services or instances")
                }
                return (try side(list[0], "\(path).\(k)[1]"), try side(list[1], "\(path).\(k)[2]"))
            }
            let timing: Set<String> = ["at_s", "at_ms"]
            let f: MeshFault
            if v["crash"] != nil {
                try keys(v, path, allowed: timing.union(["crash"]))
                f = .crash(instance: try instance("crash"))
            } else if v["restart"] != nil {
                try keys(v, path, allowed: timing.union(["restart"]))
                f = .restart(instance: try instance("restart"))
            } else if v["slow"] != nil {
                try keys(v, path, allowed: timing.union(["slow", "factor"]))
                guard let x = v["factor"] else { throw fail(path, "slow needs factor (service time multiplier)") }
                f = .slow(instance: try instance("slow"), factor: try number(x, "\(path).factor", min: 0.01, max: 1e6))
            } else if v["hang"] != nil {
                try keys(v, path, allowed: timing.union(["hang"]))
                f = .hang(instance: try instance("hang"))
            } else if v["errors"] != nil {
                try keys(v, path, allowed: timing.union(["errors", "rate", "status"]))
                let rate = try v["rate"].map { (x) throws(Error) in try number(x, "\(path).rate", max: 1) } ?? 1
                let status =
                    try v["status"].map { (x) throws(Error) in try int(x, "\(path).status", min: 100, max: 599) } ?? 503
                f = .errors(instance: try instance("errors"), rate: rate, status: status)
            } else if v["recover"] != nil {
                try keys(v, path, allowed: timing.union(["recover"]))
                f = .recover(instance: try instance("recover"))
            } else if let d = v["deploy"] {
                try keys(v, path, allowed: timing.union(["deploy", "step_s", "step_ms"]))
                let svc = try string(d, "\(path).deploy")
                guard services.contains(svc) else { throw fail("\(path).deploy", "unknown service \"\(svc)\"") }
                let step = try millis(v, path, seconds: "step_s", millis: "step_ms") ?? 5_000
                f = .deploy(service: svc, stepMs: max(1, step))
            } else if v["partition"] != nil {
                try keys(v, path, allowed: timing.union(["partition", "one_way"]))
                let (a, b) = try pair("partition")
                var oneWay = false
                if let x = v["one_way"] {
                    guard case .bool(let o) = x else { throw fail("\(path).one_way", "must be a boolean") }
                    oneWay = o
                }
                f = .partition(a: a, b: b, oneWay: oneWay)
            } else if v["clog"] != nil {
                try keys(v, path, allowed: timing.union(["clog", "delay_ms"]))
                let (a, b) = try pair("clog")
                guard let x = v["delay_ms"] else { throw fail(path, "clog needs delay_ms") }
                f = .clog(a: a, b: b, delayMs: try number(x, "\(path).delay_ms", max: 3_600_000))
            } else if v["heal"] != nil {
                try keys(v, path, allowed: timing.union(["heal"]))
                f = .heal
            } else if let x = v["registry_crash"] {
                try keys(v, path, allowed: timing.union(["registry_crash", "down_s", "down_ms"]))
                let who = try registryMember(x, "\(path).registry_crash")
                let down = try millis(v, path, seconds: "down_s", millis: "down_ms") ?? 5_000
                f = .registryCrash(member: who, downMs: down)
            } else if let x = v["registry_isolate"] {
                try keys(v, path, allowed: timing.union(["registry_isolate", "for_s", "for_ms"]))
                let who = try registryMember(x, "\(path).registry_isolate")
                f = .registryIsolate(
                    member: who, forMs: try millis(v, path, seconds: "for_s", millis: "for_ms") ?? 10_000)
            } else if v["registry_minority"] != nil {
                try keys(v, path, allowed: timing.union(["registry_minority", "for_s", "for_ms"]))
                f = .registryMinority(forMs: try millis(v, path, seconds: "for_s", millis: "for_ms") ?? 10_000)
            } else if let x = v["lease_storm"] {
                try keys(v, path, allowed: timing.union(["lease_storm", "ttl_s"]))
                let n = try int(x, "\(path).lease_storm", min: 1, max: 1_000_000)
                let ttl =
                    try v["ttl_s"].map { (y) throws(Error) in try int(y, "\(path).ttl_s", min: 1, max: 86_400) } ?? 10
                f = .leaseStorm(count: n, ttlS: Int64(ttl))
            } else if let x = v["registry_disk_fault"] {
                try keys(v, path, allowed: timing.union(["registry_disk_fault"]))
                f = .registryDiskFault(member: try registryMember(x, "\(path).registry_disk_fault"))
            } else if let x = v["loss"] {
                try keys(v, path, allowed: timing.union(["loss"]))
                f = .loss(rate: try number(x, "\(path).loss", max: 0.5))
            } else {
                throw fail(
                    path,
                    "names no fault; one of crash, restart, slow, hang, errors, recover, deploy, partition, clog, heal, loss"
                )
            }
            return TimedFault(atMs: at, f)
        }

        func expectations(
            _ v: LuaValue, _ path: String, services: Set<String>, instances: Set<String>
        ) throws(Error)
            -> [MeshAssertion]
        {
            if let i = v["instance"] {
                try keys(v, path, allowed: ["instance", "ejected_within_ms", "ejected_within_s"])
                let id = try string(i, "\(path).instance")
                guard instances.contains(id) else { throw fail("\(path).instance", "unknown instance \"\(id)\"") }
                guard let ms = try millis(v, path, seconds: "ejected_within_s", millis: "ejected_within_ms") else {
                    throw fail(path, "an instance expectation needs ejected_within_ms")
                }
                return [MeshAssertion(subject: id, .ejectedWithinMs(ms))]
            }
            try keys(
                v, path,
                allowed: [
                    "route", "success_rate", "success_rate_max", "p50_ms", "p99_ms", "amplification",
                    "breaker_trips_min",
                    "breaker_trips_max", "ejections_min", "requests_min", "cluster_share",
                ])
            guard let rv = v["route"] else { throw fail(path, "needs route = \"caller->callee\" (or instance = …)") }
            let route = try string(rv, "\(path).route")
            let parts = route.split(separator: ">", maxSplits: 1)
            guard parts.count == 2, parts[0].hasSuffix("-"), services.contains(String(parts[0].dropLast())) else {
                throw fail("\(path).route", "\"caller->callee\" with a known caller service, got \"\(route)\"")
            }
            var out: [MeshAssertion] = []
            func add(_ c: MeshAssertion.Check) { out.append(MeshAssertion(subject: route, c)) }
            if let x = v["success_rate"] { add(.successRateMin(try number(x, "\(path).success_rate", max: 1))) }
            if let x = v["success_rate_max"] {
                add(.successRateMax(try number(x, "\(path).success_rate_max", max: 1)))
            }
            if let x = v["p50_ms"] { add(.latencyMaxMs(quantile: 0.5, ms: try number(x, "\(path).p50_ms"))) }
            if let x = v["p99_ms"] { add(.latencyMaxMs(quantile: 0.99, ms: try number(x, "\(path).p99_ms"))) }
            if let x = v["amplification"] { add(.amplificationMax(try number(x, "\(path).amplification", min: 1))) }
            if let x = v["breaker_trips_min"] { add(.breakerTripsMin(try int(x, "\(path).breaker_trips_min"))) }
            if let x = v["breaker_trips_max"] { add(.breakerTripsMax(try int(x, "\(path).breaker_trips_max"))) }
            if let x = v["ejections_min"] { add(.ejectionsMin(try int(x, "\(path).ejections_min"))) }
            if let x = v["requests_min"] { add(.requestsMin(try int(x, "\(path).requests_min"))) }
            if let x = v["cluster_share"] {
                let p = "\(path).cluster_share"
                try keys(x, p, allowed: ["cluster", "min", "max"])
                guard let c = x["cluster"] else { throw fail(p, "needs cluster") }
                let lo = try x["min"].map { (y) throws(Error) in try number(y, "\(p).min", max: 1) } ?? 0
                let hi = try x["max"].map { (y) throws(Error) in try number(y, "\(p).max", min: lo, max: 1) } ?? 1
                add(.clusterShare(cluster: try string(c, "\(p).cluster"), min: lo, max: hi))
            }
            guard !out.isEmpty else { throw fail(path, "checks nothing") }
            return out
        }

        func registryMember(_ v: LuaValue, _ path: String) throws(Error) -> String {
            let s = try string(v, path)
            guard s == "leader" || (s.hasPrefix("registry-") && Int(s.dropFirst(9)) != nil) else {
                throw fail(path, "\"leader\" or a member name such as \"registry-2\", got \"\(s)\"")
            }
            return s
        }

        /// `rel` against the directory of `base` (absolute paths stay).
        static func resolve(_ rel: String, against base: String) -> String {
            if rel.hasPrefix("/") { return rel }
            guard let slash = base.lastIndex(of: "/") else { return rel }
            return String(base[...slash]) + rel
        }
    }
}
