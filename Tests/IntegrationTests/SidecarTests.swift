import Foundation
import Testing

/// The example apps (examples/users-orders) and the load client.
let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
let usersApp = repoRoot.appendingPathComponent("examples/users-orders/users.py").path
let ordersApp = repoRoot.appendingPathComponent("examples/users-orders/orders.py").path
let loadScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/load.py").path

/// One `tandem run` (or `tandem sidecar`) process with its ports, read from its start line.
final class SidecarUnderTest {
    let child: Child
    let service: String
    var inbound = ""
    var outbound = ""
    var admin = ""
    var startLines: [String] = []

    /// Starts and waits until the instance is registered (app healthy), or only until the
    /// listeners are up when `waitForRegistration` is false or there is no registry.
    init(
        service: String, registry: String, appPort: Int, app: [String]?, extra: [String] = [],
        env: [String: String] = [:], waitForRegistration: Bool = true
    ) throws {
        self.service = service
        var args = [
            app == nil ? "sidecar" : "run", "--service", service, "--app-port", String(appPort), "--registry", registry,
        ]
        args += ["--health-interval", "1", "--drain-grace-ms", "300"] + extra
        if let app { args += ["--"] + app }
        child = try Child(tandemBinary(), args, environment: env)
        startLines = child.readUntil { $0.contains("inbound ") && $0.contains("outbound ") }
        guard let line = startLines.last, line.contains("outbound ") else {
            FileHandle.standardError.write(Data("sidecar \(service) did not start: \(startLines)\n".utf8))
            throw TestFailure("sidecar \(service) did not start: \(startLines)")
        }
        inbound = Self.field(line, after: "inbound ")
        outbound = Self.field(line, after: "outbound ")
        admin = Self.field(line, after: "admin http://")
        if waitForRegistration && registry != "none" {  // without a registry it never registers
            let more = child.readUntil { $0.contains("registered /tandem/services/") }
            startLines += more
            guard more.last?.contains("registered") == true else {
                FileHandle.standardError.write(Data("\(service) never registered: \(more)\n".utf8))
                throw TestFailure("\(service) never registered: \(more)")
            }
        }
    }

    static func field(_ line: String, after marker: String) -> String {
        guard let r = line.range(of: marker) else { return "" }
        return String(line[r.upperBound...].prefix { $0 != " " && $0 != "," })
    }

    var pid: Int32 { child.process.processIdentifier }

    /// Kills the app too: a SIGKILLed `tandem run` cannot stop it.
    deinit {
        for a in childPids(of: pid) { kill(a, SIGKILL) }
        child.stop()
    }
}

/// Direct children of `pid`, from /proc/<pid>/stat (field 4 is the parent).
func childPids(of pid: Int32) -> [Int32] {
    let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return procs.compactMap { p -> Int32? in
        guard let n = Int32(p), let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 && Int32(fields[1]) == pid ? n : nil
    }
}

/// `count` instances of the users example, each behind `tandem run`, registered and healthy.
/// `env(i)` gives instance i extra environment (e.g. FAIL_RATE).
func startUsers(
    _ count: Int, registry: String, extra: [String] = [], waitForRegistration: Bool = true,
    env: (Int) -> [String: String] = { _ in [:] }
) throws -> (instances: [SidecarUnderTest], appPorts: [Int]) {
    var instances: [SidecarUnderTest] = []
    var ports: [Int] = []
    for i in 0..<count {
        let p = try freePort()
        ports.append(p)
        instances.append(
            try SidecarUnderTest(
                service: "users", registry: registry, appPort: p, app: ["/usr/bin/python3", usersApp, String(p)],
                extra: ["--health-path", "/health"] + extra, env: env(i), waitForRegistration: waitForRegistration))
    }
    return (instances, ports)
}

/// A `tandem sidecar` with no app of its own: a client's way into the mesh.
func startClient(registry: String, extra: [String] = []) throws -> SidecarUnderTest {
    try SidecarUnderTest(
        service: "client", registry: registry, appPort: try freePort(), app: nil, extra: extra,
        waitForRegistration: false)
}

/// The value of one Prometheus series (`name{labels}` exactly as rendered) in a `/metrics`
/// body; nil when the series is absent.
func metric(_ body: String, _ series: String) -> Double? {
    body.split(separator: "\n").first { $0.hasPrefix(series + " ") }
        .flatMap { Double($0.dropFirst(series.count + 1)) }
}

/// Blocking HTTP GET/POST through curl: status, headers, body.
@discardableResult
func http(
    _ url: String, host: String? = nil, method: String = "GET", body: String? = nil, proxy: String? = nil,
    headers extra: [String] = []
) throws -> (status: Int, headers: [String: String], body: String) {
    var args = ["-s", "-i", "--max-time", "20", "-X", method]
    if let host { args += ["-H", "Host: \(host)"] }
    for h in extra { args += ["-H", h] }
    if let body { args += ["-H", "content-type: application/json", "--data-binary", body] }
    if let proxy { args += ["-x", "http://\(proxy)"] }
    args.append(url)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self)
    var blocks = text.components(separatedBy: "\r\n\r\n")
    // Skip interim 100-continue blocks.
    while blocks.count > 1, blocks[0].hasPrefix("HTTP/1.1 100") { blocks.removeFirst() }
    let headLines = blocks.first?.components(separatedBy: "\r\n") ?? []
    let status = headLines.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    var headers: [String: String] = [:]
    for l in headLines.dropFirst() {
        if let c = l.firstIndex(of: ":") {
            headers[l[..<c].lowercased()] = l[l.index(after: c)...].trimmingCharacters(in: .whitespaces)
        }
    }
    return (status, headers, blocks.dropFirst().joined(separator: "\r\n\r\n"))
}

