import TandemCore
import Testing

@testable import TandemTraffic

@Suite struct RetryTests {
    @Test func conditionsFollowEnvoyNames() throws {
        var p = RetryPolicy()
        p.retryOn = try RetryOn.parse("5xx")
        #expect(p.isRetriable(.response(status: 500)))
        #expect(p.isRetriable(.reset))
        #expect(p.isRetriable(.timeout))
        #expect(!p.isRetriable(.response(status: 429)))
        p.retryOn = try RetryOn.parse("gateway-error, unavailable")
        #expect(!p.isRetriable(.response(status: 500)))
        #expect(p.isRetriable(.response(status: 503)))
        #expect(p.isRetriable(.response(status: 200, grpcStatus: 14)))
        #expect(!p.isRetriable(.response(status: 200, grpcStatus: 13)))
        #expect(throws: TrafficConfigError.self) { try RetryOn.parse("5xx,sometimes") }
        let defaults = RetryPolicy()
        #expect(defaults.isRetriable(.connectFailure))
        #expect(defaults.isRetriable(.response(status: 503)))
        #expect(!defaults.isRetriable(.response(status: 500)))
    }

    @Test func fullJitterBackoffStaysUnderTheCap() {
        let p = RetryPolicy()
        var rng = SeededRandom(seed: 9)
        for retry in 1...10 {
            let ceiling = min(p.backoffMax, p.backoffBase << Nanos(retry - 1))
            for _ in 0..<100 {
                let b = p.backoff(retry: retry, rng: &rng)
                #expect(b >= 0 && b < ceiling)
            }
        }
    }

    @Test func nonIdempotentRequestsRetryOnlyWhenNeverProcessed() {
        var budget = RetryBudget()
        var rng = SeededRandom(seed: 1)
        var post = RetryState(policy: RetryPolicy(), method: "POST", bodyBytes: 10, start: 0, timeout: nil)
        post.attemptStarted(endpoint: "a")
        #expect(post.after(.response(status: 503), now: 0, budget: &budget, rng: &rng) == .finish)
        var post2 = RetryState(policy: RetryPolicy(), method: "POST", bodyBytes: 10, start: 0, timeout: nil)
        post2.attemptStarted(endpoint: "a")
        guard case .retry = post2.after(.connectFailure, now: 0, budget: &budget, rng: &rng) else {
            Issue.record("connect failure of a POST should be retried")
            return
        }
        var big = RetryState(policy: RetryPolicy(), method: "GET", bodyBytes: 1 << 20, start: 0, timeout: nil)
        big.attemptStarted(endpoint: "a")
        #expect(big.after(.connectFailure, now: 0, budget: &budget, rng: &rng) == .finish)
    }

    @Test func attemptsStopAtTheLimitAndTheDeadline() {
        var budget = RetryBudget()
        var rng = SeededRandom(seed: 1)
        var policy = RetryPolicy()
        policy.numRetries = 2
        var s = RetryState(policy: policy, method: "GET", bodyBytes: 0, start: 0, timeout: .seconds(1))
        for i in 0..<2 {
            s.attemptStarted(endpoint: "e\(i)")
            guard case .retry(let after) = s.after(.response(status: 503), now: 0, budget: &budget, rng: &rng) else {
                Issue.record("retry \(i) expected")
                return
            }
            #expect(after < .milliseconds(250))
        }
        s.attemptStarted(endpoint: "e2")
        #expect(s.after(.response(status: 503), now: 0, budget: &budget, rng: &rng) == .finish)
        var late = RetryState(policy: policy, method: "GET", bodyBytes: 0, start: 0, timeout: .seconds(1))
        late.attemptStarted(endpoint: "a")
        #expect(late.after(.response(status: 503), now: .seconds(1), budget: &budget, rng: &rng) == .finish)
        #expect(late.attemptTimeout(now: .milliseconds(400)) == .milliseconds(600))
    }

