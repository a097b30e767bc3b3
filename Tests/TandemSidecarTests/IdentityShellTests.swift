import NIOHTTP1
import TandemConfig
import TandemIdentity
import TandemTraffic
import Testing

@testable import TandemSidecar

/// The sidecar's identity shell: what it attaches and learns (no registry: tokens are absent,
/// so these check the bookkeeping around them).
@Suite struct IdentityShellTests {
    func identity() -> SidecarIdentity {
        var c = SidecarConfig(service: "orders", instance: "orders-1", appPort: 1)
        c.identity.joinToken = "0123456789abcdef0123"
        return SidecarIdentity(config: c, metrics: SidecarMetrics(), log: { _ in })
    }

    /// Every request refused with `stale-proof-key` in the same moment may go again with the
    /// key named (each at most once: the exchange bounds it); a key equal to the discovered
    /// one, or not a key, is nothing new to try.
    @Test func aCalleesNewProofKeyIsLearnedForEveryRefusedRequest() {
        let id = identity()
        let fresh = AgreementKey(derivedFrom: [UInt8](repeating: 9, count: 32)).x
        let ep = Endpoint(id: "users-1", host: "127.0.0.1", port: 9000, proofKey: id.agreement.x)
        #expect(id.learn(calleeKey: fresh, for: ep))
        #expect(id.learn(calleeKey: fresh, for: ep))  // a second request refused before the first came back
        #expect(!id.learn(calleeKey: id.agreement.x, for: ep))
        #expect(!id.learn(calleeKey: "not-a-key", for: ep))
    }
}
