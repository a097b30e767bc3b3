/// TandemIdentity — service identity without mTLS (docs/security.md).
///
/// Pure: every function takes the time (`now`, UNIX seconds) and any random bytes it needs
/// from its caller; swift-crypto only computes (Ed25519 signatures are deterministic, SHA-256).
/// The registry shell signs tokens with `TokenSigner`; sidecar shells verify them with
/// `TokenVerifier`, make and check proofs of possession with `ProofSigner`/`ProofVerifier`,
/// and decide access with `AccessRule`.
import Crypto
import TandemCore

/// Why a credential was refused. `reason` goes into `tandem-error` and the metrics;
/// `message` into the JSON error body. Never contains the credential itself.
public struct IdentityError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: String, Sendable, CaseIterable {
        case missingToken = "missing-token"
        case invalidToken = "invalid-token"
        case expiredToken = "expired-token"
        case wrongAudience = "wrong-audience"
        case unknownKey = "unknown-key"
        case badSignature = "bad-signature"
        case missingProof = "missing-proof"
        case invalidProof = "invalid-proof"
        case replayedProof = "replayed-proof"
        case proofMismatch = "proof-mismatch"
        /// A MAC proof made for another proof key than this instance's (the caller's discovery
        /// is behind, e.g. the instance restarted): the answer names the current key.
        case staleProofKey = "stale-proof-key"
        case bodyMismatch = "body-mismatch"
        case replayCacheFull = "replay-cache-full"
        case forbidden = "forbidden"
    }
    public var reason: Reason
    public var message: String
    public init(_ reason: Reason, _ message: String) {
        self.reason = reason
        self.message = message
    }
    /// 401 for missing or invalid credentials, 403 for a valid caller not allowed, 503 when
    /// the replay cache cannot take more (fail closed, retry later).
    public var status: Int {
        switch reason {
        case .forbidden: return 403
        case .replayCacheFull: return 503
        default: return 401
        }
    }
    public var description: String { "\(reason.rawValue): \(message)" }
}

/// Bounds and windows of the identity checks; each has a named limit and a clear refusal.
public struct IdentityLimits: Sendable, Equatable {
    /// Longest lifetime a token may have (the registry caps what it issues at this).
    public var maxTokenTTL: Int64 = 300
    /// Clock skew tolerated between the issuer, the caller and the callee.
    public var skew: Int64 = 30
    /// A proof is accepted while |now − iat| ≤ proofWindow (+ skew into the future).
    public var proofWindow: Int64 = 60
    /// Token and proof size (bytes) beyond which they are refused unparsed.
    public var maxCredentialBytes = 4096
    /// Verified tokens remembered (a hit skips the signature check).
    public var tokenCacheEntries = 4096
    /// Proof nonces remembered for replay detection; beyond this, proofs are refused (503).
    public var replayCacheEntries = 1 << 20
    /// MAC keys agreed with callers' proof keys, remembered (a miss costs one X25519).
    public var proofKeyCacheEntries = 4096
    /// Callee instances whose current proof key a caller learned from a `stale-proof-key`
    /// refusal (`LearnedProofKeys`); at the bound it starts over.
    public var learnedProofKeyEntries = 4096
    public init() {}
}

/// A service name as the mesh uses it (DNS label characters, 1–63 of them).
public func isServiceName(_ s: some StringProtocol) -> Bool {
    guard !s.isEmpty, s.utf8.count <= 63 else { return false }
    return s.utf8.allSatisfy { c in
        (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) || c == 0x2D || c == 0x5F || c == 0x2E
            || (c >= 0x41 && c <= 0x5A)
    }
}

/// A signing key's public half as the registry publishes it under `/tandem/identity/keys/<kid>`:
/// a JWK (RFC 8037 OKP/Ed25519) plus when it stops signing and when every token it signed is
/// expired (then verifiers drop it).
public struct PublishedKey: Sendable, Equatable {
    public var kid: String
    /// base64url of the 32-byte Ed25519 public key.
    public var x: String
    /// The registry node that holds the private half.
    public var node: String
    public var createdAt: Int64
    /// Set at rotation: the key signs nothing after this.
    public var retiredAt: Int64?
    /// Set at rotation: tokens it signed are refused from this moment (the grace ends).
    public var expiresAt: Int64?
    public let publicKey: Curve25519.Signing.PublicKey

    public init(
        kid: String, x: String, node: String, createdAt: Int64, retiredAt: Int64? = nil, expiresAt: Int64? = nil
    )
        throws(IdentityError)
    {
        guard let raw = Base64URL.decode(x), raw.count == 32,
            let pk = try? Curve25519.Signing.PublicKey(rawRepresentation: raw)
        else { throw IdentityError(.unknownKey, "signing key \(kid) is not an Ed25519 public key") }
        self.kid = kid
        self.x = x
        self.node = node
        self.createdAt = createdAt
        self.retiredAt = retiredAt
        self.expiresAt = expiresAt
        self.publicKey = pk
    }

