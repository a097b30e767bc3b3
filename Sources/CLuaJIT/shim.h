/* The C side of Tandem's LuaJIT embedding. Anything that raises a Lua error lives here,
   never in a Swift frame (see docs/ARCHITECTURE.md and shared reference swift-platform §3.3). */
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include <luajit.h>

static inline void clj_pop(lua_State *L, int n) { lua_settop(L, -(n)-1); }
static inline const char *clj_tostring(lua_State *L, int i) { return lua_tolstring(L, i, NULL); }
static inline int clj_dostring(lua_State *L, const char *s) {
    return luaL_loadstring(L, s) || lua_pcall(L, 0, LUA_MULTRET, 0);
}
static inline void clj_openlib(lua_State *L, lua_CFunction open, const char *name) {
    lua_pushcclosure(L, open, 0); lua_pushstring(L, name); lua_call(L, 1, 0);
}
static inline void clj_getglobal(lua_State *L, const char *s) { lua_getfield(L, LUA_GLOBALSINDEX, s); }