/// Runs load.py to completion (or reads progress lines through `onProgress`).
func runLoad(
    target: String, host: String, path: String = "/user/1", count: Int, concurrency: Int = 4,
    onProgress: ((Int) -> Void)? = nil
) throws -> [String: Any] {
    let c = try Child(
        "/usr/bin/python3",
        [
            loadScript, "--target", target, "--host", host, "--path", path, "--count", String(count), "--concurrency",
            String(concurrency),
        ])
    while let line = c.readLine() {
        if line.hasPrefix("progress "), let n = Int(line.dropFirst(9)) { onProgress?(n) }
        if line.hasPrefix("result ") {
            let obj = try JSONSerialization.jsonObject(with: Data(line.dropFirst(7).utf8))
            return obj as? [String: Any] ?? [:]
        }
    }
    throw TestFailure("load client ended without a result")
}

/// Sum of `tandem_requests_total` samples matching every given label, from /metrics.
func inboundRequests(admin: String) throws -> Int {
    let m = try http("http://\(admin)/metrics").body
    var total = 0
    for line in m.split(separator: "\n") where line.hasPrefix("tandem_requests_total{side=\"inbound\"") {
        total += Int(line.split(separator: " ").last ?? "0") ?? 0
    }
    return total
}

@Suite(.serialized) struct SidecarTests {
    @Test func twoServicesCallEachOtherThroughTheirSidecars() throws {
        let reg = try RegistryUnderTest()
        let usersPort = try freePort()
        let ordersPort = try freePort()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: usersPort,
            app: ["/usr/bin/python3", usersApp, String(usersPort)], extra: ["--health-path", "/health"])
        let orders = try SidecarUnderTest(
            service: "orders", registry: reg.endpoint, appPort: ordersPort,
            app: ["/usr/bin/python3", ordersApp, String(ordersPort)])

        // orders' app calls http://users/user/1 through HTTP_PROXY → orders' outbound → users' inbound.
        let r = try http("http://\(orders.inbound)/order/1")
        #expect(r.status == 200)
        #expect(r.body.contains(#""user": {"id": 1, "name": "Alice"}"#))
        #expect(r.headers["x-users-instance"]?.hasPrefix("users-") == true)

