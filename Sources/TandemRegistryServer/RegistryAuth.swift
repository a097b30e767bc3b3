import Crypto
import Foundation
import TandemCore
import TandemEtcdAPI
import TandemIdentity
import TandemStore

/// Client authentication and authorization of the etcd API (docs/security.md, "Registry
/// access"). Off by default (the registry warns). With `--auth-file`:
/// - etcd users log in the etcd way (`etcdctl --user NAME:PASSWORD` → Authenticate → a token
///   in the `token` metadata); their permissions are read or readwrite on key prefixes;
/// - sidecars present a Tandem service token issued for the audience `tandem-registry`: a
///   service may read discovery (`/tandem/services/`), its own config
///   (`/tandem/config/<service>/`) and the identity records (public keys, mesh settings), and
///   write only its own
///   registrations (`/tandem/services/<service>/`).
/// Confined to the member's raft loop (tokens are per member, like etcd's simple tokens).
public final class RegistryAuth: @unchecked Sendable {
    public struct User: Sendable {
        var name: String
        /// `pbkdf2-sha256$ITERATIONS$SALT$HASH` (base64url salt and hash).
        var passwordHash: String
        var permissions: [Permission]
    }

    struct Permission: Equatable, Sendable {
        var prefix: [UInt8]
        var write: Bool
    }

    public enum Principal: Equatable, Sendable {
        case user(String)
        case service(String)
    }

    static let audience = "tandem-registry"
    static let sessionTTL: Int64 = 300
    static let maxSessions = 10_000

    let users: [String: User]
    private var sessions: [String: (user: String, expires: Int64)] = [:]
    private var verifier: TokenVerifier
    private var keysRevision: Int64 = -1
    private var rng = SystemRandomNumberGenerator()

    init(users: [User], issuer: String) {
        self.users = Dictionary(users.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        verifier = TokenVerifier(issuer: issuer, audience: Self.audience)
    }

    var enabled: Bool { !users.isEmpty }

    // MARK: the auth file

    /// Lines `NAME HASH read|readwrite PREFIX [PREFIX…]`; `#` starts a comment. A user may
    /// appear on several lines (one permission kind each).
    public static func parse(_ text: String) throws -> [User] {
        var out: [String: User] = [:]
        var order: [String] = []
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            if f.isEmpty { continue }
            guard f.count >= 4, ["read", "readwrite"].contains(f[2]) else {
                throw AuthFileError("line \(i + 1): expected NAME PASSWORD-HASH read|readwrite PREFIX…")
            }
            guard parseHash(f[1]) != nil else {
                throw AuthFileError(
                    "line \(i + 1): the password must be a hash from `tandem identity hash-password` (pbkdf2-sha256$…)")
            }
            let perms = f[3...].map { Permission(prefix: $0 == "/" ? [] : Array($0.utf8), write: f[2] == "readwrite") }
            if out[f[0]] == nil {
                order.append(f[0])
                out[f[0]] = User(name: f[0], passwordHash: f[1], permissions: [])
            } else if out[f[0]]!.passwordHash != f[1] {
                throw AuthFileError("line \(i + 1): user \(f[0]) has two different passwords")
            }
            out[f[0]]!.permissions += perms
        }
        return order.map { out[$0]! }
    }

    struct AuthFileError: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    public static let defaultIterations = 100_000

    public static func hashPassword(_ password: String, salt: [UInt8], iterations: Int = defaultIterations) -> String {
        "pbkdf2-sha256$\(iterations)$\(Base64URL.encode(salt))$\(Base64URL.encode(pbkdf2(password, salt, iterations)))"
    }

    static func parseHash(_ h: String) -> (iterations: Int, salt: [UInt8], hash: [UInt8])? {
        let p = h.split(separator: "$")
        guard p.count == 4, p[0] == "pbkdf2-sha256", let n = Int(p[1]), n >= 1_000, n <= 10_000_000,
            let salt = Base64URL.decode(p[2]), salt.count >= 8, let hash = Base64URL.decode(p[3]), hash.count == 32
        else { return nil }
        return (n, salt, hash)
    }

    /// PBKDF2-HMAC-SHA256 (RFC 8018), one 32-byte block.
    static func pbkdf2(_ password: String, _ salt: [UInt8], _ iterations: Int) -> [UInt8] {
        // Keyed once; each iteration continues from a copy of the keyed state.
        let keyed = HMAC<SHA256>(key: SymmetricKey(data: Array(password.utf8)))
        var first = keyed
        first.update(data: salt + [0, 0, 0, 1])
        var u = Array(first.finalize())
        var t = u
        for _ in 1..<iterations {
            var h = keyed
            h.update(data: u)
            u = Array(h.finalize())
            for i in 0..<32 { t[i] ^= u[i] }
        }
        return t
    }

    // MARK: authentication

    /// Checks a login. PBKDF2 takes tens of milliseconds by design: call it off the event
    /// loops (it reads only the immutable user list).
    func checkPassword(name: String, password: String) -> EtcdStatus? {
        guard enabled else { return EtcdStatus(.failedPrecondition, "etcdserver: authentication is not enabled") }
        guard !name.isEmpty else { return EtcdStatus(.invalidArgument, "etcdserver: user name is empty") }
        let failed = EtcdStatus(.invalidArgument, "etcdserver: authentication failed, invalid user ID or password")
        guard let u = users[name], let h = Self.parseHash(u.passwordHash) else { return failed }
        return constantTimeEqual(Self.pbkdf2(password, h.salt, h.iterations), h.hash) ? nil : failed
    }