    public static func == (a: PublishedKey, b: PublishedKey) -> Bool {
        a.kid == b.kid && a.x == b.x && a.node == b.node && a.createdAt == b.createdAt && a.retiredAt == b.retiredAt
            && a.expiresAt == b.expiresAt
    }

    public var json: String {
        var o: [String: JSONValue] = [
            "kty": .string("OKP"), "crv": .string("Ed25519"), "alg": .string("EdDSA"), "use": .string("sig"),
            "kid": .string(kid), "x": .string(x), "node": .string(node), "created_at": .number(Double(createdAt)),
        ]
        if let r = retiredAt { o["retired_at"] = .number(Double(r)) }
        if let e = expiresAt { o["expires_at"] = .number(Double(e)) }
        return JSONValue.object(o).encoded
    }

    public static func parse(_ bytes: some Collection<UInt8>) throws(IdentityError) -> PublishedKey {
        let v: JSONValue
        do { v = try JSONValue.parse(bytes) } catch { throw IdentityError(.unknownKey, "key record: \(error)") }
        guard v["kty"]?.string == "OKP", v["crv"]?.string == "Ed25519", let kid = v["kid"]?.string,
            let x = v["x"]?.string, let created = v["created_at"]?.int64
        else { throw IdentityError(.unknownKey, "key record is not an Ed25519 JWK with kid and created_at") }
        return try PublishedKey(
            kid: kid, x: x, node: v["node"]?.string ?? "", createdAt: created, retiredAt: v["retired_at"]?.int64,
            expiresAt: v["expires_at"]?.int64)
    }

    /// Whether tokens this key signed may still be accepted at `now`.
    public func usable(now: Int64) -> Bool { expiresAt.map { now < $0 } ?? true }
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key: base64url(SHA-256 of the canonical JWK).
public func jwkThumbprint(x: String) -> String {
    let canonical = "{\"crv\":\"Ed25519\",\"kty\":\"OKP\",\"x\":\"\(x)\"}"
    return Base64URL.encode(Array(SHA256.hash(data: Array(canonical.utf8))))
}

/// base64url(SHA-256(bytes)): token hashes (`ath`) and body digests (`bd`).
public func sha256Base64URL(_ bytes: some Collection<UInt8>) -> String {
    var h = SHA256()
    if let done = bytes.withContiguousStorageIfAvailable({ h.update(bufferPointer: UnsafeRawBufferPointer($0)) }) {
        _ = done
    } else {
        h.update(data: Array(bytes))
    }
    return Base64URL.encode(Array(h.finalize()))
}

/// An Ed25519 key pair with its JWK form (a sidecar's proof key, a registry node's signing key).
public struct KeyPair: Sendable {
    public let privateKey: Curve25519.Signing.PrivateKey
    /// base64url of the raw public key.
    public let x: String
    /// RFC 7638 thumbprint (`cnf.jkt` of tokens bound to this key).
    public let thumbprint: String
    /// The key id the registry publishes: the thumbprint's first 16 characters.
    public var kid: String { String(thumbprint.prefix(16)) }

    /// From 32 random bytes (the shell draws them from the system's generator).
    public init(seed: [UInt8]) throws(IdentityError) {
        guard seed.count == 32, let k = try? Curve25519.Signing.PrivateKey(rawRepresentation: seed) else {
            throw IdentityError(.invalidToken, "an Ed25519 private key is 32 bytes")
        }
        privateKey = k
        x = Base64URL.encode(Array(k.publicKey.rawRepresentation))
        thumbprint = jwkThumbprint(x: x)
    }

    /// The 32 private bytes, for the key file of a registry node.
    public var seed: [UInt8] { Array(privateKey.rawRepresentation) }

    public func sign(_ message: [UInt8]) -> [UInt8] {
        // Ed25519 signing only fails for invalid keys, which the initializer refuses.
        guard let s = try? privateKey.signature(for: message) else { return [] }
        return Array(s)
    }
}

/// A sidecar's X25519 key for proofs of possession by MAC (docs/security.md): the token binds
/// its public half (`cnf.jwk`), the sidecar's registration publishes it (`proof_key`), and a
/// caller and a callee instance agree on a MAC key from their two halves — once per pair, so
/// each request costs an HMAC instead of an Ed25519 signature and verification.
public struct AgreementKey: Sendable {
    public let privateKey: Curve25519.KeyAgreement.PrivateKey
    /// base64url of the raw public key.
    public let x: String
    /// Names this key in MAC proofs (`kid` of their header): the first 16 characters of its
    /// RFC 7638 thumbprint.
    public let kid: String