        // Calling users by name on the outbound listener, origin-form with Host and absolute-form.
        #expect(try http("http://\(orders.outbound)/user/2", host: "users").body.contains("Bob"))
        #expect(try http("http://users/user", proxy: orders.outbound).body.contains("Alice"))
        let created = try http(
            "http://\(orders.outbound)/user", host: "users", method: "POST", body: #"{"name":"Carol"}"#)
        #expect(created.status == 200 && created.body.contains(#""name": "Carol""#))
        let invalid = try http("http://\(orders.outbound)/user", host: "users", method: "POST", body: #"{"name":""}"#)
        #expect(invalid.status == 400)  // the app's own answer passes through untouched

        // A trace context is generated and reaches the app.
        let echoed = try http("http://\(orders.outbound)/echo-headers", host: "users").body
        #expect(echoed.contains("\"traceparent\": \"00-"))

        // Local answers: JSON body and tandem-error naming the reason.
        let missing = try http("http://\(orders.outbound)/x", host: "payments")
        #expect(missing.status == 503)
        #expect(missing.headers["tandem-error"] == "no-healthy-endpoint")
        #expect(missing.body.contains(#""message":"no instance of \"payments\" is registered""#))
        let noRoute = try http("http://\(orders.outbound)/x", host: "127.0.0.1")
        #expect(noRoute.status == 404 && noRoute.headers["tandem-error"] == "no-route")

        // Both instances are registered as passing under their leases.
        let listed = try etcdctl(reg.endpoint, ["get", "--prefix", "/tandem/services/"]).output
        #expect(listed.contains(#""service":"users""#) && listed.contains(#""service":"orders""#))
        #expect(listed.components(separatedBy: #""health":"passing""#).count == 3)

        // Admin endpoints.
        #expect(try http("http://\(users.admin)/ready").status == 200)
        let clusters = try http("http://\(orders.admin)/clusters").body
        #expect(clusters.contains(#""name":"users""#))
        #expect(try inboundRequests(admin: users.admin) >= 5)
        withExtendedLifetime((reg, users, orders)) {}
    }

    @Test func cleanSigtermDrainsWithoutAFailedRequestAndDeregisters() throws {
        let reg = try RegistryUnderTest()
        let ports = [try freePort(), try freePort()]
        let instances = try ports.map { p in
            try SidecarUnderTest(
                service: "users", registry: reg.endpoint, appPort: p, app: ["/usr/bin/python3", usersApp, String(p)],
                extra: ["--health-path", "/health"])
        }
        let clientPort = try freePort()
        let client = try SidecarUnderTest(
            service: "client", registry: reg.endpoint, appPort: clientPort, app: nil, waitForRegistration: false)
        _ = try http("http://\(client.outbound)/user", host: "users")  // discovery warmed up

        let victim = instances[0]
        var signalled = false
        let result = try runLoad(target: client.outbound, host: "users", count: 1500, concurrency: 4) { n in
            if n >= 300 && !signalled {
                signalled = true
                kill(victim.pid, SIGTERM)
            }
        }
        let victimLog = victim.child.readUntil { _ in false }  // to EOF: the process has exited
        victim.child.process.waitUntilExit()
        #expect(signalled)
        #expect(victim.child.process.terminationStatus == 0, "victim log: \(victimLog)")  // the app's own exit code
        #expect(result["ok"] as? Int == 1500, "load result: \(result)")
        #expect((result["errors"] as? [String: Int])?.isEmpty == true)
        let keys = try etcdctl(reg.endpoint, ["get", "--prefix", "/tandem/services/users/", "--keys-only"]).output
        #expect(keys.split(separator: "\n").filter { !$0.isEmpty }.count == 1)
        withExtendedLifetime((reg, instances, client)) {}
    }

    @Test func retriesWithABudgetHideAFlakyInstanceWithoutAStorm() throws {
        let reg = try RegistryUnderTest()
        let (instances, _) = try startUsers(3, registry: reg.endpoint) { i in i == 0 ? ["FAIL_RATE": "0.2"] : [:] }
        let client = try startClient(registry: reg.endpoint)
        _ = try http("http://\(client.outbound)/health", host: "users")
        let before = try instances.map { try inboundRequests(admin: $0.admin) }.reduce(0, +)
        let offered = 2000
        let result = try runLoad(target: client.outbound, host: "users", count: offered, concurrency: 4)
        let after = try instances.map { try inboundRequests(admin: $0.admin) }.reduce(0, +)
        let ok = result["ok"] as? Int ?? 0
        let upstream = after - before
        #expect(Double(ok) / Double(offered) >= 0.99, "load result: \(result)")
        #expect(Double(upstream) <= 1.25 * Double(offered), "upstream saw \(upstream) requests for \(offered) offered")
        #expect(upstream > offered)  // some retries did happen
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains("tandem_retries_total{side=\"outbound\",cluster=\"users\"}"))
        withExtendedLifetime((reg, instances, client)) {}
    }

    @Test func aKilledInstanceCostsNoRequests() throws {
        let reg = try RegistryUnderTest()
        let (instances, appPorts) = try startUsers(3, registry: reg.endpoint, extra: ["--lease-ttl", "3"])
        let client = try startClient(registry: reg.endpoint)
        _ = try http("http://\(client.outbound)/user", host: "users")
        var killed = false
        let result = try runLoad(target: client.outbound, host: "users", count: 3000, concurrency: 4) { n in
            if n >= 500 && !killed {
                killed = true
                // kill -9 both the sidecar and its app: no drain, no deregistration.
                let appPid = pidListening(on: appPorts[0])
                kill(instances[0].pid, SIGKILL)
                if let appPid { kill(appPid, SIGKILL) }
            }
        }
        #expect(killed)
        let ok = result["ok"] as? Int ?? 0
        #expect(Double(ok) / 3000 >= 0.999, "load result: \(result)")
        let clusters = try http("http://\(client.admin)/clusters").body
        #expect(clusters.contains(#""name":"users""#))
        withExtendedLifetime((reg, instances, client)) {}
    }
}

/// The PID of the process listening on 127.0.0.1:port, from /proc (Linux).
func pidListening(on port: Int) -> Int32? {
    guard let tcp = try? String(contentsOfFile: "/proc/net/tcp", encoding: .utf8) else { return nil }
    let hexPort = String(format: ":%04X", port)
    var inode: String?
    for line in tcp.split(separator: "\n").dropFirst() {
        let f = line.split(separator: " ")
        if f.count > 9, f[1].hasSuffix(hexPort), f[3] == "0A" { inode = String(f[9]) }
    }
    guard let inode else { return nil }
    let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    for p in procs where Int32(p) != nil {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(p)/fd")) ?? []
        for fd in fds {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(p)/fd/\(fd)"),
                target == "socket:[\(inode)]"
            {
                return Int32(p)
            }
        }
    }
    return nil
}

/// Polls `condition` until it holds or `attempts` run out (each a real request, 50 ms apart).
func eventually(_ attempts: Int = 200, _ condition: () throws -> Bool) rethrows -> Bool {
    for _ in 0..<attempts {
        if try condition() { return true }
        usleep(50_000)
    }
    return false
}

