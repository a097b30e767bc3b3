import Crypto
import TandemCore

/// What a proof of possession covers: the request as the callee's sidecar receives it.
public struct ProofTarget: Sendable, Equatable {
    public var method: String
    /// The `Host` (or `:authority`) the request is sent with.
    public var authority: String
    /// Path and query, as on the request line.
    public var pathAndQuery: String
    /// SHA-256 of the whole body, when the sending sidecar holds it whole (buffered bodies);
    /// nil when it streams.
    public var bodyDigest: String?

    public init(method: String, authority: String, pathAndQuery: String, bodyDigest: String? = nil) {
        self.method = method
        self.authority = authority
        self.pathAndQuery = pathAndQuery
        self.bodyDigest = bodyDigest
    }

    var uri: String { "http://" + authority + pathAndQuery }
}

/// Per-request proof of possession, in the shape of DPoP (RFC 9449): a JWS with header
/// `{"typ":"tandem-pop+jwt","alg":"EdDSA","jwk":{…}}` and claims `htm`, `htu` (authority,
/// path and query), `iat`, `jti` (a nonce), `ath` (hash of the token it goes with) and `bd`
/// (body digest, when the body is covered), signed with the key the token's `cnf.jkt` names.
public struct ProofSigner: Sendable {
    public static let type = "tandem-pop+jwt"
    public let key: KeyPair
    private let encodedHeader: String

    public init(key: KeyPair) {
        self.key = key
        let header = JSONValue.object([
            "typ": .string(Self.type), "alg": .string("EdDSA"),
            "jwk": .object(["kty": .string("OKP"), "crv": .string("Ed25519"), "x": .string(key.x)]),
        ])
        encodedHeader = Base64URL.encode(header.encoded)
    }

    /// `nonce`: 16 random bytes from the shell. `tokenHash`: `sha256Base64URL(token)`.
    public func sign(_ t: ProofTarget, tokenHash: String, now: Int64, nonce: [UInt8]) -> String {
        var claims: [String: JSONValue] = [
            "htm": .string(t.method), "htu": .string(t.uri), "iat": .number(Double(now)),
            "jti": .string(Base64URL.encode(nonce)), "ath": .string(tokenHash),
        ]
        if let bd = t.bodyDigest { claims["bd"] = .string(bd) }
        let input = encodedHeader + "." + Base64URL.encode(JSONValue.object(claims).encoded)
        return input + "." + Base64URL.encode(key.sign(Array(input.utf8)))
    }
}

/// Checks proofs against the verified token they came with and remembers their nonces.
public struct ProofVerifier: Sendable {
    public let limits: IdentityLimits
    public private(set) var replay: ReplayCache

    public init(limits: IdentityLimits = IdentityLimits()) {
        self.limits = limits
        // A proof is accepted up to `proofWindow` after its iat, which may be `skew` ahead of
        // the moment it is first seen.
        replay = ReplayCache(capacity: limits.replayCacheEntries, lifetime: limits.proofWindow + limits.skew + 1)
    }

