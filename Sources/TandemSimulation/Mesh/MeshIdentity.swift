import TandemConfig
import TandemCore
import TandemIdentity
import TandemTraffic

/// Service identity in a mesh run (`identity = { … }` in the scenario): every sidecar holds a
/// join token, so its outbound requests carry a service token for the callee and its inbound
/// side checks them with TandemIdentity's `InboundAuthenticator` — signature, issuer, audience,
/// expiry, then the inbound route's allow/deny rules and the mesh default, exactly as the
/// sidecar's inbound gate does — answering 401/403 without involving the app.
///
/// Modelled: the registry's token service. Tokens are signed with one mesh key held by the
/// simulator (real Ed25519, real JWS), issued to a sidecar on first use per callee and again
/// at two thirds of their lifetime. Each sidecar has its own Ed25519 key and X25519 key, which
/// its tokens are bound to (`cnf`); with proofs on (mesh-wide, per sidecar, or per route as in
/// the config) it makes a proof of possession for every attempt — a MAC for the callee
/// instance's key, or a signature with `proof_kind = "signature"`, as the sidecar does — and
/// the callee checks it, nonce replay cache included.
public struct IdentitySpec: Equatable, Sendable {
    public var mesh = "tandem"
    /// What inbound routes without an allow list admit (the registry's `--identity-default`).
    public var defaultAccess: DefaultAccess = .allow
    /// Proofs of possession mesh-wide (the registry's `--identity-proof`).
    public var proof = false
    /// A deliberate defect for showing the replay cache works (never set by scenario files):
    /// callers send the same proof again and again.
    public var defectReuseProofs = false
    public init() {}
}

final class MeshIdentity {
    let spec: IdentitySpec
    let key: KeyPair
    let published: PublishedKey
    var issued = 0
    /// Per sidecar (instance index): callee service → (token, refresh at).
    var held: [[String: (token: String, refreshAt: Int64)]]
    /// Per sidecar: its inbound verifier (with its cache of verified tokens).
    var inbound: [InboundAuthenticator?]
    /// Per sidecar: the keys its tokens are bound to, and the MAC keys it agreed with callees.
    var keys: [(signer: ProofSigner, agreement: AgreementKey)?]
    var macKeys: [MACKeyCache]
    let emptyBodyDigest = sha256Base64URL([UInt8]())
    var lastProof: [Int: String] = [:]
    /// Per service: the inbound route table and routes by name.
    var tables: [(table: RouteTable, byName: [String: InboundRoute])]

    var issuer: String { "tandem://\(spec.mesh)" }

    init?(spec: IdentitySpec, services: [ServiceSpec], instances: Int, rng: inout SeededRandom) {
        self.spec = spec
        var seed: [UInt8] = []
        for _ in 0..<4 { withUnsafeBytes(of: rng.next()) { seed += $0 } }
        guard let k = try? KeyPair(seed: seed),
            let p = try? PublishedKey(kid: k.kid, x: k.x, node: "sim", createdAt: 0)
        else { return nil }
        key = k
        published = p
        held = Array(repeating: [:], count: instances)
        inbound = Array(repeating: nil, count: instances)
        keys = Array(repeating: nil, count: instances)
        macKeys = Array(repeating: MACKeyCache(capacity: IdentityLimits().proofKeyCacheEntries), count: instances)
        tables = services.map { svc in
            let c = svc.sidecar
            let table = RouteTable(c.inboundRoutes.map { Route(name: $0.name, match: $0.match, cluster: "local") })
            return (table, Dictionary(c.inboundRoutes.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a }))
        }
    }
}

extension MeshWorld {
    /// The sidecar's own keys (made on first use, from the run's seed).
    func sidecarKey(_ s: Int) -> (signer: ProofSigner, agreement: AgreementKey)? {
        guard let id = identity else { return nil }
        if let k = id.keys[s] { return k }
        var seed: [UInt8] = []
        for _ in 0..<4 { withUnsafeBytes(of: rng.next()) { seed += $0 } }
        guard let k = try? KeyPair(seed: seed) else { return nil }
        id.keys[s] = (ProofSigner(key: k), AgreementKey(derivedFrom: seed))
        return id.keys[s]
    }

