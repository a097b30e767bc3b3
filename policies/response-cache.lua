-- response-cache: the seed's "cache high-frequency reads". Successful GET answers (up to
-- max_bytes, not private/no-store, without set-cookie) are kept in a shared dict — one cache
-- for every event loop of the sidecar — for `ttl` seconds and served from it (x-cache: hit).
return {
  name = "response-cache",
  response_body = true,
  shared = { response_cache = { capacity = 10000 } },
  config = {
    ttl = { type = "number", default = 10, between = { 0.001, 86400 } },
    max_bytes = { type = "integer", default = 65536, between = { 1, 65536 } },
    vary = { type = "array", of = "string", default = {} },
    statuses = { type = "set", of = "integer", default = { 200 } },
  },
  on_request = function(req, ctx, cfg)
    if req.method ~= "GET" then return end
    local key = req.authority .. " " .. req.path .. "?" .. req.query
    for _, h in ipairs(cfg.vary) do key = key .. "\n" .. (req:header(h) or "") end
    ctx.cache_key = key
    if (req:header("cache-control") or ""):find("no-cache", 1, true) then return end
    local hit = tandem.shared.response_cache:get(key)
    if not hit then return end
    local entry = tandem.json.decode(hit)
    local headers = { ["x-cache"] = "hit", age = math.floor((tandem.now() - entry.at) / 1000) }
    if entry.type then headers["content-type"] = entry.type end
    return tandem.respond(entry.status, entry.body, headers)
  end,
  on_response = function(res, ctx, cfg)
    if not ctx.cache_key or res.reason then return end
    res:set_header("x-cache", "miss")
    if not cfg.statuses[res.status] or res:header("set-cookie") then return end
    local cc = (res:header("cache-control") or ""):lower()
    if cc:find("no-store", 1, true) or cc:find("private", 1, true) then return end
    local body = res:body()
    if not body or #body > cfg.max_bytes then return end
    tandem.shared.response_cache:set(ctx.cache_key, tandem.json.encode({
      status = res.status, body = body, type = res:header("content-type"), at = tandem.now() }), cfg.ttl)
  end,
}
