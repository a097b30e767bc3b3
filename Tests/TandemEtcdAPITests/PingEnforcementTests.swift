import Testing

@testable import TandemEtcdAPI

/// grpc-go's server keepalive enforcement, as etcd sets it (`--grpc-keepalive-min-time`).
@Suite struct PingEnforcementTests {
    let s: Int64 = 1_000_000_000

    /// The policy's answers to PINGs at `times` (true: end the connection).
    func answers(
        _ p: inout PingEnforcement, _ times: [Int64], openCalls: Int, sentBefore: Bool = false
    ) -> [Bool] {
        times.map { t in
            if sentBefore { p.sent() }
            return p.pingReceived(now: t, openCalls: openCalls)
        }
    }

    @Test func pingsThatFollowDataAreNeverCounted() {
        var p = PingEnforcement()
        let r = answers(&p, (0..<1_000).map { $0 * 1_000 }, openCalls: 1, sentBefore: true)  // 1 µs apart
        #expect(r == Array(repeating: false, count: 1_000))
    }

    @Test func withCallsOpenOnePingPerMinTimeIsAllowedAndTheThirdStrikeEnds() {
        var p = PingEnforcement(minTimeNanos: 5 * s)
        let steady = answers(&p, (1...10).map { $0 * 5 * s }, openCalls: 1)
        #expect(steady == Array(repeating: false, count: 10))
        // 1 s apart: strikes 1 and 2, then the third ends the connection.
        #expect(answers(&p, [51 * s, 52 * s, 53 * s], openCalls: 1) == [false, false, true])
    }

    @Test func dataResetsTheStrikes() {
        var p = PingEnforcement(minTimeNanos: 5 * s)
        #expect(answers(&p, [0, 1, 2], openCalls: 1) == [false, false, false])  // two strikes
        p.sent()
        #expect(answers(&p, [3, 4, 5, 6], openCalls: 1) == [false, false, false, true])  // reset, then 3
    }

    @Test func withNoCallOpenTheIntervalIsTwoHours() {
        var p = PingEnforcement(minTimeNanos: 5 * s)
        let hour = 3_600 * s
        let r = answers(&p, [0, 2 * hour, 3 * hour, 4 * hour, 5 * hour], openCalls: 0)
        #expect(r == [false, false, false, false, true])
    }
}