@Suite(.serialized) struct ResilienceIntegrationTests {
    @Test func theBreakerOpensOnFailuresAndClosesAfterRecovery() throws {
        let reg = try RegistryUnderTest()
        let (started, ports) = try startUsers(1, registry: reg.endpoint)
        let (users, port) = (started[0], ports[0])
        let client = try SidecarUnderTest(
            service: "client", registry: reg.endpoint, appPort: try freePort(), app: nil,
            extra: ["--breaker-failures", "3", "--breaker-open-ms", "300", "--retries", "0"], waitForRegistration: false
        )
        #expect(try http("http://\(client.outbound)/user", host: "users").status == 200)
        try http("http://127.0.0.1:\(port)/admin/fail-rate", method: "POST", body: "1")
        var statuses: [String] = []
        for _ in 0..<6 {
            let r = try http("http://\(client.outbound)/user", host: "users")
            statuses.append("\(r.status):\(r.headers["tandem-error"] ?? "app")")
        }
        #expect(statuses.prefix(3).allSatisfy { $0 == "503:app" }, "\(statuses)")
        #expect(statuses.dropFirst(3).allSatisfy { $0 == "503:circuit-open" }, "\(statuses)")
        #expect(try http("http://\(client.admin)/clusters").body.contains(#""name":"users","breaker":"open""#))

        try http("http://127.0.0.1:\(port)/admin/fail-rate", method: "POST", body: "0")
        // After the open period a probe goes through, succeeds, and the breaker closes.
        #expect(try eventually { try http("http://\(client.outbound)/user", host: "users").status == 200 })
        let clusters = try http("http://\(client.admin)/clusters").body
        #expect(clusters.contains(#""name":"users","breaker":"closed""#))
        #expect(clusters.contains(#""breaker_trips":1"#))
        withExtendedLifetime((reg, users, client)) {}
    }

    @Test func aFailingInstanceIsEjectedAndComesBackAfterItRecovers() throws {
        let reg = try RegistryUnderTest()
        let (instances, ports) = try startUsers(3, registry: reg.endpoint)
        let client = try SidecarUnderTest(
            service: "client", registry: reg.endpoint, appPort: try freePort(), app: nil,
            // Round robin keeps sending it its share; peak-EWMA would steer away after one failure
            // (its failure penalty) before outlier detection ever sees three in a row.
            extra: [
                "--consecutive-5xx", "3", "--ejection-time-ms", "5000", "--retries", "0", "--breaker-failures", "0",
                "--balancer", "round_robin",
            ],
            waitForRegistration: false)
        _ = try http("http://\(client.outbound)/user", host: "users")
        try http("http://127.0.0.1:\(ports[0])/admin/fail-rate", method: "POST", body: "1")
        let bad = try http("http://127.0.0.1:\(ports[0])/user").headers["x-instance"] ?? "?"
        var failures = 0
        for _ in 0..<30 where try http("http://\(client.outbound)/user", host: "users").status != 200 { failures += 1 }
        // Three 5xx in a row eject it; without ejection round robin would send it 10 of the 30.
        #expect(failures >= 3 && failures < 10, "failures: \(failures)")
        let ejected = try http("http://\(client.admin)/clusters").body
        #expect(ejected.contains(#""id":"\#(bad)","address""#))
        #expect(ejected.contains(#""ejected":true"#))

        try http("http://127.0.0.1:\(ports[0])/admin/fail-rate", method: "POST", body: "0")
        #expect(
            try eventually {
                try http("http://\(client.outbound)/user", host: "users").headers["x-instance"] == bad
            })
        #expect(!(try http("http://\(client.admin)/clusters").body.contains(#""ejected":true"#)))
        withExtendedLifetime((reg, instances, client)) {}
    }
}

@Suite struct ConfigReloadTests {
    @Test func aBadConfigChangeIsRejectedAndTrafficContinues() throws {
        let reg = try RegistryUnderTest()
        let users = try startUsers(1, registry: reg.endpoint).instances[0]
        let dir = try TempDirectory()
        let file = dir.url.appendingPathComponent("client.lua")
        try #"return { routes = { { name = "shop", host = "shop", cluster = "users" } } }"#.write(
            to: file, atomically: true, encoding: .utf8)
        let client = try SidecarUnderTest(
            service: "client", registry: reg.endpoint, appPort: try freePort(), app: nil,
            extra: ["--config", file.path], waitForRegistration: false)
        #expect(try http("http://\(client.outbound)/user/1", host: "shop").body.contains("Alice"))

