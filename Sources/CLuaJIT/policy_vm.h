/* The C half of Tandem's policy VM (docs/LUA.md). Everything that can raise a Lua error or
   allocate inside a VM lives here, never in a Swift frame:
   - a capped allocator (the VM's memory limit; refusing yields LUA_ERRMEM),
   - a count hook that enforces an instruction budget and a wall-clock deadline per call,
     escalating to every instruction once tripped so that a `pcall` loop cannot swallow the
     limit: armed for the VM's life when there is no wall-clock limit (deterministic runs), else
     armed by the watchdog thread only for a call that runs past one watchdog tick (with a
     count hook installed, every bytecode goes through LuaJIT's hook dispatch),
   - `pcall`/`xpcall` replacements that re-raise limit and out-of-memory errors,
   - pattern functions (`string.find/match/gmatch/gsub`) that refuse a subject/pattern pair whose
     worst-case backtracking exceeds a step budget (the matcher is C: hooks cannot stop it),
   - the host bridge: one C closure per host operation that copies its arguments out, calls the
     Swift dispatcher, and pushes the results Swift left in the VM's result buffer.
   Editing this file: SwiftPM does not rebuild TandemLua when only this header changed (seen with
   an incremental release build); touch the files of Sources/TandemLua that import CLuaJIT. A
   debug build compiles them one by one: touching one leaves the others with the old layout of
   clj_vm (seen: PolicyWatchdog.swift writing its fields over the allocator's pool). */
#ifndef TANDEM_POLICY_VM_H
#define TANDEM_POLICY_VM_H
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include <luajit.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sys/prctl.h>

enum { CLJ_NIL = 0, CLJ_BOOL = 1, CLJ_NUMBER = 2, CLJ_STRING = 3, CLJ_OTHER = 4 };
enum { CLJ_MAX_ARGS = 8, CLJ_MAX_RESULTS = 8, CLJ_HOOK_PERIOD = 1000, CLJ_MAX_ENDED = 64 };
enum { CLJ_LIMIT_NONE = 0, CLJ_LIMIT_INSTRUCTIONS = 1, CLJ_LIMIT_TIME = 2 };
/* The small-block pool: blocks up to CLJ_POOL_MAX bytes in size classes of CLJ_POOL_GRAIN,
   at most CLJ_POOL_BYTES kept per VM (see clj_alloc). */
enum { CLJ_POOL_GRAIN = 16, CLJ_POOL_CLASSES = 16, CLJ_POOL_MAX = CLJ_POOL_GRAIN * CLJ_POOL_CLASSES,
       CLJ_POOL_BYTES = 256 * 1024 };

typedef struct { int type; double number; const char *string; size_t length; } clj_arg;
typedef struct { int type; double number; size_t offset, length; } clj_result;

struct clj_vm;
/* Returns 0 with results set, or 1 with results[0] the error message (a string). */
typedef int (*clj_dispatch_fn)(void *host, int op, const clj_arg *args, int nargs, struct clj_vm *vm);