    @Test func budgetCapsRetriesAtTwentyPercentPlusTheFloor() {
        var budget = RetryBudget(.init(ratio: 0.2, minPerSecond: 10, ttl: .seconds(10)))
        var granted = 0
        // 1,000 requests per second for 10 s, every one wanting a retry.
        for ms in 0..<10_000 {
            let now = Nanos.milliseconds(Int64(ms))
            budget.recordRequest(now: now)
            if budget.tryRetry(now: now) { granted += 1 }
        }
        // Allowed ≈ 0.2 × 10,000 + 10/s × 10 s = 2,100 at most.
        #expect(granted <= 2100)
        #expect(granted >= 1900)
        #expect(budget.exhaustedCount == 10_000 - granted)
    }

    @Test func anExhaustedBudgetKeepsTheUpstreamAnswerOrSaysWhy() {
        var budget = RetryBudget(.init(ratio: 0, minPerSecond: 0, ttl: .seconds(10)))
        var rng = SeededRandom(seed: 1)
        var s = RetryState(policy: RetryPolicy(), method: "GET", bodyBytes: 0, start: 0, timeout: nil)
        s.attemptStarted(endpoint: "a")
        #expect(s.after(.response(status: 503), now: 0, budget: &budget, rng: &rng) == .finish)
        var c = RetryState(policy: RetryPolicy(), method: "GET", bodyBytes: 0, start: 0, timeout: nil)
        c.attemptStarted(endpoint: "a")
        #expect(c.after(.connectFailure, now: 0, budget: &budget, rng: &rng) == .giveUp(.retryBudgetExhausted))
    }
}

@Suite struct BreakerTests {
    @Test func consecutiveFailuresTripThenHalfOpenProbesClose() {
        var b = FailureBreaker()
        for i in 0..<5 {
            do {
                let ok = b.allow(now: 0)
                #expect(ok)
            }
            let changed = b.record(failed: true, latency: 1, now: 0)
            #expect(changed == (i == 4))
        }
        #expect(b.stateName == "open")
        do {
            let ok = !b.allow(now: .seconds(4))
            #expect(ok)
        }
        do {
            let ok = b.allow(now: .seconds(5))  // half-open: one probe
            #expect(ok)
        }
        do {
            let ok = !b.allow(now: .seconds(5))
            #expect(ok)
        }
        b.record(failed: false, latency: 1, now: .seconds(5))
        #expect(b.state == .closed)
    }

    @Test func openTimeDoublesOnRepeatedTripsUpToTheCap() {
        var b = FailureBreaker()
        var now: Nanos = 0
        var opens: [Nanos] = []
        for _ in 0..<6 {
            while case .closed = b.state { _ = b.allow(now: now); b.record(failed: true, latency: 1, now: now) }
            guard case .open(let until) = b.state else { return }
            opens.append(until - now)
            now = until
            do {
                let ok = b.allow(now: now)
                #expect(ok)
            }
            b.record(failed: true, latency: 1, now: now)  // the probe fails: reopen
            guard case .open(let until2) = b.state else { return }
            now = until2
            do {
                let ok = b.allow(now: now)
                #expect(ok)
            }
            b.record(failed: false, latency: 1, now: now)  // recover
            #expect(b.state == .closed)
        }
        #expect(opens[0] == .seconds(5))
        #expect(b.trips == 12)
    }

    @Test func errorRatioAndSlowCallRatioTrip() {
        var c = FailureBreaker.Config()
        c.consecutiveFailures = nil
        c.errorRatio = 0.5
        c.minRequests = 10
        var b = FailureBreaker(c)
        for i in 0..<9 { b.record(failed: i % 2 == 0, latency: 1, now: Nanos(i)) }
        #expect(b.state == .closed)  // below the minimum
        b.record(failed: true, latency: 1, now: 10)
        #expect(b.stateName == "open")

        var s = FailureBreaker.Config()
        s.consecutiveFailures = nil
        s.slowCallRatio = 0.8
        s.slowCall = .milliseconds(100)
        s.minRequests = 5
        var slow = FailureBreaker(s)
        for i in 0..<5 { slow.record(failed: false, latency: .milliseconds(500), now: Nanos(i)) }
        #expect(slow.stateName == "open")
    }

