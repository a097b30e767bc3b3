import Foundation
import NIOCore
import TandemCore
import TandemEtcdAPI
import TandemIdentity
import TandemStore

/// The registry's token service (docs/security.md). Each member holds its own Ed25519 signing
/// key, created at its first start in `<data-dir>/identity/signing.json` (mode 0600, fsynced)
/// and published — public half only — under `/tandem/identity/keys/<kid>` through Raft, where
/// sidecars watch it. A member issues tokens only once its key is committed. Rotation retires
/// the old key (it signs nothing more) and deletes its record when its grace ends; any member
/// deletes expired records, so a dead member's key goes too.
///
/// Confined to the member's raft loop.
public final class RegistryIdentity: @unchecked Sendable {
    public struct Config: Sendable {
        /// Join tokens: a secret, and the services it may obtain tokens for (nil: any).
        public var joinTokens: [(secret: [UInt8], services: Set<String>?)] = []
        /// `iss` of every token: `tandem://<mesh>`.
        public var issuer = "tandem://tandem"
        /// Lifetime of issued tokens (and the cap on what a sidecar may ask for).
        public var tokenTTL: Int64 = 300
        public var limits = IdentityLimits()
        /// Mesh-wide settings published at `/tandem/identity/mesh` for sidecars whose config
        /// does not say: what routes without `allow` admit, and whether proofs are required.
        public var meshDefault: DefaultAccess = .allow
        public var meshProof = false
        public init() {}
        public var enabled: Bool { !joinTokens.isEmpty }
    }

    public static let keyPrefix = "/tandem/identity/keys/"
    public static let meshKey = "/tandem/identity/mesh"
    /// Keys under this prefix are written only by members themselves; the etcd API refuses
    /// client writes there ("etcdserver: permission denied").
    public static let reservedPrefix: [UInt8] = Array("/tandem/identity/".utf8)

    let config: Config
    private let node: RegistryNode
    private let keyFile: String
    private var key: KeyPair
    private var keyCreated: Int64
    /// The current key's record is committed: tokens may be issued.
    private(set) var published = false
    private var publishing = false
    private var task: RepeatedTask?
    private var rng = SystemRandomNumberGenerator()
    private let log: @Sendable (String) -> Void

    init(config: Config, node: RegistryNode) throws {
        self.config = config
        self.node = node
        self.log = node.config.log
        let dir = (node.config.dataDir as NSString).appendingPathComponent("identity")
        keyFile = (dir as NSString).appendingPathComponent("signing.json")
        if let data = FileManager.default.contents(atPath: keyFile) {
            let v = try JSONValue.parse(Array(data))
            guard let seed = v["seed"]?.string.flatMap({ Base64URL.decode($0) }), let created = v["created_at"]?.int64
            else { throw RegistryIdentityError("\(keyFile): not a signing key record") }
            key = try KeyPair(seed: seed)
            keyCreated = created
        } else {
            var g = SystemRandomNumberGenerator()
            key = try KeyPair(seed: (0..<32).map { _ in UInt8.random(in: 0...255, using: &g) })
            keyCreated = Self.wallClock()
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try Self.saveKey(key, created: keyCreated, to: keyFile)
        }
    }

    struct RegistryIdentityError: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    static func wallClock() -> Int64 { Int64(Date().timeIntervalSince1970) }

