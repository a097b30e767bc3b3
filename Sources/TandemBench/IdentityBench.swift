import TandemIdentity

/// Per-request cost of identity on one core: verifying a service token (cold: the signature;
/// warm: the verified-token cache, what every request after a caller's first pays), making a
/// proof (caller side) and checking one (callee side: key, request, window, replay cache) —
/// signed (Ed25519) and MAC (HMAC-SHA256 under the X25519-agreed key, cached per peer).
func identityBenchmarks() throws {
    // `TandemBench identity TEXT`: only the rows whose name contains TEXT.
    let only = CommandLine.arguments.count > 2 ? CommandLine.arguments[2] : nil
    func measure(_ name: String, ops: Int, unit: String, _ body: () -> Void) {
        if let only, !name.contains(only) { return }
        TandemBench.measure("identity: " + name, ops: ops, unit: unit, body)
    }
    let node = try KeyPair(seed: [UInt8](repeating: 1, count: 32))
    let caller = try KeyPair(seed: [UInt8](repeating: 2, count: 32))
    let callerAgreement = AgreementKey(derivedFrom: [UInt8](repeating: 2, count: 32))
    let callee = AgreementKey(derivedFrom: [UInt8](repeating: 3, count: 32))
    let published = try PublishedKey(kid: node.kid, x: node.x, node: "n1", createdAt: 0)
    let issuer = "tandem://bench"
    let n = 20_000
    let now: Int64 = 1_000
    let tokens = (0..<n).map { i in
        var c = ServiceClaims(
            issuer: issuer, subject: "orders", audience: "users", issuedAt: now, expiresAt: now + 300,
            id: "t\(i)", keyThumbprint: caller.thumbprint)
        c.agreementKey = callerAgreement.x
        return ServiceToken.sign(c, key: node)
    }
    var sink = 0
    measure("token verify, cold (Ed25519 + claims)", ops: n, unit: "verifies") {
        var v = TokenVerifier(issuer: issuer, audience: "users")
        v.setKeys([published])
        for t in tokens { sink &+= (try? v.verify(t, now: now + 1))?.subject.count ?? 0 }
    }
    var warm = TokenVerifier(issuer: issuer, audience: "users")
    warm.setKeys([published])
    _ = try warm.verify(tokens[0], now: now)
    measure("token verify, cached", ops: n * 10, unit: "verifies") {
        for _ in 0..<(n * 10) { sink &+= (try? warm.verify(tokens[0], now: now + 1))?.subject.count ?? 0 }
    }
    let signer = ProofSigner(key: caller)
    let hash = sha256Base64URL(tokens[0].utf8)
    let target = ProofTarget(
        method: "POST", authority: "users", pathAndQuery: "/user?id=1",
        bodyDigest: sha256Base64URL([UInt8](repeating: 7, count: 512)))
    var proofs: [String] = []
    proofs.reserveCapacity(n)
    func nonce(_ i: Int) -> [UInt8] {
        withUnsafeBytes(of: UInt64(i).littleEndian) { Array($0) } + [UInt8](repeating: 9, count: 8)
    }
    measure("proof sign, Ed25519 (caller)", ops: n, unit: "signs") {
        proofs = (0..<n).map { i in
            signer.sign(target, tokenHash: hash, now: now, nonce: nonce(i))
        }
    }
    let claims = try warm.verify(tokens[0], now: now)
    func verifyAll(_ proofs: [String]) {
        var v = ProofVerifier(agreement: callee)
        for p in proofs {
            do {
                try v.verify(
                    p, token: tokens[0], claims: claims, target: target, bodyDigest: target.bodyDigest, now: now)
                sink &+= 1
            } catch {}
        }
    }
    measure("proof verify, Ed25519 + replay check (callee)", ops: n, unit: "verifies") { verifyAll(proofs) }
    var macs = MACKeyCache(capacity: 16)
    measure("proof sign, MAC (caller; key agreed once per callee)", ops: n, unit: "signs") {
        proofs = (0..<n).map { i in
            // The cache lookup is part of every request's cost.
            guard let key = try? macs.key(callerAgreement, peer: callee.x, asCaller: true) else { return "" }
            return ProofSigner.mac(
                target, tokenHash: hash, now: now, nonce: nonce(i), macKey: key, calleeKid: callee.kid)
        }
    }
    measure("proof verify, MAC + replay check (callee)", ops: n, unit: "verifies") { verifyAll(proofs) }
    measure("X25519 key agreement + HKDF (once per caller/callee pair)", ops: 2_000, unit: "agreements") {
        for _ in 0..<2_000 { sink &+= (try? callee.macKey(peer: callerAgreement.x, asCaller: false)) == nil ? 0 : 1 }
    }
    measure("body digest, 4 KiB (SHA-256)", ops: n, unit: "digests") {
        let body = [UInt8](repeating: 3, count: 4096)
        for _ in 0..<n { sink &+= sha256Base64URL(body).utf8.count }
    }
    if sink == 42 { print("") }  // keeps the work observable
}
