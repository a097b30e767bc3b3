import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import TandemEtcdAPI
import TandemEtcdClient

/// Options every registry client command shares.
struct ClientOptions: ParsableArguments {
    @Option(help: "Registry endpoints (Tandem or etcd), comma-separated host:port.") var endpoints = "127.0.0.1:2379"
    @Flag(help: "Print JSON instead of text.") var json = false
    @Option(help: "Log in as NAME:PASSWORD (etcd auth; etcdctl's --user).") var user: String?
    @Option(help: "A token for the registry's `token` metadata (e.g. a service token for tandem-registry).")
    var token: String?

    func withClient<T>(_ body: (EtcdClient) throws -> T) throws -> T {
        let eps: [EtcdEndpoint]
        do { eps = try EtcdEndpoint.parseList(endpoints) } catch { throw ValidationError("--endpoints: \(error)") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let client = EtcdClient(endpoints: eps, loop: group.next())
        defer {
            client.close()
            try? group.syncShutdownGracefully()
        }
        do {
            if let token { client.authToken = { token } }
            if let user {
                let parts = user.split(separator: ":", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { throw ValidationError("--user: expected NAME:PASSWORD") }
                try client.authenticate(user: parts[0], password: parts[1]).wait()
            }
            return try body(client)
        } catch let e as EtcdClientError where e.code == 14 {
            throw RuntimeError("cannot reach the registry at \(endpoints) (\(e.message))")
        } catch let e as EtcdClientError {
            throw RuntimeError(e.message.isEmpty ? "\(e)" : e.message)
        }
    }
}

func jsonString(_ obj: Any) -> String {
    let data = (try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])) ?? Data("null".utf8)
    return String(decoding: data, as: UTF8.self)
}

struct KV: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kv", abstract: "Read and write registry keys (any etcd v3 server).",
        subcommands: [Get.self, Put.self, Del.self, Watch.self])

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a key's value, or every key under a prefix.")
        @OptionGroup var client: ClientOptions
        @Flag(help: "Treat KEY as a prefix.") var prefix = false
        @Flag(help: "Serializable read (served by the member asked, may be stale).") var serializable = false
        @Argument var key: String

        func run() throws {
            let (kvs, rev) = try client.withClient {
                try $0.get(key, prefix: prefix, serializable: serializable).wait()
            }
            if client.json {
                print(
                    jsonString([
                        "revision": rev,
                        "kvs": kvs.map {
                            ["key": $0.key, "value": $0.valueString, "mod_revision": $0.modRevision, "lease": $0.lease]
                        },
                    ]))
            } else {
                for kv in kvs {
                    print(kv.key)
                    print(kv.valueString)
                }
            }
            if kvs.isEmpty && !prefix { throw ExitCode(1) }
        }
    }

    struct Put: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a key.")
        @OptionGroup var client: ClientOptions
        @Option(help: "Attach the key to this lease (hex id, as printed by `tandem lease grant`).") var lease: String?
        @Argument var key: String
        @Argument var value: String

        func run() throws {
            var leaseID: Int64 = 0
            if let lease {
                guard let id = Int64(lease, radix: 16) else {
                    throw ValidationError("--lease: expected a hex lease id")
                }
                leaseID = id
            }
            let rev = try client.withClient { try $0.put(key, Array(value.utf8), lease: leaseID).wait() }
            print(client.json ? jsonString(["revision": rev]) : "OK (revision \(rev))")
        }
    }

    struct Del: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a key, or every key under a prefix.")
        @OptionGroup var client: ClientOptions
        @Flag(help: "Treat KEY as a prefix.") var prefix = false
        @Argument var key: String

        func run() throws {
            let n = try client.withClient { try $0.delete(key, prefix: prefix).wait() }
            print(client.json ? jsonString(["deleted": n]) : "\(n)")
        }
    }

    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print changes to a key or prefix as they happen (Ctrl-C stops).")
        @OptionGroup var client: ClientOptions
        @Flag(help: "Treat KEY as a prefix.") var prefix = false
        @Option(help: "Start from this revision (default: now).") var rev: Int64 = 0
        @Argument var key: String

        func run() throws {
            let json = client.json
            let done = DispatchSemaphore(value: 0)
            let failure = NIOLockedValueBoxCompat<String?>(nil)
            try client.withClient { c in
                let stream = try c.openStream(
                    "/etcdserverpb.Watch/Watch",
                    onMessage: { bytes in
                        guard let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                        if r.canceled {
                            failure.set(r.cancelReason.isEmpty ? "watch canceled" : r.cancelReason)
                            done.signal()
                        }
                        for e in r.events {
                            let k = String(decoding: e.kv.key, as: UTF8.self)
                            let v = String(decoding: e.kv.value, as: UTF8.self)
                            let type = e.type == .put ? "PUT" : "DELETE"
                            if json {
                                print(
                                    jsonString(["type": type, "key": k, "value": v, "mod_revision": e.kv.modRevision]))
                            } else {
                                print(type)
                                print(k)
                                if e.type == .put { print(v) }
                            }
                            fflush(nil)
                        }
                    },
                    onClose: { e in
                        failure.set(e.map { "\($0.message)" } ?? "watch stream ended")
                        done.signal()
                    }
                ).wait()
                var create = Etcdserverpb_WatchCreateRequest()
                create.key = Data(key.utf8)
                if prefix { create.rangeEnd = Data(prefixRangeEnd(Array(key.utf8))) }
                create.startRevision = rev
                var req = Etcdserverpb_WatchRequest()
                req.createRequest = create
                stream.send(req)
                done.wait()
            }
            if let f = failure.get() { throw RuntimeError(f) }
        }
    }
}

