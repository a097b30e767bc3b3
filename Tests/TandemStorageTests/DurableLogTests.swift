import Foundation
import Glibc
import TandemCore
import TandemRaft
import TandemSimulation
import Testing

@testable import TandemStorage

/// A fresh directory under the system temp dir, removed when the test ends.
final class TempDir {
    let path: String
    init() {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("tandem-storage-XXXXXX").path
        var template = Array(base.utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }
    deinit {
        if let fs = try? PosixFileSystem(directory: path), let names = try? fs.list() {
            for n in names { try? fs.remove(n) }
        }
        rmdir(path)
    }
}

func entries(_ range: ClosedRange<UInt64>, term: UInt64 = 1) -> [Entry] {
    range.map { Entry(term: term, index: $0, data: Array("entry-\($0)".utf8)) }
}

@Suite("TandemStorage: WAL, snapshots, recovery")
struct DurableLogTests {
    @Test("real disk: entries and hard state survive a reopen, with one fsync per save (group commit)")
    func posixRoundTrip() throws {
        let dir = TempDir()
        do {
            let log = DurableLog(fs: try PosixFileSystem(directory: dir.path))
            _ = try log.recover()
            let syncsBefore = log.syncs
            try log.save(hardState: HardState(term: 2, vote: 1, commit: 3), entries: entries(1...10))
            #expect(log.syncs == syncsBefore + 1)
        }
        let rec = try DurableLog(fs: try PosixFileSystem(directory: dir.path)).recover()
        #expect(rec.hardState == HardState(term: 2, vote: 1, commit: 3))
        #expect(rec.entries == entries(1...10))
        #expect(rec.notes.isEmpty)
    }

    @Test("real disk: a data directory whose parents do not exist yet is created (like etcd)")
    func nestedDirectory() throws {
        let dir = TempDir()
        let nested = dir.path + "/a/b/registry"
        let log = DurableLog(fs: try PosixFileSystem(directory: nested))
        _ = try log.recover()
        try log.save(hardState: HardState(term: 1, vote: 1, commit: 1), entries: entries(1...1))
        #expect(try DurableLog(fs: try PosixFileSystem(directory: nested)).recover().entries == entries(1...1))
        for d in [nested, dir.path + "/a/b", dir.path + "/a"] {
            if let fs = try? PosixFileSystem(directory: d) { for n in try fs.list() { try? fs.remove(n) } }
            rmdir(d)
        }
    }

    @Test("a later record overwrites a conflicting suffix on replay (§5.3)")
    func overwrite() throws {
        let disk = SimDisk(random: SeededRandom(seed: 1))
        let log = DurableLog(fs: disk)
        _ = try log.recover()
        try log.save(hardState: nil, entries: entries(1...5))
        try log.save(hardState: HardState(term: 2, vote: 0, commit: 3), entries: entries(4...6, term: 2))
        let rec = try DurableLog(fs: disk).recover()
        #expect(rec.entries.map(\.term) == [1, 1, 1, 2, 2, 2])
    }

    @Test("segments roll over and are released once a snapshot covers them")
    func segmentsAndSnapshots() throws {
        let dir = TempDir()
        var opts = DurableLog.Options()
        opts.segmentBytes = 256
        let log = DurableLog(fs: try PosixFileSystem(directory: dir.path), options: opts)
        _ = try log.recover()
        for i in stride(from: UInt64(1), through: 100, by: 5) {
            try log.save(hardState: HardState(term: 1, vote: 1, commit: i + 4), entries: entries(i...(i + 4)))
        }
        #expect(log.segmentNames.count > 5)
        let snap = Snapshot(
            metadata: SnapshotMetadata(index: 80, term: 1, conf: ConfState(voters: [1])), data: Array("state".utf8))
        try log.saveSnapshot(snap)
        #expect(log.segmentNames.count < 5)
        let rec = try DurableLog(fs: try PosixFileSystem(directory: dir.path), options: opts).recover()
        #expect(rec.snapshot == snap)
        #expect(rec.entries.first?.index == 81 && rec.entries.last?.index == 100)
        #expect(rec.hardState.commit == 100)
    }

