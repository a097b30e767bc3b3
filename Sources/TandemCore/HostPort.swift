/// `host:port`, as flags and config files write it. Port 0 asks the OS for a free port when
/// binding; an empty host means 127.0.0.1; an `http://` prefix and a trailing `/` are
/// accepted (etcd-style URLs). One type for listeners, endpoints and registry members.
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(_ s: String) {
        var t = Substring(s)
        while let f = t.first, f == " " || f == "\t" { t.removeFirst() }
        while let l = t.last, l == " " || l == "\t" || l == "/" { t.removeLast() }
        if t.hasPrefix("https://") { return nil }
        if t.hasPrefix("http://") { t.removeFirst(7) }
        guard let colon = t.lastIndex(of: ":"), let p = Int(t[t.index(after: colon)...]), p >= 0, p < 65536 else {
            return nil
        }
        host = colon == t.startIndex ? "127.0.0.1" : String(t[..<colon])
        port = p
    }

    public var description: String { "\(host):\(port)" }
}
