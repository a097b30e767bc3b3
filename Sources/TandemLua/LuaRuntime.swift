/// TandemLua — the only module that touches LuaJIT's C API (through CLuaJIT's shim).
///
/// Here: the runtime's version (`tandem version`); the config evaluator (LuaConfig.swift) and
/// the sandboxed policy VM (PolicyVM.swift, docs/LUA.md) live next to it. Lua errors are never
/// raised from Swift frames: everything that raises lives in the C shim.
import CLuaJIT

public enum LuaRuntime {
    /// Evaluates `return jit.version` in a fresh state, e.g. "LuaJIT 2.1.0-beta3".
    public static func version() -> String? {
        guard let L = luaL_newstate() else { return nil }
        defer { lua_close(L) }
        clj_openlib(L, luaopen_base, "")
        clj_openlib(L, luaopen_jit, "jit")
        guard clj_dostring(L, "return jit.version") == 0, let s = clj_tostring(L, -1) else { return nil }
        return String(cString: s)
    }
}