    @Test("torn tail: a partial last record is truncated to the last valid one, with a log line")
    func tornTail() throws {
        let disk = SimDisk(random: SeededRandom(seed: 2))
        let log = DurableLog(fs: disk)
        _ = try log.recover()
        try log.save(hardState: HardState(term: 1, vote: 1, commit: 2), entries: entries(1...3))
        let name = log.segmentNames.last!
        let good = disk.size(name)!
        // The first half of a record's bytes reached the disk; the rest never did.
        var w = ByteWriter()
        DurableLog.record(.entry, Array(repeating: 7, count: 40), into: &w)
        try disk.append(name, Array(w.bytes.prefix(w.bytes.count / 2)))
        try disk.sync(name)
        disk.crash()
        let rec = try DurableLog(fs: disk).recover()
        #expect(rec.entries == entries(1...3))
        #expect(rec.notes.contains { $0.contains("truncated torn tail of \(name) at offset \(good)") })
        #expect(disk.size(name) == good)
        // The log keeps working after the truncation.
        let again = DurableLog(fs: disk)
        _ = try again.recover()
        try again.save(hardState: nil, entries: entries(4...4))
        #expect(try DurableLog(fs: disk).recover().entries == entries(1...4))
    }

    @Test("corruption before the tail refuses to start, naming the file and offset")
    func corruptionMidLog() throws {
        let disk = SimDisk(random: SeededRandom(seed: 3))
        let log = DurableLog(fs: disk)
        _ = try log.recover()
        try log.save(hardState: nil, entries: entries(1...3))
        let name = log.segmentNames.last!
        let offset = disk.size(name)!
        try log.save(hardState: nil, entries: entries(4...6))
        disk.corrupt(name, at: offset + 12)
        do {
            _ = try DurableLog(fs: disk).recover()
            Issue.record("recovery should refuse a corrupt record followed by valid ones")
        } catch let e as StorageError {
            #expect(e.message.contains("corrupt record in \(name) at offset \(offset)"))
            #expect(e.message.contains("refusing to start"))
        }
    }

    @Test("corruption in an older segment refuses to start even if it is the segment's last record")
    func corruptionOlderSegment() throws {
        let disk = SimDisk(random: SeededRandom(seed: 4))
        var opts = DurableLog.Options()
        opts.segmentBytes = 100
        let log = DurableLog(fs: disk, options: opts)
        _ = try log.recover()
        for i in UInt64(1)...6 { try log.save(hardState: nil, entries: entries(i...i)) }
        let first = log.segmentNames[0]
        disk.corrupt(first, at: disk.size(first)! - 2)
        #expect(throws: StorageError.self) { _ = try DurableLog(fs: disk, options: opts).recover() }
    }

    @Test("a corrupt snapshot file refuses to start; a leftover temporary file is removed")
    func snapshotFiles() throws {
        let disk = SimDisk(random: SeededRandom(seed: 5))
        let log = DurableLog(fs: disk)
        _ = try log.recover()
        try log.save(hardState: nil, entries: entries(1...3))
        try disk.write("snap-0000000000000009.snap.tmp", [1, 2, 3])
        try disk.syncDirectory()
        let rec = try DurableLog(fs: disk).recover()
        #expect(rec.notes.contains { $0.contains("removed incomplete temporary file") })
        try log.saveSnapshot(
            Snapshot(metadata: SnapshotMetadata(index: 3, term: 1, conf: ConfState(voters: [1])), data: [9, 9]))
        disk.corrupt("snap-0000000000000003.snap", at: 6)
        #expect(throws: StorageError.self) { _ = try DurableLog(fs: disk).recover() }
    }

    @Test("a snapshot whose rename was not made durable is not seen after a crash; the WAL still is")
    func snapshotCrashBeforeDirSync() throws {
        let disk = SimDisk(random: SeededRandom(seed: 6))
        let log = DurableLog(fs: disk)
        _ = try log.recover()
        try log.save(hardState: HardState(term: 1, vote: 1, commit: 5), entries: entries(1...5))
        // Crash at the directory fsync that would publish the snapshot (4th fs operation).
        disk.crashAtOperation = disk.operations + 4
        #expect(throws: SimulatedCrash.self) {
            try log.saveSnapshot(
                Snapshot(metadata: SnapshotMetadata(index: 5, term: 1, conf: ConfState(voters: [1])), data: [1]))
        }
        disk.crash()
        let rec = try DurableLog(fs: disk).recover()
        #expect(rec.snapshot == nil)
        #expect(rec.entries == entries(1...5))
    }
}