    public init(seed: [UInt8]) throws(IdentityError) {
        guard seed.count == 32, let k = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: seed) else {
            throw IdentityError(.invalidProof, "an X25519 private key is 32 bytes")
        }
        privateKey = k
        x = Base64URL.encode(Array(k.publicKey.rawRepresentation))
        kid = Self.kid(x: x)
    }

    /// The agreement key that goes with a proof key's seed (domain-separated: the same 32
    /// secret bytes are never used by both algorithms).
    public init(derivedFrom proofKeySeed: [UInt8]) {
        let s = Array(SHA256.hash(data: Array("tandem-agreement-key-v1".utf8) + proofKeySeed))
        // Any 32 bytes are a valid X25519 private key (they are clamped).
        try! self.init(seed: s)
    }

    public static func kid(x: String) -> String {
        let canonical = "{\"crv\":\"X25519\",\"kty\":\"OKP\",\"x\":\"\(x)\"}"
        return String(Base64URL.encode(Array(SHA256.hash(data: Array(canonical.utf8)))).prefix(16))
    }

    /// Whether `x` is base64url of a 32-byte X25519 public key.
    public static func isPublicKey(_ x: String) -> Bool {
        guard let raw = Base64URL.decode(x), raw.count == 32 else { return false }
        return (try? Curve25519.KeyAgreement.PublicKey(rawRepresentation: raw)) != nil
    }

    /// The MAC key shared by the caller holding `callerX`'s private half and the callee
    /// holding `calleeX`'s: HKDF-SHA256 over X25519 of the two, bound to both public keys.
    /// `peer` is the other side's public key; `asCaller` says which side this key is.
    public func macKey(peer: String, asCaller: Bool) throws(IdentityError) -> MACKey {
        guard let raw = Base64URL.decode(peer), raw.count == 32,
            let pk = try? Curve25519.KeyAgreement.PublicKey(rawRepresentation: raw)
        else { throw IdentityError(.invalidProof, "proof key is not an X25519 public key") }
        // A low-order public key gives an all-zero secret that anyone can compute: refused
        // (swift-crypto returns it as it is).
        guard let shared = try? privateKey.sharedSecretFromKeyAgreement(with: pk),
            shared.withUnsafeBytes({ b in b.contains { $0 != 0 } })
        else { throw IdentityError(.invalidProof, "proof key agreement failed (low-order public key)") }
        let (caller, callee) = asCaller ? (x, peer) : (peer, x)
        return MACKey(
            key: shared.hkdfDerivedSymmetricKey(
                using: SHA256.self, salt: Array("tandem-pop-v1".utf8),
                sharedInfo: Array((caller + "." + callee).utf8), outputByteCount: 32))
    }
}

/// The HMAC-SHA256 key a caller and a callee instance share for MAC proofs (never leaves memory).
public struct MACKey: Sendable {
    let key: SymmetricKey
}

/// MAC keys by peer public key, bounded (`capacity`; when full it starts over — each entry is
/// one X25519 agreement to redo).
public struct MACKeyCache: Sendable {
    public let capacity: Int
    private var keys: [String: MACKey] = [:]
    public private(set) var agreements = 0

    public init(capacity: Int) { self.capacity = max(1, capacity) }

    public var count: Int { keys.count }

    public mutating func key(
        _ own: AgreementKey, peer: String, asCaller: Bool
    ) throws(IdentityError) -> MACKey {
        if let k = keys[peer] { return k }
        let k = try own.macKey(peer: peer, asCaller: asCaller)
        agreements += 1
        if keys.count >= capacity { keys.removeAll(keepingCapacity: true) }
        keys[peer] = k
        return k
    }
}

/// The proof keys callee instances named in `stale-proof-key` refusals, by address, used
/// instead of the key discovery has for that address while discovery still has the one they
/// replaced (an instance restarted with a new key and the caller's view lags). Bounded: when
/// `capacity` addresses are known, it starts over.
public struct LearnedProofKeys: Sendable {
    public let capacity: Int
    private var keys: [String: (stale: String?, fresh: String)] = [:]

    public init(capacity: Int) { self.capacity = max(1, capacity) }

    public var count: Int { keys.count }

    /// The key to make a MAC proof for the instance at `address`, whose discovered key is
    /// `discovered`.
    public func key(at address: String, discovered: String?) -> String? {
        if let l = keys[address], l.stale == discovered { return l.fresh }
        return discovered
    }

    /// The instance at `address` named `fresh` as its key. False when there is nothing new to
    /// try (not a key, or the one discovery already has). Every request refused in the same
    /// moment may learn it: the caller bounds re-sends per attempt.
    public mutating func learn(_ fresh: String, at address: String, discovered: String?) -> Bool {
        guard fresh != discovered, AgreementKey.isPublicKey(fresh) else { return false }
        if keys.count >= capacity && keys[address] == nil { keys.removeAll() }
        keys[address] = (discovered, fresh)
        return true
    }
}
