import Foundation
import NIOConcurrencyHelpers
import NIOCore
import TandemEtcdAPI

/// What an instance publishes under `/tandem/services/<service>/<instance>`.
public struct ServiceInstance: Codable, Sendable, Equatable {
    public var service: String
    public var instance: String
    public var address: String
    public var port: Int
    public var `protocol`: String
    public var zone: String?
    public var metadata: [String: String]
    /// "passing" once the app's health check passes; "critical" while it fails; "starting".
    public var health: String
    /// base64url of the instance sidecar's X25519 proof key, when it checks MAC proofs of
    /// possession (docs/security.md).
    public var proofKey: String?

    enum CodingKeys: String, CodingKey {
        case service, instance, address, port, `protocol`, zone, metadata, health
        case proofKey = "proof_key"
    }

    public init(
        service: String, instance: String, address: String, port: Int, protocol: String = "http",
        zone: String? = nil, metadata: [String: String] = [:], health: String = "starting", proofKey: String? = nil
    ) {
        self.service = service
        self.instance = instance
        self.address = address
        self.port = port
        self.protocol = `protocol`
        self.zone = zone
        self.metadata = metadata
        self.health = health
        self.proofKey = proofKey
    }

    public static func key(service: String, instance: String) -> String { "/tandem/services/\(service)/\(instance)" }
    public static func prefix(service: String) -> String { "/tandem/services/\(service)/" }

    public var key: String { Self.key(service: service, instance: instance) }

    public func encoded() -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return Array((try? enc.encode(self)) ?? Data())
    }

    public static func decode(_ bytes: [UInt8]) -> ServiceInstance? {
        try? JSONDecoder().decode(ServiceInstance.self, from: Data(bytes))
    }
}

/// Keeps one instance registered: a lease kept alive at a third of its TTL, the instance key
/// under it, and re-registration (new lease, same key) if the lease is lost — e.g. after a
/// registry outage longer than the TTL. Loop-confined.
public final class ServiceRegistration: @unchecked Sendable {
    public let client: EtcdClient
    public private(set) var instance: ServiceInstance
    public let ttl: Int64
    public private(set) var leaseID: Int64 = 0
    private var keepAlive: EtcdStream?
    private var timer: RepeatedTask?
    private var stopped = false
    private var lastAck: NIODeadline = .now()
    public var log: @Sendable (String) -> Void = { _ in }

    public init(client: EtcdClient, instance: ServiceInstance, ttl: Int64 = 10) {
        self.client = client
        self.instance = instance
        self.ttl = ttl
    }

    private var loop: any EventLoop { client.loop }

    /// Grants the lease and writes the key; completes when the registry has it.
    /// The ticking starts whatever the first attempt gives: if the registry is unreachable
    /// now, the instance registers once it answers (every second until then).
    public func start() -> EventLoopFuture<Void> {
        loop.flatSubmit {
            self.timer = self.loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
                self.tick()
            }
            self.reregistering = true
            return self.register().always { _ in self.reregistering = false }
        }
    }

    /// Grants a lease and writes the key under it; only then is the lease ours to keep alive
    /// (a grant whose put failed is left to expire, and the next tick starts over).
    private func register() -> EventLoopFuture<Void> {
        client.grantLease(ttl: ttl).flatMap { lease in
            self.client.put(self.instance.key, self.instance.encoded(), lease: lease.id).map { _ in
                self.leaseID = lease.id
                self.lastAck = .now()
                self.openKeepAlive()
                self.log("registered \(self.instance.key) (lease \(String(lease.id, radix: 16)), ttl \(lease.ttl)s)")
            }
        }
    }

    private func openKeepAlive() {
        keepAlive?.cancel()
        keepAlive = nil
        let id = leaseID
        client.openStream(
            "/etcdserverpb.Lease/LeaseKeepAlive",
            onMessage: { [weak self] bytes in
                guard let self, let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes) else { return }
                self.loop.execute {
                    if r.id == self.leaseID {
                        if r.ttl <= 0 { self.leaseLost() } else { self.lastAck = .now() }
                    }
                }
            },
            onClose: { [weak self] _ in
                guard let self else { return }
                self.loop.execute { if self.leaseID == id { self.keepAlive = nil } }
            }
        ).whenComplete { result in
            if case .success(let s) = result {
                if self.stopped || self.leaseID != id { s.cancel() } else { self.keepAlive = s }
            }
        }
    }

    /// Every second: send a keep-alive when a third of the TTL has passed, reopen the stream
    /// if it broke, and re-register when the lease is gone.
    private func tick() {
        guard !stopped, !reregistering else { return }
        guard leaseID > 0 else {
            // Not registered (the registry was unreachable): try again now.
            reregistering = true
            register().whenComplete { r in
                self.reregistering = false
                if case .failure(let e) = r { self.log("registration failed: \(e); retrying") }
            }
            return
        }
        let since = NIODeadline.now() - lastAck
        if since >= .seconds(ttl) {
            leaseLost()
            return
        }
        if keepAlive == nil { openKeepAlive() }
        if since >= .seconds(max(1, ttl / 3)) {
            var req = Etcdserverpb_LeaseKeepAliveRequest()
            req.id = leaseID
            keepAlive?.send(req)
        }
    }

    private var reregistering = false

    private func leaseLost() {
        guard !stopped, !reregistering else { return }
        reregistering = true
        log("lease \(String(leaseID, radix: 16)) lost; registering again")
        leaseID = 0
        register().whenComplete { r in
            self.reregistering = false
            if case .failure(let e) = r { self.log("re-registration failed: \(e); retrying") }
        }
    }

    /// Updates the published record (e.g. health), keeping the lease.
    public func update(_ change: @escaping @Sendable (inout ServiceInstance) -> Void) -> EventLoopFuture<Void> {
        loop.flatSubmit {
            change(&self.instance)
            guard self.leaseID > 0 else { return self.loop.makeSucceededVoidFuture() }
            return self.client.put(self.instance.key, self.instance.encoded(), lease: self.leaseID).map { _ in }
        }
    }

    /// Deletes the key and revokes the lease (clean shutdown).
    public func stop() -> EventLoopFuture<Void> {
        loop.flatSubmit {
            self.stopped = true
            self.timer?.cancel()
            self.keepAlive?.cancel()
            self.keepAlive = nil
            let id = self.leaseID
            return self.client.delete(self.instance.key).flatMap { _ -> EventLoopFuture<Void> in
                id > 0 ? self.client.revokeLease(id) : self.loop.makeSucceededVoidFuture()
            }
        }
    }
}