/// A tiny lock-protected box for the CLI's callbacks.
final class NIOLockedValueBoxCompat<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ v: T) { value = v }
    func set(_ v: T) {
        lock.lock()
        value = v
        lock.unlock()
    }
    func get() -> T {
        lock.lock()
        defer { lock.unlock() }
        return value
    }
}

struct Lease: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Grant, revoke, keep alive and inspect leases.",
        subcommands: [Grant.self, Revoke.self, KeepAlive.self, TTL.self])

    struct TTL: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ttl", abstract: "Show a lease's granted and remaining TTL (and its keys with --keys).")
        @OptionGroup var client: ClientOptions
        @Flag(help: "List the keys attached to the lease.") var keys = false
        @Argument var id: String

        func run() throws {
            guard let lease = Int64(id, radix: 16) else { throw ValidationError("expected a hex lease id") }
            var req = Etcdserverpb_LeaseTimeToLiveRequest()
            req.id = lease
            req.keys = keys
            let r = try client.withClient {
                try $0.unary(
                    "/etcdserverpb.Lease/LeaseTimeToLive", req, as: Etcdserverpb_LeaseTimeToLiveResponse.self
                ).wait()
            }
            let names = r.keys.map { String(decoding: $0, as: UTF8.self) }
            if client.json {
                var obj: [String: Any] = ["id": id, "ttl": r.ttl, "granted_ttl": r.grantedTtl]
                if keys { obj["keys"] = names }
                print(jsonString(obj))
            } else if r.ttl == -1 {
                print("lease \(id) already expired")
            } else {
                let attached = keys ? ", attached keys(\(names))" : ""
                print("lease \(id) granted with TTL(\(r.grantedTtl)s), remaining(\(r.ttl)s)\(attached)")
            }
        }
    }

    struct Grant: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grant a lease with a TTL in seconds; prints its hex id.")
        @OptionGroup var client: ClientOptions
        @Argument var ttl: Int64

        func run() throws {
            let (id, granted) = try client.withClient { try $0.grantLease(ttl: ttl).wait() }
            let hex = String(id, radix: 16)
            print(client.json ? jsonString(["id": hex, "ttl": granted]) : "lease \(hex) granted with TTL(\(granted)s)")
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a lease (its keys are deleted).")
        @OptionGroup var client: ClientOptions
        @Argument var id: String

        func run() throws {
            guard let lease = Int64(id, radix: 16) else { throw ValidationError("expected a hex lease id") }
            try client.withClient { try $0.revokeLease(lease).wait() }
            print(client.json ? jsonString(["revoked": id]) : "lease \(id) revoked")
        }
    }

    struct KeepAlive: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "keep-alive", abstract: "Keep a lease alive until Ctrl-C (or until it is gone).")
        @OptionGroup var client: ClientOptions
        @Argument var id: String

        func run() throws {
            guard let lease = Int64(id, radix: 16) else { throw ValidationError("expected a hex lease id") }
            let done = DispatchSemaphore(value: 0)
            let json = client.json
            try client.withClient { c in
                let stream = try c.openStream(
                    "/etcdserverpb.Lease/LeaseKeepAlive",
                    onMessage: { bytes in
                        guard let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes) else { return }
                        if r.ttl <= 0 {
                            print("lease \(id) expired or revoked")
                            done.signal()
                        } else {
                            print(
                                json
                                    ? jsonString(["id": id, "ttl": r.ttl]) : "lease \(id) keepalived with TTL(\(r.ttl))"
                            )
                        }
                        fflush(nil)
                    },
                    onClose: { _ in done.signal() }
                ).wait()
                var keep = Etcdserverpb_LeaseKeepAliveRequest()
                keep.id = lease
                let req = keep
                let timer = c.loop.scheduleRepeatedTask(initialDelay: .zero, delay: .seconds(1)) { _ in stream.send(req)
                }
                done.wait()
                timer.cancel()
            }
        }
    }
}

