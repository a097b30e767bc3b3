import TandemCore

extension MVCCStore {
    /// Keys in byte order with their versions, as a sorted sequence of bounded chunks (a
    /// two-level B+tree). Inserting a new key moves at most one chunk (≤ `maxChunk` entries)
    /// and the array of chunk references, instead of every later key; scans walk chunks in
    /// order without hashing.
    struct KeyIndex: Sendable {
        static let maxChunk = 512
        private(set) var chunks: [[KeyEntry]] = []
        private(set) var count = 0

        init() {}

        init(sorted entries: [KeyEntry]) {
            var i = 0
            while i < entries.count {
                let end = min(entries.count, i + Self.maxChunk / 2)
                chunks.append(Array(entries[i..<end]))
                i = end
            }
            count = entries.count
        }

        /// The chunk that holds (or would hold) `k`: the last whose first key is ≤ `k`.
        private func chunk(for k: Bytes) -> Int {
            var lo = 0
            var hi = chunks.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if Bytes.lexicographicLess(k, chunks[mid][0].key) { hi = mid } else { lo = mid + 1 }
            }
            return max(0, lo - 1)
        }

        /// First position in `c` whose key is ≥ `k`.
        private static func lowerBound(_ c: [KeyEntry], _ k: Bytes) -> Int {
            var lo = 0
            var hi = c.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if Bytes.lexicographicLess(c[mid].key, k) { lo = mid + 1 } else { hi = mid }
            }
            return lo
        }

        func find(_ k: Bytes) -> KeyEntry? {
            guard !chunks.isEmpty else { return nil }
            let c = chunk(for: k)
            let p = Self.lowerBound(chunks[c], k)
            return p < chunks[c].count && chunks[c][p].key == k ? chunks[c][p] : nil
        }

        /// Adds a version to `k`, creating the key if it is new.
        mutating func append(_ v: Version, to k: Bytes) {
            guard !chunks.isEmpty else {
                chunks = [[KeyEntry(key: k, versions: [v])]]
                count = 1
                return
            }
            let c = chunk(for: k)
            let p = Self.lowerBound(chunks[c], k)
            if p < chunks[c].count && chunks[c][p].key == k {
                chunks[c][p].versions.append(v)
                return
            }
            chunks[c].insert(KeyEntry(key: k, versions: [v]), at: p)
            count += 1
            if chunks[c].count > Self.maxChunk {
                let upper = Array(chunks[c][(Self.maxChunk / 2)...])
                chunks[c].removeSubrange((Self.maxChunk / 2)...)
                chunks.insert(upper, at: c + 1)
            }
        }

        /// Changes the versions of `k`; a key left without versions is removed.
        mutating func mutate(_ k: Bytes, _ body: (inout [Version]) -> Void) {
            guard !chunks.isEmpty else { return }
            let c = chunk(for: k)
            let p = Self.lowerBound(chunks[c], k)
            guard p < chunks[c].count && chunks[c][p].key == k else { return }
            body(&chunks[c][p].versions)
            if chunks[c][p].versions.isEmpty {
                chunks[c].remove(at: p)
                count -= 1
                if chunks[c].isEmpty { chunks.remove(at: c) }
            }
        }

        /// Visits the entries in etcd's key/range_end encoding, in order, until `body` says stop.
        func forEach(key: Bytes, rangeEnd: Bytes, _ body: (KeyEntry) -> Bool) {
            if rangeEnd.isEmpty {
                if let e = find(key) { _ = body(e) }
                return
            }
            guard !chunks.isEmpty else { return }
            let toEnd = rangeEnd == [0]
            var c = chunk(for: key)
            var p = Self.lowerBound(chunks[c], key)
            while c < chunks.count {
                let ch = chunks[c]
                while p < ch.count {
                    if !toEnd && !Bytes.lexicographicLess(ch[p].key, rangeEnd) { return }
                    if !body(ch[p]) { return }
                    p += 1
                }
                c += 1
                p = 0
            }
        }

        /// The keys in a range (collected first when the caller will modify the index).
        func keys(key: Bytes, rangeEnd: Bytes) -> [Bytes] {
            var out: [Bytes] = []
            forEach(key: key, rangeEnd: rangeEnd) { e in
                out.append(e.key)
                return true
            }
            return out
        }

        /// Applies `body` to every key's versions, dropping keys and chunks left empty.
        mutating func compact(_ body: (Bytes, inout [Version]) -> Void) {
            for c in chunks.indices {
                for p in chunks[c].indices { body(chunks[c][p].key, &chunks[c][p].versions) }
                chunks[c].removeAll { $0.versions.isEmpty }
            }
            chunks.removeAll { $0.isEmpty }
            count = chunks.reduce(0) { $0 + $1.count }
        }

        var entries: FlattenSequence<[[KeyEntry]]> { chunks.joined() }
    }
}
