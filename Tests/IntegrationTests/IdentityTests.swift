import Foundation
import Testing

let jwtTool = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Resources/jwt_tool.py").path

/// Runs Resources/jwt_tool.py (PyJWT): a token made by an implementation other than Tandem's.
func forge(_ args: [String]) throws -> String {
    let c = try Child("/usr/bin/python3", [jwtTool] + args)
    var lines: [String] = []
    while let l = c.readLine() { lines.append(l) }
    c.process.waitUntilExit()
    guard c.process.terminationStatus == 0, let token = lines.last else {
        throw TestFailure("jwt_tool \(args.first ?? "") failed: \(lines)")
    }
    return token
}

/// A temporary directory with the mesh's join token (`join`) and, when given, the users
/// sidecar's config (`users.lua`).
struct IdentityFiles {
    static let joinToken = "test-join-token-0123456789abcdef"
    let dir: TempDirectory
    let join: String
    let config: String

    init(usersConfig: String? = nil, joinText: String = IdentityFiles.joinToken + "\n") throws {
        dir = try TempDirectory()
        join = dir.url.appendingPathComponent("join").path
        config = dir.url.appendingPathComponent("users.lua").path
        try joinText.write(toFile: join, atomically: true, encoding: .utf8)
        try usersConfig?.write(toFile: config, atomically: true, encoding: .utf8)
    }
}

/// A mesh with identity on: a registry with a join token, `users` (an app behind a sidecar with
/// allow rules, a proof route and an end-user JWT route), and two callers, `orders` and `web`.
final class IdentityMesh {
    let files: IdentityFiles
    let dir: TempDirectory
    let registry: RegistryUnderTest
    let joinFile: String
    let app: Child
    let users: SidecarUnderTest
    let orders: SidecarUnderTest
    let web: SidecarUnderTest

    init() throws {
        files = try IdentityFiles()
        dir = files.dir
        joinFile = files.join
        _ = try forge(["rsa-key", dir.url.path])
        let policy = dir.url.appendingPathComponent("who.lua")
        try """
        return {
          name = "who",
          on_request = function(req, ctx)
            ctx.caller = req.caller or "-"
            ctx.sub = req:claim("sub") or "-"
          end,
          on_response = function(res, ctx)
            res:set_header("x-policy-caller", ctx.caller)
            res:set_header("x-policy-sub", ctx.sub)
          end,
        }
        """.write(to: policy, atomically: true, encoding: .utf8)
        let config = dir.url.appendingPathComponent("users.lua")
        try """
        return {
          inbound = {
            allow = { "orders", "web" },
            policies = { "who.lua" },
            routes = {
              { name = "orders-only", path = "/orders-only/*", allow = { "orders" } },
              { name = "unlisted", path = "/unlisted" },
              { name = "upload", path = "/upload", allow = { "orders", "web" }, proof = true },
              { name = "me", path = "/headers/me", allow = { "orders", "web" },
                jwt = { pem = { file = "rsa.pub.pem", alg = "RS256" }, issuers = { "https://idp.test" },
                        audiences = { "shop" }, forward_claims = { sub = "x-user-id" } } },
            },
          },
        }
        """.write(to: config, atomically: true, encoding: .utf8)
        // orders signs a proof for every request (the mesh-wide setting on its side); web does not.
        let ordersConfig = dir.url.appendingPathComponent("orders.lua")
        try "return { identity = { proof = true } }".write(to: ordersConfig, atomically: true, encoding: .utf8)
        // Deny unless allowed, mesh-wide: users' config does not say, the registry does.
        registry = try RegistryUnderTest(
            members: 1, extra: ["--join-token-file", joinFile, "--identity-default", "deny"])
        let (a, port) = try startEdgeApp()
        app = a
        let join = ["--join-token-file", joinFile]
        users = try SidecarUnderTest(
            service: "users", registry: registry.endpoint, appPort: port, app: nil,
            extra: join + ["--config", config.path])
        orders = try SidecarUnderTest(
            service: "orders", registry: registry.endpoint, appPort: try freePort(), app: nil,
            extra: join + ["--config", ordersConfig.path], waitForRegistration: false)
        web = try SidecarUnderTest(
            service: "web", registry: registry.endpoint, appPort: try freePort(), app: nil, extra: join,
            waitForRegistration: false)
    }