struct Services: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List registered service instances (all services, or one) with their health.")
    @OptionGroup var client: ClientOptions
    @Argument(help: "A service name (default: every service).") var service: String?

    func run() throws {
        let prefix = service.map { ServiceInstance.prefix(service: $0) } ?? "/tandem/services/"
        let (kvs, _) = try client.withClient { try $0.get(prefix, prefix: true).wait() }
        let instances = kvs.compactMap { ServiceInstance.decode($0.value) }
        if client.json {
            print(
                jsonString(
                    instances.map {
                        [
                            "service": $0.service, "instance": $0.instance, "address": "\($0.address):\($0.port)",
                            "protocol": $0.protocol, "health": $0.health, "zone": $0.zone ?? "",
                            "metadata": $0.metadata,
                        ] as [String: Any]
                    }))
            return
        }
        if instances.isEmpty {
            print(service.map { "no instance of \($0) is registered" } ?? "no services are registered")
            return
        }
        print(
            "SERVICE".padding(toLength: 14, withPad: " ", startingAt: 0)
                + "INSTANCE".padding(toLength: 26, withPad: " ", startingAt: 0)
                + "ADDRESS".padding(toLength: 22, withPad: " ", startingAt: 0) + "PROTOCOL  HEALTH    METADATA")
        for i in instances {
            // Zone and --meta pairs, which routes and policies select subsets by.
            let meta =
                (i.zone.map { ["zone=\($0)"] } ?? [])
                + i.metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            let line =
                i.service.padding(toLength: 14, withPad: " ", startingAt: 0)
                + i.instance.padding(toLength: 26, withPad: " ", startingAt: 0)
                + "\(i.address):\(i.port)".padding(toLength: 22, withPad: " ", startingAt: 0)
                + i.protocol.padding(toLength: 10, withPad: " ", startingAt: 0)
                + (meta.isEmpty
                    ? i.health
                    : i.health.padding(toLength: 10, withPad: " ", startingAt: 0) + meta.joined(separator: ","))
            print(line)
        }
    }
}

struct Members: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the registry cluster's members (id, name, peer and client URLs, learner).")
    @OptionGroup var client: ClientOptions

    func run() throws {
        let m = try client.withClient {
            try $0.unary(
                "/etcdserverpb.Cluster/MemberList", Etcdserverpb_MemberListRequest(),
                as: Etcdserverpb_MemberListResponse.self
            ).wait()
        }
        if client.json {
            print(
                jsonString(
                    m.members.map {
                        [
                            "id": String($0.id, radix: 16), "name": $0.name, "peer_urls": $0.peerUrls,
                            "client_urls": $0.clientUrls, "is_learner": $0.isLearner,
                        ] as [String: Any]
                    }))
            return
        }
        print(
            "ID".padding(toLength: 18, withPad: " ", startingAt: 0)
                + "NAME".padding(toLength: 14, withPad: " ", startingAt: 0)
                + "PEER URLS".padding(toLength: 28, withPad: " ", startingAt: 0) + "CLIENT URLS")
        for x in m.members {
            print(
                String(x.id, radix: 16).padding(toLength: 18, withPad: " ", startingAt: 0)
                    + x.name.padding(toLength: 14, withPad: " ", startingAt: 0)
                    + x.peerUrls.joined(separator: ",").padding(toLength: 28, withPad: " ", startingAt: 0)
                    + x.clientUrls.joined(separator: ",") + (x.isLearner ? "  (learner)" : ""))
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the registry member's status and the cluster's members.")
    @OptionGroup var client: ClientOptions

    func run() throws {
        let (st, members) = try client.withClient {
            c -> (Etcdserverpb_StatusResponse, Etcdserverpb_MemberListResponse) in
            let st = try c.status().wait()
            let m = try c.unary(
                "/etcdserverpb.Cluster/MemberList", Etcdserverpb_MemberListRequest(),
                as: Etcdserverpb_MemberListResponse.self
            ).wait()
            return (st, m)
        }
        if client.json {
            print(
                jsonString([
                    "version": st.version, "leader": String(st.leader, radix: 16), "raft_term": st.raftTerm,
                    "raft_index": st.raftIndex, "revision": st.header.revision,
                    "members": members.members.map {
                        [
                            "id": String($0.id, radix: 16), "name": $0.name, "client_urls": $0.clientUrls,
                            "peer_urls": $0.peerUrls,
                        ]
                    },
                ]))
            return
        }
        print("version \(st.version), raft term \(st.raftTerm), index \(st.raftIndex), revision \(st.header.revision)")
        for m in members.members {
            let leader = m.id == st.leader ? "  (leader)" : ""
            print(
                "member \(String(m.id, radix: 16)) \(m.name): clients \(m.clientUrls.joined(separator: ",")), peers \(m.peerUrls.joined(separator: ","))\(leader)"
            )
        }
    }
}
