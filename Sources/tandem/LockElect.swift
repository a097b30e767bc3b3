import ArgumentParser
import Foundation
import NIOCore
import TandemEtcdClient

/// The first reason given wins; `wait` blocks until there is one.
private final class FirstReason: @unchecked Sendable {
    private let lock = NSLock()
    private let done = DispatchSemaphore(value: 0)
    private var reason: String?

    func finish(_ r: String) {
        lock.lock()
        defer { lock.unlock() }
        guard reason == nil else { return }
        reason = r
        done.signal()
    }

    func wait() -> String {
        done.wait()
        lock.lock()
        defer { lock.unlock() }
        return reason ?? ""
    }
}

/// Blocks until SIGINT or SIGTERM, or until `other` fires; which one happened.
private func waitForSignal(orUntil other: EventLoopFuture<Void>) -> String {
    let first = FirstReason()
    var sources: [any DispatchSourceSignal] = []
    for sig in [SIGINT, SIGTERM] {
        signal(sig, SIG_IGN)
        let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        src.setEventHandler { first.finish(sig == SIGINT ? "SIGINT" : "SIGTERM") }
        src.resume()
        sources.append(src)
    }
    other.whenComplete { _ in first.finish("session lost") }
    let reason = first.wait()
    for s in sources { s.cancel() }
    return reason
}

struct LockCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lock",
        abstract: "Acquire a distributed lock (etcd's recipe: interoperates with etcdctl lock and clientv3).",
        discussion: """
            Waits for the lock, prints its key, and holds it until Ctrl-C or SIGTERM; with a command,
            runs it while holding the lock (ETCD_LOCK_KEY in its environment), then releases the lock
            and exits with the command's code. The lock lives as long as a session lease (--ttl):
            if this process dies, the lock is released when the lease expires.
            """)
    @OptionGroup var client: ClientOptions
    @Option(help: "Session lease TTL in seconds.") var ttl: Int64 = 60
    @Argument(help: "The lock's name (a key prefix).") var name: String
    @Argument(parsing: .captureForPassthrough, help: "A command to run while holding the lock.") var command: [String] =
        []

    func run() throws {
        let command = self.command.first == "--" ? Array(self.command.dropFirst()) : self.command
        let code: Int32 = try client.withClient { c in
            let session = try EtcdSession.start(client: c, ttl: ttl).wait()
            let key = try c.lock(name, session: session).wait()
            defer { _ = try? session.close().wait() }
            guard !command.isEmpty else {
                print(key)
                fflush(nil)
                let why = waitForSignal(orUntil: session.lost)
                if why == "session lost" { throw RuntimeError("the session lease was lost: the lock \(key) is gone") }
                return 0
            }
            var env = ProcessInfo.processInfo.environment
            env["ETCD_LOCK_KEY"] = key
            let app = try AppProcess.spawn(command, environment: env)
            return app.waitForExit()
        }
        if code != 0 { throw ExitCode(code) }
    }
}

struct ElectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "elect",
        abstract: "Campaign in a leader election, or observe one (etcd's recipe: interoperates with etcdctl elect).",
        discussion: """
            `tandem elect NAME PROPOSAL` waits until this process leads NAME, prints the leader key and
            the proposal, and stays leader until Ctrl-C or SIGTERM (resigning: the next candidate takes
            over at once) or until its session lease is lost. `tandem elect --listen NAME` prints the
            leader key and value every time the leadership changes.
            """)
    @OptionGroup var client: ClientOptions
    @Option(help: "Session lease TTL in seconds.") var ttl: Int64 = 60
    @Flag(name: [.customShort("l"), .long], help: "Observe the election instead of campaigning.") var listen = false
    @Argument(help: "The election's name (a key prefix).") var name: String
    @Argument(help: "This candidate's value.") var proposal: String?

    func validate() throws {
        if !listen && proposal == nil { throw ValidationError("give a PROPOSAL to campaign, or --listen to observe") }
    }

    func run() throws {
        try client.withClient { c in
            if listen {
                try observe(c)
                return
            }
            let session = try EtcdSession.start(client: c, ttl: ttl).wait()
            defer { _ = try? session.close().wait() }
            let key = try c.campaign(name, value: Array((proposal ?? "").utf8), session: session).wait()
            print(key)
            print(proposal ?? "")
            fflush(nil)
            if waitForSignal(orUntil: session.lost) == "session lost" {
                throw RuntimeError("the session lease was lost: no longer leader of \(name)")
            }
        }
    }

    /// Prints the leader whenever it changes: read it, wait for its key to go, read again.
    private func observe(_ c: EtcdClient) throws {
        var last: String?
        while true {
            let leader = try c.leader(name).wait()
            if let leader, leader.key != last {
                print(leader.key)
                print(leader.valueString)
                fflush(nil)
                last = leader.key
            }
            let (_, revision) = try c.get(name, prefix: true).wait()
            if let leader {
                try c.waitChange(leader.key, after: revision).wait()
            } else {
                try c.waitChange(name.hasSuffix("/") ? name : name + "/", prefix: true, after: revision).wait()
            }
        }
    }
}
