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

/// How a caller proves it holds the key its token is bound to.
public enum ProofKind: String, Sendable, CaseIterable {
    /// HMAC-SHA256 under a key the caller's and the callee instance's X25519 keys agree on
    /// (`alg: HS256`, `kid` = the callee's key): a few µs per request on each side. Used when
    /// the callee instance publishes a proof key (every Tandem sidecar with identity does).
    case mac
    /// Ed25519 signature by the caller's proof key (`alg: EdDSA`, `jwk` in the header), as
    /// DPoP: anyone can check it, so a callee can show it to a third party; ~30 µs to sign
    /// and ~110 µs to verify here. Used for callees that publish no proof key.
    case signature
}

/// Per-request proof of possession, in the shape of DPoP (RFC 9449): a JWS with claims
/// `htm`, `htu` (authority, path and query), `iat`, `jti` (a nonce), `ath` (hash of the token
/// it goes with) and `bd` (body digest, when the body is covered). Two kinds (`ProofKind`):
/// header `{"typ":"tandem-pop+jwt","alg":"EdDSA","jwk":{…}}`, signed with the key the
/// token's `cnf.jkt` names; or `{"typ":"tandem-pop+jwt","alg":"HS256","kid":<callee key>}`,
/// a MAC under the key agreed between the token's `cnf.jwk` and the callee's proof key.
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

    /// An EdDSA proof. `nonce`: 16 random bytes from the shell. `tokenHash`: `sha256Base64URL(token)`.
    public func sign(_ t: ProofTarget, tokenHash: String, now: Int64, nonce: [UInt8]) -> String {
        let input = encodedHeader + "." + Self.encodedClaims(t, tokenHash: tokenHash, now: now, nonce: nonce)
        return input + "." + Base64URL.encode(key.sign(Array(input.utf8)))
    }

    /// A MAC proof for the callee instance whose proof key is `calleeKid`, under `macKey`
    /// (`MACKeyCache.key(own, peer: calleeKey, asCaller: true)`).
    public static func mac(
        _ t: ProofTarget, tokenHash: String, now: Int64, nonce: [UInt8], macKey: MACKey, calleeKid: String
    ) -> String {
        let header = JSONValue.object(["typ": .string(type), "alg": .string("HS256"), "kid": .string(calleeKid)])
        let input =
            Base64URL.encode(header.encoded) + "." + encodedClaims(t, tokenHash: tokenHash, now: now, nonce: nonce)
        return input + "."
            + Base64URL.encode(Array(HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: macKey.key)))
    }

    static func encodedClaims(_ t: ProofTarget, tokenHash: String, now: Int64, nonce: [UInt8]) -> String {
        var claims: [String: JSONValue] = [
            "htm": .string(t.method), "htu": .string(t.uri), "iat": .number(Double(now)),
            "jti": .string(Base64URL.encode(nonce)), "ath": .string(tokenHash),
        ]
        if let bd = t.bodyDigest { claims["bd"] = .string(bd) }
        return Base64URL.encode(JSONValue.object(claims).encoded)
    }
}

/// Checks proofs against the verified token they came with and remembers their nonces.
public struct ProofVerifier: Sendable {
    public let limits: IdentityLimits
    public private(set) var replay: ReplayCache
    /// This sidecar's proof key for MAC proofs (nil: only EdDSA proofs are accepted).
    public let agreement: AgreementKey?
    public private(set) var macKeys: MACKeyCache
    /// Proofs whose MAC or signature verified, by kind (before the request and replay checks).
    public private(set) var macsVerified = 0
    public private(set) var signaturesVerified = 0

    public init(limits: IdentityLimits = IdentityLimits(), agreement: AgreementKey? = nil) {
        self.limits = limits
        self.agreement = agreement
        macKeys = MACKeyCache(capacity: limits.proofKeyCacheEntries)
        // A proof is accepted up to `proofWindow` after its iat, which may be `skew` ahead of
        // the moment it is first seen.
        replay = ReplayCache(capacity: limits.replayCacheEntries, lifetime: limits.proofWindow + limits.skew + 1)
    }