typedef struct clj_vm {
    /* memory */
    size_t used, limit, peak;
    int refused;
    void *pool[CLJ_POOL_CLASSES]; /* free small blocks per size class, linked through their first word */
    size_t pooled;                /* bytes the pool keeps (not counted in `used`) */
    /* per call budgets (written by the host before each call) */
    long long periods_left;   /* instruction budget in units of CLJ_HOOK_PERIOD */
    long long deadline_ns;    /* CLOCK_MONOTONIC; 0 = no wall-clock limit (simulation) */
    int tripped;              /* which limit stopped the current call (CLJ_LIMIT_*) */
    long long hook_instructions, hook_time_ns; /* each hook's budget (a call may run several) */
    int at;                   /* 1-based position in its chain of the hook running now */
    /* The watchdog (PolicyWatchdog.swift; docs/LUA.md). Written by the VM's thread and read by
       the watchdog's (and `armed` the other way) through the __atomic builtins. */
    int watched;              /* 1: the watchdog arms the hook; 0: armed for the VM's life */
    int armed;                /* watched VMs: the count hook is installed */
    int in_call;              /* a call into the VM is running */
    unsigned long long calls; /* calls started */
    int *parked;              /* the watchdog sleeps until a call starts (shared by all VMs) */
    void (*wake)(void *);     /* wakes a parked watchdog (its argument: wake_context) */
    void *wake_context;
    pthread_mutex_t *watch_lock; /* serialises lua_sethook between the two threads */
    /* requests that ended (their generations), for the prelude to drop in one call */
    double ended[CLJ_MAX_ENDED];
    int nended;
    /* patterns */
    double pattern_steps;     /* worst-case backtracking steps allowed per pattern call */
    size_t pattern_subject;   /* hard cap on a pattern subject, bytes */
    size_t pattern_length;    /* cap on a pattern's own length, bytes */
    /* host bridge */
    void *host;
    clj_dispatch_fn dispatch;
    clj_result results[CLJ_MAX_RESULTS];
    int nresults;
    char *buffer;
    size_t buffer_used, buffer_capacity;
    int entry_ref;
    /* The request headers of one request (its generation; 0: none), so req:header reads
       them here without a host call. Copied by the host when on_request starts; dropped when
       a hook changes them (reads then take the host call). Bounded by the request's own
       header limits (the decoder's). */
    double fields_generation;
    int fields_op;            /* the host operation req_header, for what the view cannot answer */
    char *field_bytes;
    size_t field_bytes_used, field_bytes_capacity;
    struct clj_field { size_t name, name_length, value, value_length; } *fields;
    int nfields, fields_capacity;
} clj_vm;

/* The coarse clock (a few ms resolution) is enough for budgets of tens of ms and costs a
   fraction of CLOCK_MONOTONIC, read twice per hook call. */
static inline long long clj_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The VM's allocator: Lua's memory limit, and a pool of small blocks. A request's tables,
   strings and closures are small and short-lived; kept on per-size free lists they are reused
   by the next request instead of going through malloc and free each time (which also fed
   glibc's fastbins, whose consolidation then ran on the proxy's large allocations). The pool
   holds at most CLJ_POOL_BYTES; past that, blocks go back to free(). */
static inline int clj_pool_class(size_t n) { return (int)((n + CLJ_POOL_GRAIN - 1) / CLJ_POOL_GRAIN) - 1; }
static inline void *clj_block_new(clj_vm *vm, size_t n) {
    if (n > CLJ_POOL_MAX) return malloc(n);
    int c = clj_pool_class(n);
    void *p = vm->pool[c];
    if (p) {
        vm->pool[c] = *(void **)p;
        vm->pooled -= (size_t)(c + 1) * CLJ_POOL_GRAIN;
        return p;
    }
    return malloc((size_t)(c + 1) * CLJ_POOL_GRAIN); /* the class's size: any block of it fits */
}
static inline void clj_block_free(clj_vm *vm, void *p, size_t n) {
    if (n <= CLJ_POOL_MAX) {
        int c = clj_pool_class(n);
        size_t size = (size_t)(c + 1) * CLJ_POOL_GRAIN;
        if (vm->pooled + size <= CLJ_POOL_BYTES) {
            *(void **)p = vm->pool[c];
            vm->pool[c] = p;
            vm->pooled += size;
            return;
        }
    }
    free(p);
}
/* After lua_close: the pool's blocks go back to malloc. */
static inline void clj_pool_free(clj_vm *vm) {
    for (int c = 0; c < CLJ_POOL_CLASSES; c++) {
        void *p = vm->pool[c];
        while (p) {
            void *next = *(void **)p;
            free(p);
            p = next;
        }
        vm->pool[c] = NULL;
    }
    vm->pooled = 0;
}

