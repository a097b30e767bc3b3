import Foundation
import JWTKit
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TandemConfig
import TandemCore
import TandemEtcdClient
import TandemIdentity
import TandemTraffic

/// Who an inbound request is from, once the gate has checked it.
struct InboundWho: Sendable {
    var caller: String?
    /// Verified end-user claims (nil: the route checks none, or the token was optional and absent).
    var claims: [String: JSONValue]?
    /// Headers for the app: the claims the route forwards.
    var headers: [(String, String)] = []
}

/// The inbound checks in front of the app: the service token, proof and allow rules
/// (`SidecarIdentity`), then the route's end-user JWT (`EndUserVerifier`). Synchronous when
/// the JWT is absent or already verified; a first verification by jwt-kit is asynchronous.
final class InboundGate: @unchecked Sendable {
    let identity: SidecarIdentity?
    private let lock = NIOLock()
    private var verifiers: [String: EndUserVerifier] = [:]
    private var table = RouteTable([])
    private var routes: [String: InboundRoute] = [:]
    private var fallback = InboundRoute(name: "inbound", match: RouteMatch())
    private let metrics: SidecarMetrics

    init(identity: SidecarIdentity?, metrics: SidecarMetrics) {
        self.identity = identity
        self.metrics = metrics
    }

    /// Loads every inbound route's JWT keys (files now, registry keys by watch); replaces the
    /// previous verifiers only when all load.
    func install(_ c: SidecarConfig, registry: EtcdClient?, loop: any EventLoop) -> EventLoopFuture<Void> {
        identity?.reconfigure(c)
        let routes = ([c.inboundDefault] + c.inboundRoutes).filter { $0.jwt != nil }
        let promise = loop.makePromise(of: [String: EndUserVerifier].self)
        promise.completeWithTask {
            var out: [String: EndUserVerifier] = [:]
            for r in routes { out[r.name] = try await EndUserVerifier(rule: r.jwt!, route: r.name) }
            return out
        }
        let table = RouteTable(
            c.inboundRoutes.map { Route(name: $0.name, match: $0.match, cluster: ProxyContext.localCluster) })
        let byName = Dictionary(c.inboundRoutes.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let fallback = c.inboundDefault
        return promise.futureResult.map { [self] built in
            let old = lock.withLock { () -> [String: EndUserVerifier] in
                let old = verifiers
                verifiers = built
                self.table = table
                self.routes = byName
                self.fallback = fallback
                return old
            }
            for v in old.values { v.stop() }
            if let registry { for v in built.values { v.watchRegistry(registry) } }
        }
    }

    func stop() {
        for v in lock.withLock({ verifiers.values }) { v.stop() }
    }

    enum Check {
        case pass(InboundWho)
        case answer(LocalAnswer)
        /// Fails with a LocalAnswer.
        case wait(EventLoopFuture<InboundWho>)
    }

    /// Exactly one of `proceed` or `refuse` for a check's outcome — at once, or on the loop
    /// once a first end-user JWT is verified. (Not folded into `check`: the callers' `head`
    /// must not be borrowed `inout` while `proceed` changes it.)
    static func settle(
        _ c: Check, refuse: @escaping @Sendable (LocalAnswer) -> Void,
        proceed: @escaping @Sendable (InboundWho) -> Void
    ) {
        switch c {
        case .answer(let a): refuse(a)
        case .pass(let who): proceed(who)
        case .wait(let f):
            f.whenComplete { r in
                switch r {
                case .success(let who): proceed(who)
                case .failure(let e): refuse(e as? LocalAnswer ?? LocalAnswer(.unauthenticated))
                }
            }
        }
    }

    /// Checks `head` (path and query in `pathAndQuery`); strips credentials and sets the
    /// headers the app gets (`tandem-caller`, forwarded claims).
    func check(
        head: inout HTTPRequestHead, pathAndQuery: String, body: ByteBuffer?, bodyStreams: Bool, loop: any EventLoop
    ) -> Check {
        var who = InboundWho()
        let path = pathAndQuery.split(separator: "?", maxSplits: 1).first.map(String.init) ?? pathAndQuery
        let method = head.method.rawValue
        let (route, verifier) = lock.withLock { () -> (InboundRoute, EndUserVerifier?) in
            let r =
                table.route(RequestHead(method: method, host: "", path: path)).flatMap { routes[$0.route.name] }
                ?? fallback
            return (r, verifiers[r.name])
        }
        if let id = identity {
            switch id.authorize(
                headers: &head.headers, method: method, authority: head.headers.first(name: "host") ?? "",
                pathAndQuery: pathAndQuery, route: route, body: body, bodyStreams: bodyStreams)
            {
            case .failure(let a): return .answer(a)
            case .success(let c): who.caller = c?.subject
            }
        } else if head.headers.contains(name: SidecarIdentity.callerHeader) {
            // Without identity nobody is verified: the app must not be told otherwise.
            head.headers.remove(name: SidecarIdentity.callerHeader)
        }
        guard let rule = route.jwt, let verifier else { return .pass(who) }
        for (_, header) in rule.forwardClaims { head.headers.removeIfPresent(header) }
        guard let token = EndUserVerifier.extract(rule.from, head: &head, strip: !rule.forwardToken) else {
            if rule.required {
                metrics.inc("tandem_jwt_refused_total", [("reason", "missing-token")])
                return .answer(Self.answer(IdentityError(.missingToken, "missing token"), rule: rule))
            }
            return .pass(who)
        }
        let now = Int64(Date().timeIntervalSince1970)
        if let cached = verifier.cached(token, now: now) {
            who.claims = cached
            who.headers = Self.forwarded(cached, rule: rule)
            return .pass(who)
        }
        let promise = loop.makePromise(of: InboundWho.self)
        let caller = who.caller
        let metrics = self.metrics
        promise.completeWithTask {
            do {
                let claims = try await verifier.verify(token, now: now)
                return InboundWho(caller: caller, claims: claims, headers: Self.forwarded(claims, rule: rule))
            } catch let e as IdentityError {
                metrics.inc("tandem_jwt_refused_total", [("reason", e.reason.rawValue)])
                throw Self.answer(e, rule: rule)
            }
        }
        return .wait(promise.futureResult)
    }

    /// The claims the route forwards to the app, as headers (strings as they are, other
    /// values as JSON).
    static func forwarded(_ claims: [String: JSONValue], rule: JWTRule) -> [(String, String)] {
        rule.forwardClaims.compactMap { claim, header in claims[claim].map { (header, $0.string ?? $0.encoded) } }
    }

    static func answer(_ e: IdentityError, rule: JWTRule) -> LocalAnswer {
        LocalAnswer(
            e.status == 403 ? .forbidden : .unauthenticated, message: e.message, status: e.status,
            detail: e.reason.rawValue)
    }
}

/// All claims of an end-user JWT; jwt-kit checks the signature, `EndUserVerifier` the claims.
struct EndUserClaims: JWTPayload {
    var claims: [String: JSONValue]
    init(from decoder: any Decoder) throws {
        claims = try decoder.singleValueContainer().decode([String: JSONValue].self)
    }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(claims)
    }
    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// Verifies end-user JWTs for one inbound route with jwt-kit: keys from JWKS files, PEM files,
/// HMAC secret files, and JWKS documents stored in the registry (watched). The header's `alg`
/// must be one the route accepts *and* the one the selected key is for — `none` never is, and
/// a token cannot make an RSA key act as an HMAC secret. Verified tokens are remembered until
/// they expire (bounded), so a user's token costs one signature check.
final class EndUserVerifier: @unchecked Sendable {
    let rule: JWTRule
    let route: String
    private let lock = NIOLock()
    private var keys: JWTKeyCollection
    private var cache: [String: (claims: [String: JSONValue], exp: Int64)] = [:]
    private var watchers: [PrefixWatcher] = []
    static let maxCachedTokens = 4096
    static let maxTokenBytes = 8192

