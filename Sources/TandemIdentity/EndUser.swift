import TandemCore

/// What an inbound route accepts of an end-user JWT. jwt-kit (in the sidecar shell) selects
/// the key and checks the signature; these decisions are taken here, on the header's `alg`
/// and the claims, with the time passed in.
public struct EndUserRequirements: Sendable, Equatable {
    public var issuers: [String]
    public var audiences: [String]
    /// Accepted `alg` values (never `none`: the config refuses it).
    public var algorithms: [String]
    public var skew: Int64
    public var route: String

    public init(issuers: [String], audiences: [String], algorithms: [String], skew: Int64, route: String) {
        self.issuers = issuers
        self.audiences = audiences
        self.algorithms = algorithms
        self.skew = skew
        self.route = route
    }

    /// The header's `alg` must be one this route accepts.
    public func checkAlgorithm(_ alg: String?) throws(IdentityError) {
        guard let alg else { throw IdentityError(.invalidToken, "invalid token: no alg") }
        guard algorithms.contains(alg) else {
            throw IdentityError(.invalidToken, "invalid token: alg \"\(alg)\" is not accepted on route \"\(route)\"")
        }
    }

    /// …and the algorithm of the key that verifies it: an RSA public key never acts as an
    /// HMAC secret.
    public func checkKey(alg: String, keyAlgorithm: String) throws(IdentityError) {
        guard keyAlgorithm == alg else {
            throw IdentityError(.invalidToken, "invalid token: alg \"\(alg)\" does not match its key (\(keyAlgorithm))")
        }
    }

    /// `exp` (required) and `nbf` within the skew, the issuer and one of the audiences.
    /// Returns `exp`, until which the verified token may be remembered.
    public func checkClaims(_ claims: [String: JSONValue], now: Int64) throws(IdentityError) -> Int64 {
        guard let expValue = claims["exp"]?.number, expValue.isFinite, abs(expValue) < 9e15 else {
            throw IdentityError(.invalidToken, "invalid token: no exp")
        }
        let exp = Int64(expValue)
        guard now < exp + skew else { throw IdentityError(.expiredToken, "token expired") }
        if let nbf = claims["nbf"]?.number, nbf.isFinite, Double(now + skew) < nbf {
            throw IdentityError(.invalidToken, "invalid token: not valid yet (nbf)")
        }
        if !issuers.isEmpty {
            guard let iss = claims["iss"]?.string, issuers.contains(iss) else {
                throw IdentityError(.invalidToken, "invalid token: issuer is not accepted")
            }
        }
        if !audiences.isEmpty {
            let aud = claims["aud"].map { v in v.array?.compactMap(\.string) ?? v.string.map { [$0] } ?? [] } ?? []
            guard aud.contains(where: audiences.contains) else {
                throw IdentityError(.wrongAudience, "invalid token: audience is not accepted")
            }
        }
        return exp
    }
}
