import Foundation
import Testing

@Suite("Python etcd3 (a client library we did not write) against a tandem registry")
struct PythonClientTests {
    @Test("put/get, prefix, watch from a revision, lease ttl/keys/refresh/revoke, txn, lock, members")
    func etcd3Client() throws {
        let r = try RegistryUnderTest()
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Resources/etcd3_client.py").path
        let py = try Child("/usr/bin/python3", [script, r.endpoint])
        var lines: [String] = []
        while let l = py.readLine() { lines.append(l) }
        py.process.waitUntilExit()
        for l in lines where !l.hasPrefix("ok ") { Issue.record("python etcd3: \(l)") }
        #expect(lines.filter { $0.hasPrefix("ok ") }.count == 14, "\(lines)")
        #expect(py.process.terminationStatus == 0)
    }
}