    @Test func oldSamplesLeaveTheWindow() {
        var c = FailureBreaker.Config()
        c.consecutiveFailures = nil
        c.errorRatio = 0.5
        c.minRequests = 10
        c.window = .seconds(10)
        var b = FailureBreaker(c)
        for i in 0..<8 { b.record(failed: true, latency: 1, now: Nanos(i)) }
        for i in 0..<20 { b.record(failed: false, latency: 1, now: .seconds(20) + Nanos(i)) }
        #expect(b.state == .closed)
    }

    @Test func concurrencyGateOverflows() {
        var limits = ConcurrencyLimits()
        limits.maxRequests = 2
        var g = ConcurrencyGate(limits)
        do {
            let ok = g.tryStartRequest() && g.tryStartRequest()
            #expect(ok)
        }
        do {
            let ok = !g.tryStartRequest()
            #expect(ok)
        }
        g.finishRequest()
        do {
            let ok = g.tryStartRequest()
            #expect(ok)
        }
        #expect(g.overflows == 1)
    }

    @Test func connectionsPendingAndRetriesHaveTheirOwnBounds() {
        var limits = ConcurrencyLimits()
        limits.maxConnections = 1
        limits.maxPendingRequests = 1
        var g = ConcurrencyGate(limits)
        let first = g.tryOpenConnection()
        let second = g.tryOpenConnection()  // at the cap: the request waits as pending…
        let queued = g.tryStartPending()
        let queueFull = g.tryStartPending()  // …unless the queue is full: overflow
        #expect(first && !second && queued && !queueFull)
        #expect(g.overflows == 1)
        g.connectionClosed()
        g.finishPending()
        let afterClose = g.tryOpenConnection()
        #expect(afterClose)
        // Retries: unbounded by count unless configured (the budget governs), then a cap.
        var uncapped = 0
        for _ in 0..<50 where g.tryStartRetry() { uncapped += 1 }
        #expect(uncapped == 50)
        var l = ConcurrencyLimits()
        l.maxRetries = 1
        var capped = ConcurrencyGate(l)
        let r1 = capped.tryStartRetry()
        let r2 = capped.tryStartRetry()
        capped.finishRetry()
        let r3 = capped.tryStartRetry()
        #expect(r1 && !r2 && r3)
    }
}

@Suite struct OutlierAndHealthTests {
    @Test func consecutive5xxEjectsForGrowingTimes() {
        var o = OutlierDetector()
        for i in 0..<5 {
            let ejected = o.record("a", .response(status: 500), hostCount: 10, now: 0)
            #expect(ejected == (i == 4))
        }
        #expect(o.isEjected("a", now: .seconds(29)))
        #expect(!o.isEjected("a", now: .seconds(30)))
        for _ in 0..<5 { o.record("a", .response(status: 503), hostCount: 10, now: .seconds(31)) }
        #expect(o.isEjected("a", now: .seconds(31) + .seconds(59)))  // 2nd ejection: 60 s
        #expect(o.timesEjected("a") == 2)
    }

    @Test func maxEjectionPercentKeepsHostsInService() {
        var o = OutlierDetector()  // 10 % of 3 hosts → still one allowed
        for id in ["a", "b", "c"] { for _ in 0..<5 { o.record(id, .connectFailure, hostCount: 3, now: 0) } }
        #expect(o.ejectedCount(now: 0) == 1)
    }