    /// `bodyDigest`: the digest of the body this sidecar holds whole, or nil when it streams it.
    public mutating func verify(
        _ proof: String, token: String, claims: ServiceClaims, target t: ProofTarget, bodyDigest: String?, now: Int64
    ) throws(IdentityError) {
        let jws = try CompactJWS(proof, maxBytes: limits.maxCredentialBytes, what: "proof", reason: .invalidProof)
        try jws.requireEdDSA(type: ProofSigner.type, what: "proof", reason: .invalidProof)
        guard let jwk = jws.header["jwk"], jwk["kty"]?.string == "OKP", jwk["crv"]?.string == "Ed25519",
            let x = jwk["x"]?.string
        else { throw IdentityError(.invalidProof, "proof header carries no Ed25519 jwk") }
        guard jwkThumbprint(x: x) == claims.keyThumbprint else {
            throw IdentityError(.invalidProof, "proof key is not the key the token is bound to (cnf.jkt)")
        }
        guard let raw = Base64URL.decode(x), raw.count == 32,
            let pk = try? Curve25519.Signing.PublicKey(rawRepresentation: raw)
        else { throw IdentityError(.invalidProof, "proof jwk is not an Ed25519 key") }
        guard jws.signature.count == 64, pk.isValidSignature(jws.signature, for: Array(jws.signingInput)) else {
            throw IdentityError(.invalidProof, "proof signature does not verify")
        }
        let p = try jws.payload(what: "proof", reason: .invalidProof)
        guard let htm = p["htm"]?.string, let htu = p["htu"]?.string, let iat = p["iat"]?.int64,
            let jti = p["jti"]?.string, let ath = p["ath"]?.string
        else { throw IdentityError(.invalidProof, "proof lacks htm, htu, iat, jti or ath") }
        guard ath == sha256Base64URL(token.utf8) else {
            throw IdentityError(.proofMismatch, "proof was made for another token")
        }
        guard htm == t.method else {
            throw IdentityError(.proofMismatch, "proof is for method \(htm), not \(t.method)")
        }
        guard htu == t.uri else { throw IdentityError(.proofMismatch, "proof is for another authority, path or query") }
        guard iat <= now + limits.skew, now - iat <= limits.proofWindow else {
            throw IdentityError(.invalidProof, "proof time is outside the \(limits.proofWindow) s window")
        }
        switch (p["bd"]?.string, bodyDigest) {
        case (nil, _): break  // the caller streamed the body: not covered (docs/security.md)
        case (let claimed?, let actual?):
            guard claimed == actual else { throw IdentityError(.bodyMismatch, "request body does not match the proof") }
        case (_?, nil):
            throw IdentityError(
                .bodyMismatch, "proof covers the body but this sidecar streams it; align body buffering")
        }
        guard jti.utf8.count >= 16, jti.utf8.count <= 64 else {
            throw IdentityError(.invalidProof, "proof nonce must be 16 to 64 characters")
        }
        try replay.insert(jti, expires: iat + limits.proofWindow + 1, now: now)
    }
}

/// Nonces seen within the proof window, in two generations: an entry lives at least
/// `lifetime` seconds. Bounded: when `capacity` nonces are live, new proofs are refused
/// (fail closed) rather than forgetting one that could then be replayed.
public struct ReplayCache: Sendable {
    public let capacity: Int
    public let lifetime: Int64
    private var current: [String: Int64] = [:]
    private var previous: [String: Int64] = [:]
    private var generationStart: Int64?

    public init(capacity: Int, lifetime: Int64) {
        self.capacity = capacity
        self.lifetime = max(1, lifetime)
    }

    public var count: Int { current.count + previous.count }

    public mutating func insert(_ nonce: String, expires: Int64, now: Int64) throws(IdentityError) {
        rotate(now: now)
        if let e = current[nonce] ?? previous[nonce], e > now {
            throw IdentityError(.replayedProof, "proof nonce was already used")
        }
        if count >= capacity {
            // Entries past their expiry free their places (O(n), only when full).
            previous = previous.filter { $0.value > now }
            current = current.filter { $0.value > now }
        }
        guard count < capacity else {
            throw IdentityError(.replayCacheFull, "replay cache holds \(capacity) live nonces; retry shortly")
        }
        current[nonce] = expires
    }

    private mutating func rotate(now: Int64) {
        guard let start = generationStart else {
            generationStart = now
            return
        }
        if now - start >= 2 * lifetime {
            previous = [:]
            current = [:]
            generationStart = now
        } else if now - start >= lifetime {
            // Every entry of `previous` was inserted at least `lifetime` ago, and proofs live
            // at most `lifetime`: nothing in it can be replayed any more.
            previous = current
            current = [:]
            generationStart = now
        }
    }
}
