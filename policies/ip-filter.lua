-- ip-filter: allow or deny callers by IPv4 CIDR (or exact address). With `allow`, only those
-- addresses pass; `deny` wins over `allow`. The peer address is used unless `trust_header`
-- names a header set by a trusted proxy in front (its first entry).
local function parse_ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function compile(list, what)
  local out = {}
  for i, entry in ipairs(list or {}) do
    local addr, bits = entry:match("^([^/]+)/(%d+)$")
    addr, bits = addr or entry, tonumber(bits or 32)
    local n = parse_ipv4(addr)
    if n and bits <= 32 then
      local size = 2 ^ (32 - bits)
      out[#out + 1] = { low = n - n % size, high = n - n % size + size - 1 }
    elseif not addr:find(":", 1, true) then
      error(string.format("%s[%d]: expected an IPv4 CIDR like 10.0.0.0/8 or an IPv6 address, found %q", what, i, entry))
    else
      out[#out + 1] = { exact = addr:lower() }
    end
  end
  return out
end

local function matches(rules, ip)
  local n = parse_ipv4(ip)
  for _, r in ipairs(rules) do
    if r.exact then
      if r.exact == ip:lower() then return true end
    elseif n and n >= r.low and n <= r.high then
      return true
    end
  end
  return false
end

local rules = {}
return {
  name = "ip-filter",
  config = {
    allow = { type = "array", of = "string" },
    deny = { type = "array", of = "string" },
    trust_header = { type = "string" },
  },
  init = function(cfg)
    rules.allow = cfg.allow and compile(cfg.allow, "allow") or nil
    rules.deny = compile(cfg.deny, "deny")
  end,
  on_request = function(req, ctx, cfg)
    local ip
    if cfg.trust_header then
      ip = (req:header(cfg.trust_header) or ""):match("^%s*([^,%s]+)")
    end
    if not ip then
      local addr = req.remote_addr
      ip = addr:match("^%[(.+)%]:%d+$") or addr:match("^(.+):%d+$") or addr
    end
    if matches(rules.deny, ip) or (rules.allow and not matches(rules.allow, ip)) then
      return tandem.deny(403, "address " .. ip .. " is not allowed")
    end
  end,
}