    @Test func successRateOutliersAreEjectedAtTheInterval() {
        var o = OutlierDetector()
        let hosts = (0..<6).map { "h\($0)" }
        for h in hosts {
            for i in 0..<200 {
                // h5 fails 30 % of its calls, never 5 in a row
                let fail = h == "h5" && i % 10 < 3
                o.record(h, fail ? .response(status: 500) : .response(status: 200), hostCount: 6, now: 0)
            }
        }
        #expect(o.evaluate(hosts: hosts, now: .seconds(5)).isEmpty)  // not yet due
        #expect(o.evaluate(hosts: hosts, now: .seconds(10)) == ["h5"])
    }

    @Test func healthThresholdsFollowTheSeedTable() {
        let cfg = HealthCheckConfig()
        var starting = HealthState()
        for _ in 0..<2 { starting.record(passed: false, config: cfg) }
        #expect(starting.status == .unknown)  // a starting app is not declared dead at once
        starting.record(passed: false, config: cfg)
        #expect(starting.status == .unhealthy)
        var h = HealthState()
        do {
            let ok = h.record(passed: true, config: cfg)  // first success: healthy at once
            #expect(ok)
        }
        #expect(h.status == .healthy)
        do {
            let ok = !h.record(passed: false, config: cfg)
            #expect(ok)
        }
        do {
            let ok = !h.record(passed: false, config: cfg)
            #expect(ok)
        }
        do {
            let ok = h.record(passed: false, error: "connection refused", config: cfg)
            #expect(ok)
        }
        #expect(h.status == .unhealthy && h.lastError == "connection refused")
        do {
            let ok = !h.record(passed: true, config: cfg)
            #expect(ok)
        }
        do {
            let ok = h.record(passed: true, config: cfg)
            #expect(ok)
        }
        #expect(h.status == .healthy)
        var rng = SeededRandom(seed: 5)
        for _ in 0..<100 {
            let d = cfg.nextDelay(rng: &rng)
            #expect(d >= .seconds(10) && d < .seconds(11))
        }
    }

    /// A sidecar's app: the start-up pace until its first pass (a minute at most), then the
    /// interval whether it passes or fails.
    @Test func theAppIsCheckedQuicklyOnlyWhileStartingUp() {
        let cfg = HealthCheckConfig()
        var rng = SeededRandom(seed: 9)
        var starting = HealthState()
        for _ in 0..<HealthCheckConfig.startupChecks {
            #expect(cfg.nextAppDelay(after: starting, rng: &rng) == .milliseconds(200))
            starting.record(passed: false, config: cfg)
        }
        // Never passed within the start-up checks: the interval from now on.
        let late = cfg.nextAppDelay(after: starting, rng: &rng)
        #expect(late >= .seconds(10) && late < .seconds(11))

        var app = HealthState()
        app.record(passed: false, config: cfg)
        app.record(passed: true, config: cfg)
        for _ in 0..<5 {
            app.record(passed: false, config: cfg)
            let d = cfg.nextAppDelay(after: app, rng: &rng)
            #expect(d >= .seconds(10) && d < .seconds(11), "\(app.status)")
        }
        #expect(app.status == .unhealthy)

        var fast = HealthCheckConfig()
        fast.interval = .milliseconds(50)
        #expect(fast.nextAppDelay(after: HealthState(), rng: &rng) == .milliseconds(50))
    }

    @Test func tokenBucketRefillsAndBounds() {
        var b = TokenBucket(.perSecond(10))
        var ok = 0
        for _ in 0..<20 where b.tryTake(now: 0) { ok += 1 }
        #expect(ok == 10)
        do {
            let ok = !b.tryTake(now: .milliseconds(50))
            #expect(ok)
        }
        do {
            let ok = b.tryTake(now: .milliseconds(100))
            #expect(ok)
        }
        do {
            let ok = !b.tryTake(now: .milliseconds(150))
            #expect(ok)
        }
        var later = 0
        for _ in 0..<20 where b.tryTake(now: .seconds(100)) { later += 1 }
        #expect(later == 10)  // never more than the burst
        var keyed = KeyedRateLimiter(.perSecond(1), maxKeys: 2)
        do {
            let ok = keyed.tryTake(key: "a", now: 0)
            #expect(ok)
        }
        do {
            let ok = !keyed.tryTake(key: "a", now: 0)
            #expect(ok)
        }
        do {
            let ok = keyed.tryTake(key: "b", now: 1)
            #expect(ok)
        }
        do {
            let ok = keyed.tryTake(key: "c", now: 2)
            #expect(ok)
        }
        #expect(keyed.keyCount == 2)
    }