    /// Writes the key record atomically: temp file (0600), fsync, rename, fsync of the directory.
    static func saveKey(_ k: KeyPair, created: Int64, to path: String) throws {
        let text = JSONValue.object([
            "seed": .string(Base64URL.encode(k.seed)), "created_at": .number(Double(created)), "kid": .string(k.kid),
        ]).encoded
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw RegistryIdentityError("cannot write \(tmp): errno \(errno)") }
        let bytes = Array(text.utf8)
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count, fsync(fd) == 0 else {
            close(fd)
            throw RegistryIdentityError("cannot write \(tmp): errno \(errno)")
        }
        close(fd)
        guard rename(tmp, path) == 0 else { throw RegistryIdentityError("cannot rename \(tmp): errno \(errno)") }
        let dfd = open((path as NSString).deletingLastPathComponent, O_RDONLY)
        if dfd >= 0 {
            fsync(dfd)
            close(dfd)
        }
    }

    var record: PublishedKey {
        // The pair's x is valid base64url of a valid key: this cannot throw.
        try! PublishedKey(kid: key.kid, x: key.x, node: node.config.name, createdAt: keyCreated)
    }

    /// Publishes the key and keeps the key records tidy, once a second.
    func start() {
        node.loop.preconditionInEventLoop()
        guard config.enabled else { return }
        task = node.loop.scheduleRepeatedTask(initialDelay: .milliseconds(50), delay: .seconds(1)) { [self] _ in
            maintain()
        }
    }

    func stop() { task?.cancel() }

    private func records() -> [PublishedKey] {
        let prefix = Array(Self.keyPrefix.utf8)
        guard
            let r = try? node.replica.store.range(
                RangeRequest(key: prefix, rangeEnd: KeyRange.prefixEnd(prefix)))
        else { return [] }
        return r.kvs.compactMap { try? PublishedKey.parse($0.value) }
    }

    private func maintain() {
        guard node.replica.raft.leader != 0 else { return }
        let now = Self.wallClock()
        // The mesh settings first: Raft commits in order, so once the key is published (the
        // log line sidecars and tests wait for), the settings are too.
        let meshRecord = JSONValue.object([
            "default": .string(config.meshDefault.rawValue), "proof": .bool(config.meshProof),
        ]).encoded
        let stored = try? node.replica.store.range(RangeRequest(key: Array(Self.meshKey.utf8))).kvs.first?.value
        if node.replica.raft.leader == node.config.id, stored != Array(meshRecord.utf8) {
            node.propose(.put(PutRequest(key: Array(Self.meshKey.utf8), value: Array(meshRecord.utf8)))) {
                [log, config] r in
                if case .success(.put) = r {
                    log(
                        "identity: mesh settings published: default \(config.meshDefault.rawValue), proof \(config.meshProof)"
                    )
                }
            }
        }
        let mine = record
        let all = records()
        if !all.contains(where: { $0.kid == mine.kid }) {
            published = false
            put(mine)
        } else if !published {
            published = true
            log("identity: signing key \(mine.kid) published; issuing tokens as \(config.issuer)")
        }
        for k in all where !k.usable(now: now) && node.replica.raft.leader == node.config.id {
            node.propose(.deleteRange(DeleteRangeRequest(key: Array((Self.keyPrefix + k.kid).utf8)))) { _ in }
        }
    }

    private func put(_ k: PublishedKey, then: ((Bool) -> Void)? = nil) {
        guard !publishing || then != nil else { return }
        publishing = true
        node.propose(.put(PutRequest(key: Array((Self.keyPrefix + k.kid).utf8), value: Array(k.json.utf8)))) {
            [self] r in
            publishing = false
            if case .success(let res) = r, case .put = res {
                if k.kid == key.kid, !published {
                    published = true
                    log("identity: signing key \(k.kid) published; issuing tokens as \(config.issuer)")
                }
                then?(true)
            } else {
                then?(false)
            }
        }
    }

    private func joinTokenServices(_ presented: String) -> Set<String>?? {
        let p = Array(presented.utf8)
        for t in config.joinTokens where constantTimeEqual(t.secret, p) { return .some(t.services) }
        return nil
    }

    // MARK: RPCs

    func issue(_ req: Tandem_Identity_V1_IssueRequest) -> Result<Tandem_Identity_V1_IssueResponse, EtcdStatus> {
        guard config.enabled else {
            return .failure(
                EtcdStatus(
                    .failedPrecondition, "tandem: identity is off on this registry; start it with --join-token-file"))
        }
        guard let allowed = joinTokenServices(req.joinToken) else {
            return .failure(EtcdStatus(.unauthenticated, "tandem: invalid join token"))
        }
        guard isServiceName(req.service) else {
            return .failure(EtcdStatus(.invalidArgument, "tandem: \"\(req.service)\" is not a service name"))
        }
        if let allowed, !allowed.contains(req.service) {
            return .failure(
                EtcdStatus(.permissionDenied, "tandem: this join token may not obtain tokens for \"\(req.service)\""))
        }
        guard !req.audiences.isEmpty, req.audiences.count <= 64, req.audiences.allSatisfy({ isServiceName($0) }) else {
            return .failure(EtcdStatus(.invalidArgument, "tandem: audiences must be 1 to 64 service names"))
        }
        guard req.keyThumbprint.utf8.count == 43, Base64URL.decode(req.keyThumbprint)?.count == 32 else {
            return .failure(
                EtcdStatus(.invalidArgument, "tandem: key_thumbprint must be an RFC 7638 SHA-256 thumbprint"))
        }
        guard req.agreementKey.isEmpty || AgreementKey.isPublicKey(req.agreementKey) else {
            return .failure(
                EtcdStatus(.invalidArgument, "tandem: agreement_key must be base64url of an X25519 public key"))
        }
        guard published else {
            return .failure(EtcdStatus(.unavailable, "tandem: this member's signing key is not published yet"))
        }
        let now = Self.wallClock()
        let ttl = req.ttlSeconds > 0 ? min(req.ttlSeconds, config.tokenTTL) : config.tokenTTL
        var out = Tandem_Identity_V1_IssueResponse()
        out.issuer = config.issuer
        for aud in req.audiences {
            let jti = Base64URL.encode((0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) })
            var claims = ServiceClaims(
                issuer: config.issuer, subject: req.service, audience: aud, issuedAt: now, expiresAt: now + ttl,
                id: jti, keyThumbprint: req.keyThumbprint)
            claims.agreementKey = req.agreementKey.isEmpty ? nil : req.agreementKey
            var t = Tandem_Identity_V1_IssuedToken()
            t.audience = aud
            t.token = ServiceToken.sign(claims, key: key)
            t.expiresAt = now + ttl
            out.tokens.append(t)
        }
        return .success(out)
    }

    func rotate(
        _ req: Tandem_Identity_V1_RotateRequest,
        _ done: @escaping (Result<Tandem_Identity_V1_RotateResponse, EtcdStatus>) -> Void
    ) {
        guard config.enabled else {
            return done(.failure(EtcdStatus(.failedPrecondition, "tandem: identity is off on this registry")))
        }
        guard joinTokenServices(req.joinToken) == .some(nil) else {
            return done(.failure(EtcdStatus(.unauthenticated, "tandem: rotation needs an unrestricted join token")))
        }
        let now = Self.wallClock()
        var old = record
        old.retiredAt = now
        old.expiresAt = now + (req.graceSeconds >= 0 ? req.graceSeconds : config.tokenTTL + config.limits.skew)
        let next: KeyPair
        do {
            next = try KeyPair(seed: (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) })
            try Self.saveKey(next, created: now, to: keyFile)
        } catch {
            return done(.failure(EtcdStatus(.internalError, "tandem: cannot store the new signing key: \(error)")))
        }
        key = next
        keyCreated = now
        published = false
        log("identity: signing key rotated: \(old.kid) retired (verifies until \(old.expiresAt!)), \(next.kid) new")
        let retired = old
        put(retired) { [self] ok in
            guard ok else { return done(.failure(.timedOut)) }
            put(record) { [self] ok in
                guard ok else { return done(.failure(.timedOut)) }
                var r = Tandem_Identity_V1_RotateResponse()
                r.kid = key.kid
                r.retiredKid = retired.kid
                r.retiredExpiresAt = retired.expiresAt ?? 0
                done(.success(r))
            }
        }
    }
}

