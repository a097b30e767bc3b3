/* The C side of Tandem's LuaJIT embedding. Anything that raises a Lua error lives here,
   never in a Swift frame (see docs/ARCHITECTURE.md and shared reference swift-platform §3.3). */
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include <luajit.h>
#include "policy_vm.h"

static inline void clj_pop(lua_State *L, int n) { lua_settop(L, -(n)-1); }
static inline const char *clj_tostring(lua_State *L, int i) { return lua_tolstring(L, i, NULL); }
static inline int clj_dostring(lua_State *L, const char *s) {
    return luaL_loadstring(L, s) || lua_pcall(L, 0, LUA_MULTRET, 0);
}
static inline void clj_openlib(lua_State *L, lua_CFunction open, const char *name) {
    lua_pushcclosure(L, open, 0); lua_pushstring(L, name); lua_call(L, 1, 0);
}
static inline void clj_getglobal(lua_State *L, const char *s) { lua_getfield(L, LUA_GLOBALSINDEX, s); }

/* A count hook that raises: installed with a count equal to the whole instruction budget, it
   fires once, after that many VM instructions (JIT must be off for hooks to fire). */
static void clj_budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "instruction budget exhausted (an endless loop?)");
}
static inline void clj_set_budget(lua_State *L, int instructions) {
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    lua_sethook(L, clj_budget_hook, LUA_MASKCOUNT, instructions);
}
/* Loads text only (never precompiled bytecode) and runs it with a traceback-free pcall. */
static inline int clj_load_text(lua_State *L, const char *buf, size_t len, const char *name) {
    return luaL_loadbufferx(L, buf, len, name, "t");
}
static inline int clj_pcall(lua_State *L, int nargs, int nresults) { return lua_pcall(L, nargs, nresults, 0); }
static inline void clj_setglobal(lua_State *L, const char *s) { lua_setfield(L, LUA_GLOBALSINDEX, s); }
static inline void clj_newtable(lua_State *L) { lua_createtable(L, 0, 0); }
