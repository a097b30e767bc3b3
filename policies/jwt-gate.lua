-- jwt-gate: the seed's JWT middleware as a gate on verified claims. The token is verified
-- natively by the sidecar (signature, issuer, audience, expiry); this policy decides what the
-- claims must say and which claims reach the app as headers.
--   missing claims (no or invalid token)  -> 401 "missing token" with WWW-Authenticate
--   wrong issuer or insufficient scope    -> 403
-- `paths` (prefixes) and `methods` narrow what it guards (default: every request); on a request
-- it does not guard it only sets the forwarded headers from verified claims (or removes them).
return {
  name = "jwt-gate",
  config = {
    issuer = { type = "string" },
    scopes = { type = "array", of = "string", default = {} },
    require = { type = "map", of = "string" },
    forward = { type = "map", of = "string", default = { sub = "x-user-id" } },
    paths = { type = "array", of = "string", default = {} },
    methods = { type = "set", of = "string" },
  },
  on_request = function(req, ctx, cfg)
    -- Forwarded headers carry only verified claims: set from the claim, else removed.
    local function forward()
      for claim, header in pairs(cfg.forward) do
        local v = req:claim(claim)
        if v ~= nil and type(v) ~= "table" then req:set_header(header, tostring(v)) else req:remove_header(header) end
      end
    end
    local guarded = cfg.methods == nil or cfg.methods[req.method]
    if guarded and #cfg.paths > 0 then
      guarded = false
      for _, p in ipairs(cfg.paths) do
        if tandem.match.prefix(req.path, p) then guarded = true break end
      end
    end
    if not guarded then return forward() end
    local sub = req:claim("sub")
    if sub == nil then
      return tandem.deny(401, "missing token", { ["www-authenticate"] = 'Bearer realm="tandem"' })
    end
    if cfg.issuer and req:claim("iss") ~= cfg.issuer then
      return tandem.deny(403, "token issuer not accepted")
    end
    if #cfg.scopes > 0 then
      local have = {}
      for s in tostring(req:claim("scope") or ""):gmatch("%S+") do have[s] = true end
      for _, s in ipairs(cfg.scopes) do
        if not have[s] then return tandem.deny(403, "insufficient scope: needs " .. s) end
      end
    end
    for claim, want in pairs(cfg.require or {}) do
      if tostring(req:claim(claim)) ~= want then return tandem.deny(403, "claim " .. claim .. " not accepted") end
    end
    forward()
  end,
}
