import Foundation
import Testing

let edgeApp = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/edge_app.py").path
let upgradeClient = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/upgrade_client.py").path
let pipelineClient = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/pipeline_client.py").path

/// Starts Resources/edge_app.py on a free port and waits until it answers.
func startEdgeApp(env: [String: String] = [:]) throws -> (Child, Int) {
    let port = try freePort()
    let app = try Child("/usr/bin/python3", [edgeApp, String(port)], environment: env)
    guard try eventually(200, { try http("http://127.0.0.1:\(port)/").status == 200 }) else {
        throw TestFailure("edge app on \(port) never answered")
    }
    return (app, port)
}

/// The mesh path without a registry: a server sidecar in front of the app on `appPort`, and a
/// client sidecar whose static endpoints for "edge" are the server's inbound listener.
func twoSidecars(appPort: Int) throws -> (server: SidecarUnderTest, client: SidecarUnderTest) {
    let server = try SidecarUnderTest(
        service: "edge", registry: "none", appPort: appPort, app: nil, waitForRegistration: false)
    let client = try SidecarUnderTest(
        service: "client", registry: "none", appPort: try freePort(), app: nil,
        extra: ["--endpoints", "edge=\(server.inbound)"], waitForRegistration: false)
    return (server, client)
}

/// A client sidecar without a registry, configured by the Lua config `lua` (written to a file in
/// the returned directory, which must outlive the sidecar).
func configuredClient(_ lua: String, extra: [String] = []) throws -> (SidecarUnderTest, TempDirectory) {
    let dir = try TempDirectory()
    let file = dir.url.appendingPathComponent("client.lua")
    try lua.write(to: file, atomically: true, encoding: .utf8)
    let client = try SidecarUnderTest(
        service: "client", registry: "none", appPort: try freePort(), app: nil, extra: ["--config", file.path] + extra,
        waitForRegistration: false)
    return (client, dir)
}

/// Runs Resources/upgrade_client.py; returns its output lines.
func upgradeThrough(_ proxy: String, service: String, path: String = "/chat", _ messages: [String]) throws -> [String] {
    let c = try Child(
        "/usr/bin/python3", [upgradeClient, proxy, service] + messages, environment: ["UPGRADE_PATH": path])
    var lines: [String] = []
    while let l = c.readLine() { lines.append(l) }
    c.process.waitUntilExit()
    return lines
}

/// curl with extra arguments; returns status line + headers (lowercased names) and the body.
func curl(_ args: [String]) throws -> (head: [String: String], status: Int, body: Data) {
    let dir = try TempDirectory()
    let headFile = dir.url.appendingPathComponent("head").path
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
    p.arguments = ["-s", "--max-time", "20", "-D", headFile] + args
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let body = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = (try? String(contentsOfFile: headFile, encoding: .utf8)) ?? ""
    // The final response's block (after any 100 Continue, or several with --next).
    let blocks = text.components(separatedBy: "\r\n\r\n").filter { !$0.isEmpty && !$0.hasPrefix("HTTP/1.1 1") }
    let lines = (blocks.last ?? "").components(separatedBy: "\r\n")
    var head: [String: String] = [:]
    for l in lines.dropFirst() {
        if let c = l.firstIndex(of: ":") {
            head[l[..<c].lowercased()] = l[l.index(after: c)...].trimmingCharacters(in: .whitespaces)
        }
    }
    let status = lines.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    return (head, status, body)
}