        // A change with a mistake: rejected with its reason, the running config stays.
        try #"return { routes = { { name = "shop", host = "shop", clster = "users" } } }"#.write(
            to: file, atomically: true, encoding: .utf8)
        #expect(
            try eventually {
                try http("http://\(client.admin)/metrics").body.contains(
                    #"tandem_config_reloads_total{result="rejected"} 1"#)
            })
        for _ in 0..<20 { #expect(try http("http://\(client.outbound)/user/1", host: "shop").status == 200) }

        // A valid change is applied: "shop" now goes to a service with no instances.
        try #"return { routes = { { name = "shop", host = "shop", cluster = "inventory" } } }"#.write(
            to: file, atomically: true, encoding: .utf8)
        #expect(
            try eventually {
                try http("http://\(client.outbound)/user/1", host: "shop").headers["tandem-error"]
                    == "no-healthy-endpoint"
            })
        let log = client.child.readUntil { $0.contains("config change rejected") }
        #expect(log.last?.contains("routes[1].clster: unknown setting") == true, "\(log)")
        // /config shows the effective config, as JSON.
        let shown = try JSONSerialization.jsonObject(with: Data(try http("http://\(client.admin)/config").body.utf8))
        let routes = (shown as? [String: Any])?["routes"] as? [[String: Any]]
        #expect(routes?.first?["cluster"] as? String == "inventory", "\(shown)")
        #expect((shown as? [String: Any])?["version"] as? Int == 1)  // one applied change; the rejected one is not
        withExtendedLifetime((reg, users, client)) {}
    }

    @Test func configStoredInTheRegistryIsAppliedLiveAndBadChangesAreRejected() throws {
        let reg = try RegistryUnderTest()
        let users = try startUsers(1, registry: reg.endpoint).instances[0]
        let client = try startClient(registry: reg.endpoint)
        let key = "/tandem/config/client/sidecar.lua"
        #expect(
            try http("http://\(client.outbound)/user/1", host: "shop").headers["tandem-error"] == "no-healthy-endpoint")

        try etcdctl(
            reg.endpoint, ["put", key, #"return { routes = { { name = "shop", host = "shop", cluster = "users" } } }"#])
        #expect(try eventually { try http("http://\(client.outbound)/user/1", host: "shop").status == 200 })

        try etcdctl(reg.endpoint, ["put", key, "return { routes = "])
        let log = client.child.readUntil { $0.contains("config change rejected") }
        #expect(log.last?.contains("\(key):1: unexpected symbol near '<eof>'") == true, "\(log)")
        for _ in 0..<10 { #expect(try http("http://\(client.outbound)/user/1", host: "shop").status == 200) }

        try etcdctl(reg.endpoint, ["del", key])  // back to the flags alone
        #expect(
            try eventually {
                try http("http://\(client.outbound)/user/1", host: "shop").headers["tandem-error"]
                    == "no-healthy-endpoint"
            })
        withExtendedLifetime((reg, users, client)) {}
    }

    @Test func aBadConfigFileStopsStartupWithItsReason() throws {
        let dir = try TempDirectory()
        let file = dir.url.appendingPathComponent("bad.lua")
        try "return { routes = { { host = 'x' } } }".write(to: file, atomically: true, encoding: .utf8)
        let c = try Child(
            tandemBinary(),
            ["sidecar", "--service", "x", "--app-port", "1", "--registry", "none", "--config", file.path])
        let out = c.readUntil { _ in false }.joined(separator: "\n")
        c.process.waitUntilExit()
        #expect(c.process.terminationStatus != 0)
        #expect(out.contains("--config: \(file.path): routes[1]: cluster is required"), "\(out)")
    }
}

let grpcService = repoRoot.appendingPathComponent("examples/grpc/user_service.py").path