    /// `bodyDigest`: the digest of the body this sidecar holds whole, or nil when it streams it.
    public mutating func verify(
        _ proof: String, token: String, claims: ServiceClaims, target t: ProofTarget, bodyDigest: String?, now: Int64
    ) throws(IdentityError) {
        let jws = try CompactJWS(proof, maxBytes: limits.maxCredentialBytes, what: "proof", reason: .invalidProof)
        let alg = try jws.requireAlgorithm(
            in: ["EdDSA", "HS256"], type: ProofSigner.type, what: "proof", reason: .invalidProof)
        if alg == "HS256" {
            try checkMAC(jws, claims: claims)
            macsVerified += 1
        } else {
            try checkSignature(jws, claims: claims)
            signaturesVerified += 1
        }
        let p = try jws.payload(what: "proof", reason: .invalidProof)
        guard let htm = p["htm"]?.string, let htu = p["htu"]?.string, let iat = p["iat"]?.int64,
            let jti = p["jti"]?.string, let ath = p["ath"]?.string
        else { throw IdentityError(.invalidProof, "proof lacks htm, htu, iat, jti or ath") }
        guard ath == (claims.tokenHash.isEmpty ? sha256Base64URL(token.utf8) : claims.tokenHash) else {
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
        // Remembered per token (its hash's first 96 bits): a proof is bound to its token, so
        // a nonce only needs to be new for that token — and a caller that sees another's
        // nonces (sidecars count them up from a random start) cannot spend them first.
        try replay.insert(String(ath.prefix(16)) + "." + jti, expires: iat + limits.proofWindow + 1, now: now)
    }

    /// EdDSA: the header's jwk must be the key the token names (`cnf.jkt`) and verify.
    private func checkSignature(_ jws: CompactJWS, claims: ServiceClaims) throws(IdentityError) {
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
    }

    /// HS256: made for this instance's proof key, under the key agreed with the token's
    /// `cnf.jwk` — which only the holder of that key's private half (or this sidecar) can compute.
    private mutating func checkMAC(_ jws: CompactJWS, claims: ServiceClaims) throws(IdentityError) {
        guard let own = agreement else {
            throw IdentityError(.invalidProof, "this sidecar publishes no proof key; MAC proofs cannot be checked")
        }
        guard let kid = jws.header["kid"]?.string else { throw IdentityError(.invalidProof, "MAC proof names no kid") }
        guard kid == own.kid else {
            throw IdentityError(
                .staleProofKey, "proof was made for proof key \(kid), not this instance's (\(own.kid))")
        }
        guard let peer = claims.agreementKey else {
            throw IdentityError(.invalidProof, "token binds no X25519 key (cnf.jwk) for a MAC proof")
        }
        let key = try macKeys.key(own, peer: peer, asCaller: false)
        guard jws.signature.count == 32,
            HMAC<SHA256>.isValidAuthenticationCode(
                jws.signature, authenticating: Array(jws.signingInput), using: key.key)
        else { throw IdentityError(.invalidProof, "proof MAC does not verify") }
    }
}

/// Nonces seen within the proof window, in two generations: an entry lives at least
/// `lifetime` seconds. Bounded: when `capacity` nonces are live, new proofs are refused
/// (fail closed) rather than forgetting one that could then be replayed.
public struct ReplayCache: Sendable {
    public let capacity: Int
    public let lifetime: Int64
    /// Keyed by the first 64 bits of SHA-256 of the nonce: 16 bytes an entry instead of a heap
    /// string (keys are ~40 characters, and the bound is 1 Mi entries), and not a hash an
    /// attacker can aim at another caller's entry. Two nonces sharing 64 bits only make a
    /// proof be refused (fail closed).
    private var current: [UInt64: Int64] = [:]
    private var previous: [UInt64: Int64] = [:]
    private var generationStart: Int64?

    public init(capacity: Int, lifetime: Int64) {
        self.capacity = capacity
        self.lifetime = max(1, lifetime)
    }

    public var count: Int { current.count + previous.count }

    public mutating func insert(_ nonce: String, expires: Int64, now: Int64) throws(IdentityError) {
        rotate(now: now)
        let nonce = Self.key(nonce)
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

    static func key(_ nonce: String) -> UInt64 {
        SHA256.hash(data: Array(nonce.utf8)).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
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