    /// Regression: at capacity every new key scanned all buckets for the oldest (O(n) per
    /// request under a flood of keys). Now full buckets are swept at most every half refill
    /// time, and a busy table drops an arbitrary other bucket.
    @Test func keyedLimiterStaysBoundedAndForgetsOnlyWhatDoesNotMatter() {
        var keyed = KeyedRateLimiter(.perSecond(10, burst: 10), maxKeys: 100)  // refills in 1 s
        for i in 0..<10_000 { _ = keyed.tryTake(key: "flood-\(i)", now: Nanos(i)) }
        #expect(keyed.keyCount == 100)
        // A caller that spent its burst is remembered while its bucket refills…
        var k2 = KeyedRateLimiter(.perSecond(10, burst: 10), maxKeys: 3)
        for _ in 0..<10 { _ = k2.tryTake(key: "heavy", now: 0) }
        let limited = !k2.tryTake(key: "heavy", now: 1)
        _ = k2.tryTake(key: "a", now: 2)
        _ = k2.tryTake(key: "b", now: 3)
        #expect(limited && k2.keyCount == 3)
        // …and idle buckets (full again) are what a later sweep forgets.
        _ = k2.tryTake(key: "c", now: .seconds(5))
        #expect(k2.keyCount == 1)
    }
}

@Suite struct ClusterTests {
    func cluster(_ n: Int) -> ClusterState {
        var c = ClusterState(ClusterConfig(name: "users"))
        c.setEndpoints((0..<n).map { Endpoint(id: "u\($0)", host: "127.0.0.1", port: 8000 + $0) })
        return c
    }

    /// Regression: max_retries was checked by the HTTP/1.1 proxy alone (the HTTP/2 and TCP
    /// proxies retried without a slot). The decision now lives here, for every proxy.
    @Test func maxRetriesSlotsAreTakenByRetriesAndGivenBackWhenTheyEnd() {
        var config = ClusterConfig(name: "users")
        config.limits.maxRetries = 1
        var c = ClusterState(config)
        c.setEndpoints([Endpoint(id: "u0", host: "127.0.0.1", port: 8000)])
        let ep = c.endpoints[0]
        var rng = SeededRandom(seed: 1)
        func request() -> RetryState {
            RetryState(policy: RetryPolicy(), method: "GET", bodyBytes: 0, start: 0, timeout: nil)
        }
        var a = request()
        var b = request()
        a.attemptStarted(endpoint: "u0")
        b.attemptStarted(endpoint: "u0")
        let first = c.afterAttempt(ep, .connectFailure, latency: 1, now: 1, retry: &a, rng: &rng)
        // The only slot is taken: no upstream answer to keep, so 503 overflow…
        let second = c.afterAttempt(ep, .connectFailure, latency: 1, now: 1, retry: &b, rng: &rng)
        // …and with an answer (a retriable 503), that answer stands.
        var d = request()
        d.attemptStarted(endpoint: "u0")
        let third = c.afterAttempt(ep, .response(status: 503), latency: 1, now: 1, retry: &d, rng: &rng)
        guard case .retry = first else {
            Issue.record("expected a retry, got \(first)")
            return
        }
        #expect(second == .giveUp(.overflow) && third == .finish)
        #expect(a.holdsRetrySlot && c.gate.retries == 1)
        // The retry's attempt ends (answered): its slot goes back.
        a.attemptStarted(endpoint: "u0")
        let done = c.afterAttempt(ep, .response(status: 200), latency: 1, now: 2, retry: &a, rng: &rng)
        #expect(done == .finish && !a.holdsRetrySlot && c.gate.retries == 0)
        // A request that ends while its retry still holds the slot gives it back too.
        var e = request()
        e.attemptStarted(endpoint: "u0")
        _ = c.afterAttempt(ep, .connectFailure, latency: 1, now: 3, retry: &e, rng: &rng)
        #expect(c.gate.retries == 1)
        c.requestFinished(failed: true, latency: 1, now: 4, retry: e)
        #expect(c.gate.retries == 0)
    }

