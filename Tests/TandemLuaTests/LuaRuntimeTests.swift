import Testing

@testable import TandemLua

@Suite("LuaJIT link")
struct LuaRuntimeTests {
    @Test("the build links Debian's LuaJIT and can run a chunk in it")
    func version() throws {
        let v = try #require(LuaRuntime.version())
        #expect(v.hasPrefix("LuaJIT 2.1"))
    }
}