static void *clj_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    clj_vm *vm = (clj_vm *)ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        if (ptr) { vm->used -= osize; clj_block_free(vm, ptr, osize); }
        return NULL;
    }
    if (nsize > old && vm->used - old + nsize > vm->limit) { vm->refused = 1; return NULL; }
    void *p;
    if (!ptr) {
        p = clj_block_new(vm, nsize);
    } else if (osize > CLJ_POOL_MAX && nsize > CLJ_POOL_MAX) {
        p = realloc(ptr, nsize);
    } else if (osize <= CLJ_POOL_MAX && nsize <= CLJ_POOL_MAX && clj_pool_class(osize) == clj_pool_class(nsize)) {
        p = ptr; /* the block already has the class's size */
    } else {
        p = clj_block_new(vm, nsize); /* on failure the old block stays, as Lua expects */
        if (p) {
            memcpy(p, ptr, osize < nsize ? osize : nsize);
            clj_block_free(vm, ptr, osize);
        }
    }
    if (p) {
        vm->used = vm->used - old + nsize;
        if (vm->used > vm->peak) vm->peak = vm->used;
    }
    return p;
}

static inline clj_vm *clj_vm_of(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return (clj_vm *)ud;
}

static void clj_limit_hook(lua_State *L, lua_Debug *ar) {
    clj_vm *vm = clj_vm_of(L);
    if (!vm->tripped) {
        vm->periods_left -= 1;
        if (vm->periods_left < 0) vm->tripped = CLJ_LIMIT_INSTRUCTIONS;
        else if (vm->deadline_ns != 0 && clj_now_ns() > vm->deadline_ns) vm->tripped = CLJ_LIMIT_TIME;
        else return;
        /* From now on every instruction raises, so no handler can keep running. */
        if (vm->watched) pthread_mutex_lock(vm->watch_lock);
        lua_sethook(L, clj_limit_hook, LUA_MASKCOUNT, 1);
        if (vm->watched) pthread_mutex_unlock(vm->watch_lock);
    }
    /* Name the line that was running (file:line of the policy, as other errors do). */
    const char *what = vm->tripped == CLJ_LIMIT_TIME ? "time" : "instruction";
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
        lua_pushfstring(L, "%s:%d: policy-limit: %s budget exhausted", ar->short_src, ar->currentline, what);
    else
        lua_pushfstring(L, "policy-limit: %s budget exhausted", what);
    lua_error(L);
}

/* Before each call into the VM: every hook the call runs gets `instructions` and `time_ns`. */
static inline void clj_arm(clj_vm *vm, long long instructions, long long time_ns) {
    vm->hook_instructions = instructions;
    vm->hook_time_ns = time_ns;
    vm->periods_left = instructions / CLJ_HOOK_PERIOD;
    vm->deadline_ns = time_ns > 0 ? clj_now_ns() + time_ns : 0;
    vm->tripped = CLJ_LIMIT_NONE;
    vm->refused = 0;
    vm->at = 0;
}

/* Lua (prelude only): next_hook(i) before the i-th hook of a chain: a fresh budget for it, and
   the host learns which policy runs (host calls and failures are attributed to it). */
static int clj_next_hook(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    vm->at = (int)lua_tointeger(L, 1);
    vm->periods_left = vm->hook_instructions / CLJ_HOOK_PERIOD;
    vm->deadline_ns = vm->hook_time_ns > 0 ? clj_now_ns() + vm->hook_time_ns : 0;
    return 0;
}
/* After a call that tripped: back to one hook per period. */
static inline void clj_rearm(lua_State *L) { lua_sethook(L, clj_limit_hook, LUA_MASKCOUNT, CLJ_HOOK_PERIOD); }

/* ---- the watchdog's side (called on its thread, holding *watch_lock) ----
   lua_sethook may be called asynchronously (LuaJIT, lj_dispatch.c): it rewrites the dispatch
   table that the interpreter reads, word by word. Only the two writers need ordering: the
   watchdog arms (armed 0 -> 1) and the VM's thread disarms (1 -> 0) or escalates (while armed),
   each holding the lock. */