@Suite struct HTTP2AndGRPCTests {
    /// A real gRPC client (Debian's python3-grpcio) calls a real gRPC server through two sidecars.
    @Test func allFourGRPCModesKeepTheirTrailersThroughTwoSidecars() throws {
        let reg = try RegistryUnderTest()
        let port = try freePort()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port,
            app: ["/usr/bin/python3", grpcService, "server", String(port)], extra: ["--app-protocol", "grpc"])
        let client = try startClient(registry: reg.endpoint)
        let c = try Child("/usr/bin/python3", [grpcService, "client", client.outbound, "users"])
        let lines = c.readUntil { $0.hasPrefix("{") }
        let obj = try JSONSerialization.jsonObject(with: Data((lines.last ?? "").utf8)) as? [String: Any] ?? [:]
        #expect((obj["unary"] as? [String: Any])?["name"] as? String == "Alice", "\(lines)")
        let trailers = obj["unary_trailers"] as? [String: String] ?? [:]
        #expect(trailers["x-served-by"] == "user-service")
        #expect(trailers["x-time-remaining"] != nil)  // grpc-timeout crossed both sidecars
        #expect(
            (obj["server_stream"] as? [[String: Any]])?.compactMap { $0["name"] as? String } == [
                "Alice", "Bob", "Carol",
            ])
        #expect((obj["client_stream"] as? [String: Any])?["received"] as? Int == 5)
        #expect(obj["bidi"] as? [String] == ["hi", "there", "!"])
        let err = obj["error"] as? [String: Any] ?? [:]
        #expect(err["code"] as? String == "NOT_FOUND")
        #expect(err["details"] as? String == "no such user")
        #expect((err["trailers"] as? [String: String])?["x-served-by"] == "user-service")

        // The client sidecar counted the calls by gRPC status.
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"cluster="users",status="200",grpc_status="5"} 1"#))
        withExtendedLifetime((reg, users, client)) {}
    }

    /// HTTP/2 upstream connections take max_connections slots like HTTP/1.1 ones (they used to
    /// be uncounted: the limit did not hold for h2 and gRPC, and the gauge said 0).
    @Test func http2UpstreamConnectionsCountTowardMaxConnections() throws {
        let reg = try RegistryUnderTest()
        let users = try startUsers(2, registry: reg.endpoint).instances
        let dir = try TempDirectory()
        let config = dir.url.appendingPathComponent("client.lua")
        try #"return { clusters = { users = { balancer = "round_robin", limits = { max_connections = 1 } } } }"#
            .write(to: config, atomically: true, encoding: .utf8)
        let client = try startClient(registry: reg.endpoint, extra: ["--config", config.path])
        func h2get() throws -> (status: String, error: String) {
            let r = try curl(["--http2-prior-knowledge", "-H", "Host: users", "http://\(client.outbound)/user/1"])
            return (String(r.status), r.head["tandem-error"] ?? "")
        }
        #expect(try h2get().status == "200")  // the one slot: a connection to one instance
        // Both instances discovered (bounded polling), so round robin alternates between them.
        for _ in 0..<200 {
            if try http("http://\(client.admin)/clusters").body.components(separatedBy: "\"id\"").count >= 3 { break }
        }
        let more = try (0..<3).map { _ in try h2get() }
        // Whatever goes to the other instance (or to another event loop) needs a second
        // connection: refused as an overflow, not a connect failure.
        #expect(more.contains { $0 == ("503", "overflow") }, "\(more)")
        #expect(more.allSatisfy { $0 == ("200", "") || $0 == ("503", "overflow") }, "\(more)")
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_cluster_upstream_connections{cluster="users"} 1"#), "\(metrics)")
        withExtendedLifetime((reg, users, client)) {}
    }

    /// An HTTP/2 client reaches an HTTP/1.1 app: h2 on both sidecar hops, HTTP/1.1 to the app.
    @Test func h2cRequestsReachAnHTTP1App() throws {
        let reg = try RegistryUnderTest()
        let users = try startUsers(1, registry: reg.endpoint).instances[0]
        let client = try startClient(registry: reg.endpoint)
        for (method, body, expect) in [("GET", nil, "Alice"), ("POST", #"{"name":"Eve"}"#, "Eve")]
            as [(String, String?, String)]
        {
            var args = [
                "-s", "--http2-prior-knowledge", "-w", "\nversion=%{http_version}", "-H", "Host: users", "-X", method,
            ]
            if let body { args += ["-H", "content-type: application/json", "--data-binary", body] }
            args.append("http://\(client.outbound)/user\(method == "GET" ? "/1" : "")")
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            p.arguments = args
            let pipe = Pipe()
            p.standardOutput = pipe
            try p.run()
            let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(out.contains(expect), "\(out)")
            #expect(out.hasSuffix("version=2"), "\(out)")
        }
        withExtendedLifetime((reg, users, client)) {}
    }
}

@Suite struct LocalUpstreamPortTests {
    /// `--upstream users=PORT`: a gRPC client that knows nothing about service names, and
    /// `--upstream web=PORT/tcp`: raw bytes through a TCP proxy.
    @Test func localPortsCarryGRPCAndPlainTCP() throws {
        let reg = try RegistryUnderTest()
        let grpcPort = try freePort()
        let grpcApp = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: grpcPort,
            app: ["/usr/bin/python3", grpcService, "server", String(grpcPort)], extra: ["--app-protocol", "grpc"])
        let webPort = try freePort()
        let web = try SidecarUnderTest(
            service: "web", registry: reg.endpoint, appPort: webPort,
            app: ["/usr/bin/python3", usersApp, String(webPort)],
            extra: ["--health-path", "/health"])
        let usersLocal = try freePort()
        let webLocal = try freePort()
        let client = try SidecarUnderTest(
            service: "client", registry: reg.endpoint, appPort: try freePort(), app: nil,
            extra: ["--upstream", "users=\(usersLocal)", "--upstream", "web=\(webLocal)/tcp"],
            waitForRegistration: false)

        let c = try Child(
            "/usr/bin/python3", [grpcService, "client", "127.0.0.1:\(usersLocal)", "127.0.0.1:\(usersLocal)"])
        let line = c.readUntil { $0.hasPrefix("{") }.last ?? ""
        #expect(line.contains(#""bidi": ["hi", "there", "!"]"#), "\(line)")
        #expect(line.contains(#""client_stream": {"received": 5}"#))

        let r = try http("http://127.0.0.1:\(webLocal)/user/2")
        #expect(r.status == 200 && r.body.contains("Bob"), "\(r)")
        #expect(r.headers["tandem-error"] == nil)
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_tcp_connections_total{cluster="web"} 1"#))
        withExtendedLifetime((reg, grpcApp, web, client)) {}
    }
}

/// Runs `tandem ARGS…` to completion: exit status and combined output.
func tandem(_ args: [String]) throws -> (status: Int32, output: String) {
    let c = try Child(tandemBinary(), args)
    let out = c.readUntil { _ in false }.joined(separator: "\n")
    c.process.waitUntilExit()
    return (c.process.terminationStatus, out)
}

