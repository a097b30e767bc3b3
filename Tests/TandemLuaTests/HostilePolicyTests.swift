import Testing

@testable import TandemLua

/// Hostile scripts, each answered with a clear error while the same VM keeps serving a
/// well-behaved policy. Limits are the defaults except where a test lowers one to stay fast.
@Suite struct HostilePolicyTests {
    static let benign = #"return { name = "ok", on_request = function() return tandem.respond(200, "fine") end }"#

    /// Loads `body` as an on_request hook (or as a whole file when `whole`), runs it, and checks
    /// the VM still answers with the benign policy afterwards.
    /// The default limits without the wall clock (a busy machine must not change which limit
    /// stops a script); the time budget has its own test.
    static var deterministic: PolicyLimits {
        var l = PolicyLimits()
        l.timeMs = 0
        return l
    }

    func attack(_ body: String, whole: Bool = false, limits: PolicyLimits = deterministic) throws -> PolicyFailure? {
        let vm = try makeVM(limits: limits)
        try vm.load(id: 1, file: "ok.lua", source: Self.benign)
        let source = whole ? body : "return { name = \"hostile\", on_request = function(req, ctx, cfg)\n\(body)\nend }"
        var failure: PolicyFailure?
        do {
            try vm.load(id: 2, file: "hostile.lua", source: source)
            if case .failed(let f) = vm.onRequest(2, request()) { failure = f }
        } catch {
            failure = error
        }
        guard case .decision(let d) = vm.onRequest(1, request()), d.status == 200 else {
            Issue.record("the VM stopped serving after: \(String(describing: failure))")
            return failure
        }
        // And the hostile policy's VM still runs later calls (no stuck hook, no leaked limit).
        if vm.name(of: 2) != nil, case .failed(let again) = vm.onRequest(2, request()) {
            #expect(again.reason == failure?.reason, "\(again)")
        }
        return failure
    }

    @Test func anEndlessLoopHitsTheInstructionBudget() throws {
        let f = try attack("while true do end")
        #expect(f?.reason == .instructions, "\(String(describing: f))")
        #expect(f?.message.contains("instruction budget exhausted") == true)
    }

    @Test func anEndlessLoopHitsTheTimeBudgetWhenThatComesFirst() throws {
        var limits = PolicyLimits()
        limits.instructions = Int.max / 2
        limits.timeMs = 20
        let f = try attack("local x = 0 while true do x = x + 1 end", limits: limits)
        #expect(f?.reason == .timeout, "\(String(describing: f))")
    }

    @Test func pcallCannotSwallowALimit() throws {
        let f = try attack(
            """
            while true do
              pcall(function() while true do end end)
              xpcall(function() while true do end end, function(e) return e end)
            end
            """)
        #expect(f?.reason == .instructions, "\(String(describing: f))")
    }

