import Foundation
import Testing

/// `tandem lock` and `tandem elect` use etcd's clientv3 recipes, so they contend with
/// `etcdctl lock` / `etcdctl elect` for the same locks and elections (the seed's chapter 4.4).
@Suite(.serialized) struct LockElectTests {
    @Test func locksAreMutuallyExclusiveAcrossTandemAndEtcdctl() throws {
        let reg = try RegistryUnderTest(members: 1)
        let dir = try TempDirectory()
        let log = dir.url.appendingPathComponent("critical.log").path
        // Each holder writes start/end around a short critical section; any overlap between
        // holders (of either implementation) would interleave the lines.
        func section(_ who: String) -> [String] {
            ["sh", "-c", "echo start \(who) >> \(log); sleep 0.2; echo end \(who) >> \(log)"]
        }
        var children: [Child] = []
        for i in 0..<3 {
            children.append(
                try Child(
                    tandemBinary(), ["lock", "--endpoints", reg.endpoint, "shared", "--"] + section("tandem\(i)")))
            children.append(try etcdctlChild(reg.endpoint, ["lock", "shared", "--"] + section("etcdctl\(i)")))
        }
        for c in children { c.process.waitUntilExit() }
        for c in children { #expect(c.process.terminationStatus == 0) }
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(lines.count == 12, "\(lines)")
        for pair in stride(from: 0, to: lines.count - 1, by: 2) {
            let who = lines[pair].dropFirst("start ".count)
            #expect(lines[pair].hasPrefix("start ") && lines[pair + 1] == "end \(who)", "\(lines)")
        }
        // Every holder released: no key is left under the lock.
        #expect(try etcdctl(reg.endpoint, ["get", "--prefix", "shared/"]).output.isEmpty)
        withExtendedLifetime((reg, dir)) {}
    }

    @Test func aHeldLockPrintsItsKeyAndIsReleasedOnSigint() throws {
        let reg = try RegistryUnderTest(members: 1)
        let holder = try Child(tandemBinary(), ["lock", "--endpoints", reg.endpoint, "mylock"])
        let key = holder.readLine() ?? ""
        #expect(key.hasPrefix("mylock/"), "\(key)")
        // etcdctl queues behind it (its key appears under the prefix), then gets it on release.
        let waiter = try etcdctlChild(reg.endpoint, ["lock", "mylock"])
        #expect(
            try eventually {
                try etcdctl(reg.endpoint, ["get", "--prefix", "mylock/", "--keys-only"]).output
                    .split(separator: "\n").filter { !$0.isEmpty }.count == 2
            })
        kill(holder.process.processIdentifier, SIGINT)
        holder.process.waitUntilExit()
        #expect(holder.process.terminationStatus == 0)
        let next = waiter.readLine() ?? ""
        #expect(next.hasPrefix("mylock/") && next != key, "\(next)")
        withExtendedLifetime((reg, waiter)) {}
    }

    @Test func electionsFailOverBetweenEtcdctlAndTandemAndCanBeObserved() throws {
        let reg = try RegistryUnderTest(members: 1)
        let first = try etcdctlChild(reg.endpoint, ["elect", "leader", "p1"])
        let firstKey = first.readLine() ?? ""
        #expect(first.readLine() == "p1")
        let observer = try Child(tandemBinary(), ["elect", "--endpoints", reg.endpoint, "--listen", "leader"])
        #expect(observer.readLine() == firstKey)
        #expect(observer.readLine() == "p1")
        let second = try Child(tandemBinary(), ["elect", "--endpoints", reg.endpoint, "leader", "p2"])
        #expect(
            try eventually {
                try etcdctl(reg.endpoint, ["get", "--prefix", "leader/", "--keys-only"]).output
                    .split(separator: "\n").filter { !$0.isEmpty }.count == 2
            })
        kill(first.process.processIdentifier, SIGINT)  // resigns: its key goes
        let secondKey = second.readLine() ?? ""
        #expect(secondKey.hasPrefix("leader/") && secondKey != firstKey)
        #expect(second.readLine() == "p2")
        #expect(observer.readLine() == secondKey)
        #expect(observer.readLine() == "p2")
        // etcdctl agrees on who leads (the oldest key under the election).
        let keys = try etcdctl(reg.endpoint, ["get", "--prefix", "leader/", "--keys-only", "--sort-by=CREATE"]).output
        #expect(keys.split(separator: "\n").first.map(String.init) == secondKey, "\(keys)")
        withExtendedLifetime((reg, first, second, observer)) {}
    }
}