@Suite struct TandemClientCLITests {
    /// Endpoints that refuse connections are skipped within the call (a one-shot command used
    /// to fail when the first endpoint was down, and with two endpoints went back to the dead
    /// one: a failed connect moved on twice).
    @Test func deadEndpointsAreSkippedWithinACall() throws {
        let reg = try RegistryUnderTest()
        let dead1 = "127.0.0.1:\(try freePort())"
        let dead2 = "127.0.0.1:\(try freePort())"
        for eps in ["\(dead1),\(reg.endpoint)", "\(dead1),\(dead2),\(reg.endpoint)", "\(reg.endpoint),\(dead1)"] {
            let put = try tandem(["kv", "put", "--endpoints", eps, "/k", eps])
            #expect(put.status == 0 && put.output.hasPrefix("OK (revision "), "\(eps): \(put.output)")
            #expect(try tandem(["kv", "get", "--endpoints", eps, "/k"]).output == "/k\n\(eps)")
        }
        let none = try tandem(["kv", "get", "--endpoints", "\(dead1),\(dead2)", "/k"])
        #expect(none.status != 0)
        #expect(none.output.contains("\(dead1): ") && none.output.contains("\(dead2): "), "\(none.output)")
        withExtendedLifetime(reg) {}
    }

    @Test func kvLeaseServicesAndStatusAgainstTheRegistry() throws {
        let reg = try RegistryUnderTest()
        let e = ["--endpoints", reg.endpoint]
        #expect(
            try tandem(["kv", "put"] + e + ["/tandem/config/users/limit", "10"]).output.hasPrefix("OK (revision "))
        #expect(
            try tandem(["kv", "get"] + e + ["/tandem/config/users/limit"]).output == "/tandem/config/users/limit\n10")
        // etcdctl sees what the tandem CLI wrote, and the other way round.
        try etcdctl(reg.endpoint, ["put", "/tandem/config/users/mode", "canary"])
        let json = try tandem(["kv", "get"] + e + ["--prefix", "/tandem/config/users/", "--json"]).output
        #expect(json.contains(#""value":"canary""#) && json.contains(#""value":"10""#))
        let missing = try tandem(["kv", "get"] + e + ["/nope"])
        #expect(missing.status == 1 && missing.output.isEmpty)
        #expect(try tandem(["kv", "del"] + e + ["--prefix", "/tandem/config/"]).output == "2")

        let grant = try tandem(["lease", "grant"] + e + ["30"]).output
        let id = String(grant.split(separator: " ")[1])
        #expect(grant == "lease \(id) granted with TTL(30s)")
        #expect(
            try tandem(
                ["kv", "put"] + e + [
                    "--lease", id, "/tandem/services/x/1",
                    #"{"service":"x","instance":"1","address":"127.0.0.1","port":1,"protocol":"http","metadata":{},"health":"passing"}"#,
                ]
            ).status == 0)
        #expect(
            try tandem(["services"] + e).output.contains(
                "x             1                         127.0.0.1:1           http      passing"))
        let ttl = try tandem(["lease", "ttl"] + e + ["--keys", id]).output
        #expect(ttl.hasPrefix("lease \(id) granted with TTL(30s), remaining("), "\(ttl)")
        #expect(ttl.hasSuffix(#"attached keys(["/tandem/services/x/1"])"#), "\(ttl)")
        #expect(try tandem(["lease", "revoke"] + e + [id]).output == "lease \(id) revoked")
        #expect(try tandem(["lease", "ttl"] + e + [id]).output == "lease \(id) already expired")
        #expect(try tandem(["services"] + e + ["x"]).output == "no instance of x is registered")

        let status = try tandem(["status"] + e).output
        #expect(status.hasPrefix("version 3.4.0, raft term "))
        #expect(status.contains("(leader)"))
        let members = try tandem(["members"] + e).output.split(separator: "\n")
        #expect(members.count == 2 && members[0].hasPrefix("ID") && members[1].contains(reg.endpoint), "\(members)")
        let membersJSON = try tandem(["members", "--json"] + e).output
        #expect(membersJSON.contains(#""client_urls":["http:\/\/\#(reg.endpoint)"]"#), "\(membersJSON)")

        let down = try tandem(["kv", "get", "--endpoints", "127.0.0.1:1", "/x"])
        #expect(down.status != 0)
        #expect(down.output.contains("cannot reach the registry at 127.0.0.1:1"))
    }
}

@Suite struct RegistrationRecoveryTests {
    /// Regression: an app that passed its first health check while the registry was down was
    /// never registered (registration was only tried again on a health change).
    @Test func anInstanceRegistersOnceTheRegistryComesUp() throws {
        let regPort = try freePort()
        let users = try startUsers(1, registry: "127.0.0.1:\(regPort)", waitForRegistration: false).instances[0]
        let failed = users.child.readUntil { $0.contains("registration failed") }
        #expect(failed.last?.contains("registration failed") == true, "\(failed)")

        let dir = try TempDirectory()
        let reg = try Child(
            tandemBinary(),
            ["registry", "--data-dir", dir.url.path, "--listen-client-urls", "http://127.0.0.1:\(regPort)"])
        _ = reg.readUntil { $0.contains("serving clients on") }
        let later = users.child.readUntil { $0.contains("registered /tandem/services/users/") }
        #expect(later.last?.contains("registered /tandem/services/users/") == true, "\(later)")
        let keys = try etcdctl("127.0.0.1:\(regPort)", ["get", "--prefix", "/tandem/services/users/", "--keys-only"])
            .output
        #expect(keys.contains("/tandem/services/users/"))
        withExtendedLifetime((users, reg, dir)) {}
    }
}

