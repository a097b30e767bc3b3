import TandemCore
import Testing

@testable import TandemIdentity

/// Deterministic key material: the tests name their seeds.
func keyPair(_ n: UInt8) throws -> KeyPair { try KeyPair(seed: [UInt8](repeating: n, count: 32)) }

let issuer = "tandem://mesh-test"

struct Mesh {
    let node: KeyPair
    let caller: KeyPair
    var published: PublishedKey
    init() throws {
        node = try keyPair(1)
        caller = try keyPair(2)
        published = try PublishedKey(kid: node.kid, x: node.x, node: "n1", createdAt: 1000)
    }

    /// The X25519 halves (MAC proofs): the caller's, bound in its tokens, and a callee instance's.
    var callerAgreement: AgreementKey { AgreementKey(derivedFrom: [UInt8](repeating: 2, count: 32)) }
    var calleeAgreement: AgreementKey { AgreementKey(derivedFrom: [UInt8](repeating: 3, count: 32)) }

    func token(
        sub: String = "orders", aud: String = "users", iat: Int64 = 1000, ttl: Int64 = 300, jti: String = "t1",
        agreement: Bool = true
    )
        -> String
    {
        var c = ServiceClaims(
            issuer: issuer, subject: sub, audience: aud, issuedAt: iat, expiresAt: iat + ttl, id: jti,
            keyThumbprint: caller.thumbprint)
        if agreement { c.agreementKey = callerAgreement.x }
        return ServiceToken.sign(c, key: node)
    }

    func verifier(service: String = "users") -> InboundAuthenticator {
        var a = InboundAuthenticator(issuer: issuer, service: service, agreement: calleeAgreement)
        a.tokens.setKeys([published])
        return a
    }
}

/// The reason `body` was refused with (nil: it was not).
func reason(_ body: () throws -> Void) -> IdentityError.Reason? {
    do {
        try body()
        return nil
    } catch let e as IdentityError {
        return e.reason
    } catch {
        Issue.record("not an IdentityError: \(error)")
        return nil
    }
}

@Suite struct Base64URLAndJSONTests {
    @Test func base64urlRoundTripsAndRefusesNonCanonicalText() {
        for n in 0..<40 {
            let bytes = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            #expect(Base64URL.decode(Base64URL.encode(bytes)) == bytes)
        }
        #expect(Base64URL.encode(Array("hello?>".utf8)) == "aGVsbG8_Pg")
        #expect(Base64URL.decode("aGVsbG8_Pg=") == nil)  // padding
        #expect(Base64URL.decode("aGVsbG8/Pg") == nil)  // '/' is not base64url
        #expect(Base64URL.decode("aGVsbG8_Ph") == nil)  // non-zero trailing bits: a second spelling
        #expect(Base64URL.decode("a") == nil)
    }

    @Test func jsonParsesStrictlyAndRefusesDuplicateKeys() throws {
        let v = try JSONValue.parse(#"{"a":[1,-2.5e1,"x\u00e9\ud83d\ude00"],"b":{"c":null,"d":true}}"#)
        #expect(v["a"]?.array?[1].number == -25)
        #expect(v["a"]?.array?[2].string == "xé😀")
        #expect(v["b"]?["d"] == .bool(true))
        #expect(try JSONValue.parse(v.encoded) == v)
        for bad in [
            #"{"aud":"a","aud":"b"}"#, "[1,]", "{} x", "01", "\"\u{01}\"", #""\ud800""#, "tru", "",
            String(repeating: "[", count: 40) + String(repeating: "]", count: 40),
        ] {
            #expect(throws: JSONValue.ParseError.self, "\(bad)") { try JSONValue.parse(bad) }
        }
    }
}

@Suite struct TokenTests {
    @Test func aTokenVerifiesOnceAndIsThenServedFromTheCache() throws {
        let m = try Mesh()
        var v = m.verifier()
        let t = m.token()
        let c = try v.tokens.verify(t, now: 1010)
        #expect(c.subject == "orders" && c.audience == "users" && c.keyThumbprint == m.caller.thumbprint)
        #expect(c.kid == m.node.kid)
        _ = try v.tokens.verify(t, now: 1020)
        #expect(v.tokens.signatureChecks == 1 && v.tokens.cacheHits == 1)
    }