static inline unsigned long long clj_watch_calls(const clj_vm *vm) { return __atomic_load_n(&vm->calls, __ATOMIC_SEQ_CST); }
static inline int clj_watch_in_call(const clj_vm *vm) { return __atomic_load_n(&vm->in_call, __ATOMIC_SEQ_CST); }
static inline int clj_watch_armed(const clj_vm *vm) { return __atomic_load_n(&vm->armed, __ATOMIC_SEQ_CST); }
static inline void clj_watch_arm(lua_State *L, clj_vm *vm) {
    __atomic_store_n(&vm->armed, 1, __ATOMIC_SEQ_CST);
    lua_sethook(L, clj_limit_hook, LUA_MASKCOUNT, CLJ_HOOK_PERIOD);
}
static inline void clj_watch_set_parked(int *parked, int value) { __atomic_store_n(parked, value, __ATOMIC_SEQ_CST); }
static inline int clj_watch_parked(const int *parked) { return __atomic_load_n(parked, __ATOMIC_SEQ_CST); }
/* Names the calling thread (at most 15 bytes show), as `ps -L` and /proc list it. */
static inline void clj_name_thread(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
/* Whether a count hook is installed now (tests). */
static inline int clj_hook_installed(lua_State *L) { return lua_gethookmask(L) != 0; }

static int clj_safe_pcall(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    luaL_checkany(L, 1);
    int status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    if (status != 0 && (vm->tripped || status == LUA_ERRMEM || vm->refused)) return lua_error(L);
    lua_pushboolean(L, status == 0);
    lua_insert(L, 1);
    return lua_gettop(L);
}

static int clj_safe_xpcall(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    luaL_checkany(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_insert(L, 1); /* handler, f */
    int status = lua_pcall(L, 0, LUA_MULTRET, 1);
    if (status != 0 && (vm->tripped || status == LUA_ERRMEM || vm->refused)) return lua_error(L);
    lua_pushboolean(L, status == 0);
    lua_replace(L, 1);
    return lua_gettop(L);
}

/* Lua (prelude only): ended(i) -> the generation of the i-th ended request, or nil. */
static int clj_ended(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    int i = (int)lua_tointeger(L, 1);
    if (i < 1 || i > vm->nended) return 0;
    lua_pushnumber(L, vm->ended[i - 1]);
    return 1;
}

/* Lua (prelude only): new_ctx() -> a request's ctx, made with room for a few keys: the first
   key a hook stores would otherwise rehash an empty table (LuaJIT's `table.new` is behind
   `require`, which policies do not get). */
static int clj_new_ctx(lua_State *L) {
    lua_createtable(L, 0, 4);
    return 1;
}

/* Worst-case backtracking of Lua's matcher: each `*`, `+` or `-` quantifier can try every
   length, nested, so the steps grow as subject^(quantifiers), times every start position when
   the pattern is not anchored (gmatch and gsub always scan). */
static double clj_pattern_cost(const char *p, size_t plen, size_t n, int scans) {
    int quantifiers = 0;
    size_t i = 0;
    int anchored = plen > 0 && p[0] == '^' && !scans;
    if (anchored) i = 1;
    while (i < plen) {
        char c = p[i];
        size_t end = i + 1;
        if (c == '%') {
            if (i + 1 < plen && (p[i + 1] == 'b')) { i += 4; continue; }
            if (i + 1 < plen && (p[i + 1] == 'f')) {
                i += 2;
                if (i < plen && p[i] == '[') { /* skip the set below */ c = '['; } else continue;
            } else end = i + 2;
        }
        if (c == '[') {
            size_t j = i + 1;
            if (j < plen && p[j] == '^') j++;
            if (j < plen && p[j] == ']') j++;
            while (j < plen && p[j] != ']') { if (p[j] == '%') j++; j++; }
            end = j + 1;
        }
        if (end < plen && (p[end] == '*' || p[end] == '+' || p[end] == '-')) { quantifiers++; end++; }
        else if (end < plen && p[end] == '?') end++;
        i = end;
    }
    double cost = 1.0, base = (double)(n + 1);
    for (int q = 0; q < quantifiers + (anchored ? 0 : 1); q++) cost *= base;
    return cost;
}

/* Upvalue 1: the original string function; upvalue 2: its name; upvalue 3: 1 for gmatch/gsub. */
static int clj_bounded_pattern(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    size_t n = 0, plen = 0;
    const char *name = lua_tostring(L, lua_upvalueindex(2));
    int scans = (int)lua_tointeger(L, lua_upvalueindex(3));
    if (lua_type(L, 1) == LUA_TSTRING && lua_type(L, 2) == LUA_TSTRING) {
        lua_tolstring(L, 1, &n);
        const char *p = lua_tolstring(L, 2, &plen);
        int plain = !scans && lua_gettop(L) >= 4 && lua_toboolean(L, 4) && name[0] == 'f';
        if (n > vm->pattern_subject)
            return luaL_error(L, "string.%s: a %d-byte subject is over the %d-byte pattern limit", name, (int)n,
                              (int)vm->pattern_subject);
        if (plen > vm->pattern_length)
            return luaL_error(L, "string.%s: a %d-byte pattern is over the %d-byte limit", name, (int)plen,
                              (int)vm->pattern_length);
        if (!plain) {
            double cost = clj_pattern_cost(p, plen, n, scans);
            if (cost > vm->pattern_steps)
                return luaL_error(L,
                                  "string.%s: pattern \"%s\" could backtrack ~%.0e steps over a %d-byte subject "
                                  "(limit %.0e); anchor it, use fewer quantifiers, or a shorter subject",
                                  name, p, cost, (int)n, vm->pattern_steps);
        }
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* ---- host bridge ---- */

static inline int clj_buffer_reserve(clj_vm *vm, size_t more) {
    if (vm->buffer_used + more <= vm->buffer_capacity) return 0;
    size_t cap = vm->buffer_capacity ? vm->buffer_capacity : 4096;
    while (cap < vm->buffer_used + more) cap *= 2;
    char *b = (char *)realloc(vm->buffer, cap);
    if (!b) return -1;
    vm->buffer = b;
    vm->buffer_capacity = cap;
    return 0;
}
static inline void clj_result_nil(clj_vm *vm) {
    if (vm->nresults < CLJ_MAX_RESULTS) vm->results[vm->nresults++] = (clj_result){CLJ_NIL, 0, 0, 0};
}
static inline void clj_result_bool(clj_vm *vm, int b) {
    if (vm->nresults < CLJ_MAX_RESULTS) vm->results[vm->nresults++] = (clj_result){CLJ_BOOL, b ? 1 : 0, 0, 0};
}
static inline void clj_result_number(clj_vm *vm, double d) {
    if (vm->nresults < CLJ_MAX_RESULTS) vm->results[vm->nresults++] = (clj_result){CLJ_NUMBER, d, 0, 0};
}
static inline int clj_result_string(clj_vm *vm, const char *s, size_t len) {
    if (vm->nresults >= CLJ_MAX_RESULTS || clj_buffer_reserve(vm, len) != 0) return -1;
    if (len) memcpy(vm->buffer + vm->buffer_used, s, len);
    vm->results[vm->nresults++] = (clj_result){CLJ_STRING, 0, vm->buffer_used, len};
    vm->buffer_used += len;
    return 0;
}

static int clj_host_call_op(lua_State *L, clj_vm *vm, int op);

/* Upvalue 1: the operation number. */
static int clj_host_call(lua_State *L) {
    return clj_host_call_op(L, clj_vm_of(L), (int)lua_tointeger(L, lua_upvalueindex(1)));
}

/* ---- the request's header fields, C side ---- */

static inline void clj_fields_reset(clj_vm *vm, double generation) {
    vm->fields_generation = generation;
    vm->field_bytes_used = 0;
    vm->nfields = 0;
}
/* One field; -1 (and no view) when memory runs out. */
static int clj_fields_add(clj_vm *vm, const char *name, size_t name_length, const char *value, size_t value_length) {
    if (vm->nfields == vm->fields_capacity) {
        int cap = vm->fields_capacity ? vm->fields_capacity * 2 : 32;
        struct clj_field *f = (struct clj_field *)realloc(vm->fields, (size_t)cap * sizeof(struct clj_field));
        if (!f) { vm->fields_generation = 0; return -1; }
        vm->fields = f;
        vm->fields_capacity = cap;
    }
    size_t need = vm->field_bytes_used + name_length + value_length;
    if (need > vm->field_bytes_capacity) {
        size_t cap = vm->field_bytes_capacity ? vm->field_bytes_capacity : 2048;
        while (cap < need) cap *= 2;
        char *b = (char *)realloc(vm->field_bytes, cap);
        if (!b) { vm->fields_generation = 0; return -1; }
        vm->field_bytes = b;
        vm->field_bytes_capacity = cap;
    }
    struct clj_field *f = &vm->fields[vm->nfields++];
    f->name = vm->field_bytes_used;
    f->name_length = name_length;
    if (name_length) memcpy(vm->field_bytes + vm->field_bytes_used, name, name_length);
    vm->field_bytes_used += name_length;
    f->value = vm->field_bytes_used;
    f->value_length = value_length;
    if (value_length) memcpy(vm->field_bytes + vm->field_bytes_used, value, value_length);
    vm->field_bytes_used += value_length;
    return 0;
}
static inline void clj_fields_free(clj_vm *vm) {
    free(vm->fields);
    free(vm->field_bytes);
    vm->fields = NULL;
    vm->field_bytes = NULL;
    vm->fields_capacity = 0;
    vm->field_bytes_capacity = 0;
    clj_fields_reset(vm, 0);
}
/* ASCII letters compare without case, every other byte exactly (as the host's sameName). */
static inline int clj_same_name(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char p = (unsigned char)a[i], q = (unsigned char)b[i];
        if (p != q) {
            unsigned char lp = p | 0x20, lq = q | 0x20;
            if (lp != lq || lp < 'a' || lp > 'z') return 0;
        }
    }
    return 1;
}
/* Lua (prelude only): req_header(generation, name, nth) -> the nth value of the request's
   field `name`, or nil; answered from the view when it holds this request, else by the host
   operation (which also refuses a handle kept past its request). */
static int clj_req_header(lua_State *L) {
    clj_vm *vm = clj_vm_of(L);
    int n = lua_gettop(L);
    if (vm->fields_generation != 0 && n >= 2 && n <= 3 && lua_type(L, 1) == LUA_TNUMBER &&
        lua_tonumber(L, 1) == vm->fields_generation && lua_type(L, 2) == LUA_TSTRING &&
        (n == 2 || lua_type(L, 3) == LUA_TNUMBER)) {
        size_t len = 0;
        const char *name = lua_tolstring(L, 2, &len);
        lua_Number want = n == 3 ? lua_tonumber(L, 3) : 1;
        if (want >= 1 && want <= 1e9) {
            long nth = (long)want;
            for (int i = 0; i < vm->nfields; i++) {
                const struct clj_field *f = &vm->fields[i];
                if (f->name_length == len && clj_same_name(vm->field_bytes + f->name, name, len) && --nth == 0) {
                    lua_pushlstring(L, vm->field_bytes + f->value, f->value_length);
                    return 1;
                }
            }
            lua_pushnil(L);
            return 1;
        }
    }
    return clj_host_call_op(L, vm, vm->fields_op);
}

static int clj_host_call_op(lua_State *L, clj_vm *vm, int op) {
    int n = lua_gettop(L);
    if (n > CLJ_MAX_ARGS) return luaL_error(L, "too many arguments (at most %d)", CLJ_MAX_ARGS);
    clj_arg args[CLJ_MAX_ARGS];
    for (int i = 0; i < n; i++) {
        int t = lua_type(L, i + 1);
        args[i].string = NULL;
        args[i].length = 0;
        args[i].number = 0;
        switch (t) {
        case LUA_TNIL: case LUA_TNONE: args[i].type = CLJ_NIL; break;
        case LUA_TBOOLEAN: args[i].type = CLJ_BOOL; args[i].number = lua_toboolean(L, i + 1); break;
        case LUA_TNUMBER: args[i].type = CLJ_NUMBER; args[i].number = lua_tonumber(L, i + 1); break;
        case LUA_TSTRING: args[i].type = CLJ_STRING; args[i].string = lua_tolstring(L, i + 1, &args[i].length); break;
        default: args[i].type = CLJ_OTHER; break;
        }
    }
    vm->nresults = 0;
    vm->buffer_used = 0;
    int status = vm->dispatch(vm->host, op, args, n, vm);
    if (status != 0) {
        luaL_where(L, 1);
        if (vm->nresults > 0 && vm->results[0].type == CLJ_STRING)
            lua_pushlstring(L, vm->buffer + vm->results[0].offset, vm->results[0].length);
        else
            lua_pushliteral(L, "host call failed");
        lua_concat(L, 2);
        return lua_error(L);
    }
    int count = vm->nresults;
    for (int i = 0; i < count; i++) {
        clj_result r = vm->results[i];
        switch (r.type) {
        case CLJ_BOOL: lua_pushboolean(L, (int)r.number); break;
        case CLJ_NUMBER: lua_pushnumber(L, r.number); break;
        case CLJ_STRING: lua_pushlstring(L, vm->buffer + r.offset, r.length); break;
        default: lua_pushnil(L); break;
        }
    }
    return count;
}

/* Lua: host_function(op) -> a C closure for host operation `op` (used by the trusted prelude). */
static int clj_make_host_function(lua_State *L) {
    lua_Integer op = luaL_checkinteger(L, 1);
    lua_pushinteger(L, op);
    lua_pushcclosure(L, clj_host_call, 1);
    return 1;
}

static void clj_wrap_pattern(lua_State *L, const char *name, int scans) {
    lua_getfield(L, -1, name);
    lua_pushstring(L, name);
    lua_pushinteger(L, scans);
    lua_pushcclosure(L, clj_bounded_pattern, 3);
    lua_setfield(L, -2, name);
}

/* Boot (run with lua_cpcall, so allocation failures are caught): opens the libraries policies
   may use, bounds the pattern functions, seals the string metatable, and runs the prelude
   (light userdata: a NUL-terminated chunk), whose returned entry function is kept by ref. */
static int clj_boot(lua_State *L) {
    const char *prelude = (const char *)lua_touserdata(L, 1);
    clj_vm *vm = clj_vm_of(L);
    lua_pushcfunction(L, luaopen_base); lua_pushstring(L, ""); lua_call(L, 1, 0);
    lua_pushcfunction(L, luaopen_table); lua_pushstring(L, LUA_TABLIBNAME); lua_call(L, 1, 0);
    lua_pushcfunction(L, luaopen_string); lua_pushstring(L, LUA_STRLIBNAME); lua_call(L, 1, 0);
    lua_pushcfunction(L, luaopen_math); lua_pushstring(L, LUA_MATHLIBNAME); lua_call(L, 1, 0);
    lua_pushcfunction(L, luaopen_bit); lua_pushstring(L, LUA_BITLIBNAME); lua_call(L, 1, 0);
    lua_getglobal(L, "string");
    clj_wrap_pattern(L, "find", 0);
    clj_wrap_pattern(L, "match", 0);
    clj_wrap_pattern(L, "gmatch", 1);
    clj_wrap_pattern(L, "gsub", 1);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    /* getmetatable("") answers false: the string metatable (whose __index is the real string
       library) is out of reach. */
    lua_pushliteral(L, "");
    if (lua_getmetatable(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, clj_safe_pcall); lua_setglobal(L, "pcall");
    lua_pushcfunction(L, clj_safe_xpcall); lua_setglobal(L, "xpcall");
    lua_pushcfunction(L, clj_make_host_function); lua_setglobal(L, "__host_function");
    lua_pushcfunction(L, clj_next_hook); lua_setglobal(L, "__next_hook");
    lua_pushcfunction(L, clj_ended); lua_setglobal(L, "__ended");
    lua_pushcfunction(L, clj_req_header); lua_setglobal(L, "__req_header");
    lua_pushcfunction(L, clj_new_ctx); lua_setglobal(L, "__new_ctx");
    if (luaL_loadbuffer(L, prelude, strlen(prelude), "=tandem-prelude") != 0) return lua_error(L);
    lua_call(L, 0, 1);
    if (lua_type(L, -1) != LUA_TFUNCTION) return luaL_error(L, "the prelude must return its entry function");
    vm->entry_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Creates a VM with a memory limit; JIT off (hooks only fire in the interpreter) and, unless
   the watchdog arms it (vm->watched), the count hook armed for its whole life. Returns NULL if
   the state cannot be created. */
static inline lua_State *clj_vm_open(clj_vm *vm) {
    lua_State *L = lua_newstate(clj_alloc, vm);
    if (!L) return NULL;
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    if (!vm->watched) lua_sethook(L, clj_limit_hook, LUA_MASKCOUNT, CLJ_HOOK_PERIOD);
    return L;
}
/* Runs clj_boot protected; on failure the message is at the top of the stack. */
static inline int clj_vm_boot(lua_State *L, const char *prelude) {
    return lua_cpcall(L, clj_boot, (void *)prelude);
}
/* entry(op, a, b, c) protected; results (up to 2) are left on the stack for the host to read. */
static inline int clj_vm_enter(lua_State *L, clj_vm *vm, int op, double a, double b, double c) {
    lua_settop(L, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->entry_ref);
    lua_pushinteger(L, op);
    lua_pushnumber(L, a);
    lua_pushnumber(L, b);
    lua_pushnumber(L, c);
    if (!vm->watched) {
        int status = lua_pcall(L, 4, 2, 0);
        if (vm->tripped) clj_rearm(L);
        return status;
    }
    /* Announce the call before reading `parked` (the watchdog sets `parked` before reading
       `in_call`): either it sees this call or this call sees it parked and wakes it. */
    __atomic_store_n(&vm->calls, vm->calls + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&vm->in_call, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(vm->parked, __ATOMIC_SEQ_CST)) vm->wake(vm->wake_context);
    int status = lua_pcall(L, 4, 2, 0);
    __atomic_store_n(&vm->in_call, 0, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&vm->armed, __ATOMIC_SEQ_CST)) {
        /* The watchdog armed it for a long call (or a tripped one escalated): off again. */
        pthread_mutex_lock(vm->watch_lock);
        lua_sethook(L, NULL, 0, 0);
        __atomic_store_n(&vm->armed, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(vm->watch_lock);
    }
    return status;
}
static inline void clj_vm_collect(lua_State *L) { lua_gc(L, LUA_GCCOLLECT, 0); }
static inline const char *clj_vm_string(lua_State *L, int idx, size_t *len) {
    if (lua_type(L, idx) != LUA_TSTRING) { *len = 0; return NULL; }
    return lua_tolstring(L, idx, len);
}
static inline double clj_vm_number(lua_State *L, int idx) {
    return lua_type(L, idx) == LUA_TNUMBER ? lua_tonumber(L, idx) : -1;
}

#endif