/// Keeps a live copy of every key under a prefix: an initial range, then a watch from the
/// next revision; on a broken, cancelled or compacted watch it ranges again. Each change
/// delivers the whole current map (key → value). A registry outage keeps the last known
/// copy (nothing is delivered until it is back). Loop-confined.
public final class PrefixWatcher: @unchecked Sendable {
    public let client: EtcdClient
    public let prefix: String
    private let onChange: @Sendable ([String: [UInt8]]) -> Void
    private var values: [String: [UInt8]] = [:]
    private var stream: EtcdStream?
    private var stopped = false
    private var retryDelay: TimeAmount = .milliseconds(200)
    public var log: @Sendable (String) -> Void = { _ in }

    public init(client: EtcdClient, prefix: String, onChange: @escaping @Sendable ([String: [UInt8]]) -> Void) {
        self.client = client
        self.prefix = prefix
        self.onChange = onChange
    }

    private var loop: any EventLoop { client.loop }

    /// Starts; the future completes after the first successful range (or fails with it).
    @discardableResult
    public func start() -> EventLoopFuture<Void> {
        loop.flatSubmit { self.resync() }
    }

    private func resync() -> EventLoopFuture<Void> {
        guard !stopped else { return loop.makeSucceededVoidFuture() }
        let f = client.get(prefix, prefix: true).map { (kvs, revision) in
            self.retryDelay = .milliseconds(200)
            self.values = Dictionary(kvs.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 })
            self.onChange(self.values)
            self.openWatch(from: revision + 1)
        }
        f.whenFailure { e in
            self.log("watching \(self.prefix) failed (\(e)); keeping the \(self.values.count) known keys")
            self.scheduleResync()
        }
        return f
    }

    private func scheduleResync() {
        let d = retryDelay
        retryDelay = min(retryDelay * 2, .seconds(5))
        loop.scheduleTask(in: d) { _ = self.resync() }
    }

    private func openWatch(from revision: Int64) {
        guard !stopped else { return }
        client.openStream(
            "/etcdserverpb.Watch/Watch",
            onMessage: { [weak self] bytes in
                guard let self, let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                self.loop.execute { self.handle(r) }
            },
            onClose: { [weak self] _ in
                guard let self else { return }
                self.loop.execute {
                    self.stream = nil
                    if !self.stopped { self.scheduleResync() }
                }
            }
        ).whenComplete { result in
            switch result {
            case .success(let s):
                if self.stopped {
                    s.cancel()
                    return
                }
                self.stream = s
                var create = Etcdserverpb_WatchCreateRequest()
                create.key = Data(self.prefix.utf8)
                create.rangeEnd = Data(prefixRangeEnd(Array(self.prefix.utf8)))
                create.startRevision = revision
                var req = Etcdserverpb_WatchRequest()
                req.createRequest = create
                s.send(req)
            case .failure:
                self.scheduleResync()
            }
        }
    }

    private func handle(_ r: Etcdserverpb_WatchResponse) {
        if r.canceled || r.compactRevision > 0 {
            stream?.cancel()  // onClose resyncs
            return
        }
        guard !r.events.isEmpty else { return }
        for e in r.events {
            let key = String(decoding: e.kv.key, as: UTF8.self)
            switch e.type {
            case .put: values[key] = Array(e.kv.value)
            case .delete: values.removeValue(forKey: key)
            default: break
            }
        }
        onChange(values)
    }

    public func stop() {
        loop.execute {
            self.stopped = true
            self.stream?.cancel()
            self.stream = nil
        }
    }
}

/// Watches one service's instances under `/tandem/services/<service>/` (a PrefixWatcher
/// that decodes each value as a ServiceInstance; undecodable values are skipped).
public final class ServiceWatcher: Sendable {
    public let service: String
    private let watcher: PrefixWatcher

    public init(client: EtcdClient, service: String, onChange: @escaping @Sendable ([ServiceInstance]) -> Void) {
        self.service = service
        watcher = PrefixWatcher(client: client, prefix: ServiceInstance.prefix(service: service)) { values in
            onChange(values.values.compactMap(ServiceInstance.decode).sorted { $0.instance < $1.instance })
        }
    }

    public var log: @Sendable (String) -> Void {
        get { watcher.log }
        set { watcher.log = newValue }
    }

    @discardableResult
    public func start() -> EventLoopFuture<Void> { watcher.start() }

    public func stop() { watcher.stop() }
}