    @Test func forgedExpiredMisdirectedAndMalformedTokensAreRefusedWithTheirReason() throws {
        let m = try Mesh()
        var v = m.verifier()
        let t = m.token()
        // Signed by a key the mesh does not publish.
        let other = try keyPair(9)
        let forged = ServiceToken.sign(
            ServiceClaims(
                issuer: issuer, subject: "orders", audience: "users", issuedAt: 1000, expiresAt: 1300, id: "f",
                keyThumbprint: m.caller.thumbprint), key: other)
        #expect(reason { _ = try v.tokens.verify(forged, now: 1010) } == .unknownKey)
        // The payload swapped under a valid header and signature.
        let parts = t.split(separator: ".")
        let evil = Base64URL.encode(
            #"{"iss":"tandem://mesh-test","sub":"admin","aud":"users","iat":1000,"exp":1300,"jti":"t1","cnf":{"jkt":"\#(m.caller.thumbprint)"}}"#
        )
        #expect(reason { _ = try v.tokens.verify("\(parts[0]).\(evil).\(parts[2])", now: 1010) } == .badSignature)
        #expect(reason { _ = try v.tokens.verify(t, now: 1300 + 30) } == .expiredToken)
        #expect(reason { _ = try v.tokens.verify(m.token(aud: "billing"), now: 1010) } == .wrongAudience)
        #expect(reason { _ = try v.tokens.verify(m.token(ttl: 3600), now: 1010) } == .invalidToken)
        #expect(reason { _ = try v.tokens.verify(m.token(iat: 2000), now: 1010) } == .invalidToken)
        #expect(reason { _ = try v.tokens.verify("a.b", now: 1010) } == .invalidToken)
        #expect(reason { _ = try v.tokens.verify(String(repeating: "a", count: 5000), now: 1010) } == .invalidToken)
        // alg none, and HS256 keyed with the public key (the RS/HS confusion, in Ed25519 dress).
        let none = Base64URL.encode(#"{"alg":"none","kid":"\#(m.node.kid)","typ":"tandem-id+jwt"}"#)
        #expect(reason { _ = try v.tokens.verify("\(none).\(parts[1]).", now: 1010) } == .invalidToken)
        let hs = Base64URL.encode(#"{"alg":"HS256","kid":"\#(m.node.kid)","typ":"tandem-id+jwt"}"#)
        #expect(reason { _ = try v.tokens.verify("\(hs).\(parts[1]).\(parts[2])", now: 1010) } == .invalidToken)
        // A proof is not a token (typ).
        let proof = ProofSigner(key: m.node).sign(
            ProofTarget(method: "GET", authority: "users", pathAndQuery: "/"), tokenHash: "x", now: 1000,
            nonce: Array(repeating: 1, count: 16))
        #expect(reason { _ = try v.tokens.verify(proof, now: 1010) } == .invalidToken)
    }

    @Test func aRotatedKeyVerifiesDuringItsGraceAndNotAfter() throws {
        var m = try Mesh()
        var v = m.verifier()
        let t = m.token()
        m.published.retiredAt = 1100
        m.published.expiresAt = 1400
        let next = try keyPair(3)
        v.tokens.setKeys([m.published, try PublishedKey(kid: next.kid, x: next.x, node: "n1", createdAt: 1100)])
        #expect(try v.tokens.verify(t, now: 1200).subject == "orders")
        #expect(reason { _ = try v.tokens.verify(t, now: 1400) } == .unknownKey)  // cached, but the grace is over
        // Signed after the key retired.
        #expect(reason { _ = try v.tokens.verify(m.token(iat: 1200), now: 1210) } == .unknownKey)
        v.tokens.setKeys([try PublishedKey(kid: next.kid, x: next.x, node: "n1", createdAt: 1100)])
        #expect(v.tokens.cachedTokens == 0)
        #expect(reason { _ = try v.tokens.verify(t, now: 1200) } == .unknownKey)
    }

    @Test func publishedKeysRoundTripThroughTheirJSONRecord() throws {
        var k = try Mesh().published
        k.retiredAt = 5
        k.expiresAt = 9
        #expect(try PublishedKey.parse(Array(k.json.utf8)) == k)
        #expect(throws: IdentityError.self) { try PublishedKey.parse(Array(#"{"kty":"RSA"}"#.utf8)) }
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        #expect(
            jwkThumbprint(x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
                == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k")
    }
}

@Suite struct ProofTests {
    let target = ProofTarget(method: "POST", authority: "users", pathAndQuery: "/user?x=1", bodyDigest: nil)

    func signed(_ m: Mesh, _ t: ProofTarget, token: String, now: Int64 = 1000, nonce: UInt8 = 7) -> String {
        ProofSigner(key: m.caller).sign(
            t, tokenHash: sha256Base64URL(token.utf8), now: now, nonce: Array(repeating: nonce, count: 16))
    }

    /// users' authenticator requiring proofs, orders' token, and the request with a `{}` body.
    func proofCase() throws -> (Mesh, InboundAuthenticator, String, InboundRequirements, ProofTarget) {
        let m = try Mesh()
        var body = target
        body.bodyDigest = sha256Base64URL(Array("{}".utf8))
        return (m, m.verifier(), m.token(), InboundRequirements(mode: .require, requireProof: true), body)
    }

    @Test func aProofIsAcceptedOnceForItsRequestOnly() throws {
        let (m, auth, token, req, body) = try proofCase()
        var v = auth
        let p = signed(m, body, token: token)
        let claims = try v.authorize(
            PresentedCredentials(token: token, proof: p), target: target, bodyDigest: body.bodyDigest,
            requirements: req, now: 1001)
        #expect(claims?.subject == "orders")
        func refusal(_ proof: String?, _ t: ProofTarget, digest: String?, now: Int64 = 1001) -> IdentityError.Reason? {
            reason {
                _ = try v.authorize(
                    PresentedCredentials(token: token, proof: proof), target: t, bodyDigest: digest, requirements: req,
                    now: now)
            }
        }
        #expect(refusal(p, target, digest: body.bodyDigest) == .replayedProof)
        var otherPath = target
        otherPath.pathAndQuery = "/admin"
        #expect(refusal(signed(m, body, token: token, nonce: 8), otherPath, digest: body.bodyDigest) == .proofMismatch)
        #expect(
            refusal(signed(m, body, token: token, nonce: 9), target, digest: sha256Base64URL(Array("{\"a\":1}".utf8)))
                == .bodyMismatch)
        #expect(refusal(signed(m, body, token: token, nonce: 10), target, digest: nil) == .bodyMismatch)
        #expect(refusal(nil, target, digest: nil) == .missingProof)
        #expect(refusal(signed(m, target, token: token, nonce: 11), target, digest: nil, now: 1100) == .invalidProof)
        // Signed with a key that is not the token's cnf.
        let thief = ProofSigner(key: try keyPair(5)).sign(
            target, tokenHash: sha256Base64URL(token.utf8), now: 1000, nonce: Array(repeating: 12, count: 16))
        #expect(refusal(thief, target, digest: nil) == .invalidProof)
        // Made for another token of the same caller.
        #expect(refusal(signed(m, target, token: m.token(jti: "t2"), nonce: 13), target, digest: nil) == .proofMismatch)
    }

    /// A MAC proof from the caller's X25519 key for one callee instance's key.
    func mac(
        _ t: ProofTarget, token: String, from caller: AgreementKey, to callee: AgreementKey, now: Int64 = 1000,
        nonce: UInt8 = 7
    ) throws -> String {
        ProofSigner.mac(
            t, tokenHash: sha256Base64URL(token.utf8), now: now, nonce: Array(repeating: nonce, count: 16),
            macKey: try caller.macKey(peer: callee.x, asCaller: true), calleeKid: callee.kid)
    }

    @Test func aMACProofIsAcceptedOnceForItsRequestAndItsInstanceOnly() throws {
        let (m, auth, token, req, body) = try proofCase()
        var v = auth
        let p = try mac(body, token: token, from: m.callerAgreement, to: m.calleeAgreement)
        #expect(ProofSigner.type == "tandem-pop+jwt" && p.split(separator: ".").count == 3)
        let claims = try v.authorize(
            PresentedCredentials(token: token, proof: p), target: target, bodyDigest: body.bodyDigest,
            requirements: req, now: 1001)
        #expect(claims?.agreementKey == m.callerAgreement.x)
        func refusal(
            _ proof: String, _ t: ProofTarget = target, digest: String?, token tk: String? = nil
        )
            -> IdentityError?
        {
            do {
                _ = try v.authorize(
                    PresentedCredentials(token: tk ?? token, proof: proof), target: t, bodyDigest: digest,
                    requirements: req, now: 1001)
                return nil
            } catch { return error }
        }
        #expect(refusal(p, digest: body.bodyDigest)?.reason == .replayedProof)
        var otherPath = target
        otherPath.pathAndQuery = "/admin"
        let p2 = try mac(body, token: token, from: m.callerAgreement, to: m.calleeAgreement, nonce: 8)
        #expect(refusal(p2, otherPath, digest: body.bodyDigest)?.reason == .proofMismatch)
        let p3 = try mac(body, token: token, from: m.callerAgreement, to: m.calleeAgreement, nonce: 9)
        #expect(refusal(p3, digest: sha256Base64URL(Array("{\"a\":1}".utf8)))?.reason == .bodyMismatch)
        // A thief with the token but another X25519 key: the MAC does not verify.
        let thief = AgreementKey(derivedFrom: [UInt8](repeating: 5, count: 32))
        let stolen = try mac(target, token: token, from: thief, to: m.calleeAgreement, nonce: 10)
        #expect(refusal(stolen, digest: nil)?.message == "proof MAC does not verify")
        // A proof made for another instance of the service (its key) is refused by name here.
        let other = AgreementKey(derivedFrom: [UInt8](repeating: 6, count: 32))
        let elsewhere = try mac(target, token: token, from: m.callerAgreement, to: other, nonce: 11)
        #expect(refusal(elsewhere, digest: nil)?.reason == .staleProofKey)
        // …and changing its kid to this instance's does not make the MAC verify.
        var parts = elsewhere.split(separator: ".").map(String.init)
        parts[0] = Base64URL.encode(
            JSONValue.object([
                "typ": .string(ProofSigner.type), "alg": .string("HS256"), "kid": .string(m.calleeAgreement.kid),
            ]).encoded)
        #expect(refusal(parts.joined(separator: "."), digest: nil)?.message == "proof MAC does not verify")
        // A token that binds no X25519 key cannot carry MAC proofs.
        let bare = m.token(jti: "t3", agreement: false)
        let p4 = try mac(target, token: bare, from: m.callerAgreement, to: m.calleeAgreement, nonce: 12)
        #expect(refusal(p4, digest: nil, token: bare)?.reason == .invalidProof)
        // A forged MAC (flipped bits) and alg none are refused.
        var forged = p2.split(separator: ".").map(String.init)
        forged[2] = Base64URL.encode([UInt8](repeating: 0, count: 32))
        #expect(refusal(forged.joined(separator: "."), body, digest: body.bodyDigest)?.reason == .invalidProof)
        forged[0] = Base64URL.encode(Array(#"{"typ":"tandem-pop+jwt","alg":"none"}"#.utf8))
        #expect(refusal(forged.joined(separator: "."), body, digest: body.bodyDigest)?.reason == .invalidProof)
        // Both sides agree on the same key, and the cache does one agreement per peer.
        #expect(v.proofs.macKeys.agreements == 1)
    }

    /// Nonces are remembered per token: another caller using the same nonce first (sidecars
    /// count nonces up, so they can be foreseen) does not get this caller's proof refused.
    @Test func aNonceIsSpentOnlyForItsOwnToken() throws {
        let (m, auth, token, req, _) = try proofCase()
        var v = auth
        let other = m.token(sub: "billing", jti: "t9")
        for t in [other, token] {
            let p = try mac(target, token: t, from: m.callerAgreement, to: m.calleeAgreement, nonce: 42)
            let c = try v.authorize(
                PresentedCredentials(token: t, proof: p), target: target, bodyDigest: nil, requirements: req,
                now: 1001)
            #expect(c?.id == (t == token ? "t1" : "t9"))
        }
        let again = try mac(target, token: token, from: m.callerAgreement, to: m.calleeAgreement, nonce: 42)
        #expect(
            reason {
                _ = try v.authorize(
                    PresentedCredentials(token: token, proof: again), target: target, bodyDigest: nil,
                    requirements: req, now: 1001)
            } == .replayedProof)
    }

    /// Every request refused with `stale-proof-key` in the same moment may go again with the
    /// key named (the caller bounds it per attempt); the key is used while discovery still has
    /// the one it replaced; a key equal to the discovered one, or not a key, is nothing new.
    @Test func aCalleesNewProofKeyIsLearnedUntilDiscoveryCatchesUp() throws {
        let m = try Mesh()
        var book = LearnedProofKeys(capacity: 2)
        let (old, fresh, later) = (m.calleeAgreement.x, m.callerAgreement.x, AgreementKey(derivedFrom: [9]).x)
        #expect(book.key(at: "a:1", discovered: old) == old)
        let first = book.learn(fresh, at: "a:1", discovered: old)
        let second = book.learn(fresh, at: "a:1", discovered: old)  // refused before the first came back
        #expect(first && second)
        #expect(book.key(at: "a:1", discovered: old) == fresh)
        #expect(book.key(at: "a:1", discovered: later) == later)  // discovery caught up (or moved on)
        let same = book.learn(old, at: "a:1", discovered: old)
        let junk = book.learn("not-a-key", at: "a:1", discovered: old)
        #expect(!same && !junk)
        _ = book.learn(fresh, at: "b:1", discovered: old)
        _ = book.learn(fresh, at: "c:1", discovered: old)  // past the bound: starts over
        #expect(book.count == 1 && book.key(at: "a:1", discovered: old) == old)
    }

    @Test func aSidecarWithoutAProofKeyRefusesMACProofsAndTheTokenKeyMustBeX25519() throws {
        let m = try Mesh()
        var v = InboundAuthenticator(issuer: issuer, service: "users")
        v.tokens.setKeys([m.published])
        let token = m.token()
        let p = try mac(target, token: token, from: m.callerAgreement, to: m.calleeAgreement)
        #expect(
            reason {
                _ = try v.authorize(
                    PresentedCredentials(token: token, proof: p), target: target, bodyDigest: nil,
                    requirements: InboundRequirements(mode: .require), now: 1001)
            } == .invalidProof)
        // A cnf.jwk that is not an X25519 key makes the token invalid.
        var c = ServiceClaims(
            issuer: issuer, subject: "orders", audience: "users", issuedAt: 1000, expiresAt: 1300, id: "x",
            keyThumbprint: m.caller.thumbprint)
        c.agreementKey = "AAAA"
        #expect(reason { _ = try v.tokens.verify(ServiceToken.sign(c, key: m.node), now: 1001) } == .invalidToken)
        // Low-order X25519 points do not agree on a key.
        let zero = Base64URL.encode([UInt8](repeating: 0, count: 32))
        #expect(reason { _ = try m.calleeAgreement.macKey(peer: zero, asCaller: false) } == .invalidProof)
    }

    @Test func theReplayCacheRemembersANonceForItsLifetimeAndIsBounded() throws {
        var c = ReplayCache(capacity: 3, lifetime: 10)
        try c.insert("a", expires: 10, now: 0)
        #expect(reason { try c.insert("a", expires: 10, now: 9) } == .replayedProof)
        try c.insert("b", expires: 20, now: 12)  // rotates: "a" moves to the previous generation
        #expect(reason { try c.insert("b", expires: 20, now: 19) } == .replayedProof)
        try c.insert("c", expires: 25, now: 15)
        try c.insert("d", expires: 25, now: 15)
        #expect(reason { try c.insert("e", expires: 25, now: 15) } == .replayCacheFull)
        try c.insert("e", expires: 40, now: 40)  // both generations have lapsed
        #expect(c.count == 1)
    }
}

@Suite struct AccessTests {
    @Test func allowAndDenyListsAndTheMeshDefault() {
        let r = AccessRule(allow: ["orders", "billing"], deny: [])
        #expect(r.check(caller: "orders", default: .deny, route: "r") == nil)
        #expect(r.check(caller: "web", default: .allow, route: "r")?.reason == .forbidden)
        #expect(r.check(caller: nil, default: .allow, route: "r")?.reason == .missingToken)
        let open = AccessRule()
        #expect(open.check(caller: "web", default: .allow, route: "r") == nil)
        #expect(open.check(caller: nil, default: .allow, route: "r") == nil)
        #expect(open.check(caller: "web", default: .deny, route: "r")?.reason == .forbidden)
        #expect(AccessRule(deny: ["web"]).check(caller: "web", default: .allow, route: "r")?.reason == .forbidden)
        #expect(IdentityError(.forbidden, "").status == 403 && IdentityError(.expiredToken, "").status == 401)
    }

    @Test func permissiveModeAdmitsAnonymousCallersButNotBadTokens() throws {
        let m = try Mesh()
        var v = m.verifier()
        let t = ProofTarget(method: "GET", authority: "users", pathAndQuery: "/")
        let permissive = InboundRequirements(mode: .permissive)
        #expect(
            try v.authorize(PresentedCredentials(), target: t, bodyDigest: nil, requirements: permissive, now: 1) == nil
        )
        #expect(
            reason {
                _ = try v.authorize(
                    PresentedCredentials(token: m.token(aud: "x")), target: t, bodyDigest: nil,
                    requirements: permissive,
                    now: 1001)
            } == .wrongAudience)
        #expect(
            reason {
                _ = try v.authorize(
                    PresentedCredentials(), target: t, bodyDigest: nil,
                    requirements: InboundRequirements(mode: .require),
                    now: 1)
            } == .missingToken)
    }
}

