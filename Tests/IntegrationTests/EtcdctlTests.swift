import Foundation
import Testing

/// A real `tandem registry` process driven by Debian's etcdctl 3.4, outputs checked.
@Suite("etcdctl 3.4 against a tandem registry process", .serialized)
struct EtcdctlTests {
    @Test("put, get (--prefix, --rev, --keys-only, --consistency=s, -w json), del --prefix", arguments: [1, 3])
    func keyValue(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        let e = r.endpoint
        #expect(try etcdctl(e, ["put", "foo", "bar"]) == (0, "OK\n"))
        #expect(try etcdctl(e, ["get", "foo"]).output == "foo\nbar\n")
        try etcdctl(e, ["put", "/svc/a", "1"])
        try etcdctl(e, ["put", "/svc/b", "2"])
        #expect(try etcdctl(e, ["get", "--prefix", "/svc/"]).output == "/svc/a\n1\n/svc/b\n2\n")
        #expect(try etcdctl(e, ["get", "--prefix", "/svc/", "--keys-only"]).output == "/svc/a\n\n/svc/b\n\n")
        try etcdctl(e, ["put", "foo", "baz"])
        // foo was first written at revision 2.
        #expect(try etcdctl(e, ["get", "foo", "--rev=2", "--print-value-only"]).output == "bar\n")
        #expect(try etcdctl(e, ["get", "foo", "--consistency=s", "--print-value-only"]).output == "baz\n")
        let json = try etcdctl(e, ["get", "foo", "-w", "json"]).output
        #expect(
            json.contains("\"revision\":5") && json.contains("\"version\":2") && json.contains("\"create_revision\":2"))
        #expect(try etcdctl(e, ["del", "--prefix", "/svc/"]).output == "2\n")
        #expect(try etcdctl(e, ["get", "--prefix", "/svc/"]).output == "")
    }

    @Test("txn with compares, success and failure branches", arguments: [1, 3])
    func txn(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        try etcdctl(r.endpoint, ["put", "k", "v1"])
        let ok = try etcdctl(r.endpoint, ["txn"], stdin: "value(\"k\") = \"v1\"\n\nput k v2\n\nput k nope\n\n")
        #expect(ok.output == "SUCCESS\n\nOK\n")
        let fail = try etcdctl(r.endpoint, ["txn"], stdin: "value(\"k\") = \"v1\"\n\nput k v3\n\nget k\n\n")
        #expect(fail.output == "FAILURE\n\nk\nv2\n")
    }

    @Test("watch --rev replays history with --prev-kv, then follows live writes", arguments: [1, 3])
    func watch(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        try etcdctl(r.endpoint, ["put", "w", "a"])  // rev 2
        try etcdctl(r.endpoint, ["put", "w", "b"])  // rev 3
        let w = try etcdctlChild(r.endpoint, ["watch", "w", "--rev=3", "--prev-kv"])
        // History first: PUT w b with prev w a (no timing involved: it is replayed from rev 3).
        #expect(w.readUntil { $0 == "b" } == ["PUT", "w", "a", "w", "b"])
        try etcdctl(r.endpoint, ["put", "w", "c"])
        #expect(w.readUntil { $0 == "c" } == ["PUT", "w", "b", "w", "c"])
        try etcdctl(r.endpoint, ["del", "w"])
        // A delete prints its previous value, then the key with an empty value.
        #expect(w.readUntil { $0 == "c" } == ["DELETE", "w", "c"])
        #expect(w.readLine() == "w")
        #expect(w.readLine() == "")
    }

    @Test("lease grant, keep-alive, timetolive --keys, list, revoke (keys go with it)", arguments: [1, 3])
    func leases(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        let e = r.endpoint
        let grant = try etcdctl(e, ["lease", "grant", "60"]).output
        let id = try #require(grant.split(separator: " ").dropFirst().first.map(String.init))
        #expect(grant == "lease \(id) granted with TTL(60s)\n")
        try etcdctl(e, ["put", "--lease=\(id)", "/tandem/services/users/i1", "{}"])
        // Every member answers, followers included: the remaining time comes from the
        // leader's lease clock (a follower's own would say -1).
        for member in e.split(separator: ",").map(String.init) {
            let ttl = try etcdctl(member, ["lease", "timetolive", id, "--keys"]).output
            #expect(ttl.contains("granted with TTL(60s), remaining(60s)") || ttl.contains("remaining(59s)"), "\(ttl)")
            #expect(ttl.hasSuffix("attached keys([/tandem/services/users/i1])\n"))
        }
        #expect(try etcdctl(e, ["lease", "list"]).output == "found 1 leases\n\(id)\n")
        let ka = try etcdctlChild(e, ["lease", "keep-alive", id])
        #expect(ka.readLine() == "lease \(id) keepalived with TTL(60)")
        ka.stop()
        #expect(try etcdctl(e, ["lease", "revoke", id]).output == "lease \(id) revoked\n")
        #expect(try etcdctl(e, ["get", "/tandem/services/users/i1"]).output == "")
        #expect(try etcdctl(e, ["lease", "timetolive", id]).output == "lease \(id) already expired\n")
    }

    @Test("lock: a second holder waits until the first releases (mutual exclusion)", arguments: [1, 3])
    func lock(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        let e = r.endpoint
        // Holder 1 holds the lock while its command waits on a FIFO we control
        // (etcdctl runs the command with stdin closed).
        let fifo = r.dir.url.appendingPathComponent("release").path
        #expect(mkfifo(fifo, 0o600) == 0)
        let h1 = try etcdctlChild(e, ["lock", "jobs", "--", "sh", "-c", "echo h1 holds; cat < \(fifo); echo h1 done"])
        #expect(h1.readLine() == "h1 holds")
        let h2 = try etcdctlChild(e, ["lock", "jobs", "--", "echo", "h2 holds"])
        // Wait (bounded, no sleeping) until h2 has queued its key behind h1's.
        var queued = false
        for _ in 0..<500 where !queued {
            let keys = try etcdctl(e, ["get", "--prefix", "jobs/", "--keys-only"]).output
            queued = keys.split(separator: "\n").filter { $0.hasPrefix("jobs/") }.count == 2
        }
        #expect(queued)
        #expect(h2.process.isRunning)  // h2 is blocked: h1 still holds the lock
        // Release: opening the FIFO for writing and closing it gives cat its EOF.
        let w = open(fifo, O_WRONLY)
        #expect(w >= 0)
        close(w)
        #expect(h1.readLine() == "h1 done")
        #expect(h2.readLine() == "h2 holds")
    }

    @Test("elect: a campaigner becomes leader and an observer sees it", arguments: [1, 3])
    func elect(members: Int) throws {
        let r = try RegistryUnderTest(members: members)
        let c = try etcdctlChild(r.endpoint, ["elect", "svc-leader", "alice"])
        let lines = c.readUntil { $0 == "alice" }
        #expect(lines.first?.hasPrefix("svc-leader/") == true && lines.last == "alice")
        let observer = try etcdctlChild(r.endpoint, ["elect", "-l", "svc-leader"])
        #expect(observer.readUntil { $0 == "alice" }.last == "alice")
    }

    @Test("member list, endpoint status, endpoint health, compaction and its exact error")
    func cluster() throws {
        let r = try RegistryUnderTest()
        let e = r.endpoint
        let members = try etcdctl(e, ["member", "list"]).output
        #expect(members.contains(", started, default, http://127.0.0.1:2380, http://\(e), false"))
        let status = try etcdctl(e, ["endpoint", "status"]).output
        #expect(status.hasPrefix("\(e), ") && status.contains(", 3.4.0, ") && status.contains(", true, false, "))
        let health = try etcdctl(e, ["endpoint", "health"])
        #expect(health.status == 0 && health.output.contains("\(e) is healthy"))
        for v in ["1", "2", "3"] { try etcdctl(e, ["put", "c", v]) }
        #expect(try etcdctl(e, ["compaction", "3"]).output == "compacted revision 3\n")
        let old = try etcdctl(e, ["get", "c", "--rev=2"])
        #expect(old.status != 0)
        #expect(old.output.contains("Error: etcdserver: mvcc: required revision has been compacted"))
    }
}
