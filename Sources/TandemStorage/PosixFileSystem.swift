import Glibc
import TandemCore

/// `FileSystem` on a real directory, with real fsync(2). File descriptors of files being
/// appended to stay open; everything else opens, acts and closes. Linux only.
public final class PosixFileSystem: FileSystem {
    public let directory: String
    private var appendFDs: [String: Int32] = [:]

    /// Opens `directory`, creating it and any missing parents (like `mkdir -p`).
    public init(directory: String) throws {
        self.directory = directory
        var path = directory.hasPrefix("/") ? "" : "."
        for part in directory.split(separator: "/") {
            path += "/" + part
            if mkdir(path, 0o755) != 0 && errno != EEXIST { throw Self.error("mkdir", path) }
        }
    }

    deinit {
        for fd in appendFDs.values { close(fd) }
    }

    private func path(_ name: String) -> String { directory + "/" + name }

    private static func error(_ op: String, _ path: String) -> StorageError {
        StorageError("\(op) \(path): \(String(cString: strerror(errno)))")
    }

    public func list() throws -> [String] {
        guard let d = opendir(directory) else { throw Self.error("opendir", directory) }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafePointer(to: e.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public func read(_ name: String) throws -> Bytes {
        let fd = open(path(name), O_RDONLY)
        guard fd >= 0 else { throw Self.error("open", path(name)) }
        defer { close(fd) }
        var out: Bytes = []
        var buf = Bytes(repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Self.error("read", path(name))
            }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out
    }

    private func appendFD(_ name: String) throws -> Int32 {
        if let fd = appendFDs[name] { return fd }
        let fd = open(path(name), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Self.error("open", path(name)) }
        appendFDs[name] = fd
        return fd
    }

    private func writeAll(_ fd: Int32, _ bytes: Bytes, _ name: String) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Self.error("write", path(name))
            }
            off += n
        }
    }

    public func append(_ name: String, _ bytes: Bytes) throws {
        try writeAll(try appendFD(name), bytes, name)
    }

    public func sync(_ name: String) throws {
        if let fd = appendFDs[name] {
            guard fsync(fd) == 0 else { throw Self.error("fsync", path(name)) }
            return
        }
        let fd = open(path(name), O_RDONLY)
        guard fd >= 0 else { throw Self.error("open", path(name)) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw Self.error("fsync", path(name)) }
    }

    public func write(_ name: String, _ bytes: Bytes) throws {
        closeAppend(name)
        let fd = open(path(name), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Self.error("open", path(name)) }
        defer { close(fd) }
        try writeAll(fd, bytes, name)
    }

    public func truncate(_ name: String, to size: Int) throws {
        closeAppend(name)
        guard Glibc.truncate(path(name), off_t(size)) == 0 else { throw Self.error("truncate", path(name)) }
    }

    public func rename(_ from: String, _ to: String) throws {
        closeAppend(from)
        closeAppend(to)
        guard Glibc.rename(path(from), path(to)) == 0 else { throw Self.error("rename", path(from)) }
    }

    public func remove(_ name: String) throws {
        closeAppend(name)
        guard unlink(path(name)) == 0 || errno == ENOENT else { throw Self.error("unlink", path(name)) }
    }

    public func syncDirectory() throws {
        let fd = open(directory, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw Self.error("open", directory) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw Self.error("fsync", directory) }
    }

    private func closeAppend(_ name: String) {
        if let fd = appendFDs.removeValue(forKey: name) { close(fd) }
    }
}
