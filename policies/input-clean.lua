-- input-clean: the seed's input-cleaning middleware, in front of the app. Query arguments are
-- decoded, trimmed, stripped of control characters and re-encoded; arguments not in `allow`
-- (when given) are dropped; a value longer than `max_length` or more than `max_args`
-- arguments is refused 400. The listed headers are trimmed and stripped the same way.
--   config = { allow = { "limit", "q" }, max_length = 256, max_args = 32, headers = { "x-user-agent" } }
local function clean(s)
  s = s:gsub("%c", "")
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end
return {
  name = "input-clean",
  config = {
    allow = { type = "set", of = "string" },
    max_length = { type = "integer", default = 256, between = { 1, 65536 } },
    max_args = { type = "integer", default = 32, between = { 1, 1024 } },
    headers = { type = "array", of = "string", default = {} },
  },
  on_request = function(req, ctx, cfg)
    if req.query ~= "" then
      local parts, n = {}, 0
      for pair in req.query:gmatch("[^&]+") do
        n = n + 1
        if n > cfg.max_args then return tandem.deny(400, "too many query arguments") end
        local k, v = pair:match("^([^=]*)=?(.*)$")
        k, v = clean(tandem.url.unescape(k) or ""), clean(tandem.url.unescape(v) or "")
        if #v > cfg.max_length then return tandem.deny(400, "query argument " .. k .. " is too long") end
        if k ~= "" and (cfg.allow == nil or cfg.allow[k]) then
          parts[#parts + 1] = tandem.url.escape(k) .. "=" .. tandem.url.escape(v)
        end
      end
      req:set_query(table.concat(parts, "&"))
    end
    for _, h in ipairs(cfg.headers) do
      local v = req:header(h)
      if v then
        v = clean(v)
        if #v > cfg.max_length then return tandem.deny(400, "header " .. h .. " is too long") end
        req:set_header(h, v)
      end
    end
  end,
}
