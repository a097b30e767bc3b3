import Foundation
import Synchronization
import Testing

/// A free TCP port on 127.0.0.1 below the kernel's ephemeral range (32768–60999 here), for a
/// process a test starts later. A port the kernel picks (bind to 0) comes from that range, and
/// until the process binds it the kernel may hand the same port to an outgoing connection as
/// its source port (the sidecars open many), so the process then fails with "Address already
/// in use". Ports are tried in sequence from a start that differs per test process, and one
/// that cannot be bound now is skipped.
func freePort() throws -> Int {
    for _ in 0..<portSpan {
        let port = nextPortCandidate.withLock { n -> Int in
            defer { n = (n + 1) % portSpan }
            return portBase + n
        }
        if canBind(port) { return port }
    }
    throw TestFailure("could not pick a free port")
}

private let portBase = 20_000
private let portSpan = 12_000
private let nextPortCandidate = Mutex(Int(getpid()) * 97 % portSpan)

private func canBind(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = UInt16(port).bigEndian
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
        }
    }
}

/// Three `tandem registry` processes forming one cluster, each killable and restartable.
final class ClusterUnderTest {
    let dir: TempDirectory
    var names: [String]
    var clientPorts: [Int] = []
    var peerPorts: [Int] = []
    var children: [String: Child] = [:]
    let extra: [String]

    init(members: Int = 3, extra: [String] = []) throws {
        dir = try TempDirectory()
        names = (1...members).map { "r\($0)" }
        self.extra = extra
        for _ in names {
            clientPorts.append(try freePort())
            peerPorts.append(try freePort())
        }
        for n in names { try start(n) }
    }

    var initialCluster: String {
        zip(names, peerPorts).map { "\($0)=http://127.0.0.1:\($1)" }.joined(separator: ",")
    }

    func endpoint(_ n: String) -> String { "127.0.0.1:\(clientPorts[names.firstIndex(of: n)!])" }
    var endpoints: String { names.map(endpoint).joined(separator: ",") }

    /// A new member: `etcdctl member add` (a learner if asked), then the member started with
    /// `--initial-cluster-state existing`. Returns its id (hex) and its start-up lines.
    func join(_ n: String, learner: Bool) throws -> (id: String, lines: [String]) {
        let peer = try freePort()
        var args = ["member", "add", n, "--peer-urls=http://127.0.0.1:\(peer)"]
        if learner { args.append("--learner") }
        let added = try etcdctl(endpoints, args)
        guard added.status == 0, let id = added.output.split(separator: " ").dropFirst().first else {
            throw TestFailure("member add failed: \(added.output)")
        }
        names.append(n)
        clientPorts.append(try freePort())
        peerPorts.append(peer)
        return (String(id), try start(n, ["--initial-cluster-state", "existing"]))
    }

    @discardableResult
    func start(_ n: String, _ more: [String] = []) throws -> [String] {
        let i = names.firstIndex(of: n)!
        let c = try Child(
            tandemBinary(),
            [
                "registry", "--name", n, "--data-dir", dir.url.appendingPathComponent(n).path,
                "--listen-client-urls", "http://127.0.0.1:\(clientPorts[i])",
                "--listen-peer-urls", "http://127.0.0.1:\(peerPorts[i])", "--initial-cluster", initialCluster,
            ] + extra + more)
        let lines = c.readUntil { $0.contains("serving clients on") }
        children[n] = c
        return lines
    }

    func kill9(_ n: String) { children[n]?.stop() }

    /// The member that currently leads, as `endpoint status` reports it (bounded polling).
    func leader(among: [String]? = nil) throws -> String {
        for _ in 0..<400 {
            for n in among ?? names where children[n]?.process.isRunning == true {
                let s = try etcdctl(endpoint(n), ["endpoint", "status", "--command-timeout=500ms"]).output
                if s.contains(", true, false, ") { return n }
            }
        }
        throw TestFailure("no leader was elected")
    }
}

