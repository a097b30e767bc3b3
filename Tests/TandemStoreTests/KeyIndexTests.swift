import TandemCore
import Testing

@testable import TandemStore

@Suite("KeyIndex: the chunked sorted index, against a sorted-array model")
struct KeyIndexTests {
    @Test("random inserts, deletes and compaction across many chunk splits keep order and contents")
    func modelCheck() throws {
        var rng = SeededRandom(seed: 11)
        var s = MVCCStore()
        var model: [String: String] = [:]
        // 6,000 keys, far past one 512-entry chunk, inserted in random order.
        for i in 0..<20_000 {
            let k = "key-\(rng.next() % 6_000)"
            if rng.chance(0.15), model[k] != nil {
                s.apply(.deleteRange(DeleteRangeRequest(key: Array(k.utf8))))
                model[k] = nil
            } else {
                s.put(k, "v\(i)")
                model[k] = "v\(i)"
            }
            if i == 12_000 { s.apply(.compact(revision: s.revision - 100)) }
        }
        #expect(s.index.chunks.count > 10)
        #expect(s.index.chunks.allSatisfy { !$0.isEmpty && $0.count <= MVCCStore.KeyIndex.maxChunk })
        // Every live key, in byte order, with its latest value.
        let all = try s.range(RangeRequest(key: [0], rangeEnd: [0])).kvs
        let expected = model.keys.sorted { Bytes.lexicographicLess(Array($0.utf8), Array($1.utf8)) }
        #expect(all.map { $0.key.utf8String } == expected)
        #expect(all.allSatisfy { model[$0.key.utf8String] == $0.value.utf8String })
        // Sub-ranges that cross chunk boundaries.
        for (lo, hi) in [("key-1", "key-2"), ("key-4", "key-45"), ("key-0", "key-9")] {
            let got = try s.range(RangeRequest(key: Array(lo.utf8), rangeEnd: Array(hi.utf8))).kvs.map {
                $0.key.utf8String
            }
            #expect(got == expected.filter { $0 >= lo && $0 < hi })
        }
        // A snapshot round trip rebuilds the same index.
        let r = try MVCCStore(snapshot: s.snapshot())
        #expect(try r.range(RangeRequest(key: [0], rangeEnd: [0])) == s.range(RangeRequest(key: [0], rangeEnd: [0])))
        // Compacting everything old leaves exactly the live keys (one more write first, so
        // no tombstone sits exactly at the compacted revision, where it is kept by design).
        s.put("zz-last", "1")
        s.apply(.compact(revision: s.revision))
        #expect(s.keyCount == model.count + 1)
    }
}
