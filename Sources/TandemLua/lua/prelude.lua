-- Tandem's policy prelude: trusted code run once per VM at boot (JIT off, under the same
-- limits as policies). It builds the `tandem` module and each policy's sandboxed environment,
-- validates policy configs against their schemas, and is the single entry point the host calls
-- (entry(op, a, b, c)). `OPS` (host operation numbers) is prepended by the host from the same
-- table that generates the LuaLS definitions.
local H = {}
for name, op in pairs(OPS) do H[name] = __host_function(op) end
local next_hook, ended, req_header, new_ctx = __next_hook, __ended, __req_header, __new_ctx
__host_function, __next_hook, __ended, __req_header, __new_ctx, OPS = nil, nil, nil, nil, nil, nil

local load, pairs, ipairs, type, tostring, tonumber, select, error, setmetatable, getmetatable, next, unpack, rawget =
  load, pairs, ipairs, type, tostring, tonumber, select, error, setmetatable, getmetatable, next, unpack, rawget
local pcall = pcall
local sbyte, schar, sfind, ssub, sformat, srep, concat, floor, huge =
  string.byte, string.char, string.find, string.sub, string.format, string.rep, table.concat, math.floor, math.huge

local function fail(msg) error(msg, 0) end

---------------------------------------------------------------------------------------------
-- JSON (bounded: depth and size)
---------------------------------------------------------------------------------------------
local json = {}
local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
local function escape_char(c) return escapes[c] or sformat("\\u%04x", sbyte(c)) end
local null = setmetatable({}, { __tostring = function() return "null" end, __metatable = false })
json.null = null

local function is_array(t)
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
    n = n + 1
  end
  for i = 1, n do if t[i] == nil then return false end end
  return true, n
end

