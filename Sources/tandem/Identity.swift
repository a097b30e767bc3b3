import ArgumentParser
import Foundation
import NIOCore
import TandemCore
import TandemEtcdAPI
import TandemEtcdClient
import TandemIdentity
import TandemRegistryServer

/// Where the mesh's join token comes from: a file (preferred), the `TANDEM_JOIN_TOKEN`
/// environment variable, or a flag (visible to `ps`; for tests and demos). Never logged.
struct JoinTokenOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "File with the mesh's join token. For a registry: one token per line, optionally followed by the services it may obtain tokens for (`SECRET orders,billing`); `#` starts a comment.",
            valueName: "path"))
    var joinTokenFile: String?
    @Option(
        help: ArgumentHelp(
            "The join token itself (prefer --join-token-file or TANDEM_JOIN_TOKEN).", visibility: .hidden))
    var joinToken: String?
    @Option(help: "The mesh's name; tokens are issued by tandem://NAME.") var mesh = "tandem"

    static let minimumLength = 16

    /// The tokens, each with the services it is restricted to (nil: any). Empty: identity off.
    func tokens() throws -> [(secret: [UInt8], services: Set<String>?)] {
        var lines: [String] = []
        if let path = joinTokenFile {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ValidationError("--join-token-file: cannot read \(path)")
            }
            lines = text.split(whereSeparator: \.isNewline).map(String.init)
        } else if let t = joinToken {
            lines = [t]
        } else if let t = ProcessInfo.processInfo.environment["TANDEM_JOIN_TOKEN"], !t.isEmpty {
            lines = [t]
        }
        var out: [(secret: [UInt8], services: Set<String>?)] = []
        for (i, raw) in lines.enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let secret = fields.first else { continue }
            guard secret.utf8.count >= Self.minimumLength else {
                throw ValidationError(
                    "join token on line \(i + 1) is shorter than \(Self.minimumLength) characters; use e.g. `openssl rand -hex 32`"
                )
            }
            var services: Set<String>?
            if fields.count > 1 {
                let names = fields.dropFirst().joined(separator: ",").split(separator: ",").map(String.init)
                if let bad = names.first(where: { !isServiceName($0) }) {
                    throw ValidationError("join token on line \(i + 1): \"\(bad)\" is not a service name")
                }
                services = Set(names)
            }
            out.append((Array(secret.utf8), services))
        }
        return out
    }

    /// A sidecar's single token (the first one), or nil.
    func sidecarToken() throws -> String? {
        try tokens().first.map { String(decoding: $0.secret, as: UTF8.self) }
    }

    var issuer: String { "tandem://\(mesh)" }
}