    /// The decisions on `alg` and claims (TandemIdentity).
    var requirements: EndUserRequirements {
        EndUserRequirements(
            issuers: rule.issuers, audiences: rule.audiences, algorithms: rule.algorithms, skew: rule.skew, route: route
        )
    }

    init(rule: JWTRule, route: String) async throws {
        self.rule = rule
        self.route = route
        keys = try await Self.collection(rule, registryDocuments: [])
    }

    static func collection(_ rule: JWTRule, registryDocuments: [String]) async throws -> JWTKeyCollection {
        let keys = JWTKeyCollection()
        func read(_ f: String) throws -> String {
            guard let text = try? String(contentsOfFile: f, encoding: .utf8) else {
                throw ConfigFile.Error("cannot read \(f)")
            }
            return text
        }
        for f in rule.jwksFiles {
            do { try await keys.add(jwksJSON: try read(f)) } catch let e as ConfigFile.Error { throw e } catch {
                throw ConfigFile.Error("\(f): not a JWKS document (\(error))")
            }
        }
        for doc in registryDocuments { _ = try? await keys.add(jwksJSON: doc) }  // a bad document is skipped
        for (f, alg) in rule.pemKeys {
            let pem = try read(f)
            do {
                switch alg {
                case "RS256", "RS384", "RS512":
                    await keys.add(rsa: try Insecure.RSA.PublicKey(pem: pem), digestAlgorithm: digest(alg))
                case "PS256", "PS384", "PS512":
                    await keys.add(pss: try Insecure.RSA.PublicKey(pem: pem), digestAlgorithm: digest(alg))
                case "ES256": await keys.add(ecdsa: try ES256PublicKey(pem: pem))
                case "ES384": await keys.add(ecdsa: try ES384PublicKey(pem: pem))
                default: throw ConfigFile.Error("\(f): PEM keys for \(alg) are not supported; use a JWKS file")
                }
            } catch let e as ConfigFile.Error { throw e } catch {
                throw ConfigFile.Error("\(f): not a \(alg) public key in PEM (\(error))")
            }
        }
        for f in rule.hmacSecretFiles {
            let secret = try read(f).trimmingCharacters(in: .whitespacesAndNewlines)
            guard secret.utf8.count >= 32 else {
                throw ConfigFile.Error("\(f): an HMAC secret needs at least 32 bytes")
            }
            for alg in rule.algorithms where alg.hasPrefix("HS") {
                await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: digest(alg))
            }
        }
        return keys
    }

