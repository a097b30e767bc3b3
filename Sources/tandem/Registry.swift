import ArgumentParser
import Foundation
import Glibc
import TandemCore
import TandemEtcdAPI
import TandemIdentity
import TandemRegistryServer
import TandemStore

struct Registry: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a registry member that speaks the etcd v3 API (etcd's flag names).",
        discussion: """
            With no flags: a single member on 127.0.0.1:2379 with its data in ./tandem.registry.
            Use port 0 in --listen-client-urls to pick a free port; the chosen address is printed.
            """)

    @Option(help: "Human-readable name of this member.") var name = "default"
    @Option(help: "Directory for the WAL and snapshots.") var dataDir = "tandem.registry"
    @Option(help: "URL to serve clients on (one, http only).") var listenClientUrls = "http://127.0.0.1:2379"
    @Option(help: "Client URL to advertise to the cluster.") var advertiseClientUrls: String?
    @Option(help: "URL for peer traffic.") var listenPeerUrls = "http://127.0.0.1:2380"
    @Option(help: "Peer URL to advertise.") var initialAdvertisePeerUrls: String?
    @Option(help: "Initial cluster, name=peerURL,... (default: this member alone).") var initialCluster: String?
    @Option(help: "new or existing.") var initialClusterState = "new"
    @Option(help: "Heartbeat interval in ms.") var heartbeatInterval: Int64 = 100
    @Option(help: "Election timeout in ms.") var electionTimeout: Int64 = 1_000
    @Option(help: "Applied entries between snapshots.") var snapshotCount: UInt64 = 100_000
    @Option(help: "Entries kept behind a snapshot for slow followers.") var snapshotCatchupEntries: UInt64 = 5_000
    @Option(help: "Backend quota in bytes: writes past it are refused (database space exceeded, NOSPACE alarm).")
    var quotaBackendBytes: Int64 = 2 << 30
    @Option(help: "Largest client request, in bytes.") var maxRequestBytes = 1_572_864
    @Option(
        help:
            "Shortest interval between a client's PINGs with no data in between (30s, 500ms); sooner, three times, ends the connection (GOAWAY too_many_pings)."
    )
    var grpcKeepaliveMinTime = "5s"
    @Option(
        help:
            "Refuse membership changes that would leave fewer started voting members than the quorum (etcd's check; true or false)."
    )
    var strictReconfigCheck = true
    @Option(help: "Auto-compaction mode: periodic (keep a time window) or revision (keep N revisions).")
    var autoCompactionMode = "periodic"
    @Option(
        help: """
            Auto-compaction retention: periodic — a duration (30m, 1h, 10s; a bare number is hours);             revision — a number of revisions; 0 turns it off. Default 1h (etcd's default is off,             but then history grows without bound).
            """)
    var autoCompactionRetention = "1h"
    @Option(help: "How often auto-compaction looks, in ms (default: a tenth of the retention, or 5 min for revision).")
    var autoCompactionCheckMs: Int64?
    @OptionGroup(title: "Service identity (docs/security.md)") var join: JoinTokenOptions
    @Option(
        help: ArgumentHelp(
            "Turn client auth on: users (`NAME HASH read|readwrite PREFIX…`, hashes from `tandem identity hash-password`) log in with etcdctl --user; sidecars present service tokens.",
            valueName: "path"))
    var authFile: String?
    @Option(help: "Lifetime of the identity tokens this member issues, in seconds (at most 3600).")
    var identityTokenTtl: Int64 = 300
    @Option(help: "Mesh-wide: what inbound routes without an allow list admit (allow, or deny unless allowed).")
    var identityDefault = "allow"
    @Flag(help: "Mesh-wide: every request carries a proof of possession (sidecars may still say otherwise).")
    var identityProof = false

    /// The auth file's text (nil: auth off).
    func authFileText() throws -> String? {
        guard let authFile else { return nil }
        guard let text = try? String(contentsOfFile: authFile, encoding: .utf8) else {
            throw ValidationError("--auth-file: cannot read \(authFile)")
        }
        do { _ = try RegistryAuth.parse(text) } catch { throw ValidationError("--auth-file: \(authFile): \(error)") }
        return text
    }

    /// The token service's settings; off without a join token.
    func identity() throws -> RegistryIdentity.Config {
        var c = RegistryIdentity.Config()
        c.joinTokens = try join.tokens()
        c.issuer = join.issuer
        c.tokenTTL = identityTokenTtl
        c.limits.maxTokenTTL = identityTokenTtl
        guard let d = DefaultAccess(rawValue: identityDefault) else {
            throw ValidationError("--identity-default must be allow or deny")
        }
        c.meshDefault = d
        c.meshProof = identityProof
        return c
    }

    /// The auto-compaction mode from the flags; nil = off.
    /// A duration with a unit (500ms, 10s, 30m, 1h) in ms; nil if it is not one.
    static func durationMs(_ s: String) -> Int64? {
        let units: [(String, Int64)] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)]
        guard let (suffix, scale) = units.first(where: { s.hasSuffix($0.0) && Double(s.dropLast($0.0.count)) != nil })
        else { return nil }
        return Int64(Double(s.dropLast(suffix.count))! * Double(scale))
    }

    func autoCompaction() throws -> AutoCompactor.Mode? {
        let r = autoCompactionRetention.trimmingCharacters(in: .whitespaces)
        switch autoCompactionMode {
        case "revision":
            guard let n = Int64(r), n >= 0 else {
                throw ValidationError(
                    "--auto-compaction-retention: revision mode needs a number of revisions, got '\(r)'")
            }
            return n == 0 ? nil : .revision(keep: n)
        case "periodic":
            let ms = Double(r).map { Int64($0 * 3_600_000) } ?? Self.durationMs(r)
            guard let ms, ms >= 0 else {
                throw ValidationError("--auto-compaction-retention: expected a duration like 30m or 1h, got '\(r)'")
            }
            return ms == 0 ? nil : .periodic(retentionMs: ms)
        default:
            throw ValidationError("--auto-compaction-mode must be periodic or revision, got '\(autoCompactionMode)'")
        }
    }

    func validate() throws {
        guard parseURL(listenClientUrls) != nil else {
            throw ValidationError("--listen-client-urls: expected http://HOST:PORT, got '\(listenClientUrls)'")
        }
        guard ["new", "existing"].contains(initialClusterState) else {
            throw ValidationError("--initial-cluster-state must be new or existing")
        }
        guard heartbeatInterval > 0, electionTimeout >= 5 * heartbeatInterval else {
            throw ValidationError("--election-timeout must be at least 5 × --heartbeat-interval")
        }
        guard parseURL(listenPeerUrls) != nil else {
            throw ValidationError("--listen-peer-urls: expected http://HOST:PORT, got '\(listenPeerUrls)'")
        }
        _ = try autoCompaction()
        guard (10...3600).contains(identityTokenTtl) else {
            throw ValidationError("--identity-token-ttl must be between 10 and 3600 seconds")
        }
        _ = try identity()
        _ = try authFileText()
        let members = try cluster()
        guard members[name] != nil else {
            throw ValidationError("--initial-cluster does not name this member ('\(name)')")
        }
    }

    func run() throws {
        let (host, port) = parseURL(listenClientUrls)!
        var cfg = RegistryNode.Config()
        cfg.name = name
        cfg.dataDir = dataDir
        cfg.id = memberID(name)
        let members = try cluster()
        cfg.peers = Dictionary(uniqueKeysWithValues: members.map { (memberID($0.key), $0.value) })
        cfg.peerURLs = [members[name]!]
        cfg.heartbeatMs = heartbeatInterval
        cfg.electionMs = electionTimeout
        cfg.snapshotCount = snapshotCount
        cfg.snapshotCatchUpEntries = snapshotCatchupEntries
        cfg.strictReconfigCheck = strictReconfigCheck
        cfg.names = Dictionary(uniqueKeysWithValues: members.map { (memberID($0.key), $0.key) })
        // Who this member is: fixed at its first start (from the flags, or from the running
        // cluster it joins) and kept in its data directory.
        let membership = try initialMembership(cfg, members: members)
        cfg.id = membership.memberID
        cfg.clusterID = membership.clusterID
        cfg.initialConf = membership.conf
        cfg.peers = membership.peers
        cfg.names = Dictionary(membership.members.map { ($0.id, $0.name) }, uniquingKeysWith: { a, _ in a })
        cfg.names[membership.memberID] = name
        if initialCluster != nil, Set(membership.peers.values) != Set(members.values) {
            // As etcd: once the data dir exists, its membership counts, not the flags.
            print(
                "tandem registry: --initial-cluster is ignored: \(dataDir)/\(InitialMembership.fileName) fixed this member's cluster at its first start (membership changes since come from the log)"
            )
        }
        let holder = ServerHolder()
        cfg.onRemoved = {
            // etcd stops a removed member. Off the raft loop, and after a grace period for
            // the answers in flight (the MemberRemove that removed this very member).
            Thread.detachNewThread {
                Thread.sleep(forTimeInterval: 1)
                holder.shutdown()
            }
        }
        cfg.autoCompaction = try autoCompaction()
        cfg.autoCompactionCheckMs = autoCompactionCheckMs
        cfg.log = { line in
            print("tandem registry: \(line)")
            fflush(nil)
        }
        var limits = EtcdLimits()
        limits.maxRequestBytes = maxRequestBytes
        limits.quotaBackendBytes = quotaBackendBytes
        let minPing = grpcKeepaliveMinTime.trimmingCharacters(in: .whitespaces)
        guard let minPingMs = Self.durationMs(minPing), minPingMs >= 0 else {
            throw ValidationError("--grpc-keepalive-min-time: expected a duration like 5s or 500ms, got '\(minPing)'")
        }
        limits.keepaliveMinTimeNanos = minPingMs * 1_000_000
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let wallMs = UInt64(ts.tv_sec) * 1000 + UInt64(ts.tv_nsec / 1_000_000)
        let server: RegistryServer
        do {
            server = try RegistryServer(
                config: cfg, limits: limits, identity: try identity(), authFile: try authFileText(), wallClockMs: wallMs
            )
        } catch {
            // A runtime failure, not a usage error: one clear line, no usage banner.
            throw RuntimeError("cannot open the registry in \(dataDir): \(error)")
        }
        holder.set(server)
        for note in server.node.recoveryNotes { print("tandem registry: \(note)") }
        // Peers: listened for now in a cluster, or once a single member is grown (MemberAdd).
        let (peerHost, peerPort) = parseURL(listenPeerUrls)!
        if let p = try server.startPeers(
            peerHost: peerHost, peerPort: peerPort, listenNow: membership.members.count > 1)
        {
            print("tandem registry: member \(name) listening for peers on \(peerHost):\(p)")
        }
        let bound = try server.start(host: host, port: port)
        let advertised = advertiseClientUrls ?? "http://\(host):\(bound)"
        let node = server.node
        try node.loop.submit { node.setClientURLs([advertised]) }.wait()
        let loopback = host == "127.0.0.1" || host == "localhost" || host == "::1"
        if authFile == nil {
            print(
                "tandem registry: warning: client auth is off: any process that reaches \(host):\(bound) can read and write keys (the identity records excepted)\(loopback ? "" : "; this address is not loopback")"
            )
        } else {
            print("tandem registry: client auth on: users from \(authFile!), sidecars by service token")
        }
        if try identity().enabled {
            print("tandem registry: identity on: issuing tokens as \(join.issuer) for \(identityTokenTtl) s")
        }
        print("tandem registry: member \(name) (\(String(cfg.id, radix: 16))) serving clients on \(host):\(bound)")
        fflush(nil)  // the address line must reach a piped reader now
        try server.wait()
    }

    /// This member's identity and starting membership: saved in the data directory by an
    /// earlier start; else — the first start — from --initial-cluster for a new cluster, or
    /// asked of the other members in --initial-cluster when joining a running one
    /// (`--initial-cluster-state existing`); saved either way.
    func initialMembership(_ cfg: RegistryNode.Config, members: [String: String]) throws -> InitialMembership {
        let myPeerURL = members[name]!
        if let saved = try InitialMembership.load(dataDir: dataDir) { return saved }
        guard initialClusterState == "existing" else {
            let m = InitialMembership(newCluster: cfg.peers, names: cfg.names, memberID: cfg.id)
            try m.save(dataDir: dataDir)
            return m
        }
        var failures: [String] = []
        for (n, url) in members.sorted(by: { $0.key < $1.key }) where n != name {
            guard let peer = HostPort(url) else { continue }
            let answer: [UInt8]
            do {
                answer = try RegistryServer.queryMembers(peer: peer)
            } catch {
                failures.append("\(n) (\(url)): \(error)")
                continue
            }
            let j: InitialMembership
            do { j = try InitialMembership(json: answer, peerURL: myPeerURL) } catch { throw RuntimeError("\(error)") }
            try j.save(dataDir: dataDir)
            print(
                "tandem registry: joined cluster \(String(j.clusterID, radix: 16)) as member \(String(j.memberID, radix: 16)) (\(j.members.count) members, asked \(n))"
            )
            return j
        }
        throw RuntimeError(
            "--initial-cluster-state existing: no other member in --initial-cluster answered: \(failures.isEmpty ? "none listed" : failures.joined(separator: "; "))"
        )
    }

    /// name → peer URL, from --initial-cluster (default: this member alone).
    func cluster() throws -> [String: String] {
        guard let spec = initialCluster else { return [name: initialAdvertisePeerUrls ?? listenPeerUrls] }
        var out: [String: String] = [:]
        for part in spec.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, !kv[0].isEmpty, parseURL(kv[1]) != nil else {
                throw ValidationError("--initial-cluster: expected name=http://HOST:PORT, got '\(part)'")
            }
            guard out[kv[0]] == nil else { throw ValidationError("--initial-cluster names '\(kv[0])' twice") }
            out[kv[0]] = kv[1]
        }
        return out
    }

    func parseURL(_ s: String) -> (String, Int)? {
        guard s.hasPrefix("http://") else { return nil }
        let rest = s.dropFirst(7).split(separator: "/").first.map(String.init) ?? ""
        guard let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]),
            (0...65535).contains(port)
        else { return nil }
        return (String(rest[..<colon]), port)
    }

    /// A stable, non-zero member id from the member's name (etcd derives one from its URLs).
    func memberID(_ name: String) -> NodeID {
        var h = FNV1a()
        h.add(name)
        return h.value == 0 ? 1 : h.value
    }
}

/// A failure at run time: ArgumentParser prints it as one line and exits non-zero.
struct RuntimeError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// The server, for stopping it from another thread (a member removed from its cluster).
final class ServerHolder: @unchecked Sendable {
    private let lock = NSLock()
    private var server: RegistryServer?
    func set(_ s: RegistryServer) { lock.withLock { server = s } }
    func shutdown() {
        guard let s = lock.withLock({ server }) else { return }
        try? s.shutdown()
    }
}