@Suite("A tandem registry cluster of real processes (3 or 5 members)", .serialized)
struct ClusterTests {
    @Test("kill -9 the leader under writes; acknowledged writes survive it, restarts and catch-up by snapshot")
    func failover() throws {
        let c = try ClusterUnderTest(extra: ["--snapshot-count", "20", "--snapshot-catchup-entries", "5"])
        let first = try c.leader()
        var acked: [String: String] = [:]
        func put(_ k: String, _ v: String, _ endpoints: String) throws -> Bool {
            let r = try etcdctl(endpoints, ["put", k, v, "--command-timeout=300ms"])
            if r.status == 0 { acked[k] = v }
            return r.status == 0
        }
        for i in 0..<30 { #expect(try put("k\(i)", "v\(i)", c.endpoints)) }
        // Kill the leader and keep writing through the survivors.
        c.kill9(first)
        let survivors = c.names.filter { $0 != first }
        let live = survivors.map(c.endpoint).joined(separator: ",")
        let killedAt = ContinuousClock.now
        var resumedAfter: Duration?
        var i = 30
        while acked.count < 80 && i < 1_000 {
            if try put("k\(i)", "v\(i)", live), resumedAfter == nil { resumedAfter = ContinuousClock.now - killedAt }
            i += 1
        }
        // Measured, not asserted (speed belongs in bench/): printed for the notes.
        print("failover: first acknowledged write \(resumedAfter.map { "\($0)" } ?? "never") after kill -9")
        #expect(resumedAfter != nil)
        #expect(try c.leader(among: survivors) != first)
        func readAll(_ ep: String, serializable: Bool = false) throws -> [String: String] {
            var args = ["get", "--prefix", "k"]
            if serializable { args.append("--consistency=s") }
            let lines = try etcdctl(ep, args).output.split(separator: "\n").map(String.init)
            var out: [String: String] = [:]
            var j = 0
            while j + 1 < lines.count {
                out[lines[j]] = lines[j + 1]
                j += 2
            }
            return out
        }
        // Every acknowledged write is readable (some unacknowledged ones may be too).
        var seen = try readAll(live)
        for (k, v) in acked { #expect(seen[k] == v, "acknowledged write \(k)=\(v) is missing") }
        // 400 KiB more while it is down, so the snapshot it needs is larger than a peer frame
        // piece (PeerTransport.chunkBytes, 256 KiB): it travels in pieces, between heartbeats.
        let value = String(repeating: "x", count: 1_024)
        for t in 0..<4 {
            let ops = (0..<100).map { "put bulk/\(t)-\($0) \(value)" }.joined(separator: "\n")
            let r = try etcdctl(live, ["txn"], stdin: "\n" + ops + "\n\n\n")
            #expect(r.status == 0 && r.output.hasPrefix("SUCCESS"), "\(r.output.prefix(200))")
        }
        // Enough entries after it that the leader's newest snapshot holds the bulk.
        for j in 0..<25 {
            var ok = false
            for _ in 0..<20 where !ok { ok = try put("k-after-\(j)", "v", live) }
            #expect(ok)
        }
        // The killed member, far behind the compacted log, catches up by snapshot.
        try c.start(first)
        let log = c.children[first]!.readUntil { $0.contains("installed a snapshot") }
        #expect(log.last?.contains("installed a snapshot from the leader") == true)
        // Larger than one piece: it came in several (the only way a frame that size is sent).
        let kib = log.last.flatMap { $0.split(separator: "(").last?.split(separator: " ").first }.flatMap { Int($0) }
        #expect((kib ?? 0) > 256, "\(log.last ?? "")")
        var caughtUp = false
        for _ in 0..<400 where !caughtUp {
            caughtUp = try readAll(c.endpoint(first), serializable: true).count >= acked.count
        }
        #expect(caughtUp)
        let bulk = try etcdctl(c.endpoint(first), ["get", "--prefix", "bulk/", "--keys-only", "--consistency=s"]).output
        #expect(bulk.split(separator: "\n").filter { $0.hasPrefix("bulk/") }.count == 400, "\(bulk.prefix(300))")
        // Restart every member: still every acknowledged write.
        for n in c.names { c.kill9(n) }
        for n in c.names { try c.start(n) }
        _ = try c.leader()
        seen = try readAll(c.endpoints)
        for (k, v) in acked { #expect(seen[k] == v, "after restarting all: \(k)=\(v) is missing") }
        #expect(acked.count >= 80)
    }

    /// Members publish their names and client URLs through Raft, so any member lists every
    /// member's client URLs (they used to show only their own) — without touching the key
    /// space: the store's revision does not move and no key appears.
    @Test("every member lists every member's name and client URLs; publishing them moves no revision")
    func memberRecords() throws {
        let c = try ClusterUnderTest()
        _ = try c.leader()
        for n in c.names {
            // Publication is asynchronous after start: bounded polling until all three show.
            var listed = ""
            for _ in 0..<100 {
                listed = try etcdctl(c.endpoint(n), ["member", "list"]).output
                if c.names.allSatisfy({ listed.contains("http://\(c.endpoint($0))") }) { break }
            }
            for (i, m) in c.names.enumerated() {
                #expect(
                    listed.contains(
                        ", started, \(m), http://127.0.0.1:\(c.peerPorts[i]), http://\(c.endpoint(m)), false"),
                    "\(n): \(listed)")
            }
        }
        // A fresh cluster's store is still at revision 1 with no keys.
        let status = try etcdctl(c.endpoints, ["get", "--prefix", "", "-w", "json"]).output
        #expect(status.contains(#""revision":1"#) && !status.contains(#""kvs""#), "\(status)")
    }

    /// etcd's --strict-reconfig-check (on by default): voters added but never started count
    /// against the quorum, so the third such addition to a 3-member cluster is refused with
    /// etcd's error — writes go on (3 of 5 started) — and removing one that never started is
    /// allowed.
    @Test("member add refused when started members would fall below the quorum (strict reconfig check)")
    func strictReconfigCheck() throws {
        let c = try ClusterUnderTest()
        _ = try c.leader()
        func add(_ name: String) throws -> (status: Int32, output: String) {
            try etcdctl(c.endpoints, ["member", "add", name, "--peer-urls=http://127.0.0.1:\(try freePort())"])
        }
        let x = try add("x")
        #expect(x.status == 0 && x.output.contains("Member"), "\(x.output)")  // 3 started of 4
        #expect(try add("y").status == 0)  // 3 started of 5: still a quorum
        let z = try add("z")  // 3 started of 6: not a quorum
        #expect(z.status != 0, "\(z.output)")
        #expect(
            z.output.contains("etcdserver: re-configuration failed due to not enough started members"), "\(z.output)")
        #expect(try etcdctl(c.endpoints, ["put", "still", "writable"]).output == "OK\n")
        let list = try etcdctl(c.endpoints, ["member", "list"]).output
        #expect(list.split(separator: "\n").count == 5 && !list.contains("z"), "\(list)")
        let xid = try #require(
            list.split(separator: "\n").first { $0.contains(", unstarted, ") }?.split(separator: ",").first)
        let removed = try etcdctl(c.endpoints, ["member", "remove", String(xid)])
        #expect(removed.status == 0, "\(removed.output)")
    }

