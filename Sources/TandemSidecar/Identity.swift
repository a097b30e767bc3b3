import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TandemConfig
import TandemCore
import TandemEtcdAPI
import TandemEtcdClient
import TandemIdentity
import TandemTraffic

/// A sidecar's identity at run time (docs/security.md): its proof key (in memory only), the
/// tokens it holds per callee (obtained from the registry with the join token, refreshed at
/// two thirds of their life, kept through a registry outage until they expire), the mesh's
/// published keys (watched), and the inbound authenticator with its replay cache. One lock
/// guards it all; the decisions are TandemIdentity's.
final class SidecarIdentity: @unchecked Sendable {
    static let tokenHeader = "tandem-identity"
    static let proofHeader = "tandem-proof"
    static let callerHeader = "tandem-caller"
    static let keyPrefix = "/tandem/identity/keys/"
    /// The registry publishes keys and the mesh-wide settings under this prefix.
    static let identityPrefix = "/tandem/identity/"
    static let meshKey = "/tandem/identity/mesh"

    struct Held {
        var token: String
        var expiresAt: Int64
        var refreshAt: Int64
        /// `ath` of the proofs that go with it.
        var hash: String
        /// The key that signed it: when the mesh drops that key, the token is dropped too.
        var kid: String
    }

    let service: String
    private(set) var settings: IdentitySettings
    let key: KeyPair
    let proofs: ProofSigner
    /// The X25519 proof key: bound in this sidecar's tokens and published in its registration,
    /// so callers and callees agree on MAC keys for proofs.
    let agreement: AgreementKey
    private let lock = NIOLock()
    /// MAC keys agreed with callee instances (outbound proofs).
    private var calleeKeys: MACKeyCache
    /// Proof nonces: 8 random bytes drawn at start, then a counter — unique per sidecar, which
    /// is what the callee's replay check needs, without a getrandom call per request.
    private let noncePrefix: [UInt8]
    private var nonceCounter: UInt64 = 0
    /// Proof keys callee instances named in `stale-proof-key` refusals (TandemIdentity decides).
    private var learnedKeys: LearnedProofKeys
    static let proofKeyHeader = "tandem-proof-key"
    private var auth: InboundAuthenticator
    /// The mesh-wide settings the registry publishes (used where the config says nothing).
    private var mesh: (defaultAccess: DefaultAccess?, proof: Bool?) = (nil, nil)
    private var effectiveDefault: DefaultAccess { settings.defaultAccess ?? mesh.defaultAccess ?? .allow }
    private var effectiveProof: Bool { settings.proof ?? mesh.proof ?? false }
    private var held: [String: Held] = [:]
    private var fetching: [String: EventLoopFuture<Void>] = [:]
    /// Last failure per audience, so a registry outage answers fast instead of queueing.
    private var failures: [String: (at: Int64, message: String)] = [:]
    private(set) var keysLoaded = false
    private var watcher: PrefixWatcher?
    private var refreshTask: RepeatedTask?
    private var client: EtcdClient?
    private let log: @Sendable (String) -> Void
    private let metrics: SidecarMetrics

    init(config: SidecarConfig, metrics: SidecarMetrics, log: @escaping @Sendable (String) -> Void) {
        service = config.service
        settings = config.identity
        var g = SystemRandomNumberGenerator()
        let seed = (0..<32).map { _ in UInt8.random(in: 0...255, using: &g) }
        // 32 bytes from the system generator always make a valid Ed25519 key.
        key = try! KeyPair(seed: seed)
        proofs = ProofSigner(key: key)
        agreement = AgreementKey(derivedFrom: seed)
        noncePrefix = (0..<8).map { _ in UInt8.random(in: 0...255, using: &g) }
        calleeKeys = MACKeyCache(capacity: config.identity.limits.proofKeyCacheEntries)
        learnedKeys = LearnedProofKeys(capacity: config.identity.limits.learnedProofKeyEntries)
        auth = InboundAuthenticator(
            issuer: config.identity.issuer, service: config.service, limits: config.identity.limits,
            agreement: agreement)
        self.log = log
        self.metrics = metrics
    }

    static func now() -> Int64 { Int64(Date().timeIntervalSince1970) }

    /// New settings (config reload). The issuer and join token stay.
    func reconfigure(_ c: SidecarConfig) {
        lock.withLock {
            let keep = (settings.joinToken, settings.issuer)
            settings = c.identity
            (settings.joinToken, settings.issuer) = keep
        }
    }