    /// A session token for a user whose password checked out (on the raft loop).
    func openSession(name: String, now: Int64) -> String {
        if sessions.count >= Self.maxSessions { sessions = sessions.filter { $0.value.expires > now } }
        if sessions.count >= Self.maxSessions { sessions.remove(at: sessions.startIndex) }
        let token = Base64URL.encode((0..<24).map { _ in UInt8.random(in: 0...255, using: &rng) })
        sessions[token] = (name, now + Self.sessionTTL)
        return token
    }

    /// Who presents `token` (nil: auth is off, everyone may do everything).
    func principal(_ token: String?, store: MVCCStore, now: Int64) -> Result<Principal?, EtcdStatus> {
        guard enabled else { return .success(nil) }
        guard let token, !token.isEmpty else {
            return .failure(EtcdStatus(.invalidArgument, "etcdserver: user name is empty"))
        }
        let invalid = EtcdStatus(.unauthenticated, "etcdserver: invalid auth token")
        if let s = sessions[token] {
            guard s.expires > now else {
                sessions[token] = nil
                return .failure(invalid)
            }
            sessions[token]!.expires = now + Self.sessionTTL  // etcd's simple tokens slide too
            return .success(.user(s.user))
        }
        guard token.contains(".") else { return .failure(invalid) }
        refreshKeys(store)
        guard let claims = try? verifier.verify(token, now: now) else { return .failure(invalid) }
        return .success(.service(claims.subject))
    }

    private func refreshKeys(_ store: MVCCStore) {
        let prefix = Array(RegistryIdentity.keyPrefix.utf8)
        guard let r = try? store.range(RangeRequest(key: prefix, rangeEnd: KeyRange.prefixEnd(prefix))) else { return }
        let rev = r.kvs.map(\.modRevision).max() ?? 0
        // Deletions lower the count; any put raises the max mod revision.
        let version = rev &* 1_000 &+ Int64(r.kvs.count)
        guard version != keysRevision else { return }
        keysRevision = version
        verifier.setKeys(r.kvs.compactMap { try? PublishedKey.parse($0.value) })
    }

    // MARK: authorization

    func permissions(of p: Principal) -> [Permission] {
        switch p {
        case .user(let name): return users[name]?.permissions ?? []
        case .service(let s):
            return [
                Permission(prefix: Array("/tandem/services/".utf8), write: false),
                Permission(prefix: Array("/tandem/config/\(s)/".utf8), write: false),
                Permission(prefix: Array("/tandem/identity/".utf8), write: false),
                // End-user JWT keys (`jwks_registry_key`), public by nature.
                Permission(prefix: Array("/tandem/jwks/".utf8), write: false),
                Permission(prefix: Array("/tandem/services/\(s)/".utf8), write: true),
            ]
        }
    }

    /// Whether `p` may read (or write) every key in [key, rangeEnd) (etcd's range encoding:
    /// empty end = one key, [0] = every key from `key`).
    func allows(_ p: Principal?, key: [UInt8], rangeEnd: [UInt8], write: Bool) -> Bool {
        guard let p else { return true }
        return permissions(of: p).contains { perm in
            guard !write || perm.write else { return false }
            if perm.prefix.isEmpty { return true }
            guard key.starts(with: perm.prefix) else { return false }
            if rangeEnd.isEmpty { return true }
            if rangeEnd == [0] { return false }
            // The range must end within the prefix's range.
            return !KeyRange.prefixEnd(perm.prefix).lexicographicallyPrecedes(rangeEnd)
        }
    }

    /// Root: may write every key (compaction, alarms, membership).
    func isRoot(_ p: Principal?) -> Bool { p == nil || allows(p, key: [], rangeEnd: [0], write: true) }

    /// Every key a write command touches, and every key a txn reads, is allowed.
    func allows(_ p: Principal?, _ cmd: StoreCommand) -> Bool {
        guard let p else { return true }
        func op(_ o: RequestOp) -> Bool {
            switch o {
            case .range(let r): return allows(p, key: r.key, rangeEnd: r.rangeEnd, write: false)
            case .put(let x): return allows(p, key: x.key, rangeEnd: [], write: true)
            case .deleteRange(let d): return allows(p, key: d.key, rangeEnd: d.rangeEnd, write: true)
            case .txn(let t): return txn(t)
            }
        }
        func txn(_ t: TxnRequest) -> Bool {
            t.compare.allSatisfy { allows(p, key: $0.key, rangeEnd: $0.rangeEnd, write: false) }
                && (t.success + t.failure).allSatisfy(op)
        }
        switch cmd {
        case .put(let x): return allows(p, key: x.key, rangeEnd: [], write: true)
        case .deleteRange(let d): return allows(p, key: d.key, rangeEnd: d.rangeEnd, write: true)
        case .txn(let t): return txn(t)
        case .compact: return isRoot(p)
        default: return true
        }
    }
}