    /// `tandem identity issue` as `service` for `audience`: (token, proof key seed).
    func issue(_ service: String, _ audience: String) throws -> (token: String, seed: String) {
        let r = try tandem([
            "identity", "issue", "--endpoints", registry.endpoint, "--join-token-file", joinFile, "--service", service,
            "--audience", audience, "--json",
        ])
        guard r.status == 0, let json = try JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [String: Any],
            let token = json["token"] as? String, let seed = json["proof_key_seed"] as? String
        else { throw TestFailure("identity issue failed: \(r.output)") }
        return (token, seed)
    }

    func proof(
        token: String, seed: String, method: String = "GET", url: String, bodyFile: String? = nil,
        calleeKey: String? = nil
    ) throws
        -> String
    {
        // `--name=value`: base64url keys and seeds may start with "-", which would read as an option.
        var args = ["identity", "proof", "--token=\(token)", "--key-seed=\(seed)", "--method", method, "--url", url]
        if let bodyFile { args += ["--body-file", bodyFile] }
        if let calleeKey { args += ["--callee-key=\(calleeKey)"] }
        let r = try tandem(args)
        guard r.status == 0 else { throw TestFailure("identity proof failed: \(r.output)") }
        return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A request straight to users' inbound listener with the given headers.
    func direct(
        _ path: String, method: String = "GET", headers: [String: String], body: String? = nil
    ) throws -> (head: [String: String], status: Int, body: String) {
        var args = ["-X", method, "-H", "Host: users"]
        for (k, v) in headers { args += ["-H", "\(k): \(v)"] }
        if let body { args += ["--data-binary", body] }
        let r = try curl(args + ["http://\(users.inbound)\(path)"])
        return (r.head, r.status, String(decoding: r.body, as: UTF8.self))
    }

    /// users' sidecar's `GET /identity`.
    func usersIdentity() throws -> [String: Any] {
        let body = try http("http://\(users.admin)/identity").body
        return try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] ?? [:]
    }

    /// The signing key ids users' sidecar knows.
    func keysKnownByUsers() throws -> [String] { try usersIdentity()["keys"] as? [String] ?? [] }

    /// The registry member's current signing key record (seed and kid) from its data directory.
    func registryKey() throws -> (seed: String, kid: String) {
        let path = registry.dir.url.appendingPathComponent("identity/signing.json").path
        let json =
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any]
        guard let seed = json?["seed"] as? String, let kid = json?["kid"] as? String else {
            throw TestFailure("no signing key record at \(path)")
        }
        return (seed, kid)
    }
}

/// Identity without mTLS, end to end: real registry, real sidecars, real traffic, and tokens
/// forged with PyJWT. Each refusal is checked for its status and its `tandem-error` reason.
@Suite(.serialized) struct IdentityTests {
    @Test func allowRulesHoldPerRouteBetweenThreeServices() throws {
        let m = try IdentityMesh()
        let viaOrders = try http("http://users/headers", proxy: m.orders.outbound)
        #expect(viaOrders.status == 200, "\(viaOrders)")
        // The app sees the verified caller, and never the token or the proof.
        #expect(viaOrders.body.contains(#""tandem-caller": "orders""#), "\(viaOrders.body)")
        #expect(!viaOrders.body.contains("tandem-identity") && !viaOrders.body.contains("tandem-proof"))
        // The Lua policy reads the verified caller.
        #expect(viaOrders.headers["x-policy-caller"] == "orders")
        #expect(try http("http://users/", proxy: m.web.outbound).body.contains("edge"))
        #expect(try http("http://users/orders-only/x", proxy: m.orders.outbound).status == 200)
        let refused = try curl(["-x", "http://\(m.web.outbound)", "http://users/orders-only/x"])
        #expect(refused.status == 403 && refused.head["tandem-error"] == "forbidden", "\(refused.head)")
        #expect(String(decoding: refused.body, as: UTF8.self).contains(#"\"web\" is not allowed on route"#))
        // A service the routes do not name is refused everywhere (the default is deny).
        let (token, _) = try m.issue("billing", "users")
        let other = try m.direct("/", headers: ["tandem-identity": token])
        #expect(other.status == 403 && other.head["tandem-error"] == "forbidden")
        // A route that names nobody admits nobody: the registry's mesh-wide default is deny.
        let unlisted = try curl(["-x", "http://\(m.orders.outbound)", "http://users/unlisted"])
        #expect(unlisted.status == 403, "\(unlisted.head)")
        #expect(String(decoding: unlisted.body, as: UTF8.self).contains("(the default is deny)"))
        #expect(try http("http://\(m.users.admin)/identity").body.contains(#""default":"deny""#))
        // No token at all: 401, and a caller cannot claim an identity with a header.
        let anonymous = try m.direct("/", headers: ["tandem-caller": "orders"])
        #expect(anonymous.status == 401 && anonymous.head["tandem-error"] == "missing-token", "\(anonymous)")
        let metrics = try http("http://\(m.users.admin)/metrics").body
        #expect(metrics.contains(#"tandem_identity_refused_total{reason="forbidden"}"#), "\(metrics)")
    }

