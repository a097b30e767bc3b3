import Crypto
import TandemCore

/// The claims of a service identity token: a JWS (compact, RFC 7515) with header
/// `{"alg":"EdDSA","kid":…,"typ":"tandem-id+jwt"}`, signed by a registry node's key.
public struct ServiceClaims: Sendable, Equatable {
    /// The mesh (`iss`).
    public var issuer: String
    /// The calling service (`sub`).
    public var subject: String
    /// Exactly one callee service (`aud`).
    public var audience: String
    public var issuedAt: Int64
    public var expiresAt: Int64
    public var id: String
    /// `cnf.jkt`: thumbprint of the caller sidecar's proof key.
    public var keyThumbprint: String
    /// The key that signed it (`kid` of the header).
    public var kid: String = ""
    /// `cnf.jwk`: base64url of the caller sidecar's X25519 proof key (MAC proofs), if bound.
    public var agreementKey: String?
    /// `sha256Base64URL` of the token these claims were verified from (the `ath` its proofs
    /// carry), computed once per token by `TokenVerifier`.
    public var tokenHash = ""

    public init(
        issuer: String, subject: String, audience: String, issuedAt: Int64, expiresAt: Int64, id: String,
        keyThumbprint: String
    ) {
        self.issuer = issuer
        self.subject = subject
        self.audience = audience
        self.issuedAt = issuedAt
        self.expiresAt = expiresAt
        self.id = id
        self.keyThumbprint = keyThumbprint
    }
}

public enum ServiceToken {
    public static let type = "tandem-id+jwt"

    /// Signs `claims` with a registry node's key (the registry's Issue call).
    public static func sign(_ c: ServiceClaims, key: KeyPair) -> String {
        let header = JSONValue.object(["alg": .string("EdDSA"), "kid": .string(key.kid), "typ": .string(type)])
        let payload = JSONValue.object([
            "iss": .string(c.issuer), "sub": .string(c.subject), "aud": .string(c.audience),
            "iat": .number(Double(c.issuedAt)), "exp": .number(Double(c.expiresAt)), "jti": .string(c.id),
            "cnf": .object(cnf(c)),
        ])
        let input = Base64URL.encode(header.encoded) + "." + Base64URL.encode(payload.encoded)
        return input + "." + Base64URL.encode(key.sign(Array(input.utf8)))
    }

    static func cnf(_ c: ServiceClaims) -> [String: JSONValue] {
        var cnf: [String: JSONValue] = ["jkt": .string(c.keyThumbprint)]
        if let x = c.agreementKey {
            cnf["jwk"] = .object(["kty": .string("OKP"), "crv": .string("X25519"), "x": .string(x)])
        }
        return cnf
    }
}

/// A compact JWS split into its parts, with the decoded header; refuses anything that is not
/// three base64url parts.
struct CompactJWS {
    let header: JSONValue
    let payloadBytes: [UInt8]
    let signature: [UInt8]
    /// The bytes the signature covers: `header.payload` as sent.
    let signingInput: Substring.UTF8View

    init(_ token: String, maxBytes: Int, what: String, reason: IdentityError.Reason) throws(IdentityError) {
        let u = token.utf8
        guard u.count <= maxBytes else {
            throw IdentityError(reason, "\(what) is longer than \(maxBytes) bytes")
        }
        // Split on the bytes (a Character-wise split costs more than the rest of a MAC check).
        let dot = UInt8(ascii: ".")
        guard let d1 = u.firstIndex(of: dot), let d2 = u[u.index(after: d1)...].firstIndex(of: dot),
            !u[u.index(after: d2)...].contains(dot)
        else { throw IdentityError(reason, "\(what) is not a compact JWS (three parts)") }
        guard let h = Base64URL.decode(u[..<d1]), let p = Base64URL.decode(u[u.index(after: d1)..<d2]),
            let s = Base64URL.decode(u[u.index(after: d2)...])
        else { throw IdentityError(reason, "\(what) is not base64url") }
        do { header = try JSONValue.parse(h) } catch { throw IdentityError(reason, "\(what) header: \(error)") }
        guard case .object = header else { throw IdentityError(reason, "\(what) header is not a JSON object") }
        payloadBytes = p
        signature = s
        signingInput = u[..<d2]
    }

    /// `alg` must be one of `algorithms` (never `none`, never an algorithm the key is not
    /// for) and no extension may be critical. Returns the algorithm.
    func requireAlgorithm(
        in algorithms: [String], type: String, what: String, reason: IdentityError.Reason
    ) throws(IdentityError) -> String {
        guard let alg = header["alg"]?.string else { throw IdentityError(reason, "\(what) names no alg") }
        guard algorithms.contains(alg) else {
            throw IdentityError(
                reason, "\(what) alg \"\(alg)\" is not accepted (\(algorithms.joined(separator: " or ")) only)")
        }
        guard header["typ"]?.string == type else { throw IdentityError(reason, "\(what) typ is not \(type)") }
        guard header["crit"] == nil else { throw IdentityError(reason, "\(what) has critical extensions") }
        return alg
    }

    func payload(what: String, reason: IdentityError.Reason) throws(IdentityError) -> JSONValue {
        let v: JSONValue
        do { v = try JSONValue.parse(payloadBytes) } catch { throw IdentityError(reason, "\(what) payload: \(error)") }
        guard case .object = v else { throw IdentityError(reason, "\(what) payload is not a JSON object") }
        return v
    }
}

