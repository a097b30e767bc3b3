import Foundation
import Testing

let edgeApp = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/edge_app.py").path
let upgradeClient = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/upgrade_client.py").path

/// Starts Resources/edge_app.py on a free port and waits until it answers.
func startEdgeApp(env: [String: String] = [:]) throws -> (Child, Int) {
    let port = try freePort()
    let app = try Child("/usr/bin/python3", [edgeApp, String(port)], environment: env)
    guard try eventually(200, { try http("http://127.0.0.1:\(port)/").status == 200 }) else {
        throw TestFailure("edge app on \(port) never answered")
    }
    return (app, port)
}

/// Runs Resources/upgrade_client.py; returns its output lines.
func upgradeThrough(_ proxy: String, service: String, _ messages: [String]) throws -> [String] {
    let c = try Child("/usr/bin/python3", [upgradeClient, proxy, service] + messages)
    var lines: [String] = []
    while let l = c.readLine() { lines.append(l) }
    c.process.waitUntilExit()
    return lines
}

/// Proxying beyond plain request/response: protocol upgrades become tunnels, and route and
/// per-try timeouts answer or retry on time. Two real sidecars (client outbound → server
/// inbound) in front of a real app; no registry (static endpoints).
@Suite(.serialized) struct ProxyEdgeTests {
    @Test func anUpgradeBecomesATunnelThroughTwoSidecarsWithoutLosingEarlyBytes() throws {
        let (app, port) = try startEdgeApp()
        let server = try SidecarUnderTest(
            service: "edge", registry: "none", appPort: port, app: nil, waitForRegistration: false)
        let client = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: ["--endpoints", "edge=\(server.inbound)"], waitForRegistration: false)

        let out = try upgradeThrough(client.outbound, service: "edge", ["hello", "over the tunnel", "bye"])
        #expect(
            out == [
                "status HTTP/1.1 101 Switching Protocols", "upgrade tandem-echo", "echo HELLO", "echo OVER THE TUNNEL",
                "echo BYE",
            ], "\(out)")
        // Plain requests still work on new connections, and the upgrade was counted on both sides.
        #expect(try http("http://\(client.outbound)/", host: "edge").body == "edge edge\n")
        let metrics = try http("http://\(client.admin)/metrics").body
        #expect(metrics.contains(#"tandem_upgrades_total{side="outbound",protocol="tandem-echo"} 1"#), "\(metrics)")
        #expect(
            try http("http://\(server.admin)/metrics").body.contains(
                #"tandem_upgrades_total{side="inbound",protocol="tandem-echo"} 1"#))
        withExtendedLifetime((app, server, client)) {}
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
        let dir = try TempDirectory()
        let file = dir.url.appendingPathComponent("client.lua")
        try """
        return {
          routes = {
            { name = "hurry", host = "edge", path = "/slow", cluster = "edge", timeout_ms = 300 },
            { name = "patient", host = "edge", cluster = "edge", timeout_ms = 5000,
              retry = { attempts = 2, per_try_timeout_ms = 250, retry_on = "per-try-timeout" } },
          },
        }
        """.write(to: file, atomically: true, encoding: .utf8)
        let client = try SidecarUnderTest(
            service: "client", registry: "none", appPort: try freePort(), app: nil,
            extra: [
                "--config", file.path, "--endpoints", "edge=127.0.0.1:\(slowPort),127.0.0.1:\(fastPort)",
                "--balancer", "round_robin",
            ], waitForRegistration: false)

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
}
