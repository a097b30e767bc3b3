import TandemCore
import Testing

@testable import TandemSimulation

private func op(
    _ c: Int, _ input: RegisterOp.Input, _ out: RegisterOp.Output, _ call: UInt64, _ ret: UInt64, key: String = "k"
) -> RegisterOp {
    RegisterOp(client: c, key: Array(key.utf8), input: input, output: out, call: call, ret: ret)
}

private func v(_ s: String) -> Bytes { Array(s.utf8) }

@Suite("Linearizability checker: it must be able to fail")
struct CheckerTests {
    @Test("known bad: a stale read after an acknowledged write is reported")
    func staleRead() {
        let h = [
            op(0, .write(v("a")), .ok, 0, 10), op(1, .write(v("b")), .ok, 20, 30),
            op(2, .read, .value(v("a")), 40, 50),
        ]
        #expect(LinearizabilityChecker.check(h) == .violation(key: "k", ops: 3))
    }

    @Test("known bad: a lost write (acknowledged, then never seen) is reported")
    func lostWrite() {
        let h = [
            op(0, .write(v("a")), .ok, 0, 10), op(1, .read, .value(nil), 20, 30),
        ]
        #expect(LinearizabilityChecker.check(h) == .violation(key: "k", ops: 2))
    }

    @Test("known bad: a CAS that reports success against the wrong value is reported")
    func badCas() {
        let h = [
            op(0, .write(v("a")), .ok, 0, 10), op(1, .cas(expected: v("z"), new: v("b")), .casResult(true), 20, 30),
        ]
        #expect(LinearizabilityChecker.check(h) != .linearizable)
    }

    @Test("known bad: two readers seeing two writes in opposite orders")
    func splitBrainOrder() {
        let h = [
            op(0, .write(v("a")), .ok, 0, 100), op(1, .write(v("b")), .ok, 0, 100),
            op(2, .read, .value(v("a")), 110, 120), op(3, .read, .value(v("b")), 130, 140),
            op(2, .read, .value(v("a")), 150, 160),
        ]
        #expect(LinearizabilityChecker.check(h) != .linearizable)
    }

    @Test("good: concurrent operations may take effect in either order")
    func concurrentOK() {
        let h = [
            op(0, .write(v("a")), .ok, 0, 100), op(1, .write(v("b")), .ok, 10, 90),
            op(2, .read, .value(v("a")), 95, 120), op(3, .read, .value(v("a")), 130, 140),
        ]
        #expect(LinearizabilityChecker.check(h) == .linearizable)
    }

    @Test("good: a write with an unknown outcome may or may not have happened")
    func unknownOutcome() {
        let maybe = op(0, .write(v("x")), .unknown, 0, .max)
        let sawIt = [maybe, op(1, .read, .value(v("x")), 50, 60)]
        let didNot = [maybe, op(1, .read, .value(nil), 50, 60)]
        #expect(LinearizabilityChecker.check(sawIt) == .linearizable)
        #expect(LinearizabilityChecker.check(didNot) == .linearizable)
        // But it cannot un-happen once observed.
        let flip = sawIt + [op(1, .read, .value(nil), 70, 80)]
        #expect(LinearizabilityChecker.check(flip) != .linearizable)
    }

    @Test("keys are checked independently: a violation on one key is found among good keys")
    func perKey() {
        var h: [RegisterOp] = []
        for k in 0..<5 {
            h.append(op(0, .write(v("a\(k)")), .ok, UInt64(k * 100), UInt64(k * 100 + 10), key: "k\(k)"))
            h.append(op(1, .read, .value(v("a\(k)")), UInt64(k * 100 + 20), UInt64(k * 100 + 30), key: "k\(k)"))
        }
        h.append(op(2, .read, .value(nil), 1_000, 1_010, key: "k3"))
        #expect(LinearizabilityChecker.check(h) == .violation(key: "k3", ops: 3))
    }
}