    /// Tokens and keys are held: with the registry gone, calls keep being authenticated until
    /// the tokens expire (minutes).
    @Test func aRegistryOutageIsSurvivedWithTheTokensHeld() throws {
        let m = try IdentityMesh()
        #expect(try http("http://users/headers", proxy: m.orders.outbound).status == 200)
        m.registry.child?.stop()
        let during = try http("http://users/headers", proxy: m.orders.outbound)
        #expect(during.status == 200 && during.body.contains(#""tandem-caller": "orders""#), "\(during)")
    }

    @Test func forgedExpiredMisdirectedAndConfusedTokensAreRefused() throws {
        let m = try IdentityMesh()
        let (seed, kid) = try m.registryKey()
        let (good, _) = try m.issue("orders", "users")
        #expect(try m.direct("/", headers: ["tandem-identity": good]).status == 200)
        let claims =
            #"{"iss":"tandem://tandem","sub":"orders","aud":"users","iat":"now","exp":"+60","jti":"x","cnf":{"jkt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}"#
        let someSeed = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"
        let cases: [(String, String, String)] = [
            // Signed by a key the mesh does not hold, under the real key's id.
            ("forged", try forge(["eddsa", someSeed, kid, claims]), "bad-signature"),
            // Signed by the real key (read from the registry's data directory) but expired.
            (
                "expired",
                try forge([
                    "eddsa", seed, kid,
                    claims.replacingOccurrences(of: #""iat":"now","exp":"+60""#, with: #""iat":"-400","exp":"-100""#),
                ]), "expired-token"
            ),
            ("other audience", try m.issue("orders", "billing").token, "wrong-audience"),
            ("alg none", try forge(["none", kid, claims]), "invalid-token"),
            // HS256 keyed with the public key: the RS/HS confusion, on an Ed25519 mesh.
            ("key confusion", try forge(["hs-with", seed, kid, claims]), "invalid-token"),
            ("garbage", "not.a.token", "invalid-token"),
        ]
        for (name, token, reason) in cases {
            let r = try m.direct("/", headers: ["tandem-identity": token])
            #expect(r.status == 401, "\(name): \(r)")
            #expect(r.head["tandem-error"] == reason, "\(name): \(r)")
            #expect(r.body.contains(#""error":"\#(reason)""#), "\(name): \(r.body)")
        }
    }

    @Test func proofsBindTokensToOneRequest() throws {
        let m = try IdentityMesh()
        let (token, seed) = try m.issue("orders", "users")
        let bodyFile = m.dir.url.appendingPathComponent("body").path
        try #"{"amount":10}"#.write(toFile: bodyFile, atomically: true, encoding: .utf8)
        let proof = try m.proof(
            token: token, seed: seed, method: "POST", url: "http://users/upload", bodyFile: bodyFile)
        let headers = ["tandem-identity": token, "tandem-proof": proof]
        let ok = try m.direct("/upload", method: "POST", headers: headers, body: #"{"amount":10}"#)
        #expect(ok.status == 200, "\(ok)")
        let replayed = try m.direct("/upload", method: "POST", headers: headers, body: #"{"amount":10}"#)
        #expect(replayed.status == 401 && replayed.head["tandem-error"] == "replayed-proof", "\(replayed)")
        let p2 = try m.proof(token: token, seed: seed, method: "POST", url: "http://users/upload", bodyFile: bodyFile)
        let tampered = try m.direct(
            "/upload", method: "POST", headers: ["tandem-identity": token, "tandem-proof": p2], body: #"{"amount":99}"#)
        #expect(tampered.status == 401 && tampered.head["tandem-error"] == "body-mismatch", "\(tampered)")
        let p3 = try m.proof(token: token, seed: seed, method: "POST", url: "http://users/upload", bodyFile: bodyFile)
        let otherPath = try m.direct(
            "/upload?to=mallory", method: "POST", headers: ["tandem-identity": token, "tandem-proof": p3],
            body: #"{"amount":10}"#)
        #expect(otherPath.status == 401 && otherPath.head["tandem-error"] == "proof-mismatch", "\(otherPath)")
        // A stolen token without its key: no proof, or a proof signed with another key.
        let noProof = try m.direct("/upload", method: "POST", headers: ["tandem-identity": token], body: "{}")
        #expect(noProof.status == 401 && noProof.head["tandem-error"] == "missing-proof", "\(noProof)")
        let (_, thiefSeed) = try m.issue("web", "users")
        let stolen = try m.proof(token: token, seed: thiefSeed, method: "POST", url: "http://users/upload")
        let thief = try m.direct(
            "/upload", method: "POST", headers: ["tandem-identity": token, "tandem-proof": stolen], body: "{}")
        #expect(thief.status == 401 && thief.head["tandem-error"] == "invalid-proof", "\(thief)")
        // MAC proofs, for users' instance key as its registration publishes it.
        let reg = try etcdctl(
            m.registry.endpoint, ["get", "--print-value-only", "--prefix", "/tandem/services/users/"])
        let regJSON = try JSONSerialization.jsonObject(with: Data(reg.output.utf8)) as? [String: Any]
        let usersKey = try #require(regJSON?["proof_key"] as? String, "\(reg.output)")
        #expect(try m.usersIdentity()["proof_key"] as? String == usersKey)
        let mac = try m.proof(
            token: token, seed: seed, method: "POST", url: "http://users/upload", bodyFile: bodyFile,
            calleeKey: usersKey)
        let macHeaders = ["tandem-identity": token, "tandem-proof": mac]
        let macOK = try m.direct("/upload", method: "POST", headers: macHeaders, body: #"{"amount":10}"#)
        #expect(macOK.status == 200, "\(macOK)")
        let macAgain = try m.direct("/upload", method: "POST", headers: macHeaders, body: #"{"amount":10}"#)
        #expect(macAgain.status == 401 && macAgain.head["tandem-error"] == "replayed-proof", "\(macAgain)")
        /// POST /upload straight to users with orders' token and a fresh MAC proof by `key`.
        func macUpload(
            key: String, proofCovers bodyFile: String? = nil, sending body: String
        ) throws -> (
            head: [String: String], status: Int, body: String
        ) {
            let p = try m.proof(
                token: token, seed: key, method: "POST", url: "http://users/upload", bodyFile: bodyFile,
                calleeKey: usersKey)
            return try m.direct(
                "/upload", method: "POST", headers: ["tandem-identity": token, "tandem-proof": p], body: body)
        }
        let macTampered = try macUpload(key: seed, proofCovers: bodyFile, sending: #"{"amount":99}"#)
        #expect(macTampered.status == 401 && macTampered.head["tandem-error"] == "body-mismatch", "\(macTampered)")
        // The thief's own X25519 key does not make orders' MAC key.
        let macThief = try macUpload(key: thiefSeed, sending: "{}")
        #expect(macThief.status == 401 && macThief.head["tandem-error"] == "invalid-proof", "\(macThief)")
        // orders' sidecar makes a proof for each request (body digest included) — a MAC proof,
        // since users' instance publishes a proof key; web's sidecar makes none.
        let macsBefore = try #require((try m.usersIdentity()["proofs_verified"] as? [String: Any])?["mac"] as? Int)
        let viaOrders = try http(
            "http://users/upload", method: "POST", body: #"{"amount":10}"#, proxy: m.orders.outbound)
        #expect(viaOrders.status == 200 && viaOrders.body.hasPrefix("13 "), "\(viaOrders)")
        let macsAfter = (try m.usersIdentity()["proofs_verified"] as? [String: Any])?["mac"] as? Int
        #expect(macsAfter == macsBefore + 1)
        let viaWeb = try http("http://users/upload", method: "POST", body: "{}", proxy: m.web.outbound)
        #expect(viaWeb.status == 401 && viaWeb.headers["tandem-error"] == "missing-proof", "\(viaWeb)")

        // A MAC proof for another key (the caller's discovery is behind: the instance restarted
        // with a new key) is refused naming the instance's current key…
        let otherKey = AgreementKeyForTests.publicKey
        let staleProof = try m.proof(
            token: token, seed: seed, method: "POST", url: "http://users/upload", calleeKey: otherKey)
        let stale = try m.direct(
            "/upload", method: "POST", headers: ["tandem-identity": token, "tandem-proof": staleProof], body: "{}")
        #expect(stale.status == 401 && stale.head["tandem-error"] == "stale-proof-key", "\(stale)")
        #expect(stale.head["tandem-proof-key"] == usersKey, "\(stale.head)")
        // …and a caller sidecar whose discovery says so sends the request again, once, with a
        // proof for the key named: the call succeeds. (The registration is rewritten with the
        // other key, as a restarted instance's would be stale in the caller's view.)
        let regKey =
            try etcdctl(m.registry.endpoint, ["get", "--keys-only", "--prefix", "/tandem/services/users/"])
            .output.split(separator: "\n").first.map(String.init) ?? ""
        let staleRegistration = reg.output.trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: usersKey, with: otherKey)
        #expect(try etcdctl(m.registry.endpoint, ["put", regKey, staleRegistration]).status == 0)
        #expect(
            try eventually(200) { try http("http://\(m.orders.admin)/clusters").body.contains(otherKey) },
            "orders never saw the rewritten registration")
        let afterRestart = try http(
            "http://users/upload", method: "POST", body: #"{"amount":10}"#, proxy: m.orders.outbound)
        #expect(afterRestart.status == 200 && afterRestart.body.hasPrefix("13 "), "\(afterRestart)")
        let refused = try http("http://\(m.users.admin)/metrics").body
        #expect(refused.contains(#"tandem_identity_refused_total{reason="stale-proof-key"} 2"#), "\(refused)")
    }

    @Test func aRotationKeepsLegitimateCallersAndCutsOffTheOldKeyAfterItsGrace() throws {
        let m = try IdentityMesh()
        let (_, oldKid) = try m.registryKey()
        #expect(try http("http://users/", proxy: m.orders.outbound).status == 200)
        let (before, _) = try m.issue("web", "users")
        // A rotation with the default grace: the old key keeps verifying.
        let rotate = try tandem([
            "identity", "rotate", "--endpoints", m.registry.endpoint, "--join-token-file", m.joinFile,
        ])
        #expect(rotate.status == 0, "\(rotate.output)")
        let (_, newKid) = try m.registryKey()
        #expect(newKid != oldKid)
        #expect(try eventually { try m.keysKnownByUsers().contains(newKid) })
        #expect(try m.direct("/", headers: ["tandem-identity": before]).status == 200)
        #expect(try m.direct("/", headers: ["tandem-identity": try m.issue("web", "users").token]).status == 200)
        #expect(try http("http://users/", proxy: m.orders.outbound).status == 200)
        // A second rotation with no grace drops the key that signed `before` and orders' token.
        let (mid, _) = try m.issue("web", "users")
        let revoke = try tandem([
            "identity", "rotate", "--endpoints", m.registry.endpoint, "--join-token-file", m.joinFile, "--grace", "0",
        ])
        #expect(revoke.status == 0, "\(revoke.output)")
        #expect(try eventually { !(try m.keysKnownByUsers().contains(newKid)) })
        let cut = try m.direct("/", headers: ["tandem-identity": mid])
        #expect(cut.status == 401 && cut.head["tandem-error"] == "unknown-key", "\(cut)")
        // orders' sidecar dropped its token with the key and fetched a new one.
        #expect(try eventually { try http("http://users/", proxy: m.orders.outbound).status == 200 })
        let keys = try tandem(["identity", "keys", "--endpoints", m.registry.endpoint])
        #expect(!keys.output.contains(newKid) && keys.output.contains("active"), "\(keys.output)")
    }

    @Test func endUserJWTsAreVerifiedPerRouteAndTheirClaimsForwarded() throws {
        let m = try IdentityMesh()
        let good = try forge([
            "rs256", m.dir.url.path, #"{"sub":"alice","iss":"https://idp.test","aud":"shop","exp":"+300"}"#,
        ])
        let ok = try curl([
            "-x", "http://\(m.orders.outbound)", "-H", "Authorization: Bearer \(good)", "http://users/headers/me",
        ])
        let body = String(decoding: ok.body, as: UTF8.self)
        #expect(ok.status == 200, "\(ok.head) \(body)")
        #expect(body.contains(#""x-user-id": "alice""#) && !body.contains("authorization"), "\(body)")
        #expect(ok.head["x-policy-sub"] == "alice", "\(ok.head)")
        let cases: [(String, String?, String)] = [
            ("missing", nil, "missing-token"),
            (
                "expired",
                try forge([
                    "rs256", m.dir.url.path, #"{"sub":"alice","iss":"https://idp.test","aud":"shop","exp":"-100"}"#,
                ]), "expired-token"
            ),
            (
                "wrong issuer",
                try forge(["rs256", m.dir.url.path, #"{"sub":"alice","iss":"https://evil","aud":"shop","exp":"+300"}"#]
                ),
                "invalid-token"
            ),
            (
                "RS/HS confusion",
                try forge([
                    "hs-confusion", m.dir.url.path,
                    #"{"sub":"root","iss":"https://idp.test","aud":"shop","exp":"+300"}"#,
                ]), "invalid-token"
            ),
            ("alg none", try forge(["none", "k1", #"{"sub":"root","exp":"+300"}"#, "JWT"]), "invalid-token"),
        ]
        for (name, token, reason) in cases {
            var args = ["-x", "http://\(m.orders.outbound)", "-H", "x-user-id: mallory"]
            if let token { args += ["-H", "Authorization: Bearer \(token)"] }
            let r = try curl(args + ["http://users/headers/me"])
            let text = String(decoding: r.body, as: UTF8.self)
            #expect(r.status == 401 && r.head["tandem-error"] == reason, "\(name): \(r.head) \(text)")
            if name == "missing" { #expect(text.contains("missing token"), "\(text)") }
        }
    }

    /// Registry access with auth on: etcd users log in the etcd way and get their prefixes;
    /// sidecars authenticate with service tokens, register and discover, and may write only
    /// their own registrations.
    @Test func registryAuthScopesUsersAndSidecars() throws {
        let files = try IdentityFiles()
        let (dir, join) = (files.dir, files.join)
        func hash(_ pw: String) throws -> String {
            let c = try Child(tandemBinary(), ["identity", "hash-password", "--iterations", "1000"])
            c.send(pw)
            c.closeStdin()
            let out = c.readLine() ?? ""
            c.process.waitUntilExit()
            return out
        }
        let authFile = dir.url.appendingPathComponent("auth").path
        try """
        root \(try hash("root-pw")) readwrite /
        reader \(try hash("reader-pw")) read /app/ /tandem/
        """.write(toFile: authFile, atomically: true, encoding: .utf8)
        let reg = try RegistryUnderTest(members: 1, extra: ["--join-token-file", join, "--auth-file", authFile])
        let e = reg.endpoint
        #expect(try etcdctl(e, ["put", "/app/x", "1"]).output.contains("etcdserver: user name is empty"))
        #expect(try etcdctl(e, ["--user", "root:root-pw", "put", "/app/x", "1"]).output.contains("OK"))
        #expect(try etcdctl(e, ["--user", "reader:reader-pw", "get", "/app/x", "--print-value-only"]).output == "1\n")
        let denied = try etcdctl(e, ["--user", "reader:reader-pw", "put", "/app/x", "2"])
        #expect(denied.status != 0 && denied.output.contains("etcdserver: permission denied"), "\(denied.output)")
        #expect(
            try etcdctl(e, ["--user", "root:wrong", "get", "/app/x"]).output.contains(
                "etcdserver: authentication failed, invalid user ID or password"))
        #expect(
            try etcdctl(e, ["--user", "reader:reader-pw", "compaction", "1"]).output.contains(
                "etcdserver: permission denied"))

        // Sidecars: users registers (its own prefix) and orders discovers it, both by service token.
        let (app, port) = try startEdgeApp()
        let users = try SidecarUnderTest(
            service: "users", registry: e, appPort: port, app: nil, extra: ["--join-token-file", join])
        let orders = try SidecarUnderTest(
            service: "orders", registry: e, appPort: try freePort(), app: nil, extra: ["--join-token-file", join],
            waitForRegistration: false)
        let call = try http("http://users/headers", proxy: orders.outbound)
        #expect(call.status == 200 && call.body.contains(#""tandem-caller": "orders""#), "\(call)")
        // What a service token may do on its own.
        let issued = try tandem([
            "identity", "issue", "--endpoints", e, "--join-token-file", join, "--service", "orders", "--audience",
            "tandem-registry",
        ])
        let token = issued.output.trimmingCharacters(in: .whitespacesAndNewlines)
        let own = try tandem(["kv", "put", "--endpoints", e, "--token", token, "/tandem/services/orders/extra", "x"])
        #expect(own.status == 0, "\(own.output)")
        let other = try tandem(["kv", "put", "--endpoints", e, "--token", token, "/tandem/services/users/evil", "x"])
        #expect(other.status != 0 && other.output.contains("permission denied"), "\(other.output)")
        let secret = try tandem(["kv", "get", "--endpoints", e, "--token", token, "/app/x"])
        #expect(secret.status != 0 && secret.output.contains("permission denied"), "\(secret.output)")
        let listed = try tandem([
            "kv", "get", "--endpoints", e, "--token", token, "--prefix", "/tandem/services/users/",
        ])
        #expect(listed.status == 0 && listed.output.contains(#""service":"users""#), "\(listed.output)")
        let forged = try tandem(["kv", "get", "--endpoints", e, "--token", "a.b.c", "/tandem/services/"])
        #expect(forged.output.contains("etcdserver: invalid auth token"), "\(forged.output)")
        withExtendedLifetime((app, users, orders, reg)) {}
    }

    /// gRPC (all four modes) carries identity like HTTP/1.1: the token rides in the request
    /// headers, and a route's allow rule refuses one method as PERMISSION_DENIED.
    @Test func grpcCallsCarryIdentityAndAllowRulesAnswerWithGRPCStatuses() throws {
        let files = try IdentityFiles(
            usersConfig: """
                return { inbound = { routes = { { name = "fail", prefix = "/tandem.example.UserService/Fail", allow = { "admin" } } } } }
                """)
        let (dir, join, config) = (files.dir, files.join, files.config)
        let reg = try RegistryUnderTest(members: 1, extra: ["--join-token-file", join])
        let port = try freePort()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port,
            app: ["/usr/bin/python3", grpcService, "server", String(port)],
            extra: ["--app-protocol", "grpc", "--join-token-file", join, "--config", config])
        let client = try SidecarUnderTest(
            service: "orders", registry: reg.endpoint, appPort: try freePort(), app: nil,
            extra: ["--join-token-file", join], waitForRegistration: false)
        let c = try Child("/usr/bin/python3", [grpcService, "client", client.outbound, "users"])
        let lines = c.readUntil { $0.hasPrefix("{") }
        let obj = try JSONSerialization.jsonObject(with: Data((lines.last ?? "").utf8)) as? [String: Any] ?? [:]
        #expect((obj["unary"] as? [String: Any])?["name"] as? String == "Alice", "\(lines)")
        #expect((obj["client_stream"] as? [String: Any])?["received"] as? Int == 5)
        #expect(obj["bidi"] as? [String] == ["hi", "there", "!"])
        let err = obj["error"] as? [String: Any] ?? [:]
        #expect(err["code"] as? String == "PERMISSION_DENIED", "\(err)")
        #expect((err["trailers"] as? [String: String])?["tandem-error"] == "forbidden", "\(err)")
        // Straight to the inbound listener without a token: UNAUTHENTICATED.
        let direct = try Child("/usr/bin/python3", [grpcService, "client", users.inbound, "users"])
        let out = direct.readUntil { $0.hasPrefix("{") }
        #expect(out.contains { $0.contains("UNAUTHENTICATED") }, "\(out)")
        withExtendedLifetime((reg, users, client, dir)) {}
    }

    /// An inbound rate limit keyed by the verified caller: each service has its own bucket,
    /// which a caller cannot escape by claiming another name (the key is the token's subject).
    @Test func inboundRateLimitsPerVerifiedCaller() throws {
        let files = try IdentityFiles(
            usersConfig: """
                return { inbound = { rate_limit = { max_tokens = 2, fill_interval_ms = 3600000, per = "caller" } } }
                """)
        let (dir, join, config) = (files.dir, files.join, files.config)
        let reg = try RegistryUnderTest(members: 1, extra: ["--join-token-file", join])
        let (app, port) = try startEdgeApp()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port, app: nil,
            extra: ["--join-token-file", join, "--config", config])
        let callers = try ["orders", "web"].map { name in
            try SidecarUnderTest(
                service: name, registry: reg.endpoint, appPort: try freePort(), app: nil,
                extra: ["--join-token-file", join], waitForRegistration: false)
        }
        let orders = try (0..<3).map { _ in try http("http://users/", host: nil, proxy: callers[0].outbound) }
        #expect(orders.map(\.status) == [200, 200, 429], "\(orders)")
        #expect(orders[2].headers["tandem-error"] == "rate-limited")
        // orders spent its bucket; web has its own, even when it says it is orders.
        let web = try curl(["-x", "http://\(callers[1].outbound)", "-H", "tandem-caller: orders", "http://users/"])
        #expect(web.status == 200, "\(web.head)")
        withExtendedLifetime((reg, app, users, callers, dir)) {}
    }

    /// End-user keys stored in the registry (a JWKS document, watched), and a join token that
    /// may obtain tokens only for the services its line names.
    @Test func jwksFromTheRegistryAndJoinTokensRestrictedToServices() throws {
        let files = try IdentityFiles(
            usersConfig: """
                return { inbound = { routes = { { name = "me", path = "/headers/me",
                  jwt = { jwks_registry_key = "/tandem/jwks/idp", algorithms = { "RS256" } } } } } }
                """,
            joinText: """
                \(IdentityFiles.joinToken)
                orders-only-token-0123456789abcd  orders   # may obtain tokens for orders only
                """)
        let (dir, join, config) = (files.dir, files.join, files.config)
        _ = try forge(["rsa-key", dir.url.path])
        let reg = try RegistryUnderTest(members: 1, extra: ["--join-token-file", join])
        #expect(try etcdctl(reg.endpoint, ["put", "/tandem/jwks/idp", try forge(["jwks", dir.url.path])]).status == 0)
        let (app, port) = try startEdgeApp()
        let users = try SidecarUnderTest(
            service: "users", registry: reg.endpoint, appPort: port, app: nil,
            extra: ["--join-token-file", join, "--config", config])
        let orders = try SidecarUnderTest(
            service: "orders", registry: reg.endpoint, appPort: try freePort(), app: nil,
            extra: ["--join-token", "orders-only-token-0123456789abcd"], waitForRegistration: false)
        let token = try forge(["rs256", dir.url.path, #"{"sub":"alice","exp":"+300"}"#])
        let args = [
            "-x", "http://\(orders.outbound)", "-H", "Authorization: Bearer \(token)", "http://users/headers/me",
        ]
        #expect(try eventually { try curl(args).status == 200 })
        let refused = try curl(["-x", "http://\(orders.outbound)", "http://users/headers/me"])
        #expect(refused.status == 401 && refused.head["tandem-error"] == "missing-token")
        // The restricted join token: orders yes (its sidecar above used it), web no.
        let web = try tandem([
            "identity", "issue", "--endpoints", reg.endpoint, "--join-token", "orders-only-token-0123456789abcd",
            "--service", "web", "--audience", "users",
        ])
        #expect(web.status != 0 && web.output.contains(#"may not obtain tokens for "web""#), "\(web.output)")
        withExtendedLifetime((reg, app, users, orders, dir)) {}
    }
}

/// A valid X25519 public key that no sidecar in the tests holds (RFC 7748 §6.1, Alice's).
enum AgreementKeyForTests {
    static let publicKey = "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"
}