    /// etcd's runtime reconfiguration with etcdctl: add a learner, start it against the running
    /// cluster, promote it, remove a member (which then stops), restart members whose
    /// --initial-cluster now lists the newcomer — and etcd's errors for the wrong requests.
    @Test("member add --learner, join with --initial-cluster-state existing, promote, remove; etcd's errors")
    func membershipChanges() throws {
        let c = try ClusterUnderTest()
        _ = try c.leader()
        #expect(try etcdctl(c.endpoints, ["put", "before", "1"]).output == "OK\n")
        // Joining without `member add` first: one clear line, a non-zero exit.
        let stranger = try Child(
            tandemBinary(),
            [
                "registry", "--name", "r9", "--data-dir", c.dir.url.appendingPathComponent("r9").path,
                "--listen-client-urls", "http://127.0.0.1:\(try freePort())", "--listen-peer-urls",
                "http://127.0.0.1:\(try freePort())", "--initial-cluster-state", "existing", "--initial-cluster",
                c.initialCluster + ",r9=http://127.0.0.1:1",
            ])
        let refusal = stranger.readUntil { _ in false }
        stranger.process.waitUntilExit()
        #expect(stranger.process.terminationStatus != 0)
        #expect(
            refusal.contains { $0.contains("is not in the cluster") && $0.contains("etcdctl member add") }, "\(refusal)"
        )
        let (id, lines) = try c.join("r4", learner: true)
        #expect(lines.contains { $0.contains("joined cluster") && $0.contains("as member \(id)") }, "\(lines)")
        // The learner receives the log: a serializable read on it sees the earlier write.
        var seen = ""
        for _ in 0..<100 where seen != "1\n" {
            seen = try etcdctl(c.endpoint("r4"), ["get", "before", "--print-value-only", "--consistency=s"]).output
        }
        #expect(seen == "1\n")
        // Anything else is refused on a learner, with etcd's error (clients try another member).
        let onLearner = try etcdctl(c.endpoint("r4"), ["put", "x", "1"]).output
        #expect(onLearner.contains("etcdserver: rpc not supported for learner"), "\(onLearner)")
        // Its name and client URL appear once it has published them (bounded polling).
        let learnerLine = "\(id), started, r4, http://127.0.0.1:\(c.peerPorts[3]), http://\(c.endpoint("r4")), true"
        var list = ""
        for _ in 0..<100 where !list.contains(learnerLine) {
            list = try etcdctl(c.endpoints, ["member", "list"]).output
        }
        #expect(list.contains(learnerLine), "\(list)")
        // Promote it (bounded retries while it is still catching up: etcd's "in sync" error).
        var promoted = (status: Int32(1), output: "")
        for _ in 0..<50 where promoted.status != 0 {
            promoted = try etcdctl(c.endpoints, ["member", "promote", id])
        }
        // etcdctl prints ids with %16x here: padded with spaces when they have fewer digits.
        func padded(_ hex: some StringProtocol) -> String {
            String(repeating: " ", count: max(0, 16 - hex.count)) + hex
        }
        #expect(promoted.output.contains("Member \(padded(id)) promoted"), "\(promoted.output)")
        #expect(try etcdctl(c.endpoints, ["member", "list"]).output.contains("\(id), started, r4, "))
        // etcd's errors, word for word.
        let voter = try etcdctl(c.endpoints, ["member", "promote", id]).output
        #expect(voter.contains("etcdserver: can only promote a learner member"), "\(voter)")
        let taken = try etcdctl(c.endpoints, ["member", "add", "x", "--peer-urls=http://127.0.0.1:\(c.peerPorts[0])"])
        #expect(taken.status != 0 && taken.output.contains("etcdserver: Peer URLs already exists"), "\(taken.output)")
        let unknown = try etcdctl(c.endpoints, ["member", "remove", "1234"]).output
        #expect(unknown.contains("etcdserver: member not found"), "\(unknown)")
        // Remove r1: it learns of it and stops; the other three go on.
        list = try etcdctl(c.endpoints, ["member", "list"]).output
        let r1 = try #require(list.split(separator: "\n").first { $0.contains(", r1, ") }?.split(separator: ",").first)
        let removed = try etcdctl(c.endpoints, ["member", "remove", String(r1)]).output
        #expect(removed.contains("Member \(padded(r1)) removed"), "\(removed)")
        let tail = c.children["r1"]!.readUntil { _ in false }  // to EOF: the process ends
        c.children["r1"]!.process.waitUntilExit()
        #expect(tail.contains { $0.contains("this member was removed from the cluster; stopping") }, "\(tail)")
        let rest = ["r2", "r3", "r4"].map(c.endpoint).joined(separator: ",")
        let after = try etcdctl(rest, ["put", "after", "2"]).output
        #expect(after == "OK\n", "\(after)")
        list = try etcdctl(rest, ["member", "list"]).output
        #expect(list.split(separator: "\n").count == 3 && !list.contains(", r1, "), "\(list)")
        // Restarts: r2's --initial-cluster now names r4 too, and r4 keeps the id it was given;
        // both start from the membership saved at their first start.
        for n in ["r2", "r4"] {
            c.kill9(n)
            let again = try c.start(n)
            #expect(!again.contains { $0.contains("joined cluster") }, "\(again)")
        }
        #expect(try etcdctl(c.endpoint("r4"), ["endpoint", "status"]).output.contains(", \(id), "))
        var ok = false
        for _ in 0..<50 where !ok {
            ok = try etcdctl(rest, ["put", "restarted", "3", "--command-timeout=500ms"]).status == 0
        }
        #expect(ok)
        let all = try etcdctl(rest, ["get", "--prefix", ""]).output
        for kv in ["before\n1", "after\n2", "restarted\n3"] { #expect(all.contains(kv), "\(all)") }
    }