/// Verifies service tokens for one callee: signature by a published, unexpired key; issuer;
/// audience == this service; lifetime and expiry with bounded skew. Verified tokens are
/// remembered until they expire (bounded), so a caller's token costs one signature check.
public struct TokenVerifier: Sendable {
    public let issuer: String
    public let audience: String
    public let limits: IdentityLimits
    public private(set) var keys: [String: PublishedKey] = [:]
    private var cache: [String: ServiceClaims] = [:]
    public private(set) var cacheHits = 0
    public private(set) var signatureChecks = 0

    public init(issuer: String, audience: String, limits: IdentityLimits = IdentityLimits()) {
        self.issuer = issuer
        self.audience = audience
        self.limits = limits
    }

    /// The published keys as the registry watch reports them; tokens by a key that is gone
    /// are forgotten.
    public mutating func setKeys(_ list: [PublishedKey]) {
        keys = Dictionary(list.map { ($0.kid, $0) }, uniquingKeysWith: { a, _ in a })
        cache = cache.filter { keys[$0.value.kid] != nil }
    }

    public var cachedTokens: Int { cache.count }

    public mutating func verify(_ token: String, now: Int64) throws(IdentityError) -> ServiceClaims {
        if let c = cache[token] {
            guard let k = keys[c.kid], k.usable(now: now) else {
                cache[token] = nil
                throw IdentityError(.unknownKey, "token signed by key \(c.kid), which is retired")
            }
            guard now < c.expiresAt + limits.skew else {
                cache[token] = nil
                throw IdentityError(.expiredToken, "token expired at \(c.expiresAt)")
            }
            cacheHits += 1
            return c
        }
        var c = try check(token, now: now)
        c.tokenHash = sha256Base64URL(token.utf8)
        if cache.count >= limits.tokenCacheEntries {
            cache = cache.filter { now < $0.value.expiresAt + limits.skew }
            if cache.count >= limits.tokenCacheEntries { cache.remove(at: cache.startIndex) }
        }
        cache[token] = c
        return c
    }

    private mutating func check(_ token: String, now: Int64) throws(IdentityError) -> ServiceClaims {
        let jws = try CompactJWS(token, maxBytes: limits.maxCredentialBytes, what: "token", reason: .invalidToken)
        _ = try jws.requireAlgorithm(in: ["EdDSA"], type: ServiceToken.type, what: "token", reason: .invalidToken)
        guard let kid = jws.header["kid"]?.string else { throw IdentityError(.invalidToken, "token names no kid") }
        guard let key = keys[kid] else {
            throw IdentityError(.unknownKey, "token signed by key \"\(kid)\", which this mesh does not publish")
        }
        guard key.usable(now: now) else {
            throw IdentityError(.unknownKey, "token signed by key \(kid), which is retired")
        }
        signatureChecks += 1
        guard jws.signature.count == 64, key.publicKey.isValidSignature(jws.signature, for: Array(jws.signingInput))
        else { throw IdentityError(.badSignature, "token signature does not verify with key \(kid)") }
        let p = try jws.payload(what: "token", reason: .invalidToken)
        guard p["iss"]?.string == issuer else {
            throw IdentityError(.invalidToken, "token issuer is not \(issuer)")
        }
        guard let sub = p["sub"]?.string, isServiceName(sub) else {
            throw IdentityError(.invalidToken, "token subject is not a service name")
        }
        guard let aud = p["aud"]?.string else {
            throw IdentityError(.wrongAudience, "token must name exactly one audience")
        }
        guard aud == audience else {
            throw IdentityError(.wrongAudience, "token is for \"\(aud)\", not \"\(audience)\"")
        }
        guard let iat = p["iat"]?.int64, let exp = p["exp"]?.int64, let jti = p["jti"]?.string,
            let jkt = p["cnf"]?["jkt"]?.string, jkt.utf8.count == 43
        else { throw IdentityError(.invalidToken, "token lacks iat, exp, jti or cnf.jkt") }
        guard exp > iat, exp - iat <= limits.maxTokenTTL else {
            throw IdentityError(.invalidToken, "token lifetime exceeds \(limits.maxTokenTTL) s")
        }
        guard iat <= now + limits.skew else { throw IdentityError(.invalidToken, "token issued in the future") }
        guard now < exp + limits.skew else { throw IdentityError(.expiredToken, "token expired at \(exp)") }
        if let retired = key.retiredAt, iat > retired + limits.skew {
            throw IdentityError(.unknownKey, "token signed by key \(kid) after it was retired")
        }
        var c = ServiceClaims(
            issuer: issuer, subject: sub, audience: aud, issuedAt: iat, expiresAt: exp, id: jti, keyThumbprint: jkt)
        c.kid = kid
        if let jwk = p["cnf"]?["jwk"] {
            guard jwk["kty"]?.string == "OKP", jwk["crv"]?.string == "X25519", let x = jwk["x"]?.string,
                AgreementKey.isPublicKey(x)
            else { throw IdentityError(.invalidToken, "token cnf.jwk is not an X25519 public key") }
            c.agreementKey = x
        }
        return c
    }
}
