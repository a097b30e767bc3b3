-- luacheck settings for Tandem policies (`luacheck policies/`): the globals the policy sandbox
-- has and nothing else. Editors with LuaLS read tandem.d.lua for types and completion.
std = "lua51"
read_globals = { "tandem" }
not_globals = {
  "io", "os", "require", "package", "module", "load", "loadstring", "dofile", "loadfile", "debug", "jit", "ffi",
  "collectgarbage", "setfenv", "getfenv", "newproxy", "gcinfo", "coroutine",
}
files["**/*.cases.lua"] = { std = "lua51" }
max_line_length = 120
