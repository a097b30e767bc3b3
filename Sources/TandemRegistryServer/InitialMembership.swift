import TandemEtcdAPI
import TandemStorage

extension InitialMembership {
    /// The saved membership in `dataDir`, if this member started before.
    public static func load(dataDir: String) throws -> InitialMembership? {
        let fs = try PosixFileSystem(directory: dataDir)
        guard try fs.list().contains(fileName) else { return nil }
        do { return try InitialMembership(json: try fs.read(fileName), peerURL: nil) } catch {
            throw Refusal(description: "\(dataDir)/\(fileName): \(error)")
        }
    }

    /// Writes it atomically: temp file, fsync, rename, fsync of the directory.
    public func save(dataDir: String) throws {
        let fs = try PosixFileSystem(directory: dataDir)
        let tmp = Self.fileName + ".tmp"
        try fs.write(tmp, encoded)
        try fs.sync(tmp)
        try fs.rename(tmp, Self.fileName)
        try fs.syncDirectory()
    }
}