    @Test func avoidsTriedEndpointsAndEjectedOnes() {
        var c = cluster(3)
        var rng = SeededRandom(seed: 1)
        for _ in 0..<50 {
            let e = c.choose(now: 0, avoid: ["u0", "u1"], rng: &rng)!
            #expect(e.id == "u2")
        }
        for _ in 0..<5 { c.attemptFinished(c.endpoints[0], .connectFailure, latency: 1, now: 0) }
        for _ in 0..<50 { #expect(c.choose(now: 1, rng: &rng)!.id != "u0") }
    }

    @Test func panicSpreadsOverAllWhenMostAreDown() {
        var c = cluster(3)
        var rng = SeededRandom(seed: 1)
        var cfg = HealthCheckConfig()
        cfg.unhealthyThreshold = 1
        c.config.healthCheck = cfg
        _ = c.recordHealth("u0", passed: false)
        _ = c.recordHealth("u1", passed: false)
        var seen = Set<String>()
        for _ in 0..<100 { seen.insert(c.choose(now: 0, rng: &rng)!.id) }
        #expect(seen == ["u0", "u1", "u2"])
    }

    /// An endpoint failing its active checks gets no traffic until it passes again (routing
    /// looks health up only while some endpoint is failing).
    @Test func anEndpointFailingItsChecksIsSkippedUntilItPasses() {
        var c = cluster(3)
        var rng = SeededRandom(seed: 1)
        var cfg = HealthCheckConfig()
        cfg.unhealthyThreshold = 1
        cfg.healthyThreshold = 1
        c.config.healthCheck = cfg
        _ = c.recordHealth("u1", passed: false)
        var seen = Set<String>()
        for _ in 0..<100 { seen.insert(c.choose(now: 0, rng: &rng)!.id) }
        #expect(seen == ["u0", "u2"])
        _ = c.recordHealth("u1", passed: true)
        seen = []
        for _ in 0..<100 { seen.insert(c.choose(now: 0, rng: &rng)!.id) }
        #expect(seen == ["u0", "u1", "u2"])
    }

    @Test func noEndpointsMeansNoChoice() {
        var c = ClusterState(ClusterConfig(name: "empty"))
        var rng = SeededRandom(seed: 1)
        #expect(c.choose(now: 0, rng: &rng) == nil)
    }

    /// The issue's "20 % 503s" case on the pure cores: a client sees ≥ 99 % success while
    /// the upstream sees ≤ 1.25× the offered load.
    @Test func retriesWithABudgetMaskAFlakyInstanceWithoutAStorm() {
        var c = cluster(3)
        var rng = SeededRandom(seed: 42)
        var policy = RetryPolicy()
        policy.retryOn = [.gatewayError]
        var upstreamCalls = 0
        var ok = 0
        let offered = 30_000
        for i in 0..<offered {
            let now = Nanos.milliseconds(Int64(i))  // 1,000 rps
            #expect(c.admit(now: now) == nil)
            var s = RetryState(policy: policy, method: "GET", bodyBytes: 0, start: now, timeout: .seconds(15))
            var final: AttemptOutcome = .connectFailure
            while true {
                let ep = c.choose(now: now, avoid: s.tried, rng: &rng)!
                s.attemptStarted(endpoint: ep.id)
                upstreamCalls += 1
                c.attemptStarted(ep)
                let outcome: AttemptOutcome =
                    ep.id == "u1" && rng.chance(0.2) ? .response(status: 503) : .response(status: 200)
                c.attemptFinished(ep, outcome, latency: .milliseconds(5), now: now)
                final = outcome
                if case .retry = s.after(outcome, now: now, budget: &c.budget, rng: &rng) { continue }
                break
            }
            c.requestFinished(failed: final.isFailure, latency: .milliseconds(5), now: now)
            if final == .response(status: 200) { ok += 1 }
        }
        #expect(Double(ok) / Double(offered) >= 0.99)
        #expect(Double(upstreamCalls) / Double(offered) <= 1.25)
    }
}

@Suite struct CompressionPolicyTests {
    let p = CompressionPolicy()