/// Debian's etcd 3.4 as a single-member cluster on free ports, stopped with the value.
final class RealEtcd {
    let dir: TempDirectory
    let process: Child
    let endpoint: String

    init() throws {
        dir = try TempDirectory()
        let clientPort = try freePort()
        let peerPort = try freePort()
        process = try Child(
            "/usr/bin/etcd",
            [
                "--data-dir", dir.url.path, "--listen-client-urls", "http://127.0.0.1:\(clientPort)",
                "--advertise-client-urls", "http://127.0.0.1:\(clientPort)", "--listen-peer-urls",
                "http://127.0.0.1:\(peerPort)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
                "--initial-cluster", "default=http://127.0.0.1:\(peerPort)",
            ])
        let boot = process.readUntil { $0.contains("ready to serve client requests") }
        try #require(boot.last?.contains("ready to serve client requests") == true)
        endpoint = "127.0.0.1:\(clientPort)"
    }
}

@Suite struct RealEtcdTests {
    /// The sidecars need nothing from Tandem's registry that etcd lacks: registration under a
    /// lease, keep-alive, and discovery by watch all work against Debian's etcd 3.4.
    @Test func sidecarsDiscoverEachOtherThroughARealEtcd() throws {
        let etcd = try RealEtcd()
        let endpoint = etcd.endpoint
        let users = try startUsers(1, registry: endpoint).instances[0]
        let client = try startClient(registry: endpoint)
        let r = try http("http://\(client.outbound)/user/1", host: "users")
        #expect(r.status == 200 && r.body.contains("Alice"), "\(r)")
        let keys = try etcdctl(endpoint, ["get", "--prefix", "/tandem/services/users/", "--keys-only"]).output
        #expect(keys.contains("/tandem/services/users/users-"))
        withExtendedLifetime((etcd, users, client)) {}
    }
}

@Suite struct GRPCHealthTests {
    /// `--health-grpc ''` checks the app with grpc.health.v1.Health/Check: SERVING registers it
    /// as passing; NOT_SERVING three times in a row publishes it as critical; back after two.
    @Test func grpcHealthProtocolDrivesTheRegisteredHealth() throws {
        let reg = try RegistryUnderTest()
        let port = try freePort()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port,
            app: ["/usr/bin/python3", grpcService, "server", String(port)],
            extra: ["--app-protocol", "grpc", "--health-grpc", ""])
        func health() throws -> String {
            try etcdctl(reg.endpoint, ["get", "--prefix", "/tandem/services/users/", "--print-value-only"]).output
        }
        #expect(try health().contains(#""health":"passing""#))
        let set = try Child("/usr/bin/python3", [grpcService, "set-health", "127.0.0.1:\(port)", "false"])
        _ = set.readUntil { $0.contains("status") }
        let down = users.child.readUntil { $0.contains("app health: unhealthy") }
        #expect(down.last?.contains("not SERVING") == true, "\(down)")
        #expect(try eventually { try health().contains(#""health":"critical""#) })
        let back = try Child("/usr/bin/python3", [grpcService, "set-health", "127.0.0.1:\(port)", "true"])
        _ = back.readUntil { $0.contains("status") }
        _ = users.child.readUntil { $0.contains("app health: healthy") }
        #expect(try eventually { try health().contains(#""health":"passing""#) })
        withExtendedLifetime((reg, users)) {}
    }
}

@Suite struct GeneratedDocsTests {
    /// docs/cli.md is every command's --help; regenerate with `make docs` when a flag changes.
    @Test func theCLIReferenceIsCurrent() throws {
        let r = try tandem(["docs", "cli"])
        #expect(r.status == 0)
        let file = try String(contentsOf: repoRoot.appendingPathComponent("docs/cli.md"), encoding: .utf8)
        #expect(
            file.trimmingCharacters(in: .whitespacesAndNewlines)
                == r.output.trimmingCharacters(in: .whitespacesAndNewlines),
            "run: make docs")
    }

    /// `tandem config check` loads a file as the sidecar would and names the bad key.
    @Test func configCheckReportsOkAndErrors() throws {
        let ok = try tandem([
            "config", "check", "--service", "orders", "--with-join-token",
            repoRoot.appendingPathComponent("examples/users-orders/orders.lua").path,
        ])
        #expect(ok.status == 0)
        #expect(
            ok.output.hasSuffix("orders.lua: ok (1 routes, 1 clusters, 0 inbound routes, 3 policies)"), "\(ok.output)")
        let dir = try TempDirectory()
        let bad = dir.url.appendingPathComponent("bad.lua")
        try "return { clusters = { users = { breaker = { open = 1 } } } }".write(
            to: bad, atomically: true, encoding: .utf8)
        let r = try tandem(["config", "check", bad.path])
        #expect(r.status == 1)
        #expect(
            r.output.contains("\(bad.path): clusters.users.breaker.open: unknown setting; expected one of"),
            "\(r.output)")
    }
}