    /// Five members survive two failures, not three; acknowledged writes survive all of it.
    @Test("five members: writes go on with two members down (the leader among them), stop without a majority, resume")
    func fiveMembers() throws {
        let c = try ClusterUnderTest(members: 5)
        let first = try c.leader()
        #expect(try etcdctl(c.endpoints, ["put", "a", "1"]).output == "OK\n")
        let second = c.names.first { $0 != first }!
        c.kill9(first)
        c.kill9(second)
        let alive = c.names.filter { $0 != first && $0 != second }
        let live = alive.map(c.endpoint).joined(separator: ",")
        _ = try c.leader(among: alive)
        var ok = false
        for _ in 0..<50 where !ok {  // bounded: the survivors elect a leader, then take writes
            ok = try etcdctl(live, ["put", "b", "2", "--command-timeout=500ms"]).status == 0
        }
        #expect(ok)
        #expect(try etcdctl(live, ["get", "a", "--print-value-only"]).output == "1\n")
        // A third failure leaves two of five: no majority, so no write is acknowledged.
        let third = alive[0]
        c.kill9(third)
        let two = alive.dropFirst().map(c.endpoint).joined(separator: ",")
        let refused = try etcdctl(two, ["put", "c", "3", "--command-timeout=1500ms"])
        #expect(refused.status != 0, "\(refused.output)")
        // One member back: a majority again, and everything acknowledged is there.
        try c.start(third)
        let back = alive.map(c.endpoint).joined(separator: ",")
        ok = false
        for _ in 0..<50 where !ok {
            ok = try etcdctl(back, ["put", "d", "4", "--command-timeout=500ms"]).status == 0
        }
        #expect(ok)
        let all = try etcdctl(back, ["get", "--prefix", ""]).output
        for kv in ["a\n1", "b\n2", "d\n4"] { #expect(all.contains(kv), "\(all)") }
    }

    @Test("a follower serves linearizable reads and forwards writes and lease keep-alives")
    func followers() throws {
        let c = try ClusterUnderTest()
        let leader = try c.leader()
        let follower = c.endpoint(c.names.first { $0 != leader }!)
        #expect(try etcdctl(follower, ["put", "f", "1"]).output == "OK\n")
        #expect(try etcdctl(c.endpoint(leader), ["get", "f", "--print-value-only"]).output == "1\n")
        #expect(try etcdctl(follower, ["get", "f", "--print-value-only"]).output == "1\n")
        let grant = try etcdctl(follower, ["lease", "grant", "30"]).output
        let id = try #require(grant.split(separator: " ").dropFirst().first.map(String.init))
        let ka = try etcdctlChild(follower, ["lease", "keep-alive", id])
        #expect(ka.readLine() == "lease \(id) keepalived with TTL(30)")
        let members = try etcdctl(follower, ["member", "list"]).output
        for n in c.names { #expect(members.contains(", started, \(n), ")) }
    }

    @Test("a watch that requires a leader (etcdctl's) ends with 'no leader' on a member cut off from the rest")
    func hasLeaderWatches() throws {
        // Default timings (100 ms heartbeat, 1 s election timeout): shorter ones churn
        // leaders when the machine is busy running every other test at once.
        let c = try ClusterUnderTest()
        _ = try c.leader()
        let member = "r1"
        // Bounded by `timeout`: if the server never ended the watch, the test fails instead of hanging.
        func boundedWatch() throws -> Child {
            // From revision 1: the put is seen whether the watch is set up before it or after.
            try Child(
                "/usr/bin/timeout",
                ["30", "/usr/bin/etcdctl", "--endpoints", c.endpoint(member), "watch", "--rev", "1", "k"])
        }
        let watch = try boundedWatch()
        #expect(try eventually { try etcdctl(c.endpoint(member), ["put", "k", "v"]).output == "OK\n" })
        #expect(watch.readLine() == "PUT")
        #expect(watch.readLine() == "k")
        #expect(watch.readLine() == "v")
        // The other two die: r1 has no leader; after three election timeouts (etcd's
        // monitorLeader) the watch ends with etcd's error, so the client can go elsewhere.
        c.kill9("r2")
        c.kill9("r3")
        let rest = watch.readUntil { $0.contains("canceled") }
        #expect(rest.last == "watch was canceled (etcdserver: no leader)", "\(rest)")
        watch.process.waitUntilExit()
        #expect(watch.process.terminationStatus != 0)
        // A new watch that requires a leader is refused at once while there is none.
        let again = try boundedWatch()
        #expect(again.readUntil { $0.contains("canceled") }.last == "watch was canceled (etcdserver: no leader)")
    }
}