/// etcd's backend quota: writes past `--quota-backend-bytes` are refused with etcd's exact
/// error (clientv3 maps it to ErrNoSpace), the NOSPACE alarm shows on every member, stays up
/// after space is reclaimed (writes still refused), and deleting, compacting and disarming —
/// etcd's runbook — brings writes back. Three members: the alarm is replicated.
@Suite struct BackendQuotaTests {
    @Test func writesPastTheQuotaAreRefusedUntilSpaceIsReclaimed() throws {
        let reg = try RegistryUnderTest(members: 3, extra: ["--quota-backend-bytes", "20000"])
        let value = String(repeating: "v", count: 1000)
        var refused: (Int, String)?
        for i in 1...40 {
            let r = try etcdctl(reg.endpoint, ["put", "k\(i)", value])
            if r.status != 0 {
                refused = (i, r.output)
                break
            }
        }
        let (at, error) = try #require(refused)
        #expect(at > 10, "refused at put \(at)")  // ~19 KB of 1 KB values fit under 20,000 bytes
        #expect(error.contains("Error: etcdserver: mvcc: database space exceeded"), "\(error)")
        let members = reg.endpoint.split(separator: ",").map(String.init)
        #expect(members.count == 3)
        for m in members {  // raised through raft: every member lists it and refuses writes
            #expect(try eventually { try etcdctl(m, ["alarm", "list"]).output.contains("alarm:NOSPACE") }, "\(m)")
            let small = try etcdctl(m, ["put", "small", "v"])
            #expect(small.status != 0 && small.output.contains("database space exceeded"), "\(m): \(small.output)")
            let grant = try etcdctl(m, ["lease", "grant", "60"])
            #expect(grant.status != 0 && grant.output.contains("database space exceeded"), "\(m): \(grant.output)")
        }
        #expect(try etcdctl(reg.endpoint, ["endpoint", "status", "-w", "json"]).output.contains("alarm:NOSPACE"))
        // Reads still work.
        #expect(try etcdctl(reg.endpoint, ["get", "k1", "--print-value-only"]).output == value + "\n")
        // Delete and compact: the space comes back; disarm; writes go through again.
        #expect(try etcdctl(reg.endpoint, ["del", "--prefix", "k"]).status == 0)
        let status = try etcdctl(reg.endpoint, ["endpoint", "status", "-w", "json"]).output
        let rev = try #require(
            status.range(of: #""revision":"#).map { r in Int(status[r.upperBound...].prefix { $0.isNumber }) ?? 0 })
        #expect(try etcdctl(reg.endpoint, ["compaction", String(rev)]).status == 0)
        // The alarm is sticky: space is back, but writes wait for the operator's disarm.
        let early = try etcdctl(reg.endpoint, ["put", "k1", "small"])
        #expect(early.status != 0 && early.output.contains("database space exceeded"), "\(early.output)")
        #expect(try etcdctl(reg.endpoint, ["alarm", "disarm"]).status == 0)
        #expect(try etcdctl(reg.endpoint, ["put", "k1", "small"]).output == "OK\n")
        #expect(try etcdctl(reg.endpoint, ["alarm", "list"]).output.isEmpty)
    }

    @Test func autoCompactionKeepsTheConfiguredHistory() throws {
        let reg = try RegistryUnderTest(
            members: 1,
            extra: [
                "--auto-compaction-mode", "revision", "--auto-compaction-retention", "5",
                "--auto-compaction-check-ms", "100",
            ])
        for i in 1...20 { #expect(try etcdctl(reg.endpoint, ["put", "k", "v\(i)"]).status == 0) }
        // Old revisions go (only the last 5 are kept); the latest value stays readable.
        #expect(
            try eventually {
                try etcdctl(reg.endpoint, ["get", "k", "--rev", "2"]).output.contains(
                    "required revision has been compacted")
            })
        #expect(try etcdctl(reg.endpoint, ["get", "k", "--print-value-only"]).output == "v20\n")
        let rev = 21  // 20 puts on a fresh store
        #expect(
            try etcdctl(reg.endpoint, ["get", "k", "--rev", String(rev - 4), "--print-value-only"]).output == "v16\n")
    }
}