/// Proxying beyond plain request/response: protocol upgrades become tunnels, and route and
/// per-try timeouts answer or retry on time. Two real sidecars (client outbound → server
/// inbound) in front of a real app; no registry (static endpoints).
@Suite(.serialized) struct ProxyEdgeTests {
    @Test func anUpgradeBecomesATunnelThroughTwoSidecarsWithoutLosingEarlyBytes() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)

        let out = try upgradeThrough(client.outbound, service: "edge", ["hello", "over the tunnel", "bye"])
        #expect(
            out == [
                "status HTTP/1.1 101 Switching Protocols", "upgrade tandem-echo", "echo HELLO", "echo OVER THE TUNNEL",
                "echo BYE",
            ], "\(out)")
        // The app's first message in the same write as its 101 (one read at the server sidecar).
        let greeted = try upgradeThrough(client.outbound, service: "edge", path: "/greet", ["hi"])
        #expect(
            greeted == [
                "status HTTP/1.1 101 Switching Protocols", "upgrade tandem-echo", "greeting WELCOME", "echo HI",
            ],
            "\(greeted)")
        // Plain requests still work on new connections, and the upgrade was counted on both sides.
        #expect(try http("http://\(client.outbound)/", host: "edge").body == "edge edge\n")
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_upgrades_total{side="outbound",protocol="tandem-echo"} 2"#), "\(metrics)")
        #expect(
            try http("http://\(server.admin)/metrics").body.contains(
                #"tandem_upgrades_total{side="inbound",protocol="tandem-echo"} 2"#))
        withExtendedLifetime((app, server, client)) {}
    }

    /// Regression: at most 32 idle upstream connections per endpoint per event loop made a
    /// sidecar under 128 concurrent clients close connections as they went idle and reopen
    /// them for the next requests (at 256 clients, 44 % of requests opened a connection).
    /// Now a burst finds its connections again: no more are opened than clients at once.
    @Test func concurrentClientsReuseUpstreamConnections() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let wrk = try Child("/usr/bin/wrk", ["-t2", "-c128", "-d3s", "-H", "Host: edge", "http://\(client.outbound)/"])
        var report: [String] = []
        while let line = wrk.readLine() { report.append(line) }
        wrk.process.waitUntilExit()
        let requests =
            report.first { $0.contains("requests in") }
            .flatMap { Int($0.split(separator: " ").first ?? "") } ?? 0
        #expect(requests > 128 && !report.contains { $0.contains("Non-2xx") }, "\(report)")
        let metrics = try http("http://\(client.admin)/metrics").body
        let opened = metric(metrics, #"tandem_upstream_connections_opened_total{cluster="edge"}"#) ?? -1
        #expect(opened >= 1 && opened <= 128, "opened \(opened) upstream connections for \(requests) requests")
        withExtendedLifetime((app, server, client)) {}
    }

    /// Every way an upstream frames a response reaches the client intact through two sidecars,
    /// one after another on one client connection (so each upstream connection is reused behind
    /// it, and a response framed wrongly would hold up the next): a HEAD answer's length with no body, chunks with extensions and a trailer, a body
    /// that ends when the app closes its connection, and a plain one after them.
    @Test func responsesOfEveryFramingPassOnOneConnection() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let dir = try TempDirectory()
        let targets = ["/big?bytes=777", "/chunked", "/unframed", "/"]
        var args: [String] = []
        for (i, target) in targets.enumerated() {
            if i > 0 { args.append("--next") }
            if i == 0 { args.append("-I") }
            args += [
                "-s", "--max-time", "20", "-o", dir.url.appendingPathComponent("\(i)").path, "-w",
                "%{http_code} %{num_connects}\n", "-H", "Host: edge", "http://\(client.outbound)\(target)",
            ]
        }
        let c = try Child("/usr/bin/curl", args)
        var codes: [String] = []
        while let l = c.readLine() { codes.append(l) }
        c.process.waitUntilExit()
        // One connection for all four: none was left waiting for bytes that never come.
        #expect(codes == ["200 1", "200 0", "200 0", "200 0"])
        func file(_ i: Int) -> String {
            (try? String(contentsOf: dir.url.appendingPathComponent("\(i)"), encoding: .utf8)) ?? ""
        }
        #expect(file(0).lowercased().contains("content-length: 777\r\n"), "\(file(0))")
        #expect(file(1) == "hello world")
        #expect(file(2) == "until close")
        #expect(file(3) == "edge edge\n")
        withExtendedLifetime((app, server, client)) {}
    }

    /// Fields about the upstream's connection stay with it: an answer offering an upgrade
    /// reaches the client without `upgrade`, `connection` or `keep-alive`, its other fields
    /// intact.
    @Test func hopByHopFieldsOfAnAnswerStayBehind() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let r = try http("http://\(client.outbound)/advertise", host: "edge")
        #expect(r.status == 200 && r.body == "ok", "\(r)")
        #expect(r.headers["x-kept"] == "1", "\(r.headers)")
        for name in ["upgrade", "keep-alive"] { #expect(r.headers[name] == nil, "\(name): \(r.headers)") }
        #expect(r.headers["connection"].map { !$0.lowercased().contains("upgrade") } ?? true, "\(r.headers)")
        withExtendedLifetime((app, server, client)) {}
    }

    /// The fields a sidecar adds to a request reach the app once each: a traceparent made for
    /// a request without one, and the deadline left (the caller's own tandem-timeout-ms is
    /// replaced, not sent twice).
    @Test func addedRequestFieldsReachTheAppOnce() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let r = try http(
            "http://\(client.outbound)/headers", host: "edge", headers: ["tandem-timeout-ms: 999999"])
        let seen = try JSONSerialization.jsonObject(with: Data(r.body.utf8)) as? [String: Any] ?? [:]
        let names = seen["names"] as? [String] ?? []
        let fields = seen["headers"] as? [String: String] ?? [:]
        #expect(names.filter { $0 == "traceparent" }.count == 1, "\(names)")
        #expect(names.filter { $0 == "tandem-timeout-ms" }.count == 1, "\(names)")
        #expect(fields["traceparent"]?.hasPrefix("00-") == true, "\(fields)")
        let left = Int(fields["tandem-timeout-ms"] ?? "") ?? -1
        #expect(left >= 1 && left <= 15_000, "\(fields)")
        withExtendedLifetime((app, server, client)) {}
    }

    /// An HTTP/1.0 client that asks to keep its connection, answered a body the app sent
    /// chunked: 1.0 has no chunks, so the sidecar sends the body as it is and closes the
    /// connection to end it (before, the connection stayed open and the client waited for an
    /// end that never came).
    @Test func anHTTP10ClientGetsAnUnframedBodyEndedByClose() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let c = try Child(
            "/usr/bin/curl",
            [
                "-s", "-i", "--max-time", "10", "--http1.0", "-H", "Connection: keep-alive", "-H", "Host: edge",
                "http://\(client.outbound)/chunked",
            ])
        var lines: [String] = []
        while let l = c.readLine() { lines.append(l) }
        c.process.waitUntilExit()
        #expect(c.process.terminationStatus == 0, "curl waited for the end of the body: \(lines)")  // 28: timed out
        #expect(lines.first?.hasPrefix("HTTP/1.0 200") == true && lines.last == "hello world", "\(lines)")
        #expect(lines.contains { $0.lowercased().hasPrefix("connection: close") }, "\(lines)")
        #expect(!lines.contains { $0.lowercased().hasPrefix("content-length") }, "\(lines)")
        withExtendedLifetime((app, server, client)) {}
    }

    /// HTTP/1.1 pipelining through both sidecars: 40 requests written at once on one connection
    /// (more than `maxPipelinedRequests` wait, so reading pauses and resumes), answered in order,
    /// the bodies among them intact.
    @Test func pipelinedRequestsAreAnsweredInOrderThroughTwoSidecars() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        let c = try Child("/usr/bin/python3", [pipelineClient, client.outbound, "edge", "40"])
        var lines: [String] = []
        while let l = c.readLine() { lines.append(l) }
        c.process.waitUntilExit()
        var expected: [String] = []
        for i in 0..<40 {
            if i % 5 == 4 {
                let body = "pipelined-\(i)"
                expected.append("HTTP/1.1 200 OK \(body.utf8.count) \(try sha256Hex(body))")
            } else {
                expected.append("HTTP/1.1 200 OK /headers/\(i)")
            }
        }
        #expect(lines == expected)
        withExtendedLifetime((app, server, client)) {}
    }

    /// A drain waits for open tunnels as for requests: after SIGTERM an upgraded connection
    /// keeps working until its client closes it, and then the sidecar exits at once and cleanly.
    @Test func aDrainWaitsForOpenTunnels() throws {
        let (app, port) = try startEdgeApp()
        let server = try SidecarUnderTest(
            service: "edge", registry: "none", appPort: port, app: nil, extra: ["--drain-timeout", "60"],
            waitForRegistration: false)
        let c = try Child("/usr/bin/python3", [upgradeClient, server.inbound, "edge", "-"])
        c.send("hello")
        #expect(c.readUntil { $0.hasPrefix("echo") }.suffix(2) == ["upgrade tandem-echo", "echo HELLO"])
        kill(server.pid, SIGTERM)
        // Past the grace period, the listener closed: only the tunnel keeps the sidecar up.
        let draining = server.child.readUntil { $0.contains("drain: inbound listener closed") }
        #expect(draining.last?.contains("waiting for 0 requests and 1 tunnels") == true, "\(draining)")
        c.send("still here")
        #expect(c.readLine() == "echo STILL HERE")
        c.closeStdin()
        c.process.waitUntilExit()
        let rest = server.child.readUntil { _ in false }
        server.child.process.waitUntilExit()
        #expect(server.child.process.terminationStatus == 0, "\(rest)")
        #expect(!rest.contains { $0.contains("drain timeout") }, "\(rest)")
        #expect(rest.contains { $0.contains("drain: done with 0 requests in flight and 0 tunnels open") }, "\(rest)")
        withExtendedLifetime((app, server)) {}
    }

    @Test func anUpgradeTheUpstreamRefusesIsAnsweredAndTheConnectionCloses() throws {
        let (app, port) = try startEdgeApp()
        let client = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: ["--endpoints", "edge=127.0.0.1:\(port)"], waitForRegistration: false)
        // edge_app only switches to tandem-echo; anything else is an ordinary 200.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        p.arguments = [
            "-s", "-i", "--max-time", "10", "-H", "Host: edge", "-H", "Connection: Upgrade", "-H",
            "Upgrade: websocket", "http://\(client.outbound)/",
        ]
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(text.hasPrefix("HTTP/1.1 200"), "\(text)")
        #expect(text.lowercased().contains("connection: close"), "\(text)")
        #expect(text.hasSuffix("edge edge\n"))
        withExtendedLifetime((app, client)) {}
    }

    @Test func routeTimeoutsAnswer504AndPerTryTimeoutsRetryElsewhere() throws {
        let (slow, slowPort) = try startEdgeApp(env: ["SLOW_MS": "1500", "INSTANCE": "slow"])
        let (fast, fastPort) = try startEdgeApp(env: ["INSTANCE": "fast"])
        let (client, dir) = try configuredClient(
            """
            return {
              routes = {
                { name = "hurry", host = "edge", path = "/slow", cluster = "edge", timeout_ms = 300 },
                { name = "patient", host = "edge", cluster = "edge", timeout_ms = 5000,
                  retry = { attempts = 2, per_try_timeout_ms = 250, retry_on = "per-try-timeout" } },
              },
            }
            """,
            extra: ["--endpoints", "edge=127.0.0.1:\(slowPort),127.0.0.1:\(fastPort)", "--balancer", "round_robin"])

        // The route's timeout covers the whole request: 504 with the reason, not a hang.
        let timedOut = try http("http://\(client.outbound)/slow?ms=3000", host: "edge")
        #expect(timedOut.status == 504, "\(timedOut)")
        #expect(timedOut.headers["tandem-error"] == "timeout")

        // Every request whose first try lands on the slow instance is retried on the fast one.
        for _ in 0..<8 {
            let r = try http("http://\(client.outbound)/", host: "edge")
            #expect(r.status == 200 && r.body == "edge fast\n", "\(r)")
        }
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_retries_total{side="outbound",cluster="edge"}"#), "\(metrics)")
        withExtendedLifetime((slow, fast, client, dir)) {}
    }

    @Test func responsesAreGzippedPerRouteWhenWorthItAndAccepted() throws {
        let (app, port) = try startEdgeApp()
        let dir = try TempDirectory()
        let serverConfig = dir.url.appendingPathComponent("server.lua")
        try "return { inbound = { compression = { min_bytes = 100 } } }".write(
            to: serverConfig, atomically: true, encoding: .utf8)
        let clientConfig = dir.url.appendingPathComponent("client.lua")
        try """
        return { routes = { { name = "zipped", host = "edge", cluster = "edge", compression = true } } }
        """.write(to: clientConfig, atomically: true, encoding: .utf8)
        let server = try SidecarUnderTest(
            service: "edge", registry: "none", appPort: port, app: nil, extra: ["--config", serverConfig.path],
            waitForRegistration: false)
        let client = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: ["--config", clientConfig.path, "--endpoints", "edge=127.0.0.1:\(port)"],
            waitForRegistration: false)
        let big = String(repeating: "x", count: 5000)

        // Accepted and worth it: gzip on the wire, the same bytes after decoding.
        let raw = try curl([
            "-H", "Host: edge", "-H", "Accept-Encoding: gzip", "http://\(client.outbound)/big?bytes=5000",
        ])
        #expect(raw.head["content-encoding"] == "gzip", "\(raw.head)")
        #expect(raw.head["vary"] == "accept-encoding")
        #expect(raw.head["tandem-compress"] == nil)  // the marker never leaves the sidecar
        #expect(raw.body.count < 500, "\(raw.body.count) bytes on the wire")
        let decoded = try curl(["--compressed", "-H", "Host: edge", "http://\(client.outbound)/big?bytes=5000"])
        #expect(String(decoding: decoded.body, as: UTF8.self) == big)
        // Not accepted: sent as it is.
        let plain = try curl(["-H", "Host: edge", "http://\(client.outbound)/big?bytes=5000"])
        #expect(plain.head["content-encoding"] == nil && plain.body.count == 5000, "\(plain.head)")
        // Below the route's threshold (Envoy's default, 30 bytes): sent as it is.
        let small = try curl([
            "-H", "Host: edge", "-H", "Accept-Encoding: gzip", "http://\(client.outbound)/big?bytes=20",
        ])
        #expect(small.head["content-encoding"] == nil && small.body.count == 20, "\(small.head)")

        // The inbound side compresses the app's answers by its own policy (min_bytes 100).
        let inbound = try curl(["--compressed", "http://\(server.inbound)/big?bytes=5000"])
        // (curl offers deflate and gzip at equal weight; NIO's compressor then picks deflate.)
        #expect(["gzip", "deflate"].contains(inbound.head["content-encoding"] ?? ""), "\(inbound.head)")
        #expect(String(decoding: inbound.body, as: UTF8.self) == big)
        let under = try curl(["-H", "Accept-Encoding: gzip", "http://\(server.inbound)/big?bytes=99"])
        #expect(under.head["content-encoding"] == nil && under.body.count == 99)

        // Regression: when the upstream's head arrived alone, the compressor sent it on with the
        // upstream's content-length (5000) before the 40 gzip bytes; clients waited for the rest.
        let split = try curl([
            "-H", "Host: edge", "-H", "Accept-Encoding: gzip", "http://\(client.outbound)/big?bytes=5000&split_ms=100",
        ])
        #expect(split.head["content-encoding"] == "gzip", "\(split.head)")
        #expect(split.head["content-length"] == nil || split.head["content-length"] == String(split.body.count))
        let splitDecoded = try curl([
            "--compressed", "-H", "Host: edge", "http://\(client.outbound)/big?bytes=5000&split_ms=100",
        ])
        #expect(String(decoding: splitDecoded.body, as: UTF8.self) == big)
        withExtendedLifetime((app, server, client, dir)) {}
    }

    @Test func activeHealthChecksTakeASickEndpointOutAndBringItBack() throws {
        let (a, aPort) = try startEdgeApp(env: ["INSTANCE": "a"])
        let (b, bPort) = try startEdgeApp(env: ["INSTANCE": "b"])
        let (client, dir) = try configuredClient(
            """
            return {
              clusters = { edge = { balancer = "round_robin", outlier = { consecutive_5xx = 1000 },
                health_check = { path = "/health", interval_ms = 100, timeout_ms = 500,
                                 unhealthy_threshold = 2, healthy_threshold = 2 } } },
              endpoints = { edge = { "127.0.0.1:\(aPort)", "127.0.0.1:\(bPort)" } },
            }
            """)
        func instances(_ n: Int) throws -> Set<String> {
            var seen = Set<String>()
            for _ in 0..<n { seen.insert(try http("http://\(client.outbound)/", host: "edge").body) }
            return seen
        }
        func health(_ port: Int) throws -> String? {
            let body = try http("http://\(client.admin)/clusters").body
            let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
            let clusters = json?["clusters"] as? [[String: Any]] ?? []
            let eps = clusters.first { ($0["name"] as? String) == "edge" }?["endpoints"] as? [[String: Any]] ?? []
            return eps.first { ($0["address"] as? String) == "127.0.0.1:\(port)" }?["health"] as? String
        }
        #expect(try eventually { try health(aPort) == "healthy" && health(bPort) == "healthy" })
        #expect(try instances(4) == ["edge a\n", "edge b\n"])

        // a turns sick (its /health answers 503; its other answers stay 200, so only the
        // active check can notice): after two failed checks it gets no more traffic.
        #expect(try http("http://127.0.0.1:\(aPort)/admin/health", method: "POST", body: "0").status == 200)
        #expect(try eventually { try health(aPort) == "unhealthy" })
        #expect(try instances(6) == ["edge b\n"])
        let log = client.child.readUntil { $0.contains("upstream edge 127.0.0.1:\(aPort): unhealthy") }
        #expect(log.last?.contains("HTTP 503") == true || log.last?.contains("503") == true, "\(log)")

        // Healed: two passing checks bring it back.
        #expect(try http("http://127.0.0.1:\(aPort)/admin/health", method: "POST", body: "1").status == 200)
        #expect(try eventually { try health(aPort) == "healthy" })
        #expect(try instances(4) == ["edge a\n", "edge b\n"])
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_upstream_health_checks_total{cluster="edge",result="fail"}"#))
        withExtendedLifetime((a, b, client, dir)) {}
    }

    @Test func largeRequestBodiesStreamThroughTwoSidecarsIntact() throws {
        let (app, port) = try startEdgeApp()
        let (server, client) = try twoSidecars(appPort: port)
        // 20 MiB of varied bytes: far past any buffer (64 KiB are held; the rest streams).
        let dir = try TempDirectory()
        let file = dir.url.appendingPathComponent("upload.bin")
        var rng = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: 20 << 20)
        for i in stride(from: 0, to: bytes.count, by: 8) {
            withUnsafeBytes(of: rng.next() as UInt64) { w in for j in 0..<8 { bytes[i + j] = w[j] } }
        }
        try Data(bytes).write(to: file)
        let digest = try Child("/usr/bin/sha256sum", [file.path]).readLine()?.split(separator: " ").first ?? ""
        let want = "\(bytes.count) \(digest)\n"

        let sized = try curl(["-H", "Host: edge", "--data-binary", "@\(file.path)", "http://\(client.outbound)/upload"])
        #expect(sized.status == 200 && String(decoding: sized.body, as: UTF8.self) == want, "\(sized.head)")
        let chunked = try curl([
            "-H", "Host: edge", "-H", "Transfer-Encoding: chunked", "--data-binary", "@\(file.path)",
            "http://\(client.outbound)/upload",
        ])
        #expect(chunked.status == 200 && String(decoding: chunked.body, as: UTF8.self) == want, "\(chunked.head)")
        // The connection is reusable after a streamed request: two uploads on one connection.
        let twice = try curl([
            "-H", "Host: edge", "--data-binary", "@\(file.path)", "http://\(client.outbound)/upload", "--next", "-H",
            "Host: edge", "--data-binary", "@\(file.path)", "http://\(client.outbound)/upload",
        ])
        #expect(String(decoding: twice.body, as: UTF8.self) == want + want)
        withExtendedLifetime((app, server, client, dir)) {}
    }

    @Test func aBodyOverTheConfiguredLimitIs413WhetherSizedOrStreamed() throws {
        let (app, port) = try startEdgeApp()
        let client = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: ["--endpoints", "edge=127.0.0.1:\(port)", "--max-body-bytes", "1000000"], waitForRegistration: false)
        let dir = try TempDirectory()
        let file = dir.url.appendingPathComponent("big.bin")
        try Data(repeating: 0x61, count: 2_000_000).write(to: file)
        let sized = try curl(["-H", "Host: edge", "--data-binary", "@\(file.path)", "http://\(client.outbound)/upload"])
        #expect(sized.status == 413 && sized.head["tandem-error"] == "body-too-large", "\(sized.head)")
        let chunked = try curl([
            "-H", "Host: edge", "-H", "Transfer-Encoding: chunked", "--data-binary", "@\(file.path)",
            "http://\(client.outbound)/upload",
        ])
        #expect(chunked.status == 413 && chunked.head["tandem-error"] == "body-too-large", "\(chunked.head)")
        #expect(String(decoding: chunked.body, as: UTF8.self).contains("request body exceeds 1000000 bytes"))
        // Under the limit: through.
        #expect(
            try http("http://\(client.outbound)/upload", host: "edge", method: "POST", body: "{}").body
                == "2 \(sha256Hex("{}"))\n")
        withExtendedLifetime((app, client, dir)) {}
    }

    @Test func maxConnectionsQueuesPendingRequestsAndOverflowsBeyondThem() throws {
        let (app, port) = try startEdgeApp()
        let (client, dir) = try configuredClient(
            """
            return {
              clusters = { edge = { limits = { max_connections = 1, max_pending_requests = 1 } } },
              endpoints = { edge = { "127.0.0.1:\(port)" } },
            }
            """)
        func background(_ path: String) throws -> (Process, Pipe) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            p.arguments = ["-s", "--max-time", "20", "-H", "Host: edge", "http://\(client.outbound)\(path)"]
            let out = Pipe()
            p.standardOutput = out
            try p.run()
            return (p, out)
        }
        func gauge(_ name: String) throws -> Double? {
            metric(try http("http://\(client.admin)/metrics").body, "\(name){cluster=\"edge\"}")
        }
        // The one connection is busy with a held request…
        let first = try background("/hold")
        #expect(try eventually { try http("http://127.0.0.1:\(port)/held").body == "1" })
        // …so the next waits as pending…
        let second = try background("/hold")
        #expect(try eventually { try gauge("tandem_cluster_pending_requests") == 1 })
        // …and one more overflows at once.
        let third = try http("http://\(client.outbound)/", host: "edge")
        #expect(third.status == 503 && third.headers["tandem-error"] == "overflow", "\(third)")
        #expect(third.body.contains("max_connections"))
        // Released: the first answers, its connection serves the pending one, both succeed.
        #expect(try http("http://127.0.0.1:\(port)/release", method: "POST", body: "").status == 200)
        for (p, out) in [first, second] {
            let body = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(body == "released\n")
        }
        #expect(try gauge("tandem_cluster_upstream_connections") == 1)  // the one, now idle in the pool
        #expect(try gauge("tandem_cluster_pending_requests") == 0)
        withExtendedLifetime((app, client, dir)) {}
    }

    @Test func maxRetriesCapsRetriesWhenConfigured() throws {
        let (slow, slowPort) = try startEdgeApp(env: ["SLOW_MS": "1500", "INSTANCE": "slow"])
        let (fast, fastPort) = try startEdgeApp(env: ["INSTANCE": "fast"])
        let (client, dir) = try configuredClient(
            """
            return {
              routes = { { name = "r", host = "edge", cluster = "edge",
                           retry = { attempts = 2, per_try_timeout_ms = 250, retry_on = "per-try-timeout" } } },
              clusters = { edge = { balancer = "round_robin", limits = { max_retries = 0 } } },
              endpoints = { edge = { "127.0.0.1:\(slowPort)", "127.0.0.1:\(fastPort)" } },
            }
            """)
        // Round robin alternates; every try on the slow instance times out, and with no retry
        // allowed it is answered 503 overflow instead of being retried on the fast one.
        var answers: [String] = []
        for _ in 0..<4 {
            let r = try http("http://\(client.outbound)/", host: "edge")
            answers.append(r.status == 200 ? r.body : "\(r.status) \(r.headers["tandem-error"] ?? "")")
        }
        #expect(answers.sorted() == ["503 overflow", "503 overflow", "edge fast\n", "edge fast\n"], "\(answers)")
        withExtendedLifetime((slow, fast, client, dir)) {}
    }

    @Test func zoneAwareBalancingPrefersTheLocalZoneAndFallsBack() throws {
        let reg = try RegistryUnderTest()
        let (local, _) = try startUsers(1, registry: reg.endpoint, extra: ["--zone", "zone-a"])
        let (remote, _) = try startUsers(2, registry: reg.endpoint, extra: ["--zone", "zone-b"])
        let client = try startClient(registry: reg.endpoint, extra: ["--zone", "zone-a"])
        func instances(_ n: Int) throws -> Set<String> {
            var seen = Set<String>()
            for _ in 0..<n {
                seen.insert(try http("http://\(client.outbound)/user", host: "users").headers["x-instance"] ?? "?")
            }
            return seen
        }
        // The zone comes from each instance's registration; the client's own --zone decides.
        #expect(try eventually { try instances(1).count == 1 })
        let zoneA = try instances(12)
        #expect(zoneA.count == 1, "\(zoneA)")
        // The local zone's only instance leaves (clean stop, deregistered): the other zone serves.
        kill(local[0].pid, SIGTERM)
        local[0].child.process.waitUntilExit()
        #expect(try eventually { try instances(4).isDisjoint(with: zoneA) })
        let after = try instances(12)
        #expect(after.isDisjoint(with: zoneA) && !after.contains("?") && !after.isEmpty, "\(after)")
        withExtendedLifetime((reg, local, remote, client)) {}
    }

    @Test func tcpProxyConnectionsCountAgainstMaxConnections() throws {
        let (app, port) = try startEdgeApp()
        let local = try freePort()
        let (client, dir) = try configuredClient(
            """
            return {
              upstreams = { edge = { port = \(local), protocol = "tcp" } },
              clusters = { edge = { limits = { max_connections = 1 } } },
              endpoints = { edge = { "127.0.0.1:\(port)" } },
            }
            """)
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Resources/tcp_slots_client.py").path
        let c = try Child("/usr/bin/python3", [script, String(local)])
        var lines: [String] = []
        while let l = c.readLine() { lines.append(l) }
        #expect(lines == ["first HTTP/1.1 200 OK", "second closed", "third HTTP/1.1 200 OK"], "\(lines)")
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_local_answers_total{side="tcp",reason="overflow"}"#), "\(metrics)")
        withExtendedLifetime((app, client, dir)) {}
    }
}

/// sha256 of a string, by the system's sha256sum (the tests have no crypto library).
func sha256Hex(_ s: String) throws -> String {
    let dir = try TempDirectory()
    let f = dir.url.appendingPathComponent("s")
    try Data(s.utf8).write(to: f)
    return String(try Child("/usr/bin/sha256sum", [f.path]).readLine()?.split(separator: " ").first ?? "")
}
