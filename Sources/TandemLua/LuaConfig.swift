import CLuaJIT

/// A Lua value copied out of a VM: what a config file returns.
public indirect enum LuaValue: Equatable, Sendable {
    case `nil`
    case bool(Bool)
    case number(Double)
    case string(String)
    case table([LuaKey: LuaValue])

    public subscript(key: String) -> LuaValue? {
        if case .table(let t) = self { return t[.string(key)] }
        return nil
    }

    /// The values at 1…n when the table is a sequence (and has no other keys).
    public var array: [LuaValue]? {
        guard case .table(let t) = self else { return nil }
        var out: [LuaValue] = []
        var i = 1
        while let v = t[.index(i)] {
            out.append(v)
            i += 1
        }
        return out.count == t.count ? out : nil
    }

    public var typeName: String {
        switch self {
        case .nil: return "nil"
        case .bool: return "boolean"
        case .number: return "number"
        case .string: return "string"
        case .table: return "table"
        }
    }
}

public enum LuaKey: Hashable, Sendable, CustomStringConvertible {
    case string(String)
    case index(Int)
    public var description: String {
        switch self {
        case .string(let s): return s
        case .index(let i): return "[\(i)]"
        }
    }
}

/// Why a config file could not be evaluated: a syntax or runtime error with file:line, a
/// budget exhausted, or a value Lua config cannot return.
public struct LuaConfigError: Error, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Evaluates a config file in a fresh sandboxed VM: text only, JIT off, an instruction budget,
/// no `io`/`os`/`require`/`load*`/`dofile`/`debug`/`jit`/`ffi`/`string.dump`; an `env` table
/// holds the process environment. The file returns one table, copied out as `LuaValue`.
public enum LuaConfig {
    public static let maxDepth = 32
    public static let maxEntries = 100_000

    public static func evaluate(
        source: String, chunkName: String, environment: [String: String] = [:], instructionBudget: Int32 = 50_000_000
    ) throws(LuaConfigError) -> LuaValue {
        guard let L = luaL_newstate() else { throw LuaConfigError("cannot create a Lua state") }
        defer { lua_close(L) }
        clj_openlib(L, luaopen_base, "")
        clj_openlib(L, luaopen_table, LUA_TABLIBNAME)
        clj_openlib(L, luaopen_string, LUA_STRLIBNAME)
        clj_openlib(L, luaopen_math, LUA_MATHLIBNAME)
        for name in [
            "dofile", "loadfile", "load", "loadstring", "require", "module", "getfenv", "setfenv", "collectgarbage",
            "newproxy", "gcinfo", "print",
        ] {
            lua_pushnil(L)
            clj_setglobal(L, name)
        }
        clj_getglobal(L, "string")
        lua_pushnil(L)
        lua_setfield(L, -2, "dump")
        clj_pop(L, 1)
        clj_newtable(L)
        for (k, v) in environment {
            lua_pushstring(L, v)
            lua_setfield(L, -2, k)
        }
        clj_setglobal(L, "env")

        let bytes = Array(source.utf8)
        guard !bytes.isEmpty else { throw LuaConfigError("\(chunkName): the file is empty; it must return a table") }
        let loaded = bytes.withUnsafeBufferPointer { b in
            b.baseAddress!.withMemoryRebound(to: CChar.self, capacity: max(1, b.count)) {
                clj_load_text(L, $0, b.count, "@" + chunkName)
            }
        }
        if loaded != 0 { throw LuaConfigError(message(L)) }
        clj_set_budget(L, instructionBudget)
        if clj_pcall(L, 0, 1) != 0 { throw LuaConfigError(message(L)) }
        var entries = 0
        return try copy(L, -1, depth: 0, entries: &entries, path: "config")
    }

    private static func message(_ L: OpaquePointer) -> String {
        guard let s = clj_tostring(L, -1) else { return "error object is not a string" }
        return String(cString: s)
    }

    private static func copy(
        _ L: OpaquePointer, _ idx: Int32, depth: Int, entries: inout Int, path: String
    )
        throws(LuaConfigError) -> LuaValue
    {
        switch lua_type(L, idx) {
        case LUA_TNIL: return .nil
        case LUA_TBOOLEAN: return .bool(lua_toboolean(L, idx) != 0)
        case LUA_TNUMBER: return .number(lua_tonumber(L, idx))
        case LUA_TSTRING:
            var len = 0
            guard let p = lua_tolstring(L, idx, &len) else { return .string("") }
            return .string(String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self))
        case LUA_TTABLE:
            guard depth < maxDepth else { throw LuaConfigError("\(path): tables nested deeper than \(maxDepth)") }
            let t = idx < 0 ? lua_gettop(L) + idx + 1 : idx
            var out: [LuaKey: LuaValue] = [:]
            lua_pushnil(L)
            while lua_next(L, t) != 0 {
                entries += 1
                guard entries <= maxEntries else {
                    clj_pop(L, 2)
                    throw LuaConfigError("config has more than \(maxEntries) values")
                }
                let key: LuaKey
                switch lua_type(L, -2) {
                case LUA_TSTRING:
                    key = .string(String(cString: lua_tolstring(L, -2, nil)))
                case LUA_TNUMBER:
                    let d = lua_tonumber(L, -2)
                    guard d == d.rounded(), abs(d) < 1e15 else {
                        clj_pop(L, 2)
                        throw LuaConfigError("\(path): non-integer number keys are not allowed")
                    }
                    key = .index(Int(d))
                default:
                    clj_pop(L, 2)
                    throw LuaConfigError("\(path): keys must be strings or integers")
                }
                let v: LuaValue
                do {
                    v = try copy(L, -1, depth: depth + 1, entries: &entries, path: "\(path).\(key)")
                } catch {
                    clj_pop(L, 2)
                    throw error
                }
                out[key] = v
                clj_pop(L, 1)
            }
            return .table(out)
        default:
            let name = String(cString: lua_typename(L, lua_type(L, idx)))
            throw LuaConfigError(
                "\(path): a \(name) cannot be part of a config (only tables, strings, numbers, booleans)")
        }
    }
}