    /// The proof of possession for one attempt at instance `callee`, when the caller's settings
    /// or route ask for one: a fresh nonce per attempt, so a retry is not a replay.
    func proof(
        sidecar s: Int, route: Route, method: String, host: String, path: String, token: String, callee: Int
    ) -> String? {
        guard let id = identity else { return nil }
        let cfg = sidecars[s].config
        guard cfg.identity.proof ?? id.spec.proof || cfg.proofRoutes.contains(route.name), let own = sidecarKey(s)
        else { return nil }
        if id.spec.defectReuseProofs, let p = id.lastProof[s] { return p }
        var nonce: [UInt8] = []
        for _ in 0..<2 { withUnsafeBytes(of: rng.next()) { nonce += $0 } }
        report.proofsSigned += 1
        let target = ProofTarget(method: method, authority: host, pathAndQuery: path, bodyDigest: id.emptyBodyDigest)
        let (hash, nowS) = (sha256Base64URL(Array(token.utf8)), now / 1_000_000_000)
        // Every simulated callee publishes its proof key, as a Tandem sidecar's registration does.
        if cfg.identity.proofKind == .mac, let peer = sidecarKey(callee)?.agreement,
            let key = try? id.macKeys[s].key(own.agreement, peer: peer.x, asCaller: true)
        {
            id.lastProof[s] = ProofSigner.mac(
                target, tokenHash: hash, now: nowS, nonce: nonce, macKey: key, calleeKid: peer.kid)
        } else {
            id.lastProof[s] = own.signer.sign(target, tokenHash: hash, now: nowS, nonce: nonce)
        }
        return id.lastProof[s]
    }

    /// The token `sidecar` attaches for `callee` (fetched, or refreshed, as its sidecar would).
    func serviceToken(sidecar s: Int, callee: String) -> String? {
        guard let id = identity, let key = sidecarKey(s) else { return nil }
        let nowS = now / 1_000_000_000
        if let h = id.held[s][callee], nowS < h.refreshAt { return h.token }
        let caller = scenario.services[sidecars[s].service]
        let ttl = caller.sidecar.identity.tokenTTL
        id.issued += 1
        var claims = ServiceClaims(
            issuer: id.issuer, subject: caller.name, audience: callee, issuedAt: nowS, expiresAt: nowS + ttl,
            id: "sim-\(id.issued)", keyThumbprint: key.signer.key.thumbprint)
        claims.agreementKey = key.agreement.x
        let token = ServiceToken.sign(claims, key: id.key)
        id.held[s][callee] = (token, nowS + ttl * 2 / 3)
        report.tokensIssued += 1
        return token
    }

    /// The callee's inbound gate: nil to let the request through, or the status it answers.
    func inboundGate(
        instance i: Int, method: String, host: String, path: String, token: String?, proof: String?
    )
        -> Int?
    {
        guard let id = identity else { return nil }
        let svc = scenario.services[instances[i].service]
        let settings = svc.sidecar.identity
        var ident = settings
        if ident.joinToken == nil { ident.joinToken = "sim" }
        let mode = ident.effectiveMode
        guard mode != .off else { return nil }
        let t = id.tables[instances[i].service]
        let head = RequestHead(method: method, host: host, path: path)
        let route = t.table.route(head).flatMap { t.byName[$0.route.name] } ?? svc.sidecar.inboundDefault
        if id.inbound[i] == nil {
            var a = InboundAuthenticator(issuer: id.issuer, service: svc.name, agreement: sidecarKey(i)?.agreement)
            a.tokens.setKeys([id.published])
            id.inbound[i] = a
        }
        let req = InboundRequirements(
            mode: mode, requireProof: route.proof ?? settings.proof ?? id.spec.proof, rule: route.access,
            defaultAccess: settings.defaultAccess ?? id.spec.defaultAccess, route: route.name)
        do throws(IdentityError) {
            _ = try id.inbound[i]!.authorize(
                PresentedCredentials(token: token, proof: proof),
                target: ProofTarget(method: method, authority: host, pathAndQuery: path),
                bodyDigest: proof == nil ? nil : id.emptyBodyDigest, requirements: req, now: now / 1_000_000_000)
            return nil
        } catch {
            report.identityRefusals[error.reason.rawValue, default: 0] += 1
            return error.status
        }
    }
}
