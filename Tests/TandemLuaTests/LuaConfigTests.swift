import Testing

@testable import TandemLua

@Suite struct LuaConfigTests {
    @Test func aConfigReturnsATable() throws {
        let v = try LuaConfig.evaluate(
            source: """
                local port = tonumber(env.USERS_PORT) or 8080
                return { name = "orders", ports = { port, port + 1 }, on = true, ratio = 0.5,
                         nested = { deep = { x = "y" } } }
                """, chunkName: "orders.lua", environment: ["USERS_PORT": "9000"])
        #expect(v["name"] == .string("orders"))
        #expect(v["ports"]?.array == [.number(9000), .number(9001)])
        #expect(v["on"] == .bool(true))
        #expect(v["nested"]?["deep"]?["x"] == .string("y"))
    }

    @Test func errorsNameTheFileAndLine() {
        #expect(throws: LuaConfigError("orders.lua:2: unexpected symbol near '<eof>'")) {
            try LuaConfig.evaluate(source: "return {\n", chunkName: "orders.lua")
        }
        #expect(throws: LuaConfigError("orders.lua:1: boom")) {
            try LuaConfig.evaluate(source: "error('boom')", chunkName: "orders.lua")
        }
    }

    @Test func theSandboxHasNoIOAndNoLoaders() throws {
        let v = try LuaConfig.evaluate(
            source: """
                return { io = type(io), os = type(os), require = type(require), load = type(loadstring),
                         dofile = type(dofile), dump = type(string.dump), debug = type(debug), jit = type(jit) }
                """, chunkName: "c.lua")
        for key in ["io", "os", "require", "load", "dofile", "dump", "debug", "jit"] {
            #expect(v[key] == .string("nil"), "\(key) should not exist in the config sandbox")
        }
    }

    @Test func endlessLoopsRunOutOfBudget() {
        #expect(throws: LuaConfigError.self) {
            try LuaConfig.evaluate(source: "while true do end", chunkName: "loop.lua", instructionBudget: 100_000)
        }
        do {
            _ = try LuaConfig.evaluate(source: "while true do end", chunkName: "loop.lua", instructionBudget: 100_000)
        } catch {
            #expect(error.message.contains("instruction budget exhausted"))
        }
    }

    @Test func functionsAndBytecodeAreRejected() {
        #expect(
            throws: LuaConfigError(
                "config.f: a function cannot be part of a config (only tables, strings, numbers, booleans)")
        ) {
            try LuaConfig.evaluate(source: "return { f = function() end }", chunkName: "c.lua")
        }
        #expect(throws: LuaConfigError.self) {
            try LuaConfig.evaluate(source: "\u{1b}LJ\u{2}", chunkName: "bytecode.lua")
        }
        #expect(throws: LuaConfigError("empty.lua: the file is empty; it must return a table")) {
            try LuaConfig.evaluate(source: "", chunkName: "empty.lua")
        }
    }
}