/// Compares secrets in time independent of where they differ.
func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var d: UInt8 = 0
    for i in 0..<a.count { d |= a[i] ^ b[i] }
    return d == 0
}

extension StoreCommand {
    /// Whether this write touches keys under `prefix` (put, delete range or any op of a txn).
    func touches(_ prefix: [UInt8]) -> Bool {
        func inRange(_ key: [UInt8], _ end: [UInt8]) -> Bool {
            if end.isEmpty { return key.starts(with: prefix) }
            let pEnd = KeyRange.prefixEnd(prefix)
            // [key, end) ∩ [prefix, pEnd) ≠ ∅; end == [0] means "to the last key".
            return key.lexicographicallyPrecedes(pEnd) && (end == [0] || prefix.lexicographicallyPrecedes(end))
        }
        func op(_ o: RequestOp) -> Bool {
            switch o {
            case .range: return false
            case .put(let p): return p.key.starts(with: prefix)
            case .deleteRange(let d): return inRange(d.key, d.rangeEnd)
            case .txn(let t): return (t.success + t.failure).contains(where: op)
            }
        }
        switch self {
        case .put(let p): return p.key.starts(with: prefix)
        case .deleteRange(let d): return inRange(d.key, d.rangeEnd)
        case .txn(let t): return (t.success + t.failure).contains(where: op)
        default: return false
        }
    }
}
