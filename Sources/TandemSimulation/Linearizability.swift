import TandemCore

/// One operation on a single-key register, as a client saw it.
public struct RegisterOp: Sendable, Equatable {
    public enum Input: Sendable, Equatable {
        case read
        case write(Bytes)
        /// Txn: if value == expected then put new.
        case cas(expected: Bytes, new: Bytes)
    }
    public enum Output: Sendable, Equatable {
        case value(Bytes?)
        case ok
        case casResult(Bool)
        /// Timed out or the connection died: it may or may not have taken effect.
        case unknown
    }
    public var client: Int
    public var key: Bytes
    public var input: Input
    public var output: Output
    public var call: UInt64
    /// `UInt64.max` for operations whose outcome is unknown.
    public var ret: UInt64

    public init(client: Int, key: Bytes, input: Input, output: Output, call: UInt64, ret: UInt64) {
        self.client = client
        self.key = key
        self.input = input
        self.output = output
        self.call = call
        self.ret = ret
    }
}

/// A Wing–Gong–Lowe linearizability checker with the memoization of Lowe and of
/// porcupine, over a register per key (linearizability is compositional, so keys are
/// checked separately).
public enum LinearizabilityChecker {
    public enum Verdict: Equatable, Sendable {
        case linearizable
        case violation(key: String, ops: Int)
        /// The search exceeded its step bound without a verdict.
        case unknown(key: String)
    }

    public static func check(_ history: [RegisterOp], maxSteps: Int = 5_000_000) -> Verdict {
        var byKey: [Bytes: [RegisterOp]] = [:]
        for op in history { byKey[op.key, default: []].append(op) }
        for key in byKey.keys.sorted(by: Bytes.lexicographicLess) {
            switch checkKey(byKey[key]!, maxSteps: maxSteps) {
            case true?: continue
            case false?: return .violation(key: key.utf8String, ops: byKey[key]!.count)
            case nil: return .unknown(key: key.utf8String)
            }
        }
        return .linearizable
    }

    /// The register's transition; nil when `op`'s observed output is impossible in `state`.
    static func step(_ state: Bytes?, _ op: RegisterOp) -> Bytes?? {
        switch (op.input, op.output) {
        case (.read, .value(let v)): return v == state ? .some(state) : nil
        case (.read, .unknown): return .some(state)
        case (.write(let v), _): return .some(v)
        case (.cas(let exp, let new), .casResult(let ok)):
            if ok { return state == exp ? .some(new) : nil }
            return state != exp ? .some(state) : nil
        case (.cas(let exp, let new), .unknown): return state == exp ? .some(new) : .some(state)
        default: return nil
        }
    }

    struct Node {
        var op: Int
        var isCall: Bool
        var match: Int  // index of the paired event in the list
        var prev: Int
        var next: Int
    }

    struct CacheKey: Hashable {
        var bits: [UInt64]
        var state: Bytes?
    }

    static func checkKey(_ ops: [RegisterOp], maxSteps: Int) -> Bool? {
        // Events sorted by time; at equal times calls come first (treated as concurrent).
        var evs: [(time: UInt64, isCall: Bool, op: Int)] = []
        for (i, o) in ops.enumerated() {
            evs.append((o.call, true, i))
            evs.append((o.ret, false, i))
        }
        evs.sort { a, b in
            if a.time != b.time { return a.time < b.time }
            if a.isCall != b.isCall { return a.isCall }
            return a.op < b.op
        }
        // Doubly linked list with a sentinel head at index 0.
        var nodes = [Node(op: -1, isCall: false, match: -1, prev: -1, next: 1)]
        var callPos = [Int](repeating: 0, count: ops.count)
        for (k, e) in evs.enumerated() {
            nodes.append(Node(op: e.op, isCall: e.isCall, match: -1, prev: k, next: k + 2))
            if e.isCall {
                callPos[e.op] = k + 1
            } else {
                nodes[k + 1].match = callPos[e.op]
                nodes[callPos[e.op]].match = k + 1
            }
        }
        nodes[nodes.count - 1].next = -1
        func lift(_ c: Int) {
            let r = nodes[c].match
            nodes[nodes[c].prev].next = nodes[c].next
            if nodes[c].next >= 0 { nodes[nodes[c].next].prev = nodes[c].prev }
            nodes[nodes[r].prev].next = nodes[r].next
            if nodes[r].next >= 0 { nodes[nodes[r].next].prev = nodes[r].prev }
        }
        func unlift(_ c: Int) {
            let r = nodes[c].match
            nodes[nodes[r].prev].next = r
            if nodes[r].next >= 0 { nodes[nodes[r].next].prev = r }
            nodes[nodes[c].prev].next = c
            if nodes[c].next >= 0 { nodes[nodes[c].next].prev = c }
        }
        var bits = [UInt64](repeating: 0, count: (ops.count + 63) / 64)
        var cache = Set<CacheKey>()
        var stack: [(node: Int, state: Bytes?)] = []
        var state: Bytes? = nil
        var entry = nodes[0].next
        var steps = 0
        while nodes[0].next >= 0 {
            steps += 1
            if steps > maxSteps { return nil }
            guard entry >= 0 else { return false }
            let n = nodes[entry]
            if n.isCall {
                if let newState = step(state, ops[n.op]) {
                    var nb = bits
                    nb[n.op / 64] |= 1 << UInt64(n.op % 64)
                    if cache.insert(CacheKey(bits: nb, state: newState)).inserted {
                        stack.append((entry, state))
                        state = newState
                        bits = nb
                        lift(entry)
                        entry = nodes[0].next
                        continue
                    }
                }
                entry = n.next
            } else {
                // A return with its call not yet linearized: backtrack.
                guard let (top, prevState) = stack.popLast() else { return false }
                state = prevState
                bits[nodes[top].op / 64] &= ~(1 << UInt64(nodes[top].op % 64))
                unlift(top)
                entry = nodes[top].next
            }
        }
        return true
    }
}
