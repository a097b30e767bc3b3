/// TandemStorage — crash-safe persistence for a Raft node: WAL segments and snapshots.
///
/// Owns: record framing and checksums, group commit, atomic snapshot files, log truncation
/// and recovery. It reaches the disk only through `FileSystem`, so the simulator can run
/// the same code on a disk that crashes, tears writes and loses unsynced data.
import TandemCore

/// The few file operations storage needs. Paths are relative to the storage directory.
/// Implementations must give POSIX semantics: `append` may be lost until `sync`; `rename`
/// and file creation may be lost until `syncDirectory`.
public protocol FileSystem: AnyObject {
    func list() throws -> [String]
    func read(_ name: String) throws -> Bytes
    /// Creates the file if missing and appends.
    func append(_ name: String, _ bytes: Bytes) throws
    /// fsync(2) of one file.
    func sync(_ name: String) throws
    /// Creates or replaces the whole file (not durable until `sync`).
    func write(_ name: String, _ bytes: Bytes) throws
    func truncate(_ name: String, to size: Int) throws
    func rename(_ from: String, _ to: String) throws
    func remove(_ name: String) throws
    /// fsync(2) of the directory, making creations, renames and removals durable.
    func syncDirectory() throws
}

public struct StorageError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