local function encode(v, depth, out, max_depth)
  local t = type(v)
  if v == nil or v == null then out[#out + 1] = "null"
  elseif t == "boolean" then out[#out + 1] = v and "true" or "false"
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then fail("json.encode: cannot encode " .. tostring(v)) end
    if v % 1 == 0 and v > -1e15 and v < 1e15 then out[#out + 1] = sformat("%d", v)
    else
      -- The shortest of %.15g/%.16g/%.17g that reads back as the same double (0.1, not
      -- 0.10000000000000001).
      local text = sformat("%.15g", v)
      if tonumber(text) ~= v then text = sformat("%.16g", v) end
      if tonumber(text) ~= v then text = sformat("%.17g", v) end
      out[#out + 1] = text
    end
  elseif t == "string" then
    out[#out + 1] = '"' .. v:gsub('[%c"\\]', escape_char) .. '"'
  elseif t == "table" then
    if depth >= max_depth then fail("json.encode: nested deeper than " .. max_depth) end
    local arr, n = is_array(v)
    if arr and n > 0 then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], depth + 1, out, max_depth)
      end
      out[#out + 1] = "]"
    elseif arr then
      out[#out + 1] = "{}"
    else
      local keys = {}
      for k in pairs(v) do
        if type(k) ~= "string" and type(k) ~= "number" then fail("json.encode: keys must be strings") end
        keys[#keys + 1] = tostring(k)
      end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        encode(k, depth + 1, out, max_depth)
        out[#out + 1] = ":"
        local value = v[k]
        if value == nil then value = v[tonumber(k)] end
        encode(value, depth + 1, out, max_depth)
      end
      out[#out + 1] = "}"
    end
  else
    fail("json.encode: cannot encode a " .. t)
  end
end

function json.encode(v, opts)
  local out = {}
  encode(v, 0, out, (opts and opts.max_depth) or 64)
  return concat(out)
end

local function decode_error(s, i, what) fail(sformat("json.decode: %s at byte %d", what, i)) end
local function skip(s, i)
  while true do
    local b = sbyte(s, i)
    if b == 32 or b == 9 or b == 10 or b == 13 then i = i + 1 else return i end
  end
end
local decode_value
local unescapes = { [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r", [116] = "\t", [34] = '"', [92] = "\\", [47] = "/" }
local function utf8_char(c)
  if c < 0x80 then return schar(c)
  elseif c < 0x800 then return schar(0xC0 + floor(c / 64), 0x80 + c % 64)
  elseif c < 0x10000 then return schar(0xE0 + floor(c / 4096), 0x80 + floor(c / 64) % 64, 0x80 + c % 64)
  else return schar(0xF0 + floor(c / 262144), 0x80 + floor(c / 4096) % 64, 0x80 + floor(c / 64) % 64, 0x80 + c % 64) end
end
local function decode_string(s, i)
  local parts, start = {}, i + 1
  local j = start
  while true do
    local b = sbyte(s, j)
    if not b then decode_error(s, j, "unterminated string") end
    if b == 34 then
      parts[#parts + 1] = ssub(s, start, j - 1)
      return concat(parts), j + 1
    elseif b == 92 then
      parts[#parts + 1] = ssub(s, start, j - 1)
      local e = sbyte(s, j + 1)
      if e == 117 then
        local hex = ssub(s, j + 2, j + 5)
        local c = tonumber(hex, 16)
        if not c or #hex ~= 4 then decode_error(s, j, "bad \\u escape") end
        if c >= 0xD800 and c <= 0xDBFF and ssub(s, j + 6, j + 7) == "\\u" then
          local lo = tonumber(ssub(s, j + 8, j + 11), 16)
          if lo and lo >= 0xDC00 and lo <= 0xDFFF then
            c = 0x10000 + (c - 0xD800) * 1024 + (lo - 0xDC00)
            j = j + 6
          end
        end
        parts[#parts + 1] = utf8_char(c)
        j = j + 6
      elseif unescapes[e] then
        parts[#parts + 1] = unescapes[e]
        j = j + 2
      else
        decode_error(s, j, "bad escape")
      end
      start = j
    elseif b < 32 then
      decode_error(s, j, "control character in string")
    else
      j = j + 1
    end
  end
end
decode_value = function(s, i, depth, max_depth)
  i = skip(s, i)
  local b = sbyte(s, i)
  if b == 123 or b == 91 then
    if depth >= max_depth then decode_error(s, i, "nested deeper than " .. max_depth) end
    local t, close = {}, b == 123 and 125 or 93
    i = skip(s, i + 1)
    if sbyte(s, i) == close then return t, i + 1 end
    local n = 0
    while true do
      if b == 123 then
        if sbyte(s, i) ~= 34 then decode_error(s, i, "expected a string key") end
        local k
        k, i = decode_string(s, i)
        i = skip(s, i)
        if sbyte(s, i) ~= 58 then decode_error(s, i, "expected ':'") end
        local v
        v, i = decode_value(s, i + 1, depth + 1, max_depth)
        t[k] = v
      else
        local v
        v, i = decode_value(s, i, depth + 1, max_depth)
        n = n + 1
        t[n] = v
      end
      i = skip(s, i)
      local c = sbyte(s, i)
      if c == close then return t, i + 1 end
      if c ~= 44 then decode_error(s, i, "expected ',' or a closing bracket") end
      i = skip(s, i + 1)
    end
  elseif b == 34 then
    return decode_string(s, i)
  elseif ssub(s, i, i + 3) == "true" then return true, i + 4
  elseif ssub(s, i, i + 4) == "false" then return false, i + 5
  elseif ssub(s, i, i + 3) == "null" then return null, i + 4
  else
    local j = i
    while true do
      local c = sbyte(s, j)
      if c and (c == 43 or c == 45 or c == 46 or c == 69 or c == 101 or (c >= 48 and c <= 57)) then j = j + 1 else break end
    end
    local num = tonumber(ssub(s, i, j - 1))
    if j == i or not num then decode_error(s, i, "unexpected character") end
    return num, j
  end
end

function json.decode(s, opts)
  if type(s) ~= "string" then fail("json.decode: expected a string, got " .. type(s)) end
  local max_bytes = (opts and opts.max_bytes) or 1048576
  if #s > max_bytes then fail(sformat("json.decode: %d bytes is over the %d-byte limit", #s, max_bytes)) end
  local v, i = decode_value(s, 1, 0, (opts and opts.max_depth) or 64)
  i = skip(s, i)
  if i <= #s then decode_error(s, i, "trailing characters") end
  return v
end

---------------------------------------------------------------------------------------------
-- Config schemas (Kong-style): each field { type, required, default, between, one_of, of, fields }
---------------------------------------------------------------------------------------------
local TYPES = { string = true, number = true, integer = true, boolean = true, array = true, set = true, map = true,
  record = true, any = true }
local FIELD_KEYS = { type = true, required = true, default = true, between = true, one_of = true, of = true,
  fields = true, description = true, max_length = true }

local function check_schema(schema, path)
  if type(schema) ~= "table" then fail(path .. ": a schema must be a table of fields") end
  for name, f in pairs(schema) do
    local p = path .. "." .. tostring(name)
    if type(name) ~= "string" then fail(path .. ": field names must be strings") end
    if type(f) ~= "table" then fail(p .. ": expected a field table like { type = \"string\" }") end
    for k in pairs(f) do
      if not FIELD_KEYS[k] then fail(p .. ": unknown schema key '" .. tostring(k) .. "'") end
    end
    if not TYPES[f.type] then fail(p .. ".type: expected one of string, number, integer, boolean, array, set, map, record, any; found " .. tostring(f.type)) end
    if f.type == "record" then check_schema(f.fields or {}, p .. ".fields") end
  end
end

local function describe(v)
  local t = type(v)
  if t == "string" then return sformat("the string %q", #v > 40 and ssub(v, 1, 40) .. "..." or v) end
  if t == "table" then return "a table" end
  return t == "nil" and "nothing" or sformat("%s %s", t, tostring(v))
end

local validate
local function validate_value(f, v, p)
  local t = f.type
  if t == "any" then return v end
  if t == "string" then
    if type(v) ~= "string" then fail(p .. ": expected a string, found " .. describe(v)) end
    if f.max_length and #v > f.max_length then fail(sformat("%s: longer than %d bytes", p, f.max_length)) end
  elseif t == "number" or t == "integer" then
    if type(v) ~= "number" then fail(p .. ": expected a " .. t .. ", found " .. describe(v)) end
    if t == "integer" and v % 1 ~= 0 then fail(p .. ": expected an integer, found " .. tostring(v)) end
    if f.between and (v < f.between[1] or v > f.between[2]) then
      fail(sformat("%s: expected a value between %s and %s, found %s", p, tostring(f.between[1]), tostring(f.between[2]), tostring(v)))
    end
  elseif t == "boolean" then
    if type(v) ~= "boolean" then fail(p .. ": expected a boolean, found " .. describe(v)) end
  elseif t == "array" or t == "set" then
    if type(v) ~= "table" then fail(p .. ": expected " .. (t == "set" and "a set (a list)" or "a list") .. ", found " .. describe(v)) end
    local ok, n = is_array(v)
    if not ok then fail(p .. ": expected a list, found a table with non-index keys") end
    local out = {}
    for i = 1, n do
      local item = f.of and validate_value(type(f.of) == "table" and f.of or { type = f.of }, v[i], sformat("%s[%d]", p, i)) or v[i]
      if t == "set" then out[item] = true else out[i] = item end
    end
    return out
  elseif t == "map" then
    if type(v) ~= "table" then fail(p .. ": expected a map, found " .. describe(v)) end
    local out = {}
    for k, item in pairs(v) do
      out[k] = f.of and validate_value(type(f.of) == "table" and f.of or { type = f.of }, item, p .. "." .. tostring(k)) or item
    end
    return out
  elseif t == "record" then
    if type(v) ~= "table" then fail(p .. ": expected a table, found " .. describe(v)) end
    return validate(f.fields or {}, v, p)
  end
  if f.one_of then
    for _, allowed in ipairs(f.one_of) do if allowed == v then return v end end
    local names = {}
    for i, allowed in ipairs(f.one_of) do names[i] = tostring(allowed) end
    fail(sformat("%s: expected one of %s, found %s", p, concat(names, ", "), describe(v)))
  end
  return v
end

validate = function(schema, given, path)
  given = given or {}
  if type(given) ~= "table" then fail(path .. ": expected a table, found " .. describe(given)) end
  local out = {}
  for k in pairs(given) do
    if schema[k] == nil then
      local names = {}
      for name in pairs(schema) do names[#names + 1] = name end
      table.sort(names)
      fail(sformat("%s.%s: unknown key (this policy takes: %s)", path, tostring(k), #names > 0 and concat(names, ", ") or "nothing"))
    end
  end
  for name, f in pairs(schema) do
    local v = given[name]
    if v == nil or v == null then
      if f.default ~= nil then v = f.default
      elseif f.required then fail(path .. "." .. name .. ": required") end
    end
    if v ~= nil and v ~= null then out[name] = validate_value(f, v, path .. "." .. name) end
  end
  return out
end

---------------------------------------------------------------------------------------------
-- Request, response and transaction objects. Each holds the request's generation; the host
-- refuses a handle from another request ("used outside its hook").
---------------------------------------------------------------------------------------------
local function list(fetch, gen, name)
  local out, i = {}, 1
  while true do
    local v = fetch(gen, name, i)
    if v == nil then return out end
    out[i] = v
    i = i + 1
  end
end
local function header_table(at, gen)
  local out, i = {}, 1
  while true do
    local k, v = at(gen, i)
    if k == nil then return out end
    local prev = out[k]
    if prev == nil then out[k] = v
    elseif type(prev) == "table" then prev[#prev + 1] = v
    else out[k] = { prev, v } end
    i = i + 1
  end
end

local Req = {}
-- req_header: H.req_header answered from the C side's copy of the request's fields when it
-- holds them (the host keeps it for the request whose on_request runs, until a hook edits them).
function Req:header(name) return req_header(self[1], name, 1) end
function Req:header_values(name) return list(req_header, self[1], name) end
function Req:headers() return header_table(H.req_header_at, self[1]) end
-- set_header/add_header/remove_header over the host's operations. Header values: strings and
-- integers below 10^14 go to the host as they are (it writes such a number as tostring does,
-- without making a Lua string); anything else through tostring.
-- (The test is written out in both setters: a call per set_header costs more than the test.)
local function header_setters(set, add)
  return function(self, name, value)
    if value ~= nil then
      local t = type(value)
      if t ~= "string" and (t ~= "number" or value % 1 ~= 0 or value >= 1e14 or value <= -1e14) then
        value = tostring(value)
      end
    end
    set(self[1], name, value)
  end, function(self, name, value)
    local t = type(value)
    if t ~= "string" and value ~= nil and (t ~= "number" or value % 1 ~= 0 or value >= 1e14 or value <= -1e14) then
      value = tostring(value)
    end
    add(self[1], name, value)
  end, function(self, name) set(self[1], name, nil) end
end
Req.set_header, Req.add_header, Req.remove_header = header_setters(H.req_set_header, H.req_add_header)
function Req:query_arg(name) return H.req_query_arg(self[1], name) end
function Req:query_args() return json.decode(H.req_query_args_json(self[1])) end
function Req:param(name) return H.req_param(self[1], name) end
function Req:body() return H.req_body(self[1]) end
function Req:set_path(p) H.req_set(self[1], "path", p) end
function Req:set_query(q) H.req_set(self[1], "query", q) end
function Req:set_method(m) H.req_set(self[1], "method", m) end
function Req:set_upstream(cluster) H.req_route(self[1], "upstream", cluster) end
function Req:set_subset(match)
  if type(match) ~= "table" then error("set_subset: expected a table of metadata like { version = \"v2\" }", 2) end
  H.req_route(self[1], "subset", json.encode(match))
end
function Req:set_timeout(ms) H.req_route(self[1], "timeout_ms", ms) end
function Req:set_retries(n) H.req_route(self[1], "retries", n) end
function Req:claim(name)
  local v, encoded = H.req_claim(self[1], name)
  if encoded then return json.decode(v) end
  return v
end
local REQ_FIELDS = { method = true, path = true, query = true, authority = true, remote_addr = true, route = true,
  caller = true, side = true, id = true }
local ReqMT = { __metatable = false }
ReqMT.__index = function(t, k)
  local m = Req[k]
  if m then return m end
  if REQ_FIELDS[k] then return H.req_field(t[1], k) end
  return nil
end
ReqMT.__newindex = function(t, k) fail("request fields are read-only; use req:set_" .. tostring(k) .. "(...) where one exists") end

local Res = {}
function Res:header(name) return H.res_header(self[1], name, 1) end
function Res:header_values(name) return list(H.res_header, self[1], name) end
function Res:headers() return header_table(H.res_header_at, self[1]) end
Res.set_header, Res.add_header, Res.remove_header = header_setters(H.res_set_header, H.res_add_header)
function Res:body() return H.res_body(self[1]) end
local RES_FIELDS = { status = true, reason = true, upstream = true, attempts = true, duration_ms = true }
local function object_mt(methods, fields, kind)
  local mt = { __metatable = false }
  mt.__index = function(t, k)
    local m = methods[k]
    if m then return m end
    if k == "request" then return setmetatable({ t[1] }, ReqMT) end
    if fields[k] then return H.res_field(t[1], k) end
    return nil
  end
  mt.__newindex = function() fail(kind .. " fields are read-only") end
  return mt
end
local ResMT = object_mt(Res, RES_FIELDS, "response")
local TxnMT = object_mt({ header = Res.header }, RES_FIELDS, "transaction")

---------------------------------------------------------------------------------------------
-- The tandem module, one copy per policy (a policy cannot change another's)
---------------------------------------------------------------------------------------------
local DECISION = setmetatable({}, { __metatable = false })
local function decision(kind, status, body, headers)
  if type(status) ~= "number" or status % 1 ~= 0 or status < 200 or status > 599 then
    fail(sformat("tandem.%s: status must be an integer from 200 to 599, found %s", kind, tostring(status)))
  end
  if body ~= nil and type(body) ~= "string" then
    if type(body) == "table" then body = json.encode(body) else body = tostring(body) end
  end
  if headers ~= nil and type(headers) ~= "table" then fail("tandem." .. kind .. ": headers must be a table") end
  return { [DECISION] = kind, status = status, body = body, headers = headers }
end

local LEVELS = { debug = 0, info = 1, warn = 2, error = 3 }
local function make_tandem(id)
  local t = { json = { encode = json.encode, decode = json.decode, null = null } }
  function t.respond(status, body, headers) return decision("respond", status, body, headers) end
  function t.deny(status, message, headers)
    status = status or 403
    return decision("deny", status, json.encode({ code = status, message = message or "denied by policy" }), headers)
  end
  function t.redirect(location, status)
    if type(location) ~= "string" then fail("tandem.redirect: location must be a string") end
    return decision("redirect", status or 302, nil, { location = location })
  end
  function t.now() return H.now() end
  function t.random() return H.random() end
  function t.random_int(a, b) return H.random_int(a, b) end
  t.log = {}
  for level, n in pairs(LEVELS) do
    t.log[level] = function(msg, fields)
      H.log(id, n, tostring(msg), fields ~= nil and json.encode(fields) or nil)
    end
  end
  t.base64 = { encode = function(s) return H.base64(s, false) end, decode = function(s) return H.base64(s, true) end,
    url_decode = function(s) return H.base64(s, true, true) end }
  t.url = { escape = function(s) return H.url(s, false) end, unescape = function(s) return H.url(s, true) end }
  t.match = {
    prefix = function(s, p) return ssub(s, 1, #p) == p end,
    suffix = function(s, p) return #p == 0 or ssub(s, -#p) == p end,
  }
  t.limit = {
    token_bucket = function(key, rate, burst) return H.token_bucket(id, tostring(key), rate, burst) end,
    window = function(key, limit, seconds) return H.window(id, tostring(key), limit, seconds) end,
  }
  local Dict = {}
  Dict.__index = Dict
  Dict.__metatable = false
  -- Operations by number on the dict's id (resolved once): no strings to compare per call.
  local shared = H.shared
  function Dict:get(k) return shared(self.id, 1, tostring(k)) end
  function Dict:set(k, v, ttl) return shared(self.id, 2, tostring(k), v, ttl) end
  function Dict:add(k, v, ttl) return shared(self.id, 3, tostring(k), v, ttl) end
  function Dict:incr(k, delta, init, init_ttl) return shared(self.id, 4, tostring(k), delta, init, init_ttl) end
  function Dict:delete(k) return shared(self.id, 5, tostring(k)) end
  function Dict:ttl(k) return shared(self.id, 6, tostring(k)) end
  function Dict:expire(k, ttl) return shared(self.id, 7, tostring(k), ttl) end
  t.shared = setmetatable({}, { __metatable = false, __index = function(s, name)
    local id = H.shared(name, 0)
    if not id then
      fail("tandem.shared." .. tostring(name) .. ": no such dict (declare it in the policy's `shared` table)")
    end
    local d = setmetatable({ name = name, id = id }, Dict)
    rawset(s, name, d)
    return d
  end })
  local Metric = {}
  Metric.__index = Metric
  Metric.__metatable = false
  function Metric:inc(n, ...) H.metric(self.id, n or 1, ...) end
  function Metric:observe(v, ...) H.metric(self.id, v, ...) end
  t.metrics = {
    counter = function(name, labels) return setmetatable({ id = H.metric_declare(id, "counter", name, labels and concat(labels, ",") or "") }, Metric) end,
    histogram = function(name, labels, buckets)
      local b = {}
      for i, v in ipairs(buckets or {}) do b[i] = tostring(v) end
      return setmetatable({ id = H.metric_declare(id, "histogram", name, labels and concat(labels, ",") or "", concat(b, ",")) }, Metric)
    end,
  }
  return t
end

local SAFE = { "assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring", "type",
  "unpack", "xpcall", "setmetatable", "getmetatable", "rawequal", "rawget", "rawset" }
local LIBS = { string = string, table = table, math = math, bit = bit }
local G = _G
local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end
local function new_env(tandem)
  local env = {}
  for _, n in ipairs(SAFE) do env[n] = G[n] end
  for name, lib in pairs(LIBS) do env[name] = copy(lib) end
  env.math.randomseed = nil
  env.math.random = function(m, n)
    if m == nil then return H.random() end
    if n == nil then return H.random_int(1, m) end
    return H.random_int(m, n)
  end
  env._VERSION = _VERSION
  env.tandem = tandem
  env.print = function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    tandem.log.info(concat(parts, "\t"))
  end
  env._G = env
  return setmetatable(env, { __metatable = false })
end

---------------------------------------------------------------------------------------------
-- Entry
---------------------------------------------------------------------------------------------
local policies = {}
local ctxs = {}
local HOOKS = { on_request = true, on_response = true, on_log = true }
local POLICY_KEYS = { name = true, version = true, description = true, config = true, shared = true, init = true,
  on_request = true, on_response = true, on_log = true, response_body = true, request_body = true }

local function load_policy(id)
  local file, source, config_json, path = H.load_source()
  local tandem = make_tandem(id)
  local env = new_env(tandem)
  local chunk, err = load(source, "@" .. file, "t", env)
  if not chunk then fail(err) end
  local def = chunk()
  if type(def) ~= "table" then fail(file .. ": a policy must return a table, it returned " .. describe(def)) end
  for k, v in pairs(def) do
    if not POLICY_KEYS[k] then fail(sformat("%s: unknown policy key '%s'", file, tostring(k))) end
    if HOOKS[k] and type(v) ~= "function" then fail(sformat("%s: %s must be a function, found %s", file, k, describe(v))) end
  end
  if type(def.name) ~= "string" or def.name == "" then fail(file .. ": name: expected a non-empty string") end
  if def.response_body ~= nil and type(def.response_body) ~= "boolean" then fail(file .. ": response_body: expected true or false") end
  if def.request_body ~= nil and type(def.request_body) ~= "boolean" then fail(file .. ": request_body: expected true or false") end
  H.policy_name(def.name, def.on_request ~= nil, def.on_response ~= nil, def.on_log ~= nil, def.response_body == true,
    def.request_body == true)
  if def.init ~= nil and type(def.init) ~= "function" then fail(file .. ": init must be a function") end
  if not (def.on_request or def.on_response or def.on_log) then fail(file .. ": a policy needs on_request, on_response or on_log") end
  local schema = def.config or {}
  check_schema(schema, file .. ": config")
  for name, decl in pairs(def.shared or {}) do
    local capacity = type(decl) == "table" and decl.capacity or nil
    if type(name) ~= "string" or type(capacity) ~= "number" or capacity < 1 then
      fail(sformat("%s: shared.%s: expected { capacity = <entries> }", file, tostring(name)))
    end
    H.shared(name, -1, capacity)
  end
  if config_json == "-check-" then return end  -- `tandem policy check`: no config, no init
  local given = config_json ~= "" and json.decode(config_json) or {}
  local cfg = validate(schema, given, path)
  local p = { def = def, cfg = cfg, env = env, name = def.name,
              on_request = def.on_request, on_response = def.on_response, on_log = def.on_log }
  if def.init then
    H.phase("init")
    def.init(cfg, env)
    H.phase("")
  end
  policies[id] = p
end

local function report(kind, result, name)
  if result == nil then return 0 end
  if type(result) == "table" and result[DECISION] then
    H.decide(result[DECISION], result.status, result.body)
    if result.headers then
      for k, v in pairs(result.headers) do
        if type(k) ~= "string" then fail(name .. ": decision header names must be strings") end
        H.decide_header(k, tostring(v))
      end
    end
    return 1
  end
  fail(sformat("%s returned %s; return nothing to continue, or tandem.respond/deny/redirect(...)", kind, describe(result)))
end

local ENTRY_LOAD, ENTRY_UNLOAD, ENTRY_REQUEST, ENTRY_RESPONSE, ENTRY_LOG, ENTRY_END, ENTRY_MOVE, ENTRY_CHAIN_ADD,
  ENTRY_CHAIN_DROP = 1, 2, 3, 4, 5, 6, 7, 8, 9
-- Per request: its ctx and its request handle, made once and reused by every hook of the
-- request, at the request's slot (the generation's low 24 bits: an array index, reused by the
-- host once the request ended); dropped by ENTRY_END (which the host batches: `a` = how many
-- generations to read with ended(i), from the VM's C side).
local reqs = {}
local SLOTS = 16777216
local function request_state(b)
  local s = b % SLOTS
  local ctx = ctxs[s]
  if not ctx then
    ctx = new_ctx()
    ctxs[s] = ctx
    reqs[s] = setmetatable({ b }, ReqMT)
  end
  return ctx, reqs[s]
end
-- Chains: a route's policies in order (by key; -id is the chain of policy id alone). One call
-- runs a chain's hooks from position `c`: on_request forward, on_response backward. Each hook
-- gets its own budget (next_hook), and the host learns which one runs. Returns the decision
-- flag and the position of the hook that decided.
local chains = {}

return function(op, a, b, c)
  if op == ENTRY_REQUEST then
    local chain = chains[a]
    local ctx, req = request_state(b)
    for i = c, #chain do
      local p = policies[chain[i]]
      local f = p.on_request
      if f then
        next_hook(i)
        local r = f(req, ctx, p.cfg)
        if r ~= nil then return report("on_request", r, p.name), i end
      end
    end
    return 0, 0
  elseif op == ENTRY_RESPONSE then
    local chain = chains[a]
    local ctx = request_state(b)
    local res
    for i = c, 1, -1 do
      local p = policies[chain[i]]
      local f = p.on_response
      if f then
        next_hook(i)
        res = res or setmetatable({ b }, ResMT)
        local r = f(res, ctx, p.cfg)
        if r ~= nil then return report("on_response", r, p.name), i end
      end
    end
    return 0, 0
  elseif op == ENTRY_LOG then
    local p = policies[a]
    local ctx = request_state(b)
    p.on_log(setmetatable({ b }, TxnMT), ctx, p.cfg)
    return 0
  elseif op == ENTRY_END then
    for i = 1, a do
      local g = ended(i)
      if g == nil then break end
      local s = g % SLOTS
      ctxs[s], reqs[s] = nil, nil
    end
    return 0
  elseif op == ENTRY_LOAD then load_policy(a) return 0
  elseif op == ENTRY_UNLOAD then
    policies[a] = nil
    if a > 0 then chains[-a] = nil end
    return 0
  elseif op == ENTRY_MOVE then
    policies[b], policies[a] = policies[a], nil
    chains[-b] = { b }
    return 0
  elseif op == ENTRY_CHAIN_ADD then
    local chain = chains[a] or {}
    chain[#chain + 1] = b
    chains[a] = chain
    return 0
  elseif op == ENTRY_CHAIN_DROP then chains[a] = nil return 0
  end
  fail("bad entry op " .. tostring(op))
end