    func check(
        _ status: Int = 200, method: String = "GET", type: String? = "application/json; charset=utf-8",
        length: Int? = 1000, encoding: String? = nil, cacheControl: String? = nil
    ) -> Bool {
        p.shouldCompress(
            status: status, method: method, contentType: type, contentLength: length, contentEncoding: encoding,
            cacheControl: cacheControl)
    }

    @Test func compressibleBodiesOverTheThresholdAreCompressed() {
        #expect(check())
        #expect(check(type: "text/html"))
        #expect(check(length: nil))  // streamed, length unknown
        #expect(check(404))  // an error page is a body like any other
    }

    @Test func everythingElseIsSentAsItIs() {
        #expect(!check(length: 29))  // Envoy's min_content_length default: 30
        #expect(check(length: 30))
        #expect(!check(type: "image/png"))
        #expect(!check(type: nil))
        #expect(!check(encoding: "br"))
        #expect(check(encoding: "identity"))
        #expect(!check(cacheControl: "public, no-transform"))
        #expect(!check(204))
        #expect(!check(304))
        #expect(!check(101))
        #expect(!check(method: "HEAD"))
    }

    @Test func contentTypesMatchByMediaTypePrefix() {
        var q = CompressionPolicy()
        q.contentTypes = ["text/"]
        #expect(
            q.shouldCompress(
                status: 200, method: "GET", contentType: "Text/CSV", contentLength: 100, contentEncoding: nil,
                cacheControl: nil))
        #expect(
            !q.shouldCompress(
                status: 200, method: "GET", contentType: "application/json", contentLength: 100, contentEncoding: nil,
                cacheControl: nil))
    }
}

@Suite struct SubsetTests {
    func endpoint(_ id: String, _ version: String) -> Endpoint {
        Endpoint(id: id, host: "10.0.0.\(id.count)", port: 80, metadata: ["version": version, "zone": "a"])
    }

    @Test func chooseKeepsToTheSubsetAndFindsNothingOutsideIt() {
        var c = ClusterState(ClusterConfig(name: "users"))
        c.setEndpoints([endpoint("a1", "v1"), endpoint("a2", "v1"), endpoint("b1", "v2")])
        var rng = SeededRandom(seed: 7)
        var picked: Set<String> = []
        for _ in 0..<50 {
            if let ep = c.choose(now: 0, subset: ["version": "v1"], rng: &rng) { picked.insert(ep.id) }
        }
        #expect(picked == ["a1", "a2"])
        #expect(c.choose(now: 0, subset: ["version": "v2", "zone": "a"], rng: &rng)?.id == "b1")
        #expect(c.choose(now: 0, subset: ["version": "v3"], rng: &rng) == nil)
        // Avoiding the only subset member still picks it (a retry has nowhere else to go).
        #expect(c.choose(now: 0, avoid: ["b1"], subset: ["version": "v2"], rng: &rng)?.id == "b1")
    }
}