struct IdentityCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "identity", abstract: "Service identity: issue tokens, rotate signing keys, list keys.",
        subcommands: [Issue.self, Proof.self, Rotate.self, Keys.self, HashPassword.self])

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Obtain a token for SERVICE to call AUDIENCE (prints it; for debugging and tests).")
        @OptionGroup var client: ClientOptions
        @OptionGroup var join: JoinTokenOptions
        @Option(help: "The calling service (sub).") var service: String
        @Option(help: "The callee service (aud).") var audience: String
        @Option(help: "Thumbprint of the proof key the token is bound to (default: a fresh key, printed).")
        var keyThumbprint: String?
        @Option(help: "Lifetime in seconds (capped by the registry).") var ttl: Int64 = 0

        func run() throws {
            guard let secret = try join.sidecarToken() else {
                throw ValidationError("a join token is needed: --join-token-file or TANDEM_JOIN_TOKEN")
            }
            var seed: [UInt8] = []
            var g = SystemRandomNumberGenerator()
            for _ in 0..<32 { seed.append(UInt8.random(in: 0...255, using: &g)) }
            let key = try KeyPair(seed: seed)
            var req = Tandem_Identity_V1_IssueRequest()
            req.joinToken = secret
            req.service = service
            req.audiences = [audience]
            req.keyThumbprint = keyThumbprint ?? key.thumbprint
            // The seed's X25519 half too (MAC proofs), unless the token is bound to another key.
            if keyThumbprint == nil { req.agreementKey = AgreementKey(derivedFrom: seed).x }
            req.ttlSeconds = ttl
            let resp: Tandem_Identity_V1_IssueResponse = try client.withClient {
                try $0.unary("/tandem.identity.v1.Identity/Issue", req).wait()
            }
            guard let t = resp.tokens.first else { throw RuntimeError("the registry issued no token") }
            if client.json {
                var out: [String: Any] = ["token": t.token, "expires_at": t.expiresAt, "issuer": resp.issuer]
                if keyThumbprint == nil { out["proof_key_seed"] = Base64URL.encode(key.seed) }
                print(jsonString(out))
            } else {
                print(t.token)
            }
        }
    }

    struct Proof: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a proof of possession for one request (the tandem-proof header value).",
            discussion: """
                With the proof_key_seed that `tandem identity issue --json` printed, prints the value \
                for the tandem-proof header of a request to URL (http://AUTHORITY/PATH?QUERY) with \
                the token in tandem-identity. For debugging, and to call a sidecar without one. \
                Signed (Ed25519) by default; with --callee-key (the proof_key of the callee \
                instance's registration), a MAC proof for that instance. Give keys and seeds as \
                --key-seed=VALUE: base64url values may start with "-", which would read as an option.
                """)
        @Option(help: "The token the proof goes with.") var token: String
        @Option(help: "base64url of the 32-byte proof key seed.") var keySeed: String
        @Option(help: "HTTP method.") var method = "GET"
        @Option(help: "http://AUTHORITY/PATH?QUERY as the callee receives it.") var url: String
        @Option(help: "File whose bytes are the request body (covered by the proof).") var bodyFile: String?
        @Option(help: "The callee instance's proof key (base64url X25519): make a MAC proof for it.")
        var calleeKey: String?

        func run() throws {
            guard let seed = Base64URL.decode(keySeed), seed.count == 32 else {
                throw ValidationError("--key-seed: expected base64url of 32 bytes")
            }
            guard url.hasPrefix("http://") else { throw ValidationError("--url: expected http://AUTHORITY/PATH") }
            let rest = url.dropFirst(7)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            var digest: String?
            if let f = bodyFile {
                guard let data = FileManager.default.contents(atPath: f) else {
                    throw ValidationError("--body-file: cannot read \(f)")
                }
                digest = sha256Base64URL(Array(data))
            }
            var g = SystemRandomNumberGenerator()
            let target = ProofTarget(
                method: method.uppercased(), authority: String(rest[..<slash]),
                pathAndQuery: slash == rest.endIndex ? "/" : String(rest[slash...]), bodyDigest: digest)
            let (hash, now) = (sha256Base64URL(token.utf8), Int64(Date().timeIntervalSince1970))
            let nonce = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
            if let calleeKey {
                let key: MACKey
                do {
                    key = try AgreementKey(derivedFrom: seed).macKey(peer: calleeKey, asCaller: true)
                } catch {
                    throw ValidationError("--callee-key: \(error.message)")
                }
                print(
                    ProofSigner.mac(
                        target, tokenHash: hash, now: now, nonce: nonce, macKey: key,
                        calleeKid: AgreementKey.kid(x: calleeKey)))
            } else {
                print(ProofSigner(key: try KeyPair(seed: seed)).sign(target, tokenHash: hash, now: now, nonce: nonce))
            }
        }
    }

    struct Rotate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace the signing key of the member at --endpoints.",
            discussion: """
                The old key signs nothing more and keeps verifying for --grace seconds (default: the \
                token lifetime plus the skew, so no valid token is cut short), then it is deleted. \
                --grace 0 drops it at once: every token it signed is refused (a compromised key).
                """)
        @OptionGroup var client: ClientOptions
        @OptionGroup var join: JoinTokenOptions
        @Option(help: "Seconds the old key keeps verifying (-1: the default).") var grace: Int64 = -1

        func run() throws {
            guard let secret = try join.sidecarToken() else {
                throw ValidationError("a join token is needed: --join-token-file or TANDEM_JOIN_TOKEN")
            }
            var req = Tandem_Identity_V1_RotateRequest()
            req.joinToken = secret
            req.graceSeconds = grace
            let r: Tandem_Identity_V1_RotateResponse = try client.withClient {
                try $0.unary("/tandem.identity.v1.Identity/Rotate", req).wait()
            }
            if client.json {
                print(
                    jsonString(["kid": r.kid, "retired_kid": r.retiredKid, "retired_expires_at": r.retiredExpiresAt]))
            } else {
                print("new signing key \(r.kid); \(r.retiredKid) verifies until \(r.retiredExpiresAt)")
            }
        }
    }

    struct HashPassword: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Hash a password (read from stdin) for the registry's --auth-file (PBKDF2-SHA256).")
        @Option(help: "PBKDF2 iterations (at least 1000).") var iterations = RegistryAuth.defaultIterations

        func run() throws {
            guard iterations >= 1_000 else { throw ValidationError("--iterations must be at least 1000") }
            guard let line = readLine(strippingNewline: true), !line.isEmpty else {
                throw ValidationError("give the password on stdin")
            }
            var g = SystemRandomNumberGenerator()
            print(
                RegistryAuth.hashPassword(
                    line, salt: (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }, iterations: iterations))
        }
    }

    struct Keys: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the published signing keys.")
        @OptionGroup var client: ClientOptions

        func run() throws {
            let (kvs, _) = try client.withClient {
                try $0.get(RegistryIdentity.keyPrefix, prefix: true).wait()
            }
            let keys = kvs.compactMap { try? PublishedKey.parse($0.value) }
            if client.json {
                print("[" + keys.map(\.json).joined(separator: ",") + "]")
            } else {
                for k in keys {
                    let state = k.retiredAt == nil ? "active" : "retired, verifies until \(k.expiresAt ?? 0)"
                    print("\(k.kid)  node \(k.node)  created \(k.createdAt)  \(state)")
                }
            }
        }
    }
}