    @Test func aMemoryBombHitsTheCapAndPcallCannotCatchIt() throws {
        var limits = Self.deterministic
        limits.memoryBytes = 8 << 20
        let f = try attack(
            """
            local ok = pcall(function() local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end end)
            return tandem.respond(200, "survived " .. tostring(ok))
            """, limits: limits)
        #expect(f?.reason == .memory, "\(String(describing: f))")
        #expect(f?.message.contains("memory limit of 8388608 bytes") == true)
        let g = try attack(#"local s = string.rep("x", 2^30)"#, limits: limits)
        #expect(g?.reason == .memory, "\(String(describing: g))")
    }

    /// The allocator keeps freed small blocks for reuse, up to its bound: a request that drops
    /// thousands of tables and strings of every small size (growing and shrinking across the
    /// pool's size classes) leaves at most the bound pooled, and what the next requests build
    /// in the reused blocks reads back intact.
    @Test func freedSmallBlocksAreReusedWithinTheirBound() throws {
        let vm = try makeVM(limits: Self.deterministic)
        try vm.load(
            id: 1, file: "churn.lua",
            source: """
                return { name = "churn", on_request = function(req, ctx)
                  local keep, sum = {}, 0
                  for i = 1, 3000 do
                    local t = {}
                    for j = 1, i % 40 do t[j] = j; t["k" .. j] = j end  -- array and hash parts grow
                    local s = string.rep("v", i % 300) .. i
                    if i % 7 == 0 then keep[#keep + 1] = { t = t, s = s, n = i } end
                  end
                  for _, e in ipairs(keep) do
                    local n = 0
                    for j = 1, e.n % 40 do n = n + e.t[j] + e.t["k" .. j] end
                    if n ~= (e.n % 40) * (e.n % 40 + 1) or e.s ~= string.rep("v", e.n % 300) .. e.n then
                      error("block of request item " .. e.n .. " changed")
                    end
                    sum = sum + n
                  end
                  ctx.sum = sum
                end }
                """)
        for _ in 0..<4 {
            let ex = request()
            #expect(vm.onRequest(1, ex) == .proceed)
            vm.end(ex)
            vm.collectGarbage()  // the request's garbage, freed at once
            #expect(vm.pooledBytes > 0)
            #expect(vm.pooledBytes <= PolicyVM.pooledBytesLimit)
        }
    }

    /// Header values live in the host's memory, outside the VM's cap: a hook adding headers in a
    /// loop stops at `PolicyLimits.headerFields` with an error (request and answer alike), while
    /// setting one header over and over keeps one change.
    @Test func headersAddedInALoopStopAtTheBound() throws {
        let f = try attack(#"for i = 1, 1e4 do req:add_header("x-bomb", string.rep("x", 16000)) end"#)
        #expect(
            f?.reason == .error && f?.message.contains("too many request header fields (the limit is 256)") == true,
            "\(String(describing: f))")

        let vm = try makeVM(limits: Self.deterministic)
        try vm.load(
            id: 1, file: "res.lua",
            source: """
                return { name = "res", on_response = function(res)
                  for i = 1, 1000 do res:set_header("x-same", tostring(i)) end
                  for i = 1, 2000 do res:set_header("x-" .. i, "v") end
                end }
                """)
        let ex = request()
        ex.responseHeaderSource = { [(name: "server", value: "app")] }
        guard case .failed(let g) = vm.onResponse(1, ex) else { Issue.record("no error"); return }
        #expect(g.message.contains("too many response header changes (the limit is 256)"), "\(g)")
        #expect(ex.responseEdits.count == 257)
        #expect(ex.responseEdits.filter { $0.name == "x-same" }.map(\.value) == ["1000"])
    }

    @Test func aCatastrophicPatternIsRefusedBeforeItRuns() throws {
        let f = try attack(#"return tandem.respond(200, tostring(string.rep("a", 2000):find(".-.-b")))"#)
        #expect(f?.reason == .error)
        #expect(
            f?.message.contains(#"string.find: pattern ".-.-b" could backtrack"#) == true, "\(String(describing: f))")
        // Method syntax and gsub go through the same bound.
        let g = try attack(#"local s = string.rep("a", 5000) s:gsub("a*a*a*b", "")"#)
        #expect(g?.message.contains("string.gsub: pattern") == true, "\(String(describing: g))")
        // Ordinary patterns on headers are fine.
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "p.lua",
            source: """
                return { name = "p", on_request = function(req)
                  local token = (req:header("authorization") or ""):match("^Bearer%s+(.+)$")
                  return tandem.respond(200, token) end }
                """)
        guard case .decision(let d) = vm.onRequest(1, request(headers: [("authorization", "Bearer abc.def")])) else {
            Issue.record("no answer")
            return
        }
        #expect(String(decoding: d.body, as: UTF8.self) == "abc.def")
    }

    @Test func noOSNoIONoRequireNoFFI() throws {
        for (code, mentions) in [
            (#"os.execute("touch tandem-pwned")"#, "os"),
            (#"io.open("/etc/passwd")"#, "io"),
            (#"require "ffi""#, "require"),
            (#"local ffi = package.loaded.ffi"#, "package"),
            (#"debug.sethook()"#, "debug"),
            (#"jit.on()"#, "jit"),
            (#"collectgarbage("stop")"#, "collectgarbage"),
            (#"newproxy(true)"#, "newproxy"),
            (#"setfenv(1, {})"#, "setfenv"),
            (#"getfenv(0).x = 1"#, "getfenv"),
            (#"dofile("/etc/passwd")"#, "dofile"),
            (#"loadstring("return 1")()"#, "loadstring"),
        ] {
            let f = try attack(code)
            #expect(f?.reason == .error, "\(code)")
            #expect(
                f?.message.contains("attempt to") == true && f?.message.contains(mentions) == true,
                "\(code): \(String(describing: f))")
        }
    }

    @Test func bytecodeCannotBeLoaded() throws {
        let f = try attack(#"local f = function() end return load(string.dump(f))()"#)
        #expect(f?.reason == .error)
        #expect(f?.message.contains("dump") == true || f?.message.contains("load") == true, "\(String(describing: f))")
    }

    @Test func theEnvironmentAndStringMetatableAreLocked() throws {
        let f = try attack(#"setmetatable(_G, { __index = function() return 1 end })"#)
        #expect(f?.message.contains("cannot change a protected metatable") == true, "\(String(describing: f))")
        let g = try attack(
            #"local mt = getmetatable("") if mt then mt.__index.upper = nil end return tandem.respond(200, tostring(mt))"#
        )
        // getmetatable("") is false: nothing to tamper with, and the benign policy still works.
        #expect(g == nil)
        // One policy changing its `string` or `tandem` tables does not affect another.
        let vm = try makeVM()
        try vm.load(
            id: 1, file: "a.lua",
            source: #"return { name = "a", on_request = function() string.rep = nil tandem.respond = nil end }"#)
        try vm.load(
            id: 2, file: "b.lua",
            source:
                #"return { name = "b", on_request = function() return tandem.respond(200, string.rep("b", 2)) end }"#)
        #expect(vm.onRequest(1, request()) == .proceed)
        guard case .decision(let d) = vm.onRequest(2, request()) else { Issue.record("b broken"); return }
        #expect(String(decoding: d.body, as: UTF8.self) == "bb")
    }

    @Test func errorsFromEveryHookAreReportedWithFileAndLine() throws {
        let vm = try makeVM()
        #expect(throws: PolicyFailure(policy: "boom", reason: .error, message: "boom.lua:2: init failed")) {
            try vm.load(
                id: 1, file: "boom.lua",
                source:
                    "return { name = 'boom', on_request = function() end,\ninit = function() error('init failed') end }"
            )
        }
        try vm.load(
            id: 1, file: "boom.lua",
            source: """
                return { name = "boom",
                  on_request = function() error("in request") end,
                  on_response = function() error({}) end,
                  on_log = function() local x = nil; return x.y end }
                """)
        let ex = request()
        #expect(
            vm.onRequest(1, ex)
                == .failed(PolicyFailure(policy: "boom", reason: .error, message: "boom.lua:2: in request")))
        #expect(
            vm.onResponse(1, ex)
                == .failed(PolicyFailure(policy: "boom", reason: .error, message: "error object is a table")))
        guard case .failed(let f) = vm.onLog(1, ex) else { Issue.record("no log error"); return }
        #expect(f.message.hasPrefix("boom.lua:4: attempt to index local 'x'"), "\(f)")
        #expect(vm.services.counters["boom"]?.errors[.error] == 3)
    }

    @Test func garbageReturnsAreErrors() throws {
        let f = try attack(#"return 42"#)
        #expect(
            f?.message.contains("on_request returned number 42; return nothing to continue") == true,
            "\(String(describing: f))")
        let g = try attack(#"return tandem.respond(999)"#)
        #expect(g?.message.contains("status must be an integer from 200 to 599") == true, "\(String(describing: g))")
        let h = try attack(#"return { name = 5 }"#, whole: true)
        #expect(h?.message.contains("name: expected a non-empty string") == true, "\(String(describing: h))")
        let i = try attack(#"return "not a table""#, whole: true)
        #expect(i?.message.contains("a policy must return a table") == true, "\(String(describing: i))")
    }
}
