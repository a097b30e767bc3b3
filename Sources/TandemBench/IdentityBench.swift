import TandemIdentity

/// Per-request cost of identity on one core: verifying a service token (cold: the signature;
/// warm: the verified-token cache, what every request after a caller's first pays), signing a
/// proof (caller side) and checking one (callee side: key, request, window, replay cache).
func identityBenchmarks() throws {
    let node = try KeyPair(seed: [UInt8](repeating: 1, count: 32))
    let caller = try KeyPair(seed: [UInt8](repeating: 2, count: 32))
    let published = try PublishedKey(kid: node.kid, x: node.x, node: "n1", createdAt: 0)
    let issuer = "tandem://bench"
    let n = 20_000
    let now: Int64 = 1_000
    let tokens = (0..<n).map { i in
        ServiceToken.sign(
            ServiceClaims(
                issuer: issuer, subject: "orders", audience: "users", issuedAt: now, expiresAt: now + 300,
                id: "t\(i)", keyThumbprint: caller.thumbprint), key: node)
    }
    var sink = 0
    measure("identity: token verify, cold (Ed25519 + claims)", ops: n, unit: "verifies") {
        var v = TokenVerifier(issuer: issuer, audience: "users")
        v.setKeys([published])
        for t in tokens { sink &+= (try? v.verify(t, now: now + 1))?.subject.count ?? 0 }
    }
    var warm = TokenVerifier(issuer: issuer, audience: "users")
    warm.setKeys([published])
    _ = try warm.verify(tokens[0], now: now)
    measure("identity: token verify, cached", ops: n * 10, unit: "verifies") {
        for _ in 0..<(n * 10) { sink &+= (try? warm.verify(tokens[0], now: now + 1))?.subject.count ?? 0 }
    }
    let signer = ProofSigner(key: caller)
    let hash = sha256Base64URL(tokens[0].utf8)
    let target = ProofTarget(
        method: "POST", authority: "users", pathAndQuery: "/user?id=1",
        bodyDigest: sha256Base64URL([UInt8](repeating: 7, count: 512)))
    var proofs: [String] = []
    proofs.reserveCapacity(n)
    measure("identity: proof sign (caller)", ops: n, unit: "signs") {
        proofs = (0..<n).map { i in
            signer.sign(
                target, tokenHash: hash, now: now,
                nonce: withUnsafeBytes(of: UInt64(i).littleEndian) { Array($0) } + [UInt8](repeating: 9, count: 8))
        }
    }
    let claims = try warm.verify(tokens[0], now: now)
    measure("identity: proof verify + replay check (callee)", ops: n, unit: "verifies") {
        var v = ProofVerifier()
        for p in proofs {
            do {
                try v.verify(
                    p, token: tokens[0], claims: claims, target: target, bodyDigest: target.bodyDigest, now: now)
                sink &+= 1
            } catch {}
        }
    }
    measure("identity: body digest, 4 KiB (SHA-256)", ops: n, unit: "digests") {
        let body = [UInt8](repeating: 3, count: 4096)
        for _ in 0..<n { sink &+= sha256Base64URL(body).utf8.count }
    }
    if sink == 42 { print("") }  // keeps the work observable
}
