/// TandemSimulation — runs the real cores in one thread on virtual time.
///
/// Owns: the virtual clock and event queue, the seeded network and disk, the node shell
/// that drives TandemRaft + TandemStore + TandemStorage exactly as a real server does,
/// clients, fault schedules and checkers. Every random choice comes from one seed; no
/// clock, thread or real I/O is used, so the same seed gives the same run, bit for bit.
import TandemCore
import TandemStorage

/// The disk died at a fault point: the node's process is considered crashed.
public struct SimulatedCrash: Error, CustomStringConvertible {
    public var operation: String
    public var description: String { "simulated crash during \(operation)" }
}

/// A directory on a simulated disk with POSIX durability: appended or written data is
/// lost on a crash unless fsynced; creations, renames and removals are lost unless the
/// directory is fsynced. A crash may keep a torn prefix of unsynced appends.
public final class SimDisk: FileSystem {
    final class Inode {
        var durable: Bytes = []
        var current: Bytes = []
        init() {}
    }

    private var inodes: [Int: Inode] = [:]
    private var nextInode = 1
    private var currentDir: [String: Int] = [:]
    private var durableDir: [String: Int] = [:]
    private var rng: SeededRandom
    /// Mutating operations performed so far (the crash-point counter).
    public private(set) var operations = 0
    /// When set, the operation with this number fails as a crash (nothing of it happens).
    public var crashAtOperation: Int?
    /// Probability that a crash keeps a random prefix of a file's unsynced appends.
    public var tornWriteProbability = 0.5

    public init(random: SeededRandom) { rng = random }

    private func fault(_ op: String) throws {
        operations += 1
        if let c = crashAtOperation, operations == c {
            crashAtOperation = nil
            throw SimulatedCrash(operation: op)
        }
    }

    private func inode(_ name: String) throws -> Inode {
        guard let i = currentDir[name], let n = inodes[i] else { throw StorageError("no such file: \(name)") }
        return n
    }

    public func list() throws -> [String] { currentDir.keys.sorted() }

    public func read(_ name: String) throws -> Bytes { try inode(name).current }

    public func append(_ name: String, _ bytes: Bytes) throws {
        try fault("append \(name)")
        if currentDir[name] == nil { create(name) }
        try inode(name).current.append(contentsOf: bytes)
    }

    public func sync(_ name: String) throws {
        try fault("fsync \(name)")
        let n = try inode(name)
        n.durable = n.current
    }

    public func write(_ name: String, _ bytes: Bytes) throws {
        try fault("write \(name)")
        if currentDir[name] == nil { create(name) }
        try inode(name).current = bytes
    }

    public func truncate(_ name: String, to size: Int) throws {
        try fault("truncate \(name)")
        let n = try inode(name)
        n.current = Array(n.current.prefix(size))
    }

    public func rename(_ from: String, _ to: String) throws {
        try fault("rename \(from)")
        guard let i = currentDir.removeValue(forKey: from) else { throw StorageError("no such file: \(from)") }
        currentDir[to] = i
    }

    public func remove(_ name: String) throws {
        try fault("unlink \(name)")
        currentDir[name] = nil
    }

    public func syncDirectory() throws {
        try fault("fsync directory")
        durableDir = currentDir
        // Files no longer named anywhere are gone for good.
        let live = Set(currentDir.values)
        for k in inodes.keys where !live.contains(k) { inodes[k] = nil }
    }

    private func create(_ name: String) {
        inodes[nextInode] = Inode()
        currentDir[name] = nextInode
        nextInode += 1
    }

    /// Power loss: unsynced data and directory changes are lost, except a torn prefix.
    public func crash() {
        currentDir = durableDir
        // Mix in where the crash happened, so crashes at different points tear differently
        // even in runs that share a seed.
        var rng = SeededRandom(seed: self.rng.next() ^ UInt64(operations) &* 0x9E37_79B9_7F4A_7C15)
        for (_, n) in inodes.sorted(by: { $0.key < $1.key }) {
            var kept = n.durable
            if n.current.count > n.durable.count && n.current.starts(with: n.durable)
                && rng.chance(tornWriteProbability)
            {
                let extra = n.current.count - n.durable.count
                kept = Array(n.current.prefix(n.durable.count + Int(rng.next() % UInt64(extra + 1))))
            }
            n.durable = kept
            n.current = kept
        }
        let live = Set(durableDir.values)
        for k in inodes.keys where !live.contains(k) { inodes[k] = nil }
    }

    /// Flips one byte of a file's durable content (a disk fault for corruption tests).
    public func corrupt(_ name: String, at offset: Int) {
        guard let i = durableDir[name], let n = inodes[i], offset < n.durable.count else { return }
        n.durable[offset] ^= 0xFF
        n.current = n.durable
    }

    public func size(_ name: String) -> Int? { currentDir[name].flatMap { inodes[$0]?.current.count } }
}