    /// The audience of the token a sidecar shows the registry (its `token` metadata), which a
    /// registry with client auth on checks: a service reads discovery and writes only its own
    /// registrations.
    static let registryAudience = "tandem-registry"

    /// The token for the registry's `token` metadata (nil until obtained).
    func registryToken() -> String? { token(for: Self.registryAudience)?.token }

    /// Obtains the registry token, then watches the mesh's keys; the future completes once
    /// they are known.
    func start(registry: EtcdClient) -> EventLoopFuture<Void> {
        client = registry
        refreshTask = registry.loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) {
            [weak self] _ in self?.refreshDue()
        }
        let loop = registry.loop
        let first =
            whenToken(for: Self.registryAudience, loop: loop)?.recover { [log] e in
                log("identity: no token for the registry yet (\((e as? LocalAnswer)?.message ?? "\(e)"))")
            } ?? loop.makeSucceededVoidFuture()
        return first.flatMap { [self] in
            let w = PrefixWatcher(client: registry, prefix: Self.identityPrefix) { [weak self] values in
                self?.setKeys(values.filter { $0.key.hasPrefix(Self.keyPrefix) })
                self?.setMesh(values[Self.meshKey])
            }
            w.log = log
            lock.withLock { watcher = w }
            return w.start()
        }
    }

    func stop() {
        lock.withLock { watcher }?.stop()
        refreshTask?.cancel()
    }

    private func setKeys(_ values: [String: [UInt8]]) {
        var keys: [PublishedKey] = []
        for (k, v) in values {
            do { keys.append(try PublishedKey.parse(v)) } catch { log("identity: ignoring key record \(k): \(error)") }
        }
        let kids = keys.map(\.kid).sorted()
        let live = Set(kids)
        lock.withLock {
            auth.tokens.setKeys(keys)
            keysLoaded = true
            // A token signed by a key that is gone (rotated out, revoked) is refused everywhere:
            // the next request fetches a fresh one.
            held = held.filter { live.contains($0.value.kid) }
        }
        log("identity: \(kids.count) signing key(s): \(kids.joined(separator: ", "))")
    }

    private func setMesh(_ value: [UInt8]?) {
        let v = value.flatMap { try? JSONValue.parse($0) }
        let m = (
            v?["default"]?.string.flatMap(DefaultAccess.init(rawValue:)),
            v?["proof"].flatMap { j -> Bool? in
                if case .bool(let b) = j { return b } else { return nil }
            }
        )
        let changed = lock.withLock { () -> Bool in
            defer { mesh = m }
            return mesh.defaultAccess != m.0 || mesh.proof != m.1
        }
        if changed {
            log("identity: mesh settings: default \(m.0?.rawValue ?? "allow"), proof \(m.1 ?? false)")
        }
    }

    /// Published key ids, for the admin endpoint and tests.
    var knownKeys: [String] { lock.withLock { auth.tokens.keys.keys.sorted() } }

    /// `GET /identity` on the admin listener: keys, tokens held (audience and expiry, never
    /// the token), the replay cache. No secret appears.
    func json() -> String {
        lock.withLock {
            JSONValue.object([
                "service": .string(service), "issuer": .string(settings.issuer),
                "mode": .string(settings.effectiveMode.rawValue), "proof": .bool(effectiveProof),
                "default": .string(effectiveDefault.rawValue), "key_thumbprint": .string(key.thumbprint),
                "proof_key": .string(agreement.x), "proof_kind": .string(settings.proofKind.rawValue),
                "keys": .array(auth.tokens.keys.keys.sorted().map { .string($0) }),
                "keys_loaded": .bool(keysLoaded),
                "tokens": .object(held.mapValues { .object(["expires_at": .number(Double($0.expiresAt))]) }),
                "verified_tokens_cached": .number(Double(auth.tokens.cachedTokens)),
                "replay_cache_entries": .number(Double(auth.proofs.replay.count)),
                "proofs_verified": .object([
                    "mac": .number(Double(auth.proofs.macsVerified)),
                    "signature": .number(Double(auth.proofs.signaturesVerified)),
                ]),
            ]).encoded
        }
    }

    // MARK: outbound

    /// The token to call `audience` with, or nil when none is held yet.
    func token(for audience: String, now: Int64 = SidecarIdentity.now()) -> Held? {
        lock.withLock {
            guard let h = held[audience], now < h.expiresAt else { return nil }
            return h
        }
    }

    /// Resolves when a token for `audience` is held (nil: one is held now). Fails with a
    /// LocalAnswer when the registry will not issue one.
    func whenToken(for audience: String, loop: any EventLoop) -> EventLoopFuture<Void>? {
        let now = Self.now()
        if token(for: audience, now: now) != nil { return nil }
        return lock.withLock { () -> EventLoopFuture<Void> in
            if let f = fetching[audience] { return f.hop(to: loop) }
            if let fail = failures[audience], now - fail.at < 1 {
                return loop.makeFailedFuture(Self.unavailable(audience, fail.message))
            }
            return fetchLocked(audience, loop: loop).hop(to: loop)
        }
    }

    /// The `kid` in a token's header ("" if unreadable).
    static func kid(of token: String) -> String {
        guard let h = token.split(separator: ".").first, let bytes = Base64URL.decode(h),
            let v = try? JSONValue.parse(bytes)
        else { return "" }
        return v["kid"]?.string ?? ""
    }

    static func unavailable(_ audience: String, _ message: String) -> LocalAnswer {
        LocalAnswer(
            .upstreamConnectFailure, message: "no identity token for calling \"\(audience)\": \(message)", status: 503,
            detail: "identity-unavailable")
    }

    /// Asks the registry for a token; the caller holds the lock.
    private func fetchLocked(_ audience: String, loop: any EventLoop) -> EventLoopFuture<Void> {
        guard let client, let join = settings.joinToken else {
            return loop.makeFailedFuture(
                Self.unavailable(audience, "this sidecar has no registry or join token"))
        }
        var req = Tandem_Identity_V1_IssueRequest()
        req.joinToken = join
        req.service = service
        req.audiences = [audience]
        req.keyThumbprint = key.thumbprint
        req.agreementKey = agreement.x
        req.ttlSeconds = settings.tokenTTL
        // Submitted, never run inline: the callbacks below take the lock the caller holds.
        let request = req
        let f = client.loop.flatSubmit {
            client.unary("/tandem.identity.v1.Identity/Issue", request, as: Tandem_Identity_V1_IssueResponse.self)
        }
        .flatMapErrorThrowing { e -> Tandem_Identity_V1_IssueResponse in
            let message = (e as? EtcdClientError)?.message ?? "\(e)"
            throw Self.unavailable(audience, message)
        }
        .flatMapThrowing { [self] resp -> Void in
            guard let t = resp.tokens.first(where: { $0.audience == audience }) else {
                throw Self.unavailable(audience, "the registry issued no token")
            }
            let now = Self.now()
            let life = max(1, t.expiresAt - now)
            lock.withLock {
                held[audience] = Held(
                    token: t.token, expiresAt: t.expiresAt, refreshAt: now + life * 2 / 3,
                    hash: sha256Base64URL(t.token.utf8), kid: Self.kid(of: t.token))
                failures[audience] = nil
            }
            metrics.inc("tandem_identity_tokens_issued_total", [("audience", audience)])
        }
        fetching[audience] = f
        f.whenComplete { [self] r in
            lock.withLock {
                fetching[audience] = nil
                if case .failure(let e) = r {
                    failures[audience] = (Self.now(), (e as? LocalAnswer)?.message ?? "\(e)")
                }
            }
            if case .failure(let e) = r {
                log("identity: \((e as? LocalAnswer)?.message ?? "\(e)")")
                metrics.inc("tandem_identity_token_failures_total", [("audience", audience)])
            }
        }
        return f
    }

    /// Refreshes tokens at two thirds of their life; on failure the old one serves until it
    /// expires, and the next tick tries again.
    private func refreshDue() {
        guard let loop = client?.loop else { return }
        let now = Self.now()
        lock.withLock {
            for (aud, h) in held where now >= h.refreshAt && fetching[aud] == nil {
                if now >= h.expiresAt { held[aud] = nil }
                _ = fetchLocked(aud, loop: loop)
            }
        }
    }

    /// Headers for an outbound request to `audience`: the token, and a proof when the route
    /// (or the mesh-wide setting) asks for one — a MAC proof for the instance's published
    /// `calleeKey`, or a signed one when it publishes none (or the config says `signature`).
    func attach(
        to headers: inout HTTPHeaders, audience: String, routeProof: Bool, method: String, authority: String,
        pathAndQuery: String, body: ByteBuffer?, callee: Endpoint?
    ) {
        headers.removeIfPresent(Self.proofHeader)
        let now = Self.now()
        var calleeKey = callee?.proofKey
        let (held, proof, macKey, count) = lock.withLock { () -> (Held?, Bool, MACKey?, UInt64) in
            guard let h = self.held[audience], now < h.expiresAt else { return (nil, false, nil, 0) }
            let proof = routeProof || effectiveProof
            guard proof else { return (h, false, nil, 0) }
            if let ep = callee { calleeKey = learnedKeys.key(at: ep.address, discovered: calleeKey) }
            nonceCounter += 1
            guard settings.proofKind == .mac, let calleeKey else { return (h, proof, nil, nonceCounter) }
            // A callee key that does not agree (malformed) falls back to a signed proof.
            return (h, proof, try? calleeKeys.key(agreement, peer: calleeKey, asCaller: true), nonceCounter)
        }
        guard let h = held else {
            headers.removeIfPresent(Self.tokenHeader)
            return
        }
        headers.replaceOrAdd(name: Self.tokenHeader, value: h.token)
        guard proof else { return }
        let nonce = noncePrefix + withUnsafeBytes(of: count.bigEndian) { Array($0) }
        let digest = body.map { b in b.withUnsafeReadableBytes { sha256Base64URL($0) } }
        let target = ProofTarget(method: method, authority: authority, pathAndQuery: pathAndQuery, bodyDigest: digest)
        let p =
            if let macKey, let calleeKey {
                ProofSigner.mac(
                    target, tokenHash: h.hash, now: now, nonce: nonce, macKey: macKey,
                    calleeKid: AgreementKey.kid(x: calleeKey))
            } else {
                proofs.sign(target, tokenHash: h.hash, now: now, nonce: nonce)
            }
        headers.replaceOrAdd(name: Self.proofHeader, value: p)
    }

    /// A callee instance answered `stale-proof-key` naming its current key `fresh`: proofs for
    /// it use that key until discovery catches up. False when there is nothing new to try (the
    /// caller re-sends at most once per attempt, so concurrent refusals may all learn it).
    func learn(calleeKey fresh: String, for ep: Endpoint) -> Bool {
        lock.withLock { learnedKeys.learn(fresh, at: ep.address, discovered: ep.proofKey) }
    }

    // MARK: inbound

    /// Checks an inbound request's credentials against its route; strips them and sets
    /// `tandem-caller` (the verified caller, or nothing) for the app.
    func authorize(
        headers: inout HTTPHeaders, method: String, authority: String, pathAndQuery: String, route: InboundRoute,
        body: ByteBuffer?, bodyStreams: Bool
    ) -> Result<ServiceClaims?, LocalAnswer> {
        let cred = PresentedCredentials(
            token: headers.first(name: Self.tokenHeader), proof: headers.first(name: Self.proofHeader))
        headers.removeIfPresent(Self.tokenHeader)
        headers.removeIfPresent(Self.proofHeader)
        headers.removeIfPresent(Self.callerHeader)
        let target = ProofTarget(method: method, authority: authority, pathAndQuery: pathAndQuery)
        // The body digest is computed only when a proof could cover it.
        let digest: String? =
            cred.proof == nil || bodyStreams
            ? nil : (body.map { b in b.withUnsafeReadableBytes { sha256Base64URL($0) } } ?? sha256Base64URL([UInt8]()))
        let now = Self.now()
        let result = lock.withLock { () -> Result<ServiceClaims?, IdentityError> in
            let req = InboundRequirements(
                mode: settings.effectiveMode, requireProof: route.proof ?? effectiveProof, rule: route.access,
                defaultAccess: effectiveDefault, route: route.name)
            do throws(IdentityError) {
                return .success(
                    try auth.authorize(cred, target: target, bodyDigest: digest, requirements: req, now: now))
            } catch {
                return .failure(error)
            }
        }
        switch result {
        case .success(let claims):
            if let c = claims { headers.add(name: Self.callerHeader, value: c.subject) }
            return .success(claims)
        case .failure(let e):
            metrics.inc("tandem_identity_refused_total", [("reason", e.reason.rawValue)])
            let reason: LocalReason =
                e.status == 403 ? .forbidden : e.status == 503 ? .overflow : .unauthenticated
            // The key this instance checks MAC proofs with is public (it is in its registration).
            let extra = e.reason == .staleProofKey ? [Self.proofKeyHeader: agreement.x] : [:]
            return .failure(
                LocalAnswer(reason, message: e.message, status: e.status, detail: e.reason.rawValue, headers: extra))
        }
    }
}
