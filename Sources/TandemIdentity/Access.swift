import TandemCore

/// How an inbound sidecar treats service tokens.
public enum IdentityMode: String, Sendable, CaseIterable {
    /// Tokens are neither required nor read (they are still stripped before the app).
    case off
    /// Callers without a token pass as anonymous (migration); a token that is present must be
    /// valid.
    case permissive
    /// Every request needs a valid token.
    case require
}

/// What a route admits when it names no `allow` list.
public enum DefaultAccess: String, Sendable, CaseIterable {
    case allow
    /// Deny unless allowed: a route must name its callers.
    case deny
}

/// Per-route allow and deny lists of calling services.
public struct AccessRule: Sendable, Equatable {
    public var allow: Set<String>?
    public var deny: Set<String>
    public init(allow: Set<String>? = nil, deny: Set<String> = []) {
        self.allow = allow
        self.deny = deny
    }

    /// nil when admitted; otherwise why not. `caller` nil: no verified caller.
    public func check(caller: String?, default d: DefaultAccess, route: String) -> IdentityError? {
        guard let caller else {
            if allow != nil || d == .deny || !deny.isEmpty {
                return IdentityError(.missingToken, "route \"\(route)\" admits only identified callers")
            }
            return nil
        }
        if deny.contains(caller) {
            return IdentityError(.forbidden, "service \"\(caller)\" is denied on route \"\(route)\"")
        }
        if let allow {
            return allow.contains(caller)
                ? nil : IdentityError(.forbidden, "service \"\(caller)\" is not allowed on route \"\(route)\"")
        }
        return d == .allow
            ? nil
            : IdentityError(
                .forbidden, "service \"\(caller)\" is not allowed on route \"\(route)\" (the default is deny)")
    }
}

/// What an inbound sidecar requires of one request (its route's settings over the defaults).
public struct InboundRequirements: Sendable, Equatable {
    public var mode: IdentityMode
    public var requireProof: Bool
    public var rule: AccessRule
    public var defaultAccess: DefaultAccess
    public var route: String
    public init(
        mode: IdentityMode, requireProof: Bool = false, rule: AccessRule = AccessRule(),
        defaultAccess: DefaultAccess = .allow, route: String = "inbound"
    ) {
        self.mode = mode
        self.requireProof = requireProof
        self.rule = rule
        self.defaultAccess = defaultAccess
        self.route = route
    }
}

/// The credentials a request carries (header values, already extracted by the shell).
public struct PresentedCredentials: Sendable, Equatable {
    public var token: String?
    public var proof: String?
    public init(token: String? = nil, proof: String? = nil) {
        self.token = token
        self.proof = proof
    }
}

/// The inbound decision: token, then proof, then the allow rules. One per sidecar; the shell
/// keeps it under a lock (the replay cache must see every event loop's proofs).
public struct InboundAuthenticator: Sendable {
    public var tokens: TokenVerifier
    public var proofs: ProofVerifier

    /// `agreement`: this sidecar's X25519 proof key, for MAC proofs (nil: EdDSA proofs only).
    public init(
        issuer: String, service: String, limits: IdentityLimits = IdentityLimits(), agreement: AgreementKey? = nil
    ) {
        tokens = TokenVerifier(issuer: issuer, audience: service, limits: limits)
        proofs = ProofVerifier(limits: limits, agreement: agreement)
    }

    /// The verified caller (nil: anonymous, admitted by the rules), or why the request is refused.
    public mutating func authorize(
        _ cred: PresentedCredentials, target: ProofTarget, bodyDigest: String?, requirements r: InboundRequirements,
        now: Int64
    ) throws(IdentityError) -> ServiceClaims? {
        var claims: ServiceClaims?
        if r.mode != .off {
            if let token = cred.token {
                let c = try tokens.verify(token, now: now)
                if let proof = cred.proof {
                    try proofs.verify(proof, token: token, claims: c, target: target, bodyDigest: bodyDigest, now: now)
                } else if r.requireProof {
                    throw IdentityError(.missingProof, "route \"\(r.route)\" requires a proof of possession")
                }
                claims = c
            } else if r.mode == .require {
                throw IdentityError(.missingToken, "missing service token")
            }
        }
        if let e = r.rule.check(caller: claims?.subject, default: r.defaultAccess, route: r.route) { throw e }
        return claims
    }
}