    static func digest(_ alg: String) -> DigestAlgorithm {
        alg.hasSuffix("512") ? .sha512 : alg.hasSuffix("384") ? .sha384 : .sha256
    }

    func watchRegistry(_ client: EtcdClient) {
        for key in rule.registryJWKS {
            let w = PrefixWatcher(client: client, prefix: key) { [weak self] values in
                guard let self else { return }
                let docs = values.sorted { $0.key < $1.key }.map { String(decoding: $0.value, as: UTF8.self) }
                let rule = self.rule
                Task {
                    guard let fresh = try? await Self.collection(rule, registryDocuments: docs) else { return }
                    self.lock.withLock {
                        self.keys = fresh
                        self.cache = [:]
                    }
                }
            }
            lock.withLock { watchers.append(w) }
            w.start()
        }
    }

    func stop() { for w in lock.withLock({ watchers }) { w.stop() } }

    /// The token from the first source that has one; removed from the request unless the
    /// route forwards it.
    static func extract(_ sources: [JWTRule.Source], head: inout HTTPRequestHead, strip: Bool) -> String? {
        for s in sources {
            switch s {
            case .bearer:
                guard let v = head.headers.first(name: "authorization") else { continue }
                let parts = v.split(separator: " ", maxSplits: 1)
                guard parts.count == 2, parts[0].lowercased() == "bearer" else { continue }
                if strip { head.headers.remove(name: "authorization") }
                return parts[1].trimmingCharacters(in: .whitespaces)
            case .header(let name):
                guard let v = head.headers.first(name: name), !v.isEmpty else { continue }
                if strip { head.headers.remove(name: name) }
                return v
            case .cookie(let name):
                for line in head.headers["cookie"] {
                    for pair in line.split(separator: ";") {
                        let kv = pair.split(separator: "=", maxSplits: 1)
                        if kv.count == 2, kv[0].trimmingCharacters(in: .whitespaces) == name {
                            return String(kv[1]).trimmingCharacters(in: .whitespaces)
                        }
                    }
                }
            case .query(let name):
                guard let q = head.uri.firstIndex(of: "?") else { continue }
                for pair in head.uri[head.uri.index(after: q)...].split(separator: "&") {
                    let kv = pair.split(separator: "=", maxSplits: 1)
                    if kv.count == 2, kv[0] == name {
                        return String(kv[1]).removingPercentEncoding ?? String(kv[1])
                    }
                }
            }
        }
        return nil
    }

    func cached(_ token: String, now: Int64) -> [String: JSONValue]? {
        lock.withLock {
            guard let c = cache[token] else { return nil }
            guard now < c.exp + rule.skew else {
                cache[token] = nil
                return nil
            }
            return c.claims
        }
    }

    func verify(_ token: String, now: Int64) async throws(IdentityError) -> [String: JSONValue] {
        guard token.utf8.count <= Self.maxTokenBytes else {
            throw IdentityError(.invalidToken, "invalid token: longer than \(Self.maxTokenBytes) bytes")
        }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let hb = Base64URL.decode(parts[0]), let header = try? JSONValue.parse(hb) else {
            throw IdentityError(.invalidToken, "invalid token: not a JWT")
        }
        let alg = header["alg"]?.string ?? ""
        try requirements.checkAlgorithm(header["alg"]?.string)
        let kid = header["kid"]?.string.map { JWKIdentifier(string: $0) }
        let keys = lock.withLock { self.keys }
        let claims: [String: JSONValue]
        do {
            let key = try await keys.getKey(for: kid, alg: alg)
            try requirements.checkKey(alg: alg, keyAlgorithm: key.name)
            claims = try await keys.verify(token, as: EndUserClaims.self).claims
        } catch let e as IdentityError {
            throw e
        } catch let e as JWTError where e.errorType == .signatureVerificationFailed {
            throw IdentityError(.badSignature, "invalid token: signature does not verify")
        } catch let e as JWTError where e.errorType == .noKeyProvided || e.errorType == .unknownKID {
            throw IdentityError(.unknownKey, "invalid token: no key for kid \(kid?.string ?? "(none)")")
        } catch {
            throw IdentityError(.invalidToken, "invalid token: \(error)")
        }
        let exp = try requirements.checkClaims(claims, now: now)
        lock.withLock {
            if cache.count >= Self.maxCachedTokens {
                cache = cache.filter { now < $0.value.exp + rule.skew }
                if cache.count >= Self.maxCachedTokens { cache.remove(at: cache.startIndex) }
            }
            cache[token] = (claims, exp)
        }
        return claims
    }
}