@Suite struct EndUserRequirementsTests {
    let r = EndUserRequirements(
        issuers: ["https://idp"], audiences: ["shop"], algorithms: ["RS256"], skew: 30, route: "me")

    @Test func theAlgorithmMustBeAcceptedAndBeTheKeys() {
        #expect(reason { try r.checkAlgorithm("RS256") } == nil)
        #expect(reason { try r.checkAlgorithm(nil) } == .invalidToken)
        #expect(reason { try r.checkAlgorithm("none") } == .invalidToken)
        #expect(reason { try r.checkAlgorithm("HS256") } == .invalidToken)
        // An HS256 token that selected an RSA key (the confusion): refused by the key check.
        #expect(reason { try r.checkKey(alg: "RS256", keyAlgorithm: "RS256") } == nil)
        #expect(reason { try r.checkKey(alg: "HS256", keyAlgorithm: "RS256") } == .invalidToken)
    }

    @Test func claimsAreCheckedWithTheSkew() {
        let ok: [String: JSONValue] = ["exp": .number(1000), "iss": .string("https://idp"), "aud": .string("shop")]
        #expect((try? r.checkClaims(ok, now: 1029)) == 1000)  // expired 29 s ago, within the skew
        #expect(reason { _ = try r.checkClaims(ok, now: 1030) } == .expiredToken)
        var c = ok
        c["exp"] = nil
        #expect(reason { _ = try r.checkClaims(c, now: 0) } == .invalidToken)
        c = ok
        c["nbf"] = .number(500)
        #expect(reason { _ = try r.checkClaims(c, now: 469) } == .invalidToken)
        #expect(reason { _ = try r.checkClaims(c, now: 470) } == nil)
        c = ok
        c["iss"] = .string("https://evil")
        #expect(reason { _ = try r.checkClaims(c, now: 0) } == .invalidToken)
        c = ok
        c["aud"] = .array([.string("other"), .string("shop")])
        #expect(reason { _ = try r.checkClaims(c, now: 0) } == nil)
        c["aud"] = .array([.string("other")])
        #expect(reason { _ = try r.checkClaims(c, now: 0) } == .wrongAudience)
        let open = EndUserRequirements(issuers: [], audiences: [], algorithms: ["ES256"], skew: 0, route: "r")
        #expect((try? open.checkClaims(["exp": .number(10)], now: 9)) == 10)
    }
}
